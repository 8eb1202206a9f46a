"""SPEC §4, across domains: do two CPT runs of one base change the same heads in the same way?

A2 is the Frobenius cosine of the two deltas, A3 the overlap ‖U_{Δ1,k}ᵀU_{Δ2,k}‖²_F/k of their top-k left
singular subspaces (random k-subspaces of ℝ^d give k/d). Heads are then classified by agreement and
magnitude into domain-agnostic, domain-specific and inert.

A whole head's delta is the stack [ΔW_q,h; ΔW_k,g/√G; ΔW_v,g/√G; ΔW_o,hᵀ] (4·d_h × D, G = H/H_kv): the k/v
rows of a shared group are scaled so that each query head carries 1/G of their energy, exactly as head
scores split it. Its A2 is therefore the energy-weighted cosine over all projections, and its A3 uses the
left singular vectors of that stack (dimension 4·d_h; 3·d_h… without k/v).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch

from analysis.deltas.delta import (KV_PROJECTIONS, PROJECTIONS, HeadScores, head_energies, scores_from_energies,
                            top_svd)
from analysis.deltas.names import DEFAULT_A3_K  # noqa: F401 — re-exported
from analysis.deltas.svd import frob_inner, sq_frob
from analysis.errors import AlignmentError, DiffractError, LayoutError
from analysis.progress import Cancel, Progress, check

if TYPE_CHECKING:  # pragma: no cover - typing only
    from analysis.model.architecture import ModelLayout
    from analysis.io.checkpoint import Checkpoint
    from analysis.run.cache import Cache

CLASSES: tuple[str, ...] = ("agnostic", "specific", "inert")
HEAD_CHUNK = 16           # heads per batched SVD, bounds float64 memory on wide models


# --------------------------------------------------------------------------------------------------
# Tensor level
# --------------------------------------------------------------------------------------------------


def a2_cosine(d1: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
    """A2 = ⟨Δ1, Δ2⟩_F / (‖Δ1‖_F ‖Δ2‖_F) over the last two dims (…,), float64; NaN when a delta is zero."""
    if d1.shape != d2.shape:
        raise AlignmentError(f"cannot compare deltas of shapes {tuple(d1.shape)} and {tuple(d2.shape)}")
    inner = frob_inner(d1, d2)          # float64 sums slab by slab: no float64 copy of either delta
    n = (sq_frob(d1) * sq_frob(d2)).sqrt()
    return torch.where(n > 0, inner / n.clamp_min(torch.finfo(torch.float64).tiny),
                       torch.full_like(inner, math.nan)).clamp(-1.0, 1.0)


def effective_k(shape: Sequence[int], k: int = DEFAULT_A3_K) -> int:
    """k clamped to [1, min(m, n)] for an (…, m, n) matrix."""
    return max(1, min(int(k), int(shape[-2]), int(shape[-1])))


def subspace_overlap(U1: torch.Tensor, U2: torch.Tensor) -> torch.Tensor:
    """‖U1ᵀU2‖²_F / k for two orthonormal (…, d, k) bases: 1 for the same subspace, k/d on average at random."""
    k = U1.shape[-1]
    return (U1.transpose(-2, -1) @ U2).pow(2).sum(dim=(-2, -1)) / k


def left_subspace(d: torch.Tensor, k: int = DEFAULT_A3_K) -> torch.Tensor:
    """Top-k left singular vectors of each matrix of (…, m, n), float64 (…, m, k), in chunks of HEAD_CHUNK."""
    k = effective_k(d.shape, k)
    if d.dim() == 2:
        return top_svd(d, k).U
    flat = d.reshape(-1, d.shape[-2], d.shape[-1])
    parts = [top_svd(flat[i:i + HEAD_CHUNK], k).U for i in range(0, flat.shape[0], HEAD_CHUNK)]
    return torch.cat(parts).reshape(*d.shape[:-2], d.shape[-2], k)


def a3_subspace(d1: torch.Tensor, d2: torch.Tensor, k: int = DEFAULT_A3_K) -> torch.Tensor:
    """A3 = ‖U_{Δ1,k}ᵀ U_{Δ2,k}‖²_F / k over the last two dims (…,); NaN where a delta is zero."""
    if d1.shape != d2.shape:
        raise AlignmentError(f"cannot compare deltas of shapes {tuple(d1.shape)} and {tuple(d2.shape)}")
    return _a3_of(left_subspace(d1, k), left_subspace(d2, k), sq_frob(d1) == 0, sq_frob(d2) == 0)


def _a3_of(U1: torch.Tensor, U2: torch.Tensor, zero1: torch.Tensor, zero2: torch.Tensor) -> torch.Tensor:
    """A3 from two deltas' top-k left subspaces, NaN where either delta is zero."""
    out = subspace_overlap(U1, U2)
    return torch.where(zero1 | zero2, torch.full_like(out, math.nan), out)


def pairwise_agreement(delta_of: Callable[[int], torch.Tensor], pairs: Sequence[tuple[int, int]],
                       k: int = DEFAULT_A3_K) -> tuple[dict[tuple[int, int], float], dict[tuple[int, int], float]]:
    """A2 and A3 of each pair (i < j) of the domains' ΔW of one matrix, holding at most two ΔW at a time.

    `delta_of(i)` makes domain i's ΔW afresh (a re-read), and only each domain's top-k left subspace
    (rows × k) is kept between pairs: memory is two deltas whatever the number of domains (issue 13), and
    the numbers are those of `a2_cosine` / `a3_subspace` on the same deltas."""
    a2: dict[tuple[int, int], float] = {}
    a3: dict[tuple[int, int], float] = {}
    sub: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def subspace(i: int, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if i not in sub:
            sub[i] = (left_subspace(d, k), sq_frob(d) == 0)
        return sub[i]

    for i in sorted({a for a, _ in pairs}):
        di = delta_of(i)
        for j in sorted(b for a, b in pairs if a == i):
            dj = delta_of(j)
            a2[(i, j)] = float(a2_cosine(di, dj))
            (U1, z1), (U2, z2) = subspace(i, di), subspace(j, dj)
            a3[(i, j)] = float(_a3_of(U1, U2, z1, z2))
            del dj
        del di
    return a2, a3


def a3_random_level(k: int, d: int) -> float:
    """Expected A3 of two independent random k-dimensional subspaces of ℝ^d: k/d."""
    return min(1.0, k / d) if d > 0 else math.nan


# --------------------------------------------------------------------------------------------------
# Classification and rank correlation
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Classification:
    """Per-head classes (nested lists L × H of 'agnostic' / 'specific' / 'inert') and the thresholds used."""

    classes: list[list[str]]
    agreement_threshold: float
    magnitude_threshold: float
    agreement_metric: str = "a2"

    def counts(self) -> dict[str, int]:
        """How many heads fall into each class."""
        flat = [c for row in self.classes for c in row]
        return {c: flat.count(c) for c in CLASSES}


def _nanmedian(x: torch.Tensor) -> float:
    x = x[~torch.isnan(x)]
    return float(np.median(x.numpy())) if x.numel() else math.nan   # the mean of the two middles when even


def classify(agreement: torch.Tensor, magnitude: torch.Tensor, *,
             agreement_threshold: float | None = None, magnitude_threshold: float | None = None,
             agreement_metric: str = "a2") -> Classification:
    """inert: magnitude < threshold (or no delta); otherwise agnostic when agreement ≥ threshold, else specific.

    Defaults are medians (SPEC): the magnitude threshold is the median over all heads; the agreement threshold
    is the median over the non-inert heads, because an inert head's agreement is a cosine of noise.
    """
    if agreement.shape != magnitude.shape:
        raise ValueError("agreement and magnitude grids must have one shape")
    a = agreement.to(torch.float64)
    m = magnitude.to(torch.float64)
    mt = _nanmedian(m) if magnitude_threshold is None else float(magnitude_threshold)
    active = (m >= mt) & ~torch.isnan(m) & ~torch.isnan(a)
    at = _nanmedian(a[active]) if agreement_threshold is None else float(agreement_threshold)
    classes = [["inert" if not bool(active[i, j]) else ("agnostic" if float(a[i, j]) >= at else "specific")
                for j in range(a.shape[1])] for i in range(a.shape[0])]
    return Classification(classes=classes, agreement_threshold=at, magnitude_threshold=mt,
                          agreement_metric=agreement_metric)


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation of two score grids (scipy.stats.spearmanr over the flattened, non-NaN heads)."""
    from scipy.stats import spearmanr

    a = x.to(torch.float64).flatten().numpy()
    b = y.to(torch.float64).flatten().numpy()
    ok = ~(np.isnan(a) | np.isnan(b))
    if ok.sum() < 2 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return math.nan   # undefined for a constant grid (e.g. a checkpoint equal to its base)
    return float(spearmanr(a[ok], b[ok]).statistic)


# --------------------------------------------------------------------------------------------------
# Checkpoint walk: every domain against the base and against each other
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairAgreement:
    """A2 and A3 of one pair of domains (indices into the targets), (L × H) float64 grids."""

    pair: tuple[int, int]
    a2: torch.Tensor
    a3: torch.Tensor
    a2_projection: dict[str, torch.Tensor] = field(default_factory=dict)
    a3_projection: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class DomainAgreement:
    """Everything SPEC §4 says about N ≥ 2 domains of one base: per-domain head scores, pairwise A2/A3,
    their per-head means, the class of each head and the Spearman correlation of head scores."""

    labels: tuple[str, ...]
    k: int
    head_scores: list[HeadScores]
    pairs: list[PairAgreement]
    mean_a2: torch.Tensor
    mean_a3: torch.Tensor
    magnitude: torch.Tensor                 # mean head score r over the domains
    classification: Classification
    spearman: torch.Tensor                  # (N × N), 1 on the diagonal
    a3_random: float                        # k / (dimension of the whole-head stack)
    exclude_kv: bool = False

    def partner_mean(self, domain: int, metric: str = "a2", projection: str | None = None) -> torch.Tensor:
        """Mean of A2 or A3 (whole head, or one projection) over the pairs that include `domain`."""
        grids = []
        for p in self.pairs:
            if domain in p.pair:
                src = getattr(p, metric) if projection is None else getattr(p, f"{metric}_projection")[projection]
                grids.append(src)
        return torch.stack(grids).nanmean(0) if grids else torch.full_like(self.mean_a2, math.nan)

    def summary(self) -> dict[str, float | int | dict[str, int]]:
        """Mean agreement, mean off-diagonal Spearman and class counts (for the CLI summary)."""
        n = len(self.labels)
        off = [float(self.spearman[i, j]) for i in range(n) for j in range(n) if i < j]
        return {"mean_a2": float(self.mean_a2.nanmean()), "mean_a3": float(self.mean_a3.nanmean()),
                "a3_k": self.k, "a3_random": self.a3_random,
                "spearman": float(np.mean([v for v in off if not math.isnan(v)]))
                if any(not math.isnan(v) for v in off) else math.nan,
                "agreement_threshold": self.classification.agreement_threshold,
                "magnitude_threshold": self.classification.magnitude_threshold,
                "classes": self.classification.counts()}


def head_stack(parts: dict[str, torch.Tensor], layout: "ModelLayout") -> torch.Tensor:
    """Whole-head deltas (H, Σ rows, D): q rows, k/v rows of g(h) scaled by 1/√G, o columns transposed."""
    H, H_kv = layout.num_heads, layout.num_kv_heads
    G = H // H_kv
    device = next(iter(parts.values())).device
    groups = torch.tensor([layout.kv_group(h) for h in range(H)], dtype=torch.long, device=device)
    blocks = []
    for p in PROJECTIONS:
        if p not in parts:
            continue
        x = parts[p].to(torch.float64)
        if p in KV_PROJECTIONS:
            x = x.index_select(0, groups) / math.sqrt(G)
        elif p == "o":
            x = x.transpose(-2, -1)
        blocks.append(x)
    return torch.cat(blocks, dim=1)


def _per_query(values: torch.Tensor, proj: str, layout: "ModelLayout") -> torch.Tensor:
    """A per-kv-head agreement value (H_kv,) copied to each of its query heads (H,); q/o pass through."""
    if proj not in KV_PROJECTIONS:
        return values.cpu()
    groups = torch.tensor([layout.kv_group(h) for h in range(layout.num_heads)], dtype=torch.long,
                          device=values.device)
    return values.index_select(0, groups).cpu()


AGREEMENT_CACHE_VERSION = 1   # bump when what a cached agreement layer holds changes


def _layer_key(base: "Checkpoint", targets: Sequence["Checkpoint"], layer: int | str, projs: tuple[str, ...],
               k: int, dtype: torch.dtype, device_kind: str) -> dict[str, Any]:
    """Cache-key parts of one layer's agreement grids (or, with layer "spearman", of the score correlation)."""
    return dict(fingerprint=[base.fingerprint, *(t.fingerprint for t in targets)], tensor="attention",
                slice={"layer": layer, "projections": list(projs)},
                operation=f"delta/agreement/v{AGREEMENT_CACHE_VERSION}", settings={"k": int(k)},
                dtype=str(dtype).removeprefix("torch."), device_kind=device_kind)


def _grid_names(projs: tuple[str, ...], N: int, pairs: list[tuple[int, int]]) -> list[tuple[Any, ...]]:
    """The order of the (H,) rows of one layer's cached grids: energies, then per-projection and whole-head A2/A3."""
    names: list[tuple[Any, ...]] = [("de", t, p) for t in range(N) for p in projs] + [("be", p) for p in projs]
    names += [(m, pr, p) for pr in pairs for p in projs for m in ("a2p", "a3p")]
    return names + [(m, pr) for pr in pairs for m in ("a2h", "a3h")]


def _layer_grids(base: "Checkpoint", targets: Sequence["Checkpoint"], layout: "ModelLayout", layer: int,
                 projs: tuple[str, ...], pairs: list[tuple[int, int]], k: int, dtype: torch.dtype,
                 device: torch.device | str | None) -> dict[str, Any]:
    """One layer's head energies and A2/A3 grids, read and computed (one batched read per projection and
    checkpoint): {"k": k of the whole-head stack, "rows": its row count, "grids": {name: (H,) list}}."""
    from analysis.model.heads import projection_heads

    H, N = layout.num_heads, len(targets)
    out: dict[tuple[Any, ...], torch.Tensor] = {}
    deltas: list[dict[str, torch.Tensor]] = [dict() for _ in range(N)]
    for p in projs:
        b = projection_heads(base, layout, layer, p, dtype)
        b = b if device is None else b.to(device)
        for t_i, target in enumerate(targets):
            t = projection_heads(target, layout, layer, p, dtype)
            t = t if device is None else t.to(device)
            if t.shape != b.shape:
                raise AlignmentError(
                    f"layer {layer} {p}-projection heads have shapes {tuple(b.shape)} and {tuple(t.shape)}",
                    path=getattr(target, "path", None), hint="compare checkpoints of the same architecture")
            d = t - b
            deltas[t_i][p] = d
            e_d, e_b = head_energies(d, b, p, H)
            out[("de", t_i, p)] = e_d.cpu()
            if t_i == 0:
                out[("be", p)] = e_b.cpu()
        subspaces = [left_subspace(deltas[t_i][p], k) for t_i in range(N)]
        for (i, j) in pairs:
            out[("a2p", (i, j), p)] = _per_query(a2_cosine(deltas[i][p], deltas[j][p]), p, layout)
            ov = subspace_overlap(subspaces[i], subspaces[j])
            zero = torch.isnan(a2_cosine(deltas[i][p], deltas[j][p]))
            out[("a3p", (i, j), p)] = _per_query(torch.where(zero, torch.full_like(ov, math.nan), ov), p, layout)
    stacks = [head_stack(deltas[t_i], layout) for t_i in range(N)]
    heads_sub = [left_subspace(s, k) for s in stacks]
    for (i, j) in pairs:
        out[("a2h", (i, j))] = a2 = a2_cosine(stacks[i], stacks[j]).cpu()
        ov = subspace_overlap(heads_sub[i], heads_sub[j]).cpu()
        out[("a3h", (i, j))] = torch.where(torch.isnan(a2), torch.full_like(ov, math.nan), ov)
    names = _grid_names(projs, N, pairs)
    return {"k": effective_k(stacks[0].shape, k), "rows": int(stacks[0].shape[1]),
            "grids": [out[name].to(torch.float64).tolist() for name in names]}


def domain_agreement(base: "Checkpoint", targets: Sequence["Checkpoint"], layout: "ModelLayout", *,
                     k: int = DEFAULT_A3_K, dtype: torch.dtype = torch.float32, exclude_kv: bool = False,
                     agreement_metric: str = "a2", agreement_threshold: float | None = None,
                     magnitude_threshold: float | None = None,
                     device: torch.device | str | None = None,
                     progress: "Progress | None" = None, cancel: "Cancel | None" = None,
                     cache: "Cache | None" = None) -> DomainAgreement:
    """Walk every layer once (one batched read per projection and checkpoint) and compare all domain pairs.

    With a `cache`, each layer's grids (and the score correlation) are cached under the checkpoints'
    fingerprints, so a rerun reads no tensor; the classification (thresholds, metric) is redone from them."""
    from analysis.run.cache import cached_json

    if len(targets) < 2:
        raise DiffractError("cross-domain agreement needs at least two CPT checkpoints of the same base",
                            hint="pass two or more CPT checkpoints after the base")
    if not layout.heads_available:
        raise LayoutError(f"heads are not available for this model: {layout.heads_reason}",
                          path=getattr(base, "path", None), hint="use the matrix-level delta instead")
    if agreement_metric not in ("a2", "a3"):
        raise ValueError("agreement_metric must be 'a2' or 'a3'")
    projs = tuple(p for p in PROJECTIONS if not (exclude_kv and p in KV_PROJECTIONS))
    L, H, N = layout.num_layers, layout.num_heads, len(targets)
    pairs = [(i, j) for i in range(N) for j in range(i + 1, N)]
    device_kind = torch.device(device).type if device is not None else "cpu"
    names = _grid_names(projs, N, pairs)
    grids: dict[tuple[Any, ...], torch.Tensor] = {
        name: torch.full((L, H), 0.0 if name[0] in ("de", "be") else math.nan, dtype=torch.float64)
        for name in names}
    k_head = 0
    stack_rows = 0
    for layer in range(L):
        key = None if cache is None else _layer_key(base, targets, layer, projs, k, dtype, device_kind)
        entry = cached_json(cache, key, lambda layer=layer: _layer_grids(base, targets, layout, layer, projs,
                                                                          pairs, k, dtype, device))
        k_head, stack_rows = int(entry["k"]), int(entry["rows"])
        for name, values in zip(names, entry["grids"]):
            grids[name][layer] = torch.tensor(values, dtype=torch.float64)
        if progress is not None:
            progress(layer + 1, L, f"A2/A3 of the domains, layer {layer}")
        check(cancel)
    be = {p: grids[("be", p)] for p in projs}
    base_energy = sum(be.values(), torch.zeros(L, H, dtype=torch.float64))
    scores = []
    for t_i in range(N):
        de = {p: grids[("de", t_i, p)] for p in projs}
        delta_energy = sum(de.values(), torch.zeros(L, H, dtype=torch.float64))
        scores.append(HeadScores(scores=scores_from_energies(delta_energy, base_energy), delta_energy=delta_energy,
                                 base_energy=base_energy, projection_delta_energy=de,
                                 projection_base_energy=be, exclude_kv=exclude_kv, projections=projs))
    pair_results = [PairAgreement(pair=pr, a2=grids[("a2h", pr)], a3=grids[("a3h", pr)],
                                  a2_projection={p: grids[("a2p", pr, p)] for p in projs},
                                  a3_projection={p: grids[("a3p", pr, p)] for p in projs})
                    for pr in pairs]
    mean_a2 = torch.stack([p.a2 for p in pair_results]).nanmean(0)
    mean_a3 = torch.stack([p.a3 for p in pair_results]).nanmean(0)
    magnitude = torch.stack([s.scores for s in scores]).nanmean(0)
    cls = classify(mean_a2 if agreement_metric == "a2" else mean_a3, magnitude,
                   agreement_threshold=agreement_threshold, magnitude_threshold=magnitude_threshold,
                   agreement_metric=agreement_metric)

    def correlations() -> list[list[float]]:
        rho = torch.eye(N, dtype=torch.float64)
        for (i, j) in pairs:
            rho[i, j] = rho[j, i] = spearman(scores[i].scores, scores[j].scores)
        return rho.tolist()

    key = None if cache is None else _layer_key(base, targets, "spearman", projs, k, dtype, device_kind)
    rho = torch.tensor(cached_json(cache, key, correlations), dtype=torch.float64)
    labels = tuple(getattr(t, "label", str(i)) for i, t in enumerate(targets))
    return DomainAgreement(labels=labels, k=k_head, head_scores=scores, pairs=pair_results, mean_a2=mean_a2,
                           mean_a3=mean_a3, magnitude=magnitude, classification=cls, spearman=rho,
                           a3_random=a3_random_level(k_head, stack_rows), exclude_kv=exclude_kv)

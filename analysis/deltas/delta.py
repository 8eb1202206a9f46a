"""SPEC §4: what continual pre-training did to one matrix or one head — ΔW = W_d − W₀ and its numbers.

Tensor-level functions work on a single (m × n) pair or on a stack (…, m, n) of head slices; the
head-score functions (`head_scores`, `concentration`) walk a checkpoint pair through `projection_heads`.
Every spectral quantity is taken from a float64 Gram matrix over the smaller side (PERF-NOTES: float32
Grams destroy the small eigenvalues that every delta has, float64 keeps them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple, Sequence

import torch

from analysis.deltas.svd import (SVD, NarrowSVD, cross_gram, frob_inner, gram, gram_eigenvalues,  # noqa: F401
                                 long_side_overlap, narrow_svd, rank_for_energy, singular_values, sq_frob, top_svd)
from analysis.deltas.truncation import DEFAULT_TOLERANCE, truncatable_fraction
from analysis.deltas.names import KV_PROJECTIONS, PROJECTIONS  # noqa: F401 — re-exported
from analysis.errors import AlignmentError, LayoutError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from analysis.model.architecture import ModelLayout
    from analysis.spectral.backend import SpectralSettings
    from analysis.io.checkpoint import Checkpoint


# --------------------------------------------------------------------------------------------------
# Frobenius quantities (batched over leading dimensions)
# --------------------------------------------------------------------------------------------------


def upcast_pair(W0: torch.Tensor, Wd: torch.Tensor, dtype: torch.dtype = torch.float32
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both sides upcast to the compute dtype and ΔW = W_d − W₀ taken in it (SPEC §1)."""
    if W0.shape != Wd.shape:
        raise AlignmentError(f"cannot take a delta of shapes {tuple(W0.shape)} and {tuple(Wd.shape)}",
                             hint="compare checkpoints of the same architecture")
    W0 = W0.to(dtype)
    Wd = Wd.to(dtype)
    return W0, Wd, Wd - W0


_sq_frob = sq_frob   # Σ w² in float64, slab by slab (no float64 copy of the whole matrix)


def delta_norms(W0: torch.Tensor, Wd: torch.Tensor, dW: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
    """`delta_frob` ‖ΔW‖_F, `delta_rel` ‖ΔW‖_F/‖W₀‖_F and `delta_cos` cos_F(W₀, W_d), float64, shape (…)."""
    if dW is None:
        dW = Wd - W0
    n0 = _sq_frob(W0).sqrt()
    nd = _sq_frob(Wd).sqrt()
    nD = _sq_frob(dW).sqrt()
    inner = frob_inner(W0, Wd)
    tiny = torch.finfo(torch.float64).tiny
    rel = torch.where(n0 > 0, nD / n0.clamp_min(tiny), torch.full_like(nD, math.nan))
    cos = torch.where((n0 > 0) & (nd > 0), inner / (n0 * nd).clamp_min(tiny), torch.full_like(nD, math.nan))
    return {"delta_frob": nD, "delta_rel": rel, "delta_cos": cos.clamp(-1.0, 1.0)}


# --------------------------------------------------------------------------------------------------
# Spectra via float64 Gram
# --------------------------------------------------------------------------------------------------


def esd(W: torch.Tensor) -> torch.Tensor:
    """The SPEC §3 ESD λ_i = σ_i²/N, ascending, float64 — what `spectral_metrics(..., evals=)` expects."""
    return gram_eigenvalues(W) / max(W.shape[-2], W.shape[-1])


def delta_rho(W0: torch.Tensor, Wd: torch.Tensor, dW: torch.Tensor | None = None,
              sigma0: torch.Tensor | None = None, sigma_d: torch.Tensor | None = None) -> torch.Tensor:
    """ρ = ‖σ(W_d) − σ(W₀)‖₂ / ‖ΔW‖_F ∈ [0, 1] (Mirsky): 1 for a pure rescaling, ≈ 0 for a pure rotation."""
    if dW is None:
        dW = Wd - W0
    s0 = singular_values(W0) if sigma0 is None else sigma0
    sd = singular_values(Wd) if sigma_d is None else sigma_d
    num = (sd - s0).pow(2).sum(-1).sqrt()
    den = _sq_frob(dW).sqrt()
    rho = torch.where(den > 0, num / den.clamp_min(torch.finfo(torch.float64).tiny),
                      torch.full_like(den, math.nan))
    return rho.clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------------------
# Singular-vector agreement A1
# --------------------------------------------------------------------------------------------------


def avg_max_agreement(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Mean over A's columns of max_j |a_iᵀ b_j| — the row maxima of O = |AᵀB| averaged (…,)."""
    O = (A.transpose(-2, -1) @ B).abs()
    return O.amax(dim=-1).mean(dim=-1)


def noise_floor(k: int, d: int) -> float:
    """√(2 ln k / d): the typical largest |cosine| between one unit vector and k random ones in ℝ^d."""
    if k <= 1 or d <= 0:
        return 0.0
    return math.sqrt(2.0 * math.log(k) / d)


def a1_agreement(base: SVD, target: SVD) -> dict[str, torch.Tensor]:
    """A1: `avg_max_l_agreement` (left vectors U) and `avg_max_r_agreement` (right vectors V), shape (…)."""
    return {"avg_max_l_agreement": avg_max_agreement(base.U, target.U),
            "avg_max_r_agreement": avg_max_agreement(base.V, target.V)}


def a1_agreement_narrow(base: NarrowSVD, target: NarrowSVD, W0: torch.Tensor, Wd: torch.Tensor
                        ) -> dict[str, torch.Tensor]:
    """`a1_agreement` from the narrow sides only: the narrow vectors directly, the long side's |A₀ᵀA_d|
    through the (M × M) cross-Gram of W₀ and W_d (`long_side_overlap`) — the same numbers to rounding,
    without the (long × M) float64 bases a full SVD of an embedding holds (issue 13)."""
    narrow = avg_max_agreement(base.X, target.X)
    long_ = long_side_overlap(base, target, cross_gram(W0, Wd)).amax(dim=-1).mean(dim=-1)
    left, right = (narrow, long_) if base.wide else (long_, narrow)
    return {"avg_max_l_agreement": left, "avg_max_r_agreement": right}


# --------------------------------------------------------------------------------------------------
# All per-matrix metrics
# --------------------------------------------------------------------------------------------------


ENERGY_LEVELS: tuple[tuple[str, float], ...] = (("delta_rank_90", 0.90), ("delta_rank_95", 0.95),
                                                 ("delta_rank_99", 0.99))


def unchanged_mask(W0: torch.Tensor, Wd: torch.Tensor) -> torch.Tensor:
    """(…,) True where a matrix (or head slice) of the target is bit-identical to the base: ΔW = 0 exactly.

    Exact equality of the upcast values is exact equality of the stored ones (upcasting is exact), and for
    finite floats W_d − W₀ = 0 holds only when W_d = W₀; a NaN is never equal, so it never counts as unchanged.
    """
    return (W0 == Wd).flatten(-2).all(-1)


def unchanged_row(*, agreement: bool = True, truncation: bool = False) -> dict[str, Any]:
    """The row of a tensor the CPT left bit-identical: `unchanged`, ‖ΔW‖ = ‖ΔW‖/‖W₀‖ = 0, and every ratio,
    rank, agreement and truncation column empty (None): ΔW = 0 has no direction, spectrum or rank, and
    reading 1 for cos or 99.8 % for "truncatable" would be misleading. Spectral columns of ΔW are absent."""
    row: dict[str, Any] = {"unchanged": True, "delta_frob": 0.0, "delta_rel": 0.0, "delta_cos": None,
                           "delta_rho": None}
    row.update({name: None for name, _ in ENERGY_LEVELS})
    if agreement:
        row.update({k: None for k in ("avg_max_l_agreement", "avg_max_r_agreement", "a1_k", "a1_noise_floor_l",
                                      "a1_noise_floor_r")})
    if truncation:
        row["truncatable_fraction"] = None
    return row


def _batched_svd(s: NarrowSVD | None) -> NarrowSVD | None:
    """A one-matrix decomposition as a stack of one (None stays None)."""
    if s is None or s.S.dim() > 1:
        return s
    return NarrowSVD(s.S.unsqueeze(0), s.X.unsqueeze(0), s.inv.unsqueeze(0), s.wide)


def batched_delta_metrics(W0: torch.Tensor, Wd: torch.Tensor, *,
                          settings: "SpectralSettings | None" = None,
                          dtype: torch.dtype = torch.float32,
                          top_k: int | None = None,
                          spectral: bool = True,
                          agreement: bool = True,
                          truncation: bool = False,
                          base_svd: NarrowSVD | None = None,
                          metrics: Any = None) -> list[dict[str, Any]]:
    """SPEC §4 metrics for each pair of a stack (B, m, n) (or one (m, n) pair → one-element list).

    Keys: unchanged, delta_frob, delta_rel, delta_cos, delta_rho, delta_rank_{90,95,99}, avg_max_{l,r}_agreement,
    a1_k, a1_noise_floor_{l,r}, with `truncation` the SPEC §5 `truncatable_fraction` (error ≤ 0.1) and, with
    `spectral`, every SPEC §3 metric of ΔW itself. Entries the target left bit-identical get `unchanged_row`
    and no decomposition at all; the others are computed together.
    `base_svd` (`narrow_svd(W₀, top_k)`) lets a caller reuse W₀'s decomposition across several targets;
    `metrics` is the SPEC §8 metric set of the spectral columns (default `all`).
    """
    single = W0.dim() == 2
    W0, Wd, dW = upcast_pair(W0, Wd, dtype)
    if single:
        W0, Wd = W0.unsqueeze(0), Wd.unsqueeze(0)
    same = unchanged_mask(W0, Wd).tolist()
    rows: list[dict[str, Any]] = [unchanged_row(agreement=agreement, truncation=truncation) if s else {}
                                  for s in same]
    changed = [i for i, s in enumerate(same) if not s]
    if not changed:
        return rows
    if single:
        dW = dW.unsqueeze(0)
    if len(changed) < len(same):
        idx = torch.tensor(changed, device=W0.device)
        base_svd = _batched_svd(base_svd)
        W0, Wd, dW = W0.index_select(0, idx), Wd.index_select(0, idx), dW.index_select(0, idx)
        base_svd = None if base_svd is None else base_svd.select(idx)
    computed = _changed_delta_metrics(W0, Wd, dW, settings=settings, top_k=top_k, spectral=spectral,
                                      agreement=agreement, truncation=truncation, base_svd=base_svd,
                                      metrics=metrics)
    for i, row in zip(changed, computed):
        rows[i] = {"unchanged": False, **row}
    return rows


def _changed_delta_metrics(W0: torch.Tensor, Wd: torch.Tensor, dW: torch.Tensor, *,
                           settings: "SpectralSettings | None", top_k: int | None, spectral: bool, agreement: bool,
                           truncation: bool, base_svd: NarrowSVD | None, metrics: Any = None
                           ) -> list[dict[str, Any]]:
    """`batched_delta_metrics` of a (B, m, n) stack in the compute dtype whose every ΔW is non-zero.

    Memory: besides W₀, W_d and ΔW (the caller's) only (M × M) float64 Grams and one slab are held (svd.py);
    W_d's one Gram serves both σ(W_d) for ρ and its narrow vectors for A1."""
    m, n = W0.shape[-2], W0.shape[-1]
    M = min(m, n)
    cols: dict[str, torch.Tensor] = dict(delta_norms(W0, Wd, dW))
    k = M if top_k is None else max(1, min(int(top_k), M))
    if base_svd is None and agreement:
        base_svd = narrow_svd(W0, k)
    base_svd = _batched_svd(base_svd)
    full_base = base_svd is not None and base_svd.S.shape[-1] == M
    sigma0 = base_svd.S if full_base else singular_values(W0)
    G_d = gram(Wd)
    cols["delta_rho"] = delta_rho(W0, Wd, dW, sigma0=sigma0,
                                  sigma_d=torch.linalg.eigvalsh(G_d).clamp_min(0.0).flip(-1).sqrt())
    evals_d = gram_eigenvalues(dW)  # ascending σ² of ΔW
    sigma_d = evals_d.flip(-1).sqrt()
    for name, level in ENERGY_LEVELS:
        cols[name] = rank_for_energy(sigma_d, level)
    extra: dict[str, Any] = {}
    if agreement:
        cols.update(a1_agreement_narrow(base_svd.top(k), narrow_svd(Wd, k, G=G_d), W0, Wd))
        extra = {"a1_k": k, "a1_noise_floor_l": noise_floor(k, m), "a1_noise_floor_r": noise_floor(k, n)}
    del G_d
    rows: list[dict[str, Any]] = [dict() for _ in range(W0.shape[0])]
    for name, values in cols.items():
        vals = values.tolist()
        for r, v in zip(rows, vals):
            r[name] = v
    for r in rows:
        r.update(extra)
    if truncation:
        for r, sd in zip(rows, sigma_d):
            r["truncatable_fraction"] = truncatable_fraction(sd, DEFAULT_TOLERANCE)
    if spectral:
        from analysis.spectral.backend import SpectralSettings
        from analysis.spectral.spectra import batched_spectral_metrics

        settings = settings or SpectralSettings()
        # one batched fit over the stack, on the float64-Gram ESD of ΔW computed above (λ = σ²/N); a ΔW whose
        # norm is not a positive number (a non-finite weight) has no spectrum to describe
        from analysis.spectral.metric_sets import metric_set

        ok = [i for i, r in enumerate(rows) if r["delta_frob"] > 0]
        wanted = metric_set(metrics)
        if ok:
            idx = torch.tensor(ok, device=dW.device)
            some = len(ok) < dW.shape[0]        # all of them: ΔW itself, not a copy (issue 13)
            spectra = batched_spectral_metrics(dW.index_select(0, idx) if some else dW, settings,
                                               evals=(evals_d.index_select(0, idx) if some else evals_d) / max(m, n),
                                               metrics=metrics)
            for i, spectrum in zip(ok, spectra):
                for key, value in wanted.project(spectrum).items():
                    rows[i].setdefault(key, value)
    return rows


def delta_metrics(W0: torch.Tensor, Wd: torch.Tensor, **kwargs: Any) -> dict[str, Any]:
    """SPEC §4 metrics of one matrix pair (see `batched_delta_metrics` for the keys and options)."""
    if W0.dim() != 2:
        raise ValueError(f"delta_metrics takes one matrix, got shape {tuple(W0.shape)}")
    return batched_delta_metrics(W0, Wd, **kwargs)[0]


# --------------------------------------------------------------------------------------------------
# Head scores r_{ℓ,h} and concentration
# --------------------------------------------------------------------------------------------------


def spread_kv(values: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(…, H_kv) per-kv-head values → (…, H): each group's value split equally among its H/H_kv query heads."""
    h_kv = values.shape[-1]
    if num_heads % h_kv:
        raise LayoutError(f"{num_heads} query heads do not split into {h_kv} key/value groups",
                          hint="check num_attention_heads / num_key_value_heads in config.json")
    per = num_heads // h_kv
    return values.repeat_interleave(per, dim=-1) / per


def head_energies(delta: torch.Tensor, base: torch.Tensor, proj: str, num_heads: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query head Σ‖ΔW^P_h‖² and Σ‖W₀^P_h‖² (float64, (H,)) from one projection's stacked head slices."""
    de = _sq_frob(delta)
    be = _sq_frob(base)
    if proj in KV_PROJECTIONS:
        de, be = spread_kv(de, num_heads), spread_kv(be, num_heads)
    return de, be


@dataclass(frozen=True)
class HeadScores:
    """Head scores of one target against its base (SPEC §4), all (L × H) float64 tensors.

    `scores` r_{ℓ,h} = √(delta_energy / base_energy); `projection_delta_energy[P]` holds ‖ΔW^P_h‖²
    (k/v already split over their query heads) so callers can re-aggregate or show the parts.
    """

    scores: torch.Tensor
    delta_energy: torch.Tensor
    base_energy: torch.Tensor
    projection_delta_energy: dict[str, torch.Tensor] = field(default_factory=dict)
    projection_base_energy: dict[str, torch.Tensor] = field(default_factory=dict)
    exclude_kv: bool = False
    projections: tuple[str, ...] = PROJECTIONS

    @property
    def num_layers(self) -> int:
        return int(self.scores.shape[0])

    @property
    def num_heads(self) -> int:
        return int(self.scores.shape[1])

    @property
    def unchanged(self) -> torch.Tensor:
        """(L × H) True for a head whose slices of every scored projection the target left bit-identical:
        Σ‖ΔW_h‖² = 0 exactly (a sum of squared float32 differences is 0 only when every one is)."""
        return self.delta_energy == 0

    def ranking(self, descending: bool = True) -> list[tuple[int, int, float]]:
        """(layer, head, score) sorted by score (largest first unless `descending=False`); ties by position."""
        flat = [(l, h, float(self.scores[l, h])) for l in range(self.num_layers) for h in range(self.num_heads)]
        return sorted(flat, key=lambda t: (-t[2] if descending else t[2], t[0], t[1]))


def scores_from_energies(delta_energy: torch.Tensor, base_energy: torch.Tensor) -> torch.Tensor:
    """r = √(Σ‖ΔW‖²)/√(Σ‖W₀‖²); NaN where the base slices are all zero."""
    tiny = torch.finfo(torch.float64).tiny
    return torch.where(base_energy > 0, (delta_energy / base_energy.clamp_min(tiny)).sqrt(),
                       torch.full_like(delta_energy, math.nan))


def head_scores(base: "Checkpoint", target: "Checkpoint", layout: "ModelLayout", *,
                exclude_kv: bool = False, dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> HeadScores:
    """r_{ℓ,h} for every layer and query head of `target` against `base`: one batched read per projection."""
    from analysis.model.heads import projection_heads

    if not layout.heads_available:
        raise LayoutError(f"heads are not available for this model: {layout.heads_reason}",
                          path=getattr(base, "path", None), hint="use the matrix-level view instead")
    projs = tuple(p for p in PROJECTIONS if not (exclude_kv and p in KV_PROJECTIONS))
    L, H = layout.num_layers, layout.num_heads
    pde = {p: torch.zeros(L, H, dtype=torch.float64) for p in projs}
    pbe = {p: torch.zeros(L, H, dtype=torch.float64) for p in projs}
    for layer in range(L):
        for p in projs:
            b = projection_heads(base, layout, layer, p, dtype)
            t = projection_heads(target, layout, layer, p, dtype)
            if device is not None:
                b, t = b.to(device), t.to(device)
            if b.shape != t.shape:
                raise AlignmentError(
                    f"layer {layer} {p}-projection heads have shapes {tuple(b.shape)} and {tuple(t.shape)}",
                    path=getattr(target, "path", None), hint="compare checkpoints of the same architecture")
            de, be = head_energies(t - b, b, p, H)
            pde[p][layer] = de.cpu()
            pbe[p][layer] = be.cpu()
    delta_energy = sum(pde.values(), torch.zeros(L, H, dtype=torch.float64))
    base_energy = sum(pbe.values(), torch.zeros(L, H, dtype=torch.float64))
    return HeadScores(scores=scores_from_energies(delta_energy, base_energy), delta_energy=delta_energy,
                      base_energy=base_energy, projection_delta_energy=pde, projection_base_energy=pbe,
                      exclude_kv=exclude_kv, projections=projs)


def gini(values: torch.Tensor | Sequence[float]) -> float:
    """Gini coefficient of non-negative values: 0 when all equal, (n−1)/n when one holds everything."""
    x = torch.as_tensor(values, dtype=torch.float64).flatten()
    x = x[~torch.isnan(x)]
    n = x.numel()
    if n == 0:
        return math.nan
    if (x < 0).any():
        raise ValueError("the Gini coefficient needs non-negative values")
    total = x.sum()
    if total <= 0:
        return 0.0
    xs = torch.sort(x).values
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float((2.0 * (i * xs).sum()) / (n * total) - (n + 1.0) / n)


class Concentration(NamedTuple):
    """`curve` (x % of heads → share of Σ‖Δ‖², both as float64 arrays of length n+1), the 10 % point, Gini,
    and how many heads are unchanged (energy exactly 0: they hold none of the update)."""

    curve: tuple[torch.Tensor, torch.Tensor]
    top10_share: float
    gini: float
    unchanged: int = 0


def share_of_top(energies: torch.Tensor | Sequence[float], percent: float) -> float:
    """Share of Σ energy held by the top `percent` % of heads, linear between whole heads."""
    x, y = concentration_curve(energies)
    return float(_interp(torch.tensor([percent], dtype=torch.float64), x, y)[0])


def concentration_curve(energies: torch.Tensor | Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Points (100·k/n, share of the k largest energies) for k = 0…n, ascending in x."""
    e = torch.as_tensor(energies, dtype=torch.float64).flatten()
    e = e[~torch.isnan(e)]
    n = e.numel()
    if n == 0:
        return torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    es = torch.sort(e, descending=True).values
    total = es.sum()
    cum = torch.cat([torch.zeros(1, dtype=torch.float64), es.cumsum(0)])
    share = cum / total if total > 0 else torch.zeros_like(cum)
    x = torch.arange(0, n + 1, dtype=torch.float64) * (100.0 / n)
    return x, share


def _interp(q: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of (x, y) at q (x ascending)."""
    if x.numel() == 1:
        return y.expand_as(q).clone()
    idx = torch.searchsorted(x, q).clamp(1, x.numel() - 1)
    x0, x1 = x[idx - 1], x[idx]
    y0, y1 = y[idx - 1], y[idx]
    w = (q - x0) / (x1 - x0)
    return y0 + w * (y1 - y0)


def concentration(energies: torch.Tensor | Sequence[float],
                  scores: torch.Tensor | Sequence[float] | None = None) -> Concentration:
    """SPEC §4 concentration: share curve of Σ‖Δ‖² over the top x % of heads, its 10 % point, and the Gini
    coefficient of the head scores (of `energies` when no scores are given)."""
    x, y = concentration_curve(energies)
    top10 = float(_interp(torch.tensor([10.0], dtype=torch.float64), x, y)[0])
    unchanged = int((torch.as_tensor(energies, dtype=torch.float64) == 0).sum())
    return Concentration(curve=(x, y), top10_share=top10, gini=gini(energies if scores is None else scores),
                         unchanged=unchanged)


def head_concentration(hs: HeadScores) -> Concentration:
    """Concentration of one target's head update: energies Σ‖ΔW_h‖², Gini of r_{ℓ,h}."""
    return concentration(hs.delta_energy, hs.scores)


def as_grid(values: Mapping[tuple[int, int], float], num_layers: int, num_heads: int) -> torch.Tensor:
    """A {(layer, head): value} mapping as an (L × H) float64 grid, NaN where missing."""
    grid = torch.full((num_layers, num_heads), math.nan, dtype=torch.float64)
    for (l, h), v in values.items():
        grid[l, h] = v
    return grid

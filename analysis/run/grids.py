"""Layers × heads grids of per-head metrics for the explorer's Heads grid and Rewind views (moved out of the
view: the engine computes, the views draw). Reached through `ExplorerSession` methods, the app's one door.

Each grid is an (L × H) float64 array over query heads (k/v values repeated over their query group) and is
kept in the session's persistent cache under keys that carry the session's real compute dtype and device
kind. Metrics: update magnitude r (SPEC §4 head score), A1 singular-vector agreement of W₀ and W_d, A2/A3
domain agreement of two targets' deltas, and the power-law α of each head slice (the scan's cache entries).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import numpy as np

from analysis.progress import Cancel, Progress, check, never, no_progress

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from analysis.edit.rewind import RewindInputs
    from analysis.io.checkpoint import Checkpoint
    from analysis.model.architecture import ModelLayout
    from analysis.run.cache import Cache
    from analysis.spectral.backend import SpectralSettings

GRID_VERSION = 1          # bump when what these cache entries hold changes
PROJECTIONS: tuple[str, ...] = ("q", "k", "v", "o")
WHOLE = "all"             # the whole head (all projections)
MEAN = ("mean",)          # the source of the mean over every domain pair
GRID_NAMES: tuple[str, ...] = (WHOLE,) + PROJECTIONS


class GridContext(Protocol):
    """What a grid computation needs of the session: checkpoints (first = base), layout, settings, cache."""

    checkpoints: list["Checkpoint"]
    layout: "ModelLayout"
    settings: "SpectralSettings"
    cache: "Cache"


# ------------------------------------------------------------------------------------------------
# Result types
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MagnitudeGrids:
    """r = √(‖ΔW_h‖²/‖W₀_h‖²) per head: the whole head (WHOLE) and each projection (L × H each)."""

    grids: dict[str, np.ndarray]

    def unchanged(self, projection: str = WHOLE) -> list[tuple[int, int]]:
        """Heads the target left bit-identical to the base (r exactly 0: every entry of the slices is equal)."""
        return unchanged_cells(self.grids[projection])


@dataclass(frozen=True)
class HeadGrid:
    """One metric over layers × query heads; `reliable` is False when some fit in it is not (α of short ESDs)."""

    values: np.ndarray
    reliable: bool = True
    kv_grouped: bool = False   # k/v: each query head shows the value of its kv group


@dataclass(frozen=True)
class AgreementGrids:
    """A2/A3 grids of every domain pair (and their mean), whole head and per projection, with the per-head
    magnitude (mean r over domains), A3's k and random level, and the whole-head classification counts."""

    pairs: tuple[tuple[int, int], ...]
    a2: dict[tuple, dict[str, np.ndarray]]      # pair or MEAN → projection (WHOLE, q, k, v, o) → (L × H)
    a3: dict[tuple, dict[str, np.ndarray]]
    magnitude: np.ndarray
    k: int
    a3_random: float
    counts: dict[tuple[str, tuple], dict[str, int]]   # ("a2"|"a3", pair or MEAN) → agnostic/specific/inert


def unchanged_cells(grid: np.ndarray) -> list[tuple[int, int]]:
    """(layer, head) cells of an update-magnitude grid that are exactly 0 (bit-identical heads)."""
    return [(int(l), int(h)) for l, h in zip(*np.nonzero(np.asarray(grid) == 0))]


# ------------------------------------------------------------------------------------------------
# Cache keys and helpers
# ------------------------------------------------------------------------------------------------


def grid_key(ctx: GridContext, fingerprints: Sequence[str], operation: str, **extra: Any) -> str:
    """The cache key of a grid: inputs, operation, settings, and the session's REAL dtype and device kind."""
    return ctx.cache.key(fingerprint=list(fingerprints), tensor="attention-heads", slice=extra or None,
                         operation=f"ui/{operation}/v{GRID_VERSION}", settings=ctx.settings.key(),
                         dtype=ctx.settings.dtype, device_kind=ctx.settings.torch_device.type)


def per_query_head(values: np.ndarray, proj: str, layout: "ModelLayout") -> np.ndarray:
    """(…, n) values of the n heads of a projection → (…, H) per query head (k/v: the value of g(h))."""
    if proj in ("q", "o"):
        return values
    groups = [layout.kv_group(h) for h in range(layout.num_heads)]
    return values[..., groups]


def _layer_progress(progress: Progress, text: str) -> Progress:
    """The engine's per-layer progress with the grid's own words."""
    def step(done: int, total: int | None, _text: str) -> None:
        progress(done, total, f"{text}, layers")
    return step


# ------------------------------------------------------------------------------------------------
# Grids
# ------------------------------------------------------------------------------------------------


def head_energy_inputs(ctx: GridContext, target_index: int, progress: Progress = no_progress,
                       cancel: Cancel = never) -> "RewindInputs":
    """Per-projection head energies of target − base (`analysis.edit.rewind.rewind_inputs`, no reference), cached
    as an (8, L, H) float64 array; the reconstruction is exact, so plans match `rewind plan`."""
    import torch

    from analysis.deltas.delta import HeadScores, scores_from_energies
    from analysis.edit.rewind import RewindInputs, rewind_inputs
    from analysis.edit.rewind_list import Architecture

    base, target = ctx.checkpoints[0], ctx.checkpoints[1 + target_index]
    key = grid_key(ctx, [base.fingerprint, target.fingerprint], "head-energies")
    hit = ctx.cache.get_array(key)
    L, H = ctx.layout.num_layers, ctx.layout.num_heads
    if hit is not None and hit.shape == (8, L, H):
        pde = {p: torch.from_numpy(np.array(hit[i])) for i, p in enumerate(PROJECTIONS)}
        pbe = {p: torch.from_numpy(np.array(hit[4 + i])) for i, p in enumerate(PROJECTIONS)}
        d_tot = sum(pde.values(), torch.zeros(L, H, dtype=torch.float64))
        b_tot = sum(pbe.values(), torch.zeros(L, H, dtype=torch.float64))
        hs = HeadScores(scores=scores_from_energies(d_tot, b_tot), delta_energy=d_tot, base_energy=b_tot,
                        projection_delta_energy=pde, projection_base_energy=pbe)
        return RewindInputs(architecture=Architecture.from_layout(ctx.layout), target=hs)
    inputs = rewind_inputs(base, target, None, layout=ctx.layout, cancel=cancel,
                           progress=_layer_progress(progress, f"head energies of {target.label}"))
    hs = inputs.target
    arr = np.stack([hs.projection_delta_energy[p].numpy() for p in PROJECTIONS]
                   + [hs.projection_base_energy[p].numpy() for p in PROJECTIONS])
    ctx.cache.put_array(key, arr)
    return inputs


def update_magnitude_grids(ctx: GridContext, target_index: int, progress: Progress = no_progress,
                           cancel: Cancel = never) -> MagnitudeGrids:
    """r per head: whole head (`analysis.edit.rewind.score_grid`, SPEC §4) and per projection √(‖ΔW^P‖²/‖W₀^P‖²)."""
    from analysis.deltas.delta import scores_from_energies
    from analysis.edit.rewind import score_grid

    hs = head_energy_inputs(ctx, target_index, progress, cancel).target
    out = {WHOLE: score_grid(hs, "rel_frob").numpy()}
    for p in PROJECTIONS:
        out[p] = scores_from_energies(hs.projection_delta_energy[p], hs.projection_base_energy[p]).numpy()
    return MagnitudeGrids(out)


def a1_grid(ctx: GridContext, target_index: int, proj: str, progress: Progress = no_progress,
            cancel: Cancel = never) -> HeadGrid:
    """A1 `avg_max_l_agreement` (SPEC §4, all components) of each head slice of W₀ and W_d (L × H)."""
    from analysis.deltas.delta import batched_delta_metrics
    from analysis.model.heads import projection_heads

    base, target = ctx.checkpoints[0], ctx.checkpoints[1 + target_index]
    key = grid_key(ctx, [base.fingerprint, target.fingerprint], "a1-grid", proj=proj)
    hit = ctx.cache.get_array(key)
    L, H = ctx.layout.num_layers, ctx.layout.num_heads
    grouped = proj in ("k", "v")
    if hit is not None and hit.shape == (L, H):
        return HeadGrid(hit, kv_grouped=grouped)
    out = np.full((L, H), math.nan)
    dtype = ctx.settings.torch_dtype
    device = ctx.settings.torch_device
    for layer in range(L):
        check(cancel)
        progress(layer, L, f"A1 of {proj} heads, layer {layer}")
        b = projection_heads(base, ctx.layout, layer, proj, dtype=dtype).to(device)
        t = projection_heads(target, ctx.layout, layer, proj, dtype=dtype).to(device)
        rows = batched_delta_metrics(b, t, dtype=dtype, spectral=False, agreement=True)
        vals = np.array([r["avg_max_l_agreement"] for r in rows], dtype=np.float64)
        out[layer] = per_query_head(vals, proj, ctx.layout)
    ctx.cache.put_array(key, out)
    return HeadGrid(out, kv_grouped=grouped)


def _classification_counts(grid: np.ndarray, magnitude: np.ndarray, metric: str) -> dict[str, int]:
    """agnostic / specific / inert head counts of a whole-head agreement grid (median thresholds)."""
    import torch

    from analysis.deltas.agreement import classify

    cls = classify(torch.from_numpy(np.array(grid)), torch.from_numpy(np.array(magnitude)), agreement_metric=metric)
    return {k: int(v) for k, v in cls.counts().items()}


def agreement_grids(ctx: GridContext, progress: Progress = no_progress, cancel: Cancel = never) -> AgreementGrids:
    """`analysis.deltas.agreement.domain_agreement` over all targets, cached as arrays
    (pairs+mean+magnitude × 2 × 5 × L × H) plus a JSON entry for k and the random level."""
    import torch

    base, targets = ctx.checkpoints[0], ctx.checkpoints[1:]
    n = len(targets)
    pairs = tuple((i, j) for i in range(n) for j in range(i + 1, n))
    fps = [base.fingerprint] + [t.fingerprint for t in targets]
    key = grid_key(ctx, fps, "domain-agreement")
    meta_key = grid_key(ctx, fps, "domain-agreement-meta")
    L, H = ctx.layout.num_layers, ctx.layout.num_heads
    shape = (len(pairs) + 2, 2, len(GRID_NAMES), L, H)
    hit, meta = ctx.cache.get_array(key), ctx.cache.get_json(meta_key)
    if hit is None or meta is None or hit.shape != shape:
        from analysis.deltas.agreement import domain_agreement

        da = domain_agreement(base, targets, ctx.layout, cancel=cancel,
                              progress=_layer_progress(progress, "A2/A3 of the domains"))
        arr = np.full(shape, math.nan)
        for i, pa in enumerate(da.pairs):
            arr[i, 0, 0], arr[i, 1, 0] = pa.a2.numpy(), pa.a3.numpy()
            for j, p in enumerate(PROJECTIONS, 1):
                if p in pa.a2_projection:
                    arr[i, 0, j], arr[i, 1, j] = pa.a2_projection[p].numpy(), pa.a3_projection[p].numpy()
        arr[len(pairs), 0, 0], arr[len(pairs), 1, 0] = da.mean_a2.numpy(), da.mean_a3.numpy()
        for j, p in enumerate(PROJECTIONS, 1):  # per-projection means over the pairs (torch: NaN-safe)
            if all(p in pa.a2_projection for pa in da.pairs):
                arr[len(pairs), 0, j] = torch.stack([pa.a2_projection[p] for pa in da.pairs]).nanmean(0).numpy()
                arr[len(pairs), 1, j] = torch.stack([pa.a3_projection[p] for pa in da.pairs]).nanmean(0).numpy()
        arr[len(pairs) + 1, 0, 0] = da.magnitude.numpy()
        meta = {"k": int(da.k), "a3_random": float(da.a3_random)}
        ctx.cache.put_array(key, arr)
        ctx.cache.put_json(meta_key, meta)
        hit = arr
    sources = pairs + (MEAN,)
    a2 = {pr: {nm: hit[i, 0, j] for j, nm in enumerate(GRID_NAMES)} for i, pr in enumerate(sources)}
    a3 = {pr: {nm: hit[i, 1, j] for j, nm in enumerate(GRID_NAMES)} for i, pr in enumerate(sources)}
    magnitude = hit[len(pairs) + 1, 0, 0]
    counts = {(metric, pr): _classification_counts(grids[pr][WHOLE], magnitude, metric)
              for metric, grids in (("a2", a2), ("a3", a3)) for pr in sources}
    return AgreementGrids(pairs=pairs, a2=a2, a3=a3, magnitude=magnitude, k=int(meta["k"]),
                          a3_random=float(meta["a3_random"]), counts=counts)


def alpha_grid(ctx: GridContext, ckpt_index: int, proj: str, progress: Progress = no_progress,
               cancel: Cancel = never) -> HeadGrid:
    """`pl_alpha` of every head slice of one projection in one checkpoint (`analysis.run.scan.node_metrics`,
    sharing the scan's cache entries), per query head; `reliable` is False when some fit is not."""
    from analysis.run.scan import node_metrics

    ckpt = ctx.checkpoints[ckpt_index]
    layout = ctx.layout
    L = layout.num_layers
    n = layout.num_heads if proj in ("q", "o") else layout.num_kv_heads
    out = np.full((L, n), math.nan)
    reliable = True
    for layer in range(L):
        for h in range(n):
            check(cancel)
            progress(layer * n + h, L * n, f"α of {ckpt.label} L{layer} {proj} h{h}")
            row = node_metrics(ckpt, layout, layer, proj, h, settings=ctx.settings, cache=ctx.cache)
            v = row.get("pl_alpha")
            out[layer, h] = math.nan if v is None else float(v)
            reliable = reliable and bool(row.get("pl_alpha_reliable", True))
    return HeadGrid(per_query_head(out, proj, layout), reliable=reliable, kv_grouped=proj in ("k", "v"))

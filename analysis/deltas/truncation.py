"""SPEC §5: how much of a delta survives SVD truncation, and the DARE random-drop baseline beside it.

Dropping the ⌊t·M⌋ smallest singular values of ΔW keeps the energy E(t) = Σ_kept σ²/Σσ² and leaves the
relative error √(1 − E(t)) (Eckart–Young). Curves are per matrix and aggregate energy-weighted over groups
(kind, layer) so that a big matrix counts by its energy, not by its count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterable, Mapping, Sequence

import torch

from analysis.deltas.svd import rank_for_energy, singular_values, top_svd

DEFAULT_TS: tuple[float, ...] = tuple(i / 100 for i in range(100))     # t ∈ [0, 1)
ENERGY_TARGETS: tuple[float, ...] = (0.90, 0.95, 0.99)
DEFAULT_TOLERANCE = 0.1


def _check_t(t: torch.Tensor) -> None:
    if (t < 0).any() or (t >= 1).any():
        raise ValueError("the truncation fraction t must lie in [0, 1)")


def kept_energy(sigma: torch.Tensor, t: float | Sequence[float] | torch.Tensor) -> torch.Tensor:
    """E(t) after dropping the ⌊t·M⌋ smallest σ (any order, batched over leading dims) → shape (…, len(t))."""
    s = torch.sort(sigma.to(torch.float64), dim=-1, descending=True).values
    e = s.pow(2)
    M = e.shape[-1]
    total = e.sum(-1, keepdim=True)
    cum = torch.cat([torch.zeros_like(total), e.cumsum(-1)], dim=-1)  # cum[..., r] = energy of the r largest
    tt = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
    _check_t(tt)
    kept = M - torch.floor(tt * M + 1e-9).long()   # number of values kept (guard 0.3·10 = 2.9999…)
    E = cum[..., kept] / total.clamp_min(torch.finfo(torch.float64).tiny)
    return torch.where(total > 0, E, torch.ones_like(E)).clamp(0.0, 1.0)


def truncation_error(sigma: torch.Tensor, t: float | Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Relative Frobenius error √(1 − E(t)) of the best rank-(M − ⌊tM⌋) approximation of ΔW."""
    return (1.0 - kept_energy(sigma, t)).clamp_min(0.0).sqrt()


def energy_ranks(sigma: torch.Tensor, levels: Sequence[float] = ENERGY_TARGETS) -> dict[float, int]:
    """The rank needed for each energy level (e.g. {0.9: r90, 0.95: r95, 0.99: r99}) of one spectrum."""
    s = torch.sort(sigma.to(torch.float64).reshape(-1), descending=True).values
    return {float(level): int(rank_for_energy(s, level)) for level in levels}


def truncatable_fraction(sigma: torch.Tensor, tolerance: float = DEFAULT_TOLERANCE) -> float:
    """Largest fraction j/M of the singular values that can be dropped with error √(1 − E) ≤ tolerance."""
    s = torch.sort(sigma.to(torch.float64).reshape(-1), descending=True).values
    M = s.numel()
    if M == 0:
        return 0.0
    e = s.pow(2)
    total = float(e.sum())
    if total <= 0:
        return (M - 1) / M  # a zero delta loses nothing at any t < 1
    # dropping the j smallest leaves error² = (energy of the j smallest)/total
    tail = torch.cat([torch.zeros(1, dtype=torch.float64), e.flip(0).cumsum(0)]) / total   # j = 0..M
    ok = tail <= tolerance ** 2 + 1e-15
    j = int(ok.nonzero().max())
    return min(j, M - 1) / M


@dataclass(frozen=True)
class TruncationCurve:
    """E(t) and √(1−E(t)) on a grid of t, for one matrix or an energy-weighted group; `energy` = Σσ²."""

    ts: torch.Tensor
    kept_energy: torch.Tensor
    error: torch.Tensor
    energy: float

    def truncatable_fraction(self, tolerance: float = DEFAULT_TOLERANCE) -> float:
        """Largest t on the grid whose error stays within `tolerance` (0 when none does)."""
        ok = self.error <= tolerance + 1e-15
        return float(self.ts[ok].max()) if bool(ok.any()) else 0.0

    def as_dict(self) -> dict[str, list[float] | float]:
        """Plain lists for JSON exports."""
        return {"t": self.ts.tolist(), "kept_energy": self.kept_energy.tolist(), "error": self.error.tolist(),
                "energy": self.energy}


def truncation_curve(sigma: torch.Tensor, ts: Sequence[float] | torch.Tensor = DEFAULT_TS) -> TruncationCurve:
    """The SPEC §5 curve of one matrix from its singular values."""
    tt = torch.as_tensor(ts, dtype=torch.float64).reshape(-1)
    E = kept_energy(sigma.reshape(-1), tt)
    return TruncationCurve(ts=tt, kept_energy=E, error=(1.0 - E).clamp_min(0.0).sqrt(),
                           energy=float(sigma.to(torch.float64).pow(2).sum()))


def delta_truncation_curve(dW: torch.Tensor, ts: Sequence[float] | torch.Tensor = DEFAULT_TS) -> TruncationCurve:
    """`truncation_curve` of ΔW itself (σ from the float64 Gram, PERF-NOTES)."""
    return truncation_curve(singular_values(dW), ts)


def aggregate_curves(curves: Iterable[TruncationCurve]) -> TruncationCurve:
    """Energy-weighted aggregate: E_group(t) = Σ_i E_i(t)·‖ΔW_i‖² / Σ_i ‖ΔW_i‖² (all curves on one grid)."""
    curves = list(curves)
    if not curves:
        raise ValueError("no curves to aggregate")
    ts = curves[0].ts
    for c in curves[1:]:
        if c.ts.shape != ts.shape or not torch.equal(c.ts, ts):
            raise ValueError("curves to aggregate must share one t grid")
    weights = torch.tensor([c.energy for c in curves], dtype=torch.float64)
    total = float(weights.sum())
    if total <= 0:
        E = torch.ones_like(ts)
    else:
        E = (torch.stack([c.kept_energy for c in curves]) * weights[:, None]).sum(0) / total
    return TruncationCurve(ts=ts, kept_energy=E, error=(1.0 - E).clamp_min(0.0).sqrt(), energy=total)


def aggregate_by(curves: Mapping[Hashable, TruncationCurve], group: Callable[[Hashable], Hashable]
                 ) -> dict[Hashable, TruncationCurve]:
    """Energy-weighted curves per group, e.g. `group=lambda name: kind_of[name]` or the layer index."""
    groups: dict[Hashable, list[TruncationCurve]] = {}
    for key, curve in curves.items():
        groups.setdefault(group(key), []).append(curve)
    return {g: aggregate_curves(cs) for g, cs in groups.items()}


def truncate(dW: torch.Tensor, t: float) -> torch.Tensor:
    """ΔW with its ⌊t·M⌋ smallest singular values dropped (float64): the rank-(M − ⌊tM⌋) Eckart–Young best."""
    _check_t(torch.tensor([t]))
    M = min(dW.shape[-2], dW.shape[-1])
    keep = M - math.floor(t * M + 1e-9)
    s = top_svd(dW, keep)
    return (s.U * s.S.unsqueeze(-2)) @ s.V.transpose(-2, -1)


def dare(dW: torch.Tensor, p: float, generator: torch.Generator | int = 42) -> torch.Tensor:
    """DARE: drop each entry with probability p, rescale the survivors by 1/(1−p) (seeded, reproducible)."""
    if not 0.0 <= p < 1.0:
        raise ValueError("the DARE drop probability p must lie in [0, 1)")
    gen = generator if isinstance(generator, torch.Generator) else torch.Generator().manual_seed(int(generator))
    # the mask is drawn on the CPU (a CPU generator), so one seed gives one mask on every device
    keep = (torch.rand(dW.shape, generator=gen, dtype=torch.float64) >= p).to(dW.device)
    return torch.where(keep, dW.to(torch.float64) / (1.0 - p), torch.zeros((), dtype=torch.float64, device=dW.device))


def dare_error(dW: torch.Tensor, p: float, generator: torch.Generator | int = 42) -> float:
    """‖ΔW′ − ΔW‖_F / ‖ΔW‖_F for one seeded DARE draw; its expectation² is p/(1−p) for any ΔW."""
    d = dW.to(torch.float64)
    norm = float(d.norm())
    if norm == 0:
        return 0.0
    return float((dare(d, p, generator) - d).norm()) / norm


def dare_curve(dW: torch.Tensor, ps: Sequence[float], seed: int = 42) -> torch.Tensor:
    """DARE errors at several drop probabilities (one seeded generator per p, so each p is reproducible)."""
    return torch.tensor([dare_error(dW, p, torch.Generator().manual_seed(seed)) for p in ps], dtype=torch.float64)


@dataclass(frozen=True)
class DeltaTruncation:
    """SPEC §5 curves of every shared matrix's ΔW between two checkpoints, and their energy-weighted
    aggregates by module kind ("attention", "mlp", "embedding", …) and by layer (None = global matrices)."""

    matrices: dict[tuple[int | None, str], TruncationCurve]     # (layer, module name) → curve
    kinds: dict[str, TruncationCurve]
    layers: dict[int | None, TruncationCurve]
    ranks: dict[tuple[int | None, str], dict[float, int]]        # rank for 90/95/99 % energy per matrix
    overall: TruncationCurve | None


def delta_truncation(base: Any, target: Any, layout: Any, *, ts: Sequence[float] | torch.Tensor = DEFAULT_TS,
                     dtype: torch.dtype = torch.float32, shared: set[str] | None = None) -> DeltaTruncation:
    """Walk the layout's ≥ 2-D modules (those in `shared`, default all), one σ(ΔW) per matrix (float64 Gram)."""
    from analysis.model.heads import module_matrix

    mods = [(layer.index, m) for layer in layout.layers for m in layer.modules]
    mods += [(None, m) for m in layout.globals]
    curves: dict[tuple[int | None, str], TruncationCurve] = {}
    kind_of: dict[tuple[int | None, str], str] = {}
    ranks: dict[tuple[int | None, str], dict[float, int]] = {}
    for layer, m in mods:
        if len(m.shape) < 2 or (shared is not None and m.tensor not in shared):
            continue
        dW = module_matrix(target, m, dtype) - module_matrix(base, m, dtype)
        sigma = singular_values(dW)
        curves[(layer, m.name)] = truncation_curve(sigma, ts)
        kind_of[(layer, m.name)] = m.kind
        ranks[(layer, m.name)] = energy_ranks(sigma)
    return DeltaTruncation(matrices=curves,
                           kinds={str(k): v for k, v in aggregate_by(curves, lambda key: kind_of[key]).items()},
                           layers=aggregate_by(curves, lambda key: key[0]),
                           ranks=ranks, overall=aggregate_curves(curves.values()) if curves else None)

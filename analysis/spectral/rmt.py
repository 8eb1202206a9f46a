"""Random-matrix references for an ESD (SPEC §3): Marchenko–Pastur bulk and edge, Tracy–Widom edge,
the permuted null model and the Wasserstein distance to it."""

from __future__ import annotations

import math
import threading
from collections import OrderedDict

import numpy as np
import torch

TW1_QUANTILE_995 = 2.4224     # TW₁ quantile at 1 − 0.005 (Tracy & Widom 1996; Johnstone 2001 table)


PERMUTATION_MEMO_BYTES = 2 << 30   # int32 permutation indices kept for reuse (LRU), ~2 GiB of host memory


class _PermutationMemo:
    """Seeded permutation indices by (number of entries, seed), int32, least recently used first out.

    `torch.randperm` of a 2048×5632 matrix's 11.5 M entries takes ≈0.35 s on one core: as long as the
    null's eigensolve. Every layer of a model repeats the same few shapes, so each index is drawn once and
    reused (numbers unchanged: the index IS the seeded draw; int32 `randperm` yields the same permutation as
    int64). Memoising a pure function of (n, seed) — the only process-wide state in the engine; thread-safe.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[int, int], torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, n: int, seed: int) -> torch.Tensor:
        key = (n, seed)
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit
        gen = torch.Generator(device="cpu").manual_seed(seed)
        dtype = torch.int32 if n < 2**31 else torch.int64
        perm = torch.randperm(n, generator=gen, dtype=dtype)
        size = perm.numel() * perm.element_size()
        if size <= self.max_bytes:
            with self._lock:
                if key not in self._items:
                    self._items[key] = perm
                    self._bytes += size
                while self._bytes > self.max_bytes:
                    _, old = self._items.popitem(last=False)
                    self._bytes -= old.numel() * old.element_size()
        return perm


_PERMUTATIONS = _PermutationMemo(PERMUTATION_MEMO_BYTES)


def permutation_index(n: int, seed: int) -> torch.Tensor:
    """The seeded uniform permutation of range(n) the null model uses (CPU, int32 below 2³¹ entries)."""
    return _PERMUTATIONS.get(int(n), int(seed))


def permuted(W: torch.Tensor, seed: int) -> torch.Tensor:
    """W (…, m, n) with each matrix's entries uniformly permuted: the null model (SPEC §3).

    The permutation is `torch.randperm(m·n)` from a fresh CPU `torch.Generator` seeded with `seed` (never
    global RNG state), the same one for every matrix of a batch, so a matrix gets the same null alone or in
    a batch and on any device.
    """
    m, n = W.shape[-2:]
    perm = permutation_index(m * n, seed).to(W.device)
    flat = W.reshape(*W.shape[:-2], m * n)
    return flat.index_select(-1, perm).reshape(W.shape)


def mp_edges(s2: float, Q: float) -> tuple[float, float]:
    """Marchenko–Pastur edges (λ₋, λ₊) = s²(1 ∓ 1/√Q)² of λ = σ²/N for variance s² and aspect Q = N/M ≥ 1."""
    r = 1.0 / math.sqrt(Q)
    return s2 * (1.0 - r) ** 2, s2 * (1.0 + r) ** 2


def mp_cdf(x: np.ndarray, s2: float, Q: float, grid: int = 4097) -> np.ndarray:
    """Marchenko–Pastur CDF (ratio y = 1/Q ≤ 1, no mass at 0) at x, by integrating the density on a grid
    uniform in θ with λ = centre + half·(−cos θ) (removes the square-root edge singularities)."""
    lo, hi = mp_edges(s2, Q)
    if not (hi > lo):
        return np.where(np.asarray(x) >= hi, 1.0, 0.0)
    y = 1.0 / Q
    theta = np.linspace(0.0, math.pi, grid)
    centre, half = 0.5 * (lo + hi), 0.5 * (hi - lo)
    lam = centre - half * np.cos(theta)
    mid = 0.5 * (theta[1:] + theta[:-1])                       # midpoint rule: never evaluates λ = λ₋ = 0
    lam_mid = centre - half * np.cos(mid)
    dens = np.sqrt(np.clip((hi - lam_mid) * (lam_mid - lo), 0.0, None)) / (2.0 * math.pi * y * s2 * lam_mid)
    steps = dens * half * np.sin(mid) * np.diff(theta)         # dλ = half·sin θ dθ
    cdf = np.concatenate([[0.0], np.cumsum(steps)])
    cdf /= cdf[-1]
    return np.interp(np.asarray(x, dtype=np.float64), lam, cdf, left=0.0, right=1.0)


def mp_density(x: np.ndarray, s2: float, Q: float) -> np.ndarray:
    """Marchenko–Pastur density of λ = σ²/N (ratio y = 1/Q) at x — for charts."""
    lo, hi = mp_edges(s2, Q)
    x = np.asarray(x, dtype=np.float64)
    y = 1.0 / Q
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.sqrt(np.clip((hi - x) * (x - lo), 0.0, None)) / (2.0 * math.pi * y * s2 * x)
    return np.where((x > lo) & (x < hi), d, 0.0)


def marchenko_pastur(evals: np.ndarray, null_evals: np.ndarray, s2_entries: float, N: int, M: int) -> dict:
    """SPEC §3 MP metrics of one ascending ESD, given its permuted null ESD and var(W).

    s² = var(W); λ₊ = s²(1+1/√Q)². If the permuted ESD exceeds that edge, s² is re-estimated ONCE as
    (Σ of permuted λ at or below the edge)/M and the edges recomputed. λ₊ is capped at λ_max.
    `mp_ks` is the KS distance between the whole ESD and the MP law with the final s² (before the cap).
    """
    Q = N / M
    s2 = float(s2_entries)
    _lo, hi = mp_edges(s2, Q)
    if null_evals.size and float(null_evals[-1]) > hi:
        s2 = float(np.sum(null_evals[null_evals <= hi])) / M
    lo, hi = mp_edges(s2, Q)
    lam_max = float(evals[-1]) if evals.size else math.nan
    ks = math.nan
    if evals.size and s2 > 0:
        theo = mp_cdf(evals, s2, Q)
        uniq, first = np.unique(evals, return_index=True)
        last = np.searchsorted(evals, uniq, side="right")
        ks = float(max(np.max(np.abs(theo[first] - first / evals.size)),
                       np.max(np.abs(theo[first] - last / evals.size))))
    edge = min(hi, lam_max) if math.isfinite(lam_max) else hi
    return {
        "mp_esd_max": edge,
        "mp_esd_min": lo,
        "mp_bulk_std": math.sqrt(s2) if s2 >= 0 else math.nan,
        "mp_bulk_var": s2,
        "mp_num_spikes": int(np.sum(evals > edge)),
        "mp_ks": ks,
        "mp_soft_rank": edge / lam_max if lam_max > 0 else math.nan,
    }


def tracy_widom(evals: np.ndarray, s2: float, N: int, M: int, quantile: float = TW1_QUANTILE_995) -> dict:
    """SPEC §3 TW edge: λ_TW = μ + s·q with μ = (s²/N)(√(N−1)+√M)², s = (s²/N)(√(N−1)+√M)(1/√(N−1)+1/√M)^⅓
    (Johnstone 2001 centring/scaling of the largest eigenvalue of a white Wishart, in units λ = σ²/N)."""
    if N < 2 or M < 1:
        return {"tw_esd_bound": math.nan, "tw_num_spikes": 0}
    a, b = math.sqrt(N - 1), math.sqrt(M)
    mu = (s2 / N) * (a + b) ** 2
    scale = (s2 / N) * (a + b) * (1.0 / a + 1.0 / b) ** (1.0 / 3.0)
    bound = mu + scale * quantile
    return {"tw_esd_bound": bound, "tw_num_spikes": int(np.sum(evals > bound))}


def w1_rand_distance(evals: np.ndarray, null_evals: np.ndarray) -> float:
    """W₁(λ, λ_rand)/mean(λ): for two ascending samples of equal size W₁ is the mean |difference|."""
    mean = float(np.mean(evals)) if evals.size else math.nan
    if not (mean > 0) or evals.size != null_evals.size:
        return math.nan
    return float(np.mean(np.abs(np.sort(evals) - np.sort(null_evals)))) / mean

"""PRE-PORT TORCH VERSION of analysis/spectral/powerlaw_fit.py (main at fa19fed), kept ONLY as a test oracle.

Not part of the package and imported by nothing but tests/test_powerlaw_fit_numpy.py, which checks that the
numpy port gives the same xmin / n_tail and α, KS to round-off. Do not edit except to keep it runnable.
Only the power-law part is kept (the TPL/exponential tail fits were numpy already and are the package's).
Original module docstring follows.

Tail fits of an ESD: power law (vectorised xmin scan), truncated power law, exponential, and the LLR.

Conventions follow the `powerlaw` package 2.0 (Alstott et al.; Clauset, Shalizi & Newman 2009), the
oracle of SPEC §3:
- xmin candidates are the distinct positive eigenvalues except the largest (`powerlaw.Fit.find_xmin`);
- α̂ = 1 + n_tail / Σ_{λ≥xmin} ln(λ/xmin) (continuous MLE);
- KS distance D = max_j |F_fit(λ_j) − F_emp(λ_j)| over the distinct tail values, where the empirical CDF
  is powerlaw 2.0's "left" one: F_emp(λ_j) = #{tail values < λ_j} / n_tail (powerlaw issue #111);
- xmin = the candidate with the smallest D (first one on ties).
Deliberate difference: powerlaw 2.0 bounds α to [0, 3] by default and discards xmin candidates whose
α falls outside (it refits them numerically, clamps them and flags them "noisy"); weight spectra often
have α > 3 (WeightWatcher's and diffract's fitters do not bound it), so every candidate counts here.
On spectra whose selected α is < 3 the two agree exactly (tests/test_powerlaw_fit.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

KS_BLOCK_BYTES = 64 << 20     # memory for one block of the (candidates × values) KS matrix
KS_TRIANGLE_FROM = 512        # from this ESD size the KS matrix goes in row blocks over its upper triangle only
LLR_SIGNIFICANCE = 0.05       # p below which the PL-vs-TPL log-likelihood ratio decides the shape


@dataclass(frozen=True)
class PowerLawFit:
    """Batched power-law fits: one entry per spectrum (shape (B,)), NaN where no fit was possible.

    The per-candidate curves (`candidate_*`, shape (B, n), NaN at positions that are no candidate)
    are what the KS-vs-xmin chart and the `local_min` rule read.
    """

    alpha: torch.Tensor
    xmin: torch.Tensor
    ks: torch.Tensor
    n_tail: torch.Tensor          # int64; 0 where no fit
    xmin_index: torch.Tensor      # int64 position of xmin in the ascending spectrum; -1 where no fit
    candidate_alpha: torch.Tensor
    candidate_ks: torch.Tensor
    evals: torch.Tensor           # the ascending float64 spectra that were fitted, (B, n)


def _as_sorted_float64(evals) -> tuple[torch.Tensor, bool]:
    x = torch.as_tensor(np.asarray(evals) if not isinstance(evals, torch.Tensor) else evals)
    single = x.dim() == 1
    x = x.reshape(1, -1) if single else x.reshape(-1, x.shape[-1])
    return torch.sort(x.to(torch.float64), dim=-1).values, single


def candidate_mask(x: torch.Tensor) -> torch.Tensor:
    """(B, n) bool: positions that are xmin candidates — first occurrence of a distinct positive value,
    below the spectrum's maximum (powerlaw: `unique(data)[:-1]`, data > 0)."""
    first = torch.ones_like(x, dtype=torch.bool)
    first[:, 1:] = x[:, 1:] != x[:, :-1]
    return first & (x > 0) & (x < x[:, -1:])


def _first_occurrence(x: torch.Tensor) -> torch.Tensor:
    first = torch.ones_like(x, dtype=torch.bool)
    first[:, 1:] = x[:, 1:] != x[:, :-1]
    return first


def power_law_curves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """α̂ and KS at every xmin candidate of ascending float64 spectra x (B, n); NaN off-candidate.

    α from suffix sums of ln λ (one pass); KS from blocks of the upper-triangular (candidate × value)
    matrix of fitted-minus-empirical CDFs — O(n²/2) work, no Python loop over candidates.
    """
    B, n = x.shape
    cand = candidate_mask(x)
    first = _first_occurrence(x)
    logx = torch.where(x > 0, torch.log(x.clamp_min(torch.finfo(torch.float64).tiny)), torch.zeros_like(x))
    suffix = torch.flip(torch.cumsum(torch.flip(logx, [-1]), -1), [-1])           # Σ_{j≥i} ln λ_j
    idx = torch.arange(n, device=x.device, dtype=torch.float64)
    n_t = n - idx                                                                    # tail sizes
    denom = suffix - n_t * logx                                                      # Σ ln(λ_j/λ_i)
    alpha = torch.where(cand & (denom > 0), 1.0 + n_t / denom.clamp_min(1e-300), torch.full_like(x, math.nan))

    ks = torch.full_like(x, math.nan)
    rows_per_block = max(1, KS_BLOCK_BYTES // max(1, 8 * 3 * B * n))
    if n >= KS_TRIANGLE_FROM:   # ≥ 4 row blocks: each spans only columns j ≥ its first row, ~5/8 of the square
        rows_per_block = min(rows_per_block, -(-n // 4))
    for start in range(0, n, rows_per_block):
        stop = min(n, start + rows_per_block)
        # only values j ≥ start can be in a tail of candidates i ∈ [start, stop): the upper triangle
        cols = logx[:, start:]                                                       # (B, n−start)
        a = alpha[:, start:stop]                                                     # (B, r)
        i = torch.arange(start, stop, device=x.device, dtype=torch.float64)
        j = torch.arange(start, n, device=x.device, dtype=torch.float64)
        rel = j[None, :] - i[:, None]                                                # (r, n−start): j − i
        diff = cols[:, None, :] - logx[:, start:stop, None]                          # ln(λ_j/λ_i)
        diff.mul_((1.0 - a)[..., None]).expm1_()                      # −(fitted CDF 1 − (λ_j/λ_i)^(1−α))
        diff.add_((rel / n_t[start:stop, None])[None]).abs_()         # |fitted − empirical (j−i)/n_t|, same bits
        valid = (rel >= 0)[None] & first[:, None, start:]
        diff.masked_fill_(~valid, 0.0)
        ks[:, start:stop] = torch.where(torch.isnan(a), a, diff.amax(-1))
    return alpha, ks


def _local_min_index(ks: torch.Tensor, n: int) -> int:
    """Leftmost significant local minimum of one KS-vs-xmin curve (NaN = no candidate); -1 if none.

    diffract-core's exact rule is not published with the package we have; this is our reading of it,
    stated so it can be checked. Over the K candidates in ascending order, candidate i is chosen when it is
    (a) a local minimum: the smallest KS within ±w candidates, w = max(2, K//100) (single-step wiggles
        of the discrete KS curve are noise);
    (b) a real dip: within ±4w candidates the curve rises to at least 1.05 × its KS on each side that
        exists (a plateau or a shoulder is not a minimum);
    (c) statistically indistinguishable from the best fit: KS_i − KS_min ≤ 1.36/√n_tail(i), the 5 %
        Kolmogorov critical value for its tail.
    The global minimum (first on ties) always counts, so the result is never right of the "ks" rule's xmin.
    """
    valid = ~torch.isnan(ks)
    pos = torch.nonzero(valid).flatten()
    if pos.numel() == 0:
        return -1
    curve = ks[pos]
    K = curve.numel()
    w = max(2, K // 100)
    pad = torch.nn.functional.pad
    window_min = pad(curve[None, None], (w, w), value=math.inf)[0, 0].unfold(0, 2 * w + 1, 1).amin(-1)
    W = 4 * w
    padded = pad(curve[None, None], (W, W), value=-math.inf)[0, 0]
    left_max = padded[:-W - 1].unfold(0, W, 1)[:K].amax(-1) if K else curve   # max over [i−W, i)
    right_max = padded[W + 1:].unfold(0, W, 1)[:K].amax(-1)                  # max over (i, i+W]
    rises = ((left_max >= 1.05 * curve) | (left_max == -math.inf)) & \
            ((right_max >= 1.05 * curve) | (right_max == -math.inf))
    best = curve.min()
    n_tail = (n - pos).to(torch.float64)
    ok = (curve <= window_min) & rises & (curve - best <= 1.36 / torch.sqrt(n_tail))
    ok[int(curve.argmin())] = True
    return int(pos[torch.nonzero(ok).flatten()[0]])


def fit_power_law(evals, xmin_rule: str = "ks") -> PowerLawFit:
    """Continuous power-law MLE with xmin chosen by KS (`"ks"`: global minimum, as `powerlaw.Fit`;
    `"local_min"`: leftmost significant local minimum) for one spectrum (n,) or a stack (B, n)."""
    if xmin_rule not in ("ks", "local_min"):
        raise ValueError(f"xmin_rule must be 'ks' or 'local_min', not {xmin_rule!r}")
    x, _single = _as_sorted_float64(evals)
    B, n = x.shape
    alpha_c, ks_c = power_law_curves(x)
    has = ~torch.isnan(ks_c).all(-1)
    if xmin_rule == "ks":
        best = torch.where(torch.isnan(ks_c), torch.full_like(ks_c, math.inf), ks_c).argmin(-1)
    else:
        best = torch.tensor([_local_min_index(ks_c[b], n) for b in range(B)], device=x.device)
    best = torch.where(has, best, torch.full_like(best, -1))
    safe = best.clamp_min(0)[:, None]
    nan = torch.full((B,), math.nan, dtype=torch.float64, device=x.device)
    alpha = torch.where(has, alpha_c.gather(-1, safe)[:, 0], nan)
    ks = torch.where(has, ks_c.gather(-1, safe)[:, 0], nan)
    xmin = torch.where(has, x.gather(-1, safe)[:, 0], nan)
    n_tail = torch.where(has, n - best, torch.zeros_like(best))
    return PowerLawFit(alpha=alpha, xmin=xmin, ks=ks, n_tail=n_tail, xmin_index=best,
                       candidate_alpha=alpha_c, candidate_ks=ks_c, evals=x)


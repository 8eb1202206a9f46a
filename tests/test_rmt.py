"""Random-matrix references (SPEC §3): MP edges, bulk variance re-estimate, spikes, TW edge, null, W₁."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from analysis.spectral.backend import SpectralSettings
from analysis.spectral.rmt import (TW1_QUANTILE_995, marchenko_pastur, mp_cdf, mp_density, mp_edges, permuted,
                          tracy_widom, w1_rand_distance)
from analysis.spectral.spectra import eigenvalues, null_settings, spectral_metrics

CPU = SpectralSettings(device="cpu")


def _gaussian(N: int, M: int, s: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, N, generator=g, dtype=torch.float64) * s


def test_mp_edges_and_noise_has_no_spikes():
    """i.i.d. N(0, s²=0.25), M=400 × N=1600 (Q=4): λ± = s²(1 ± 1/2)² = 0.5625 and 0.0625; the empirical
    λ_max lies within 3 % of λ₊ (finite-size TW fluctuation ~ N^(-2/3)), no MP or TW spikes, KS to MP < 0.03."""
    W = _gaussian(1600, 400, 0.5, seed=1)
    m = spectral_metrics(W, CPU)
    assert mp_edges(0.25, 4.0) == pytest.approx((0.25 * 0.25, 0.25 * 2.25))
    assert m["mp_esd_min"] == pytest.approx(0.0625, rel=0.02)
    assert m["lambda_max"] == pytest.approx(0.5625, rel=0.03)
    assert m["mp_bulk_var"] == pytest.approx(0.25, rel=0.01)
    assert m["mp_num_spikes"] == 0 and m["tw_num_spikes"] == 0
    assert m["mp_ks"] < 0.03
    assert m["mp_soft_rank"] == pytest.approx(1.0, abs=0.03)


def test_planted_spikes_are_counted():
    """Noise N(0,1) 300 × 900 plus r = 3 rank-one spikes with σ = 3, 4, 5·√N (λ = σ²/N = 9, 16, 25 ≫ λ₊ ≈ 1.78):
    exactly 3 MP spikes and 3 TW spikes. s² = var(W) includes the spikes' energy (50·N/(M·N) ≈ +0.167);
    the permuted null spreads that energy into its bulk and stays below the resulting edge, so SPEC's
    re-estimate is not triggered and λ₊ = var(W)·(1 + 1/√3)² exactly."""
    N, M = 900, 300
    W = _gaussian(N, M, 1.0, seed=2)
    g = torch.Generator().manual_seed(3)
    for strength in (3.0, 4.0, 5.0):
        u = torch.randn(M, 1, generator=g, dtype=torch.float64)
        v = torch.randn(1, N, generator=g, dtype=torch.float64)
        W = W + strength * math.sqrt(N) * (u / u.norm()) @ (v / v.norm())
    m = spectral_metrics(W, CPU)
    assert m["mp_num_spikes"] == 3
    assert m["tw_num_spikes"] == 3
    edge = float(W.float().double().var(correction=0)) * (1 + 1 / math.sqrt(3)) ** 2   # var of the float32 compute copy
    null = eigenvalues(permuted(W, 42), CPU).numpy()
    assert null[-1] <= edge
    assert m["mp_esd_max"] == pytest.approx(edge, rel=1e-12)
    assert m["mp_soft_rank"] == pytest.approx(m["mp_esd_max"] / m["lambda_max"])


def test_bulk_variance_reestimated_from_permuted_null():
    """Heavy-tailed entries (Student-t, 3 dof): the permuted ESD exceeds the var(W) edge, so SPEC §3 says
    s² = (Σ permuted λ ≤ edge)/M; recomputed here by hand from the same seeded permutation."""
    g = np.random.default_rng(4)
    W = torch.from_numpy(g.standard_t(3.0, size=(200, 500)))
    N, M = 500, 200
    lam = eigenvalues(W, CPU).numpy()
    null = eigenvalues(permuted(W, 42), null_settings(CPU)).numpy()
    s2 = float(W.float().double().var(correction=0))
    hi0 = s2 * (1 + math.sqrt(M / N)) ** 2
    assert null[-1] > hi0                                  # the case SPEC's re-estimate is for
    s2_new = null[null <= hi0].sum() / M
    m = marchenko_pastur(lam, null, s2, N, M)
    assert m["mp_bulk_var"] == pytest.approx(s2_new, rel=1e-12)
    assert m["mp_esd_min"] == pytest.approx(s2_new * (1 - math.sqrt(M / N)) ** 2, rel=1e-12)
    assert m["mp_esd_max"] == pytest.approx(min(lam[-1], s2_new * (1 + math.sqrt(M / N)) ** 2), rel=1e-12)
    full = spectral_metrics(W, CPU)
    assert full["mp_bulk_var"] == pytest.approx(s2_new, rel=1e-9)


def test_edge_capped_at_lambda_max():
    """A matrix whose ESD ends below the MP edge (all singular values equal, s² large): λ₊ = λ_max, 0 spikes."""
    Q, _ = torch.linalg.qr(torch.randn(200, 100, dtype=torch.float64, generator=torch.Generator().manual_seed(5)))
    W = Q.T * 3.0                                          # 100 × 200, every σ = 3
    m = spectral_metrics(W, CPU)
    assert m["mp_esd_max"] == pytest.approx(9.0 / 200)
    assert m["mp_num_spikes"] == 0 and m["mp_soft_rank"] == pytest.approx(1.0)


def test_tracy_widom_edge_by_hand():
    """SPEC formula with s² = 2, N = 1000, M = 250, q = 2.4224 (TW₁ at 0.995): μ = (2/1000)(√999+√250)²,
    s = (2/1000)(√999+√250)(1/√999+1/√250)^(1/3); values above it are TW spikes."""
    assert TW1_QUANTILE_995 == 2.4224
    a, b = math.sqrt(999), math.sqrt(250)
    mu = 0.002 * (a + b) ** 2
    sc = 0.002 * (a + b) * (1 / a + 1 / b) ** (1 / 3)
    evals = np.array([1.0, mu, mu + sc * 2.4, mu + sc * 2.45, 10.0])
    tw = tracy_widom(evals, 2.0, 1000, 250)
    assert tw["tw_esd_bound"] == pytest.approx(mu + 2.4224 * sc, rel=1e-14)
    assert tw["tw_num_spikes"] == 2


def test_tw_edge_holds_for_pure_noise_99_percent():
    """TW bound at 1−0.005: over 40 pure-noise 100 × 300 matrices the largest eigenvalue exceeds it rarely
    (expected 0.2 of 40; ≤ 2 allowed — the TW₁ approximation is good to a few % at this size)."""
    exceed = 0
    for seed in range(40):
        W = _gaussian(300, 100, 1.0, seed=100 + seed)
        lam = eigenvalues(W, CPU).numpy()
        exceed += tracy_widom(lam, 1.0, 300, 100)["tw_num_spikes"] > 0
    assert exceed <= 2


def test_mp_cdf_matches_quadrature():
    """mp_cdf (θ-substituted midpoint rule) equals adaptive quadrature of the MP density to 1e-6, Q = 1 and 3."""
    for Q in (1.0, 3.0):
        lo, hi = mp_edges(1.5, Q)
        for x in np.linspace(lo, hi, 7)[1:-1]:
            ref = integrate.quad(lambda t: mp_density(np.array([t]), 1.5, Q)[0], lo, x, limit=200)[0]
            assert mp_cdf(np.array([x]), 1.5, Q)[0] == pytest.approx(ref, abs=1e-6)


def test_permuted_null_is_seeded_and_a_permutation():
    """The null keeps the multiset of entries, is reproducible with the seed, differs across seeds, ignores
    global RNG state, and a batch gets each matrix's single-matrix null."""
    W = torch.arange(60, dtype=torch.float64).reshape(6, 10)
    P = permuted(W, 42)
    assert torch.equal(torch.sort(P.flatten()).values, W.flatten())
    torch.manual_seed(123)
    assert torch.equal(permuted(W, 42), P)
    assert not torch.equal(permuted(W, 7), P)
    stack = torch.stack([W, 2 * W])
    assert torch.equal(permuted(stack, 42)[1], permuted(2 * W, 42))


def test_w1_rand_distance_equals_scipy():
    """W₁(λ, λ_rand)/mean(λ) equals scipy.stats.wasserstein_distance / mean for equal-size samples."""
    rng = np.random.default_rng(0)
    a, b = np.sort(rng.gamma(2.0, size=300)), np.sort(rng.gamma(2.5, size=300))
    assert w1_rand_distance(a, b) == pytest.approx(stats.wasserstein_distance(a, b) / a.mean(), rel=1e-12)
    W = torch.from_numpy(rng.standard_t(2.5, size=(128, 256)))
    m = spectral_metrics(W, CPU)
    lam = eigenvalues(W, CPU).numpy()
    null = eigenvalues(permuted(W, 42), null_settings(CPU)).numpy()
    assert m["w1_rand_distance"] == pytest.approx(stats.wasserstein_distance(lam, null) / lam.mean(), rel=1e-9)


def test_permutation_memo_returns_the_seeded_draw_and_stays_bounded():
    """The memoised index is exactly torch.randperm(n) of a fresh generator seeded with `seed` (so the null
    is unchanged by memoising), a second request is the same object (no redraw), and the memo evicts the
    least recently used index once its byte budget is spent."""
    from analysis.spectral.rmt import _PermutationMemo, permutation_index

    ref = torch.randperm(600 * 7, generator=torch.Generator().manual_seed(42))
    got = permutation_index(600 * 7, 42)
    assert got.dtype == torch.int32 and torch.equal(got.long(), ref)
    assert permutation_index(600 * 7, 42) is got
    memo = _PermutationMemo(max_bytes=4 * 1000)        # room for 1000 int32 entries
    a = memo.get(600, 1)
    b = memo.get(300, 1)                              # 900 entries held
    assert memo.get(600, 1) is a                     # a is now the most recent
    memo.get(400, 1)                                  # 1300 > 1000: evicts b (least recent), then a
    assert memo._bytes <= 4 * 1000 and (300, 1) not in memo._items
    big = memo.get(5000, 1)                           # larger than the whole budget: drawn, not kept
    assert (5000, 1) not in memo._items and torch.equal(big.long(), torch.randperm(
        5000, generator=torch.Generator().manual_seed(1)))


def test_entry_variance_from_the_esd_matches_the_direct_float64_variance():
    """var(W) is read as ‖W‖²_F/(mn) − mean² with ‖W‖²_F from the ESD: on a matrix with a clear non-zero mean
    (0.3 ± 1, direct route) and on a heavy-tailed one with mean 1e-4 (ESD route) it equals the direct float64 variance of the float32 copy
    to 1e-12 relative."""
    from analysis.spectral.spectra import _entry_variances

    g = torch.Generator().manual_seed(11)
    t = torch.from_numpy(np.random.default_rng(3).standard_t(3.0, size=(150, 260)))
    t = t - t.mean() + 1e-4                      # mean² ≈ 3e-9·E[w²]: the ESD route (threshold 1e-6)
    for W in (0.3 + torch.randn(120, 400, generator=g, dtype=torch.float64), t):   # direct route, ESD route
        lam = eigenvalues(W, CPU).numpy()
        (var,) = _entry_variances(W[None], lam[None], max(W.shape), CPU)
        assert var == pytest.approx(float(W.float().double().var(correction=0)), rel=1e-12)

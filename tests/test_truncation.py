"""SPEC §5 truncation and DARE against analytic values and the Eckart–Young reconstruction."""

from __future__ import annotations

import math

import pytest
import torch

from analysis.deltas import truncation as T


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


SIGMA = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)   # energies 16, 9, 4, 1 of 30


def test_kept_energy_of_a_known_spectrum():
    # t = 0 keeps all; t = 0.25 drops ⌊1⌋ = 1 value (1) → 29/30; t = 0.5 drops 2 → 25/30; t = 0.74 drops ⌊2.96⌋ = 2;
    # t = 0.75 drops 3 → 16/30; t = 0.99 drops ⌊3.96⌋ = 3 → 16/30.
    E = T.kept_energy(SIGMA, [0.0, 0.25, 0.5, 0.74, 0.75, 0.99])
    assert E.tolist() == pytest.approx([1.0, 29 / 30, 25 / 30, 25 / 30, 16 / 30, 16 / 30])
    err = T.truncation_error(SIGMA, [0.5])
    assert float(err[0]) == pytest.approx(math.sqrt(5 / 30))
    # order of σ does not matter
    assert T.kept_energy(SIGMA.flip(0), [0.5]).tolist() == pytest.approx([25 / 30])
    with pytest.raises(ValueError):
        T.kept_energy(SIGMA, [1.0])


def test_energy_ranks_and_truncatable_fraction():
    # cumulative shares 16/30 = .533, 25/30 = .833, 29/30 = .967, 1 → 90 % needs 3, 95 % needs 3, 99 % needs 4
    assert T.energy_ranks(SIGMA) == {0.9: 3, 0.95: 3, 0.99: 4}
    # dropping the smallest (1/30 → error .183) exceeds 0.1; at 0.2 one value may go; at 0.45 two (5/30 → .408)
    assert T.truncatable_fraction(SIGMA, 0.1) == 0.0
    assert T.truncatable_fraction(SIGMA, 0.2) == pytest.approx(0.25)
    assert T.truncatable_fraction(SIGMA, 0.45) == pytest.approx(0.5)
    assert T.truncatable_fraction(SIGMA, 1.0) == pytest.approx(0.75)   # t < 1: at most M − 1 values dropped


def test_truncation_error_matches_the_reconstruction():
    # Eckart–Young: the truncated SVD's relative Frobenius error is exactly √(1 − E(t)).
    dW = torch.randn(20, 36, generator=_gen(0), dtype=torch.float64)
    curve = T.delta_truncation_curve(dW, [0.0, 0.3, 0.6, 0.9])
    for t, expected in zip(curve.ts.tolist(), curve.error.tolist()):
        approx = T.truncate(dW, t)
        err = float((approx - dW).norm() / dW.norm())
        assert err == pytest.approx(expected, abs=1e-9), t
    assert curve.energy == pytest.approx(float(dW.pow(2).sum()))


def test_planted_rank_reaches_full_energy_exactly_there():
    # ΔW of rank 5 in 40×64: keeping 5 values (t = 35/40) keeps ≥ 99.9 % of the energy; keeping 4 does not.
    A = torch.randn(40, 5, generator=_gen(1), dtype=torch.float64)
    B = torch.randn(64, 5, generator=_gen(2), dtype=torch.float64)
    dW = (A @ B.T).float()
    curve = T.delta_truncation_curve(dW, [35 / 40, 36 / 40])
    assert float(curve.kept_energy[0]) >= 0.999
    assert float(curve.kept_energy[1]) < 0.999
    sigma = T.singular_values(dW)
    assert T.energy_ranks(sigma, [0.999])[0.999] == 5


def test_aggregate_is_energy_weighted():
    # two matrices: energies 30 (SIGMA) and 100 (σ = [10, 0]): at t = 0.5 they keep 25 and 100 → (25+100)/130
    a = T.truncation_curve(SIGMA, [0.0, 0.5])
    b = T.truncation_curve(torch.tensor([10.0, 0.0], dtype=torch.float64), [0.0, 0.5])
    agg = T.aggregate_curves([a, b])
    assert agg.kept_energy.tolist() == pytest.approx([1.0, 125 / 130])
    assert agg.energy == pytest.approx(130.0)
    groups = T.aggregate_by({"layers.0.q": a, "layers.0.o": b, "layers.1.q": a}, lambda k: k.split(".")[1])
    assert groups["0"].kept_energy.tolist() == pytest.approx([1.0, 125 / 130])
    assert groups["1"].kept_energy.tolist() == pytest.approx([1.0, 25 / 30])
    assert agg.truncatable_fraction(0.5) == 0.5  # error √(5/130) = .196 at t = .5


def test_dare_error_matches_its_expectation():
    # Each entry's multiplier is −1 w.p. p and p/(1−p) w.p. 1−p → E[err²] = p/(1−p) for any ΔW;
    # with 256² entries one draw is within a few % of √(p/(1−p)).
    dW = torch.randn(256, 256, generator=_gen(3))
    for p in (0.1, 0.5, 0.9):
        err = T.dare_error(dW, p, 7)
        assert err == pytest.approx(math.sqrt(p / (1 - p)), rel=0.03), p
    assert T.dare_error(dW, 0.0, 7) == 0.0


def test_dare_is_seeded_and_unbiased():
    dW = torch.randn(64, 64, generator=_gen(4))
    a = T.dare(dW, 0.5, 11)
    b = T.dare(dW, 0.5, torch.Generator().manual_seed(11))
    assert torch.equal(a, b)
    assert not torch.equal(a, T.dare(dW, 0.5, 12))
    kept = a != 0
    assert torch.allclose(a[kept], 2.0 * dW.double()[kept])   # rescale 1/(1−p) = 2
    assert 0.45 < float(kept.double().mean()) < 0.55
    curve = T.dare_curve(dW, [0.2, 0.8], seed=5)
    assert curve[0] < curve[1]
    with pytest.raises(ValueError):
        T.dare(dW, 1.0)

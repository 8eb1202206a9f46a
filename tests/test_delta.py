"""SPEC §4 delta metrics against analytic values: rescaling, rotation, Mirsky's bound, A1, Gini, head energies."""

from __future__ import annotations

import math

import pytest
import torch
from memory_models import DictCheckpoint, llama_gqa

from analysis.deltas import delta as D


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _orthogonal(n: int, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=_gen(seed), dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def test_rescaling_gives_rho_one_and_cos_one():
    # W_d = 1.5·W₀ → ΔW = 0.5·W₀: every singular value moves by 0.5σ_i, so ‖Δσ‖₂ = 0.5‖W₀‖_F = ‖ΔW‖_F → ρ = 1;
    # W_d is parallel to W₀ → delta_cos = 1; delta_rel = 0.5.
    W0 = torch.randn(24, 40, generator=_gen(0))
    m = D.delta_metrics(W0, 1.5 * W0, spectral=False)
    assert m["delta_rho"] == pytest.approx(1.0, abs=1e-5)
    assert m["delta_cos"] == pytest.approx(1.0, abs=1e-6)
    assert m["delta_rel"] == pytest.approx(0.5, rel=1e-5)
    assert m["delta_frob"] == pytest.approx(0.5 * float(W0.double().norm()), rel=1e-5)


def test_shrinking_also_gives_rho_one():
    W0 = torch.randn(30, 12, generator=_gen(1))
    m = D.delta_metrics(W0, 0.25 * W0, spectral=False)
    assert m["delta_rho"] == pytest.approx(1.0, abs=1e-5)
    assert m["delta_rel"] == pytest.approx(0.75, rel=1e-5)


def test_orthogonal_rotation_gives_rho_zero():
    # W_d = W₀·R with R orthogonal keeps every σ: ‖σ(W_d) − σ(W₀)‖ ≈ float32 rounding while ‖ΔW‖_F = O(‖W₀‖_F).
    W0 = torch.randn(20, 32, generator=_gen(2))
    R = _orthogonal(32, 3).float()
    Wd = W0 @ R
    m = D.delta_metrics(W0, Wd, spectral=False)
    assert m["delta_rho"] < 1e-5
    assert m["delta_rel"] > 1.0  # a random rotation moves W far: ‖W₀R − W₀‖ ≈ √2‖W₀‖
    expected_cos = float((W0.double() * Wd.double()).sum() / (W0.double().norm() * Wd.double().norm()))
    assert m["delta_cos"] == pytest.approx(expected_cos, abs=1e-6)


def test_rho_obeys_mirsky_bound_on_random_updates():
    # Mirsky: ‖σ(A) − σ(B)‖₂ ≤ ‖A − B‖_F, so ρ ∈ [0, 1] for any update; a generic additive update is in between.
    W0 = torch.randn(8, 16, 24, generator=_gen(4))
    Wd = W0 + 0.3 * torch.randn(8, 16, 24, generator=_gen(5))
    rows = D.batched_delta_metrics(W0, Wd, spectral=False)
    rhos = [r["delta_rho"] for r in rows]
    assert all(0.0 < r < 1.0 for r in rhos)


def test_batched_equals_one_by_one():
    W0 = torch.randn(4, 10, 18, generator=_gen(6))
    Wd = W0 + 0.1 * torch.randn(4, 10, 18, generator=_gen(7))
    batched = D.batched_delta_metrics(W0, Wd, spectral=False, top_k=5)
    for i in range(4):
        single = D.delta_metrics(W0[i], Wd[i], spectral=False, top_k=5)
        for key, value in single.items():
            assert batched[i][key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_delta_rank_of_a_planted_rank_r_update():
    # ΔW = A·Bᵀ with A 32×3, B 48×3: exactly 3 non-zero singular values → 99 % energy needs at most 3,
    # and the float64 Gram leaves the rest at its rounding floor σ ≈ √eps·σ_max (energy share ≈ 1e-16).
    W0 = torch.randn(32, 48, generator=_gen(8), dtype=torch.float64)
    A = torch.randn(32, 3, generator=_gen(9), dtype=torch.float64)
    B = torch.randn(48, 3, generator=_gen(10), dtype=torch.float64) * torch.tensor([3.0, 2.0, 1.0],
                                                                                     dtype=torch.float64)
    m = D.delta_metrics(W0, W0 + A @ B.T, dtype=torch.float64, spectral=False)
    assert m["delta_rank_99"] <= 3
    s = D.singular_values(A @ B.T)
    assert float(s[3:].abs().max()) < 1e-7 * float(s[0])


def test_rank_for_energy_known_sigma():
    # σ = (3, 2, 1, 0): energy shares 9/14 = 0.643, 13/14 = 0.929, 14/14 → 90 % needs 2, 95 % and 99 % need 3.
    sigma = torch.tensor([3.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    assert int(D.rank_for_energy(sigma, 0.90)) == 2
    assert int(D.rank_for_energy(sigma, 0.95)) == 3
    assert int(D.rank_for_energy(sigma, 0.99)) == 3
    assert int(D.rank_for_energy(torch.zeros(4, dtype=torch.float64), 0.9)) == 0


def test_singular_values_match_torch_svdvals():
    W = torch.randn(3, 17, 9, generator=_gen(11), dtype=torch.float64)
    ours = D.singular_values(W)
    ref = torch.linalg.svdvals(W)
    assert torch.allclose(ours, ref, rtol=1e-9, atol=1e-9)


def test_a1_of_identical_matrices_is_one():
    # A1 itself is 1 for identical matrices; a delta row of an identical pair is `unchanged` and leaves A1 empty
    # (issue 9 item 13: no decomposition for ΔW = 0).
    W = torch.randn(16, 40, generator=_gen(12))
    m = D.a1_agreement(D.top_svd(W.double()), D.top_svd(W.clone().double()))
    assert float(m["avg_max_l_agreement"]) == pytest.approx(1.0, abs=1e-9)
    assert float(m["avg_max_r_agreement"]) == pytest.approx(1.0, abs=1e-9)
    top = D.a1_agreement(D.top_svd(W.double(), 4), D.top_svd(W.clone().double(), 4))
    assert float(top["avg_max_l_agreement"]) == pytest.approx(1.0, abs=1e-9)
    row = D.delta_metrics(W, W.clone(), spectral=False, top_k=4)
    assert row["unchanged"] is True and row["a1_k"] is None and row["avg_max_l_agreement"] is None


def test_a1_of_a_sign_flip_is_still_one():
    # O = |U₀ᵀU_d| ignores the sign ambiguity of singular vectors: −W has the same vectors up to sign.
    W = torch.randn(12, 20, generator=_gen(13))
    m = D.delta_metrics(W, -W, spectral=False)
    assert m["avg_max_l_agreement"] == pytest.approx(1.0, abs=1e-9)
    assert m["delta_rho"] == pytest.approx(0.0, abs=1e-6)  # same σ, the update is a reflection


def test_a1_of_independent_random_matrices_is_near_noise_floor():
    # For independent square Gaussian matrices U₀, U_d are independent Haar-random: the row maxima of
    # |U₀ᵀU_d| concentrate near √(2 ln k / d) (k = d = 256 → 0.208), far below 1.
    d = 256
    W0 = torch.randn(d, d, generator=_gen(14), dtype=torch.float64)
    Wd = torch.randn(d, d, generator=_gen(15), dtype=torch.float64)
    m = D.delta_metrics(W0, Wd, dtype=torch.float64, spectral=False)
    floor = D.noise_floor(d, d)
    assert floor == pytest.approx(math.sqrt(2 * math.log(256) / 256))
    assert m["a1_noise_floor_l"] == pytest.approx(floor)
    for key in ("avg_max_l_agreement", "avg_max_r_agreement"):
        assert 0.7 * floor < m[key] < 1.2 * floor, (key, m[key], floor)


def test_top_svd_reconstructs_the_matrix():
    W = torch.randn(2, 15, 7, generator=_gen(16), dtype=torch.float64)
    s = D.top_svd(W)
    rec = s.U @ torch.diag_embed(s.S) @ s.V.transpose(-2, -1)
    assert torch.allclose(rec, W, atol=1e-10)
    assert torch.allclose(s.V.transpose(-2, -1) @ s.V, torch.eye(7, dtype=torch.float64).expand(2, 7, 7),
                          atol=1e-10)


def test_shape_mismatch_is_an_alignment_error():
    from analysis.errors import AlignmentError

    with pytest.raises(AlignmentError):
        D.delta_metrics(torch.zeros(3, 4), torch.zeros(4, 3), spectral=False)


def test_gini_of_known_vectors():
    # [0,0,0,1]: one of 4 holds everything → (n−1)/n = 0.75; equal values → 0;
    # [1,2,3,4]: Σ|xi−xj| over ordered pairs = 20, 2n²μ = 80 → 0.25.
    assert D.gini([0.0, 0.0, 0.0, 1.0]) == pytest.approx(0.75)
    assert D.gini([2.0, 2.0, 2.0]) == pytest.approx(0.0, abs=1e-15)
    assert D.gini([4.0, 1.0, 3.0, 2.0]) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        D.gini([1.0, -1.0])


def test_concentration_curve_and_top10_share():
    # 10 heads, one holds all energy → the top 10 % (one head) holds 100 %; equal energies → 10 %.
    one = torch.zeros(10, dtype=torch.float64)
    one[3] = 5.0
    c = D.concentration(one)
    assert c.top10_share == pytest.approx(1.0)
    assert c.gini == pytest.approx(0.9)
    flat = D.concentration(torch.ones(2, 5, dtype=torch.float64))
    assert flat.top10_share == pytest.approx(0.1)
    assert flat.gini == pytest.approx(0.0, abs=1e-15)
    x, y = flat.curve
    assert float(x[0]) == 0.0 and float(x[-1]) == 100.0 and float(y[-1]) == pytest.approx(1.0)
    # 20 heads: energies 4,3,2,1 and 16 zeros → the top 10 % = the top 2 heads hold 7/10
    e = torch.tensor([1.0, 0, 3.0, 0, 2.0, 4.0] + [0.0] * 14, dtype=torch.float64)
    assert D.concentration(e).top10_share == pytest.approx(0.7)
    # 15 heads: 10 % = 1.5 heads → halfway between one head (8/15) and two (12/15) = 10/15
    e15 = torch.tensor([8.0, 4.0, 2.0, 1.0] + [0.0] * 11, dtype=torch.float64)
    assert D.concentration(e15).top10_share == pytest.approx(10.0 / 15.0)
    # Gini of the scores when they are given
    assert D.concentration(e15, scores=[1.0, 1.0]).gini == pytest.approx(0.0, abs=1e-15)


def test_kv_energy_is_split_among_query_heads():
    # H = 4 query heads, H_kv = 2: kv head 0 serves heads 0,1 and kv head 1 serves 2,3; each gets half.
    delta = torch.zeros(2, 3, 5, dtype=torch.float64)
    delta[0, 0, 0] = 2.0   # ‖·‖² = 4
    delta[1, 1, 1] = 3.0   # ‖·‖² = 9
    base = torch.ones(2, 3, 5, dtype=torch.float64)  # ‖·‖² = 15 per kv head
    de, be = D.head_energies(delta, base, "k", 4)
    assert de.tolist() == [2.0, 2.0, 4.5, 4.5]
    assert be.tolist() == [7.5, 7.5, 7.5, 7.5]
    dq, _ = D.head_energies(delta, base, "q", 2)  # q is per query head already
    assert dq.tolist() == [4.0, 9.0]
    from analysis.errors import LayoutError

    with pytest.raises(LayoutError):
        D.spread_kv(torch.ones(3), 4)


def test_scores_from_energies():
    de = torch.tensor([[4.0, 0.0], [1.0, 9.0]], dtype=torch.float64)
    be = torch.tensor([[16.0, 1.0], [0.0, 9.0]], dtype=torch.float64)
    r = D.scores_from_energies(de, be)
    assert r[0, 0] == pytest.approx(0.5) and r[0, 1] == 0.0 and math.isnan(r[1, 0]) and r[1, 1] == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------------
# head_scores through the real layout and head-slicing code, on an in-memory llama-shaped GQA model
# --------------------------------------------------------------------------------------------------


def test_head_scores_follow_the_spec_slices_and_split_kv_energy():
    # Plant: layer 0 head 1 q rows scaled by 1.5 (Δ = 0.5·q₁), layer 1 kv group 1 (query heads 2, 3) k rows + E.
    # Expected r from slicing the raw tensors per SPEC §2 (q rows h·d_h…, k/v rows g·d_h…, o columns h·d_h…).
    L, H, G, dh = 2, 4, 2, 3
    base, layout = llama_gqa(L, H, G, dh)
    target = {k: v.clone() for k, v in base.items()}
    target["layers.0.self_attn.q_proj.weight"][dh:2 * dh] *= 1.5
    E = torch.randn(dh, H * dh, generator=_gen(21))
    target["layers.1.self_attn.k_proj.weight"][dh:2 * dh] += E
    hs = D.head_scores(DictCheckpoint(base), DictCheckpoint(target), layout)

    def base_energy(l, h):
        p = f"layers.{l}.self_attn."
        g = h // (H // G)
        q = base[p + "q_proj.weight"][h * dh:(h + 1) * dh]
        k = base[p + "k_proj.weight"][g * dh:(g + 1) * dh]
        v = base[p + "v_proj.weight"][g * dh:(g + 1) * dh]
        o = base[p + "o_proj.weight"][:, h * dh:(h + 1) * dh]
        return float(q.double().pow(2).sum() + (k.double().pow(2).sum() + v.double().pow(2).sum()) / 2
                     + o.double().pow(2).sum())

    dq = 0.25 * float(base["layers.0.self_attn.q_proj.weight"][dh:2 * dh].double().pow(2).sum())
    dk = float(E.double().pow(2).sum()) / 2
    expected = torch.zeros(L, H, dtype=torch.float64)
    expected[0, 1] = math.sqrt(dq / base_energy(0, 1))
    expected[1, 2] = math.sqrt(dk / base_energy(1, 2))
    expected[1, 3] = math.sqrt(dk / base_energy(1, 3))
    assert torch.allclose(hs.scores, expected, rtol=1e-5, atol=1e-7)
    assert float(hs.delta_energy.sum()) == pytest.approx(dq + 2 * dk, rel=1e-5)
    assert float(hs.projection_delta_energy["k"][1, 2]) == pytest.approx(dk, rel=1e-5)
    top = int(torch.argmax(expected))
    assert hs.ranking()[0][:2] == (top // H, top % H)
    assert {(l, h) for l, h, s in hs.ranking() if s > 0} == {(0, 1), (1, 2), (1, 3)}
    # exclude k/v: only the q plant remains, against a base energy without k/v
    hx = D.head_scores(DictCheckpoint(base), DictCheckpoint(target), layout, exclude_kv=True)
    assert float(hx.scores[1].abs().max()) == 0.0
    assert hx.projections == ("q", "o")
    c = D.head_concentration(hs)
    assert 0.0 < c.top10_share <= 1.0 and c.gini == pytest.approx(D.gini(hs.scores))


def test_truncatable_fraction_column_on_a_planted_rank():
    # ΔW of rank 2 in 10×12 with σ = (2, 1): dropping the 8 zero σ loses nothing; dropping a 9th (σ = 1) gives
    # error √(1/5) = .447 > 0.1 → the truncatable fraction is 8/10.
    U = torch.linalg.qr(torch.randn(10, 2, generator=_gen(40), dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(12, 2, generator=_gen(41), dtype=torch.float64))[0]
    W0 = torch.randn(10, 12, generator=_gen(42), dtype=torch.float64)
    dW = U @ torch.diag(torch.tensor([2.0, 1.0], dtype=torch.float64)) @ V.T
    m = D.delta_metrics(W0, W0 + dW, dtype=torch.float64, spectral=False, truncation=True)
    assert m["truncatable_fraction"] == pytest.approx(0.8)
    assert "truncatable_fraction" not in D.delta_metrics(W0, W0 + dW, spectral=False)


def test_spectral_metrics_of_the_delta_itself():
    # ΔW = U·diag(3, 2, 1)·Vᵀ planted in 24×40 (float64): SPEC §3 metrics must describe ΔW, not W₀:
    # frob_norm = √14 = delta_frob, l2_norm = 3, stable_rank = 14/9, hard_rank = 3 (rtol 1e-5 on λ),
    # effective_rank = exp(entropy of σ/Σσ) with σ = (3, 2, 1).
    U = torch.linalg.qr(torch.randn(24, 3, generator=_gen(50), dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(40, 3, generator=_gen(51), dtype=torch.float64))[0]
    dW = U @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)) @ V.T
    W0 = torch.randn(24, 40, generator=_gen(52), dtype=torch.float64)
    m = D.delta_metrics(W0, W0 + dW, dtype=torch.float64, spectral=True)
    assert m["frob_norm"] == pytest.approx(math.sqrt(14.0), rel=1e-9)
    assert m["delta_frob"] == pytest.approx(math.sqrt(14.0), rel=1e-9)
    assert m["l2_norm"] == pytest.approx(3.0, rel=1e-9)
    assert m["stable_rank"] == pytest.approx(14.0 / 9.0, rel=1e-9)
    assert m["hard_rank"] == 3
    p = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64) / 6.0
    assert m["effective_rank"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-6)


def test_zero_delta_rows_have_no_spectral_columns():
    # An unchanged matrix has ΔW = 0: norms are 0, ρ (0/0) is empty (None, issue 9 item 13) and there is no
    # spectrum to fit, while a changed matrix in the same batch still gets its SPEC §3 metrics.
    W = torch.randn(3, 20, 30, generator=_gen(60))
    Wd = W.clone()
    Wd[1] += 0.1 * torch.randn(20, 30, generator=_gen(61))
    rows = D.batched_delta_metrics(W, Wd, spectral=True)
    assert rows[0]["delta_frob"] == 0.0 and rows[0]["delta_rho"] is None and "pl_alpha" not in rows[0]
    assert rows[1]["frob_norm"] == pytest.approx(rows[1]["delta_frob"], rel=1e-9) and "pl_alpha" in rows[1]

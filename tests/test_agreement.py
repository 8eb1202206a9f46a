"""SPEC §4 cross-domain agreement at tensor level: A2, A3, the whole-head stack, classification, Spearman."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from memory_models import DictCheckpoint, llama_gqa

from analysis.deltas import agreement as A


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_a2_of_identical_opposite_and_orthogonal_deltas():
    d = torch.randn(3, 8, 20, generator=_gen(0))
    assert A.a2_cosine(d, d).tolist() == pytest.approx([1.0] * 3)
    assert A.a2_cosine(d, -2.0 * d).tolist() == pytest.approx([-1.0] * 3)
    e1 = torch.zeros(1, 2, 2)
    e1[0, 0, 0] = 1.0
    e2 = torch.zeros(1, 2, 2)
    e2[0, 1, 1] = 3.0
    assert A.a2_cosine(e1, e2).tolist() == [0.0]
    assert math.isnan(float(A.a2_cosine(e1, torch.zeros(1, 2, 2))[0]))


def test_a3_of_a_shared_subspace_is_one_even_when_a2_is_zero():
    # Δ1 = U·B1ᵀ and Δ2 = U·B2ᵀ with one U (40×4) and independent B: the left subspaces coincide (A3 = 1)
    # while the deltas themselves are nearly orthogonal (A2 ≈ 0 ± 1/√(4·60)).
    U = torch.randn(40, 4, generator=_gen(1), dtype=torch.float64)
    d1 = U @ torch.randn(60, 4, generator=_gen(2), dtype=torch.float64).T
    d2 = U @ torch.randn(60, 4, generator=_gen(3), dtype=torch.float64).T
    assert float(A.a3_subspace(d1, d2, k=4)) == pytest.approx(1.0, abs=1e-9)
    assert abs(float(A.a2_cosine(d1, d2))) < 0.3


def test_a3_of_independent_random_deltas_is_near_k_over_d():
    # Two independent Gaussian 128×512 matrices: top-8 left subspaces are independent → E[A3] = k/d = 8/128.
    d1 = torch.randn(16, 128, 512, generator=_gen(4))
    d2 = torch.randn(16, 128, 512, generator=_gen(5))
    a3 = A.a3_subspace(d1, d2, k=8)
    assert a3.shape == (16,)
    level = A.a3_random_level(8, 128)
    assert level == pytest.approx(0.0625)
    assert float(a3.mean()) == pytest.approx(level, rel=0.35)
    assert float(a3.max()) < 0.25


def test_effective_k_is_clamped_to_the_smaller_side():
    assert A.effective_k((4, 6), 8) == 4
    assert A.effective_k((64, 256), 8) == 8
    assert A.effective_k((5, 5), 0) == 1


def _layout(H: int, H_kv: int) -> SimpleNamespace:
    G = H // H_kv
    return SimpleNamespace(num_heads=H, num_kv_heads=H_kv, kv_group=lambda h: h // G)


def test_whole_head_a2_is_the_energy_split_cosine():
    # With GQA (H = 4, H_kv = 2) each query head owns 1/2 of its group's k/v energy and inner product, so
    # A2_head = (⟨q⟩ + ½⟨k⟩ + ½⟨v⟩ + ⟨o⟩) / √((‖q‖² + ½‖k‖² + ½‖v‖² + ‖o‖²)(…)) for each head.
    H, H_kv, dh, Dm = 4, 2, 3, 10
    layout = _layout(H, H_kv)
    g = _gen(6)
    p1 = {"q": torch.randn(H, dh, Dm, generator=g), "k": torch.randn(H_kv, dh, Dm, generator=g),
          "v": torch.randn(H_kv, dh, Dm, generator=g), "o": torch.randn(H, Dm, dh, generator=g)}
    p2 = {key: val + 0.7 * torch.randn(val.shape, generator=g) for key, val in p1.items()}
    s1, s2 = A.head_stack(p1, layout), A.head_stack(p2, layout)
    assert s1.shape == (H, 4 * dh, Dm)
    got = A.a2_cosine(s1, s2)
    for h in range(H):
        gh = h // 2
        parts = [(p1["q"][h], p2["q"][h], 1.0), (p1["k"][gh], p2["k"][gh], 0.5),
                 (p1["v"][gh], p2["v"][gh], 0.5), (p1["o"][h], p2["o"][h], 1.0)]
        inner = sum(w * float((a.double() * b.double()).sum()) for a, b, w in parts)
        n1 = sum(w * float(a.double().pow(2).sum()) for a, _, w in parts)
        n2 = sum(w * float(b.double().pow(2).sum()) for _, b, w in parts)
        assert float(got[h]) == pytest.approx(inner / math.sqrt(n1 * n2), rel=1e-9)


def test_classification_with_default_medians():
    # magnitudes: the top half (≥ median 2.5) is active; among the active heads the agreement median is 0.3 →
    # agreement 0.9 and 0.5 → agnostic, 0.1 and -0.2 → specific; the low-magnitude heads are inert whatever
    # their agreement.
    mag = torch.tensor([[5.0, 4.0, 3.0, 3.0], [1.0, 1.0, 2.0, 0.5]], dtype=torch.float64)
    agr = torch.tensor([[0.9, 0.1, 0.5, -0.2], [0.99, 0.0, 0.7, 0.3]], dtype=torch.float64)
    c = A.classify(agr, mag)
    assert c.magnitude_threshold == pytest.approx(2.5)
    assert c.agreement_threshold == pytest.approx(0.3)  # median of (−0.2, 0.1, 0.5, 0.9)
    assert c.classes == [["agnostic", "specific", "agnostic", "specific"], ["inert"] * 4]
    assert c.counts() == {"agnostic": 2, "specific": 2, "inert": 4}
    user = A.classify(agr, mag, agreement_threshold=0.95, magnitude_threshold=0.9)
    assert user.classes[1] == ["agnostic", "specific", "specific", "inert"]
    assert user.classes[0] == ["specific"] * 4


def test_spearman_of_head_scores():
    x = torch.tensor([[0.1, 0.5, 0.2], [0.9, 0.3, 0.4]], dtype=torch.float64)
    assert A.spearman(x, x.pow(3) + 1.0) == pytest.approx(1.0)       # monotone transform keeps ranks
    assert A.spearman(x, -x) == pytest.approx(-1.0)
    # ranks 1..6 against a known permutation: ρ = 1 − 6Σd²/(n(n²−1))
    a = torch.tensor([1.0, 2, 3, 4, 5, 6])
    b = torch.tensor([1.0, 2, 4, 3, 5, 6])
    # d = (0,0,−1,1,0,0) → Σd² = 2 → 1 − 12/210
    assert A.spearman(a, b) == pytest.approx(1 - 12 / 210)


def test_domain_agreement_recovers_planted_shared_and_specific_heads():
    # Two domains of one in-memory GQA llama. Head (0,0): both domains add the SAME q/o update → A2 = A3 = 1,
    # class agnostic. Head (1,3): each domain adds its OWN random q/o update → A2 ≈ 0, class specific.
    # Every other head gets 1e-4-scale independent noise → inert under a magnitude threshold of 0.05.
    L, H, G, dh = 2, 4, 2, 8
    base, layout = llama_gqa(L, H, G, dh, seed=30)
    g = _gen(31)

    def domain():
        return {k: v + 1e-4 * torch.randn(v.shape, generator=g) for k, v in base.items()}

    d1, d2 = domain(), domain()
    shared_q = 0.5 * torch.randn(dh, H * dh, generator=g)
    shared_o = 0.5 * torch.randn(H * dh, dh, generator=g)
    for d in (d1, d2):
        d["layers.0.self_attn.q_proj.weight"][0:dh] += shared_q
        d["layers.0.self_attn.o_proj.weight"][:, 0:dh] += shared_o
        d["layers.1.self_attn.q_proj.weight"][3 * dh:4 * dh] += 0.5 * torch.randn(dh, H * dh, generator=g)
        d["layers.1.self_attn.o_proj.weight"][:, 3 * dh:4 * dh] += 0.5 * torch.randn(H * dh, dh, generator=g)
    res = A.domain_agreement(DictCheckpoint(base, "base"), [DictCheckpoint(d1, "d1"), DictCheckpoint(d2, "d2")],
                             layout, k=4, magnitude_threshold=0.05)
    assert res.labels == ("d1", "d2")
    assert float(res.mean_a2[0, 0]) > 0.999
    assert float(res.mean_a3[0, 0]) > 0.999
    assert float(res.pairs[0].a2_projection["q"][0, 0]) > 0.999
    assert abs(float(res.mean_a2[1, 3])) < 0.2
    assert float(res.mean_a3[1, 3]) < 0.5
    cls = res.classification.classes
    assert cls[0][0] == "agnostic" and cls[1][3] == "specific"
    assert res.classification.counts() == {"agnostic": 1, "specific": 1, "inert": 6}
    # both domains change the same two heads by similar amounts → head scores rank alike
    assert float(res.spearman[0, 1]) > 0.3
    summary = res.summary()
    assert summary["classes"]["inert"] == 6 and summary["a3_k"] == 4
    assert summary["a3_random"] == pytest.approx(4 / (4 * dh))
    with pytest.raises(A.DiffractError):
        A.domain_agreement(DictCheckpoint(base), [DictCheckpoint(d1)], layout)

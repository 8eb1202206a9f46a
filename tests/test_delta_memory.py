"""Bounded memory of `delta` (issue 13 item 4): the slab-wise float64 Grams and the narrow-side A1 route give the
numbers of the old whole-matrix / full-SVD route, and a real `diffract-tui delta` process stays within
C × (largest tensor in float32 bytes) + a fixed amount of resident memory (VmHWM)."""

from __future__ import annotations

import pytest
import torch

import analysis.deltas.svd as svd
from analysis.deltas import delta as D
from analysis.deltas.agreement import a2_cosine, a3_subspace, pairwise_agreement
from memory_models import delta_peak_rss, write_delta_trio

TOL = 1e-12     # float64 rounding of (M × M) products of unit vectors: the routes agree far below this

# The bound of the measured test. C = 6 float32 copies of the largest matrix: W₀, W_d and ΔW (the delta row
# needs all three), the permuted null of ΔW and its int32 permutation index (SPEC §3; the index stays memoised
# by analysis.spectral.rmt) = 5, plus one for reading (bf16 → float32 upcast beside the pages of the map it
# came from). The fixed amount is the same CLI process on a tiny trio (interpreter, torch, the app's imports)
# plus 256 MiB: three float64 slabs of the long side (3 × 32 MiB, svd.SLAB_BYTES), the (M × M) Grams and
# eigensolver work, the small shapes' memoised permutations, the rows and allocator slack. The old route
# (whole float64 copies, a (long × M) U per side, every domain's ΔW held) measured 16× on this trio.
C = 6
FIXED_EXTRA = 256 << 20


def _pair(m: int, n: int, seed: int, batch: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(*batch, m, n, generator=g, dtype=torch.float64)
    return W0, W0 + 0.3 * torch.randn(*batch, m, n, generator=g, dtype=torch.float64)


@pytest.fixture
def tiny_slabs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Slabs of ~8 rows: every matrix below goes through the multi-slab path."""
    monkeypatch.setattr(svd, "SLAB_BYTES", 8 * 8 * 12)


@pytest.mark.parametrize("shape", [(60, 12), (12, 60), (3, 40, 9)])
def test_slab_grams_equal_the_whole_float64_gram(tiny_slabs: None, shape: tuple[int, ...]) -> None:
    W0, Wd = _pair(shape[-2], shape[-1], 1, tuple(shape[:-2]))
    wide = shape[-2] <= shape[-1]
    full = W0 @ Wd.transpose(-2, -1) if wide else W0.transpose(-2, -1) @ Wd
    assert len(list(svd._slab_bounds(W0))) > 2
    assert torch.allclose(svd.cross_gram(W0, Wd), full, rtol=TOL, atol=TOL * float(full.abs().max()))
    assert torch.allclose(svd.frob_inner(W0, Wd), (W0 * Wd).sum(dim=(-2, -1)), rtol=TOL)
    assert torch.allclose(svd.sq_frob(W0), W0.pow(2).sum(dim=(-2, -1)), rtol=TOL)
    ref = torch.linalg.svdvals(W0)
    assert torch.allclose(svd.singular_values(W0), ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("shape", [(70, 11), (11, 70), (4, 9, 33)])
@pytest.mark.parametrize("k", [None, 3])
def test_narrow_a1_equals_the_full_svd_route(tiny_slabs: None, shape: tuple[int, ...], k: int | None) -> None:
    # the new route (narrow vectors + cross-Gram for the long side) against the old one (top_svd's explicit
    # U and V of both matrices): equal to TOL on both sides, tall and wide, batched, top-k or all
    W0, Wd = _pair(shape[-2], shape[-1], 2, tuple(shape[:-2]))
    old = D.a1_agreement(D.top_svd(W0, k), D.top_svd(Wd, k))
    new = D.a1_agreement_narrow(D.narrow_svd(W0, k), D.narrow_svd(Wd, k), W0, Wd)
    for key in ("avg_max_l_agreement", "avg_max_r_agreement"):
        assert torch.allclose(new[key], old[key], rtol=0, atol=TOL), key
    # and top_svd itself, now slab by slab, still reconstructs the matrix against LAPACK's SVD
    s = D.top_svd(W0)
    assert torch.allclose(s.U @ torch.diag_embed(s.S) @ s.V.transpose(-2, -1), W0, atol=1e-10)


def test_delta_row_equals_the_old_full_svd_computation() -> None:
    # one whole delta row against the old formulas written out: A1 from full SVDs (torch.linalg.svd),
    # norms from whole float64 copies, ρ from svdvals
    W0, Wd = _pair(48, 20, 3)
    row = D.delta_metrics(W0.float(), Wd.float(), spectral=False)
    a, b = W0.float().double(), Wd.float().double()
    d = (Wd.float() - W0.float()).double()         # ΔW is taken in the compute dtype (SPEC §1)
    U0, S0, V0h = torch.linalg.svd(a, full_matrices=False)
    Ud, Sd, Vdh = torch.linalg.svd(b, full_matrices=False)
    assert row["avg_max_l_agreement"] == pytest.approx(float((U0.T @ Ud).abs().amax(-1).mean()), abs=1e-9)
    assert row["avg_max_r_agreement"] == pytest.approx(float((V0h @ Vdh.T).abs().amax(-1).mean()), abs=1e-9)
    assert row["delta_frob"] == pytest.approx(float(d.norm()), rel=1e-12)
    assert row["delta_cos"] == pytest.approx(float((a * b).sum() / (a.norm() * b.norm())), rel=1e-12)
    assert row["delta_rho"] == pytest.approx(float((Sd - S0).norm() / d.norm()), rel=1e-9)


def test_pairwise_agreement_equals_all_deltas_held(tiny_slabs: None) -> None:
    g = torch.Generator().manual_seed(4)
    deltas = [torch.randn(40, 9, generator=g) for _ in range(3)]
    made: list[int] = []
    pairs = [(0, 1), (0, 2), (1, 2)]
    a2, a3 = pairwise_agreement(lambda i: made.append(i) or deltas[i].clone(), pairs, 4)
    for i, j in pairs:
        assert a2[(i, j)] == pytest.approx(float(a2_cosine(deltas[i], deltas[j])), abs=TOL)
        assert a3[(i, j)] == pytest.approx(float(a3_subspace(deltas[i], deltas[j], 4)), abs=TOL)
    assert made == [0, 1, 2, 1, 2]   # two deltas at a time, re-made, never all three


@pytest.mark.slow
def test_delta_peak_rss_is_bounded_by_the_largest_tensor(tmp_path) -> None:
    # a tied 256000×128 bf16 embedding (125 MiB as float32) and two layers 128 wide with real, different deltas
    base, targets = write_delta_trio(tmp_path / "big", vocab=256000, hidden=128, layers=2, heads=4, head_dim=32,
                                     kv_heads=2, intermediate=256)
    tiny_base, tiny_targets = write_delta_trio(tmp_path / "tiny", vocab=64, hidden=128, layers=2, heads=4,
                                               head_dim=32, kv_heads=2, intermediate=256)
    rc0, fixed, err0 = delta_peak_rss(tiny_base, tiny_targets, tmp_path / "tiny.csv")
    assert rc0 == 0, err0
    rc, peak, err = delta_peak_rss(base, targets, tmp_path / "big.csv")
    assert rc == 0, err
    largest = 256000 * 128 * 4
    bound = fixed + C * largest + FIXED_EXTRA
    assert peak <= bound, (f"peak {peak / 2**20:.0f} MiB > {bound / 2**20:.0f} MiB "
                           f"(fixed {fixed / 2**20:.0f} MiB + {C} × {largest / 2**20:.0f} MiB + 256 MiB)")
    # and the table is whole: every matrix of both targets, agreement on the embedding
    import csv

    rows = list(csv.DictReader(open(tmp_path / "big.csv")))
    emb = [r for r in rows if r["tensor"] == "embed_tokens.weight"]
    assert len(emb) == 2 and all(r["unchanged"] == "False" and r["a2_agreement"] for r in emb)

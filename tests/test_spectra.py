"""The spectral engine: eigenvalue routes and their accuracy, analytic metrics, dtypes, batching, chart data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from analysis.spectral.backend import SpectralSettings
from analysis.errors import DiffractError
from analysis.spectral.spectra import (SpectrumResult, batched_spectral_metrics, eigenvalues, null_settings,
                              spectral_metrics, spectrum_result)

CPU = SpectralSettings(device="cpu")
SPEC_NAMES = (
    "frob_norm", "nuclear_norm", "l2_norm", "log_norm", "log_spectral_norm", "stable_rank", "effective_rank",
    "hard_rank", "pl_alpha", "pl_esd_xmin", "pl_ks", "pl_n_tail", "tpl_alpha", "tpl_lambda", "tpl_esd_xmin",
    "tpl_ks", "expon_lambda", "expon_esd_xmin", "expon_ks", "pl_tpl_llr", "pl_tpl_p", "shape", "fit_reliable",
    "fit_warning", "pl_alpha_reliable", "mp_esd_max", "mp_esd_min", "mp_bulk_std", "mp_num_spikes", "mp_ks",
    "mp_soft_rank", "tw_esd_bound", "tw_num_spikes", "pl_alpha_weighted", "w1_rand_distance", "lambda_max",
    "esd_n", "esd_n_clipped",
)


def _svd_esd(W: torch.Tensor) -> torch.Tensor:
    """Reference: float64 svdvals on the tall orientation, λ = σ²/N ascending."""
    X = W.double()
    X = X if X.shape[0] >= X.shape[1] else X.T
    return torch.sort(torch.linalg.svdvals(X) ** 2 / max(W.shape)).values


@pytest.fixture(scope="module")
def rxnfp(rxnfp_dirs) -> dict[str, torch.Tensor]:
    return torch.load(rxnfp_dirs["bert_ft"] / "pytorch_model.bin", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def accuracy_cases(rxnfp) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(256, 1024, generator=g)
    return {
        "rxnfp intermediate 512×256": rxnfp["encoder.layer.0.intermediate.dense.weight"],
        "rxnfp query 256×256": rxnfp["encoder.layer.0.attention.self.query.weight"],
        "student-t(3) 300×900": torch.from_numpy(np.random.default_rng(0).standard_t(3.0, size=(300, 900))).float(),
        # an exactly rank-8 delta (float64 product, stored float32) and a float32 delta of a rank-4 update
        "rank-8 delta 256×1024": (torch.randn(256, 8, generator=g, dtype=torch.float64)
                                  @ torch.randn(8, 1024, generator=g, dtype=torch.float64)).float(),
        "float32 delta 256×1024": (W0 + 1e-3 * torch.randn(256, 4, generator=g) @ torch.randn(4, 1024, generator=g)) - W0,
    }


def test_gram64_matches_svd_on_real_heavy_tailed_and_delta(accuracy_cases):
    """The default route (float64 Gram + eigvalsh) against float64 svdvals (tall): every eigenvalue within
    1e-13·λ_max (measured ≤ 3e-15), eigenvalues ≥ 1e-6·λ_max within 1e-10 relative (measured ≤ 1e-14), and the
    metrics that sum the whole spectrum equal: effective rank 1e-6 rel (the rank-8 delta's 248 zero σ come out
    ~1e-8·σ_max from a Gram, measured 6e-7), hard rank exact, α/xmin exact on non-deltas."""
    svd = SpectralSettings(device="cpu", eig_route="svd")
    for name, W in accuracy_cases.items():
        ref = _svd_esd(W)
        lam = eigenvalues(W, CPU)
        lam_max = ref[-1].item()
        assert (lam - ref).abs().max().item() <= 1e-13 * lam_max, name
        big = ref >= 1e-6 * lam_max
        assert ((lam[big] - ref[big]).abs() / ref[big]).max().item() <= 1e-10, name
        m, r = spectral_metrics(W, CPU, evals=lam), spectral_metrics(W, svd, evals=ref)
        assert m["effective_rank"] == pytest.approx(r["effective_rank"], rel=1e-6), name
        assert m["hard_rank"] == r["hard_rank"], name
        assert m["stable_rank"] == pytest.approx(r["stable_rank"], rel=1e-12), name
        if "delta" not in name:  # deltas' KS optimum lies in the ~1e-16 floor where routes differ in the last bits
            assert m["pl_n_tail"] == r["pl_n_tail"], name          # the same candidate …
            assert m["pl_esd_xmin"] == pytest.approx(r["pl_esd_xmin"], rel=1e-12), name   # … to the last bits
            assert m["pl_alpha"] == pytest.approx(r["pl_alpha"], rel=1e-9), name


def test_gram32_floor_is_garbage_which_is_why_it_is_not_the_default(accuracy_cases):
    """float32 Gram (the fast route): the tail is fine (top eigenvalue 1e-5 rel) but the floor is lost —
    on the rank-8 delta its zero eigenvalues come out ~1e-7·λ_max (measured 3.9e-7) and the effective rank
    is off by > 1 % (measured 2.6 %); gram64 is exact there (previous test)."""
    fast = SpectralSettings(device="cpu", eig_route="gram32")
    W = accuracy_cases["rank-8 delta 256×1024"]
    ref = _svd_esd(W)
    lam = eigenvalues(W, fast)
    assert lam[-1].item() == pytest.approx(ref[-1].item(), rel=1e-5)
    assert (lam - ref).abs().max().item() > 1e-9 * ref[-1].item()
    m, r = spectral_metrics(W, fast, evals=lam), spectral_metrics(W, CPU)
    assert abs(m["effective_rank"] / r["effective_rank"] - 1) > 0.01


def test_clipped_floor_is_flagged(accuracy_cases):
    """A rank-8 delta's Gram has ~248 round-off eigenvalues of either sign: the negative ones are clipped
    to 0 and counted (esd_n_clipped > 0), hard rank (rtol 1e-5) is exactly 8, nothing is negative."""
    W = accuracy_cases["rank-8 delta 256×1024"]
    lam = eigenvalues(W, CPU)
    assert lam.min().item() >= 0.0
    m = spectral_metrics(W, CPU)
    assert m["esd_n_clipped"] > 0
    assert m["hard_rank"] == 8


def test_analytic_norms_and_ranks():
    """diag(3, 4): ‖W‖_F = 5, nuclear 7, σ_max 4, stable rank 25/16, log_norm = log10 25,
    λ_max = 16/N = 8 → log_spectral_norm = log10 8, effective rank exp(H(3/7, 4/7)).
    Identity 64: effective rank 64, stable rank 64. Product of 300×5 and 5×200: hard rank 5."""
    m = spectral_metrics(torch.diag(torch.tensor([3.0, 4.0], dtype=torch.float64)), CPU)
    assert m["frob_norm"] == pytest.approx(5.0) and m["nuclear_norm"] == pytest.approx(7.0)
    assert m["l2_norm"] == pytest.approx(4.0) and m["stable_rank"] == pytest.approx(25 / 16)
    assert m["log_norm"] == pytest.approx(math.log10(25)) and m["log_spectral_norm"] == pytest.approx(math.log10(8))
    p = np.array([3 / 7, 4 / 7])
    assert m["effective_rank"] == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    eye = spectral_metrics(torch.eye(64), CPU)
    assert eye["effective_rank"] == pytest.approx(64.0) and eye["stable_rank"] == pytest.approx(64.0)
    assert eye["hard_rank"] == 64
    g = torch.Generator().manual_seed(1)
    low = torch.randn(300, 5, generator=g) @ torch.randn(5, 200, generator=g)
    assert spectral_metrics(low, CPU)["hard_rank"] == 5


def test_every_spec_name_and_reliability_flags():
    """All SPEC §3 names are present; a 64 × 256 matrix (64 eigenvalues) is flagged unreliable with the ESD
    reason; a 400 × 1200 heavy-tailed one with a long tail is reliable with an empty warning."""
    g = np.random.default_rng(2)
    small = spectral_metrics(torch.from_numpy(g.standard_t(2.5, size=(64, 256))), CPU)
    assert set(SPEC_NAMES) <= set(small)
    assert small["fit_reliable"] is False and small["pl_alpha_reliable"] is False
    assert "ESD has 64 eigenvalues (< 100)" in small["fit_warning"]
    U, _ = np.linalg.qr(g.standard_normal((400, 400)))
    V, _ = np.linalg.qr(g.standard_normal((1200, 400)))
    big = spectral_metrics(torch.from_numpy(U @ np.diag(g.pareto(1.0, 400) + 1) @ V.T), CPU)
    assert big["pl_n_tail"] >= 50 and big["fit_reliable"] is True and big["fit_warning"] == ""
    assert big["pl_alpha_weighted"] == pytest.approx(big["pl_alpha"] * math.log10(big["lambda_max"]))
    assert big["shape"] in ("power_law", "truncated_power_law")


def test_float32_and_float64_agree():
    """A float64 heavy-tailed 300 × 900 matrix analysed in float32 (W rounded, rel 6e-8) vs float64: norms
    and ranks within 1e-6 rel, α within 1e-5 rel and the same xmin, MP/TW edges within 1e-6 rel."""
    W = torch.from_numpy(np.random.default_rng(3).standard_t(2.5, size=(300, 900)))
    a = spectral_metrics(W, SpectralSettings(device="cpu", dtype="float32"))
    b = spectral_metrics(W, SpectralSettings(device="cpu", dtype="float64"))
    for k in ("frob_norm", "nuclear_norm", "l2_norm", "stable_rank", "effective_rank", "mp_esd_max",
              "tw_esd_bound", "mp_bulk_std"):
        assert a[k] == pytest.approx(b[k], rel=1e-6), k
    assert a["hard_rank"] == b["hard_rank"] and a["pl_n_tail"] == b["pl_n_tail"]
    assert a["pl_esd_xmin"] == pytest.approx(b["pl_esd_xmin"], rel=1e-6)
    assert a["pl_alpha"] == pytest.approx(b["pl_alpha"], rel=1e-5)


def test_batched_equals_one_by_one_on_rxnfp_heads(rxnfp):
    """48 head slices (q/k/v rows of 4 heads × 4 layers, 64 × 256 each) in ONE batched call equal 48 single
    calls: numbers within 1e-9 relative (batched vs single matmul round differently in the last bits),
    integers and labels exactly. The numerically optimised TPL: the log-likelihood ratio within 1e-6, its
    parameters within 1e-3 rel / 1e-4 abs — on these 64-value tails the likelihood is nearly flat along
    an α–Λ ridge, so Nelder–Mead from inputs that differ in the last bits stops at slightly different
    points of equal likelihood (seen: α_TPL 0.0160514 vs 0.0160516)."""
    heads = torch.stack([rxnfp[f"encoder.layer.{l}.attention.self.{p}.weight"][h * 64:(h + 1) * 64]
                         for l in range(4) for p in ("query", "key", "value") for h in range(4)])
    rows = batched_spectral_metrics(heads, CPU)
    assert len(rows) == 48
    for i in range(48):
        one = spectral_metrics(heads[i], CPU)
        for k, v in one.items():
            if isinstance(v, float) and math.isfinite(v):
                if k in ("tpl_alpha", "tpl_lambda", "tpl_ks"):
                    assert rows[i][k] == pytest.approx(v, rel=1e-3, abs=1e-4), (i, k)
                elif k.startswith("pl_tpl_"):
                    assert rows[i][k] == pytest.approx(v, rel=1e-6, abs=1e-6), (i, k)
                else:
                    assert rows[i][k] == pytest.approx(v, rel=1e-9, abs=1e-12), (i, k)
            else:
                assert rows[i][k] == v or (isinstance(v, float) and math.isnan(v) and math.isnan(rows[i][k])), (i, k)


def test_eigenvalues_shapes_orientation_and_precomputed():
    """(2, 3, m, n) → (2, 3, M) ascending; W and Wᵀ give the same ESD (λ = σ²/N); metrics from given evals
    equal computed ones; the scan's call pattern batched_spectral_metrics(Ws, settings, evals=...) works."""
    g = torch.Generator().manual_seed(4)
    Ws = torch.randn(2, 3, 20, 50, generator=g)
    lam = eigenvalues(Ws, CPU)
    assert lam.shape == (2, 3, 20) and bool((lam.diff(dim=-1) >= 0).all())
    assert torch.allclose(eigenvalues(Ws.transpose(-1, -2), CPU), lam, rtol=1e-12, atol=0)
    assert torch.allclose(lam[1, 2], _svd_esd(Ws[1, 2]), rtol=1e-10)
    flat = Ws.reshape(6, 20, 50)
    assert batched_spectral_metrics(flat, CPU, evals=lam.reshape(6, 20))[4]["pl_alpha"] == \
        spectral_metrics(flat[4], CPU)["pl_alpha"]


def test_spectrum_result_has_chart_data():
    """The chart's arrays: ESD and null ESD (M values each), PL and TPL lines from xmin to λ_max with the PL
    density at xmin = (n_tail/M)(α−1)/xmin, an MP density curve inside its edges."""
    W = torch.from_numpy(np.random.default_rng(5).standard_t(2.5, size=(200, 600)))
    r = spectrum_result(W, CPU)
    assert isinstance(r, SpectrumResult) and r.evals.shape == r.null_evals.shape == (200,)
    m = r.metrics
    assert r.lines["pl_x"][0] == pytest.approx(m["pl_esd_xmin"]) and r.lines["pl_x"][-1] == pytest.approx(m["lambda_max"])
    assert r.lines["pl_pdf"][0] == pytest.approx(m["pl_n_tail"] / 200 * (m["pl_alpha"] - 1) / m["pl_esd_xmin"])
    assert np.all(np.isfinite(r.lines["tpl_pdf"])) and np.all(r.lines["mp_pdf"] >= 0)
    assert r.lines["mp_x"].min() >= m["mp_esd_min"]


def test_bad_input_is_one_line_error():
    """Vectors, integer, empty and NaN-holding tensors are refused with a one-line DiffractError."""
    for bad in (torch.ones(5), torch.ones(3, 4, dtype=torch.int64), torch.ones(0, 4),
                torch.tensor([[1.0, float("nan")], [0.0, 1.0]])):
        with pytest.raises(DiffractError) as e:
            spectral_metrics(bad, CPU)
        assert "\n" not in str(e.value)
    with pytest.raises(DiffractError):
        spectral_metrics(torch.ones(2, 3, 4), CPU)


def test_null_route(monkeypatch):
    """The permuted null's ESD uses float32 Gram for float32 work (null_settings): MP bulk variance, edges and
    W₁ distance agree with an all-float64 null within 1e-5 relative (measured ≲1e-7) on a square 256² matrix
    (Q = 1, λ₋ = 0: the worst case for a float32 floor) and a 128 × 512 one."""
    from analysis.spectral import spectra

    assert null_settings(CPU).eig_route == "gram32"
    assert null_settings(SpectralSettings(device="cpu", dtype="float64")).eig_route == "gram64"
    g = np.random.default_rng(6)
    for shape in ((256, 256), (128, 512)):
        W = torch.from_numpy(g.standard_t(3.0, size=shape)).float()
        fast = spectral_metrics(W, CPU)
        monkeypatch.setattr(spectra, "null_settings", lambda s: s)
        exact = spectral_metrics(W, CPU)
        monkeypatch.undo()
        for k in ("mp_bulk_var", "mp_esd_max", "mp_esd_min", "tw_esd_bound", "w1_rand_distance"):
            assert fast[k] == pytest.approx(exact[k], rel=1e-5), (shape, k)


def test_large_cpu_stacks_are_looped_with_the_same_numbers():
    """From min(m, n) = CPU_LOOP_FROM (512) up, CPU chunks are eigen-solved one 2-D matrix at a time (faster
    than a batched call there): a (3, 512, 530) stack gives exactly the eigenvalues of the three matrices taken
    alone (bit for bit: the same calls), and its metrics equal the one-by-one metrics."""
    from analysis.spectral.spectra import CPU_LOOP_FROM

    g = torch.Generator().manual_seed(9)
    Ws = torch.randn(3, CPU_LOOP_FROM, CPU_LOOP_FROM + 18, generator=g)
    settings = SpectralSettings(device="cpu")
    stacked = eigenvalues(Ws, settings)
    for b in range(3):
        assert torch.equal(stacked[b], eigenvalues(Ws[b], settings))
    rows = batched_spectral_metrics(Ws, settings)
    alone = spectral_metrics(Ws[1], settings)
    for k in ("pl_alpha", "pl_esd_xmin", "mp_esd_max", "w1_rand_distance", "effective_rank", "tpl_alpha"):
        assert rows[1][k] == alone[k], k

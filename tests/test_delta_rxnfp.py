"""`diffract-tui delta` on real weights: the rxnfp BERT trio (bert_pretrained as base, bert_ft and
bert_ft_10k_25s as two domains). Asserts only robust facts plus independent recomputations from the raw
pickles (torch.load), never measured values that could drift."""

from __future__ import annotations

import math

import pytest
import torch

from analysis.run.tables import read_table
from diffract_tui.cli import main


@pytest.fixture(scope="module")
def trio(rxnfp_dirs):
    """The real rxnfp trio (conftest `rxnfp_dirs`: the test FAILS, never skips, when rxnfp is missing)."""
    return rxnfp_dirs


@pytest.fixture(scope="module")
def delta_run(trio, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("rxnfp") / "delta.parquet"
    code = main(["delta", str(trio["bert_pretrained"]), str(trio["bert_ft"]), str(trio["bert_ft_10k_25s"]),
                 "--out", str(out), "--no-cache", "--threads", "1"])
    assert code == 0
    return read_table(out)


def _raw(folder, key_suffix):
    sd = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    for k, v in sd.items():
        if k.endswith(key_suffix):
            return v.to(torch.float64)
    raise KeyError(key_suffix)


def test_row_counts_and_ranges(delta_run):
    rows, meta = delta_run
    # 12 layers × 4 heads for each projection and each CPT checkpoint (BERT: H = H_kv = 4, d_h = 64)
    for ck in ("bert_ft", "bert_ft_10k_25s"):
        for proj in "qkvo":
            heads = [r for r in rows if r["checkpoint"] == ck and r["module"] == proj and r["head"] is not None]
            assert len(heads) == 12 * 4, (ck, proj)
            assert {(r["layer"], r["head"]) for r in heads} == {(l, h) for l in range(12) for h in range(4)}
    for r in rows:
        assert 0.0 <= r["delta_rho"] <= 1.0
        assert -1.0 <= r["a2_agreement"] <= 1.0
        if r["head"] is not None:
            assert r["head_class"] in ("agnostic", "specific", "inert")
    summary = meta["summary"]
    for c in summary["checkpoints"]:
        assert 0.0 < c["top10_share"] <= 1.0
        assert 0.0 <= c["gini"] < 1.0
        assert c["top10_share"] >= 0.1   # the top 10 % of heads hold at least 10 % of the energy, by sorting
    ag = summary["agreement"]
    assert sum(ag["classes"].values()) == 48
    assert -1.0 <= ag["spearman"] <= 1.0 and -1.0 <= ag["mean_a2"] <= 1.0 and 0.0 <= ag["mean_a3"] <= 1.0
    assert meta["architecture"]["model_type"] == "bert" and meta["architecture"]["heads"] == 4


def test_spectral_columns_describe_the_delta(delta_run):
    # SPEC §3 metrics are of ΔW itself: its Frobenius norm is delta_frob, its ranks are bounded by its shape and
    # the continuous power-law MLE α̂ = 1 + n/Σ ln(λ/xmin) exceeds 1 whenever it is defined.
    rows, _ = delta_run
    changed = [r for r in rows if r["delta_frob"] > 0]
    assert len(changed) > 0.9 * len(rows)
    for r in changed:
        assert r["frob_norm"] == pytest.approx(r["delta_frob"], rel=1e-6)
        assert 1 <= r["hard_rank"] <= min(r["rows"], r["cols"])
        # stable rank Σσ²/σ₁² ≥ 1, and ≤ hard rank plus the (< rtol = 1e-5 each) share of the dropped λ
        assert 1.0 - 1e-9 <= r["stable_rank"] <= r["hard_rank"] + 1e-5 * min(r["rows"], r["cols"])
        if r["pl_alpha"] is not None and math.isfinite(r["pl_alpha"]):
            assert r["pl_alpha"] > 1.0
    q = [r for r in changed if r["module"] == "q" and r["head"] is None]
    assert len(q) == 2 * 12 and all(math.isfinite(r["pl_alpha"]) for r in q)


def test_numbers_match_the_raw_pickles(delta_run, trio):
    # Independent oracle: ‖ΔW‖_F of layer 3's value matrix and r for layer 3 head 2, recomputed from the
    # pickles with torch.load and the SPEC §2 BERT slices (rows h·64… of query/key/value, columns of output.dense).
    rows, _ = delta_run
    pre, ft = trio["bert_pretrained"], trio["bert_ft"]
    stem = "encoder.layer.3.attention."
    V0, V1 = _raw(pre, stem + "self.value.weight"), _raw(ft, stem + "self.value.weight")
    row = next(r for r in rows if r["checkpoint"] == "bert_ft" and r["layer"] == 3 and r["module"] == "v"
               and r["head"] is None)
    assert row["delta_frob"] == pytest.approx(float((V1 - V0).norm()), rel=1e-5)
    assert row["delta_rel"] == pytest.approx(float((V1 - V0).norm() / V0.norm()), rel=1e-5)
    h, dh = 2, 64
    num = den = 0.0
    for name, cols in (("self.query.weight", False), ("self.key.weight", False), ("self.value.weight", False),
                       ("output.dense.weight", True)):
        W0, W1 = _raw(pre, stem + name), _raw(ft, stem + name)
        s0 = W0[:, h * dh:(h + 1) * dh] if cols else W0[h * dh:(h + 1) * dh]
        s1 = W1[:, h * dh:(h + 1) * dh] if cols else W1[h * dh:(h + 1) * dh]
        num += float((s1 - s0).pow(2).sum())
        den += float(s0.pow(2).sum())
    q_row = next(r for r in rows if r["checkpoint"] == "bert_ft" and r["layer"] == 3 and r["module"] == "q"
                 and r["head"] == h)
    assert q_row["head_score"] == pytest.approx(math.sqrt(num / den), rel=1e-5)

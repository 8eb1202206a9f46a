"""Recover the structure `analysis.generate.write_family` plants (manifest.json) with the delta engine:
head scores, cross-domain classes, exact low-rank truncation, unchanged tensors — and the same through
`diffract-tui delta`."""

from __future__ import annotations

import pytest
import torch

from analysis.deltas.agreement import domain_agreement, spearman
from analysis.model.architecture import layout_of
from analysis.io.checkpoint import open_checkpoint
from analysis.deltas.delta import head_concentration, head_scores
from analysis.generate import write_family
from analysis.model.heads import module_matrix
from analysis.run.tables import read_table
from analysis.deltas.truncation import delta_truncation_curve, energy_ranks, singular_values
from diffract_tui.cli import main


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    torch.set_num_threads(1)
    manifest = write_family(tmp_path_factory.mktemp("family"), seed=3)   # llama: 4 layers, 8 heads, 4 kv heads
    base = open_checkpoint(manifest.base)
    doms = [open_checkpoint(p) for p in manifest.domains.values()]
    yield manifest, base, doms, layout_of(base)
    for c in (base, *doms):
        c.close()


def test_head_scores_equal_the_planted_scores(fam):
    # write_family plants ‖ΔW_h‖/‖W₀_h‖ per projection and computes r_{ℓ,h} in float64; ours come from the
    # float32 files, so they agree to float32 precision and rank the heads identically.
    manifest, base, doms, layout = fam
    expected = torch.tensor(manifest.grid("expected_score"), dtype=torch.float64)
    for dom in doms:
        hs = head_scores(base, dom, layout)
        assert torch.allclose(hs.scores, expected, rtol=1e-4, atol=1e-7)
        assert spearman(hs.scores, expected) == pytest.approx(1.0)
        # the planted low-importance set is exactly the ⌊f·L·H⌋ lowest scores
        n_low = int(manifest.greedy_fraction * layout.num_layers * layout.num_heads)
        lowest = {(l, h) for l, h, _ in hs.ranking(descending=False)[:n_low]}
        assert lowest == set(manifest.low_importance)
        c = head_concentration(hs)
        assert 0.1 <= c.top10_share <= 1.0 and 0.0 <= c.gini < 1.0


def test_classification_recovers_the_planted_classes(fam):
    # Default (median) thresholds: half the heads are "large" → active; among them half are shared (A2 = 1)
    # and half specific (A2 ≈ 0), so the medians separate them exactly as the manifest expects.
    manifest, base, doms, layout = fam
    res = domain_agreement(base, doms, layout)
    assert res.classification.classes == manifest.grid("expected_class")
    for p in manifest.heads:
        a2 = float(res.mean_a2[p.layer, p.head])
        if p.direction == "shared":
            assert a2 > 0.999 and float(res.mean_a3[p.layer, p.head]) > 0.999
        elif p.cls == "large":
            assert abs(a2) < 0.2


def test_truncation_reaches_full_energy_exactly_at_the_planted_rank(fam):
    manifest, base, doms, layout = fam
    mods = {(l.index, m.name): m for l in layout.layers for m in l.modules}
    mods.update({(None, g.name): g for g in layout.globals})
    assert manifest.low_rank, "the family plants low-rank deltas"
    for plant in manifest.low_rank:
        mod = mods[(plant.layer, plant.module)]
        for dom in doms:
            dW = module_matrix(dom, mod) - module_matrix(base, mod)
            M = min(dW.shape)
            r = plant.rank
            curve = delta_truncation_curve(dW, [(M - r) / M, (M - r + 1) / M])
            assert float(curve.kept_energy[0]) >= 0.999, (plant.tensor, float(curve.kept_energy[0]))
            assert float(curve.kept_energy[1]) < 0.999, plant.tensor
            assert energy_ranks(singular_values(dW), [0.999])[0.999] == r


def test_delta_cli_on_the_family(fam, tmp_path):
    manifest, base, doms, layout = fam
    out = tmp_path / "fam.parquet"
    code = main(["delta", str(manifest.base), *[str(p) for p in manifest.domains.values()], "--out", str(out),
                 "--no-spectral", "--no-cache", "--threads", "1"])
    assert code == 0
    rows, meta = read_table(out)
    expected_cls = manifest.grid("expected_class")
    q_rows = [r for r in rows if r["module"] == "q" and r["head"] is not None]
    assert len(q_rows) == len(doms) * layout.num_layers * layout.num_heads
    for r in q_rows:
        assert r["head_class"] == expected_cls[r["layer"]][r["head"]]
        assert r["head_score"] == pytest.approx(manifest.head(r["layer"], r["head"]).expected_score, rel=1e-4)
    ranks = {(p.layer, p.module): p.rank for p in manifest.low_rank}
    for r in rows:
        if r["head"] is None and r["kv_head"] is None and (r["layer"], r["module"]) in ranks:
            assert r["delta_rank_99"] <= ranks[(r["layer"], r["module"])]
        if r["tensor"] in manifest.unchanged:
            assert r["delta_frob"] == 0.0
    counts = meta["summary"]["agreement"]["classes"]
    flat = [c for row in expected_cls for c in row]
    assert counts == {c: flat.count(c) for c in ("agnostic", "specific", "inert")}


def test_three_domains_mean_pairwise_agreement(tmp_path):
    # With three domains every shared head has A2 = 1 in all three pairs and every large specific head ≈ 0;
    # the classes stay those planted and the Spearman matrix is 3 × 3, symmetric, 1 on the diagonal.
    manifest = write_family(tmp_path, seed=4, domains=("math", "code", "law"), num_layers=2)
    base = open_checkpoint(manifest.base)
    doms = [open_checkpoint(p) for p in manifest.domains.values()]
    res = domain_agreement(base, doms, layout_of(base))
    assert len(res.pairs) == 3 and res.spearman.shape == (3, 3)
    assert torch.equal(res.spearman, res.spearman.T) and torch.all(torch.diagonal(res.spearman) == 1)
    assert res.classification.classes == manifest.grid("expected_class")
    for p in manifest.heads:
        if p.direction == "shared":
            assert all(float(pr.a2[p.layer, p.head]) > 0.999 for pr in res.pairs)
    # the same planted magnitudes in every domain → identical head-score ranks up to float32 noise
    assert float(res.spearman[0, 1]) > 0.99
    for c in (base, *doms):
        c.close()


def test_truncation_aggregates_by_kind_and_layer(fam):
    # The MLP deltas are exactly rank 4 (gate), 8 (up), 16 (down) in 256-wide matrices: keeping 16 values
    # keeps ≥ 99.9 % of every MLP matrix and so of their energy-weighted aggregate; keeping 3 loses part of
    # gate's rank-4 delta. Aggregates weigh matrices by ‖ΔW‖² (checked against a hand-weighted sum).
    from analysis.deltas.truncation import delta_truncation

    manifest, base, doms, layout = fam
    M = 256
    tr = delta_truncation(base, doms[0], layout, ts=[0.0, (M - 16) / M, (M - 3) / M])
    mlp = tr.kinds["mlp"]
    assert float(mlp.kept_energy[0]) == pytest.approx(1.0)
    assert float(mlp.kept_energy[1]) >= 0.999
    assert float(mlp.kept_energy[2]) < 0.999
    layer0 = [c for (l, _), c in tr.matrices.items() if l == 0]
    w = torch.tensor([c.energy for c in layer0], dtype=torch.float64)
    manual = (torch.stack([c.kept_energy for c in layer0]) * w[:, None]).sum(0) / w.sum()
    assert torch.allclose(tr.layers[0].kept_energy, manual)
    assert tr.ranks[(0, "down")][0.99] <= 16 and tr.ranks[(0, "gate")][0.99] <= 4
    assert set(tr.kinds) >= {"attention", "mlp", "embedding"}


def test_delta_cli_spectral_columns_recover_the_planted_ranks(fam, tmp_path):
    # With the SPEC §3 metrics of ΔW on, hard_rank (λ > 1e-5·λ_max) of each planted low-rank MLP/embedding
    # delta equals its planted rank: the float32 storage noise sits ~1e-14 below λ_max, far under rtol.
    manifest, base, doms, layout = fam
    out = tmp_path / "spec.json"
    first = next(iter(manifest.domains.values()))
    code = main(["delta", str(manifest.base), str(first), "--out", str(out), "--no-heads", "--no-cache",
                 "--threads", "1"])
    assert code == 0
    rows, meta = read_table(out)
    ranks = {(p.layer, p.module): p.rank for p in manifest.low_rank}
    seen = 0
    for r in rows:
        if (r["layer"], r["module"]) in ranks:
            assert r["hard_rank"] == ranks[(r["layer"], r["module"])], (r["tensor"], r["hard_rank"])
            assert r["frob_norm"] == pytest.approx(r["delta_frob"], rel=1e-9)
            assert r["stable_rank"] <= ranks[(r["layer"], r["module"])] + 1e-9
            seen += 1
    assert seen == len(manifest.low_rank)
    assert meta["settings"]["spectral"]["xmin_rule"] == "ks"

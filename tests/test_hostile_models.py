"""Hostile model pairs (issue 9 items 7, 13, 14b): checkpoints of different models are refused with one line
naming what differs by every multi-checkpoint command, before any output; tensors present in only some
checkpoints stay legal and are marked; tensors a CPT left bit-identical are marked `unchanged` with empty
ΔW columns; the PL/TPL log-likelihood ratio has one name."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import write_safetensors

from analysis.generate import write_checkpoint
from diffract_tui.cli import main

SMALL = dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96, vocab_size=50)


def _digests(*folders: Path) -> dict[str, str]:
    """sha256 of every file under the given folders (or of the files themselves)."""
    out = {}
    for f in folders:
        files = [f] if f.is_file() else sorted(p for p in f.rglob("*") if p.is_file())
        for p in files:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Generated HF folders: a llama base, a same-model CPT, and models differing in type, layers and heads."""
    root = tmp_path_factory.mktemp("models")
    return {
        "llama": write_checkpoint(root / "llama", "llama", seed=0, **SMALL),
        "llama_cpt": write_checkpoint(root / "llama_cpt", "llama", seed=1, **SMALL),
        "gpt2": write_checkpoint(root / "gpt2", "gpt2", seed=2, **SMALL),
        "llama_3layers": write_checkpoint(root / "llama_3layers", "llama", seed=3, **{**SMALL, "num_layers": 3}),
        "llama_8heads": write_checkpoint(root / "llama_8heads", "llama", seed=4, **{**SMALL, "num_heads": 8}),
    }


# (other model, the fragment naming what differs with both values)
DIFFERENCES = [
    ("gpt2", "different models: model_type 'llama' in {a} vs 'gpt2' in {b}"),
    ("llama_3layers", "different models: layers 2 in {a} vs 3 in {b}"),
    ("llama_8heads", "different models: attention heads 4 in {a} vs 8 in {b}"),
]


def _commands(a: Path, b: Path, out: Path) -> dict[str, list[str]]:
    """Every multi-checkpoint command on the pair (a = base), writing under `out`."""
    return {
        "info": ["info", str(a), str(b)],
        "info --json": ["info", str(a), str(b), "--json"],
        "scan --delta": ["scan", str(a), str(b), "--delta", "--out", str(out / "scan.csv")],
        "delta": ["delta", str(a), str(b), "--out", str(out / "delta.csv")],
        "rewind plan": ["rewind", "plan", str(a), str(b), "--fraction", "0.25", "--out", str(out / "rewind.json")],
        "interpolate": ["interpolate", str(a), str(b), "--alpha", "0.5", "--out", str(out / "mix")],
        "interpolate base-cpt": ["interpolate", str(b), "--base", str(a), "--out", str(out / "mix2")],
        "explorer open": ["open", str(a), str(b)],
        "explorer": [str(a), str(b)],
    }


@pytest.mark.parametrize("other,fragment", DIFFERENCES, ids=[d[0] for d in DIFFERENCES])
def test_every_multi_checkpoint_command_refuses_different_models(models, other, fragment, tmp_path, capsys,
                                                                 monkeypatch):
    import diffract_tui.cli.launch as launch

    monkeypatch.setattr(launch, "run_explorer", lambda session: pytest.fail("the explorer opened"))
    a, b = models["llama"], models[other]
    before = _digests(a, b)
    expected = fragment.format(a=a, b=b)
    for name, args in _commands(a, b, tmp_path).items():
        code = main(args)
        captured = capsys.readouterr()
        assert code == 1, name
        assert captured.out == "", name
        assert captured.err.startswith("diffract-tui: error: ") and captured.err.count("\n") == 1, name
        assert expected in captured.err, (name, captured.err)
        assert "compare a base with checkpoints continually pre-trained from it" in captured.err, name
        assert list(tmp_path.iterdir()) == [], name   # nothing written
    assert _digests(a, b) == before


def test_rewind_apply_of_a_list_naming_another_model(models, tmp_path, capsys):
    a, cpt, other = models["llama"], models["llama_cpt"], models["llama_3layers"]
    listing = tmp_path / "rewind.json"
    assert main(["rewind", "plan", str(a), str(cpt), "--fraction", "0.25", "--out", str(listing)]) == 0
    capsys.readouterr()
    data = json.loads(listing.read_text())
    data["target"]["path"] = str(other.resolve())
    listing.write_text(json.dumps(data))
    before = _digests(a, other, listing)
    assert main(["rewind", "apply", str(listing), "--out", str(tmp_path / "out"), "--force"]) == 1
    err = capsys.readouterr().err
    assert f"different models: layers 2 in {a.resolve()} vs 3 in {other.resolve()}" in err
    assert err.count("\n") == 1
    assert not (tmp_path / "out").exists()
    assert _digests(a, other, listing) == before


def test_no_shared_matrix_is_refused(tmp_path, capsys):
    one = write_safetensors(tmp_path / "one.safetensors", {"a.weight": torch.ones(4, 4), "n": torch.ones(4)})
    two = write_safetensors(tmp_path / "two.safetensors", {"b.weight": torch.ones(4, 4), "n": torch.ones(4)})
    assert main(["info", str(one), str(two)]) == 1
    err = capsys.readouterr().err
    assert f"different models: {one} and {two} share no 2-D tensor (1 tensor name(s) in common)" in err
    assert main(["delta", str(one), str(two), "--out", str(tmp_path / "d.csv")]) == 1
    assert "share no 2-D tensor" in capsys.readouterr().err
    assert not (tmp_path / "d.csv").exists()


def test_scan_without_delta_still_lists_different_models_side_by_side(models, tmp_path, capsys):
    out = tmp_path / "scan.csv"
    assert main(["scan", str(models["llama"]), str(models["gpt2"]), "--out", str(out), "-q", "--no-cache"]) == 0
    assert out.exists()


def test_same_model_pair_is_accepted(models, capsys):
    assert main(["info", str(models["llama"]), str(models["llama_cpt"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["alignment"]["shared"] > 0


def test_rxnfp_trio_is_one_model_with_tensors_only_in_the_base(rxnfp_dirs):
    from analysis.io.alignment import require_same_model
    from analysis.io.checkpoint import open_checkpoint

    ckpts = [open_checkpoint(rxnfp_dirs[n]) for n in ("bert_pretrained", "bert_ft", "bert_ft_10k_25s")]
    report = require_same_model(ckpts)
    assert report.present_in["cls.predictions.decoder.weight"] == ("bert_pretrained",)
    assert report.present_in["classifier.weight"] == ("bert_ft_10k_25s",)
    assert "encoder.layer.0.attention.self.query.weight" in report.shared


# --------------------------------------------------------------------------------------------------
# item 13: tensors a CPT left bit-identical
# --------------------------------------------------------------------------------------------------

# layer-0 kv group 0 (query heads 0 and 1 with 2 kv heads of 4 query heads) is left exactly as in the base
KEPT_HEADS = ((0, 0), (0, 1))
HEAD_DIM = SMALL["hidden_size"] // SMALL["num_heads"]


def _attention_only_cpt(base_sd: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """A train-like CPT that trained only attention: MLP, norms and embeddings are exact copies of the base;
    every q/k/v/o matrix moves, except the slices of KEPT_HEADS (q rows, o columns, their kv group's k/v rows)."""
    g = torch.Generator().manual_seed(seed)
    out = {k: v.clone() for k, v in base_sd.items()}
    for key, w in out.items():
        if ".self_attn." in key and key.endswith("_proj.weight"):
            w.add_(torch.randn(w.shape, generator=g) * 0.01)
            if key.startswith("model.layers.0."):
                kept = slice(0, len(KEPT_HEADS) * HEAD_DIM)
                if "o_proj" in key:
                    w[:, kept] = base_sd[key][:, kept]
                elif "q_proj" in key:
                    w[kept] = base_sd[key][kept]
                else:  # k/v: kv group 0 = rows [0, d_h)
                    w[:HEAD_DIM] = base_sd[key][:HEAD_DIM]
    return out


@pytest.fixture(scope="module")
def attention_family(tmp_path_factory) -> tuple[Path, Path, Path]:
    """base + two attention-only CPTs (generated llama, 2 layers, 4 heads, 2 kv heads)."""
    from analysis.generate import random_state_dict
    from analysis.model.families import family_config

    root = tmp_path_factory.mktemp("attention_only")
    base_sd = random_state_dict("llama", family_config("llama", **SMALL), seed=5)
    base = write_checkpoint(root / "base", "llama", state_dict=base_sd, **SMALL)
    cpts = [write_checkpoint(root / name, "llama", state_dict=_attention_only_cpt(base_sd, seed), **SMALL)
            for name, seed in (("math", 6), ("code", 7))]
    return base, cpts[0], cpts[1]


EMPTY_FOR_UNCHANGED = ("delta_cos", "delta_rho", "delta_rank_90", "delta_rank_95", "delta_rank_99",
                       "avg_max_l_agreement", "avg_max_r_agreement", "truncatable_fraction", "a2_agreement",
                       "a3_agreement", "pl_alpha", "stable_rank", "effective_rank", "tpl_alpha")


def test_delta_marks_unchanged_matrices_and_heads(attention_family, tmp_path, capsys):
    base, math_, code = attention_family
    out = tmp_path / "delta.csv"
    before = _digests(base, math_, code)
    assert main(["delta", str(base), str(math_), str(code), "--out", str(out), "--no-cache",
                 "--summary-json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    from analysis.run.tables import read_table

    rows, _ = read_table(out)
    text = out.read_text().splitlines()
    header = text[0].split(",")
    matrices = [r for r in rows if r["head"] is None and r["kv_head"] is None]
    assert len(matrices) == 2 * 16          # 2 targets × (2 layers × 7 + embed + lm_head)
    for r in matrices:
        attention = r["module"] in ("q", "k", "v", "o")
        assert r["unchanged"] is (not attention), r
        if attention:
            assert r["delta_frob"] > 0 and 0 < r["truncatable_fraction"] < 1 and r["delta_cos"] < 1
            continue
        assert r["delta_frob"] == 0.0 and r["delta_rel"] == 0.0
        for col in EMPTY_FOR_UNCHANGED:
            assert r.get(col) is None, (r["tensor"], col)
    # the CSV cells of an unchanged row: 0.0 for the norms, empty (not nan) for every ratio/spectral column
    lines = [dict(zip(header, line.split(","))) for line in text[1:]]
    cells = next(c for c in lines if c["tensor"] == "layers.0.mlp.gate_proj.weight" and c["checkpoint"] == "math")
    assert cells["unchanged"] == "True" and cells["delta_frob"] == "0.0" and cells["delta_rel"] == "0.0"
    assert all(cells[c] == "" for c in EMPTY_FOR_UNCHANGED if c in cells)
    heads = [r for r in rows if not (r["head"] is None and r["kv_head"] is None)]
    kept = [r for r in heads if r["unchanged"]]
    # per target: q h0,h1 + o h0,h1 + k kv0 + v kv0 of layer 0
    assert len(kept) == 2 * 6 and all(r["layer"] == 0 for r in kept)
    assert all(r["delta_frob"] == 0.0 and r["a2_agreement"] is None and r["delta_cos"] is None for r in kept)
    for entry in summary["checkpoints"]:
        assert (entry["matrices"], entry["unchanged_matrices"]) == (16, 8)
        assert (entry["head_slices"], entry["unchanged_head_slices"]) == (24, 6)
        assert entry["unchanged_heads"] == len(KEPT_HEADS)
    assert _digests(base, math_, code) == before


def test_scan_delta_rows_mark_unchanged(attention_family, tmp_path, capsys):
    base, math_, _ = attention_family
    out = tmp_path / "scan.csv"
    assert main(["scan", str(base), str(math_), "--delta", "--out", str(out), "-q", "--no-cache"]) == 0
    from analysis.run.tables import read_table

    rows, _ = read_table(out)
    deltas = [r for r in rows if r["operation"] == "delta"]
    assert len(deltas) == 16
    for r in deltas:
        attention = r["module"] in ("q", "k", "v", "o")
        assert r["unchanged"] is (not attention)
        if not attention:
            assert r["delta_frob"] == 0.0 and r["delta_rel"] == 0.0
            assert r["delta_cos"] is None and r["delta_rho"] is None and r["pl_alpha"] is None
    assert all(r["unchanged"] is None for r in rows if r["operation"] == "weight")
    assert "present_in" not in rows[0]   # every tensor is in both: no such column


def test_unchanged_delta_work_is_skipped(attention_family, monkeypatch, tmp_path):
    # no eigensolve for ΔW = 0: the session's Delta view of an unchanged MLP matrix never decomposes it
    from analysis.deltas import delta as D
    from analysis.run.session import ExplorerSession
    from diffract_tui.node import NodeRef

    base, math_, code = attention_family
    session = ExplorerSession.open([base, math_, code], device="cpu", cache_dir=tmp_path / "cache")
    calls = []
    monkeypatch.setattr(D, "gram_eigenvalues", lambda W: calls.append(W.shape) or pytest.fail("eigensolve"))
    monkeypatch.setattr(D, "top_svd", lambda *a, **k: pytest.fail("decomposition of an unchanged matrix"))
    try:
        result = session.delta(NodeRef(0, "gate"))
    finally:
        session.close()
    assert [d.label for d in result.deltas] == ["math", "code"]
    for d in result.deltas:
        assert d.metrics["unchanged"] is True and d.metrics["delta_frob"] == 0.0
        assert d.metrics["truncatable_fraction"] is None and d.sigma.size == 0 and d.error.size == 0
    assert calls == []


def test_head_scores_and_concentration_count_unchanged_heads(attention_family):
    from analysis.deltas.delta import head_concentration, head_scores
    from analysis.io.checkpoint import open_checkpoint
    from analysis.model.architecture import layout_of

    base, math_, _ = attention_family
    b, t = open_checkpoint(base), open_checkpoint(math_)
    hs = head_scores(b, t, layout_of(b))
    assert sorted(map(tuple, hs.unchanged.nonzero().tolist())) == list(KEPT_HEADS)
    assert head_concentration(hs).unchanged == len(KEPT_HEADS)


# --------------------------------------------------------------------------------------------------
# item 14b: one name for the PL/TPL log-likelihood ratio
# --------------------------------------------------------------------------------------------------


def test_pl_tpl_log_likelihood_ratio_has_one_name():
    from analysis.spectral.backend import SpectralSettings
    from analysis.spectral.spectra import spectral_metrics
    from diffract_tui.views.spectrum import SPECTRUM_ROWS

    W = torch.randn(120, 200, generator=torch.Generator().manual_seed(3))
    m = spectral_metrics(W, SpectralSettings(device="cpu"))
    assert "pl_tpl_llr" in m and "pl_tpl_p" in m and "pl_tpl_loglik_ratio" not in m
    assert isinstance(m["pl_tpl_llr"], float)
    assert ("PL/TPL R", "pl_tpl_llr", True) in SPECTRUM_ROWS


# --------------------------------------------------------------------------------------------------
# the explorer: tensors only some checkpoints hold, unchanged nodes (pilot)
# --------------------------------------------------------------------------------------------------


async def _settle(pilot, app) -> None:
    """Until the active view caught up with the cursor and every worker finished (at most 20 s)."""
    for _ in range(200):
        await pilot.pause(0.1)
        await app.workers.wait_for_complete()
        if not app.busy:
            break
    await pilot.pause()


def _errors(app) -> list[str]:
    """The error toasts the app has shown."""
    return [n.message for n in app._notifications if n.severity == "error"]


def test_rxnfp_trio_opens_and_marks_tensors_only_in_the_base(rxnfp_dirs, tmp_path):
    import asyncio

    from analysis.run.session import ExplorerSession
    from diffract_tui.node import NodeRef
    from diffract_tui.ui import DiffractApp
    from diffract_tui.views.spectrum import SpectrumView

    names = ("bert_pretrained", "bert_ft", "bert_ft_10k_25s")
    session = ExplorerSession.open([rxnfp_dirs[n] for n in names], device="cpu", cache_dir=tmp_path / "cache")
    decoder = NodeRef(None, "cls.predictions.decoder")
    assert session.only_in(decoder) == ("bert_pretrained",)
    assert session.only_in(NodeRef(None, "pooler")) is None

    async def run() -> None:
        app = DiffractApp(session)
        async with app.run_test(size=(120, 30)) as pilot:
            await _settle(pilot, app)
            app.go_to_node(decoder)
            await _settle(pilot, app)
            label = app.tree._by_ref[decoder].label.plain
            assert "◌ only in: bert_pretrained" in label
            assert "only in" not in app.tree._by_ref[NodeRef(None, "pooler")].label.plain
            spectra = app.query_one(SpectrumView).result
            assert [s.label for s in spectra.spectra] == ["bert_pretrained"]   # the one checkpoint that has it
            await pilot.press("2")
            await _settle(pilot, app)
            title = str(app.query_one("#delta-title").render())
            assert "cls.predictions.decoder.weight is only in bert_pretrained: there is no ΔW to compare." in title
            assert _errors(app) == []

    try:
        asyncio.run(run())
    finally:
        session.close()


def test_explorer_marks_unchanged_nodes_and_heads(attention_family, tmp_path):
    import asyncio

    from analysis.run.session import ExplorerSession
    from diffract_tui.node import NodeRef
    from diffract_tui.ui import DiffractApp
    from diffract_tui.views.heads_grid import HeadsGridView

    session = ExplorerSession.open(list(attention_family), device="cpu", cache_dir=tmp_path / "cache")
    gate = NodeRef(0, "gate")

    async def run() -> None:
        app = DiffractApp(session)
        async with app.run_test(size=(120, 30)) as pilot:
            await _settle(pilot, app)
            await pilot.press("2")
            app.go_to_node(gate)
            await _settle(pilot, app)
            legend = str(app.query_one("#delta-legend").render())
            assert "math Δ= unchanged" in legend and "code Δ= unchanged" in legend
            assert app.tree.badges[gate].unchanged and "Δ=" in app.tree._by_ref[gate].label.plain
            await pilot.press("3")
            await _settle(pilot, app)
            grid = app.query_one(HeadsGridView).heatmap
            assert grid.unchanged == frozenset(KEPT_HEADS)
            assert "2 head(s) unchanged" in str(app.query_one("#grid-info").render())
            assert _errors(app) == []

    try:
        asyncio.run(run())
    finally:
        session.close()


def test_scan_names_where_a_tensor_only_some_checkpoints_hold_is(models, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from analysis.run.tables import read_table

    base, cpt = models["llama"], tmp_path / "cpt"
    shutil.copytree(models["llama_cpt"], cpt)
    tensors = load_file(str(cpt / "model.safetensors"))
    del tensors["lm_head.weight"]
    save_file(tensors, str(cpt / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "scan.csv"
    assert main(["scan", str(base), str(cpt), "--delta", "--out", str(out), "-q", "--no-cache"]) == 0
    rows, _ = read_table(out)
    lm = [r for r in rows if r["tensor"] == "lm_head.weight"]
    assert [(r["checkpoint"], r["operation"], r["present_in"]) for r in lm] == [("llama", "weight", "llama")]
    assert all(r["present_in"] is None for r in rows if r["tensor"] != "lm_head.weight")
    assert len([r for r in rows if r["operation"] == "delta"]) == 15   # no ΔW offered for lm_head

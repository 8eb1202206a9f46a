"""`diffract-tui info`: per-checkpoint architecture/heads/tensors/dtypes/bytes/fingerprint and the
alignment report, as JSON and as Rich tables."""

from __future__ import annotations

import json

import torch
from conftest import write_safetensors

from analysis.io.checkpoint import open_checkpoint
from diffract_tui.cli import main


def _info_json(capsys, *paths) -> dict:
    assert main(["info", *map(str, paths), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_for_a_sharded_gqa_llama(capsys, make_llama_folder):
    # 2 layers, hidden 64, 4 query heads sharing 2 kv heads -> head_dim 16; bf16
    folder = make_llama_folder("base", shards=2, layers=2, hidden=64, heads=4, kv_heads=2, intermediate=96,
                               vocab=50, dtype=torch.bfloat16)
    data = _info_json(capsys, folder)
    (s,) = data["checkpoints"]
    assert (s["model_type"], s["layers"], s["heads"], s["kv_heads"], s["head_dim"], s["hidden_size"]) == (
        "llama", 2, 4, 2, 16, 64)
    assert s["heads_available"] is True and s["heads_reason"] is None
    n_tensors = 3 + 2 * 9
    assert s["tensors"] == n_tensors and s["dtypes"] == {"bfloat16": n_tensors}
    params = 2 * 50 * 64 + 64 + 2 * (64 * 64 + 2 * 32 * 64 + 64 * 64 + 3 * 96 * 64 + 2 * 64)
    assert s["bytes"] == 2 * params
    assert s["fingerprint"] == open_checkpoint(folder).fingerprint
    assert len(s["weight_files"]) == 2 and s["label"] == "base"
    assert data["alignment"] == {"checkpoints": ["base"], "shared": n_tensors, "missing": {"base": []},
                                 "mismatched": []}


def test_json_for_two_checkpoints_reports_missing_keys(capsys, make_llama_folder, tmp_path):
    base = make_llama_folder("base", layers=1)
    cpt = make_llama_folder("cpt", layers=1, seed=1)
    # drop lm_head from a copy of cpt: it becomes "missing in cpt"
    from safetensors.torch import load_file
    tensors = load_file(str(cpt / "model.safetensors"))
    del tensors["lm_head.weight"]
    write_safetensors(cpt / "model.safetensors", tensors)
    data = _info_json(capsys, base, cpt)
    assert [s["label"] for s in data["checkpoints"]] == ["base", "cpt"]
    assert data["alignment"]["shared"] == 3 + 9 - 1
    assert data["alignment"]["missing"] == {"base": [], "cpt": ["lm_head.weight"]}
    assert data["checkpoints"][0]["fingerprint"] != data["checkpoints"][1]["fingerprint"]


def test_unknown_architecture_lists_matrices_and_reason(capsys, tmp_path):
    path = write_safetensors(tmp_path / "odd.safetensors", {
        "blocks.0.mixer.weight": torch.ones(8, 4), "blocks.1.mixer.weight": torch.ones(8, 4),
        "readout.weight": torch.ones(3, 8), "scale": torch.ones(1)})
    data = _info_json(capsys, path)
    (s,) = data["checkpoints"]
    assert s["model_type"] == "unknown" and s["heads_available"] is False
    assert "no model_type" in s["heads_reason"]
    assert sorted(m["tensor"] for m in s["matrices"]) == ["blocks.0.mixer.weight", "blocks.1.mixer.weight",
                                                           "readout.weight"]
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "odd.safetensors: heads not offered: config.json has no model_type" in out
    assert "Matrices of odd.safetensors" in out and "blocks.1.mixer.weight" in out and "8 × 4" in out


def test_rich_output_shows_the_table_and_alignment(capsys, make_llama_folder):
    a = make_llama_folder("a", layers=1)
    b = make_llama_folder("b", layers=1, seed=3)
    assert main(["info", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    fp_a, fp_b = open_checkpoint(a).fingerprint, open_checkpoint(b).fingerprint
    for text in ("Checkpoints", "architecture", "llama", "kv heads", "float32 ×12", fp_a, fp_b,
                 f"a: {a}", "Alignment: 12 tensors shared by all 2 checkpoint(s)"):
        assert text in out, text
    assert "missing in" not in out


def test_rxnfp_info_json(capsys, rxnfp_dirs):
    data = _info_json(capsys, *rxnfp_dirs.values())
    assert [(s["label"], s["model_type"], s["layers"], s["heads"], s["head_dim"], s["tensors"])
            for s in data["checkpoints"]] == [
        ("bert_pretrained", "bert", 12, 4, 64, 207), ("bert_ft", "bert", 12, 4, 64, 199),
        ("bert_ft_10k_25s", "bert", 12, 4, 64, 201)]
    assert data["alignment"]["shared"] == 199

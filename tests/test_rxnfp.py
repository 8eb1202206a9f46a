"""The three real rxnfp BERT checkpoints (legacy pickles, `bert.` prefix in two of them, extra
cls/classifier heads): they open, align, agree with torch.load, and show 12 layers × 4 heads of 64."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from analysis import realmodels
from analysis.io.alignment import align
from analysis.io.checkpoint import open_checkpoint
from analysis.errors import DiffractError

HEAD_PREFIXES = ("cls.", "classifier.")


@pytest.fixture(scope="module")
def rxnfp(rxnfp_dirs):
    return {name: open_checkpoint(path) for name, path in rxnfp_dirs.items()}


def test_three_checkpoints_found(rxnfp_dirs):
    assert list(rxnfp_dirs) == ["bert_pretrained", "bert_ft", "bert_ft_10k_25s"]
    for path in rxnfp_dirs.values():
        assert (path / "pytorch_model.bin").is_file() and (path / "config.json").is_file()


def test_found_without_importing_rxnfp():
    code = ("import sys; from analysis.realmodels import rxnfp_checkpoints; d = rxnfp_checkpoints(); "
            "assert len(d) == 3; print('rxnfp' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_tensor_counts_and_values_match_torch_load(rxnfp, rxnfp_dirs):
    # counts as stored: pretrained has the MLM/NSP `cls.*` heads (8) and `bert.` prefix; bert_ft has a
    # prefix-less encoder + pooler; bert_ft_10k_25s has `bert.` + a 2-tensor classifier
    assert {n: len(c) for n, c in rxnfp.items()} == {"bert_pretrained": 207, "bert_ft": 199, "bert_ft_10k_25s": 201}
    for name, ckpt in rxnfp.items():
        oracle = torch.load(rxnfp_dirs[name] / "pytorch_model.bin", map_location="cpu", weights_only=True)
        assert sorted(ckpt.info(k).raw_name for k in ckpt.keys()) == sorted(oracle)
        for key in ckpt.keys():
            assert torch.equal(ckpt.tensor(key, dtype=None), oracle[ckpt.info(key).raw_name])


def test_alignment_despite_prefix_and_extra_heads(rxnfp):
    report = align(list(rxnfp.values()))
    # 199 = 5 embedding tensors + 12 layers × 16 + 2 pooler tensors, shared by all three
    assert len(report.shared) == 5 + 12 * 16 + 2 == 199
    assert "encoder.layer.11.attention.self.query.weight" in report.shared
    assert "pooler.dense.weight" in report.shared
    assert report.mismatched == ()
    missing = {k for keys in report.missing.values() for k in keys}
    assert missing and all(k.startswith(HEAD_PREFIXES) for k in missing)
    assert report.only_in["bert_pretrained"] == tuple(sorted(
        k for k in rxnfp["bert_pretrained"].keys() if k.startswith("cls.")))
    assert len(report.only_in["bert_pretrained"]) == 8
    assert report.only_in["bert_ft_10k_25s"] == ("classifier.bias", "classifier.weight")
    assert report.only_in["bert_ft"] == ()


def test_layout_is_12_layers_of_4_heads_of_64(rxnfp):
    from analysis.model.architecture import layout_of

    for ckpt in rxnfp.values():
        layout = layout_of(ckpt)
        assert (layout.model_type, layout.num_layers, layout.num_heads, layout.num_kv_heads, layout.head_dim) == (
            "bert", 12, 4, 4, 64)
        assert layout.heads_available


def test_query_rows_read_from_legacy_pickle(rxnfp):
    ckpt = rxnfp["bert_ft"]
    key = "encoder.layer.3.attention.self.query.weight"
    full = ckpt.tensor(key)
    assert torch.equal(ckpt.rows(key, 64, 128), full[64:128])  # head 1 of 4 × 64


def test_ensure_rxnfp_reports_unreachable_registry(tmp_path, monkeypatch):
    commands = []

    def failing_run(cmd, **kwargs):
        commands.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (network unreachable)")

    monkeypatch.setattr(realmodels, "installed_rxnfp_dir", lambda: None)
    monkeypatch.setattr(realmodels.subprocess, "run", failing_run)
    with pytest.raises(DiffractError) as err:
        realmodels.ensure_rxnfp(tmp_path / "cache")
    msg = str(err.value)
    assert "\n" not in msg and "registry is unreachable" in msg and str(tmp_path / "cache") in msg
    assert "pip download --no-deps rxnfp==0.1.0" in msg
    assert commands == [[sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                         "--no-deps", "--target", str(tmp_path / "cache"), "rxnfp==0.1.0"]]
    with pytest.raises(DiffractError, match="not installed"):
        realmodels.rxnfp_checkpoints(tmp_path / "cache")


def test_ensure_rxnfp_uses_the_cached_copy(tmp_path, monkeypatch, rxnfp_dirs):
    """After a (simulated) pip --target install the checkpoints are found under the cache folder."""
    target = tmp_path / "cache"

    def fake_pip(cmd, **kwargs):
        for name, src in rxnfp_dirs.items():
            dst = target / "rxnfp" / "models" / "transformers" / name
            dst.mkdir(parents=True)
            (dst / "pytorch_model.bin").symlink_to(src / "pytorch_model.bin")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(realmodels, "installed_rxnfp_dir", lambda: None)
    monkeypatch.setattr(realmodels.subprocess, "run", fake_pip)
    folder = realmodels.ensure_rxnfp(target)
    assert folder == target / "rxnfp" / "models" / "transformers"
    assert realmodels.rxnfp_checkpoints(target) == {n: folder / n for n in realmodels.RXNFP_MODELS}
    assert realmodels.ensure_rxnfp(target) == folder  # second call: already there, no pip
    assert isinstance(folder, Path)

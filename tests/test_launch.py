"""`diffract-tui BASE CPT …` and `diffract-tui demo`: bad launches end with the engine's one-line message
before any screen opens; good launches hand an opened session (labels, device, cache) to the app."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffract_tui.cli import main
from tests.conftest import llama_checkpoint, write_safetensors


@pytest.fixture
def no_screen(monkeypatch: pytest.MonkeyPatch) -> list:
    """Replace the app runner: records the sessions it would have shown instead of opening a screen."""
    shown: list = []

    def fake_run(session) -> None:
        shown.append(session)
        session.close()

    monkeypatch.setattr("diffract_tui.cli.launch.run_explorer", fake_run)
    return shown


def one_error_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("diffract-tui: error: ")
    return lines[0]


def test_missing_path_fails_before_the_screen(tmp_path: Path, make_llama_folder, capsys, no_screen) -> None:
    base = make_llama_folder("base")
    missing = tmp_path / "does-not-exist"
    assert main([str(base), str(missing)]) == 1
    line = one_error_line(capsys)
    assert "does-not-exist" in line
    assert no_screen == []  # the app was never started


def test_incompatible_checkpoints_fail_before_the_screen(make_llama_folder, capsys, no_screen) -> None:
    base = make_llama_folder("base", hidden=64)
    other = make_llama_folder("wide", hidden=96, heads=4, kv_heads=2)
    assert main([str(base), str(other)]) == 1
    line = one_error_line(capsys)
    # the size check names both hidden sizes and both folders, base first
    assert f"different models: hidden size 64 in {base} vs 96 in {other}" in line, line
    assert no_screen == []


def test_a_single_checkpoint_is_refused(make_llama_folder, capsys, no_screen) -> None:
    base = make_llama_folder("base")
    assert main(["open", str(base)]) == 1
    assert "at least one" in one_error_line(capsys)
    assert no_screen == []


def test_bad_label_option_is_one_line(make_llama_folder, capsys, no_screen) -> None:
    base, cpt = make_llama_folder("base"), make_llama_folder("cpt", seed=1)
    assert main([str(base), str(cpt), "--label", "nameonly"]) == 1
    assert "NAME=PATH" in one_error_line(capsys)
    assert main([str(base), str(cpt), "--label", f"x={base.parent / 'elsewhere'}"]) == 1
    assert "not one of the checkpoints" in one_error_line(capsys)
    assert no_screen == []


def test_good_launch_opens_a_session_with_labels(tmp_path: Path, make_llama_folder, no_screen) -> None:
    base, cpt1, cpt2 = make_llama_folder("base"), make_llama_folder("cpt1", seed=1), make_llama_folder("cpt2", seed=2)
    cache = tmp_path / "cache"
    code = main([str(base), str(cpt1), str(cpt2), "--label", f"chem={cpt1}", "--cache-dir", str(cache),
                 "--device", "cpu"])
    assert code == 0
    (session,) = no_screen
    # --label replaces the folder name of exactly that checkpoint; the others keep theirs
    assert session.labels == ["base", "chem", "cpt2"]
    assert session.cache.root == cache
    assert session.device.type == "cpu"
    assert session.layout.num_layers == 2 and session.layout.num_heads == 4


def test_single_file_checkpoints_open(tmp_path: Path, no_screen) -> None:
    """Two bare .safetensors files (no config) still open: the explorer shows their matrices."""
    _, t0 = llama_checkpoint(seed=0)
    _, t1 = llama_checkpoint(seed=1)
    a = write_safetensors(tmp_path / "a.safetensors", t0)
    b = write_safetensors(tmp_path / "b.safetensors", {k: v + 0.01 * torch.ones_like(v) for k, v in t1.items()})
    assert main([str(a), str(b), "--cache-dir", str(tmp_path / "c")]) == 0
    (session,) = no_screen
    assert len(session.checkpoints) == 2


def test_demo_synthetic_generates_once_into_the_cache(tmp_path: Path, no_screen) -> None:
    cache = tmp_path / "cache"
    assert main(["demo", "--synthetic", "--cache-dir", str(cache), "--device", "cpu"]) == 0
    (session,) = no_screen
    # a base and at least two domains, all written under the cache folder
    assert len(session.checkpoints) >= 3
    assert all(str(c.path).startswith(str(cache)) for c in session.checkpoints)
    stamp = {c.label: c.fingerprint for c in session.checkpoints}
    # a second start reuses the files (same fingerprints: nothing rewritten)
    assert main(["demo", "--synthetic", "--cache-dir", str(cache), "--device", "cpu"]) == 0
    assert {c.label: c.fingerprint for c in no_screen[1].checkpoints} == stamp


def test_demo_without_rxnfp_and_without_registry_says_so(tmp_path: Path, monkeypatch, capsys, no_screen) -> None:
    """No installed rxnfp and an unreachable registry: one clear line, no screen."""
    import analysis.realmodels as rm

    monkeypatch.setattr(rm, "installed_rxnfp_dir", lambda: None)
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "1")
    code = main(["demo", "--cache-dir", str(tmp_path / "cache")])
    assert code == 1
    err = capsys.readouterr().err
    assert "installing rxnfp" in err  # the first-use message came first
    assert err.strip().splitlines()[-1].startswith("diffract-tui: error: ")
    assert "rxnfp" in err.strip().splitlines()[-1]
    assert no_screen == []


def test_demo_opens_the_real_rxnfp_trio(rxnfp_dirs, tmp_path: Path, no_screen) -> None:
    assert main(["demo", "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]) == 0
    (session,) = no_screen
    assert session.labels == ["pretrained", "ft", "ft_10k_25s"]
    assert session.layout.model_type == "bert" and session.layout.heads_available
    assert json.loads((Path(session.base.path) / "config.json").read_text())  # a real HF folder

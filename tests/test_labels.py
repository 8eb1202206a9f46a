"""The one label rule (`analysis.io.labels.unique_labels`): what it names, and that `scan`, `delta`, `info`,
the alignment and the explorer session name the same inputs with the same labels."""

from __future__ import annotations

import json
from pathlib import Path

from analysis.io.checkpoint import open_checkpoint
from analysis.io.labels import unique_labels
from analysis.run.session import ExplorerSession
from analysis.run.tables import read_table
from diffract_tui.cli import main


def test_distinct_names_are_kept(tmp_path: Path) -> None:
    assert unique_labels([tmp_path / "base", tmp_path / "cpt"]) == ["base", "cpt"]


def test_colliding_names_get_the_shortest_distinguishing_trailing_path(tmp_path: Path) -> None:
    # one shared parent level is not enough for x/a/m vs y/a/m: it takes three components
    paths = [tmp_path / "x" / "a" / "m", tmp_path / "y" / "a" / "m", tmp_path / "other"]
    assert unique_labels(paths) == ["x/a/m", "y/a/m", "other"]


def test_a_generic_weight_file_is_named_by_its_folder(tmp_path: Path) -> None:
    weights = tmp_path / "run1" / "model" / "model.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"")
    assert unique_labels([weights, tmp_path / "run2" / "model"]) == ["run1/model", "run2/model"]


def test_the_same_path_twice_is_numbered(tmp_path: Path) -> None:
    assert unique_labels([tmp_path / "m", tmp_path / "m"]) == ["m", "m#2"]


def test_given_names_win_and_collide_like_defaults(tmp_path: Path) -> None:
    assert unique_labels([tmp_path / "a", tmp_path / "b"], ["chem", None]) == ["chem", "b"]
    assert unique_labels([tmp_path / "a", tmp_path / "b"], ["x", "x"]) == ["a", "b"]


def test_scan_delta_info_and_session_label_the_same_folders_identically(make_llama_folder, tmp_path, capsys) -> None:
    paths = [make_llama_folder(f"run{i}/model", layers=1, hidden=16, heads=2, kv_heads=1, intermediate=8,
                               vocab=10, seed=i) for i in range(3)]
    expected = ["run0/model", "run1/model", "run2/model"]
    args = [str(p) for p in paths]
    scan_out, delta_out = tmp_path / "scan.json", tmp_path / "delta.json"
    assert main(["scan", *args, "--out", str(scan_out), "--device", "cpu", "--no-cache", "--quiet"]) == 0
    assert main(["delta", *args, "--out", str(delta_out), "--device", "cpu", "--no-cache", "--no-heads",
                 "--no-spectral"]) == 0
    capsys.readouterr()
    assert main(["info", *args, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    scan_rows, scan_meta = read_table(scan_out)
    delta_rows, delta_meta = read_table(delta_out)
    session = ExplorerSession.open(paths, device="cpu", cache_dir=tmp_path / "cache")
    session.close()
    assert [c["label"] for c in scan_meta["checkpoints"]] == expected
    assert sorted({r["checkpoint"] for r in scan_rows}) == expected
    assert [c["label"] for c in delta_meta["checkpoints"]] == expected
    assert sorted({r["checkpoint"] for r in delta_rows}) == expected[1:]
    assert [s["label"] for s in info["checkpoints"]] == expected
    assert info["alignment"]["checkpoints"] == expected
    assert session.labels == expected
    assert [open_checkpoint(p).label for p in paths] == ["model"] * 3   # a single checkpoint keeps its name

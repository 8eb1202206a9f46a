"""Hostile labels: the same checkpoint given twice, two `--label`s with one name, two folders with one name —
each input still gets its own label (analysis.io.labels), so no two checkpoints' rows are merged."""

from __future__ import annotations

import hashlib

from analysis.run.tables import read_table
from diffract_tui.cli import main

TINY = dict(layers=1, hidden=16, heads=2, kv_heads=1, intermediate=8, vocab=10)


def test_scanning_the_same_folder_twice_keeps_two_checkpoints(make_llama_folder, tmp_path, capsys) -> None:
    base = make_llama_folder("base", **TINY)
    weights = base / "model.safetensors"
    before = hashlib.sha256(weights.read_bytes()).hexdigest()
    out = tmp_path / "scan.json"
    assert main(["scan", str(base), str(base), "--out", str(out), "--device", "cpu", "--no-cache", "--quiet"]) == 0
    rows, meta = read_table(out)
    assert [c["label"] for c in meta["checkpoints"]] == ["base", "base#2"]
    per_label = {lab: sum(r["checkpoint"] == lab for r in rows) for lab in ("base", "base#2")}
    assert per_label["base"] == per_label["base#2"] == len(rows) // 2 > 0
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == before


def test_two_labels_with_one_name_fall_back_to_the_folders(make_llama_folder, monkeypatch) -> None:
    shown: list = []

    def fake_run(session) -> None:
        shown.append(session.labels)
        session.close()

    monkeypatch.setattr("diffract_tui.cli.launch.run_explorer", fake_run)
    a, b = make_llama_folder("a", **TINY), make_llama_folder("b", seed=1, **TINY)
    assert main([str(a), str(b), "--label", f"x={a}", "--label", f"x={b}", "--device", "cpu"]) == 0
    assert shown == [["a", "b"]]


def test_delta_of_two_folders_with_one_name_names_them_by_their_parents(make_llama_folder, tmp_path) -> None:
    base = make_llama_folder("base", **TINY)
    one, two = make_llama_folder("run1/cpt", seed=1, **TINY), make_llama_folder("run2/cpt", seed=2, **TINY)
    out = tmp_path / "delta.csv"
    assert main(["delta", str(base), str(one), str(two), "--out", str(out), "--device", "cpu", "--no-cache",
                 "--no-heads", "--no-spectral"]) == 0
    rows, meta = read_table(out)
    assert sorted({r["checkpoint"] for r in rows}) == ["run1/cpt", "run2/cpt"]
    assert [c["checkpoint"] for c in meta["summary"]["checkpoints"]] == ["run1/cpt", "run2/cpt"]

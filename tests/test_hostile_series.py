"""Hostile input to the checkpoint-series options of `scan` and `delta` (`--steps`, `--previous`): each is a
usage error (exit 2) naming the option and what is wrong, before any work, and no output file is written."""

from __future__ import annotations

import hashlib

import pytest

from diffract_tui.cli import main
from series_run import series_run  # noqa: F401 — the session fixture


def _sha(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("command", ["scan", "delta"])
@pytest.mark.parametrize("steps, fragment", [
    ("0,10,20", "gives 3 step(s) for 2 checkpoint(s)"),
    ("0,x", "not a comma-separated list"),
    ("-5,10", "not a comma-separated list"),
    ("", "not a comma-separated list"),
    ("7,7", "repeats a step"),
])
def test_bad_steps_is_a_usage_error(series_run, tmp_path, capsys, command, steps, fragment):  # noqa: F811
    out = tmp_path / "bad.json"
    before = {s: _sha(series_run.paths[s]) for s in (0, 10)}
    code = main([command, str(series_run.paths[0]), str(series_run.paths[10]), "--steps", steps,
                 "--out", str(out), "--no-cache"])
    err = capsys.readouterr().err
    assert code == 2
    assert fragment in err and "--steps" in err
    assert "Traceback" not in err
    assert not out.exists()
    assert {s: _sha(series_run.paths[s]) for s in (0, 10)} == before


def test_delta_previous_without_a_series_is_a_usage_error(series_run, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "p.json"
    code = main(["delta", str(series_run.paths[0]), str(series_run.paths[10]), "--previous", "--no-series",
                 "--out", str(out), "--no-cache"])
    err = capsys.readouterr().err
    assert code == 2 and "--previous" in err and "needs checkpoints of one run" in err
    assert "Traceback" not in err
    assert not out.exists()

"""Ctrl-C during a CLI command: typer (0.29, as pinned) turns a KeyboardInterrupt into a silent exit 130, so the
root group passes it on to `main`, which prints the project's one line `diffract-tui: interrupted` on stderr and
exits 130 — no traceback, and no temp file or partial output left in the output folder. Groups: a real SIGINT
to a child process paused mid-scan and mid-write of a checkpoint, and the in-process path of `main`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import save_file

from conftest import llama_checkpoint
from diffract_tui.cli import main

REPO = Path(__file__).resolve().parents[1]
LINE = "diffract-tui: interrupted\n"

PAUSE = """
import time
{module}
_real = {target}
_n = [0]
def _pause(*args, **kwargs):
    _n[0] += 1
    out = _real(*args, **kwargs)
    if _n[0] == {at}:
        print('READY', flush=True)
        time.sleep(60)
    return out
{target} = _pause
"""


def tiny_llama(folder: Path, seed: int) -> Path:
    """A 2-layer llama folder (model.safetensors + config.json + tokenizer.json)."""
    config, tensors = llama_checkpoint(layers=2, hidden=32, heads=4, kv_heads=2, vocab=64, seed=seed)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    return folder


def entries(folder: Path) -> list[str]:
    """Every name in a folder, hidden ones included (temp leftovers show up here)."""
    return sorted(p.name for p in folder.iterdir())


def _interactive_signals() -> None:
    """In the child before exec: SIGINT as a terminal's foreground job gets it (default disposition, unblocked).
    A disposition or mask the pytest process inherited or picked up (an earlier test's Ray driver or a
    non-interactive shell) would otherwise pass to the child, which then never sees the SIGINT at all."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def interrupted_child(args: list[str], prelude: str) -> tuple[int, str, str]:
    """Run the CLI in a child that pauses where `prelude` says, send it SIGINT there: (rc, stdout, stderr)."""
    code = f"import sys\n{prelude}\nfrom diffract_tui.cli import main\nsys.exit(main({[str(a) for a in args]!r}))\n"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, preexec_fn=_interactive_signals)
    try:
        ready = child.stdout.readline().strip()
        assert ready == "READY", child.communicate(timeout=60)
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=60)
    finally:
        child.kill()
    return child.returncode, out, err


def test_ctrl_c_mid_scan_prints_the_one_line_and_writes_nothing(tmp_path) -> None:
    model = tiny_llama(tmp_path / "B", 0)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    rc, out, err = interrupted_child(
        ["scan", model, "--out", out_dir / "scan.csv", "--no-cache", "--quiet"],
        PAUSE.format(module="import analysis.run.scan as m", target="m._run_item", at=2))
    assert rc == 130, err
    assert err == LINE  # exactly the one line: nothing else, no traceback
    assert entries(out_dir) == []


def test_ctrl_c_mid_write_of_a_checkpoint_prints_the_one_line_and_leaves_no_temp(tmp_path, capsys) -> None:
    b, c = tiny_llama(tmp_path / "B", 0), tiny_llama(tmp_path / "C", 1)
    plan = tmp_path / "list.json"
    assert main(["rewind", "plan", str(b), str(c), "--fraction", "0.25", "--out", str(plan)]) == 0
    capsys.readouterr()
    rc, out, err = interrupted_child(
        ["rewind", "apply", plan, "--out", tmp_path / "out"],
        PAUSE.format(module="from analysis.io import writer as m", target="m._write_payload", at=2))
    assert rc == 130, err
    assert err.endswith(LINE) and err.count("interrupted") == 1 and "Traceback" not in err, err
    assert entries(tmp_path) == ["B", "C", "list.json"]  # no temp folder, no partial output


@pytest.mark.parametrize("exc", ["KeyboardInterrupt", "Terminated"])
def test_an_interrupt_inside_a_command_is_the_one_line_in_process(exc, tmp_path, monkeypatch, capsys) -> None:
    """Ctrl-C and SIGTERM (`Terminated`, a KeyboardInterrupt) say the same, from `main` called in-process."""
    import analysis.run.scan as scan
    from analysis.io import atomic

    cls = {"KeyboardInterrupt": KeyboardInterrupt, "Terminated": atomic.Terminated}[exc]

    def interrupted(*args, **kwargs):
        raise cls()

    monkeypatch.setattr(scan, "_run_item", interrupted)
    model = tiny_llama(tmp_path / "B", 0)
    capsys.readouterr()
    assert main(["info", str(model)]) == 0  # a command that does not reach the hook still succeeds
    capsys.readouterr()
    assert main(["scan", str(model), "--out", str(tmp_path / "s.json"), "--no-cache", "--quiet"]) == 130
    assert capsys.readouterr().err == LINE
    assert entries(tmp_path) == ["B"]

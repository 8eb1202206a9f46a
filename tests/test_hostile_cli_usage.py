"""Hostile CLI usage: every usage mistake (no arguments, a missing or unknown option, a value of the wrong
type or out of range, an unknown command) prints click's short usage message and exits 2, never a
traceback; `--version` prints the version; an OS error no command anticipated is one line and exit 1.

Run: `python -m pytest -q tests/test_hostile_cli_usage.py`.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer

import diffract_tui.cli as cli
from diffract_tui import __version__
from diffract_tui.cli import main

ROOT = Path(__file__).resolve().parents[1]

# (argv, the command path in the "Try '… --help'" line, the error text click prints)
USAGE_MISTAKES = [
    (["scan", "B"], "diffract-tui scan", "Missing option '--out'"),
    (["info", "B", "--no-such-option"], "diffract-tui info", "No such option: --no-such-option"),
    (["scan", "B", "--out", "x.csv", "--threads", "0"], "diffract-tui scan", "Invalid value for '--threads'"),
    (["scan", "B", "--out", "x.csv", "--threads", "two"], "diffract-tui scan", "Invalid value for '--threads'"),
    (["interpolate", "A", "B", "--alpha", "abc"], "diffract-tui interpolate", "Invalid value for '--alpha'"),
    (["--bogus"], "diffract-tui", "No such option: --bogus"),
    (["--version=yes"], "diffract-tui", "Option '--version' does not take a value"),
    (["rewind", "bogus"], "diffract-tui rewind", "No such command 'bogus'"),
    (["cache", "wipe"], "diffract-tui cache", "No such command 'wipe'"),
    (["delta", "B", "C", "--out"], "diffract-tui delta", "Option '--out' requires an argument"),
    (["rewind", "plan", "B", "C", "--fraction"], "diffract-tui rewind plan",
     "Option '--fraction' requires an argument"),
]


def assert_usage_error(out: str, err: str, try_path: str, error_text: str) -> None:
    """Click's short usage message on stderr: the usage line, the help hint, the error; no traceback."""
    assert "Traceback" not in out + err
    assert f"Usage: {try_path} " in err, err
    assert f"Try '{try_path} --help' for help." in err, err
    assert error_text in err, err
    error_lines = [line for line in err.splitlines() if line.startswith("Error: ")]
    assert len(error_lines) == 1, err


def _failing_app(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    """Replace the CLI's app by one whose `scan` raises `error` (a second command keeps `scan` a subcommand)."""
    failing = typer.Typer()

    @failing.command()
    def scan() -> None:
        raise error

    @failing.command()
    def other() -> None:
        """Unused."""

    monkeypatch.setattr(cli, "app", failing)


@pytest.mark.parametrize(("argv", "try_path", "error_text"), USAGE_MISTAKES,
                         ids=[" ".join(argv) for argv, _, _ in USAGE_MISTAKES])
def test_a_usage_mistake_is_the_short_usage_message_and_exit_2(argv: list[str], try_path: str, error_text: str,
                                                              capsys: pytest.CaptureFixture) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert_usage_error(captured.out, captured.err, try_path, error_text)


@pytest.mark.parametrize("argv", [[], ["rewind"], ["cache"]], ids=["root", "rewind", "cache"])
def test_no_arguments_prints_the_help_and_exits_2(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    both = captured.out + captured.err
    assert "Traceback" not in both
    assert f"Usage: {' '.join(['diffract-tui', *argv])} [OPTIONS] COMMAND [ARGS]..." in both, both
    assert "Commands" in both


def test_version_prints_the_version_and_exits_0(capsys: pytest.CaptureFixture) -> None:
    assert main(["--version"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"diffract-tui {__version__}\n"
    assert captured.err == ""


def test_help_still_exits_0(capsys: pytest.CaptureFixture) -> None:
    assert main(["scan", "--help"]) == 0
    captured = capsys.readouterr()
    assert "Usage: diffract-tui scan" in captured.out and "--out" in captured.out


def test_two_paths_still_open_the_explorer(make_llama_folder, monkeypatch: pytest.MonkeyPatch) -> None:
    """`diffract-tui BASE CPT` (no subcommand) is still routed to `open`."""
    shown: list = []

    def fake_run(session) -> None:
        shown.append(session)
        session.close()

    monkeypatch.setattr("diffract_tui.cli.launch.run_explorer", fake_run)
    base, cpt = make_llama_folder("base"), make_llama_folder("cpt", seed=1)
    assert main([str(base), str(cpt), "--device", "cpu"]) == 0
    assert len(shown) == 1 and len(shown[0].checkpoints) == 2


def test_an_unanticipated_os_error_is_one_line_and_exit_1(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    """An OSError that no command turned into a DiffractError: `<strerror>: <filename>`, exit 1."""
    _failing_app(monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/out.csv"))
    assert main(["scan"]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"diffract-tui: error: {os.strerror(errno.ENOSPC)}: /data/out.csv\n"
    assert "Traceback" not in captured.out + captured.err


def test_a_usage_mistake_through_a_real_process_exits_2() -> None:
    """`python -m diffract_tui scan B`: the installed entry path, not only main() in-process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "diffract_tui", "scan", "B"], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert_usage_error(proc.stdout, proc.stderr, "diffract-tui scan", "Missing option '--out'")
    version = subprocess.run([sys.executable, "-m", "diffract_tui", "--version"], capture_output=True, text=True,
                             env=env, cwd=ROOT, timeout=120)
    assert (version.returncode, version.stdout, version.stderr) == (0, f"diffract-tui {__version__}\n", "")


def test_a_closed_pipe_ends_quietly_with_exit_1(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    """`diffract-tui scan … | head`: the reader went away; no message, no traceback, exit 1."""
    monkeypatch.setattr(sys, "stdout", sys.stdout)  # main() swaps stdout for devnull; put it back afterwards
    _failing_app(monkeypatch, BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE)))
    assert main(["scan"]) == 1
    assert capsys.readouterr().err == ""


def test_a_click_error_that_is_not_usage_is_the_project_line(monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    click_errors = cli._exception_classes("FileError")
    assert click_errors, "typer's click has no FileError"
    _failing_app(monkeypatch, click_errors[0]("/data/in.csv", hint="Permission denied"))
    assert main(["scan"]) == 1
    assert capsys.readouterr().err == "diffract-tui: error: Could not open file '/data/in.csv': Permission denied\n"

"""`rewind plan --score taylor` shows its gradient pass on the project's progress bar (SPEC §9; the engine's one
protocol, analysis.progress): the bar gets one tick per backward call (a group of `cancel_step` windows), counting
up to the windows' total; `--quiet` shows no bar; a real Ctrl-C mid-pass prints `diffract-tui: interrupted`, exits
130 and writes nothing. On the real tiny CPT family (tests/tiny_cpt.py)."""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import diffract_tui.cli.rewind as rewind_cli  # noqa: E402
from analysis.eval.taylor import CANCEL_POINTS  # noqa: E402
from diffract_tui.cli import main  # noqa: E402
from test_hostile_cli_interrupt import LINE  # noqa: E402
from tiny_cpt import family  # noqa: E402,F401  (the session fixture)

T, N = 64, 16


def plan_args(family, out: Path, *extra: str) -> list[str]:
    """`rewind plan --score taylor` of the family's code CPT on N windows of its prose text."""
    return ["rewind", "plan", str(family.base), str(family.code), "--score", "taylor", "--fraction", "0.25",
            "--general-text", str(family.prose_text), "--tokens", str(T), "--windows", str(N), "--device", "cpu",
            "--out", str(out), *extra]


def digests(*paths: Path) -> dict[str, str]:
    """sha256 of every file under the paths (the inputs a plan must leave as they were)."""
    files = [f for p in paths for f in (sorted(p.rglob("*")) if p.is_dir() else [p]) if f.is_file()]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def test_the_taylor_bar_gets_monotone_ticks_per_window_group_up_to_the_total(family, tmp_path, monkeypatch,
                                                                            capsys) -> None:
    ticks: dict[str, list[tuple[int, int | None]]] = {}

    @contextmanager
    def recording(description: str, unit_bytes: bool = False, quiet: bool = False):
        seen = ticks.setdefault(description, [])
        yield lambda done, total, text="": seen.append((done, total))

    monkeypatch.setattr(rewind_cli, "stderr_progress", recording)
    assert main(plan_args(family, tmp_path / "plan.json")) == 0
    got = ticks[rewind_cli.TAYLOR_LABEL]
    assert len(got) == CANCEL_POINTS  # 16 windows in backward calls of 2: one tick each
    assert [d for d, _ in got] == sorted(d for d, _ in got) and len({d for d, _ in got}) == len(got)
    assert got[-1] == (N, N) and {t for _, t in got} == {N}


def test_a_terminal_shows_the_taylor_bar_and_quiet_shows_none(family, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich draws its bar as on a terminal
    monkeypatch.setenv("COLUMNS", "120")
    capsys.readouterr()
    assert main(plan_args(family, tmp_path / "a.json")) == 0
    err = capsys.readouterr().err
    assert rewind_cli.TAYLOR_LABEL in err and f"{N}/{N}" in err, err
    assert main(plan_args(family, tmp_path / "b.json", "--quiet")) == 0
    out = capsys.readouterr()
    assert out.err == "" and "wrote" in out.out
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_a_ctrl_c_mid_gradient_pass_prints_the_one_line_and_writes_nothing(family, tmp_path, monkeypatch,
                                                                           capsys) -> None:
    """In-process: the second window group's forward raises KeyboardInterrupt, as Python's SIGINT handler does
    at the next bytecode of the main thread (a real SIGINT to a child costs ≈ 15 s of imports here; that path is
    tests/test_hostile_cli_interrupt.py's). The model's gradients are restored by the engine (test_taylor_cancel)."""
    import analysis.eval.taylor as taylor

    real, calls = taylor.window_losses, [0]

    def interrupted(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt()
        return real(*args, **kwargs)

    monkeypatch.setattr(taylor, "window_losses", interrupted)
    before = digests(family.base, family.code, family.prose_text)
    capsys.readouterr()
    assert main(plan_args(family, tmp_path / "plan.json")) == 130
    assert capsys.readouterr().err == LINE  # exactly the one line: no traceback
    assert calls[0] == 2 and list(tmp_path.iterdir()) == []
    assert digests(family.base, family.code, family.prose_text) == before

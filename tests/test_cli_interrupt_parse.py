"""Ctrl-C while the command line is still being parsed, before any command runs: typer's main (0.29, as pinned)
turns a KeyboardInterrupt there into a silent exit 130, so the root group passes it on to `main`, which prints the
project's one line `diffract-tui: interrupted` and exits 130, as for a Ctrl-C inside a command
(tests/test_hostile_cli_interrupt.py); so does `main` for one after the command, while it checks for a bare group."""

from __future__ import annotations

from test_hostile_cli_interrupt import LINE, PAUSE, interrupted_child, tiny_llama


def test_a_real_sigint_while_the_root_parses_its_words_prints_the_one_line(tmp_path) -> None:
    """A real SIGINT to a child paused inside the root group's parse (`DefaultCommandGroup.route`, which
    `parse_args` calls inside typer's main, where the root options' callbacks also run); nothing is written."""
    out = tmp_path / "scan.csv"
    rc, stdout, err = interrupted_child(
        ["scan", tmp_path / "missing", "--out", out, "--quiet"],
        PAUSE.format(module="from diffract_tui.cli import DefaultCommandGroup as m", target="m.route", at=1))
    assert rc == 130, err
    assert err == LINE  # exactly the one line: no traceback, no "Aborted!"
    assert stdout == ""  # (the child's READY was read before the signal)
    assert list(tmp_path.iterdir()) == []


def test_a_ctrl_c_while_main_checks_for_a_bare_group_after_the_command_prints_the_one_line(tmp_path, monkeypatch,
                                                                                         capsys) -> None:
    """In-process: `_names_only_a_group` (it rebuilds the command tree, ≈ 0.1 s, after a command of plain words
    succeeded) raises KeyboardInterrupt, as Python's SIGINT handler would inside it."""
    import diffract_tui.cli as cli

    def interrupted(args: list[str]) -> bool:
        raise KeyboardInterrupt()

    model = tiny_llama(tmp_path / "B", 0)
    monkeypatch.setattr(cli, "_names_only_a_group", interrupted)
    capsys.readouterr()
    assert cli.main(["info", str(model)]) == 130
    assert capsys.readouterr().err == LINE

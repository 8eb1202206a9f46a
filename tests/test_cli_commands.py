"""The CLI's seams: every command is a module-level function (importable, callable from Python with its
defaults), registered under its name, and `diffract-tui BASE CPT` reaches `open` through the root group's
default command rather than an argv rewrite."""

from __future__ import annotations

import hashlib
import inspect
from pathlib import Path

import pytest
import typer

from analysis.run.tables import read_table
from diffract_tui.cli import DefaultCommandGroup, app, main
from diffract_tui.cli.cache import cache_clear, cache_compact, cache_info
from diffract_tui.cli.delta import delta_command
from diffract_tui.cli.demo import demo_command
from diffract_tui.cli.eval import eval_command
from diffract_tui.cli.info import info_command
from diffract_tui.cli.interpolate import interpolate_command
from diffract_tui.cli.launch import open_command
from diffract_tui.cli.rewind import rewind_apply, rewind_plan, rewind_sweep
from diffract_tui.cli.scan import scan_command

COMMANDS = {("open",): open_command, ("demo",): demo_command, ("info",): info_command, ("scan",): scan_command,
            ("delta",): delta_command, ("interpolate",): interpolate_command, ("eval",): eval_command,
            ("cache", "info"): cache_info, ("cache", "clear"): cache_clear,
            ("cache", "compact"): cache_compact, ("rewind", "plan"): rewind_plan,
            ("rewind", "apply"): rewind_apply, ("rewind", "sweep"): rewind_sweep}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_command_is_a_registered_module_level_function() -> None:
    root = typer.main.get_command(app)
    for words, func in COMMANDS.items():
        command = root
        for word in words:
            command = command.commands[word]
        # the command's help is the function's docstring: the registered command is that function
        assert inspect.cleandoc(command.help) == inspect.cleandoc(func.__doc__), words
        assert func.__qualname__ == func.__name__, f"{func.__qualname__} is nested, not module level"
    assert set(root.commands) == {w[0] for w in COMMANDS}


def test_a_command_function_runs_when_called_from_python_with_its_defaults(make_llama_folder, tmp_path) -> None:
    base = make_llama_folder("base", layers=1, hidden=16, heads=2, kv_heads=1, intermediate=8, vocab=10)
    before = _sha(base / "model.safetensors")
    out = tmp_path / "scan.csv"
    # only the required values and two choices: every other option takes its declared default
    assert scan_command([base], out, no_cache=True, quiet=True) == 0
    rows, meta = read_table(out)
    assert {r["checkpoint"] for r in rows} == {"base"} and meta["command"] == "scan"
    assert meta["heads"] is False and meta["delta"] is False           # the defaults of --heads and --delta
    assert _sha(base / "model.safetensors") == before


@pytest.mark.parametrize(("argv", "routed"), [
    (["a", "b"], ["open", "a", "b"]),                     # two paths: the default command
    (["scan", "a"], ["scan", "a"]),                       # a command name stays a command
    (["--version"], ["--version"]),                       # root options are the root's
    ([], []),                                             # nothing: the root's help (exit 2)
], ids=["paths", "command", "option", "empty"])
def test_the_default_command_is_open_when_the_first_word_names_no_command(argv, routed) -> None:
    assert typer.main.get_command(app).route(argv) == routed


def test_a_checkpoint_folder_named_like_a_command_opens(tmp_path, monkeypatch) -> None:
    (tmp_path / "scan").mkdir()
    (tmp_path / "cpt").mkdir()
    monkeypatch.chdir(tmp_path)
    group = typer.main.get_command(app)
    assert isinstance(group, DefaultCommandGroup)
    assert group.route(["scan", "cpt"]) == ["open", "scan", "cpt"]
    assert group.route(["scan", "missing"]) == ["scan", "missing"]


def test_a_usage_mistake_after_two_paths_is_the_open_commands_usage(make_llama_folder, capsys) -> None:
    base, cpt = make_llama_folder("base"), make_llama_folder("cpt", seed=1)
    assert main([str(base), str(cpt), "--label"]) == 2
    err = capsys.readouterr().err
    assert "Usage: diffract-tui open " in err and "Try 'diffract-tui open --help' for help." in err, err
    assert "Option '--label' requires an argument" in err, err
    assert "Traceback" not in err


def test_a_command_with_options_builds_the_command_tree_once(make_llama_folder, tmp_path, monkeypatch) -> None:
    """After a command ran, `main` asks whether the words named only a group (exit 2) — not when an option word
    shows they named more (rebuilding typer's tree costs ≈ 0.1 s of every process); a bare group still exits 2."""
    import typer.main as typer_main

    built: list[object] = []
    real = typer_main.get_command
    monkeypatch.setattr(typer_main, "get_command", lambda a: built.append(a) or real(a))
    base = make_llama_folder("base")
    assert main(["info", str(base), "--json"]) == 0
    assert len(built) == 1
    assert main(["rewind"]) == 2

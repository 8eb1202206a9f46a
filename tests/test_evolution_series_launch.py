"""The series order the CLI resolves at launch is the one every view uses (SPEC §10), on the real short training
run of `tests/series_run.py`: `diffract-tui` given the run's checkpoints in shuffled order opens them in step
order with the first step as the base, so the Heads grid's r stepped along the series is measured against the
first step (what the engine's `evolution` of r says), not against the first argument; `--steps` given at launch
makes folders without steps in their names a series, in that order, and the Evolution view plots exactly the
engine's evolution for it (the values checked against each checkpoint's own scan row)."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from analysis.run.session import HEAD_R, WHOLE
from diffract_tui.cli import main
from diffract_tui.node import NodeRef
from pilot import settle, sync
from series_run import NAMES, series_run  # noqa: F401 — the session fixture
from test_evolution_view import expected_plot, open_node   # the view tests' pilot step and plot oracle

SHUFFLED = (20, 0, 40, 10, 30)
SIZE = (120, 36)


@pytest.fixture
def launch(monkeypatch, tmp_path):
    """`launch(args)`: run `diffract-tui args…` up to the screen and return the session it would show."""
    shown: list = []
    monkeypatch.setattr("diffract_tui.cli.launch.run_explorer", shown.append)
    torch.set_num_threads(1)

    def run(args: list) -> object:
        assert main([*map(str, args), "--device", "cpu", "--cache-dir", str(tmp_path / "cache")]) == 0
        (session,) = shown
        return session

    yield run
    for s in shown:
        s.close()


def same(a: Path, b: Path) -> bool:
    return os.path.samefile(a, b)


@pytest.mark.slow
@sync
async def test_shuffled_arguments_step_the_heads_grid_r_against_the_series_first_step(series_run, launch) -> None:  # noqa: F811
    from diffract_tui.ui import DiffractApp

    session = launch([series_run.paths[st] for st in SHUFFLED])
    r_along = session.evolution(NodeRef(1, None), HEAD_R)  # the engine: whole-head r of L1 against the first step
    assert r_along.steps == (0, 10, 20, 30, 40)
    app = DiffractApp(session)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("3")
        await settle(pilot)
        grid = app.query_one("#heads")
        bar = app.query_one("#grid-bar")
        assert grid.metric == "r"
        for key, step, position in ((None, 10, 1), ("full_stop", 20, 2), ("full_stop", 30, 3),
                                    ("comma", 20, 2)):
            if key:
                await pilot.press(key)
                await settle(pilot)
            c = grid.choice()
            assert c.projection == WHOLE and same(session.targets[c.source].path, series_run.paths[step])
            text = str(bar.render())
            assert f"{NAMES[0]}→{NAMES[step]}" in text and f"({position + 1}/5)" in text, text
            assert [float(grid.result[1, h]) for h in range(4)] == [r_along.lines[h].values[position]
                                                                    for h in range(4)]
    assert session.series_info().steps == (0, 10, 20, 30, 40)
    assert same(session.base.path, series_run.paths[0])  # the first step is the base, not the first argument
    assert session.labels == [NAMES[s] for s in sorted(NAMES)]


@pytest.mark.slow
@sync
async def test_explicit_steps_at_launch_are_the_order_the_evolution_view_plots(series_run, launch, tmp_path) -> None:  # noqa: F811
    from analysis.run.scan import node_metrics
    from diffract_tui.ui import DiffractApp

    folders = {}
    for name, step in (("run-a", 20), ("run-b", 0), ("run-c", 40)):  # copies named without a step
        folders[step] = tmp_path / name
        shutil.copytree(series_run.paths[step], folders[step])
    session = launch([*folders.values(), "--steps", "20,0,40"])
    assert session.series_info().steps == (0, 20, 40)
    assert [c.label for c in session.checkpoints] == ["run-b", "run-a", "run-c"]
    node = NodeRef(1, "q", 2)
    app = DiffractApp(session)
    async with app.run_test(size=SIZE) as pilot:
        view = app.query_one("#evolution")
        view.action_toggle_summary()  # the summary panel hidden: its whole-model scan is not what is tested here
        await pilot.press("6")
        await open_node(pilot, node)
        assert not view.has_class("-no-series")
        for presses, metric in ((0, "pl_alpha"), (7, "delta_rel")):  # α, then Δ rel from the first step
            for _ in range(presses):
                await pilot.press("m")
            await settle(pilot)
            assert view.choice.metric == metric and view.choice.against == "first"
            ev = session.evolution(node, metric)
            assert ev.steps == (0, 20, 40) and ev.labels == ("run-b", "run-a", "run-c")
            assert view.plotted == expected_plot(node, ev, [0, 20, 40])
            for position, step in enumerate((0, 20, 40)):  # each value: that checkpoint's own row
                ckpt = session.checkpoints[position]
                assert same(ckpt.path, folders[step])
                if metric == "delta_rel" and position == 0:
                    assert ev.values[0] is None
                    continue
                row = node_metrics(ckpt, session.layout, 1, "q", 2, settings=session.settings, cache=None,
                                   delta_against=session.base if metric == "delta_rel" else None)
                assert math.isclose(ev.values[position], float(row[metric]), rel_tol=1e-9), (metric, step)


@pytest.mark.parametrize("steps, fragment", [("0,10,20", "gives 3 step(s) for 2 checkpoint(s)"),
                                             ("7,7", "repeats a step"), ("0,x", "not a comma-separated list")])
def test_bad_steps_at_launch_is_a_usage_error_before_any_screen(series_run, monkeypatch, tmp_path, capsys,  # noqa: F811
                                                                steps, fragment) -> None:
    shown: list = []
    monkeypatch.setattr("diffract_tui.cli.launch.run_explorer", shown.append)
    code = main([str(series_run.paths[0]), str(series_run.paths[10]), "--steps", steps,
                 "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and "--steps" in err and "Traceback" not in err, err
    assert shown == [] and not (tmp_path / "cache").exists()

"""The Evolution view (6), the tree's sparklines and the Heads grid stepped along a checkpoint series, driven by
keys (Textual pilot) on the real short training run of `tests/series_run.py`, given in shuffled order: what the
view plots is what `ExplorerSession.evolution` computes, the median-α summary is the median over each
checkpoint's own `scan` rows, a non-series input gets its one-line note, sparklines come from the cache only, and
`,` / `.` step the grid to the checkpoint whose engine α grid it then shows."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

from analysis.run.session import ExplorerSession
from diffract_tui.node import NodeRef
from pilot import settle, sync
from series_run import NAMES, series_run  # noqa: F401 — the session fixture

SHUFFLED = (20, 0, 40, 10, 30)   # the argument order: the series is put in step order by the engine


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One cache for the module: later tests read what earlier ones computed (as a user's second look does)."""
    return tmp_path_factory.mktemp("evolution-view-cache")


@pytest.fixture
def session(series_run, cache_dir):  # noqa: F811
    torch.set_num_threads(1)
    s = ExplorerSession.open([str(series_run.paths[st]) for st in SHUFFLED], device="cpu", cache_dir=cache_dir)
    yield s
    s.close()


def make_app(session):
    from diffract_tui.ui import DiffractApp

    return DiffractApp(session)


async def open_node(pilot, node: NodeRef) -> None:
    pilot.app.go_to_node(node)
    await settle(pilot)


def expected_plot(node: NodeRef, ev, steps) -> list[tuple[str, list[float], list[float]]]:
    """What the chart must draw for an evolution: each line's defined runs, rounded as `chart_values` rounds."""
    from diffract_tui.views.evolution import node_lines, segments
    from diffract_tui.widgets.charts import chart_values

    return [(name, chart_values(xs), chart_values(ys)) for name, values in node_lines(node, ev)
            for xs, ys in segments(steps, values)]


@pytest.mark.slow
@sync
async def test_plotted_numbers_equal_the_engine_for_every_metric(session) -> None:
    from diffract_tui.views.evolution import METRICS

    node = NodeRef(1, "q")
    steps = sorted(NAMES)
    app = make_app(session)
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.press("6")
        await open_node(pilot, node)
        view = app.query_one("#evolution")
        for i, choice in enumerate(METRICS):
            if i:
                await pilot.press("m")
                await settle(pilot)
            assert view.choice == choice
            ev = session.evolution(node, choice.metric, against=choice.against)
            assert ev.steps == tuple(steps)
            assert view.plotted == expected_plot(node, ev, steps), choice
            names = {name for name, _, _ in view.plotted}
            if choice.metric == "head_r":
                assert names == {f"head {h}" for h in range(4)}    # r of each head of the projection
            else:
                assert names == {"L1 q"} | {f"head {h}" for h in range(4)}
            if choice.metric == "delta_rel":   # no Δ at the first step: every line starts at step 10
                assert all(xs[0] == 10.0 for _, xs, _ in view.plotted)
            assert choice.short in str(view.query_one("#evolution-title").render())


@sync
async def test_delta_from_previous_differs_from_delta_from_first(session) -> None:
    """Δ rel from the previous step is the engine's ΔW of consecutive steps, not a relabelled Δ from the first."""
    from analysis.run.scan import node_metrics

    node = NodeRef(0, "k", 1)
    ordered, _ = session.series_order()
    app = make_app(session)
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.press("6")
        await open_node(pilot, node)
        view = app.query_one("#evolution")
        for _ in range(8):   # → "Δ rel from previous"
            await pilot.press("m")
        await settle(pilot)
        assert view.choice.against == "previous"
        ((name, xs, ys),) = view.plotted
        assert name == "L0 k h1" and xs == [10.0, 20.0, 30.0, 40.0]
        for y, before, ckpt in zip(ys, ordered, ordered[1:]):
            row = node_metrics(ckpt, session.layout, 0, "k", 1, delta_against=before, settings=session.settings,
                               cache=None)
            assert math.isclose(y, round(row["delta_rel"], 6), abs_tol=1e-12)
        first = session.evolution(node, "delta_rel").values[2:]
        assert all(abs(a - b) > 1e-3 for a, b in zip(ys[1:], first))
        # x writes the same numbers at full precision, with step and tokens
        export = view.export_table()
        engine = session.evolution(node, "delta_rel", against="previous").values
        assert [r["value"] for r in export.rows] == list(engine) and engine[0] is None
        assert [(r["step"], r["tokens"], r["against"]) for r in export.rows] == [
            (0, None, "previous"), (10, None, "previous"), (20, 10_000, "previous"), (30, None, "previous"),
            (40, 20_000, "previous")]


@sync
async def test_median_alpha_summary_is_the_median_of_each_checkpoints_scan_rows(session, series_run) -> None:  # noqa: F811
    from analysis.io.checkpoint import open_checkpoint
    from analysis.run.scan import scan

    app = make_app(session)
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.press("6")
        await settle(pilot)
        view = app.query_one("#evolution")
        assert view.summary_state == "done"
        summary = view.summary
    assert summary.steps == tuple(sorted(NAMES))
    assert summary.kinds == ("q", "k", "v", "o", "gate", "up", "down")
    drawn = {name: ys for name, _, ys in view.summary_plotted}
    for position, step in enumerate(sorted(NAMES)):
        ckpt = open_checkpoint(series_run.paths[step])
        try:   # this checkpoint alone, no cache: an independent computation of its α
            rows = list(scan([ckpt], heads=False, delta=False, settings=session.settings, cache=None))
        finally:
            ckpt.close()
        for kind in summary.kinds:
            alphas = [r["pl_alpha"] for r in rows if r["module"] == kind and r["layer"] is not None]
            assert len(alphas) == 2   # one matrix per layer
            median = statistics.median(alphas)
            assert math.isclose(summary.medians[kind][position], median, rel_tol=1e-9), (kind, step)
            assert math.isclose(drawn[kind][position], round(median, 6), abs_tol=1e-9)
    # training moved it: the q median fell from the random init's towards a heavier tail
    assert summary.medians["q"][-1] < summary.medians["q"][0]


@sync
async def test_esc_cancels_the_summary_and_s_twice_computes_it_again(session, tmp_path, monkeypatch) -> None:
    import time

    from analysis.progress import Cancelled

    fresh = ExplorerSession.open([str(c.path) for c in session.checkpoints], device="cpu",
                                 cache_dir=tmp_path / "cache")
    real, calls = fresh.alpha_summary, []

    def held_until_cancelled(progress, cancelled):
        """The first summary runs until esc cancels it (no race with a fast machine); later ones compute."""
        calls.append(1)
        if len(calls) > 1:
            return real(progress, cancelled)
        while not cancelled():
            time.sleep(0.01)
        raise Cancelled()

    monkeypatch.setattr(fresh, "alpha_summary", held_until_cancelled)
    try:
        app = make_app(fresh)
        async with app.run_test(size=(120, 36)) as pilot:
            await pilot.press("6")
            await pilot.pause(0.05)
            view = app.query_one("#evolution")
            assert view.summary_state == "running"
            await pilot.press("escape")
            await settle(pilot)
            assert view.summary_state == "cancelled" and view.summary is None
            assert "cancelled" in str(view.query_one("#evolution-summary-title").render())
            await pilot.press("j")          # moving on computes the node, not the cancelled summary
            await settle(pilot)
            assert view.summary_state == "cancelled"
            await pilot.press("s", "s")
            await settle(pilot)
            assert view.summary_state == "done" and view.summary is not None and len(calls) == 2
    finally:
        fresh.close()


@sync
async def test_a_non_series_input_shows_a_one_line_note(tmp_path) -> None:
    from analysis.generate import write_family
    from diffract_tui.views.evolution import NOT_A_SERIES

    family = write_family(tmp_path / "family", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2)
    s = ExplorerSession.open([family.base, family.domains["math"]], device="cpu", cache_dir=tmp_path / "cache")
    try:
        app = make_app(s)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("6")
            await open_node(pilot, NodeRef(0, "q"))
            view = app.query_one("#evolution")
            title = str(view.query_one("#evolution-title").render())
            assert title.startswith("Not a checkpoint series") and "\n" not in NOT_A_SERIES
            assert view.has_class("-no-series")
            assert not any(p.display for p in view.query("PlotextPlot"))
            assert view.summary_state == "idle" and view.plotted == []
            assert app.tree.sparklines == {}
            await pilot.press("3")
            await settle(pilot)
            bar = str(app.query_one("#grid-bar").render())
            assert "step" not in bar   # no series: the grid names no step
    finally:
        s.close()


@sync
async def test_sparklines_come_from_the_cache_and_follow_the_metric(session) -> None:
    from diffract_tui.widgets.tree import sparkline

    app = make_app(session)
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.press("6")
        await settle(pilot)                      # the summary scanned every matrix: their α is cached
        tree = app.tree
        await open_node(pilot, NodeRef(0, "q"))  # expands L0: its matrices' sparklines come from the cache
        for module in ("q", "k", "gate", "down"):
            values = session.evolution(NodeRef(0, module), "pl_alpha").values
            assert tree.sparklines[NodeRef(0, module)] == sparkline(values)
            assert sparkline(values) in tree._label(NodeRef(0, module)).plain
        for h in range(4):                       # the view computed L0 q's heads: sparklines from its result
            line = session.evolution(NodeRef(0, "q"), "pl_alpha").lines[h]
            assert tree.sparklines[NodeRef(0, "q", h)] == sparkline(line.values)
        await open_node(pilot, NodeRef(0, "v", 0))   # builds v's heads: h1 is neither cached nor computed
        assert NodeRef(0, "v", 0) in tree.sparklines and NodeRef(0, "v", 1) not in tree.sparklines
        await pilot.press("m")                   # α-weighted: all cached with α (one cache entry per node)
        await settle(pilot)
        values = session.evolution(NodeRef(0, "gate"), "pl_alpha_weighted").values
        assert tree.sparklines[NodeRef(0, "gate")] == sparkline(values)


def test_sparkline_scales_from_smallest_to_largest() -> None:
    from diffract_tui.widgets.tree import sparkline

    assert sparkline([None, 1.0, 2.0, 3.0]) == " ▁▅█"
    assert sparkline([2.0, 2.0]) == "▄▄"
    assert sparkline([None, None]) == ""


@pytest.mark.slow
@sync
async def test_stepping_the_grid_shows_each_checkpoints_engine_alpha_grid(session) -> None:
    app = make_app(session)
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.press("3")
        for _ in range(4):                       # r → A1 → A2 → A3 → α
            await pilot.press("m")
        await settle(pilot)
        grid = app.query_one("#heads")
        assert grid.metric == "alpha"
        bar = app.query_one("#grid-bar")
        # the shuffled arguments open in step order: the first checkpoint is step 0, the base
        assert session.labels[0] == "step-0" and "step 0 (1/5)" in str(bar.render())
        seen = []
        for key, label, step, position in ((".", "checkpoint-10", 10, 2), (".", "stage1-step20-tokens10K", 20, 3),
                                           (",", "checkpoint-10", 10, 2), (",", "step-0", 0, 1),
                                           (",", "step-0", 0, 1), (".", "checkpoint-10", 10, 2)):
            await pilot.press({",": "comma", ".": "full_stop"}[key])
            await settle(pilot)
            c = grid.choice()
            index = session.labels.index(label)
            assert c.source == index
            text = str(bar.render())
            assert f"{label}" in text and f"step {step}" in text and f"({position}/5)" in text
            np.testing.assert_array_equal(grid.result, session.alpha_grid(index, c.projection).values)
            seen.append(grid.result.copy())
        assert not np.array_equal(seen[0], seen[1])   # a different checkpoint: a different grid
        assert ", . step" in str(app.query_one("#grid-info").render())
        await pilot.press("m")                   # α → r: stepping walks the targets (base → target)
        await pilot.press("full_stop")
        await settle(pilot)
        # targets in step order against the first step: checkpoint-10 (the first target) → stage1-step20
        assert grid.metric == "r" and grid.choice().source + 1 == session.labels.index("stage1-step20-tokens10K")
        assert "step-0→stage1-step20-tokens10K" in str(bar.render()) and "step 20 · 10,000 tokens (3/5)" in \
            str(bar.render())


@sync
async def test_help_lists_the_new_keys(session) -> None:
    from diffract_tui.screens.help import HelpScreen

    app = make_app(session)
    async with app.run_test(size=(100, 40)) as pilot:
        await pilot.press("6")
        await settle(pilot)
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        rows = dict(app.screen.groups)
        keys = {k: w for k, w in rows["Evolution view"]}
        assert keys["m"].startswith("Next metric") and keys["s"].startswith("Summary panel")
        assert ("6", "Evolution view (checkpoint series)") in rows["App"]
        await pilot.press("escape")
        await pilot.press("3")
        await settle(pilot)
        await pilot.press("question_mark")
        await pilot.pause()
        keys = dict(dict(app.screen.groups)["Heads view"])
        assert keys[","].startswith("Series: previous step") and keys["."].startswith("Series: next step")

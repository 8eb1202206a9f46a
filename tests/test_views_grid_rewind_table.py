"""The Heads grid, Rewind and Table views driven by keys (Textual pilot) on a generated base + two domains
whose deltas have planted structure (`analysis.generate.write_family`): the grid shows the planted head
scores and agreement, Enter/space open and mark heads, three marked heads export as a SPEC §6 list naming
exactly them, the greedy pattern exports the same file as `diffract-tui rewind plan`, apply writes the
rewound checkpoint, and the table holds every node with the planted magnitudes, sorts, filters and opens."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from analysis.generate import write_family
from analysis.run.session import ExplorerSession
from diffract_tui.node import NodeRef
from pilot import settle, sync

CONFIG = dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2)
L, H = 2, 4


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """base, math, code (folder names = labels) with planted heads; written once for the module."""
    return write_family(tmp_path_factory.mktemp("family"), **CONFIG)


@pytest.fixture
def session(family, tmp_path: Path):
    s = ExplorerSession.open([family.base, family.domains["math"], family.domains["code"]], device="cpu",
                             cache_dir=tmp_path / "cache")
    yield s
    s.close()


def make_app(session):
    from diffract_tui.ui import DiffractApp

    return DiffractApp(session)


def render_text(widget) -> str:
    return widget.render().plain


# ------------------------------------------------------------------------------------------------
# Heads grid
# ------------------------------------------------------------------------------------------------


@sync
async def test_grid_shows_planted_head_scores_with_metric_and_scale(session, family) -> None:
    """Metric r: each cell equals the planted SPEC §4 score (manifest, float64 oracle) to float32 precision;
    the grid names the metric and its min–max scale."""
    from diffract_tui.widgets.heatmap import fmt_value

    app = make_app(session)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("3")
        await settle(pilot)
        grid = app.query_one("#heads")
        values = grid.heatmap.values
        expected = np.array(family.grid("expected_score"))
        assert values.shape == (L, H)
        np.testing.assert_allclose(values, expected, rtol=1e-4)
        text = render_text(grid.heatmap)
        assert "update magnitude r" in text
        assert f"linear {fmt_value(expected.min())}" in text and fmt_value(expected.max()) in text
        # the bar names what is compared: base → the first domain, whole head
        assert "base→math" in str(app.query_one("#grid-bar").render())
        # d: the other domain (planted with the same magnitudes in every domain)
        await pilot.press("d")
        await settle(pilot)
        assert "base→code" in str(app.query_one("#grid-bar").render())
        np.testing.assert_allclose(grid.heatmap.values, expected, rtol=1e-4)


@sync
async def test_grid_x_exports_the_shown_grid(session, family, tmp_path, monkeypatch) -> None:
    """x in the Heads view writes the grid on screen: one row per layer, the metric and what it compares,
    and every head's value at full precision."""
    from analysis.run.tables import read_table

    monkeypatch.chdir(tmp_path)
    app = make_app(session)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("3")
        await settle(pilot)
        values = app.query_one("#heads").heatmap.values.copy()
        await pilot.press("x")
        await pilot.pause()
    (csv,) = tmp_path.glob("diffract-heads-*.csv")
    rows, _ = read_table(csv)
    assert [int(r["layer"]) for r in rows] == list(range(L))
    assert {(r["metric"], r["compared"], r["projection"]) for r in rows} == {("r", "base→math", "all")}
    got = np.array([[float(r[f"h{h}"]) for h in range(H)] for r in rows])
    np.testing.assert_array_equal(got, values)


@sync
async def test_grid_agreement_recovers_shared_and_specific_heads(session, family) -> None:
    """Metric A2 (m m): planted shared heads have the identical ΔW in both domains → A2 = 1; specific heads
    have independent Gaussian directions → |A2| ≈ 1/√(dim) ≪ 0.3. The class counts are the manifest's."""
    app = make_app(session)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("3", "m", "m")
        await settle(pilot)
        grid = app.query_one("#heads")
        assert grid.choice().metric == "a2"
        values = grid.heatmap.values
        direction = family.grid("direction")
        for l in range(L):
            for h in range(H):
                if direction[l][h] == "shared":
                    assert values[l, h] == pytest.approx(1.0, abs=1e-3)
                else:
                    assert abs(values[l, h]) < 0.3
        classes = [c for row in family.grid("expected_class") for c in row]
        info = str(app.query_one("#grid-info").render())
        for name in ("agnostic", "specific", "inert"):
            assert f"{name} {classes.count(name)}" in info


@sync
async def test_grid_cursor_opens_head_and_marks_it(session) -> None:
    """tab focuses the grid; down/right move the cursor; Enter moves the tree to L1 q h1; space marks it."""
    from diffract_tui.widgets.heatmap import Heatmap

    app = make_app(session)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("3")
        await settle(pilot)
        await pilot.press("tab")
        assert isinstance(app.focused, Heatmap)
        await pilot.press("down", "l", "enter")
        await settle(pilot)
        assert app.current_node == NodeRef(1, "q", 1)
        assert isinstance(app.focused, Heatmap)  # the grid keeps the focus
        await pilot.press("space")
        await pilot.pause()
        assert session.marks == {(1, 1)}
        assert "marked" in render_text(app.query_one(Heatmap))
        await pilot.press("tab")  # tab toggles grid ⇄ tree
        assert app.focused is app.tree


# ------------------------------------------------------------------------------------------------
# Rewind
# ------------------------------------------------------------------------------------------------


async def _export(pilot, path: Path) -> None:
    """e in the Rewind view, replace the proposed file name with `path`, enter."""
    from diffract_tui.views.rewind import PromptInput

    await pilot.press("e")
    await pilot.pause()
    prompt = pilot.app.query_one(PromptInput)
    assert pilot.app.focused is prompt
    prompt.value = str(path)
    await pilot.press("enter")
    await pilot.pause()


@sync
async def test_three_marked_heads_export_a_spec_list_naming_exactly_them(session, tmp_path) -> None:
    """Mark three heads on the grid, pattern manual, export: the file is a valid diffract-rewind/1 list
    (read back by the engine's validator) with the SPEC §6 keys, naming exactly those heads."""
    from analysis.edit.rewind_list import read_rewind_list

    app = make_app(session)
    out = tmp_path / "marked.json"
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("3")
        await settle(pilot)
        await pilot.press("tab", "space", "l", "l", "space", "j", "l", "space")  # (0,0), (0,2), (1,3)
        await pilot.pause()
        assert session.marks == {(0, 0), (0, 2), (1, 3)}
        await pilot.press("4")
        await settle(pilot)
        await pilot.press("p")          # greedy → manual
        await settle(pilot)
        view = app.query_one("#rewind")
        assert view.pattern == "manual"
        await _export(pilot, out)
        assert not session.marks_dirty  # exported marks count as saved
    data = json.loads(out.read_text())
    assert {"format", "base", "target", "reference", "architecture", "pattern", "heads", "created_by"} <= set(data)
    assert data["format"] == "diffract-rewind/1"
    assert data["pattern"]["name"] == "manual" and data["pattern"]["gqa_policy"] == "group"
    assert data["architecture"] == {"model_type": "llama", "layers": L, "heads": H, "kv_heads": 2, "head_dim": 16}
    assert data["base"]["path"] == str(Path(session.base.path).resolve())
    assert [(e["layer"], e["head"]) for e in data["heads"]] == [(0, 0), (0, 2), (1, 3)]
    # no kv group has all its query heads marked → q and o only (GQA policy group)
    assert all(e["projections"] == ["q", "o"] for e in data["heads"])
    rl = read_rewind_list(out)
    assert [(e.layer, e.head) for e in rl.heads] == [(0, 0), (0, 2), (1, 3)]


@sync
async def test_greedy_export_is_the_cli_plan_byte_for_byte(session, family, tmp_path) -> None:
    """Greedy at f = 0.30 (+ three times from 0.15): ⌊0.3·8⌋ = 2 heads, the planted low-importance kv group;
    the exported file equals `diffract-tui rewind plan … --pattern greedy --fraction 0.3` byte for byte."""
    from diffract_tui.cli import main

    app = make_app(session)
    ours = tmp_path / "ui.json"
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("4")
        await settle(pilot)
        await pilot.press("plus", "plus", "plus")
        await settle(pilot)
        view = app.query_one("#rewind")
        assert view.fraction == 0.3 and view.pattern == "greedy"
        assert [(e.layer, e.head) for e in view.plan.heads] == sorted(family.low_importance)
        share = view.preview.share_removed
        await _export(pilot, ours)
    cli = tmp_path / "cli.json"
    assert main(["rewind", "plan", str(family.base), str(family.domains["math"]), "--out", str(cli),
                 "--pattern", "greedy", "--fraction", "0.3"]) == 0
    assert ours.read_bytes() == cli.read_bytes()
    heads = [(e["layer"], e["head"]) for e in json.loads(ours.read_text())["heads"]]
    assert heads == sorted(family.low_importance)
    # the low heads were planted at ≤ 1.5e-3 relative: they hold a tiny share of the attention ‖Δ‖²
    assert 0 < share < 1e-3


@sync
async def test_apply_writes_the_rewound_checkpoint(session, family, tmp_path, monkeypatch) -> None:
    """A in the Rewind view writes a new folder where the listed heads' q rows equal the base and the
    others stay at the target; switching to another view meanwhile does not stop the writing."""
    from analysis.io.checkpoint import open_checkpoint
    from analysis.model.heads import head_slice
    from diffract_tui.views.rewind import PromptInput

    monkeypatch.chdir(tmp_path)
    app = make_app(session)
    out = tmp_path / "rewound"
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("4")
        await settle(pilot)
        heads = [(e.layer, e.head) for e in app.query_one("#rewind").plan.heads]
        await pilot.press("A")
        await pilot.pause()
        app.query_one(PromptInput).value = str(out)
        await pilot.press("enter", "1")
        await settle(pilot)
    assert heads == [(1, 2)]  # ⌊0.15·8⌋ = 1: the lowest planted score
    rewound = open_checkpoint(out)
    base, target = open_checkpoint(family.base), open_checkpoint(family.domains["math"])
    layout = session.layout
    for l in range(L):
        for h in range(H):
            got = head_slice(rewound, layout, l, "q", h)
            want = head_slice(base if (l, h) in heads else target, layout, l, "q", h)
            assert torch.equal(got, want)


@sync
async def test_rewind_escape_closes_the_prompt_without_writing(session, tmp_path, monkeypatch) -> None:
    from diffract_tui.views.rewind import PromptInput

    monkeypatch.chdir(tmp_path)
    app = make_app(session)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("4")
        await settle(pilot)
        await pilot.press("e")
        await pilot.pause()
        assert app.focused is app.query_one(PromptInput)
        await pilot.press("escape")
        await pilot.pause()
        assert not app.query_one("#rewind").has_class("-prompt")
    assert list(tmp_path.glob("*.json")) == []


# ------------------------------------------------------------------------------------------------
# Table
# ------------------------------------------------------------------------------------------------


@sync
async def test_table_rows_sort_filter_and_open(session, family, tmp_path, monkeypatch) -> None:
    """Every matrix and head is a row; Δrel of a q head is the planted magnitude; S/s sort by the cursor
    column; the filter keeps matching rows; `x` exports exactly the rows shown; Enter opens the row's node."""
    from analysis.run.tables import read_table
    from diffract_tui.views.table import MetricsTable

    monkeypatch.chdir(tmp_path)
    app = make_app(session)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("5")
        await settle(pilot)
        view = app.query_one("#table")
        table = app.query_one(MetricsTable)
        layout = session.layout
        matrices = sum(1 for layer in layout.layers for m in layer.modules if len(m.shape) == 2)
        matrices += sum(1 for m in layout.globals if len(m.shape) == 2)
        heads = L * (2 * H + 2 * layout.num_kv_heads)
        assert view.complete and len(view.records) == matrices + heads == table.row_count
        rec = view.records[NodeRef(1, "q", 2)]
        assert rec.values["rel:math"] == pytest.approx(family.head(1, 2).magnitude, rel=1e-4)
        # sort by Δrel math, largest first
        await pilot.press("tab")
        assert app.focused is table
        col = ["node", "shape"] + [c.key for c in view.columns]
        for _ in range(col.index("rel:math")):
            await pilot.press("right")
        await pilot.press("S")
        await pilot.pause()
        rels = [r.values.get("rel:math") for r in view.visible_records()]
        finite = [v for v in rels if v is not None and not math.isnan(v)]
        five = [float(f"{v:.5g}") for v in finite]  # the view sorts to 5 digits: round-off ties keep tree order
        assert five == sorted(five, reverse=True) and float(f"{rels[0]:.5g}") == max(five)
        assert table.get_row_at(0)[0] == view.visible_records()[0].label
        await pilot.press("s")
        await pilot.pause()
        assert float(f"{view.visible_records()[0].values.get('rel:math'):.5g}") == min(five)
        # filter: words, then a condition
        await pilot.press("f", *"q h")
        await pilot.pause()
        assert table.row_count == L * H and all("q h" in r.label for r in view.visible_records())
        await pilot.press("ctrl+u", *"rel>0.1")
        await pilot.pause()
        assert table.row_count == sum(1 for r in view.records.values()
                                      if any((r.values.get(k) or 0) > 0.1 for k in ("rel:math", "rel:code")))
        await pilot.press("enter")     # keep the filter, back to the table
        assert app.focused is table
        await pilot.press("x")         # the app's export of the table as shown
        await pilot.pause()
        (csv,) = tmp_path.glob("diffract-scan-base-math-code-heads-filtered-*.csv")
        rows, _ = read_table(csv)
        assert [r["node"] for r in rows] == [r.label for r in view.visible_records()]
        assert "delta_rel[math]" in rows[0]
        target = view.visible_records()[0].node
        await pilot.press("enter")
        await settle(pilot)
        assert app.current_node == target


# ------------------------------------------------------------------------------------------------
# More of the grid: projections, A1, α, Esc, and the widget's geometry
# ------------------------------------------------------------------------------------------------


@sync
async def test_grid_projections_and_a1_against_direct_computation(session, family) -> None:
    """p → q: r of the q slices is the planted ‖ΔW^q_h‖/‖W₀^q_h‖; p p → v: the planted kv magnitude of
    g(h). m → A1 of the q slices equals the mean row maximum of |U₀ᵀU_d| from a full float64 SVD."""
    from analysis.model.heads import head_slice

    app = make_app(session)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("3", "p")
        await settle(pilot)
        grid = app.query_one("#heads")
        assert grid.choice().projection == "q"
        np.testing.assert_allclose(grid.heatmap.values, np.array(family.grid("magnitude")), rtol=1e-4)
        await pilot.press("p", "p")
        await settle(pilot)
        assert grid.choice().projection == "v"
        np.testing.assert_allclose(grid.heatmap.values, np.array(family.grid("kv_magnitude")), rtol=1e-4)
        await pilot.press("m")
        await settle(pilot)
        assert (grid.choice().metric, grid.choice().projection) == ("a1", "q")
        values = grid.heatmap.values
    for l in range(L):
        for h in range(H):
            w0 = head_slice(session.base, session.layout, l, "q", h, dtype=torch.float64)
            wd = head_slice(session.targets[0], session.layout, l, "q", h, dtype=torch.float64)
            u0 = torch.linalg.svd(w0, full_matrices=False).U
            ud = torch.linalg.svd(wd, full_matrices=False).U
            expected = float((u0.T @ ud).abs().amax(dim=1).mean())
            assert values[l, h] == pytest.approx(expected, abs=1e-6)


@sync
async def test_grid_alpha_shows_each_heads_fit_in_its_cell(session) -> None:
    """m×4 → α of the base's q slices, then p → k slices: cell (ℓ, h) holds `pl_alpha` of head h (q) or of
    kv head g(h) (k) from the engine's per-node fit, and the note says these fits are unreliable (16 values)."""
    from analysis.run.scan import node_metrics

    app = make_app(session)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("3", "m", "m", "m", "m")
        await settle(pilot)
        grid = app.query_one("#heads")
        assert grid.choice().metric == "alpha" and grid.choice().source == 0
        q_values = grid.heatmap.values.copy()
        assert "16 eigenvalues" in str(app.query_one("#grid-info").render())
        await pilot.press("p")
        await settle(pilot)
        k_values = grid.heatmap.values.copy()
    for l in range(L):
        for h in range(H):
            q = node_metrics(session.base, session.layout, l, "q", h, settings=session.settings, cache=None)
            k = node_metrics(session.base, session.layout, l, "k", session.layout.kv_group(h),
                             settings=session.settings, cache=None)
            assert q_values[l, h] == pytest.approx(q["pl_alpha"], rel=1e-9)
            assert k_values[l, h] == pytest.approx(k["pl_alpha"], rel=1e-9)


@sync
async def test_escape_cancels_a_grid_computation(session, monkeypatch) -> None:
    """A grid pass that is still running when Esc is pressed stops (its progress callback raises), no grid is
    drawn, and showing the view again computes it afresh."""
    import threading

    from analysis.run.session import ExplorerSession

    real = ExplorerSession.magnitude_grids
    started, stopped = threading.Event(), threading.Event()

    def slow(session_, target_index, progress, cancelled):
        started.set()
        try:
            while True:  # until the worker is cancelled: progress then raises
                progress(1, 2, "waiting")
                threading.Event().wait(0.02)
        finally:
            stopped.set()

    monkeypatch.setattr(ExplorerSession, "magnitude_grids", slow)
    app = make_app(session)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("3")
        for _ in range(50):
            await pilot.pause(0.05)
            if started.is_set():
                break
        assert started.is_set()
        await pilot.press("escape")
        await settle(pilot)
        assert stopped.is_set()
        grid = app.query_one("#heads")
        assert grid.heatmap.values is None and grid.result is None
        monkeypatch.setattr(ExplorerSession, "magnitude_grids", real)
        await pilot.press("1", "3")
        await settle(pilot)
        assert grid.heatmap.values is not None and grid.heatmap.values.shape == (L, H)


@sync
async def test_heatmap_fits_a_large_model_at_80_columns() -> None:
    """32 layers × 32 heads in a 56×20 widget: 1-character cells, a window of layers that follows the cursor,
    and the hidden range named; every rendered line fits the width."""
    from textual.app import App

    from diffract_tui.widgets.heatmap import Heatmap

    class One(App):
        def compose(self):
            yield Heatmap(id="grid")

    values = np.arange(32 * 32, dtype=np.float64).reshape(32, 32)
    app = One()
    async with app.run_test(size=(56, 20)) as pilot:
        grid = app.query_one(Heatmap)
        grid.set_data(values, title="test metric")
        grid.focus()
        await pilot.pause()
        text = grid.render().plain
        assert all(len(line) <= 56 for line in text.splitlines())
        assert "layers 0–15 of 32" in text
        assert f"linear 0 " in text and "1023" in text
        for _ in range(20):
            await pilot.press("j")
        await pilot.press("l", "l")
        await pilot.pause()
        assert grid.cursor == (20, 2)
        text = grid.render().plain
        assert "layers 5–20 of 32" in text and "L20 h2 = 642" in text


@sync
async def test_reference_pattern_export_is_the_cli_plan(session, family, tmp_path) -> None:
    """r → pattern reference with the other domain (code) as reference, f = 0.25: the same file as
    `diffract-tui rewind plan base math --pattern reference --reference code --fraction 0.25`."""
    from diffract_tui.cli import main

    app = make_app(session)
    ours = tmp_path / "ui.json"
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("4", "r", "plus", "plus")
        await settle(pilot)
        view = app.query_one("#rewind")
        assert (view.pattern, view.fraction, view.variant) == ("reference", 0.25, "lowest")
        await _export(pilot, ours)
    cli = tmp_path / "cli.json"
    assert main(["rewind", "plan", str(family.base), str(family.domains["math"]), "--out", str(cli),
                 "--pattern", "reference", "--reference", str(family.domains["code"]), "--fraction", "0.25"]) == 0
    assert ours.read_bytes() == cli.read_bytes()
    assert json.loads(ours.read_text())["reference"]["path"] == str(Path(family.domains["code"]).resolve())


@sync
async def test_heatmap_under_no_color_shades_cells(monkeypatch) -> None:
    """NO_COLOR (Textual removes it from the environment and sets app.no_color): cells and the scale are
    drawn with ░▒▓█ from low to high instead of colours."""
    from textual.app import App

    from diffract_tui.widgets.heatmap import Heatmap

    class One(App):
        def compose(self):
            yield Heatmap(id="grid")

    monkeypatch.setenv("NO_COLOR", "1")
    app = One()
    async with app.run_test(size=(40, 12)) as pilot:
        assert app.no_color
        grid = app.query_one(Heatmap)
        grid.set_data(np.array([[0.0, 1.0], [2.0, 3.0]]), title="t")
        await pilot.pause()
        lines = grid.render().plain.splitlines()
        row0 = next(line for line in lines if line.startswith("L0"))
        row1 = next(line for line in lines if line.startswith("L1"))
        assert "█" in row1 and "█" not in row0            # the maximum is the full block
        scale = next(line for line in lines if line.startswith("scale"))
        assert re.search("░+▒+▓+█+", scale)                  # the swatch runs low → high
        assert "░" in row0 and "▓" in row1                 # 0 → ░ (lowest quarter), 2 → ▓


@sync
async def test_manual_pattern_without_marks_says_how_to_mark(session) -> None:
    app = make_app(session)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("4", "p")
        await settle(pilot)
        view = app.query_one("#rewind")
        assert view.pattern == "manual" and view.plan is None
        assert "no heads are marked" in str(app.query_one("#rewind-summary").render())
        await pilot.press("e")          # nothing to export: a warning, no prompt
        await pilot.pause()
        assert not view.has_class("-prompt")


@sync
async def test_marks_made_in_the_tree_reach_grid_and_manual_plan_at_once(session) -> None:
    """space on a head in the tree: the grid shows the mark and the visible manual rewind plan names the head
    right after the key is handled (one pilot pause, no polling interval), and unmarking empties the plan."""
    from diffract_tui.widgets.heatmap import Heatmap

    app = make_app(session)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("3")
        await settle(pilot)
        app.go_to_node(NodeRef(1, "q", 2))
        await pilot.pause()
        await pilot.press("space")
        await pilot.pause()
        assert session.marks == {(1, 2)}
        assert app.query_one(Heatmap).marks == frozenset({(1, 2)})
        await pilot.press("4", "p")                    # Rewind view, pattern greedy → manual
        await settle(pilot)
        view = app.query_one("#rewind")
        assert view.pattern == "manual"
        assert [(e.layer, e.head) for e in view.plan.heads] == [(1, 2)]
        app.go_to_node(NodeRef(0, "q", 1))
        await pilot.pause()
        await pilot.press("space")
        await settle(pilot)
        assert [(e.layer, e.head) for e in view.plan.heads] == [(0, 1), (1, 2)]
        await pilot.press("space")                     # unmark (0, 1) again
        await settle(pilot)
        assert [(e.layer, e.head) for e in view.plan.heads] == [(1, 2)]

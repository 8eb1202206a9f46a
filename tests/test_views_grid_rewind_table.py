"""The Heads grid, Rewind and Table views driven by keys (Textual pilot) on a generated base + two domains
whose deltas have planted structure (`analysis.generate.write_family`): the grid shows the planted head
scores and agreement, Enter/space open and mark heads, three marked heads export as a SPEC §6 list naming
exactly them, the greedy pattern exports the same file as `diffract-tui rewind plan`, apply writes the
rewound checkpoint, and the table holds every node with the planted magnitudes, sorts, filters and opens."""

from __future__ import annotations

import asyncio
import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from analysis.generate import write_family
from analysis.session import ExplorerSession
from diffract_tui.node import NodeRef

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


def sync(test):
    """Run an async pilot test with asyncio.run (no async pytest plugin needed)."""

    @functools.wraps(test)
    def run(*args, **kwargs):
        return asyncio.run(test(*args, **kwargs))

    return run


def make_app(session):
    from diffract_tui.ui import DiffractApp

    return DiffractApp(session)


async def settle(pilot) -> None:
    """Let timers fire and every worker finish, then let the UI draw the results."""
    app = pilot.app
    for _ in range(3):
        await pilot.pause(0.1)
        await app.workers.wait_for_complete()
    await pilot.pause()


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
    from analysis.rewind_list import read_rewind_list

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
    others stay at the target."""
    from analysis.checkpoint import open_checkpoint
    from analysis.heads import head_slice
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
        await pilot.press("enter")
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
async def test_table_rows_sort_filter_and_open(session, family) -> None:
    """Every matrix and head is a row; Δrel of a q head is the planted magnitude; S/s sort by the cursor
    column; the filter keeps matching rows; Enter opens the row's node."""
    from diffract_tui.views.table import MetricsTable

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
        assert finite == sorted(finite, reverse=True) and rels[0] == max(finite)
        assert table.get_row_at(0)[0] == view.visible_records()[0].label
        await pilot.press("s")
        await pilot.pause()
        assert [r.values.get("rel:math") for r in view.visible_records()][0] == min(finite)
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
        target = view.visible_records()[0].node
        await pilot.press("enter")
        await settle(pilot)
        assert app.current_node == target

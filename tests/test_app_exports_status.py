"""Exports at full precision (issue 10 B.2), the Table's cursor and columns (B.5) and the status line's progress
(B.6), driven by keys at 80×24 (Textual pilot) on a generated base + two domains (`analysis.generate.write_family`):
`x` writes the engine's floats (read back equal, ==) with α's reliability in its own column, names a whole-model
table by what it holds and says where the file went; a sort or filter lands on the first row, g/G go to the first
and last row, the node column keeps its width; marks and device stay visible while jobs run, each job in its own
slot; Esc names the cancelled table scan; a cold node does not show the previous node's chart."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest

from analysis.generate import write_family
from analysis.run.session import ExplorerSession
from diffract_tui.node import NodeRef
from pilot import sync

CONFIG = dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2)
LABELS = ("base", "math", "code")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """base, math, code (folder names = labels); written once for the module."""
    return write_family(tmp_path_factory.mktemp("family"), **CONFIG)


@pytest.fixture
def session(family, tmp_path: Path):
    s = ExplorerSession.open([family.base, family.domains["math"], family.domains["code"]], device="cpu",
                             cache_dir=tmp_path / "cache")
    yield s
    s.close()


def make_app(session, notices: list[str] | None = None):
    """The app; with `notices`, every notification's text is appended to it."""
    from diffract_tui.ui import DiffractApp

    app = DiffractApp(session)
    if notices is not None:
        real = app.notify

        def notify(message, *args, **kwargs):
            notices.append(str(message))
            return real(message, *args, **kwargs)

        app.notify = notify  # type: ignore[method-assign]
    return app


async def settle(pilot) -> None:
    """Until the active view shows the cursor's node and every worker has finished (at most 30 s)."""
    app = pilot.app
    for _ in range(300):
        await pilot.pause(0.1)
        await app.workers.wait_for_complete()
        if not app.busy:
            break
    await pilot.pause()


async def go_to(pilot, layer: int, head: int) -> None:
    """From the root: ] per layer, l l into its first module (q), l l onto h0, then j per head."""
    for _ in range(layer + 1):
        await pilot.press("right_square_bracket")
    await pilot.press("l", "l", "l", "l", *("j" * head))


def label_text(app, selector: str) -> str:
    from textual.widgets import Label

    return str(app.query_one(selector, Label).render())


def exported(folder: Path, pattern: str) -> tuple[Path, list[dict], dict]:
    """The one CSV matching `pattern` in `folder`, read back (rows, metadata)."""
    from analysis.run.tables import read_table

    (path,) = folder.glob(pattern)
    rows, meta = read_table(path)
    return path, rows, meta


def more_than_shown(values: list[float]) -> bool:
    """True when some value carries more than the 3 significant digits the views show."""
    return any(float(f"{v:.3g}") != v for v in values)


# ------------------------------------------------------------------------------------------------
# B.2 exports
# ------------------------------------------------------------------------------------------------


@sync
async def test_table_export_holds_the_scan_values_at_full_precision(session, tmp_path, monkeypatch) -> None:
    """Table view, `x`: `diffract-scan-base-math-code-heads-*.csv` (named by what it holds, not the tree node);
    each row's Δrel, ρ, α and srank equal (==) the engine's scan rows; α's reliability is its own bool column;
    the notice gives the file's full path."""
    from analysis.run.scan import scan
    from diffract_tui.views.table import node_of

    monkeypatch.chdir(tmp_path)
    notices: list[str] = []
    app = make_app(session, notices)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("5")
        await settle(pilot)
        assert app.query_one("#table").complete
        await pilot.press("x")
        await pilot.pause()
    path, rows, meta = exported(tmp_path, "diffract-scan-base-math-code-heads-*.csv")
    assert any(f"Wrote table ({len(rows)} rows) to {path.resolve()}" == n for n in notices), notices
    assert meta["view"] == "table" and meta["node"] is None  # a whole-model table is of no tree node
    engine: dict[tuple[NodeRef, str, str], dict] = {}
    for row in scan(session.checkpoints, heads=True, delta=True, settings=session.settings, cache=session.cache):
        engine[(node_of(row), row["operation"], row["checkpoint"])] = row
    assert len(rows) == len({n for n, _, _ in engine})
    alphas = []
    for out in rows:
        node = NodeRef(out["layer"], out["module"], out["head"])
        assert out["node"] == node.label()
        for label in LABELS:
            weight = engine[(node, "weight", label)]
            assert out[f"pl_alpha[{label}]"] == weight["pl_alpha"]
            assert out[f"pl_alpha_reliable[{label}]"] is bool(weight["pl_alpha_reliable"])
            alphas.append(weight["pl_alpha"])
        for label in LABELS[1:]:
            delta = engine[(node, "delta", label)]
            for metric in ("delta_rel", "delta_rho", "stable_rank"):
                assert out[f"{metric}[{label}]"] == delta[metric], (node, metric, label)
    assert more_than_shown(alphas)  # not the 3-digit display strings
    assert {r[f"pl_alpha_reliable[{label}]"] for r in rows for label in LABELS} <= {True, False}
    assert "7.2?" not in path.read_text(encoding="utf-8") and "?" not in path.read_text(encoding="utf-8")


@sync
async def test_spectrum_and_delta_exports_equal_the_engine(session, tmp_path, monkeypatch) -> None:
    """Spectrum view on L1 q h2, `x`: one row per checkpoint whose metrics equal (==) `session.spectrum(node)`,
    λ max the largest eigenvalue, `pl_alpha_reliable` its own column; Delta view, `x`: the same for
    `session.delta(node)`; each notice gives the full path."""
    from diffract_tui.views.delta import DELTA_ROWS
    from diffract_tui.views.spectrum import SPECTRUM_ROWS

    monkeypatch.chdir(tmp_path)
    node = NodeRef(1, "q", 2)
    notices: list[str] = []
    app = make_app(session, notices)
    async with app.run_test(size=(80, 24)) as pilot:
        await go_to(pilot, 1, 2)
        await settle(pilot)
        assert app.current_node == node
        await pilot.press("x")
        await pilot.pause()
        await pilot.press("2")
        await settle(pilot)
        await pilot.press("x")
        await pilot.pause()
    path, rows, meta = exported(tmp_path, "diffract-spectrum-L1-q-h2-*.csv")
    assert meta["node"] == "L1 q h2" and f"Wrote table (3 rows) to {path.resolve()}" in notices
    spectra = session.spectrum(node).spectra
    assert [r["checkpoint"] for r in rows] == [s.label for s in spectra] == list(LABELS)
    for out, spec in zip(rows, spectra):
        assert out["node"] == "L1 q h2"
        for _, key, _ in SPECTRUM_ROWS:
            want = float(spec.evals.max()) if key == "lambda_max" else spec.metrics.get(key)
            if want is not None:
                assert out[key] == want, key
        assert out["pl_alpha_reliable"] is bool(spec.metrics.get("pl_alpha_reliable", True))
    assert more_than_shown([r["pl_alpha"] for r in rows] + [r["lambda_max"] for r in rows])
    path, rows, _ = exported(tmp_path, "diffract-delta-L1-q-h2-*.csv")
    assert f"Wrote table (2 rows) to {path.resolve()}" in notices
    deltas = session.delta(node).deltas
    assert [r["checkpoint"] for r in rows] == [d.label for d in deltas] == list(LABELS[1:])
    for out, d in zip(rows, deltas):
        for _, key in DELTA_ROWS:
            if d.metrics.get(key) is not None:
                assert out[key] == d.metrics[key], key
        assert out["pl_alpha_reliable"] is bool(d.metrics.get("pl_alpha_reliable", True))
    assert more_than_shown([r["delta_rel"] for r in rows])


# ------------------------------------------------------------------------------------------------
# B.5 table
# ------------------------------------------------------------------------------------------------


@sync
async def test_table_sort_and_filter_land_on_the_first_row_and_g_G_go_to_the_ends(session) -> None:
    """80×24: cursor 30 rows down, S → cursor on row 0 and scrolled to the top; G/End → last row, g/Home → first
    (the table's keys win over the tree's g/G: the tree's cursor stays); a filter also lands on row 0."""
    from diffract_tui.views.table import MetricsTable

    app = make_app(session)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("5")
        await settle(pilot)
        table = app.query_one(MetricsTable)
        await pilot.press("tab")
        assert app.focused is table
        await pilot.press("right", "right", *(["down"] * 30))
        await pilot.pause()
        assert table.cursor_coordinate.row == 30 and table.scroll_y > 0
        await pilot.press("S")
        await pilot.pause()
        assert table.cursor_coordinate.row == 0 and table.scroll_y == 0
        node = app.current_node
        for last, first in (("G", "g"), ("end", "home")):
            await pilot.press(last)
            await pilot.pause()
            assert table.cursor_coordinate.row == table.row_count - 1 and table.scroll_y > 0
            await pilot.press(first)
            await pilot.pause()
            assert table.cursor_coordinate.row == 0 and table.scroll_y == 0
        assert app.current_node == node  # the tree's g/G did not run
        await pilot.press(*(["down"] * 12), "f", *"h")
        await pilot.pause()
        assert table.cursor_coordinate.row == 0 and table.scroll_y == 0


@sync
async def test_table_node_column_keeps_its_width_and_names_the_cut_node(session) -> None:
    """80×24: a node with a 31-character name is cut to the node column's fixed width with "…", the first value
    column still fits on screen, and with the cursor on that row the info line gives the whole name."""
    from rich.cells import cell_len

    from diffract_tui.views.table import NODE_WIDTH, MetricsTable, Record

    app = make_app(session)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("5")
        await settle(pilot)
        view = app.query_one("#table")
        table = app.query_one(MetricsTable)
        long = NodeRef(None, "cls.predictions.transform.dense")
        view.records[long] = Record(long, -1, "mlp", "64×64", {"rel:math": 0.5})
        view._rebuild()
        await pilot.pause()
        assert view._shown_keys[0] == long
        cell = table.get_row_at(0)[0]
        assert cell == "cls.predictions…" and cell_len(cell) == NODE_WIDTH
        widths = [c.get_render_width(table) for c in table.ordered_columns]
        assert table.ordered_columns[0].width == NODE_WIDTH
        assert sum(widths[:3]) <= table.size.width  # node, shape and Δrel math on an 80-column screen
        await pilot.press("tab", "home")
        await pilot.pause()
        assert label_text(app, "#table-info").startswith("cls.predictions.transform.dense · ")


# ------------------------------------------------------------------------------------------------
# B.6 status and progress
# ------------------------------------------------------------------------------------------------


@sync
async def test_status_keeps_marks_and_device_and_shows_each_job(session) -> None:
    """80×24: two jobs report long texts: "marks 0 │ cpu" stays whole on screen, the jobs share the line as
    `compute all 12/48 · table scan 3/200`, the progress text ends before the bar; when one ends the other's whole text
    is shown; when both end the key hint is back."""
    from textual.widgets import Label, ProgressBar

    app = make_app(session)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        whole = "compute all: 12/48 L1 mlp down_proj and a long tail of words to cover the line"
        app.report_progress("scan", 0.25, whole)
        app.report_progress("table", 0.02, "table scan: 3/200 L0 q h1")
        await pilot.pause()
        text = app.query_one("#status-text", Label)
        work = app.query_one("#status-work", Label)
        bar = app.query_one("#status-bar", ProgressBar)
        assert str(text.render()).endswith("│ marks 0 │ cpu")
        assert text.region.right <= 80 and text.region.width >= len(str(text.render()))
        assert str(work.render()) == "compute all 12/48 · table scan 3/200"
        assert work.region.right <= bar.region.x and bar.region.right <= 80
        app.work_done("table")
        await pilot.pause()
        shown = str(work.render())
        assert shown.startswith("compute all: 12/48") and (shown == whole or shown.endswith("…"))
        assert str(text.render()).endswith("│ marks 0 │ cpu") and work.region.right <= bar.region.x
        app.work_done("scan")
        await pilot.pause()
        assert app.query_one("#status-hint").region.width > 0 and not work.region.width
        assert "? help" in label_text(app, "#status-hint")


@sync
async def test_esc_names_the_cancelled_table_scan(session, monkeypatch) -> None:
    """Esc during the whole-model scan: the Table says `table scan cancelled (N of M rows)`, not a node's name."""
    import analysis.run.scan as scan_module

    real = scan_module.scan

    def slow(*args, **kwargs):
        for row in real(*args, **kwargs):
            time.sleep(0.05)
            yield row

    monkeypatch.setattr(scan_module, "scan", slow)
    app = make_app(session)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("5")
        view = app.query_one("#table")
        for _ in range(100):
            await pilot.pause(0.1)
            if view.scan_progress[0] >= 3:
                break
        await pilot.press("escape")
        await pilot.pause(0.3)
        info = label_text(app, "#table-info")
        m = re.match(r"table scan cancelled \((\d+) of (\d+) rows\)", info)
        assert m, info
        done, total = int(m.group(1)), int(m.group(2))
        assert 3 <= done < total
        await app.workers.wait_for_complete()


@sync
async def test_cold_node_does_not_show_the_previous_chart(session, monkeypatch) -> None:
    """Spectrum of L1 q h0 drawn; j to a cold h1 while its computation is held: the title says computing, the
    chart has no series, legend and metric panel are empty (not h0's); released, h1's own chart comes."""
    from diffract_tui.views.spectrum import SpectrumView
    from diffract_tui.widgets.metric_panel import MetricPanel

    app = make_app(session)
    async with app.run_test(size=(80, 24)) as pilot:
        await go_to(pilot, 1, 0)
        await settle(pilot)
        view = app.query_one(SpectrumView)
        plot = app.query_one("#spectrum-plot")
        assert view.result is not None and plot.plt._active.monitor.x  # h0 drawn
        release = threading.Event()
        real = SpectrumView.compute

        def held(self, node, progress, cancelled):
            release.wait(10)
            return real(self, node, progress, cancelled)

        monkeypatch.setattr(SpectrumView, "compute", held)
        await pilot.press("j")
        await pilot.pause(0.4)
        assert app.current_node == NodeRef(1, "q", 1) and view.result is None
        assert label_text(app, "#spectrum-title").endswith("L1 q h1 — computing…")
        assert plot.plt._active.monitor.x == []
        assert label_text(app, "#spectrum-legend") == ""
        assert app.query_one("#spectrum-metrics", MetricPanel).row_count == 0
        release.set()
        await settle(pilot)
        assert view.result is not None and plot.plt._active.monitor.x
        assert app.query_one("#spectrum-metrics", MetricPanel).row_count > 0

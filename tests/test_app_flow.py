"""Pilot-driven flows through the explorer on generated checkpoints: navigate by keys, see the engine's
numbers drawn, mark heads, export a SPEC §6 rewind list, cancel work, use cached results, quit safely."""

from __future__ import annotations

import asyncio
import json
import math
import threading
from pathlib import Path

import pytest
import torch

from analysis.run.session import ExplorerSession
from diffract_tui.node import NodeRef
from tests.conftest import llama_checkpoint, write_safetensors

LAYERS, HIDDEN, HEADS, KV_HEADS = 2, 64, 4, 2
HEAD_DIM = HIDDEN // HEADS


def write_folder(folder: Path, config: dict, tensors: dict) -> Path:
    write_safetensors(folder / "model.safetensors", tensors)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture
def family(tmp_path: Path) -> list[Path]:
    """A tiny Llama base and two CPT checkpoints = base + small seeded updates (a 'chem' and a 'code' domain)."""
    config, base = llama_checkpoint(layers=LAYERS, hidden=HIDDEN, heads=HEADS, kv_heads=KV_HEADS, seed=0)
    out = [write_folder(tmp_path / "base", config, base)]
    for seed, name in ((1, "chem"), (2, "code")):
        g = torch.Generator().manual_seed(seed)
        cpt = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.dim() == 2 else v.clone() for k, v in base.items()}
        out.append(write_folder(tmp_path / name, config, cpt))
    return out


@pytest.fixture
def session(family: list[Path], tmp_path: Path) -> ExplorerSession:
    s = ExplorerSession.open(family, device="cpu", cache_dir=tmp_path / "cache")
    yield s
    s.close()


async def settle(pilot, app) -> None:
    """Until the active view shows the cursor's node and every worker has finished (at most 20 s)."""
    for _ in range(200):
        await pilot.pause(0.1)
        await app.workers.wait_for_complete()
        if not app.busy:
            break
    await pilot.pause()


async def go_to_layer1_q_head(pilot, head: int) -> None:
    """From the root: ] ] to layer 1, l l into its first module (q), l l onto h0, then j per head."""
    for key in ("right_square_bracket", "right_square_bracket", "l", "l", "l", "l"):
        await pilot.press(key)
    for _ in range(head):
        await pilot.press("j")


def make_app(session: ExplorerSession):
    from diffract_tui.ui import DiffractApp

    return DiffractApp(session)


def test_navigate_compute_mark_export(session: ExplorerSession, family: list[Path], tmp_path: Path) -> None:
    from analysis.edit.rewind_list import read_rewind_list
    from analysis.run.scan import node_metrics
    from diffract_tui.screens.confirm import QuitScreen
    from diffract_tui.screens.export import ExportScreen
    from diffract_tui.views.spectrum import SpectrumView
    from diffract_tui.widgets.charts import fmt
    from textual.widgets import Input

    out = tmp_path / "marks.json"

    async def run() -> None:
        app = make_app(session)
        async with app.run_test(size=(80, 24)) as pilot:
            await settle(pilot, app)
            await go_to_layer1_q_head(pilot, 2)
            await settle(pilot, app)
            assert app.current_node == NodeRef(1, "q", 2)
            view = app.query_one(SpectrumView)
            result = view.result
            assert result is not None, "the spectrum of L1 q h2 was computed and delivered"
            assert [s.label for s in result.spectra] == ["base", "chem", "code"]
            # a q head slice is d_h × D: its ESD has d_h = 16 eigenvalues in every checkpoint
            assert all(s.evals.size == HEAD_DIM for s in result.spectra)
            # the numbers are the engine's for exactly that slice (independent call, no cache)
            for ckpt, spec in zip(session.checkpoints, result.spectra):
                row = node_metrics(ckpt, session.layout, 1, "q", 2, settings=session.settings, cache=None)
                # 16 eigenvalues are fitted (α̂ > 1 is defined) but flagged unreliable; NaN here would be a bug
                assert math.isfinite(row["pl_alpha"]) and row["pl_alpha"] > 1 and row["pl_alpha_reliable"] is False
                assert spec.metrics["pl_alpha"] == pytest.approx(row["pl_alpha"], rel=1e-9)
                assert spec.evals == pytest.approx(row["eigenvalues"], rel=1e-6)
            # drawn: the chart names every checkpoint; the panel shows α greyed (16 eigenvalues < 100)
            legend = str(app.query_one("#spectrum-legend").render())
            assert "base" in legend and "chem" in legend and "code" in legend
            chart = str(app.query_one("#spectrum-plot").render())
            assert sum(0x2800 < ord(c) <= 0x28FF for c in chart) > 20  # braille dots of the drawn ESDs
            panel = app.query_one("#spectrum-metrics")
            alpha_cells = [c.plain for c in panel.get_row("α PL")[1:]]
            assert alpha_cells == [fmt(s.metrics["pl_alpha"]) + "?" for s in result.spectra]
            # the tree badge of the node shows the base α
            assert app.tree.badges[NodeRef(1, "q", 2)].alpha == pytest.approx(result.spectra[0].metrics["pl_alpha"])

            # mark three heads: L1 h2, L1 h3 (j), L0 h3 ([ keeps the head, changes the layer)
            await pilot.press("space")
            await pilot.press("j")
            await pilot.press("space")
            await pilot.press("left_square_bracket")
            await pilot.pause()
            assert app.current_node == NodeRef(0, "q", 3)
            await pilot.press("space")
            await pilot.pause()
            assert session.marks == {(1, 2), (1, 3), (0, 3)}
            assert session.marks_dirty

            # q with unsaved marks asks; n stays
            await pilot.press("q")
            await pilot.pause()
            assert isinstance(app.screen, QuitScreen)
            await pilot.press("n")
            await pilot.pause()
            assert not isinstance(app.screen, QuitScreen)

            # e: the export dialog, a path, enter
            await pilot.press("e")
            await pilot.pause()
            assert isinstance(app.screen, ExportScreen)
            app.screen.query_one("#path", Input).value = str(out)
            await pilot.press("enter")
            await pilot.pause()
            assert not session.marks_dirty
            # q now quits without asking
            await pilot.press("q")
            await pilot.pause()
        assert app.return_code == 0

    asyncio.run(run())

    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["format"] == "diffract-rewind/1"
    assert data["pattern"]["name"] == "manual"
    assert {(h["layer"], h["head"]) for h in data["heads"]} == {(1, 2), (1, 3), (0, 3)}
    assert len(data["heads"]) == 3
    assert data["base"]["fingerprint"] == session.base.fingerprint
    assert Path(data["target"]["path"]) == family[1].resolve()  # the first CPT checkpoint by default
    assert data["architecture"] == {"model_type": "llama", "layers": LAYERS, "heads": HEADS,
                                    "kv_heads": KV_HEADS, "head_dim": HEAD_DIM}
    # GQA policy `group`: L1 h2 and h3 form kv group 1 completely, so they rewind k/v too; L0 h3 alone does not
    projections = {(h["layer"], h["head"]): h["projections"] for h in data["heads"]}
    assert projections[(1, 2)] == ["q", "k", "v", "o"] and projections[(0, 3)] == ["q", "o"]
    read_rewind_list(out)  # the engine's validator accepts it


def test_cached_results_show_at_once_and_delta_view(session: ExplorerSession) -> None:
    from diffract_tui.views.delta import DeltaView
    from diffract_tui.views.spectrum import SpectrumView

    async def run() -> None:
        app = make_app(session)
        async with app.run_test(size=(80, 24)) as pilot:
            await go_to_layer1_q_head(pilot, 1)
            await settle(pilot, app)
            await pilot.press("j")
            await settle(pilot, app)
            await pilot.press("k")
            await pilot.pause()  # no debounce wait, no worker: the cache answers on the UI thread
            view = app.query_one(SpectrumView)
            assert view.node == NodeRef(1, "q", 1) and view.result is not None
            assert not [w for w in app.workers if w.group == "spectrum" and not w.is_finished]

            await pilot.press("2")
            await settle(pilot, app)
            delta = app.query_one(DeltaView)
            result = delta.result
            assert result is not None and [d.label for d in result.deltas] == ["chem", "code"]
            d = result.deltas[0]
            # ΔW = W_chem − W_base of the head slice: σ(ΔW) has d_h values, ‖ΔW‖_F² = Σσ²
            W0 = session.matrix(session.base, NodeRef(1, "q", 1))
            Wd = session.matrix(session.targets[0], NodeRef(1, "q", 1))
            frob = float(torch.linalg.matrix_norm((Wd - W0).double()))
            assert d.sigma.size == HEAD_DIM
            assert float((d.sigma ** 2).sum()) ** 0.5 == pytest.approx(frob, rel=1e-6)
            assert d.metrics["delta_frob"] == pytest.approx(frob, rel=1e-6)
            assert 0.0 <= d.metrics["delta_rho"] <= 1.0
            # truncation curve: nothing dropped at t = 0, error grows with t
            assert d.error[0] == pytest.approx(0.0, abs=1e-9) and d.error[-1] > d.error[0]
            # agreement top-k runs over k = 1..d_h with the noise floor √(2 ln k / d) beside it
            assert d.agreement_k[0] == 1 and d.agreement_k[-1] == HEAD_DIM
            assert d.noise_floor[-1] == pytest.approx((2 * torch.log(torch.tensor(16.0)).item() / HEAD_DIM) ** 0.5)
            assert app.tree.badges[NodeRef(1, "q", 1)].delta_rel == pytest.approx(d.metrics["delta_rel"])

            # at 80 columns one chart shows at a time and c cycles them; t hides the tree for room
            def shown() -> list[str]:
                return [p.id for p in delta.query("PlotextPlot") if p.display and p.size.width > 0]

            assert shown() == ["delta-sigma"]
            await pilot.press("c")
            await pilot.pause()
            assert shown() == ["delta-truncation"]
            width = delta.size.width
            await pilot.press("t")
            await pilot.pause()
            assert not app.query_one("#sidebar").display and delta.size.width > width
            await pilot.press("t")
            await pilot.pause()
            assert app.query_one("#sidebar").display and app.focused is app.tree

    asyncio.run(run())


def test_escape_cancels_and_moving_on_cancels_stale_work(session: ExplorerSession, monkeypatch) -> None:
    """A computation that only ends when cancelled: Esc stops it; a cursor move cancels the older request."""
    from diffract_tui.views.spectrum import SpectrumView

    started: list[NodeRef] = []
    stopped: list[NodeRef] = []
    gate = threading.Event()

    def slow_spectrum(node, progress=None, cancelled=None):
        started.append(NodeRef(node.layer, node.module, node.head))
        progress(1, 2, "waiting")
        while not cancelled():
            if gate.wait(0.01):
                break
        stopped.append(NodeRef(node.layer, node.module, node.head))
        from analysis.run.session import Cancelled

        raise Cancelled()

    monkeypatch.setattr(session, "spectrum", slow_spectrum)
    monkeypatch.setattr(session, "cached_spectrum", lambda node: None)

    async def run() -> None:
        app = make_app(session)
        async with app.run_test(size=(80, 24)) as pilot:
            await go_to_layer1_q_head(pilot, 0)
            await pilot.pause(0.4)
            assert started[-1] == NodeRef(1, "q", 0)
            assert set(started[:-1]) <= set(stopped)  # nodes passed on the way were cancelled
            assert app.query_one("#status").busy  # the progress bar is up
            await pilot.press("j")  # moving on cancels the stale request at once
            await pilot.pause(0.4)
            assert NodeRef(1, "q", 0) in stopped
            assert started[-1] == NodeRef(1, "q", 1)
            await pilot.press("escape")  # Esc cancels the running one
            await pilot.pause(0.3)
            assert stopped[-1] == NodeRef(1, "q", 1)
            assert not app.query_one("#status").busy
            assert "cancelled" in str(app.query_one("#spectrum-title").render())
            assert app.query_one(SpectrumView).result is None

    asyncio.run(run())
    gate.set()


def test_compute_all_fills_the_cache_and_the_badges(session: ExplorerSession) -> None:
    from diffract_tui.widgets.tree import ModelTree

    async def run() -> None:
        app = make_app(session)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("a")
            await settle(pilot, app)
            tree = app.query_one(ModelTree)
            # every q head of every layer has its base α and the chem update as a badge
            for layer in range(LAYERS):
                for head in range(HEADS):
                    badge = tree.badges[NodeRef(layer, "q", head)]
                    assert badge.alpha is not None and badge.delta_rel is not None
            # and the views now answer from the cache without computing
            assert session.cached_spectrum(NodeRef(0, "down")) is not None
            assert session.known_badge(NodeRef(1, "o", 3))["delta_rel"] == pytest.approx(
                tree.badges[NodeRef(1, "o", 3)].delta_rel)

    asyncio.run(run())


def test_filter_keys_help_and_kv_marks(session: ExplorerSession) -> None:
    from diffract_tui.screens.help import HelpScreen
    from diffract_tui.widgets.tree import ModelTree

    async def run() -> None:
        app = make_app(session)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("slash")
            for ch in "q h3":
                await pilot.press("space" if ch == " " else ch)
            await pilot.pause()
            tree = app.query_one(ModelTree)
            shown = {n.data for n in tree._by_ref.values() if n.data is not None and n.data.is_head}
            assert shown == {NodeRef(0, "q", 3), NodeRef(1, "q", 3)}
            await pilot.press("enter")
            await pilot.press("escape")  # leaves the filter: the full tree is back
            await pilot.pause()
            assert not tree.filter_words
            # g / G jump to the first and last line
            await pilot.press("G")
            assert tree.cursor_line == tree.last_line
            await pilot.press("g")
            assert tree.cursor_line == 0
            # a k/v head is shared by query heads: space refuses to mark it
            app.go_to_node(NodeRef(0, "k", 0))
            await pilot.pause()
            assert app.current_node == NodeRef(0, "k", 0)
            await pilot.press("space")
            await pilot.pause()
            assert session.marks == set()
            # ? lists the app's, the tree's and the active view's keys
            await pilot.press("question_mark")
            await pilot.pause()
            assert isinstance(app.screen, HelpScreen)
            titles = [t for t, _ in app.screen.groups]
            assert titles == ["Spectrum view", "Tree", "App"]
            keys = {k for _, rows in app.screen.groups for k, _ in rows}
            assert {"j", "k", "h", "l", "g", "G", "/", "[", "]", "space", "e", "x", "q", "?", "ctrl+p", "c"} <= keys
            await pilot.press("escape")
            await pilot.pause()
            assert not isinstance(app.screen, HelpScreen)

    asyncio.run(run())


def test_palette_addresses() -> None:
    from analysis.model.architecture import detect_layout
    from diffract_tui.commands import parse_address

    config, tensors = llama_checkpoint(layers=LAYERS, hidden=HIDDEN, heads=HEADS, kv_heads=KV_HEADS)
    layout = detect_layout(config, {k.removeprefix("model."): tuple(v.shape) for k, v in tensors.items()})
    assert parse_address("L1 q h3", layout) == NodeRef(1, "q", 3)
    assert parse_address("layer 0 down", layout) == NodeRef(0, "down")
    assert parse_address("1", layout) == NodeRef(1)
    assert parse_address("1 k 1", layout) == NodeRef(1, "k", 1)
    assert parse_address("1 k 2", layout) is None  # only 2 kv heads
    assert parse_address("L2", layout) is None     # only 2 layers
    assert parse_address("compute all", layout) is None


def test_export_table_writes_what_the_panel_shows(session: ExplorerSession, tmp_path: Path, monkeypatch) -> None:
    from analysis.run.tables import read_table

    monkeypatch.chdir(tmp_path)

    async def run() -> None:
        app = make_app(session)
        async with app.run_test(size=(80, 24)) as pilot:
            await go_to_layer1_q_head(pilot, 0)
            await settle(pilot, app)
            await pilot.press("x")
            await pilot.pause()

    asyncio.run(run())
    (path,) = list(tmp_path.glob("diffract-spectrum-L1-q-h0-*.csv"))
    rows, meta = read_table(path)
    assert [r["checkpoint"] for r in rows] == ["base", "chem", "code"]  # one row per checkpoint (issue 10 B.2)
    assert {"node", "checkpoint", "pl_alpha", "pl_alpha_reliable"} <= set(rows[0])
    assert meta["node"] == "L1 q h0"


def test_palette_goes_to_a_head_and_no_color(session: ExplorerSession, monkeypatch) -> None:
    """ctrl+p, type an address, enter: the tree cursor lands there. Under NO_COLOR the charts lose colour."""
    from diffract_tui.views.spectrum import SpectrumView

    monkeypatch.setenv("NO_COLOR", "1")

    async def run() -> None:
        app = make_app(session)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("ctrl+p")
            await pilot.pause()
            for ch in "L1 q h3":
                await pilot.press("space" if ch == " " else ch)
            await pilot.pause(0.3)
            await pilot.press("enter")
            await settle(pilot, app)
            assert app.current_node == NodeRef(1, "q", 3)
            assert app.query_one(SpectrumView).result is not None
            assert app.query_one("#spectrum-plot").theme == "clear"
            chart = app.query_one("#spectrum-plot").render()
            colours = {span.style.color for span in chart.spans if not isinstance(span.style, str)}
            assert colours <= {None}  # no foreground colour anywhere in the plot

    asyncio.run(run())


def test_compute_all_badges_recover_the_planted_head_updates(tmp_path: Path) -> None:
    """write_family plants ‖ΔW^q_h‖/‖W₀^q_h‖ per head; after "compute all" every q head's badge shows it."""
    from analysis.generate import write_family
    from diffract_tui.widgets.tree import ModelTree

    manifest = write_family(tmp_path / "family", domains=("math", "code"), hidden_size=128, num_layers=2,
                            num_heads=8, num_kv_heads=4, intermediate_size=256, vocab_size=64)
    session = ExplorerSession.open([manifest.base, *manifest.domains.values()], device="cpu",
                                   cache_dir=tmp_path / "cache")

    async def run() -> None:
        app = make_app(session)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("a")
            await settle(pilot, app)
            badges = app.query_one(ModelTree).badges
            for plant in manifest.heads:
                badge = badges[NodeRef(plant.layer, "q", plant.head)]
                assert badge.delta_rel == pytest.approx(plant.magnitude, rel=1e-3), plant
            # the largest planted update is the largest badge
            biggest = max(manifest.heads, key=lambda p: p.magnitude)
            q_badges = {ref: b.delta_rel for ref, b in badges.items() if ref.module == "q" and ref.is_head}
            assert max(q_badges, key=q_badges.get) == NodeRef(biggest.layer, "q", biggest.head)

    try:
        asyncio.run(run())
    finally:
        session.close()

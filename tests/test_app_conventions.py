"""Issue 10 B.7 and A ("no private Textual API"), pilot-driven: a view's keys work while the tree has the
focus through public Screen bindings + `check_action`, the footer lists the active view's keys, clicking a
view's tab switches to it, and help lists every key once with capitalised descriptions."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from analysis.generate import write_family
from analysis.run.session import ExplorerSession
from pilot import settle, sync


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return write_family(tmp_path_factory.mktemp("family"), num_layers=2, hidden_size=64, num_heads=4,
                        num_kv_heads=2)


@pytest.fixture
def session(family, tmp_path: Path):
    s = ExplorerSession.open([family.base, family.domains["math"], family.domains["code"]], device="cpu",
                             cache_dir=tmp_path / "cache")
    yield s
    s.close()


def test_ui_overrides_no_private_textual_api() -> None:
    """ui.py defines no `_binding_chain`, `_bindings` or `key_to_bindings` of Textual's."""
    import diffract_tui.ui as ui

    source = inspect.getsource(ui)
    for private in ("_binding_chain", "._bindings", "key_to_bindings"):
        assert private not in source


@sync
async def test_view_keys_work_from_the_tree_and_only_for_the_active_view(session) -> None:
    """Rewind's `b` (panel) works while the tree has focus; in the Heads view `p` cycles the projection there,
    not Rewind's pattern; `p` of Rewind does nothing to the grid when Rewind is not shown."""
    from diffract_tui.ui import DiffractApp

    app = DiffractApp(session)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("4")
        await settle(pilot)
        rewind = app.query_one("#rewind")
        assert app.focused is app.tree
        await pilot.press("b")
        assert rewind.panel == "bars"
        await pilot.press("p")
        await settle(pilot)
        assert rewind.pattern == "manual"
        await pilot.press("3")
        await settle(pilot)
        grid = app.query_one("#heads")
        before = grid.choice().projection
        await pilot.press("p")
        await settle(pilot)
        assert grid.choice().projection != before
        assert rewind.pattern == "manual"  # Rewind's p stayed off while the Heads view is active


@sync
async def test_footer_lists_the_active_views_keys_and_tabs_switch_on_click(session) -> None:
    from diffract_tui.ui import DiffractApp
    from textual.widgets import Label

    app = DiffractApp(session)
    async with app.run_test(size=(120, 30)) as pilot:
        await settle(pilot)
        footer = app.query_one("#viewkeys", Label)
        assert "Fits of next checkpoint" in str(footer.render())       # Spectrum: c
        await pilot.click("#tab-rewind")
        await settle(pilot)
        assert app.active_view_id == "rewind"
        text = str(footer.render())
        assert " b " in text and "Panel" in text and "Pattern" in text
        assert app.query_one("#tab-rewind").has_class("-active")
        assert not app.query_one("#tab-spectrum").has_class("-active")
        await pilot.click("#tab-heads")
        await settle(pilot)
        assert app.active_view_id == "heads"
        assert "Next metric" in str(footer.render())


@sync
async def test_help_lists_each_key_once(session) -> None:
    from diffract_tui.screens.help import HelpScreen
    from diffract_tui.ui import DiffractApp

    app = DiffractApp(session)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        keys = [k for _, rows in app.screen.groups for k, _ in rows]
        assert len(keys) == len(set(keys))
        assert keys.count("/") == 1 and keys.count("space") == 1
        whats = [w for _, rows in app.screen.groups for _, w in rows]
        assert all(w[:1] == w[:1].upper() for w in whats)
        assert "filter the tree" not in whats

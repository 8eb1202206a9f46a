"""Issue 10 B.4, pilot-driven: the Heads grid opens the node of the shown projection (a k/v cell opens its kv
head), space on a k/v head speaks of sharing only when H_kv < H, a head's one mark shows on every projection
node of it and toggles from any of them, and applying onto an existing folder asks before replacing it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from analysis.generate import write_family
from analysis.run.session import ExplorerSession
from diffract_tui.node import NodeRef
from pilot import settle, sync


@pytest.fixture(scope="module")
def gqa_family(tmp_path_factory):
    """2 layers, 4 query heads reading 2 kv heads (H_kv < H)."""
    return write_family(tmp_path_factory.mktemp("gqa"), num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def mha_family(tmp_path_factory):
    """2 layers, 4 heads with 4 kv heads (H_kv = H, as in BERT)."""
    return write_family(tmp_path_factory.mktemp("mha"), num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=4)


def open_session(family, tmp_path: Path) -> ExplorerSession:
    return ExplorerSession.open([family.base, family.domains["math"], family.domains["code"]], device="cpu",
                                cache_dir=tmp_path / "cache")


def make_app(session: ExplorerSession, notes: list[str]):
    """The explorer with its notifications recorded in `notes`."""
    from diffract_tui.ui import DiffractApp

    app = DiffractApp(session)
    original = app.notify

    def notify(message, *args, **kwargs):
        notes.append(str(message))
        return original(message, *args, **kwargs)

    app.notify = notify  # type: ignore[method-assign]
    return app


def sha256s(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (inputs must be untouched by the app)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("presses, module", [(2, "k"), (3, "v")])
@sync
async def test_grid_enter_on_kv_slices_opens_the_kv_head(gqa_family, tmp_path, presses: int, module: str) -> None:
    """p to k (v) slices, tab, the cell L1 h2, enter: the tree goes to L1 k (v) h1 (h2 reads kv head 1), not q."""
    from diffract_tui.widgets.heatmap import Heatmap

    session = open_session(gqa_family, tmp_path)
    try:
        app = make_app(session, [])
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("3")
            await settle(pilot)
            await pilot.press(*["p"] * presses)
            await settle(pilot)
            assert app.query_one("#heads").choice().projection == module
            await pilot.press("tab")
            assert isinstance(app.focused, Heatmap)
            await pilot.press("down", "l", "l")
            assert app.query_one(Heatmap).cursor == (1, 2)
            await pilot.press("enter")
            await settle(pilot)
            assert app.current_node == NodeRef(1, module, 1)
    finally:
        session.close()


@sync
async def test_space_on_a_kv_head_marks_it_when_it_is_not_shared(mha_family, tmp_path) -> None:
    """H_kv = H: space on L0 k h1 marks head (0, 1) and says so; no word of a shared head."""
    session = open_session(mha_family, tmp_path)
    notes: list[str] = []
    try:
        app = make_app(session, notes)
        async with app.run_test(size=(80, 24)) as pilot:
            app.go_to_node(NodeRef(0, "k", 1))
            await pilot.pause()
            assert app.current_node == NodeRef(0, "k", 1)
            await pilot.press("space")
            await pilot.pause()
            assert session.marks == {(0, 1)}
            assert not any("shared" in n for n in notes)
            assert any("L0 h1 marked" in n for n in notes)
            assert str(app.tree._label(NodeRef(0, "q", 1))).startswith("● ")
    finally:
        session.close()


@sync
async def test_space_on_a_shared_kv_head_names_its_query_heads(gqa_family, tmp_path) -> None:
    """H_kv < H: space on L0 v h1 marks nothing and names the query heads h2–h3 sharing it."""
    session = open_session(gqa_family, tmp_path)
    notes: list[str] = []
    try:
        app = make_app(session, notes)
        async with app.run_test(size=(80, 24)) as pilot:
            app.go_to_node(NodeRef(0, "v", 1))
            await pilot.pause()
            await pilot.press("space")
            await pilot.pause()
            assert session.marks == set()
            assert any("shared by query heads h2–h3" in n and "h2" in n for n in notes)
    finally:
        session.close()


@sync
async def test_one_mark_per_head_shows_on_every_projection_and_toggles_from_any(gqa_family, tmp_path) -> None:
    """Mark L1 o h3: q h3 and o h3 show ●, its kv head k/v h1 shows ◐ (h2 not marked); space on q h3 then
    unmarks the same head, says so, and every node loses the sign."""
    session = open_session(gqa_family, tmp_path)
    notes: list[str] = []
    try:
        app = make_app(session, notes)
        async with app.run_test(size=(100, 40)) as pilot:
            tree = app.tree
            for ref in (NodeRef(1, "k", 1), NodeRef(1, "v", 1), NodeRef(1, "q", 3)):
                app.go_to_node(ref)  # build the nodes
                await pilot.pause()
            app.go_to_node(NodeRef(1, "o", 3))
            await pilot.pause()
            await pilot.press("space")
            await pilot.pause()
            assert session.marks == {(1, 3)}
            labels = {ref: str(tree._by_ref[ref].label) for ref in
                      (NodeRef(1, "q", 3), NodeRef(1, "o", 3), NodeRef(1, "k", 1), NodeRef(1, "v", 1))}
            assert labels[NodeRef(1, "q", 3)].startswith("● ") and labels[NodeRef(1, "o", 3)].startswith("● ")
            assert labels[NodeRef(1, "k", 1)].startswith("◐ ") and labels[NodeRef(1, "v", 1)].startswith("◐ ")
            app.go_to_node(NodeRef(1, "q", 3))
            await pilot.pause()
            await pilot.press("space")
            await pilot.pause()
            assert session.marks == set()
            assert any("L1 h3 unmarked" in n for n in notes)
            for ref in labels:
                assert not str(tree._by_ref[ref].label).startswith(("● ", "◐ "))
    finally:
        session.close()


async def _apply_onto(pilot, out: Path) -> None:
    """Rewind view, A, type `out`, enter."""
    from diffract_tui.views.rewind import PromptInput

    await pilot.press("4")
    await settle(pilot)
    await pilot.press("A")
    await pilot.pause()
    pilot.app.query_one(PromptInput).value = str(out)
    await pilot.press("enter")
    await pilot.pause()


@pytest.mark.parametrize("answer", ["y", "n"])
@sync
async def test_apply_onto_an_existing_folder_asks_to_replace_it(gqa_family, tmp_path, monkeypatch, answer) -> None:
    """An existing output folder: a yes/no question instead of "pass --force"; y replaces it with the rewound
    checkpoint, n keeps it byte for byte. The inputs are never touched."""
    from analysis.io.checkpoint import open_checkpoint
    from diffract_tui.screens.confirm import ConfirmScreen

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "existing"
    out.mkdir()
    (out / "old.txt").write_text("keep me unless replaced")
    inputs = [gqa_family.base, gqa_family.domains["math"], gqa_family.domains["code"]]
    before = [sha256s(p) for p in inputs]
    old = sha256s(out)
    session = open_session(gqa_family, tmp_path)
    notes: list[str] = []
    try:
        app = make_app(session, notes)
        async with app.run_test(size=(80, 24)) as pilot:
            await _apply_onto(pilot, out)
            assert isinstance(app.screen, ConfirmScreen)
            assert "already exists" in app.screen.question
            await pilot.press(answer)
            await settle(pilot)
            assert not any("--force" in n for n in notes)
    finally:
        session.close()
    if answer == "y":
        assert not (out / "old.txt").exists()
        assert open_checkpoint(out) is not None and (out / "config.json").is_file()
        assert any("rewound" in n.lower() or "Wrote" in n for n in notes)
    else:
        assert sha256s(out) == old
        assert any("Nothing written" in n for n in notes)
    assert [sha256s(p) for p in inputs] == before

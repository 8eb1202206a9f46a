"""The loss in the explorer's Rewind view (issue 11 item 5) on the real tiny CPT family (tests/tiny_cpt.py): the
numbers the view shows and stores are the engine's, `m` measures the marked heads and the export carries the
losses, esc cancels the loss worker (no rows after), without transformers or with a bad text asking for a loss is
one line in the status bar, `?` lists the new keys, and `--text` / `--general-text` reach the session."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from analysis.edit.rewind_list import read_rewind_list  # noqa: E402
from analysis.run.session import ExplorerSession  # noqa: E402
from diffract_tui.cli import main  # noqa: E402
from tests.pilot import settle, status_text, sync  # noqa: E402
from tiny_cpt import family  # noqa: E402,F401  (the session fixture)

T = 64
SIZE = (120, 36)


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # evaluations compare bit for bit


def open_session(family, cache: Path, texts=True) -> ExplorerSession:
    s = ExplorerSession.open([family.base, family.code, family.code2], device="cpu", cache_dir=cache,
                             texts=[family.code_text] if texts else [],
                             general_texts=[family.prose_text] if texts else [])
    s.eval_tokens = T
    return s


@sync
async def test_the_view_shows_and_stores_the_engines_numbers(family, tmp_path) -> None:
    from textual.widgets import Label

    from diffract_tui.ui import DiffractApp

    session = open_session(family, tmp_path / "app-cache")
    engine = open_session(family, tmp_path / "engine-cache")  # computed apart: nothing shared but the files
    try:
        app = DiffractApp(session)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("4")
            await settle(pilot)
            await pilot.press("L")
            await settle(pilot)
            view = app.query_one("#rewind")
            assert view.panel == "loss"
            inputs = engine.rewind_inputs(0, 1)
            expected = engine.loss_preview(inputs, 0, 1, windows=4)
            assert view.loss_preview.rows == expected.rows
            rl, _ = engine.rewind_plan(inputs, 0, 1, pattern="greedy", fraction=0.15, heads=None,
                                       gqa_policy="group", variant="lowest")
            plan = engine.plan_loss(rl, 0, windows=4)
            assert view.plan_loss.rows == plan.rows and view.plan_loss.matches(view.plan)
            shown = str(app.query_one("#rewind-loss-numbers", Label).render())
            for r in plan.rows:
                assert f"{r['text']} {r['loss']:.4f} (base {r['base']:.4f} CPT {r['target']:.4f})" in shown
            await pilot.press("b")
            await settle(pilot)
            assert view.panel == "tradeoff"
            legend = str(app.query_one("#rewind-loss-legend", Label).render())
            assert "gain kept" in legend and "forgetting recovered" in legend
    finally:
        session.close()
        engine.close()


@sync
async def test_m_measures_the_marked_heads_and_the_export_carries_the_losses(family, tmp_path) -> None:
    from diffract_tui.ui import DiffractApp

    session = open_session(family, tmp_path / "cache")
    try:
        session.marks.update({(0, 1), (1, 2)})
        app = DiffractApp(session)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("4")
            await settle(pilot)
            await pilot.press("p")  # greedy → manual: the marked heads
            await settle(pilot)
            view = app.query_one("#rewind")
            assert view.plan.pattern.name == "manual"
            await pilot.press("m")
            await settle(pilot)
            assert view.loss_preview is None and view.plan_loss.matches(view.plan)
            expected = session.plan_loss(view.plan, 0, windows=4)
            assert view.plan_loss.rows == expected.rows
            before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (family.code_text, family.prose_text)}
            out = view.export_to(tmp_path / "marked.json")
            assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in before} == before
            data = json.loads(Path(out).read_text(encoding="utf-8"))
            assert [(e["text"], e["loss"], e["windows"], e["tokens"]) for e in data["losses"]] == \
                [(r["text"], r["loss"], 4, T) for r in expected.rows]
            assert read_rewind_list(out).losses == expected.entries()
            await pilot.press("plus")  # another plan: its export has no losses (they were not measured for it)
            await settle(pilot)
            other = view.export_to(tmp_path / "greedy.json")
            assert "losses" not in json.loads(Path(other).read_text(encoding="utf-8"))
    finally:
        session.close()


@sync
async def test_esc_cancels_the_loss_worker_and_no_rows_arrive(family, tmp_path) -> None:
    from diffract_tui.ui import DiffractApp

    session = open_session(family, tmp_path / "cache")
    try:
        app = DiffractApp(session)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("4")
            await settle(pilot)
            view = app.query_one("#rewind")
            await pilot.press("w")  # 64 windows: seconds of work
            assert view.loss_windows == 64
            await pilot.press("L")
            await pilot.pause(0.3)
            assert any(w.group == "rewind-loss" and w.is_running for w in view.workers)
            await pilot.press("escape")
            await settle(pilot)
            assert not any(w.group == "rewind-loss" and w.is_running for w in view.workers)
            assert view.loss_preview is None and view.plan_loss is None
            assert "cancelled" in view.loss_note
    finally:
        session.close()


@sync
async def test_without_transformers_a_loss_is_one_status_line(family, tmp_path, monkeypatch) -> None:
    from diffract_tui.ui import DiffractApp

    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails
    session = open_session(family, tmp_path / "cache")
    try:
        app = DiffractApp(session)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("4")
            await settle(pilot)
            await pilot.press("L")
            await settle(pilot)
            line = status_text(app)
            assert "needs transformers" in line and "pip install 'diffract-tui[eval]'" in line
            assert "\n" not in line
    finally:
        session.close()


@sync
async def test_bad_texts_from_the_palette_are_one_status_line(family, tmp_path) -> None:
    from diffract_tui.ui import DiffractApp

    session = open_session(family, tmp_path / "cache", texts=False)
    empty, binary, short = tmp_path / "empty.txt", tmp_path / "bin.txt", tmp_path / "short.txt"
    empty.write_text("\n\n", encoding="utf-8")
    binary.write_bytes(b"\x00\x01code")
    short.write_text("x = 1\n", encoding="utf-8")
    try:
        app = DiffractApp(session)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("4")
            await settle(pilot)
            view = app.query_one("#rewind")
            await pilot.press("L")  # no text yet
            await settle(pilot)
            assert "no text to evaluate on" in status_text(app)
            for path, fragment in ((empty, "the text is empty"), (binary, "binary")):
                assert view.add_text(path, "domain") is None
                assert fragment in status_text(app) and str(path) in status_text(app)
            assert session.eval_texts == []
            from diffract_tui.commands import add_text

            add_text(app, "general")  # the palette's "Add general text…": asks in the Rewind view
            await pilot.pause()
            assert view.prompt_action == "text-general"
            prompt = app.query_one("#rewind-prompt")
            prompt.value = str(short)
            await pilot.press("enter")
            await settle(pilot)
            assert [(t.name, r) for t, r in session.eval_texts] == [("short.txt", "general")]
            await pilot.press("L")
            await settle(pilot)
            line = status_text(app)
            assert "fewer than one window of 64" in line and "short.txt" in line and "\n" not in line
    finally:
        session.close()


@sync
async def test_help_lists_the_loss_keys(family, tmp_path) -> None:
    from diffract_tui.screens.help import HelpScreen
    from diffract_tui.ui import DiffractApp

    session = open_session(family, tmp_path / "cache")
    try:
        app = DiffractApp(session)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("4")
            await settle(pilot)
            await pilot.press("question_mark")
            await pilot.pause()
            assert isinstance(app.screen, HelpScreen)
            rows = dict(r for _, group in app.screen.groups for r in group)
            assert rows["L"].startswith("Loss: measure loss vs fraction")
            assert rows["m"].startswith("Measure: the loss of this plan")
            assert rows["w"].startswith("Windows: 4 (fast) / 64")
            assert "trade-off" in rows["b"]
    finally:
        session.close()


def test_launch_passes_the_texts_to_the_session(family, tmp_path, monkeypatch, capsys) -> None:
    shown: list = []

    def fake_run(session) -> None:
        shown.append([(t.name, r) for t, r in session.eval_texts])
        session.close()

    monkeypatch.setattr("diffract_tui.cli.launch.run_explorer", fake_run)
    cache = ["--cache-dir", str(tmp_path / "c"), "--device", "cpu"]
    assert main([str(family.base), str(family.code), "--text", str(family.code_text), "--general-text",
                 str(family.prose_text), *cache]) == 0
    assert shown == [[("code.txt", "domain"), ("prose.txt", "general")]]
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    assert main([str(family.base), str(family.code), "--general-text", str(empty), *cache]) == 1
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("diffract-tui: error: ") and "the text is empty" in lines[0]
    assert len(shown) == 1  # the app was not started for the bad text

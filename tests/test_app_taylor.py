"""The Taylor score in the explorer's Rewind view (issue 11 item 3, SPEC §9) on the real tiny CPT family
(tests/tiny_cpt.py): `s` ranks by taylor and the greedy plan equals `rewind plan --score taylor` for the same
texts, T and N; the exported list says score taylor; the grid is computed once per (target, texts, T, N); `s`
again goes back to rel_frob; without a text or without transformers it is one status line and the score stays
rel_frob; `?` lists the key."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from analysis.run.session import ExplorerSession  # noqa: E402
from diffract_tui.cli import main  # noqa: E402
from tests.pilot import settle, status_text, sync  # noqa: E402
from tiny_cpt import family  # noqa: E402,F401  (the session fixture)

T, N = 64, 4
SIZE = (120, 36)


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # evaluations compare bit for bit


def open_session(family, cache: Path, texts: bool = True) -> ExplorerSession:
    s = ExplorerSession.open([family.base, family.code], device="cpu", cache_dir=cache,
                             texts=[family.code_text] if texts else [],
                             general_texts=[family.prose_text] if texts else [])
    s.eval_tokens = T
    return s


def sha(paths) -> dict:
    return {p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


@sync
async def test_s_ranks_by_taylor_as_rewind_plan_does_and_the_export_says_so(family, tmp_path, capsys) -> None:
    from textual.widgets import Label

    from diffract_tui.ui import DiffractApp

    cli_out = tmp_path / "cli.json"
    assert main(["rewind", "plan", str(family.base), str(family.code), "--score", "taylor", "--fraction", "0.25",
                 "--text", str(family.code_text), "--general-text", str(family.prose_text), "--tokens", str(T),
                 "--windows", str(N), "--device", "cpu", "--out", str(cli_out)]) == 0
    capsys.readouterr()
    cli = json.loads(cli_out.read_text(encoding="utf-8"))
    assert cli["pattern"]["score"] == "taylor" and len(cli["heads"]) == 2
    session = open_session(family, tmp_path / "cache")
    try:
        app = DiffractApp(session)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("4")
            await settle(pilot)
            view = app.query_one("#rewind")
            rel_frob = [(e.layer, e.head) for e in view.plan.heads]
            await pilot.press("plus", "plus")  # f 0.15 → 0.25: 2 of 8 heads
            await settle(pilot)
            assert view.fraction == 0.25 and view.plan.pattern.score == "rel_frob"
            await pilot.press("s")
            await settle(pilot)
            assert view.score == "taylor" and view.loss_windows == N
            rl = view.plan
            assert rl.pattern.name == "greedy" and rl.pattern.score == "taylor" and rl.pattern.fraction == 0.25
            assert [(e.layer, e.head, list(e.projections)) for e in rl.heads] == \
                [(h["layer"], h["head"], h["projections"]) for h in cli["heads"]]
            assert [e.score for e in rl.heads] == pytest.approx([h["score"] for h in cli["heads"]], rel=1e-6)
            assert "score taylor" in str(app.query_one("#rewind-settings", Label).render())
            assert str(view.query_one("#rewind-list").columns["score"].label) == "score s"
            assert len(session._taylor) == 1  # computed once, on the general text, N = 4
            (key,) = session._taylor
            assert [name for _, name, _ in key[2]] == ["prose.txt"] and key[3:] == (T, N)
            before = sha([family.code_text, family.prose_text])
            out = view.export_to(tmp_path / "taylor.json")
            assert sha(before) == before
            doc = json.loads(Path(out).read_text(encoding="utf-8"))
            assert doc["pattern"]["score"] == "taylor"
            assert [(h["layer"], h["head"]) for h in doc["heads"]] == [(h["layer"], h["head"]) for h in cli["heads"]]
            await pilot.press("minus")  # a replan under taylor reads the cached grid
            await settle(pilot)
            assert view.plan.pattern.score == "taylor" and len(view.plan.heads) == 1 and len(session._taylor) == 1
            await pilot.press("s", "minus")  # back to rel_frob, at f 0.15 again
            await settle(pilot)
            assert view.score == "rel_frob" and view.plan.pattern.score == "rel_frob"
            assert [(e.layer, e.head) for e in view.plan.heads] == rel_frob
            assert "score taylor" not in str(app.query_one("#rewind-settings", Label).render())
    finally:
        session.close()


@sync
async def test_without_a_text_s_is_one_status_line_and_the_score_stays(family, tmp_path) -> None:
    from diffract_tui.ui import DiffractApp

    session = open_session(family, tmp_path / "cache", texts=False)
    try:
        app = DiffractApp(session)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("4")
            await settle(pilot)
            view = app.query_one("#rewind")
            await pilot.press("s")
            await settle(pilot)
            line = status_text(app)
            assert "taylor score: no text to take the loss gradient on" in line and "\n" not in line
            assert view.score == "rel_frob" and view.plan.pattern.score == "rel_frob" and session._taylor == {}
    finally:
        session.close()


@sync
async def test_without_transformers_s_is_one_status_line_and_the_score_stays(family, tmp_path, monkeypatch) -> None:
    from diffract_tui.ui import DiffractApp

    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails
    session = open_session(family, tmp_path / "cache")
    try:
        app = DiffractApp(session)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("4")
            await settle(pilot)
            view = app.query_one("#rewind")
            await pilot.press("s")
            await settle(pilot)
            line = status_text(app)
            assert line.startswith("taylor score failed:") and "needs transformers" in line and "\n" not in line
            assert view.score == "rel_frob" and view.plan.pattern.score == "rel_frob" and session._taylor == {}
    finally:
        session.close()


@sync
async def test_help_lists_the_score_key(family, tmp_path) -> None:
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
            assert rows["s"].startswith("Score: rel_frob (r) / taylor")
    finally:
        session.close()


@sync
async def test_esc_cancels_the_taylor_worker_and_the_score_stays(family, tmp_path, monkeypatch) -> None:
    import time

    import analysis.eval.taylor as taylor
    from diffract_tui.ui import DiffractApp

    real = taylor.taylor_scores

    def slow(*args, **kwargs):
        time.sleep(1.0)  # the pass on a real model takes this long or more
        return real(*args, **kwargs)

    monkeypatch.setattr(taylor, "taylor_scores", slow)
    session = open_session(family, tmp_path / "cache")
    try:
        app = DiffractApp(session)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("4")
            await settle(pilot)
            view = app.query_one("#rewind")
            await pilot.press("s")
            await pilot.pause(0.3)
            assert any(w.group == "rewind-taylor" and w.is_running for w in view.workers)
            await pilot.press("escape")
            await settle(pilot)
            assert not any(w.group == "rewind-taylor" and w.is_running for w in view.workers)
            assert view.score == "rel_frob" and view.plan.pattern.score == "rel_frob" and session._taylor == {}
            assert "taylor score: cancelled" in str(view.query_one("#rewind-summary").render())
    finally:
        session.close()


def cli_heads(family, tmp_path, name: str, *text_args: str) -> list[tuple[int, int]]:
    """The heads of `rewind plan --score taylor --fraction 0.25` with the given text options (T, N as here)."""
    out = tmp_path / name
    assert main(["rewind", "plan", str(family.base), str(family.code), "--score", "taylor", "--fraction", "0.25",
                 *text_args, "--tokens", str(T), "--windows", str(N), "--device", "cpu", "--out", str(out)]) == 0
    return [(h["layer"], h["head"]) for h in json.loads(out.read_text(encoding="utf-8"))["heads"]]


@sync
async def test_a_general_text_added_under_taylor_re_ranks_on_it(family, tmp_path, capsys) -> None:
    from diffract_tui.ui import DiffractApp

    domain = cli_heads(family, tmp_path, "domain.json", "--text", str(family.code_text))
    general = cli_heads(family, tmp_path, "general.json", "--text", str(family.code_text),
                        "--general-text", str(family.prose_text))
    capsys.readouterr()
    assert domain != general  # the test can tell which text the gradient was taken on
    session = ExplorerSession.open([family.base, family.code], device="cpu", cache_dir=tmp_path / "cache",
                                   texts=[family.code_text])
    session.eval_tokens = T
    try:
        app = DiffractApp(session)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("4")
            await settle(pilot)
            view = app.query_one("#rewind")
            await pilot.press("plus", "plus", "s")
            await settle(pilot)
            assert view.plan.pattern.score == "taylor" and [(e.layer, e.head) for e in view.plan.heads] == domain
            assert view.add_text(family.prose_text, "general") == "prose.txt"
            await settle(pilot)
            assert view.plan.pattern.score == "taylor" and [(e.layer, e.head) for e in view.plan.heads] == general
            assert len(session._taylor) == 2
    finally:
        session.close()

"""Cancelling the Taylor score's gradient pass mid-pass (SPEC §9; the engine's one protocol, analysis.progress) on
the real tiny CPT family (tests/tiny_cpt.py): the engine stops within one window of a cancel and leaves the model
exactly as it was (weights bit for bit, no gradients, the same requires_grad flags), so the next pass gives the
same grid; in the explorer, esc during the Rewind view's Taylor pass stops the worker within one window, says
"cancelled", and `s` afterwards computes the same grid as an uninterrupted pass."""

from __future__ import annotations

import hashlib
import threading
import time

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import analysis.eval.taylor as taylor  # noqa: E402
from analysis.eval.evaluator import prepare_text  # noqa: E402
from analysis.eval.loss import load_model  # noqa: E402
from analysis.eval.texts import load_text  # noqa: E402
from analysis.io.checkpoint import open_checkpoint  # noqa: E402
from analysis.model.architecture import layout_of  # noqa: E402
from analysis.progress import Cancelled  # noqa: E402
from analysis.run.session import ExplorerSession  # noqa: E402
from tests.pilot import settle, sync  # noqa: E402
from tiny_cpt import family  # noqa: E402,F401  (the session fixture)

T, N = 64, 4
SIZE = (120, 36)


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # evaluations compare bit for bit


def state_digest(model: torch.nn.Module) -> dict[str, str]:
    """sha256 of every state_dict tensor's bytes (what "the model is left exactly as before" compares)."""
    return {k: hashlib.sha256(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            for k, v in model.state_dict().items()}


def grad_state(model: torch.nn.Module) -> dict[str, tuple[bool, bool]]:
    """(requires_grad, has a gradient) of every parameter."""
    return {n: (p.requires_grad, p.grad is not None) for n, p in model.named_parameters()}


def test_a_cancel_after_the_first_window_stops_the_pass_and_leaves_the_model_as_it_was(family) -> None:
    lm = load_model(family.code, device=torch.device("cpu"), dtype=torch.float32)
    base, target = open_checkpoint(family.base), open_checkpoint(family.code)
    layout = layout_of(target)
    et = prepare_text(lm, load_text(family.prose_text), T, N, "general")
    assert et.windows.count == N
    grid = taylor.taylor_scores(lm, base, layout, [et])
    before, flags = state_digest(lm.model), grad_state(lm.model)
    reports: list[tuple[int, int | None, str]] = []
    with pytest.raises(Cancelled):
        taylor.taylor_scores(lm, base, layout, [et], progress=lambda d, t, s: reports.append((d, t, s)),
                             cancel=lambda: len(reports) >= 1)
    assert [(d, t) for d, t, _ in reports] == [(1, N)]  # one window done of N, then it stopped
    assert state_digest(lm.model) == before and grad_state(lm.model) == flags
    assert all(p.grad is None for p in lm.model.parameters())
    again = taylor.taylor_scores(lm, base, layout, [et])
    assert torch.equal(again, grid)  # nothing of the cancelled pass leaked into the next one


def test_the_previewer_stops_within_one_window_and_frees_the_model(family, tmp_path) -> None:
    session = ExplorerSession.open([family.base, family.code], device="cpu", cache_dir=tmp_path / "cache",
                                   general_texts=[family.prose_text])
    try:
        pv = session.loss_previewer()
        reports: list[tuple[int, int | None, str]] = []
        with pytest.raises(Cancelled):
            pv.taylor(session.base, session.targets[0], session.layout, session.eval_texts, windows=N, tokens=T,
                      progress=lambda d, t, s: reports.append((d, t, s)),
                      cancelled=lambda: any(s.startswith("windows") for _, _, s in reports))
        assert [(d, t) for d, t, s in reports if s.startswith("windows")] == [(1, N)]
        assert not pv._lock.locked()
        assert all(p.grad is None for p in pv._state[1].model.parameters())
    finally:
        session.close()


@sync
async def test_esc_during_the_taylor_pass_stops_it_within_a_window_and_s_computes_it_again(
        family, tmp_path, monkeypatch) -> None:
    from diffract_tui.ui import DiffractApp

    session = ExplorerSession.open([family.base, family.code], device="cpu", cache_dir=tmp_path / "cache",
                                   texts=[family.code_text], general_texts=[family.prose_text])
    session.eval_tokens = T
    try:
        pv = session.loss_previewer()
        expected = pv.taylor(session.base, session.targets[0], session.layout, session.eval_texts, windows=N,
                             tokens=T)
        model = pv._state[1].model
        before, flags = state_digest(model), grad_state(model)
        real = taylor.window_losses
        started, esc = threading.Event(), threading.Event()
        seen = {"windows": 0, "held": True}

        def held(lm, x, mask):  # the first window lasts until esc was pressed (no race with the machine's speed)
            seen["windows"] += int(x.shape[0])
            started.set()
            if seen["held"]:
                esc.wait(timeout=20)
            return real(lm, x, mask)

        monkeypatch.setattr(taylor, "window_losses", held)
        app = DiffractApp(session)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("4")
            await settle(pilot)
            view = app.query_one("#rewind")
            await pilot.press("s")
            for _ in range(100):
                if started.is_set():
                    break
                await pilot.pause(0.05)
            assert started.is_set()
            await pilot.press("escape")
            esc.set()
            deadline = time.monotonic() + 10
            while pv._lock.locked() and time.monotonic() < deadline:
                await pilot.pause(0.05)
            assert not pv._lock.locked()  # the pass ended: the model is free for the next call
            assert seen["windows"] == 1  # the window running at esc, not one more — not all N
            await settle(pilot)
            assert "taylor score: cancelled" in str(view.query_one("#rewind-summary").render())
            assert view.score == "rel_frob" and view.plan.pattern.score == "rel_frob" and session._taylor == {}
            assert state_digest(model) == before and grad_state(model) == flags
            seen["held"] = False
            await pilot.press("s")
            await settle(pilot)
            assert view.score == "taylor" and view.plan.pattern.score == "taylor"
            (grid,) = session._taylor.values()
            assert torch.equal(grid, expected)
    finally:
        session.close()

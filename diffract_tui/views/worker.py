"""Running engine work off the UI thread: one worker body shared by every view.

`run_engine_call` is what a view's thread worker executes: it calls the engine with progress and
cancellation hooks, reports progress to the app, and hands the result (or the error) back on the UI
thread — nothing after a cancellation. `EngineWork` is the mixin for views whose work is not per node.
The engine's one progress protocol (`analysis.progress`: `progress(done, total, text)`, `cancel()`,
`Cancelled`) is adapted to the status line here, once (`status_of`).
"""

from __future__ import annotations

from typing import Any, Callable

from textual.worker import get_current_worker

from analysis.run.session import CancelledFn, Cancelled, ProgressFn


def first_line(err: Exception) -> str:
    """An error's first line (our errors are one line already), or its type name when it has no text."""
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def status_of(done: int, total: int | None, text: str) -> tuple[float | None, str]:
    """An engine progress report as the status line's (fraction, text): `done/total text`, or text alone."""
    if total is None:
        return None, text
    return min(1.0, max(0.0, done / max(1, total))), (f"{done}/{total} {text}" if total > 1 else text)


def run_engine_call(view: Any, title: str, fn: Callable[[ProgressFn, CancelledFn], Any], *, start: str,
                    on_result: Callable[[Any], None], on_error: Callable[[Exception], None],
                    source: str | None = None) -> None:
    """Body of a thread worker of `view` (`source`, default its VIEW_ID, names the progress slot): fn(progress,
    cancelled), then on_result(result) or on_error(err) on the UI thread, unless the worker was cancelled."""
    worker = get_current_worker()
    app = view.app
    source = source or view.VIEW_ID

    def cancelled() -> bool:
        return worker.is_cancelled

    def progress(done: int, total: int | None, text: str) -> None:
        if worker.is_cancelled:
            raise Cancelled()
        fraction, line = status_of(done, total, text)
        app.call_from_thread(app.report_progress, source, fraction, f"{title}: {line}")

    try:
        progress(0, 1, start)
        result = fn(progress, cancelled)
    except Cancelled:
        return
    except Exception as err:  # shown in the view: a failed read must not take the app down
        if not worker.is_cancelled:
            app.call_from_thread(on_error, err)
        return
    finally:
        if not worker.is_cancelled:
            app.call_from_thread(app.work_done, source)
    if not worker.is_cancelled:
        app.call_from_thread(on_result, result)


class EngineWork:
    """Mixin for a `NodeView` whose work is not per node: `start_work(fn, deliver)` runs fn(progress, cancelled)
    in the view's exclusive worker group (Esc and a newer request cancel it; `group` names another, with its own
    progress slot, for work that must not cancel the view's own) and hands the result to `deliver`.
    (A plain mixin, not a Widget, so the app's view lookup finds only the view class in each module.)"""

    VIEW_ID: str

    def start_work(self, title: str, fn: Callable[[ProgressFn, CancelledFn], Any],
                   deliver: Callable[[Any], None], *, fail: Callable[[str], None] | None = None,
                   group: str | None = None) -> None:
        report = fail or self.show_message
        group = group or self.VIEW_ID

        def on_error(err: Exception) -> None:
            report(f"{title} failed: {first_line(err)}")

        self.run_worker(lambda: run_engine_call(self, title, fn, start="starting", on_result=deliver,
                                                on_error=on_error, source=group),
                        thread=True, exclusive=True, group=group, name=f"{group}:{title}",
                        exit_on_error=False)

"""The bottom status line: where the cursor is, marks, device, and a progress bar while work runs."""

from __future__ import annotations

import time

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Label, ProgressBar

PROGRESS_MIN_INTERVAL_S = 0.1  # at most ten bar updates a second per source


class StatusBar(Horizontal):
    """One line: a text label on the left, a progress bar (hidden when idle) on the right.

    Several sources (a view's worker, the "compute all" scan) may report at once; the bar shows the
    most recent report and hides when every source is done.
    """

    DEFAULT_CSS = """
    StatusBar { height: 1; dock: bottom; background: $panel; }
    StatusBar > #status-text { width: 1fr; height: 1; padding: 0 1; }
    StatusBar > #status-work { width: auto; max-width: 50%; height: 1; padding: 0 1; color: $text-muted; }
    StatusBar > ProgressBar { width: 24; height: 1; display: none; }
    StatusBar.-busy > ProgressBar { display: block; }
    StatusBar > ProgressBar Bar { width: 12; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._active: dict[str, tuple[float | None, str]] = {}
        self._last_update: dict[str, float] = {}

    def compose(self) -> ComposeResult:
        yield Label("", id="status-text")
        yield Label("", id="status-work")
        yield ProgressBar(total=100, show_eta=False, id="status-bar")

    def set_text(self, text: str) -> None:
        """The left-hand text (node, view, marks)."""
        self.query_one("#status-text", Label).update(text)

    def progress(self, source: str, fraction: float | None, text: str) -> None:
        """Show `source`'s progress (fraction in [0, 1], None = indeterminate); throttled."""
        now = time.monotonic()
        first = source not in self._active
        if not first and fraction is not None and fraction < 1.0 and \
                now - self._last_update.get(source, 0.0) < PROGRESS_MIN_INTERVAL_S:
            self._active[source] = (fraction, text)
            return
        self._last_update[source] = now
        self._active[source] = (fraction, text)
        self._show(source)

    def done(self, source: str) -> None:
        """`source` finished or was cancelled: show another active source, or hide the bar."""
        self._active.pop(source, None)
        self._last_update.pop(source, None)
        if self._active:
            self._show(next(reversed(self._active)))
        else:
            self.remove_class("-busy")
            self.query_one("#status-work", Label).update("")

    @property
    def busy(self) -> bool:
        """True while some source is reporting progress."""
        return bool(self._active)

    def _show(self, source: str) -> None:
        fraction, text = self._active[source]
        self.add_class("-busy")
        self.query_one("#status-work", Label).update(text)
        bar = self.query_one("#status-bar", ProgressBar)
        if fraction is None:
            bar.update(total=None)
        else:
            bar.update(total=100, progress=max(0.0, min(1.0, fraction)) * 100)

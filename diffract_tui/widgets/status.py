"""The bottom status line: where the cursor is, marks, device, and a progress bar while work runs."""

from __future__ import annotations

import time

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Label, ProgressBar

PROGRESS_MIN_INTERVAL_S = 0.1  # at most ten bar updates a second per source


def job_summary(text: str) -> str:
    """A job's progress cut to its name and first word (`table scan: 3/200 L0 q` → `table scan 3/200`): what
    fits when several jobs share the line."""
    name, sep, rest = text.partition(": ")
    if not sep:
        return text
    first = rest.split(maxsplit=1)
    return f"{name} {first[0]}" if first else name


class StatusBar(Horizontal):
    """One line: where the cursor is with the marks and the device (always shown), the key hint (while idle),
    the progress of every running job, and a progress bar (hidden when idle).

    Several sources (a view's worker, the "compute all" scan) may report at once: each keeps its own slot, in the
    order they started (`compute all 12/48 · table scan 3/200`); the bar follows the latest report and hides when every
    source is done. Long progress text is cut with "…", never the left-hand text.
    """

    HINT = "│ ? help  ctrl+p commands"
    DEFAULT_CSS = """
    StatusBar { height: 1; dock: bottom; background: $panel; }
    StatusBar > #status-text { width: auto; height: 1; padding: 0 0 0 1; text-wrap: nowrap; }
    StatusBar > #status-hint { width: 1fr; height: 1; padding: 0 1; text-wrap: nowrap; text-overflow: ellipsis; }
    StatusBar > #status-work { width: 1fr; height: 1; padding: 0 1; color: $text-muted; display: none;
                               text-wrap: nowrap; text-overflow: ellipsis; }
    StatusBar > ProgressBar { width: 18; height: 1; display: none; }
    StatusBar.-busy > #status-hint { display: none; }
    StatusBar.-busy > #status-work, StatusBar.-busy > ProgressBar { display: block; }
    StatusBar > ProgressBar Bar { width: 10; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._active: dict[str, tuple[float | None, str]] = {}
        self._last_update: dict[str, float] = {}
        self._latest: str | None = None

    def compose(self) -> ComposeResult:
        yield Label("", id="status-text")
        yield Label(self.HINT, id="status-hint")
        yield Label("", id="status-work")
        yield ProgressBar(total=100, show_eta=False, id="status-bar")

    def set_text(self, text: str) -> None:
        """The left-hand text (node, marks, device): never covered by progress."""
        self.query_one("#status-text", Label).update(text)

    def progress(self, source: str, fraction: float | None, text: str) -> None:
        """Show `source`'s progress (fraction in [0, 1], None = indeterminate) in its own slot; throttled."""
        now = time.monotonic()
        first = source not in self._active
        self._active[source] = (fraction, text)
        self._latest = source
        if not first and fraction is not None and fraction < 1.0 and \
                now - self._last_update.get(source, 0.0) < PROGRESS_MIN_INTERVAL_S:
            return
        self._last_update[source] = now
        self._show()

    def done(self, source: str) -> None:
        """`source` finished or was cancelled: drop its slot, or hide the bar when none is left."""
        self._active.pop(source, None)
        self._last_update.pop(source, None)
        if self._active:
            if self._latest not in self._active:
                self._latest = next(reversed(self._active))
            self._show()
        else:
            self.remove_class("-busy")
            self.query_one("#status-work", Label).update("")

    @property
    def busy(self) -> bool:
        """True while some source is reporting progress."""
        return bool(self._active)

    def work_text(self) -> str:
        """The progress line: one job's whole text, or each job's summary, joined with " · "."""
        texts = [text for _, text in self._active.values()]
        return texts[0] if len(texts) == 1 else " · ".join(job_summary(t) for t in texts)

    def _show(self) -> None:
        fraction, _ = self._active[self._latest] if self._latest in self._active else (None, "")
        self.add_class("-busy")
        self.query_one("#status-work", Label).update(self.work_text())
        bar = self.query_one("#status-bar", ProgressBar)
        if fraction is None:
            bar.update(total=None)
        else:
            bar.update(total=100, progress=max(0.0, min(1.0, fraction)) * 100)

"""The one progress-and-cancel protocol of every long engine call (scan, delta table, rewind, agreement,
writer, the session's methods): `progress(done, total, text)` after each step (`total` None when unknown),
`cancel()` polled between steps, and `Cancelled` raised when the caller asked to stop.

The CLI's progress bars and the app's worker (`diffract_tui/views/worker.py`) adapt this once each.
"""

from __future__ import annotations

from typing import Callable

Progress = Callable[[int, "int | None", str], None]
Cancel = Callable[[], bool]


class Cancelled(Exception):
    """A computation stopped because its caller cancelled it."""


def no_progress(done: int, total: int | None, text: str) -> None:
    """The default `progress`: report nothing."""
    return None


def never() -> bool:
    """The default `cancel`: never stop."""
    return False


def check(cancel: Cancel | None) -> None:
    """Raise `Cancelled` when `cancel()` says stop (between two steps of a long call)."""
    if cancel is not None and cancel():
        raise Cancelled()


def fraction(done: int, total: int | None) -> float | None:
    """done/total in [0, 1], or None when the total is unknown (an indeterminate bar)."""
    if total is None:
        return None
    return min(1.0, max(0.0, done / max(1, total)))

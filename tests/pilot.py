"""Shared helper of the app's pilot tests."""

from __future__ import annotations

import asyncio
import functools


def sync(test):
    """Run an async pilot test with asyncio.run (no async pytest plugin needed)."""

    @functools.wraps(test)
    def run(*args, **kwargs):
        return asyncio.run(test(*args, **kwargs))

    return run


async def settle(pilot) -> None:
    """Let timers fire and every worker finish, then let the UI draw the results."""
    for _ in range(3):
        await pilot.pause(0.1)
        await pilot.app.workers.wait_for_complete()
    await pilot.pause()


def status_text(app) -> str:
    """The status bar's text (where the app says one line about what went wrong or what it did)."""
    from textual.widgets import Label

    return str(app.query_one("#status-text", Label).render())

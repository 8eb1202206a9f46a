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

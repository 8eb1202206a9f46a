"""Snapshots of the Heads grid, Rewind and Table views at 80×24 and 160×48.

Deterministic: a seeded `write_family` (folders base/math/code = the labels), a cache in tmp_path shared
by the module, device cpu, and every worker finished before the screenshot. After an intended change, update with
`pytest tests/test_app_snapshots_views.py --snapshot-update` and look at the SVGs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from analysis.generate import write_family
from analysis.run.session import ExplorerSession

SIZES = [(80, 24), (160, 48)]
CONFIG = dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return write_family(tmp_path_factory.mktemp("family"), **CONFIG)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One spectra cache for the module: the two Table snapshots share one scan (a hit renders exactly as a
    fresh computation, since the scan stores what it shows)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def session(family, cache_dir: Path):
    s = ExplorerSession.open([family.base, family.domains["math"], family.domains["code"]], device="cpu",
                             cache_dir=cache_dir)
    yield s
    s.close()


def make_app(session):
    from diffract_tui.ui import DiffractApp

    return DiffractApp(session)


def keys(*presses: str):
    """run_before: press keys one by one, each time waiting until every worker has finished."""

    async def run_before(pilot) -> None:
        app = pilot.app
        for key in presses:
            await pilot.press(key)
            for _ in range(2):
                await pilot.pause(0.1)
                await app.workers.wait_for_complete()
        await pilot.pause()

    return run_before


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_heads_grid_update_magnitude(snap_compare, session, size) -> None:
    assert snap_compare(make_app(session), terminal_size=size, run_before=keys("3"))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_heads_grid_a2_with_cursor_and_marks(snap_compare, session, size) -> None:
    # m m → A2; tab focuses the grid; mark (0,0) and (1,1)
    assert snap_compare(make_app(session), terminal_size=size,
                        run_before=keys("3", "m", "m", "tab", "space", "j", "l", "space"))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_rewind_greedy_preview(snap_compare, session, size) -> None:
    # + + + → f = 0.30: the planted low-importance group
    assert snap_compare(make_app(session), terminal_size=size, run_before=keys("4", "plus", "plus", "plus"))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_table_sorted_by_update(snap_compare, session, size) -> None:
    # tab into the table, two columns right (node shape → Δrel math), S: largest first
    assert snap_compare(make_app(session), terminal_size=size,
                        run_before=keys("5", "tab", "right", "right", "S"))

"""Snapshots of the Evolution view (6) at 80×24 and 160×48 on the real short training run of
`tests/series_run.py` (given in shuffled order): α of L1 q against step with one line per head, the median-α
summary per module kind, and the tree's sparklines.

Deterministic: the trained run is reproducible (seeded, one thread), a cache in tmp_path shared by the module,
device cpu, chart coordinates rounded (`chart_values`), and every worker finished before the screenshot. After an
intended change, update with `pytest tests/test_app_snapshots_evolution.py --snapshot-update` and look at the SVGs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from analysis.run.session import ExplorerSession
from series_run import series_run  # noqa: F401 — the session fixture

SIZES = [(80, 24), (160, 48)]
SHUFFLED = (20, 0, 40, 10, 30)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def session(series_run, cache_dir: Path):  # noqa: F811
    torch.set_num_threads(1)
    s = ExplorerSession.open([str(series_run.paths[st]) for st in SHUFFLED], device="cpu", cache_dir=cache_dir)
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
def test_evolution_alpha_of_a_projection(snap_compare, session, size) -> None:
    # 6: Evolution; j×5 → L1, l expands it, l → its q: α of L1 q and its four heads against step
    assert snap_compare(make_app(session), terminal_size=size,
                        run_before=keys("6", "j", "j", "j", "j", "j", "l", "l"))

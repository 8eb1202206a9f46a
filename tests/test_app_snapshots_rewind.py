"""Snapshots of the fixed Rewind view (issue 10 B.3) at 80×24 and 160×48: the plan's layers × heads mask with
integer axes (·  kept, ■ rewound, ◆ rewound with k/v), and the per-layer bars panel (one bar per layer, 0
shown as 0, the full length = all heads of a layer).

Deterministic: a seeded `write_family` (folders base/math/code = the labels), device cpu, every worker
finished before the screenshot. After an intended change, update with
`pytest tests/test_app_snapshots_rewind.py --snapshot-update` and look at the SVGs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from analysis.generate import write_family
from analysis.run.session import ExplorerSession
from tests.test_app_snapshots_views import keys, make_app

SIZES = [(80, 24), (160, 48)]
CONFIG = dict(num_layers=6, hidden_size=64, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """6 layers × 4 heads (2 kv heads): layers without rewound heads sit between ones with some."""
    return write_family(tmp_path_factory.mktemp("family"), **CONFIG)


@pytest.fixture
def session(family, tmp_path: Path):
    s = ExplorerSession.open([family.base, family.domains["math"], family.domains["code"]], device="cpu",
                             cache_dir=tmp_path / "cache")
    yield s
    s.close()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_rewind_mask(snap_compare, session, size) -> None:
    # + + + → f = 0.30: 7 of 24 heads
    assert snap_compare(make_app(session), terminal_size=size, run_before=keys("4", "plus", "plus", "plus"))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_rewind_per_layer_bars(snap_compare, session, size) -> None:
    # b → the per-layer bars panel
    assert snap_compare(make_app(session), terminal_size=size, run_before=keys("4", "plus", "plus", "plus", "b"))

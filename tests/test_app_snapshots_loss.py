"""Snapshots of the Rewind view's loss panels (issue 11 item 5) at 80×24 and 160×48, on the real tiny CPT family
(tests/tiny_cpt.py; texts code.txt as the domain, prose.txt as the general text, 4 windows × 64 tokens): loss vs
fraction — one line per pattern × text with the base and CPT levels — and the trade-off, gain kept against
forgetting recovered with the current plan's point (greedy f 0.15) highlighted.

Deterministic: one thread, device cpu, a cache shared by the module, every worker finished before the screenshot;
coordinates are rounded by `chart_values`. After an intended change, update with
`pytest tests/test_app_snapshots_loss.py --snapshot-update` and look at the SVGs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from analysis.run.session import ExplorerSession  # noqa: E402
from tests.test_app_snapshots_views import keys, make_app  # noqa: E402
from tiny_cpt import family  # noqa: E402,F401  (the session fixture)

SIZES = [(80, 24), (160, 48)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # evaluations compare bit for bit


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def session(family, cache_dir: Path):
    s = ExplorerSession.open([family.base, family.code, family.code2], device="cpu", cache_dir=cache_dir,
                             texts=[family.code_text], general_texts=[family.prose_text])
    s.eval_tokens = 64
    yield s
    s.close()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_rewind_loss_vs_fraction(snap_compare, session, size) -> None:
    # L: measure the loss of every pattern and the plan; the loss panel opens
    assert snap_compare(make_app(session), terminal_size=size, run_before=keys("4", "L"))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_rewind_tradeoff(snap_compare, session, size) -> None:
    # b after L: the trade-off panel, the plan's point highlighted
    assert snap_compare(make_app(session), terminal_size=size, run_before=keys("4", "L", "b"))

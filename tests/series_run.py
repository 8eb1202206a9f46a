"""The real short training run of the engine (`analysis.tiny_models.build_series`: a 2-layer GQA Llama trained
on `pydoc_data.topics` bytes, saved at steps 0, 10, 20, 30 and 40 in mixed name formats), for the tests:
`build_series(root)` defaults to a folder in the system temp dir named by the recipe (reused across sessions);
the `series_run` fixture is that run."""

from __future__ import annotations

from pathlib import Path

from analysis.tiny_models import SERIES_BATCH as BATCH  # noqa: F401 — the names tests import from here
from analysis.tiny_models import SERIES_NAMES as NAMES  # noqa: F401
from analysis.tiny_models import SERIES_RECIPE as RECIPE
from analysis.tiny_models import SERIES_SEQ as SEQ  # noqa: F401
from analysis.tiny_models import SERIES_TOKENS as TOKENS  # noqa: F401
from analysis.tiny_models import SeriesRun
from analysis.tiny_models import build_series as _build


def shared_root() -> Path:
    """The run's folder in the system temp dir, named by the recipe (reused across test sessions)."""
    import tempfile

    return Path(tempfile.gettempdir()) / f"diffract-series-run-{RECIPE.replace('/', '-')}"


def build_series(root: Path | None = None) -> SeriesRun:
    """Train (or reuse) the run under `root` (default `shared_root()`)."""
    return _build(root if root is not None else shared_root())


try:  # the fixture, for the test modules that import it
    import pytest

    @pytest.fixture(scope="session")
    def series_run() -> SeriesRun:
        """The tiny training run's checkpoint series (trained once on one thread, then reused from temp)."""
        return build_series()
except ImportError:  # pragma: no cover - build_series works without pytest
    pass

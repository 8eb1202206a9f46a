"""The tiny real continual pre-training family of the engine (`analysis.tiny_models.build_cpt_family`: a GQA
Llama trained on `pydoc_data.topics` prose, continued on standard-library code, plus a second CPT on other code),
for the tests: `build_family(root)` defaults to a folder in the system temp dir named by the recipe, so a test
session trains once and later sessions reuse it; the `family` fixture is that family."""

from __future__ import annotations

from pathlib import Path

from analysis.tiny_models import CPT_RECIPE as RECIPE  # noqa: F401 — the names tests import from here
from analysis.tiny_models import CPT_SEQ as SEQ  # noqa: F401
from analysis.tiny_models import CPT_VOCAB as VOCAB  # noqa: F401
from analysis.tiny_models import HELDOUT_CODE, TRAIN_CODE, TRAIN_CODE2, Family, build_cpt_family  # noqa: F401
from analysis.tiny_models import cpt_stamp as _stamp


def shared_root() -> Path:
    """The family's folder in the system temp dir, named by the recipe (reused across test sessions)."""
    import tempfile

    return Path(tempfile.gettempdir()) / f"diffract-tiny-cpt-{_stamp()}"


def build_family(root: Path | None = None) -> Family:
    """Train (or reuse) the family under `root` (default `shared_root()`)."""
    return build_cpt_family(root if root is not None else shared_root())


try:  # the fixture, for the test modules that import it (tests/test_eval.py, tests/test_hostile_eval.py)
    import pytest

    @pytest.fixture(scope="session")
    def family() -> Family:
        """The tiny CPT family (trained once on one thread, then reused from the system temp folder)."""
        return build_family()
except ImportError:  # pragma: no cover - build_family works without pytest
    pass

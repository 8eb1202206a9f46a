"""One provenance builder (SPEC §8) for every export and written checkpoint: which tool, which engine,
which inputs, which settings. The engine takes the tool version from package metadata, never from the app.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from analysis import ENGINE_VERSION

if TYPE_CHECKING:  # pragma: no cover
    from analysis.io.checkpoint import Checkpoint
    from analysis.spectral.backend import SpectralSettings

DIST_NAME = "diffract-tui"
FALLBACK_VERSION = "0.1.0"     # a source tree that was never installed (keep equal to pyproject's version)


def package_version() -> str:
    """The installed distribution's version, or FALLBACK_VERSION when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DIST_NAME)
    except PackageNotFoundError:
        return FALLBACK_VERSION


def tool_version() -> str:
    """`diffract-tui X.Y.Z`, the `created_by` of rewind lists and written checkpoints."""
    return f"{DIST_NAME} {package_version()}"


def checkpoint_entry(ckpt: "Checkpoint") -> dict[str, Any]:
    """Path, fingerprint and label of one input checkpoint."""
    return {"path": str(ckpt.path), "fingerprint": ckpt.fingerprint, "label": ckpt.label}


def provenance(checkpoints: Sequence["Checkpoint"], settings: "SpectralSettings | dict[str, Any] | None",
               **extra: Any) -> dict[str, Any]:
    """The provenance block: tool and engine versions, the inputs (first = base) and the settings that change
    numbers (`SpectralSettings.key()`, device kind included), plus `extra` keys (command, architecture …)."""
    if settings is not None and not isinstance(settings, dict):
        settings = settings.key()
    return {"created_by": tool_version(), "engine_version": ENGINE_VERSION,
            "checkpoints": [checkpoint_entry(c) for c in checkpoints],
            "settings": dict(settings or {}), **extra}

"""The one provenance builder: what every written table, report and checkpoint says about where it came from.

`scan`, `delta`, `interpolate`, the rewind list and the app's exports all stamp the same fields, so a
reader can tell which tool, engine and inputs produced a file without knowing which command wrote it.
The engine reads the tool version from the installed distribution, never by importing the app.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any, Sequence

DISTRIBUTION = "diffract-tui"
SOURCE_TREE_VERSION = "0.1.0"   # pyproject's version, for a source tree that was never installed


def tool_version() -> str:
    """`diffract-tui X.Y.Z` for `created_by` (the installed distribution's version)."""
    try:
        number = version(DISTRIBUTION)
    except PackageNotFoundError:
        number = SOURCE_TREE_VERSION
    return f"{DISTRIBUTION} {number}"


def checkpoint_entry(checkpoint: Any) -> dict[str, str]:
    """`{label, path, fingerprint}` of one opened checkpoint."""
    return {"label": checkpoint.label, "path": str(checkpoint.path), "fingerprint": checkpoint.fingerprint}


def provenance(checkpoints: Sequence[Any], settings: Any = None, *, device_kind: str | None = None,
               **extra: Any) -> dict[str, Any]:
    """{created_by, engine_version, checkpoints: [{label, path, fingerprint}], device_kind?, settings, **extra};
    `settings` may be a `SpectralSettings` (its cache key is stored), a dict, or None."""
    from analysis import ENGINE_VERSION

    out: dict[str, Any] = {"created_by": tool_version(), "engine_version": ENGINE_VERSION,
                           "checkpoints": [checkpoint_entry(c) for c in checkpoints]}
    if device_kind is not None:
        out["device_kind"] = device_kind
    out["settings"] = settings.key() if hasattr(settings, "key") else (None if settings is None else dict(settings))
    out.update(extra)
    return out

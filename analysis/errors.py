"""The one exception the engine raises for bad input, so every front end can show one line."""

from __future__ import annotations

from pathlib import Path


class DiffractError(Exception):
    """Bad input or an impossible request: one line saying what, which file, what to do.

    Front ends print ``str(err)`` and exit non-zero; they never show a traceback for it.
    """

    def __init__(self, message: str, path: str | Path | None = None, hint: str | None = None):
        self.message = message
        self.path = Path(path) if path is not None else None
        self.hint = hint
        parts = [f"{self.path}: {message}" if self.path is not None else message]
        if hint:
            parts.append(hint)
        super().__init__(" — ".join(parts))


class CheckpointError(DiffractError):
    """A checkpoint that cannot be opened or read as it claims to be."""


class AlignmentError(DiffractError):
    """Checkpoints that cannot be compared (e.g. a shared key with different shapes)."""


class LayoutError(DiffractError):
    """A config that contradicts the tensors (e.g. heads × head_dim ≠ rows)."""


class RewindListError(DiffractError):
    """A rewind list that is malformed or no longer matches its checkpoints."""

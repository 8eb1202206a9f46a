"""The one exception the engine raises for bad input, so every front end can show one line."""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class MatrixFailure:
    """One matrix (or head slice) a scan or a delta table could not compute: which checkpoint and tensor, and
    why. The command still writes every other row, lists these on stderr and exits 3 (a partial result)."""

    checkpoint: str                # the checkpoint's label
    path: str                      # its file or folder
    operation: str                 # "weight" or "delta"
    tensor: str
    what: str                      # "layer 3 q head 2", "globals embeddings", …
    reason: str
    left_out: str = "its row is left out"

    def describe(self) -> str:
        """What failed and why, and which file: "checkpoint C, tensor T (layer 0 q head 2): …, PATH"."""
        op = "" if self.operation == "weight" else ", ΔW against the base"
        return f"checkpoint {self.checkpoint}, tensor {self.tensor} ({self.what}{op}): {self.reason}, {self.path}"

    def line(self) -> str:
        """The failure as one line of a partial result: what, which file — what to do."""
        return f"{self.describe()} — {self.left_out}; check that checkpoint for overflowed weights"

"""Format readers behind `analysis.io.checkpoint`: one class per on-disk weight format.

Each reader parses metadata when constructed (cheap: headers only where the format allows) and
reads tensor bytes on demand. They all expose the same small surface (see `WeightFile`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # pragma: no cover - typing only (opening a checkpoint imports no torch)
    import numpy as np
    import torch


@dataclass(frozen=True)
class StoredTensor:
    """Metadata of one tensor as stored in a weight file."""

    raw_name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name, e.g. "bfloat16" (for a quantised GGUF tensor: float32, what reads return)
    nbytes: int
    quant: str | None = None  # storage type when it is not a torch dtype's own: GGUF's "Q4_1", "F16", …


class WeightFile(Protocol):
    """What `Checkpoint` needs from a reader of one weight file."""

    entries: dict[str, StoredTensor]

    def fingerprint_bytes(self) -> bytes: ...
    def tensor(self, raw_name: str) -> "torch.Tensor": ...  # may alias reader memory; callers copy
    def rows(self, raw_name: str, start: int, stop: int) -> "torch.Tensor": ...
    # The stored values as numpy without torch, in new memory the caller owns (readers/arrays.py): float and
    # integer types as themselves, bfloat16 widened to float32, GGUF blocks dequantised; NoNumpyRead otherwise.
    def array(self, raw_name: str) -> "np.ndarray": ...
    def close(self) -> None: ...

"""Reader for one PyTorch pickle (`pytorch_model.bin`, `.pt`): only `torch.load(weights_only=True)`.

Zip-format files (torch >= 1.6) are memory-mapped (`mmap=True`): opening reads the pickle
metadata only and tensor bytes are paged in when used. Legacy (non-zip) pickles cannot be
memory-mapped: opening loads them onto the meta device (names, shapes, dtypes, no data), and the
first tensor access loads the whole file into memory once (CPU). A pickle that needs arbitrary
unpickling is refused, never executed.
"""

from __future__ import annotations

import pickle
import zipfile
import threading
from pathlib import Path
from typing import Any

import torch

from analysis.errors import CheckpointError
from analysis.io.readers import StoredTensor

FINGERPRINT_BYTES = 64 * 1024
HINT_UNSAFE = "only plain state dicts are read; re-save it with torch.save(model.state_dict()) or as safetensors"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _load(path: Path, **kwargs: Any) -> Any:
    """torch.load with weights_only=True; every failure becomes a one-line CheckpointError."""
    try:
        return torch.load(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refused: the pickle needs arbitrary unpickling, which is never executed "
                              f"({_first_line(e).removeprefix('Weights only load failed. ')[:160]})",
                              path=path, hint=HINT_UNSAFE) from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, KeyError, AttributeError) as e:
        raise CheckpointError(f"not a readable PyTorch checkpoint ({type(e).__name__}: {_first_line(e)[:160]})",
                              path=path, hint="the file is damaged, incomplete or not a torch.save file") from None


def _state_dict(path: Path, obj: Any) -> dict[str, torch.Tensor]:
    """The flat name -> tensor mapping inside a loaded pickle, or a CheckpointError saying why not."""
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # a training checkpoint wrapping its state dict
    if not isinstance(obj, dict):
        raise CheckpointError(f"holds a {type(obj).__name__}, not a state dict of tensors",
                              path=path, hint=HINT_UNSAFE)
    for key, value in obj.items():
        if not isinstance(key, str):
            raise CheckpointError(f"holds a non-string key {key!r} where a state dict of tensors should be",
                                  path=path, hint=HINT_UNSAFE)
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"holds a non-tensor value at key {key!r} ({type(value).__name__}) where a state "
                                  f"dict of tensors should be", path=path, hint=HINT_UNSAFE)
    return obj


class PickleFile:
    """One PyTorch pickle: metadata at construction, tensor data lazily (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = path
        self.is_zip = zipfile.is_zipfile(path)
        self._lock = threading.Lock()  # app workers may read concurrently; load a legacy file once
        if self.is_zip:
            self._tensors: dict[str, torch.Tensor] | None = _state_dict(path, _load(path, mmap=True, map_location="cpu"))
            meta = self._tensors
        else:
            self._tensors = None
            meta = _state_dict(path, _load(path, map_location="meta"))
        self.entries = {k: StoredTensor(k, tuple(t.shape), str(t.dtype).removeprefix("torch."),
                                        t.numel() * t.element_size()) for k, t in meta.items()}

    def fingerprint_bytes(self) -> bytes:
        """The first 64 KiB of the file (pickles have no separate header)."""
        with open(self.path, "rb") as f:
            return f.read(FINGERPRINT_BYTES)

    def _loaded(self) -> dict[str, torch.Tensor]:
        with self._lock:
            return self._loaded_locked()

    def _loaded_locked(self) -> dict[str, torch.Tensor]:
        if self._tensors is None:  # legacy pickle: one full load on first use (or a reopen after close)
            kwargs = {"mmap": True} if self.is_zip else {}
            self._tensors = _state_dict(self.path, _load(self.path, map_location="cpu", **kwargs))
        return self._tensors

    def tensor(self, raw_name: str) -> torch.Tensor:
        """The whole tensor as stored (a view of the loaded state dict; Checkpoint copies it)."""
        return self._loaded()[raw_name]

    def rows(self, raw_name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) along dim 0, a view (mmap pages only those rows in; Checkpoint copies it)."""
        return self._loaded()[raw_name][start:stop]

    def close(self) -> None:
        with self._lock:
            self._tensors = None

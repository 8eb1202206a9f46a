"""Reader for one PyTorch pickle (`pytorch_model.bin`, `.pt`): only `torch.load(weights_only=True)`.

Zip-format files (torch >= 1.6) are memory-mapped (`mmap=True`): opening reads the pickle
metadata only (twice: mapped, and onto meta storages to check record sizes) and tensor bytes
are paged in when used. Legacy (non-zip) pickles cannot be
memory-mapped: opening loads them onto the meta device (names, shapes, dtypes, no data), and the
first tensor access loads the whole file into memory once (CPU). A pickle that needs arbitrary
unpickling is refused, never executed.

A memory-mapped load skips torch's check that each storage record holds the bytes its tensors
need, so opening a zip file checks every record's size itself (a record cut short would hand out
the bytes that follow it). Parameters are detached; sparse, quantized and other non-plain tensors
are refused by name.
"""

from __future__ import annotations

import io
import pickle
import threading
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import _weights_only_unpickler  # the unpickler torch.load(weights_only=True) uses

from analysis.errors import CheckpointError
from analysis.io.readers import StoredTensor
from analysis.io.readers.safetensors_file import DTYPES
from analysis.io.safe_read import check_regular, open_regular

FINGERPRINT_BYTES = 64 * 1024
HINT_UNSAFE = "only plain state dicts are read; re-save it with torch.save(model.state_dict()) or as safetensors"
HINT_DAMAGED = "the file is damaged, incomplete or not a torch.save file"
SUPPORTED_DTYPES = frozenset(name for name, _ in DTYPES.values())  # what safetensors files may hold, too


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _load(path: Path, passthrough: tuple[type[BaseException], ...] = (), **kwargs: Any) -> Any:
    """torch.load with weights_only=True of a regular file; every failure (except `passthrough` ones)
    becomes a one-line CheckpointError."""
    check_regular(path, CheckpointError)
    try:
        return torch.load(path, weights_only=True, **kwargs)
    except passthrough:
        raise
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refused: the pickle needs arbitrary unpickling, which is never executed "
                              f"({_first_line(e).removeprefix('Weights only load failed. ')[:160]})",
                              path=path, hint=HINT_UNSAFE) from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, KeyError, AttributeError,
            NotImplementedError) as e:
        raise CheckpointError(f"not a readable PyTorch checkpoint ({type(e).__name__}: {_first_line(e)[:160]})",
                              path=path, hint=HINT_DAMAGED) from None


def _plain(path: Path, key: str, t: torch.Tensor, data: bool) -> torch.Tensor:
    """`t` as a plain dense tensor without autograd (nn.Parameter detached), or a CheckpointError naming
    the tensor when it is sparse, quantized, of an unsupported dtype or (`data`) saved without data."""
    if t.layout != torch.strided:
        raise CheckpointError(f"tensor '{key}' is a {str(t.layout).removeprefix('torch.')} tensor, which is not "
                              "supported", path=path, hint="save it dense (tensor.to_dense()) or as safetensors")
    dtype = str(t.dtype).removeprefix("torch.")
    if t.is_quantized:
        raise CheckpointError(f"tensor '{key}' is quantized ({dtype}), which is not supported", path=path,
                              hint="save the dequantized weights (tensor.dequantize()) or as safetensors")
    if dtype not in SUPPORTED_DTYPES:
        raise CheckpointError(f"tensor '{key}' has unsupported dtype {dtype}", path=path,
                              hint="convert the checkpoint to float32/float16/bfloat16")
    if data and t.device.type == "meta":
        raise CheckpointError(f"tensor '{key}' was saved without data (on the meta device)", path=path,
                              hint="save the real weights (model.to('cpu').state_dict())")
    return t.detach() if t.requires_grad or type(t) is not torch.Tensor else t


def _storage_sizes(data_pkl: bytes) -> tuple[Any, dict[str, int]]:
    """Unpickle a zip file's data.pkl with torch's weights-only unpickler onto meta storages (no data
    read): the object, and the bytes each storage key needs. Each storage remembers its key."""
    sizes: dict[str, int] = {}
    storages: dict[str, torch.storage.TypedStorage] = {}

    def persistent_load(saved_id: Any) -> torch.storage.TypedStorage:
        _, storage_type, key, _location, numel = saved_id
        key = key.decode("ascii") if isinstance(key, bytes) else str(key)
        if key not in storages:
            dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
            sizes[key] = numel * torch._utils._element_size(dtype)
            untyped = torch.UntypedStorage(sizes[key], device="meta")
            untyped._diffract_key = key
            storages[key] = torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)
        return storages[key]

    unpickler = _weights_only_unpickler.Unpickler(io.BytesIO(data_pkl), encoding="utf-8")
    unpickler.persistent_load = persistent_load
    return unpickler.load(), sizes


def _check_records(path: Path) -> None:
    """Refuse a zip pickle where a storage record is missing, compressed or shorter than the bytes the
    pickle says its tensors need: a memory-mapped load skips torch's size check and would hand out the
    bytes after the record (the next record, the zip directory) as weights."""
    try:
        with open_regular(path) as handle, zipfile.ZipFile(handle) as zf:
            pickles = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise CheckpointError("zip file has no single <archive>/data.pkl record", path=path, hint=HINT_DAMAGED)
            prefix = pickles[0][: -len("data.pkl")]
            obj, sizes = _storage_sizes(zf.read(pickles[0]))
            infos = {key: zf.NameToInfo.get(f"{prefix}data/{key}") for key in sizes}
    except (OSError, zipfile.BadZipFile, ValueError, TypeError, RuntimeError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"not a readable PyTorch checkpoint ({type(e).__name__}: {_first_line(e)[:160]})",
                              path=path, hint=HINT_DAMAGED) from None
    names: dict[str, str] = {}
    for name, t in _state_dict(path, obj, data=False).items():
        names.setdefault(getattr(t.untyped_storage(), "_diffract_key", ""), name)
    for key, need in sizes.items():
        info, tensor = infos[key], names.get(key, f"storage {key}")
        if info is None:
            raise CheckpointError(f"tensor '{tensor}' has no storage record {prefix}data/{key}", path=path,
                                  hint=HINT_DAMAGED)
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"tensor '{tensor}' is in a compressed record {info.filename}, which cannot be "
                                  "memory-mapped", path=path, hint="re-save it with torch.save (records uncompressed)")
        if info.file_size < need:
            raise CheckpointError(f"tensor '{tensor}' needs {need} bytes of storage but its record {info.filename} "
                                  f"holds only {info.file_size}", path=path,
                                  hint="the file is damaged or cut short; download or save it again")


def _state_dict(path: Path, obj: Any, data: bool = True) -> dict[str, torch.Tensor]:
    """The flat name -> plain tensor mapping inside a loaded pickle, or a CheckpointError saying why not
    (`data`: the load was meant to hold tensor data, not meta-device placeholders)."""
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
    return {key: _plain(path, key, value, data) for key, value in obj.items()}


class PickleFile:
    """One PyTorch pickle: metadata at construction, tensor data lazily (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = path
        with open_regular(path) as handle:
            self.is_zip = zipfile.is_zipfile(handle)
        self._lock = threading.Lock()  # app workers may read concurrently; load the file once
        self._tensors: dict[str, torch.Tensor] | None = None
        if self.is_zip:  # mapped now; then each storage record's size is checked against the pickle
            meta = self._tensors = self._read()
            _check_records(path)
        else:
            try:
                meta = _state_dict(path, _load(path, (NotImplementedError,), map_location="meta"), data=False)
            except NotImplementedError:  # torch builds no quantized tensor on the meta device: a real load names it
                meta = self._tensors = self._read()
        self.entries = {k: StoredTensor(k, tuple(t.shape), str(t.dtype).removeprefix("torch."),
                                        t.numel() * t.element_size()) for k, t in meta.items()}

    def fingerprint_bytes(self) -> bytes:
        """The first 64 KiB of the file (pickles have no separate header)."""
        with open_regular(self.path) as f:
            return f.read(FINGERPRINT_BYTES)

    def _loaded(self) -> dict[str, torch.Tensor]:
        with self._lock:
            return self._loaded_locked()

    def _loaded_locked(self) -> dict[str, torch.Tensor]:
        if self._tensors is None:  # one load on first use (or a reopen after close)
            self._tensors = self._read()
        return self._tensors

    def _read(self) -> dict[str, torch.Tensor]:
        """The state dict with data: memory-mapped for a zip file, a full load for a legacy one."""
        kwargs = {"mmap": True} if self.is_zip else {}
        return _state_dict(self.path, _load(self.path, map_location="cpu", **kwargs))

    def tensor(self, raw_name: str) -> torch.Tensor:
        """The whole tensor as stored (a view of the loaded state dict; Checkpoint copies it)."""
        return self._loaded()[raw_name]

    def rows(self, raw_name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) along dim 0, a view (mmap pages only those rows in; Checkpoint copies it)."""
        return self._loaded()[raw_name][start:stop]

    def close(self) -> None:
        with self._lock:
            self._tensors = None

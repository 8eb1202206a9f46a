"""Reader for one PyTorch pickle (`pytorch_model.bin`, `.pt`): tensor data only through
`torch.load(weights_only=True)`; metadata without torch where the file is a plain state dict.

Opening parses the pickle's structure with a restricted, torch-free unpickler
(`analysis.io.readers.pickle_records`): names, shapes, dtypes and, for a zip file, each storage record's
size, in one parse and without reading tensor bytes or importing torch. Whatever that reading does not
model (other globals, sparse, quantized or meta tensors, damaged streams) is opened the previous way,
by `torch.load(weights_only=True)` (onto the meta device for a legacy file), which accepts or refuses it
in its own words. Tensor data is loaded on first use: zip-format files (torch >= 1.6) are
memory-mapped (`mmap=True`, pages read when used), legacy (non-zip) pickles are loaded whole (CPU) once.
A pickle that needs arbitrary unpickling is refused, never executed.

A memory-mapped load skips torch's check that each storage record holds the bytes its tensors
need, so opening a zip file checks every record's size itself (a record cut short would hand out
the bytes that follow it). Parameters are detached; sparse, quantized and other non-plain tensors
are refused by name.
"""

from __future__ import annotations

import os
import pickle
import struct
import threading
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from analysis.errors import CheckpointError
from analysis.io.readers import StoredTensor
from analysis.io.readers.pickle_records import (StorageRecord, TensorRecord, Unmodelled, load_legacy_records,
                                                load_records, plain_tensors, state_dict_of)
from analysis.io.readers.safetensors_file import DTYPES
from analysis.io.safe_read import check_regular, open_regular

if TYPE_CHECKING:  # pragma: no cover - typing only
    import numpy as np
    import torch

FINGERPRINT_BYTES = 64 * 1024
LOCAL_HEADER = struct.Struct("<4s22xHH")  # a zip record's local header (30 bytes): signature, name and extra lengths
HINT_UNSAFE = "only plain state dicts are read; re-save it with torch.save(model.state_dict()) or as safetensors"
HINT_DAMAGED = "the file is damaged, incomplete or not a torch.save file"
SUPPORTED_DTYPES = frozenset(name for name, _ in DTYPES.values())  # what safetensors files may hold, too
ZIP_ERRORS = (OSError, zipfile.BadZipFile, ValueError, TypeError, RuntimeError, pickle.UnpicklingError, KeyError,
              EOFError)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _damaged(path: Path, e: BaseException) -> CheckpointError:
    """The one-line refusal of a file torch cannot read."""
    return CheckpointError(f"not a readable PyTorch checkpoint ({type(e).__name__}: {_first_line(e)[:160]})",
                           path=path, hint=HINT_DAMAGED)


def _load(path: Path, passthrough: tuple[type[BaseException], ...] = (), **kwargs: Any) -> Any:
    """torch.load with weights_only=True of a regular file; every failure (except `passthrough` ones)
    becomes a one-line CheckpointError."""
    import torch

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
            NotImplementedError, struct.error) as e:   # struct.error: a legacy file cut inside its storages
        raise _damaged(path, e) from None


def _plain(path: Path, key: str, t: "torch.Tensor", data: bool) -> "torch.Tensor":
    """`t` as a plain dense tensor without autograd (nn.Parameter detached), or a CheckpointError naming
    the tensor when it is sparse, quantized, of an unsupported dtype or (`data`) saved without data."""
    import torch

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


def _data_pkl(path: Path, zf: zipfile.ZipFile) -> tuple[str, bytes]:
    """(archive prefix, bytes) of a zip file's single <archive>/data.pkl record."""
    pickles = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise CheckpointError("zip file has no single <archive>/data.pkl record", path=path, hint=HINT_DAMAGED)
    return pickles[0][: -len("data.pkl")], zf.read(pickles[0])


def _check_records(path: Path, zf: zipfile.ZipFile, prefix: str, storages: dict[str, StorageRecord],
                   names: dict[str, str]) -> None:
    """Refuse a zip pickle where a storage record is missing, compressed or shorter than the bytes the
    pickle says its tensors need: a memory-mapped load skips torch's size check and would hand out the
    bytes after the record (the next record, the zip directory) as weights. `names`: a tensor per storage key."""
    for key, storage in storages.items():
        info, tensor = zf.NameToInfo.get(f"{prefix}data/{key}"), names.get(key, f"storage {key}")
        if info is None:
            raise CheckpointError(f"tensor '{tensor}' has no storage record {prefix}data/{key}", path=path,
                                  hint=HINT_DAMAGED)
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"tensor '{tensor}' is in a compressed record {info.filename}, which cannot be "
                                  "memory-mapped", path=path, hint="re-save it with torch.save (records uncompressed)")
        if info.file_size < storage.nbytes:
            raise CheckpointError(f"tensor '{tensor}' needs {storage.nbytes} bytes of storage but its record "
                                  f"{info.filename} holds only {info.file_size}", path=path,
                                  hint="the file is damaged or cut short; download or save it again")


def _storage_names(obj: Any) -> dict[str, str]:
    """The first tensor name of each storage key in a state dict read onto records (for messages)."""
    names: dict[str, str] = {}
    sd = state_dict_of(obj)
    for name, value in (sd.items() if isinstance(sd, dict) else ()):
        if isinstance(value, TensorRecord):
            names.setdefault(value.storage.key, str(name))
    return names


def _record_starts(handle: BinaryIO, zf: zipfile.ZipFile, prefix: str, storages: dict[str, StorageRecord]
                   ) -> dict[str, int] | None:
    """The file byte where each (stored, size-checked) storage record's data starts, from its local header; None
    when the archive says its storages are big-endian or a local header is not one (then reads go through torch)."""
    order = zf.NameToInfo.get(f"{prefix}byteorder")
    if order is not None and zf.read(order).strip() != b"little":
        return None
    starts: dict[str, int] = {}
    for key in storages:
        info = zf.NameToInfo[f"{prefix}data/{key}"]
        handle.seek(info.header_offset)
        local = handle.read(LOCAL_HEADER.size)
        if len(local) != LOCAL_HEADER.size:
            return None
        signature, name_length, extra_length = LOCAL_HEADER.unpack(local)
        if signature != b"PK\x03\x04":
            return None
        starts[key] = info.header_offset + LOCAL_HEADER.size + name_length + extra_length
    return starts


def _zip_entries(path: Path) -> tuple[dict[str, TensorRecord], dict[str, int] | None]:
    """A zip pickle's tensors from one torch-free parse of its data.pkl, every storage record checked, and where
    each storage's data starts (`_record_starts`); Unmodelled when the pickle is not a plain state dict (or the
    zip is damaged: torch says how)."""
    try:
        with open_regular(path) as handle, zipfile.ZipFile(handle) as zf:
            try:
                prefix, data = _data_pkl(path, zf)
            except CheckpointError:
                raise Unmodelled("no single data.pkl") from None
            obj, storages = load_records(data)
            tensors = plain_tensors(obj)
            _check_records(path, zf, prefix, storages, _storage_names(obj))
            starts = _record_starts(handle, zf, prefix, storages)
    except (OSError, zipfile.BadZipFile, ValueError, KeyError, EOFError, struct.error) as e:
        raise Unmodelled(f"{type(e).__name__}: {e}") from None
    return tensors, starts


def _check_loaded_records(path: Path) -> None:
    """The record-size check of a zip pickle that torch's weights-only load accepted but `_zip_entries` does not
    model: its storages listed by a lenient records parse (other globals become inert placeholders)."""
    try:
        with open_regular(path) as handle, zipfile.ZipFile(handle) as zf:
            prefix, data = _data_pkl(path, zf)
            try:
                obj, storages = load_records(data, lenient=True)
            except Unmodelled as e:
                raise CheckpointError(f"not a readable PyTorch checkpoint ({str(e)[:160]})", path=path,
                                      hint=HINT_DAMAGED) from None
            _check_records(path, zf, prefix, storages, _storage_names(obj))
    except ZIP_ERRORS as e:
        raise _damaged(path, e) from None


def _legacy_entries(path: Path) -> tuple[dict[str, TensorRecord], dict[str, int]]:
    """A legacy pickle's tensors from a torch-free parse of its object pickle (storage bytes not read), and where
    each storage's data starts."""
    with open_regular(path) as handle:
        obj, _storages, starts = load_legacy_records(handle, os.fstat(handle.fileno()).st_size)
    return plain_tensors(obj), starts


def _state_dict(path: Path, obj: Any, data: bool = True) -> dict[str, "torch.Tensor"]:
    """The flat name -> plain tensor mapping inside a loaded pickle, or a CheckpointError saying why not
    (`data`: the load was meant to hold tensor data, not meta-device placeholders)."""
    import torch

    obj = state_dict_of(obj)  # a training checkpoint wrapping its state dict
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
            self._size = os.fstat(handle.fileno()).st_size
        self._lock = threading.Lock()  # app workers may read concurrently; load the file once
        self._tensors: dict[str, torch.Tensor] | None = None
        # what torch-free reads need: each tensor's record and each storage's first byte (None: read through torch)
        self._records: dict[str, TensorRecord] | None = None
        self._starts: dict[str, int] | None = None
        try:
            self._records, self._starts = _zip_entries(path) if self.is_zip else _legacy_entries(path)
        except Unmodelled:
            self.entries = self._torch_entries()
        else:
            self.entries = {k: StoredTensor(k, r.shape, r.storage.dtype, r.nbytes) for k, r in self._records.items()}

    def _torch_entries(self) -> dict[str, StoredTensor]:
        """Metadata the torch way, for what the records reading does not model: a zip file mapped now (then its
        records checked), a legacy one loaded onto the meta device (no data)."""
        if self.is_zip:
            meta = self._tensors = self._read()
            _check_loaded_records(self.path)
        else:
            try:
                meta = _state_dict(self.path, _load(self.path, (NotImplementedError,), map_location="meta"),
                                   data=False)
            except NotImplementedError:  # torch builds no quantized tensor on the meta device: a real load names it
                meta = self._tensors = self._read()
        return {k: StoredTensor(k, tuple(t.shape), str(t.dtype).removeprefix("torch."), t.numel() * t.element_size())
                for k, t in meta.items()}

    def fingerprint_bytes(self) -> bytes:
        """The first 64 KiB of the file (pickles have no separate header)."""
        with open_regular(self.path) as f:
            return f.read(FINGERPRINT_BYTES)

    def _loaded(self) -> dict[str, "torch.Tensor"]:
        with self._lock:
            return self._loaded_locked()

    def _loaded_locked(self) -> dict[str, "torch.Tensor"]:
        if self._tensors is None:  # one load on first use (or a reopen after close)
            self._tensors = self._read()
        return self._tensors

    def _read(self) -> dict[str, "torch.Tensor"]:
        """The state dict with data: memory-mapped for a zip file, a full load for a legacy one."""
        kwargs = {"mmap": True} if self.is_zip else {}
        return _state_dict(self.path, _load(self.path, map_location="cpu", **kwargs))

    def tensor(self, raw_name: str) -> "torch.Tensor":
        """The whole tensor as stored (a view of the loaded state dict; Checkpoint copies it)."""
        return self._loaded()[raw_name]

    def array(self, raw_name: str) -> "np.ndarray":
        """The whole tensor as numpy without torch, in new memory: its storage's bytes read from the file, the
        record's offset, shape and stride applied (bfloat16 widened); NoNumpyRead where torch reads it."""
        from analysis.io.readers.arrays import NoNumpyRead, read_strided   # numpy loads on the first read

        if self._records is None or self._starts is None:
            raise NoNumpyRead("a pickle the records reading does not model")
        r = self._records[raw_name]
        return read_strided(self.path, self._size, self._starts[r.storage.key], r.storage.dtype, r.shape, r.stride,
                            r.offset, r.storage.numel)

    def rows(self, raw_name: str, start: int, stop: int) -> "torch.Tensor":
        """Rows [start, stop) along dim 0, a view (mmap pages only those rows in; Checkpoint copies it)."""
        return self._loaded()[raw_name][start:stop]

    def close(self) -> None:
        with self._lock:
            self._tensors = None

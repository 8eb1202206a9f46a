"""Reader for one `.safetensors` file: the header is parsed and validated here (8-byte length +
JSON), tensors are read through `safetensors.safe_open(framework="pt")` (memory-mapped), or without torch
as numpy (`array`: the bytes at the header's offsets, read into new memory)."""

from __future__ import annotations

import math
import os
import struct
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only
    import numpy as np
    import torch

from analysis.errors import CheckpointError
from analysis.io.readers import StoredTensor
from analysis.io.safe_read import check_regular, open_regular, parse_json

# safetensors dtype codes -> (torch dtype name, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U64": ("uint64", 8), "U32": ("uint32", 4), "U16": ("uint16", 2), "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit (MAX_HEADER_SIZE: a length above it is refused)
HINT = "the file is damaged or incomplete; download or export it again"


def read_header(path: Path) -> tuple[bytes, dict[str, StoredTensor], dict[str, int]]:
    """Parse and validate a safetensors header; returns (the 8+N header bytes, tensors by raw name, the file byte
    where each tensor's data starts)."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"truncated safetensors file: {size} bytes, too short for the 8-byte header length",
                                  path=path, hint=HINT)
        (n,) = struct.unpack("<Q", prefix)
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"not a safetensors file: header length field says {n} bytes",
                                  path=path, hint=HINT)
        if 8 + n > size:
            raise CheckpointError(f"truncated safetensors file: header claims {n} bytes but the file has only {size}",
                                  path=path, hint=HINT)
        raw = f.read(n)
    header = parse_json(raw, path, CheckpointError, "safetensors header", HINT)
    if not isinstance(header, dict):
        raise CheckpointError("safetensors header is not a JSON object", path=path, hint=HINT)
    data_size = size - 8 - n
    entries: dict[str, StoredTensor] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        entries[name] = _entry(path, name, meta, data_size)
    _check_tiling(path, {name: tuple(header[name]["data_offsets"]) for name in entries}, data_size)
    starts = {name: 8 + n + header[name]["data_offsets"][0] for name in entries}
    return prefix + raw, entries, starts


def _check_tiling(path: Path, spans: dict[str, tuple[int, int]], data_size: int) -> None:
    """The library's own rule, so `info` never accepts what a read refuses: the tensors, sorted by offsets,
    tile the data section from byte 0 to its end without gaps, overlaps or trailing bytes."""
    start = 0
    for (begin, end), name in sorted((span, name) for name, span in spans.items()):
        if begin != start:
            raise CheckpointError(f"tensor '{name}' starts at byte {begin} of the data section where {start} was "
                                  "expected (tensors must follow each other without gaps or overlaps)",
                                  path=path, hint=HINT)
        start = end
    if start != data_size:
        raise CheckpointError(f"the tensors cover {start} of the {data_size} bytes of the data section",
                              path=path, hint=HINT)


def _entry(path: Path, name: str, meta: Any, data_size: int) -> StoredTensor:
    """Validate one header entry: known dtype, integer shape, offsets inside the file and consistent."""
    bad = f"safetensors header entry for tensor '{name}' is malformed"
    if not isinstance(meta, dict) or not {"dtype", "shape", "data_offsets"} <= meta.keys():
        raise CheckpointError(bad + " (needs dtype, shape, data_offsets)", path=path, hint=HINT)
    code, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
    if code not in DTYPES:
        raise CheckpointError(f"tensor '{name}' has unsupported dtype {code!r}", path=path,
                              hint="convert the checkpoint to float32/float16/bfloat16")
    if (not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape)  # not bool: true ≠ 1
            or not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
        raise CheckpointError(bad + f" (shape {shape!r}, data_offsets {offsets!r})", path=path, hint=HINT)
    dtype, itemsize = DTYPES[code]
    begin, end = offsets
    if end > data_size:
        raise CheckpointError(f"tensor '{name}' data ends at byte {end} of the data section, past the end of the "
                              f"file (data section has {data_size} bytes)", path=path, hint=HINT)
    nbytes = math.prod(shape) * itemsize
    if end - begin != nbytes:
        raise CheckpointError(f"tensor '{name}' occupies {end - begin} bytes but shape {tuple(shape)} of {code} "
                              f"needs {nbytes}", path=path, hint=HINT)
    return StoredTensor(name, tuple(shape), dtype, nbytes)


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else ""


class SafetensorsFile:
    """One safetensors file: header parsed at construction, tensor bytes read on demand (mmap)."""

    def __init__(self, path: Path):
        self.path = path
        self._header, self.entries, self._starts = read_header(path)
        self._size = len(self._header) + sum(e.nbytes for e in self.entries.values())  # the tiling check's rule
        self._handle: Any = None
        self._lock = threading.Lock()  # app workers may read concurrently; open the map once

    def fingerprint_bytes(self) -> bytes:
        """The header bytes (length prefix + JSON): they change whenever names, shapes or offsets do."""
        return self._header

    def _open(self) -> Any:
        with self._lock:
            return self._open_locked()

    def _open_locked(self) -> Any:
        if self._handle is None:
            from safetensors import safe_open

            check_regular(self.path, CheckpointError)  # the library opens by name: never a FIFO swapped in
            try:
                self._handle = safe_open(str(self.path), framework="pt", device="cpu")
            except Exception as e:  # the library's own validation disagrees with ours
                raise CheckpointError(f"safetensors cannot open the file ({_first_line(e)})",
                                      path=self.path, hint=HINT) from None
        return self._handle

    def tensor(self, raw_name: str) -> "torch.Tensor":
        """The whole tensor, as stored (bit-exact; may be a view of the memory map: Checkpoint copies it)."""
        return self._open().get_tensor(raw_name)

    def array(self, raw_name: str) -> "np.ndarray":
        """The whole tensor as numpy without torch, in new memory (bfloat16 widened to float32; fp8: NoNumpyRead)."""
        from analysis.io.readers.arrays import read_strided   # numpy loads on the first read, not at opening

        entry = self.entries[raw_name]
        return read_strided(self.path, self._size, self._starts[raw_name], entry.dtype, entry.shape)

    def rows(self, raw_name: str, start: int, stop: int) -> "torch.Tensor":
        """Rows [start, stop) along dim 0; only those bytes are read."""
        return self._open().get_slice(raw_name)[start:stop]

    def close(self) -> None:
        with self._lock:
            self._handle = None

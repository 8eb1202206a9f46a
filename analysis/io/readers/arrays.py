"""Torch-free reads of tensor bytes into numpy arrays (issue 13: a cold CPU scan without `import torch`).

Each reader's `array(raw_name)` returns the stored values in new memory the caller owns. Whatever has no exact
numpy form here (fp8, an unported GGUF type, a pickle the records reading does not model, a file changed since it
was opened) raises `NoNumpyRead`, and `Checkpoint.array` reads the tensor through torch instead — so every
refusal is torch's own one-line error, word for word.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from analysis.io.safe_read import open_regular

# stored dtype name -> the numpy dtype its bytes read as (little-endian); bfloat16 as its uint16 bit patterns
NUMPY_DTYPES: dict[str, str] = {
    "float64": "<f8", "float32": "<f4", "float16": "<f2", "bfloat16": "<u2",
    "int64": "<i8", "int32": "<i4", "int16": "<i2", "int8": "i1",
    "uint64": "<u8", "uint32": "<u4", "uint16": "<u2", "uint8": "u1", "bool": "?",
}


class NoNumpyRead(Exception):
    """Private: no torch-free read of this tensor here; `Checkpoint.array` falls back to torch."""


def numpy_dtype(dtype: str) -> np.dtype:
    """The numpy dtype a stored dtype's bytes read as; NoNumpyRead for one without (fp8)."""
    if dtype not in NUMPY_DTYPES:
        raise NoNumpyRead(f"dtype {dtype}")
    return np.dtype(NUMPY_DTYPES[dtype])


def widen_bfloat16(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) as the float32 values they are, exactly (the high half of a float32).

    One pass into the output (a 32000×2048 embedding: 0.08 s; `(bits.astype(np.uint32) << 16)` took 0.58 s)."""
    out = np.empty(bits.shape, dtype=np.uint32)
    np.left_shift(bits, 16, out=out, dtype=np.uint32)
    return out.view(np.float32)


def as_values(stored: np.ndarray, dtype: str) -> np.ndarray:
    """What `array` hands out for stored values of `dtype`: bfloat16 widened to float32, the rest as they are."""
    return widen_bfloat16(stored) if dtype == "bfloat16" else stored


def _read_into(path: Path, file_size: int, at: int, buf: memoryview) -> None:
    """Fill `buf` from byte `at` of the file, which must still have its size at opening (NoNumpyRead otherwise)."""
    with open_regular(path) as f:
        if os.fstat(f.fileno()).st_size != file_size:
            raise NoNumpyRead("the file changed size since it was opened")
        f.seek(at)
        done = 0
        while done < len(buf):
            n = f.readinto(buf[done:])
            if not n:
                raise NoNumpyRead("short read")
            done += n


def read_strided(path: Path, file_size: int, at: int, dtype: str, shape: tuple[int, ...],
                 stride: tuple[int, ...] | None = None, offset: int = 0, available: int | None = None) -> np.ndarray:
    """The tensor of `shape` (element `stride`, default C order; `offset` elements in) over the storage whose bytes
    start at byte `at` of the file, read with plain file reads (no memory map: a file cut later gives a short read,
    never a SIGBUS) into new memory. `available`: the storage's element count, checked like torch's load does.
    NoNumpyRead when the file no longer has its size at opening, the view leaves the storage, or a read is short."""
    np_dtype = numpy_dtype(dtype)
    contiguous = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    stride = contiguous if stride is None else stride
    if len(stride) != len(shape) or offset < 0:
        raise NoNumpyRead("stride rank or offset")
    numel = math.prod(shape)
    span = 0 if numel == 0 else 1 + sum((d - 1) * s for d, s in zip(shape, stride))
    if available is not None and numel and offset + span > available:
        raise NoNumpyRead("view out of its storage")
    out = np.empty(span, dtype=np_dtype)
    try:
        _read_into(path, file_size, at + offset * np_dtype.itemsize, memoryview(out).cast("B"))
    except OSError as e:     # gone, replaced by a FIFO, unreadable: torch's read reports it in its words
        raise NoNumpyRead(f"{type(e).__name__}: {e}") from None
    if numel == 0 or all(d == 1 or s == c for d, s, c in zip(shape, stride, contiguous)):
        values = out.reshape(shape)            # C order already: span == numel
    else:
        values = np.lib.stride_tricks.as_strided(out, shape, tuple(s * np_dtype.itemsize for s in stride)).copy()
    return as_values(values, dtype)

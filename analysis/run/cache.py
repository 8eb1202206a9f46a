"""Persistent on-disk cache of spectra: eigenvalues as `.npy`, metric dicts as JSON.

A key is the sha256 of the canonical JSON of everything that changes a number (SPEC §1, §8):
checkpoint fingerprint(s), tensor, slice, operation, settings, compute dtype, device kind and
the engine version. Entries are written atomically (unique temp file in the same folder, then
`os.replace`), so concurrent writers of one key both succeed and readers never see half a file;
an unreadable entry is a miss and is removed. Nothing is ever pickled. Entries are not fsynced: a
cache needs atomicity, not durability — after a crash an entry is either whole, absent or torn, and a
torn one fails its read checks and is recomputed; the fsync cost ~50 ms per entry (two per matrix).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from analysis.io.atomic import TMP_PREFIX, atomic_writer
from analysis.io.safe_read import MAX_JSON_BYTES, open_regular, parse_json, read_regular_bytes
from analysis.errors import DiffractError

CACHE_ENV_VAR = "DIFFRACT_TUI_CACHE_DIR"
ENTRY_FORMAT = "diffract-cache/1"
_TAG_NAME = "CACHEDIR.TAG"
_TAG_TEXT = (
    "Signature: 8a477f597d28d172789f06886806bc55\n"
    "# This file marks a cache directory created by diffract-tui.\n"
    "# See https://bford.info/cachedir/\n"
)
_ENTRY_RE = re.compile(r"^[0-9a-f]{64}\.(json|npy)$")
_FANOUT_RE = re.compile(r"^[0-9a-f]{2}$")
_STALE_TMP_SECONDS = 3600.0
_WRITE_ATTEMPTS = 3               # a write whose folder vanished is retried this often, then caching stops
_NONFINITE_TAG = "$float"
_WARN_LOCK = threading.Lock()


def default_cache_root() -> Path:
    """`$DIFFRACT_TUI_CACHE_DIR` when set and non-empty, else the platform's user cache folder."""
    env = os.environ.get(CACHE_ENV_VAR, "").strip()
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("diffract-tui"))


def _canonical(value: Any) -> Any:
    """Plain JSON-able form of a key part (paths → str, tuples → lists, numpy scalars → Python)."""
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return {_NONFINITE_TAG: repr(value)}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"cache key part of type {type(value).__name__} is not JSON-able: {value!r}")


def cache_key(
    *,
    fingerprint: str | list[str] | tuple[str, ...],
    tensor: str,
    slice: Any = None,
    operation: str,
    settings: dict,
    dtype: str,
    device_kind: str,
    engine_version: str | None = None,
    **extra: Any,
) -> str:
    """sha256 hex of the canonical JSON of every part that changes a cached number.

    `fingerprint` is one checkpoint's fingerprint or, for a delta, the ordered pair (base, target);
    `slice` names the part of the tensor (e.g. {"proj": "q", "head": 5}) or None for the whole matrix;
    `operation` says what was computed ("weight", "delta", ... plus the artefact, e.g. "metrics");
    `engine_version` defaults to `analysis.ENGINE_VERSION`, read at call time.
    """
    if engine_version is None:
        import analysis

        engine_version = analysis.ENGINE_VERSION
    parts = {
        "fingerprint": fingerprint,
        "tensor": tensor,
        "slice": slice,
        "operation": operation,
        "settings": settings,
        "dtype": dtype,
        "device_kind": device_kind,
        "engine_version": engine_version,
        **extra,
    }
    text = json.dumps(_canonical(parts), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cached_json(cache: "Cache | None", key_parts: dict[str, Any] | None, compute: Callable[[], Any]) -> Any:
    """`compute()` through `cache` under `cache_key(**key_parts)` (a JSON entry; a corrupt one is a miss);
    computed as it is when there is no cache or no key."""
    if cache is None or key_parts is None:
        return compute()
    key = cache_key(**key_parts)
    hit = cache.get_json(key)
    if hit is not None:
        return hit
    value = compute()
    cache.put_json(key, value)
    return value


def encode_json_value(value: Any) -> Any:
    """JSON-safe copy of a metrics value: non-finite floats become {"$float": "nan"|"inf"|"-inf"}."""
    if isinstance(value, dict):
        return {str(k): encode_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode_json_value(v) for v in value]
    if isinstance(value, np.ndarray):
        return [encode_json_value(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", None) == 0:
        value = value.item()  # 0-d torch tensor
    if isinstance(value, float) and not math.isfinite(value):
        return {_NONFINITE_TAG: "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"cannot store a value of type {type(value).__name__} in the cache: {value!r}")


def _decode_hook(obj: dict) -> Any:
    if len(obj) == 1 and _NONFINITE_TAG in obj:
        return float(obj[_NONFINITE_TAG])
    return obj


def decode_json_value(value: Any) -> Any:
    """Inverse of `encode_json_value` for an already-parsed JSON value."""
    if isinstance(value, dict):
        decoded = {k: decode_json_value(v) for k, v in value.items()}
        return _decode_hook(decoded)
    if isinstance(value, list):
        return [decode_json_value(v) for v in value]
    return value


def _read_npy(handle: IO[bytes]) -> np.ndarray:
    """The array of an open `.npy` file, its header checked against the file before anything is allocated.

    A header is only a claim: one saying shape (10¹²,) made `np.load` raise MemoryError. Here shape ×
    itemsize must equal the bytes that follow the header exactly (no more, no less), the dtype must be a
    plain number and no pickle is read; anything else is a ValueError (a corrupt entry, i.e. a miss).
    """
    from numpy.lib import format as npy

    version = npy.read_magic(handle)
    readers = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}
    if version not in readers:            # 3.0 is for unicode field names, which a numeric array never has
        raise ValueError(f"unexpected .npy version {version}")
    shape, fortran, dtype = readers[version](handle)
    if dtype.hasobject or dtype.kind not in "biuf" or dtype.itemsize == 0:
        raise ValueError(f"not a plain numeric dtype: {dtype}")
    nbytes = math.prod(shape) * dtype.itemsize
    data_bytes = os.fstat(handle.fileno()).st_size - handle.tell()
    if nbytes != data_bytes:
        raise ValueError(f"header claims {nbytes} bytes of data, the file has {data_bytes}")
    buffer = bytearray(nbytes)
    if handle.readinto(buffer) != nbytes or handle.read(1):
        raise ValueError("the file changed while it was read")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order="F" if fortran else "C")


@dataclass(frozen=True)
class CacheInfo:
    """What `diffract-tui cache info` reports."""

    root: Path
    entries: int
    bytes: int
    exists: bool


class Cache:
    """Spectra cache rooted at `root` (else `$DIFFRACT_TUI_CACHE_DIR`, else the user cache folder).

    Entries live at `root/<key[:2]>/<key>.npy|.json`. The folder is created on the first write. A cache
    that cannot be written is warned about once and then only read (`write_error` says why).
    """

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).expanduser() if root not in (None, "") else default_cache_root()
        self.write_error: str | None = None     # set (and warned once) when entries can no longer be written

    def __repr__(self) -> str:
        return f"Cache({str(self.root)!r})"

    key = staticmethod(cache_key)

    # ---- paths -------------------------------------------------------------------------------
    def _path(self, key: str, suffix: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", key):
            raise ValueError(f"not a cache key (64 hex digits): {key!r}")
        return self.root / key[:2] / f"{key}{suffix}"

    def _ensure_root(self) -> None:
        """Create the cache folder and its CACHEDIR.TAG (OSError when it cannot be)."""
        self.root.mkdir(parents=True, exist_ok=True)
        tag = self.root / _TAG_NAME
        if not tag.exists():
            with atomic_writer(tag, "w", durable=False) as handle:
                handle.write(_TAG_TEXT)

    def _discard(self, path: Path) -> None:
        with contextlib.suppress(OSError):
            path.unlink()

    # ---- arrays ------------------------------------------------------------------------------
    def get_array(self, key: str) -> np.ndarray | None:
        """The stored array, or None when absent or unreadable (an unreadable entry is removed)."""
        path = self._path(key, ".npy")
        try:
            with open_regular(path) as handle:  # a FIFO entry is corrupt, never read (it would block)
                array = _read_npy(handle)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError):
            self._discard(path)
            return None
        if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
            self._discard(path)
            return None
        return array

    def put_array(self, key: str, array: np.ndarray) -> None:
        """Store a numeric array atomically."""
        array = np.ascontiguousarray(np.asarray(array))
        if array.dtype.kind not in "biuf":
            raise TypeError(f"only numeric arrays are cached, got dtype {array.dtype}")
        self._write(self._path(key, ".npy"), lambda handle: np.save(handle, array, allow_pickle=False))

    # ---- JSON --------------------------------------------------------------------------------
    def get_json(self, key: str) -> Any | None:
        """The stored JSON value (NaN/±inf restored), or None when absent or unreadable."""
        path = self._path(key, ".json")
        try:
            data = read_regular_bytes(path, MAX_JSON_BYTES)  # a FIFO or huge entry is corrupt, never read
        except FileNotFoundError:
            return None
        except OSError:
            self._discard(path)
            return None
        try:
            envelope = parse_json(data, path)  # bad UTF-8, bad syntax or hostile nesting: one DiffractError
            if (
                not isinstance(envelope, dict)
                or envelope.get("format") != ENTRY_FORMAT
                or envelope.get("key") != key
                or "value" not in envelope
            ):
                raise ValueError("not a diffract cache entry")
        except (ValueError, DiffractError):
            self._discard(path)
            return None
        return decode_json_value(envelope["value"])

    def put_json(self, key: str, value: Any) -> None:
        """Store a JSON-able value atomically; NaN/±inf survive the round trip, and so does the order of a
        dict's keys (a scan served from the cache writes its columns in the order a cold scan does)."""
        envelope = {"format": ENTRY_FORMAT, "key": key, "value": encode_json_value(value)}
        data = json.dumps(envelope, allow_nan=False).encode("utf-8")
        self._write(self._path(key, ".json"), lambda handle: handle.write(data))

    def _write(self, path: Path, write: Callable[[IO], Any]) -> None:
        """Write one entry atomically; a cache that cannot be written never fails the computation.

        A folder that vanished under the writer (`cache clear` or `rm -rf` while a scan runs) is made again
        and the write retried; any other OS error (read-only or full disk, no permission, a file where the
        folder should be) warns once on stderr and turns writing off for this Cache — what was computed is
        still returned, only not kept.
        """
        if self.write_error is not None:
            return
        err: OSError | None = None
        for _ in range(_WRITE_ATTEMPTS):
            try:
                self._ensure_root()
                with atomic_writer(path, "wb", durable=False) as handle:
                    write(handle)
                return
            except FileNotFoundError as vanished:   # the folder went away between mkdir and the write
                err = vanished
            except OSError as other:
                err = other
                break
        self._stop_writing(err, path)

    def _stop_writing(self, err: OSError | None, path: Path) -> None:
        """Turn writing off after `err`, with ONE warning line on stderr (what, which file — what to do)."""
        why = (err.strerror or str(err)) if err is not None else "unknown error"
        with _WARN_LOCK:                  # worker threads share one Cache: still one warning
            if self.write_error is not None:
                return
            self.write_error = why
        where = err.filename if err is not None and err.filename else path
        print(f"diffract-tui: warning: cannot write the cache ({why}), {where} — going on without caching; "
              f"pass a writable --cache-dir, free some space, or set {CACHE_ENV_VAR}", file=sys.stderr)

    # ---- convenience -------------------------------------------------------------------------
    def get_or_compute(self, key: str, fn: Callable[[], Any]) -> Any:
        """Cached value for `key`, else `fn()` stored and returned.

        An `np.ndarray` result is stored as `.npy`, anything else as JSON; a hit is looked up in
        the same two places (array first).
        """
        array = self.get_array(key)
        if array is not None:
            return array
        value = self.get_json(key)
        if value is not None:
            return value
        value = fn()
        if isinstance(value, np.ndarray):
            self.put_array(key, value)
        else:
            self.put_json(key, value)
        return value

    def contains(self, key: str) -> bool:
        """True when an entry file exists for `key` (it may still turn out unreadable)."""
        return self._path(key, ".npy").exists() or self._path(key, ".json").exists()

    # ---- maintenance -------------------------------------------------------------------------
    def _entry_files(self) -> Iterator[Path]:
        if not self.root.is_dir():
            return
        for sub in sorted(self.root.iterdir()):
            if sub.is_dir() and not sub.is_symlink() and _FANOUT_RE.match(sub.name):
                for path in sub.iterdir():
                    if _ENTRY_RE.match(path.name) and path.name.startswith(sub.name):
                        yield path

    def info(self) -> CacheInfo:
        """Number of entries and their total size in bytes."""
        entries = 0
        total = 0
        for path in self._entry_files():
            with contextlib.suppress(OSError):
                total += path.stat().st_size
                entries += 1
        return CacheInfo(root=self.root, entries=entries, bytes=total, exists=self.root.is_dir())

    def clear(self) -> int:
        """Remove every entry (and stale temp files); returns how many entries were removed.

        Only files this cache wrote are touched, so a --cache-dir pointing at a folder with other
        content leaves that content alone.
        """
        removed = 0
        for path in list(self._entry_files()):
            try:
                path.unlink()
                removed += 1
            except FileNotFoundError:
                pass
            except OSError as err:
                raise DiffractError(
                    f"cannot remove a cache entry ({err.strerror or err})", path=path, hint="check permissions"
                ) from err
        if self.root.is_dir():
            now = time.time()
            for sub in self.root.iterdir():
                if not (sub.is_dir() and _FANOUT_RE.match(sub.name)) or sub.is_symlink():
                    continue
                for path in sub.iterdir():
                    if path.name.startswith(TMP_PREFIX):
                        with contextlib.suppress(OSError):
                            if now - path.stat().st_mtime > _STALE_TMP_SECONDS:
                                path.unlink()
                with contextlib.suppress(OSError):
                    sub.rmdir()  # only succeeds when empty
        return removed

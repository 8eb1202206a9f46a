"""Persistent on-disk cache of spectra: eigenvalues as `.npy`, metric dicts as JSON.

A key is the sha256 of the canonical JSON of everything that changes a number (SPEC §1, §8):
checkpoint fingerprint(s), tensor, slice, operation, settings, compute dtype, device kind and
the engine version. Small entries (JSON values, arrays ≤ SMALL_ENTRY_BYTES) are staged in memory and
written together as one PACK file per writer and flush (`packs/<host>-<pid>-<random>-<n>.pack`): a
checkpoint of 25k tiny tensors made 50k files (203 MB of 4 KiB blocks) when every entry was a file. Big
arrays stay one file each (`<key[:2]>/<key>.npy`). Packs and files are written atomically (unique temp
file in the same folder, then `os.replace`, analysis/io/atomic.py), so readers never see half a file and
writers never share one: each pack has one writer (host + pid + random in its name), which is what lets
Ray workers on several hosts fill one cache on a shared filesystem (no SQLite, no shared append, no
locks). Readers index every pack; a torn or corrupt pack (bad magic, size or CRC) is ignored and its
entries recomputed, as an unreadable single-file entry is (that one is removed). Nothing is ever pickled.
`Cache.compact()` (`diffract-tui cache compact`) merges the packs into as few as PACK_MAX_BYTES allows, lock-free:
the merged packs are renamed in before the packs they replace are deleted, and a reader whose pack vanished finds
the merged one (or recomputes).

Nothing is fsynced (`durable=False`; the per-entry fsync was dropped earlier, it cost ~50 ms per entry):
a cache needs atomicity, not durability — after a crash an entry or pack is whole, absent or torn, and
a torn one fails its checks and is recomputed. Staged entries are flushed by `Cache.flush()` (the table
builders call it at the end of a run, a Ray task at its end), when the stage exceeds PACK_MAX_ENTRIES or
PACK_MAX_BYTES or is older than PACK_MAX_AGE_SECONDS, on `close()` and at interpreter exit.
The format is described in docs/architecture.md ("Cache").
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import io
import itertools
import json
import math
import os
import re
import secrets
import socket
import struct
import sys
import threading
import time
import weakref
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from analysis.io.atomic import TMP_PREFIX, atomic_writer, write_error
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
_KEY_RE = re.compile(r"[0-9a-f]{64}")
_FANOUT_RE = re.compile(r"^[0-9a-f]{2}$")
_STALE_TMP_SECONDS = 3600.0
_WRITE_ATTEMPTS = 3               # a write whose folder vanished is retried this often, then caching stops
_NONFINITE_TAG = "$float"
_WARN_LOCK = threading.Lock()

PACK_DIR = "packs"
PACK_MAGIC = b"diffract-pack/1\n"            # 16 bytes, then the fixed header below
_PACK_HEADER = struct.Struct("<QQII")          # compressed index length, compressed body length, their CRC32s
_PACK_RE = re.compile(r"^[A-Za-z0-9_-]+\.pack$")
SMALL_ENTRY_BYTES = 64 * 1024                  # JSON values and arrays up to this size are packed
PACK_MAX_ENTRIES = 8192                        # a stage bigger than this (or PACK_MAX_BYTES) is flushed
PACK_MAX_BYTES = 32 * 1024 * 1024
PACK_MAX_AGE_SECONDS = 30.0                    # … and so is one older than this (a long-lived app session)
_MAX_PACK_RAW = 4 * PACK_MAX_BYTES             # a pack claiming more (index or body) is corrupt
_BODY_CACHE_BYTES = 128 * 1024 * 1024          # decompressed pack bodies kept in memory by one Cache
_LIVE: "weakref.WeakSet[Cache]" = weakref.WeakSet()   # caches with staged entries, flushed at exit
_CORRUPT_PACK_GRACE_SECONDS = 60.0             # `compact` leaves a younger corrupt pack alone (NFS may lag)


def flush_cache(cache: Any) -> None:
    """Write out the entries `cache` still stages in memory (a pack); nothing for None or a cache without packs."""
    flush = getattr(cache, "flush", None)
    if callable(flush):
        flush()


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


def _read_npy(handle: IO[bytes], size: int | None = None) -> np.ndarray:
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
    data_bytes = (os.fstat(handle.fileno()).st_size if size is None else size) - handle.tell()
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
    packs: int = 0          # pack files among them (their entries are counted in `entries`)


@dataclass(frozen=True)
class CompactStats:
    """What `diffract-tui cache compact` reports: the packs it found (before) and what replaced them (after)."""

    root: Path
    packs_before: int
    packs_after: int
    entries: int            # distinct entries in the packs after
    bytes_before: int
    bytes_after: int
    duplicates: int = 0     # extra copies of a key dropped (the newest pack's readable copy is kept)
    dropped: int = 0        # entries dropped for failing the checks a reader makes (they were misses)
    corrupt: int = 0        # torn or corrupt packs deleted (their entries were misses)


@dataclass(eq=False)
class _CompactSource:
    """One pack `compact` found: its path, size, mtime and index (None when unreadable); compared by identity."""

    path: Path
    size: int
    mtime: float
    entries: dict[tuple[str, str], "_PackedAt"] | None = None
    body: tuple[int, int] = (0, 0)                       # the body's offset and compressed length
    state: str = "ok"       # "ok", "corrupt" (torn or failing a check), "unreadable" (left alone) or "gone"


def _compact_source(path: Path) -> _CompactSource | None:
    """What `compact` needs of one pack (size, mtime, index); None when it is already gone."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError:
        return _CompactSource(path, 0, 0.0, state="unreadable")
    source = _CompactSource(path, st.st_size, st.st_mtime)
    try:
        entries, offset, length = _read_pack_index(path)
        source.entries, source.body = entries, (offset, length)
    except FileNotFoundError:
        return None
    except ValueError:
        source.state = "corrupt"
    except OSError:                 # not a regular file, no permission, an I/O error: not ours to delete
        source.state = "unreadable"
    return source


def _worth_merging(sources: list[_CompactSource]) -> bool:
    """Whether merging these readable packs saves a file: more than one, and a duplicate key or fewer packs needed."""
    if len(sources) < 2:
        return False
    sizes: dict[tuple[str, str], int] = {}
    copies = 0
    for source in sources:
        for k, at in (source.entries or {}).items():
            copies += 1
            sizes[k] = at.length
    return copies > len(sizes) or len(sources) > max(1, math.ceil(sum(sizes.values()) / PACK_MAX_BYTES))


def _writer_name() -> str:
    """host-pid of this process, as a file-name part (letters, digits, '_' and '-' only)."""
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname() or "host")[:64] or "host"
    return f"{host}-{os.getpid()}"


@dataclass(frozen=True)
class _PackedAt:
    """Where a packed entry lives: pack file name, offset and length in its decompressed body."""

    pack: str
    offset: int
    length: int


def _pack_bytes(items: list[tuple[tuple[str, str], bytes]], writer: str) -> bytes:
    """One pack file's bytes: magic, header, zlib(index JSON), zlib(body) (see docs/architecture.md)."""
    entries, offset = [], 0
    for (key, suffix), data in items:
        entries.append([key, suffix, offset, len(data)])
        offset += len(data)
    body = zlib.compress(b"".join(data for _, data in items), 6)
    index = zlib.compress(json.dumps({"format": PACK_MAGIC.decode().strip(), "writer": writer, "raw_body": offset,
                                      "entries": entries}, separators=(",", ":")).encode("utf-8"), 6)
    return (PACK_MAGIC + _PACK_HEADER.pack(len(index), len(body), zlib.crc32(index), zlib.crc32(body))
            + index + body)


def _inflate(data: bytes, limit: int) -> bytes:
    """zlib-decompressed `data`, at most `limit` bytes and all of it (ValueError otherwise: a corrupt pack)."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, limit)
    except zlib.error as err:
        raise ValueError(f"not zlib data ({err})") from None
    if d.unconsumed_tail or not d.eof:
        raise ValueError("compressed data is truncated or too large")
    return out


def _read_pack_index(path: Path) -> tuple[dict[tuple[str, str], _PackedAt], int, int]:
    """A pack's entries, its body's offset in the file and its compressed length; ValueError/OSError when
    it is torn or corrupt (wrong magic, size, CRC, or an index that does not describe the body)."""
    with open_regular(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        head = handle.read(len(PACK_MAGIC) + _PACK_HEADER.size)
        if len(head) != len(PACK_MAGIC) + _PACK_HEADER.size or not head.startswith(PACK_MAGIC):
            raise ValueError("not a diffract pack")
        index_len, body_len, index_crc, _ = _PACK_HEADER.unpack(head[len(PACK_MAGIC):])
        if size != len(head) + index_len + body_len:
            raise ValueError(f"the header claims {len(head) + index_len + body_len} bytes, the file has {size}")
        compressed = handle.read(index_len)
    if zlib.crc32(compressed) != index_crc:
        raise ValueError("index checksum mismatch")
    try:
        index = parse_json(_inflate(compressed, _MAX_PACK_RAW), path)
    except DiffractError as err:
        raise ValueError(str(err)) from None
    raw_body = index.get("raw_body") if isinstance(index, dict) else None
    rows = index.get("entries") if isinstance(index, dict) else None
    if not isinstance(raw_body, int) or not isinstance(rows, list) or not 0 <= raw_body <= _MAX_PACK_RAW:
        raise ValueError("not a diffract pack index")
    out: dict[tuple[str, str], _PackedAt] = {}
    for row in rows:
        if not (isinstance(row, list) and len(row) == 4 and isinstance(row[0], str) and _KEY_RE.fullmatch(row[0])
                and row[1] in (".json", ".npy") and all(isinstance(v, int) and v >= 0 for v in row[2:])
                and row[2] + row[3] <= raw_body):
            raise ValueError("a pack index entry is malformed")
        out[(row[0], row[1])] = _PackedAt(path.name, row[2], row[3])
    return out, len(head) + index_len, body_len


def _read_pack_body(path: Path, offset: int, length: int) -> bytes:
    """A pack's decompressed body, its CRC checked (ValueError/OSError when torn or corrupt)."""
    with open_regular(path) as handle:
        head = handle.read(len(PACK_MAGIC) + _PACK_HEADER.size)
        body_crc = _PACK_HEADER.unpack(head[len(PACK_MAGIC):])[3]
        handle.seek(offset)
        compressed = handle.read(length)
    if len(compressed) != length or zlib.crc32(compressed) != body_crc:
        raise ValueError("body checksum mismatch")
    return _inflate(compressed, _MAX_PACK_RAW)


class Cache:
    """Spectra cache rooted at `root` (else `$DIFFRACT_TUI_CACHE_DIR`, else the user cache folder).

    Big arrays live at `root/<key[:2]>/<key>.npy`; small entries in `root/packs/*.pack` (module docstring),
    and entries of older versions at `root/<key[:2]>/<key>.json` are still read. The folder is created on
    the first write. A cache that cannot be written is warned about once and then only read (`write_error`
    says why). Thread-safe (the app's workers share one); a pickled Cache (a Ray task's) is a fresh writer.
    """

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).expanduser() if root not in (None, "") else default_cache_root()
        self.write_error: str | None = None     # set (and warned once) when entries can no longer be written
        self._lock = threading.RLock()
        self._token = secrets.token_hex(4)      # with host and pid: a pack name no other writer uses
        self._seq = itertools.count()
        self._pending: dict[tuple[str, str], bytes] = {}
        self._pending_bytes = 0
        self._pending_since = 0.0
        self._index: dict[tuple[str, str], _PackedAt] = {}
        self._bodies: dict[str, tuple[int, int]] = {}       # pack → (body offset, compressed length)
        self._entries: dict[str, dict[tuple[str, str], _PackedAt]] = {}   # pack → its entries
        self._seen: set[str] = set()                         # pack names indexed (or found corrupt)
        self._packs_mtime: int | None = None
        self._loaded: OrderedDict[str, bytes] = OrderedDict()  # decompressed bodies, least recently used first
        self._loaded_bytes = 0

    def __repr__(self) -> str:
        return f"Cache({str(self.root)!r})"

    def __getstate__(self) -> dict[str, Any]:
        """Only the folder (and a write error) travel: the receiver is a writer of its own."""
        return {"root": self.root, "write_error": self.write_error}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["root"])
        self.write_error = state.get("write_error")

    def __enter__(self) -> "Cache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    key = staticmethod(cache_key)

    # ---- paths -------------------------------------------------------------------------------
    def _path(self, key: str, suffix: str) -> Path:
        if not _KEY_RE.fullmatch(key):
            raise ValueError(f"not a cache key (64 hex digits): {key!r}")
        return self.root / key[:2] / f"{key}{suffix}"

    @property
    def pack_dir(self) -> Path:
        """The folder of the pack files."""
        return self.root / PACK_DIR

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

    # ---- packs -------------------------------------------------------------------------------
    def _scan_packs(self, only_if_changed: bool = False) -> bool:
        """Index the packs not indexed yet (with `only_if_changed`, only when the folder changed since the last
        look); True when new packs were indexed. A torn or corrupt pack is ignored (its entries are misses)."""
        folder = self.pack_dir
        try:
            mtime = folder.stat().st_mtime_ns
        except OSError:
            return False
        if only_if_changed and mtime == self._packs_mtime:
            return False
        self._packs_mtime = mtime
        try:
            names = sorted(n for n in os.listdir(folder) if _PACK_RE.match(n) and n not in self._seen)
        except OSError:
            return False
        for name in names:
            self._seen.add(name)
            try:
                entries, body_offset, body_len = _read_pack_index(folder / name)
            except (OSError, ValueError):
                continue
            self._bodies[name] = (body_offset, body_len)
            self._entries[name] = entries
            self._index.update(entries)
        return bool(names)

    def _body(self, pack: str) -> bytes | None:
        """The decompressed body of one pack (kept in a bounded LRU), or None when it is gone or corrupt —
        then every entry of that pack is forgotten, so each is recomputed and staged again."""
        body = self._loaded.get(pack)
        if body is not None:
            self._loaded.move_to_end(pack)
            return body
        try:
            body = _read_pack_body(self.pack_dir / pack, *self._bodies[pack])
        except (OSError, ValueError, KeyError):
            self._forget_pack(pack)
            return None
        self._loaded[pack] = body
        self._loaded_bytes += len(body)
        while self._loaded_bytes > _BODY_CACHE_BYTES and len(self._loaded) > 1:
            _, old = self._loaded.popitem(last=False)
            self._loaded_bytes -= len(old)
        return body

    def _forget_pack(self, pack: str) -> None:
        """Stop using a pack whose body is gone or corrupt; its keys fall back to copies in other packs."""
        self._bodies.pop(pack, None)
        lost = self._entries.pop(pack, {})
        for k in [k for k, at in self._index.items() if at.pack == pack]:
            del self._index[k]
        for entries in self._entries.values():
            self._index.update((k, at) for k, at in entries.items() if k in lost and k not in self._index)

    def _forget_packs(self) -> None:
        """Drop the whole pack index (and loaded bodies): the next look lists the pack folder afresh."""
        self._index.clear()
        self._bodies.clear()
        self._entries.clear()
        self._seen.clear()
        self._loaded.clear()
        self._loaded_bytes = 0
        self._packs_mtime = None

    def _small(self, key: str, suffix: str) -> bytes | None:
        """The bytes of a staged or packed entry, or None (packs written since the last look are indexed first)."""
        with self._lock:
            data = self._pending.get((key, suffix))
            if data is not None:
                return data
            if self._packs_mtime is None:
                self._scan_packs()
            at = self._index.get((key, suffix))
            if at is None and self._scan_packs(only_if_changed=True):
                at = self._index.get((key, suffix))
            while at is not None:
                body = self._body(at.pack)
                if body is not None:
                    return body[at.offset:at.offset + at.length]
                at = self._index.get((key, suffix))   # that pack was corrupt: a copy in another one, if any
                if at is None and self._scan_packs(only_if_changed=True):   # or gone, compacted into a new one
                    at = self._index.get((key, suffix))
            return None

    def _drop_small(self, key: str, suffix: str) -> None:
        """Forget a staged or packed entry that turned out unreadable (a miss from now on)."""
        with self._lock:
            data = self._pending.pop((key, suffix), None)
            if data is not None:
                self._pending_bytes -= len(data)
            self._index.pop((key, suffix), None)

    def _stage(self, key: str, suffix: str, data: bytes) -> None:
        """Queue a small entry for the next pack; flush when the stage is full or old."""
        if self.write_error is not None:
            return
        with self._lock:
            if not self._pending:
                self._pending_since = time.monotonic()
                _LIVE.add(self)
            old = self._pending.get((key, suffix))
            self._pending_bytes += len(data) - (len(old) if old is not None else 0)
            self._pending[(key, suffix)] = data
            full = (len(self._pending) >= PACK_MAX_ENTRIES or self._pending_bytes >= PACK_MAX_BYTES
                    or time.monotonic() - self._pending_since > PACK_MAX_AGE_SECONDS)
        if full:
            self.flush()

    def flush(self) -> None:
        """Write the staged entries as ONE new pack (atomically; a failure warns once and turns writing off).
        Safe to call at any time and from any thread; a no-op when nothing is staged."""
        with self._lock:
            if not self._pending:
                return
            items = list(self._pending.items())
            name = f"{_writer_name()}-{self._token}-{next(self._seq)}.pack"
            data = _pack_bytes(items, f"{_writer_name()}-{self._token}")
            self._write(self.pack_dir / name, lambda handle: handle.write(data))
            self._pending.clear()
            self._pending_bytes = 0
            _LIVE.discard(self)
            if self.write_error is not None:
                return
            offset = 0
            for k, entry in items:
                self._index[k] = _PackedAt(name, offset, len(entry))
                offset += len(entry)
            header = len(PACK_MAGIC) + _PACK_HEADER.size
            index_len = _PACK_HEADER.unpack(data[len(PACK_MAGIC):header])[0]
            self._bodies[name] = (header + index_len, len(data) - header - index_len)
            self._entries[name] = {k: self._index[k] for k, _ in items}
            self._seen.add(name)

    def close(self) -> None:
        """Flush what is staged (the cache stays usable)."""
        self.flush()

    # ---- arrays ------------------------------------------------------------------------------
    def get_array(self, key: str) -> np.ndarray | None:
        """The stored array, or None when absent or unreadable (an unreadable entry is removed)."""
        path = self._path(key, ".npy")
        packed = self._small(key, ".npy")
        if packed is not None:
            try:
                return _read_npy(io.BytesIO(packed), len(packed))
            except (ValueError, EOFError):
                self._drop_small(key, ".npy")
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
        """Store a numeric array atomically (a small one in the next pack, a big one as its own file)."""
        array = np.ascontiguousarray(np.asarray(array))
        if array.dtype.kind not in "biuf":
            raise TypeError(f"only numeric arrays are cached, got dtype {array.dtype}")
        path = self._path(key, ".npy")
        if array.nbytes <= SMALL_ENTRY_BYTES:
            buffer = io.BytesIO()
            np.save(buffer, array, allow_pickle=False)
            self._stage(key, ".npy", buffer.getvalue())
            return
        self._write(path, lambda handle: np.save(handle, array, allow_pickle=False))

    # ---- JSON --------------------------------------------------------------------------------
    def _decode_entry(self, data: bytes, key: str, where: Path) -> tuple[bool, Any]:
        """(True, value) of a JSON entry's bytes, or (False, None) when they are not this key's entry."""
        try:
            envelope = parse_json(data, where)  # bad UTF-8, bad syntax or hostile nesting: one DiffractError
            if (
                not isinstance(envelope, dict)
                or envelope.get("format") != ENTRY_FORMAT
                or envelope.get("key") != key
                or "value" not in envelope
            ):
                raise ValueError("not a diffract cache entry")
        except (ValueError, DiffractError):
            return False, None
        return True, decode_json_value(envelope["value"])

    def get_json(self, key: str) -> Any | None:
        """The stored JSON value (NaN/±inf restored), or None when absent or unreadable."""
        path = self._path(key, ".json")
        packed = self._small(key, ".json")
        if packed is not None:
            ok, value = self._decode_entry(packed, key, self.pack_dir)
            if ok:
                return value
            self._drop_small(key, ".json")
        try:
            data = read_regular_bytes(path, MAX_JSON_BYTES)  # a FIFO or huge entry is corrupt, never read
        except FileNotFoundError:
            return None
        except OSError:
            self._discard(path)
            return None
        ok, value = self._decode_entry(data, key, path)
        if not ok:
            self._discard(path)
            return None
        return value

    def put_json(self, key: str, value: Any) -> None:
        """Store a JSON-able value atomically; NaN/±inf survive the round trip, and so does the order of a
        dict's keys (a scan served from the cache writes its columns in the order a cold scan does)."""
        envelope = {"format": ENTRY_FORMAT, "key": key, "value": encode_json_value(value)}
        data = json.dumps(envelope, allow_nan=False, separators=(",", ":")).encode("utf-8")
        path = self._path(key, ".json")
        if len(data) <= SMALL_ENTRY_BYTES:
            self._stage(key, ".json", data)
            return
        self._write(path, lambda handle: handle.write(data))

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
        """True when an entry exists for `key`, staged, packed or as a file (it may still turn out unreadable)."""
        with self._lock:
            if self._packs_mtime is None:
                self._scan_packs()
            self._scan_packs(only_if_changed=True)
            if any((key, suffix) in self._pending or (key, suffix) in self._index for suffix in (".json", ".npy")):
                return True
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

    def _pack_files(self) -> list[Path]:
        """Every pack file (readable or not) in the pack folder."""
        folder = self.pack_dir
        if not folder.is_dir() or folder.is_symlink():
            return []
        return sorted(p for p in folder.iterdir() if _PACK_RE.match(p.name))

    def _stored(self) -> tuple[set[tuple[str, str]], list[Path], list[Path]]:
        """(distinct (key, suffix) entries on disk, entry files, pack files); a torn or corrupt pack holds none."""
        files = list(self._entry_files())
        packs = self._pack_files()
        entries = {(f.name[:64], f.suffix) for f in files}
        for path in packs:
            with contextlib.suppress(OSError, ValueError):
                entries.update(_read_pack_index(path)[0])
        return entries, files, packs

    def info(self) -> CacheInfo:
        """Number of distinct entries (single files and packed ones) and the bytes of all their files."""
        entries, files, packs = self._stored()
        total = 0
        for path in [*files, *packs]:
            with contextlib.suppress(OSError):
                total += path.stat().st_size
        return CacheInfo(root=self.root, entries=len(entries), bytes=total, exists=self.root.is_dir(),
                         packs=len(packs))

    def clear(self) -> int:
        """Remove every entry and pack (and stale temp files); returns how many distinct entries were removed.

        Only files this cache wrote are touched, so a --cache-dir pointing at a folder with other
        content leaves that content alone. What this Cache has staged is dropped too.
        """
        entries, files, packs = self._stored()
        with self._lock:
            self._pending.clear()
            self._pending_bytes = 0
            self._forget_packs()
        for path in [*files, *packs]:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as err:
                raise DiffractError(
                    f"cannot remove a cache entry ({err.strerror or err})", path=path, hint="check permissions"
                ) from err
        removed = len(entries)
        if self.root.is_dir():
            now = time.time()
            for sub in self.root.iterdir():
                if not (sub.is_dir() and (_FANOUT_RE.match(sub.name) or sub.name == PACK_DIR)) or sub.is_symlink():
                    continue
                for path in sub.iterdir():
                    if path.name.startswith(TMP_PREFIX):
                        with contextlib.suppress(OSError):
                            if now - path.stat().st_mtime > _STALE_TMP_SECONDS:
                                path.unlink()
                with contextlib.suppress(OSError):
                    sub.rmdir()  # only succeeds when empty
        return removed

    # ---- compaction --------------------------------------------------------------------------
    def compact(self) -> CompactStats:
        """Merge the packs into as few as PACK_MAX_BYTES allows, safely beside live writers and readers.

        The merged packs get a new writer name and are written like any pack (temp file, then rename; fsynced,
        as the packs they replace are deleted next); only then are the packs they replace deleted. A pack that
        appears meanwhile is not touched, nor is one that cannot be read (no permission, not a file); a torn or
        corrupt one older than a minute is deleted (its entries are misses already). Of several copies of a key
        the one in the newest pack (mtime, then name) that passes the entry checks is kept. Killed after the
        renames and before the deletes, the cache holds duplicates: harmless, and merged by the next compaction.
        Raises DiffractError (nothing changed) when a merged pack cannot be written.
        """
        self.flush()
        sources = [s for s in map(_compact_source, self._pack_files()) if s is not None]
        readable = [s for s in sources if s.state == "ok"]
        size_before = sum(s.size for s in sources)
        cutoff = time.time() - _CORRUPT_PACK_GRACE_SECONDS
        if not (_worth_merging(readable) or any(s.state == "corrupt" and s.mtime < cutoff for s in sources)):
            entries = len({k for s in readable for k in s.entries or {}})
            return CompactStats(self.root, len(sources), len(sources), entries, size_before, size_before)
        merged, entries, duplicates, bad = self._write_merged(readable)
        done = [s for s in sources if s.state == "ok" or (s.state == "corrupt" and s.mtime < cutoff)]
        self._remove_compacted([s.path for s in done])
        with self._lock:
            self._forget_packs()
        left = [s for s in sources if s not in done and s.state != "gone"]
        return CompactStats(self.root, len(sources), len(merged) + len(left), entries, size_before,
                            sum(merged.values()) + sum(s.size for s in left), duplicates, bad,
                            corrupt=sum(s.state == "corrupt" for s in done))

    def _write_merged(self, sources: list[_CompactSource]) -> tuple[dict[Path, int], int, int, int]:
        """Write the entries of `sources` (newest first, one copy per key) as new packs of ≤ PACK_MAX_BYTES;
        returns ({merged pack: its size}, entries, duplicate copies dropped, entries failing their checks).
        A source that vanished or turned out corrupt meanwhile gets state "gone" or "corrupt". On any failure
        the merged packs written so far are removed again (DiffractError for an OSError)."""
        writer = f"{_writer_name()}-{secrets.token_hex(4)}"
        merged: dict[Path, int] = {}
        batch: list[tuple[tuple[str, str], bytes]] = []
        seen: set[tuple[str, str]] = set()
        duplicates = bad = batch_bytes = 0
        try:
            for source in sorted(sources, key=lambda s: (s.mtime, s.path.name), reverse=True):
                body = self._compact_body(source)
                if body is None:
                    continue
                for k, at in sorted((source.entries or {}).items(), key=lambda item: item[1].offset):
                    data = body[at.offset:at.offset + at.length]
                    if k in seen:
                        duplicates += 1
                        continue
                    if not self._entry_ok(k, data):
                        bad += 1
                        continue
                    if batch and batch_bytes + len(data) > PACK_MAX_BYTES:
                        self._write_pack(merged, writer, batch)
                        batch, batch_bytes = [], 0
                    seen.add(k)
                    batch.append((k, data))
                    batch_bytes += len(data)
            if batch:
                self._write_pack(merged, writer, batch)
        except BaseException:
            for path in merged:
                self._discard(path)
            raise
        return merged, len(seen), duplicates, bad

    def _compact_body(self, source: _CompactSource) -> bytes | None:
        """The decompressed body of a pack being compacted, or None (its state then says why)."""
        try:
            return _read_pack_body(source.path, *source.body)
        except FileNotFoundError:       # another compaction merged it meanwhile: its entries are in that one's packs
            source.state = "gone"
        except ValueError:
            source.state = "corrupt"
        except OSError:
            source.state = "unreadable"
        return None

    def _entry_ok(self, k: tuple[str, str], data: bytes) -> bool:
        """Whether a packed entry's bytes pass the checks a reader makes (a failing one is a miss: not kept)."""
        key, suffix = k
        if suffix == ".json":
            return self._decode_entry(data, key, self.pack_dir)[0]
        try:
            _read_npy(io.BytesIO(data), len(data))
        except (ValueError, EOFError):
            return False
        return True

    def _write_pack(self, merged: dict[Path, int], writer: str, items: list[tuple[tuple[str, str], bytes]]) -> None:
        """Write one merged pack (temp + rename, fsynced) and note its size in `merged`; DiffractError on failure."""
        path = self.pack_dir / f"{writer}-{len(merged)}.pack"
        data = _pack_bytes(items, writer)
        try:
            with atomic_writer(path, "wb", durable=True) as handle:
                handle.write(data)
        except OSError as err:
            raise write_error(err, path, "a compacted cache pack") from None
        merged[path] = len(data)

    def _remove_compacted(self, paths: list[Path]) -> None:
        """Delete the packs whose entries are now in the merged packs (or were unreadable); DiffractError naming
        the first that could not be deleted (its entries stay readable, in both places)."""
        failed: list[tuple[Path, OSError]] = []
        for path in paths:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as err:
                failed.append((path, err))
        if failed:
            path, err = failed[0]
            raise DiffractError(f"cannot remove {len(failed)} compacted pack(s) ({err.strerror or err}); their entries "
                                f"are also in the merged pack", path=path, hint="remove them as the user who wrote "
                                "them, or run `cache compact` as that user")


def flush_all_caches() -> None:
    """Write what every Cache of this process still has staged (at the end of a command and at interpreter exit;
    a failure only warns)."""
    for cache in list(_LIVE):
        with contextlib.suppress(Exception):
            cache.flush()


atexit.register(flush_all_caches)

"""Checkpoint fingerprints (SPEC §1): a short hash of each weight file's resolved path, size,
mtime_ns and header bytes — cheap to recompute, never a hash of all tensor bytes."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

FINGERPRINT_HEX_CHARS = 16


def fingerprint(files: Iterable[tuple[Path, bytes]]) -> str:
    """Hex digest (16 chars of sha256) over (resolved path, size, mtime_ns, header bytes) of each file, in order."""
    h = hashlib.sha256()
    for path, header in files:
        resolved = Path(path).resolve()
        st = resolved.stat()
        h.update(str(resolved).encode("utf-8"))
        h.update(b"\0%d\0%d\0" % (st.st_size, st.st_mtime_ns))
        h.update(hashlib.sha256(header).digest())
    return h.hexdigest()[:FINGERPRINT_HEX_CHARS]

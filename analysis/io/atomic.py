"""Atomic file writes: a temp file in the target's folder, fsynced, then `os.replace`d onto the target.

Readers see the old file or the whole new one, never a torn one; on any error the target is untouched.
The temp file is created with mode 0666 so the kernel applies the umask, as for a plain `open()` (mkstemp
would force 0600): exports and rewind lists are as readable by a team as any other file they write.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO

TMP_PREFIX = ".tmp-"


def process_umask() -> int:
    """The process umask, read without changing it where /proc allows (else the common 022)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _create_temp(path: Path) -> tuple[int, Path]:
    """A new, uniquely named file next to `path`, opened for writing with mode 0666 so the kernel applies
    the umask (what `open()` does; `mkstemp` would force 0600)."""
    for _ in range(100):
        tmp = path.with_name(f"{TMP_PREFIX}{secrets.token_hex(8)}-{path.name}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name next to {path}")


@contextlib.contextmanager
def atomic_writer(path: Path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a unique temp file next to `path`; on success fsync it and `os.replace` it onto `path`.

    Text modes default to UTF-8. On any exception the temp file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path)
    try:
        if "b" not in mode and encoding is None:
            encoding = "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise

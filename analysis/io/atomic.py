"""Atomic file writes: a temp file in the target's folder, fsynced, then `os.replace`d onto the target.

Readers see the old file or the whole new one, never a torn one; on any error the target is untouched.
The temp file is created with mode 0666 so the kernel applies the umask, as for a plain `open()` (mkstemp
would force 0600): exports and rewind lists are as readable by a team as any other file they write.

Temp names carry this host and process id (`.tmp-<host>-<pid>-<rand>-<name>`), so the next write to the
same place can remove what a killed process of this host left (`remove_stale_temp_files`) and never
touches the temp files of a live process or of another host sharing the folder. SIGTERM is turned into
an interrupt while writing (`sigterm_as_interrupt`), so it cleans up like Ctrl-C.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from analysis.errors import DiffractError

TMP_PREFIX = ".tmp-"

_OS_ERROR_HINTS = {
    errno.ENOSPC: "free some space on that disk or write somewhere else",
    errno.EDQUOT: "your disk quota is full: free some space or write somewhere else",
    errno.EFBIG: "the file is larger than this system allows (see `ulimit -f` and the file system's "
                 "largest file): raise the limit or write to another disk",
    errno.EACCES: "you may not write there: check the folder's permissions or write somewhere else",
    errno.EPERM: "you may not write there: check the folder's permissions or write somewhere else",
    errno.EROFS: "the file system is read-only: write somewhere else",
    errno.ENOENT: "check that the folder exists",
}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so every writer's cleanup (temp files removed) runs for it too."""


def process_umask() -> int:
    """The process umask, read without changing it where /proc allows (else the common 022)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def host_tag() -> str:
    """This host's name as it appears in temp names: no `-` (the field separator), at most 64 characters."""
    return re.sub(r"[^A-Za-z0-9._]", "_", socket.gethostname())[:64] or "host"


def owner_tag() -> str:
    """`<host>-<pid>`: who owns a temp file or folder made now."""
    return f"{host_tag()}-{os.getpid()}"


def parse_owner(tag: str) -> tuple[str, int] | None:
    """(host, pid) from `<host>-<pid>-<rand>`, or None for a name this version did not make."""
    parts = tag.rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1])


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host (one we may not signal counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def left_by_dead_process(tag: str) -> bool:
    """True when `<host>-<pid>-<rand>` names this host and a process that no longer runs: safe to remove."""
    owner = parse_owner(tag)
    return owner is not None and owner[0] == host_tag() and not pid_alive(owner[1])


def remove_path(path: Path) -> None:
    """Remove a file, link or folder tree; errors are ignored (best-effort cleanup)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def remove_stale_temp_files(path: Path) -> None:
    """Remove the temp files that dead processes of this host left while writing `path`."""
    suffix = f"-{path.name}"
    with contextlib.suppress(OSError):
        for entry in path.parent.iterdir():
            name = entry.name
            if name.startswith(TMP_PREFIX) and name.endswith(suffix) and \
                    left_by_dead_process(name[len(TMP_PREFIX):-len(suffix)]):
                remove_path(entry)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises `Terminated` (a KeyboardInterrupt) so cleanup runs; only in the main
    thread and only where SIGTERM still has its default action (a caller's own handler is kept)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def _raise(signum: int, frame: object) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _is_temp_of(where: Path, path: Path, temp: Path | None) -> bool:
    """Whether `where` is a temp file/folder made while writing `path` (inside `temp`, or named like ours)."""
    if temp is not None and (where == temp or temp in where.parents):
        return True
    same_folder = os.path.abspath(where.parent) == os.path.abspath(path.parent)
    return same_folder and (where.name.startswith(TMP_PREFIX) or
                                            where.name.startswith(f".{path.name}.diffract-"))


def write_error(err: OSError, path: str | Path, what: str, temp: Path | None = None) -> DiffractError:
    """The one-line error for an OSError while writing `what` to `path`: which file, why, what to do.

    A failure inside the temp file/folder `temp` is reported under `path`, the name the user asked for."""
    where = Path(err.filename) if err.filename else None
    if where is None or _is_temp_of(where, Path(path), temp):
        where = Path(path)
    reason = err.strerror or str(err) or type(err).__name__
    hint = _OS_ERROR_HINTS.get(err.errno, "check that the folder exists and that you may write there")
    return DiffractError(f"cannot write {what} ({reason}); nothing was written", path=where, hint=hint)


def _create_temp(path: Path) -> tuple[int, Path]:
    """A new, uniquely named file next to `path`, opened for writing with mode 0666 so the kernel applies
    the umask (what `open()` does; `mkstemp` would force 0600)."""
    for _ in range(100):
        tmp = path.with_name(f"{TMP_PREFIX}{owner_tag()}-{secrets.token_hex(8)}-{path.name}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))


@contextlib.contextmanager
def atomic_writer(path: Path, mode: str = "wb", encoding: str | None = None, durable: bool = True) -> Iterator[IO]:
    """Open a unique temp file next to `path`; on success fsync it (unless not `durable`) and `os.replace` it
    onto `path`. Exports are durable; cache entries only need atomicity (a torn entry is detected and recomputed).

    Text modes default to UTF-8. On any exception (SIGTERM included) the temp file is removed and `path`
    is left as it was; stale temp files of dead processes for `path` are removed first.
    """
    path = Path(path)
    with sigterm_as_interrupt():
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(path)
        fd, tmp = _create_temp(path)
        try:
            if "b" not in mode and encoding is None:
                encoding = "utf-8"
            with os.fdopen(fd, mode, encoding=encoding) as handle:
                yield handle
                handle.flush()
                if durable:
                    os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise


def write_text_atomic(path: str | Path, text: str, what: str) -> Path:
    """Write `text` (UTF-8) atomically to `path`; an OSError becomes one line naming the file and a fix."""
    p = Path(path)
    try:
        with atomic_writer(p, "w") as fh:
            fh.write(text)
    except OSError as err:
        raise write_error(err, p, what) from None
    return p

"""Reading inputs that may be hostile: regular files only, and JSON that cannot crash the parser.

Opening a FIFO (or a socket or some devices) for reading blocks until a writer appears, so every
input, config, index, rewind list and cache entry is checked with `os.stat` (links resolved) to be
a regular file before it is opened, and opened non-blocking with the check repeated on the open
descriptor (nothing can swap a FIFO in between). JSON is parsed by one loader that turns every
parser failure (bad syntax, bad UTF-8, nesting deep enough for a RecursionError) into one line.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO

from analysis.errors import DiffractError

MAX_JSON_DEPTH = 100  # real configs, headers and lists nest < 10 levels; deeper is hostile or broken
MAX_JSON_BYTES = 100_000_000  # a config, index, rewind list or cache entry is KBs; never read GBs into memory
_TOO_DEEP = object()  # parse_json: the parser itself ran out of recursion
REGULAR_HINT = "only regular files are read (a FIFO, socket or device could block forever); point at the real file"

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


class NotRegularFileError(OSError):
    """Raised instead of opening something that is not a regular file (reading it could block forever)."""

    def __init__(self, path: str | Path, kind: str):
        super().__init__(f"{path} is {kind}, not a regular file")
        self.filename = str(path)
        self.kind = kind


class FileTooLargeError(OSError):
    """Raised instead of reading a file larger than its kind can sensibly be (a JSON file of gigabytes)."""

    def __init__(self, path: str | Path, size: int, limit: int):
        super().__init__(f"{path} is {size} bytes, more than the {limit} allowed")
        self.filename = str(path)
        self.size = size
        self.limit = limit


def _kind(mode: int) -> str:
    """What a non-regular stat mode is, in words."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def regular_stat(path: str | Path) -> os.stat_result:
    """`os.stat` (links followed) of a regular file; NotRegularFileError for anything else."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFileError(path, _kind(st.st_mode))
    return st


def open_regular(path: str | Path) -> BinaryIO:
    """Open a regular file for binary reading without ever blocking on a FIFO (checked before and after open)."""
    regular_stat(path)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
                 | getattr(os, "O_BINARY", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(path, _kind(st.st_mode))
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular_bytes(path: str | Path, max_bytes: int | None = None) -> bytes:
    """The whole content of a regular file (NotRegularFileError for a FIFO, socket, device or folder;
    FileTooLargeError beyond `max_bytes`)."""
    with open_regular(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        if max_bytes is not None and size > max_bytes:
            raise FileTooLargeError(path, size, max_bytes)
        return handle.read()


def check_regular(path: str | Path, error: type[DiffractError] = DiffractError) -> None:
    """Raise `error` (one line naming the file and what it is) unless `path` resolves to a regular file."""
    try:
        regular_stat(path)
    except NotRegularFileError as err:
        raise error(f"is {err.kind}, not a regular file", path=path, hint=REGULAR_HINT) from None


def _depth_exceeds(value: Any, limit: int) -> bool:
    """True when `value` nests lists/objects deeper than `limit` (iterative: no recursion of its own)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def parse_json(data: bytes | str, path: str | Path, error: type[DiffractError] = DiffractError,
               what: str | None = None, hint: str = "fix or regenerate the file") -> Any:
    """Parse UTF-8 JSON; any failure (syntax, encoding, nesting > MAX_JSON_DEPTH) raises `error` naming `path`."""
    subject = f"{what} is " if what else ""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        value = json.loads(text)
    except UnicodeDecodeError as err:
        raise error(f"{subject}not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})",
                    path=path, hint=hint) from None
    except json.JSONDecodeError as err:
        raise error(f"{subject}not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})",
                    path=path, hint=hint) from None
    except RecursionError:
        value = _TOO_DEEP
    except ValueError as err:  # e.g. an integer longer than Python's digit limit
        raise error(f"{subject}not usable JSON ({str(err).splitlines()[0][:120]})", path=path, hint=hint) from None
    if value is _TOO_DEEP or _depth_exceeds(value, MAX_JSON_DEPTH):
        raise error(f"{subject}JSON nested more than {MAX_JSON_DEPTH} levels deep", path=path, hint=hint)
    return value



def load_json(path: str | Path, error: type[DiffractError] = DiffractError, what: str | None = None,
              hint: str = "fix or regenerate the file") -> Any:
    """Read a regular file (at most MAX_JSON_BYTES) and parse it with `parse_json`; a non-regular file, a
    larger one or an OS error raises `error`."""
    try:
        data = read_regular_bytes(path, MAX_JSON_BYTES)
    except NotRegularFileError as err:
        raise error(f"is {err.kind}, not a regular file", path=path, hint=REGULAR_HINT) from None
    except FileTooLargeError as err:
        raise error(f"{what or 'the file'} is {err.size} bytes, more than the {err.limit} a JSON file may have",
                    path=path, hint=hint) from None
    except OSError as err:
        raise error(f"cannot read {what or 'the file'} ({err.strerror or type(err).__name__})", path=path,
                    hint="check the path and its permissions") from None
    return parse_json(data, path, error, what, hint)

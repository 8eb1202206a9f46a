"""Evaluation texts (SPEC §9): a UTF-8 file, plain or JSONL with a `text` field; empty or binary refused."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from analysis.errors import DiffractError

JSONL_SUFFIXES = (".jsonl", ".ndjson")


@dataclass(frozen=True)
class Text:
    """A loaded text: where it came from, its display name, its content and the sha256 of the file bytes."""

    path: Path
    name: str
    content: str
    sha256: str


def _jsonl_content(raw: str, path: Path) -> str:
    """The `text` fields of a JSONL file, joined by blank lines; a bad line is one error naming it."""
    parts = []
    for i, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DiffractError(f"line {i} is not valid JSON ({err.msg})", path=path,
                                hint="write one JSON object with a \"text\" field per line") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise DiffractError(f"line {i} has no string \"text\" field", path=path,
                                hint="write one JSON object with a \"text\" field per line") from None
        parts.append(obj["text"])
    return "\n\n".join(parts)


def load_text(path: str | Path) -> Text:
    """Read an evaluation text; missing, unreadable, binary (NUL bytes, not UTF-8) or empty → DiffractError."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise DiffractError("text file not found", path=p, hint="check the path of --text") from None
    except IsADirectoryError:
        raise DiffractError("expected a text file but found a folder", path=p, hint="pass a UTF-8 text file") from None
    except OSError as err:
        raise DiffractError(f"cannot read the text ({err.strerror or err})", path=p, hint="check permissions") from None
    if b"\0" in data:
        raise DiffractError("the text is binary (it contains NUL bytes)", path=p,
                            hint="pass a UTF-8 text file (plain or JSONL with a \"text\" field)")
    try:
        raw = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DiffractError(f"the text is not UTF-8 (byte {err.start})", path=p,
                            hint="convert it to UTF-8, e.g. with iconv") from None
    content = _jsonl_content(raw, p) if p.suffix.lower() in JSONL_SUFFIXES else raw
    if not content.strip():
        raise DiffractError("the text is empty", path=p, hint="pass a file with some text to evaluate on")
    return Text(path=p, name=p.name, content=content, sha256=hashlib.sha256(data).hexdigest())

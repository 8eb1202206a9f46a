"""The one rule every writer follows: never write onto, into, or around an input.

An output is refused when it is, contains, or lies inside any input file, input folder, or the resolved
target of a link inside an input (Hugging Face caches link `snapshots/<hash>/model.safetensors` to a blob
elsewhere, so replacing the blob's folder would destroy the input through the link).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from analysis.errors import DiffractError

_MAX_WALK = 10_000  # entries looked at per input folder; checkpoints hold a few hundred files at most


def _resolved(p: str | Path) -> Path:
    return Path(p).expanduser().resolve()


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def protected_paths(inputs: Iterable[str | Path]) -> list[tuple[Path, bool]]:
    """(resolved path, is_folder) for every input and every link target found inside an input folder."""
    out: list[tuple[Path, bool]] = []
    for inp in inputs:
        raw = Path(inp).expanduser()
        ip = _resolved(raw)
        is_dir = ip.is_dir()
        out.append((ip, is_dir))
        if raw.is_symlink() or raw != ip:
            out.append((raw.absolute(), is_dir))  # the link itself is an input too
        if not is_dir:
            continue
        seen = 0
        for root, dirs, files in os.walk(ip):
            for name in dirs + files:
                seen += 1
                entry = Path(root, name)
                if entry.is_symlink():
                    target = _resolved(entry)
                    out.append((target, target.is_dir()))
            if seen > _MAX_WALK:
                break
    return out


def refuse_input_overlap(out: str | Path, inputs: Iterable[str | Path], *, option: str = "--out") -> Path:
    """Resolve `out` and raise DiffractError when it is, contains, or lies inside an input (see module doc).

    Returns the resolved output path. `option` names the flag in the hint (e.g. "--diagnostics-json").
    """
    target = _resolved(out)
    for path, is_dir in protected_paths(inputs):
        if is_dir and _within(target, path):
            raise DiffractError(f"the output lies inside the input folder {path}", path=out,
                                hint=f"choose a path for {option} outside every input checkpoint")
        if target == path:
            raise DiffractError(f"the output is the input file {path}", path=out,
                                hint=f"choose a new path for {option}")
        if _within(path, target):
            raise DiffractError(f"the output contains the input {path}", path=out,
                                hint=f"choose a path for {option} that holds no input checkpoint")
    return target


def checkpoint_files(ckpt: object) -> list[Path]:
    """Every path an opened checkpoint is read from: the path given, its weight files, indexes and the files
    beside them (config, tokenizer), so a table next to a single weight file cannot replace its config."""
    files = [Path(getattr(ckpt, "path"))]
    for attr in ("weight_files", "index_files", "aux_files"):
        files.extend(Path(f) for f in getattr(ckpt, attr, ()) or ())
    return files


def checkpoint_inputs(paths: Iterable[str | Path]) -> list[Path]:
    """`checkpoint_files` of each path, opened headers-only; a path that does not open is protected as given
    (the command that reads it reports why)."""
    from analysis.io.checkpoint import open_checkpoint

    out: list[Path] = []
    for p in paths:
        try:
            ckpt = open_checkpoint(p)
        except Exception:  # noqa: BLE001 - protection only; the reader names the real problem later
            out.append(Path(p))
            continue
        try:
            out.extend(checkpoint_files(ckpt))
        finally:
            ckpt.close()
    return out

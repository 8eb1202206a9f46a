"""The one rule for checkpoint display labels, used by `scan`, `delta`, `info`, the alignment and the app.

A label is the folder or file name (for a generic HF weight file such as `model.safetensors`, its folder's
name), or the name the user gave. When two inputs share a label, each of them is named by the shortest
trailing part of its path that tells it apart from the others (`run1/model`, `run2/model`); the same path
given twice keeps its name on the first and gets `#2`, `#3` … on the repeats.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

GENERIC_PREFIXES = ("model.", "model-", "pytorch_model")


def default_label(path: Path) -> str:
    """The folder name; for a file with a generic HF name (model*.safetensors, pytorch_model*.bin,
    *.index.json) the name of its folder, else the file name."""
    generic = path.name.startswith(GENERIC_PREFIXES) or path.name.endswith(".index.json")
    return path.parent.name if path.is_file() and generic and path.parent.name else (path.name or str(path))


def _anchor(path: Path, name: str) -> Path:
    """The path whose last component the label names (the folder of a generic weight file)."""
    return path.parent if path.name != name and path.parent.name == name else path


def _trailing(path: Path, parts: int) -> str:
    """The last `parts` components of `path`, joined with `/`."""
    return "/".join(path.parts[-parts:]) if parts < len(path.parts) else str(path)


def _distinguish(paths: Sequence[Path], taken: set[str]) -> list[str] | None:
    """The shortest trailing paths (same length for all) that differ pairwise and from `taken`; None if none do."""
    longest = max(len(p.parts) for p in paths)
    for parts in range(1, longest + 1):
        names = [_trailing(p, parts) for p in paths]
        if len(set(names)) == len(names) and not taken.intersection(names):
            return names
    return None


def unique_labels(paths: Sequence[str | Path], names: Sequence[str | None] | None = None) -> list[str]:
    """One distinct display label per input (the module's rule): `names[i]` (None or absent: the default
    label of `paths[i]`), with colliding labels replaced by their shortest distinguishing trailing path."""
    resolved = [Path(p).expanduser().resolve() for p in paths]
    given = list(names) if names is not None else [None] * len(resolved)
    if len(given) != len(resolved):
        raise ValueError("one name (or None) per path")
    labels = [n if n else default_label(p) for n, p in zip(given, resolved)]
    out = list(labels)
    for name in dict.fromkeys(labels):
        group = [i for i, lab in enumerate(labels) if lab == name]
        if len(group) < 2:
            continue
        anchors = [_anchor(resolved[i], name) for i in group]
        distinct = list(dict.fromkeys(anchors))
        others = {lab for lab in labels if lab != name}
        trails = _distinguish(distinct, others) if len(distinct) > 1 else [name]
        by_anchor = dict(zip(distinct, trails or [name] * len(distinct)))
        seen: dict[str, int] = {}
        for i, anchor in zip(group, anchors):
            label = by_anchor[anchor]
            seen[label] = seen.get(label, 0) + 1
            out[i] = label if seen[label] == 1 else f"{label}#{seen[label]}"
    return out

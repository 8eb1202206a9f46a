"""Align the tensors of several checkpoints by normalised name (SPEC §1): shared keys, keys
missing per checkpoint, and shape mismatches on shared keys (an error unless strict=False)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from analysis.io.checkpoint import Checkpoint, _natural_key
from analysis.errors import AlignmentError


@dataclass(frozen=True)
class ShapeMismatch:
    """A key present in every checkpoint whose shapes disagree; `shapes[i]` belongs to checkpoint i."""

    key: str
    shapes: tuple[tuple[int, ...], ...]
    files: tuple[str, ...]


@dataclass(frozen=True)
class AlignmentReport:
    """Result of `align`: which tensors can be compared across all the checkpoints."""

    labels: tuple[str, ...]
    shared: tuple[str, ...]                       # in every checkpoint with equal shapes, natural order
    missing: dict[str, tuple[str, ...]]           # label -> keys other checkpoints have and this one lacks
    mismatched: tuple[ShapeMismatch, ...] = field(default=())
    present_in: dict[str, tuple[str, ...]] = field(default_factory=dict, repr=False)  # key -> labels, natural order

    @property
    def only_in(self) -> dict[str, tuple[str, ...]]:
        """label -> keys that no other checkpoint has."""
        return {label: tuple(k for k, owners in self.present_in.items() if owners == (label,))
                for label in self.labels}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for `diffract-tui info --json` and exports)."""
        return {
            "checkpoints": list(self.labels),
            "shared": len(self.shared),
            "missing": {label: list(keys) for label, keys in self.missing.items()},
            "mismatched": [{"key": m.key, "shapes": [list(s) for s in m.shapes], "files": list(m.files)}
                           for m in self.mismatched],
        }


def _labels(checkpoints: Sequence[Checkpoint]) -> tuple[str, ...]:
    """Display labels, made unique (a suffix #i) when two checkpoints share a name."""
    labels = [c.label for c in checkpoints]
    return tuple(f"{lab}#{i}" if labels.count(lab) > 1 else lab for i, lab in enumerate(labels))


def align(checkpoints: Sequence[Checkpoint], strict: bool = True) -> AlignmentReport:
    """Compare tensor names and shapes; with strict=True a shape mismatch raises AlignmentError
    naming the key, both shapes and both files."""
    if not checkpoints:
        raise ValueError("align() needs at least one checkpoint")
    labels = _labels(checkpoints)
    owners: dict[str, list[str]] = {}
    for label, ckpt in zip(labels, checkpoints):
        for key in ckpt.keys():
            owners.setdefault(key, []).append(label)
    all_keys = tuple(sorted(owners, key=_natural_key))
    common = [k for k in all_keys if len(owners[k]) == len(checkpoints)]
    mismatched: list[ShapeMismatch] = []
    shared: list[str] = []
    for key in common:
        infos = [c.info(key) for c in checkpoints]
        shapes = tuple(i.shape for i in infos)
        if len(set(shapes)) == 1:
            shared.append(key)
            continue
        mismatch = ShapeMismatch(key, shapes, tuple(str(i.file) for i in infos))
        if strict:
            j = next(j for j in range(1, len(shapes)) if shapes[j] != shapes[0])
            raise AlignmentError(
                f"shape mismatch on shared tensor '{key}': {shapes[0]} in {infos[0].file} vs {shapes[j]} in "
                f"{infos[j].file}", hint="these checkpoints are not the same architecture; compare matching models")
        mismatched.append(mismatch)
    missing = {label: tuple(k for k in all_keys if label not in owners[k]) for label in labels}
    return AlignmentReport(labels=labels, shared=tuple(shared), missing=missing, mismatched=tuple(mismatched),
                           present_in={k: tuple(owners[k]) for k in all_keys})

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
    """Display labels, made unique by the one rule (`analysis.io.labels`) when two checkpoints share a name."""
    from analysis.io.labels import unique_labels

    return tuple(unique_labels([c.path for c in checkpoints], [c.label for c in checkpoints]))


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


# (what a user reads, how to get it from a ModelLayout): the geometry two checkpoints of one model share
_SAME_MODEL_FIELDS: tuple[tuple[str, Any], ...] = (
    ("model_type", lambda lay: lay.model_type),
    ("layers", lambda lay: lay.num_layers),
    ("hidden size", lambda lay: lay.hidden_size),
    ("attention heads", lambda lay: lay.num_heads),
    ("key/value heads", lambda lay: lay.num_kv_heads),
    ("head_dim", lambda lay: lay.head_dim),
)
SAME_MODEL_HINT = "compare a base with checkpoints continually pre-trained from it (same architecture and size)"


def _is_matrix_key(ckpt: Checkpoint, key: str) -> bool:
    """True when `key` is a 2-D tensor with both sides > 0 in `ckpt` (something with a spectrum)."""
    shape = tuple(ckpt.info(key).shape)
    return len(shape) == 2 and min(shape) > 0


def require_same_model(checkpoints: Sequence[Checkpoint], *, strict: bool = True,
                       layouts: Sequence[Any] | None = None) -> AlignmentReport:
    """`align`, refusing checkpoints of different models first: the one check every multi-checkpoint command
    makes before any output. One line names the first difference (model_type, layers, hidden size, heads,
    kv heads, head_dim: both checkpoints, both values) or says that no 2-D tensor is shared; tensors that only some
    checkpoints have stay legal (SPEC §1) and are listed in `present_in`."""
    if len(checkpoints) < 2:
        return align(checkpoints, strict=strict)
    if layouts is None:
        from analysis.model.architecture import layout_of

        layouts = [layout_of(c) for c in checkpoints]
    base, base_layout = checkpoints[0], layouts[0]
    for ckpt, layout in zip(checkpoints[1:], layouts[1:]):
        for what, get in _SAME_MODEL_FIELDS:
            a, b = get(base_layout), get(layout)
            if a != b:
                show = repr if isinstance(a, str) else str
                raise AlignmentError(f"different models: {what} {show(a)} in {base.path} vs {show(b)} in "
                                     f"{ckpt.path}", hint=SAME_MODEL_HINT)
    report = align(checkpoints, strict=strict)
    common = [*report.shared, *(m.key for m in report.mismatched)]  # lenient: a shape mismatch still shares a name
    if not any(_is_matrix_key(base, k) for k in common):
        names = " and ".join(str(c.path) for c in checkpoints)
        raise AlignmentError(f"different models: {names} share no 2-D tensor ({len(common)} tensor name(s) "
                             "in common)", hint=SAME_MODEL_HINT)
    return report

"""Checkpoint series (SPEC §10): inputs that are checkpoints of one run, recognised from the step numbers in
their names (`step-1000`, `checkpoint-500`, `stage1-step2000-tokens8B`, `global_step300`, `org/name@step1000`)
or given explicitly, ordered by step; rows then carry `step` (and `tokens` when the name says)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence, TypeVar

if TYPE_CHECKING:  # pragma: no cover
    from analysis.deltas.delta_table import DeltaOptions, DeltaTable, ProgressFn
    from analysis.run.cache import Cache

T = TypeVar("T")

# A step marker: not preceded by a letter (so `timestep5` is no step), a keyword, an optional - or _, digits.
_STEP = re.compile(r"(?<![a-z])(?:global_step|global-step|checkpoint|ckpt|step)[-_]?(\d+)(?![\d.])", re.I)
# Tokens: `tokens8B`, `tokens-8B`, `tok8B`, or a bare size `-100B` / `_1.5T` after the step (not a parameter count).
_TOKENS_WORD = re.compile(r"(?<![a-z])tok(?:en)?s?[-_]?(\d+(?:\.\d+)?)([KMBT])?(?![a-z\d])", re.I)
_TOKENS_BARE = re.compile(r"[-_](\d+(?:\.\d+)?)([KMBT])(?:[-_]?tok(?:en)?s?)?(?![a-z\d])", re.I)
_SCALE = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}


def _tokens(match: re.Match[str]) -> int:
    """The token count a `<number><K|M|B|T>` match says."""
    return round(float(match.group(1)) * _SCALE[(match.group(2) or "").upper()])


def parse_name(name: str) -> tuple[int | None, int | None]:
    """(step, tokens) that one name (no folders) says; None where it says nothing."""
    steps = list(_STEP.finditer(name))
    if not steps:
        return None, None
    step = steps[-1]  # `run3-ckpt-step200`: the last marker is the step
    word = _TOKENS_WORD.search(name)
    bare = _TOKENS_BARE.search(name, step.end())
    tokens = _tokens(word) if word else (_tokens(bare) if bare else None)
    return int(step.group(1)), tokens


def parse_step(name: str | Path) -> tuple[int | None, int | None]:
    """(step, tokens) of a checkpoint from its name: a hub revision (`org/name@step1000`), else the folder or file
    name, else (for a weight file such as `checkpoint-500/model.safetensors`) its folder's name."""
    text = str(name)
    if "@" in text:
        return parse_name(text.rsplit("@", 1)[1])
    path = Path(text)
    step, tokens = parse_name(path.name)
    if step is None and path.suffix and path.parent.name:
        step, tokens = parse_name(path.parent.name)
    return step, tokens


def parse_steps_option(text: str) -> list[int]:
    """`--steps 0,500,1000` as integers; ValueError with what is wrong otherwise."""
    parts = [p.strip() for p in text.split(",")]
    if not all(re.fullmatch(r"\d+", p) for p in parts):
        raise ValueError(f"{text!r} is not a comma-separated list of non-negative step numbers (e.g. 0,500,1000)")
    return [int(p) for p in parts]


@dataclass(frozen=True)
class Series:
    """Checkpoints of one run in step order: `order[i]` is the input index of the i-th step."""

    order: tuple[int, ...]
    steps: tuple[int, ...]                # ascending, one per checkpoint
    tokens: tuple[int | None, ...]        # parallel to steps

    def reorder(self, items: Sequence[T]) -> list[T]:
        """`items` given in input order, put in step order."""
        return [items[i] for i in self.order]

    def columns(self, position: int) -> dict[str, int]:
        """The row columns of the checkpoint at `position` (step order): step, and tokens when known."""
        out = {"step": self.steps[position]}
        if any(t is not None for t in self.tokens):
            out["tokens"] = self.tokens[position]  # type: ignore[assignment]
        return out

    def by_label(self, labels_in_step_order: Sequence[str]) -> dict[str, dict[str, int]]:
        """Row columns keyed by the checkpoint labels (given in step order)."""
        return {label: self.columns(i) for i, label in enumerate(labels_in_step_order)}

    def in_step_order(self) -> "Series":
        """The same series for its inputs once put in step order (`reorder`): its order is then the identity."""
        return Series(order=tuple(range(len(self.steps))), steps=self.steps, tokens=self.tokens)


def detect_series(labels_or_paths: Sequence[str | Path], explicit_steps: Sequence[int] | None = None,
                  enabled: bool = True) -> Series | None:
    """The series the inputs form, or None: explicit steps win (one per input, distinct), else, when recognition is
    enabled, every name must say a step and no two the same; fewer than two inputs are no series."""
    parsed = [parse_step(x) for x in labels_or_paths]
    if explicit_steps is not None:
        if len(explicit_steps) != len(parsed):
            raise ValueError(f"--steps gives {len(explicit_steps)} step(s) for {len(parsed)} checkpoint(s)")
        if len(set(explicit_steps)) != len(explicit_steps):
            raise ValueError(f"--steps repeats a step ({','.join(map(str, explicit_steps))}); give each its own")
        steps = list(explicit_steps)
    else:
        if not enabled or len(parsed) < 2:
            return None
        steps = [s for s, _ in parsed]  # type: ignore[misc]
        if any(s is None for s in steps) or len(set(steps)) != len(steps):
            return None
    order = tuple(sorted(range(len(steps)), key=lambda i: steps[i]))
    return Series(order=order, steps=tuple(steps[i] for i in order), tokens=tuple(parsed[i][1] for i in order))


def annotate_rows(rows: list[dict], series: Series, labels_in_step_order: Sequence[str]) -> list[dict]:
    """Add `step` (and `tokens`) to every row from its `checkpoint` label; rows of other labels are left as they are."""
    columns = series.by_label(labels_in_step_order)
    for row in rows:
        row.update(columns.get(row.get("checkpoint"), {}))
    return rows


def previous_step_deltas(paths_in_step_order: Sequence[str | Path], *, options: "DeltaOptions",
                         cache: "Cache | None" = None, progress: "ProgressFn | None" = None) -> "DeltaTable":
    """Δ of each step against the previous one (SPEC §10's "previous"): one delta table per consecutive pair,
    joined; every row names its base in `against`."""
    from analysis.deltas.delta_table import DeltaTable, open_and_build

    paths = list(paths_in_step_order)
    tables = [open_and_build(a, [b], options=options, cache=cache, progress=progress)
              for a, b in zip(paths, paths[1:])]
    rows = [{**r, "against": t.metadata["base"]["label"]} for t in tables for r in t.rows]
    first = tables[0].metadata
    summary = {**tables[0].summary, "base": "the previous step",
               "checkpoints": [c for t in tables for c in t.summary["checkpoints"]]}
    metadata = {**first, "against": "previous", "targets": [t.metadata["targets"][0] for t in tables],
                "pairs": [{"base": t.metadata["base"]["label"], "target": t.metadata["targets"][0]["label"]}
                          for t in tables]}
    return DeltaTable(rows=rows, summary=summary, metadata=metadata,
                      failures=[f for t in tables for f in t.failures])


@dataclass(frozen=True)
class AlphaSummary:
    """Median power-law α of each module kind (q, k, v, o, gate, …: one value over every layer's matrix of that
    name) per checkpoint in step order: "do power-law tails develop as training progresses" at a glance."""

    labels: tuple[str, ...]                          # checkpoints in step order
    steps: tuple[int | None, ...]                    # their steps (None: not a series)
    kinds: tuple[str, ...]                           # module names, in the order the rows first give them
    medians: dict[str, tuple[float | None, ...]]     # kind → median α per checkpoint (None: no fit there)
    counts: dict[str, int]                           # kind → matrices per checkpoint that the median is over


def median_alpha_by_kind(rows: Sequence[dict], labels_in_step_order: Sequence[str],
                         steps: Sequence[int | None]) -> AlphaSummary:
    """The AlphaSummary of scan rows: weight rows of whole layer matrices (no head slices, no globals, no deltas)
    grouped by module name and checkpoint; an empty or NaN `pl_alpha` is left out of the median."""
    import math
    import statistics

    values: dict[str, dict[str, list[float]]] = {}
    matrices: dict[str, set[tuple]] = {}
    for row in rows:
        if (row.get("operation") != "weight" or row.get("layer") is None or row.get("head") is not None
                or row.get("kv_head") is not None):
            continue
        kind = str(row.get("module"))
        per_label = values.setdefault(kind, {})
        matrices.setdefault(kind, set()).add((row.get("layer"), row.get("tensor")))
        alpha = row.get("pl_alpha")
        if alpha is not None and math.isfinite(float(alpha)):
            per_label.setdefault(row.get("checkpoint"), []).append(float(alpha))
    medians = {kind: tuple(statistics.median(v[label]) if v.get(label) else None for label in labels_in_step_order)
               for kind, v in values.items()}
    return AlphaSummary(labels=tuple(labels_in_step_order), steps=tuple(steps), kinds=tuple(values),
                        medians=medians, counts={kind: len(m) for kind, m in matrices.items()})

"""Head-wise rewind (SPEC §6): choose heads (manual, greedy, reference, top, random), preview what that removes, and
write the target with those heads' q rows / o columns (and k/v rows per the GQA policy, q/k/v biases)
set back to the base — tensor by tensor, through the streaming writer.

Planning is split in two so the app can stay responsive: `rewind_inputs` is the one pass over the
checkpoints (head energies, optional reference agreement); `plan_from_inputs` and `preview` are pure
and fast on its result. `plan_rewind` is the convenience that does both.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from analysis.deltas.delta import KV_PROJECTIONS, PROJECTIONS, HeadScores, head_energies, scores_from_energies
from analysis.errors import AlignmentError, DiffractError, LayoutError, RewindListError
from analysis.progress import Cancel, Progress, check
from analysis.edit.rewind_list import (GQA_POLICIES, Architecture, CheckpointRef, HeadEntry, Pattern, RewindList,
                                  check_fresh, validate_rewind_list)
from analysis.run.provenance import tool_version
from analysis.io.writer import (DEFAULT_MAX_SHARD_BYTES, RawBytes, TensorSpec, WriteResult, inferred_config,
                             safetensors_data_offsets, write_checkpoint_streaming)

if TYPE_CHECKING:  # pragma: no cover
    from analysis.model.architecture import ModelLayout
    from analysis.io.checkpoint import Checkpoint
    from analysis.model.heads import Slot

PLAN_SCORES = ("rel_frob", "frob")
TAYLOR = "taylor"   # the loss-aware score of SPEC §9, computed by analysis.eval.taylor and passed in RewindInputs
VARIANTS = ("lowest", "most_agreeing")


# --------------------------------------------------------------------------------------------------
# the one pass over the checkpoints
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RewindInputs:
    """What planning needs, computed once: per-projection head energies of the target's delta (and the
    reference's), and the A2 agreement of the two deltas per head when a reference is given."""

    architecture: Architecture
    target: HeadScores
    reference: HeadScores | None = None
    agreement: torch.Tensor | None = None        # (L × H) A2 delta_cos of target vs reference deltas
    taylor: torch.Tensor | None = None           # (L × H) Taylor scores s_h (SPEC §9), when computed


def rewind_inputs(base: "Checkpoint", target: "Checkpoint", reference: "Checkpoint | None" = None, *,
                  layout: "ModelLayout | None" = None, dtype: torch.dtype = torch.float32,
                  progress: "Progress | None" = None, cancel: "Cancel | None" = None) -> RewindInputs:
    """Head energies of target−base (and reference−base, with their per-head A2) in one read per projection."""
    from analysis.deltas.agreement import a2_cosine, head_stack
    from analysis.io.alignment import require_same_model
    from analysis.model.architecture import layout_of
    from analysis.model.heads import projection_heads

    # different models: one line before any read (strict=False: a resized vocabulary does not touch the heads)
    require_same_model([c for c in (base, target, reference) if c is not None], strict=False)
    layout = layout if layout is not None else layout_of(target)
    if not layout.heads_available:
        raise LayoutError(f"heads are not available for this model: {layout.heads_reason}",
                          path=getattr(target, "path", None), hint="rewind works on models with known attention heads")
    L, H = layout.num_layers, layout.num_heads
    sides = [target] + ([reference] if reference is not None else [])
    de = [{p: torch.zeros(L, H, dtype=torch.float64) for p in PROJECTIONS} for _ in sides]
    be = {p: torch.zeros(L, H, dtype=torch.float64) for p in PROJECTIONS}
    agreement = torch.full((L, H), math.nan, dtype=torch.float64) if reference is not None else None
    for layer in range(L):
        deltas: list[dict[str, torch.Tensor]] = [{} for _ in sides]
        for p in PROJECTIONS:
            b = projection_heads(base, layout, layer, p, dtype)
            for i, ck in enumerate(sides):
                t = projection_heads(ck, layout, layer, p, dtype)
                if t.shape != b.shape:
                    raise AlignmentError(f"layer {layer} {p}-projection heads have shapes {tuple(b.shape)} "
                                         f"and {tuple(t.shape)}", path=getattr(ck, "path", None),
                                         hint="rewind needs checkpoints of the same architecture")
                d = t - b
                e_d, e_b = head_energies(d, b, p, H)
                de[i][p][layer] = e_d
                be[p][layer] = e_b
                if agreement is not None:
                    deltas[i][p] = d
        if agreement is not None:
            agreement[layer] = a2_cosine(head_stack(deltas[0], layout), head_stack(deltas[1], layout))
        if progress is not None:
            progress(layer + 1, L, f"head energies, layer {layer}")
        check(cancel)
    scores = []
    for parts in de:
        d_tot = sum(parts.values(), torch.zeros(L, H, dtype=torch.float64))
        b_tot = sum(be.values(), torch.zeros(L, H, dtype=torch.float64))
        scores.append(HeadScores(scores=scores_from_energies(d_tot, b_tot), delta_energy=d_tot, base_energy=b_tot,
                                 projection_delta_energy=parts, projection_base_energy=be))
    return RewindInputs(architecture=Architecture.from_layout(layout), target=scores[0],
                        reference=scores[1] if reference is not None else None, agreement=agreement)


def score_grid(hs: HeadScores, score: str = "rel_frob", exclude_kv: bool = False) -> torch.Tensor:
    """(L × H) head scores from per-projection energies: `rel_frob` r (SPEC §4) or `frob` √Σ‖ΔW‖²."""
    if score not in PLAN_SCORES:
        raise DiffractError(f"unknown score {score!r}", hint=f"use one of {', '.join(PLAN_SCORES + (TAYLOR,))}")
    projs = [p for p in PROJECTIONS if not (exclude_kv and p in KV_PROJECTIONS)]
    missing = [p for p in projs if p not in hs.projection_delta_energy]
    if missing:
        raise DiffractError(f"head scores lack the {', '.join(missing)} projection energies",
                            hint="compute them with exclude_kv=False")
    d = sum(hs.projection_delta_energy[p] for p in projs)
    if score == "frob":
        return d.sqrt()
    return scores_from_energies(d, sum(hs.projection_base_energy[p] for p in projs))


# --------------------------------------------------------------------------------------------------
# pure planning
# --------------------------------------------------------------------------------------------------


def head_count(fraction: float, arch: Architecture) -> int:
    """⌊f·L·H⌋ (SPEC §6), robust to binary rounding (0.29·100 counts 29)."""
    if not 0.0 <= fraction <= 1.0 or math.isnan(fraction):
        raise DiffractError(f"fraction {fraction} is outside [0, 1]", hint="pass --fraction between 0 and 1")
    return int(math.floor(fraction * arch.layers * arch.heads + 1e-9))


def rank_heads(grid: torch.Tensor, *, lowest: bool = True) -> list[tuple[int, int]]:
    """All (layer, head) ordered by value (lowest or highest first); ties by position; NaN always last."""
    L, H = grid.shape
    vals = grid.tolist()
    cells = [(l, h) for l in range(L) for h in range(H)]
    def key(c: tuple[int, int]) -> tuple[int, float, int, int]:
        v = vals[c[0]][c[1]]
        if math.isnan(v):
            return (1, 0.0, c[0], c[1])
        return (0, v if lowest else -v, c[0], c[1])
    return sorted(cells, key=key)


def entries_for_heads(heads: Sequence[tuple[int, int]], arch: Architecture, gqa_policy: str,
                      scores: torch.Tensor | None) -> tuple[HeadEntry, ...]:
    """Head entries with their projections: q and o always; k/v of g(h) per the GQA policy (`group`: only
    when every query head of g is rewound; `never`; `any`). Sorted by (layer, head)."""
    if gqa_policy not in GQA_POLICIES:
        raise DiffractError(f"unknown GQA policy {gqa_policy!r}", hint=f"use one of {', '.join(GQA_POLICIES)}")
    chosen = sorted(set(heads))
    for l, h in chosen:
        if not (0 <= l < arch.layers and 0 <= h < arch.heads):
            raise DiffractError(f"head {l}:{h} is out of range for {arch.layers} layers × {arch.heads} heads",
                                hint="layers and heads count from 0")
    per_group: dict[tuple[int, int], int] = {}
    for l, h in chosen:
        per_group[(l, arch.kv_group(h))] = per_group.get((l, arch.kv_group(h)), 0) + 1
    out = []
    for l, h in chosen:
        if gqa_policy == "any" or (gqa_policy == "group" and per_group[(l, arch.kv_group(h))] == arch.group_size):
            projs: tuple[str, ...] = ("q", "k", "v", "o")
        else:
            projs = ("q", "o")
        s = None if scores is None else float(scores[l, h])
        out.append(HeadEntry(layer=l, head=h, projections=projs, score=s))
    return tuple(out)


def target_score_grid(inputs: RewindInputs, score: str, exclude_kv: bool) -> torch.Tensor:
    """The target's (L × H) ranking grid: a weight score (`score_grid`) or the Taylor scores in `inputs`."""
    if score != TAYLOR:
        return score_grid(inputs.target, score, exclude_kv)
    if inputs.taylor is None:
        raise DiffractError("the taylor score needs the model's loss gradient, which was not computed",
                            hint="pass --text FILE (and --general-text FILE) with --score taylor")
    return inputs.taylor


def random_heads(arch: Architecture, n: int, seed: int) -> list[tuple[int, int]]:
    """n distinct (layer, head) drawn uniformly with a seeded generator (the same seed, the same heads)."""
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(arch.layers * arch.heads, generator=g)[:n].tolist()
    return [(i // arch.heads, i % arch.heads) for i in perm]


def plan_from_inputs(inputs: RewindInputs, *, base: CheckpointRef, target: CheckpointRef,
                     reference: CheckpointRef | None = None, pattern: str = "greedy", fraction: float | None = None,
                     heads: Sequence[tuple[int, int]] | None = None, score: str = "rel_frob",
                     gqa_policy: str = "group", exclude_kv: bool = False, variant: str = "lowest",
                     seed: int | None = None) -> RewindList:
    """Choose the heads (pure, fast): `greedy` the ⌊f·L·H⌋ lowest target scores; `top` the highest;
    `random` a seeded uniform draw; `reference` the lowest reference scores (variant `lowest`) or the highest
    A2 agreement with the reference (`most_agreeing`); `manual` the given heads."""
    arch = inputs.architecture
    target_scores = target_score_grid(inputs, score, exclude_kv)
    settings: dict[str, Any] = {"exclude_kv": exclude_kv, "dtype": "float32", "variant": None}
    if pattern == "manual":
        if heads is None:
            raise DiffractError("the manual pattern needs a list of heads", hint="pass --heads LAYER:HEAD,…")
        chosen, grid, used_score = list(heads), target_scores, score
        fraction = len(set(chosen)) / (arch.layers * arch.heads)
    elif pattern in ("greedy", "reference", "top", "random"):
        if fraction is None:
            raise DiffractError(f"the {pattern} pattern needs a fraction", hint="pass --fraction between 0 and 1")
        if heads:
            raise DiffractError(f"--heads is only for the manual pattern, not {pattern}",
                                hint="drop --heads or use --pattern manual")
        n = head_count(fraction, arch)
        if pattern in ("greedy", "top"):
            grid, used_score, lowest = target_scores, score, pattern == "greedy"
        elif pattern == "random":
            if seed is None:
                raise DiffractError("the random pattern needs a seed", hint="pass --seed N")
            settings["seed"] = int(seed)
            grid, used_score, lowest = target_scores, score, True
        else:
            if score == TAYLOR:
                raise DiffractError("the reference pattern ranks by the reference's weight update, not by taylor",
                                    hint="use --score rel_frob or frob with --pattern reference")
            if reference is None or inputs.reference is None:
                raise DiffractError("the reference pattern needs a reference checkpoint", hint="pass --reference REF")
            if variant not in VARIANTS:
                raise DiffractError(f"unknown variant {variant!r}", hint=f"use one of {', '.join(VARIANTS)}")
            settings["variant"] = variant
            if variant == "lowest":
                grid, used_score, lowest = score_grid(inputs.reference, score, exclude_kv), score, True
            else:
                assert inputs.agreement is not None
                grid, used_score, lowest = inputs.agreement, "agreement", False
        chosen = random_heads(arch, n, seed) if pattern == "random" else rank_heads(grid, lowest=lowest)[:n]
    else:
        raise DiffractError(f"unknown pattern {pattern!r}", hint="use manual, greedy, reference, top or random")
    if pattern != "reference":
        reference = None  # SPEC §6: "reference" is null unless the pattern used one
    rl = RewindList(base=base, target=target, reference=reference, architecture=arch,
                    pattern=Pattern(name=pattern, fraction=float(fraction), score=used_score, gqa_policy=gqa_policy),
                    heads=entries_for_heads(chosen, arch, gqa_policy, grid), created_by=tool_version(),
                    settings=settings)
    return validate_rewind_list(rl)


def checkpoint_ref(ckpt: "Checkpoint") -> CheckpointRef:
    """Path (resolved) and fingerprint of an open checkpoint, for a list."""
    return CheckpointRef(path=str(Path(ckpt.path).resolve()), fingerprint=str(ckpt.fingerprint))


def plan_rewind(base: "Checkpoint", target: "Checkpoint", *, pattern: str = "greedy", fraction: float | None = None,
                reference: "Checkpoint | None" = None, heads: Sequence[tuple[int, int]] | None = None,
                score: str = "rel_frob", gqa_policy: str = "group", exclude_kv: bool = False,
                variant: str = "lowest", inputs: RewindInputs | None = None, seed: int | None = None,
                progress: "Progress | None" = None) -> RewindList:
    """A validated rewind list for `target` against `base` (SPEC §6); pass `inputs` to skip the read pass."""
    if inputs is None:
        inputs = rewind_inputs(base, target, reference if pattern == "reference" else None, progress=progress)
    return plan_from_inputs(inputs, base=checkpoint_ref(base), target=checkpoint_ref(target),
                            reference=checkpoint_ref(reference) if reference is not None else None,
                            pattern=pattern, fraction=fraction, heads=heads, score=score, gqa_policy=gqa_policy,
                            exclude_kv=exclude_kv, variant=variant, seed=seed)


@dataclass(frozen=True)
class RewindPreview:
    """What a list would do: heads per layer, the share of the attention ‖Δ‖² it removes (q/k/v/o weights,
    exact per projection: k/v counted only for rewound kv groups), and the list rows with scores."""

    heads_per_layer: tuple[int, ...]
    share_removed: float
    energy_removed: float
    energy_total: float
    rows: tuple[tuple[int, int, tuple[str, ...], float | None], ...] = field(default=())


def preview(rl: RewindList, inputs: RewindInputs) -> RewindPreview:
    """Preview of a list against the target's head energies (pure; no file access)."""
    pde = inputs.target.projection_delta_energy
    arch = rl.architecture
    removed = 0.0
    for e in rl.heads:
        for p in ("q", "o"):
            if p in e.projections:
                removed += float(pde[p][e.layer, e.head])
    for p in KV_PROJECTIONS:
        for layer, g in rl.rewound_kv_groups(p):
            hs = slice(g * arch.group_size, (g + 1) * arch.group_size)
            removed += float(pde[p][layer, hs].sum())  # k/v energy was split over the group's query heads
    total = float(sum(pde[p].sum() for p in PROJECTIONS))
    return RewindPreview(heads_per_layer=tuple(rl.heads_per_layer()),
                         share_removed=removed / total if total > 0 else 0.0, energy_removed=removed,
                         energy_total=total,
                         rows=tuple((e.layer, e.head, e.projections, e.score) for e in rl.heads))


def parse_heads(text: str) -> list[tuple[int, int]]:
    """`"3:5,4:1"` → [(3, 5), (4, 1)] (layer:head, 0-based)."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            l, h = part.split(":")
            out.append((int(l), int(h)))
        except ValueError:
            raise DiffractError(f"cannot read head {part!r}", hint="write heads as LAYER:HEAD,… e.g. 3:5,4:1") from None
    return out


# --------------------------------------------------------------------------------------------------
# apply
# --------------------------------------------------------------------------------------------------


def rewind_edits(rl: RewindList, layout: "ModelLayout") -> dict[str, list["Slot"]]:
    """Normalised tensor name → the slots to take from the base: q/o weights of each listed head, k/v
    weights of each rewound kv group, and the q/k/v bias entries of those rows (the o bias stays)."""
    from analysis.model.heads import head_slots

    edits: dict[str, list["Slot"]] = {}
    def add(slots: list["Slot"]) -> None:
        for s in slots:
            edits.setdefault(s.tensor, []).append(s)
    for e in rl.heads:
        for p in ("q", "o"):
            if p in e.projections:
                add(head_slots(layout, e.layer, p, e.head))
                add(head_slots(layout, e.layer, p, e.head, bias=True))
    for p in KV_PROJECTIONS:
        for layer, g in sorted(rl.rewound_kv_groups(p)):
            add(head_slots(layout, layer, p, g))
            add(head_slots(layout, layer, p, g, bias=True))
    return edits


def _check_architecture(rl: RewindList, layout: "ModelLayout", source: str | Path | None) -> None:
    have = Architecture.from_layout(layout)
    a = rl.architecture
    if (a.layers, a.heads, a.kv_heads, a.head_dim) != (have.layers, have.heads, have.kv_heads, have.head_dim):
        raise RewindListError(
            f"field 'architecture': the list is for {a.layers} layers × {a.heads} heads ({a.kv_heads} kv, "
            f"head_dim {a.head_dim}) but the target has {have.layers} × {have.heads} ({have.kv_heads} kv, "
            f"head_dim {have.head_dim})", path=source, hint="make a new list for this target")
    if not layout.heads_available:
        raise LayoutError(f"heads are not available for the target: {layout.heads_reason}", path=source)


def torch_dtype(name: str) -> torch.dtype:
    """torch dtype from its name as TensorInfo stores it ("bfloat16", "torch.float32", …)."""
    dt = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise DiffractError(f"unknown dtype {name!r}")
    return dt


def target_specs(target: "Checkpoint") -> list[TensorSpec]:
    """Output plan: every target tensor under its raw (stored) name, shape and dtype, in key order."""
    specs = []
    for name in target.keys():
        info = target.info(name)
        specs.append(TensorSpec(info.raw_name, tuple(info.shape), torch_dtype(info.dtype)))
    return specs


class MappedReadBudget:
    """Closes memory-mapped safetensors checkpoints after every `budget` bytes read, so the process's resident
    file pages stay bounded by about one budget plus the tensors in hand (tensors keep their own mapping
    alive; the checkpoints reopen on demand). Pickle-backed checkpoints stay open: reopening reloads them."""

    def __init__(self, checkpoints: Sequence["Checkpoint"], budget: int = 256 << 20):
        self._ckpts = [c for c in checkpoints
                       if c is not None and all(str(f).endswith(".safetensors") for f in c.weight_files)]
        self._budget = budget
        self._read = 0

    def note(self, nbytes: int) -> None:
        self._read += nbytes
        if self._read >= self._budget:
            for c in self._ckpts:
                c.close()
            self._read = 0


class RawSource:
    """Where an unchanged tensor's stored bytes can be copied from directly (safetensors files only)."""

    def __init__(self, ckpt: "Checkpoint"):
        self._ckpt = ckpt
        self._offsets: dict[Path, dict[str, tuple[int, int]]] = {}

    def __call__(self, name: str) -> RawBytes | None:
        info = self._ckpt.info(name)
        f = Path(info.file)
        if not str(f).endswith(".safetensors"):
            return None
        if f not in self._offsets:
            self._offsets[f] = safetensors_data_offsets(f)
        span = self._offsets[f].get(info.raw_name)
        if span is None or span[1] - span[0] != info.nbytes:
            return None
        return RawBytes(f, span[0], info.nbytes)


def rewound_tensors(base: "Checkpoint", target: "Checkpoint", edits: dict[str, list["Slot"]]
                    ) -> Iterator[tuple[str, torch.Tensor | RawBytes]]:
    """Each target tensor as stored, with the edited positions copied from the base (one at a time);
    unchanged tensors of safetensors files are passed as raw byte ranges (copied file to file)."""
    maps = MappedReadBudget([base, target])
    raw_source = RawSource(target)
    for name in target.keys():
        info = target.info(name)
        slots = edits.get(name)
        raw = None if slots else raw_source(name)
        if raw is not None:
            yield info.raw_name, raw
            continue
        t = target.tensor(name, dtype=None)
        maps.note(info.nbytes)
        if slots:
            b = base.tensor(name, dtype=None)
            maps.note(info.nbytes)
            if tuple(b.shape) != tuple(t.shape):
                raise AlignmentError(f"tensor {name} has shape {tuple(b.shape)} in the base and {tuple(t.shape)} "
                                     "in the target", path=target.path, hint="rewind needs the same architecture")
            b = b.to(t.dtype)  # Checkpoint.tensor hands out an owned copy: safe to edit `t` in place
            for s in slots:
                t.index_copy_(s.axis, s.index, b.index_select(s.axis, s.index))
            del b
        yield info.raw_name, t
        del t


def apply_rewind(rl: RewindList, out_dir: str | Path, *, force: bool = False, source: str | Path | None = None,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 progress: "Progress | None" = None) -> WriteResult:
    """Write the rewound target to `out_dir` (safetensors shards + index, config/tokenizer copied), never
    touching the inputs; a stale list is refused unless `force` (which also replaces an existing output)."""
    from analysis.io.alignment import require_same_model
    from analysis.model.architecture import layout_of
    from analysis.io.checkpoint import open_checkpoint

    for role in ("base", "target"):
        p = Path(getattr(rl, role).path)
        if not p.exists():
            raise RewindListError(f"field '{role}.path': {p} does not exist", path=source,
                                  hint="move the checkpoint back or edit the path in the list")
    base = open_checkpoint(rl.base.path)
    target = open_checkpoint(rl.target.path)
    try:
        require_same_model([base, target], strict=False)  # a list naming another model: one line, nothing written
        fps = {"base": base.fingerprint, "target": target.fingerprint}
        check_fresh(rl, fps, force=force, source=source)
        layout = layout_of(target)
        _check_architecture(rl, layout, source)
        edits = rewind_edits(rl, layout)
        for name in edits:
            if name not in target:
                raise AlignmentError(f"tensor {name} is not in the target", path=target.path)
            if name not in base:
                raise AlignmentError(f"tensor {name} is not in the base", path=base.path,
                                     hint="rewind needs a base with the same attention tensors")
        inputs = [Path(rl.base.path), Path(rl.target.path)]
        if rl.reference is not None and Path(rl.reference.path).exists():
            inputs.append(Path(rl.reference.path))
        provenance = {"operation": "rewind", "created_by": tool_version(), "rewind_list": rl.to_dict()}
        return write_checkpoint_streaming(out_dir, rewound_tensors(base, target, edits), aux_files=target.aux_files,
                                          inputs=inputs, force=force, max_shard_bytes=max_shard_bytes,
                                          specs=target_specs(target), index_metadata={"diffract": provenance},
                                          progress=progress, other_inputs=[source] if source is not None else [],
                                          config_defaults=inferred_config(layout))
    finally:
        for ck in (base, target):
            close = getattr(ck, "close", None)
            if close is not None:
                close()

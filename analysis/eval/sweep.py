"""Rewind sweeps in memory (SPEC §6, §9): candidate plans per pattern (greedy, reference, random with seeds,
top, manual), fraction and seed, each evaluated on every text by patching the live target and restoring it —
no checkpoint written — with the base and the target as reference rows, and the gain kept / forgetting
recovered of each candidate."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from analysis.errors import DiffractError
from analysis.eval.evaluator import EvalText, Evaluator
from analysis.eval.loss import EvalProgress, LossResult, eta_text
from analysis.eval.patch import LivePatch, load_combination, rewind_description

if TYPE_CHECKING:  # pragma: no cover
    from analysis.edit.rewind import RewindInputs
    from analysis.edit.rewind_list import CheckpointRef, RewindList
    from analysis.io.checkpoint import Checkpoint

SWEEP_PATTERNS = ("greedy", "reference", "random", "top", "manual")
DEFAULT_FRACTIONS = tuple(round(0.05 * i, 2) for i in range(13))  # 0, 0.05, …, 0.6


@dataclass(frozen=True)
class Candidate:
    """One plan of a sweep: how it was chosen and the rewind list it gives."""

    pattern: str
    fraction: float
    seed: int | None
    plan: "RewindList"


def parse_fractions(text: str) -> list[float]:
    """`"0,0.05,0.1"` → [0.0, 0.05, 0.1], each in [0, 1]."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            f = float(part)
        except ValueError:
            raise DiffractError(f"cannot read fraction {part!r}", hint="write fractions as 0,0.05,0.1,…") from None
        if not 0.0 <= f <= 1.0:
            raise DiffractError(f"fraction {f} is outside [0, 1]", hint="write fractions between 0 and 1")
        out.append(f)
    if not out:
        raise DiffractError("no fractions given", hint="write fractions as 0,0.05,0.1,…")
    return out


def sweep_candidates(inputs: "RewindInputs", *, base: "CheckpointRef", target: "CheckpointRef",
                     reference: "CheckpointRef | None", patterns: Sequence[str], fractions: Sequence[float],
                     seeds: int = 3, score: str = "rel_frob", gqa_policy: str = "group",
                     heads: Sequence[tuple[int, int]] | None = None) -> list[Candidate]:
    """Every (pattern, fraction, seed) plan; `reference` ranks by the reference's weight score (rel_frob when
    the sweep's score is taylor); `manual` is the one plan of `heads`."""
    from analysis.edit.rewind import TAYLOR, plan_from_inputs

    out = []
    for pattern in patterns:
        if pattern not in SWEEP_PATTERNS:
            raise DiffractError(f"unknown pattern {pattern!r}", hint=f"use {', '.join(SWEEP_PATTERNS)}")
        if pattern == "reference" and inputs.reference is None:
            raise DiffractError("the reference pattern needs a reference checkpoint", hint="pass --reference REF")
        if pattern == "manual":
            if not heads:
                raise DiffractError("the manual pattern needs heads", hint="pass --heads LAYER:HEAD,…")
            rl = plan_from_inputs(inputs, base=base, target=target, pattern="manual", heads=heads,
                                  score=score, gqa_policy=gqa_policy)
            out.append(Candidate("manual", rl.pattern.fraction, None, rl))
            continue
        for f in fractions:
            for seed in (range(seeds) if pattern == "random" else [None]):
                sc = "rel_frob" if pattern == "reference" and score == TAYLOR else score
                rl = plan_from_inputs(inputs, base=base, target=target, reference=reference, pattern=pattern,
                                      fraction=f, score=sc, gqa_policy=gqa_policy, seed=seed)
                out.append(Candidate(pattern, f, seed, rl))
    return out


def _row(pattern: str, fraction: float | None, seed: int | None, heads: int | None, et: EvalText,
         r: LossResult, share: float | None) -> dict[str, Any]:
    return {"pattern": pattern, "fraction": fraction, "seed": seed, "heads": heads, "text": et.name,
            "role": et.role, "loss": r.loss, "ppl": r.ppl, "windows": r.windows, "tokens": r.tokens,
            "share_removed": share}


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def add_tradeoff(rows: list[dict[str, Any]]) -> None:
    """gain kept (domain rows) and forgetting recovered (general rows), SPEC §9; None when undefined."""
    levels = {(r["pattern"], r["text"]): r["loss"] for r in rows if r["pattern"] in ("base", "target")}
    for r in rows:
        lb, lc = levels.get(("base", r["text"])), levels.get(("target", r["text"]))
        r["gain_kept"] = r["forgetting_recovered"] = None
        if lb is None or lc is None:
            continue
        if r["role"] == "domain":
            r["gain_kept"] = _ratio(lb - r["loss"], lb - lc)
        else:
            r["forgetting_recovered"] = _ratio(lc - r["loss"], lc - lb)


def plan_key(plan: "RewindList") -> str:
    """What makes two candidates one evaluation: the heads they patch (their rewind description)."""
    return repr(rewind_description(plan))


def unique_plans(candidates: Sequence[Candidate]) -> dict[str, "RewindList"]:
    """The candidates' distinct plans by `plan_key`, in first-seen order (each is evaluated once)."""
    out: dict[str, "RewindList"] = {}
    for c in candidates:
        out.setdefault(plan_key(c.plan), c.plan)
    return out


def target_losses(evaluator: Evaluator, texts: Sequence[EvalText]) -> list[LossResult]:
    """The loss on every text of the live model as loaded (the target: the sweep's reference level)."""
    return [evaluator.loss(et) for et in texts]


def plan_losses(evaluator: Evaluator, patch: LivePatch, plan: "RewindList",
                texts: Sequence[EvalText]) -> list[LossResult]:
    """The loss on every text of the live model with `plan`'s heads rewound (restored bit for bit after);
    a plan of no heads is the target itself, bit for bit."""
    if not plan.heads:
        return target_losses(evaluator, texts)
    with patch.rewound(plan):
        return [evaluator.loss(et, rewind_description(plan)) for et in texts]


def base_losses(evaluator: Evaluator, patch: LivePatch, texts: Sequence[EvalText],
                target: "Checkpoint | None") -> list[LossResult]:
    """The loss on every text of the base, loaded into the live model; the target is loaded back after
    (`target` None: left as the base, for a model about to be dropped)."""
    from analysis.edit.interpolate import Combination

    base = patch.base
    load_combination(patch.model, Combination(((base, 1.0),), base, "checkpoint", {}))
    try:
        return [evaluator.loss(et, {"checkpoint": base.fingerprint}) for et in texts]
    finally:
        if target is not None:
            load_combination(patch.model, Combination(((target, 1.0),), target, "checkpoint", {}))


def sweep_rows(candidates: Sequence[Candidate], texts: Sequence[EvalText], target: Sequence[LossResult],
               losses: dict[str, list[LossResult]], base: Sequence[LossResult],
               inputs: "RewindInputs | None" = None) -> list[dict[str, Any]]:
    """The sweep's table from its losses (target, each plan by `plan_key`, base), with the trade-off columns:
    one assembly for every executor, so the rows do not depend on where the losses were computed."""
    from analysis.edit.rewind import preview

    rows = [_row("target", 0.0, None, 0, et, r, 0.0) for et, r in zip(texts, target)]
    for c in candidates:
        share = preview(c.plan, inputs).share_removed if inputs is not None else None
        rows += [_row(c.pattern, c.fraction, c.seed, len(c.plan.heads), et, r, share)
                 for et, r in zip(texts, losses[plan_key(c.plan)])]
    rows += [_row("base", None, None, None, et, r, None) for et, r in zip(texts, base)]
    add_tradeoff(rows)
    return rows


def run_sweep(evaluator: Evaluator, patch: LivePatch, candidates: Sequence[Candidate], texts: Sequence[EvalText], *,
              target: "Checkpoint", inputs: "RewindInputs | None" = None, progress: EvalProgress | None = None,
              cancelled: Callable[[], bool] | None = None) -> list[dict[str, Any]]:
    """Rows pattern, fraction, seed, heads, text, role, loss, ppl, … for the target, every candidate and the
    base (evaluated last, by loading the base into the live model; the target is loaded back after)."""
    level = target_losses(evaluator, texts)
    memo: dict[str, list[LossResult]] = {}
    start = time.monotonic()
    done = 0
    for i, c in enumerate(candidates):
        if cancelled is not None and cancelled():
            break
        key = plan_key(c.plan)
        if key not in memo:
            memo[key] = plan_losses(evaluator, patch, c.plan, texts)
        done = i + 1
        if progress is not None:
            progress(done, len(candidates), eta_text(start, done, len(candidates)))
    base = base_losses(evaluator, patch, texts, target)
    return sweep_rows(candidates[:done], texts, level, memo, base, inputs)

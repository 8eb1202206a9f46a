"""Loss along a path in weight space (SPEC §7, §9), in memory: θ(α) for two endpoints (1−α)θ_A + αθ_B,
base→CPT θ₀ + ατ_d, or task arithmetic θ₀ + α(τ_A + τ_B), set in the live model exactly as `interpolate`
would write it; and the barrier B = max_α[f(α) − ((1−α)f(0) + αf(1))] of the measured curve."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from analysis.errors import DiffractError
from analysis.eval.evaluator import EvalText, Evaluator
from analysis.eval.loss import EvalProgress, eta_text
from analysis.eval.patch import combination_description, load_combination

if TYPE_CHECKING:  # pragma: no cover
    from analysis.edit.interpolate import Combination
    from analysis.io.checkpoint import Checkpoint


def parse_alphas(text: str) -> list[float]:
    """`"0,0.5,1"` → [0.0, 0.5, 1.0] (finite numbers; 0 and 1 are needed for the barrier)."""
    import math

    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            a = float(part)
        except ValueError:
            raise DiffractError(f"cannot read alpha {part!r}", hint="write --alphas 0,0.1,…,1") from None
        if not math.isfinite(a):
            raise DiffractError(f"alpha {part!r} is not finite", hint="write --alphas 0,0.1,…,1")
        out.append(a)
    if not out:
        raise DiffractError("no alphas given", hint="write --alphas 0,0.1,…,1")
    return out


def path_combination(mode: str, alpha: float, a: "Checkpoint", b: "Checkpoint | None",
                     base: "Checkpoint | None") -> "Combination":
    """θ(α) of a mode: endpoints (A→B), base-cpt (θ₀→A) or task-arithmetic θ₀ + α(τ_A + τ_B)."""
    from analysis.edit.interpolate import base_to_cpt, endpoints, task_arithmetic

    if mode == "endpoints":
        return endpoints(a, b, alpha)
    if mode == "base-cpt":
        return base_to_cpt(base, a, alpha)
    if mode == "task-arithmetic":
        return task_arithmetic(base, a, b, alpha, alpha)
    raise DiffractError(f"unknown mode {mode!r}", hint="use endpoints, base-cpt or task-arithmetic")


def loss_barrier(alphas: Sequence[float], losses: Sequence[float]) -> tuple[float, float]:
    """B = max_α[f(α) − ((1−α)f(0) + αf(1))] and the α where it peaks (the §7 barrier with the loss sign)."""
    from analysis.edit.interpolate import barrier

    return barrier(alphas, losses, loss=True)


def loss_path(evaluator: Evaluator, texts: Sequence[EvalText], mode: str, alphas: Sequence[float],
              a: "Checkpoint", b: "Checkpoint | None", base: "Checkpoint | None", *,
              progress: EvalProgress | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows alpha, text, loss, ppl per point; barrier rows per text when α = 0 and 1 are on the path).
    The live model must be the mode's layout checkpoint (`path_combination(...).target`); it is loaded back
    to that checkpoint at the end."""
    from analysis.edit.interpolate import Combination

    model = evaluator.lm.model
    rows: list[dict[str, Any]] = []
    start = time.monotonic()
    target = path_combination(mode, 0.0, a, b, base).target
    try:
        for i, alpha in enumerate(alphas):
            comb = path_combination(mode, alpha, a, b, base)
            load_combination(model, comb)
            for et in texts:
                r = evaluator.loss(et, combination_description(comb))
                rows.append({"mode": mode, "alpha": alpha, "text": et.name, "role": et.role, "loss": r.loss,
                             "ppl": r.ppl, "windows": r.windows, "tokens": r.tokens})
            if progress is not None:
                progress(i + 1, len(alphas), eta_text(start, i + 1, len(alphas)))
    finally:
        load_combination(model, Combination(((target, 1.0),), target, "checkpoint", {}))
    barriers = []
    if 0.0 in alphas and 1.0 in alphas:
        for et in texts:
            pts = [(r["alpha"], r["loss"]) for r in rows if r["text"] == et.name]
            bval, at = loss_barrier([p[0] for p in pts], [p[1] for p in pts])
            barriers.append({"text": et.name, "barrier": bval, "alpha_at_max": at})
    return rows, barriers

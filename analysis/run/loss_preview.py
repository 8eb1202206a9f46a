"""The loss in the explorer's Rewind view (SPEC §9, issue 11 item 5): for the session's base, target and
reference, the target is built once with transformers (`analysis.eval.loss.load_model`) and patched in memory
(`LivePatch`); the loss against the fraction rewound is measured for each pattern (greedy, reference, random with
seeds, top) and each text (domain and general), with the base and the target as reference levels, and the
trade-off of every candidate — share of the domain gain kept against share of the general-text forgetting
recovered. The candidates, the sweep and the trade-off are `analysis.eval.sweep`'s (the rows equal those of
`diffract-tui rewind sweep` for the same settings); every evaluation goes through the `Evaluator`'s cache.
A plan (the marked heads, the current pattern) is measured the same way. No UI import: the app calls this
through `ExplorerSession` in a worker, with the engine's one protocol `progress(done, total, text)` and
`cancel()` (`Cancelled` stops it; the live model is restored first).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from analysis.errors import DiffractError
from analysis.progress import Cancel, Progress, check, never, no_progress

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from analysis.edit.rewind import RewindInputs
    from analysis.edit.rewind_list import LossEntry, RewindList
    from analysis.eval.evaluator import EvalText, Evaluator
    from analysis.eval.loss import LoadedModel
    from analysis.eval.patch import LivePatch
    from analysis.eval.texts import Text
    from analysis.io.checkpoint import Checkpoint
    from analysis.model.architecture import ModelLayout

PREVIEW_WINDOWS = 4                 # the first, fast preview
REFINED_WINDOWS = 64                # what the refine key asks for: the CLI's default N (analysis.eval.windows
#                                     DEFAULT_WINDOWS, not imported here: that module imports torch, the app must not)
PREVIEW_PATTERNS: tuple[str, ...] = ("greedy", "reference", "random", "top")
PREVIEW_FRACTIONS: tuple[float, ...] = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6)
PREVIEW_SEEDS = 3
NO_TEXT_HINT = "pass --text FILE (and --general-text FILE) at launch, or add one from the palette (ctrl+p)"

NamedText = tuple["Text", str]      # (the loaded text, its role: domain or general)


# ------------------------------------------------------------------------------------------------
# texts
# ------------------------------------------------------------------------------------------------


def named_texts(domain: Sequence[str | Path], general: Sequence[str | Path] = ()) -> list[NamedText]:
    """(Text, role) for every domain and general file, named by file (colliding names by their trailing
    paths); a missing, binary or empty file is one DiffractError naming it, before anything is evaluated."""
    import dataclasses

    from analysis.eval.texts import load_text
    from analysis.io.labels import unique_labels

    paths = [Path(p) for p in [*domain, *general]]
    roles = ["domain"] * len(domain) + ["general"] * len(general)
    names = unique_labels(paths, [p.name for p in paths])
    return [(dataclasses.replace(load_text(p), name=name), role) for p, name, role in zip(paths, names, roles)]


def add_text(texts: Sequence[NamedText], path: str | Path, role: str) -> list[NamedText]:
    """`texts` with one more file (the names recomputed so that they stay distinct); the same file in the
    same role twice, or an unknown role, is one DiffractError."""
    from analysis.eval.evaluator import ROLES

    if role not in ROLES:
        raise DiffractError(f"unknown text role {role!r}", hint=f"use {' or '.join(ROLES)}")
    p = Path(path).expanduser()
    if any(t.path.resolve() == p.resolve() and r == role for t, r in texts):
        raise DiffractError(f"this text is already a {role} text", path=p, hint="add another file")
    domain = [t.path for t, r in texts if r == "domain"] + ([p] if role == "domain" else [])
    general = [t.path for t, r in texts if r == "general"] + ([p] if role == "general" else [])
    return named_texts(domain, general)


def taylor_texts(texts: Sequence[NamedText]) -> list[NamedText]:
    """The texts the Taylor score's gradient is taken on (SPEC §9): the general ones when any, else all."""
    return [t for t in texts if t[1] == "general"] or list(texts)


# ------------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Curve:
    """Loss against fraction of one pattern on one text (random: the mean over its seeds at each fraction)."""

    pattern: str
    text: str
    role: str
    fractions: tuple[float, ...]
    losses: tuple[float, ...]


@dataclass(frozen=True)
class TradeoffPoint:
    """One candidate: the mean over domain texts of the gain kept and over general texts of the forgetting
    recovered (SPEC §9; None where undefined or without a text of that role), and the raw mean losses of each
    role (what is shown where a share is undefined)."""

    pattern: str
    fraction: float | None
    seed: int | None
    gain_kept: float | None
    forgetting_recovered: float | None
    domain_loss: float | None = None
    general_loss: float | None = None


def _mean(values: Sequence[float | None]) -> float | None:
    """The mean of the defined values, None when there are none."""
    ok = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(ok) / len(ok) if ok else None


def _point(pattern: str, fraction: float | None, seed: int | None, rows: Sequence[dict[str, Any]]) -> TradeoffPoint:
    """The trade-off point of one candidate's rows (one per text, with add_tradeoff's columns)."""
    return TradeoffPoint(pattern, fraction, seed,
                         _mean([r["gain_kept"] for r in rows if r["role"] == "domain"]),
                         _mean([r["forgetting_recovered"] for r in rows if r["role"] == "general"]),
                         _mean([r["loss"] for r in rows if r["role"] == "domain"]),
                         _mean([r["loss"] for r in rows if r["role"] == "general"]))


def _levels(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], float]:
    """(base | target, text) → loss, from the sweep's reference rows."""
    return {(r["pattern"], r["text"]): r["loss"] for r in rows if r["pattern"] in ("base", "target")}


@dataclass(frozen=True)
class LossPreview:
    """The measured sweep of one target: `run_sweep`'s rows (pattern, fraction, seed, heads, text, role, loss,
    ppl, windows, tokens, share_removed, gain_kept, forgetting_recovered), the settings and derived views."""

    target: str                     # the target's label
    target_fingerprint: str
    windows: int                    # N asked for (a short text holds fewer: see the rows' `windows`)
    tokens: int                     # T
    rows: tuple[dict[str, Any], ...]

    @property
    def texts(self) -> list[tuple[str, str]]:
        """(name, role) of every text, in order."""
        return [(r["text"], r["role"]) for r in self.rows if r["pattern"] == "target"]

    def level(self, which: str, text: str) -> float | None:
        """The base's or the target's loss on a text."""
        return _levels(self.rows).get((which, text))

    def candidate_rows(self) -> list[dict[str, Any]]:
        """The rows of the candidates (not the base / target reference rows)."""
        return [r for r in self.rows if r["pattern"] not in ("base", "target")]

    def curves(self) -> list[Curve]:
        """One curve per (pattern, text), in the order the patterns were swept; random is the seeds' mean."""
        grouped: dict[tuple[str, str], dict[float, list[float]]] = {}
        roles: dict[str, str] = {}
        for r in self.candidate_rows():
            grouped.setdefault((r["pattern"], r["text"]), {}).setdefault(float(r["fraction"]), []).append(r["loss"])
            roles[r["text"]] = r["role"]
        out = []
        for (pattern, text), by_f in grouped.items():
            fs = sorted(by_f)
            out.append(Curve(pattern, text, roles[text], tuple(fs), tuple(sum(by_f[f]) / len(by_f[f]) for f in fs)))
        return out

    def losses_at(self, pattern: str, fraction: float, seed: int | None = None) -> dict[str, float]:
        """text → loss of one candidate (empty when it was not swept)."""
        return {r["text"]: r["loss"] for r in self.candidate_rows()
                if r["pattern"] == pattern and r["fraction"] == fraction and r["seed"] == seed}

    def tradeoff(self) -> list[TradeoffPoint]:
        """One point per candidate (pattern, fraction, seed), in sweep order."""
        groups: dict[tuple[str, float, int | None], list[dict[str, Any]]] = {}
        for r in self.candidate_rows():
            groups.setdefault((r["pattern"], r["fraction"], r["seed"]), []).append(r)
        return [_point(p, f, s, rows) for (p, f, s), rows in groups.items()]


@dataclass(frozen=True)
class PlanLoss:
    """The measured loss of one plan on every text, with the base and target levels and its trade-off point."""

    description: dict[str, Any]     # `rewind_description` of the plan (what was patched)
    target_fingerprint: str
    rows: tuple[dict[str, Any], ...]  # per text: text, role, text_sha256, loss, base, target, windows, tokens
    point: TradeoffPoint

    def matches(self, rl: "RewindList") -> bool:
        """True when this was measured for exactly `rl`'s heads on its target."""
        from analysis.eval.patch import rewind_description

        return rl.target.fingerprint == self.target_fingerprint and rewind_description(rl) == self.description

    def attach(self, rl: "RewindList") -> "RewindList":
        """`rl` carrying these losses when they were measured for it, else `rl` unchanged."""
        import dataclasses

        return dataclasses.replace(rl, losses=self.entries()) if self.matches(rl) else rl

    def entries(self) -> tuple["LossEntry", ...]:
        """The rewind list's `losses` field (SPEC §6 addition): one entry per text."""
        from analysis.edit.rewind_list import LossEntry

        return tuple(LossEntry(text=r["text"], role=r["role"], text_sha256=r["text_sha256"], loss=r["loss"],
                               base=r["base"], target=r["target"], windows=r["windows"], tokens=r["tokens"])
                     for r in self.rows)


# ------------------------------------------------------------------------------------------------
# the engine
# ------------------------------------------------------------------------------------------------


def _stepper(progress: Progress, cancelled: Cancel) -> Progress:
    """`progress` that first raises Cancelled when `cancelled()` says stop."""
    def step(done: int, total: int | None, text: str) -> None:
        check(cancelled)
        progress(done, total, text)

    return step


class LossPreviewer:
    """One target model loaded at a time (memory: one model, one copy of the patched slices), its texts
    tokenised once per (T, N), evaluations cached; calls are serialised (a cancelled worker still finishing
    never shares the live model with the next one)."""

    def __init__(self, cache: Any, device: "torch.device", dtype: "torch.dtype | None" = None):
        self.cache = cache
        self.device = device
        self.dtype = dtype
        self._lock = threading.Lock()
        self._state: tuple[tuple[str, str, str], "LoadedModel", "Evaluator", "LivePatch"] | None = None
        self._prepared: dict[tuple[str, str, str, int, int], "EvalText"] = {}

    def _load(self, base: "Checkpoint", target: "Checkpoint",
              layout: "ModelLayout") -> tuple["LoadedModel", "Evaluator", "LivePatch"]:
        """The target built once (the previous target's model is dropped first)."""
        from analysis.eval.evaluator import Evaluator
        from analysis.eval.loss import default_dtype, load_model
        from analysis.eval.patch import LivePatch

        key = (str(target.path), target.fingerprint, base.fingerprint)
        if self._state is None or self._state[0] != key:
            self._state = None
            self._prepared.clear()
            lm = load_model(target.path, device=self.device, dtype=self.dtype or default_dtype(self.device))
            self._state = (key, lm, Evaluator(lm, target.fingerprint, self.cache), LivePatch(lm.model, base, layout))
        return self._state[1], self._state[2], self._state[3]

    def _prepare(self, lm: "LoadedModel", texts: Sequence[NamedText], tokens: int | None,
                 windows: int) -> list["EvalText"]:
        """The texts tokenised with the target's tokenizer and cut into N windows of T tokens (memoised)."""
        from analysis.eval.evaluator import prepare_text
        from analysis.eval.windows import DEFAULT_TOKENS

        if not texts:
            raise DiffractError("no text to evaluate the loss on", hint=NO_TEXT_HINT)
        t = tokens or min(DEFAULT_TOKENS, lm.context or DEFAULT_TOKENS)
        out = []
        for text, role in texts:
            key = (text.sha256, text.name, role, t, windows)
            if key not in self._prepared:
                self._prepared[key] = prepare_text(lm, text, t, windows, role)
            out.append(self._prepared[key])
        return out

    def preview(self, base: "Checkpoint", target: "Checkpoint", reference: "Checkpoint | None",
                layout: "ModelLayout", inputs: "RewindInputs", texts: Sequence[NamedText], *,
                windows: int = PREVIEW_WINDOWS, tokens: int | None = None,
                patterns: Sequence[str] = PREVIEW_PATTERNS, fractions: Sequence[float] = PREVIEW_FRACTIONS,
                seeds: int = PREVIEW_SEEDS, gqa_policy: str = "group", progress: Progress = no_progress,
                cancelled: Cancel = never) -> LossPreview:
        """Loss vs fraction for every pattern and text, with the base and target levels (the reference
        pattern only when `reference` and its energies in `inputs` are given)."""
        from analysis.edit.rewind import checkpoint_ref
        from analysis.eval.sweep import run_sweep, sweep_candidates

        has_ref = reference is not None and inputs.reference is not None
        chosen = [p for p in patterns if p != "reference" or has_ref]
        with self._lock:
            check(cancelled)
            progress(0, None, f"loading {target.label}")
            lm, ev, patch = self._load(base, target, layout)
            ets = self._prepare(lm, texts, tokens, windows)
            cands = sweep_candidates(inputs, base=checkpoint_ref(base), target=checkpoint_ref(target),
                                     reference=checkpoint_ref(reference) if has_ref else None,  # type: ignore[arg-type]
                                     patterns=chosen, fractions=fractions, seeds=seeds, gqa_policy=gqa_policy)
            rows = self._run(ev, patch, cands, ets, target, inputs, progress, cancelled)
        return LossPreview(target=target.label, target_fingerprint=target.fingerprint, windows=windows,
                           tokens=ets[0].windows.tokens, rows=tuple(rows))

    def plan(self, base: "Checkpoint", target: "Checkpoint", layout: "ModelLayout", rl: "RewindList",
             texts: Sequence[NamedText], *, windows: int = PREVIEW_WINDOWS, tokens: int | None = None,
             progress: Progress = no_progress, cancelled: Cancel = never) -> PlanLoss:
        """The loss of one plan on every text, with the base and target levels."""
        from analysis.eval.patch import rewind_description
        from analysis.eval.sweep import Candidate

        if rl.target.fingerprint != target.fingerprint or rl.base.fingerprint != base.fingerprint:
            raise DiffractError("the plan was made for other checkpoints than the ones open",
                                hint="re-plan in the Rewind view")
        with self._lock:
            check(cancelled)
            progress(0, None, f"loading {target.label}")
            lm, ev, patch = self._load(base, target, layout)
            ets = self._prepare(lm, texts, tokens, windows)
            cand = Candidate("plan", rl.pattern.fraction, None, rl)
            rows = self._run(ev, patch, [cand], ets, target, None, progress, cancelled)
        levels = _levels(rows)
        sha = {et.name: et.text.sha256 for et in ets}
        mine = [r for r in rows if r["pattern"] == "plan"]
        out = tuple({"text": r["text"], "role": r["role"], "text_sha256": sha[r["text"]], "loss": r["loss"],
                     "base": levels[("base", r["text"])], "target": levels[("target", r["text"])],
                     "windows": r["windows"], "tokens": r["tokens"]} for r in mine)
        return PlanLoss(description=rewind_description(rl), target_fingerprint=target.fingerprint, rows=out,
                        point=_point("plan", rl.pattern.fraction, None, mine))

    def taylor(self, base: "Checkpoint", target: "Checkpoint", layout: "ModelLayout", texts: Sequence[NamedText],
               *, windows: int = PREVIEW_WINDOWS, tokens: int | None = None, progress: Progress = no_progress,
               cancelled: Cancel = never) -> "torch.Tensor":
        """The (L × H) Taylor grid (SPEC §9) of the loaded target, on `taylor_texts(texts)` (one model in memory:
        the preview's; one forward/backward pass, window by window: `cancelled` stops it within one window)."""
        from analysis.eval.taylor import taylor_scores

        with self._lock:
            check(cancelled)
            progress(0, None, f"loading {target.label}")
            lm, _, _ = self._load(base, target, layout)
            ets = self._prepare(lm, taylor_texts(texts), tokens, windows)
            check(cancelled)
            progress(0, None, "taylor score: one forward/backward pass")
            grid = taylor_scores(lm, base, layout, ets, progress=_stepper(progress, cancelled), cancel=cancelled)
        check(cancelled)
        return grid

    @staticmethod
    def _run(ev: "Evaluator", patch: "LivePatch", cands: Sequence[Any], ets: Sequence["EvalText"],
             target: "Checkpoint", inputs: "RewindInputs | None", progress: Progress,
             cancelled: Cancel) -> list[dict[str, Any]]:
        """`run_sweep` with cancellation between evaluation batches (the live model restored on the way out)."""
        from analysis.eval.sweep import run_sweep

        ev.progress = lambda done, total, text: check(cancelled)
        try:
            return run_sweep(ev, patch, cands, ets, target=target, inputs=inputs,
                             progress=_stepper(progress, cancelled))
        finally:
            ev.progress = None

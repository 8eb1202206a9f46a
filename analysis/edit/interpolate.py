"""Interpolation and domain connectivity (SPEC §7): write θ(α) between two checkpoints, base→CPT, or task
arithmetic, tensor by tensor through the streaming writer; weight-space diagnostics of the task vectors
τ = θ_d − θ₀ (‖τ‖, cos(τ_A, τ_B) globally, per matrix, per head); the barrier B from user scores.

Every mode is written as the equivalent linear combination Σ cᵢ θᵢ computed in float32 (or float64) and
cast back to the output's dtype. Terms whose coefficient is exactly 0 are left out, so α = 0 / 1 (or
λ = 0) reproduce an endpoint bit for bit when the dtypes agree (no 0·∞ = NaN, no −0 → +0).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from analysis.errors import AlignmentError, DiffractError
from analysis.progress import Progress
from analysis.io.atomic import write_text_atomic
from analysis.io.guard import refuse_input_overlap
from analysis.edit.rewind import MappedReadBudget, RawSource, target_specs, torch_dtype
from analysis.run.provenance import tool_version
from analysis.io.writer import (DEFAULT_MAX_SHARD_BYTES, RawBytes, WriteResult, inferred_config,
                                write_checkpoint_streaming)
from analysis.io.safe_read import REGULAR_HINT, NotRegularFileError, read_regular_bytes

if TYPE_CHECKING:  # pragma: no cover
    from analysis.model.architecture import ModelLayout
    from analysis.io.checkpoint import Checkpoint

MODES = ("endpoints", "base-cpt", "task-arithmetic")
_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
MAX_COEFFICIENT = 1000.0  # |cᵢ| of a combination; beyond this it is no interpolation, and float32 overflows


@dataclass(frozen=True)
class Combination:
    """θ = Σ coefficient·checkpoint; `target` gives the output's raw names, dtypes and aux files."""

    terms: tuple[tuple["Checkpoint", float], ...]
    target: "Checkpoint"
    mode: str
    parameters: dict[str, float]


def endpoints(a: "Checkpoint", b: "Checkpoint", alpha: float) -> Combination:
    """θ(α) = (1−α)θ_A + αθ_B; the output is laid out like B."""
    return Combination(((a, 1.0 - alpha), (b, alpha)), b, "endpoints", {"alpha": alpha})


def base_to_cpt(base: "Checkpoint", cpt: "Checkpoint", alpha: float) -> Combination:
    """θ₀ + α(θ_d − θ₀) = (1−α)θ₀ + αθ_d; the output is laid out like the CPT."""
    return Combination(((base, 1.0 - alpha), (cpt, alpha)), cpt, "base-cpt", {"alpha": alpha})


def task_arithmetic(base: "Checkpoint", a: "Checkpoint", b: "Checkpoint", lambda_a: float,
                    lambda_b: float) -> Combination:
    """θ₀ + λ_Aτ_A + λ_Bτ_B = (1−λ_A−λ_B)θ₀ + λ_Aθ_A + λ_Bθ_B; the output is laid out like A."""
    return Combination(((base, 1.0 - lambda_a - lambda_b), (a, lambda_a), (b, lambda_b)), a, "task-arithmetic",
                       {"lambda_a": lambda_a, "lambda_b": lambda_b})


def combine(tensors: Sequence[torch.Tensor | Callable[[], torch.Tensor]], coefficients: Sequence[float],
            out_dtype: torch.dtype, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Σ cᵢ tᵢ in `compute_dtype`, cast to `out_dtype`. Terms may be loaders (read one at a time, so only
    the sum and one input are in memory); zero-coefficient terms are skipped (exact endpoints)."""
    acc: torch.Tensor | None = None
    for t, c in zip(tensors, coefficients):
        if c == 0.0:
            continue
        owned = callable(t)  # a loader's tensor is ours (Checkpoint.tensor copies); a passed tensor is not
        x = t() if owned else t
        if acc is None:
            acc = x.to(compute_dtype, copy=not owned)  # the sum is updated in place: never alias an input
            if c != 1.0:
                acc.mul_(c)
        else:
            acc.add_(x.to(compute_dtype), alpha=c)
        del x
    if acc is None:
        first = tensors[0]
        acc = torch.zeros((first() if callable(first) else first).shape, dtype=compute_dtype)
    return acc.to(out_dtype)


class Workspace:
    """Two reusable byte buffers — the float sum and one input's stored bytes — grown to the largest tensor,
    so a pass allocates (and page-faults) its working memory once instead of once per tensor, and reads
    safetensors data straight into them with pread (no memory map, no extra copy)."""

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}
        self._fds: dict[Path, int] = {}

    def view(self, slot: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A tensor of `shape`/`dtype` over buffer `slot` (valid until the slot is used again)."""
        numel = 1
        for d in shape:
            numel *= int(d)
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        buf = self._bufs.get(slot)
        if buf is None or buf.numel() < nbytes:
            self._bufs.pop(slot, None)
            buf = torch.empty(max(nbytes, 8), dtype=torch.uint8)
            self._bufs[slot] = buf
        return buf[:nbytes].view(dtype).view(shape)

    def read(self, raw: RawBytes, into: torch.Tensor) -> None:
        """Fill `into` (contiguous, raw.nbytes long) with the file bytes of `raw`."""
        fd = self._fds.get(raw.path)
        if fd is None:
            fd = self._fds[raw.path] = os.open(raw.path, os.O_RDONLY)
        if raw.nbytes == 0:
            return
        mv = memoryview(into.reshape(-1).view(torch.uint8).numpy())
        done = 0
        while done < raw.nbytes:
            n = os.preadv(fd, [mv[done:]], raw.offset + done)
            if n <= 0:
                raise DiffractError("unexpected end of file while reading tensor bytes", path=raw.path,
                                    hint="the file changed or is truncated")
            done += n

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._bufs.clear()


def combine_streamed(name: str, terms: Sequence[tuple["Checkpoint", float, "RawSource"]], shape: tuple[int, ...],
                     out_dtype: torch.dtype, compute_dtype: torch.dtype, ws: Workspace,
                     on_read: Callable[[int], None] | None = None) -> torch.Tensor:
    """Σ cᵢ θᵢ[name] like `combine`, reading each input into the workspace (safetensors) or through the
    checkpoint (other formats). The result is a view into `ws`, valid until the next call."""
    acc: torch.Tensor | None = None
    for ck, c, source in terms:
        if c == 0.0:
            continue
        info = ck.info(name)
        if tuple(info.shape) != tuple(shape):
            raise AlignmentError(f"tensor {name} has shape {tuple(info.shape)} in {ck.path} and {tuple(shape)} in "
                                 "the output's checkpoint", hint="interpolate checkpoints of the same architecture")
        in_dtype = torch_dtype(info.dtype)
        raw = source(name)
        if raw is not None and acc is None and in_dtype == compute_dtype:
            acc = ws.view("acc", shape, compute_dtype)
            ws.read(raw, acc)
            if c != 1.0:
                acc.mul_(c)
            continue
        if raw is not None:
            x = ws.view("in", shape, in_dtype)
            ws.read(raw, x)
        else:
            x = ck.tensor(name, dtype=None)
            if on_read is not None:
                on_read(info.nbytes)
        if acc is None:
            acc = ws.view("acc", shape, compute_dtype)
            acc.copy_(x)
            if c != 1.0:
                acc.mul_(c)
        else:
            acc.add_(x, alpha=c)
        del x
    if acc is None:
        acc = ws.view("acc", shape, compute_dtype).zero_()
    if out_dtype == compute_dtype:
        return acc
    out = ws.view("in", shape, out_dtype)
    out.copy_(acc)
    return out


# --------------------------------------------------------------------------------------------------
# diagnostics: ‖τ‖ and cos(τ_A, τ_B)
# --------------------------------------------------------------------------------------------------


class TaskVectorStats:
    """Accumulates ⟨τ_A, τ_B⟩, ‖τ_A‖², ‖τ_B‖² globally, per matrix and per head (float64 sums).

    Per head, the stack is [q rows of h; k, v rows of g(h); o columns of h] with the k/v energy split
    equally among the group's query heads (as head scores and A2 do, SPEC §4)."""

    def __init__(self, layout: "ModelLayout | None", with_b: bool):
        self.with_b = with_b
        self.layout = layout
        self.matrices: dict[str, list[float]] = {}
        self.total = [0.0, 0.0, 0.0]  # aa, bb, ab
        self._slots: dict[str, list[tuple[int, str, int, Any]]] = {}
        self._heads: dict[tuple[int, int], list[float]] = {}
        if layout is not None and layout.heads_available:
            from analysis.model.heads import head_slots

            for layer in range(layout.num_layers):
                for proj in ("q", "k", "v", "o"):
                    n = layout.num_kv_heads if proj in ("k", "v") else layout.num_heads
                    for h in range(n):
                        for s in head_slots(layout, layer, proj, h):
                            self._slots.setdefault(s.tensor, []).append((layer, proj, h, s))

    def add(self, name: str, tau_a: torch.Tensor, tau_b: torch.Tensor | None) -> None:
        a = tau_a.to(torch.float64)
        b = tau_b.to(torch.float64) if tau_b is not None else None
        aa = float((a * a).sum())
        bb = float((b * b).sum()) if b is not None else 0.0
        ab = float((a * b).sum()) if b is not None else 0.0
        self.matrices[name] = [aa, bb, ab]
        for i, v in enumerate((aa, bb, ab)):
            self.total[i] += v
        lay = self.layout
        for layer, proj, h, s in self._slots.get(name, ()):
            sa = a.index_select(s.axis, s.index)
            sb = b.index_select(s.axis, s.index) if b is not None else None
            vals = [float((sa * sa).sum()), float((sb * sb).sum()) if sb is not None else 0.0,
                    float((sa * sb).sum()) if sb is not None else 0.0]
            if proj in ("k", "v"):
                G = lay.num_heads // lay.num_kv_heads
                targets = [(layer, qh, 1.0 / G) for qh in lay.query_heads_of(h)]
            else:
                targets = [(layer, h, 1.0)]
            for key_l, key_h, w in targets:
                acc = self._heads.setdefault((key_l, key_h), [0.0, 0.0, 0.0])
                for i, v in enumerate(vals):
                    acc[i] += w * v

    @staticmethod
    def _row(aa: float, bb: float, ab: float, with_b: bool) -> dict[str, float]:
        row = {"tau_a_norm": math.sqrt(aa)}
        if with_b:
            row["tau_b_norm"] = math.sqrt(bb)
            den = math.sqrt(aa * bb)
            row["cos"] = ab / den if den > 0 else math.nan
        return row

    def result(self) -> dict[str, Any]:
        """{"global": {...}, "matrices": [{tensor, ...}], "heads": [{layer, head, ...}]} (JSON-ready)."""
        return {
            "global": self._row(*self.total, self.with_b),
            "matrices": [{"tensor": n, **self._row(*v, self.with_b)} for n, v in self.matrices.items()],
            "heads": [{"layer": l, "head": h, **self._row(*v, self.with_b)} for (l, h), v in sorted(self._heads.items())],
        }


# --------------------------------------------------------------------------------------------------
# the pass
# --------------------------------------------------------------------------------------------------


@dataclass
class InterpolationReport:
    """What a pass did: the written checkpoint (if any), tensors copied unchanged from the target (missing
    elsewhere or not floating point), and the task-vector diagnostics (if a base was given)."""

    written: WriteResult | None
    copied_from_target: list[str] = field(default_factory=list)
    diagnostics: dict[str, Any] | None = None


def _stream(comb: Combination, *, compute_dtype: torch.dtype, stats: TaskVectorStats | None,
            stats_sides: tuple["Checkpoint", "Checkpoint", "Checkpoint | None"] | None,
            copied: list[str], write: bool = True) -> Iterator[tuple[str, torch.Tensor | None]]:
    """Each output tensor in the target's order, computed from one tensor per input at a time
    (None instead of the tensor when only diagnostics are wanted)."""
    target = comb.target
    maps = MappedReadBudget([ck for ck, _ in comb.terms] + [ck for ck in (stats_sides or ()) if ck is not None])
    raw_source = RawSource(target)
    terms = [(ck, c, RawSource(ck)) for ck, c in comb.terms]
    ws = Workspace()
    try:
        yield from _stream_items(comb, terms, ws, maps, raw_source, compute_dtype=compute_dtype, stats=stats,
                                 stats_sides=stats_sides, copied=copied, write=write)
    finally:
        ws.close()


def _stream_items(comb: Combination, terms: list, ws: Workspace, maps: MappedReadBudget, raw_source: RawSource, *,
                  compute_dtype: torch.dtype, stats: TaskVectorStats | None,
                  stats_sides: tuple["Checkpoint", "Checkpoint", "Checkpoint | None"] | None,
                  copied: list[str], write: bool) -> Iterator[tuple[str, Any]]:
    """The body of `_stream`: per target tensor, diagnostics (optional) then the combined tensor."""
    target = comb.target
    for name in target.keys():
        info = target.info(name)
        out_dtype = torch_dtype(info.dtype)
        present = all(name in ck for ck, _ in comb.terms)
        if not present or out_dtype not in _FLOATS:
            copied.append(name)
            yield info.raw_name, (raw_source(name) or target.tensor(name, dtype=None)) if write else None
            continue
        if stats is not None and stats_sides is not None and all(
                name in ck for ck in stats_sides if ck is not None):
            base, a, b = stats_sides
            t0 = base.tensor(name, dtype=compute_dtype)
            tau_a = a.tensor(name, dtype=compute_dtype).sub_(t0)
            tau_b = b.tensor(name, dtype=compute_dtype).sub_(t0) if b is not None else None
            del t0
            maps.note(3 * info.nbytes)
            stats.add(name, tau_a, tau_b)
            del tau_a, tau_b
        if not write:
            yield info.raw_name, None
            continue
        out = combine_streamed(name, terms, tuple(info.shape), out_dtype, compute_dtype, ws, maps.note)
        if not bool(torch.isfinite(out).all()) and all(
                bool(torch.isfinite(ck.tensor(name, dtype=None)).all()) for ck, c in comb.terms if c != 0.0):
            raise DiffractError(f"tensor {info.raw_name} would be written with inf/NaN: the combination of finite "
                                f"inputs overflows {str(out_dtype).removeprefix('torch.')}",
                                hint="use coefficients closer to [0, 1]; nothing was written")
        yield info.raw_name, out  # a view into the workspace: the writer has written it before we resume
        del out


def run_interpolation(comb: Combination, out_dir: str | Path | None, *, force: bool = False,
                      compute_dtype: torch.dtype = torch.float32,
                      diagnostics_of: tuple["Checkpoint", "Checkpoint", "Checkpoint | None"] | None = None,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                      progress: "Progress | None" = None) -> InterpolationReport:
    """Write the combination to `out_dir` (if given) and/or gather diagnostics of (base, A, B) in the same
    pass. Inputs are never written to; the output is atomic (see `writer`)."""
    from analysis.io.alignment import require_same_model
    from analysis.model.architecture import layout_of

    sides = [ck for ck, _ in comb.terms] + [ck for ck in (diagnostics_of or ()) if ck is not None]
    require_same_model(list({id(ck): ck for ck in sides}.values()))  # different models: one line, nothing written
    for _, c in comb.terms:
        if not math.isfinite(c):
            raise DiffractError(f"coefficient {c} is not finite", hint="pass finite --alpha / --lambda values")
        if abs(c) > MAX_COEFFICIENT:
            raise DiffractError(f"coefficient {c:g} is outside ±{MAX_COEFFICIENT:g}",
                                hint="pass --alpha / --lambda values within a few units of [0, 1]")
    if compute_dtype not in (torch.float32, torch.float64):
        raise DiffractError(f"compute dtype must be float32 or float64, not {compute_dtype}")
    stats = None
    if diagnostics_of is not None:
        try:
            layout = layout_of(comb.target)
        except DiffractError:
            layout = None
        stats = TaskVectorStats(layout, with_b=diagnostics_of[2] is not None)
    copied: list[str] = []
    stream = _stream(comb, compute_dtype=compute_dtype, stats=stats, stats_sides=diagnostics_of, copied=copied,
                     write=out_dir is not None)
    written = None
    if out_dir is None and stats is None:
        raise DiffractError("nothing to do: no output folder and no diagnostics asked for",
                            hint="pass --out DIR and/or --diagnostics-json FILE with --base")
    if out_dir is not None:
        inputs = []
        for ck, _ in comb.terms:
            inputs.append(Path(ck.path))
        for ck in diagnostics_of or ():
            if ck is not None:
                inputs.append(Path(ck.path))
        provenance = {"operation": "interpolate", "mode": comb.mode, "created_by": tool_version(),
                      "compute_dtype": str(compute_dtype).removeprefix("torch."), **comb.parameters,
                      "inputs": [{"path": str(Path(ck.path).resolve()), "fingerprint": ck.fingerprint,
                                  "coefficient": c} for ck, c in comb.terms]}
        try:
            defaults = inferred_config(layout_of(comb.target))
        except DiffractError:
            defaults = {}
        written = write_checkpoint_streaming(out_dir, stream, aux_files=comb.target.aux_files, inputs=inputs,
                                             force=force, max_shard_bytes=max_shard_bytes,
                                             specs=target_specs(comb.target), index_metadata={"diffract": provenance},
                                             progress=progress, config_defaults=defaults)
    else:
        total = len(comb.target.keys())
        for i, _ in enumerate(stream, 1):
            if progress is not None:
                progress(i, total, "diagnostics")
    diag = None
    if stats is not None:
        base, a, b = diagnostics_of  # type: ignore[misc]
        diag = {"created_by": tool_version(), "compute_dtype": str(compute_dtype).removeprefix("torch."),
                "base": {"path": str(Path(base.path).resolve()), "fingerprint": base.fingerprint},
                "a": {"path": str(Path(a.path).resolve()), "fingerprint": a.fingerprint},
                "b": None if b is None else {"path": str(Path(b.path).resolve()), "fingerprint": b.fingerprint},
                **stats.result()}
    return InterpolationReport(written=written, copied_from_target=copied, diagnostics=diag)


def _json_ready(x: Any) -> Any:
    """`x` with every non-finite float as None (JSON has no NaN)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_ready(v) for v in x]
    return x


def write_report(path: str | Path, data: Any, *, inputs: Sequence[str | Path],
                 option: str = "--diagnostics-json") -> Path:
    """Write a JSON report (diagnostics, barriers) atomically; refused (one line) when it is, holds or lies in
    an input (`guard.refuse_input_overlap`), an OSError is one line naming the file. NaN becomes null."""
    refuse_input_overlap(path, inputs, option=option)
    text = json.dumps(_json_ready(data), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    return write_text_atomic(path, text, "the report")


def interpolate(a: "Checkpoint", b: "Checkpoint", alpha: float, out_dir: str | Path, **kwargs: Any
                ) -> InterpolationReport:
    """θ(α) = (1−α)θ_A + αθ_B written to `out_dir` (SPEC §7)."""
    return run_interpolation(endpoints(a, b, alpha), out_dir, **kwargs)


# --------------------------------------------------------------------------------------------------
# barrier from user scores
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Barrier:
    """B for one metric: max over α of the gap between the straight line and f(α) (sign flipped for a
    loss), the α where it peaks, and whether the metric was read as a loss."""

    metric: str
    barrier: float
    alpha_at_max: float
    is_loss: bool
    points: int


def is_loss_metric(name: str) -> bool:
    """A metric whose name contains "loss", "ppl" or "perplexity" (any case) is lower-is-better."""
    n = name.lower()
    return "loss" in n or "ppl" in n or "perplexity" in n


def barrier(alphas: Sequence[float], values: Sequence[float], *, loss: bool) -> tuple[float, float]:
    """B = max_α[(1−α)f(0) + αf(1) − f(α)] for a score, max_α[f(α) − ((1−α)f(0) + αf(1))] for a loss;
    returns (B, α at the maximum). Needs α = 0 and α = 1 among the points; B ≥ 0 (the endpoints give 0)."""
    pts = dict(zip(alphas, values))
    if 0.0 not in pts or 1.0 not in pts:
        raise DiffractError("the scores need rows at alpha 0 and alpha 1", hint="add the endpoints' scores")
    f0, f1 = pts[0.0], pts[1.0]
    best, at = -math.inf, 0.0
    for a in sorted(pts):
        gap = (1 - a) * f0 + a * f1 - pts[a]
        if loss:
            gap = -gap
        if gap > best:
            best, at = gap, a
    return best, at


def read_scores_csv(path: str | Path) -> dict[str, list[tuple[float, float]]]:
    """metric → [(alpha, score)] from a CSV with header `alpha,metric,score`."""
    p = Path(path)
    try:
        text = read_regular_bytes(p).decode("utf-8")
    except NotRegularFileError as err:
        raise DiffractError(f"is {err.kind}, not a regular file", path=p, hint=REGULAR_HINT) from None
    except (OSError, UnicodeDecodeError) as err:
        raise DiffractError(f"cannot read the scores ({type(err).__name__})", path=p, hint="check the path") from None
    rows = list(csv.reader(text.splitlines()))
    if not rows or [c.strip().lower() for c in rows[0]] != ["alpha", "metric", "score"]:
        raise DiffractError("the first line must be the header alpha,metric,score", path=p,
                            hint="one row per (alpha, metric) with a numeric score")
    out: dict[str, list[tuple[float, float]]] = {}
    seen: set[tuple[str, float]] = set()
    for i, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != 3:
            raise DiffractError(f"line {i}: expected 3 columns, got {len(row)}", path=p, hint="alpha,metric,score")
        try:
            alpha, score = float(row[0]), float(row[2])
        except ValueError:
            raise DiffractError(f"line {i}: alpha and score must be numbers, got {row[0]!r}, {row[2]!r}", path=p,
                                hint="fix that row") from None
        metric = row[1].strip()
        if not metric or not (0.0 <= alpha <= 1.0) or not math.isfinite(score):
            raise DiffractError(f"line {i}: need a metric name, alpha in [0, 1] and a finite score", path=p,
                                hint="fix that row")
        if (metric, alpha) in seen:
            raise DiffractError(f"line {i}: metric {metric!r} has two scores at alpha {alpha}", path=p,
                                hint="keep one row per (alpha, metric)")
        seen.add((metric, alpha))
        out.setdefault(metric, []).append((alpha, score))
    if not out:
        raise DiffractError("no score rows", path=p, hint="add rows alpha,metric,score")
    return out


def barriers_from_csv(path: str | Path, *, loss: bool | None = None) -> list[Barrier]:
    """B per metric of a scores CSV; `loss=True/False` forces the direction for every metric, None reads it
    from the name (see `is_loss_metric`)."""
    result = []
    for metric, pts in read_scores_csv(path).items():
        is_loss = is_loss_metric(metric) if loss is None else loss
        try:
            b, at = barrier([a for a, _ in pts], [s for _, s in pts], loss=is_loss)
        except DiffractError as err:
            raise DiffractError(f"metric {metric!r}: {err.message}", path=path, hint=err.hint) from None
        result.append(Barrier(metric=metric, barrier=b, alpha_at_max=at, is_loss=is_loss, points=len(pts)))
    return result

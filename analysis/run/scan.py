"""Scan: SPEC §3 metrics of every matrix of N aligned checkpoints — and, on request, of every
q/k/v/o head slice and of every ΔW = θ_i − θ_0 — as rows, through the persistent cache.

Work goes layer by layer; within a layer each stored tensor of each checkpoint is read once (the
base's stays in memory for the deltas) and nothing is read when every item of the layer hits the
cache. All heads of one projection go through ONE batched spectral call. `node_metrics` is the
single-node variant the app's workers call; it shares the scan's cache entries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from analysis.errors import MatrixFailure
from analysis.run.cache import Cache, decode_json_value, encode_json_value, flush_cache
from analysis.spectral.metric_sets import ALL, MetricSet, metric_set

if TYPE_CHECKING:  # pragma: no cover - typing only: a fully cached scan reads no tensor and imports no torch
    import torch

    from analysis.model.architecture import Module, ModelLayout
    from analysis.spectral.backend import SpectralSettings
    from analysis.io.checkpoint import Checkpoint

from analysis.progress import Cancel as CancelFn, Progress as ProgressFn

HEAD_PROJECTIONS: tuple[str, ...] = ("q", "k", "v", "o")
ID_COLUMNS: tuple[str, ...] = (
    "checkpoint", "operation", "tensor", "layer", "module", "kind", "head", "kv_head", "rows", "cols",
)
SCAN_OPERATION_VERSION = 2  # bump when what a scan stores under its keys changes (2: `unchanged` delta rows)
WEIGHT = "weight"
DELTA = "delta"


# ------------------------------------------------------------------------------------------------
# In-memory reads: each stored tensor of a layer read once, served to heads.py's readers
# ------------------------------------------------------------------------------------------------


class _TensorMemo:
    """Duck-types the reader side of a Checkpoint (`tensor`, `rows`, `array`) from tensors read once, in one
    dtype (a torch dtype's name: Checkpoint.tensor and Checkpoint.array take it). A tensor read one way is
    served the other way from the same memory (`Checkpoint.array` has `Checkpoint.tensor`'s bits), so a CPU
    scan with --heads or --delta still reads each stored tensor once."""

    def __init__(self, ckpt: "Checkpoint", dtype: str):
        self.ckpt = ckpt
        self.dtype = dtype
        self._tensors: dict[str, torch.Tensor] = {}
        self._arrays: dict[str, np.ndarray] = {}
        self.reads = 0

    def __contains__(self, name: str) -> bool:
        return name in self.ckpt

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        t = self._tensors.get(name)
        if t is None:
            a = self._arrays.get(name)
            if a is not None:
                import torch

                t = torch.from_numpy(a)
            else:
                t = self.ckpt.tensor(name, self.dtype)
                self.reads += 1
            self._tensors[name] = t
        return t if dtype is None or dtype == t.dtype else t.to(dtype)

    def rows(self, name: str, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.tensor(name, dtype)[start:stop]

    def array(self, name: str, dtype: str | None = None) -> np.ndarray:
        """The stored tensor as a numpy array in the memo's dtype (`Checkpoint.array`: no torch), read once."""
        if dtype is not None and dtype != self.dtype:
            raise ValueError(f"this reader reads {self.dtype}, not {dtype}")
        a = self._arrays.get(name)
        if a is None:
            t = self._tensors.get(name)
            if t is not None:
                a = t.numpy()
            else:
                a = self.ckpt.array(name, self.dtype)
                self.reads += 1
            self._arrays[name] = a
        return a

    def release(self) -> None:
        self._tensors.clear()
        self._arrays.clear()


def _matrix(reader: Any, module: "Module", dtype: "torch.dtype") -> "torch.Tensor":
    """A module's matrix: where compute starts (torch imported, a lazy thread policy applied)."""
    from analysis.model.heads import module_matrix
    from analysis.spectral.backend import compute_torch

    compute_torch()
    return module_matrix(reader, module, dtype)


def _matrix_array(reader: Any, module: "Module", dtype: str) -> np.ndarray:
    """A module's matrix as a numpy array (`heads.module_array`): a CPU scan's weight items need no torch."""
    from analysis.model.heads import module_array

    return module_array(reader, module, dtype)


def _heads(reader: Any, layout: "ModelLayout", layer: int, proj: str, dtype: "torch.dtype") -> "torch.Tensor":
    """One projection's head slices: where compute starts (as `_matrix`)."""
    from analysis.model.heads import projection_heads
    from analysis.spectral.backend import compute_torch

    compute_torch()
    return projection_heads(reader, layout, layer, proj, dtype)


# ------------------------------------------------------------------------------------------------
# Items: what a scan computes, and their cache keys
# ------------------------------------------------------------------------------------------------


def is_matrix(module: "Module") -> bool:
    """Modules with a spectrum: 2-D with both sides > 0 (norms and biases are not)."""
    return len(module.shape) == 2 and min(module.shape) > 0


def module_slice(module: "Module") -> dict[str, Any] | None:
    """Cache-key slice of a module: None for a whole stored tensor, else its part of a fused one."""
    if module.segments:
        return {"part": module.name, "segments": [list(s) for s in module.segments], "axis": module.axis}
    return None


def head_slice_key(proj: str, head: int) -> dict[str, Any]:
    """Cache-key slice of one head (query head for q/o, kv head for k/v)."""
    return {"proj": proj, "head": int(head)}


@dataclass(frozen=True)
class _Item:
    """One unit of scan work: a matrix, or all heads of one projection, of one checkpoint (or its delta)."""

    operation: str                 # WEIGHT | DELTA
    ckpt: int                      # index into the checkpoints
    layer: int | None              # None for globals
    module: "Module | None" = None   # a matrix item
    proj: str | None = None        # a head-batch item
    label: str = ""


FailureFn = Callable[[MatrixFailure], None]


@dataclass
class _Context:
    checkpoints: Sequence["Checkpoint"]
    layouts: Sequence["ModelLayout"]
    settings: "SpectralSettings"
    cache: Cache | None
    device_kind: str
    settings_key: dict = field(default_factory=dict)
    metrics: MetricSet = ALL       # SPEC §8 set: what rows report; NOT in the keys (entries hold whole groups)

    @property
    def dtype(self) -> "torch.dtype":
        """The compute dtype as torch's (imports torch: only computing asks)."""
        return self.settings.torch_dtype

    def key(self, fingerprint: Any, tensor: str, slc: Any, operation: str) -> str:
        return Cache.key(fingerprint=fingerprint, tensor=tensor, slice=slc,
                         operation=f"scan/{operation}/v{SCAN_OPERATION_VERSION}",
                         settings=self.settings_key, dtype=self.settings.dtype, device_kind=self.device_kind)

    def fingerprint(self, item_ckpt: int, operation: str) -> Any:
        fp = self.checkpoints[item_ckpt].fingerprint
        return [self.checkpoints[0].fingerprint, fp] if operation == DELTA else fp


def _plan_layer(ctx: _Context, layer: int | None, heads: bool, delta: bool) -> list[_Item]:
    """Items of one layer (or of the globals when `layer` is None), checkpoint by checkpoint."""
    items: list[_Item] = []
    base_layout = ctx.layouts[0]
    for i, (ckpt, layout) in enumerate(zip(ctx.checkpoints, ctx.layouts)):
        if layer is None:
            modules = layout.globals
        elif layer < layout.num_layers:
            modules = layout.layers[layer].modules
        else:
            continue
        ops = [WEIGHT] + ([DELTA] if delta and i > 0 else [])
        for op in ops:
            for m in modules:
                if not is_matrix(m):
                    continue
                if op == DELTA and (m.tensor not in ctx.checkpoints[0]
                                    or tuple(ctx.checkpoints[0].info(m.tensor).shape)
                                    != tuple(ckpt.info(m.tensor).shape)):
                    continue  # present in only some checkpoints: listed by alignment, not fatal
                where = "globals" if layer is None else f"layer {layer}"
                items.append(_Item(op, i, layer, module=m, label=f"{ckpt.label} {op} {where} {m.name}"))
            if heads and layer is not None and layout.heads_available:
                if op == DELTA and not _same_heads(base_layout, layout, layer):
                    continue
                for proj in HEAD_PROJECTIONS:
                    items.append(_Item(op, i, layer, proj=proj, label=f"{ckpt.label} {op} layer {layer} {proj} heads"))
    return items


def partial_tensors(report: Any) -> dict[str, str]:
    """Tensor → `;`-joined labels of the checkpoints that have it, for tensors some checkpoints lack (SPEC §1):
    the `present_in` column of a multi-checkpoint scan (empty for tensors every checkpoint has)."""
    everyone = len(report.labels)
    return {key: ";".join(owners) for key, owners in report.present_in.items() if len(owners) < everyone}


def _same_heads(a: "ModelLayout", b: "ModelLayout", layer: int) -> bool:
    return (a.heads_available and b.heads_available and layer < a.num_layers and layer < b.num_layers
            and a.head_dim == b.head_dim and a.attention[layer] == b.attention[layer])


# ------------------------------------------------------------------------------------------------
# Computing one item
# ------------------------------------------------------------------------------------------------


def _clean(metrics: dict) -> dict:
    """Metrics exactly as a cache hit returns them (plain floats, NaN/inf kept), so hits equal misses."""
    return decode_json_value(encode_json_value(dict(metrics)))


def _weight_metrics(W: "torch.Tensor | np.ndarray", settings: "SpectralSettings",
                    metrics_set: MetricSet = ALL) -> tuple[dict, np.ndarray]:
    from analysis.spectral.spectra import as_numpy, eigenvalues, spectral_metrics

    evals = eigenvalues(W, settings)
    metrics = spectral_metrics(W, settings, evals=evals, metrics=metrics_set)
    return _clean(metrics), as_numpy(evals)


def _weight_batch_metrics(Ws: torch.Tensor, settings: "SpectralSettings",
                          metrics_set: MetricSet = ALL) -> tuple[list[dict], np.ndarray]:
    """All heads of one projection: ONE batched eigen call and ONE batched metrics call."""
    from analysis.spectral.spectra import as_numpy, batched_spectral_metrics, eigenvalues

    evals = eigenvalues(Ws, settings)
    rows = batched_spectral_metrics(Ws, settings, evals=evals, metrics=metrics_set)
    return [_clean(r) for r in rows], as_numpy(evals)


def _delta_metrics(W0: torch.Tensor, Wd: torch.Tensor, settings: "SpectralSettings",
                   dtype: torch.dtype, metrics_set: MetricSet = ALL) -> list[dict]:
    """SPEC §4 delta metrics (norms, ρ, energy ranks) and SPEC §3 metrics of ΔW, for a pair or a stack."""
    from analysis.deltas.delta import batched_delta_metrics

    rows = batched_delta_metrics(W0, Wd, settings=settings, dtype=dtype, agreement=False, spectral=True,
                                 metrics=metrics_set)
    return [_clean(r) for r in rows]


def _id_row(ctx: _Context, item: _Item, *, tensor: str, module: str, kind: str, head: int | None,
            kv_head: int | None, shape: tuple[int, int]) -> dict[str, Any]:
    return {
        "checkpoint": ctx.checkpoints[item.ckpt].label,
        "operation": item.operation,
        "tensor": tensor,
        "layer": item.layer,
        "module": module,
        "kind": kind,
        "head": head,
        "kv_head": kv_head,
        "rows": int(shape[0]),
        "cols": int(shape[1]),
    }


def _with_metrics(row: dict, metrics: dict, metrics_set: MetricSet = ALL) -> dict:
    """The identity row plus `metrics` cut to the set's columns (a cache entry may hold more groups)."""
    out = dict(row)
    for k, v in metrics_set.project(metrics).items():
        if k not in out:
            out[k] = v
    return out


def _usable(metrics: dict | None, metrics_set: MetricSet) -> dict | None:
    """A cache entry when it holds every column the set reports (an `unchanged` delta row has none to hold)."""
    if metrics is None or metrics.get("unchanged") or metrics_set.covered_by(metrics):
        return metrics
    return None


def _merged(cached: dict | None, computed: dict) -> dict:
    """A cache entry widened by newly computed groups: the same numbers at the same route, whatever the set."""
    return computed if cached is None else {**cached, **computed}


def _module_shape(m: "Module") -> tuple[int, int]:
    """Logical (out × in) shape of a module's matrix."""
    r, c = m.shape[0], m.shape[1]
    return (c, r) if m.transpose else (r, c)


def _head_rows(ctx: _Context, item: _Item, layout: "ModelLayout", n: int) -> list[dict]:
    """Identity columns of the n heads of item.proj: q/o query heads (with their kv group), k/v kv heads."""
    p = layout.projection(item.layer, item.proj)
    dh, D = layout.head_dim, layout.hidden_size
    shape = (D, dh) if item.proj == "o" else (dh, D)
    tensor = p.tensor
    rows = []
    for j in range(n):
        if item.proj in ("q", "o"):
            head, kv = j, layout.kv_group(j)
        else:
            head, kv = None, j
        rows.append(_id_row(ctx, item, tensor=tensor, module=item.proj, kind="attention", head=head,
                            kv_head=kv, shape=shape))
    return rows


def _require_finite(ctx: _Context, item: _Item, W0: "torch.Tensor | None",
                    Wd: "torch.Tensor | np.ndarray") -> None:
    """NonFiniteError naming the side (for a delta) when W_d or W₀ has NaN/inf entries."""
    from analysis.spectral.spectra import NON_FINITE_HINT, NonFiniteError, non_finite_entries

    for index, W in ((item.ckpt, Wd), (0, W0)):
        bad = non_finite_entries(W) if W is not None else 0
        if bad:
            where = "" if item.operation == WEIGHT else f" in {ctx.checkpoints[index].label}"
            raise NonFiniteError(f"{bad} NaN/inf entries{where}, so it has no spectrum", hint=NON_FINITE_HINT)


def _failure(ctx: _Context, item: _Item, tensor: str, what: str, err: BaseException) -> MatrixFailure:
    """The MatrixFailure of this item (its checkpoint's label and path) for `err`."""
    from analysis.spectral.spectra import failure_reason

    ckpt = ctx.checkpoints[item.ckpt]
    return MatrixFailure(checkpoint=ckpt.label, path=str(ckpt.path), operation=item.operation, tensor=tensor,
                         what=what, reason=failure_reason(err))


def _where(item: _Item) -> str:
    return "globals" if item.layer is None else f"layer {item.layer}"


def _run_item(ctx: _Context, item: _Item, readers: dict[int, _TensorMemo], fail: FailureFn) -> list[dict]:
    """Rows of one item, from the cache when every entry hits, else computed (reading via `readers`).

    A matrix (or head slice) with NaN/inf entries, or whose eigensolve fails, has no row: it goes to
    `fail` and the other matrices of the item are still computed."""
    layout = ctx.layouts[item.ckpt]
    fp = ctx.fingerprint(item.ckpt, item.operation)
    cache = ctx.cache

    if item.module is not None:  # one matrix
        m = item.module
        key = ctx.key(fp, m.tensor, module_slice(m), item.operation)
        row = _id_row(ctx, item, tensor=m.tensor, module=m.name, kind=m.kind, head=None, kv_head=None,
                      shape=_module_shape(m))
        entry = cache.get_json(key) if cache is not None else None
        metrics = _usable(entry, ctx.metrics)
        if metrics is None:
            from analysis.spectral.spectra import NUMERIC_ERRORS

            if item.operation == WEIGHT and ctx.device_kind == "cpu":   # numpy all the way (issue 13)
                Wd, W0 = _matrix_array(readers[item.ckpt], m, ctx.settings.dtype), None
            else:
                Wd = _matrix(readers[item.ckpt], m, ctx.dtype)
                W0 = _matrix(readers[0], m, ctx.dtype) if item.operation == DELTA else None
            try:
                _require_finite(ctx, item, W0, Wd)
                if W0 is None:
                    metrics, evals = _weight_metrics(Wd, ctx.settings, ctx.metrics)
                else:
                    metrics, evals = _delta_metrics(W0, Wd, ctx.settings, ctx.dtype, ctx.metrics)[0], None
            except NUMERIC_ERRORS as err:
                fail(_failure(ctx, item, m.tensor, f"{_where(item)} {m.name}", err))
                return []
            metrics = _merged(entry, metrics)
            if cache is not None:
                if evals is not None:
                    cache.put_array(key, evals)
                cache.put_json(key, metrics)
        return [_with_metrics(row, metrics, ctx.metrics)]

    # all heads of one projection
    p = layout.projection(item.layer, item.proj)
    n = p.heads
    keys = [ctx.key(fp, p.tensor, head_slice_key(item.proj, j), item.operation) for j in range(n)]
    entries = [cache.get_json(k) for k in keys] if cache is not None else [None] * n
    cached = [_usable(e, ctx.metrics) for e in entries]
    if any(c is None for c in cached):
        cached = _compute_heads(ctx, item, readers, layout, p.tensor, keys, fail, entries)
    return [_with_metrics(r, mt, ctx.metrics) for r, mt in zip(_head_rows(ctx, item, layout, n), cached)
            if mt is not None]


def _compute_heads(ctx: _Context, item: _Item, readers: dict[int, _TensorMemo], layout: "ModelLayout",
                   tensor: str, keys: list[str], fail: FailureFn,
                   entries: list[dict | None]) -> list[dict | None]:
    """Metrics of every head of item.proj in ONE batched call over the finite heads (None for a failed
    head, which goes to `fail`); computed entries are cached, widening the `entries` already there."""
    from analysis.spectral.spectra import NUMERIC_ERRORS, finite_matrices

    Wd = _heads(readers[item.ckpt], layout, item.layer, item.proj, ctx.dtype)
    W0 = _heads(readers[0], layout, item.layer, item.proj, ctx.dtype) if item.operation == DELTA else None
    ok = finite_matrices(Wd) if W0 is None else finite_matrices(Wd) & finite_matrices(W0)
    out: list[dict | None] = [None] * len(keys)
    for j in (~ok).nonzero().flatten().tolist():
        try:
            _require_finite(ctx, item, None if W0 is None else W0[j], Wd[j])
        except NUMERIC_ERRORS as err:
            fail(_failure(ctx, item, tensor, f"{_where(item)} {item.proj} head {j}", err))
    good = ok.nonzero().flatten()
    if good.numel() == 0:
        return out
    if not bool(ok.all()):
        Wd, W0 = Wd[good], None if W0 is None else W0[good]
    try:
        if W0 is None:
            computed, evals = _weight_batch_metrics(Wd, ctx.settings, ctx.metrics)
        else:
            computed, evals = _delta_metrics(W0, Wd, ctx.settings, ctx.dtype, ctx.metrics), None
    except NUMERIC_ERRORS as err:
        fail(_failure(ctx, item, tensor, f"{_where(item)} {item.proj} heads", err))
        return out
    for i, j in enumerate(good.tolist()):
        out[j] = _merged(entries[j], computed[i])
        if ctx.cache is not None:
            if evals is not None:
                ctx.cache.put_array(keys[j], evals[i])
            ctx.cache.put_json(keys[j], out[j])
    return out


# ------------------------------------------------------------------------------------------------
# The scan
# ------------------------------------------------------------------------------------------------


def _context(checkpoints: Sequence["Checkpoint"], settings: "SpectralSettings", cache: Cache | None,
             layouts: Sequence["ModelLayout"] | None = None, metrics: "MetricSet | str | None" = None) -> _Context:
    from analysis.model.architecture import layout_of
    if layouts is None:
        layouts = [layout_of(c) for c in checkpoints]
    return _Context(checkpoints=list(checkpoints), layouts=list(layouts), settings=settings, cache=cache,
                    device_kind=settings.device_kind, settings_key=settings.key(), metrics=metric_set(metrics))


def plan_size(checkpoints: Sequence["Checkpoint"], *, heads: bool = False, delta: bool = False,
              layouts: Sequence["ModelLayout"] | None = None) -> int:
    """How many items (matrices + head batches) a scan of these checkpoints has: the progress total."""
    from analysis.model.architecture import layout_of

    layouts = list(layouts) if layouts is not None else [layout_of(c) for c in checkpoints]
    ctx = _Context(list(checkpoints), layouts, None, None, "cpu")  # type: ignore[arg-type]
    return sum(len(_plan_layer(ctx, g, heads, delta)) for g in layer_groups(layouts))


def scan(checkpoints: Sequence["Checkpoint"], *, heads: bool = False, delta: bool = False,
         settings: "SpectralSettings", cache: Cache | None, progress: ProgressFn | None = None,
         cancel: CancelFn | None = None, on_failure: FailureFn | None = None,
         metrics: "MetricSet | str | None" = None, executor: Any = None) -> Iterator[dict]:
    """Yield one row per matrix (and head slice, and delta) of the checkpoints; the first is the base.

    Rows carry ID_COLUMNS plus every SPEC §3 metric (delta rows also SPEC §4's norms and ρ, and `unchanged`:
    True for a tensor the CPT left bit-identical, whose ratio, rank and spectral columns are then empty); with
    several checkpoints of which some lack a tensor, every row has `present_in`: the labels of the checkpoints
    holding a tensor some of them lack (empty for tensors every checkpoint has).
    `progress(done, total, label)` is called after each item; `cancel()` returning True stops the
    scan between items. `cache=None` computes everything and stores nothing. A matrix that cannot be
    computed (NaN/inf entries) is passed to `on_failure` as a MatrixFailure and the scan goes on; without
    `on_failure` it raises a NonFiniteError naming the checkpoint and tensor.
    `metrics` is the SPEC §8 set (default `all`; `fit`; or a comma list): rows carry its §3 columns only and
    only its groups are computed; cache entries are shared by every set (a hit holding the set's columns is
    used as it is, a narrower one is widened by the missing groups).
    `executor` (analysis.run.executors; None = in this process) may run the work as Ray tasks per (layer
    group, checkpoint): the rows and their order are the same.
    """
    fail = on_failure if on_failure is not None else _raise_failure
    checkpoints = list(checkpoints)
    if not checkpoints:
        return
    partial: dict[str, str] | None = None     # tensor → the labels that have it, for tensors not in all
    if len(checkpoints) > 1:
        from analysis.io.alignment import align, require_same_model

        # a shared key with different shapes is an error naming both; deltas need one model (one line if not)
        report = (require_same_model if delta else align)(checkpoints)
        partial = partial_tensors(report) or None  # the column only where some checkpoint lacks a tensor
    ctx = _context(checkpoints, settings, cache, metrics=metrics)
    groups = layer_groups(ctx.layouts)
    plans = [_plan_layer(ctx, g, heads, delta) for g in groups]
    total = sum(len(p) for p in plans)
    if progress is not None:
        progress(0, total, "starting")
    if executor is not None and not getattr(executor, "local", True):   # tasks per (layer group, checkpoint)
        from analysis.run.executors import scan_remote

        rows: Iterator[dict] = scan_remote(executor, ctx, groups, plans, heads=heads, delta=delta,
                                           progress=progress, cancel=cancel, fail=fail)
    else:
        rows = _scan_local(ctx, plans, total, progress=progress, cancel=cancel, fail=fail)
    try:
        for row in rows:
            if partial is not None:
                row["present_in"] = partial.get(row["tensor"])
            yield row
    finally:  # staged cache entries land in a pack at the end of the scan (also when it is cancelled)
        flush_cache(cache)


def layer_groups(layouts: Sequence["ModelLayout"]) -> list[int | None]:
    """The scan's work groups in order: every layer index, then the globals (None)."""
    return list(range(max(l.num_layers for l in layouts))) + [None]


def _scan_local(ctx: _Context, plans: list[list[_Item]], total: int, *, progress: ProgressFn | None,
                cancel: CancelFn | None, fail: FailureFn) -> Iterator[dict]:
    """The in-process scan: the plans' items in order, progress after each, `cancel` polled between them."""
    done = 0
    for plan in plans:
        for item, rows in run_plan(ctx, plan, fail, cancel):
            yield from rows
            done += 1
            if progress is not None:
                progress(done, total, item.label)


def run_plan(ctx: _Context, plan: Sequence[_Item], fail: FailureFn,
             cancel: CancelFn | None = None) -> Iterator[tuple[_Item, list[dict]]]:
    """(item, rows) of each item of one layer group's plan, reading each stored tensor once (the base's kept
    for the deltas); stops between items when `cancel()` turns True. Shared by the local scan and Ray tasks."""
    readers = {i: _TensorMemo(c, ctx.settings.dtype) for i, c in enumerate(ctx.checkpoints)}
    try:
        previous = 0
        for item in plan:
            if cancel is not None and cancel():
                return
            if item.ckpt != previous and previous != 0:
                readers[previous].release()  # done with that checkpoint's layer; the base's stays
            previous = item.ckpt
            yield item, _run_item(ctx, item, readers, fail)
    finally:
        for r in readers.values():
            r.release()


def _raise_failure(failure: MatrixFailure) -> NoReturn:
    """The default `on_failure`: stop with the failure as a one-line error."""
    from analysis.spectral.spectra import NON_FINITE_HINT, NonFiniteError

    raise NonFiniteError(failure.describe(), hint=NON_FINITE_HINT)


# ------------------------------------------------------------------------------------------------
# One node (the app's workers)
# ------------------------------------------------------------------------------------------------


def node_metrics(ckpt: "Checkpoint", layout: "ModelLayout", layer: int | None, module: "str | Module",
                 head: int | None = None, *, delta_against: "Checkpoint | None" = None,
                 settings: "SpectralSettings", cache: Cache | None) -> dict[str, Any]:
    """Row of one node — a matrix (`head=None`) or one head slice — with its eigenvalues for charts.

    `module` is a layout module name (or Module); `head` is a query head for q/o, a kv head for k/v.
    With `delta_against=θ₀` the node is ΔW = W(ckpt) − W(θ₀). The result is the scan's row plus
    `"eigenvalues"`: the ESD (ascending np.ndarray; for a delta, of ΔW in float64 per SPEC §4; empty for a
    delta row marked `unchanged`). Shares cache entries with `scan`, so a scanned node costs two small file reads.
    """
    from analysis.model.heads import head_slice

    operation = DELTA if delta_against is not None else WEIGHT
    checkpoints = [delta_against, ckpt] if delta_against is not None else [ckpt]
    layouts = [layout] * len(checkpoints)
    ctx = _context(checkpoints, settings, cache, layouts=layouts)
    idx = len(checkpoints) - 1
    fp = ctx.fingerprint(idx, operation)

    if head is None:
        m = module if not isinstance(module, str) else _find_module(layout, layer, module)
        item = _Item(operation, idx, layer, module=m)
        tensor, slc = m.tensor, module_slice(m)
        row = _id_row(ctx, item, tensor=m.tensor, module=m.name, kind=m.kind, head=None, kv_head=None,
                      shape=_module_shape(m))
        read = lambda c: _matrix(c, m, ctx.dtype)  # noqa: E731
    else:
        proj = module if isinstance(module, str) else module.name
        p = layout.projection(layer, proj)
        item = _Item(operation, idx, layer, proj=proj)
        tensor, slc = p.tensor, head_slice_key(proj, head)
        row = _head_rows(ctx, item, layout, p.heads)[head]
        read = lambda c: head_slice(c, layout, layer, proj, head, ctx.dtype)  # noqa: E731

    key = ctx.key(fp, tensor, slc, operation)
    entry = cache.get_json(key) if cache is not None else None
    metrics = _usable(entry, ctx.metrics)    # a narrower entry (a `fit` scan's) is widened below
    evals = cache.get_array(key) if cache is not None else None
    if evals is None and metrics is not None and metrics.get("unchanged"):
        evals = np.empty(0)  # ΔW = 0 (a tensor the CPT left bit-identical): no spectrum, nothing to read
    if metrics is None or evals is None:
        from analysis.spectral.spectra import NUMERIC_ERRORS

        Wd = read(ckpt)
        W0 = read(delta_against) if operation == DELTA else None
        try:
            _require_finite(ctx, item, W0, Wd)
            metrics, evals = _node_compute(ctx, key, metrics, W0, Wd, entry)
        except NUMERIC_ERRORS as err:
            what = f"{_where(item)} {row['module']}" + ("" if head is None else f" head {head}")
            _raise_failure(_failure(ctx, item, tensor, what, err))
    out = _with_metrics(row, metrics, ctx.metrics)
    out["eigenvalues"] = evals
    return out


def _node_compute(ctx: _Context, key: str, metrics: dict | None, W0: torch.Tensor | None,
                  Wd: torch.Tensor, entry: dict | None = None) -> tuple[dict, np.ndarray]:
    """`node_metrics`' (metrics, eigenvalues) of W_d (or of ΔW when W₀ is given), computing what is missing
    and caching it (`metrics` when already cached; `entry` = a narrower cache entry to widen)."""
    cache = ctx.cache
    if W0 is None:
        if metrics is None:
            metrics, evals = _weight_metrics(Wd, ctx.settings, ctx.metrics)
            metrics = _merged(entry, metrics)
            if cache is not None:
                cache.put_json(key, metrics)
        else:
            from analysis.spectral.spectra import as_numpy, eigenvalues

            evals = as_numpy(eigenvalues(Wd, ctx.settings))
    else:
        from analysis.deltas.delta import esd, upcast_pair

        if metrics is None:
            metrics = _merged(entry, _delta_metrics(W0, Wd, ctx.settings, ctx.dtype, ctx.metrics)[0])
            if cache is not None:
                cache.put_json(key, metrics)
        evals = (np.empty(0) if metrics.get("unchanged")    # ΔW = 0: no spectrum
                 else esd(upcast_pair(W0, Wd, ctx.dtype)[2]).detach().cpu().numpy())
    if cache is not None:
        cache.put_array(key, evals)
    return metrics, evals


def _find_module(layout: "ModelLayout", layer: int | None, name: str) -> "Module":
    modules = layout.globals if layer is None else layout.layers[layer].modules
    for m in modules:
        if m.name == name:
            return m
    where = "the globals" if layer is None else f"layer {layer}"
    raise KeyError(f"{where} has no module {name!r}")


def metric_columns(rows: Sequence[dict]) -> list[str]:
    """Metric column names of rows (everything but the identity columns), first-seen order."""
    seen: dict[str, None] = {}
    for r in rows:
        for k in r:
            if k not in ID_COLUMNS:
                seen.setdefault(k, None)
    return list(seen)


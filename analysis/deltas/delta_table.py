"""The rows behind `diffract-tui delta`: every shared matrix (and every head slice) of N CPT checkpoints
against their base, with the SPEC §4 metrics, cross-domain agreement and a concentration summary.

Row keys: checkpoint, tensor, layer, module, head, kv_head, rows, cols, then unchanged (True when the target left
the matrix or slice bit-identical to the base: delta_frob = delta_rel = 0 and every other column empty), delta_frob,
delta_rel,
delta_cos, delta_rho, delta_rank_{90,95,99}, avg_max_{l,r}_agreement (+ a1_k, a1_noise_floor_{l,r}),
truncatable_fraction (SPEC §5, relative error ≤ 0.1), the SPEC §3 metrics of ΔW itself, and with ≥ 2 CPT checkpoints a2_agreement / a3_agreement (mean over the
other domains; per matrix or per head slice) plus, on head rows, head_score, head_a2_agreement,
head_a3_agreement and head_class (the whole head, all projections).

This module plans, keys and reads the cache without torch (a fully cached `delta` never imports it, issue 13);
every cache miss is computed by `analysis.deltas.delta_compute`, imported on the first one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from analysis.run.provenance import checkpoint_entry, provenance
from analysis.deltas.names import DEFAULT_A3_K, KV_PROJECTIONS, PROJECTIONS
from analysis.errors import DiffractError, MatrixFailure
from analysis.progress import Progress
from analysis.spectral.backend import SpectralSettings
from analysis.spectral.metric_sets import MetricSet, metric_set

if TYPE_CHECKING:  # pragma: no cover - typing only (this module plans and reads the cache without torch)
    from analysis.deltas.agreement import DomainAgreement
    from analysis.deltas.delta import HeadScores
    from analysis.deltas.delta_compute import DeltaCompute
    from analysis.model.architecture import ModelLayout, Module
    from analysis.run.cache import Cache
    from analysis.io.checkpoint import Checkpoint

ID_COLUMNS = ("checkpoint", "tensor", "layer", "module", "head", "kv_head", "rows", "cols")
RELEASE_MAPS_BYTES = 64 << 20   # after a matrix this big (compute dtype), the checkpoints' maps are released
DELTA_TABLE_VERSION = 3  # bump when what the table caches per matrix changes (2: `unchanged` rows;
                         # 3: a core and a spectral entry, shared by every metric set)
AGREEMENT_VERSION = 1    # per-matrix A2/A3 and head-score entries
HEAD_GRIDS_VERSION = 1   # the head section's grids and summary (`delta_compute.head_grids`)


@dataclass(frozen=True)
class DeltaOptions:
    """Every setting of a delta table; all of them go into the export's provenance (SPEC §8). Device, compute
    dtype, xmin rule and seed are the spectral engine's (`settings`, one object, device resolved once)."""

    heads: bool = True
    top_k: int | None = None            # A1: compare the k largest components (None: all M)
    a3_k: int = DEFAULT_A3_K            # A3: top-k left singular vectors
    spectral: bool = True               # SPEC §3 metrics of ΔW (power-law fits etc.)
    exclude_kv: bool = False            # head scores / agreement without k and v
    agreement_metric: str = "a2"        # what the classification thresholds: "a2" or "a3"
    agreement_threshold: float | None = None
    magnitude_threshold: float | None = None
    settings: SpectralSettings = field(default_factory=SpectralSettings)
    metrics: str = "all"                # SPEC §8 set of the spectral columns of ΔW (all, fit or a comma list)


@dataclass
class DeltaTable:
    """Rows plus what the summary and the exports need."""

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    metadata: dict[str, Any]
    head_scores: "dict[str, HeadScores]" = field(default_factory=dict)   # when computed (empty on a cached rerun)
    agreement: "DomainAgreement | None" = None                           # likewise
    layout: "ModelLayout | None" = None
    failures: list[MatrixFailure] = field(default_factory=list)   # matrices left out (NaN/inf): a partial table
    head_grids: dict[str, Any] | None = None   # what head rows and the summary use (`delta_compute.head_grids`)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _settings_key(options: DeltaOptions) -> dict[str, Any]:
    """The table's settings for cache keys and provenance (the shape exports have always had)."""
    key = {k: v for k, v in asdict(options).items() if k != "settings"}
    key.update(dtype=options.settings.dtype, xmin_rule=options.settings.xmin_rule, seed=options.settings.seed)
    if options.spectral:
        key["spectral"] = options.settings.key()
    return key


def _cache_key(key_parts: dict[str, Any]) -> str:
    """`analysis.run.cache.cache_key` of key parts."""
    from analysis.run.cache import cache_key

    return cache_key(**key_parts)


def _cached(cache: "Cache | None", key_parts: dict[str, Any] | None, compute: Callable[[], Any]) -> Any:
    """`compute()` through the cache when one is given (JSON entries; a corrupt one is a miss)."""
    from analysis.run.cache import cached_json

    return cached_json(cache, key_parts, compute)


def _row_keys(base: "Checkpoint", target: "Checkpoint", tensor: str, slc: dict[str, Any], kind: str,
              options: DeltaOptions, device_kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Cache-key parts of the (core, spectral) entries of one matrix or head batch of one target.

    The core entry (norms, ρ, ranks, A1, truncation) does not depend on the spectral settings and neither
    entry on the metric set: the spectral entry holds whole groups and is shared (and widened) by every set."""
    common = dict(fingerprint=[base.fingerprint, target.fingerprint], tensor=tensor, slice=slc,
                  dtype=options.settings.dtype, device_kind=device_kind)
    return (dict(common, operation=f"delta/{kind}/core/v{DELTA_TABLE_VERSION}", settings={"top_k": options.top_k}),
            dict(common, operation=f"delta/{kind}/spectral/v{DELTA_TABLE_VERSION}",
                 settings=options.settings.key()))


def _has_spectrum(core: dict[str, Any]) -> bool:
    """True when a row gets spectral columns of ΔW: changed, with a positive ‖ΔW‖ (as batched_delta_metrics)."""
    frob = core.get("delta_frob")
    return not core.get("unchanged") and isinstance(frob, (int, float)) and frob > 0


@dataclass
class _Hit:
    """What the cache holds for one matrix or head batch of one target."""

    core: list[dict[str, Any]] | None = None
    spectral: list[dict[str, Any]] | None = None
    complete: bool = False        # every column the table reports is there: no tensor needs reading


def _rows_entry(value: Any) -> list[dict[str, Any]] | None:
    """A cached list of row dicts, or None when the entry has another shape (a miss)."""
    if isinstance(value, list) and all(isinstance(r, dict) for r in value):
        return value
    return None


def _lookup(cache: "Cache | None", keys: tuple[dict[str, Any], dict[str, Any]], options: DeltaOptions,
            wanted: MetricSet) -> _Hit:
    """The cached entries of one matrix or head batch; `complete` when they hold the set's columns."""
    if cache is None:
        return _Hit()
    from analysis.run.cache import cache_key

    core = _rows_entry(cache.get_json(cache_key(**keys[0])))
    if core is None:
        return _Hit()
    if not options.spectral:
        return _Hit(core, None, True)
    spectral = _rows_entry(cache.get_json(cache_key(**keys[1])))
    if spectral is None or len(spectral) != len(core):
        return _Hit(core, None, False)
    ok = all(wanted.covered_by(s) for c, s in zip(core, spectral) if _has_spectrum(c))
    return _Hit(core, spectral, ok)


def _assemble(core: list[dict[str, Any]], spectral: list[dict[str, Any]] | None,
              wanted: MetricSet | None) -> list[dict[str, Any]]:
    """Rows as the table reports them: the core columns, then the set's SPEC §3 columns of ΔW."""
    out = []
    for i, c in enumerate(core):
        row = dict(c)
        if wanted is not None and spectral is not None:
            for k, v in wanted.project(spectral[i]).items():
                row.setdefault(k, v)
        out.append(row)
    return out


def _fill(cache: "Cache | None", keys: tuple[dict[str, Any], dict[str, Any]], hit: _Hit, options: DeltaOptions,
          wanted: MetricSet, full: Callable[[], list[dict[str, Any]]],
          spectral_only: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Rows of one matrix or head batch whose cache entries are missing or narrower than the set: `full()`
    when there is no core entry, else only `spectral_only()` (no SVD for A1); the entries are written, the
    spectral one widened by the groups now computed."""
    from analysis.run.cache import cache_key
    from analysis.spectral.metric_sets import METRIC_COLUMNS

    spectral_cols = frozenset(METRIC_COLUMNS)
    if hit.core is None:
        rows = full()
        core = [{k: v for k, v in r.items() if k not in spectral_cols} for r in rows]
        if cache is not None:
            cache.put_json(cache_key(**keys[0]), core)
    else:
        core, rows = hit.core, spectral_only()
    if not options.spectral:
        return _assemble(core, None, None)
    fresh = [{k: v for k, v in r.items() if k in spectral_cols} for r in rows]
    spectral = [{**old, **new} for old, new in zip(hit.spectral or [{}] * len(fresh), fresh)]
    if cache is not None:
        cache.put_json(cache_key(**keys[1]), spectral)
    return _assemble(core, spectral, wanted)


def _agreement_hit(cache: "Cache | None", key_parts: dict[str, Any] | None, n: int) -> list[list[Any]] | None:
    """A cached per-matrix [A2, A3] partner mean per target, or None when absent or malformed (a miss)."""
    if cache is None or key_parts is None:
        return None
    from analysis.run.cache import cache_key

    value = cache.get_json(cache_key(**key_parts))
    if isinstance(value, list) and len(value) == n and all(isinstance(v, list) and len(v) == 2 for v in value):
        return value
    return None


def _head_grids_key(base: "Checkpoint", targets: Sequence["Checkpoint"], options: DeltaOptions,
                    device_kind: str) -> dict[str, Any]:
    """Cache-key parts of the head section's grids: every setting head scores, agreement and classes depend on."""
    return dict(fingerprint=[base.fingerprint, *(t.fingerprint for t in targets)], tensor="attention",
                slice={"heads": "grids"}, operation=f"delta/heads/v{HEAD_GRIDS_VERSION}",
                settings={"exclude_kv": options.exclude_kv, "a3_k": options.a3_k,
                          "agreement_metric": options.agreement_metric,
                          "agreement_threshold": options.agreement_threshold,
                          "magnitude_threshold": options.magnitude_threshold},
                dtype=options.settings.dtype, device_kind=device_kind)


def _grids_entry(value: Any, n: int) -> dict[str, Any] | None:
    """A cached head-grids value, or None when it has another shape (a miss)."""
    if (isinstance(value, dict) and isinstance(value.get("scores"), list) and len(value["scores"]) == n
            and isinstance(value.get("summary"), list) and len(value["summary"]) == n
            and (n < 2 or (isinstance(value.get("partner"), list) and len(value["partner"]) == n))):
        return value
    return None


def matrix_modules(layout: "ModelLayout", shared: set[str]) -> list[tuple[int | None, "Module"]]:
    """(layer, module) of every ≥ 2-D module whose tensor all checkpoints share, layers first, then globals."""
    out: list[tuple[int | None, Module]] = []
    for layer in layout.layers:
        for m in layer.modules:
            if len(m.shape) >= 2 and m.tensor in shared:
                out.append((layer.index, m))
    for m in layout.globals:
        if len(m.shape) >= 2 and m.tensor in shared:
            out.append((None, m))
    return out


def _heads_ok(layout: "ModelLayout", shared: set[str]) -> tuple[bool, str | None]:
    if not layout.heads_available:
        return False, layout.heads_reason or "heads are not available for this architecture"
    for layer in range(layout.num_layers):
        for p in PROJECTIONS:
            t = layout.projection(layer, p).tensor
            if t not in shared:
                return False, f"attention tensor {t} is not present in every checkpoint"
    return True, None


def _partner_means(values: dict[tuple[int, int], float], n: int) -> list[float]:
    """For each domain i, the mean of values over the pairs that contain i."""
    out = []
    for i in range(n):
        vals = [v for (a, b), v in values.items() if i in (a, b) and not math.isnan(v)]
        out.append(sum(vals) / len(vals) if vals else math.nan)
    return out


# --------------------------------------------------------------------------------------------------
# the walk
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeltaPart:
    """One executor task's share of a table (analysis.run.executors): the whole matrices [start, stop) of
    `matrix_modules`, or (heads=True) the agreement, head scores and head slices."""

    start: int
    stop: int
    heads: bool = False


@dataclass
class DeltaPlan:
    """What a table covers, known from the headers: alignment, layout, matrices, whether heads are analysed."""

    report: Any
    layout: "ModelLayout"
    modules: list[tuple[int | None, "Module"]]
    heads_on: bool
    heads_reason: str | None
    total: int                       # progress steps: matrices, then agreement layers and head projections

    @property
    def matrices(self) -> int:
        return len(self.modules)


def plan_delta(base: "Checkpoint", targets: Sequence["Checkpoint"], options: DeltaOptions) -> DeltaPlan:
    """The table's plan; different models → one-line AlignmentError before any work."""
    from analysis.io.alignment import require_same_model
    from analysis.model.architecture import layout_of

    if not targets:
        raise DiffractError("delta needs a base checkpoint and at least one CPT checkpoint",
                            hint="run: diffract-tui delta BASE CPT [CPT …] --out FILE")
    report = require_same_model([base, *targets])
    shared = set(report.shared)
    layout = layout_of(base)
    modules = matrix_modules(layout, shared)
    heads_on, heads_reason = _heads_ok(layout, shared) if options.heads else (False, "heads not requested")
    total = len(modules) + (layout.num_layers * len(PROJECTIONS) if heads_on else 0) \
        + (layout.num_layers if heads_on else 0)
    return DeltaPlan(report, layout, modules, heads_on, heads_reason, total)


def build_delta_table(base: "Checkpoint", targets: Sequence["Checkpoint"], *,
                      options: DeltaOptions = DeltaOptions(), cache: "Cache | None" = None,
                      progress: "Progress | None" = None, part: DeltaPart | None = None) -> DeltaTable:
    """Every shared matrix and (optionally) every head slice of each target against `base` (SPEC §4).

    `part` (an executor task's share) limits the work to some matrices or to the heads; such a partial table
    has no summary or metadata (`assemble` joins the parts). What the cache holds is used without torch; the
    first miss makes the compute side (`analysis.deltas.delta_compute`, which imports torch)."""
    plan = plan_delta(base, targets, options)
    report, layout, modules, heads_on, total = plan.report, plan.layout, plan.modules, plan.heads_on, plan.total
    if part is not None:
        modules = [] if part.heads else modules[part.start:part.stop]
        heads_on = heads_on and part.heads
    labels = list(report.labels[1:])      # unique display labels of the targets (analysis.io.labels rule)
    device_kind = options.settings.device_kind
    n = len(targets)
    done, last = 0, ""

    def tick(what: str) -> None:
        nonlocal done, last
        done, last = done + 1, what
        if progress is not None:
            progress(done, total, what)

    per_target: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    failures: list[MatrixFailure] = []
    wanted = metric_set(options.metrics)
    computer: "DeltaCompute | None" = None

    def compute() -> "DeltaCompute":
        nonlocal computer
        if computer is None:
            from analysis.deltas.delta_compute import DeltaCompute

            computer = DeltaCompute(base, targets, options, cache, wanted, report.labels[0], labels, failures)
        return computer

    # ---- whole matrices -------------------------------------------------------------------------
    for layer, module in modules:
        slc = {"module": module.name, "segments": [list(s) for s in module.segments], "transpose": module.transpose}
        keys = [_row_keys(base, t, module.tensor, slc, "matrix", options, device_kind) for t in targets]
        hits = [_lookup(cache, k, options, wanted) for k in keys]
        akey = (dict(fingerprint=[base.fingerprint, *(t.fingerprint for t in targets)], tensor=module.tensor,
                     slice=slc, operation=f"delta/matrix/a2a3/v{AGREEMENT_VERSION}", settings={"a3_k": options.a3_k},
                     dtype=options.settings.dtype, device_kind=device_kind) if n >= 2 else None)
        a_hit = _agreement_hit(cache, akey, n)
        where = f"{'globals' if layer is None else f'layer {layer}'} {module.name}"
        r, c = module.shape[0], module.shape[1]
        shape = (c, r) if module.transpose else (r, c)

        def matrix_row(i: int, metrics: dict[str, Any], layer=layer, module=module, shape=shape) -> dict[str, Any]:
            return {"checkpoint": labels[i], "tensor": module.tensor, "layer": layer, "module": module.name,
                    "head": None, "kv_head": None, "rows": int(shape[0]), "cols": int(shape[1]), **metrics}

        if all(h.complete for h in hits) and (n < 2 or a_hit is not None):   # a rerun: no tensor is read
            for i, h in enumerate(hits):
                per_target[i].append(matrix_row(i, _assemble(h.core, h.spectral, wanted)[0]))
                if n >= 2:
                    per_target[i][-1]["a2_agreement"], per_target[i][-1]["a3_agreement"] = a_hit[i]
        else:
            compute().matrix(module, where, keys, hits, akey, a_hit, per_target, matrix_row)
        tick(f"{module.tensor} ({module.name})")

    # ---- head scores, cross-domain agreement and classes ----------------------------------------
    grids: dict[str, Any] | None = None
    scores: dict[str, HeadScores] = {}
    agreement: DomainAgreement | None = None
    if heads_on:
        gkey = _head_grids_key(base, targets, options, device_kind)
        grids = None if cache is None else _grids_entry(cache.get_json(_cache_key(gkey)), n)
        if grids is not None:   # a rerun: the ticks the computation would make, nothing read or computed
            for layer_i in range(layout.num_layers):
                tick(f"agreement, layer {layer_i}" if n >= 2 else f"head scores, layer {layer_i}")
        else:
            result = compute().heads(layout, tick)
            grids, scores, agreement = result.grids, result.scores, result.agreement
            if cache is not None and result.complete:
                cache.put_json(_cache_key(gkey), grids)

    # ---- head slices ----------------------------------------------------------------------------
    if heads_on:
        H, G = layout.num_heads, layout.num_kv_heads
        per = H // G
        partner, classes = grids["partner"], grids["classes"]
        for layer in range(layout.num_layers):
            for p in PROJECTIONS:
                proj = layout.projection(layer, p)
                tensor = proj.tensor
                slc = {"proj": p, "layer": layer, "heads": "all", "head_dim": layout.head_dim}
                keys = [_row_keys(base, t, tensor, slc, "heads", options, device_kind) for t in targets]
                hits = [_lookup(cache, k, options, wanted) for k in keys]
                other = int(base.info(tensor).shape[1 - proj.axis])  # what projection_heads stacks per head
                head_shape = (other, layout.head_dim) if p == "o" else (layout.head_dim, other)
                slices = ([_assemble(h.core, h.spectral, wanted) for h in hits]   # a rerun: no tensor read
                          if all(h.complete for h in hits) else compute().head_slices(layout, layer, p, keys, hits))
                for i, head_rows in enumerate(slices):
                    hs = grids["scores"][i]
                    for j, metrics in enumerate(head_rows):
                        if metrics is None:
                            continue
                        if p in KV_PROJECTIONS:
                            head, kv_head, qh = (j if per == 1 else None), j, j * per
                        else:
                            head, kv_head, qh = j, layout.kv_group(j), j
                        row = {"checkpoint": labels[i], "tensor": tensor, "layer": layer, "module": p,
                               "head": head, "kv_head": kv_head, "rows": head_shape[0], "cols": head_shape[1],
                               **metrics}
                        if p not in KV_PROJECTIONS or per == 1:
                            row["head_score"] = float(hs[layer][qh])
                        if partner is not None and not (options.exclude_kv and p in KV_PROJECTIONS):
                            same = row["unchanged"]  # a slice with ΔW = 0 has no direction to agree on
                            mine = partner[i]
                            row["a2_agreement"] = None if same else float(mine[f"a2/{p}"][layer][qh])
                            row["a3_agreement"] = None if same else float(mine[f"a3/{p}"][layer][qh])
                            if head is not None:
                                row["head_a2_agreement"] = float(mine["a2/head"][layer][qh])
                                row["head_a3_agreement"] = float(mine["a3/head"][layer][qh])
                                row["head_class"] = classes[layer][qh]
                        per_target[i].append(row)
                tick(f"heads, layer {layer} {p}")

    rows = [r for rs in per_target for r in rs]
    if part is not None:   # an executor task's share: the driver assembles the table
        return DeltaTable(rows=rows, summary={"ticks": done, "last": last}, metadata={}, head_scores=scores,
                          agreement=agreement, layout=layout, failures=failures, head_grids=grids)
    return _finish(base, targets, options, plan, rows, scores, agreement, failures, grids)


def _finish(base: "Checkpoint", targets: Sequence["Checkpoint"], options: DeltaOptions, plan: DeltaPlan,
            rows: list[dict[str, Any]], scores: "dict[str, HeadScores]", agreement: "DomainAgreement | None",
            failures: list[MatrixFailure], grids: dict[str, Any] | None) -> DeltaTable:
    """The table from its rows and head grids: the summary and the provenance."""
    report, layout = plan.report, plan.layout
    device_kind = options.settings.device_kind
    summary = _summary(report.labels[0], list(report.labels[1:]), grids, report, layout, plan.heads_on,
                       plan.heads_reason, rows)
    entries = [checkpoint_entry(c) | {"label": lab} for c, lab in zip([base, *targets], report.labels)]
    metadata = provenance([base, *targets], {**_settings_key(options), "device_kind": device_kind},
                          device_kind=device_kind, command="delta", base=entries[0], targets=entries[1:],
                          architecture=layout.describe())
    metadata["checkpoints"] = entries   # the alignment's labels, which the rows carry
    return DeltaTable(rows=rows, summary=summary, metadata=metadata, head_scores=scores, agreement=agreement,
                      layout=layout, failures=failures, head_grids=grids)


def assemble(base: "Checkpoint", targets: Sequence["Checkpoint"], options: DeltaOptions, plan: DeltaPlan,
             parts: Sequence[DeltaTable]) -> DeltaTable:
    """The table of `build_delta_table` from its parts (matrix batches in order, then the heads): rows target
    by target as the local build orders them, failures in the parts' order."""
    labels = list(plan.report.labels[1:])
    rows = [r for label in labels for p in parts for r in p.rows if r["checkpoint"] == label]
    scores: dict[str, HeadScores] = {}
    agreement: DomainAgreement | None = None
    grids: dict[str, Any] | None = None
    for p in parts:
        scores.update(p.head_scores)
        agreement = p.agreement if p.agreement is not None else agreement
        grids = p.head_grids if p.head_grids is not None else grids
    failures = [f for p in parts for f in p.failures]
    return _finish(base, targets, options, plan, rows, scores, agreement, failures, grids)


def _summary(base_label: str, labels: Sequence[str], grids: dict[str, Any] | None, report: Any,
             layout: "ModelLayout", heads_on: bool, heads_reason: str | None,
             rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-target concentration (top-10 % share, Gini), how many matrices, head slices and heads the target
    left unchanged (bit-identical to the base), and the cross-domain agreement summary (those two from the
    head grids, `delta_compute.head_grids`)."""
    out: dict[str, Any] = {"base": base_label, "heads": heads_on, "heads_reason": heads_reason,
                           "architecture": layout.describe(), "checkpoints": []}
    for i, label in enumerate(labels):
        entry: dict[str, Any] = {"checkpoint": label}
        mine = [r for r in rows if r["checkpoint"] == label]
        matrices = [r for r in mine if r["head"] is None and r["kv_head"] is None]
        slices = [r for r in mine if not (r["head"] is None and r["kv_head"] is None)]
        entry.update(matrices=len(matrices), unchanged_matrices=sum(bool(r["unchanged"]) for r in matrices),
                     head_slices=len(slices), unchanged_head_slices=sum(bool(r["unchanged"]) for r in slices))
        if grids is not None:
            entry.update(grids["summary"][i])
        out["checkpoints"].append(entry)
    if grids is not None and grids["agreement"] is not None:
        out["agreement"] = grids["agreement"]
    missing = {label: list(keys) for label, keys in report.missing.items() if keys}
    if missing:
        out["missing"] = missing
    return json_safe(out)


def json_safe(value: Any) -> Any:
    """A copy with NaN/±inf floats as None, so summaries are strict JSON in every export format."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def open_checkpoints(paths: Sequence[str | Path]) -> list["Checkpoint"]:
    """Open every checkpoint once (headers only) under its unique label; on an error those opened are closed."""
    from analysis.io.checkpoint import open_checkpoint
    from analysis.io.labels import unique_labels

    opened: list[Checkpoint] = []
    try:
        for p, lab in zip(paths, unique_labels(list(paths))):
            opened.append(open_checkpoint(p, label=lab))
    except BaseException:
        for c in opened:
            c.close()
        raise
    return opened


def build_and_close(opened: Sequence["Checkpoint"], *, options: DeltaOptions = DeltaOptions(),
                    cache: "Cache | None" = None, progress: "Progress | None" = None, executor: Any = None,
                    cancel: Any = None) -> DeltaTable:
    """The table of opened checkpoints (the first is the base), built here or as `executor`'s Ray tasks (the same
    table); they are closed and the cache flushed afterwards (also on an error or Ctrl-C, so what was computed
    is kept)."""
    base, targets = opened[0], list(opened[1:])
    try:
        if executor is not None and not getattr(executor, "local", True):
            from analysis.run.executors import delta_remote

            return delta_remote(executor, base, targets, options=options, cache=cache, progress=progress,
                                cancel=cancel)
        return build_delta_table(base, targets, options=options, cache=cache, progress=progress)
    finally:
        for c in opened:
            c.close()
        from analysis.run.cache import flush_cache

        flush_cache(cache)


def open_and_build(base_path: str | Path, target_paths: Sequence[str | Path], *, options: DeltaOptions = DeltaOptions(),
                   cache: "Cache | None" = None, progress: "Progress | None" = None, executor: Any = None,
                   cancel: Any = None) -> DeltaTable:
    """Open the checkpoints (headers only) and build the table (here or on `executor`); closed afterwards."""
    return build_and_close(open_checkpoints([base_path, *target_paths]), options=options, cache=cache,
                           progress=progress, executor=executor, cancel=cancel)

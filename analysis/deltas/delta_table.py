"""The rows behind `diffract-tui delta`: every shared matrix (and every head slice) of N CPT checkpoints
against their base, with the SPEC §4 metrics, cross-domain agreement and a concentration summary.

Row keys: checkpoint, tensor, layer, module, head, kv_head, rows, cols, then unchanged (True when the target left
the matrix or slice bit-identical to the base: delta_frob = delta_rel = 0 and every other column empty), delta_frob,
delta_rel,
delta_cos, delta_rho, delta_rank_{90,95,99}, avg_max_{l,r}_agreement (+ a1_k, a1_noise_floor_{l,r}),
truncatable_fraction (SPEC §5, relative error ≤ 0.1), the SPEC §3 metrics of ΔW itself, and with ≥ 2 CPT checkpoints a2_agreement / a3_agreement (mean over the
other domains; per matrix or per head slice) plus, on head rows, head_score, head_a2_agreement,
head_a3_agreement and head_class (the whole head, all projections).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from analysis.run.provenance import checkpoint_entry, provenance
from analysis.deltas.agreement import DEFAULT_A3_K, DomainAgreement, domain_agreement, pairwise_agreement
from analysis.deltas.delta import (PROJECTIONS, HeadScores, NarrowSVD, batched_delta_metrics, head_concentration,
                                   head_scores, narrow_svd)
from analysis.errors import DiffractError, MatrixFailure
from analysis.progress import Progress
from analysis.spectral.backend import SpectralSettings
from analysis.spectral.metric_sets import MetricSet, metric_set

if TYPE_CHECKING:  # pragma: no cover - typing only
    from analysis.model.architecture import ModelLayout, Module
    from analysis.run.cache import Cache
    from analysis.io.checkpoint import Checkpoint

ID_COLUMNS = ("checkpoint", "tensor", "layer", "module", "head", "kv_head", "rows", "cols")
RELEASE_MAPS_BYTES = 64 << 20   # after a matrix this big (compute dtype), the checkpoints' maps are released
DELTA_TABLE_VERSION = 3  # bump when what the table caches per matrix changes (2: `unchanged` rows;
                         # 3: a core and a spectral entry, shared by every metric set)
AGREEMENT_VERSION = 1    # per-matrix A2/A3 and head-score entries


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
    head_scores: dict[str, HeadScores] = field(default_factory=dict)
    agreement: DomainAgreement | None = None
    layout: "ModelLayout | None" = None
    failures: list[MatrixFailure] = field(default_factory=list)   # matrices left out (NaN/inf): a partial table


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


def _cached_head_scores(base: "Checkpoint", target: "Checkpoint", layout: "ModelLayout", options: DeltaOptions,
                        device: torch.device, cache: "Cache | None") -> HeadScores:
    """`head_scores` of one target through the cache (its per-projection energy grids), so a rerun reads nothing."""
    from analysis.deltas.delta import KV_PROJECTIONS, scores_from_energies

    def compute() -> dict[str, Any]:
        hs = head_scores(base, target, layout, exclude_kv=options.exclude_kv, dtype=options.settings.torch_dtype,
                         device=device)
        return {"delta": {p: g.tolist() for p, g in hs.projection_delta_energy.items()},
                "base": {p: g.tolist() for p, g in hs.projection_base_energy.items()}}

    key = dict(fingerprint=[base.fingerprint, target.fingerprint], tensor="attention", slice={"heads": "scores"},
               operation=f"delta/head-scores/v{AGREEMENT_VERSION}", settings={"exclude_kv": options.exclude_kv},
               dtype=options.settings.dtype, device_kind=device.type)
    entry = _cached(cache, key if cache is not None else None, compute)
    projs = tuple(p for p in PROJECTIONS if not (options.exclude_kv and p in KV_PROJECTIONS))
    L, H = layout.num_layers, layout.num_heads
    pde = {p: torch.tensor(entry["delta"][p], dtype=torch.float64).reshape(L, H) for p in projs}
    pbe = {p: torch.tensor(entry["base"][p], dtype=torch.float64).reshape(L, H) for p in projs}
    delta_energy = sum(pde.values(), torch.zeros(L, H, dtype=torch.float64))
    base_energy = sum(pbe.values(), torch.zeros(L, H, dtype=torch.float64))
    return HeadScores(scores=scores_from_energies(delta_energy, base_energy), delta_energy=delta_energy,
                      base_energy=base_energy, projection_delta_energy=pde, projection_base_energy=pbe,
                      exclude_kv=options.exclude_kv, projections=projs)


def _finite_rows(failures: list[MatrixFailure], failure: Callable[[str, str], MatrixFailure],
                 sides: Sequence[tuple[str, torch.Tensor]],
                 compute: Callable[[torch.Tensor | None], list[dict[str, Any]]]) -> list[dict[str, Any] | None]:
    """Rows of a (B, m, n) batch: `compute(None)` when every matrix of every side is finite (the usual, cached
    path), else `compute(index)` over the finite ones and a failure for each other (None in its place) —
    one NaN/inf matrix never sinks the table. `failure(part, reason)` names it ("head 3", or "" for one)."""
    from analysis.spectral.spectra import NUMERIC_ERRORS, failure_reason, finite_matrices, non_finite_entries

    B = sides[0][1].shape[0]
    ok = torch.ones(B, dtype=torch.bool, device=sides[0][1].device)
    for label, W in sides:
        good = finite_matrices(W)
        for j in (ok & ~good).nonzero().flatten().tolist():
            failures.append(failure(f" head {j}" if B > 1 else "",
                                    f"{non_finite_entries(W[j])} NaN/inf entries in {label}, so it has no spectrum"))
        ok &= good
    index = None if bool(ok.all()) else ok.nonzero().flatten()
    out: list[dict[str, Any] | None] = [None] * B
    if index is not None and index.numel() == 0:
        return out
    try:
        rows = compute(index)
    except NUMERIC_ERRORS as err:
        failures.append(failure(" heads" if B > 1 else "", failure_reason(err)))
        return out
    for j, row in zip(range(B) if index is None else index.tolist(), rows):
        out[j] = row
    return out


def _read_matrix(ckpt: "Checkpoint", module: "Module", dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A module's matrix on the compute device; after a big one (≥ RELEASE_MAPS_BYTES) the checkpoint's
    memory maps are released, so the file pages it touched leave the resident set (issue 13: three mapped
    embeddings are 1.5× one float32 copy of bf16 weights, 3× of float32 ones). Files reopen on demand."""
    from analysis.model.heads import module_matrix

    W = module_matrix(ckpt, module, dtype).to(device)
    if W.numel() * W.element_size() >= RELEASE_MAPS_BYTES and hasattr(ckpt, "close"):
        ckpt.close()
    return W


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
    has no summary or metadata (`assemble` joins the parts)."""
    from analysis.model.heads import module_matrix, projection_heads

    dtype = options.settings.torch_dtype
    plan = plan_delta(base, targets, options)
    report, layout, modules, heads_on, total = plan.report, plan.layout, plan.modules, plan.heads_on, plan.total
    if part is not None:
        modules = [] if part.heads else modules[part.start:part.stop]
        heads_on = heads_on and part.heads
    labels = list(report.labels[1:])      # unique display labels of the targets (analysis.io.labels rule)
    device = options.settings.torch_device
    settings = options.settings if options.spectral else None
    skey = _settings_key(options)
    n = len(targets)
    done, last = 0, ""

    def tick(what: str) -> None:
        nonlocal done, last
        done, last = done + 1, what
        if progress is not None:
            progress(done, total, what)

    per_target: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    failures: list[MatrixFailure] = []
    metric_kwargs = dict(settings=settings, dtype=dtype, top_k=options.top_k, spectral=options.spectral,
                         truncation=True, metrics=options.metrics)

    # ---- whole matrices -------------------------------------------------------------------------
    wanted = metric_set(options.metrics)
    spectral_kwargs = dict(settings=settings, dtype=dtype, spectral=True, agreement=False, truncation=False,
                           metrics=options.metrics)
    for layer, module in modules:
        slc = {"module": module.name, "segments": [list(s) for s in module.segments], "transpose": module.transpose}
        keys = [_row_keys(base, t, module.tensor, slc, "matrix", options, device.type) for t in targets]
        hits = [_lookup(cache, k, options, wanted) for k in keys]
        akey = (dict(fingerprint=[base.fingerprint, *(t.fingerprint for t in targets)], tensor=module.tensor,
                     slice=slc, operation=f"delta/matrix/a2a3/v{AGREEMENT_VERSION}", settings={"a3_k": options.a3_k},
                     dtype=options.settings.dtype, device_kind=device.type) if n >= 2 else None)
        a_hit = _agreement_hit(cache, akey, n)
        where = f"{'globals' if layer is None else f'layer {layer}'} {module.name}"
        r, c = module.shape[0], module.shape[1]
        shape = (c, r) if module.transpose else (r, c)
        if all(h.complete for h in hits) and (n < 2 or a_hit is not None):   # a rerun: no tensor is read
            for i, h in enumerate(hits):
                per_target[i].append({"checkpoint": labels[i], "tensor": module.tensor, "layer": layer,
                                      "module": module.name, "head": None, "kv_head": None, "rows": int(shape[0]),
                                      "cols": int(shape[1]), **_assemble(h.core, h.spectral, wanted)[0]})
                if n >= 2:
                    per_target[i][-1]["a2_agreement"], per_target[i][-1]["a3_agreement"] = a_hit[i]
            tick(f"{module.tensor} ({module.name})")
            continue
        W0 = _read_matrix(base, module, dtype, device)
        bsvd: NarrowSVD | None = None
        with_rows = 0
        for i, target in enumerate(targets):
            Wd = _read_matrix(target, module, dtype, device)

            def compute(W0=W0, Wd=Wd) -> list[dict[str, Any]]:
                nonlocal bsvd
                if bsvd is None and not torch.equal(W0, Wd):  # an unchanged matrix needs no decomposition
                    bsvd = narrow_svd(W0.unsqueeze(0), options.top_k)  # shared by every target of this matrix
                return batched_delta_metrics(W0.unsqueeze(0), Wd.unsqueeze(0), base_svd=bsvd, **metric_kwargs)

            hit = hits[i]
            metrics = (_assemble(hit.core, hit.spectral, wanted) if hit.complete else _finite_rows(
                failures, lambda part, reason, i=i, where=where: MatrixFailure(
                    labels[i], str(targets[i].path), "delta", module.tensor, where + part, reason),
                [(report.labels[0], W0.unsqueeze(0)), (labels[i], Wd.unsqueeze(0))],
                lambda _index, keys=keys[i], hit=hit, compute=compute, W0=W0, Wd=Wd: _fill(
                    cache, keys, hit, options, wanted, compute,
                    lambda: batched_delta_metrics(W0.unsqueeze(0), Wd.unsqueeze(0), **spectral_kwargs))))[0]
            if metrics is None:
                continue
            row = {"checkpoint": labels[i], "tensor": module.tensor, "layer": layer, "module": module.name,
                   "head": None, "kv_head": None, "rows": int(W0.shape[0]), "cols": int(W0.shape[1]), **metrics}
            per_target[i].append(row)
            with_rows += 1
        Wd = compute = None   # the last target's matrix is not held through the agreement pass (issue 13)
        if n >= 2 and with_rows == n:      # agreement needs every domain's ΔW of this matrix
            def agreement_means() -> list[list[float | None]]:
                still = [bool(per_target[i][-1]["unchanged"]) for i in range(n)]
                pairs = [(a, b) for a in range(n) for b in range(a + 1, n) if not (still[a] or still[b])]
                a2, a3 = pairwise_agreement(  # ≤ 2 deltas at a time, each re-read, instead of all n held
                    lambda t, W0=W0, module=module: _read_matrix(targets[t], module, dtype, device) - W0,
                    pairs, options.a3_k)
                return [[None if still[i] else m2, None if still[i] else m3]   # ΔW = 0 agrees with nothing
                        for i, (m2, m3) in enumerate(zip(_partner_means(a2, n), _partner_means(a3, n)))]

            for i, (m2, m3) in enumerate(a_hit if a_hit is not None else _cached(cache, akey, agreement_means)):
                per_target[i][-1]["a2_agreement"] = m2
                per_target[i][-1]["a3_agreement"] = m3
        tick(f"{module.tensor} ({module.name})")

    # ---- cross-domain agreement and head scores -------------------------------------------------
    scores: dict[str, HeadScores] = {}
    agreement: DomainAgreement | None = None
    if heads_on:
        if n >= 2:
            from analysis.spectral.spectra import NUMERIC_ERRORS, failure_reason

            try:
                agreement = domain_agreement(
                    base, targets, layout, k=options.a3_k, dtype=dtype, exclude_kv=options.exclude_kv,
                    agreement_metric=options.agreement_metric, agreement_threshold=options.agreement_threshold,
                    magnitude_threshold=options.magnitude_threshold, device=device, cache=cache,
                    progress=lambda l, L, text: tick(f"agreement, layer {l - 1}"))
            except NUMERIC_ERRORS as err:     # a NaN/inf head somewhere: no agreement columns, the rest stays
                failures.append(MatrixFailure(
                    ", ".join(labels), str(base.path), "delta", "q/k/v/o of every layer", "cross-domain agreement",
                    f"not computed ({failure_reason(err).rstrip('.')})",
                    left_out="the A2/A3 agreement columns and head classes are left out"))
        if agreement is not None:
            for i in range(n):
                scores[labels[i]] = agreement.head_scores[i]
        else:
            for layer_i in range(layout.num_layers if n == 1 else 0):
                tick(f"head scores, layer {layer_i}")
            for i, target in enumerate(targets):
                scores[labels[i]] = _cached_head_scores(base, target, layout, options, device, cache)

    # ---- head slices ----------------------------------------------------------------------------
    if heads_on:
        H, G = layout.num_heads, layout.num_kv_heads
        per = H // G
        partner: dict[tuple[int, str, str | None], torch.Tensor] = {}

        def partner_mean(i: int, metric: str, proj: str | None) -> torch.Tensor:
            if (i, metric, proj) not in partner:
                partner[(i, metric, proj)] = agreement.partner_mean(i, metric, proj)
            return partner[(i, metric, proj)]

        for layer in range(layout.num_layers):
            for p in PROJECTIONS:
                proj = layout.projection(layer, p)
                tensor = proj.tensor
                slc = {"proj": p, "layer": layer, "heads": "all", "head_dim": layout.head_dim}
                keys = [_row_keys(base, t, tensor, slc, "heads", options, device.type) for t in targets]
                hits = [_lookup(cache, k, options, wanted) for k in keys]
                other = int(base.info(tensor).shape[1 - proj.axis])  # what projection_heads stacks per head
                head_shape = (other, layout.head_dim) if p == "o" else (layout.head_dim, other)
                b = (None if all(h.complete for h in hits)        # every target cached: the base is not read
                     else projection_heads(base, layout, layer, p, dtype).to(device))
                bsvd_h: NarrowSVD | None = None
                for i, target in enumerate(targets):
                    hit = hits[i]
                    if hit.complete:                 # a rerun: the cached rows, no tensor read
                        head_rows: list[dict[str, Any] | None] = _assemble(hit.core, hit.spectral, wanted)
                    else:
                        t = projection_heads(target, layout, layer, p, dtype).to(device)

                        def compute_heads(b=b, t=t) -> list[dict[str, Any]]:
                            nonlocal bsvd_h
                            if bsvd_h is None and not torch.equal(b, t):  # all heads unchanged: no decomposition
                                bsvd_h = narrow_svd(b, options.top_k)
                            return batched_delta_metrics(b, t, base_svd=bsvd_h, **metric_kwargs)

                        head_rows = _finite_rows(
                            failures, lambda part, reason, i=i, tensor=tensor, where=f"layer {layer} {p}": MatrixFailure(
                                labels[i], str(targets[i].path), "delta", tensor, where + part, reason),
                            [(report.labels[0], b), (labels[i], t)],
                            lambda index, keys=keys[i], hit=hit, compute_heads=compute_heads, b=b, t=t: _fill(
                                cache, keys, hit, options, wanted, compute_heads,
                                lambda: batched_delta_metrics(b, t, **spectral_kwargs)) if index is None
                            else batched_delta_metrics(b[index], t[index], **metric_kwargs))  # finite heads, uncached
                    hs = scores[labels[i]]
                    for j, metrics in enumerate(head_rows):
                        if metrics is None:
                            continue
                        if p in ("k", "v"):
                            head, kv_head, qh = (j if per == 1 else None), j, j * per
                        else:
                            head, kv_head, qh = j, layout.kv_group(j), j
                        row = {"checkpoint": labels[i], "tensor": tensor, "layer": layer, "module": p,
                               "head": head, "kv_head": kv_head, "rows": head_shape[0], "cols": head_shape[1],
                               **metrics}
                        if p not in ("k", "v") or per == 1:
                            row["head_score"] = float(hs.scores[layer, qh])
                        if agreement is not None and not (options.exclude_kv and p in ("k", "v")):
                            same = row["unchanged"]  # a slice with ΔW = 0 has no direction to agree on
                            row["a2_agreement"] = None if same else float(partner_mean(i, "a2", p)[layer, qh])
                            row["a3_agreement"] = None if same else float(partner_mean(i, "a3", p)[layer, qh])
                            if head is not None:
                                row["head_a2_agreement"] = float(partner_mean(i, "a2", None)[layer, qh])
                                row["head_a3_agreement"] = float(partner_mean(i, "a3", None)[layer, qh])
                                row["head_class"] = agreement.classification.classes[layer][qh]
                        per_target[i].append(row)
                tick(f"heads, layer {layer} {p}")

    rows = [r for rs in per_target for r in rs]
    if part is not None:   # an executor task's share: the driver assembles the table
        return DeltaTable(rows=rows, summary={"ticks": done, "last": last}, metadata={}, head_scores=scores,
                          agreement=agreement, layout=layout, failures=failures)
    return _finish(base, targets, options, plan, rows, scores, agreement, failures)


def _finish(base: "Checkpoint", targets: Sequence["Checkpoint"], options: DeltaOptions, plan: DeltaPlan,
            rows: list[dict[str, Any]], scores: dict[str, HeadScores], agreement: DomainAgreement | None,
            failures: list[MatrixFailure]) -> DeltaTable:
    """The table from its rows: the summary and the provenance."""
    report, layout = plan.report, plan.layout
    device = options.settings.torch_device
    summary = _summary(report.labels[0], list(report.labels[1:]), scores, agreement, report, layout, plan.heads_on,
                       plan.heads_reason, rows)
    entries = [checkpoint_entry(c) | {"label": lab} for c, lab in zip([base, *targets], report.labels)]
    metadata = provenance([base, *targets], {**_settings_key(options), "device_kind": device.type},
                          device_kind=device.type, command="delta", base=entries[0], targets=entries[1:],
                          architecture=layout.describe())
    metadata["checkpoints"] = entries   # the alignment's labels, which the rows carry
    return DeltaTable(rows=rows, summary=summary, metadata=metadata, head_scores=scores, agreement=agreement,
                      layout=layout, failures=failures)


def assemble(base: "Checkpoint", targets: Sequence["Checkpoint"], options: DeltaOptions, plan: DeltaPlan,
             parts: Sequence[DeltaTable]) -> DeltaTable:
    """The table of `build_delta_table` from its parts (matrix batches in order, then the heads): rows target
    by target as the local build orders them, failures in the parts' order."""
    labels = list(plan.report.labels[1:])
    rows = [r for label in labels for p in parts for r in p.rows if r["checkpoint"] == label]
    scores: dict[str, HeadScores] = {}
    agreement: DomainAgreement | None = None
    for p in parts:
        scores.update(p.head_scores)
        agreement = p.agreement if p.agreement is not None else agreement
    failures = [f for p in parts for f in p.failures]
    return _finish(base, targets, options, plan, rows, scores, agreement, failures)


def _summary(base_label: str, labels: Sequence[str], scores: dict[str, HeadScores],
             agreement: DomainAgreement | None, report: Any, layout: "ModelLayout", heads_on: bool,
             heads_reason: str | None, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-target concentration (top-10 % share, Gini), how many matrices, head slices and heads the target
    left unchanged (bit-identical to the base), and the cross-domain agreement summary."""
    out: dict[str, Any] = {"base": base_label, "heads": heads_on, "heads_reason": heads_reason,
                           "architecture": layout.describe(), "checkpoints": []}
    for label in labels:
        entry: dict[str, Any] = {"checkpoint": label}
        mine = [r for r in rows if r["checkpoint"] == label]
        matrices = [r for r in mine if r["head"] is None and r["kv_head"] is None]
        slices = [r for r in mine if not (r["head"] is None and r["kv_head"] is None)]
        entry.update(matrices=len(matrices), unchanged_matrices=sum(bool(r["unchanged"]) for r in matrices),
                     head_slices=len(slices), unchanged_head_slices=sum(bool(r["unchanged"]) for r in slices))
        hs = scores.get(label)
        if hs is not None:
            c = head_concentration(hs)
            entry.update(top10_share=c.top10_share, gini=c.gini, total_delta_energy=float(hs.delta_energy.sum()),
                         mean_head_score=float(hs.scores.nanmean()), unchanged_heads=c.unchanged)
        out["checkpoints"].append(entry)
    if agreement is not None:
        out["agreement"] = agreement.summary()
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

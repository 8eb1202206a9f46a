"""The torch side of `analysis.deltas.delta_table`: what a delta table computes when the cache does not hold it.

`delta_table` plans, keys and looks up (without torch, so a fully cached `delta` never imports it, issue 13
item 3) and hands every miss to a `DeltaCompute` made on the first one: the rows of a matrix or of one
projection's head slices (read, checked finite, computed, written to the cache) and the head grids (head
scores, cross-domain agreement, classes and their summary) that the head rows and the summary are made of.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from analysis.deltas.agreement import DomainAgreement, domain_agreement, pairwise_agreement
from analysis.deltas.delta import (KV_PROJECTIONS, PROJECTIONS, HeadScores, NarrowSVD, batched_delta_metrics,
                                   head_concentration, head_scores, narrow_svd, scores_from_energies)
from analysis.deltas.delta_table import (AGREEMENT_VERSION, RELEASE_MAPS_BYTES, DeltaOptions, _assemble, _cached,
                                        _fill, _Hit, _partner_means)
from analysis.errors import MatrixFailure
from analysis.spectral.backend import compute_torch

if TYPE_CHECKING:  # pragma: no cover - typing only
    from analysis.io.checkpoint import Checkpoint
    from analysis.model.architecture import ModelLayout, Module
    from analysis.run.cache import Cache
    from analysis.spectral.metric_sets import MetricSet

Keys = tuple[dict[str, Any], dict[str, Any]]


def _cached_head_scores(base: "Checkpoint", target: "Checkpoint", layout: "ModelLayout", options: DeltaOptions,
                        device: torch.device, cache: "Cache | None") -> HeadScores:
    """`head_scores` of one target through the cache (its per-projection energy grids), so a rerun reads nothing."""

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


@dataclass
class HeadsResult:
    """The head section computed: the JSON-plain grids the rows and summary use, and the objects behind them."""

    grids: dict[str, Any]
    scores: dict[str, HeadScores] = field(default_factory=dict)
    agreement: DomainAgreement | None = None
    complete: bool = True       # no failure: the grids may be cached (a failure must be reported on a rerun too)


@dataclass
class DeltaCompute:
    """The compute side of one table's walk (see the module docstring); made on the first cache miss."""

    base: "Checkpoint"
    targets: Sequence["Checkpoint"]
    options: DeltaOptions
    cache: "Cache | None"
    wanted: "MetricSet"
    base_label: str
    labels: list[str]
    failures: list[MatrixFailure]

    def __post_init__(self) -> None:
        compute_torch()   # torch now, with the thread count the CLI asked for before it was imported
        settings = self.options.settings if self.options.spectral else None
        self.dtype = self.options.settings.torch_dtype
        self.device = self.options.settings.torch_device
        self.metric_kwargs = dict(settings=settings, dtype=self.dtype, top_k=self.options.top_k,
                                  spectral=self.options.spectral, truncation=True, metrics=self.options.metrics)
        self.spectral_kwargs = dict(settings=settings, dtype=self.dtype, spectral=True, agreement=False,
                                    truncation=False, metrics=self.options.metrics)

    def matrix(self, module: "Module", where: str, keys: list[Keys], hits: list[_Hit],
               akey: dict[str, Any] | None, a_hit: list[list[Any]] | None,
               rows: list[list[dict[str, Any]]], make_row: Callable[[int, dict[str, Any]], dict[str, Any]]) -> None:
        """The rows of one whole matrix for every target (appended to `rows[i]`; none for a failed one), then,
        with ≥ 2 targets that all have a row, the matrix's A2/A3 partner means on them."""
        base, targets, options, cache, wanted = self.base, self.targets, self.options, self.cache, self.wanted
        n = len(targets)
        W0 = _read_matrix(base, module, self.dtype, self.device)
        bsvd: NarrowSVD | None = None
        with_rows = 0
        for i, target in enumerate(targets):
            Wd = _read_matrix(target, module, self.dtype, self.device)

            def compute(W0=W0, Wd=Wd) -> list[dict[str, Any]]:
                nonlocal bsvd
                if bsvd is None and not torch.equal(W0, Wd):  # an unchanged matrix needs no decomposition
                    bsvd = narrow_svd(W0.unsqueeze(0), options.top_k)  # shared by every target of this matrix
                return batched_delta_metrics(W0.unsqueeze(0), Wd.unsqueeze(0), base_svd=bsvd, **self.metric_kwargs)

            hit = hits[i]
            metrics = (_assemble(hit.core, hit.spectral, wanted) if hit.complete else _finite_rows(
                self.failures, lambda part, reason, i=i, where=where: MatrixFailure(
                    self.labels[i], str(targets[i].path), "delta", module.tensor, where + part, reason),
                [(self.base_label, W0.unsqueeze(0)), (self.labels[i], Wd.unsqueeze(0))],
                lambda _index, keys=keys[i], hit=hit, compute=compute, W0=W0, Wd=Wd: _fill(
                    cache, keys, hit, options, wanted, compute,
                    lambda: batched_delta_metrics(W0.unsqueeze(0), Wd.unsqueeze(0), **self.spectral_kwargs))))[0]
            if metrics is None:
                continue
            rows[i].append(make_row(i, metrics))
            with_rows += 1
        Wd = compute = None   # the last target's matrix is not held through the agreement pass (issue 13)
        if n >= 2 and with_rows == n:      # agreement needs every domain's ΔW of this matrix
            def agreement_means() -> list[list[float | None]]:
                still = [bool(rows[i][-1]["unchanged"]) for i in range(n)]
                pairs = [(a, b) for a in range(n) for b in range(a + 1, n) if not (still[a] or still[b])]
                a2, a3 = pairwise_agreement(  # ≤ 2 deltas at a time, each re-read, instead of all n held
                    lambda t, W0=W0, module=module: _read_matrix(targets[t], module, self.dtype, self.device) - W0,
                    pairs, options.a3_k)
                return [[None if still[i] else m2, None if still[i] else m3]   # ΔW = 0 agrees with nothing
                        for i, (m2, m3) in enumerate(zip(_partner_means(a2, n), _partner_means(a3, n)))]

            for i, (m2, m3) in enumerate(a_hit if a_hit is not None else _cached(cache, akey, agreement_means)):
                rows[i][-1]["a2_agreement"] = m2
                rows[i][-1]["a3_agreement"] = m3

    def heads(self, layout: "ModelLayout", tick: Callable[[str], None]) -> HeadsResult:
        """Head scores of every target and, with ≥ 2 targets, the cross-domain agreement (each through its own
        cache entries), as the JSON-plain grids `delta_table` makes head rows and the summary from."""
        base, targets, options, n = self.base, self.targets, self.options, len(self.targets)
        scores: dict[str, HeadScores] = {}
        agreement: DomainAgreement | None = None
        complete = True
        if n >= 2:
            from analysis.spectral.spectra import NUMERIC_ERRORS, failure_reason

            try:
                agreement = domain_agreement(
                    base, targets, layout, k=options.a3_k, dtype=self.dtype, exclude_kv=options.exclude_kv,
                    agreement_metric=options.agreement_metric, agreement_threshold=options.agreement_threshold,
                    magnitude_threshold=options.magnitude_threshold, device=self.device, cache=self.cache,
                    progress=lambda l, L, text: tick(f"agreement, layer {l - 1}"))
            except NUMERIC_ERRORS as err:     # a NaN/inf head somewhere: no agreement columns, the rest stays
                complete = False
                self.failures.append(MatrixFailure(
                    ", ".join([self.base_label, *self.labels]), str(base.path), "delta", "q/k/v/o of every layer",
                    "cross-domain agreement", f"not computed ({failure_reason(err).rstrip('.')})",
                    left_out="the A2/A3 agreement columns and head classes are left out"))
        if agreement is not None:
            for i in range(n):
                scores[self.labels[i]] = agreement.head_scores[i]
        else:
            for layer_i in range(layout.num_layers if n == 1 else 0):
                tick(f"head scores, layer {layer_i}")
            for i, target in enumerate(targets):
                scores[self.labels[i]] = _cached_head_scores(base, target, layout, options, self.device, self.cache)
        return HeadsResult(head_grids(self.labels, scores, agreement, options), scores, agreement, complete)

    def head_slices(self, layout: "ModelLayout", layer: int, p: str, keys: list[Keys],
                    hits: list[_Hit]) -> list[list[dict[str, Any] | None]]:
        """The rows of one projection's head slices for every target (None for a failed slice): cached ones as
        they are, the others computed (the base read once, its narrow SVD shared by the targets)."""
        from analysis.model.heads import projection_heads

        options, cache, wanted = self.options, self.cache, self.wanted
        tensor = layout.projection(layer, p).tensor
        b = projection_heads(self.base, layout, layer, p, self.dtype).to(self.device)
        bsvd_h: NarrowSVD | None = None
        out: list[list[dict[str, Any] | None]] = []
        for i, target in enumerate(self.targets):
            hit = hits[i]
            if hit.complete:                 # this target's rows are cached
                out.append(list(_assemble(hit.core, hit.spectral, wanted)))
                continue
            t = projection_heads(target, layout, layer, p, self.dtype).to(self.device)

            def compute_heads(b=b, t=t) -> list[dict[str, Any]]:
                nonlocal bsvd_h
                if bsvd_h is None and not torch.equal(b, t):  # all heads unchanged: no decomposition
                    bsvd_h = narrow_svd(b, options.top_k)
                return batched_delta_metrics(b, t, base_svd=bsvd_h, **self.metric_kwargs)

            out.append(_finite_rows(
                self.failures, lambda part, reason, i=i, tensor=tensor, where=f"layer {layer} {p}": MatrixFailure(
                    self.labels[i], str(self.targets[i].path), "delta", tensor, where + part, reason),
                [(self.base_label, b), (self.labels[i], t)],
                lambda index, keys=keys[i], hit=hit, compute_heads=compute_heads, b=b, t=t: _fill(
                    cache, keys, hit, options, wanted, compute_heads,
                    lambda: batched_delta_metrics(b, t, **self.spectral_kwargs)) if index is None
                else batched_delta_metrics(b[index], t[index], **self.metric_kwargs)))  # finite heads, uncached
        return out


def head_grids(labels: Sequence[str], scores: dict[str, HeadScores], agreement: DomainAgreement | None,
               options: DeltaOptions) -> dict[str, Any]:
    """What head rows and the summary take from head scores and agreement, as JSON-plain values (cacheable, so
    a rerun needs no torch): per target the (L × H) scores and concentration summary; with agreement, each
    target's partner-mean A2/A3 grids (whole head, per projection), the head classes and the agreement summary."""
    out: dict[str, Any] = {"scores": [], "summary": [], "partner": None, "classes": None, "agreement": None}
    for label in labels:
        hs = scores[label]
        c = head_concentration(hs)
        out["scores"].append(hs.scores.tolist())
        out["summary"].append(dict(top10_share=c.top10_share, gini=c.gini,
                                   total_delta_energy=float(hs.delta_energy.sum()),
                                   mean_head_score=float(hs.scores.nanmean()), unchanged_heads=c.unchanged))
    if agreement is not None:
        projs = [p for p in PROJECTIONS if not (options.exclude_kv and p in KV_PROJECTIONS)]
        out["partner"] = [{f"{metric}/{proj or 'head'}": agreement.partner_mean(i, metric, proj).tolist()
                           for metric in ("a2", "a3") for proj in (*projs, None)} for i in range(len(labels))]
        out["classes"] = agreement.classification.classes
        out["agreement"] = agreement.summary()
    return out

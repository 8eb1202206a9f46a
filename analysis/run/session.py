"""The engine facade the explorer app holds: a base and its CPT checkpoints, opened and aligned once, and
per-node spectra and deltas computed on demand through the persistent cache.

A *node* is anything with `layer` (int | None), `module` (str | None) and `head` (int | None) — the app's
`NodeRef`. Nothing here imports textual: the app runs these methods in worker threads and passes
`progress(done, total, text)` and `cancelled()` callables (`analysis.progress`); `Cancelled` ends a
computation early.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol, Sequence

import numpy as np

from analysis.errors import DiffractError
from analysis.progress import Cancel, Cancelled, Progress, never as _never, no_progress as _no_progress
from analysis.run.grids import MEAN, WHOLE, AgreementGrids, HeadGrid, MagnitudeGrids, unchanged_cells  # result types
from analysis.run.loss_preview import PREVIEW_WINDOWS, REFINED_WINDOWS  # the loss's window counts, for the view

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from analysis.model.architecture import Module, ModelLayout
    from analysis.spectral.backend import SpectralSettings
    from analysis.run.cache import Cache
    from analysis.io.checkpoint import Checkpoint
    from analysis.edit.rewind import RewindInputs, RewindPreview  # result types the views receive
    from analysis.edit.rewind_list import RewindList
    from analysis.io.writer import WriteResult
    from analysis.run.series import AlphaSummary, Series
    from analysis.run.loss_preview import Curve, LossPreview, NamedText, PlanLoss, TradeoffPoint

ProgressFn = Progress        # the names the views use
CancelledFn = Cancel
HEAD_PROJECTIONS: tuple[str, ...] = ("q", "k", "v", "o")
HEAD_R = "head_r"  # the evolution's name of the SPEC §4 head score r (not a scan column: from the head energies)
AGREEMENT_KS_MAX = 24  # points on the agreement-vs-k curve (log-spaced k)
UI_OPERATION_VERSION = 1  # bump when what the session stores under its cache keys changes


class Node(Protocol):
    layer: int | None
    module: str | None
    head: int | None


class CacheMiss(Exception):
    """A cache-only look-up found no entry (raised by `ProbeCache`)."""


class ProbeCache:
    """A read-only view of a `Cache` whose misses raise `CacheMiss`: handing it to an engine call that
    reads the cache before computing (`scan.node_metrics`) turns that call into a cache-only look-up.

    With `metrics_only`, a missing array reads as an empty one, so a node whose metrics are cached but
    whose eigenvalues are not (a scanned delta) still answers with its metrics.
    """

    def __init__(self, cache: "Cache", metrics_only: bool = False):
        self._cache = cache
        self.key = cache.key
        self.metrics_only = metrics_only

    def get_json(self, key: str) -> Any:
        value = self._cache.get_json(key)
        if value is None:
            raise CacheMiss(key)
        return value

    def get_array(self, key: str) -> np.ndarray:
        value = self._cache.get_array(key)
        if value is None:
            if self.metrics_only:
                return np.empty(0)
            raise CacheMiss(key)
        return value

    def put_json(self, key: str, value: Any) -> None:
        raise CacheMiss(key)

    def put_array(self, key: str, value: Any) -> None:
        raise CacheMiss(key)


# ------------------------------------------------------------------------------------------------
# Results the views draw
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointSpectrum:
    """One checkpoint's spectrum of one matrix or head slice (SPEC §3)."""

    label: str
    evals: np.ndarray          # ESD λ = σ²/N, ascending
    metrics: dict[str, Any]    # the scan's row: rows, cols, SPEC §3 names, *_reliable flags, fit_warning
    lines: dict[str, np.ndarray] = field(default_factory=dict)  # spectra.fit_lines: pl/tpl/mp x and pdf


@dataclass(frozen=True)
class SpectrumResult:
    """The spectra of one node across all checkpoints (base first)."""

    title: str
    shape: tuple[int, int]
    spectra: tuple[CheckpointSpectrum, ...]


@dataclass(frozen=True)
class TargetDelta:
    """ΔW = W_target − W_base of one node: its singular values, truncation curve and A1 agreement curve."""

    label: str
    sigma: np.ndarray            # singular values of ΔW, descending
    metrics: dict[str, Any]      # SPEC §4 names (delta_frob, delta_rel, delta_cos, delta_rho, ...) + §3 of ΔW
    ts: np.ndarray               # truncation fractions t
    kept_energy: np.ndarray      # E(t)
    error: np.ndarray            # √(1 − E(t))
    agreement_k: np.ndarray      # top-k values
    agreement: np.ndarray        # avg_max_l_agreement over the k largest components
    noise_floor: np.ndarray      # √(2 ln k / d) beside it


@dataclass(frozen=True)
class DeltaResult:
    """The deltas of one node for every CPT checkpoint against the base."""

    title: str
    shape: tuple[int, int]
    deltas: tuple[TargetDelta, ...]


@dataclass(frozen=True)
class EvolutionLine:
    """One metric along the series for one head or projection of the node (`name`: "head 3", "q", …)."""

    name: str
    values: tuple[float | None, ...]   # one per checkpoint, in step order


@dataclass(frozen=True)
class EvolutionResult:
    """A metric of one node against step (SPEC §10): the node's own value and, where it applies, one line per
    head (a q/k/v/o projection) or per projection (a layer). Δ metrics are against the first step."""

    title: str
    metric: str
    labels: tuple[str, ...]            # checkpoints in step order
    steps: tuple[int | None, ...]      # their steps (None when the inputs are no series: argument order)
    values: tuple[float | None, ...]   # the node's metric per checkpoint (None: not defined there)
    lines: tuple[EvolutionLine, ...]


# ------------------------------------------------------------------------------------------------
# Labels
# ------------------------------------------------------------------------------------------------


def parse_labels(pairs: Sequence[str], paths: Sequence[str | Path]) -> list[str | None]:
    """`NAME=PATH` options → one label per path (None = default name); a PATH not among `paths` is an error."""
    resolved = [Path(p).expanduser().resolve() for p in paths]
    labels: list[str | None] = [None] * len(paths)
    for pair in pairs:
        name, sep, target = pair.partition("=")
        if not sep or not name.strip() or not target.strip():
            raise DiffractError(f"--label {pair!r} is not NAME=PATH", hint="write e.g. --label base=./llama-base")
        where = Path(target.strip()).expanduser().resolve()
        if where not in resolved:
            raise DiffractError(f"--label {pair!r} names a path that is not one of the checkpoints",
                                path=target.strip(), hint="use the same path as on the command line")
        labels[resolved.index(where)] = name.strip()
    return labels


def _resolve_series(paths: Sequence[str | Path], series: "Series | bool") -> "Series | None":
    """The series `paths` form in input order: the one given, recognised from the names (True), or none."""
    from analysis.run.series import Series, detect_series

    if isinstance(series, Series):
        if len(series.steps) != len(paths):
            raise ValueError("one step per path")
        return series
    return detect_series([str(p) for p in paths]) if series else None


# ------------------------------------------------------------------------------------------------
# The session
# ------------------------------------------------------------------------------------------------


@dataclass
class ExplorerSession:
    """Open checkpoints (first = base), their shared layout, settings, cache, and the user's marks."""

    checkpoints: list["Checkpoint"]
    layout: "ModelLayout"
    alignment: Any
    settings: "SpectralSettings"
    cache: "Cache"
    device: Any                                    # torch.device resolved from settings.device
    marks: set[tuple[int, int]] = field(default_factory=set)
    marks_saved: frozenset[tuple[int, int]] = frozenset()
    eval_texts: list["NamedText"] = field(default_factory=list)   # (text, domain | general) for the loss
    eval_tokens: int | None = None                               # T of the loss (None: 512, or the context)
    _previewer: Any = field(default=None, repr=False, compare=False)
    _taylor: dict[tuple, Any] = field(default_factory=dict, repr=False, compare=False)  # Taylor grids by key
    executor: Any = None                           # where compute-all runs (analysis.run.executors; None: here)
    series: "Series | None" = None                 # the checkpoints' series (they are in its step order), or None

    # ---- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, paths: Sequence[str | Path], labels: Sequence[str | None] | None = None,
             device: str = "auto", cache_dir: str | Path | None = None,
             settings: "SpectralSettings | None" = None, texts: Sequence[str | Path] = (),
             general_texts: Sequence[str | Path] = (), series: "Series | bool" = True) -> "ExplorerSession":
        """Open base + CPT checkpoints (headers only), align them and detect the layout; read the domain and
        general `texts` of the loss (SPEC §9; named by file).

        `series`: the series the caller resolved for `paths` (the CLI's --steps / --series), True to recognise
        one from the names, False for none. A series opens the checkpoints in its step order, so the base is
        its first step (SPEC §10: Δ along a series is against the first checkpoint) and every view reads that
        one order from `self.series`.

        Raises `DiffractError` (one line) for a missing path, an unreadable file, fewer than two
        checkpoints, checkpoints that cannot be compared, or a missing, binary or empty text — before any
        screen opens.
        """
        from analysis.run.loss_preview import named_texts

        from analysis.io.alignment import require_same_model
        from analysis.model.architecture import layout_of
        from analysis.spectral.backend import SpectralSettings
        from analysis.run.cache import Cache
        from analysis.io.checkpoint import open_checkpoint
        from analysis.io.labels import unique_labels

        if len(paths) < 2:
            raise DiffractError("need a base checkpoint and at least one continually pre-trained checkpoint",
                                hint="run: diffract-tui BASE CPT [CPT …]")
        labels = list(labels) if labels is not None else [None] * len(paths)
        if len(labels) != len(paths):
            raise ValueError("one label (or None) per path")
        run = _resolve_series(paths, series)
        if run is not None:
            paths, labels = run.reorder(list(paths)), run.reorder(labels)
        eval_texts = named_texts(list(texts or ()), list(general_texts or ()))
        settings = settings or SpectralSettings(device=device)
        resolved_device = settings.torch_device   # resolved once, carried by the settings
        checkpoints: list[Checkpoint] = []
        try:
            for path, label in zip(paths, unique_labels(paths, labels)):
                checkpoints.append(open_checkpoint(path, label=label))
            layouts = [layout_of(c) for c in checkpoints]
            alignment = require_same_model(checkpoints, layouts=layouts)
            layout = layouts[0]
        except BaseException:
            for ckpt in checkpoints:
                ckpt.close()
            raise
        return cls(checkpoints=checkpoints, layout=layout, alignment=alignment, settings=settings,
                   cache=Cache(cache_dir), device=resolved_device, eval_texts=eval_texts,
                   series=run.in_step_order() if run is not None else None)

    def close(self) -> None:
        """Release the checkpoints' file handles, the loss's loaded model and a Ray the executor started;
        write the cache entries still staged (a pack)."""
        self._previewer = None
        for ckpt in self.checkpoints:
            ckpt.close()
        if self.executor is not None:
            self.executor.close()
        from analysis.run.cache import flush_cache

        flush_cache(self.cache)

    @property
    def base(self) -> "Checkpoint":
        return self.checkpoints[0]

    @property
    def targets(self) -> list["Checkpoint"]:
        return self.checkpoints[1:]

    @property
    def labels(self) -> list[str]:
        return [c.label for c in self.checkpoints]

    @property
    def marks_dirty(self) -> bool:
        """True when the marks changed since the last export."""
        return frozenset(self.marks) != self.marks_saved

    # ---- nodes -----------------------------------------------------------------------------
    def module_of(self, node: Node) -> "Module | None":
        """The layout module a matrix node names (None for virtual q/k/v/o of fused attention)."""
        if node.module is None:
            return None
        if node.layer is None:
            return next((m for m in self.layout.globals if m.name == node.module), None)
        return next((m for m in self.layout.layers[node.layer].modules if m.name == node.module), None)

    def is_projection(self, node: Node) -> bool:
        """True for q/k/v/o nodes of a layer when the model's heads are known."""
        return node.layer is not None and node.module in HEAD_PROJECTIONS and self.layout.heads_available

    def unavailable(self, node: Node) -> str | None:
        """Why `node` has no matrix to analyse (a sentence), or None when it has one."""
        if node.module is None:
            return "Select a matrix or a head (l expands a layer) to see its spectrum."
        if node.head is not None and not self.layout.heads_available:
            return f"Heads are not available for this model: {self.layout.heads_reason}"
        if node.head is None:
            module = self.module_of(node)
            if module is None and self.is_projection(node):
                return f"The {node.module} projection is stored fused with others: select one of its heads."
            if module is None:
                return f"No module {node.module!r} here."
            if len(module.shape) != 2:
                return f"{module.tensor} is a {len(module.shape)}-D tensor {tuple(module.shape)}: it has no spectrum."
        return None

    def only_in(self, node: Node) -> tuple[str, ...] | None:
        """The labels of the checkpoints that hold the node's tensor when some lack it (SPEC §1: listed, not
        fatal; rxnfp's `cls.predictions.decoder.weight` is only in `bert_pretrained`), else None."""
        if node.module is None:
            return None
        try:
            tensor = self.tensor_of(node)
        except (DiffractError, IndexError, KeyError):  # no stored tensor behind this node
            return None
        owners = tuple(self.alignment.present_in.get(tensor, ()))
        return owners if len(owners) < len(self.checkpoints) else None

    def _having(self, node: Node, checkpoints: Sequence["Checkpoint"]) -> list["Checkpoint"]:
        """Those of `checkpoints` that hold the node's tensor (all of them for a shared tensor)."""
        owners = self.only_in(node)
        return list(checkpoints) if owners is None else [c for c in checkpoints if c.label in owners]

    def delta_unavailable(self, node: Node) -> str | None:
        """Why the node has no ΔW to show (a sentence), or None: the base or every target lacks its tensor."""
        reason = self.unavailable(node)
        if reason:
            return reason
        owners = self.only_in(node)
        if owners is not None and (self.base.label not in owners or not self._having(node, self.targets)):
            return f"{self.tensor_of(node)} is only in {', '.join(owners)}: there is no ΔW to compare."
        return None

    def slice_of(self, node: Node) -> dict[str, Any] | None:
        """The cache-key slice of a node, as the scan writes it (None for a whole stored matrix)."""
        from analysis.run.scan import head_slice_key, module_slice

        if node.head is not None:
            return head_slice_key(node.module, node.head)
        module = self.module_of(node)
        return module_slice(module) if module is not None else None

    def tensor_of(self, node: Node) -> str:
        """Normalised name of the stored tensor a node reads."""
        if node.head is not None:
            return self.layout.projection(node.layer, node.module).tensor  # type: ignore[arg-type]
        module = self.module_of(node)
        if module is None:
            return self.layout.projection(node.layer, node.module).tensor  # type: ignore[arg-type]
        return module.tensor

    def describe(self, node: Node) -> str:
        """One line naming what a node analyses, e.g. `layers.3.self_attn.q_proj.weight · head 5`."""
        text = self.tensor_of(node)
        if node.head is not None:
            kind = "kv head" if node.module in ("k", "v") else "head"
            text += f" · {kind} {node.head}"
        return text

    def matrix(self, ckpt: "Checkpoint", node: Node) -> "torch.Tensor":
        """The logical (out × in) matrix of a node in `ckpt` (a head slice or a module), compute dtype."""
        import torch

        from analysis.model.heads import head_slice, module_matrix

        dtype = self.settings.torch_dtype
        if node.head is not None:
            return head_slice(ckpt, self.layout, node.layer, node.module, node.head, dtype=dtype)
        module = self.module_of(node)
        if module is None:
            raise DiffractError(self.unavailable(node) or f"no matrix for {node.module}")
        return module_matrix(ckpt, module, dtype=dtype)

    # ---- engine calls (all per-node numbers come from analysis.run.scan.node_metrics) ------------
    def _node_metrics(self, ckpt: "Checkpoint", node: Node, *, delta: bool, probe: bool,
                      metrics_only: bool = False) -> dict[str, Any]:
        """`scan.node_metrics` of a node (its row + `eigenvalues`); with `probe`, cache hits only
        (raises `CacheMiss` instead of computing); `metrics_only` accepts a hit without eigenvalues."""
        from analysis.run.scan import node_metrics

        cache = ProbeCache(self.cache, metrics_only) if probe else self.cache
        return node_metrics(ckpt, self.layout, node.layer, node.module, node.head,
                            delta_against=self.base if delta else None, settings=self.settings, cache=cache)

    def _checkpoint_spectrum(self, ckpt: "Checkpoint", node: Node, probe: bool) -> CheckpointSpectrum:
        from analysis.spectral.spectra import fit_lines

        row = self._node_metrics(ckpt, node, delta=False, probe=probe)
        evals = _np(row.pop("eigenvalues"))
        rows, cols = _shape(row)
        lines = fit_lines(evals, row, max(rows, cols), min(rows, cols)) if evals.size else {}
        return CheckpointSpectrum(ckpt.label, evals, row, lines)

    # ---- spectra ---------------------------------------------------------------------------
    def cached_spectrum(self, node: Node) -> SpectrumResult | None:
        """The node's spectra when every checkpoint's is in the cache (small file reads), else None."""
        if self.unavailable(node):
            return None
        try:
            spectra = tuple(self._checkpoint_spectrum(c, node, probe=True)
                            for c in self._having(node, self.checkpoints))
        except CacheMiss:
            return None
        return SpectrumResult(self.describe(node), _shape(spectra[0].metrics), spectra)

    def spectrum(self, node: Node, progress: ProgressFn = _no_progress,
                 cancelled: CancelledFn = _never) -> SpectrumResult:
        """ESD and SPEC §3 metrics of the node in every checkpoint (through the scan's cache entries)."""
        reason = self.unavailable(node)
        if reason:
            raise DiffractError(reason)
        spectra = []
        having = self._having(node, self.checkpoints)
        n = len(having)
        for i, ckpt in enumerate(having):
            if cancelled():
                raise Cancelled()
            progress(i, n, f"spectrum of {ckpt.label}")
            spectra.append(self._checkpoint_spectrum(ckpt, node, probe=False))
        progress(n, n, "done")
        return SpectrumResult(self.describe(node), _shape(spectra[0].metrics), tuple(spectra))

    # ---- evolution along a series (SPEC §10) --------------------------------------------------
    def series_order(self) -> tuple[list["Checkpoint"], list[int | None]]:
        """The checkpoints in step order and their steps for a series (the session's own order); else as opened."""
        if self.series is None:
            return list(self.checkpoints), [None] * len(self.checkpoints)
        return self.series.reorder(self.checkpoints), list(self.series.steps)

    def _row(self, ckpt: "Checkpoint", node: Node, against: "Checkpoint | None", probe: bool = False
             ) -> dict[str, Any]:
        """The scan row of a node in `ckpt` (of ΔW against `against` when given), through the cache (with
        `probe`, cache hits only: `CacheMiss` instead of computing)."""
        from analysis.run.scan import node_metrics

        cache = ProbeCache(self.cache, metrics_only=True) if probe else self.cache
        row = node_metrics(ckpt, self.layout, node.layer, node.module, node.head, delta_against=against,
                           settings=self.settings, cache=cache)
        row.pop("eigenvalues", None)
        return row

    def _metric_along(self, ordered: Sequence["Checkpoint"], node: Node, metric: str, against: str = "first",
                      probe: bool = False, cancelled: CancelledFn = _never) -> tuple[float | None, ...]:
        """`metric` of the node in each checkpoint (a `delta_*` metric: of ΔW against the first, or with
        `against="previous"` the one before; None at the first)."""
        delta = metric.startswith("delta_")
        having = {c.label for c in self._having(node, ordered)}
        out: list[float | None] = []
        for i, ckpt in enumerate(ordered):
            if cancelled():
                raise Cancelled()
            if ckpt.label not in having or (delta and i == 0):
                out.append(None)
                continue
            base = (ordered[i - 1] if against == "previous" else ordered[0]) if delta else None
            value = self._row(ckpt, node, against=base, probe=probe).get(metric)
            out.append(None if value is None else float(value))
        return tuple(out)

    def evolution(self, node: Node, metric: str, against: str = "first", progress: ProgressFn = _no_progress,
                  cancelled: CancelledFn = _never) -> EvolutionResult:
        """`metric` (a scan-row column: alpha, stable_rank, …, delta_rel, …; or HEAD_R, the head score r) of the
        node against step, with one line per head of a q/k/v/o projection, or per matrix of a layer node; Δ
        metrics against the first step, or the previous one with `against="previous"` (SPEC §10)."""
        if against not in ("first", "previous"):
            raise ValueError(f"against must be 'first' or 'previous', not {against!r}")
        if metric == HEAD_R:
            return self._head_r_evolution(node, against, progress, cancelled)
        ordered, steps = self.series_order()
        along = partial(self._metric_along, ordered, metric=metric, against=against, cancelled=cancelled)
        title = f"{metric} · layer {node.layer}" if node.module is None else f"{metric} · {self.describe(node)}"
        values: tuple[float | None, ...] = ()
        lines: list[EvolutionLine] = []
        if node.module is not None:
            reason = self.unavailable(node)
            if reason and not (self.is_projection(node) and node.head is None):
                raise DiffractError(reason)
            if not reason:
                values = along(node)
            if self.is_projection(node) and node.head is None:
                count = self.layout.num_kv_heads if node.module in ("k", "v") else self.layout.num_heads
                for h in range(count):
                    progress(h, count, f"{metric} of head {h}")
                    lines.append(EvolutionLine(f"head {h}", along(_replace_head(node, h))))
        elif node.layer is not None:
            modules = [m for m in self.layout.layers[node.layer].modules if len(m.shape) == 2]
            for i, m in enumerate(modules):
                progress(i, len(modules), f"{metric} of {m.name}")
                lines.append(EvolutionLine(m.name, along(_replace_head(node, None, module=m.name))))
        return EvolutionResult(title, metric, tuple(c.label for c in ordered), tuple(steps), values, tuple(lines))

    def series_info(self) -> "Series | None":
        """The session's series (steps and tokens in step order, resolved once at open), or None."""
        return self.series

    def known_along(self, node: Node, metric: str, against: str = "first") -> tuple[float | None, ...] | None:
        """The node's own `metric` per checkpoint in step order from the cache only (the tree's sparklines), or
        None when some value is not cached or the node has no own value (a layer, a fused projection, HEAD_R)."""
        if metric == HEAD_R or node.module is None or self.unavailable(node):
            return None
        ordered, _ = self.series_order()
        try:
            return self._metric_along(ordered, node, metric, against, probe=True)
        except CacheMiss:
            return None

    def _head_r_evolution(self, node: Node, against: str, progress: ProgressFn, cancelled: CancelledFn
                          ) -> EvolutionResult:
        """Head score r (SPEC §4) along the series: of a head (its projection's r, and the whole head's for a q/o
        head), one line per head of a projection (its r) or of a layer (the whole head's r)."""
        from types import SimpleNamespace

        from analysis.run.grids import update_magnitude_grids

        ordered, steps = self.series_order()
        title = f"r · layer {node.layer}" if node.module is None else f"r · {self.describe(node)}"
        if not self.layout.heads_available:
            raise DiffractError(f"heads are not available for this model: {self.layout.heads_reason}")
        if node.layer is None or (node.module is not None and node.module not in HEAD_PROJECTIONS):
            raise DiffractError("the head score r is per head: select a layer, a q/k/v/o projection or a head")
        grids: list[dict[str, np.ndarray] | None] = [None]
        for i in range(1, len(ordered)):
            base = ordered[i - 1] if against == "previous" else ordered[0]
            pair = SimpleNamespace(checkpoints=[base, ordered[i]], layout=self.layout, settings=self.settings,
                                   cache=self.cache)
            progress(i - 1, len(ordered) - 1, f"head energies of {ordered[i].label}")
            grids.append(update_magnitude_grids(pair, 0, cancel=cancelled).grids)

        def along(proj: str, head: int) -> tuple[float | None, ...]:
            return tuple(None if g is None else float(g[proj][node.layer, head]) for g in grids)

        kv = node.module in ("k", "v")
        first_query = (lambda g: self.layout.query_heads_of(g)[0]) if kv else (lambda h: h)
        values: tuple[float | None, ...] = ()
        lines: list[EvolutionLine] = []
        if node.module is None:
            lines = [EvolutionLine(f"head {h}", along(WHOLE, h)) for h in range(self.layout.num_heads)]
        elif node.head is None:
            count = self.layout.num_kv_heads if kv else self.layout.num_heads
            lines = [EvolutionLine(f"head {h}", along(node.module, first_query(h))) for h in range(count)]
        else:
            values = along(node.module, first_query(node.head))
            if not kv:
                lines = [EvolutionLine("whole head", along(WHOLE, node.head))]
        return EvolutionResult(title, HEAD_R, tuple(c.label for c in ordered), tuple(steps), values, tuple(lines))

    def alpha_summary(self, progress: ProgressFn = _no_progress, cancelled: CancelledFn = _never) -> "AlphaSummary":
        """Median α of each module kind per checkpoint in step order (`series.median_alpha_by_kind`) from a scan
        of the matrices (no heads, no deltas) through the cache; `Cancelled` when `cancelled()` turned True."""
        from analysis.run.scan import scan
        from analysis.run.series import median_alpha_by_kind

        ordered, steps = self.series_order()
        rows = list(scan(ordered, heads=False, delta=False, settings=self.settings, cache=self.cache,
                         progress=progress, cancel=cancelled))
        if cancelled():
            raise Cancelled()
        return median_alpha_by_kind(rows, [c.label for c in ordered], steps)

    # ---- deltas ----------------------------------------------------------------------------
    def _curve_key(self, target: "Checkpoint", node: Node) -> str:
        return self.cache.key(fingerprint=[self.base.fingerprint, target.fingerprint], tensor=self.tensor_of(node),
                              slice=self.slice_of(node), operation=f"ui/a1-curve/v{UI_OPERATION_VERSION}",
                              settings=self.settings.key(), dtype=self.settings.dtype,
                              device_kind=self.device.type)

    def _agreement_curve(self, target: "Checkpoint", node: Node, probe: bool) -> np.ndarray:
        """(3 × K): k, A1 left agreement of the top-k singular vectors of W₀ and W_d, noise floor √(2 ln k / d)."""
        key = self._curve_key(target, node)
        hit = self.cache.get_array(key)
        if hit is not None:
            return hit
        if probe:
            raise CacheMiss(key)
        from analysis.deltas.delta import avg_max_agreement, noise_floor, top_svd

        W0 = self.matrix(self.base, node).to(self.device)
        Wd = self.matrix(target, node).to(self.device)
        s0, sd = top_svd(W0), top_svd(Wd)
        ks = agreement_ks(int(s0.S.shape[-1]))
        curve = np.array([ks,
                          [float(avg_max_agreement(s0.U[..., :k], sd.U[..., :k])) for k in ks],
                          [noise_floor(k, int(W0.shape[0])) for k in ks]], dtype=np.float64)
        self.cache.put_array(key, curve)
        return curve

    def _target_delta(self, target: "Checkpoint", node: Node, probe: bool) -> TargetDelta:
        import torch

        from analysis.deltas.truncation import truncation_curve

        row = self._node_metrics(target, node, delta=True, probe=probe)
        evals = _np(row.pop("eigenvalues"))
        if row.get("unchanged"):  # bit-identical to the base: ΔW = 0 has no spectrum, curve or agreement
            row["truncatable_fraction"] = None
            empty = np.empty(0)
            return TargetDelta(target.label, empty, row, empty, empty, empty, empty, empty, empty)
        n_big = max(int(row.get("rows") or 0), int(row.get("cols") or 0), 1)
        sigma = np.sqrt(np.clip(evals, 0.0, None) * n_big)[::-1].copy()       # λ = σ²/N (SPEC §3)
        curve = truncation_curve(torch.from_numpy(sigma))
        row["truncatable_fraction"] = curve.truncatable_fraction()
        ks, agreement, floor = self._agreement_curve(target, node, probe)
        if ks.size:
            row.setdefault("avg_max_l_agreement", float(agreement[-1]))
            row.setdefault("a1_noise_floor_l", float(floor[-1]))
        return TargetDelta(target.label, sigma, row, _np(curve.ts), _np(curve.kept_energy), _np(curve.error),
                           ks, agreement, floor)

    def cached_delta(self, node: Node) -> DeltaResult | None:
        """The node's deltas when every target's is in the cache, else None."""
        if self.delta_unavailable(node):
            return None
        try:
            deltas = tuple(self._target_delta(t, node, probe=True) for t in self._having(node, self.targets))
        except CacheMiss:
            return None
        return DeltaResult(self.describe(node), _shape(deltas[0].metrics), deltas)

    def delta(self, node: Node, progress: ProgressFn = _no_progress,
              cancelled: CancelledFn = _never) -> DeltaResult:
        """ΔW of the node for every target that holds its tensor: σ(ΔW), truncation curve, ρ and the A1
        agreement-vs-k curve (all empty for a target that left the node bit-identical: `unchanged`)."""
        reason = self.delta_unavailable(node)
        if reason:
            raise DiffractError(reason)
        deltas = []
        targets = self._having(node, self.targets)
        n = len(targets)
        for i, target in enumerate(targets):
            if cancelled():
                raise Cancelled()
            progress(i, n, f"delta of {target.label}")
            deltas.append(self._target_delta(target, node, probe=False))
        progress(n, n, "done")
        return DeltaResult(self.describe(node), _shape(deltas[0].metrics), tuple(deltas))

    # ---- badges ----------------------------------------------------------------------------
    def known_badge(self, node: Node) -> dict[str, Any] | None:
        """`pl_alpha` (+ reliability) of the base and `delta_rel` (+ `unchanged`) of the first target, from the
        cache only."""
        if self.unavailable(node):
            return None
        out: dict[str, Any] = {}
        try:
            row = self._node_metrics(self.base, node, delta=False, probe=True, metrics_only=True)
            out["pl_alpha"] = row.get("pl_alpha")
            out["pl_alpha_reliable"] = row.get("pl_alpha_reliable", True)
        except CacheMiss:
            pass
        try:
            if self.delta_unavailable(node) is None and self.targets[0] in self._having(node, self.targets):
                row = self._node_metrics(self.targets[0], node, delta=True, probe=True, metrics_only=True)
                out["delta_rel"] = row.get("delta_rel")
                out["unchanged"] = bool(row.get("unchanged"))
        except CacheMiss:
            pass
        return out or None

    # ---- whole model -----------------------------------------------------------------------
    def compute_all(self, progress: ProgressFn = _no_progress, cancelled: CancelledFn = _never,
                    on_node: Callable[[Node, dict[str, Any]], None] | None = None) -> int:
        """Fill the cache with the scan of every matrix, head and delta (`analysis.run.scan.scan`).

        `on_node(node, badge)` receives base α and the first target's relative update as rows arrive.
        Returns the number of rows. Raises `Cancelled` when `cancelled()` turned True, and a DiffractError naming
        the first failure when some matrices had NaN/inf entries (after caching all the others).
        """
        from types import SimpleNamespace as NS

        from analysis.run.scan import scan

        base, first = self.base.label, self.targets[0].label

        count = 0
        failures: list = []  # a NaN/inf matrix is skipped (its node shows the error), the rest still cached
        for row in scan(self.checkpoints, heads=self.layout.heads_available, delta=True, settings=self.settings,
                        cache=self.cache, progress=progress, cancel=cancelled, on_failure=failures.append,
                        executor=self.executor):
            count += 1
            if on_node is None:
                continue
            head = row.get("head") if row.get("module") in ("q", "o") else row.get("kv_head")
            node = NS(layer=row.get("layer"), module=row.get("module"), head=head)
            if row.get("operation") == "weight" and row.get("checkpoint") == base:
                on_node(node, {"pl_alpha": row.get("pl_alpha"),
                               "pl_alpha_reliable": row.get("pl_alpha_reliable", True)})
            elif row.get("operation") == "delta" and row.get("checkpoint") == first:
                on_node(node, {"delta_rel": row.get("delta_rel"), "unchanged": bool(row.get("unchanged"))})
        if cancelled():
            raise Cancelled()
        if failures:
            raise DiffractError(f"{len(failures)} matrices could not be computed, the other {count} are cached; "
                                f"first: {failures[0].describe()}", hint="check that checkpoint for overflowed weights")
        return count

    def scan_rows(self, progress: ProgressFn = _no_progress, cancelled: CancelledFn = _never) -> "Iterator[dict]":
        """Every scan row (matrices, heads, deltas) of the session's checkpoints through the cache, as
        `analysis.run.scan.scan` yields them; stops early (no error) when `cancelled()` turns True."""
        from analysis.run.scan import scan

        yield from scan(self.checkpoints, heads=self.layout.heads_available, delta=True, settings=self.settings,
                        cache=self.cache, progress=progress, cancel=cancelled)

    # ---- heads grids (analysis.run.grids; cached under the session's dtype and device kind) ----
    def head_energies(self, target_index: int, progress: ProgressFn = _no_progress,
                      cancelled: CancelledFn = _never) -> "RewindInputs":
        """Per-projection head energies of one target against the base (what r and the rewind plans use)."""
        from analysis.run.grids import head_energy_inputs

        return head_energy_inputs(self, target_index, progress, cancelled)

    def magnitude_grids(self, target_index: int, progress: ProgressFn = _no_progress,
                        cancelled: CancelledFn = _never) -> "MagnitudeGrids":
        """Update magnitude r of every head, whole head and per projection, for one target."""
        from analysis.run.grids import update_magnitude_grids

        return update_magnitude_grids(self, target_index, progress, cancelled)

    def a1_grid(self, target_index: int, projection: str, progress: ProgressFn = _no_progress,
                cancelled: CancelledFn = _never) -> "HeadGrid":
        """A1 singular-vector agreement of W₀ and W_d of every head slice of one projection."""
        from analysis.run.grids import a1_grid

        return a1_grid(self, target_index, projection, progress, cancelled)

    def agreement_grids(self, progress: ProgressFn = _no_progress,
                        cancelled: CancelledFn = _never) -> "AgreementGrids":
        """A2/A3 domain agreement of every pair of targets (and their mean), with classification counts."""
        from analysis.run.grids import agreement_grids

        return agreement_grids(self, progress, cancelled)

    def alpha_grid(self, ckpt_index: int, projection: str, progress: ProgressFn = _no_progress,
                   cancelled: CancelledFn = _never) -> "HeadGrid":
        """Power-law α of every head slice of one projection in one checkpoint (the scan's cache entries)."""
        from analysis.run.grids import alpha_grid

        return alpha_grid(self, ckpt_index, projection, progress, cancelled)

    # ---- rewind (analysis.edit.rewind) -------------------------------------------------------
    def rewind_inputs(self, target_index: int, reference_index: int | None = None,
                      progress: ProgressFn = _no_progress, cancelled: CancelledFn = _never) -> "RewindInputs":
        """Head energies of a target (cached), and with a reference also the reference's and their A2."""
        if reference_index is None:
            return self.head_energies(target_index, progress, cancelled)
        from analysis.edit.rewind import rewind_inputs

        return rewind_inputs(self.base, self.targets[target_index], self.targets[reference_index],
                             layout=self.layout, progress=progress, cancel=cancelled)

    def rewind_head_count(self, fraction: float) -> int:
        """⌊f·L·H⌋ heads a fraction chooses (SPEC §6)."""
        from analysis.edit.rewind import head_count
        from analysis.edit.rewind_list import Architecture

        return head_count(fraction, Architecture.from_layout(self.layout))

    def rewind_plan(self, inputs: "RewindInputs", target_index: int, reference_index: int | None, *,
                    pattern: str, fraction: float | None, heads: Sequence[tuple[int, int]] | None,
                    gqa_policy: str, variant: str, score: str = "rel_frob") -> tuple["RewindList", "RewindPreview"]:
        """The SPEC §6 list a pattern chooses from `inputs` (by `score`; taylor needs `inputs.taylor`), and its
        preview."""
        from analysis.edit.rewind import checkpoint_ref, plan_from_inputs, preview

        reference = self.targets[reference_index] if reference_index is not None else None
        rl = plan_from_inputs(inputs, base=checkpoint_ref(self.base), target=checkpoint_ref(self.targets[target_index]),
                              reference=checkpoint_ref(reference) if reference is not None else None,
                              pattern=pattern, fraction=fraction, heads=heads, score=score,
                              gqa_policy=gqa_policy, variant=variant)
        return rl, preview(rl, inputs)

    def write_rewind_list(self, rl: "RewindList", path: str | Path) -> Path:
        """Write a rewind list atomically (SPEC §6 JSON)."""
        from analysis.edit.rewind_list import write_rewind_list

        return write_rewind_list(rl, Path(path).expanduser())

    def apply_rewind(self, rl: "RewindList", out_dir: str | Path, progress: ProgressFn = _no_progress,
                     cancelled: CancelledFn = _never, force: bool = False) -> "WriteResult":
        """Write the rewound target into a new folder (`analysis.edit.rewind.apply_rewind`; `force` replaces an
        existing one, which the app asks about first); `Cancelled` stops it between tensors and leaves no output."""
        from analysis.edit.rewind import apply_rewind
        from analysis.progress import check

        def step(done: int, total: int | None, text: str) -> None:
            check(cancelled)
            progress(done, total, text)

        return apply_rewind(rl, out_dir, force=force, progress=step)

    # ---- the loss (analysis.run.loss_preview; SPEC §9) ----------------------------------------
    def add_eval_text(self, path: str | Path, role: str = "domain") -> str:
        """Add a domain or general text of the loss; returns its name (a bad file is one DiffractError)."""
        from analysis.run.loss_preview import add_text

        self.eval_texts = add_text(self.eval_texts, path, role)
        return next(t.name for t, r in reversed(self.eval_texts) if r == role)

    def loss_previewer(self) -> Any:
        """The one `LossPreviewer` of the session (a target model loaded on first use)."""
        from analysis.run.loss_preview import LossPreviewer

        if self._previewer is None:
            self._previewer = LossPreviewer(self.cache, self.device)
        return self._previewer

    def loss_preview(self, inputs: "RewindInputs", target_index: int, reference_index: int | None = None, *,
                     windows: int, gqa_policy: str = "group", progress: ProgressFn = _no_progress,
                     cancelled: CancelledFn = _never) -> "LossPreview":
        """Loss vs fraction of every pattern on every text for one target, with base / target levels."""
        ref = self.targets[reference_index] if reference_index is not None else None
        return self.loss_previewer().preview(self.base, self.targets[target_index], ref, self.layout, inputs,
                                             self.eval_texts, windows=windows, tokens=self.eval_tokens,
                                             gqa_policy=gqa_policy, progress=progress, cancelled=cancelled)

    def plan_loss(self, rl: "RewindList", target_index: int, *, windows: int, progress: ProgressFn = _no_progress,
                  cancelled: CancelledFn = _never) -> "PlanLoss":
        """The measured loss of one plan (the marked heads, the current pattern) on every text."""
        return self.loss_previewer().plan(self.base, self.targets[target_index], self.layout, rl, self.eval_texts,
                                          windows=windows, tokens=self.eval_tokens, progress=progress,
                                          cancelled=cancelled)

    def taylor_grid(self, target_index: int, *, windows: int, progress: ProgressFn = _no_progress,
                    cancelled: CancelledFn = _never) -> "torch.Tensor":
        """The target's (L × H) Taylor scores (SPEC §9) on the general texts, else the domain texts, with
        N = `windows`; cached per (target, base, texts, T, N) for the session."""
        from analysis.run.loss_preview import taylor_texts

        target = self.targets[target_index]
        texts = tuple((t.sha256, t.name, r) for t, r in taylor_texts(self.eval_texts))
        key = (target.fingerprint, self.base.fingerprint, texts, self.eval_tokens, windows)
        if key not in self._taylor:
            self._taylor[key] = self.loss_previewer().taylor(
                self.base, target, self.layout, self.eval_texts, windows=windows, tokens=self.eval_tokens,
                progress=progress, cancelled=cancelled)
        return self._taylor[key]

    # ---- marks and export ------------------------------------------------------------------
    def toggle_mark(self, layer: int, head: int) -> bool:
        """Mark or unmark query head (layer, head); returns True when it is now marked."""
        if not self.layout.heads_available:
            raise DiffractError(f"heads are not available for this model: {self.layout.heads_reason}")
        if not (0 <= layer < self.layout.num_layers and 0 <= head < self.layout.num_heads):
            raise DiffractError(f"no head L{layer} h{head} in this model")
        key = (layer, head)
        if key in self.marks:
            self.marks.discard(key)
            return False
        self.marks.add(key)
        return True

    def rewind_list(self, target_index: int = 0) -> "RewindList":
        """The SPEC §6 rewind list of the marked heads (pattern `manual`, GQA policy `group`) for one target.

        Scores are left null: a manual choice is not ranked, and scoring would read every projection.
        """
        from analysis.edit.rewind import checkpoint_ref, entries_for_heads
        from analysis.edit.rewind_list import Architecture, Pattern, RewindList, validate_rewind_list
        from analysis.run.provenance import tool_version

        if not self.marks:
            raise DiffractError("no heads are marked", hint="press space on a q or o head to mark it")
        arch = Architecture.from_layout(self.layout)
        heads = sorted(self.marks)
        rl = RewindList(base=checkpoint_ref(self.base), target=checkpoint_ref(self.targets[target_index]),
                        reference=None, architecture=arch,
                        pattern=Pattern(name="manual", fraction=len(heads) / (arch.layers * arch.heads),
                                        score="rel_frob", gqa_policy="group"),
                        heads=entries_for_heads(heads, arch, "group", None), created_by=tool_version(),
                        settings={"source": "diffract-tui explorer marks", **self.settings.key()})
        return validate_rewind_list(rl)

    def export_marks(self, path: str | Path, target_index: int = 0) -> Path:
        """Write the marked heads' rewind list atomically to `path`; the marks count as saved."""
        out = self.write_rewind_list(self.rewind_list(target_index), path)
        self.marks_saved = frozenset(self.marks)
        return out


def agreement_ks(M: int, points: int = AGREEMENT_KS_MAX) -> list[int]:
    """Distinct log-spaced k in [1, M] (always including M) for the agreement-vs-k curve."""
    if M <= 0:
        return []
    ks = sorted({int(round(x)) for x in np.geomspace(1, M, num=min(points, M))} | {M})
    return [k for k in ks if 1 <= k <= M]


def _shape(row: dict[str, Any]) -> tuple[int, int]:
    """(rows, cols) of the logical (out × in) matrix a scan row describes."""
    return int(row.get("rows") or 0), int(row.get("cols") or 0)


def _np(t: Any) -> np.ndarray:
    """A torch tensor or array-like as a float64 numpy array on the CPU."""
    if hasattr(t, "detach"):
        t = t.detach().to("cpu").double().numpy()
    return np.asarray(t, dtype=np.float64)


@dataclass(frozen=True)
class _EvolutionNode:
    """A node the evolution builds for a head or a layer's matrix (the Node protocol)."""

    layer: int | None
    module: str | None
    head: int | None


def _replace_head(node: Node, head: int | None, module: str | None = None) -> _EvolutionNode:
    """The node with another head (and module)."""
    return _EvolutionNode(node.layer, module if module is not None else node.module, head)


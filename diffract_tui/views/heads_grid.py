"""View 3 — Heads grid: a layers × heads heatmap of one per-head metric for a chosen pair or domain set.

Metrics (`m` cycles): update magnitude r (SPEC §4 head score), A1 singular-vector agreement of W₀ and W_d,
A2 delta-cosine and A3 subspace agreement of two domains' deltas (≥ 2 CPT checkpoints), and the power-law α
of each head slice. `d` cycles what is compared (base→target, a domain pair, or a checkpoint for α), `p`
the projection (whole head or q/k/v/o), `z` a log colour scale. Arrows/hjkl move over cells once the grid
has focus (tab), Enter opens the head in the tree, space marks it.

The whole-model passes run in a thread worker through the engine (`analysis.edit.rewind.rewind_inputs` for
head energies, `analysis.deltas.agreement.domain_agreement`, `analysis.deltas.delta.batched_delta_metrics`,
`analysis.run.scan.node_metrics`) and their grids are kept in the session's persistent cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Label

from analysis.run.session import Cancelled
from diffract_tui.messages import OpenNode, ToggleMark
from diffract_tui.node import NodeRef
from diffract_tui.views import NodeView
from diffract_tui.views.worker import CancelledFn, EngineWork, ProgressFn
from diffract_tui.widgets.heatmap import Heatmap

if TYPE_CHECKING:  # pragma: no cover
    from analysis.edit.rewind import RewindInputs
    from analysis.run.session import ExplorerSession

KEY_HINT = "keys: m metric · d pair · p proj · z log · tab grid⇄tree · enter open · space mark"
UI_GRID_VERSION = 1          # bump when what these cache entries hold changes
PROJECTIONS = ("q", "k", "v", "o")
WHOLE = "all"

METRICS: tuple[str, ...] = ("r", "a1", "a2", "a3", "alpha")
METRIC_TITLES = {
    "r": "update magnitude r = ‖ΔW_h‖/‖W₀_h‖",
    "a1": "A1 singular-vector agreement of W₀, W_d (left, avg max)",
    "a2": "A2 delta-cosine agreement ⟨Δ₁,Δ₂⟩/‖Δ₁‖‖Δ₂‖",
    "a3": "A3 top-k subspace agreement of Δ₁, Δ₂",
    "alpha": "power-law α of the head slice",
}
METRIC_SHORT = {"r": "r", "a1": "A1", "a2": "A2", "a3": "A3", "alpha": "α"}


# ------------------------------------------------------------------------------------------------
# Engine calls with the session's persistent cache (also used by the Rewind view)
# ------------------------------------------------------------------------------------------------


def _key(session: "ExplorerSession", fingerprints: list[str], operation: str, **extra: Any) -> str:
    return session.cache.key(fingerprint=fingerprints, tensor="attention-heads", slice=extra or None,
                             operation=f"ui/{operation}/v{UI_GRID_VERSION}", settings=session.settings.key(),
                             dtype="float32", device_kind="cpu")


def _layer_progress(progress: ProgressFn, text: str) -> Callable[[int, int], None]:
    def step(done: int, total: int) -> None:
        progress(done / max(1, total), f"{text} {done}/{total} layers")
    return step


def head_energy_inputs(session: "ExplorerSession", target_index: int, progress: ProgressFn) -> "RewindInputs":
    """Per-projection head energies of target − base (`analysis.edit.rewind.rewind_inputs`, no reference), cached
    on disk as a (8, L, H) float64 array; the reconstruction is exact, so plans match `rewind plan`."""
    import torch

    from analysis.deltas.delta import HeadScores, scores_from_energies
    from analysis.edit.rewind import RewindInputs, rewind_inputs
    from analysis.edit.rewind_list import Architecture

    base, target = session.base, session.targets[target_index]
    key = _key(session, [base.fingerprint, target.fingerprint], "head-energies")
    hit = session.cache.get_array(key)
    L, H = session.layout.num_layers, session.layout.num_heads
    if hit is not None and hit.shape == (8, L, H):
        pde = {p: torch.from_numpy(np.array(hit[i])) for i, p in enumerate(PROJECTIONS)}
        pbe = {p: torch.from_numpy(np.array(hit[4 + i])) for i, p in enumerate(PROJECTIONS)}
        d_tot = sum(pde.values(), torch.zeros(L, H, dtype=torch.float64))
        b_tot = sum(pbe.values(), torch.zeros(L, H, dtype=torch.float64))
        hs = HeadScores(scores=scores_from_energies(d_tot, b_tot), delta_energy=d_tot, base_energy=b_tot,
                        projection_delta_energy=pde, projection_base_energy=pbe)
        return RewindInputs(architecture=Architecture.from_layout(session.layout), target=hs)
    inputs = rewind_inputs(base, target, None, layout=session.layout,
                           progress=_layer_progress(progress, f"head energies of {target.label}"))
    hs = inputs.target
    arr = np.stack([hs.projection_delta_energy[p].numpy() for p in PROJECTIONS]
                   + [hs.projection_base_energy[p].numpy() for p in PROJECTIONS])
    session.cache.put_array(key, arr)
    return inputs


def update_magnitude_grids(session: "ExplorerSession", target_index: int, progress: ProgressFn
                           ) -> dict[str, np.ndarray]:
    """r per head: whole head (`analysis.edit.rewind.score_grid`, SPEC §4) and per projection √(‖ΔW^P‖²/‖W₀^P‖²)."""
    from analysis.deltas.delta import scores_from_energies
    from analysis.edit.rewind import score_grid

    hs = head_energy_inputs(session, target_index, progress).target
    out = {WHOLE: score_grid(hs, "rel_frob").numpy()}
    for p in PROJECTIONS:
        out[p] = scores_from_energies(hs.projection_delta_energy[p], hs.projection_base_energy[p]).numpy()
    return out


def _per_query_head(values: np.ndarray, proj: str, session: "ExplorerSession") -> np.ndarray:
    """(…, n) values of the n heads of a projection → (…, H) per query head (k/v: the value of g(h))."""
    if proj in ("q", "o"):
        return values
    groups = [session.layout.kv_group(h) for h in range(session.layout.num_heads)]
    return values[..., groups]


def a1_grid(session: "ExplorerSession", target_index: int, proj: str, progress: ProgressFn,
            cancelled: CancelledFn) -> np.ndarray:
    """A1 `avg_max_l_agreement` (SPEC §4, all components) of each head slice of W₀ and W_d (L × H)."""
    from analysis.deltas.delta import batched_delta_metrics
    from analysis.model.heads import projection_heads

    base, target = session.base, session.targets[target_index]
    key = _key(session, [base.fingerprint, target.fingerprint], "a1-grid", proj=proj)
    hit = session.cache.get_array(key)
    L, H = session.layout.num_layers, session.layout.num_heads
    if hit is not None and hit.shape == (L, H):
        return hit
    out = np.full((L, H), math.nan)
    for layer in range(L):
        if cancelled():
            raise Cancelled()
        progress(layer / L, f"A1 of {proj} heads, layer {layer}")
        b = projection_heads(base, session.layout, layer, proj)
        t = projection_heads(target, session.layout, layer, proj)
        rows = batched_delta_metrics(b, t, spectral=False, agreement=True)
        vals = np.array([r["avg_max_l_agreement"] for r in rows], dtype=np.float64)
        out[layer] = _per_query_head(vals, proj, session)
    session.cache.put_array(key, out)
    return out


@dataclass(frozen=True)
class AgreementGrids:
    """A2/A3 grids of every domain pair (and their mean), whole head and per projection, with the
    per-head magnitude (mean r over domains) and A3's k and random level."""

    pairs: tuple[tuple[int, int], ...]
    a2: dict[tuple, dict[str, np.ndarray]]      # pair or "mean" → projection ("all", q, k, v, o) → (L × H)
    a3: dict[tuple, dict[str, np.ndarray]]
    magnitude: np.ndarray
    k: int
    a3_random: float


MEAN = ("mean",)


def agreement_grids(session: "ExplorerSession", progress: ProgressFn) -> AgreementGrids:
    """`analysis.deltas.agreement.domain_agreement` over all targets, cached as arrays (pairs+mean × 2 × 5 × L × H)."""
    targets = session.targets
    n = len(targets)
    pairs = tuple((i, j) for i in range(n) for j in range(i + 1, n))
    fps = [session.base.fingerprint] + [t.fingerprint for t in targets]
    key = _key(session, fps, "domain-agreement")
    meta_key = _key(session, fps, "domain-agreement-meta")
    import torch

    L, H = session.layout.num_layers, session.layout.num_heads
    names = (WHOLE,) + PROJECTIONS
    hit, meta = session.cache.get_array(key), session.cache.get_json(meta_key)
    if hit is None or meta is None or hit.shape != (len(pairs) + 2, 2, 5, L, H):
        from analysis.deltas.agreement import domain_agreement

        da = domain_agreement(session.base, targets, session.layout,
                              progress=_layer_progress(progress, "A2/A3 of the domains"))
        arr = np.full((len(pairs) + 2, 2, 5, L, H), math.nan)
        for i, pa in enumerate(da.pairs):
            arr[i, 0, 0], arr[i, 1, 0] = pa.a2.numpy(), pa.a3.numpy()
            for j, p in enumerate(PROJECTIONS, 1):
                if p in pa.a2_projection:
                    arr[i, 0, j], arr[i, 1, j] = pa.a2_projection[p].numpy(), pa.a3_projection[p].numpy()
        arr[len(pairs), 0, 0], arr[len(pairs), 1, 0] = da.mean_a2.numpy(), da.mean_a3.numpy()
        for j, p in enumerate(PROJECTIONS, 1):  # per-projection means over the pairs (torch: NaN-safe)
            if all(p in pa.a2_projection for pa in da.pairs):
                arr[len(pairs), 0, j] = torch.stack([pa.a2_projection[p] for pa in da.pairs]).nanmean(0).numpy()
                arr[len(pairs), 1, j] = torch.stack([pa.a3_projection[p] for pa in da.pairs]).nanmean(0).numpy()
        arr[len(pairs) + 1, 0, 0] = da.magnitude.numpy()
        meta = {"k": int(da.k), "a3_random": float(da.a3_random)}
        session.cache.put_array(key, arr)
        session.cache.put_json(meta_key, meta)
        hit = arr
    a2 = {pr: {nm: hit[i, 0, j] for j, nm in enumerate(names)} for i, pr in enumerate(pairs + (MEAN,))}
    a3 = {pr: {nm: hit[i, 1, j] for j, nm in enumerate(names)} for i, pr in enumerate(pairs + (MEAN,))}
    return AgreementGrids(pairs=pairs, a2=a2, a3=a3, magnitude=hit[len(pairs) + 1, 0, 0], k=int(meta["k"]),
                          a3_random=float(meta["a3_random"]))


def alpha_grid(session: "ExplorerSession", ckpt_index: int, proj: str, progress: ProgressFn,
               cancelled: CancelledFn) -> tuple[np.ndarray, bool]:
    """`pl_alpha` of every head slice of one projection in one checkpoint (`analysis.run.scan.node_metrics`,
    sharing the scan's cache entries); returns the (L × H) grid and whether every fit was reliable."""
    from analysis.run.scan import node_metrics

    ckpt = session.checkpoints[ckpt_index]
    layout = session.layout
    L = layout.num_layers
    n = layout.num_heads if proj in ("q", "o") else layout.num_kv_heads
    out = np.full((L, n), math.nan)
    reliable = True
    for layer in range(L):
        for h in range(n):
            if cancelled():
                raise Cancelled()
            progress((layer * n + h) / (L * n), f"α of {ckpt.label} L{layer} {proj} h{h}")
            row = node_metrics(ckpt, layout, layer, proj, h, settings=session.settings, cache=session.cache)
            v = row.get("pl_alpha")
            out[layer, h] = math.nan if v is None else float(v)
            reliable = reliable and bool(row.get("pl_alpha_reliable", True))
    return _per_query_head(out, proj, session), reliable


# ------------------------------------------------------------------------------------------------
# The view
# ------------------------------------------------------------------------------------------------


def unchanged_cells(c: "GridChoice", grid: np.ndarray) -> list[tuple[int, int]]:
    """Heads the target left bit-identical to the base, from an update-magnitude grid: r = √(‖ΔW‖²/‖W₀‖²) is
    exactly 0 only when every entry of the head's slices is equal (other metrics carry no such flag)."""
    if c.metric != "r":
        return []
    return [(int(l), int(h)) for l, h in zip(*np.nonzero(np.asarray(grid) == 0))]


@dataclass(frozen=True)
class GridChoice:
    """What the grid shows: metric, source (target index, domain pair, "mean", or checkpoint index), projection."""

    metric: str
    source: Any
    projection: str


class HeadsGridView(EngineWork, NodeView):
    """The layers × heads heatmap; computes its grids in a worker and keeps them for the session."""

    VIEW_ID = "heads"
    BINDINGS = [
        Binding("m", "cycle_metric", "Next metric (r, A1, A2, A3, α)"),
        Binding("d", "cycle_source", "Next pair / domain / checkpoint"),
        Binding("p", "cycle_projection", "Next projection (all, q, k, v, o)"),
        Binding("z", "toggle_log", "Log / linear colour scale"),
        Binding("tab", "focus_grid", "Grid ⇄ tree focus (grid: arrows/hjkl move, enter opens, space marks)",
                show=False),
    ]
    DEFAULT_CSS = """
    HeadsGridView { layout: vertical; }
    HeadsGridView > #grid-bar { height: 1; width: 1fr; color: $text-muted; }
    HeadsGridView > Heatmap { height: 1fr; }
    HeadsGridView > #grid-info { height: auto; max-height: 3; width: 1fr; color: $text-muted; }
    HeadsGridView > #grid-data { display: none; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.metric_index = 0
        self.source_index: dict[str, int] = {}
        self.projection_index: dict[str, int] = {}
        self.log_scale = False
        self.grids: dict[GridChoice, tuple[np.ndarray, str]] = {}
        self.pending: GridChoice | None = None

    def compose(self) -> ComposeResult:
        yield Label("", id="grid-bar")
        yield Heatmap(id="grid")
        yield Label("", id="grid-info")
        yield DataTable(id="grid-data")  # never shown: the grid's numbers for the app's `x` export

    @property
    def session(self) -> "ExplorerSession":
        return self.app.session

    @property
    def heatmap(self) -> Heatmap:
        return self.query_one(Heatmap)

    # ---- choices ---------------------------------------------------------------------------
    @property
    def metric(self) -> str:
        return METRICS[self.metric_index]

    def sources(self, metric: str) -> list[Any]:
        """What `d` cycles through for a metric."""
        n = len(self.session.targets)
        if metric in ("r", "a1"):
            return list(range(n))
        if metric in ("a2", "a3"):
            pairs: list[Any] = [(i, j) for i in range(n) for j in range(i + 1, n)]
            return pairs + ([MEAN] if len(pairs) > 1 else [])
        return list(range(len(self.session.checkpoints)))

    def projections(self, metric: str) -> tuple[str, ...]:
        return ((WHOLE,) + PROJECTIONS) if metric in ("r", "a2", "a3") else PROJECTIONS

    def choice(self) -> GridChoice | None:
        metric = self.metric
        sources = self.sources(metric)
        if not sources:
            return None
        projs = self.projections(metric)
        return GridChoice(metric, sources[self.source_index.get(metric, 0) % len(sources)],
                          projs[self.projection_index.get(metric, 0) % len(projs)])

    def source_label(self, c: GridChoice) -> str:
        labels = self.session.labels
        if c.metric in ("r", "a1"):
            return f"{labels[0]}→{labels[c.source + 1]}"
        if c.metric in ("a2", "a3"):
            if c.source == MEAN:
                return f"mean over {len(self.sources(c.metric)) - 1} domain pairs"
            i, j = c.source
            return f"{labels[i + 1]} vs {labels[j + 1]} (Δ from {labels[0]})"
        return labels[c.source]

    def projection_label(self, c: GridChoice) -> str:
        return "whole head (q,k,v,o)" if c.projection == WHOLE else f"{c.projection} slices"

    # ---- NodeView contract -----------------------------------------------------------------
    def show_node(self, node: NodeRef) -> None:
        """Follow the tree cursor onto heads, and make sure the current grid is shown or computing."""
        self.node = node
        layout = self.session.layout
        if node.is_head and node.layer is not None and layout.heads_available:
            head = node.head
            if node.module in ("k", "v"):
                head = node.head * max(1, layout.num_heads // max(1, layout.num_kv_heads))
            self.heatmap.move_to(node.layer, head)
        self.heatmap.set_marks(self.session.marks)
        self.refresh_grid()

    def show_message(self, text: str) -> None:
        self.heatmap.clear(text)
        self.query_one("#grid-info", Label).update("")
        self.query_one("#grid-data", DataTable).clear(columns=True)

    def refresh_node(self) -> None:
        self.refresh_grid()

    # ---- drawing ---------------------------------------------------------------------------
    def _update_bar(self, c: GridChoice | None) -> None:
        if c is None:
            text = f"{METRIC_SHORT[self.metric]}  ·  m metric  d pair  p projection"
        else:
            text = f"{METRIC_SHORT[c.metric]} · {self.source_label(c)} · {self.projection_label(c)}"
        self.query_one("#grid-bar", Label).update(text)

    def refresh_grid(self) -> None:
        """Show the chosen grid: from memory, else computed in the worker."""
        layout = self.session.layout
        c = self.choice()
        self._update_bar(c)
        if not layout.heads_available:
            self.show_message(f"Heads are not available for this model: {layout.heads_reason}")
            return
        if c is None:
            self.cancel_work()
            self.show_message(f"{METRIC_TITLES[self.metric]} needs at least two CPT checkpoints of the same "
                              "base (m: next metric).")
            self.result = None
            return
        if c in self.grids:
            self.cancel_work()
            self.pending = None
            self._draw(c)
            return
        if self.pending == c:
            return
        self.pending = c
        self.result = None
        self.heatmap.clear(f"computing {METRIC_SHORT[c.metric]} for {self.source_label(c)}…")
        self.start_work(f"heads grid {METRIC_SHORT[c.metric]}", lambda progress, cancelled:
                        self._compute(c, progress, cancelled), lambda grids: self._delivered(c, grids),
                        fail=self._failed)

    def _failed(self, message: str) -> None:
        self.pending = None
        self.show_message(message)

    def _compute(self, c: GridChoice, progress: ProgressFn, cancelled: CancelledFn
                 ) -> dict[GridChoice, tuple[np.ndarray, str]]:
        """Every grid one engine pass yields for this choice (other projections come along for free)."""
        s = self.session
        out: dict[GridChoice, tuple[np.ndarray, str]] = {}
        if c.metric == "r":
            for proj, grid in update_magnitude_grids(s, c.source, progress).items():
                out[GridChoice("r", c.source, proj)] = (grid, "")
        elif c.metric == "a1":
            grid = a1_grid(s, c.source, c.projection, progress, cancelled)
            note = "k/v: value of the head's kv group" if c.projection in ("k", "v") else ""
            out[c] = (grid, note)
        elif c.metric in ("a2", "a3"):
            from analysis.deltas.agreement import classify
            import torch

            ag = agreement_grids(s, progress)
            for metric in ("a2", "a3"):
                grids = ag.a2 if metric == "a2" else ag.a3
                for source, per_proj in grids.items():
                    for proj, grid in per_proj.items():
                        note = f"k={ag.k}, random {ag.a3_random:.3g}" if metric == "a3" else ""
                        if proj == WHOLE:
                            cls = classify(torch.from_numpy(np.array(grid)), torch.from_numpy(np.array(ag.magnitude)),
                                           agreement_metric=metric)
                            counts = cls.counts()
                            note = (note + "  " if note else "") + (
                                f"agnostic {counts['agnostic']} · specific {counts['specific']} · "
                                f"inert {counts['inert']} (median thresholds)")
                        out[GridChoice(metric, source, proj)] = (np.array(grid), note)
        else:
            grid, reliable = alpha_grid(s, c.source, c.projection, progress, cancelled)
            note = "" if reliable else f"greyed fits: head slices have {s.layout.head_dim} eigenvalues (< 100)"
            out[c] = (grid, note)
        progress(1.0, "done")
        return out

    def _delivered(self, c: GridChoice, grids: dict[GridChoice, tuple[np.ndarray, str]]) -> None:
        self.grids.update(grids)
        if self.pending == c:
            self.pending = None
        if self.choice() == c:
            self._draw(c)
        else:
            self.refresh_grid()

    def _draw(self, c: GridChoice) -> None:
        grid, note = self.grids[c]
        self.result = grid
        same = unchanged_cells(c, grid)
        if same:
            note = (note + "  " if note else "") + f"= {len(same)} head(s) unchanged (bit-identical to the base)"
        self.heatmap.set_data(grid, title=METRIC_TITLES[c.metric], log=self.log_scale, unchanged=same)
        self._fill_export_table(c, grid)
        self.heatmap.set_marks(self.session.marks)
        self.query_one("#grid-info", Label).update((note + "\n" if note else "") + KEY_HINT)

    def _fill_export_table(self, c: GridChoice, grid: np.ndarray) -> None:
        """The shown grid as rows (layer, metric, source, projection, h0 … h{H-1}) for `x`, full precision."""
        table = self.query_one("#grid-data", DataTable)
        table.clear(columns=True)
        table.add_columns("layer", "metric", "compared", "projection", *[f"h{h}" for h in range(grid.shape[1])])
        for layer, row in enumerate(grid):
            table.add_row(str(layer), METRIC_SHORT[c.metric], self.source_label(c), c.projection,
                          *[repr(float(v)) for v in row])

    # ---- actions ---------------------------------------------------------------------------
    def action_cycle_metric(self) -> None:
        """m: the next metric."""
        self.metric_index = (self.metric_index + 1) % len(METRICS)
        self.pending = None
        self.refresh_grid()

    def action_cycle_source(self) -> None:
        """d: the next target, domain pair (and their mean) or checkpoint."""
        n = max(1, len(self.sources(self.metric)))
        self.source_index[self.metric] = (self.source_index.get(self.metric, 0) + 1) % n
        self.pending = None
        self.refresh_grid()

    def action_cycle_projection(self) -> None:
        """p: the next projection (whole head, q, k, v, o)."""
        n = len(self.projections(self.metric))
        self.projection_index[self.metric] = (self.projection_index.get(self.metric, 0) + 1) % n
        self.pending = None
        self.refresh_grid()

    def action_toggle_log(self) -> None:
        """z: log or linear colour scale."""
        self.log_scale = not self.log_scale
        c = self.choice()
        if c is not None and c in self.grids:
            self._draw(c)

    def action_focus_grid(self) -> None:
        """tab: move the focus between the tree and the grid."""
        if self.heatmap.has_focus:
            tree = getattr(self.app, "tree", None)
            if tree is not None and tree.display and tree.parent is not None and tree.parent.display:
                tree.focus()
                return
            self.app.screen.focus_next()
        else:
            self.heatmap.focus()

    def cancel_work(self) -> None:
        self.pending = None
        super().cancel_work()

    def marks_changed(self, marks: frozenset[tuple[int, int]]) -> None:
        """Marks made anywhere (space in the tree or on the grid) show on the grid at once."""
        self.heatmap.set_marks(marks)

    # ---- grid events -----------------------------------------------------------------------
    def on_heatmap_opened(self, event: Heatmap.Opened) -> None:
        event.stop()
        self.post_message(OpenNode(self.cell_node(event.layer, event.head)))

    def cell_node(self, layer: int, head: int) -> NodeRef:
        """The tree node a grid cell stands for in the shown projection: q/o → that head, k/v → the kv head
        the query head reads, whole head → its q node."""
        c = self.choice()
        projection = c.projection if c is not None else WHOLE
        if projection in ("k", "v"):
            return NodeRef(layer, projection, self.session.layout.kv_group(head))
        return NodeRef(layer, "o" if projection == "o" else "q", head)

    def on_heatmap_toggled(self, event: Heatmap.Toggled) -> None:
        """space on a cell: the app toggles that head's one mark (and says so)."""
        event.stop()
        self.post_message(ToggleMark(NodeRef(event.layer, "q", event.head)))

"""View 3 — Heads grid: a layers × heads heatmap of one per-head metric for a chosen pair or domain set.

Metrics (`m` cycles): update magnitude r (SPEC §4 head score), A1 singular-vector agreement of W₀ and W_d,
A2 delta-cosine and A3 subspace agreement of two domains' deltas (≥ 2 CPT checkpoints), and the power-law α
of each head slice. `d` cycles what is compared (base→target, a domain pair, or a checkpoint for α), `p`
the projection (whole head or q/k/v/o), `z` a log colour scale; `,` / `.` step the checkpoint (α) or the target
(r, A1) back / forward along a checkpoint series in step order (argument order when the inputs are no series), and
the bar shows which step is displayed. Arrows/hjkl move over cells once the grid has focus (tab), Enter opens the
head in the tree, space marks it.

The grids come from the engine through the session (`ExplorerSession.magnitude_grids`, `a1_grid`,
`agreement_grids`, `alpha_grid`, computed in `analysis.run.grids` and kept in the session's persistent cache);
this view only runs them in its worker and draws them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Label

from analysis.run.session import HEAD_PROJECTIONS as PROJECTIONS, MEAN, WHOLE
from analysis.run.session import unchanged_cells as engine_unchanged_cells
from diffract_tui.messages import OpenNode, ToggleMark
from diffract_tui.node import NodeRef
from diffract_tui.views import NodeView
from diffract_tui.views.worker import CancelledFn, EngineWork, ProgressFn
from diffract_tui.widgets.heatmap import Heatmap

if TYPE_CHECKING:  # pragma: no cover
    from analysis.run.session import ExplorerSession

KEY_HINT = "keys: m metric · d pair · p proj · z log · tab grid⇄tree · enter open · space mark"
SERIES_KEY_HINT = ", . step back / forward along the series"
STEPPED_METRICS: tuple[str, ...] = ("r", "a1", "alpha")   # a checkpoint (or base→checkpoint) each

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
# The view
# ------------------------------------------------------------------------------------------------


def unchanged_cells(c: "GridChoice", grid: np.ndarray) -> list[tuple[int, int]]:
    """Heads the target left bit-identical to the base: only the update-magnitude grid carries that flag."""
    return engine_unchanged_cells(grid) if c.metric == "r" else []


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
        Binding("comma", "step_checkpoint(-1)", "Series: previous step (α: checkpoint, r/A1: target)",
                key_display=",", show=False),
        Binding("full_stop", "step_checkpoint(1)", "Series: next step (α: checkpoint, r/A1: target)",
                key_display=".", show=False),
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

    def checkpoint_of(self, c: GridChoice) -> int | None:
        """The session index of the checkpoint a stepped choice displays (α: its checkpoint, r/A1: its target)."""
        if c.metric == "alpha":
            return c.source
        return c.source + 1 if c.metric in ("r", "a1") else None

    def step_order(self) -> list[int]:
        """Session indices of the checkpoints `,` / `.` step through: step order for a series, else as given."""
        ordered, _ = self.session.series_order()
        position = {id(ckpt): i for i, ckpt in enumerate(self.session.checkpoints)}
        return [position[id(ckpt)] for ckpt in ordered]

    def step_label(self, c: GridChoice) -> str:
        """`step 20 (3/5)` for the checkpoint a stepped choice displays in a series, else ""."""
        index = self.checkpoint_of(c)
        series = self.session.series_info()
        if index is None or series is None:
            return ""
        order = self.step_order()
        position = order.index(index)
        tokens = series.tokens[position]
        return (f"step {series.steps[position]}" + (f" · {tokens:,} tokens" if tokens is not None else "")
                + f" ({position + 1}/{len(order)})")

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
            step = self.step_label(c)
            text = (f"{METRIC_SHORT[c.metric]} · {self.source_label(c)}" + (f" · {step}" if step else "")
                    + f" · {self.projection_label(c)}")
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
            for proj, grid in s.magnitude_grids(c.source, progress, cancelled).grids.items():
                out[GridChoice("r", c.source, proj)] = (grid, "")
        elif c.metric == "a1":
            hg = s.a1_grid(c.source, c.projection, progress, cancelled)
            out[c] = (hg.values, "k/v: value of the head's kv group" if hg.kv_grouped else "")
        elif c.metric in ("a2", "a3"):
            ag = s.agreement_grids(progress, cancelled)
            for metric in ("a2", "a3"):
                grids = ag.a2 if metric == "a2" else ag.a3
                for source, per_proj in grids.items():
                    for proj, grid in per_proj.items():
                        note = f"k={ag.k}, random {ag.a3_random:.3g}" if metric == "a3" else ""
                        if proj == WHOLE:
                            counts = ag.counts[(metric, source)]
                            note = (note + "  " if note else "") + (
                                f"agnostic {counts['agnostic']} · specific {counts['specific']} · "
                                f"inert {counts['inert']} (median thresholds)")
                        out[GridChoice(metric, source, proj)] = (np.array(grid), note)
        else:
            hg = s.alpha_grid(c.source, c.projection, progress, cancelled)
            note = "" if hg.reliable else f"greyed fits: head slices have {s.layout.head_dim} eigenvalues (< 100)"
            out[c] = (hg.values, note)
        progress(1, 1, "done")
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
        hint = KEY_HINT + (SERIES_KEY_HINT if self.session.series_info() is not None else "")
        self.query_one("#grid-info", Label).update((note + "\n" if note else "") + hint)

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

    def action_step_checkpoint(self, delta: int) -> None:
        """, / .: the previous / next checkpoint in step order (α), or target (r, A1); stops at the ends."""
        metric = self.metric
        c = self.choice()
        if metric not in STEPPED_METRICS or c is None:
            self.app.notify("Steps are for α (a checkpoint), r and A1 (base → a target); A2/A3 compare domain "
                            "pairs (d).", severity="warning", timeout=3)
            return
        order = [i for i in self.step_order() if metric == "alpha" or i != 0]  # r, A1: targets only
        position = order.index(self.checkpoint_of(c)) + delta
        if not 0 <= position < len(order):
            self.app.notify(f"Already at the {'first' if delta < 0 else 'last'} step.", timeout=2)
            return
        index = order[position]
        source = index if metric == "alpha" else index - 1
        self.source_index[metric] = self.sources(metric).index(source)
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

"""View 6 — Evolution: along a checkpoint series (SPEC §10), a metric of the node under the cursor against step,
one line per head of a projection or per matrix of a layer, and a whole-model summary: the median α of each
module kind (q, k, v, o, gate, …: over every layer) against step.

`m` cycles the metric (α, α-weighted, stable rank, effective rank, MP soft rank, spikes, ‖W‖_F, Δ from the
first step, Δ from the previous step, head score r), `s` hides / shows the summary panel. The numbers come from
the engine (`ExplorerSession.evolution`, `ExplorerSession.alpha_summary`) in workers; the tree's sparklines of
the chosen metric are read from the cache only (`ExplorerSession.known_along`). When the inputs are not a
series, the view says so in one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import Label
from textual_plotext import PlotextPlot

from analysis.run.session import HEAD_PROJECTIONS, HEAD_R
from diffract_tui.node import NodeRef
from diffract_tui.views import ExportTable, NodeView, file_part
from diffract_tui.views.worker import run_engine_call
from diffract_tui.widgets.charts import chart_values, clear_plot, legend_key, series_color, series_marker

if TYPE_CHECKING:  # pragma: no cover
    from analysis.run.session import AlphaSummary, EvolutionResult, ExplorerSession, Series  # the public surface

SUMMARY_ID = "evolution-summary"   # the summary's worker group and progress slot
X_LABELS_AT_MOST = 8               # step labels on the x axis at most (evenly thinned beyond)
NOT_A_SERIES = ("Not a checkpoint series: the Evolution view needs checkpoints of one run whose names carry "
                "steps (step-1000, checkpoint-500, org/name@step1000).")


@dataclass(frozen=True)
class EvolutionMetric:
    """One metric `m` cycles to: its short name, the engine's metric name, and what Δ is against."""

    short: str
    metric: str
    against: str = "first"


METRICS: tuple[EvolutionMetric, ...] = (
    EvolutionMetric("α", "pl_alpha"),
    EvolutionMetric("α-weighted", "pl_alpha_weighted"),
    EvolutionMetric("stable rank", "stable_rank"),
    EvolutionMetric("eff. rank", "effective_rank"),
    EvolutionMetric("MP soft rank", "mp_soft_rank"),
    EvolutionMetric("MP spikes", "mp_num_spikes"),
    EvolutionMetric("‖W‖_F", "frob_norm"),
    EvolutionMetric("Δ rel from first", "delta_rel", "first"),
    EvolutionMetric("Δ rel from previous", "delta_rel", "previous"),
    EvolutionMetric("head score r", HEAD_R, "first"),
)


def tokens_label(tokens: int) -> str:
    """A token count the way runs name it: 10K, 1.5B, 2T."""
    for scale, unit in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        if tokens >= scale:
            return f"{tokens / scale:.3g}{unit}"
    return str(tokens)


def step_ticks(steps: Sequence[int], tokens: Sequence[int | None]) -> tuple[list[int], list[str]]:
    """x ticks of a step axis: each step (at most X_LABELS_AT_MOST, evenly thinned, the last always kept),
    labelled `step` or `step·tokens` where the name says its tokens."""
    n = len(steps)
    every = max(1, -(-n // X_LABELS_AT_MOST))
    picks = sorted(set(range(0, n, every)) | {n - 1}) if n else []
    labels = [f"{steps[i]}·{tokens_label(tokens[i])}" if tokens[i] is not None else str(steps[i]) for i in picks]
    return [steps[i] for i in picks], labels


def segments(xs: Sequence[float], ys: Sequence[float | None]) -> list[tuple[list[float], list[float]]]:
    """Runs of consecutive defined points of a line (a Δ metric has none at the first step): drawn one by one."""
    out: list[tuple[list[float], list[float]]] = []
    run_x: list[float] = []
    run_y: list[float] = []
    for x, y in zip(xs, ys):
        if y is None or y != y:  # None or NaN: a gap
            if run_x:
                out.append((run_x, run_y))
            run_x, run_y = [], []
            continue
        run_x.append(float(x))
        run_y.append(float(y))
    if run_x:
        out.append((run_x, run_y))
    return out


def node_lines(node: NodeRef, ev: "EvolutionResult") -> list[tuple[str, tuple[float | None, ...]]]:
    """(name, values) of every line of an evolution: the node's own first (named by the node), then its lines."""
    own = [(node.label(), ev.values)] if ev.values else []
    return own + [(line.name, line.values) for line in ev.lines]


def child_node(node: NodeRef, name: str) -> NodeRef | None:
    """The tree node an evolution line stands for (`head 3` of a projection, `gate` of a layer), if any."""
    if node.layer is None:
        return None
    if node.module is None:
        return None if name.startswith("head ") else NodeRef(node.layer, name)
    if node.head is None and name.startswith("head "):
        return NodeRef(node.layer, node.module, int(name.split()[1]))
    return None


class _SummarySlot:
    """What `run_engine_call` needs of a view, for the summary's own worker group and progress slot (the
    node's evolution and the whole-model summary run side by side, neither cancels the other)."""

    VIEW_ID = SUMMARY_ID

    def __init__(self, app: Any) -> None:
        self.app = app


class EvolutionView(NodeView):
    """The node's metric against step and the whole-model median-α summary, for a checkpoint series."""

    VIEW_ID = "evolution"
    BINDINGS = [
        Binding("m", "cycle_metric", "Next metric (α, α-w, ranks, spikes, ‖W‖, Δ first/previous, r)"),
        Binding("s", "toggle_summary", "Summary panel: hide / show (median α per module kind)"),
    ]
    DEFAULT_CSS = """
    EvolutionView { layout: vertical; }
    EvolutionView > Label { width: 1fr; }
    EvolutionView > #evolution-title { height: 1; text-style: bold; text-wrap: nowrap; text-overflow: ellipsis; }
    EvolutionView > #evolution-legend { height: auto; max-height: 3; }
    EvolutionView > #evolution-plot { height: 1fr; min-height: 6; }
    EvolutionView > #evolution-summary-title { height: 1; text-style: bold; text-wrap: nowrap; text-overflow: ellipsis; }
    EvolutionView > #evolution-summary-legend { height: auto; max-height: 2; }
    EvolutionView > #evolution-summary { height: 1fr; min-height: 6; }
    EvolutionView.-empty > #evolution-plot { display: none; }
    EvolutionView.-no-series > PlotextPlot, EvolutionView.-no-series > #evolution-summary-title,
    EvolutionView.-no-series > #evolution-summary-legend,
    EvolutionView.-no-summary > #evolution-summary, EvolutionView.-no-summary > #evolution-summary-legend {
        display: none;
    }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.metric_index = 0
        self.summary: "AlphaSummary | None" = None
        self.summary_state = "idle"        # idle | running | done | cancelled | failed
        self.summary_shown = True
        self.plotted: list[tuple[str, list[float], list[float]]] = []           # what the node chart drew
        self.summary_plotted: list[tuple[str, list[float], list[float]]] = []   # what the summary chart drew
        self._moving = False

    def compose(self) -> ComposeResult:
        yield Label("", id="evolution-title")
        yield Label("", id="evolution-legend")
        yield PlotextPlot(id="evolution-plot")
        yield Label("", id="evolution-summary-title")
        yield Label("", id="evolution-summary-legend")
        yield PlotextPlot(id="evolution-summary")

    @property
    def session(self) -> "ExplorerSession":
        return self.app.session

    @property
    def choice(self) -> EvolutionMetric:
        return METRICS[self.metric_index % len(METRICS)]

    def series(self) -> "Series | None":
        return self.session.series_info()

    def _label(self, part: str) -> Label:
        return self.query_one(f"#evolution-{part}", Label)

    # ---- NodeView contract -----------------------------------------------------------------
    def show_node(self, node: NodeRef) -> None:
        """The node's evolution (NodeView: debounced worker), and the summary once per session."""
        self.set_class(self.series() is None, "-no-series")
        self._moving = True
        try:
            super().show_node(node)
        finally:
            self._moving = False
        self._ensure_summary()

    def accepts(self, node: NodeRef) -> str | None:
        if self.series() is None:
            return NOT_A_SERIES
        if node.layer is None and node.module is None:
            return "Select a layer, a matrix or a head (l expands a layer) to see its metric against step."
        if self.choice.metric == HEAD_R:
            if not self.session.layout.heads_available:
                return f"Heads are not available for this model: {self.session.layout.heads_reason}"
            if node.layer is None or (node.module is not None and node.module not in HEAD_PROJECTIONS):
                return "The head score r is per head: select a layer, a q/k/v/o projection or a head (m: next metric)."
            return None
        if node.module is not None:
            reason = self.session.unavailable(node)
            if reason and not (self.session.is_projection(node) and node.head is None):
                return reason
        return None

    def compute(self, node: NodeRef, progress: Callable[[int, int | None, str], None],
                cancelled: Callable[[], bool]) -> Any:
        c = self.choice
        return self.session.evolution(node, c.metric, against=c.against, progress=progress, cancelled=cancelled)

    def show_waiting(self, node: NodeRef) -> None:
        self.remove_class("-empty")
        self._label("title").update(f"{self.choice.short} · {node.label()} — computing…")
        self._label("legend").update("")
        self.plotted = []
        clear_plot(self.query_one("#evolution-plot", PlotextPlot))

    def show_message(self, text: str) -> None:
        self.add_class("-empty")
        self._label("title").update(text)
        self._label("legend").update("")
        self.plotted = []
        clear_plot(self.query_one("#evolution-plot", PlotextPlot))

    def show_result(self, node: NodeRef, result: "EvolutionResult") -> None:
        self.remove_class("-empty")
        c = self.choice
        against = {"first": " (Δ from the first step)", "previous": " (Δ from the previous step)"}
        suffix = against[c.against] if c.metric.startswith("delta_") or c.metric == HEAD_R else ""
        if node.module is None:
            what = "one line per head (whole head)" if c.metric == HEAD_R else "one line per matrix"
        else:
            what = result.title.split(" · ", 1)[-1] + (" · one line per head" if node.head is None else "")
        self._label("title").update(f"{c.short}{suffix} · {node.label()} · {what}")
        lines = node_lines(node, result)
        self.plotted = self._draw(self.query_one("#evolution-plot", PlotextPlot), lines, c.short)
        self._label("legend").update(self._legend([name for name, _ in lines]))
        self._sparklines_from(node, lines)

    def cancel_work(self) -> None:
        """A newer node stops the node's work only; esc and leaving the view stop the summary too."""
        super().cancel_work()
        if not self._moving and self.summary_state == "running":
            self.workers.cancel_group(self, SUMMARY_ID)
            self.app.work_done(SUMMARY_ID)
            self.summary_state = "cancelled"
            self._summary_title()

    def deactivate(self) -> None:
        """Leaving the view stops its work; the summary starts again when the view is shown again."""
        super().deactivate()
        if self.summary_state == "cancelled":
            self.summary_state = "idle"

    def export_table(self) -> ExportTable | None:
        """`x`: one row per line and checkpoint (step, tokens, value) at full precision."""
        if self.result is None or self.node is None:
            return None
        series = self.series()
        c = self.choice
        rows = []
        for name, values in node_lines(self.node, self.result):
            for i, (label, value) in enumerate(zip(self.result.labels, values)):
                rows.append({"node": self.node.label(), "line": name, "checkpoint": label,
                             "step": self.result.steps[i], "tokens": series.tokens[i] if series else None,
                             "metric": c.metric, "against": c.against if c.metric.startswith("delta_")
                             or c.metric == HEAD_R else "", "value": value})
        label = self.node.label()
        return ExportTable(f"evolution-{file_part(c.metric)}-{file_part(label)}", rows, label)

    # ---- drawing ---------------------------------------------------------------------------
    def _steps(self) -> tuple[list[int], list[int | None]]:
        series = self.series()
        return (list(series.steps), list(series.tokens)) if series is not None else ([], [])

    def _draw(self, plot: PlotextPlot, lines: Sequence[tuple[str, Sequence[float | None]]],
              ylabel: str) -> list[tuple[str, list[float], list[float]]]:
        """Every line against step (gaps where a value is undefined); returns what was drawn (rounded)."""
        clear_plot(plot)
        plt = plot.plt
        steps, tokens = self._steps()
        drawn: list[tuple[str, list[float], list[float]]] = []
        for i, (name, values) in enumerate(lines):
            for xs, ys in segments(steps, values):
                x, y = chart_values(xs), chart_values(ys)
                draw = plt.scatter if len(x) == 1 else plt.plot
                draw(x, y, color=series_color(i), marker=series_marker(i))
                drawn.append((name, x, y))
        if steps:
            ticks, labels = step_ticks(steps, tokens)
            plt.xticks(chart_values(ticks), labels)
            span = max(steps) - min(steps)
            pad = span * 0.03 if span else 1.0
            plt.xlim(*chart_values([min(steps) - pad, max(steps) + pad]))
        plt.xlabel("step · tokens" if any(t is not None for t in tokens) else "step")
        plt.ylabel(ylabel)
        plot.refresh()
        return drawn

    def _legend(self, names: Iterable[str]) -> Text:
        legend = Text()
        for i, name in enumerate(names):
            legend.append_text(legend_key(name, series_color(i), series_marker(i)))
        return legend

    # ---- the whole-model summary -------------------------------------------------------------
    def _ensure_summary(self) -> None:
        """Start the summary's worker once (a series, the panel shown, not computed, not cancelled by esc)."""
        if self.series() is None or not self.summary_shown or self.summary_state in ("running", "done",
                                                                                      "cancelled", "failed"):
            return
        self.summary_state = "running"
        self._summary_title()
        self.run_worker(lambda: run_engine_call(_SummarySlot(self.app), "median α per module kind",
                                                lambda progress, cancelled: self.session.alpha_summary(
                                                    progress, cancelled),
                                                start="starting", on_result=self._summary_delivered,
                                                on_error=self._summary_failed),
                        thread=True, exclusive=True, group=SUMMARY_ID, name=SUMMARY_ID, exit_on_error=False)

    def _summary_delivered(self, summary: "AlphaSummary") -> None:
        self.summary = summary
        self.summary_state = "done"
        self._summary_title()
        lines = [(kind, summary.medians[kind]) for kind in summary.kinds]
        self.summary_plotted = self._draw(self.query_one("#evolution-summary", PlotextPlot), lines, "median α")
        self._label("summary-legend").update(self._legend(summary.kinds))

    def _summary_failed(self, err: Exception) -> None:
        from diffract_tui.views.worker import first_line

        self.summary_state = "failed"
        self._label("summary-title").update(f"median α per module kind: failed — {first_line(err)}")

    def _summary_title(self) -> None:
        state = self.summary_state
        what = "median α per module kind vs step"
        if state == "done" and self.summary is not None:
            counts = sorted(set(self.summary.counts.values()))
            per = f" · whole model, {counts[0]} matrices each" if len(counts) == 1 else " · whole model"
            text = f"{what} · s hide{per}"
        elif state == "running":
            text = f"{what} — computing… (esc cancels)"
        elif state == "cancelled":
            text = f"{what} — cancelled · s twice to compute again"
        else:
            text = what
        self._label("summary-title").update(text)

    # ---- the tree's sparklines -------------------------------------------------------------------
    @property
    def sparkline_metric(self) -> EvolutionMetric | None:
        """The metric the tree's sparklines show (None for r: it is not a per-node cache entry)."""
        return None if self.choice.metric == HEAD_R else self.choice

    def _sparklines_from(self, node: NodeRef, lines: Sequence[tuple[str, Sequence[float | None]]]) -> None:
        """The computed values as sparklines of the node and of the children its lines stand for."""
        if self.sparkline_metric is None:
            return
        tree = self.app.tree
        for name, values in lines:
            ref = node if name == node.label() else child_node(node, name)
            if ref is not None:
                tree.set_sparkline(ref, values)

    def load_sparklines(self, nodes: Sequence[NodeRef]) -> None:
        """Sparklines of `nodes` from the cache only, in a short worker (the tree never computes)."""
        c = self.sparkline_metric
        if c is None or self.series() is None or not nodes:
            return
        self.run_worker(lambda: self._read_sparklines(list(nodes), c), thread=True, group="sparklines",
                        name="sparklines", exit_on_error=False)

    def _read_sparklines(self, nodes: list[NodeRef], c: EvolutionMetric) -> None:
        from textual.worker import get_current_worker

        worker = get_current_worker()
        found = []
        for node in nodes:
            if worker.is_cancelled or self.choice != c:
                return
            values = self.session.known_along(node, c.metric, c.against)
            if values is not None:
                found.append((node, values))
        if found and not worker.is_cancelled:
            self.app.call_from_thread(self._apply_sparklines, found, c)

    def _apply_sparklines(self, found: list[tuple[NodeRef, tuple[float | None, ...]]], c: EvolutionMetric) -> None:
        if self.choice != c:
            return
        for node, values in found:
            self.app.tree.set_sparkline(node, values)

    # ---- actions ---------------------------------------------------------------------------
    def action_cycle_metric(self) -> None:
        """m: the next metric; the chart recomputes, the tree's sparklines follow from the cache."""
        self.metric_index = (self.metric_index + 1) % len(METRICS)
        tree = self.app.tree
        tree.clear_sparklines()
        self.workers.cancel_group(self, "sparklines")
        self.load_sparklines(tree.built_nodes())
        self.refresh_node()

    def action_toggle_summary(self) -> None:
        """s: hide or show the summary panel (showing it again after esc computes it)."""
        self.summary_shown = not self.summary_shown
        self.set_class(not self.summary_shown, "-no-summary")
        if self.summary_shown and self.summary_state in ("cancelled", "failed"):
            self.summary_state = "idle"
        if self.summary_shown:
            self._ensure_summary()
            self._summary_title()
        else:
            self._label("summary-title").update("median α per module kind: hidden · s show")


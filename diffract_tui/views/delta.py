"""View 2 — Delta: what continual pre-training did to the selected matrix or head, per CPT checkpoint:
the singular values of ΔW, the SVD truncation curve (SPEC §5), and the A1 singular-vector agreement of
the top-k components with its noise floor √(2 ln k / d) (SPEC §4); ρ and the other numbers in the panel.

At 80 columns one chart shows at a time (`c` cycles); wide terminals show all three side by side.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import Label
from textual_plotext import PlotextPlot

from diffract_tui.node import NodeRef
from diffract_tui.views import ChartView, metric_record
from diffract_tui.widgets.charts import (chart_values, clear_plot, index_ticks, legend_key, log_ticks, muted_color,
                                         no_color, positive, series_color, series_marker)
from diffract_tui.widgets.metric_panel import MetricPanel

CHARTS: tuple[str, ...] = ("sigma", "truncation", "agreement")
CHART_TITLES = {"sigma": "σ(ΔW)", "truncation": "truncation error √(1−E(t))", "agreement": "A1 agreement top-k"}
WIDE_AT = 120  # columns from which all three charts fit side by side
TRUNCATION_TOLERANCE = 0.1  # the error level drawn on the truncation chart (SPEC §5's default tolerance)
UNCHANGED_NOTE = "Δ= unchanged (bit-identical to the base: no ΔW to chart)"

DELTA_ROWS: tuple[tuple[str, str], ...] = (
    ("‖ΔW‖_F", "delta_frob"),
    ("rel. update", "delta_rel"),
    ("cos(W₀,W)", "delta_cos"),
    ("ρ", "delta_rho"),
    ("stable rk", "stable_rank"),
    ("eff. rank", "effective_rank"),
    ("rank 90%", "delta_rank_90"),
    ("rank 99%", "delta_rank_99"),
    ("trunc. t@0.1", "truncatable_fraction"),
    ("A1 left", "avg_max_l_agreement"),
    ("A1 floor", "a1_noise_floor_l"),
    ("α of ΔW", "pl_alpha"),
)


class DeltaView(ChartView):
    """Charts and metrics of ΔW for the node under the cursor."""

    VIEW_ID = "delta"
    TITLE = "Δ "
    WAITING = "computing ΔW…"
    BINDINGS = [Binding("c", "cycle_chart", "Next chart (narrow screens)")]
    DEFAULT_CSS = """
    DeltaView { layout: vertical; }
    DeltaView > #delta-title { height: 1; width: 1fr; text-style: bold; text-wrap: nowrap; text-overflow: ellipsis; }
    DeltaView > #delta-legend { height: 1; width: 1fr; }
    DeltaView > #delta-charts { height: 1fr; min-height: 8; }
    DeltaView PlotextPlot { width: 1fr; height: 1fr; }
    DeltaView.-narrow PlotextPlot { display: none; }
    DeltaView.-narrow PlotextPlot.-shown { display: block; }
    DeltaView > #delta-metrics { height: auto; max-height: 45%; }
    DeltaView.-empty > #delta-charts { display: none; }
    DeltaView.-stale > #delta-charts, DeltaView.-stale > #delta-metrics { text-opacity: 40%; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.chart_index = 0

    def compose(self) -> ComposeResult:
        yield Label("", id="delta-title")
        yield Label("", id="delta-legend")
        with Horizontal(id="delta-charts"):
            for name in CHARTS:
                yield PlotextPlot(id=f"delta-{name}", classes="-shown" if name == CHARTS[0] else "")
        yield MetricPanel(id="delta-metrics")

    def on_mount(self) -> None:
        self.set_class(self.app.size.width < WIDE_AT, "-narrow")

    def on_resize(self, event: events.Resize) -> None:
        self.set_class(self.app.size.width < WIDE_AT, "-narrow")

    # ---- ChartView -------------------------------------------------------------------------
    def accepts(self, node: NodeRef) -> str | None:
        """A sentence instead of charts for nodes without ΔW: no matrix, or a tensor only some checkpoints hold."""
        return self.app.session.delta_unavailable(node)

    def cached(self, node: NodeRef) -> Any | None:
        return self.app.session.cached_delta(node)

    def compute(self, node: NodeRef, progress: Callable[[int, int | None, str], None],
                cancelled: Callable[[], bool]) -> Any:
        return self.app.session.delta(node, progress=progress, cancelled=cancelled)

    def badge_metrics(self, result: Any) -> dict[str, Any] | None:
        if not result.deltas or result.deltas[0].label != self.app.session.targets[0].label:
            return None  # the tree's Δ badge is the first target's
        first = result.deltas[0].metrics
        return {"delta_rel": first.get("delta_rel"), "unchanged": bool(first.get("unchanged"))}

    def export_rows(self, node: NodeRef, result: Any) -> list[dict[str, Any]]:
        """Per CPT checkpoint every metric of ΔW in the panel, as computed."""
        return [metric_record(node, d.label, d.metrics, [key for _, key in DELTA_ROWS]) for d in result.deltas]

    # ---- actions ---------------------------------------------------------------------------
    def action_cycle_chart(self) -> None:
        """Show the next chart (σ(ΔW) → truncation → agreement) when only one fits."""
        self.chart_index = (self.chart_index + 1) % len(CHARTS)
        for i, name in enumerate(CHARTS):
            self.query_one(f"#delta-{name}", PlotextPlot).set_class(i == self.chart_index, "-shown")

    # ---- drawing ---------------------------------------------------------------------------
    def _plots(self) -> dict[str, PlotextPlot]:
        return {name: self.query_one(f"#delta-{name}", PlotextPlot) for name in CHARTS}

    def clear_charts(self) -> None:
        for plot in self._plots().values():
            clear_plot(plot)

    def _draw(self, result: Any) -> None:
        self.clear_charts()
        plots = self._plots()
        deltas = result.deltas
        # σ(ΔW), descending, on a log axis
        plt = plots["sigma"].plt
        tops = []
        for i, d in enumerate(deltas):
            s = positive(d.sigma)
            if s.size:
                plt.plot(list(range(1, s.size + 1)), chart_values(np.log10(s)),
                         color=series_color(i + 1), marker=series_marker(i))
                tops.append((float(np.log10(s.min())), float(np.log10(s.max()))))
        if tops:
            n = max(positive(d.sigma).size for d in deltas)
            xt = index_ticks(n)
            plt.xticks(chart_values(xt), [str(t) for t in xt])  # integer ticks on the index axis
            yt, yl = log_ticks(min(t[0] for t in tops), max(t[1] for t in tops), most=4)
            if yt:
                plt.yticks(yt, yl)
        plt.title(CHART_TITLES["sigma"])
        plt.xlabel("index")
        # truncation error vs t
        plt = plots["truncation"].plt
        for i, d in enumerate(deltas):
            if d.ts.size:  # an unchanged node has no curve
                plt.plot(chart_values(d.ts), chart_values(d.error), color=series_color(i + 1),
                         marker=series_marker(i))
        plt.hline(TRUNCATION_TOLERANCE, color=series_color(5))
        plt.ylim(0, 1)
        plt.title(CHART_TITLES["truncation"])
        plt.xlabel("t (fraction dropped)")
        # agreement top-k with its noise floor
        plt = plots["agreement"].plt
        for i, d in enumerate(deltas):
            if d.agreement_k.size:
                plt.plot(chart_values(np.log10(d.agreement_k)), chart_values(d.agreement),
                         color=series_color(i + 1), marker=series_marker(i))
        if deltas and deltas[0].agreement_k.size:
            d = deltas[0]
            plt.plot(chart_values(np.log10(d.agreement_k)), chart_values(d.noise_floor),
                     color=muted_color(), marker="x" if no_color() else "dot")
            ks = d.agreement_k
            ticks = sorted({float(k) for k in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
                            if ks.min() <= k <= ks.max()})
            if ticks:
                step = max(1, math.ceil(len(ticks) / 5))
                ticks = ticks[::step]
                plt.xticks([math.log10(t) for t in ticks], [str(int(t)) for t in ticks])
        plt.ylim(0, 1)
        plt.title(CHART_TITLES["agreement"])
        plt.xlabel("k")
        legend = Text()
        for i, d in enumerate(deltas):
            label = f"{d.label} {UNCHANGED_NOTE}" if d.metrics.get("unchanged") else d.label
            legend.append_text(legend_key(label, series_color(i + 1), series_marker(i)))
        legend.append_text(legend_key("A1 noise floor", muted_color(), "x" if no_color() else "dot"))
        legend.append_text(legend_key(f"tolerance {TRUNCATION_TOLERANCE}", series_color(5), "line"))
        self.query_one("#delta-legend", Label).update(legend)
        for plot in plots.values():
            plot.refresh()

    def _fill_metrics(self, result: Any) -> None:
        deltas = result.deltas
        rows = []
        for label, key in DELTA_ROWS:
            values = [d.metrics.get(key) for d in deltas]
            if all(v is None for v in values):
                continue
            rows.append((label, values))
        grey = [[key == "pl_alpha" and not d.metrics.get("pl_alpha_reliable", True) for d in deltas]
                for label, key in DELTA_ROWS if any(d.metrics.get(key) is not None for d in deltas)]
        self.query_one(MetricPanel).show_metrics([d.label for d in deltas], rows, grey)

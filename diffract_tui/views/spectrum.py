"""View 1 — Spectrum: the log-log ESD of the selected matrix or head in every checkpoint, with the fitted
power law (PL) and truncated power law (TPL) from xmin, the Marchenko–Pastur and Tracy–Widom edges, and
the metric panel (greyed where a fit is unreliable, SPEC §3).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import Label
from textual_plotext import PlotextPlot

from diffract_tui.node import NodeRef
from diffract_tui.views import ChartView
from diffract_tui.widgets.charts import (bounds, chart_values, clear_plot, fit_color, fit_marker, fmt, legend_key,
                                         log_histogram, log_ticks, log_xy, series_color, series_marker)
from diffract_tui.widgets.metric_panel import MetricPanel

# (row label, metric name, greyed when the power-law fit is unreliable)
SPECTRUM_ROWS: tuple[tuple[str, str, bool], ...] = (
    ("α PL", "pl_alpha", True),
    ("xmin", "pl_esd_xmin", True),
    ("KS", "pl_ks", True),
    ("n tail", "pl_n_tail", True),
    ("α TPL", "tpl_alpha", True),
    ("Λ TPL", "tpl_lambda", True),
    ("PL/TPL R", "pl_tpl_llr", True),
    ("PL/TPL p", "pl_tpl_p", True),
    ("MP λ+", "mp_esd_max", False),
    ("MP spikes", "mp_num_spikes", False),
    ("MP soft rk", "mp_soft_rank", False),
    ("TW edge", "tw_esd_bound", False),
    ("TW spikes", "tw_num_spikes", False),
    ("stable rk", "stable_rank", False),
    ("eff. rank", "effective_rank", False),
    ("λ max", "lambda_max", False),
)


def esd_bins(n: int) -> int:
    """Histogram bins for an ESD of n values: about 2√n, between 8 and 40."""
    return int(min(40, max(8, round(2 * math.sqrt(max(n, 1))))))


class SpectrumView(ChartView):
    """ESD chart and metric panel of the node under the cursor, for each checkpoint."""

    VIEW_ID = "spectrum"
    TITLE = "ESD "
    BINDINGS = [
        Binding("c", "cycle_focus", "Fits of next checkpoint"),
    ]
    DEFAULT_CSS = """
    SpectrumView { layout: vertical; }
    SpectrumView > #spectrum-title { height: 1; width: 1fr; text-style: bold; text-wrap: nowrap; text-overflow: ellipsis; }
    SpectrumView > #spectrum-legend { height: auto; max-height: 3; width: 1fr; }
    SpectrumView > #spectrum-plot { height: 1fr; min-height: 10; }
    SpectrumView > #spectrum-metrics { height: auto; max-height: 40%; }
    SpectrumView > #spectrum-note { height: auto; max-height: 2; width: 1fr; color: $text-muted; }
    SpectrumView.-empty > #spectrum-plot { display: none; }
    SpectrumView.-stale > #spectrum-plot, SpectrumView.-stale > #spectrum-metrics { text-opacity: 40%; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.focus_index = 0

    def compose(self) -> ComposeResult:
        yield Label("", id="spectrum-title")
        yield Label("", id="spectrum-legend")
        yield PlotextPlot(id="spectrum-plot")
        yield MetricPanel(id="spectrum-metrics")
        yield Label("", id="spectrum-note")

    # ---- ChartView -------------------------------------------------------------------------
    def cached(self, node: NodeRef) -> Any | None:
        return self.app.session.cached_spectrum(node)

    def compute(self, node: NodeRef, progress: Callable[[int, int | None, str], None],
                cancelled: Callable[[], bool]) -> Any:
        return self.app.session.spectrum(node, progress=progress, cancelled=cancelled)

    def badge_metrics(self, result: Any) -> dict[str, Any]:
        base = result.spectra[0].metrics
        return {"pl_alpha": base.get("pl_alpha"), "pl_alpha_reliable": base.get("pl_alpha_reliable", True)}

    # ---- actions ---------------------------------------------------------------------------
    def action_cycle_focus(self) -> None:
        """Draw the fits and edges of the next checkpoint."""
        if self.result is not None:
            self.focus_index = (self.focus_index + 1) % len(self.result.spectra)
            self._draw(self.result)

    # ---- drawing ---------------------------------------------------------------------------
    def clear_charts(self) -> None:
        clear_plot(self.query_one("#spectrum-plot", PlotextPlot))

    def _draw(self, result: Any) -> None:
        plot = self.query_one("#spectrum-plot", PlotextPlot)
        clear_plot(plot)
        plt = plot.plt
        spectra = result.spectra
        focus = spectra[self.focus_index % len(spectra)]
        lo = min((float(s.evals[s.evals > 0].min()) for s in spectra if (s.evals > 0).any()), default=math.nan)
        hi = max((float(s.evals.max()) for s in spectra if s.evals.size), default=math.nan)
        if not (np.isfinite(lo) and np.isfinite(hi)):
            self.clear_charts()
            return
        bins = esd_bins(min(s.evals.size for s in spectra))
        xs_all, ys_all = [], []
        legend = Text()
        for i, spec in enumerate(spectra):
            x, y = log_histogram(spec.evals, bins=bins, lo=lo, hi=hi)
            xs_all.append(x)
            ys_all.append(y)
            plt.plot(chart_values(x), chart_values(y), color=series_color(i), marker=series_marker(i))
            legend.append_text(legend_key(spec.label, series_color(i), series_marker(i)))
        m = focus.metrics
        legend.append(f"\nfits of {focus.label} (c next):", style="dim")
        hist_lo, _ = bounds(ys_all)
        for name, key, label in (("pl", "pl_alpha", "PL α"), ("tpl", "tpl_alpha", "TPL α"), ("mp", None, "MP")):
            x, y = log_xy(focus.lines.get(f"{name}_x"), focus.lines.get(f"{name}_pdf"), floor=hist_lo - 1.0)
            if x.size:
                plt.plot(chart_values(x), chart_values(y), color=fit_color(name), marker=fit_marker(name))
                ys_all.append(y)
                text = label if key is None else f"{label} {fmt(m.get(key))}"
                legend.append_text(legend_key(text, fit_color(name), fit_marker(name)))
        ylo, yhi = bounds(ys_all)
        edges = []
        for name, key in (("xmin", "pl_esd_xmin"), ("λ+", "mp_esd_max"), ("TW", "tw_esd_bound")):
            value = _num(m.get(key))
            if np.isfinite(value) and value > 0:
                plt.vline(chart_values(math.log10(value))[0], color=fit_color(name))
                if np.isfinite(yhi):
                    plt.text(name, *chart_values([math.log10(value), yhi]), color=fit_color(name))
                edges.append(f"{name} {fmt(value)}")
        if edges:
            legend.append("  │ " + " ".join(edges), style="dim")
        xlo, xhi = bounds(xs_all)
        xt, xl = log_ticks(xlo, xhi)
        yt, yl = log_ticks(ylo, yhi, most=4)
        if xt:
            plt.xticks(xt, xl)
        if yt:
            plt.yticks(yt, yl)
        self.query_one("#spectrum-legend", Label).update(legend)
        plot.refresh()

    def _fill_metrics(self, result: Any) -> None:
        spectra = result.spectra
        rows = []
        grey = []
        for label, key, fit in SPECTRUM_ROWS:
            values = [s.evals.max() if key == "lambda_max" and s.evals.size else s.metrics.get(key) for s in spectra]
            if all(v is None for v in values):
                continue
            rows.append((label, values))
            grey.append([fit and not s.metrics.get("pl_alpha_reliable", True) for s in spectra])
        self.query_one(MetricPanel).show_metrics([s.label for s in spectra], rows, grey)
        focus = spectra[self.focus_index % len(spectra)]
        warning = focus.metrics.get("fit_warning")
        note = f"? unreliable fit ({focus.label}): {warning}" if warning else ""
        self.query_one("#spectrum-note", Label).update(note)


def _num(value: Any) -> float:
    """A metric as a float (NaN when missing or not a number)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan

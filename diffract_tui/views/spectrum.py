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
from diffract_tui.views import ChartView, metric_record
from diffract_tui.widgets.charts import (bounds, chart_values, checkpoint_color, clear_plot, coincide, fit_color,
                                         fit_marker, fmt, hidden_below, legend_key, log_histogram, log_ticks, log_xy,
                                         series_marker, stagger_rows, tick_label, x_range)
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

EDGES: tuple[tuple[str, str], ...] = (("xmin", "pl_esd_xmin"), ("λ+", "mp_esd_max"), ("TW", "tw_esd_bound"))
POINTS_AT_MOST = 2  # an ESD of this few eigenvalues is drawn as points: a line through 2 bins reads as a curve


def esd_bins(n: int) -> int:
    """Histogram bins for an ESD of n values: about 2√n, between 8 and 40."""
    return int(min(40, max(8, round(2 * math.sqrt(max(n, 1))))))


class SpectrumView(ChartView):
    """ESD chart and metric panel of the node under the cursor, for each checkpoint."""

    VIEW_ID = "spectrum"
    TITLE = "ESD "
    BINDINGS = [
        Binding("c", "cycle_focus", "Fits of next checkpoint"),
        Binding("i", "x_mode('tail')", "Zoom on the tail (from xmin); again: back"),
        Binding("o", "x_mode('all')", "Show all eigenvalues; again: back"),
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
        self.x_mode = "default"                      # one of charts.X_MODES
        self.x_limits: tuple[float, float] | None = None   # the λ range drawn last
        self.hidden_text = ""                        # the clipped count under the x-axis

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

    def export_rows(self, node: NodeRef, result: Any) -> list[dict[str, Any]]:
        """Per checkpoint every metric of the panel as computed (λ max from the eigenvalues)."""
        keys = [key for _, key, _ in SPECTRUM_ROWS if key != "lambda_max"]
        return [metric_record(node, s.label, s.metrics, keys,
                              lambda_max=float(s.evals.max()) if s.evals.size else None) for s in result.spectra]

    # ---- actions ---------------------------------------------------------------------------
    def action_cycle_focus(self) -> None:
        """Draw the fits and edges of the next checkpoint."""
        if self.result is not None:
            self.focus_index = (self.focus_index + 1) % len(self.result.spectra)
            self._draw(self.result)

    def action_x_mode(self, mode: str) -> None:
        """Switch the x-range to `mode` (tail zoom / all eigenvalues), or back to the default when it is on."""
        self.x_mode = "default" if self.x_mode == mode else mode
        if self.result is not None:
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
        m = focus.metrics
        edge_values = {name: _num(m.get(key)) for name, key in EDGES}
        lo, hi = x_range([s.evals for s in spectra], edge_values["xmin"], self.x_mode,
                         edges=[edge_values["λ+"], edge_values["TW"]])
        if not (np.isfinite(lo) and np.isfinite(hi)):
            self.clear_charts()
            return
        self.x_limits = (lo, hi)
        bins = esd_bins(min(s.evals.size for s in spectra))
        curves = [log_histogram(spec.evals, bins=bins, lo=lo, hi=hi) for spec in spectra]
        ys_all = [c[1] for c in curves]
        legend = Text()
        # the base is drawn last, on top; a checkpoint whose curve is the base's says so (it is hidden under it)
        for i in reversed(range(len(spectra))):
            x, y = curves[i]
            draw = plt.scatter if spectra[i].evals.size <= POINTS_AT_MOST else plt.plot
            draw(chart_values(x), chart_values(y), color=checkpoint_color(i), marker=series_marker(i))
        for i, spec in enumerate(spectra):
            same = i > 0 and coincide(curves[i], curves[0])
            label = f"{spec.label} ≈ {spectra[0].label}" if same else spec.label
            legend.append_text(legend_key(label, checkpoint_color(i), series_marker(i)))
        legend.append(f"\nfits of {focus.label} (c next):", style="dim")
        hist_lo, _ = bounds(ys_all)
        fits = {}
        for name in ("pl", "tpl", "mp"):
            x, y = log_xy(focus.lines.get(f"{name}_x"), focus.lines.get(f"{name}_pdf"), floor=hist_lo - 1.0)
            keep = (x >= math.log10(lo) - 1e-9) & (x <= math.log10(hi) + 1e-9)
            fits[name] = (x[keep], y[keep])
        tpl_is_pl = _tpl_is_pl(m, fits["pl"], fits["tpl"])
        for name, key, label in (("pl", "pl_alpha", "PL α"), ("tpl", "tpl_alpha", "TPL α"), ("mp", None, "MP")):
            x, y = fits[name]
            if not x.size or (name == "tpl" and tpl_is_pl):
                continue
            plt.plot(chart_values(x), chart_values(y), color=fit_color(name), marker=fit_marker(name))
            ys_all.append(y)
            text = label if key is None else f"{label} {fmt(m.get(key))}"
            if name == "pl" and tpl_is_pl:
                text += " = TPL (Λ=0)"
            legend.append_text(legend_key(text, fit_color(name), fit_marker(name)))
        ylo, yhi = bounds(ys_all)
        self._draw_edges(plt, plot, edge_values, (math.log10(lo), math.log10(hi)), (ylo, yhi), legend)
        xt, xl = log_ticks(math.log10(lo), math.log10(hi))
        yt, yl = log_ticks(ylo, yhi, most=4)
        if xt:
            plt.xticks(chart_values(xt), xl)
        if yt:
            plt.yticks(chart_values(yt), yl)
        plt.xlim(*chart_values([math.log10(lo), math.log10(hi)]))
        self.hidden_text = self._hidden_text(focus, lo)
        plt.xlabel(f"λ · {self.hidden_text}" if self.hidden_text else "λ")
        plt.ylabel("p(λ)")  # the density; short, plotext drops an x label that does not fit beside it
        self.query_one("#spectrum-legend", Label).update(legend)
        plot.refresh()

    def _draw_edges(self, plt: Any, plot: PlotextPlot, values: dict[str, float], xlim: tuple[float, float],
                    ylim: tuple[float, float], legend: Text) -> None:
        """Vertical lines at xmin, λ+ and TW inside the x-range, labels staggered so that close ones don't merge;
        every edge's value goes in the legend (also those outside the range)."""
        shown = [(name, math.log10(v)) for name, v in values.items()
                 if np.isfinite(v) and v > 0 and xlim[0] <= math.log10(v) <= xlim[1]]
        ylo, yhi = ylim
        if shown and np.isfinite(yhi):
            cells = max(plot.size.width - 8, 20)   # about the data area: the y tick labels take the rest
            rows = stagger_rows([x for _, x in shown], [len(n) for n, _ in shown], xlim[1] - xlim[0], cells)
            dy = (yhi - ylo) / max(plot.size.height - 5, 6) if np.isfinite(ylo) and yhi > ylo else 0.0
            for (name, x), row in zip(shown, rows):
                plt.vline(chart_values(x)[0], color=fit_color(name))
                plt.text(name, *chart_values([x, yhi - row * dy]), color=fit_color(name))
        edges = [f"{name} {fmt(v)}" for name, v in values.items() if np.isfinite(v) and v > 0]
        if edges:
            legend.append("  │ " + " ".join(edges), style="dim")

    def _hidden_text(self, focus: Any, lo: float) -> str:
        """"N of M < lo hidden" for the focus checkpoint, with the keys that change the range."""
        hidden = hidden_below(focus.evals, lo)
        keys = {"default": "i tail, o all", "tail": "i back", "all": "o back"}[self.x_mode]
        if self.x_mode == "tail":
            return f"tail: {hidden} of {focus.evals.size} < {tick_label(lo)} hidden ({keys})"
        if self.x_mode == "all":
            return f"{hidden} of {focus.evals.size} ≈ 0 hidden (log axis; {keys})" if hidden else ""
        return f"{hidden} of {focus.evals.size} < {tick_label(lo)} hidden ({keys})" if hidden else ""

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


def _tpl_is_pl(metrics: dict[str, Any], pl: tuple[np.ndarray, np.ndarray], tpl: tuple[np.ndarray, np.ndarray]) -> bool:
    """True when the TPL fit is the pure power law (Λ = 0, or the same line): drawn, it would hide PL's."""
    return _num(metrics.get("tpl_lambda")) == 0.0 or coincide(pl, tpl, tol=1e-3)

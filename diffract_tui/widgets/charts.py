"""Small helpers that turn engine arrays into plotext-ready series (log-binned ESDs, fit lines, ticks).

Display transformations only: the numbers themselves (eigenvalues, α, xmin, edges) come from the engine.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import numpy as np
from rich.text import Text

# Distinct series colours that read on dark and light themes; ignored under NO_COLOR.
SERIES_COLORS: tuple[str, ...] = ("cyan", "orange", "magenta", "green", "red", "blue", "yellow")
SERIES_MARKERS: tuple[str, ...] = ("braille", "dot", "sd", "hd", "fhd", "x", "+")


def no_color() -> bool:
    """True when the user asked for no colour (https://no-color.org: NO_COLOR set and non-empty)."""
    return bool(os.environ.get("NO_COLOR"))


def clear_plot(plot: Any) -> None:
    """Empty a PlotextPlot (data and figure settings) and redraw it, in the no-colour theme when asked."""
    plot.plt.clear_data()
    plot.plt.clear_figure()
    if no_color():
        plot.theme = "clear"
    plot.refresh()


def series_color(i: int) -> str:
    """The plotext colour of the i-th series; the terminal's default colour under NO_COLOR."""
    return "default" if no_color() else SERIES_COLORS[i % len(SERIES_COLORS)]


FIT_COLORS = {"pl": "green", "tpl": "red", "mp": "blue", "xmin": "yellow", "λ+": "blue", "TW": "gray"}
# plotext colour names that Rich spells differently
_RICH_NAMES = {"orange": "dark_orange", "gray": "grey50", "default": "default"}
_MARKER_GLYPHS = {"braille": "⣿", "dot": "•", "sd": "▘", "hd": "▞", "fhd": "▟", "line": "─"}
FIT_MARKERS = {"pl": "+", "tpl": "o", "mp": "~"}  # under NO_COLOR, fits are told apart by marker


def fit_marker(name: str) -> str:
    """Marker of a fitted line: small dots in colour, a distinct character under NO_COLOR."""
    return FIT_MARKERS.get(name, "dot") if no_color() else "dot"


def fit_color(name: str) -> str:
    """Colour of a fitted line or edge (`pl`, `tpl`, `mp`, `xmin`, `λ+`, `TW`); default under NO_COLOR."""
    return "default" if no_color() else FIT_COLORS.get(name, "white")


def legend_key(label: str, color: str, marker: str) -> Text:
    """` ━ label` in the series colour (the marker glyph under NO_COLOR), for a one-line legend above a chart
    (plotext's own legend would cover the data in a small terminal)."""
    glyph = _MARKER_GLYPHS.get(marker, marker) if no_color() else "━"
    style = "" if no_color() else _RICH_NAMES.get(color, color)
    return Text.assemble(" ", (glyph, style), f" {label}")


def muted_color() -> str:
    """Colour of reference lines (noise floor): gray, or the default colour under NO_COLOR."""
    return "default" if no_color() else "gray"


def series_marker(i: int) -> str:
    """Under NO_COLOR series are told apart by their marker, else all use braille dots."""
    return SERIES_MARKERS[i % len(SERIES_MARKERS)] if no_color() else "braille"


CHART_DECIMALS = 6  # far below one character cell, far above float round-off


def chart_values(values: "np.ndarray | Sequence[float] | float") -> list[float]:
    """Coordinates for plotext, rounded to CHART_DECIMALS: a point's cell must not hinge on the last bits of
    an eigenvalue (torch's and numpy's SIMD kernels round differently on different CPUs)."""
    return np.round(np.atleast_1d(np.asarray(values, dtype=np.float64)), CHART_DECIMALS).tolist()


def positive(values: np.ndarray, floor_ratio: float = 1e-12) -> np.ndarray:
    """Finite values above `floor_ratio`·max (zeros and round-off eigenvalues cannot go on a log axis)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return v
    top = float(v.max())
    return v[v > max(top * floor_ratio, np.finfo(np.float64).tiny)]


def log_histogram(values: np.ndarray, bins: int = 40, lo: float | None = None,
                  hi: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Density of `values` over log-spaced bins: (log10 bin centres, log10 density), empty bins dropped.

    Density is counts / (n · bin width) so that a power law p(λ) ∝ λ^-α keeps its slope −α in log-log.
    """
    v = positive(values)
    if v.size == 0:
        return np.empty(0), np.empty(0)
    lo = float(v.min()) if lo is None else lo
    hi = float(v.max()) if hi is None else hi
    if hi <= lo:
        hi = lo * 1.0001 + 1e-300
    edges = np.logspace(math.log10(lo), math.log10(hi), bins + 1)
    edges[0], edges[-1] = lo, hi  # 10**log10(x) may round past x: keep the extremes inside, whatever the libm
    counts, _ = np.histogram(v, bins=edges)
    width = np.diff(edges)
    density = counts / (v.size * width)
    centres = np.sqrt(edges[:-1] * edges[1:])
    keep = counts > 0
    return np.log10(centres[keep]), np.log10(density[keep])


def log_xy(x: np.ndarray | None, y: np.ndarray | None, floor: float = -np.inf,
           points: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """log10 of a curve (e.g. an engine fit line) where both coordinates are positive and log10(y) ≥ floor,
    thinned to about `points` points (plotext draws every point)."""
    if x is None or y is None:
        return np.empty(0), np.empty(0)
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    lx, ly = np.log10(x[ok]), np.log10(y[ok])
    keep = ly >= floor
    lx, ly = lx[keep], ly[keep]
    step = max(1, lx.size // points)
    return lx[::step], ly[::step]


def log_ticks(lo: float, hi: float, most: int = 5) -> tuple[list[float], list[str]]:
    """Tick positions between log10 bounds `lo`..`hi` and their labels (1e-3, 2e-3, 5e-3, …): decades when
    the range spans several, else 1-2-5 steps, else a few evenly spaced values."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return [], []
    if hi <= lo:
        return [lo], [f"{10 ** lo:.2g}"]
    decades = [float(d) for d in range(math.ceil(lo), math.floor(hi) + 1)]
    if len(decades) >= 3:
        ticks = decades
    else:
        ticks = [math.log10(m) + d for d in range(math.floor(lo), math.ceil(hi) + 1) for m in (1, 2, 5)]
        ticks = [t for t in ticks if lo <= t <= hi]
        if len(ticks) < 3:
            ticks = list(np.linspace(lo, hi, 4))
    step = max(1, math.ceil(len(ticks) / most))
    ticks = ticks[::step]
    return ticks, [tick_label(10 ** t) for t in ticks]


def tick_label(value: float) -> str:
    """A short axis label: 2 significant digits, exponents without '+' or leading zeros (2e2, 1e-3)."""
    text = f"{value:.2g}"
    if "e" in text:
        mantissa, exp = text.split("e")
        text = f"{mantissa}e{int(exp)}"
    return text


def bounds(series: Sequence[np.ndarray]) -> tuple[float, float]:
    """(min, max) over several arrays, ignoring empty ones; (nan, nan) when all are empty."""
    arrays = [np.asarray(s) for s in series if np.asarray(s).size]
    if not arrays:
        return math.nan, math.nan
    return float(min(a.min() for a in arrays)), float(max(a.max() for a in arrays))


def fmt(value: object, digits: int = 3) -> str:
    """A metric value in a narrow table cell: 3 significant digits, ints as ints, '—' for missing."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return "—"
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3):
            return f"{v:.{digits - 1}e}"
        return f"{v:.{digits}g}"
    return str(value)

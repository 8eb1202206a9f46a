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


# Fits and edges take colours no checkpoint of the Spectrum view takes (CHECKPOINT_COLORS): TPL was red beside a
# magenta checkpoint. xmin shares PL's colour (the PL fit starts there), λ+ shares MP's.
FIT_COLORS = {"pl": "green", "tpl": "blue+", "mp": "gray+", "xmin": "green", "λ+": "gray+", "TW": "gray"}
CHECKPOINT_COLORS: tuple[str, ...] = ("cyan", "orange", "magenta", "cyan+", "orange+", "magenta+")
# plotext colour names that Rich spells differently
_RICH_NAMES = {"orange": "dark_orange", "gray": "grey50", "default": "default", "gray+": "color(7)",
               "blue+": "bright_blue", "cyan+": "bright_cyan", "orange+": "bright_yellow",
               "magenta+": "bright_magenta"}
_MARKER_GLYPHS = {"braille": "⣿", "dot": "•", "sd": "▘", "hd": "▞", "fhd": "▟", "line": "─"}
FIT_MARKERS = {"pl": "+", "tpl": "o", "mp": "~"}  # under NO_COLOR, fits are told apart by marker


def checkpoint_color(i: int) -> str:
    """Colour of the i-th checkpoint's ESD: never a fit's or an edge's colour; default under NO_COLOR."""
    return "default" if no_color() else CHECKPOINT_COLORS[i % len(CHECKPOINT_COLORS)]


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


# ---- ESD x-range (Spectrum view) -------------------------------------------------------------
X_MODES: tuple[str, ...] = ("default", "tail", "all")
DECADES_BELOW_XMIN = 3.0     # the default range starts this many decades below the PL xmin …
DECADES_BELOW_MAX = 6.0      # … or, without a fit, this many below λmax
TAIL_MARGIN = 0.8            # the tail zoom starts a little left of xmin so its line shows


def x_range(evals: Sequence[np.ndarray], xmin: float, mode: str = "default",
            edges: Sequence[float] = ()) -> tuple[float, float]:
    """(lo, hi) in λ of the ESD chart. `all`: every eigenvalue a log axis can show; `default`: from the smallest
    eigenvalue above 10^-3·xmin (10^-6·λmax without a fit) — near-zero eigenvalues of a rank-deficient matrix would
    squeeze the bulk and the tail into the right-most tenth; `tail`: from just below xmin. hi is λmax, or an edge
    (λ+, TW) beyond it."""
    pos = [positive(e) for e in evals]
    pos = [p for p in pos if p.size]
    if not pos:
        return math.nan, math.nan
    lo_all = min(float(p.min()) for p in pos)
    hi = max(float(p.max()) for p in pos)
    hi = max([hi] + [float(e) for e in edges if np.isfinite(e) and e > 0 and e <= hi * 10])
    has_xmin = bool(np.isfinite(xmin) and 0 < xmin < hi)
    if mode == "all":
        lo = lo_all
    elif mode == "tail" and has_xmin:
        lo = xmin * TAIL_MARGIN
    else:
        floor = xmin * 10 ** -DECADES_BELOW_XMIN if has_xmin else hi * 10 ** -DECADES_BELOW_MAX
        lo = min((float(p[p >= floor].min()) for p in pos if (p >= floor).any()), default=lo_all)  # first kept
    lo = max(lo, lo_all)
    return (lo / 2, hi * 2) if lo >= hi else (lo, hi)   # one distinct eigenvalue: a range around it


def hidden_below(evals: np.ndarray, lo: float) -> int:
    """How many eigenvalues the chart does not show: below `lo`, or not positive and finite (no log)."""
    v = np.asarray(evals, dtype=np.float64)
    shown = positive(v)
    return int(v.size - np.count_nonzero(shown >= lo)) if np.isfinite(lo) else int(v.size - shown.size)


def stagger_rows(xs: Sequence[float], widths: Sequence[int], span: float, cells: int) -> list[int]:
    """Row (0 = top) of each label placed at data x `xs[i]`, `widths[i]` characters wide, on a chart `cells`
    columns wide over `span` data units: labels that would overlap go one row lower, so "xmin", "λ+" and "TW"
    no longer print as "xλTW" when the edges are close."""
    per_cell = span / max(cells, 1) if span > 0 else 1.0
    ends: list[float] = []      # right-most occupied cell of each row
    rows = [0] * len(xs)
    for i in sorted(range(len(xs)), key=lambda k: xs[k]):
        start = xs[i] / per_cell
        row = next((r for r, end in enumerate(ends) if start > end), len(ends))
        if row == len(ends):
            ends.append(-math.inf)
        ends[row] = start + widths[i]
        rows[i] = row
    return rows


def coincide(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], tol: float = 0.05) -> bool:
    """True when two log-log curves (x, y) have the same points to within `tol` decades: drawn at the same
    cells, the later would hide the earlier, so the legend says so."""
    (ax, ay), (bx, by) = a, b
    return bool(ax.size == bx.size and ay.size == by.size and ax.size > 0
                and np.allclose(ax, bx, atol=tol, rtol=0) and np.allclose(ay, by, atol=tol, rtol=0))


def index_ticks(n: int, most: int = 5) -> list[int]:
    """Integer ticks 1…n for an index axis in 1-2-5 steps (plotext's own read "1.0 144.8 288.5")."""
    if n <= 1:
        return [1]
    raw = (n - 1) / max(most - 1, 1)
    mag = 10 ** math.floor(math.log10(raw)) if raw >= 1 else 1
    step = next((m * mag for m in (1, 2, 5, 10) if m * mag >= raw), 10 * mag)
    step = max(1, int(step))
    ticks = [1] + list(range(step, n + 1, step))
    return sorted(set(ticks))

"""Small helpers that turn engine arrays into plotext-ready series (log-binned ESDs, fit lines, ticks).

Display transformations only: the numbers themselves (eigenvalues, α, xmin, edges) come from the engine.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np

# Distinct series colours that read on dark and light themes; ignored under NO_COLOR.
SERIES_COLORS: tuple[str, ...] = ("cyan", "orange", "magenta", "green", "red", "blue", "yellow")
SERIES_MARKERS: tuple[str, ...] = ("braille", "dot", "sd", "hd", "fhd", "x", "+")


def no_color() -> bool:
    """True when the user asked for no colour (https://no-color.org: NO_COLOR set and non-empty)."""
    return bool(os.environ.get("NO_COLOR"))


def series_color(i: int) -> str:
    """The plotext colour of the i-th series; the terminal's default colour under NO_COLOR."""
    return "default" if no_color() else SERIES_COLORS[i % len(SERIES_COLORS)]


def muted_color() -> str:
    """Colour of reference lines (noise floor): gray, or the default colour under NO_COLOR."""
    return "default" if no_color() else "gray"


def series_marker(i: int) -> str:
    """Under NO_COLOR series are told apart by their marker, else all use braille dots."""
    return SERIES_MARKERS[i % len(SERIES_MARKERS)] if no_color() else "braille"


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
    counts, _ = np.histogram(v, bins=edges)
    width = np.diff(edges)
    density = counts / (v.size * width)
    centres = np.sqrt(edges[:-1] * edges[1:])
    keep = counts > 0
    return np.log10(centres[keep]), np.log10(density[keep])


def power_law_line(alpha: float, xmin: float, xmax: float, tail_fraction: float,
                   points: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """log10 of the fitted PL density over [xmin, xmax], scaled to the whole ESD (×n_tail/n).

    p(λ) = (α−1)/xmin · (λ/xmin)^−α for λ ≥ xmin (SPEC §3's continuous power law).
    """
    if not (np.isfinite(alpha) and alpha > 1 and np.isfinite(xmin) and xmin > 0 and xmax > xmin):
        return np.empty(0), np.empty(0)
    x = np.logspace(math.log10(xmin), math.log10(xmax), points)
    p = tail_fraction * (alpha - 1.0) / xmin * (x / xmin) ** (-alpha)
    return np.log10(x), np.log10(p)


def truncated_power_law_line(alpha: float, lam: float, xmin: float, xmax: float, tail_fraction: float,
                             points: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """log10 of the fitted TPL density ∝ λ^−α e^{−Λλ} over [xmin, xmax], normalised on [xmin, ∞).

    The normalising integral is taken numerically on a log grid out to where the tail is negligible.
    """
    if not (np.isfinite(alpha) and np.isfinite(lam) and lam >= 0 and np.isfinite(xmin) and xmin > 0
            and xmax > xmin):
        return np.empty(0), np.empty(0)
    upper = max(xmax, xmin) * 1e6 if lam == 0 else max(xmax, xmin + 60.0 / lam)
    grid = np.logspace(math.log10(xmin), math.log10(upper), 4000)
    dens = grid ** (-alpha) * np.exp(-lam * (grid - xmin))
    norm = np.trapezoid(dens, grid) if hasattr(np, "trapezoid") else np.trapz(dens, grid)
    if not (np.isfinite(norm) and norm > 0):
        return np.empty(0), np.empty(0)
    x = np.logspace(math.log10(xmin), math.log10(xmax), points)
    p = tail_fraction * x ** (-alpha) * np.exp(-lam * (x - xmin)) / norm
    ok = p > 0
    return np.log10(x[ok]), np.log10(p[ok])


def log_ticks(lo: float, hi: float, most: int = 5) -> tuple[list[float], list[str]]:
    """Integer-decade tick positions between log10 bounds `lo`..`hi` and labels like 1e-3."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return [], []
    first, last = math.ceil(lo), math.floor(hi)
    decades = list(range(first, last + 1))
    if not decades:
        mid = (lo + hi) / 2
        return [mid], [f"{10 ** mid:.2g}"]
    step = max(1, math.ceil(len(decades) / most))
    decades = decades[::step]
    return [float(d) for d in decades], [f"1e{d}" for d in decades]


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

"""Chart helpers: what is drawn must not hinge on the last bits of a float (snapshots recorded on one CPU pass on
another, and no eigenvalue falls off the plotted range)."""

from __future__ import annotations

import math

import numpy as np

from diffract_tui.widgets.charts import chart_values, log_histogram


def test_histogram_keeps_its_extremes_when_10_pow_log10_rounds_past_them():
    # For these two values numpy's logspace(log10(x)) lands beyond x (found by search): before the fix the
    # smallest (largest) eigenvalue fell outside the first (last) edge and vanished from the chart.
    lo, hi = 0.0006405920704482397, 0.051670340845325416
    assert np.logspace(math.log10(lo), math.log10(lo * 100), 17)[0] > lo
    assert np.logspace(math.log10(1e-6), math.log10(hi), 17)[-1] < hi
    for values in (np.array([lo, lo * 3, lo * 10, lo * 100]), np.array([1e-6, 1e-4, 1e-2, hi])):
        x, y = log_histogram(values, bins=16)
        assert x.size == 4, x  # all four values are in a bin: the extremes were kept


def test_chart_values_hide_round_off():
    a = 0.1 + 0.2           # 0.30000000000000004
    b = 0.3
    assert a != b
    assert chart_values([a]) == chart_values([b]) == [0.3]
    assert chart_values(1.23456789) == [1.234568]   # a scalar becomes a one-element list, 6 decimals kept

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


# ---- the Spectrum view's x-range, labels and ticks (issue 10 B.1, B.7) ------------------------------------
from diffract_tui.widgets.charts import (checkpoint_color, coincide, fit_color, hidden_below, index_ticks,  # noqa: E402
                                         stagger_rows, x_range)


def rank_deficient_esd() -> np.ndarray:
    """100 bulk eigenvalues in [1e-3, 1e-1] and 28 near-zero ones (1e-12..1e-11), like a rank-deficient q."""
    return np.concatenate([np.geomspace(1e-12, 1e-11, 28), np.geomspace(1e-3, 1e-1, 100)])


def test_default_range_leaves_near_zero_eigenvalues_out_and_counts_them():
    evals = rank_deficient_esd()
    lo, hi = x_range([evals], xmin=2e-2)
    assert lo == 1e-3 and hi == 1e-1          # from the first eigenvalue above 1e-3·xmin, to λmax
    assert hidden_below(evals, lo) == 28
    lo_all, _ = x_range([evals], xmin=2e-2, mode="all")
    assert lo_all == 1e-12                   # all: every eigenvalue a log axis can show
    assert hidden_below(evals, lo_all) == 0


def test_tail_range_starts_just_below_xmin():
    lo, hi = x_range([rank_deficient_esd()], xmin=2e-2, mode="tail")
    assert math.isclose(lo, 0.8 * 2e-2) and hi == 1e-1


def test_range_without_a_fit_is_six_decades_below_lambda_max_and_reaches_an_edge_beyond_it():
    evals = rank_deficient_esd()
    lo, _ = x_range([evals], xmin=math.nan)
    assert lo == 1e-3                        # 1e-7 floor: the first eigenvalue above it
    assert x_range([evals], xmin=math.nan, mode="tail")[0] == 1e-3   # no xmin: no tail zoom either
    assert x_range([evals], xmin=2e-2, edges=[0.15])[1] == 0.15      # a TW edge beyond λmax stays on the chart


def test_range_of_no_positive_eigenvalue_is_nan():
    lo, hi = x_range([np.zeros(4), np.array([-1.0])], xmin=1.0)
    assert math.isnan(lo) and math.isnan(hi)


def test_close_edge_labels_go_to_different_rows_far_ones_share_the_top_row():
    # xmin, λ+, TW one cell apart on a 60-cell chart over 4 decades: today they printed as "xλTW"
    assert stagger_rows([-2.0, -1.95, -1.9], [4, 2, 2], span=4.0, cells=60) == [0, 1, 2]
    # far apart: all on the top row
    assert stagger_rows([-5.0, -3.0, -1.0], [4, 2, 2], span=4.0, cells=60) == [0, 0, 0]
    # the second row is reused once the first label's text has ended
    assert stagger_rows([-2.0, -1.95, -1.5], [4, 2, 2], span=4.0, cells=60) == [0, 1, 0]


def test_curves_coincide_only_within_the_tolerance():
    x = np.linspace(-3, -1, 10)
    assert coincide((x, x * 2), (x, x * 2 + 0.01))
    assert not coincide((x, x * 2), (x, x * 2 + 0.2))
    assert not coincide((x, x * 2), (x[:-1], x[:-1] * 2))


def test_checkpoint_colours_are_not_fit_colours(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    fits = {fit_color(n) for n in ("pl", "tpl", "mp", "xmin", "λ+", "TW")}
    checkpoints = {checkpoint_color(i) for i in range(6)}
    assert not fits & checkpoints
    assert "red" not in fits and "magenta" in checkpoints   # TPL was red beside the magenta third checkpoint


def test_index_ticks_are_integers_in_1_2_5_steps():
    assert index_ticks(288) == [1, 100, 200]
    assert index_ticks(576) == [1, 200, 400]
    assert index_ticks(128) == [1, 50, 100]
    assert index_ticks(5) == [1, 2, 3, 4, 5]
    assert index_ticks(1) == [1]
    assert all(isinstance(t, int) for t in index_ticks(1000))


def test_range_of_one_distinct_eigenvalue_is_an_interval_around_it():
    lo, hi = x_range([np.array([0.3])], xmin=math.nan)
    assert lo < 0.3 < hi

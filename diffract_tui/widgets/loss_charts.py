"""The Rewind view's loss panels, drawn on a plotext figure from the engine's results (`LossPreview`,
`PlanLoss`; SPEC §9): loss against fraction — one line per pattern × text, the base and CPT levels as
reference lines, the current fraction as a vertical line — and the trade-off — share of the domain gain kept
against share of the general-text forgetting recovered, one point per candidate, the current plan's highlighted.

Display only: every number comes from the engine; coordinates go through `chart_values` (snapshot determinism).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

from rich.text import Text

from diffract_tui.widgets.charts import (_MARKER_GLYPHS, SERIES_MARKERS, chart_values, legend_key, muted_color,
                                         no_color, series_color, tick_label)

if TYPE_CHECKING:  # pragma: no cover
    from analysis.run.session import LossPreview, PlanLoss, TradeoffPoint

PATTERN_ORDER: tuple[str, ...] = ("greedy", "reference", "random", "top")
TEXT_MARKERS: tuple[str, ...] = ("braille", "dot", "x", "+", "sd", "hd")
PLAN_MARKER = "◆"
BASE_COLOR, CPT_COLOR, PLAN_COLOR = "gray", "white", "red"
Y_TICKS = 4


def pattern_color(pattern: str) -> str:
    """The colour of a pattern's curves and points (the same in both panels)."""
    i = PATTERN_ORDER.index(pattern) if pattern in PATTERN_ORDER else len(PATTERN_ORDER)
    return series_color(i)


def curve_marker(pattern: str, text_index: int, texts: int) -> str:
    """Texts are told apart by marker; under NO_COLOR every pattern × text has its own."""
    if no_color():
        i = PATTERN_ORDER.index(pattern) if pattern in PATTERN_ORDER else len(PATTERN_ORDER)
        return SERIES_MARKERS[(i * texts + text_index) % len(SERIES_MARKERS)]
    return TEXT_MARKERS[text_index % len(TEXT_MARKERS)]


def _level_color(name: str) -> str:
    return "default" if no_color() else name


def _ticks(lo: float, hi: float, count: int = Y_TICKS) -> tuple[list[float], list[str]]:
    """`count` evenly spaced ticks over [lo, hi] with labels of 4 significant digits."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [], []
    if hi <= lo:
        return [lo], [f"{lo:.4g}"]
    step = (hi - lo) / (count - 1)
    ticks = [lo + i * step for i in range(count)]
    return chart_values(ticks), [f"{t:.4g}" for t in ticks]


def _share_ticks(lo: float, hi: float, most: int = 5) -> tuple[list[float], list[str]]:
    """Ticks on a share axis at round percentages (steps of 10, 20, 25, 50, 100 … %) within [lo, hi]."""
    span = max(hi - lo, 1e-9)
    step = next((m * 10 ** e for e in range(-2, 4) for m in (1, 2, 2.5, 5) if span / (m * 10 ** e) <= most - 1),
                10.0 ** 4)
    first = math.ceil(lo / step - 1e-9)
    ticks = [round((first + i) * step, 10) for i in range(int(span / step) + 2) if (first + i) * step <= hi + 1e-9]
    return chart_values(ticks), [f"{t * 100:.0f}%" for t in ticks]


def _fraction_ticks(fractions: Sequence[float]) -> tuple[list[float], list[str]]:
    """Ticks at every other swept fraction (at most 5), labelled as fractions."""
    fs = sorted(set(fractions))
    step = max(1, math.ceil(len(fs) / 5))
    shown = fs[::step]
    return chart_values(shown), [tick_label(f) if f else "0" for f in shown]


def draw_loss_curves(plt: Any, preview: "LossPreview", fraction: float | None) -> Text:
    """Loss vs fraction on `plt` (one line per pattern × text, base / CPT levels, the current fraction);
    returns the legend."""
    texts = preview.texts
    index = {name: j for j, (name, _) in enumerate(texts)}
    values: list[float] = []
    xs: list[float] = []
    curves = sorted(preview.curves(), key=lambda c: (PATTERN_ORDER.index(c.pattern)
                                                    if c.pattern in PATTERN_ORDER else 99, index[c.text]))
    for c in curves:
        plt.plot(chart_values(c.fractions), chart_values(c.losses), color=pattern_color(c.pattern),
                 marker=curve_marker(c.pattern, index[c.text], len(texts)))
        values += list(c.losses)
        xs += list(c.fractions)
    for name, _ in texts:
        for which, color in (("base", BASE_COLOR), ("target", CPT_COLOR)):
            level = preview.level(which, name)
            if level is not None:
                plt.hline(chart_values(level)[0], color=_level_color(color))
                values.append(level)
    if fraction is not None and xs:
        plt.vline(chart_values(fraction)[0], color=muted_color())
    if values:
        lo, hi = min(values), max(values)
        pad = (hi - lo) * 0.05 or 0.01
        plt.ylim(*chart_values([lo - pad, hi + pad]))
        plt.yticks(*_ticks(lo, hi))
    if xs:
        plt.xlim(*chart_values([min(xs), max(xs)]))
        plt.xticks(*_fraction_ticks(xs))
    legend = Text(no_wrap=False)
    for p in [p for p in PATTERN_ORDER if any(c.pattern == p for c in curves)]:
        label = f"{p} (mean of {_seeds(preview)})" if p == "random" else p
        legend.append_text(legend_key(label, pattern_color(p), "line"))
    legend.append("\n")
    for j, (name, role) in enumerate(texts):
        if no_color():
            legend.append_text(legend_key(f"{name} ({role})", "default", curve_marker(PATTERN_ORDER[0], j, len(texts))))
        else:
            marker = TEXT_MARKERS[j % len(TEXT_MARKERS)]
            legend.append(f" {_MARKER_GLYPHS.get(marker, marker)} {name} ({role})")
    legend.append_text(legend_key("base", _level_color(BASE_COLOR), "line"))
    legend.append_text(legend_key("CPT", _level_color(CPT_COLOR), "line"))
    legend.append(" · x: fraction rewound", style="dim")
    return legend


def _seeds(preview: "LossPreview") -> int:
    """How many random seeds the preview swept."""
    return len({r["seed"] for r in preview.candidate_rows() if r["pattern"] == "random"}) or 1


def _axis(points: Sequence["TradeoffPoint"], share: str, raw: str) -> tuple[list[float | None], bool]:
    """One axis of the trade-off: the shares when every point has one, else the raw mean losses (SPEC §9:
    an undefined share is shown as raw losses); returns (values, is_share)."""
    shares = [getattr(p, share) for p in points]
    if shares and all(v is not None for v in shares):
        return shares, True
    return [getattr(p, raw) for p in points], False


def draw_tradeoff(plt: Any, preview: "LossPreview", plan: "TradeoffPoint | None") -> Text:
    """Gain kept (x) vs forgetting recovered (y), one point per candidate, the plan's point highlighted;
    returns the legend (or why there is no trade-off)."""
    roles = {role for _, role in preview.texts}
    if roles != {"domain", "general"}:
        missing = "general" if "general" not in roles else "domain"
        return Text(f"The trade-off needs a domain and a general text: add a {missing} text "
                    f"(--{'general-' if missing == 'general' else ''}text FILE, or ctrl+p).", style="dim")
    points = preview.tradeoff() + ([plan] if plan is not None else [])
    xs, x_share = _axis(points, "gain_kept", "domain_loss")
    ys, y_share = _axis(points, "forgetting_recovered", "general_loss")
    cand = points[:-1] if plan is not None else points
    shown: list[tuple[float, float]] = []
    for p in PATTERN_ORDER:
        pts = [(x, y) for q, x, y in zip(cand, xs, ys) if q.pattern == p and x is not None and y is not None]
        if pts:
            plt.scatter(chart_values([x for x, _ in pts]), chart_values([y for _, y in pts]),
                        color=pattern_color(p), marker="dot" if not no_color() else SERIES_MARKERS[
                            PATTERN_ORDER.index(p) % len(SERIES_MARKERS)])
            shown += pts
    if plan is not None and xs[-1] is not None and ys[-1] is not None:
        plt.scatter(chart_values([xs[-1]]), chart_values([ys[-1]]), color=_level_color(PLAN_COLOR),
                    marker=PLAN_MARKER)
        shown.append((xs[-1], ys[-1]))
    if shown:
        x_lo, x_hi = min(x for x, _ in shown), max(x for x, _ in shown)
        y_lo, y_hi = min(y for _, y in shown), max(y for _, y in shown)
        if x_share:
            x_lo, x_hi = min(x_lo, 0.0), max(x_hi, 1.0)
        if y_share:
            y_lo, y_hi = min(y_lo, 0.0), max(y_hi, 1.0)
        xpad, ypad = (x_hi - x_lo) * 0.04 or 0.01, (y_hi - y_lo) * 0.06 or 0.01
        plt.xlim(*chart_values([x_lo - xpad, x_hi + xpad]))
        plt.ylim(*chart_values([y_lo - ypad, y_hi + ypad]))
        plt.xticks(*(_share_ticks(x_lo, x_hi) if x_share else _ticks(x_lo, x_hi)))
        plt.yticks(*(_share_ticks(y_lo, y_hi) if y_share else _ticks(y_lo, y_hi)))
    legend = Text()
    for p in [p for p in PATTERN_ORDER if any(q.pattern == p for q in cand)]:
        legend.append_text(legend_key(p, pattern_color(p), "dot"))
    plan_note = "plan" if plan is not None else "plan: m measures it"
    legend.append_text(legend_key(plan_note, _level_color(PLAN_COLOR), PLAN_MARKER))
    legend.append("\n x: " + ("gain kept (CPT 1, base 0)" if x_share else "domain loss (gain undefined)")
                  + " · y: " + ("forgetting recovered (CPT 0, base 1)" if y_share
                                else "general loss (forgetting undefined)"), style="dim")
    return legend


def percent(value: float | None) -> str:
    """A share as a percentage, '—' when undefined."""
    return "—" if value is None else f"{value * 100:.1f}%"


def plan_numbers(plan: "PlanLoss | None", label: str, windows: str) -> Text:
    """The measured loss of the current plan per text with the base and CPT levels, and its trade-off."""
    if plan is None:
        return Text(f"{label}: not measured — m measures it · {windows}", style="dim")
    text = Text(f"{label}: gain kept {percent(plan.point.gain_kept)}, recovered "
                f"{percent(plan.point.forgetting_recovered)};")  # first: what a narrow view must not cut
    for r in plan.rows:
        text.append(f" {r['text']} ", style="bold")
        text.append(f"{r['loss']:.4f} (base {r['base']:.4f} CPT {r['target']:.4f})")
    first = plan.rows[0]
    text.append(f" · {first['windows']}×{first['tokens']} tokens", style="dim")
    return text

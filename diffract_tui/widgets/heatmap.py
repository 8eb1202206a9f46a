"""A focusable layers × heads heatmap drawn with Rich text: one cell per (layer, query head), coloured on a
perceptually ordered ramp (or shaded with ░▒▓█ under NO_COLOR), a labelled min–max colour scale, a cursor
that moves with arrows/hjkl, marks on heads, and `=` on heads flagged unchanged (bit-identical to the base).

Display only: the values come from the engine; this widget maps them to colours and reports the keys.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
from rich.color import Color
from rich.style import Style
from rich.text import Text
from textual.binding import Binding
from textual.message import Message
from textual.reactive import reactive
from textual.widget import Widget

# viridis at 0, .25, .5, .75, 1: lightness rises monotonically, so it also reads in greyscale
RAMP_STOPS: tuple[tuple[int, int, int], ...] = (
    (68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))
SHADES = "░▒▓█"           # NO_COLOR: four levels, low → high (NaN is a dim ·)
RAMP_WIDTH = 10            # characters of the colour-scale swatch
LABEL_WIDTH = 4            # "L12 "
MAX_CELL_WIDTH = 8         # characters per cell when few heads leave room
MAX_CELL_HEIGHT = 3        # lines per layer when few layers leave room
MIN_VALUE_CELL = 6         # cells at least this wide print their value
CHROME_LINES = 4           # title, head header, scale, cursor line
UNCHANGED_GLYPH = "="      # a head the target left bit-identical to the base (its value is exactly 0)


def ramp_rgb(t: float) -> tuple[int, int, int]:
    """The ramp colour at position t ∈ [0, 1] (linear between the stops)."""
    t = min(1.0, max(0.0, t))
    x = t * (len(RAMP_STOPS) - 1)
    i = min(int(x), len(RAMP_STOPS) - 2)
    f = x - i
    a, b = RAMP_STOPS[i], RAMP_STOPS[i + 1]
    return tuple(int(round(a[c] + f * (b[c] - a[c]))) for c in range(3))  # type: ignore[return-value]


def fmt_value(v: float) -> str:
    """A value in 4 significant digits, '—' for NaN."""
    if v is None or not math.isfinite(v):
        return "—"
    if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3):
        return f"{v:.3e}"
    return f"{v:.4g}"


def compact(v: float, room: int) -> str:
    """`v` in at most `room` characters (3, then fewer significant digits, then e-notation), '' if it cannot fit."""
    if not math.isfinite(v):
        return "—" if room >= 1 else ""
    for text in (f"{v:.3g}", f"{v:.2g}", f"{v:.1g}", f"{v:.0e}".replace("e-0", "e-").replace("e+0", "e")):
        if len(text) <= room:
            return text
    return ""


def normalise(values: np.ndarray, log: bool = False) -> tuple[np.ndarray, float, float]:
    """Positions in [0, 1] (NaN stays NaN) for a min–max scale over the finite values; returns (t, min, max).
    With `log`, the scale is over log10 of the positive values (others become NaN)."""
    v = np.asarray(values, dtype=np.float64)
    if log:
        v = np.where(v > 0, v, np.nan)
        v = np.log10(v)
    finite = v[np.isfinite(v)]
    if finite.size == 0:
        return np.full(v.shape, np.nan), math.nan, math.nan
    lo, hi = float(finite.min()), float(finite.max())
    span = hi - lo
    t = (v - lo) / span if span > 0 else np.where(np.isfinite(v), 0.5, np.nan)
    if log:
        lo, hi = 10.0 ** lo, 10.0 ** hi
    return t, lo, hi


class Heatmap(Widget, can_focus=True):
    """layers × heads grid of one metric. `set_data` fills it; Enter posts `Opened`, space posts `Toggled`."""

    BINDINGS = [
        Binding("up,k", "move(-1, 0)", "Cell up", show=False),
        Binding("down,j", "move(1, 0)", "Cell down", show=False),
        Binding("left,h", "move(0, -1)", "Cell left", show=False),
        Binding("right,l", "move(0, 1)", "Cell right", show=False),
        Binding("home,g", "jump('first')", "First layer", show=False),
        Binding("end,G", "jump('last')", "Last layer", show=False),
        Binding("enter", "open", "Open the head under the cursor"),
        Binding("space", "toggle", "Mark / unmark the head under the cursor"),
    ]
    DEFAULT_CSS = """
    Heatmap { height: 1fr; width: 1fr; }
    Heatmap:focus { background: $boost; }
    """

    cursor: reactive[tuple[int, int]] = reactive((0, 0))

    class Opened(Message):
        """Enter on a cell."""

        def __init__(self, layer: int, head: int) -> None:
            self.layer, self.head = layer, head
            super().__init__()

    class Toggled(Message):
        """Space on a cell."""

        def __init__(self, layer: int, head: int) -> None:
            self.layer, self.head = layer, head
            super().__init__()

    class Moved(Message):
        """The cursor moved to a cell."""

        def __init__(self, layer: int, head: int) -> None:
            self.layer, self.head = layer, head
            super().__init__()

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.values: np.ndarray | None = None
        self.grid_title = ""
        self.note = ""
        self.log_scale = False
        self.marks: frozenset[tuple[int, int]] = frozenset()
        self.unchanged: frozenset[tuple[int, int]] = frozenset()
        self.empty_text = "No data yet."
        self._top = 0     # first visible layer
        self._left = 0    # first visible head
        self._wanted: tuple[int, int] | None = None

    # ---- data ------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return (0, 0) if self.values is None else (int(self.values.shape[0]), int(self.values.shape[1]))

    def set_data(self, values: np.ndarray, *, title: str, note: str = "", log: bool = False,
                 unchanged: Iterable[tuple[int, int]] = ()) -> None:
        """Show an (L × H) grid of `values` named `title` (the metric and what it compares); cells in
        `unchanged` are heads the target left bit-identical to the base, drawn with `=`."""
        self.values = np.asarray(values, dtype=np.float64)
        self.grid_title, self.note, self.log_scale = title, note, log
        self.unchanged = frozenset(unchanged)
        L, H = self.shape
        r, c = self._wanted if self._wanted is not None else self.cursor
        self._wanted = None
        self.cursor = (min(r, max(0, L - 1)), min(c, max(0, H - 1)))
        self.refresh()

    def clear(self, message: str) -> None:
        """Show a sentence instead of a grid."""
        self.values = None
        self.empty_text = message
        self.refresh()

    def set_marks(self, marks: Iterable[tuple[int, int]]) -> None:
        self.marks = frozenset(marks)
        self.refresh()

    def move_to(self, layer: int, head: int) -> None:
        """Put the cursor on (layer, head), clamped to the grid."""
        L, H = self.shape
        if L and H:
            self.cursor = (min(max(0, layer), L - 1), min(max(0, head), H - 1))
        else:
            self._wanted = (layer, head)  # applied when the data arrives

    def value_at(self, layer: int, head: int) -> float:
        if self.values is None:
            return math.nan
        return float(self.values[layer, head])

    def watch_cursor(self, cursor: tuple[int, int]) -> None:
        self.refresh()
        if self.values is not None:
            self.post_message(self.Moved(*cursor))

    # ---- actions ---------------------------------------------------------------------------
    def action_move(self, d_layer: int, d_head: int) -> None:
        r, c = self.cursor
        self.move_to(r + d_layer, c + d_head)

    def action_jump(self, where: str) -> None:
        L, _ = self.shape
        self.move_to(0 if where == "first" else L - 1, self.cursor[1])

    def action_open(self) -> None:
        if self.values is not None:
            self.post_message(self.Opened(*self.cursor))

    def action_toggle(self) -> None:
        if self.values is not None:
            self.post_message(self.Toggled(*self.cursor))

    # ---- drawing ---------------------------------------------------------------------------
    def _no_color(self) -> bool:
        return bool(getattr(self.app, "no_color", False))

    def _geometry(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(cell width, cell height, visible heads, visible layers) for the widget's size: cells grow (up to
        MAX_CELL_WIDTH × MAX_CELL_HEIGHT) when few heads and layers leave room."""
        L, H = self.shape
        avail = max(1, width - LABEL_WIDTH)
        cw = max(1, min(MAX_CELL_WIDTH, avail // max(1, H)))
        cols = max(1, min(H, avail // cw))
        room = max(1, height - CHROME_LINES)
        ch = max(1, min(MAX_CELL_HEIGHT, room // max(1, L)))
        rows = max(1, min(L, room // ch))
        return cw, ch, cols, rows

    def _scroll_into_view(self, cols: int, rows: int) -> None:
        r, c = self.cursor
        if r < self._top:
            self._top = r
        elif r >= self._top + rows:
            self._top = r - rows + 1
        if c < self._left:
            self._left = c
        elif c >= self._left + cols:
            self._left = c - cols + 1
        L, H = self.shape
        self._top = max(0, min(self._top, L - rows))
        self._left = max(0, min(self._left, H - cols))

    def _cell(self, t: float, value: float, width: int, cursor: bool, marked: bool, no_color: bool,
              middle: bool, same: bool = False) -> Text:
        """One line of a cell: colour (or shade) from position t; on the middle line the value when it fits
        (`=` for an unchanged head), a mark '•', and the cursor as [ ] in bold reverse."""
        if not math.isfinite(t):
            chars, style = list("·" * width), Style(dim=True)
        elif no_color:
            chars, style = list(SHADES[min(len(SHADES) - 1, int(t * len(SHADES)))] * width), Style()
        else:
            rgb = ramp_rgb(t)
            light = (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]) > 140
            chars = list(" " * width)
            style = Style(bgcolor=Color.from_rgb(*rgb), color="black" if light else "white")
        if middle:
            first = 1 if width >= 3 else 0
            if marked:
                chars[first if width >= 3 else width // 2] = "•" if not no_color else "*"
                first += 1
            room = width - first - (1 if width >= 3 else 0)
            if same:  # an unchanged head shows `=` at any width instead of its 0
                text = UNCHANGED_GLYPH if room >= 1 else ""
            else:
                text = compact(value, room) if width >= MIN_VALUE_CELL else ""
            if text:
                pad = first + (room - len(text)) // 2
                chars[pad:pad + len(text)] = list(text)
        if cursor:
            if width >= 3:
                chars[0], chars[-1] = "[", "]"
            elif width == 2:
                chars[0] = "["
            style = style + Style(reverse=True, bold=True)
        return Text("".join(chars), style=style)

    def render(self) -> Text:
        width, height = self.size.width or 80, self.size.height or 24
        if self.values is None:
            return Text(self.empty_text)
        L, H = self.shape
        cw, ch, cols, rows = self._geometry(width, height)
        self._scroll_into_view(cols, rows)
        no_color = self._no_color()
        t, lo, hi = normalise(self.values, self.log_scale)
        lines: list[Text] = [Text(self.grid_title, style="bold")]
        # head header
        line = Text("head".ljust(LABEL_WIDTH)[:LABEL_WIDTH], style="dim")
        for h in range(self._left, self._left + cols):
            label = str(h)
            if cw == 1:
                label = str(h % 10)
            elif len(label) > cw:
                label = label[-cw:]
            line.append(label.rjust(cw) if cw < 3 else label.center(cw),
                        style="bold" if h == self.cursor[1] else "dim")
        lines.append(line)
        # rows of cells, `ch` lines each; the label and values on the middle line
        mid = ch // 2
        for layer in range(self._top, self._top + rows):
            for k in range(ch):
                name = f"L{layer}" if k == mid else ""
                line = Text(name.ljust(LABEL_WIDTH)[:LABEL_WIDTH], style="bold" if layer == self.cursor[0] else "dim")
                for h in range(self._left, self._left + cols):
                    line.append_text(self._cell(float(t[layer, h]), float(self.values[layer, h]), cw,
                                                (layer, h) == self.cursor, (layer, h) in self.marks, no_color,
                                                k == mid, (layer, h) in self.unchanged))
                lines.append(line)
        # colour scale
        line = Text("scale ", style="dim")
        line.append(f"{'log' if self.log_scale else 'linear'} {fmt_value(lo)} ")
        for i in range(RAMP_WIDTH):
            x = i / (RAMP_WIDTH - 1)
            if no_color:
                line.append(SHADES[min(len(SHADES) - 1, int(x * len(SHADES)))])
            else:
                line.append(" ", style=Style(bgcolor=Color.from_rgb(*ramp_rgb(x))))
        line.append(f" {fmt_value(hi)}")
        if self.note:
            line.append(f"  {self.note}", style="dim")
        lines.append(line)
        # cursor line
        r, c = self.cursor
        line = Text(f"L{r} h{c} = ", style="bold")
        line.append(fmt_value(self.value_at(r, c)))
        if (r, c) in self.unchanged:
            line.append("  unchanged (bit-identical to the base)", style="bold")
        if (r, c) in self.marks:
            line.append("  marked", style="bold")
        hidden = []
        if rows < L:
            hidden.append(f"layers {self._top}–{self._top + rows - 1} of {L}")
        if cols < H:
            hidden.append(f"heads {self._left}–{self._left + cols - 1} of {H}")
        if hidden:
            line.append("  (" + ", ".join(hidden) + ")", style="dim")
        lines.append(line)
        for line in lines:
            line.truncate(width, overflow="ellipsis")
        return Text("\n").join(lines)

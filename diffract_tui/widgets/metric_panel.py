"""A compact table of metrics: one row per metric, one column per checkpoint (or target).

Unreliable values (a fit with too few tail points, SPEC §3) are greyed with the reason underneath.
It is a DataTable, so `x` exports exactly what it shows.
"""

from __future__ import annotations

from typing import Any, Sequence

from rich.cells import cell_len
from rich.text import Text
from textual.widgets import DataTable

from diffract_tui.widgets.charts import fmt


class MetricPanel(DataTable):
    """Rows of (metric name, value per column); `show_metrics` replaces the content."""

    DEFAULT_CSS = """
    MetricPanel { height: auto; max-height: 50%; }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes, zebra_stripes=False, cursor_type="row", show_cursor=False)

    def show_metrics(self, columns: Sequence[str], rows: Sequence[tuple[str, Sequence[Any]]],
                     unreliable: Sequence[Sequence[bool]] | None = None) -> None:
        """Fill the table: `rows` = (metric name, one value per column); greyed cells where
        `unreliable[row][col]` is True."""
        self.clear(columns=True)
        body: list[list[Text | str]] = []
        for r, (name, values) in enumerate(rows):
            cells: list[Text | str] = [name]
            for c, value in enumerate(values):
                grey = bool(unreliable and unreliable[r][c])
                cells.append(Text(fmt(value) + ("?" if grey else ""), style="dim italic" if grey else ""))
            body.append(cells)
        headers = ["metric", *columns]
        # explicit widths: the header is drawn with the same widths as the rows from the first frame on
        widths = [max([cell_len(h)] + [cell_len(c.plain if isinstance(c, Text) else c) for c in col])
                  for h, col in zip(headers, zip(*body))] if body else [cell_len(h) for h in headers]
        self.add_column("metric", key="metric", width=widths[0])
        for i, name in enumerate(columns):
            self.add_column(name, key=f"c{i}", width=widths[i + 1])
        for cells in body:
            self.add_row(*cells, key=str(cells[0]))


def table_rows(table: DataTable) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of a DataTable as plain strings, exactly as shown (used by the `x` export)."""
    header = [col.label.plain if isinstance(col.label, Text) else str(col.label) for col in table.columns.values()]
    rows = [[c.plain if isinstance(c, Text) else str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]
    return header, rows

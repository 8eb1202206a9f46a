"""View 5 — Table: every matrix and head slice of the model with its key metrics, one row per node.

Rows come from `analysis.run.scan.scan` over all checkpoints (weights and deltas, heads included), computed in a
worker and filled in progressively; the scan reads and writes the persistent cache, so a second look is
quick. Columns: per CPT checkpoint the relative update ‖ΔW‖/‖W₀‖ and ρ, α of each checkpoint (greyed `?`
when the fit is unreliable, SPEC §3), and the stable rank of ΔW. The node's kind (attention, mlp, head…)
is not shown but the filter matches it. `s` sorts by the column under the cursor (`S` reverse), `f` (or `/`
in the table) filters: words match the node name (`L3 q`, `h5`, `mlp`), `col>x` / `col<x` compare a column
(`rel>0.1`, `alpha<2`); a sort or filter puts the cursor on the first row; g/Home and G/End go to the first and
last row. The node column has a fixed width (long names end in "…", the whole name shows in the info line).
Enter opens the row's node in the tree; `x` (app) exports the rows shown with the scan's full-precision values and
α's reliability as its own column, named `scan-<labels>-heads` (`export_table`).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Input, Label

from diffract_tui.messages import OpenNode
from diffract_tui.node import NodeRef
from diffract_tui.views import ExportTable, NodeView, file_part
from diffract_tui.views.worker import Cancelled, CancelledFn, EngineWork, ProgressFn
from diffract_tui.widgets.charts import fmt

if TYPE_CHECKING:  # pragma: no cover
    from analysis.run.session import ExplorerSession

FIXED_COLUMNS = ("node", "shape")
NODE_WIDTH = 16  # the node column's width: long names (cls.predictions.transform.dense) end in "…"
FLUSH_S = 0.3   # the worker hands rows to the table at most this often
CONDITION = re.compile(r"^([A-Za-z_]+)(<=|>=|<|>)(-?[0-9.eE+-]+)$")


@dataclass(frozen=True)
class Column:
    """A metric column: its key (`alpha:<label>`), header, the scan operation and metric it shows."""

    key: str
    header: str
    operation: str      # "weight" | "delta"
    checkpoint: str     # label of the checkpoint the row comes from
    metric: str


@dataclass
class Record:
    """One node's row: where it is, its order in the scan, its shape, and metric values by column key."""

    node: NodeRef
    order: int
    kind: str
    shape: str
    values: dict[str, float | None] = field(default_factory=dict)
    unreliable: set[str] = field(default_factory=set)

    @property
    def label(self) -> str:
        return self.node.label()


def node_of(row: dict[str, Any]) -> NodeRef:
    """The tree node of a scan row: a matrix (head None), a query head (q/o) or a kv head (k/v)."""
    head = row.get("head")
    if head is None:
        head = row.get("kv_head") if row.get("module") in ("k", "v") and row.get("kv_head") is not None else None
    return NodeRef(row.get("layer"), row.get("module"), head)


def is_head_row(row: dict[str, Any]) -> bool:
    return row.get("head") is not None or (row.get("module") in ("k", "v") and row.get("kv_head") is not None)


def columns_for(session: "ExplorerSession") -> list[Column]:
    """Per CPT checkpoint Δrel and ρ, then α per checkpoint, then the stable rank of ΔW per CPT checkpoint."""
    cols = [Column(f"rel:{t.label}", f"Δrel {t.label}", "delta", t.label, "delta_rel") for t in session.targets]
    for t in session.targets:
        cols.append(Column(f"rho:{t.label}", f"ρ {t.label}", "delta", t.label, "delta_rho"))
    cols += [Column(f"alpha:{c.label}", f"α {c.label}", "weight", c.label, "pl_alpha") for c in session.checkpoints]
    for t in session.targets:
        cols.append(Column(f"srank:{t.label}", f"srank Δ {t.label}", "delta", t.label, "stable_rank"))
    return cols


def matches(record: Record, words: list[str], conditions: list[tuple[str, str, float]]) -> bool:
    """True when every word is in the row's name/kind and every `col op x` holds for some matching column."""
    text = f"{record.label} {record.kind}".lower()
    if any(w not in text for w in words):
        return False
    for prefix, op, x in conditions:
        vals = [v for k, v in record.values.items() if k.lower().startswith(prefix) and v is not None
                and not math.isnan(v)]
        ok = {"<": lambda v: v < x, ">": lambda v: v > x, "<=": lambda v: v <= x, ">=": lambda v: v >= x}[op]
        if not any(ok(v) for v in vals):
            return False
    return True


def parse_filter(text: str) -> tuple[list[str], list[tuple[str, str, float]]]:
    """Words (lower case) and (column prefix, operator, number) conditions of a filter string."""
    words, conditions = [], []
    for token in text.split():
        m = CONDITION.match(token)
        if m:
            try:
                conditions.append((m.group(1).lower(), m.group(2), float(m.group(3))))
                continue
            except ValueError:
                pass
        words.append(token.lower())
    return words, conditions


def clip(text: str, width: int = NODE_WIDTH) -> str:
    """`text` cut to `width` cells with a trailing "…" when longer (the full name shows in the info line)."""
    return text if len(text) <= width else text[:width - 1] + "…"


class MetricsTable(DataTable):
    """The table; `/` opens the view's filter while it has focus; g/Home and G/End go to the first/last row
    (bound here, so they win over the tree's g/G while the table has the focus)."""

    BINDINGS = [
        Binding("slash", "filter", "Filter rows", show=False, key_display="/"),
        Binding("g,home", "first_row", "First row", show=False),
        Binding("G,end", "last_row", "Last row", show=False),
    ]

    def action_first_row(self) -> None:
        """g / Home: the first row, scrolled to the top."""
        self.move_cursor(row=0, animate=False)
        self.scroll_home(animate=False)

    def action_last_row(self) -> None:
        """G / End: the last row, scrolled into view."""
        if self.row_count:
            self.move_cursor(row=self.row_count - 1, animate=False)

    def action_filter(self) -> None:
        view = next((a for a in self.ancestors if isinstance(a, TableView)), None)
        if view is not None:
            view.action_filter()


class FilterInput(Input):
    """The filter line: Esc clears and closes it."""

    BINDINGS = [Binding("escape", "close", "Clear the filter", show=False)]

    def action_close(self) -> None:
        view = next((a for a in self.ancestors if isinstance(a, TableView)), None)
        if view is not None:
            view.close_filter(clear=True)


class TableView(EngineWork, NodeView):
    """Every matrix/head with its metrics, sortable and filterable; Enter jumps to the node."""

    VIEW_ID = "table"
    BINDINGS = [
        Binding("s", "sort(False)", "Sort by the column under the cursor"),
        Binding("S", "sort(True)", "Sort by it, largest first"),
        Binding("f", "filter", "Filter rows: words (L3 q h5) and col>x (rel>0.1, alpha<2)"),
        Binding("tab", "focus_table", "Focus the table ⇄ tree", show=False),
    ]
    DEFAULT_CSS = """
    TableView { layout: vertical; }
    TableView > #table-info { height: 1; width: 1fr; color: $text-muted; }
    TableView > FilterInput, TableView > FilterInput:focus { height: 1; border: none; padding: 0 1; display: none; }
    TableView > FilterInput.-shown, TableView > FilterInput.-shown:focus { display: block; }
    TableView > MetricsTable { height: 1fr; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.records: dict[NodeRef, Record] = {}
        self.columns: list[Column] = []
        self.sort_key: str | None = None
        self.sort_reverse = False
        self.filter_text = ""
        self.complete = False
        self.status = ""
        self._shown_keys: list[NodeRef] = []
        self.scan_progress: tuple[int, int] = (0, 0)  # (scan rows done, total) of the running scan

    def compose(self) -> ComposeResult:
        yield Label("", id="table-info")
        yield FilterInput(placeholder="filter: L3 q h5 · rel>0.1 · alpha<2 (enter keeps, esc clears)",
                          id="table-filter")
        yield MetricsTable(id="table-rows", cursor_type="cell", zebra_stripes=True)

    def on_mount(self) -> None:
        self.columns = columns_for(self.session)
        table = self.table
        table.add_column("node", key="node", width=NODE_WIDTH)
        table.add_column("shape", key="shape")
        for c in self.columns:
            table.add_column(c.header, key=c.key)

    @property
    def session(self) -> "ExplorerSession":
        return self.app.session

    @property
    def table(self) -> MetricsTable:
        return self.query_one(MetricsTable)

    # ---- the NodeView contract ---------------------------------------------------------------
    def show_node(self, node: NodeRef) -> None:
        """The table covers the whole model: start (or resume) the scan the first time it is shown."""
        self.node = node
        if not self.complete and not self._scan_running():
            self.start_scan()

    def refresh_node(self) -> None:
        if not self._scan_running():
            self.complete = False
            self.start_scan()

    def show_message(self, text: str) -> None:
        self.status = text
        self._update_info()

    def cancel_message(self) -> str:
        """What the view says after Esc: the whole-model scan stopped, and how far it got."""
        done, total = self.scan_progress
        return f"table scan cancelled ({done} of {total} rows) — press enter or move to scan again."

    def _scan_running(self) -> bool:
        return any(w.group == self.VIEW_ID and w.is_running for w in self.workers)

    # ---- the scan ----------------------------------------------------------------------------
    def start_scan(self) -> None:
        """Scan every matrix and head of every checkpoint (and the deltas) in the worker, rows flowing in."""
        self.result = None
        self.status = "scanning…"
        self._update_info()
        self.scan_progress = (0, 0)
        self.start_work("table scan", self._scan, self._scan_done, fail=self.show_message)

    def _scan(self, progress: ProgressFn, cancelled: CancelledFn) -> int:
        s = self.session
        wanted = {(c.operation, c.checkpoint, c.metric): c.key for c in self.columns}
        metrics_of = {}
        for (op, ck, metric), key in wanted.items():
            metrics_of.setdefault((op, ck), []).append((metric, key))
        pending: list[dict[str, Any]] = []
        last = time.monotonic()
        count = 0

        def on_progress(done: int, total: int | None, label: str) -> None:
            self.scan_progress = (done, total or 0)
            progress(done, total, label)

        for row in s.scan_rows(progress=on_progress, cancelled=cancelled):
            count += 1
            pending.append(row)
            now = time.monotonic()
            if now - last >= FLUSH_S:
                batch, pending = pending, []
                last = now
                self.app.call_from_thread(self._merge, batch, metrics_of)
        if cancelled():
            raise Cancelled()
        if pending:
            self.app.call_from_thread(self._merge, pending, metrics_of)
        return count

    def _scan_done(self, count: int) -> None:
        self.complete = True
        self.result = count
        self.status = f"{len(self.records)} matrices and heads from {count} scan rows"
        self._rebuild()

    def _merge(self, rows: list[dict[str, Any]], metrics_of: dict) -> None:
        """Fold scan rows into records; append/update table rows in place when no sort or filter is active."""
        new: list[Record] = []
        changed: set[NodeRef] = set()
        for row in rows:
            node = node_of(row)
            rec = self.records.get(node)
            if rec is None:
                kind = "head" if is_head_row(row) else str(row.get("kind") or "")
                rec = Record(node, len(self.records), kind, f"{row.get('rows')}×{row.get('cols')}")
                self.records[node] = rec
                new.append(rec)
            for metric, key in metrics_of.get((row.get("operation"), row.get("checkpoint")), []):
                value = row.get(metric)
                rec.values[key] = None if value is None else float(value)
                if metric == "pl_alpha" and not row.get("pl_alpha_reliable", True):
                    rec.unreliable.add(key)
            changed.add(node)
        if self.sort_key is None and not self.filter_text:
            table = self.table
            new_nodes = {r.node for r in new}
            for node in changed - new_nodes:
                rec = self.records[node]
                for c in self.columns:
                    table.update_cell(rec.label, c.key, self._cell(rec, c.key))
            for rec in new:
                table.add_row(*self._cells(rec), key=rec.label)
                self._shown_keys.append(rec.node)
        else:
            self._rebuild()
        self._update_info()

    # ---- export ------------------------------------------------------------------------------
    def export_table(self) -> ExportTable | None:
        """`x`: the rows shown (filter and order kept) with the scan's values at full precision, α's reliability
        in its own column; named by what it holds (`scan-<labels>-heads`), not by the tree's node."""
        recs = [self.records[n] for n in self._shown_keys if n in self.records]
        if not recs:
            return None
        s = self.session
        held = "heads" if s.layout.heads_available else "matrices"
        stem = "-".join(["scan", *(file_part(c.label) for c in s.checkpoints), held]
                        + (["filtered"] if self.filter_text else []))
        return ExportTable(stem, [self.export_row(rec) for rec in recs])

    def export_row(self, rec: Record) -> dict[str, Any]:
        """One record as exported: where the node is, then `<metric>[<checkpoint>]` per column."""
        row: dict[str, Any] = {"node": rec.label, "layer": rec.node.layer, "module": rec.node.module,
                               "head": rec.node.head, "kind": rec.kind, "shape": rec.shape}
        for c in self.columns:
            value = rec.values.get(c.key)
            row[f"{c.metric}[{c.checkpoint}]"] = value
            if c.metric == "pl_alpha":
                row[f"pl_alpha_reliable[{c.checkpoint}]"] = None if value is None else c.key not in rec.unreliable
        return row

    # ---- drawing -----------------------------------------------------------------------------
    def _cell(self, rec: Record, key: str) -> Text:
        value = rec.values.get(key)
        grey = key in rec.unreliable
        return Text(fmt(value) + ("?" if grey else ""), style="dim italic" if grey else "", justify="right")

    def _cells(self, rec: Record) -> list[Any]:
        return [clip(rec.label), rec.shape] + [self._cell(rec, c.key) for c in self.columns]

    def visible_records(self) -> list[Record]:
        """The records the filter lets through, in the chosen order."""
        words, conditions = parse_filter(self.filter_text)
        recs = [r for r in self.records.values() if matches(r, words, conditions)]
        if self.sort_key is None:
            recs.sort(key=lambda r: r.order)
        elif self.sort_key in FIXED_COLUMNS:
            attr = {"node": "order", "shape": "shape"}[self.sort_key]
            recs.sort(key=lambda r: (getattr(r, attr), r.order), reverse=self.sort_reverse)
        else:
            def value(r: Record) -> float:
                """The sort value to 5 significant digits (float32 compute carries a few 1e-7 of round-off):
                values equal but for round-off tie and keep tree order, not an order set by the CPU's rounding."""
                v = r.values.get(self.sort_key)
                return math.nan if v is None else float(f"{v:.5g}")
            finite = [r for r in recs if not math.isnan(value(r))]
            missing = [r for r in recs if math.isnan(value(r))]
            sign = -1.0 if self.sort_reverse else 1.0
            finite.sort(key=lambda r: (sign * value(r), r.order))  # ties in tree order either way
            recs = finite + sorted(missing, key=lambda r: r.order)   # missing values always last
        return recs

    def _rebuild(self, *, to_top: bool = False) -> None:
        """Refill the table from the records. After a sort or a filter (`to_top`) the cursor goes to the first
        row, scrolled to the top; when rows arrive while one is active it stays on its node."""
        table = self.table
        row, col = table.cursor_coordinate
        current = self._shown_keys[row] if 0 <= row < len(self._shown_keys) else None
        recs = self.visible_records()
        table.clear()
        for rec in recs:
            table.add_row(*self._cells(rec), key=rec.label)
        self._shown_keys = [r.node for r in recs]
        if not to_top and current in self._shown_keys:
            table.move_cursor(row=self._shown_keys.index(current), column=col, animate=False)
        elif recs:
            table.move_cursor(row=0, column=col, animate=False)
            if to_top:
                table.scroll_home(animate=False)
        self._update_info()

    def _update_info(self) -> None:
        parts = [self.status] if self.status else []
        if self.filter_text:
            parts.append(f"filter '{self.filter_text}': {len(self._shown_keys)} of {len(self.records)}")
        if self.sort_key is not None:
            header = self.sort_key if self.sort_key in FIXED_COLUMNS else next(
                (c.header for c in self.columns if c.key == self.sort_key), self.sort_key)
            parts.append(f"sorted by {header} {'▼' if self.sort_reverse else '▲'}")
        parts.append("s/S sort · f filter · enter open")
        full = self.cursor_node_name()
        if full is not None:  # the node column cuts long names: the whole name of the cursor's row
            parts.insert(0, full)
        self.query_one("#table-info", Label).update(" · ".join(parts))

    def cursor_node_name(self) -> str | None:
        """The full name of the cursor row's node when the node column shows it cut, else None."""
        row = self.table.cursor_coordinate.row
        if not 0 <= row < len(self._shown_keys):
            return None
        label = self._shown_keys[row].label()
        return label if clip(label) != label else None

    def on_data_table_cell_highlighted(self, event: DataTable.CellHighlighted) -> None:
        event.stop()
        self._update_info()

    # ---- actions -----------------------------------------------------------------------------
    def column_under_cursor(self) -> str:
        keys = list(FIXED_COLUMNS) + [c.key for c in self.columns]
        col = self.table.cursor_coordinate.column
        return keys[min(max(0, col), len(keys) - 1)]

    def action_sort(self, reverse: bool) -> None:
        """s / S: sort by the column under the cursor (smallest first / largest first); missing values last."""
        self.sort_key = self.column_under_cursor()
        self.sort_reverse = bool(reverse)
        self._rebuild(to_top=True)

    def action_filter(self) -> None:
        """f: type words and conditions; rows update as you type."""
        box = self.query_one(FilterInput)
        box.add_class("-shown")
        box.value = self.filter_text
        box.focus()

    def close_filter(self, clear: bool) -> None:
        box = self.query_one(FilterInput)
        if clear:
            box.value = ""
            self.filter_text = ""
            self._rebuild(to_top=True)
        box.remove_class("-shown")
        self.table.focus()

    def action_focus_table(self) -> None:
        """tab: move the focus between the tree and the table."""
        if self.table.has_focus:
            tree = getattr(self.app, "tree", None)
            if tree is not None and tree.parent is not None and tree.parent.display:
                tree.focus()
                return
            self.app.screen.focus_next()
        else:
            self.table.focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        if isinstance(event.input, FilterInput):
            event.stop()
            self.filter_text = event.value.strip()
            self._rebuild(to_top=True)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if isinstance(event.input, FilterInput):
            event.stop()
            self.close_filter(clear=False)

    def on_data_table_cell_selected(self, event: DataTable.CellSelected) -> None:
        event.stop()
        row = event.coordinate.row
        if 0 <= row < len(self._shown_keys):
            self.post_message(OpenNode(self._shown_keys[row]))

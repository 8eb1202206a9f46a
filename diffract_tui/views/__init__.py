"""The right-hand views, switched with number keys, and the base class that runs their work off the UI thread.

`NodeView` gives a view the app's contract (`show_node`) plus the plumbing every computing view needs:
a synchronous cache look-up (results already computed appear at once), a short debounce while the cursor
is moving, one exclusive thread worker per view (a newer node cancels the older request), progress on the
status bar, and errors shown in the view instead of crashing the app.
"""

from __future__ import annotations

import importlib
import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from textual.widget import Widget
from textual.widgets import Label, Static

from diffract_tui.messages import MetricsReady
from diffract_tui.node import NodeRef
from diffract_tui.views.worker import first_line, run_engine_call
from diffract_tui.widgets.metric_panel import MetricPanel

COMPUTE_DEBOUNCE_S = 0.12  # wait this long after the last cursor move before starting a computation


@dataclass(frozen=True)
class ViewSpec:
    """One view: its number key, widget id, title, and the module that defines it."""

    key: str
    id: str
    title: str
    module: str


VIEW_SPECS: tuple[ViewSpec, ...] = (
    ViewSpec("1", "spectrum", "Spectrum", "diffract_tui.views.spectrum"),
    ViewSpec("2", "delta", "Delta", "diffract_tui.views.delta"),
    ViewSpec("3", "heads", "Heads", "diffract_tui.views.heads_grid"),
    ViewSpec("4", "rewind", "Rewind", "diffract_tui.views.rewind"),
    ViewSpec("5", "table", "Table", "diffract_tui.views.table"),
    ViewSpec("6", "evolution", "Evolution", "diffract_tui.views.evolution"),
)


def view_class(spec: ViewSpec) -> type[Widget] | None:
    """The view widget class defined in `spec.module` (a Widget subclass with `show_node`, preferring
    the one whose VIEW_ID is `spec.id`), or None when that module is not part of this build."""
    try:
        module = importlib.import_module(spec.module)
    except ModuleNotFoundError as err:
        if err.name == spec.module:
            return None
        raise
    views = [cls for _, cls in inspect.getmembers(module, inspect.isclass)
             if cls.__module__ == module.__name__ and issubclass(cls, Widget) and hasattr(cls, "show_node")]
    views.sort(key=lambda cls: getattr(cls, "VIEW_ID", None) != spec.id)  # the one with the view's id first
    return views[0] if views else None


@dataclass(frozen=True)
class ExportTable:
    """What `x` writes for a view: a file stem naming what the table holds, and rows of the engine's values at
    full precision (reliability in its own column), not the 3-digit strings the view shows."""

    stem: str
    rows: list[dict[str, Any]]
    node: str | None = None   # the node the rows are of; None for a whole-model table


def file_part(text: str) -> str:
    """`text` as a piece of a file name: runs of anything but letters, digits, `.`, `_`, `-` become one `-`."""
    return re.sub(r"[^\w.-]+", "-", text).strip("-") or "x"


def metric_record(node: NodeRef, checkpoint: str, metrics: Mapping[str, Any], keys: Iterable[str],
                  **extra: Any) -> dict[str, Any]:
    """One exported row: node, checkpoint, each metric of `keys` as the engine computed it, `extra`, and the
    power-law fit's reliability (SPEC §3) with its warning as their own columns."""
    row: dict[str, Any] = {"node": node.label(), "checkpoint": checkpoint}
    row.update({key: metrics.get(key) for key in keys})
    row.update(extra)
    row["pl_alpha_reliable"] = bool(metrics.get("pl_alpha_reliable", True))
    row["fit_warning"] = str(metrics.get("fit_warning") or "")
    return row


class UnavailableView(Static):
    """Stands in for a view whose module is not in this build."""

    def __init__(self, spec: ViewSpec) -> None:
        super().__init__(f"{spec.title}: not available in this build.", id=spec.id)

    def show_node(self, node: NodeRef) -> None:
        """Nothing to show."""


class NodeView(Widget):
    """Base of a view that computes something about the node under the cursor.

    Subclasses implement `accepts`, `cached`, `compute` and `show_result` (and `show_waiting`,
    `show_message`). `compute` runs in a thread; it receives `progress(done, total, text)` and
    `cancelled()` callables and should call `cancelled()` between steps.
    """

    VIEW_ID = "view"

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id or self.VIEW_ID)
        self.node: NodeRef | None = None
        self.result: Any = None
        self._timer = None

    # ---- to implement -----------------------------------------------------------------------
    def accepts(self, node: NodeRef) -> str | None:
        """None when this view can show `node`, else the sentence to show instead."""
        return None

    def cached(self, node: NodeRef) -> Any | None:
        """The result for `node` when it is already known (fast, on the UI thread), else None."""
        return None

    def compute(self, node: NodeRef, progress: Callable[[int, int | None, str], None],
                cancelled: Callable[[], bool]) -> Any:
        """Compute the result for `node` (runs in a worker thread)."""
        raise NotImplementedError

    def show_result(self, node: NodeRef, result: Any) -> None:
        """Draw `result` (UI thread)."""

    def show_waiting(self, node: NodeRef) -> None:
        """Show that `node` is being computed."""

    def show_message(self, text: str) -> None:
        """Show a sentence instead of a result."""

    # ---- the contract with the app ----------------------------------------------------------
    def show_node(self, node: NodeRef) -> None:
        """Show `node`: at once from the cache, else after a short debounce in a worker."""
        if node == self.node and self.result is not None:
            return
        self.node = node
        self.result = None
        self.cancel_work()
        reason = self.accepts(node)
        if reason is not None:
            self.show_message(reason)
            return
        hit = self.cached(node)
        if hit is not None:
            self._deliver(node, hit)
            return
        self.show_waiting(node)
        self._timer = self.set_timer(COMPUTE_DEBOUNCE_S, lambda: self._start(node))

    def refresh_node(self) -> None:
        """Show the current node again (e.g. after a cache fill by "compute all")."""
        node, self.node = self.node, None
        if node is not None:
            self.show_node(node)

    def cancel_message(self) -> str:
        """What the view says after Esc stopped its computation of `self.node`."""
        return f"{self.node.label() if self.node else 'this node'}: cancelled — press enter or move to compute again."

    def marks_changed(self, marks: frozenset[tuple[int, int]]) -> None:
        """The marked heads changed (the app calls this on every view, shown or not); most views ignore it."""

    def deactivate(self) -> None:
        """The view was switched away from: stop its pending work (it recomputes when shown again)."""
        self.cancel_work()
        if self.result is None:
            self.node = None

    def cancel_work(self) -> None:
        """Stop a pending or running computation of this view."""
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        self.workers.cancel_group(self, self.VIEW_ID)
        self.app.work_done(self.VIEW_ID)

    def _start(self, node: NodeRef) -> None:
        self._timer = None
        if node != self.node:
            return
        self.run_worker(lambda: self._work(node), thread=True, exclusive=True, group=self.VIEW_ID,
                        name=f"{self.VIEW_ID}:{node.label()}", exit_on_error=False)

    def _work(self, node: NodeRef) -> None:
        run_engine_call(self, node.label(), lambda progress, cancelled: self.compute(node, progress, cancelled),
                        start="reading", on_result=lambda result: self._deliver(node, result),
                        on_error=lambda err: self._fail(node, err))

    def _deliver(self, node: NodeRef, result: Any) -> None:
        if node != self.node:
            return
        self.result = result
        self.show_result(node, result)

    def _fail(self, node: NodeRef, err: Exception) -> None:
        if node != self.node:
            return
        message = first_line(err)
        self.show_message(f"Could not compute {node.label()}: {message}")
        self.app.notify(message, title=f"{node.label()} failed", severity="error")


class ChartView(NodeView):
    """A NodeView that charts one node's result (per checkpoint) under a title line, with a legend line, a
    `MetricPanel` and an optional note line — the Spectrum and Delta views. Widget ids are
    `#{VIEW_ID}-title`, `-legend`, `-note`; subclasses draw (`_draw`, `_fill_metrics`, `clear_charts`) and say
    what the title and the tree badge read (`TITLE`, `WAITING`, `badge_metrics`)."""

    TITLE = ""                    # before the node's label in the title line
    WAITING = "computing…"        # after it while a computation runs

    def _line(self, part: str) -> Label:
        return self.query_one(f"#{self.VIEW_ID}-{part}", Label)

    def accepts(self, node: NodeRef) -> str | None:
        return self.app.session.unavailable(node)

    def show_message(self, text: str) -> None:
        self.remove_class("-stale")
        self.add_class("-empty")
        self._line("title").update(text)
        self._line("legend").update("")
        for note in self.query(f"#{self.VIEW_ID}-note"):
            note.update("")
        self.query_one(MetricPanel).clear(columns=True)
        self.clear_charts()

    def show_waiting(self, node: NodeRef) -> None:
        """Clear the previous node's chart, legend and numbers under the new title: they are not this node's
        (cache hits never get here, they are drawn at once)."""
        self.remove_class("-stale", "-empty")
        self._line("title").update(f"{self.TITLE}{node.label()} — {self.WAITING}")
        self._line("legend").update("")
        for note in self.query(f"#{self.VIEW_ID}-note"):
            note.update("")
        self.query_one(MetricPanel).clear(columns=True)
        self.clear_charts()

    def export_table(self) -> ExportTable | None:
        """`x`: the shown node's metrics, one row per checkpoint, at full precision (None before a result)."""
        if self.result is None or self.node is None:
            return None
        label = self.node.label()
        return ExportTable(f"{self.VIEW_ID}-{file_part(label)}", self.export_rows(self.node, self.result), label)

    def export_rows(self, node: NodeRef, result: Any) -> list[dict[str, Any]]:
        """The rows `export_table` writes (see `metric_record`)."""
        raise NotImplementedError

    def show_result(self, node: NodeRef, result: Any) -> None:
        self.remove_class("-empty", "-stale")
        rows, cols = result.shape
        self._line("title").update(f"{self.TITLE}{node.label()}  {result.title}  {rows}×{cols}")
        self._draw(result)
        self._fill_metrics(result)
        badge = self.badge_metrics(result)
        if badge is not None:
            self.post_message(MetricsReady(node, badge))

    def badge_metrics(self, result: Any) -> dict[str, Any] | None:
        """What the tree's badge for this node shows, or None to leave it."""
        return None

    def clear_charts(self) -> None:
        """Empty every chart of the view."""

    def _draw(self, result: Any) -> None:
        raise NotImplementedError

    def _fill_metrics(self, result: Any) -> None:
        raise NotImplementedError

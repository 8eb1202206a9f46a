"""The explorer app: the model tree on the left, views on the right (number keys switch them), a status line.

The app holds an opened `analysis.run.session.ExplorerSession` as `app.session`. It never computes on the UI
thread: views compute in their own workers (see `diffract_tui.views.NodeView`), "compute all" runs in
an app worker, and badges from the cache are read in a short worker when a tree node expands.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from rich.text import Text
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.widget import Widget
from textual.widgets import ContentSwitcher, DataTable, Input, Label, Tree
from textual.worker import get_current_worker

from diffract_tui import settings as app_settings
from diffract_tui.commands import DiffractCommands
from diffract_tui.messages import MarksChanged, MetricsReady, NodeSelected, OpenNode, ToggleMark
from diffract_tui.node import NodeRef
from diffract_tui.screens.confirm import QuitScreen
from diffract_tui.screens.export import ExportChoice, ExportScreen, FolderScreen
from diffract_tui.screens.help import HelpScreen, binding_rows, help_groups
from diffract_tui.views import VIEW_SPECS, NodeView, UnavailableView, ViewSpec, view_class
from diffract_tui.widgets.metric_panel import table_rows
from diffract_tui.widgets.status import StatusBar
from diffract_tui.widgets.tree import ModelTree, badge_from_metrics

if TYPE_CHECKING:  # pragma: no cover
    from analysis.run.session import ExplorerSession

SCAN_SOURCE = "scan"
BADGE_FLUSH_S = 0.25  # compute-all pushes badges to the tree at most this often


def lower_thread_priority(niceness: int = 10) -> None:
    """Make the calling (worker) thread yield the CPU to the UI thread: on Linux a thread has its own nice
    value. Best effort; elsewhere it does nothing."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except (AttributeError, OSError):
        pass


def view_bindings(spec: ViewSpec) -> list[Binding]:
    """The bindings a view class declares (its own and its bases'), in declaration order."""
    cls = view_class(spec)
    found: list[Binding] = []
    for klass in reversed(cls.__mro__ if cls is not None else ()):
        for b in vars(klass).get("BINDINGS", ()):
            if isinstance(b, Binding):
                found.append(b)
    return found


def short_description(text: str) -> str:
    """A binding's description cut for one footer line: the words before a colon or a parenthesis."""
    for mark in (":", " ("):
        text = text.split(mark, 1)[0]
    return text.strip()


def screen_bindings(specs: tuple[ViewSpec, ...]) -> list[Binding]:
    """Every view's bindings, re-declared on the screen as `view_key(view, action)`: the active view's keys
    work while the tree has focus (`MainScreen.check_action` turns the other views' off)."""
    out = []
    for spec in specs:
        for b in view_bindings(spec):
            out.append(Binding(b.key, f"view_key({spec.id!r}, {b.action!r})", b.description, show=b.show,
                               key_display=b.key_display))
    return out


class MainScreen(Screen):
    """The one screen of the explorer. The active view's bindings work even while the tree has focus: the
    screen carries every view's keys and enables only the active view's (public `check_action`)."""

    BINDINGS = screen_bindings(VIEW_SPECS)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """`view_key` bindings only for the active view (False lets the key fall through to the app)."""
        if action == "view_key":
            return bool(parameters) and parameters[0] == getattr(self.app, "active_view_id", None)
        return True

    async def action_view_key(self, view_id: str, action: str) -> None:
        """Run `action` on the active view (the one `check_action` let through)."""
        view = getattr(self.app, "active_view", None)
        if view is not None and view.id == view_id:
            await self.app.run_action(action, view)

    def compose(self) -> ComposeResult:
        yield from self.app.compose_main()

    def on_mount(self) -> None:
        self.app.main_mounted(self)


class ViewTab(Label):
    """One view's name on the view bar: clicking it switches to that view."""

    def __init__(self, spec: ViewSpec) -> None:
        super().__init__(f" {spec.key} {spec.title} ", id=f"tab-{spec.id}", classes="view-tab")
        self.spec = spec

    def on_click(self) -> None:
        self.app.action_view(self.spec.id)


class DiffractApp(App):
    """Walk layers and heads, see spectra and deltas, mark heads and export them as a rewind list."""

    CSS_PATH = "app.tcss"
    TITLE = "diffract-tui"
    COMMANDS = App.COMMANDS | {DiffractCommands}
    BINDINGS = [
        Binding("q", "quit", "Quit (asks when marks are unsaved)"),
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("1", "view('spectrum')", "Spectrum view"),
        Binding("2", "view('delta')", "Delta view"),
        Binding("3", "view('heads')", "Heads grid view"),
        Binding("4", "view('rewind')", "Rewind view"),
        Binding("5", "view('table')", "Table view"),
        Binding("6", "view('evolution')", "Evolution view (checkpoint series)"),
        Binding("escape", "cancel", "Cancel work / clear filter", key_display="esc"),
        Binding("space", "toggle_mark", "Mark / unmark head"),
        Binding("e", "export_rewind", "Export rewind list of marked heads"),
        Binding("x", "export_table", "Export the current table (CSV)"),
        Binding("left_square_bracket", "step_layer(-1)", "Previous layer", key_display="["),
        Binding("right_square_bracket", "step_layer(1)", "Next layer", key_display="]"),
        Binding("slash", "filter", "Filter the tree", key_display="/"),
        Binding("t", "toggle_tree", "Hide / show the tree"),
        Binding("a", "compute_all", "Compute all (fill the cache)"),
    ]

    def __init__(self, session: "ExplorerSession") -> None:
        super().__init__()
        self.session = session
        self.view_specs: tuple[ViewSpec, ...] = VIEW_SPECS
        self.current_node = NodeRef()
        self.active_view_id = VIEW_SPECS[0].id
        self._pending_badges: list[tuple[NodeRef, dict]] = []
        self._last_badge_flush = 0.0

    # ---- layout ------------------------------------------------------------------------------
    def get_default_screen(self) -> Screen:
        return MainScreen(id="main-screen")

    def compose_main(self) -> ComposeResult:
        """The main screen's widgets."""
        with Horizontal(id="viewbar"):
            for spec in self.view_specs:
                yield ViewTab(spec)
            yield Label("", id="viewbar-title")
        with Horizontal(id="main"):
            with Vertical(id="sidebar"):
                yield ModelTree(self.session.layout, self._model_name(), only_in=self.session.only_in, id="tree")
                yield Input(placeholder="filter: L3 q h5 (enter keeps, esc clears)", id="filter")
            with ContentSwitcher(initial=self.active_view_id, id="views"):
                for spec in self.view_specs:
                    cls = view_class(spec)
                    yield cls(id=spec.id) if cls is not None else UnavailableView(spec)
        yield Label("", id="viewkeys")
        yield StatusBar(id="status")

    def _model_name(self) -> str:
        layout = self.session.layout
        return f"{layout.model_type} · {layout.num_layers} layers"

    def main_mounted(self, screen: Screen) -> None:
        """Focus the tree and fill the status lines once the main screen is mounted (it may not be
        `self.screen` yet, so everything is looked up inside `screen`)."""
        self._warm_up()
        tree = screen.query_one(ModelTree)
        tree.focus()
        self._update_viewbar(screen)
        self._update_status(screen)
        if not self.session.layout.heads_available:
            self.notify(f"Heads are not offered: {self.session.layout.heads_reason}", severity="warning",
                        timeout=8)
        tree.move_cursor(tree.root)
        self.call_after_refresh(self.load_sparklines, tree.built_nodes())

    @work(thread=True, group="warm-up")
    def _warm_up(self) -> None:
        """Import the engine's compute modules (scipy, fits: ~1 s) off the UI thread, so that the first
        cache hit shown on the UI thread does not pay for them."""
        import analysis.deltas.delta  # noqa: F401
        import analysis.run.scan  # noqa: F401
        import analysis.spectral.spectra  # noqa: F401
        import analysis.deltas.truncation  # noqa: F401

    @property
    def tree(self) -> ModelTree:
        return self.query_one(ModelTree)

    @property
    def active_view(self) -> Widget | None:
        try:
            return self.query_one(f"#{self.active_view_id}")
        except NoMatches:
            return None

    def _update_viewbar(self, root: Widget | Screen | None = None) -> None:
        """Highlight the active view's tab, title the comparison, and list the active view's keys."""
        root = root or self.screen
        width = 0
        for tab in root.query(ViewTab):
            tab.set_class(tab.spec.id == self.active_view_id, "-active")
            width += len(f" {tab.spec.key} {tab.spec.title} ")
        labels = self.session.labels
        room = self.size.width - width - 4
        series = self.session.series_info()
        if series is not None:  # checkpoints of one run: a run of steps, not base → CPT
            title, short = (f"series of {len(labels)} checkpoints · steps {series.steps[0]} … {series.steps[-1]}",
                            f"{len(labels)} steps {series.steps[0]}…{series.steps[-1]}")
        else:
            title, short = f"{labels[0]} → {', '.join(labels[1:])}", f"{labels[0]} → {len(labels) - 1} CPT"
        if len(title) > room:  # e.g. at 80 columns with long names: say how many, not which
            title = short
        root.query_one("#viewbar-title", Label).update(Text("  " + title))
        root.query_one("#viewkeys", Label).update(self._view_keys_text())

    def _view_keys_text(self) -> Text:
        """The footer: the active view's shown keys with short descriptions, then `? help`."""
        spec = next(s for s in self.view_specs if s.id == self.active_view_id)
        text = Text()
        for key, description in binding_rows(b for b in view_bindings(spec) if b.show):
            text.append(f" {key} ", style="reverse")
            text.append(f" {short_description(description)}  ")
        text.append(" ? ", style="reverse")
        text.append(" help")
        return text

    def on_resize(self) -> None:
        if self.screen.query("#viewbar-title"):
            self._update_viewbar()

    def _update_status(self, root: Widget | Screen | None = None) -> None:
        marks = len(self.session.marks)
        dirty = "*" if self.session.marks_dirty else ""
        device = getattr(self.session.device, "type", "cpu")
        (root or self.screen).query_one(StatusBar).set_text(
            f"{self.current_node.label()} │ marks {marks}{dirty} │ {device}")

    @property
    def busy(self) -> bool:
        """True while something is still to come: the active view has not caught up with the cursor,
        a debounce timer is pending, or a worker runs (tests and benchmarks wait on this)."""
        view = self.active_view
        if isinstance(view, NodeView) and (view.node != self.current_node or view._timer is not None):
            return True
        return any(w.is_running or w.state.name == "PENDING" for w in self.workers)

    # ---- progress (called on the UI thread, from workers via call_from_thread) ----------------
    def report_progress(self, source: str, fraction: float | None, text: str) -> None:
        """Show a worker's progress on the status line."""
        self.query_one(StatusBar).progress(source, fraction, text)

    def work_done(self, source: str) -> None:
        """A worker finished or was cancelled: drop its progress."""
        try:
            self.query_one(StatusBar).done(source)
        except NoMatches:
            pass

    # ---- tree events -------------------------------------------------------------------------
    def on_node_selected(self, message: NodeSelected) -> None:
        self.current_node = message.node
        self._update_status()
        # the cursor's frame first; the view follows after that refresh (skipped if the cursor moved on)
        self.call_after_refresh(self._show_current, message.node)

    def _show_current(self, node: NodeRef) -> None:
        view = self.active_view
        if view is not None and node == self.current_node:
            view.show_node(node)

    def on_open_node(self, message: OpenNode) -> None:
        self.go_to_node(message.node)

    def go_to_node(self, node: NodeRef) -> None:
        """Move the tree cursor to `node` (showing the tree if it was hidden)."""
        self.query_one("#sidebar").remove_class("-hidden")
        if not self.tree.go_to(node):
            self.notify(f"No node {node.label()} in this model.", severity="warning")

    def on_tree_node_expanded(self, event: Tree.NodeExpanded) -> None:
        ref = event.node.data
        if ref is None or ref.layer is None:
            return
        children = [c.data for c in event.node.children if c.data is not None]
        unknown = [c for c in children if c not in self.tree.badges]
        if unknown:
            self._load_badges(unknown)
        self.load_sparklines(children)

    def load_sparklines(self, nodes: list[NodeRef]) -> None:
        """Sparklines of the Evolution view's metric beside `nodes`, from the cache (nothing without a series)."""
        for view in self.query("#evolution"):
            load = getattr(view, "load_sparklines", None)  # absent when the view is not in this build
            if load is not None:
                load(nodes)

    @work(thread=True, group="badges")
    def _load_badges(self, nodes: list[NodeRef]) -> None:
        """Badges of freshly shown nodes from the cache (small file reads, off the UI thread)."""
        worker = get_current_worker()
        found = []
        for node in nodes:
            if worker.is_cancelled:
                return
            badge = self.session.known_badge(node)
            if badge:
                found.append((node, badge))
        if found and not worker.is_cancelled:
            self.call_from_thread(self._apply_badges, found)

    def _apply_badges(self, items: list[tuple[NodeRef, dict]]) -> None:
        tree = self.tree
        for node, metrics in items:
            tree.set_badge(NodeRef(node.layer, node.module, node.head), badge_from_metrics(metrics))

    def on_metrics_ready(self, message: MetricsReady) -> None:
        self.tree.set_badge(message.node, badge_from_metrics(message.metrics))

    def on_marks_changed(self, message: MarksChanged) -> None:
        marks = frozenset(self.session.marks)
        self.tree.set_marks(marks)
        for view in self.query(NodeView):
            view.marks_changed(marks)
        self._update_status()

    def on_toggle_mark(self, message: ToggleMark) -> None:
        self._toggle_mark(message.node)

    # ---- actions -----------------------------------------------------------------------------
    def action_view(self, view_id: str) -> None:
        """Switch the right-hand view and show the current node in it."""
        if view_id not in {s.id for s in self.view_specs}:
            return
        previous = self.active_view
        if isinstance(previous, NodeView) and view_id != self.active_view_id:
            previous.deactivate()
        self.active_view_id = view_id
        self.query_one(ContentSwitcher).current = view_id
        self._update_viewbar()
        view = self.active_view
        if view is not None:
            view.show_node(self.current_node)
        self.refresh_bindings()

    def action_help(self) -> None:
        """Show every key that works now, grouped: the active view's first (they differ per view); a key
        is listed once, in the first group that binds it."""
        spec = next(s for s in self.view_specs if s.id == self.active_view_id)
        groups = help_groups([(f"{spec.title} view", view_bindings(spec)),
                              ("Tree", list(ModelTree.BINDINGS) + [Binding("enter", "", "Expand / collapse")]),
                              ("App", list(self.BINDINGS) + [Binding("ctrl+p", "", "Command palette")])])
        self.push_screen(HelpScreen(groups))

    def action_cancel(self) -> None:
        """Esc: leave the filter if it is open, else cancel every running computation."""
        filt = self.query_one("#filter", Input)
        if filt.has_class("-shown"):
            filt.value = ""
            filt.remove_class("-shown")
            self.tree.clear_filter()
            self.tree.focus()
            return
        busy = self.query_one(StatusBar).busy
        for view in self.query(NodeView):
            view.cancel_work()
            if view.node is not None and view.result is None:
                view.show_message(view.cancel_message())
                view.node = None
        self.workers.cancel_group(self, SCAN_SOURCE)
        self.workers.cancel_group(self, "badges")
        self.work_done(SCAN_SOURCE)
        if busy:
            self.notify("Cancelled.", timeout=2)

    def action_toggle_mark(self) -> None:
        """space: mark or unmark the query head under the cursor."""
        self._toggle_mark(self.current_node)

    def _toggle_mark(self, node: NodeRef) -> None:
        """Toggle the one mark of the head under `node` (a rewind rewinds the whole head, so q, o and, when
        H_kv = H, k and v nodes of a head share it) and say which head changed."""
        if not node.is_head:
            self.notify("Marks are for heads: move to a q or o head (l expands).", severity="warning", timeout=3)
            return
        layout = self.session.layout
        head = node.head
        if node.module in ("k", "v"):
            shared = layout.query_heads_of(node.head)
            if len(shared) > 1:
                self.notify(f"{node.label()} is a key/value head shared by query heads "
                            f"h{shared[0]}–h{shared[-1]}; mark a q or o head (e.g. h{shared[0]}).",
                            severity="warning", timeout=4)
                return
            head = shared[0]
        marked = self.session.toggle_mark(node.layer, head)
        self.notify(f"L{node.layer} h{head} {'marked' if marked else 'unmarked'} (one mark per head: its q, k, v "
                    "and o nodes show it).", timeout=2)
        self.post_message(MarksChanged(frozenset(self.session.marks)))

    def action_step_layer(self, delta: int) -> None:
        """[ / ]: the same module or head in the previous / next layer."""
        self.tree.step_layer(delta)

    def action_toggle_tree(self) -> None:
        """t: hide or show the tree (more room for charts at 80 columns)."""
        sidebar = self.query_one("#sidebar")
        sidebar.toggle_class("-hidden")
        if not sidebar.has_class("-hidden"):
            self.tree.focus()

    def action_filter(self) -> None:
        """/: type words to show only matching nodes (e.g. `q h5`, `L3`, `down`)."""
        sidebar = self.query_one("#sidebar")
        sidebar.remove_class("-hidden")
        filt = self.query_one("#filter", Input)
        filt.add_class("-shown")
        filt.focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "filter":
            count = self.tree.apply_filter(event.value)
            if event.value.strip():
                self.query_one(StatusBar).set_text(f"filter: {count} match(es)")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "filter":
            self.tree.focus()

    def action_compute_all(self) -> None:
        """Fill the cache with every node's spectrum and delta in the background (esc cancels)."""
        self.notify("Computing every matrix and head in the background (esc cancels).", timeout=3)
        self._compute_all()

    @work(thread=True, exclusive=True, group=SCAN_SOURCE)
    def _compute_all(self) -> None:
        worker = get_current_worker()
        lower_thread_priority()

        def progress(done: int, total: int | None, text: str) -> None:
            if not worker.is_cancelled:
                from diffract_tui.views.worker import status_of

                fraction, line = status_of(done, total, text)
                self.call_from_thread(self.report_progress, SCAN_SOURCE, fraction, f"compute all: {line}")

        def on_node(node: Any, badge: dict) -> None:
            self._pending_badges.append((NodeRef(node.layer, node.module, node.head), badge))
            now = time.monotonic()
            if now - self._last_badge_flush >= BADGE_FLUSH_S:
                self._last_badge_flush = now
                items, self._pending_badges = self._pending_badges, []
                self.call_from_thread(self._apply_badges, items)

        from analysis.run.session import Cancelled

        try:
            count = self.session.compute_all(progress=progress, cancelled=lambda: worker.is_cancelled,
                                             on_node=on_node)
        except Cancelled:
            return
        except Exception as err:  # shown, not fatal: the tree and cached views stay usable
            self.call_from_thread(self.notify, str(err).splitlines()[0], title="compute all failed",
                                  severity="error")
            return
        finally:
            items, self._pending_badges = self._pending_badges, []
            if items:
                self.call_from_thread(self._apply_badges, items)
            if not worker.is_cancelled:
                self.call_from_thread(self.work_done, SCAN_SOURCE)
        self.call_from_thread(self._compute_all_done, count)

    def _compute_all_done(self, count: int) -> None:
        self.notify(f"Computed {count} matrices and heads; the cache is full.", timeout=4)
        self.load_sparklines(self.tree.built_nodes())
        for view in self.query(NodeView):
            if view.id == self.active_view_id:
                view.refresh_node()

    # ---- exports: into the export folder, never into an input ----------------------------------
    def input_paths(self) -> list[Path]:
        """Every input checkpoint (file or folder): no export may be written onto, around or inside one."""
        return [Path(c.path) for c in self.session.checkpoints]

    def export_problem(self, folder: Path, name: str) -> str | None:
        """Why the file `name` may not be written into `folder` (one line), or None when it may."""
        return app_settings.export_folder_problem(folder, self.input_paths(), name)

    def export_file(self, name: str, write: Callable[[Path], object], what: str, *, folder: Path | None = None,
                    remember: bool = False) -> None:
        """Write `name` into the export folder through `write(path)`; when that folder lies inside an input
        checkpoint, ask for another one instead of writing. The notice gives the full path."""
        from analysis.errors import DiffractError

        folder = app_settings.export_folder() if folder is None else folder
        try:
            path = app_settings.export_path(folder, name, self.input_paths())
        except DiffractError as err:
            self.push_screen(FolderScreen(folder, self.export_problem, name, problem=str(err).splitlines()[0],
                                          question=f"Where should the {what} go? (remembered for later runs)"),
                             partial(self._export_folder_chosen, name, write, what))
            return
        try:
            write(path)
        except Exception as err:  # a failed export is shown, never fatal
            self.notify(str(err).splitlines()[0] if str(err) else repr(err), title="export failed",
                        severity="error", timeout=8)
            return
        if remember:
            self._remember_export_folder(folder)
        self.notify(f"Wrote {what} to {path}", title="export", timeout=6, markup=False)

    def _export_folder_chosen(self, name: str, write: Callable[[Path], object], what: str,
                              folder: Path | None) -> None:
        if folder is None:
            self.notify(f"Nothing written: the {what} was not exported.", severity="warning")
            return
        self.export_file(name, write, what, folder=folder, remember=True)

    def _remember_export_folder(self, folder: Path) -> None:
        """Keep `folder` as the export folder of later runs (a warning when the settings cannot be written)."""
        try:
            app_settings.remember_export_folder(folder)
        except OSError as err:
            self.notify(f"Could not remember the export folder: {err}", severity="warning", markup=False)

    def action_choose_export_folder(self) -> None:
        """Palette: choose the folder every export goes to (remembered across runs)."""
        folder = app_settings.export_folder()
        self.push_screen(FolderScreen(folder, self.export_problem, app_settings.PROBE_NAME,
                                      problem=self.export_problem(folder, app_settings.PROBE_NAME)),
                         self._export_folder_picked)

    def _export_folder_picked(self, folder: Path | None) -> None:
        if folder is None:
            return
        self._remember_export_folder(folder)
        self.notify(f"Exports go to {folder}", title="export folder", timeout=5, markup=False)

    def deliver_screenshot(self, filename: str | None = None, path: str | None = None,
                           time_format: str | None = None) -> str | None:
        """The palette's Screenshot: an SVG of the screen into the export folder (textual's own default,
        ~/Downloads, may not exist and is no place the user chose)."""
        from analysis.io.atomic import atomic_writer

        svg = self.export_screenshot()
        name = filename or f"diffract-tui-{datetime.now().strftime('%Y%m%d-%H%M%S')}.svg"

        def write(out: Path) -> None:
            with atomic_writer(out, "w") as handle:
                handle.write(svg)

        self.export_file(name, write, "screenshot", folder=Path(path).expanduser() if path else None)
        return None

    def _export_screen(self) -> ExportScreen:
        """The rewind-list dialog, offering the export folder."""
        return ExportScreen(len(self.session.marks), [t.label for t in self.session.targets],
                            app_settings.export_folder(), self.export_problem)

    def action_export_rewind(self) -> None:
        """e: write the marked heads as a rewind list (asks for the target, the folder and the file)."""
        if not self.session.marks:
            self.notify("No marked heads: press space on a q or o head to mark it.", severity="warning")
            return
        self.push_screen(self._export_screen(), self._export_chosen)

    def _export_chosen(self, choice: ExportChoice | None, then_quit: bool = False) -> None:
        if choice is None:
            return
        from analysis.errors import DiffractError

        try:
            out = self.session.export_marks(choice.path, choice.target)
        except (DiffractError, OSError) as err:
            self.notify(str(err).splitlines()[0], title="export failed", severity="error", timeout=8)
            return
        if choice.remember is not None:
            self._remember_export_folder(choice.remember)
        self.notify(f"Wrote {len(self.session.marks)} head(s) to {Path(out).absolute()}", title="rewind list",
                    timeout=6, markup=False)
        self._update_status()
        if then_quit:
            self.exit()

    def action_export_table(self) -> None:
        """x: write the active view's table to a CSV file in the export folder: the view's own full-precision
        table (`export_table`) where it has one, else the DataTable as shown."""
        view = self.active_view
        own = getattr(view, "export_table", None)
        export = own() if callable(own) else None
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        if export is not None:
            records, stem = export.rows, export.stem
        else:
            tables = [t for t in (view.query(DataTable) if view is not None else []) if t.row_count]
            if not tables:
                self.notify("Nothing to export in this view yet.", severity="warning")
                return
            header, rows = table_rows(tables[0])
            keys = [h or f"col{i}" for i, h in enumerate(header)]
            records = [dict(zip(keys, r)) for r in rows]
            stem = f"{self.active_view_id}-{self.current_node.label().replace(' ', '-')}"
        if not records:
            self.notify("Nothing to export in this view yet.", severity="warning")
            return
        from analysis.io.guard import checkpoint_files
        from analysis.run.provenance import provenance
        from analysis.run.tables import write_table

        name = f"diffract-{stem}-{stamp}.csv"
        node = self.current_node.label() if export is None else export.node  # None: a whole-model table
        meta = provenance(self.session.checkpoints, self.session.settings, device_kind=self.session.device.type,
                          view=self.active_view_id, node=node)
        inputs = [f for c in self.session.checkpoints for f in checkpoint_files(c)]
        self.export_file(name, lambda path: write_table(records, path, metadata=meta, inputs=inputs),
                         f"table ({len(records)} rows)")

    async def action_quit(self) -> None:
        """q: quit, asking first when marked heads were not exported."""
        if self.session.marks and self.session.marks_dirty:
            self.push_screen(QuitScreen(len(self.session.marks)), self._quit_chosen)
            return
        self.exit()

    def _quit_chosen(self, choice: str | None) -> None:
        if choice == "quit":
            self.exit()
        elif choice == "export":
            self.push_screen(self._export_screen(), partial(self._export_chosen, then_quit=True))

"""View 4 — Rewind: choose heads to set back to the base (SPEC §6) and see at once what that removes.

Settings: pattern (`p`: manual = the marked heads, greedy = the ⌊f·L·H⌋ lowest head scores of the target,
reference = ranked by a reference domain), fraction f (`+`/`-` by 0.05, `>`/`<` by 0.01), target (`d`),
reference (`r`) and its variant (`v`), GQA policy for k/v (`c`). Every change re-plans in a worker
(`analysis.edit.rewind.plan_from_inputs` + `preview` on the cached head energies): the share of the attention ‖Δ‖²
removed, a panel (`b` cycles: the plan's layers × heads mask, heads per layer as bars, the loss panel that comes
with the evaluation, and on narrow views the list) and the list with scores. `e` writes the list (atomically, through
`analysis.edit.rewind_list`), `A` applies it into a new folder (`analysis.edit.rewind.apply_rewind`, with progress).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.widgets import DataTable, Input, Label, Static
from textual.worker import get_current_worker

from analysis.run.session import Cancelled
from diffract_tui.messages import MarksChanged
from diffract_tui.node import NodeRef
from diffract_tui.views import NodeView
from diffract_tui.views.worker import CancelledFn, EngineWork, ProgressFn

if TYPE_CHECKING:  # pragma: no cover
    from analysis.run.session import ExplorerSession, RewindInputs, RewindList, RewindPreview

PATTERNS: tuple[str, ...] = ("greedy", "manual", "reference")
GQA_POLICIES: tuple[str, ...] = ("group", "never", "any")
VARIANTS: tuple[str, ...] = ("lowest", "most_agreeing")
DEFAULT_FRACTION = 0.15      # SPEC §6's example fraction
BIG_STEP, SMALL_STEP = 0.05, 0.01
APPLY_GROUP = "rewind-apply"


def safe_name(text: str) -> str:
    """A label made safe for a file name."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-.") or "target"


PANELS: tuple[str, ...] = ("mask", "bars", "loss")
PANEL_TITLES = {"mask": "mask", "bars": "bars", "loss": "loss", "list": "list"}
WIDE_MIN = 72  # view columns from which the list stands beside the panel; narrower, it is a panel of its own
NOT_REWOUND, REWOUND, REWOUND_KV = "·", "■", "◆"


def tick_step(count: int, cell: int) -> int:
    """The smallest step in 1, 2, 5, 10, 20, 50 … at which integer labels 0..count-1, written every `step`
    cells of width `cell`, do not touch each other."""
    need = len(str(max(0, count - 1))) + 1
    step = 1
    while step * cell < need:
        step = step * 5 // 2 if str(step).startswith("2") else step * 2
    return step


def index_header(count: int, cell: int, indent: int) -> str:
    """An axis line of integer indices 0..count-1, each at its cell's position, every `tick_step` cells."""
    step = tick_step(count, cell)
    line = [" "] * (indent + count * cell)
    for i in range(0, count, step):
        label = str(i)
        at = indent + i * cell
        line[at:at + len(label)] = list(label)
    return "".join(line).rstrip()


def mask_text(layers: int, heads: int, rewound: dict[tuple[int, int], bool], width: int, height: int,
              color: bool = True) -> Text:
    """The plan as a layers × heads grid of characters: · kept, ■ rewound (q, o), ◆ rewound with its kv
    head's k/v rows. Rows are layers when they fit (else heads, so that 80×24 shows a whole model), with
    integer axes."""
    styles = {NOT_REWOUND: "dim", REWOUND: "bold cyan" if color else "bold",
              REWOUND_KV: "bold magenta" if color else "bold"}
    label = len(f"L{max(0, layers - 1)}") + 1
    by_layer = layers + 3 <= height or layers <= heads
    rows, cols = (layers, heads) if by_layer else (heads, layers)
    cell = 2 if label + 2 * cols <= width else 1
    text = Text(no_wrap=True, overflow="crop")
    text.append(index_header(cols, cell, label) + "\n", style="dim")
    for r in range(rows):
        text.append((f"L{r}" if by_layer else f"h{r}").ljust(label), style="dim")
        for c in range(cols):
            key = (r, c) if by_layer else (c, r)
            glyph = NOT_REWOUND if key not in rewound else (REWOUND_KV if rewound[key] else REWOUND)
            text.append(glyph.ljust(cell), style=styles[glyph])
        text.append("\n")
    axis = "rows L, columns h" if by_layer else "rows h, columns L"
    text.append(f"{REWOUND} rewound  {REWOUND_KV} +k/v  {NOT_REWOUND} kept · {axis}", style="dim")
    return text


def bars_text(per_layer: tuple[int, ...] | list[int], heads: int, width: int, color: bool = True) -> Text:
    """Heads rewound per layer as one horizontal bar per layer (a layer with none shows 0 and no bar), the
    bar's full length being all `heads` heads of a layer."""
    label = len(f"L{max(0, len(per_layer) - 1)}") + 1
    count = len(str(heads)) * 2 + 2
    room = max(4, width - label - count - 2)
    text = Text(no_wrap=True, overflow="crop")
    for layer, n in enumerate(per_layer):
        text.append(f"L{layer}".ljust(label), style="dim")
        text.append("│")
        filled = round(room * n / max(1, heads))
        text.append("█" * filled, style="cyan" if color else "")
        text.append(" " * (room - filled) + f" {n}/{heads}\n")
    text.append(" " * label + f"└ heads rewound of {heads} per layer", style="dim")
    return text


class PromptInput(Input):
    """The one-line question at the bottom of the view (file to export to, folder to apply into)."""

    BINDINGS = [Binding("escape", "dismiss", "Cancel", show=False)]

    class Dismissed(Message):
        """Esc in the prompt."""

    def action_dismiss(self) -> None:
        self.post_message(self.Dismissed())


class RewindView(EngineWork, NodeView):
    """Rewind settings, live preview, the list, export and apply."""

    VIEW_ID = "rewind"
    BINDINGS = [
        Binding("p", "cycle_pattern", "Pattern: greedy / manual (marked heads) / reference"),
        Binding("b", "cycle_panel", "Panel: mask / per-layer bars / loss (coming with eval)"),
        Binding("plus,equals_sign", "fraction(0.05)", "Fraction +0.05", key_display="+"),
        Binding("minus", "fraction(-0.05)", "Fraction −0.05", key_display="-"),
        Binding("greater_than_sign", "fraction(0.01)", "Fraction +0.01", key_display=">", show=False),
        Binding("less_than_sign", "fraction(-0.01)", "Fraction −0.01", key_display="<", show=False),
        Binding("d", "cycle_target", "Target checkpoint (the one rewound)"),
        Binding("r", "cycle_reference", "Reference checkpoint (pattern reference)"),
        Binding("v", "cycle_variant", "Reference variant: lowest / most agreeing"),
        Binding("c", "cycle_gqa", "GQA policy for k/v: group / never / any"),
        Binding("e", "export", "Export this rewind list (JSON)"),
        Binding("A", "apply", "Apply: write the rewound checkpoint"),
    ]
    DEFAULT_CSS = """
    RewindView { layout: vertical; }
    RewindView > .rewind-line { height: auto; max-height: 2; width: 1fr; }
    RewindView > #rewind-keys { color: $text-muted; }
    RewindView > #rewind-body { height: 1fr; }
    RewindView #rewind-panel { width: 1fr; height: 1fr; min-height: 6; }
    RewindView > #rewind-panel-title { color: $text-muted; }
    RewindView #rewind-panel-body { width: 1fr; height: auto; }
    RewindView #rewind-list { width: 26; height: 1fr; }
    RewindView > #rewind-prompt-label { height: 1; display: none; }
    RewindView > PromptInput, RewindView > PromptInput:focus { height: 1; border: none; padding: 0 1; display: none; }
    RewindView.-prompt > #rewind-prompt-label { display: block; }
    RewindView.-prompt > PromptInput, RewindView.-prompt > PromptInput:focus { display: block; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.pattern = PATTERNS[0]
        self.fraction = DEFAULT_FRACTION
        self.target_index = 0
        self.reference_index: int | None = None
        self.variant = VARIANTS[0]
        self.gqa_policy = GQA_POLICIES[0]
        self.plan: "RewindList | None" = None
        self.preview: "RewindPreview | None" = None
        self.prompt_action: str | None = None
        self._ref_inputs: dict[tuple[int, int], "RewindInputs"] = {}
        self._planned_marks: frozenset[tuple[int, int]] = frozenset()
        self._applying = False
        self.panel = PANELS[0]

    def compose(self) -> ComposeResult:
        yield Label("", id="rewind-settings", classes="rewind-line")
        yield Label("", id="rewind-summary", classes="rewind-line")
        yield Label("", id="rewind-panel-title", classes="rewind-line")
        with Horizontal(id="rewind-body"):
            with VerticalScroll(id="rewind-panel"):
                yield Static("", id="rewind-panel-body")
            yield DataTable(id="rewind-list", cursor_type="row", zebra_stripes=True)
        yield Label("", id="rewind-marks", classes="rewind-line")
        yield Label("", id="rewind-prompt-label")
        yield PromptInput(id="rewind-prompt")

    def on_mount(self) -> None:
        table = self.query_one("#rewind-list", DataTable)
        table.add_column("layer", key="layer")
        table.add_column("head", key="head")
        table.add_column("proj", key="proj")
        table.add_column("score r", key="score")

    @property
    def session(self) -> "ExplorerSession":
        return self.app.session

    # ---- the NodeView contract ---------------------------------------------------------------
    def show_node(self, node: NodeRef) -> None:
        """The preview does not depend on the node: plan once when first shown, and when marks changed."""
        self.node = node
        stale = self.pattern == "manual" and frozenset(self.session.marks) != self._planned_marks
        if (self.plan is None or stale) and not self._busy():
            self.replan()

    def refresh_node(self) -> None:
        self.replan()

    def show_message(self, text: str) -> None:
        self.query_one("#rewind-summary", Label).update(text)

    def _busy(self) -> bool:
        return any(w.group == self.VIEW_ID and w.is_running for w in self.workers)

    def marks_changed(self, marks: frozenset[tuple[int, int]]) -> None:
        """A manual plan follows the marks: replanned now when shown, else when next shown (show_node)."""
        if self.display and self.pattern == "manual" and marks != self._planned_marks:
            self.replan()
        self._update_marks_line()

    # ---- settings ----------------------------------------------------------------------------
    def _targets(self) -> list:
        return self.session.targets

    def _reference_choices(self) -> list[int]:
        """Targets other than the rewound one (indices into session.targets)."""
        return [i for i in range(len(self._targets())) if i != self.target_index]

    def _reference(self) -> int | None:
        choices = self._reference_choices()
        if not choices:
            return None
        if self.reference_index not in choices:
            self.reference_index = choices[0]
        return self.reference_index

    def settings_text(self) -> str:
        labels = [c.label for c in self._targets()]
        arch_heads = self.session.layout.num_layers * self.session.layout.num_heads
        parts = [f"pattern {self.pattern}"]
        if self.pattern != "manual":
            n = self.session.rewind_head_count(self.fraction)
            parts.append(f"f {self.fraction:.2f} ({n}/{arch_heads} heads)")
        parts.append(f"target {labels[self.target_index]}")
        if self.pattern == "reference":
            ref = self._reference()
            parts.append(f"ref {labels[ref] if ref is not None else '—'} ({self.variant})")
        parts.append(f"gqa {self.gqa_policy}")
        return " · ".join(parts)

    def _changed(self) -> None:
        self.replan()

    def action_cycle_pattern(self) -> None:
        """p: greedy → manual → reference."""
        self.pattern = PATTERNS[(PATTERNS.index(self.pattern) + 1) % len(PATTERNS)]
        self._changed()

    def action_fraction(self, step: float) -> None:
        """+/-/>/<: change f (kept in [0, 1], rounded so the list states exactly the fraction shown)."""
        self.fraction = round(min(1.0, max(0.0, self.fraction + step)), 4)
        if self.pattern == "manual":
            self.pattern = "greedy"
        self._changed()

    def action_cycle_target(self) -> None:
        """d: the next CPT checkpoint to rewind."""
        self.target_index = (self.target_index + 1) % len(self._targets())
        self._changed()

    def action_cycle_reference(self) -> None:
        """r: the next reference checkpoint (switches to the reference pattern)."""
        choices = self._reference_choices()
        if not choices:
            self.app.notify("The reference pattern needs a second CPT checkpoint.", severity="warning")
            return
        if self.pattern == "reference":
            current = self._reference()
            self.reference_index = choices[(choices.index(current) + 1) % len(choices)]
        self.pattern = "reference"
        self._changed()

    def action_cycle_variant(self) -> None:
        """v: reference variant — its lowest scores, or the heads most agreeing with it."""
        self.variant = VARIANTS[(VARIANTS.index(self.variant) + 1) % len(VARIANTS)]
        if self.pattern == "reference":
            self._changed()

    def action_cycle_gqa(self) -> None:
        """c: GQA policy for k/v rows."""
        self.gqa_policy = GQA_POLICIES[(GQA_POLICIES.index(self.gqa_policy) + 1) % len(GQA_POLICIES)]
        self._changed()

    # ---- planning ----------------------------------------------------------------------------
    def inputs_for(self, target_index: int, reference_index: int | None, progress: ProgressFn) -> "RewindInputs":
        """Head energies of the target (cached on disk), plus the reference's and their A2 when asked."""
        if reference_index is None:
            return self.session.rewind_inputs(target_index, None, progress)
        key = (target_index, reference_index)
        if key not in self._ref_inputs:
            self._ref_inputs[key] = self.session.rewind_inputs(target_index, reference_index, progress)
        return self._ref_inputs[key]

    def make_plan(self, progress: ProgressFn, cancelled: CancelledFn) -> tuple["RewindList", "RewindPreview"]:
        """The list and its preview for the current settings (runs in the worker)."""
        from analysis.errors import DiffractError

        s = self.session
        pattern, fraction, gqa, variant = self.pattern, self.fraction, self.gqa_policy, self.variant
        target_index = self.target_index
        reference_index = self._reference() if pattern == "reference" else None
        if pattern == "reference" and reference_index is None:
            raise DiffractError("the reference pattern needs a second CPT checkpoint", hint="open two or more CPTs")
        marks = sorted(self._planned_marks)
        if pattern == "manual" and not marks:
            raise DiffractError("no heads are marked", hint="press space on a head in the tree or the grid")
        inputs = self.inputs_for(target_index, reference_index, progress)
        if cancelled():
            raise Cancelled()
        return s.rewind_plan(inputs, target_index, reference_index, pattern=pattern,
                             fraction=None if pattern == "manual" else fraction,
                             heads=marks if pattern == "manual" else None, gqa_policy=gqa, variant=variant)

    def replan(self) -> None:
        """Recompute the plan and preview for the current settings in the worker."""
        if not self.session.layout.heads_available:
            self.show_message(f"Heads are not available for this model: {self.session.layout.heads_reason}")
            return
        self._planned_marks = frozenset(self.session.marks)
        self.query_one("#rewind-settings", Label).update(self.settings_text())
        self.plan = None
        self.result = None
        self.show_message("planning…")
        self.start_work("rewind preview", self.make_plan, self._planned, fail=self._plan_failed)

    def _plan_failed(self, message: str) -> None:
        self.plan, self.preview = None, None
        self.show_message(message.replace("rewind preview failed: ", ""))
        self._draw_chart(None)
        self.query_one("#rewind-list", DataTable).clear()

    def _planned(self, result: tuple["RewindList", "RewindPreview"]) -> None:
        self.plan, self.preview = result
        self.result = result
        self.query_one("#rewind-settings", Label).update(self.settings_text())
        self._draw(self.plan, self.preview)

    # ---- drawing -----------------------------------------------------------------------------
    def _draw(self, rl: "RewindList", pv: "RewindPreview") -> None:
        total = rl.architecture.layers * rl.architecture.heads
        kv = sum(1 for e in rl.heads if "k" in e.projections)
        self.show_message(f"{len(rl.heads)}/{total} heads ({kv} with k/v) · attention ‖Δ‖² removed "
                          f"{pv.share_removed * 100:.3g}%")
        self._draw_chart(pv)
        table = self.query_one("#rewind-list", DataTable)
        table.clear()
        for layer, head, projs, score in pv.rows:
            table.add_row(str(layer), str(head), "".join(projs), "—" if score is None else f"{score:.4g}",
                          key=f"{layer}:{head}")
        self._update_marks_line()

    def panels(self) -> tuple[str, ...]:
        """What `b` cycles through: the list is a panel of its own when the view is too narrow for it beside."""
        return PANELS + (("list",) if self.size.width < WIDE_MIN else ())

    def _place_panels(self) -> None:
        """Show the chosen panel, and the list beside it when the view is wide enough."""
        if self.panel not in self.panels():
            self.panel = PANELS[0]
        narrow = self.size.width < WIDE_MIN
        self.query_one("#rewind-list", DataTable).display = not narrow or self.panel == "list"
        self.query_one("#rewind-panel").display = self.panel != "list"
        title = "  ".join(f"[{PANEL_TITLES[p]}]" if p == self.panel else PANEL_TITLES[p] for p in self.panels())
        self.query_one("#rewind-panel-title", Label).update(Text(f"panel {title}  (b)"))

    def _draw_chart(self, pv: "RewindPreview | None") -> None:
        """Draw the chosen panel (b cycles): the plan's mask, heads per layer as bars, or the loss note."""
        self._place_panels()
        body = self.query_one("#rewind-panel-body", Static)
        beside = self.size.width >= WIDE_MIN
        list_width = self.query_one("#rewind-list", DataTable).styles.width
        width = self.size.width - 2 - (int(list_width.value) if beside and list_width is not None else 0)
        width, height = max(10, width), max(4, self.query_one("#rewind-body").size.height)
        color = not getattr(self.app, "no_color", False)
        layout = self.session.layout
        if self.panel == "loss":
            body.update(Text("Loss curves of the rewound checkpoint and the loss vs ‖Δ‖²-removed trade-off: "
                             "coming with the evaluation (issue 8).", style="dim"))
        elif pv is None or self.plan is None:
            body.update("")
        elif self.panel == "mask":
            rewound = {(e.layer, e.head): "k" in e.projections for e in self.plan.heads}
            body.update(mask_text(layout.num_layers, layout.num_heads, rewound, width, height, color))
        elif self.panel == "bars":
            body.update(bars_text(pv.heads_per_layer, layout.num_heads, width, color))

    def on_resize(self) -> None:
        self.call_after_refresh(self._draw_chart, self.preview)

    def action_cycle_panel(self) -> None:
        """b: the next panel (mask → per-layer bars → loss, and the list on a narrow view)."""
        panels = self.panels()
        self.panel = panels[(panels.index(self.panel) + 1) % len(panels)] if self.panel in panels else PANELS[0]
        self._draw_chart(self.preview)

    def _update_marks_line(self) -> None:
        marks = sorted(self.session.marks)
        if not marks:
            text = "marked: none (space on a head marks it; pattern manual rewinds them)"
        else:
            shown = " ".join(f"L{l}h{h}" for l, h in marks[:12]) + (" …" if len(marks) > 12 else "")
            text = f"marked {len(marks)}: {shown}"
        self.query_one("#rewind-marks", Label).update(text)

    # ---- export and apply --------------------------------------------------------------------
    def _ask(self, action: str, question: str, default: str) -> None:
        self.prompt_action = action
        self.query_one("#rewind-prompt-label", Label).update(Text(question))  # a path may hold markup characters
        prompt = self.query_one(PromptInput)
        prompt.value = default
        self.add_class("-prompt")
        prompt.focus()

    def _close_prompt(self) -> None:
        self.prompt_action = None
        self.remove_class("-prompt")
        tree = getattr(self.app, "tree", None)
        if tree is not None:
            tree.focus()

    def default_list_name(self) -> str:
        target = self._targets()[self.target_index].label
        tail = "manual" if self.pattern == "manual" else f"{self.pattern}-f{self.fraction:g}"
        return f"rewind-{safe_name(target)}-{tail}.json"

    def action_export(self) -> None:
        """e: write this list (pattern, fraction, GQA policy as shown) to a JSON file."""
        if self.plan is None:
            self.app.notify("No rewind list yet: wait for the preview, or mark heads.", severity="warning")
            return
        from diffract_tui.settings import export_folder

        self._ask("export", "Write the rewind list to (enter writes, esc cancels):",
                  str(export_folder() / self.default_list_name()))

    def action_apply(self) -> None:
        """A: write the target with these heads rewound into a new folder."""
        if self.plan is None:
            self.app.notify("No rewind list yet: wait for the preview, or mark heads.", severity="warning")
            return
        if self._applying:
            self.app.notify("Already applying a list.", severity="warning")
            return
        from diffract_tui.settings import export_folder

        target = self._targets()[self.target_index].label
        self._ask("apply", "Write the rewound checkpoint into the new folder (enter starts, esc cancels):",
                  str(export_folder() / f"{safe_name(target)}-rewound"))

    def on_prompt_input_dismissed(self, message: PromptInput.Dismissed) -> None:
        message.stop()
        self._close_prompt()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if not isinstance(event.input, PromptInput):
            return
        event.stop()
        action, value = self.prompt_action, event.value.strip()
        self._close_prompt()
        if not value or self.plan is None:
            return
        if action == "export":
            self.export_to(Path(value).expanduser())
        elif action == "apply":
            self.apply_into(Path(value).expanduser())

    def export_to(self, path: Path) -> Path | None:
        """Write the current list atomically (SPEC §6 JSON); marks count as saved for the manual pattern."""
        from analysis.errors import DiffractError

        rl = self.plan
        if rl is None:
            return None
        problem = self.app.export_problem(path.parent, path.name)
        if problem:  # inside an input checkpoint: ask again instead of writing
            self._ask("export", f"{problem}. Write the rewind list to another folder:", str(path))
            return None
        try:
            out = self.session.write_rewind_list(rl, path)
        except (DiffractError, OSError) as err:
            self.app.notify(str(err).splitlines()[0], title="export failed", severity="error", timeout=8)
            return None
        if rl.pattern.name == "manual":
            self.session.marks_saved = frozenset((e.layer, e.head) for e in rl.heads)
            self.post_message(MarksChanged(frozenset(self.session.marks)))
        self.app.notify(f"Wrote {len(rl.heads)} head(s) to {Path(out).absolute()}", title="rewind list", timeout=6,
                        markup=False)
        return out

    def apply_into(self, out_dir: Path, *, force: bool = False) -> None:
        """Run `apply_rewind` in its own worker with progress (Esc cancels; the output appears only when done).
        An existing folder is replaced only after the user says yes (the app has no --force)."""
        rl = self.plan
        if rl is None:
            return
        if not force and (out_dir.exists() or out_dir.is_symlink()):
            from diffract_tui.screens.confirm import ConfirmScreen

            def chosen(yes: bool | None) -> None:
                if yes:
                    self.apply_into(out_dir, force=True)
                else:
                    self.app.notify(f"Nothing written: {out_dir} was kept.", severity="warning", markup=False)

            self.app.push_screen(ConfirmScreen(f"{out_dir} already exists. Replace it with the rewound "
                                               "checkpoint?", yes="Replace"), chosen)
            return
        self._applying = True
        self.run_worker(lambda: self._apply_work(rl, out_dir, force), thread=True, exclusive=True,
                        group=APPLY_GROUP, name="rewind apply", exit_on_error=False)

    def _apply_work(self, rl: "RewindList", out_dir: Path, force: bool = False) -> None:
        worker = get_current_worker()
        app = self.app

        def progress(done: int, total: int | None, text: str) -> None:
            size = f"{done / 1e6:.1f}/{total / 1e6:.1f} MB" if total is not None else f"{done / 1e6:.1f} MB"
            app.call_from_thread(app.report_progress, APPLY_GROUP, None if total is None else done / max(1, total),
                                 f"applying rewind: {size}")

        try:
            result = self.session.apply_rewind(rl, out_dir, progress, lambda: worker.is_cancelled, force=force)
        except Cancelled:
            app.call_from_thread(self._apply_done, None, "cancelled")
            return
        except Exception as err:
            app.call_from_thread(self._apply_done, None, str(err).splitlines()[0] if str(err) else repr(err))
            return
        app.call_from_thread(self._apply_done, result, None)

    def _apply_done(self, result: Any, error: str | None) -> None:
        self._applying = False
        self.app.work_done(APPLY_GROUP)
        if error is not None:
            self.app.notify(error, title="apply failed", severity="error", timeout=8)
            return
        self.app.notify(f"Wrote {result.out_dir} ({result.num_tensors} tensors, "
                        f"{len(self.plan.heads) if self.plan else 0} heads rewound)", title="rewind applied",
                        timeout=6)

    def cancel_work(self) -> None:
        """Esc: stop the preview and a running apply (its output folder appears only when complete)."""
        super().cancel_work()
        self.workers.cancel_group(self, APPLY_GROUP)

    def deactivate(self) -> None:
        """Switched away: stop the preview only; an apply keeps writing in the background."""
        NodeView.cancel_work(self)
        if self.result is None:
            self.node = None

"""View 4 — Rewind: choose heads to set back to the base (SPEC §6) and see at once what that removes.

Settings: pattern (`p`: manual = the marked heads, greedy = the ⌊f·L·H⌋ lowest head scores of the target,
reference = ranked by a reference domain), fraction f (`+`/`-` by 0.05, `>`/`<` by 0.01), target (`d`),
reference (`r`) and its variant (`v`), GQA policy for k/v (`c`). Every change re-plans in a worker
(`analysis.edit.rewind.plan_from_inputs` + `preview` on the cached head energies): the share of the attention ‖Δ‖²
removed, a panel (`b` cycles: the plan's layers × heads mask, heads per layer as bars, the loss, the trade-off, and
on narrow views the list) and the list with scores. `e` writes the list (atomically, through
`analysis.edit.rewind_list`; with the plan's measured losses when `m` measured them), `A` applies it into a new
folder (`analysis.edit.rewind.apply_rewind`, with progress).

The loss (SPEC §9, through `ExplorerSession.loss_preview` / `plan_loss`, in a worker of its own with progress;
esc cancels): `L` measures loss vs fraction of every pattern on every text (domain and general) with the base and
CPT levels, and the trade-off (gain kept vs forgetting recovered, one point per candidate); `m` measures the
current plan (the marked heads with pattern manual); `w` switches between few windows (fast) and the CLI's 64.
`s` switches the ranking score between rel_frob (r, the weights' update) and taylor (SPEC §9: the first-order
change of the loss when a head is rewound, on the general texts, else the domain texts, with the current window
count; computed in a worker of its own through `ExplorerSession.taylor_grid`, cached); the reference pattern
always ranks by the reference's update.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import DataTable, Input, Label, Static
from textual.worker import get_current_worker
from textual_plotext import PlotextPlot

from analysis.run.session import PREVIEW_WINDOWS, REFINED_WINDOWS, Cancelled
from diffract_tui.messages import MarksChanged
from diffract_tui.node import NodeRef
from diffract_tui.views import NodeView
from diffract_tui.views.worker import CancelledFn, EngineWork, ProgressFn
from diffract_tui.widgets.charts import clear_plot
from diffract_tui.widgets.loss_charts import draw_loss_curves, draw_tradeoff, plan_numbers

if TYPE_CHECKING:  # pragma: no cover
    from analysis.run.session import ExplorerSession, LossPreview, PlanLoss, RewindInputs, RewindList, RewindPreview

PATTERNS: tuple[str, ...] = ("greedy", "manual", "reference")
GQA_POLICIES: tuple[str, ...] = ("group", "never", "any")
VARIANTS: tuple[str, ...] = ("lowest", "most_agreeing")
DEFAULT_FRACTION = 0.15      # SPEC §6's example fraction
BIG_STEP, SMALL_STEP = 0.05, 0.01
APPLY_GROUP = "rewind-apply"
LOSS_GROUP = "rewind-loss"   # the loss's worker: a replan does not cancel it, nor it a replan
TAYLOR_GROUP = "rewind-taylor"  # the Taylor grid's first computation (then replans read the session's cache)
SCORES: tuple[str, ...] = ("rel_frob", "taylor")
SCORE_COLUMNS = {"rel_frob": "score r", "taylor": "score s"}


def safe_name(text: str) -> str:
    """A label made safe for a file name."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-.") or "target"


PANELS: tuple[str, ...] = ("mask", "bars", "loss", "tradeoff")
PANEL_TITLES = {"mask": "mask", "bars": "bars", "loss": "loss", "tradeoff": "trade-off", "list": "list"}
CHART_PANELS: tuple[str, ...] = ("loss", "tradeoff")
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
        Binding("b", "cycle_panel", "Panel: mask / per-layer bars / loss vs fraction / trade-off"),
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
        Binding("L", "loss_preview", "Loss: measure loss vs fraction of every pattern on every text"),
        Binding("m", "measure_plan", "Measure: the loss of this plan (the marked heads with pattern manual)"),
        Binding("w", "refine_windows", f"Windows: {PREVIEW_WINDOWS} (fast) / {REFINED_WINDOWS} per text, re-measured"),
        Binding("s", "cycle_score", "Score: rel_frob (r) / taylor (the loss's predicted change, on the texts)"),
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
    RewindView #rewind-chart { width: 1fr; height: 1fr; display: none; }
    RewindView #rewind-chart > Label { height: auto; max-height: 2; width: 1fr; }
    RewindView #rewind-plot { width: 1fr; height: 1fr; min-height: 5; }
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
        self.score = SCORES[0]
        self.plan: "RewindList | None" = None
        self.preview: "RewindPreview | None" = None
        self.prompt_action: str | None = None
        self._ref_inputs: dict[tuple[int, int], "RewindInputs"] = {}
        self._planned_marks: frozenset[tuple[int, int]] = frozenset()
        self._applying = False
        self.panel = PANELS[0]
        self.loss_windows = PREVIEW_WINDOWS
        self.loss_preview: "LossPreview | None" = None
        self.plan_loss: "PlanLoss | None" = None
        self.loss_note = f"L measures the loss ({PREVIEW_WINDOWS} windows per text; w: {REFINED_WINDOWS})"

    def compose(self) -> ComposeResult:
        yield Label("", id="rewind-settings", classes="rewind-line")
        yield Label("", id="rewind-summary", classes="rewind-line")
        yield Label("", id="rewind-panel-title", classes="rewind-line")
        with Horizontal(id="rewind-body"):
            with VerticalScroll(id="rewind-panel"):
                yield Static("", id="rewind-panel-body")
            with Vertical(id="rewind-chart"):
                yield Label("", id="rewind-loss-numbers")
                yield Label("", id="rewind-loss-legend")
                yield PlotextPlot(id="rewind-plot")
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
        if self.score != SCORES[0]:  # the default (r) is named by the list's "score r" column
            parts.append(f"score {self._plan_score(self.pattern)}")
        return " · ".join(parts)

    def _plan_score(self, pattern: str) -> str:
        """The score a pattern ranks by: the chosen one, except reference (ranked by the reference's update)."""
        return SCORES[0] if pattern == "reference" else self.score

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
        score, windows = self._plan_score(pattern), self.loss_windows
        if score == "taylor":
            import dataclasses

            inputs = dataclasses.replace(inputs, taylor=s.taylor_grid(target_index, windows=windows,
                                                                      progress=progress, cancelled=cancelled))
        if cancelled():
            raise Cancelled()
        return s.rewind_plan(inputs, target_index, reference_index, pattern=pattern,
                             fraction=None if pattern == "manual" else fraction,
                             heads=marks if pattern == "manual" else None, gqa_policy=gqa, variant=variant,
                             score=score)

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
        table.columns["score"].label = Text(SCORE_COLUMNS.get(rl.pattern.score, "score r"))
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
        self.query_one("#rewind-panel").display = self.panel != "list" and self.panel not in CHART_PANELS
        self.query_one("#rewind-chart").display = self.panel in CHART_PANELS
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
        if self.panel in CHART_PANELS:
            body.update("")
            self._draw_loss()
        elif pv is None or self.plan is None:
            body.update("")
        elif self.panel == "mask":
            rewound = {(e.layer, e.head): "k" in e.projections for e in self.plan.heads}
            body.update(mask_text(layout.num_layers, layout.num_heads, rewound, width, height, color))
        elif self.panel == "bars":
            body.update(bars_text(pv.heads_per_layer, layout.num_heads, width, color))

    def on_resize(self) -> None:
        self.call_after_refresh(self._draw_chart, self.preview)

    # ---- the loss (SPEC §9) ------------------------------------------------------------------
    def _current_preview(self) -> "LossPreview | None":
        """The measured sweep when it is of the current target, else None."""
        pv = self.loss_preview
        fp = self._targets()[self.target_index].fingerprint
        return pv if pv is not None and pv.target_fingerprint == fp else None

    def _current_plan_loss(self) -> "PlanLoss | None":
        """The measured loss of the plan shown, when it was measured for exactly this plan."""
        pl = self.plan_loss
        return pl if pl is not None and self.plan is not None and pl.matches(self.plan) else None

    def _plan_label(self) -> str:
        rl = self.plan
        if rl is None:
            return "plan"
        what = "marked" if rl.pattern.name == "manual" else f"{rl.pattern.name} f {rl.pattern.fraction:g}"
        return f"plan {what}, {len(rl.heads)} head{'s' if len(rl.heads) != 1 else ''}"

    def _draw_loss(self) -> None:
        """The loss or trade-off panel from the measured results (nothing is computed here)."""
        plot = self.query_one("#rewind-plot", PlotextPlot)
        clear_plot(plot)
        numbers = self.query_one("#rewind-loss-numbers", Label)
        legend = self.query_one("#rewind-loss-legend", Label)
        pv, pl = self._current_preview(), self._current_plan_loss()
        windows = f"{pv.windows} windows × {pv.tokens} tokens" if pv is not None else ""
        numbers.update(plan_numbers(pl, self._plan_label(), windows) if pl is not None or pv is not None
                       else Text(self.loss_note, style="dim"))
        if pv is None:
            stale = self.loss_preview is not None
            legend.update(Text(f"measured for {self.loss_preview.target}: L measures this target" if stale
                               else "loss vs fraction of every pattern: L measures it", style="dim"))
            plot.refresh()
            return
        plt = plot.plt
        point = pl.point if pl is not None else None
        if self.panel == "loss":
            fraction = self.plan.pattern.fraction if self.plan is not None else None
            legend.update(draw_loss_curves(plt, pv, fraction))
        else:
            legend.update(draw_tradeoff(plt, pv, point))
        plot.refresh()

    def _status_line(self, text: str) -> None:
        """One line in the status bar (what to install, a bad text) and in the loss panel."""
        from diffract_tui.widgets.status import StatusBar

        self.loss_note = text
        for bar in self.app.query(StatusBar):
            bar.set_text(Text(text))  # not markup: "[eval]" in an install hint is text
        if self.panel in CHART_PANELS:
            self._draw_loss()

    def _show_loss_panel(self) -> None:
        if self.panel not in CHART_PANELS:
            self.panel = "loss"
        self._draw_chart(self.preview)

    def action_loss_preview(self) -> None:
        """L: measure loss vs fraction of every pattern on every text, and the current plan (in a worker)."""
        self._start_loss(sweep=True)

    def action_measure_plan(self) -> None:
        """m: measure the loss of the current plan (the marked heads with pattern manual)."""
        if self.plan is None:
            self.app.notify("No plan yet: wait for the preview, or mark heads.", severity="warning")
            return
        self._start_loss(sweep=False)

    def action_refine_windows(self) -> None:
        """w: few windows (fast) ⇄ the CLI's default; what was measured is measured again."""
        self.loss_windows = REFINED_WINDOWS if self.loss_windows == PREVIEW_WINDOWS else PREVIEW_WINDOWS
        self.loss_note = f"windows per text: {self.loss_windows} (L / m measure)"
        if self.score == "taylor":  # the Taylor grid is taken on these windows: re-rank
            self._changed()
        if self.loss_preview is not None or self.plan_loss is not None:
            self._start_loss(sweep=self.loss_preview is not None)
        else:
            self._show_loss_panel()

    def action_cycle_score(self) -> None:
        """s: rank by rel_frob ⇄ taylor; taylor's grid is computed first (in its worker), then the view re-plans;
        without a text it is one status line and the score stays."""
        if self.score == "taylor":
            self.score = SCORES[0]
            self.workers.cancel_group(self, TAYLOR_GROUP)
            self._changed()
            return
        if not self.session.eval_texts:
            self._status_line("taylor score: no text to take the loss gradient on — pass --text FILE "
                              "(--general-text FILE) at launch, or ctrl+p Add text")
            return
        target_index, windows = self.target_index, self.loss_windows

        def work(progress: ProgressFn, cancelled: CancelledFn) -> Any:
            return self.session.taylor_grid(target_index, windows=windows, progress=progress, cancelled=cancelled)

        self.show_message(f"taylor score: one forward/backward pass ({windows} windows per text)…")
        self.start_work("taylor score", work, self._taylor_done, fail=self._taylor_failed, group=TAYLOR_GROUP)

    def _taylor_done(self, grid: Any) -> None:
        """The grid is in the session's cache: rank by it."""
        self.score = "taylor"
        self._changed()

    def _taylor_failed(self, message: str) -> None:
        """No grid (no transformers, a bad text): one status line; the score stays rel_frob."""
        self._status_line(message)
        if self.plan is not None and self.preview is not None:
            self._draw(self.plan, self.preview)

    def _start_loss(self, *, sweep: bool) -> None:
        """Run the loss work for the current target, plan and window count in the loss worker."""
        if not self.session.eval_texts:
            self._show_loss_panel()
            self._status_line("loss: no text to evaluate on — pass --text FILE (--general-text FILE) at launch, "
                              "or ctrl+p Add text")
            return
        target_index, windows, rl, gqa = self.target_index, self.loss_windows, self.plan, self.gqa_policy
        reference_index = self._reference()

        def work(progress: ProgressFn, cancelled: CancelledFn) -> tuple[Any, Any]:
            pv = None
            if sweep:
                inputs = self.inputs_for(target_index, reference_index, progress)
                pv = self.session.loss_preview(inputs, target_index, reference_index, windows=windows,
                                               gqa_policy=gqa, progress=progress, cancelled=cancelled)
            pl = None
            if rl is not None and rl.target.fingerprint == self._targets()[target_index].fingerprint:
                pl = self.session.plan_loss(rl, target_index, windows=windows, progress=progress,
                                            cancelled=cancelled)
            return pv, pl

        self.loss_note = f"measuring the loss ({windows} windows per text)…"
        self._show_loss_panel()
        self.start_work("loss", work, self._loss_done, fail=self._loss_failed, group=LOSS_GROUP)

    def _loss_done(self, result: tuple["LossPreview | None", "PlanLoss | None"]) -> None:
        pv, pl = result
        if pv is not None:
            self.loss_preview = pv
        if pl is not None:
            self.plan_loss = pl
        self.loss_note = "measured"
        self._show_loss_panel()

    def _loss_failed(self, message: str) -> None:
        self._status_line(message)

    def ask_text(self, role: str) -> None:
        """Ask for a domain or general text file (the palette's Add text commands)."""
        self._ask(f"text-{role}", f"Add a {role} text for the loss (UTF-8 or JSONL; enter adds, esc cancels):", "")

    def add_text(self, path: Path, role: str) -> str | None:
        """Add a text to the session: a bad file is one line in the status bar; results for the old texts go."""
        from analysis.errors import DiffractError

        try:
            name = self.session.add_eval_text(path, role)
        except DiffractError as err:
            self._status_line(str(err).splitlines()[0])
            return None
        self.loss_preview = self.plan_loss = None
        self.loss_note = f"added {name} ({role}): L measures the loss"
        self.app.notify(f"Added {name} as a {role} text.", title="loss", timeout=4, markup=False)
        if self.panel in CHART_PANELS:
            self._draw_loss()
        if self.score == "taylor":  # the gradient's texts changed: re-rank on them
            self._changed()
        return name

    def action_cycle_panel(self) -> None:
        """b: the next panel (mask → per-layer bars → loss → trade-off, and the list on a narrow view)."""
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
        if not value or (self.plan is None and not (action or "").startswith("text-")):
            return
        if action in ("text-domain", "text-general"):
            self.add_text(Path(value).expanduser(), action.removeprefix("text-"))
        elif action == "export":
            self.export_to(Path(value).expanduser())
        elif action == "apply":
            self.apply_into(Path(value).expanduser())

    def export_to(self, path: Path) -> Path | None:
        """Write the current list atomically (SPEC §6 JSON), with its measured losses when `m` (or `L`) measured
        this plan; marks count as saved for the manual pattern."""
        from analysis.errors import DiffractError

        rl = self.plan
        if rl is None:
            return None
        if self.plan_loss is not None:
            rl = self.plan_loss.attach(rl)
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
        if any(w.group == LOSS_GROUP and w.is_running for w in self.workers):
            self.loss_note = "loss: cancelled — L or m measures again"
            if self.panel in CHART_PANELS:
                self._draw_loss()
        self.workers.cancel_group(self, LOSS_GROUP)
        self.app.work_done(LOSS_GROUP)
        if any(w.group == TAYLOR_GROUP and w.is_running for w in self.workers):
            self.show_message("taylor score: cancelled — s computes it again")
        self.workers.cancel_group(self, TAYLOR_GROUP)
        self.app.work_done(TAYLOR_GROUP)

    def deactivate(self) -> None:
        """Switched away: stop the preview only; an apply keeps writing in the background."""
        NodeView.cancel_work(self)
        if self.result is None:
            self.node = None

"""`e` — where to write the rewind list of the marked heads, and for which CPT checkpoint."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select


def default_export_name(target_label: str) -> str:
    """`rewind-<target>.json`, with characters unsafe in file names replaced."""
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in target_label).strip("-.") or "target"
    return f"rewind-{safe}.json"


class ExportScreen(ModalScreen["tuple[int, str] | None"]):
    """Dismisses with (target index, path) or None when cancelled."""

    BINDINGS = [Binding("escape", "cancel", "Cancel export")]
    DEFAULT_CSS = """
    ExportScreen { align: center middle; }
    ExportScreen > Vertical { width: 90%; max-width: 80; height: auto; border: round $accent;
                              background: $surface; padding: 0 1; }
    ExportScreen Label { margin-top: 0; }
    ExportScreen Horizontal { height: auto; margin-top: 1; }
    ExportScreen Button { margin-right: 1; }
    """

    def __init__(self, marked: int, targets: list[str]) -> None:
        super().__init__()
        self.marked = marked
        self.targets = targets

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(f"Export a rewind list of {self.marked} marked head(s) (SPEC §6, pattern 'manual').")
            yield Label("Rewind them in:")
            yield Select([(t, i) for i, t in enumerate(self.targets)], value=0, allow_blank=False, id="target")
            yield Label("Write to:")
            yield Input(default_export_name(self.targets[0]), id="path")
            with Horizontal():
                yield Button("Export", id="export", variant="primary")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#path", Input).focus()

    def on_select_changed(self, event: Select.Changed) -> None:
        path = self.query_one("#path", Input)
        names = {default_export_name(t) for t in self.targets}
        if path.value in names and isinstance(event.value, int):
            path.value = default_export_name(self.targets[event.value])

    def _submit(self) -> None:
        path = self.query_one("#path", Input).value.strip()
        if not path:
            self.notify("Give a file name.", severity="warning")
            return
        target = self.query_one("#target", Select).value
        self.dismiss((int(target) if isinstance(target, int) else 0, path))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self._submit()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "export":
            self._submit()
        else:
            self.dismiss(None)

    def action_cancel(self) -> None:
        self.dismiss(None)

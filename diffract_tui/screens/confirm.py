"""The app's yes/no dialogs: quit with unsaved marks (export first, quit anyway, or stay) and confirm a replace."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label


class DialogScreen(ModalScreen):
    """A small centred question with a row of buttons: the one look every yes/no dialog of the app shares."""

    DEFAULT_CSS = """
    DialogScreen { align: center middle; }
    DialogScreen > Vertical { width: auto; max-width: 76; height: auto; border: round $warning;
                              background: $surface; padding: 0 1; }
    DialogScreen Label { width: auto; margin-bottom: 1; }
    DialogScreen Horizontal { height: auto; width: auto; }
    DialogScreen Button { margin-right: 1; min-width: 10; }
    """


class QuitScreen(DialogScreen):
    """Dismisses with "export", "quit" or "stay"."""

    BINDINGS = [
        Binding("y", "choose('quit')", "Quit without exporting"),
        Binding("e", "choose('export')", "Export, then quit"),
        Binding("n,escape", "choose('stay')", "Stay"),
    ]

    def __init__(self, marked: int) -> None:
        super().__init__()
        self.marked = marked

    def compose(self) -> ComposeResult:
        with Vertical():
            heads = "head is" if self.marked == 1 else "heads are"
            yield Label(f"{self.marked} marked {heads} not exported. Quit anyway?")
            with Horizontal():
                yield Button("Export (e)", id="export", variant="primary")
                yield Button("Quit (y)", id="quit", variant="error")
                yield Button("Stay (n)", id="stay")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id or "stay")

    def action_choose(self, choice: str) -> None:
        self.dismiss(choice)


class ConfirmScreen(DialogScreen):
    """A yes/no question (e.g. replace an existing folder); dismisses with True for yes."""

    BINDINGS = [Binding("y", "choose(True)", "Yes"), Binding("n,escape", "choose(False)", "No")]

    def __init__(self, question: str, yes: str = "Yes") -> None:
        super().__init__()
        self.question = question
        self.yes = yes

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.question, markup=False)
            with Horizontal():
                yield Button(f"{self.yes} (y)", id="yes", variant="error")
                yield Button("No (n)", id="no", variant="primary")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_choose(self, yes: bool) -> None:
        self.dismiss(yes)

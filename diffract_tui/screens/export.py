"""Where exports go: `e` asks for the folder, the file name and the CPT checkpoint of a rewind list;
`FolderScreen` asks for another export folder (when the current one lies inside an input checkpoint, or from
the palette). Both ask again, with the reason, instead of accepting a folder the app must not write into."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select

# (folder, file name) → why nothing may be written there (one line), or None when it may
ExportCheck = Callable[[Path, str], "str | None"]

MODAL_CSS = """
{name} {{ align: center middle; }}
{name} > Vertical {{ width: 90%; max-width: 80; height: auto; border: round $accent;
                    background: $surface; padding: 0 1; }}
{name} Label {{ margin-top: 0; }}
{name} .problem {{ color: $error; width: 100%; height: auto; }}
{name} Horizontal {{ height: auto; margin-top: 1; }}
{name} Button {{ margin-right: 1; }}
"""


def default_export_name(target_label: str) -> str:
    """`rewind-<target>.json`, with characters unsafe in file names replaced."""
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in target_label).strip("-.") or "target"
    return f"rewind-{safe}.json"


def folder_of(text: str) -> Path:
    """A typed folder as an absolute path (`~` expanded, relative to the current folder)."""
    return Path(text.strip()).expanduser().absolute()


def refusal(problem: str) -> Text:
    """Why a folder was refused and what to do, as plain text (a path may hold markup characters)."""
    return Text(f"{problem}\nChoose another folder.")


@dataclass(frozen=True)
class ExportChoice:
    """What the rewind-list dialog settled on: the target index, the file, and the folder to remember (when
    the user changed it)."""

    target: int
    path: Path
    remember: Path | None = None


class ExportScreen(ModalScreen["ExportChoice | None"]):
    """Dismisses with an ExportChoice, or None when cancelled; refuses (and says why) a forbidden folder."""

    BINDINGS = [Binding("escape", "cancel", "Cancel export")]
    DEFAULT_CSS = MODAL_CSS.format(name="ExportScreen")

    def __init__(self, marked: int, targets: list[str], folder: Path, check: ExportCheck) -> None:
        super().__init__()
        self.marked = marked
        self.targets = targets
        self.folder = folder
        self.check = check

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(f"Export a rewind list of {self.marked} marked head(s) (pattern 'manual'; format: "
                        "docs/reference.md).")
            yield Label("Rewind them in:")
            yield Select([(t, i) for i, t in enumerate(self.targets)], value=0, allow_blank=False, id="target")
            yield Label("Folder:")
            yield Input(str(self.folder), id="folder")
            yield Label("File name:")
            yield Input(default_export_name(self.targets[0]), id="path")
            yield Label("", id="problem", classes="problem")
            with Horizontal():
                yield Button("Export", id="export", variant="primary")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        problem = self.check(self.folder, self.query_one("#path", Input).value)
        if problem:  # e.g. the app was started inside a checkpoint folder: say so before the user types
            self._refuse(problem)
        else:
            self.query_one("#path", Input).focus()

    def _refuse(self, problem: str) -> None:
        self.query_one("#problem", Label).update(refusal(problem))
        self.query_one("#folder", Input).focus()

    def on_select_changed(self, event: Select.Changed) -> None:
        path = self.query_one("#path", Input)
        names = {default_export_name(t) for t in self.targets}
        if path.value in names and isinstance(event.value, int):
            path.value = default_export_name(self.targets[event.value])

    def _submit(self) -> None:
        name = self.query_one("#path", Input).value.strip()
        folder_text = self.query_one("#folder", Input).value.strip()
        if not name or not folder_text:
            self.notify("Give a folder and a file name.", severity="warning")
            return
        folder = folder_of(folder_text)
        problem = self.check(folder, name)
        if problem:
            self._refuse(problem)
            return
        target = self.query_one("#target", Select).value
        changed = folder != self.folder.absolute()
        self.dismiss(ExportChoice(int(target) if isinstance(target, int) else 0, folder / Path(name).expanduser(),
                                  folder if changed else None))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self._submit()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "export":
            self._submit()
        else:
            self.dismiss(None)

    def action_cancel(self) -> None:
        self.dismiss(None)


class FolderScreen(ModalScreen["Path | None"]):
    """Asks for an export folder; dismisses with it (absolute) or None when cancelled."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]
    DEFAULT_CSS = MODAL_CSS.format(name="FolderScreen")

    def __init__(self, folder: Path, check: ExportCheck, name: str, *, problem: str | None = None,
                 question: str = "Export folder (remembered for later runs):") -> None:
        super().__init__()
        self.folder = folder
        self.check = check
        self.file_name = name
        self.problem = problem
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.question)
            yield Input(str(self.folder), id="folder")
            yield Label("", id="problem", classes="problem")
            with Horizontal():
                yield Button("Use this folder", id="use", variant="primary")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        if self.problem:
            self.query_one("#problem", Label).update(refusal(self.problem))
        self.query_one("#folder", Input).focus()

    def _submit(self) -> None:
        text = self.query_one("#folder", Input).value.strip()
        if not text:
            self.notify("Give a folder.", severity="warning")
            return
        folder = folder_of(text)
        problem = self.check(folder, self.file_name)
        if problem:
            self.query_one("#problem", Label).update(refusal(problem))
            return
        self.dismiss(folder)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self._submit()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "use":
            self._submit()
        else:
            self.dismiss(None)

    def action_cancel(self) -> None:
        self.dismiss(None)

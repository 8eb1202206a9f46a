"""`?` — the keys that work right now: the app's, the tree's and the active view's, with what they do."""

from __future__ import annotations

from typing import Iterable

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Static

KEY_NAMES = {"question_mark": "?", "left_square_bracket": "[", "right_square_bracket": "]", "space": "space",
             "escape": "esc", "slash": "/", "ctrl+p": "ctrl+p"}


def key_label(binding: Binding) -> str:
    """How a binding's key(s) read on the help screen, e.g. `[`, `ctrl+p`, `j`."""
    if binding.key_display:
        return binding.key_display
    return ",".join(KEY_NAMES.get(k.strip(), k.strip()) for k in binding.key.split(","))


def binding_rows(bindings: Iterable[BindingType], seen: set[str] | None = None) -> list[tuple[str, str]]:
    """(key, description) for each binding that has a description, in declaration order, skipping keys
    already in `seen` (which it fills), so that a key is listed once."""
    rows: list[tuple[str, str]] = []
    seen = set() if seen is None else seen
    for b in bindings:
        if not isinstance(b, Binding) or not b.description:
            continue
        key = key_label(b)
        if key in seen:
            continue
        seen.add(key)
        rows.append((key, b.description[:1].upper() + b.description[1:]))
    return rows


def help_groups(groups: list[tuple[str, list[BindingType]]]) -> list[tuple[str, list[tuple[str, str]]]]:
    """The help screen's (title, rows) groups: each key once, in the first group binding it; empty groups
    are dropped."""
    seen: set[str] = set()
    out = []
    for title, bindings in groups:
        rows = binding_rows(bindings, seen)
        if rows:
            out.append((title, rows))
    return out


def help_text(groups: list[tuple[str, list[tuple[str, str]]]]) -> Text:
    """The help as one plain Text (a Rich Table per group cost ~0.3 s to lay out when the screen opens)."""
    text = Text()
    for title, rows in groups:
        text.append(f"{title}\n", style="bold")
        for key, what in rows:
            text.append(f"  {key:<10}", style="bold")
            text.append(f"{what}\n")
        text.append("\n")
    text.append("esc, q or ? closes this help", style="dim")
    return text


class HelpScreen(Screen[None]):
    """A scrollable list of key groups; any of esc, q, ? closes it. An opaque screen, not a modal one: a
    modal redraws the explorer (charts, a long table) dimmed beneath it, which cost 0.2–3 s per opening."""

    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "Close help")]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; background: $background; }
    HelpScreen > VerticalScroll { width: 90%; max-width: 100; height: 90%; border: round $accent;
                                  background: $surface; padding: 0 1; }
    """

    def __init__(self, groups: list[tuple[str, list[tuple[str, str]]]]) -> None:
        super().__init__()
        self.groups = groups

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static(help_text(self.groups))

    def action_dismiss(self) -> None:
        self.dismiss(None)

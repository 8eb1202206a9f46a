"""Messages that flow between the tree, the views and the app (posted upward, handled by the app)."""

from __future__ import annotations

from textual.message import Message

from diffract_tui.node import NodeRef


class NodeSelected(Message):
    """The tree cursor moved to `node`; the active view should show it."""

    def __init__(self, node: NodeRef) -> None:
        self.node = node
        super().__init__()


class OpenNode(Message):
    """A view (grid cell, table row) asks the app to move the tree cursor to `node`."""

    def __init__(self, node: NodeRef) -> None:
        self.node = node
        super().__init__()


class MarksChanged(Message):
    """The set of marked (layer, head) pairs changed."""

    def __init__(self, marks: frozenset[tuple[int, int]]) -> None:
        self.marks = marks
        super().__init__()


class MetricsReady(Message):
    """A worker finished computing metrics for `node` (the tree updates its badges)."""

    def __init__(self, node: NodeRef, metrics: dict[str, float]) -> None:
        self.node = node
        self.metrics = metrics
        super().__init__()


class ToggleMark(Message):
    """The user pressed space on a head node: mark or unmark its query head (the app decides)."""

    def __init__(self, node: NodeRef) -> None:
        self.node = node
        super().__init__()


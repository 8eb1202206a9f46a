"""The ctrl+p palette: go to a layer or head by typing its address, compute all, export (and choose the export
folder), add a domain or general text for the loss (asked in the Rewind view), switch views. Textual's own Screenshot command writes into the export folder too
(`DiffractApp.deliver_screenshot`)."""

from __future__ import annotations

import re
from functools import partial
from typing import TYPE_CHECKING

from textual.command import DiscoveryHit, Hit, Hits, Provider

from diffract_tui.node import NodeRef
from diffract_tui.widgets.tree import head_count, module_names

if TYPE_CHECKING:  # pragma: no cover
    from analysis.model.architecture import ModelLayout

_LAYER_RE = re.compile(r"^(?:l|layer)?(\d+)$", re.IGNORECASE)
_HEAD_RE = re.compile(r"^(?:h|head)(\d+)$", re.IGNORECASE)


def parse_address(text: str, layout: "ModelLayout") -> NodeRef | None:
    """A node from a typed address such as `L3`, `3 q`, `layer 3 q h5`, `l12 down`; None if it names none."""
    words = [w for w in re.split(r"[\s,:/]+", text.strip().lower()) if w and w not in ("go", "to", "layer")]
    if not words:
        return None
    m = _LAYER_RE.match(words[0])
    if not m:
        return None
    layer = int(m.group(1))
    if not 0 <= layer < layout.num_layers:
        return None
    if len(words) == 1:
        return NodeRef(layer)
    module = words[1]
    if module not in module_names(layout, layer):
        return None
    if len(words) == 2:
        return NodeRef(layer, module)
    h = _HEAD_RE.match(words[2]) or re.match(r"^(\d+)$", words[2])
    if not h or len(words) > 3:
        return None
    head = int(h.group(1))
    if not 0 <= head < head_count(layout, module):
        return None
    return NodeRef(layer, module, head)


def add_text(app: object, role: str) -> None:
    """Switch to the Rewind view and ask there for a domain or general text file of the loss."""
    from diffract_tui.views.rewind import RewindView

    app.action_view("rewind")  # type: ignore[attr-defined]
    app.query_one(RewindView).ask_text(role)  # type: ignore[attr-defined]


class DiffractCommands(Provider):
    """Commands of the explorer; a typed node address becomes a "Go to" hit."""

    def _commands(self) -> list[tuple[str, str, object]]:
        app = self.app
        cmds: list[tuple[str, str, object]] = [
            ("Compute all", "Fill the cache with spectra and deltas of every matrix and head", app.action_compute_all),
            ("Export rewind list", "Write the marked heads as a rewind list into the export folder (e)",
             app.action_export_rewind),
            ("Export current table", "Write the active view's table to CSV in the export folder (x)",
             app.action_export_table),
            ("Export folder…", "Choose the folder exports and screenshots go to (remembered across runs)",
             app.action_choose_export_folder),
            ("Add domain text…", "A text of the CPT's domain for the Rewind view's loss (like --text FILE)",
             partial(add_text, app, "domain")),
            ("Add general text…", "A text of an ability to keep, for the loss and the trade-off (like "
             "--general-text FILE)", partial(add_text, app, "general")),
            ("Cancel work", "Stop running computations (esc)", app.action_cancel),
            ("Toggle tree", "Hide or show the model tree (t)", app.action_toggle_tree),
            ("Help", "Show the keys (?)", app.action_help),
        ]
        for spec in app.view_specs:
            cmds.append((f"View: {spec.title}", f"Switch to the {spec.title} view ({spec.key})",
                         partial(app.action_view, spec.id)))
        return cmds

    async def discover(self) -> Hits:
        for name, help_text, callback in self._commands():
            yield DiscoveryHit(name, callback, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        node = parse_address(query, self.app.session.layout)
        if node is not None:
            yield Hit(1.0, f"Go to {node.label()}", partial(self.app.go_to_node, node),
                      help="Move the tree cursor there")
        for name, help_text, callback in self._commands():
            score = matcher.match(name)
            if score > 0:
                yield Hit(score, matcher.highlight(name), callback, help=help_text)
        if query.strip():
            for layer in range(self.app.session.layout.num_layers):
                name = f"Go to layer {layer}"
                score = matcher.match(name)
                if score > 0 and node != NodeRef(layer):
                    yield Hit(score * 0.9, matcher.highlight(name), partial(self.app.go_to_node, NodeRef(layer)))

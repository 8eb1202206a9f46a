"""The model tree: model → layers → modules → heads, built lazily from the layout (headers only).

Vim keys move the cursor; `/` filters by words (e.g. `L3 q`, `h5`, `down`); badges (α, relative update)
appear on a node once its metrics are known; with a checkpoint series, a sparkline of the Evolution view's metric
along the steps follows them (values from the engine or the cache, never computed here). Moving the cursor posts
`NodeSelected`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from rich.text import Text
from textual.binding import Binding
from textual.widgets import Tree
from textual.widgets.tree import TreeNode

from diffract_tui.messages import NodeSelected, ToggleMark
from diffract_tui.node import NodeRef
from diffract_tui.widgets.charts import fmt

if TYPE_CHECKING:  # pragma: no cover
    from analysis.run.session import ModelLayout

HEAD_PROJECTIONS: tuple[str, ...] = ("q", "k", "v", "o")
FILTER_MATCH_LIMIT = 2000  # nodes shown at most for one filter (a 70B model has ~10k heads)
ONLY_IN_MARK = "◌"         # a node whose tensor only some checkpoints hold (SPEC §1), before "only in: …"
UNCHANGED_MARK = "Δ="      # a node the first CPT checkpoint left bit-identical to the base (ΔW = 0)
SPARK_BARS = "▁▂▃▄▅▆▇█"
OnlyInFn = Callable[[NodeRef], "tuple[str, ...] | None"]


@dataclass(frozen=True)
class Badge:
    """What a tree node shows next to its name once known: base α (greyed when unreliable) and the
    relative update ‖ΔW‖_F/‖W₀‖_F against the first CPT checkpoint (`Δ=` when it left the node unchanged)."""

    alpha: float | None = None
    alpha_reliable: bool = True
    delta_rel: float | None = None
    unchanged: bool = False

    def merged(self, other: "Badge") -> "Badge":
        """This badge with `other`'s known values laid over it."""
        return Badge(
            alpha=other.alpha if other.alpha is not None else self.alpha,
            alpha_reliable=other.alpha_reliable if other.alpha is not None else self.alpha_reliable,
            delta_rel=other.delta_rel if other.delta_rel is not None else self.delta_rel,
            unchanged=other.unchanged if other.delta_rel is not None else self.unchanged,
        )


def badge_from_metrics(metrics: dict[str, Any]) -> Badge:
    """A badge from a MetricsReady dict: `pl_alpha`/`pl_alpha_reliable` of the base, `delta_rel`, `unchanged`."""
    alpha = metrics.get("pl_alpha")
    return Badge(alpha=None if alpha is None else float(alpha),
                 alpha_reliable=bool(metrics.get("pl_alpha_reliable", True)),
                 delta_rel=None if metrics.get("delta_rel") is None else float(metrics["delta_rel"]),
                 unchanged=bool(metrics.get("unchanged")))


def sparkline(values: Sequence[float | None]) -> str:
    """One bar per value, scaled from the smallest to the largest (a constant line sits mid-height); a space
    where a value is undefined (a Δ metric at the first step)."""
    known = [float(v) for v in values if v is not None and v == v]
    if not known:
        return ""
    lo, hi = min(known), max(known)
    top = len(SPARK_BARS) - 1
    out = []
    for v in values:
        if v is None or v != v:
            out.append(" ")
        elif hi == lo:
            out.append(SPARK_BARS[top // 2])
        else:
            out.append(SPARK_BARS[round((float(v) - lo) / (hi - lo) * top)])
    return "".join(out)


def module_names(layout: "ModelLayout", layer: int) -> list[str]:
    """The modules of a layer as shown: stored matrices, plus virtual q/k/v/o for fused attention."""
    names = [m.name for m in layout.layers[layer].modules]
    if layout.heads_available:
        names += [p for p in HEAD_PROJECTIONS if p not in names]
    return names


def head_count(layout: "ModelLayout", module: str) -> int:
    """How many head children a module has: H for q/o, H_kv for k/v, none otherwise."""
    if not layout.heads_available or module not in HEAD_PROJECTIONS:
        return 0
    return layout.num_kv_heads if module in ("k", "v") else layout.num_heads


def all_nodes(layout: "ModelLayout") -> Iterator[NodeRef]:
    """Every node of the tree in display order (used by the filter and the palette, never rendered whole)."""
    for module in layout.globals:
        yield NodeRef(None, module.name, None)
    for layer in range(layout.num_layers):
        yield NodeRef(layer)
        for name in module_names(layout, layer):
            yield NodeRef(layer, name)
            for head in range(head_count(layout, name)):
                yield NodeRef(layer, name, head)


def matches(node: NodeRef, words: list[str]) -> bool:
    """True when every filter word equals one word of the node's label (case-insensitive)."""
    label_words = node.label().lower().split()
    return all(w in label_words for w in words)


class ModelTree(Tree[NodeRef]):
    """The left-hand tree. Children are added when a node is first expanded (lazy)."""

    BINDINGS = [
        Binding("j", "cursor_down", "Down", show=False),
        Binding("k", "cursor_up", "Up", show=False),
        Binding("l", "expand_or_child", "Expand", show=False),
        Binding("h", "collapse_or_parent", "Collapse", show=False),
        Binding("g", "first", "First", show=False),
        Binding("G", "last", "Last", show=False),
        Binding("space", "mark", "Mark head", show=False),
        Binding("right", "expand_or_child", "Expand", show=False),
        Binding("left", "collapse_or_parent", "Collapse", show=False),
    ]

    def __init__(self, layout: "ModelLayout", model_name: str, *, only_in: OnlyInFn | None = None,
                 id: str | None = None) -> None:
        super().__init__(Text(model_name, style="bold"), data=NodeRef(), id=id)
        self.model_layout = layout
        self.only_in: OnlyInFn = only_in or (lambda ref: None)  # which checkpoints hold a node's tensor
        self.badges: dict[NodeRef, Badge] = {}
        self.sparklines: dict[NodeRef, str] = {}   # the Evolution view's metric along a series, where known
        self.marks: frozenset[tuple[int, int]] = frozenset()
        self._by_ref: dict[NodeRef, TreeNode[NodeRef]] = {}
        self.filter_words: list[str] = []
        self.show_root = True
        self.guide_depth = 2
        self._populate_root()

    # ---- building ----------------------------------------------------------------------------
    def _populate_root(self) -> None:
        self.root.remove_children()
        self._by_ref = {NodeRef(): self.root}
        for module in self.model_layout.globals:
            self._add(self.root, NodeRef(None, module.name, None), leaf=True)
        for layer in range(self.model_layout.num_layers):
            self._add(self.root, NodeRef(layer), leaf=False)
        self.root.expand()

    def _add(self, parent: TreeNode[NodeRef], ref: NodeRef, *, leaf: bool) -> TreeNode[NodeRef]:
        label = self._label(ref)
        node = parent.add_leaf(label, data=ref) if leaf else parent.add(label, data=ref)
        self._by_ref[ref] = node
        return node

    def _children_of(self, ref: NodeRef) -> list[tuple[NodeRef, bool]]:
        if ref.layer is None:
            return []
        if ref.module is None:
            return [(NodeRef(ref.layer, name), head_count(self.model_layout, name) == 0)
                    for name in module_names(self.model_layout, ref.layer)]
        if ref.head is None:
            return [(NodeRef(ref.layer, ref.module, h), True) for h in range(head_count(self.model_layout, ref.module))]
        return []

    def _ensure_children(self, node: TreeNode[NodeRef]) -> None:
        if node.children or node.data is None or node is self.root:
            return
        for ref, leaf in self._children_of(node.data):
            self._add(node, ref, leaf=leaf)

    def on_tree_node_expanded(self, event: Tree.NodeExpanded[NodeRef]) -> None:
        """Build the children; the event goes on to the app, which loads their badges and sparklines from the
        cache (it was stopped here, so cached badges never appeared on expanding a layer)."""
        if not self.filter_words:
            self._ensure_children(event.node)

    # ---- labels and badges -------------------------------------------------------------------
    def _label(self, ref: NodeRef) -> Text:
        if ref.layer is None:
            name = ref.module or "model"
        elif ref.module is None:
            name = f"L{ref.layer}"
        elif ref.head is None:
            name = ref.module
        else:
            name = f"h{ref.head}"
        text = Text(name)
        sign = self._mark_sign(ref)
        if sign:
            text = Text(f"{sign} ", style="bold") + text
        badge = self.badges.get(ref)
        if badge is not None:
            if badge.alpha is not None:
                text.append(f" α{fmt(badge.alpha, 2)}", style="dim italic" if not badge.alpha_reliable else "")
            if badge.unchanged:
                text.append(f" {UNCHANGED_MARK}", style="dim")
            elif badge.delta_rel is not None:
                text.append(f" Δ{fmt(badge.delta_rel, 2)}", style="")
        spark = self.sparklines.get(ref)
        if spark:
            text.append(f" {spark}")
        owners = self.only_in(ref) if ref.module is not None else None
        if owners:
            text.append(f" {ONLY_IN_MARK} only in: {', '.join(owners)}", style="dim italic")
        return text

    def _query_heads(self, ref: NodeRef) -> range:
        """The query heads a head node belongs to: itself for q/o, its kv group for k/v (one head when
        H_kv = H). A mark is per query head, so every projection node of a marked head shows it."""
        if ref.head is None or ref.module is None:
            return range(0)
        if ref.module in ("k", "v") and self.model_layout.heads_available:
            return self.model_layout.query_heads_of(ref.head)
        return range(ref.head, ref.head + 1)

    def _mark_sign(self, ref: NodeRef) -> str:
        """"●" when every query head of the node is marked, "◐" when some of a shared kv head's are, else ""."""
        heads = self._query_heads(ref)
        marked = sum((ref.layer, h) in self.marks for h in heads)
        if not marked:
            return ""
        return "●" if marked == len(heads) else "◐"

    def set_badge(self, ref: NodeRef, badge: Badge) -> None:
        """Record `badge` for `ref` and relabel the node if it is built."""
        self.badges[ref] = self.badges.get(ref, Badge()).merged(badge)
        node = self._by_ref.get(ref)
        if node is not None:
            node.set_label(self._label(ref))

    def set_sparkline(self, ref: NodeRef, values: Sequence[float | None]) -> None:
        """Show `values` (one per step) as a sparkline beside `ref` and relabel the node if it is built."""
        self.sparklines[ref] = sparkline(values)
        node = self._by_ref.get(ref)
        if node is not None:
            node.set_label(self._label(ref))

    def clear_sparklines(self) -> None:
        """Drop every sparkline (the metric changed) and relabel the nodes that had one."""
        refs, self.sparklines = list(self.sparklines), {}
        for ref in refs:
            node = self._by_ref.get(ref)
            if node is not None:
                node.set_label(self._label(ref))

    def built_nodes(self) -> list[NodeRef]:
        """The nodes built so far (shown or under a collapsed parent), in no particular order."""
        return list(self._by_ref)

    def set_marks(self, marks: frozenset[tuple[int, int]]) -> None:
        """Show a dot on every projection node (q, k, v, o) of a marked head: it is one mark per head."""
        changed = marks ^ self.marks
        self.marks = marks
        layout = self.model_layout
        for layer, head in changed:
            kv = layout.kv_group(head) if layout.heads_available and layout.num_kv_heads else head
            for ref in (NodeRef(layer, "q", head), NodeRef(layer, "o", head), NodeRef(layer, "k", kv),
                        NodeRef(layer, "v", kv)):
                node = self._by_ref.get(ref)
                if node is not None:
                    node.set_label(self._label(ref))

    # ---- cursor ------------------------------------------------------------------------------
    @property
    def current(self) -> NodeRef:
        """The node under the cursor (the model when nothing is)."""
        node = self.cursor_node
        return node.data if node is not None and node.data is not None else NodeRef()

    def on_tree_node_highlighted(self, event: Tree.NodeHighlighted[NodeRef]) -> None:
        event.stop()
        if event.node.data is not None:
            self.post_message(NodeSelected(event.node.data))

    def on_tree_node_selected(self, event: Tree.NodeSelected[NodeRef]) -> None:
        event.stop()

    def action_first(self) -> None:
        """g: cursor to the first line."""
        self.cursor_line = 0
        self.scroll_to_line(0, animate=False)

    def action_last(self) -> None:
        """G: cursor to the last line."""
        self.cursor_line = self.last_line
        self.scroll_to_line(self.last_line, animate=False)

    def action_mark(self) -> None:
        """space: on a head, ask the app to mark/unmark it; elsewhere expand/collapse as Tree does."""
        ref = self.current
        if ref.is_head:
            self.post_message(ToggleMark(ref))
        else:
            self.action_toggle_node()

    def action_expand_or_child(self) -> None:
        """l: expand a collapsed node, else step to its first child."""
        node = self.cursor_node
        if node is None or not node.allow_expand:
            return
        if not node.is_expanded:
            node.expand()
        else:
            self._ensure_children(node)
            if node.children:
                self._move_to(node.children[0])

    def action_collapse_or_parent(self) -> None:
        """h: collapse an expanded node, else step to its parent."""
        node = self.cursor_node
        if node is None:
            return
        if node.allow_expand and node.is_expanded and node is not self.root:
            node.collapse()
        elif node.parent is not None:
            self.move_cursor(node.parent)

    def go_to(self, ref: NodeRef) -> bool:
        """Expand the path to `ref` (building children on the way) and put the cursor on it."""
        if self.filter_words and ref not in self._by_ref:
            self.clear_filter()
        path = [NodeRef()]
        if ref.layer is not None:
            path.append(NodeRef(ref.layer))
            if ref.module is not None:
                path.append(NodeRef(ref.layer, ref.module))
                if ref.head is not None:
                    path.append(ref)
        elif ref.module is not None:
            path.append(ref)
        for step in path[:-1]:
            node = self._by_ref.get(step)
            if node is None:
                return False
            self._ensure_children(node)
            node.expand()
        target = self._by_ref.get(path[-1])
        if target is None:
            return False
        self._move_to(target)
        return True

    def _move_to(self, node: TreeNode[NodeRef]) -> None:
        """Cursor onto `node` now, even when its line was just added (lines are rebuilt lazily)."""
        _ = self._tree_lines  # rebuild the line index so node._line is current
        self.move_cursor(node)
        self.scroll_to_node(node, animate=False)

    def step_layer(self, delta: int) -> bool:
        """Move to the same module/head in the previous (−1) or next (+1) layer."""
        ref = self.current
        if ref.layer is None:
            target = NodeRef(0 if delta > 0 else self.model_layout.num_layers - 1)
        else:
            layer = ref.layer + delta
            if not 0 <= layer < self.model_layout.num_layers:
                return False
            target = NodeRef(layer, ref.module, ref.head)
            if target.module is not None and target.module not in module_names(self.model_layout, layer):
                target = NodeRef(layer)
        return self.go_to(target)

    # ---- filter ------------------------------------------------------------------------------
    def apply_filter(self, text: str) -> int:
        """Show only nodes whose label contains every word of `text` (and their ancestors), expanded.

        Returns how many nodes matched (at most FILTER_MATCH_LIMIT are shown).
        """
        words = text.lower().split()
        if not words:
            self.clear_filter()
            return 0
        hits = [ref for ref in all_nodes(self.model_layout) if matches(ref, words)]
        self.filter_words = words
        self.root.remove_children()
        self._by_ref = {NodeRef(): self.root}
        for ref in hits[:FILTER_MATCH_LIMIT]:
            parent = self.root
            chain: list[NodeRef] = []
            if ref.layer is not None:
                chain.append(NodeRef(ref.layer))
                if ref.module is not None:
                    chain.append(NodeRef(ref.layer, ref.module))
                    if ref.head is not None:
                        chain.append(ref)
            else:
                chain.append(ref)
            for step in chain:
                node = self._by_ref.get(step)
                if node is None:
                    node = self._add(parent, step, leaf=step == ref and not self._children_of(step))
                    node.expand()
                parent = node
        self.root.expand()
        if hits:
            first = self._by_ref.get(hits[0])
            if first is not None:
                self._move_to(first)
        return len(hits)

    def clear_filter(self) -> None:
        """Back to the full lazy tree, keeping the cursor on the same node when possible."""
        current = self.current
        self.filter_words = []
        self._populate_root()
        self.go_to(current)

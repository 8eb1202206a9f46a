"""The address of a tree node (model, layer, module or head) shared by the tree, views and messages."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class NodeRef:
    """Where the cursor is: layer None = the model; module None = a layer; head None = a matrix.

    `module` is a layout module name ("q", "k", "v", "o", "gate", "up", "down", "embed", ...);
    `head` is a query head for q/o and a kv head for k/v, as in `analysis.model.heads.head_slots`.
    """

    layer: int | None = None
    module: str | None = None
    head: int | None = None

    @property
    def is_head(self) -> bool:
        return self.head is not None

    def label(self) -> str:
        """Short human name, e.g. `L3 q h5`, `L3 q`, `L3`, `model`."""
        if self.layer is None:
            return "model" if self.module is None else self.module
        parts = [f"L{self.layer}"]
        if self.module is not None:
            parts.append(self.module)
        if self.head is not None:
            parts.append(f"h{self.head}")
        return " ".join(parts)

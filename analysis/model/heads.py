"""Head slices (SPEC §2): where head h of q/k/v/o lives in the stored tensors, and reading it.

`head_slots` says which positions of which stored tensor hold one head (writers: rewind,
interpolation); `head_slice` / `projection_heads` read them in the logical (out × in)
orientation, whatever the storage (fused qkv, GPT-2 Conv1D in × out, GPT-NeoX interleaving).
Readers need only `.tensor(name, dtype)` and `.rows(name, start, stop, dtype)` (`module_array`: `.array(name,
dtype)`). torch is imported by the readers that use it, so the numpy one (a CPU scan, issue 13) needs none.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from analysis.model.architecture import Module, ModelLayout, Projection

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch


def _float32() -> "torch.dtype":
    """torch.float32, the readers' default dtype (imported when a torch reader runs)."""
    import torch

    return torch.float32


@dataclass(frozen=True, eq=False)
class Slot:
    """Where one head's part of one projection lives in a STORED tensor."""

    tensor: str               # normalised key
    axis: int                 # axis of the stored tensor that is indexed
    index: torch.Tensor       # int64 positions along that axis
    transpose: bool           # True when the stored tensor is (in × out) (gpt2 Conv1D)


def _positions(p: Projection, head: int, head_dim: int) -> "torch.Tensor":
    import torch

    start = p.base + head * p.stride
    return torch.arange(start, start + head_dim, dtype=torch.int64)


def _check_head(layout: ModelLayout, p: Projection, proj: str, head: int) -> None:
    if not 0 <= head < p.heads:
        what = "query head" if proj in ("q", "o") else "key/value head"
        raise IndexError(f"{what} {head} out of range 0..{p.heads - 1} for projection {proj!r}")


def head_slots(layout: ModelLayout, layer: int, proj: str, head: int, *, bias: bool = False) -> list[Slot]:
    """Slots of head `head` (query head for q/o, kv head for k/v); bias=True gives its q/k/v bias entries.

    The o-projection bias is shared by all heads, so o has no bias slot ([]); [] also when the
    model has no bias on that projection.
    """
    p = layout.projection(layer, proj)
    _check_head(layout, p, proj, head)
    idx = _positions(p, head, layout.head_dim)
    if bias:
        if proj == "o" or p.bias is None:
            return []
        return [Slot(p.bias, 0, idx, False)]
    return [Slot(p.tensor, p.axis, idx, p.transpose)]


def head_slice(ckpt: Any, layout: ModelLayout, layer: int, proj: str, head: int,
               dtype: "torch.dtype | None" = None) -> "torch.Tensor":
    """One head's slice in (out × in) orientation: q/k/v (d_h × D) rows; o (D × d_h) columns (float32 default)."""
    dtype = _float32() if dtype is None else dtype
    p = layout.projection(layer, proj)
    _check_head(layout, p, proj, head)
    dh = layout.head_dim
    start = p.base + head * p.stride
    if p.axis == 0:
        block = ckpt.rows(p.tensor, start, start + dh, dtype)           # (dh × other)
    else:
        block = ckpt.tensor(p.tensor, dtype).narrow(1, start, dh).T     # (dh × other)
    # `block` is the head's rows of the logical (out × in) weight for q/k/v, and the head's
    # columns (transposed) of the logical W_o for o.
    return (block.T if proj == "o" else block).contiguous()


def projection_heads(ckpt: Any, layout: ModelLayout, layer: int, proj: str,
                     dtype: "torch.dtype | None" = None) -> "torch.Tensor":
    """All heads of one projection, stacked: (H, d_h, D) for q, (H_kv, d_h, D) for k/v, (H, D, d_h) for o.

    One read of the projection (only its row block where heads index rows), then a gather/view (float32 default).
    """
    import torch

    dtype = torch.float32 if dtype is None else dtype
    p = layout.projection(layer, proj)
    dh, n = layout.head_dim, p.heads
    span_end = p.base + (n - 1) * p.stride + dh
    if p.axis == 0:
        block = ckpt.rows(p.tensor, p.base, span_end, dtype)                              # (span × other)
    else:
        block = ckpt.tensor(p.tensor, dtype).narrow(1, p.base, span_end - p.base).T      # (span × other)
    if p.stride == dh:
        stacked = block.reshape(n, dh, block.shape[1])
    else:
        idx = (torch.arange(n) * p.stride)[:, None] + torch.arange(dh)[None, :]
        stacked = block[idx]                                                               # (n, dh, other)
    if proj == "o":
        stacked = stacked.transpose(1, 2)                                                  # (H, D, dh)
    return stacked.contiguous()


def _assembled(module: Module, full: Callable[[], Any], rows: Callable[[int, int], Any],
               cat: Callable[[Sequence[Any], int], Any]) -> Any:
    """The matrix a module denotes from its stored tensor, in either array library: `full()` the whole tensor,
    `rows(a, b)` its rows [a, b), `cat(parts, axis)` a concatenation; (out × in) orientation, not yet contiguous."""
    if module.segments:
        if module.axis == 0 and len(module.segments) == 1:
            W = rows(*module.segments[0])
        else:
            F = full()
            W = cat([F[a:b] if module.axis == 0 else F[:, a:b] for a, b in module.segments], module.axis)
    else:
        W = full()
    if module.transpose and W.ndim == 2:
        W = W.T
    return W


def module_matrix(ckpt: Any, module: Module, dtype: "torch.dtype | None" = None) -> "torch.Tensor":
    """The matrix a module denotes, in (out × in) orientation (a fused part's rows, Conv1D transposed)."""
    import torch

    dtype = torch.float32 if dtype is None else dtype
    return _assembled(module, lambda: ckpt.tensor(module.tensor, dtype),
                      lambda a, b: ckpt.rows(module.tensor, a, b, dtype), torch.cat).contiguous()


def module_array(ckpt: Any, module: Module, dtype: str = "float32") -> np.ndarray:
    """`module_matrix` as a C-contiguous numpy array, read with `ckpt.array` (no torch for the formats that need
    none): the same values in the same layout, so its spectrum has the same bits (a fused part's rows are cut
    from the whole tensor, which the scan's reader memo shares between the parts)."""
    return np.ascontiguousarray(_assembled(module, lambda: ckpt.array(module.tensor, dtype),
                                           lambda a, b: ckpt.array(module.tensor, dtype)[a:b], np.concatenate))


def module_bias(ckpt: Any, module: Module, dtype: "torch.dtype | None" = None) -> "torch.Tensor | None":
    """The bias of a module (for a fused part: its entries of the fused bias); None when there is none."""
    import torch

    dtype = torch.float32 if dtype is None else dtype
    if module.bias is None:
        return None
    full = ckpt.tensor(module.bias, dtype)
    if not module.segments:
        return full
    return torch.cat([full[a:b] for a, b in module.segments])

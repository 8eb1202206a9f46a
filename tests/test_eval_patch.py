"""The in-memory patch (analysis/eval/patch.py LivePatch) on hand-made slots, apart from any model family:
slots of one tensor merged into runs (adjacent, overlapping, scattered, on two axes, a cast to the live dtype)
write exactly the base's values at exactly those positions, and restore puts every bit back."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from analysis.eval.patch import LivePatch, _merged
from analysis.io.checkpoint import open_checkpoint
from analysis.model.heads import Slot


class _Two(torch.nn.Module):
    """Two parameters named as a checkpoint stores them."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.w = torch.nn.Parameter(torch.randn(12, 10, generator=g).to(dtype))
        self.b = torch.nn.Parameter(torch.randn(12, generator=g).to(dtype))


def _slot(name: str, axis: int, positions: list[int]) -> Slot:
    return Slot(tensor=name, axis=axis, index=torch.tensor(positions, dtype=torch.int64), transpose=False)


def _base(tmp_path: Path, dtype: torch.dtype) -> Path:
    g = torch.Generator().manual_seed(2)
    path = tmp_path / "base.safetensors"
    save_file({"w": torch.randn(12, 10, generator=g).to(dtype), "b": torch.randn(12, generator=g).to(dtype)},
              str(path))
    return path


def test_merged_runs_join_adjacent_and_overlapping_slots():
    slots = [_slot("w", 0, [4, 5, 6]), _slot("w", 0, [0, 1]), _slot("w", 0, [2, 3]), _slot("w", 0, [5, 6, 7]),
             _slot("w", 0, [10]), _slot("w", 1, [9, 3])]
    assert _merged(slots) == {0: [(0, 8), (10, 1)], 1: [(3, 1), (9, 1)]}


def test_patch_writes_the_base_at_exactly_the_slots_and_restores_every_bit(tmp_path):
    base = open_checkpoint(_base(tmp_path, torch.bfloat16))  # stored bf16, live float32: copy_ casts
    model = _Two(torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    edits = {"w": [_slot("w", 0, [1, 2]), _slot("w", 0, [2, 3]), _slot("w", 0, [7, 9]), _slot("w", 1, [0, 4, 5])],
             "b": [_slot("b", 0, [1, 2, 3]), _slot("b", 0, [11])]}
    patch = LivePatch(model, base, layout=None)  # type: ignore[arg-type]  (apply needs no layout)
    saved = patch.apply(edits)
    w_base, b_base = base.tensor("w"), base.tensor("b")
    rows, cols = [1, 2, 3, 7, 9], [0, 4, 5]
    expect_w = before["w"].clone()
    expect_w[rows] = w_base[rows]
    expect_w[:, cols] = w_base[:, cols]
    expect_b = before["b"].clone()
    expect_b[[1, 2, 3, 11]] = b_base[[1, 2, 3, 11]]
    assert torch.equal(model.w.detach(), expect_w)
    assert torch.equal(model.b.detach(), expect_b)
    LivePatch.restore(saved)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n

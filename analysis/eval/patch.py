"""In-memory edits of a live model (SPEC §9): rewind — copy the chosen heads' slots (exactly those
`rewind apply` writes: `analysis.edit.rewind.rewind_edits`, GQA policy included) from the base into the
live parameters, evaluate, restore bit for bit; and whole-model linear combinations (interpolation paths).
Memory: one model plus one copy of the patched slices."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from analysis.errors import AlignmentError
from analysis.io.checkpoint import normalise_key

if TYPE_CHECKING:  # pragma: no cover
    from analysis.edit.interpolate import Combination
    from analysis.edit.rewind_list import RewindList
    from analysis.io.checkpoint import Checkpoint
    from analysis.model.architecture import ModelLayout
    from analysis.model.heads import Slot


def parameter_map(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Normalised checkpoint key (SPEC §1) → the live parameter that holds it."""
    return {normalise_key(name): p for name, p in model.named_parameters()}


def rewind_description(rl: "RewindList") -> dict[str, Any]:
    """What a rewind patches, for the cache key: the base and each head's rewound projections."""
    return {"rewind_from": rl.base.fingerprint,
            "heads": [[e.layer, e.head, list(e.projections)] for e in sorted(rl.heads, key=lambda e: (e.layer, e.head))]}


def _span(index: torch.Tensor) -> tuple[int, int] | None:
    """(start, length) when the positions are one increasing run start, start+1, …; else None."""
    n = int(index.numel())
    if n == 0:
        return None
    start = int(index[0])
    return (start, n) if torch.equal(index, torch.arange(start, start + n, dtype=index.dtype)) else None


class LivePatch:
    """Rewinds heads of a live model to a base checkpoint and puts them back exactly."""

    def __init__(self, model: torch.nn.Module, base: "Checkpoint", layout: "ModelLayout"):
        self.model = model
        self.base = base
        self.layout = layout
        self.params = parameter_map(model)

    def _param(self, name: str) -> torch.nn.Parameter:
        p = self.params.get(name)
        if p is None:
            raise AlignmentError(f"tensor {name} of the rewind is not a parameter of the live model",
                                 path=self.base.path, hint="rewind needs the base and target of one architecture")
        return p

    def apply(self, edits: dict[str, list["Slot"]]) -> list[tuple[Any, ...]]:
        """Copy the slots from the base into the live parameters; returns what restores them. Row blocks are
        read alone from the base (`Checkpoint.rows`); other slots read the base tensor once."""
        saved = []
        with torch.no_grad():
            for name, slots in edits.items():
                p = self._param(name)
                shape = tuple(self.base.info(name).shape)
                if shape != tuple(p.shape):
                    raise AlignmentError(f"tensor {name} has shape {shape} in the base and {tuple(p.shape)} "
                                         "in the model", path=self.base.path, hint="rewind needs the same architecture")
                whole: torch.Tensor | None = None
                for s in slots:
                    span = _span(s.index)
                    if span is not None and s.axis == 0:  # a head's rows: read just them, copy views
                        src = self.base.rows(name, span[0], span[0] + span[1], dtype=None)
                        live = p.data.narrow(0, *span)
                        saved.append((live, None, None, live.clone()))
                        live.copy_(src.to(device=p.device, dtype=p.dtype))
                        continue
                    if whole is None:
                        whole = self.base.tensor(name, dtype=None).to(device=p.device, dtype=p.dtype)
                    if span is not None:  # a head's columns: one block, no gather
                        live = p.data.narrow(s.axis, *span)
                        saved.append((live, None, None, live.clone()))
                        live.copy_(whole.narrow(s.axis, *span))
                    else:
                        idx = s.index.to(p.device)
                        saved.append((p.data, s.axis, idx, p.data.index_select(s.axis, idx).clone()))
                        p.data.index_copy_(s.axis, idx, whole.index_select(s.axis, idx))
                del whole
        return saved

    @staticmethod
    def restore(saved: list[tuple[Any, ...]]) -> None:
        """Put the saved slices back (in reverse order, so overlapping slots end as they started)."""
        with torch.no_grad():
            for data, axis, idx, values in reversed(saved):
                if axis is None:
                    data.copy_(values)
                else:
                    data.index_copy_(axis, idx, values)

    @contextmanager
    def rewound(self, rl: "RewindList") -> Iterator[None]:
        """The live model with `rl`'s heads set back to the base, restored bit for bit on exit."""
        from analysis.edit.rewind import rewind_edits

        saved = self.apply(rewind_edits(rl, self.layout))
        try:
            yield
        finally:
            self.restore(saved)


def combination_description(comb: "Combination") -> dict[str, Any]:
    """What an interpolation sets, for the cache key: the mode and each term's fingerprint and coefficient."""
    return {"mode": comb.mode, "terms": [[ck.fingerprint, c] for ck, c in comb.terms]}


def load_combination(model: torch.nn.Module, comb: "Combination", compute_dtype: torch.dtype = torch.float32) -> int:
    """Set every live parameter to Σ cᵢθᵢ as `run_interpolation` would write it (computed in `compute_dtype`,
    cast to the stored dtype, then to the model's); a tensor missing in a term keeps the target's value.
    Returns how many parameters were set."""
    from analysis.edit.interpolate import _FLOATS, combine
    from analysis.edit.rewind import torch_dtype

    params = parameter_map(model)
    n = 0
    with torch.no_grad():
        for name in comb.target.keys():
            p = params.get(name)
            info = comb.target.info(name)
            out_dtype = torch_dtype(info.dtype)
            if p is None or out_dtype not in _FLOATS:
                continue
            if all(name in ck for ck, _ in comb.terms):
                loaders = [(lambda ck=ck: ck.tensor(name, dtype=None)) for ck, _ in comb.terms]
                value = combine(loaders, [c for _, c in comb.terms], out_dtype, compute_dtype)
            else:
                value = comb.target.tensor(name, dtype=None)
            p.data.copy_(value.to(device=p.device, dtype=p.dtype))
            n += 1
    return n

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


def _slot_runs(index: torch.Tensor) -> list[tuple[int, int]]:
    """A slot's positions as runs (start, length): one run when they are start, start+1, … (every head
    slot of a layout is), else one run per position."""
    pos = index.tolist()
    if pos and pos == list(range(pos[0], pos[0] + len(pos))):
        return [(pos[0], len(pos))]
    return [(x, 1) for x in pos]


def _merge_runs(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Runs sorted and merged where they touch or overlap, so each position is in exactly one."""
    out: list[tuple[int, int]] = []
    for a, n in sorted(runs):
        if out and a <= out[-1][0] + out[-1][1]:
            start = out[-1][0]
            out[-1] = (start, max(out[-1][1], a + n - start))
        else:
            out.append((a, n))
    return out


def _merged(slots: list["Slot"]) -> dict[int, list[tuple[int, int]]]:
    """Axis → the runs all of a tensor's slots cover along it (adjacent heads are one run; overlaps merged)."""
    by_axis: dict[int, list[tuple[int, int]]] = {}
    for s in slots:
        by_axis.setdefault(s.axis, []).extend(_slot_runs(s.index))
    return {axis: _merge_runs(runs) for axis, runs in by_axis.items() if runs}


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

    def _source(self, name: str, axis: int, runs: list[tuple[int, int]]) -> list[torch.Tensor]:
        """The base's values of each run along `axis`, as stored (views of one read). Rows are read alone
        (`Checkpoint.rows`: their covering range once, or run by run when the runs fill under half of it);
        other axes borrow the stored tensor once (`Checkpoint.borrow`)."""
        if axis != 0:  # copied from at once by the caller, so the reader's own memory serves: no whole copy
            whole = self.base.borrow(name)
            return [whole.narrow(axis, a, n) for a, n in runs]
        lo, hi = runs[0][0], runs[-1][0] + runs[-1][1]
        if 2 * sum(n for _, n in runs) < hi - lo:
            return [self.base.rows(name, a, a + n, dtype=None) for a, n in runs]
        block = self.base.rows(name, lo, hi, dtype=None)
        return [block.narrow(0, a - lo, n) for a, n in runs]

    def apply(self, edits: dict[str, list["Slot"]]) -> list[tuple[Any, ...]]:
        """Copy the slots from the base into the live parameters; returns what restores them. Per tensor and
        axis the slots are merged into runs of consecutive positions (adjacent heads are one run), the base is
        read once, and each run is saved and written through a narrow view (copy_ casts to the live dtype; no
        gather/scatter, which costs several times more on the CPU)."""
        saved: list[tuple[Any, ...]] = []
        with torch.no_grad():
            for name, slots in edits.items():
                p = self._param(name)
                shape = tuple(self.base.info(name).shape)
                if shape != tuple(p.shape):
                    raise AlignmentError(f"tensor {name} has shape {shape} in the base and {tuple(p.shape)} "
                                         "in the model", path=self.base.path, hint="rewind needs the same architecture")
                data = p.data
                plans = list(_merged(slots).items())
                views = [[data.narrow(axis, a, n) for a, n in runs] for axis, runs in plans]
                # save every run before writing any, so that restoring in reverse is exact
                saved += [(live, None, None, live.clone()) for group in views for live in group]
                for (axis, runs), group in zip(plans, views):
                    for live, src in zip(group, self._source(name, axis, runs)):
                        live.copy_(src)
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

"""The Taylor head score (SPEC §9): s_h = g_hᵀ(θ₀,h − θ_d,h), the first-order predicted change of the loss
when head h is rewound, from one forward/backward pass at θ_d. The slots are those a rewind writes (q rows
and o columns of h, their q bias entries) plus 1/G of its kv group's k/v rows and biases, as the head score
splits them. Memory: the model plus one gradient of the attention projections. The pass goes in small
groups of windows (`cancel_step`), with the engine's one protocol (`analysis.progress`): `progress` after
each group, `cancel` polled before each, so a cancel stops it within one group (one window for ≤ 8 windows);
the model's weights are never written, and its gradients and `requires_grad` flags are restored on every
way out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from analysis.eval.evaluator import EvalText
from analysis.eval.loss import LoadedModel, batch_size, mlm_mask, predicted_tokens, window_losses
from analysis.eval.patch import parameter_map
from analysis.progress import Cancel, Progress, check, never, no_progress

if TYPE_CHECKING:  # pragma: no cover
    from analysis.io.checkpoint import Checkpoint
    from analysis.model.architecture import ModelLayout


def _attention_tensors(layout: "ModelLayout") -> set[str]:
    """Normalised names of every tensor that holds a head slot (q/k/v/o weights and q/k/v biases)."""
    from analysis.model.heads import head_slots

    names = set()
    for layer in range(layout.num_layers):
        for proj in ("q", "k", "v", "o"):
            for bias in (False, True):
                names.update(s.tensor for s in head_slots(layout, layer, proj, 0, bias=bias))
    return names


CANCEL_POINTS = 8    # a text's pass is split into ≥ this many backward calls (fewer only with fewer windows)


def cancel_step(count: int, batch: int) -> int:
    """Windows per backward call: the memory batch, but small enough that `cancel` is polled ≥ CANCEL_POINTS
    times per text (per-window calls cost ≈4× on a tiny model at T=64; 4 windows still go one by one)."""
    return max(1, min(batch, -(-count // CANCEL_POINTS)))


def loss_gradient(lm: LoadedModel, texts: Sequence[EvalText], names: set[str], seed: int = 0,
                  progress: Progress = no_progress, cancel: Cancel = never) -> dict[str, torch.Tensor]:
    """∂/∂θ of the mean of the texts' losses, for the named parameters only: one backward per `cancel_step`
    windows, so `cancel` is honoured within ≤ 1/CANCEL_POINTS of a text; `progress` counts windows."""
    params = parameter_map(lm.model)
    flags = {n: p.requires_grad for n, p in params.items()}
    total = sum(et.windows.count for et in texts)
    done = 0
    try:
        for n, p in params.items():
            p.requires_grad_(n in names)
            p.grad = None
        with torch.enable_grad():
            for et in texts:
                mask = mlm_mask(et.windows.ids, seed) if lm.kind == "masked" else None
                denom = predicted_tokens(lm, et.windows, mask) * len(texts)
                step = cancel_step(et.windows.count, batch_size(lm, et.windows.tokens))
                for i in range(0, et.windows.count, step):
                    check(cancel)
                    part = window_losses(lm, et.windows.ids[i:i + step],
                                         mask[i:i + step] if mask is not None else None)
                    (part / denom).backward()
                    done += min(step, et.windows.count - i)
                    progress(done, total, "windows of the gradient pass")
        check(cancel)
        return {n: params[n].grad.detach().clone() for n in names if params[n].grad is not None}
    finally:
        for n, p in params.items():
            p.grad = None
            p.requires_grad_(flags[n])


def taylor_scores(lm: LoadedModel, base: "Checkpoint", layout: "ModelLayout", texts: Sequence[EvalText],
                  seed: int = 0, progress: Progress = no_progress, cancel: Cancel = never) -> torch.Tensor:
    """(L × H) float64 grid of s_h = Σ over h's rewind slots of g·(θ₀ − θ_d) (k/v shared 1/G per query head);
    `Cancelled` within one window (or one layer of the products) once `cancel()` says stop."""
    from analysis.model.heads import head_slots

    names = _attention_tensors(layout)
    grads = loss_gradient(lm, texts, names, seed, progress, cancel)
    params = parameter_map(lm.model)
    L, H, G = layout.num_layers, layout.num_heads, layout.num_heads // layout.num_kv_heads
    scores = torch.zeros(L, H, dtype=torch.float64)
    prod: dict[str, torch.Tensor] = {}

    def contribution(slots: list) -> float:
        total = 0.0
        for s in slots:
            if s.tensor not in prod:
                g = grads.get(s.tensor)
                if g is None:
                    prod[s.tensor] = torch.zeros_like(params[s.tensor], dtype=torch.float64)
                else:
                    b = base.tensor(s.tensor, dtype=torch.float64).to(g.device)
                    prod[s.tensor] = g.double() * (b - params[s.tensor].detach().double())
            total += float(prod[s.tensor].index_select(s.axis, s.index.to(prod[s.tensor].device)).sum())
        return total

    for layer in range(L):
        check(cancel)
        for proj in ("q", "o", "k", "v"):
            n = layout.num_kv_heads if proj in ("k", "v") else H
            for h in range(n):
                c = contribution(head_slots(layout, layer, proj, h) + head_slots(layout, layer, proj, h, bias=True))
                if proj in ("k", "v"):
                    for qh in range(h * G, (h + 1) * G):
                        scores[layer, qh] += c / G
                else:
                    scores[layer, h] += c
        prod.clear()
    return scores

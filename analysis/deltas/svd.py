"""Singular values and vectors from the float64 Gram over the smaller side (PERF-NOTES: float32 Grams destroy
the small eigenvalues every delta has). The bottom of the deltas floor: `delta` and `truncation` both build on
it, so neither imports the other's primitives (no import cycle).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def gram_eigenvalues(W: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of the float64 Gram over the smaller side, ascending, clipped at 0: σ² of W, shape (…, M)."""
    W = W.to(torch.float64)
    m, n = W.shape[-2], W.shape[-1]
    G = W @ W.transpose(-2, -1) if m <= n else W.transpose(-2, -1) @ W
    return torch.linalg.eigvalsh(G).clamp_min(0.0)


def singular_values(W: torch.Tensor) -> torch.Tensor:
    """σ of W in descending order, float64, batched over leading dims (…, M)."""
    return gram_eigenvalues(W).flip(-1).sqrt()


@dataclass(frozen=True)
class SVD:
    """Top singular triplets of W (float64, batched): U (…, m, k), S (…, k) descending, V (…, n, k)."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor


def top_svd(W: torch.Tensor, k: int | None = None) -> SVD:
    """The k largest singular triplets (all M when k is None) from the float64 Gram over the smaller side.

    The other side's vectors are W·v/σ (or Wᵀ·u/σ); vectors of σ ≈ 0 are undefined and set to zero.
    """
    W = W.to(torch.float64)
    m, n = W.shape[-2], W.shape[-1]
    M = min(m, n)
    k = M if k is None else max(1, min(int(k), M))
    wide = m <= n
    G = W @ W.transpose(-2, -1) if wide else W.transpose(-2, -1) @ W
    evals, evecs = torch.linalg.eigh(G)
    evals = evals.flip(-1)[..., :k].clamp_min(0.0)
    evecs = evecs.flip(-1)[..., :k]
    S = evals.sqrt()
    smax = S[..., :1]
    ok = S > (max(m, n) * torch.finfo(torch.float64).eps * smax).clamp_min(torch.finfo(torch.float64).tiny)
    inv = torch.where(ok, 1.0 / S.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(S))
    if wide:
        U = evecs
        V = (W.transpose(-2, -1) @ U) * inv.unsqueeze(-2)
    else:
        V = evecs
        U = (W @ V) * inv.unsqueeze(-2)
    return SVD(U=U, S=S, V=V)


def rank_for_energy(sigma_desc: torch.Tensor, level: float) -> torch.Tensor:
    """Smallest r with Σ_{i≤r} σ_i² ≥ level·Σσ² (σ descending), batched; 0 for a zero matrix."""
    e = sigma_desc.to(torch.float64).pow(2)
    total = e.sum(-1, keepdim=True)
    share = e.cumsum(-1) / total.clamp_min(torch.finfo(torch.float64).tiny)
    # tolerate the last ulp so that a rank-r delta reaches 100 % at r
    r = (share < level - 1e-12).sum(-1) + 1
    return torch.where(total.squeeze(-1) > 0, r.clamp(max=e.shape[-1]), torch.zeros_like(r))

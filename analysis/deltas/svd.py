"""Singular values and vectors from the float64 Gram over the smaller side (PERF-NOTES: float32 Grams destroy
the small eigenvalues every delta has). The bottom of the deltas floor: `delta` and `truncation` both build on
it, so neither imports the other's primitives (no import cycle).

Memory (issue 13): nothing here makes a float64 copy of a whole matrix. Grams, cross-Grams and Frobenius sums
are accumulated over slabs of the longer side, each slab upcast on its own (≤ `SLAB_BYTES`), so a 128256×4096
embedding costs its (4096 × 4096) float64 Gram (128 MiB) plus a few 32 MiB slabs, not a 4 GiB float64 copy. A
matrix that fits one slab is computed exactly as before, in one piece (same bits). What `delta` needs of the
long side's singular vectors (A1's U of a tall matrix) comes from the narrow side through the cross-Gram
(`long_side_overlap`), so no (long × M) basis is ever formed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

SLAB_BYTES = 32 << 20    # float64 bytes of one slab of the long side (also the one-piece limit)

_EPS = torch.finfo(torch.float64).eps
_TINY = torch.finfo(torch.float64).tiny


def _is_wide(W: torch.Tensor) -> bool:
    """True when the rows are the smaller side (m ≤ n): the Gram is W·Wᵀ and U is the narrow basis."""
    return W.shape[-2] <= W.shape[-1]


def _slab_bounds(W: torch.Tensor) -> Iterator[tuple[int, int]]:
    """[a, b) ranges of the longer side of W (…, m, n) whose float64 copy over the batch is ≤ SLAB_BYTES."""
    m, n = W.shape[-2], W.shape[-1]
    long_, short = (n, m) if _is_wide(W) else (m, n)
    batch = W.numel() // max(1, m * n) if m * n else 1
    step = max(1, SLAB_BYTES // (8 * max(1, batch * short)))
    for a in range(0, max(long_, 1), step):
        yield a, min(long_, a + step)


def _slab(W: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Slab [a, b) of the longer side of W, upcast to float64 (the whole W when it is one slab)."""
    if a == 0 and b >= max(W.shape[-2], W.shape[-1]):
        return W.to(torch.float64)
    return (W[..., :, a:b] if _is_wide(W) else W[..., a:b, :]).to(torch.float64)


def cross_gram(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """float64 A·Bᵀ (m ≤ n) or Aᵀ·B (m > n) of two same-shape (…, m, n) stacks: the (…, M, M) (cross-)Gram
    over the smaller side, summed over slabs of the longer side; `cross_gram(W, W)` is the Gram."""
    wide = _is_wide(A)
    G: torch.Tensor | None = None
    for a, b in _slab_bounds(A):
        x = _slab(A, a, b)
        y = x if B is A else _slab(B, a, b)
        part = x @ y.transpose(-2, -1) if wide else x.transpose(-2, -1) @ y
        G = part if G is None else G.add_(part)
    return G


def gram(W: torch.Tensor) -> torch.Tensor:
    """The float64 Gram over the smaller side, (…, M, M), accumulated over slabs (see the module docstring)."""
    return cross_gram(W, W)


def frob_inner(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """⟨A, B⟩_F over the last two dims, accumulated in float64 slab by slab (…,); B may be A (Σ a²)."""
    total: torch.Tensor | None = None
    for a, b in _slab_bounds(A):
        x = _slab(A, a, b)
        part = (x.pow(2) if B is A else x * _slab(B, a, b)).sum(dim=(-2, -1))
        total = part if total is None else total.add_(part)
    return total


def sq_frob(W: torch.Tensor) -> torch.Tensor:
    """Σ w² over the last two dims, accumulated in float64 (…,)."""
    return frob_inner(W, W)


def gram_eigenvalues(W: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of the float64 Gram over the smaller side, ascending, clipped at 0: σ² of W, shape (…, M)."""
    return torch.linalg.eigvalsh(gram(W)).clamp_min(0.0)


def singular_values(W: torch.Tensor) -> torch.Tensor:
    """σ of W in descending order, float64, batched over leading dims (…, M)."""
    return gram_eigenvalues(W).flip(-1).sqrt()


@dataclass(frozen=True)
class SVD:
    """Top singular triplets of W (float64, batched): U (…, m, k), S (…, k) descending, V (…, n, k)."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor


@dataclass(frozen=True)
class NarrowSVD:
    """The k largest singular values of W (…, k) and the singular vectors of its smaller side only,
    X (…, M, k): U when W is wide (m ≤ n), V when it is tall. The other side's vectors W·v/σ (or Wᵀ·u/σ)
    are never formed; `inv` holds the 1/σ that defines them (0 where σ ≈ 0 leaves them undefined)."""

    S: torch.Tensor
    X: torch.Tensor
    inv: torch.Tensor
    wide: bool

    def select(self, idx: torch.Tensor) -> "NarrowSVD":
        """The decompositions of the stack entries `idx` (a 1-D index on the leading dim)."""
        idx = idx.to(self.S.device)
        return NarrowSVD(self.S.index_select(0, idx), self.X.index_select(0, idx), self.inv.index_select(0, idx),
                         self.wide)

    def top(self, k: int) -> "NarrowSVD":
        """The k largest components of this decomposition."""
        return self if self.S.shape[-1] == k else NarrowSVD(self.S[..., :k], self.X[..., :k], self.inv[..., :k],
                                                            self.wide)


def narrow_svd(W: torch.Tensor, k: int | None = None, G: torch.Tensor | None = None) -> NarrowSVD:
    """The k largest singular values (all M when k is None) and the narrow side's vectors, from the float64
    Gram over the smaller side (`G`, when the caller already has `gram(W)`)."""
    m, n = W.shape[-2], W.shape[-1]
    M = min(m, n)
    k = M if k is None else max(1, min(int(k), M))
    evals, evecs = torch.linalg.eigh(gram(W) if G is None else G)
    S = evals.flip(-1)[..., :k].clamp_min(0.0).sqrt()
    X = evecs.flip(-1)[..., :k]
    smax = S[..., :1]
    ok = S > (max(m, n) * _EPS * smax).clamp_min(_TINY)
    inv = torch.where(ok, 1.0 / S.clamp_min(_TINY), torch.zeros_like(S))
    return NarrowSVD(S=S, X=X, inv=inv, wide=m <= n)


def long_side_vectors(W: torch.Tensor, s: NarrowSVD) -> torch.Tensor:
    """The long side's singular vectors W·V/σ (tall) or Wᵀ·U/σ (wide), float64 (…, max(m, n), k), slab by
    slab — only for callers that need the basis itself (it is long × k; A1 does not need it)."""
    parts = []
    for a, b in _slab_bounds(W):
        x = _slab(W, a, b)
        parts.append(((x.transpose(-2, -1) if s.wide else x) @ s.X) * s.inv.unsqueeze(-2))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)


def top_svd(W: torch.Tensor, k: int | None = None) -> SVD:
    """The k largest singular triplets (all M when k is None) from the float64 Gram over the smaller side.

    The other side's vectors are W·v/σ (or Wᵀ·u/σ); vectors of σ ≈ 0 are undefined and set to zero.
    """
    s = narrow_svd(W, k)
    other = long_side_vectors(W, s)
    return SVD(U=s.X, S=s.S, V=other) if s.wide else SVD(U=other, S=s.S, V=s.X)


def long_side_overlap(base: NarrowSVD, target: NarrowSVD, C: torch.Tensor) -> torch.Tensor:
    """|A₀ᵀ A_d| of the long-side bases (…, k₀, k_d) without forming them, from the cross-Gram C =
    `cross_gram(W₀, W_d)`: A = W·X/σ (tall; C = W₀ᵀW_d) or Wᵀ·X/σ (wide; C = W₀W_dᵀ), so
    A₀ᵀA_d = diag(1/σ₀) X₀ᵀ C X_d diag(1/σ_d) — (M × M) work instead of a (long × M) basis per side."""
    core = base.X.transpose(-2, -1) @ C @ target.X
    return (base.inv.unsqueeze(-1) * core * target.inv.unsqueeze(-2)).abs()


def rank_for_energy(sigma_desc: torch.Tensor, level: float) -> torch.Tensor:
    """Smallest r with Σ_{i≤r} σ_i² ≥ level·Σσ² (σ descending), batched; 0 for a zero matrix."""
    e = sigma_desc.to(torch.float64).pow(2)
    total = e.sum(-1, keepdim=True)
    share = e.cumsum(-1) / total.clamp_min(torch.finfo(torch.float64).tiny)
    # tolerate the last ulp so that a rank-r delta reaches 100 % at r
    r = (share < level - 1e-12).sum(-1) + 1
    return torch.where(total.squeeze(-1) > 0, r.clamp(max=e.shape[-1]), torch.zeros_like(r))

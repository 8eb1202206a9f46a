"""Names and defaults of the delta engine that planning and cached reruns need without torch (issue 13):
the attention projections and A3's default k. `analysis.deltas.delta` and `.agreement` re-export them."""

from __future__ import annotations

PROJECTIONS: tuple[str, ...] = ("q", "k", "v", "o")
KV_PROJECTIONS: frozenset[str] = frozenset({"k", "v"})
DEFAULT_A3_K = 8          # top-k left singular vectors for A3 (clamped to the matrix's smaller side)

"""GGUF block dequantisation in torch, bit-identical to the `gguf` package's numpy code.

`gguf.quants.dequantize` walks a tensor 16 rows at a time through numpy splits, reshapes and
concatenations: on one core, 1.56 CPU s for the SmolLM2-135M Q4_1 file's blocks. The same arithmetic
done once over the whole block array (integer unpacking into a uint8 buffer, one cast to float32, then
the scale multiply and the minimum add or subtract as separate in-place float32 ops, in gguf's order)
rounds exactly as numpy does — IEEE float32 multiply and add, no fused multiply-add — so every value
has the same bits, at 0.42 CPU s (benchmarks/gguf_dequant.py). Each function takes the blocks as an (n, bytes
per block) uint8 tensor and returns (n, elements per block) float32; the layouts are ggml's
(ggml-common.h), as gguf's `quants.py` decodes them. Types not listed fall back to gguf's code.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

QK_K = 256                                   # elements of a K-quant super-block


def _f16(blocks: torch.Tensor, at: int, count: int = 1) -> torch.Tensor:
    """`count` little-endian float16 fields from byte `at` of every block, as (n, count, 1) float32."""
    return blocks[:, at:at + 2 * count].contiguous().view(torch.float16).float().unsqueeze(-1)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, g, k) packed bytes -> (n, g, 2, k) uint8: the low nibbles, then the high ones (ggml's order)."""
    out = torch.empty((*qs.shape[:-1], 2, qs.shape[-1]), dtype=torch.uint8)
    torch.bitwise_and(qs, 0x0F, out=out[..., 0, :])
    torch.bitwise_right_shift(qs, 4, out=out[..., 1, :])
    return out


def _high_bits(qh: torch.Tensor) -> torch.Tensor:
    """(n, b) bytes -> (n, 8, b) uint8: bit j of byte k at [j, k], as the value's bit 4 (shifted left by 4)."""
    shifts = torch.arange(8, dtype=torch.uint8).view(1, 8, 1)
    return ((qh.unsqueeze(1) >> shifts) & 1) << 4


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    """Q4_0 (18 bytes): float16 d, 32 nibbles q; x = d · (q − 8)."""
    q = _nibbles(b[:, 2:].reshape(-1, 1, 16)).view(-1, 32).float()
    return q.sub_(8).mul_(_f16(b, 0)[:, 0])


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    """Q4_1 (20 bytes): float16 d and m, 32 nibbles q; x = d · q + m."""
    dm = _f16(b, 0, 2)
    q = _nibbles(b[:, 4:].reshape(-1, 1, 16)).view(-1, 32).float()
    return q.mul_(dm[:, 0]).add_(dm[:, 1])


def _q5_bits(b: torch.Tensor, qh_at: int) -> torch.Tensor:
    """The 32 five-bit values of a Q5_0/Q5_1 block: nibbles from byte qh_at + 4, bit 4 from the uint32 at qh_at."""
    q = _nibbles(b[:, qh_at + 4:].reshape(-1, 1, 16)).view(-1, 32)
    high = _high_bits(b[:, qh_at:qh_at + 4])                       # (n, 8, 4): bit j of byte k at [j, k]
    return q.bitwise_or_(high.transpose(1, 2).reshape(-1, 32))       # element 8k + j ← bit j of byte k


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    """Q5_0 (22 bytes): float16 d, 32 high bits, 32 nibbles; x = d · (q − 16)."""
    return _q5_bits(b, 2).float().sub_(16).mul_(_f16(b, 0)[:, 0])


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    """Q5_1 (24 bytes): float16 d and m, 32 high bits, 32 nibbles; x = d · q + m."""
    dm = _f16(b, 0, 2)
    return _q5_bits(b, 4).float().mul_(dm[:, 0]).add_(dm[:, 1])


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    """Q8_0 (34 bytes): float16 d, 32 int8 q; x = q · d."""
    return b[:, 2:].view(torch.int8).float().mul_(_f16(b, 0)[:, 0])


def _k_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: the 8 six-bit scales and minimums packed in bytes 4..15 (gguf's Q4_K.get_scale_min)."""
    s = b[:, 4:16].reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


def _k_affine(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """x = (d · sc) · q − (dmin · m) per 32-element sub-block of a Q4_K/Q5_K super-block ((n, 8, 32) q)."""
    sc, mn = _k_scales(b)
    dd = _f16(b, 0, 2)                                               # (n, 2, 1): d, dmin
    scale = (dd[:, 0] * sc.float()).unsqueeze(-1)
    low = (dd[:, 1] * mn.float()).unsqueeze(-1)
    return q.float().mul_(scale).sub_(low).view(-1, QK_K)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    """Q4_K (144 bytes): float16 d, dmin, 12 bytes of scales, 256 nibbles (4 groups of 32 bytes)."""
    return _k_affine(b, _nibbles(b[:, 16:].reshape(-1, 4, 32)).view(-1, 8, 32))


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    """Q5_K (176 bytes): as Q4_K, with 32 bytes of high bits (bit j of byte k: element 32j + k) before the nibbles."""
    q = _nibbles(b[:, 48:].reshape(-1, 4, 32)).view(-1, 8, 32)
    return _k_affine(b, q.bitwise_or_(_high_bits(b[:, 16:48])))


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    """Q6_K (210 bytes): 128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 scales, float16 d; x = (d·s)·(q − 32)."""
    low = _nibbles(b[:, :128].reshape(-1, 2, 64)).view(-1, 2, 4, 32)    # (n, half, 2 nibbles × 2, 32)
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8).view(1, 1, 4, 1)
    high = (b[:, 128:192].reshape(-1, 2, 1, 32) >> shifts) & 3         # (n, half, 4 bit pairs, 32)
    q = low.bitwise_or_(high << 4).view(-1, 16, 16)
    scale = (_f16(b, 208)[:, 0] * b[:, 192:208].view(torch.int8).float()).unsqueeze(-1)
    return q.float().sub_(32).mul_(scale).view(-1, QK_K)


# ggml type name -> (bytes per block, dequantiser)
DEQUANTISERS: dict[str, tuple[int, Callable[[torch.Tensor], torch.Tensor]]] = {
    "Q4_0": (18, _q4_0), "Q4_1": (20, _q4_1), "Q5_0": (22, _q5_0), "Q5_1": (24, _q5_1), "Q8_0": (34, _q8_0),
    "Q4_K": (144, _q4_k), "Q5_K": (176, _q5_k), "Q6_K": (210, _q6_k),
}


def dequantize(raw: np.ndarray, qtype: str) -> np.ndarray | None:
    """float32 values of uint8 blocks (last axis = a row's bytes), as gguf.quants.dequantize gives them;
    None for a type without a torch dequantiser here (the caller falls back to gguf's code)."""
    if qtype not in DEQUANTISERS:
        return None
    size, fn = DEQUANTISERS[qtype]
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    if raw.size == 0 or raw.shape[-1] % size:
        return None                                    # gguf's code raises its own error for these
    if not raw.flags.writeable:                        # torch wants writable memory; nothing here writes it
        raw = raw.copy()
    values = fn(torch.from_numpy(raw).view(-1, size))
    return values.numpy().reshape(*raw.shape[:-1], raw.shape[-1] // size * values.shape[-1])

"""GGUF block dequantisation in numpy, bit-identical to the `gguf` package's own numpy code.

`gguf.quants.dequantize` walks a tensor 16 rows at a time through numpy splits, reshapes and
concatenations: on one core, 1.56 CPU s for the SmolLM2-135M Q4_1 file's blocks. The same arithmetic
done once over the whole block array (integer unpacking into a uint8 buffer, one cast to float32, then
the scale multiply and the minimum add or subtract as separate in-place float32 ops, in gguf's order)
rounds exactly as gguf's does — IEEE float32 multiply and add, no fused multiply-add — so every value
has the same bits, in a fraction of the time (benchmarks/gguf_dequant.py), and without torch (issue 13:
a cold CPU scan imports none). Each function takes the blocks as an (n, bytes per block) uint8 array and
returns (n, elements per block) float32; the layouts are ggml's (ggml-common.h), as gguf's `quants.py`
decodes them. Types not listed fall back to gguf's code.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

QK_K = 256                                   # elements of a K-quant super-block
F32 = np.float32


def _f16(blocks: np.ndarray, at: int, count: int = 1) -> np.ndarray:
    """`count` little-endian float16 fields from byte `at` of every block, as (n, count, 1) float32."""
    return blocks[:, at:at + 2 * count].copy().view("<f2").astype(F32)[..., None]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, g, k) packed bytes -> (n, g, 2, k) uint8: the low nibbles, then the high ones (ggml's order)."""
    out = np.empty((*qs.shape[:-1], 2, qs.shape[-1]), dtype=np.uint8)
    np.bitwise_and(qs, 0x0F, out=out[..., 0, :])
    np.right_shift(qs, 4, out=out[..., 1, :])
    return out


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """(n, b) bytes -> (n, 8, b) uint8: bit j of byte k at [j, k], as the value's bit 4 (shifted left by 4)."""
    shifts = np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    return ((qh[:, None, :] >> shifts) & 1) << 4


def _q4_0(b: np.ndarray) -> np.ndarray:
    """Q4_0 (18 bytes): float16 d, 32 nibbles q; x = d · (q − 8)."""
    q = _nibbles(b[:, 2:].reshape(-1, 1, 16)).reshape(-1, 32).astype(F32)
    q -= 8
    q *= _f16(b, 0)[:, 0]
    return q


def _q4_1(b: np.ndarray) -> np.ndarray:
    """Q4_1 (20 bytes): float16 d and m, 32 nibbles q; x = d · q + m."""
    dm = _f16(b, 0, 2)
    q = _nibbles(b[:, 4:].reshape(-1, 1, 16)).reshape(-1, 32).astype(F32)
    q *= dm[:, 0]
    q += dm[:, 1]
    return q


def _q5_bits(b: np.ndarray, qh_at: int) -> np.ndarray:
    """The 32 five-bit values of a Q5_0/Q5_1 block: nibbles from byte qh_at + 4, bit 4 from the uint32 at qh_at."""
    q = _nibbles(b[:, qh_at + 4:].reshape(-1, 1, 16)).reshape(-1, 32)
    high = _high_bits(b[:, qh_at:qh_at + 4])                        # (n, 8, 4): bit j of byte k at [j, k]
    q |= high.transpose(0, 2, 1).reshape(-1, 32)                     # element 8k + j ← bit j of byte k
    return q


def _q5_0(b: np.ndarray) -> np.ndarray:
    """Q5_0 (22 bytes): float16 d, 32 high bits, 32 nibbles; x = d · (q − 16)."""
    q = _q5_bits(b, 2).astype(F32)
    q -= 16
    q *= _f16(b, 0)[:, 0]
    return q


def _q5_1(b: np.ndarray) -> np.ndarray:
    """Q5_1 (24 bytes): float16 d and m, 32 high bits, 32 nibbles; x = d · q + m."""
    dm = _f16(b, 0, 2)
    q = _q5_bits(b, 4).astype(F32)
    q *= dm[:, 0]
    q += dm[:, 1]
    return q


def _q8_0(b: np.ndarray) -> np.ndarray:
    """Q8_0 (34 bytes): float16 d, 32 int8 q; x = q · d."""
    q = b[:, 2:].view(np.int8).astype(F32)
    q *= _f16(b, 0)[:, 0]
    return q


def _k_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: the 8 six-bit scales and minimums packed in bytes 4..15 (gguf's Q4_K.get_scale_min)."""
    s = b[:, 4:16].reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=1)
    return sc, mn


def _k_affine(b: np.ndarray, q: np.ndarray) -> np.ndarray:
    """x = (d · sc) · q − (dmin · m) per 32-element sub-block of a Q4_K/Q5_K super-block ((n, 8, 32) q)."""
    sc, mn = _k_scales(b)
    dd = _f16(b, 0, 2)                                               # (n, 2, 1): d, dmin
    x = q.astype(F32)
    x *= (dd[:, 0] * sc.astype(F32))[..., None]
    x -= (dd[:, 1] * mn.astype(F32))[..., None]
    return x.reshape(-1, QK_K)


def _q4_k(b: np.ndarray) -> np.ndarray:
    """Q4_K (144 bytes): float16 d, dmin, 12 bytes of scales, 256 nibbles (4 groups of 32 bytes)."""
    return _k_affine(b, _nibbles(b[:, 16:].reshape(-1, 4, 32)).reshape(-1, 8, 32))


def _q5_k(b: np.ndarray) -> np.ndarray:
    """Q5_K (176 bytes): as Q4_K, with 32 bytes of high bits (bit j of byte k: element 32j + k) before the nibbles."""
    q = _nibbles(b[:, 48:].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    q |= _high_bits(b[:, 16:48])
    return _k_affine(b, q)


def _q6_k(b: np.ndarray) -> np.ndarray:
    """Q6_K (210 bytes): 128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 scales, float16 d; x = (d·s)·(q − 32)."""
    low = _nibbles(b[:, :128].reshape(-1, 2, 64)).reshape(-1, 2, 4, 32)   # (n, half, 2 nibbles × 2, 32)
    shifts = np.arange(0, 8, 2, dtype=np.uint8).reshape(1, 1, 4, 1)
    high = (b[:, 128:192].reshape(-1, 2, 1, 32) >> shifts) & 3             # (n, half, 4 bit pairs, 32)
    low |= high << 4
    x = low.reshape(-1, 16, 16).astype(F32)
    x -= 32
    x *= (_f16(b, 208)[:, 0] * b[:, 192:208].view(np.int8).astype(F32))[..., None]
    return x.reshape(-1, QK_K)


# ggml type name -> (bytes per block, dequantiser)
DEQUANTISERS: dict[str, tuple[int, Callable[[np.ndarray], np.ndarray]]] = {
    "Q4_0": (18, _q4_0), "Q4_1": (20, _q4_1), "Q5_0": (22, _q5_0), "Q5_1": (24, _q5_1), "Q8_0": (34, _q8_0),
    "Q4_K": (144, _q4_k), "Q5_K": (176, _q5_k), "Q6_K": (210, _q6_k),
}


def dequantize(raw: np.ndarray, qtype: str) -> np.ndarray | None:
    """float32 values of uint8 blocks (last axis = a row's bytes), as gguf.quants.dequantize gives them, in new
    memory; None for a type without a dequantiser here (the caller falls back to gguf's code)."""
    if qtype not in DEQUANTISERS:
        return None
    size, fn = DEQUANTISERS[qtype]
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    if raw.size == 0 or raw.shape[-1] % size:
        return None                                    # gguf's code raises its own error for these
    values = fn(raw.reshape(-1, size))
    return values.reshape(*raw.shape[:-1], raw.shape[-1] // size * values.shape[-1])

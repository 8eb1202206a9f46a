"""Hostile and broken GGUF input: truncated files, wrong magic, versions, counts, types, architectures,
split files and folders. Each reaches the user as ONE stderr line naming the file and the fault, exit 1,
no traceback, and the input file is unchanged (sha256 before and after)."""

from __future__ import annotations

import hashlib
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import llama_checkpoint
from gguf_models import write_llama_gguf, write_raw_gguf

from analysis.errors import CheckpointError
from analysis.io.readers.gguf_file import GGUFFile
from diffract_tui.cli import main

SMALL = dict(layers=1, hidden=64, heads=4, kv_heads=2, intermediate=96, vocab=50)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def _fails(capsys, path: Path, *fragments: str) -> str:
    """`diffract-tui info PATH`: exit 1, one stderr line with the path and every fragment, the file unchanged."""
    before = _sha(path)
    code = main(["info", str(path)])
    out, err = capsys.readouterr()
    assert code == 1, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffract-tui: error: ") and "Traceback" not in err, err
    for fragment in (str(path), *fragments):
        assert fragment in lines[0], (fragment, lines[0])
    assert _sha(path) == before
    return lines[0]


@pytest.fixture
def good(tmp_path) -> Path:
    config, tensors = llama_checkpoint(**SMALL)
    return write_llama_gguf(tmp_path / "good.gguf", config, tensors, "Q8_0")


def _patched(good: Path, name: str, at: int, fmt: str, value: int) -> Path:
    """A copy of `good` with one little-endian field overwritten."""
    data = bytearray(good.read_bytes())
    struct.pack_into(fmt, data, at, value)
    out = good.with_name(name)
    out.write_bytes(bytes(data))
    return out


def _type_field(path: Path, tensor: str) -> int:
    """Byte offset of the ggml type of `tensor` in the tensor table."""
    data = path.read_bytes()
    name = tensor.encode()
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    (n_dims,) = struct.unpack_from("<I", data, at)
    return at + 4 + 8 * n_dims


def test_empty_and_too_short_files(capsys, tmp_path):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    _fails(capsys, empty, "truncated GGUF file: 0 bytes", "download or convert it again")
    short = tmp_path / "short.gguf"
    short.write_bytes(b"GGUF\x03\x00\x00\x00")
    _fails(capsys, short, "truncated GGUF file: 8 bytes, too short for the 24-byte header")


def test_bad_magic(capsys, good):
    bad = good.with_name("bad.gguf")
    bad.write_bytes(b"GGML" + good.read_bytes()[4:])
    _fails(capsys, bad, "not a GGUF file: it starts with b'GGML'")


def test_truncated_in_the_header_metadata_or_tensor_table(capsys, good):
    data = good.read_bytes()
    header = good.with_name("cut_header.gguf")
    header.write_bytes(data[:30])
    _fails(capsys, header, "truncated or malformed GGUF file: header claims 12 tensors and 11 metadata entries, "
                           "more than fit in its 30 bytes")
    for name, keep in (("metadata", data.index(b"tok150")), ("table", data.index(b"blk.0.attn_k.weight") + 4)):
        cut = good.with_name(f"cut_{name}.gguf")
        cut.write_bytes(data[:keep])
        _fails(capsys, cut, "truncated GGUF file: ", "runs past the end of the file")


def test_truncated_in_the_tensor_data(capsys, good):
    cut = good.with_name("cut_data.gguf")
    cut.write_bytes(good.read_bytes()[:-100])
    _fails(capsys, cut, "data of tensor", "past the end of the file")


def test_version_1_and_big_endian(capsys, good):
    _fails(capsys, _patched(good, "v1.gguf", 4, "<I", 1), "GGUF version 1 is not supported")
    _fails(capsys, _patched(good, "be.gguf", 4, ">I", 3), "big-endian GGUF file is not supported")


def test_absurd_counts(capsys, good):
    _fails(capsys, _patched(good, "many.gguf", 8, "<Q", 2 ** 62), f"header claims {2 ** 62} tensors")
    _fails(capsys, _patched(good, "kv.gguf", 16, "<Q", 2 ** 40), f"and {2 ** 40} metadata entries, more than fit")


def test_unknown_and_unsupported_types_name_the_tensor(capsys, good, tmp_path):
    at = _type_field(good, "blk.0.attn_q.weight")
    _fails(capsys, _patched(good, "t99.gguf", at, "<I", 99), "tensor 'blk.0.attn_q.weight' is stored as type 99")
    _fails(capsys, _patched(good, "iq.gguf", at, "<I", 16), "tensor 'blk.0.attn_q.weight' is stored as IQ2_XXS",
           "supported: F32, F16, BF16")
    # a real file in a type the gguf package writes but we do not read
    config, tensors = llama_checkpoint(**SMALL)
    mx = write_llama_gguf(tmp_path / "mx.gguf", config, tensors, "MXFP4")
    _fails(capsys, mx, "is stored as MXFP4, which diffract-tui cannot dequantise")


def test_bad_dimension_count_and_rows_not_whole_blocks(capsys, good):
    at = _type_field(good, "blk.0.attn_v.weight")
    dims_at = at - 8 * 2 - 4   # n_dims, then ne[0], ne[1], then the type
    _fails(capsys, _patched(good, "dims.gguf", dims_at, "<I", 7), "tensor 'blk.0.attn_v.weight' has 7 dimensions")
    _fails(capsys, _patched(good, "rows.gguf", at - 16, "<Q", 48), "rows of 48 are not whole Q8_0 blocks")


def test_non_utf8_tensor_name(capsys, good):
    data = bytearray(good.read_bytes())
    at = data.index(b"blk.0.attn_q.weight")
    data[at] = 0xFF
    bad = good.with_name("name.gguf")
    bad.write_bytes(bytes(data))
    _fails(capsys, bad, "malformed GGUF file: tensor name is not UTF-8")


def test_unsupported_architecture(capsys, tmp_path):
    config, tensors = llama_checkpoint(**SMALL)
    path = write_llama_gguf(tmp_path / "qwen.gguf", config, tensors, "F32", arch="qwen2")
    _fails(capsys, path, "GGUF architecture 'qwen2' is not supported (supported: llama)")


def test_heads_that_do_not_divide_the_q_rows(capsys, tmp_path):
    config, tensors = llama_checkpoint(**SMALL)
    path = write_llama_gguf(tmp_path / "heads.gguf", {**config, "num_attention_heads": 5}, tensors, "F32",
                            permute=False)
    _fails(capsys, path, "tensor 'blk.0.attn_q.weight' has 64 rows, not a multiple of 2 × 5 heads")


def test_one_part_of_a_split_file(capsys, tmp_path):
    config, tensors = llama_checkpoint(**SMALL)
    path = write_llama_gguf(tmp_path / "m-00001-of-00002.gguf", config, tensors, "F32",
                            extra={"split.count": 2, "split.no": 0})
    _fails(capsys, path, "part 1 of a GGUF split into 2 files", "llama-gguf-split --merge")


def test_folder_with_two_gguf_files_or_a_gguf_and_bin_files(capsys, tmp_path, good):
    (tmp_path / "other.gguf").write_bytes(good.read_bytes())
    _fails(capsys, tmp_path, "folder holds 2 .gguf files", "point at the weight file you mean")
    (tmp_path / "other.gguf").unlink()
    (tmp_path / "training_args.bin").write_bytes(b"not weights")
    _fails(capsys, tmp_path, "folder holds a .gguf file and .bin files", "point at the weight file you mean")


def test_a_file_that_changes_after_opening(good):
    reader = GGUFFile(good)
    reader.close()
    with open(good, "ab") as f:
        f.write(b"\0" * 64)
    with pytest.raises(CheckpointError, match="changed size since it was opened"):
        reader.tensor("model.layers.0.self_attn.q_proj.weight")


def test_without_the_gguf_package_a_quantised_read_is_one_clear_error(good, monkeypatch, tmp_path):
    k_quant = write_raw_gguf(tmp_path / "q2k.gguf", {"x.weight": (np.zeros((2, 2 * 84), np.uint8), "Q2_K")})
    reader, q2k = GGUFFile(good), GGUFFile(k_quant)   # opening never needs the package
    with_gguf = reader.tensor("model.layers.0.self_attn.q_proj.weight")
    monkeypatch.setitem(sys.modules, "gguf", None)
    monkeypatch.setitem(sys.modules, "gguf.quants", None)
    with pytest.raises(CheckpointError, match="needs the gguf package.*pip install gguf"):
        q2k.tensor("x.weight")                        # Q2_K is dequantised by gguf's code only
    # Q8_0 (and the other types of gguf_dequant) are dequantised without the package, to the same values
    assert torch.equal(reader.tensor("model.layers.0.self_attn.q_proj.weight"), with_gguf)
    assert reader.tensor("model.norm.weight").dtype == torch.float32   # F32 reads need no package


def test_writing_into_a_read_tensor_never_reaches_the_file(tmp_path):
    config, tensors = llama_checkpoint(**SMALL)
    path = write_llama_gguf(tmp_path / "f32.gguf", config, tensors, "F32")
    before = _sha(path)
    reader = GGUFFile(path)
    view = reader.tensor("model.layers.0.mlp.up_proj.weight")   # a view of the (copy-on-write) map
    view.fill_(7.0)
    reader.close()
    assert _sha(path) == before
    assert torch.equal(GGUFFile(path).tensor("model.layers.0.mlp.up_proj.weight"),
                       tensors["model.layers.0.mlp.up_proj.weight"])


def test_missing_head_count_is_refused_not_guessed(capsys, tmp_path, good):
    data = bytearray(good.read_bytes())
    at = data.index(b"llama.attention.head_count\x04")   # key, then its uint32 value type
    data[at + len(b"llama.attention.")] = ord("X")         # rename the key: the file no longer has a head count
    bad = good.with_name("noheads.gguf")
    bad.write_bytes(bytes(data))
    _fails(capsys, bad, "GGUF metadata llama.attention.head_count is missing or not a positive integer")


def test_two_tensors_with_one_hf_name(capsys, good):
    data = bytearray(good.read_bytes())
    name = b"token_embd.weight"
    at = data.index(struct.pack("<Q", len(name)) + name) + 8
    data[at:at + len(name)] = b"model.norm.weight"     # same length; kept as is, it collides with output_norm
    bad = good.with_name("twice.gguf")
    bad.write_bytes(bytes(data))
    _fails(capsys, bad, "tensors 'model.norm.weight' and 'output_norm.weight' are both model.norm.weight")

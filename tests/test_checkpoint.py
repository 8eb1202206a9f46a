"""Checkpoint reading (SPEC §1): formats, key normalisation, bit-exact and upcast reads, row reads,
memory-mapped pickles, fingerprints. Oracles: the tensors written by the test itself."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from conftest import llama_checkpoint, write_safetensors, write_sharded_safetensors

from analysis.io.checkpoint import normalise_key, open_checkpoint


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.layers.0.self_attn.q_proj.weight": torch.randn(12, 8, generator=g),
        "model.layers.10.mlp.up_proj.weight": torch.randn(6, 8, generator=g),
        "model.layers.2.mlp.up_proj.weight": torch.randn(6, 8, generator=g),
        "model.norm.weight": torch.randn(8, generator=g),
        "lm_head.weight": torch.randn(5, 8, generator=g),
        "model.step": torch.tensor([7, 9], dtype=torch.int64),
    }


def test_normalise_key_strips_exactly_one_wrapper_prefix():
    assert normalise_key("model.layers.3.self_attn.q_proj.weight") == "layers.3.self_attn.q_proj.weight"
    assert normalise_key("bert.encoder.layer.0.attention.self.query.weight") == "encoder.layer.0.attention.self.query.weight"
    assert normalise_key("transformer.h.0.attn.c_attn.weight") == "h.0.attn.c_attn.weight"
    assert normalise_key("gpt_neox.layers.0.attention.query_key_value.weight") == "layers.0.attention.query_key_value.weight"
    assert normalise_key("roberta.embeddings.word_embeddings.weight") == "embeddings.word_embeddings.weight"
    assert normalise_key("model.model.x") == "model.x"  # one prefix only
    assert normalise_key("lm_head.weight") == "lm_head.weight"
    assert normalise_key("cls.predictions.bias") == "cls.predictions.bias"


def test_single_safetensors_folder_metadata_values_and_aux_files(tmp_path):
    src = _tensors()
    folder = tmp_path / "m"
    write_safetensors(folder / "model.safetensors", src)
    for aux in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "vocab.txt", "merges.txt", "tokenizer.model"):
        (folder / aux).write_text("{}")
    (folder / "training_args.bin").write_bytes(b"not weights")  # neither weights nor aux
    (folder / "README.md").write_text("hi")

    ckpt = open_checkpoint(folder)
    assert ckpt.path == folder.resolve() and ckpt.label == "m"
    assert ckpt.config == {}
    # natural order: layers.2 before layers.10; prefixes stripped; lm_head kept
    assert ckpt.keys() == ["layers.0.self_attn.q_proj.weight", "layers.2.mlp.up_proj.weight",
                           "layers.10.mlp.up_proj.weight", "lm_head.weight", "norm.weight", "step"]
    info = ckpt.info("layers.0.self_attn.q_proj.weight")
    assert (info.raw_name, info.shape, info.dtype, info.nbytes) == (
        "model.layers.0.self_attn.q_proj.weight", (12, 8), "float32", 12 * 8 * 4)
    assert info.file == (folder / "model.safetensors").resolve()
    assert ckpt.info("step").dtype == "int64"
    assert "lm_head.weight" in ckpt and "model.lm_head.weight" not in ckpt
    assert ckpt.weight_files == [(folder / "model.safetensors").resolve()]
    assert [p.name for p in ckpt.aux_files] == sorted(["config.json", "generation_config.json", "merges.txt",
                                                       "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
                                                       "tokenizer_config.json", "vocab.txt"])
    for raw, t in src.items():
        assert torch.equal(ckpt.tensor(normalise_key(raw), dtype=None), t)
    with pytest.raises(KeyError):
        ckpt.info("nope")


def test_config_is_read_from_the_folder(make_llama_folder):
    folder = make_llama_folder("cfg")
    ckpt = open_checkpoint(folder)
    assert ckpt.config["model_type"] == "llama" and ckpt.config["num_attention_heads"] == 4


def test_sharded_safetensors_with_index(tmp_path):
    config, src = llama_checkpoint(layers=3)
    folder = write_sharded_safetensors(tmp_path / "sharded", src, shards=3, config=config)
    ckpt = open_checkpoint(folder)
    assert len(ckpt.weight_files) == 3
    assert [p.name for p in ckpt.weight_files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert len(ckpt.keys()) == len(src) == 3 + 3 * 9
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    for raw, t in src.items():
        name = normalise_key(raw)
        assert ckpt.info(name).file.name == index[raw]  # each tensor comes from the shard the index names
        assert torch.equal(ckpt.tensor(name), t)
    # opening the index file itself gives the same checkpoint contents
    assert open_checkpoint(folder / "model.safetensors.index.json").keys() == ckpt.keys()


def test_bf16_upcast_equals_fp32_source_rounded_to_bf16(tmp_path):
    src = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    write_safetensors(tmp_path / "b.safetensors", {"w": src.to(torch.bfloat16)})
    ckpt = open_checkpoint(tmp_path / "b.safetensors")
    assert ckpt.info("w").dtype == "bfloat16" and ckpt.info("w").nbytes == 64 * 32 * 2
    up = ckpt.tensor("w")
    assert up.dtype == torch.float32
    assert torch.equal(up, src.to(torch.bfloat16).to(torch.float32))
    assert not torch.equal(up, src)  # bf16 rounding really happened (8-bit mantissa)
    assert (up - src).abs().max() <= src.abs().max() * 2 ** -8
    stored = ckpt.tensor("w", dtype=None)
    assert stored.dtype == torch.bfloat16
    assert torch.equal(stored.view(torch.int16), src.to(torch.bfloat16).view(torch.int16))  # bit-exact
    assert ckpt.tensor("w", dtype=torch.float64).dtype == torch.float64


@pytest.mark.parametrize("fmt", ["safetensors", "zip", "legacy"])
def test_results_are_owned_by_the_caller(tmp_path, fmt):
    """Zeroing a returned tensor (as stored, or same dtype) must not change what the next read returns."""
    src = {"w": torch.arange(12.0).reshape(4, 3), "h": torch.arange(6.0).to(torch.bfloat16)}
    if fmt == "safetensors":
        path = write_safetensors(tmp_path / "o.safetensors", src)
    else:
        path = tmp_path / "o.bin"
        torch.save(src, path, _use_new_zipfile_serialization=(fmt == "zip"))
    ckpt = open_checkpoint(path)
    for read in (lambda: ckpt.tensor("w"), lambda: ckpt.tensor("w", dtype=None), lambda: ckpt.rows("w", 1, 3),
                 lambda: ckpt.tensor("h", dtype=None), lambda: ckpt.rows("h", 0, 6, dtype=torch.bfloat16)):
        read().zero_()
    assert torch.equal(ckpt.tensor("w"), src["w"]) and torch.equal(ckpt.tensor("h", dtype=None), src["h"])


@pytest.mark.parametrize("fmt", ["safetensors", "zip", "legacy"])
def test_rows_equal_slicing_the_full_tensor(tmp_path, fmt):
    src = {"w": torch.randn(40, 16, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16),
           "b": torch.arange(40, dtype=torch.float32)}
    if fmt == "safetensors":
        path = write_safetensors(tmp_path / "r.safetensors", src)
    else:
        path = tmp_path / "r.bin"
        torch.save(src, path, _use_new_zipfile_serialization=(fmt == "zip"))
    ckpt = open_checkpoint(path)
    full = ckpt.tensor("w", dtype=None)
    for start, stop in [(0, 40), (0, 1), (8, 16), (39, 40), (5, 5)]:
        part = ckpt.rows("w", start, stop, dtype=None)
        assert part.dtype == torch.bfloat16 and torch.equal(part, full[start:stop])
        assert torch.equal(ckpt.rows("w", start, stop), full[start:stop].float())
    assert torch.equal(ckpt.rows("b", 3, 7), torch.tensor([3.0, 4.0, 5.0, 6.0]))
    with pytest.raises(IndexError):
        ckpt.rows("w", 30, 41)


def test_pytorch_bin_single_and_sharded(tmp_path):
    config, src = llama_checkpoint(layers=2)
    single = tmp_path / "single"
    single.mkdir()
    torch.save(src, single / "pytorch_model.bin")
    (single / "config.json").write_text(json.dumps(config))
    ckpt = open_checkpoint(single)
    assert ckpt.weight_files == [(single / "pytorch_model.bin").resolve()]
    assert ckpt.config["model_type"] == "llama"

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    names = list(src)
    weight_map = {}
    for i in range(2):
        shard = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: src[k] for k in names[i::2]}, sharded / shard)
        weight_map.update({k: shard for k in names[i::2]})
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ck2 = open_checkpoint(sharded)
    assert len(ck2.weight_files) == 2
    assert ck2.keys() == ckpt.keys()
    for raw, t in src.items():
        name = normalise_key(raw)
        assert ck2.info(name).file.name == weight_map[raw]
        assert torch.equal(ckpt.tensor(name), t) and torch.equal(ck2.tensor(name), t)


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process's memory maps of `path` (Linux /proc/self/maps)."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith(str(path)):
                lo, hi = line.split()[0].split("-")
                out.append((int(lo, 16), int(hi, 16)))
    return out


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_zip_pickle_is_memory_mapped_and_pt_suffix_opens(tmp_path):
    src = {"weight": torch.randn(256, 256, generator=torch.Generator().manual_seed(3))}
    path = tmp_path / "weights.pt"
    torch.save(src, path)
    ckpt = open_checkpoint(path)
    reader = ckpt._readers[ckpt.weight_files[0]]
    assert reader._tensors is None  # opening parsed the pickle's records only; the file is mapped on first use
    stored = reader._loaded()["weight"]  # the state dict torch.load(mmap=True) returned
    ranges = _mapped_ranges(path.resolve())
    assert ranges, "the .pt file is not memory-mapped"
    assert any(lo <= stored.data_ptr() < hi for lo, hi in ranges)  # tensor data lives in the file mapping
    out = ckpt.tensor("weight", dtype=None)
    assert torch.equal(out, src["weight"])
    out.zero_()  # the caller owns the result: the mapping (and the next read) is unchanged
    assert torch.equal(ckpt.tensor("weight"), src["weight"])


def test_legacy_pickle_reads_metadata_first_and_data_on_first_use(tmp_path):
    src = {"a": torch.randn(4, 3), "b": torch.ones(2, dtype=torch.float16)}
    path = tmp_path / "legacy.bin"
    torch.save(src, path, _use_new_zipfile_serialization=False)
    ckpt = open_checkpoint(path)
    reader = ckpt._readers[ckpt.weight_files[0]]
    assert not reader.is_zip and reader._tensors is None  # nothing loaded at open
    assert ckpt.info("b").shape == (2,) and ckpt.info("b").dtype == "float16" and ckpt.info("b").nbytes == 4
    assert torch.equal(ckpt.tensor("a"), src["a"])
    assert torch.equal(ckpt.tensor("b", dtype=None), src["b"])
    ckpt.close()
    assert reader._tensors is None and torch.equal(ckpt.tensor("a"), src["a"])  # reopens after close


def test_wrapped_state_dict_is_unwrapped(tmp_path):
    path = tmp_path / "train.pt"
    torch.save({"state_dict": {"w": torch.eye(3)}}, path)
    assert torch.equal(open_checkpoint(path).tensor("w"), torch.eye(3))


def test_fingerprint_stable_and_changes_when_touched(tmp_path):
    path = write_safetensors(tmp_path / "f.safetensors", {"w": torch.ones(4, 4)})
    first = open_checkpoint(path).fingerprint
    assert re.fullmatch(r"[0-9a-f]{16}", first), first  # 16 lowercase hex digits (64 bits of the digest)
    assert open_checkpoint(path).fingerprint == first  # stable when nothing changed
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    touched = open_checkpoint(path).fingerprint
    assert touched != first
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert open_checkpoint(path).fingerprint == first  # mtime restored -> same fingerprint
    # same size and mtime, different header (a renamed tensor) -> different fingerprint
    write_safetensors(path, {"v": torch.ones(4, 4)})
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and open_checkpoint(path).fingerprint != first
    # the same bytes at another path -> different fingerprint (resolved path is part of it)
    other = tmp_path / "g.safetensors"
    other.write_bytes(path.read_bytes())
    assert open_checkpoint(other).fingerprint != open_checkpoint(path).fingerprint


def test_pickle_fingerprint_changes_when_touched(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(3)}, path)
    first = open_checkpoint(tmp_path).fingerprint
    assert open_checkpoint(tmp_path).fingerprint == first
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert open_checkpoint(tmp_path).fingerprint != first


def test_open_is_header_only_for_safetensors(tmp_path, monkeypatch):
    """Opening must not touch tensor data: safe_open is not even called until a tensor is read."""
    import safetensors

    calls = []
    real = safetensors.safe_open
    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: calls.append(a) or real(*a, **k))
    path = write_safetensors(tmp_path / "h.safetensors", {"w": torch.ones(8, 8)})
    ckpt = open_checkpoint(path)
    assert calls == [] and ckpt.info("w").shape == (8, 8)
    ckpt.rows("w", 0, 2)
    assert len(calls) == 1

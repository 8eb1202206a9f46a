"""The streaming writer: output readable by safetensors itself (the oracle), bit-exact, sharded with an HF
index, atomic (a failure leaves nothing), and refusing to write into or over its inputs."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from analysis.io import writer
from analysis.errors import DiffractError
from analysis.io.writer import TensorSpec, write_checkpoint_streaming


def _tensors() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        ("model.embed_tokens.weight", torch.randn(50, 16, generator=g).to(torch.bfloat16)),
        ("model.layers.0.self_attn.q_proj.weight", torch.randn(16, 16, generator=g)),
        ("model.layers.0.self_attn.q_proj.bias", torch.randn(16, generator=g).to(torch.float16)),
        ("model.layers.0.mlp.up_proj.weight", torch.randn(32, 16, generator=g, dtype=torch.float64)),
        ("position_ids", torch.arange(7, dtype=torch.int64)),
        ("scalar", torch.tensor(3.5)),
        ("empty", torch.zeros(0, 4)),
        ("mask", torch.tensor([True, False, True])),
    ]


def _specs(ts):
    return [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in ts]


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bytes(writer.tensor_bytes(a)) == bytes(writer.tensor_bytes(b))


def _read_all(out: Path) -> dict[str, torch.Tensor]:
    index = json.loads((out / writer.INDEX_NAME).read_text())
    result: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        result.update(load_file(str(out / shard)))
    return result


@pytest.mark.parametrize("planned", [True, False])
def test_roundtrip_bit_exact_with_sharding(tmp_path, planned):
    ts = _tensors()
    aux = tmp_path / "src" / "config.json"
    aux.parent.mkdir()
    aux.write_text('{"model_type": "llama"}')
    out = tmp_path / "out"
    # 2000 bytes per shard: embed bf16 1600 B | q f32 1024 + bias f16 32 | up f64 4096 (over the limit,
    # alone) | position_ids 56 + scalar 4 + empty 0 + mask 3
    res = write_checkpoint_streaming(out, iter(ts), aux_files=[aux], inputs=[aux.parent],
                                     max_shard_bytes=2000, specs=_specs(ts) if planned else None)
    index = json.loads((out / writer.INDEX_NAME).read_text())
    expected_total = sum(t.numel() * t.element_size() for _, t in ts)
    assert index["metadata"]["total_size"] == expected_total == res.total_size
    assert list(index["weight_map"]) == [n for n, _ in ts]
    assert len(res.shards) == 4
    groups = [[n for n, f in index["weight_map"].items() if f == shard] for shard in res.shards]
    assert groups == [[ts[0][0]], [ts[1][0], ts[2][0]], [ts[3][0]], [n for n, _ in ts[4:]]]
    assert (out / "config.json").read_text() == '{"model_type": "llama"}'
    back = _read_all(out)
    assert set(back) == {n for n, _ in ts}
    for name, t in ts:
        assert _bits_equal(back[name], t), name
    # no leftovers next to the output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    assert not any(p.name.startswith(".data-") for p in out.iterdir())


def test_header_is_valid_safetensors_and_padded(tmp_path):
    ts = _tensors()[:3]
    out = tmp_path / "o"
    write_checkpoint_streaming(out, ts, specs=_specs(ts))
    shard = out / "model-00001-of-00001.safetensors"
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    header = json.loads(raw[8:8 + n])
    assert header["__metadata__"] == {"format": "pt"}
    with safe_open(str(shard), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert list(f.keys()) == sorted(n for n, _ in ts)


def test_stream_must_match_plan(tmp_path):
    ts = _tensors()[:2]
    bad_specs = [TensorSpec(ts[0][0], (50, 16), torch.float32), _specs(ts)[1]]  # wrong dtype for the first
    with pytest.raises(DiffractError, match="does not match its plan"):
        write_checkpoint_streaming(tmp_path / "o", ts, specs=bad_specs)
    assert not (tmp_path / "o").exists()
    assert list(tmp_path.iterdir()) == []


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    ts = _tensors()
    calls = {"n": 0}
    real = writer.shard_header

    def failing_header(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the first shard is complete on disk when the second starts
            raise OSError("disk full (simulated)")
        return real(*a, **k)

    monkeypatch.setattr(writer, "shard_header", failing_header)
    with pytest.raises(DiffractError, match="cannot write the checkpoint .disk full .simulated"):  # not an OSError
        write_checkpoint_streaming(tmp_path / "o", ts, specs=_specs(ts), max_shard_bytes=2000)
    assert calls["n"] == 2
    assert list(tmp_path.iterdir()) == []


def test_generator_exception_leaves_nothing_and_keeps_old_output(tmp_path):
    out = tmp_path / "o"
    write_checkpoint_streaming(out, [("a", torch.ones(3))])

    def broken():
        yield "a", torch.zeros(3)
        raise RuntimeError("reader failed")

    with pytest.raises(RuntimeError, match="reader failed"):
        write_checkpoint_streaming(out, broken(), force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]
    assert torch.equal(_read_all(out)["a"], torch.ones(3))  # the old output survives untouched


def test_existing_output_refused_unless_force(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "stale.txt").write_text("x")
    with pytest.raises(DiffractError, match="already exists.*--force"):
        write_checkpoint_streaming(out, [("a", torch.ones(2))])
    assert (out / "stale.txt").exists()
    write_checkpoint_streaming(out, [("a", torch.ones(2))], force=True)
    assert not (out / "stale.txt").exists()
    assert torch.equal(_read_all(out)["a"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # the old folder was deleted


def test_refuses_inputs(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    weights = ckpt / "model.safetensors"
    weights.write_bytes(b"x")
    t = [("a", torch.ones(2))]
    with pytest.raises(DiffractError, match="inside the input folder"):
        write_checkpoint_streaming(ckpt, t, inputs=[ckpt], force=True)
    with pytest.raises(DiffractError, match="inside the input folder"):
        write_checkpoint_streaming(ckpt / "sub", t, inputs=[ckpt])
    with pytest.raises(DiffractError, match="input file"):
        write_checkpoint_streaming(weights, t, inputs=[weights], force=True)
    with pytest.raises(DiffractError, match="inside the input folder"):  # a file input protects its folder
        write_checkpoint_streaming(ckpt / "out", t, inputs=[weights])
    with pytest.raises(DiffractError, match="contains the input"):
        write_checkpoint_streaming(tmp_path, t, inputs=[ckpt], force=True)
    assert weights.read_bytes() == b"x"
    assert sorted(p.name for p in ckpt.iterdir()) == ["model.safetensors"]


def test_error_message_is_one_line(tmp_path):
    (tmp_path / "o").mkdir()
    with pytest.raises(DiffractError) as info:
        write_checkpoint_streaming(tmp_path / "o", [])
    assert "\n" not in str(info.value) and str(tmp_path / "o") in str(info.value)


def test_empty_stream_writes_valid_empty_checkpoint(tmp_path):
    res = write_checkpoint_streaming(tmp_path / "o", [], specs=[])
    assert res.num_tensors == 0
    assert load_file(str(tmp_path / "o" / res.shards[0])) == {}


@pytest.mark.parametrize("disable", [(), ("copy_file_range",), ("copy_file_range", "sendfile")])
def test_raw_bytes_passthrough_is_bit_exact(tmp_path, monkeypatch, disable):
    """Unchanged tensors are copied file to file from a safetensors data section; every fallback
    (sendfile, then read/write) gives the same bytes."""
    from safetensors.torch import save_file

    src_t = {"x": torch.randn(33, 7), "y": torch.arange(10, dtype=torch.int32), "z": torch.randn(5).to(torch.bfloat16)}
    src = tmp_path / "src.safetensors"
    save_file(src_t, str(src))
    offsets = writer.safetensors_data_offsets(src)

    def broken(*a, **k):
        raise OSError(95, "Operation not supported (simulated)")

    for name in disable:
        monkeypatch.setattr(writer.os, name, broken)
    # mix raw and decoded tensors in one shard, in an order unlike the source's
    stream = [("z", writer.RawBytes(src, offsets["z"][0], offsets["z"][1] - offsets["z"][0])),
              ("w", torch.ones(3, dtype=torch.float16)),
              ("x", writer.RawBytes(src, offsets["x"][0], offsets["x"][1] - offsets["x"][0])),
              ("y", src_t["y"])]
    specs = [TensorSpec("z", (5,), torch.bfloat16), TensorSpec("w", (3,), torch.float16),
             TensorSpec("x", (33, 7), torch.float32), TensorSpec("y", (10,), torch.int32)]
    write_checkpoint_streaming(tmp_path / "o", stream, specs=specs)
    back = _read_all(tmp_path / "o")
    for name in ("x", "y", "z"):
        assert _bits_equal(back[name], src_t[name]), name
    assert torch.equal(back["w"], torch.ones(3, dtype=torch.float16))


def test_raw_bytes_size_must_match_plan(tmp_path):
    from safetensors.torch import save_file

    src = tmp_path / "s.safetensors"
    save_file({"x": torch.ones(4)}, str(src))
    start, _ = writer.safetensors_data_offsets(src)["x"]
    with pytest.raises(DiffractError, match="as 8 raw bytes"):
        write_checkpoint_streaming(tmp_path / "o", [("x", writer.RawBytes(src, start, 8))],
                                   specs=[TensorSpec("x", (4,), torch.float32)])
    assert not (tmp_path / "o").exists()


def test_cancel_from_progress_callback_leaves_nothing(tmp_path):
    """The app cancels a write by raising from the progress callback: the temp folder goes, no output."""
    class Cancelled(Exception):
        pass

    def progress(done, total, text):
        if done >= 8:
            raise Cancelled()

    ts = [("a", torch.ones(2)), ("b", torch.ones(2)), ("c", torch.ones(2))]
    with pytest.raises(Cancelled):
        write_checkpoint_streaming(tmp_path / "o", ts, specs=_specs(ts), progress=progress)
    assert list(tmp_path.iterdir()) == []

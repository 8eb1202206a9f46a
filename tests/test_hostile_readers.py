"""Hostile inputs to the readers and configs (issue 9, items 4, 5, 6, 8, 10, 14a): FIFOs, sockets and
devices where a weight file, index, config, rewind list or cache entry should be; config sizes that
are not positive integers; JSON nested deep enough to crash a recursive parser; zip pickles whose
storage records are cut short or compressed; pickles holding parameters, sparse or quantized
tensors; the safetensors header limit. Each must end in ONE stderr line naming the file (exit 1) or,
for a cache entry, a recomputation; none may hang, so every FIFO test runs under a watchdog that
releases a blocked reader and fails the test instead of hanging the suite.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import llama_checkpoint, write_safetensors

from analysis.edit.rewind_list import read_rewind_list
from analysis.errors import CheckpointError, LayoutError, RewindListError
from analysis.io.checkpoint import open_checkpoint
from analysis.model.architecture import detect_layout
from analysis.run.cache import Cache
from diffract_tui.cli import main

WATCHDOG_S = 30.0
DEEP = "[" * 100_000


def _no_hang(fn: Callable[[], Any], fifos: list[Path], timeout: float = WATCHDOG_S) -> Any:
    """fn() in a thread; if it is still running after `timeout` (blocked opening a FIFO), open each FIFO
    for writing to release the reader, then fail: a regression fails instead of hanging the suite."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - re-raised in the test's thread
            result["error"] = err

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        deadline = time.monotonic() + 10
        while worker.is_alive() and time.monotonic() < deadline:
            for fifo in fifos:  # a reader blocked in open() counts as a reader: O_NONBLOCK open succeeds
                with contextlib.suppress(OSError):
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            worker.join(0.1)
        pytest.fail(f"blocked for {timeout:.0f} s reading a FIFO among {[str(f) for f in fifos]}")
    if "error" in result:
        raise result["error"]
    return result.get("value")


def _one_line(capsys, args: list[Any], *fragments: str, fifos: list[Path] = ()) -> str:
    """Run the CLI with ARGS under the watchdog; assert exit 1 and one stderr line holding every fragment."""
    code = _no_hang(lambda: main([str(a) for a in args]), list(fifos))
    out, err = capsys.readouterr()
    assert code == 1, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("diffract-tui: error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def _llama(folder: Path, config: dict | None = None, raw_config: str | None = None) -> Path:
    """A tiny llama folder: model.safetensors plus config.json (`config` overrides, or raw text)."""
    cfg, tensors = llama_checkpoint()
    write_safetensors(folder / "model.safetensors", tensors)
    text = raw_config if raw_config is not None else json.dumps({**cfg, **(config or {})})
    (folder / "config.json").write_text(text, encoding="utf-8")
    return folder


def _fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


# ---- item 4: FIFOs, sockets and devices are never opened for reading ---------------------------------


@pytest.mark.parametrize("name", ["model.safetensors", "x.safetensors", "model.safetensors.index.json",
                                  "pytorch_model.bin"])
def test_fifo_weight_file_or_index_in_a_folder_is_refused(capsys, tmp_path, name):
    fifo = _fifo(tmp_path / "d" / name)
    _one_line(capsys, ["info", fifo.parent], f"{fifo}", "is a FIFO (named pipe), not a regular file",
              fifos=[fifo])


def test_fifo_config_next_to_good_weights_is_refused(capsys, tmp_path):
    cfg, tensors = llama_checkpoint()
    write_safetensors(tmp_path / "d" / "model.safetensors", tensors)
    fifo = _fifo(tmp_path / "d" / "config.json")
    _one_line(capsys, ["info", fifo.parent], f"{fifo}: is a FIFO (named pipe), not a regular file", fifos=[fifo])


def test_fifo_named_directly_and_link_to_a_fifo_are_refused(capsys, tmp_path):
    fifo = _fifo(tmp_path / "x.safetensors")
    _one_line(capsys, ["info", fifo], f"{fifo}: is a FIFO (named pipe)", fifos=[fifo])
    folder = tmp_path / "linked"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(fifo)  # links are resolved before the check
    _one_line(capsys, ["info", folder], "is a FIFO (named pipe), not a regular file", fifos=[fifo])


def test_fifo_shard_named_by_an_index_is_refused(capsys, tmp_path):
    folder = tmp_path / "sharded"
    fifo = _fifo(folder / "model-00001-of-00001.safetensors")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.embed_tokens.weight": fifo.name}}))
    _one_line(capsys, ["info", folder], f"index names a shard '{fifo.name}' that is a FIFO (named pipe)",
              fifos=[fifo])


def test_socket_and_character_device_named_as_weights_are_refused(capsys, tmp_path):
    sock_dir = tmp_path / "s"
    sock_dir.mkdir()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(str(sock_dir / "model.safetensors"))
        _one_line(capsys, ["info", sock_dir], "model.safetensors: is a socket, not a regular file")
    finally:
        server.close()
    dev_dir = tmp_path / "dev"
    dev_dir.mkdir()
    (dev_dir / "model.safetensors").symlink_to("/dev/zero")  # would read zeros forever
    _one_line(capsys, ["info", dev_dir], "is a character device, not a regular file")


def test_fifo_rewind_list_is_refused(capsys, tmp_path):
    fifo = _fifo(tmp_path / "list.json")
    with pytest.raises(RewindListError, match="list.json: is a FIFO"):
        _no_hang(lambda: read_rewind_list(fifo), [fifo])
    _one_line(capsys, ["rewind", "apply", fifo, "--out", tmp_path / "out"],
              f"{fifo}: is a FIFO (named pipe), not a regular file", fifos=[fifo])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("suffix", [".json", ".npy"])
def test_fifo_cache_entry_is_recomputed_not_read(tmp_path, suffix, monkeypatch):
    monkeypatch.setattr("analysis.run.cache.SMALL_ENTRY_BYTES", -1)  # single-file entries (packs: test_cache_packs)
    cache = Cache(tmp_path / "cache")
    key = "ab" * 32
    fifo = _fifo(tmp_path / "cache" / key[:2] / f"{key}{suffix}")
    value = np.arange(3.0) if suffix == ".npy" else {"x": 1.5}
    calls: list[int] = []

    def compute() -> Any:
        calls.append(1)
        return value

    got = _no_hang(lambda: cache.get_or_compute(key, compute), [fifo])
    assert calls == [1]
    assert np.array_equal(got, value) if suffix == ".npy" else got == value
    assert fifo.is_file() and not fifo.is_symlink()  # the FIFO was discarded and a real entry written
    assert _no_hang(lambda: cache.get_or_compute(key, compute), [fifo]) is not None and calls == [1]


def test_fifo_model_file_in_a_real_process_exits_1_within_the_timeout(tmp_path):
    """The issue's own command: `mkfifo d/model.safetensors; diffract-tui info d` (subprocess, timeout)."""
    fifo = _fifo(tmp_path / "d" / "model.safetensors")
    proc = subprocess.run([sys.executable, "-m", "diffract_tui", "info", str(fifo.parent)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip() == (f"diffract-tui: error: {fifo}: is a FIFO (named pipe), not a regular file — "
                                   "only regular files are read (a FIFO, socket or device could block forever); "
                                   "point at the real file")


# ---- item 5: config sizes must be positive integers ---------------------------------------------------

BAD_VALUES = [  # (key, raw JSON text of the value, how the message shows it)
    ("num_attention_heads", "0", "0"),
    ("num_key_value_heads", "0", "0"),
    ("num_attention_heads", '"four"', '"four"'),
    ("num_attention_heads", "[4]", "[4]"),
    ("num_attention_heads", "1e999", "Infinity"),
    ("num_attention_heads", "NaN", "NaN"),
    ("num_attention_heads", "-4", "-4"),
    ("num_attention_heads", "4.7", "4.7"),  # refused, never read as 4
    ("num_attention_heads", "4.0", "4.0"),  # integer-valued floats are refused too (the stated choice)
    ("num_attention_heads", "true", "true"),  # a bool is not a count
    ("hidden_size", '"64"', '"64"'),
    ("num_hidden_layers", "-2", "-2"),
    ("head_dim", "0", "0"),
]


@pytest.mark.parametrize(("key", "raw", "shown"), BAD_VALUES, ids=[f"{k}={r}" for k, r, _ in BAD_VALUES])
def test_config_size_that_is_not_a_positive_integer_is_refused_at_open(capsys, tmp_path, key, raw, shown):
    cfg, _ = llama_checkpoint()
    text = json.dumps({**cfg, key: "@@"}).replace('"@@"', raw)
    folder = _llama(tmp_path / "m", raw_config=text)
    _one_line(capsys, ["info", folder],
              f"{folder / 'config.json'}: config.json {key} is {shown}; expected a positive integer")


def test_negative_heads_and_kv_heads_are_refused_by_info_and_rewind_plan(capsys, tmp_path):
    """The issue's case: -4 / -2 printed "heads −4, head_dim −16" in info and crashed rewind plan."""
    folder = _llama(tmp_path / "neg", {"num_attention_heads": -4, "num_key_value_heads": -2})
    expected = "config.json num_attention_heads is -4; expected a positive integer"
    _one_line(capsys, ["info", folder], expected)
    _one_line(capsys, ["rewind", "plan", folder, folder, "--fraction", "0.25", "--out", tmp_path / "plan.json"],
              expected)
    assert not (tmp_path / "plan.json").exists()


@pytest.mark.parametrize(("key", "raw", "expected"), [
    ("architectures", "5", "config.json architectures is 5; expected a list of class names"),
    ("architectures", '[5]', "config.json architectures is [5]; expected a list of class names"),
    ("model_type", "5", "config.json model_type is 5; expected a string"),
])
def test_config_architectures_and_model_type_of_the_wrong_type_are_refused(capsys, tmp_path, key, raw, expected):
    cfg, _ = llama_checkpoint()
    folder = _llama(tmp_path / "m", raw_config=json.dumps({**cfg, key: "@@"}).replace('"@@"', raw))
    _one_line(capsys, ["info", folder], f"{folder / 'config.json'}: {expected}")


def test_detect_layout_refuses_the_same_values_without_files():
    cfg, tensors = llama_checkpoint()
    shapes = {k.removeprefix("model."): tuple(v.shape) for k, v in tensors.items()}
    assert detect_layout(cfg, shapes).num_heads == 4  # the control: the real config is fine
    for bad in (4.7, 4.0, 0, -4, "4", float("nan"), True):
        with pytest.raises(LayoutError, match=r"num_attention_heads is .*; expected a positive integer"):
            detect_layout({**cfg, "num_attention_heads": bad}, shapes)
    with pytest.raises(LayoutError, match=r"text_config\.num_attention_heads is 0"):
        detect_layout({**cfg, "text_config": {"num_attention_heads": 0}}, shapes)


# ---- item 6: deeply nested JSON ------------------------------------------------------------------------


def test_deep_config_json_is_one_line(capsys, tmp_path):
    folder = _llama(tmp_path / "m", raw_config=DEEP)
    _one_line(capsys, ["info", folder], f"{folder / 'config.json'}: config.json is JSON nested more than 100 levels")


def test_valid_but_deep_config_json_is_refused_deterministically(capsys, tmp_path):
    folder = _llama(tmp_path / "m", raw_config='{"x": ' + "[" * 150 + "]" * 150 + "}")  # parses, too deep
    _one_line(capsys, ["info", folder], "config.json is JSON nested more than 100 levels")


def test_config_json_that_is_not_utf8_is_one_line(capsys, tmp_path):
    folder = _llama(tmp_path / "m")
    (folder / "config.json").write_bytes(b'{"model_type": "\xff"}')
    _one_line(capsys, ["info", folder], "config.json is not UTF-8 text (byte 0xff at offset 16)")


def test_deep_safetensors_header_is_one_line(capsys, tmp_path):
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(DEEP)) + DEEP.encode())
    _one_line(capsys, ["info", path], f"{path}: safetensors header is JSON nested more than 100 levels")


def test_deep_index_json_is_one_line(capsys, tmp_path):
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(DEEP)
    _one_line(capsys, ["info", folder], f"{folder / 'model.safetensors.index.json'}: index is JSON nested more than")


def test_deep_rewind_list_is_one_line(capsys, tmp_path):
    path = tmp_path / "list.json"
    path.write_text(DEEP)
    _one_line(capsys, ["rewind", "apply", path, "--out", tmp_path / "out"], f"{path}: JSON nested more than 100")


def test_deep_cache_entry_is_recomputed(tmp_path):
    cache = Cache(tmp_path / "cache")
    key = "cd" * 32
    entry = tmp_path / "cache" / key[:2] / f"{key}.json"
    entry.parent.mkdir(parents=True)
    entry.write_text(DEEP)
    assert cache.get_json(key) is None and not entry.exists()  # a miss, and the entry is removed
    assert cache.get_or_compute(key, lambda: {"v": 2}) == {"v": 2} and cache.get_json(key) == {"v": 2}


# ---- item 8: zip pickles whose storage records do not hold what the tensors need --------------------------


def _rewrite_zip(src: Path, dst: Path, *, shorten: int = 0, compress: bool = False) -> None:
    """Copy a torch zip file record by record; the first data record is cut by `shorten` bytes, or deflated."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("/data/0"):
                data = data[: len(data) - shorten]
                if compress:
                    info.compress_type = zipfile.ZIP_DEFLATED
            zout.writestr(info, data)


def _pickle_folder(tmp_path: Path, name: str, **rewrite: Any) -> Path:
    cfg, tensors = llama_checkpoint()
    folder = tmp_path / name
    folder.mkdir()
    torch.save(tensors, tmp_path / f"{name}-orig.bin")
    _rewrite_zip(tmp_path / f"{name}-orig.bin", folder / "pytorch_model.bin", **rewrite)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_zip_pickle_with_a_storage_record_cut_by_256_bytes_is_refused(capsys, tmp_path):
    folder = _pickle_folder(tmp_path, "short", shorten=256)
    _one_line(capsys, ["info", folder], f"{folder / 'pytorch_model.bin'}: tensor 'model.embed_tokens.weight' needs "
              "12800 bytes of storage but its record short-orig/data/0 holds only 12544")


def test_zip_pickle_with_a_compressed_storage_record_is_refused(capsys, tmp_path):
    folder = _pickle_folder(tmp_path, "deflated", compress=True)
    _one_line(capsys, ["info", folder], "tensor 'model.embed_tokens.weight' is in a compressed record "
              "deflated-orig/data/0, which cannot be memory-mapped")


def test_zip_pickle_rewritten_intact_still_opens_with_the_same_values(tmp_path):
    """The control: the same rewrite without cutting passes the record check and reads bit-exact."""
    folder = _pickle_folder(tmp_path, "intact")
    _, tensors = llama_checkpoint()
    with open_checkpoint(folder) as ckpt:
        for raw, t in tensors.items():
            assert torch.equal(ckpt.tensor(raw.removeprefix("model."), dtype=None), t)


# ---- item 10: pickles with non-plain tensors --------------------------------------------------------------


def test_pickle_of_nn_parameters_just_works(capsys, tmp_path):
    cfg, tensors = llama_checkpoint()
    for legacy in (False, True):
        folder = tmp_path / f"param{int(legacy)}"
        folder.mkdir()
        torch.save({k: torch.nn.Parameter(v) for k, v in tensors.items()}, folder / "pytorch_model.bin",
                   _use_new_zipfile_serialization=not legacy)
        (folder / "config.json").write_text(json.dumps(cfg))
        with open_checkpoint(folder) as ckpt:
            w = ckpt.tensor("layers.0.self_attn.q_proj.weight")
            assert type(w) is torch.Tensor and not w.requires_grad
            assert np.array_equal(w.numpy(), tensors["model.layers.0.self_attn.q_proj.weight"].numpy())
    out = tmp_path / "scan.csv"
    code = main(["scan", str(tmp_path / "param0"), "--out", str(out), "--no-cache", "--quiet", "--threads", "1"])
    _, err = capsys.readouterr()
    assert code == 0, err
    assert "model.layers.0.self_attn.q_proj.weight" in out.read_text() or "q_proj" in out.read_text()


def _quantized() -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.quantize_per_tensor(torch.ones(4, 4), 0.1, 0, torch.qint8)


@pytest.mark.parametrize(("make", "expected"), [
    (lambda: torch.eye(4).to_sparse(), "tensor 'w' is a sparse_coo tensor, which is not supported"),
    (lambda: torch.eye(4).to_sparse_csr(), "tensor 'w' is a sparse_csr tensor, which is not supported"),
    (_quantized, "tensor 'w' is quantized (qint8), which is not supported"),
    (lambda: torch.ones(4, 4, dtype=torch.complex64), "tensor 'w' has unsupported dtype complex64"),
], ids=["sparse_coo", "sparse_csr", "quantized", "complex"])
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_pickle_with_a_sparse_quantized_or_complex_tensor_is_refused_by_name(capsys, tmp_path, make, expected,
                                                                            legacy):
    path = tmp_path / "w.bin"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save({"ok": torch.ones(4, 4), "w": make()}, path, _use_new_zipfile_serialization=not legacy)
    _one_line(capsys, ["info", path], f"{path}: {expected}")


def test_pickle_of_a_meta_device_tensor_is_refused_when_read(tmp_path):
    path = tmp_path / "meta.pt"
    torch.save({"w": torch.empty(4, 4, device="meta")}, path)
    with pytest.raises(CheckpointError, match=r"tensor 'w' was saved without data \(on the meta device\)"):
        open_checkpoint(path).tensor("w")


# ---- item 14a: the safetensors header limit is the library's 100,000,000 bytes -------------------------------


def test_header_length_just_over_the_library_limit_is_refused_as_too_large(capsys, tmp_path):
    path = tmp_path / "big.safetensors"
    path.write_bytes(struct.pack("<Q", 100_000_001) + b"{}")
    _one_line(capsys, ["info", path], f"{path}: not a safetensors file: header length field says 100000001 bytes")
    path.write_bytes(struct.pack("<Q", 100_000_000) + b"{}")  # exactly the limit: allowed, so read as truncated
    _one_line(capsys, ["info", path], "truncated safetensors file: header claims 100000000 bytes")


# ---- item 8 (writer side, kept small): interpolate never writes inf from finite inputs -----------------------


def _sha256_tree(folder: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _two_fp16(tmp_path: Path, value_b: float) -> tuple[Path, Path]:
    a = write_safetensors(tmp_path / "a" / "model.safetensors", {"w": torch.zeros(4, 4, dtype=torch.float16)})
    b = write_safetensors(tmp_path / "b" / "model.safetensors",
                          {"w": torch.full((4, 4), value_b, dtype=torch.float16)})
    return a.parent, b.parent


def test_interpolate_alpha_1e38_is_refused_and_nothing_is_written(capsys, tmp_path):
    a, b = _two_fp16(tmp_path, 1.0)
    before = {**_sha256_tree(a), **{f"b/{k}": v for k, v in _sha256_tree(b).items()}}
    _one_line(capsys, ["interpolate", a, b, "--alpha", "1e38", "--out", tmp_path / "o"],
              "coefficient -1e+38 is outside ±1000")
    assert not (tmp_path / "o").exists()
    assert {**_sha256_tree(a), **{f"b/{k}": v for k, v in _sha256_tree(b).items()}} == before


def test_interpolate_that_overflows_the_stored_dtype_is_refused_and_nothing_is_written(capsys, tmp_path):
    a, b = _two_fp16(tmp_path, 60000.0)  # α = 2 gives 120000, past float16's 65504: inf
    before = {**_sha256_tree(a), **{f"b/{k}": v for k, v in _sha256_tree(b).items()}}
    _one_line(capsys, ["interpolate", a, b, "--alpha", "2", "--out", tmp_path / "o"],
              "tensor w would be written with inf/NaN: the combination of finite inputs overflows float16")
    assert not (tmp_path / "o").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".o")]
    assert {**_sha256_tree(a), **{f"b/{k}": v for k, v in _sha256_tree(b).items()}} == before
    assert main(["interpolate", str(a), str(b), "--alpha", "0.5", "--out", str(tmp_path / "ok")]) == 0  # control
    capsys.readouterr()


# ---- further cases: info must refuse what the safetensors library refuses; oversize JSON; scores FIFO -------


def _raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def _f32(begin: int, end: int) -> dict:
    return {"dtype": "F32", "shape": [(end - begin) // 4], "data_offsets": [begin, end]}


@pytest.mark.parametrize(("header", "data", "expected"), [
    ({"a": _f32(0, 4), "b": _f32(8, 12)}, 12, "tensor 'b' starts at byte 8 of the data section where 4 was expected"),
    ({"a": _f32(0, 8), "b": _f32(4, 12)}, 12, "tensor 'b' starts at byte 4 of the data section where 8 was expected"),
    ({"a": _f32(0, 4), "b": _f32(0, 4)}, 4, "tensor 'b' starts at byte 0 of the data section where 4 was expected"),
    ({"a": _f32(4, 8)}, 8, "tensor 'a' starts at byte 4 of the data section where 0 was expected"),
    ({"a": _f32(0, 4)}, 8, "the tensors cover 4 of the 8 bytes of the data section"),
    ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, 4, "shape [True]"),
], ids=["gap", "overlap", "shared", "offset-start", "trailing-bytes", "bool-shape"])
def test_safetensors_layouts_the_library_refuses_are_refused_by_info(capsys, tmp_path, header, data, expected):
    from safetensors import safe_open

    path = _raw_safetensors(tmp_path / "x.safetensors", header, b"\0" * data)
    with pytest.raises(Exception), safe_open(str(path), framework="pt"):  # noqa: B017 - the library refuses it
        pass
    _one_line(capsys, ["info", path], f"{path}: ", expected)


def test_config_json_larger_than_the_json_limit_is_refused_without_reading_it(capsys, tmp_path):
    folder = _llama(tmp_path / "m")
    with open(folder / "config.json", "r+b") as f:
        f.truncate(100_000_001)  # sparse: 100 MB that are never read
    _one_line(capsys, ["info", folder], "config.json is 100000001 bytes, more than the 100000000 a JSON file may have")


def test_fifo_scores_csv_is_refused(capsys, tmp_path):
    a, b = _two_fp16(tmp_path, 1.0)
    fifo = _fifo(tmp_path / "scores.csv")
    _one_line(capsys, ["interpolate", a, b, "--out", tmp_path / "o", "--barrier", fifo],
              f"{fifo}: is a FIFO (named pipe), not a regular file", fifos=[fifo])

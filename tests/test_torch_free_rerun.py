"""Issue 13 item 3, a rerun is start-up free: a fully cached `delta` (and `scan`) never imports torch (≈3 s of its ≈4 s), yet
writes the cold run's bytes; the torch-free pieces it stands on — pickle metadata from a restricted parse (equal
to torch's on real rxnfp files and on every plain variant), the device kind of "cpu"/"auto" without torch, the
thread policy applied when compute starts — each checked against torch's own answer."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import llama_checkpoint, write_safetensors
from diffract_tui.cli import main

REPO = Path(__file__).resolve().parents[1]
# runs the CLI, then reports on stderr whether torch was ever imported (sys.modules at exit)
PROBE = ("import sys; from diffract_tui.cli import main; code = main(sys.argv[1:]); "
         "print('torch-imported:', 'torch' in sys.modules, file=sys.stderr); sys.exit(code)")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "DIFFRACT_TUI_THREADS": "1", "OMP_NUM_THREADS": "1"}


def _probe(args: list[str]) -> tuple[int, str, bool]:
    """(exit code, stderr, whether torch was imported) of one CLI process."""
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], env=_env(), capture_output=True, text=True,
                          timeout=120)
    imported = "torch-imported: True" in proc.stderr
    assert imported or "torch-imported: False" in proc.stderr, proc.stderr
    return proc.returncode, proc.stderr, imported


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _trio(root: Path, fmt: str) -> list[Path]:
    """A tiny Llama base and two CPT checkpoints of it (every matrix changed), as safetensors or a zip .bin."""
    folders = []
    for seed, name in enumerate(("base", "dom1", "dom2")):
        config, tensors = llama_checkpoint(layers=1, hidden=32, heads=4, kv_heads=2, intermediate=48, vocab=40)
        if seed:
            g = torch.Generator().manual_seed(seed)
            tensors = {k: v + 1e-2 * torch.randn(v.shape, generator=g) if v.dim() == 2 else v
                       for k, v in tensors.items()}
        folder = root / f"{fmt}-{name}"
        folder.mkdir(parents=True)
        if fmt == "safetensors":
            write_safetensors(folder / "model.safetensors", tensors)
        else:
            torch.save(tensors, folder / "pytorch_model.bin", _use_new_zipfile_serialization=(fmt == "zip"))
        (folder / "config.json").write_text(json.dumps(config))
        folders.append(folder)
    return folders


@pytest.mark.parametrize("fmt", ["safetensors", "zip", "legacy"])
def test_cached_delta_rerun_imports_no_torch_and_writes_the_cold_bytes(tmp_path, capsys, fmt):
    """Cold (in this process) then a cached rerun as its own process: torch is never imported there and the
    table is byte-identical. The control: the same process without a cache does import torch."""
    trio = _trio(tmp_path, fmt)
    cache, cold, warm = tmp_path / "cache", tmp_path / "cold.json", tmp_path / "warm.json"
    args = ["delta", *map(str, trio), "--device", "cpu", "--cache-dir", str(cache), "--threads", "1"]
    code = main([*args, "--out", str(cold)])
    assert code == 0, capsys.readouterr().err
    code, err, imported = _probe([*args, "--out", str(warm)])
    assert code == 0, err
    assert not imported, "a fully cached delta imported torch"
    assert _sha(warm) == _sha(cold)
    if fmt == "safetensors":   # the control (once): computing needs torch, and the probe sees that import
        code, err, imported = _probe([*args[:-4], "--no-cache", "--out", str(tmp_path / "nocache.json")])
        assert code == 0 and imported, err
        assert _sha(tmp_path / "nocache.json") == _sha(cold)


def test_cached_scan_rerun_imports_no_torch_and_writes_the_cold_bytes(tmp_path, capsys):
    """The same for `scan --heads --delta` at the default device (auto): no torch, the cold bytes."""
    trio = _trio(tmp_path, "zip")[:2]
    cache, cold, warm = tmp_path / "cache", tmp_path / "cold.csv", tmp_path / "warm.csv"
    args = ["scan", *map(str, trio), "--heads", "--delta", "--quiet", "--cache-dir", str(cache), "--threads", "1"]
    code = main([*args, "--out", str(cold)])
    assert code == 0, capsys.readouterr().err
    code, err, imported = _probe([*args, "--out", str(warm)])
    assert code == 0 and not imported, err
    assert _sha(warm) == _sha(cold)


def test_pickle_metadata_without_torch_equals_torch_metadata_on_rxnfp(rxnfp_dirs):
    """Names, shapes, dtypes and sizes of the real (legacy) rxnfp pickles: the records parse equals the
    torch.load(weights_only=True, map_location="meta") metadata the reader used before."""
    from analysis.io.readers.pickle_file import PickleFile

    for name in ("bert_pretrained", "bert_ft", "bert_ft_10k_25s"):
        reader = PickleFile(rxnfp_dirs[name] / "pytorch_model.bin")
        assert reader._tensors is None and len(reader.entries) > 100
        assert reader.entries == reader._torch_entries(), name


@pytest.mark.parametrize("variant", ["zip", "legacy", "parameters", "wrapped", "half", "bf16_int"])
def test_pickle_metadata_without_torch_equals_torch_metadata_on_plain_variants(tmp_path, variant):
    """Every plain state dict torch.save writes (zip and legacy, nn.Parameters, a training checkpoint's
    `state_dict`, float16, bfloat16 with int64 and bool buffers) opens by the records parse with torch's metadata."""
    from analysis.io.readers.pickle_file import PickleFile

    _, tensors = llama_checkpoint(layers=1, hidden=16, heads=2, kv_heads=1, intermediate=24, vocab=10)
    obj: object = tensors
    if variant == "parameters":
        obj = {k: torch.nn.Parameter(v) for k, v in tensors.items()}
    elif variant == "wrapped":
        obj = {"state_dict": tensors, "epoch": 3, "note": "x"}
    elif variant == "half":
        obj = {k: v.half() for k, v in tensors.items()}
    elif variant == "bf16_int":
        obj = {**{k: v.bfloat16() for k, v in tensors.items()}, "ids": torch.arange(5), "mask": torch.ones(3) > 0,
               "view": torch.arange(12.0).reshape(3, 4)[1:]}
    path = tmp_path / "w.bin"
    torch.save(obj, path, _use_new_zipfile_serialization=(variant != "legacy"))
    reader = PickleFile(path)
    assert reader._tensors is None   # nothing loaded: the records parse served the metadata
    assert reader.entries == reader._torch_entries()


def test_device_kind_of_cpu_and_auto_is_torchs_answer_without_importing_torch():
    """"cpu" and "auto" key the cache by the kind torch would resolve (CPU results never serve a CUDA request:
    a CUDA/ROCm build asks torch); the build check reads torch/version.py and agrees with torch.version."""
    from analysis.spectral.backend import SpectralSettings, resolve_device, torch_build_has_gpu

    assert torch_build_has_gpu() == (torch.version.cuda is not None or torch.version.hip is not None)
    for device in ("cpu", "auto", "CPU"):
        assert SpectralSettings(device=device).device_kind == resolve_device(device).type
    code = ("import sys; from analysis.spectral.backend import SpectralSettings, apply_thread_policy, compute_torch; "
            "kinds = [SpectralSettings(device=d).key()['device'] for d in ('cpu', 'auto')]; "
            "apply_thread_policy(1, lazy=True); before = 'torch' in sys.modules; "
            "print(kinds, before, compute_torch().get_num_threads())")
    proc = subprocess.run([sys.executable, "-c", code], env={**_env(), "OMP_NUM_THREADS": "2"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    expected_auto = "cuda" if torch.cuda.is_available() else "cpu"
    if not torch_build_has_gpu():   # the torch-free answer is only claimed for a build without a GPU backend
        assert proc.stdout.split() == ["['cpu',", f"'{expected_auto}']", "False", "1"], proc.stdout
    else:
        assert proc.stdout.split()[:2] == ["['cpu',", f"'{expected_auto}']"], proc.stdout


def test_build_check_falls_back_to_asking_torch_when_version_py_says_gpu(monkeypatch):
    """A build whose version.py names CUDA makes "auto" resolve through torch (never a guessed "cpu")."""
    from analysis.spectral import backend

    calls = []
    monkeypatch.setattr(backend, "torch_build_has_gpu", lambda: True)
    monkeypatch.delitem(sys.modules, "torch")   # as in a process that has not imported torch yet
    monkeypatch.setattr(backend, "resolve_device", lambda d: calls.append(d) or torch.device("cuda"))
    assert backend.SpectralSettings(device="auto").device_kind == "cuda" and calls == ["auto"]
    assert backend.SpectralSettings(device="cpu").device_kind == "cpu" and calls == ["auto"]

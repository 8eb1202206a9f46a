"""The Ray executor's cost (issue 13, performance): a scan through Ray against the same scan in this process,
and a whole `rewind sweep` process with --executor ray against the same command run locally.

    nice python benchmarks/ray_overhead.py --case 1b      # Llama-1B-shaped layers: Ray (1 CPU) vs local (goal ≤ 1.3×)
    nice python benchmarks/ray_overhead.py --case series  # 10 checkpoints of a 135M-shaped model: 1 vs 2 workers
    nice python benchmarks/ray_overhead.py --case sweep   # rewind sweep of the tiny CPT family, whole processes
    nice python benchmarks/ray_overhead.py --case both --layers 2

Random checkpoints written by `analysis.generate.write_checkpoint` into a temp folder (bf16 for the series,
float32 for the 1B case); `--layers` keeps the widths of the shape but fewer layers (the per-matrix work and
the per-task overhead are what the ratio compares; the full depth only multiplies both). Every scan is cold
(no cache), default metrics, one torch thread per process (the local scan and each Ray task). The local Ray is
started per case with `num_cpus` = the workers; its start-up is reported apart (`ray_start_s`); the Ray scan's
wall time includes the workers' first import of torch and the engine (cold workers), as a real run pays it.
Wall seconds (the work runs in other processes, so CPU time of this one says nothing): on a shared machine
they are noisy. Rows of the two executors are checked equal. The sweep case times whole `diffract-tui rewind
sweep` processes (interpreter start, model loads, a local Ray started and stopped by the command) on the tiny
CPT family (`analysis.tiny_models`, trained once into the system temp folder) and checks the tables are the same
bytes. One JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {  # analysis.model.families.family_config overrides
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8,
               vocab_size=32000, tie_word_embeddings=True),      # Llama-3.2-1B widths, a 32k vocabulary
    "135m": dict(hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
                 vocab_size=49152, tie_word_embeddings=True),    # SmolLM2-135M
}


def _scan(paths: list[Path], executor) -> tuple[float, list[dict]]:  # noqa: ANN001
    """Wall seconds and rows of a cold scan of `paths` (no cache) on `executor` (None: this process)."""
    from analysis.io.checkpoint import open_checkpoint
    from analysis.run.scan import scan
    from analysis.spectral.backend import SpectralSettings

    opened = [open_checkpoint(p) for p in paths]
    start = time.perf_counter()
    try:
        rows = list(scan(opened, settings=SpectralSettings(device="cpu"), cache=None, executor=executor))
    finally:
        for c in opened:
            c.close()
    return time.perf_counter() - start, rows


def _on_ray(paths: list[Path], workers: int) -> dict:
    """A scan on a local Ray of `workers` CPUs: its start-up and scan seconds, and the rows."""
    import ray

    from analysis.run.executors import RayExecutor

    start = time.perf_counter()
    executor = RayExecutor(num_cpus=workers)
    executor.start()
    started = time.perf_counter() - start
    try:
        seconds, rows = _scan(paths, executor)
    finally:
        executor.close()
    assert not ray.is_initialized()
    return {"workers": workers, "ray_start_s": round(started, 1), "scan_s": round(seconds, 1), "rows": rows}


def _write(root: Path, shape: str, n: int, layers: int | None, dtype: str) -> list[Path]:
    from analysis.generate import write_checkpoint

    config = dict(SHAPES[shape], **({"num_layers": layers} if layers else {}))
    return [write_checkpoint(root / f"step-{k * 1000}", "llama", seed=k, dtype=dtype, **config) for k in range(n)]


def case_1b(root: Path, layers: int | None) -> dict:
    """One 1B-shaped checkpoint: local vs Ray with one worker (the same compute, plus Ray's cost)."""
    paths = _write(root / "1b", "1b", 1, layers, "float32")
    local_s, local_rows = _scan(paths, None)
    ray = _on_ray(paths, 1)
    assert ray.pop("rows") == local_rows, "Ray rows differ from the local rows"
    return {"shape": "1b", "layers": layers or SHAPES["1b"]["num_layers"], "matrices": len(local_rows),
            "local_s": round(local_s, 1), "ray": ray, "ray_over_local": round(ray["scan_s"] / local_s, 2),
            "ray_with_start_over_local": round((ray["scan_s"] + ray["ray_start_s"]) / local_s, 2)}


def case_series(root: Path, layers: int | None, n: int) -> dict:
    """n checkpoints of a 135M-shaped model: local, then Ray with 1 and with 2 workers."""
    paths = _write(root / "series", "135m", n, layers, "bfloat16")
    local_s, local_rows = _scan(paths, None)
    runs = []
    for workers in (1, 2):
        run = _on_ray(paths, workers)
        assert run.pop("rows") == local_rows, "Ray rows differ from the local rows"
        runs.append(run)
    return {"shape": "135m", "checkpoints": n, "layers": layers or SHAPES["135m"]["num_layers"],
            "rows": len(local_rows), "local_s": round(local_s, 1), "ray": runs,
            "one_worker_over_local": round(runs[0]["scan_s"] / local_s, 2),
            "two_over_one_worker": round(runs[1]["scan_s"] / runs[0]["scan_s"], 2)}


SWEEP_ARGS = ["--patterns", "greedy,top,random", "--fractions", "0,0.1,0.2,0.3,0.4,0.5", "--seeds", "2",
              "--tokens", "64", "--windows", "8", "--device", "cpu", "--threads", "1", "--no-cache"]


def _sweep_process(family, out: Path, *extra: str) -> float:  # noqa: ANN001
    """Wall seconds of one whole `diffract-tui rewind sweep` process of the family (code CPT, both texts)."""
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-c", "import sys; from diffract_tui.cli import main; sys.exit(main())", "rewind", "sweep",
           str(family.base), str(family.code), "--text", str(family.code_text), "--general-text",
           str(family.prose_text), *SWEEP_ARGS, "--out", str(out), *extra]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


RAY_FIXED = ("from analysis.run.executors import RayExecutor; e = RayExecutor(); e.start(); e.check_workers([]); "
             "e.close()")


def _ray_fixed_process() -> float:
    """Wall seconds of a process that only starts a local Ray, probes its workers and stops it (what any
    `--executor ray` command pays before its first task; no torch import on the workers)."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", RAY_FIXED], check=True, env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def _sweep_in_process(family) -> dict:  # noqa: ANN001
    """The sweep's compute alone, in this process: `run_sweep` locally, then `sweep_remote` on one local Ray
    (2 CPUs) twice — cold workers (their first torch/transformers import) and warm ones; rows checked equal."""
    from analysis.edit.rewind import checkpoint_ref, rewind_inputs
    from analysis.eval.evaluator import Evaluator, prepare_text
    from analysis.eval.loss import load_model
    from analysis.eval.patch import LivePatch
    from analysis.eval.sweep import parse_fractions, run_sweep, sweep_candidates
    from analysis.eval.texts import load_text
    from analysis.io.checkpoint import open_checkpoint
    from analysis.model.architecture import layout_of
    from analysis.run.executors import RayExecutor, sweep_remote

    args = dict(zip(SWEEP_ARGS[::2], SWEEP_ARGS[1::2]))
    b, t = open_checkpoint(family.base), open_checkpoint(family.code)
    lm = load_model(family.code, device=torch.device("cpu"), dtype=torch.float32)
    texts = [prepare_text(lm, load_text(p), int(args["--tokens"]), int(args["--windows"]), role)
             for p, role in ((family.code_text, "domain"), (family.prose_text, "general"))]
    inputs = rewind_inputs(b, t, None)
    cands = sweep_candidates(inputs, base=checkpoint_ref(b), target=checkpoint_ref(t), reference=None,
                             patterns=args["--patterns"].split(","), fractions=parse_fractions(args["--fractions"]),
                             seeds=int(args["--seeds"]))
    start = time.perf_counter()
    local = run_sweep(Evaluator(lm, t.fingerprint), LivePatch(lm.model, b, layout_of(t)), cands, texts, target=t,
                      inputs=inputs)
    out = {"candidates": len(cands), "local_s": round(time.perf_counter() - start, 1)}
    executor = RayExecutor(num_cpus=2)
    start = time.perf_counter()
    executor.start()
    out["ray_start_s"] = round(time.perf_counter() - start, 1)
    try:
        for name in ("ray_cold_workers_s", "ray_warm_workers_s"):
            start = time.perf_counter()
            remote = sweep_remote(executor, cands, texts, base=b, target=t, device="cpu", dtype="float32", cache=None,
                                  inputs=inputs)
            out[name] = round(time.perf_counter() - start, 1)
            assert remote.rows == local, "Ray sweep rows differ from the local rows"
    finally:
        executor.close()
    out["warm_over_local"] = round(out["ray_warm_workers_s"] / out["local_s"], 2)
    return out


def case_sweep(root: Path) -> dict:
    """A rewind sweep of the tiny CPT family: local, then Ray (a local Ray of every CPU, default batches and one
    evaluation per task), whole processes; the tables must be the same bytes."""
    from analysis.tiny_models import build_cpt_family, cpt_stamp

    family = build_cpt_family(Path(tempfile.gettempdir()) / f"diffract-tiny-cpt-{cpt_stamp()}")
    runs = {"local": [], "ray": ["--executor", "ray"], "ray_batch_1": ["--executor", "ray", "--batch", "1"]}
    seconds, tables = {}, {}
    for name, extra in runs.items():
        out = root / f"sweep-{name}.csv"
        seconds[name] = round(_sweep_process(family, out, *extra), 1)
        tables[name] = out.read_bytes()
    assert all(t == tables["local"] for t in tables.values()), "a Ray sweep table differs from the local one"
    seconds["ray_start_probe_stop_only"] = round(_ray_fixed_process(), 1)
    compute = _sweep_in_process(family)
    return {"family": "tiny CPT (analysis.tiny_models)", "args": " ".join(SWEEP_ARGS), "cpus": os.cpu_count(),
            "wall_s": seconds, "ray_over_local": round(seconds["ray"] / seconds["local"], 2),
            "ray_batch_1_over_local": round(seconds["ray_batch_1"] / seconds["local"], 2),
            "in_process": compute}


def main() -> None:
    """Write the checkpoints, run the cases, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=("1b", "series", "sweep", "both"), default="both")
    parser.add_argument("--layers", type=int, default=None, help="layers of each model (default: the shape's)")
    parser.add_argument("--n", type=int, default=10, help="checkpoints of the series")
    parser.add_argument("--root", type=Path, default=None, help="work folder (default: a temp folder)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out: dict = {"threads_per_process": 1}
    with tempfile.TemporaryDirectory(prefix="ray-overhead-") as tmp:
        root = args.root or Path(tmp)
        if args.case in ("1b", "both"):
            out["1b"] = case_1b(root, args.layers)
        if args.case in ("series", "both"):
            out["series"] = case_series(root, args.layers, args.n)
        if args.case == "sweep":
            out["sweep"] = case_sweep(root)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

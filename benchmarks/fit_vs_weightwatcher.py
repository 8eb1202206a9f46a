"""Whole processes: `diffract-tui scan --metrics fit` (and `all`) vs WeightWatcher `analyze()` at its defaults,
on rxnfp `bert_pretrained` and SmolLM2-135M (GGUF), one thread, no cache, rounds interleaved, medians.

WeightWatcher's process reads the same matrices through our reader (the fastest load it could have: no
transformers model build, the GGUF already dequantised) into `nn.Linear` layers and runs `analyze()`;
its import of pandas/scikit-learn is part of its whole process as ours of torch/typer is of ours.

    python benchmarks/fit_vs_weightwatcher.py [--rounds 3] [--json benchmarks/out/fit_vs_weightwatcher.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "DIFFRACT_TUI_THREADS": "1"}

WW_SCRIPT = """
import logging, sys, warnings
import torch
torch.set_num_threads(1)
from analysis.io.checkpoint import open_checkpoint
warnings.simplefilter("ignore")
import weightwatcher as ww
logging.getLogger("weightwatcher").setLevel(logging.ERROR)
ckpt = open_checkpoint(sys.argv[1])
model = torch.nn.ModuleList()
for name in ckpt.keys():
    if len(ckpt.info(name).shape) == 2 and min(ckpt.info(name).shape) > 0:
        W = ckpt.tensor(name, torch.float32)
        layer = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
        layer.weight.data = W
        model.append(layer)
details = ww.WeightWatcher(model=model).analyze()
print(len(details), file=sys.stderr)
"""


def models() -> dict[str, Path]:
    sys.path.insert(0, str(REPO / "tests"))
    from gguf_models import real_gguf

    from analysis.realmodels import rxnfp_checkpoints

    out = {"rxnfp bert_pretrained": rxnfp_checkpoints()["bert_pretrained"]}
    gguf = real_gguf()
    if gguf is not None:
        out["SmolLM2-135M Q4_1 GGUF"] = gguf
    return out


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds user+sys) of one child process: on a shared machine the CPU time is the
    steadier figure (the wall time also counts the other tenants' share of the cores)."""
    env = {**os.environ, **ONE_THREAD, "PYTHONPATH": str(REPO)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(["nice", *cmd], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-1500:]}")
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "out" / "fit_vs_weightwatcher.json")
    args = p.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, path in models().items():
            runs: dict[str, list[float]] = {"fit": [], "all": [], "ww": []}
            cpu: dict[str, list[float]] = {"fit": [], "all": [], "ww": []}
            for _ in range(args.rounds):
                for s in ("fit", "all"):
                    wall, used = timed([sys.executable, "-m", "diffract_tui", "scan", str(path), "--metrics", s,
                                        "--no-cache", "--quiet", "--threads", "1", "--device", "cpu",
                                        "--out", f"{tmp}/{s}.csv"])
                    runs[s].append(wall)
                    cpu[s].append(used)
                wall, used = timed([sys.executable, "-c", WW_SCRIPT, str(path)])
                runs["ww"].append(wall)
                cpu["ww"].append(used)
            med = {k: statistics.median(v) for k, v in runs.items()}
            mcpu = {k: statistics.median(v) for k, v in cpu.items()}
            results[label] = {"wall": runs, "cpu": cpu, "median_wall": med, "median_cpu": mcpu,
                              "ww_over_fit_cpu": mcpu["ww"] / mcpu["fit"], "ww_over_all_cpu": mcpu["ww"] / mcpu["all"],
                              "ww_over_fit_wall": med["ww"] / med["fit"]}
            print(f"{label}: CPU s fit {mcpu['fit']:.1f}, all {mcpu['all']:.1f}, WW analyze() {mcpu['ww']:.1f} → "
                  f"WW/fit {mcpu['ww'] / mcpu['fit']:.2f}×, WW/all {mcpu['ww'] / mcpu['all']:.2f}×; wall s "
                  f"fit {med['fit']:.1f}, all {med['all']:.1f}, WW {med['ww']:.1f}", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

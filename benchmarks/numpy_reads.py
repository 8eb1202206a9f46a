"""Whole-process CPU of reading every tensor of a checkpoint (float32) in a fresh interpreter: through the
torch-free `Checkpoint.array` vs through `Checkpoint.tensor` (imports included: `import torch` is most of it),
for the real rxnfp bert_pretrained pickle and the real SmolLM2-135M Q4_1 GGUF; rounds interleaved, minimum
per side, one thread.

    python benchmarks/numpy_reads.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

CHILD = """
import json, resource, sys
from analysis.io.checkpoint import open_checkpoint
ckpt = open_checkpoint(sys.argv[1])
read = ckpt.array if sys.argv[2] == "array" else ckpt.tensor
n = sum(read(name, "float32").shape[0] * 0 + 1 for name in ckpt.keys())
u = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps([n, u.ru_utime + u.ru_stime, "torch" in sys.modules]))
"""


def _run(path: Path, mode: str) -> tuple[int, float, bool]:
    """(tensors read, CPU seconds of the whole child process, whether it imported torch)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD, str(path), mode], env=env, capture_output=True, text=True,
                          check=True)
    n, cpu, torch_loaded = json.loads(done.stdout.strip().splitlines()[-1])
    return n, cpu, torch_loaded


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    from gguf_models import real_gguf

    from analysis.realmodels import rxnfp_checkpoints

    models = {"rxnfp bert_pretrained": rxnfp_checkpoints()["bert_pretrained"], "SmolLM2-135M Q4_1 GGUF": real_gguf()}
    for label, path in models.items():
        if path is None:
            print(f"{label}: not installed", file=sys.stderr)
            continue
        cpu: dict[str, list[float]] = {"array": [], "tensor": []}
        torch_used: dict[str, bool] = {}
        for _ in range(args.rounds):
            for mode in cpu:
                n, seconds, torch_used[mode] = _run(path, mode)
                cpu[mode].append(seconds)
        a, t = min(cpu["array"]), min(cpu["tensor"])
        print(f"{label}: {n} tensors; process CPU s array() {a:.2f} (torch imported: {torch_used['array']}), "
              f"tensor() {t:.2f} → {t / a:.1f}× (rounds: array {[round(x, 2) for x in cpu['array']]}, "
              f"tensor {[round(x, 2) for x in cpu['tensor']]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

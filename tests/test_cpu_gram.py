"""The CPU Gram route through numpy (BLAS syrk + OpenBLAS syevd): the same float64/float32 Gram eigenvalues as
torch's gemm + eigvalsh to round-off on real matrices (so every number of every set stays where it was), and
numpy's BLAS threads following the engine's thread policy (2 threads on this machine's one core are ~9× slower)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from analysis.io.checkpoint import open_checkpoint
from analysis.spectral.backend import SpectralSettings
from analysis.spectral.powerlaw_fit import fit_power_law
from analysis.spectral.spectra import _gram_eigvalsh_numpy, eigenvalues

ROOT = Path(__file__).resolve().parents[1]


def _torch_gram_eigvalsh(W: torch.Tensor, work: torch.dtype) -> torch.Tensor:
    """The route as it was: torch gemm + torch.linalg.eigvalsh."""
    Y = W.to(work)
    G = Y @ Y.transpose(-1, -2) if W.shape[-2] <= W.shape[-1] else Y.transpose(-1, -2) @ Y
    return torch.linalg.eigvalsh(G)


def _real_matrices(rxnfp_dirs) -> list[tuple[str, torch.Tensor]]:
    """Real weights of both orientations: rxnfp BERT (wide, tall, square) and SmolLM2 GGUF layers when installed."""
    sys.path.insert(0, str(Path(__file__).parent))
    from gguf_models import real_gguf

    bert = open_checkpoint(rxnfp_dirs["bert_pretrained"])
    names = [n for n in bert.keys() if len(bert.info(n).shape) == 2 and min(bert.info(n).shape) >= 64]
    out = [(f"bert {n}", bert.tensor(n, torch.float32)) for n in names[:8]]
    gguf = real_gguf()
    if gguf is not None:
        smol = open_checkpoint(gguf)
        out += [(f"smollm2 {n}", smol.tensor(n, torch.float32))
                for n in ("layers.0.mlp.up_proj.weight", "layers.0.mlp.down_proj.weight",
                          "layers.3.self_attn.k_proj.weight")]
    return out


def test_numpy_gram_equals_torch_gram_to_round_off_on_real_matrices(rxnfp_dirs):
    torch.set_num_threads(1)
    matrices = _real_matrices(rxnfp_dirs)
    assert len(matrices) >= 8
    assert {W.shape[0] < W.shape[1] for _, W in matrices} == {True, False}  # both orientations
    for name, W in matrices:
        exact = _torch_gram_eigvalsh(W, torch.float64)
        ours = _gram_eigvalsh_numpy(W, torch.float64)
        assert ours.dtype == torch.float64
        assert float((ours - exact).abs().max()) <= 1e-13 * float(exact[-1]), name
        # float32 Gram (gram32, the null's route under `all`), solved in float64: as close to the float64
        # Gram as torch's float32 Gram + float32 eigensolve is, or closer
        ours32, theirs32 = _gram_eigvalsh_numpy(W, torch.float32), _torch_gram_eigvalsh(W, torch.float32)
        assert ours32.dtype == torch.float64
        err, err_torch = (float((e.double() - exact).abs().max()) for e in (ours32, theirs32))
        assert err <= max(2 * err_torch, 1e-6 * float(exact[-1])), (name, err, err_torch)
        # what `fit` reports at the default route moves by round-off only
        lam = eigenvalues(W, SpectralSettings(device="cpu")).cpu()
        old = _torch_gram_eigvalsh(W, torch.float64).clamp_min(0.0) / max(W.shape)
        a, b = fit_power_law(lam), fit_power_law(old)
        assert int(a.n_tail[0]) == int(b.n_tail[0]), name
        for field in ("alpha", "xmin", "ks"):
            x, y = float(getattr(a, field)[0]), float(getattr(b, field)[0])
            assert abs(x - y) <= 1e-9 * abs(y), (name, field, x, y)


def test_large_grams_keep_torchs_eigensolver_and_equal_the_old_route():
    """From TORCH_EIG_FROM up the Gram is numpy's syrk and the eigensolve torch's: still round-off only."""
    from analysis.spectral.spectra import TORCH_EIG_FROM

    with torch.random.fork_rng():
        torch.manual_seed(1)
        W = torch.distributions.StudentT(3.0).sample((TORCH_EIG_FROM, TORCH_EIG_FROM + 64)) * 0.02  # heavy-tailed
    exact = _torch_gram_eigvalsh(W, torch.float64)
    ours = _gram_eigvalsh_numpy(W, torch.float64)
    assert ours.dtype == torch.float64 and ours.shape == exact.shape
    assert float((ours - exact).abs().max()) <= 1e-13 * float(exact[-1])


def test_numpy_gram_takes_stacks_and_equals_the_matrix_by_matrix_result():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(5, 48, 200, generator=g, dtype=torch.float64)
    stacked = _gram_eigvalsh_numpy(X, torch.float64)
    assert stacked.shape == (5, 48)
    for i in range(5):
        assert torch.allclose(stacked[i], _gram_eigvalsh_numpy(X[i], torch.float64), rtol=0, atol=1e-12)


def test_numpy_blas_threads_follow_the_thread_policy():
    """numpy's OpenBLAS starts one thread per vCPU; after the policy it uses the engine's count (read back
    through threadpoolctl, the dependency that sets it)."""
    code = """
import json
from threadpoolctl import threadpool_info
import numpy
from analysis.spectral.backend import apply_thread_policy, clamp_threads
def blas():
    return sorted({i['num_threads'] for i in threadpool_info() if i['internal_api'] == 'openblas'
                   and 'numpy' in i['filepath']})
before = blas()
apply_thread_policy(1)
after_apply = blas()
clamp_threads()
print(json.dumps([before, after_apply, blas()]))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                                            "DIFFRACT_TUI_THREADS")}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    before, after_apply, after_clamp = json.loads(done.stdout)
    if not before:
        pytest.skip("numpy here is not linked to OpenBLAS")
    assert after_apply == after_clamp == [1], done.stdout

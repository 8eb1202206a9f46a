"""The CUDA path (issue 13 item 5): every test here needs a CUDA GPU and is skipped without one; all have
`cuda` in their name, so `pytest -k cuda` (benchmarks/gpu_check.sh) selects them. They use the engine only
(no textual, plotext, platformdirs, gguf or ray: the GPU machine has none) and compare the GPU's numbers
with the CPU's on the same matrices."""

from __future__ import annotations

import math

import pytest
import torch

from analysis.spectral.backend import SpectralSettings, chunks, memory_budget, resolve_device

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytestmark = needs_cuda
GPU, CPU = SpectralSettings(device="cuda"), SpectralSettings(device="cpu")


def _student_t(shape, seed: int, df: float = 3.0) -> torch.Tensor:
    """Heavy-tailed entries (ν = 3): ESDs with power-law tails like trained weights."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g)
    chi = torch.distributions.Chi2(torch.tensor(df)).sample(shape)
    return (z / torch.sqrt(chi / df)).to(torch.float32) * 0.02


def _close(a, b, rel: float) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return abs(a - b) <= rel * max(abs(a), abs(b), 1e-300)
    return a == b


def test_cuda_device_resolves_and_budget_is_half_the_free_memory():
    assert resolve_device("cuda").type == "cuda" and resolve_device("cuda:0").index == 0
    assert resolve_device("auto").type == "cuda"
    free, _ = torch.cuda.mem_get_info(torch.device("cuda", 0))
    assert 0 < memory_budget(torch.device("cuda", 0)) <= free
    assert sum(b - a for a, b in chunks(10, 1 << 30, memory_budget(torch.device("cuda", 0)))) == 10


@pytest.mark.parametrize("route", ["gram64", "gram32", "svd"])
def test_cuda_eigenvalues_match_cpu(route):
    from analysis.spectral.spectra import eigenvalues

    W = _student_t((512, 1536), 1)
    gpu = eigenvalues(W, SpectralSettings(device="cuda", eig_route=route))
    cpu = eigenvalues(W, SpectralSettings(device="cpu", eig_route=route))
    assert gpu.device.type == "cuda"
    tol = 1e-6 if route == "gram32" else 1e-10
    assert torch.allclose(gpu.cpu(), cpu, rtol=0, atol=tol * float(cpu[-1]))


def test_cuda_batched_heads_metrics_match_cpu():
    from analysis.spectral.spectra import batched_spectral_metrics

    Ws = _student_t((8, 128, 1024), 2)
    gpu, cpu = batched_spectral_metrics(Ws, GPU), batched_spectral_metrics(Ws, CPU)
    for g, c in zip(gpu, cpu):
        for k in ("pl_alpha", "pl_esd_xmin", "pl_ks", "stable_rank", "mp_num_spikes", "w1_rand_distance"):
            assert _close(g[k], c[k], 1e-8), (k, g[k], c[k])


@pytest.mark.parametrize("metrics", ["fit", "all"])
def test_cuda_scan_rows_match_cpu(tmp_path, metrics):
    from analysis.generate import write_checkpoint
    from analysis.io.checkpoint import open_checkpoint
    from analysis.run.scan import scan

    kw = dict(num_layers=2, hidden_size=256, num_heads=4, num_kv_heads=2, intermediate_size=512, vocab_size=300,
              tie_word_embeddings=False)
    paths = [write_checkpoint(tmp_path / n, "llama", seed=s, **kw) for n, s in (("a", 0), ("b", 1))]

    def rows(settings):
        ckpts = [open_checkpoint(p) for p in paths]
        return list(scan(ckpts, settings=settings, cache=None, heads=True, delta=True, metrics=metrics))

    gpu, cpu = rows(GPU), rows(CPU)
    assert len(gpu) == len(cpu) > 0
    for g, c in zip(gpu, cpu):
        assert g.keys() == c.keys()
        for k in ("pl_alpha", "pl_esd_xmin", "frob_norm", "stable_rank", "delta_rho"):
            if k in c:
                assert _close(g[k], c[k], 1e-6), (g["tensor"], k, g[k], c[k])


def test_cuda_delta_metrics_match_cpu():
    from analysis.deltas.delta import batched_delta_metrics

    W0 = _student_t((256, 768), 3)
    Wd = W0 + 1e-3 * _student_t((256, 768), 4)
    gpu = batched_delta_metrics(W0.cuda(), Wd.cuda(), settings=GPU, truncation=True)[0]
    cpu = batched_delta_metrics(W0, Wd, settings=CPU, truncation=True)[0]
    for k in ("delta_frob", "delta_rel", "delta_rho", "avg_max_l_agreement", "truncatable_fraction", "pl_alpha"):
        assert _close(float(gpu[k]), float(cpu[k]), 1e-5), (k, gpu[k], cpu[k])

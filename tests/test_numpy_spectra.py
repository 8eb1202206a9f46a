"""The CPU spectral route in numpy (issue 13: a cold CPU scan starts no torch): its eigenvalues have the bits of
the torch route it replaced (fa19fed's, kept below as the reference) on real rxnfp matrices, a batched head stack,
rescaled and float64 weights; numpy and torch inputs give the same numbers and each gets its own kind back."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from analysis.io.checkpoint import open_checkpoint
from analysis.model.architecture import layout_of
from analysis.model.heads import projection_heads
from analysis.spectral import spectra
from analysis.spectral.backend import SpectralSettings, clamp_threads


def _fa19fed_cpu_eigenvalues(W: torch.Tensor, settings: SpectralSettings) -> torch.Tensor:
    """fa19fed's CPU `_eigenvalues`, step for step: unit scaling, compute cast and ldexp in torch, the Gram in
    numpy (syrk), numpy's eigvalsh below TORCH_EIG_FROM, torch's from there, clamp_min(0)/N in torch — but the
    gram32 route's float32 Gram solved in float64, as it is since ENGINE_VERSION 0.4.0 (fa19fed solved it in
    float32: 8.3e-6·λ_max of round-off on a 2048² Gram)."""
    m, n = W.shape[-2:]
    N, M = max(m, n), min(m, n)
    flat = W.reshape(-1, m, n)
    amax = torch.maximum(flat.amax(dim=(-2, -1)), -flat.amin(dim=(-2, -1))).to(torch.float64)
    exponent = torch.frexp(amax).exponent
    if bool((exponent.abs() <= spectra.SAFE_EXPONENT).all()):
        X, exponent = flat, torch.zeros_like(exponent)
    else:
        X = torch.ldexp(flat, (-exponent).to(flat.dtype)[:, None, None])
    X = X.to(settings.torch_dtype)
    work = np.float64 if settings.eig_route == "gram64" else np.float32

    def gram_eig(Z: torch.Tensor) -> torch.Tensor:
        Y = Z.detach().numpy().astype(work, copy=False)
        Yt = Y.swapaxes(-1, -2)
        G = (Y @ Yt if m <= n else Yt @ Y).astype(np.float64, copy=False)
        if M >= spectra.TORCH_EIG_FROM:
            return torch.linalg.eigvalsh(torch.from_numpy(G))
        return torch.from_numpy(np.linalg.eigvalsh(G))

    lam = torch.stack([gram_eig(X[i]) for i in range(X.shape[0])]) if M >= spectra.CPU_LOOP_FROM else gram_eig(X)
    out = torch.ldexp(lam.to(torch.float64), (2 * exponent).to(torch.float64)[:, None])
    return (out.clamp_min(0.0) / N).reshape(*W.shape[:-2], M)


@pytest.fixture(scope="module", autouse=True)
def one_blas_thread() -> None:
    """torch's and numpy's BLAS on one thread before any route runs: the reference sets no thread count, and
    OpenBLAS's round-off depends on it."""
    torch.set_num_threads(1)
    clamp_threads()


@pytest.fixture(scope="module")
def bert(rxnfp_dirs):
    return open_checkpoint(rxnfp_dirs["bert_pretrained"])


def _real(bert) -> list[torch.Tensor]:
    """rxnfp BERT matrices of every shape it has: wide, tall, square (256 to 591 on a side)."""
    names = [n for n in bert.keys() if len(bert.info(n).shape) == 2 and min(bert.info(n).shape) >= 64]
    picked = names[:4] + [n for n in names if "layer.0.intermediate" in n or "layer.0.output.dense" in n]
    return [bert.tensor(n, torch.float32) for n in picked]


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("loop_from", [spectra.CPU_LOOP_FROM, 200])
def test_cpu_eigenvalues_keep_fa19feds_bits_on_real_matrices_and_a_head_stack(bert, monkeypatch, loop_from):
    """Both CPU chunk routes: batched, and matrix by matrix (rxnfp's matrices are below CPU_LOOP_FROM, so the
    second pass lowers it)."""
    monkeypatch.setattr(spectra, "CPU_LOOP_FROM", loop_from)
    layout = layout_of(bert)
    heads = projection_heads(bert, layout, 0, "q", torch.float32)          # (H, d_h, D): the batched route
    mats = _real(bert) + [heads]
    assert {W.shape[-2] < W.shape[-1] for W in mats} == {True, False} and heads.dim() == 3
    for settings in (SpectralSettings(device="cpu"), SpectralSettings(device="cpu", eig_route="gram32")):
        for W in mats:
            want = _fa19fed_cpu_eigenvalues(W, settings).numpy()
            got_t = spectra.eigenvalues(W, settings)
            got_n = spectra.eigenvalues(W.numpy(), settings)
            assert isinstance(got_t, torch.Tensor) and isinstance(got_n, np.ndarray)
            assert _same_bits(got_t.numpy(), want) and _same_bits(got_n, want), (tuple(W.shape), settings.eig_route)


@pytest.mark.parametrize("scale", [2.0 ** 40, 2.0 ** -40, 1.0])
def test_unit_scaling_and_float64_weights_keep_the_bits(bert, scale):
    """np.frexp/np.ldexp scale exactly as torch's did (scaled stacks), float64 compute casts alike."""
    W = bert.tensor(bert.keys()[5], torch.float32)[:96, :200] * scale
    if scale != 1.0:
        assert abs(int(np.frexp(float(W.abs().max()))[1])) > spectra.SAFE_EXPONENT   # the rescaling path runs
    for settings in (SpectralSettings(device="cpu"), SpectralSettings(device="cpu", dtype="float64")):
        for X in (W, W.double(), torch.stack([W, W * 0.5])):
            want = _fa19fed_cpu_eigenvalues(X, settings).numpy()
            assert _same_bits(spectra.eigenvalues(X.numpy(), settings), want), (scale, settings.dtype, X.shape)


def test_large_grams_keep_torchs_eigensolver_bits(monkeypatch):
    """From TORCH_EIG_FROM up the eigensolve is torch's (imported lazily): the same bits as before."""
    monkeypatch.setattr(spectra, "TORCH_EIG_FROM", 64)
    W = torch.randn(80, 130, generator=torch.Generator().manual_seed(3))
    want = _fa19fed_cpu_eigenvalues(W, SpectralSettings(device="cpu")).numpy()
    assert _same_bits(spectra.eigenvalues(W.numpy(), SpectralSettings(device="cpu")), want)


def _equal(a: dict, b: dict) -> bool:
    same = lambda x, y: (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y)) or x == y
    return a.keys() == b.keys() and all(type(a[k]) is type(b[k]) and same(a[k], b[k]) for k in a)


def test_numpy_and_torch_inputs_give_the_same_metrics_under_every_group(bert):
    """Every metric group (the null's and var(W)'s torch steps included) is the same for either kind of input."""
    W = bert.tensor(bert.keys()[5], torch.float32)[:128, :384]
    settings = SpectralSettings(device="cpu")
    a = spectra.spectral_metrics(W, settings)
    b = spectra.spectral_metrics(W.numpy(), settings)
    assert "mp_bulk_var" in a and "w1_rand_distance" in a and "pl_alpha" in a
    assert _equal(a, b)
    stack = torch.stack([W, W.flip(0)])
    rows_t = spectra.batched_spectral_metrics(stack, settings, metrics="fit")
    rows_n = spectra.batched_spectral_metrics(stack.numpy(), settings, metrics="fit")
    assert all(_equal(x, y) for x, y in zip(rows_t, rows_n)) and len(rows_n) == 2
    assert _equal(rows_n[0], spectra.spectral_metrics(W.numpy(), settings, metrics="fit"))


def test_numpy_input_checks_say_what_is_wrong():
    """The input checks and the finiteness pass run in numpy with the same one-line errors."""
    from analysis.errors import DiffractError

    with pytest.raises(DiffractError, match="numpy array or a torch tensor"):
        spectra.eigenvalues([[1.0, 2.0]])
    with pytest.raises(DiffractError, match="real floating-point"):
        spectra.eigenvalues(np.ones((3, 4), dtype=np.int64))
    with pytest.raises(DiffractError, match="matrix or a stack"):
        spectra.eigenvalues(np.ones(4, dtype=np.float32))
    bad = np.ones((3, 4), dtype=np.float32)
    bad[1, 2] = np.nan
    bad[0, 0] = np.inf
    with pytest.raises(spectra.NonFiniteError, match="has 2 NaN/inf entries"):
        spectra.eigenvalues(bad)
    assert spectra.non_finite_entries(np.full((2, 2), 3e38, dtype=np.float32)) == 0     # an overflowing sum only
    ok = spectra.finite_matrices(np.stack([bad, np.zeros_like(bad)]))
    assert isinstance(ok, np.ndarray) and ok.tolist() == [False, True]
    assert np.linalg.LinAlgError in spectra.NUMERIC_ERRORS and torch.linalg.LinAlgError in spectra.NUMERIC_ERRORS


def test_the_numpy_route_follows_the_thread_policy_without_torch():
    """A numpy eigensolve in a fresh interpreter sets numpy's BLAS to the policy's count and imports no torch."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = """
import json, sys
import numpy as np
from threadpoolctl import threadpool_info
from analysis.spectral.spectra import eigenvalues
lam = eigenvalues(np.random.default_rng(0).standard_normal((40, 90)).astype(np.float32))
blas = sorted({i['num_threads'] for i in threadpool_info() if i['internal_api'] == 'openblas' and 'numpy' in i['filepath']})
print(json.dumps([type(lam).__name__, "torch" in sys.modules, blas]))
"""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    env.update(PYTHONPATH=str(root), DIFFRACT_TUI_THREADS="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    kind, has_torch, blas = json.loads(done.stdout)
    assert kind == "ndarray" and not has_torch
    assert blas in ([1], []), blas          # [] where numpy is not linked to OpenBLAS


def test_subnormal_float32_weights_have_a_spectrum():
    """np.ldexp scales subnormal float32 weights up exactly; fa19fed's torch.ldexp formed 2^-e in float32, which
    overflowed to inf for max|W| < 2^-127 (NaN Gram: "Eigenvalues did not converge"). The scaled values are
    exact, so they have the bits of the same weights handed over in float64."""
    W = np.random.default_rng(2).standard_normal((30, 70)).astype(np.float32) * np.float32(1e-41)
    assert np.abs(W).max() < np.finfo(np.float32).tiny and np.count_nonzero(W) > 0.9 * W.size
    settings = SpectralSettings(device="cpu")
    lam = spectra.eigenvalues(W, settings)
    assert np.isfinite(lam).all() and lam[-1] > 0
    assert _same_bits(lam, spectra.eigenvalues(W.astype(np.float64), settings))
    with pytest.raises(np.linalg.LinAlgError), np.errstate(invalid="ignore"):     # the inf·0 of its NaN Gram
        _fa19fed_cpu_eigenvalues(torch.from_numpy(W), settings)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "phi3"])
def test_fused_and_conv1d_modules_read_as_arrays_equal_the_torch_route(tmp_path, monkeypatch, family):
    """`module_array` cuts fused parts (gpt2's Conv1D columns, transposed; neox's interleaved rows; phi3's row
    blocks) with module_matrix's bits and layout, and a CPU scan's rows equal those of the torch read route."""
    from analysis.generate import write_checkpoint
    from analysis.model.heads import module_array, module_matrix
    import analysis.run.scan as scan_mod

    path = write_checkpoint(tmp_path / family, family, seed=5, dtype="bfloat16", num_layers=1, hidden_size=32,
                            num_heads=2, intermediate_size=48, vocab_size=40)
    ckpt = open_checkpoint(path)
    modules = [m for m in layout_of(ckpt).layers[0].modules if scan_mod.is_matrix(m)]
    assert any(m.segments for m in modules)
    for m in modules:
        a, t = module_array(ckpt, m), module_matrix(ckpt, m).numpy()
        assert a.flags.c_contiguous and _same_bits(a, t), m.name
    settings = SpectralSettings(device="cpu")
    ours = list(scan_mod.scan([ckpt], settings=settings, cache=None, metrics="fit"))
    monkeypatch.setattr(scan_mod, "_matrix_array",
                        lambda reader, m, dtype: scan_mod._matrix(reader, m, getattr(torch, dtype)))
    theirs = list(scan_mod.scan([ckpt], settings=settings, cache=None, metrics="fit"))
    assert len(ours) == len(theirs) > len(modules) and all(_equal(x, y) for x, y in zip(ours, theirs))

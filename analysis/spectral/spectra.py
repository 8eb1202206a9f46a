"""Spectra of one matrix or a stack of matrices (SPEC §3): eigenvalues and every named metric.

Eigenvalue route (measured on this 2-vCPU machine, torch 2.13 MKL, 1 thread): the Gram matrix over the
smaller side + `eigvalsh` is 3–7× faster than any SVD (PERF-NOTES). In float32 the Gram squares the
condition number and destroys eigenvalues below ≈1e-6·λ_max: measured on a rank-8 delta 256×1024, float32
Gram puts its zero eigenvalues at up to 3.9e-7·λ_max and the effective rank off by 2.6 %; on a float32
rank-4 delta its α was 1.40 instead of 1.64. A float64 Gram costs ≈2× a float32 Gram here (2048×5632:
0.58 s → 1.17 s; 1024×4096: 0.12 s → 0.23 s; 32 heads 128×4096 batched: 71 ms → 168 ms CPU) and is still
≈3× faster than float32 svdvals passed tall, so the default route ("gram64") ALWAYS forms the Gram in
float64, whatever the compute dtype of W. Against float64 svdvals it agrees to ≤ 3e-15·λ_max absolute over
the whole spectrum and ≤ 1e-14 relative on the tail, on real rxnfp matrices, a Student-t matrix and
low-rank deltas (tests/test_spectra.py::test_gram64_matches_svd_on_real_heavy_tailed_and_delta). The
"gram32" route (float32 Gram, float64 eigensolve; `scan --metrics fit`'s default) forms its Gram ≈2× faster
and agrees on every `fit` column to ≤ 1.5e-5 relative on real matrices, except λ_min, which it leaves empty
below its resolution (`lambda_min_floor`); "svd" is the reference.
Negative eigenvalues (round-off of a rank-deficient Gram) are clipped to 0 and counted (`esd_n_clipped`).
The permuted null's ESD, used only through absolute-scale sums, takes float32 Gram for float32 work
(`null_settings`).

Where the numbers are computed (issue 13: `import torch` was ≈3.3 of a BERT fit scan's 5.9 CPU s): on a CPU
device kind everything runs in numpy — input checks, finiteness, unit scaling (exact), the compute cast, Gram +
eigvalsh, norms, ranks, the power-law fit and the tails — for a numpy array and for a torch tensor alike (a
torch CPU tensor is viewed zero-copy), so a number never depends on which kind the caller passed, and each
caller gets its own kind back. torch is imported only where its routine is the faster or the defining one:
eigvalsh of Grams from TORCH_EIG_FROM, the svd route, the permuted null (torch.randperm's permutation) and
var(W) of the MP group. On a GPU the eigenvalues are torch's, on the device; the fit is numpy's on the host.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from analysis.spectral.backend import (SpectralSettings, chunks, clamp_numpy_threads, clamp_threads, compute_torch,
                                       memory_budget)
from analysis.errors import DiffractError
from analysis.spectral.metric_sets import ALL, GROUPS, MetricSet, metric_set
from analysis.spectral.powerlaw_fit import PowerLawFit, fit_power_law, fit_tails

if TYPE_CHECKING:  # pragma: no cover - typing only: the CPU route is numpy, torch is imported where it must be
    import torch

Matrix = Union[np.ndarray, "torch.Tensor"]   # what the engine's entry points take (and give back the same kind)
HARD_RANK_RTOL = 1e-5
FLOAT_DTYPES = (np.float16, np.float32, np.float64)


def _is_torch(x: Any) -> bool:
    """Whether x is a torch tensor (without importing torch: no tensor exists before torch is imported)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def as_numpy(x: Any) -> np.ndarray:
    """A numpy array or a torch tensor (any device; bfloat16 widened to float32, exactly) as a host array,
    zero-copy where torch allows it."""
    if not _is_torch(x):
        return x
    x = x.detach().cpu()
    if x.dtype == sys.modules["torch"].bfloat16:   # numpy has no bfloat16; every bfloat16 is a float32
        x = x.float()
    return x.numpy()


def _like(result: np.ndarray, W: Any) -> Matrix:
    """`result` in W's kind: a torch CPU tensor (sharing its memory) for a torch W, else the array itself."""
    return sys.modules["torch"].from_numpy(result) if _is_torch(W) else result


def _torch_of(W: Matrix) -> "torch.Tensor":
    """W as a torch tensor (zero-copy from numpy, strides kept): for the steps that are torch's (the permuted
    null, var(W)), so their numbers do not depend on which kind the caller passed."""
    if _is_torch(W):
        return W
    torch = compute_torch()
    return torch.from_numpy(W if all(s >= 0 for s in W.strides) else np.ascontiguousarray(W))


def _cpu_kind(settings: SpectralSettings) -> bool:
    """Whether these settings compute on the CPU: there everything runs in numpy (issue 13: no torch start-up)."""
    return settings.device_kind == "cpu"


def _check_matrix(W: Matrix) -> None:
    if not isinstance(W, np.ndarray) and not _is_torch(W):
        raise DiffractError(f"spectra need a numpy array or a torch tensor, got {type(W).__name__}",
                            hint="pass a (m × n) or (… × m × n) numpy array or torch.Tensor")
    if W.ndim < 2 or W.shape[-1] == 0 or W.shape[-2] == 0:
        raise DiffractError(f"spectra need a matrix or a stack of matrices, got shape {tuple(W.shape)}",
                            hint="pass a (m × n) or (… × m × n) array with m, n ≥ 1")
    real_float = (W.dtype in FLOAT_DTYPES if isinstance(W, np.ndarray)
                  else W.is_floating_point() and not W.is_complex())
    if not real_float:
        raise DiffractError(f"spectra need real floating-point weights, got {W.dtype}",
                            hint="upcast the weights to float32 or float64")
    bad = non_finite_entries(W)
    if bad:
        raise NonFiniteError(f"the matrix of shape {tuple(W.shape)} has {bad} NaN/inf entries, so it has no spectrum",
                             hint=NON_FINITE_HINT)


class NonFiniteError(DiffractError):
    """A matrix with NaN/inf entries has no spectrum: a failure of that one matrix, which a scan lists and
    goes on (the other matrices are still computed)."""


NON_FINITE_HINT = "check the checkpoint (or the delta's dtype) for overflowed weights"


def numeric_errors() -> tuple[type[BaseException], ...]:
    """Errors that sink one matrix, not a whole scan or table: NaN/inf entries, an eigensolver that did not
    converge — numpy's LinAlgError, and torch's once torch is loaded (its eigensolvers: CUDA, big CPU Grams)."""
    torch = sys.modules.get("torch")
    extra = (torch.linalg.LinAlgError,) if torch is not None else ()
    return (NonFiniteError, np.linalg.LinAlgError) + extra


def __getattr__(name: str) -> Any:
    """`NUMERIC_ERRORS` read when asked (`numeric_errors`): a constant made at import would miss torch's
    LinAlgError whenever torch is imported after this module (a torch-free scan that meets a big Gram)."""
    if name == "NUMERIC_ERRORS":
        return numeric_errors()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def failure_reason(err: BaseException) -> str:
    """The reason part of a NUMERIC_ERRORS error for a failure line: its message without the hint."""
    return getattr(err, "message", None) or str(err).splitlines()[0]


def non_finite_entries(W: Matrix) -> int:
    """How many entries of W are NaN/±inf (0 for a clean matrix, cheaply).

    One vectorised sum instead of a bool array of W's size (measured 2.7 ms vs 64 ms on 2048×5632): any
    NaN/inf entry makes the sum non-finite; a non-finite sum of finite entries (overflow) is looked at entry-wise.
    """
    if not _is_torch(W):
        with np.errstate(over="ignore", invalid="ignore"):
            if np.isfinite(W.sum()):
                return 0
        return int(W.size - np.count_nonzero(np.isfinite(W)))
    torch = sys.modules["torch"]
    if bool(torch.isfinite(W.sum())):
        return 0
    return int((~torch.isfinite(W)).sum())


def finite_matrices(Ws: Matrix) -> Matrix:
    """Bool (B,) per matrix of a (B, m, n) stack: True where every entry is finite (the sum fast path first);
    a numpy array for a numpy stack, a torch tensor for a torch one."""
    if not _is_torch(Ws):
        with np.errstate(over="ignore", invalid="ignore"):
            ok = np.isfinite(Ws.sum(axis=(-2, -1)))
        if not ok.all():
            ok = np.isfinite(Ws).reshape(Ws.shape[0], -1).all(axis=1)
        return ok
    torch = sys.modules["torch"]
    ok = torch.isfinite(Ws.sum(dim=(-2, -1)))
    if not bool(ok.all()):
        ok = torch.isfinite(Ws).flatten(1).all(dim=1)
    return ok


def permuted(W: Matrix, seed: int) -> "torch.Tensor":
    """The permuted null of W (`rmt.permuted`: torch.randperm's permutation, kept), imported when asked."""
    from analysis.spectral.rmt import permuted as rmt_permuted

    return rmt_permuted(_torch_of(W), seed)


SAFE_EXPONENT = 16    # max|W| in [2^-17, 2^16): a float32 Gram neither overflows nor underflows, no rescaling
CPU_LOOP_FROM = 512   # from this min(m, n) up, CPU eigen calls go one 2-D matrix at a time (see _eig_chunk)
# from this Gram size up torch's (MKL) eigvalsh beats numpy's (OpenBLAS) on the CPU: measured, 1 thread, float64,
# CPU s numpy/torch: 768² 0.069/0.088, 1024² 0.176/0.232, 1536² 0.633/0.588, 2048² 1.61/1.30
TORCH_EIG_FROM = 1280


def _eig_chunk(X: np.ndarray, route: str) -> np.ndarray:
    """Eigenvalues σ² (ascending, not yet /N) of a (B, m, n) CPU chunk, in numpy.

    On the CPU a batched eigvalsh is slower than 2-D calls for large matrices (measured, torch 2.13 MKL,
    1 thread: one 2048² Gram as (1, M, M) 453 ms vs 428 ms as (M, M) in float64, 366 vs 294 ms in float32;
    16 of them batched 7.1 s vs a loop 6.4 s), while for small ones batching saves Python overhead
    (16 × 64² float64: 2.4 ms vs 9.9 ms) — so large CPU chunks are looped.
    """
    m, n = X.shape[-2:]
    if min(m, n) >= CPU_LOOP_FROM:
        return np.stack([_eig_chunk_batched(X[i], route) for i in range(X.shape[0])])
    return _eig_chunk_batched(X, route)


def _eig_chunk_batched(X: np.ndarray, route: str) -> np.ndarray:
    """`_eig_chunk` for one matrix (m, n) or a stack (B, m, n), in one call per routine."""
    if route == "svd":    # the reference route keeps torch's (MKL) SVD, so its numbers are what they were
        torch = compute_torch()
        clamp_threads()
        m, n = X.shape[-2:]
        T = torch.from_numpy(X)
        tall = T if m >= n else T.transpose(-1, -2)          # MKL's wide SVD is pathological
        s = torch.linalg.svdvals(tall.to(torch.float64))
        return torch.flip(s * s, [-1]).numpy()
    return _gram_eigvalsh_numpy(X, np.float64 if route == "gram64" else np.float32)


def _gram_eigvalsh_numpy(X: Matrix, work: Any) -> Matrix:
    """Gram over the smaller side in `work` (a numpy or torch float dtype) + a float64 eigvalsh, of a CPU (m, n)
    or (B, m, n) stack, through numpy; the result (float64) in X's kind.

    numpy's matmul of an array with its own transpose calls BLAS syrk (one triangle: half the flops of the
    gemm torch makes), and its OpenBLAS syevd beats torch's MKL here (AMD EPYC, 1 thread, float64:
    576×1536 Gram 63 → 25 ms, 49152×576 2.45 → 1.29 s, eigvalsh 576² 40 → 31 ms). The eigensolve is float64
    on every route: a float32 one carries ≈ n·ε₃₂·λ_max of its own (2048² Gram of the 1B Llama's up_proj:
    8.3e-6·λ_max, pl_ks off by 3.8e-4 relative, in MKL's and OpenBLAS's ssyevd alike) against 1.7e-7 for the
    float32 Gram itself, and numpy's eigvalsh works in float64 for a float32 input anyway. From
    TORCH_EIG_FROM up the eigensolve is torch's (faster there: torch is imported for it). numpy's BLAS
    threads follow the engine's policy (`backend.set_numpy_blas_threads`).
    """
    m, n = X.shape[-2:]
    wide = np.float64 if "64" in str(work) else np.float32
    Y = as_numpy(X).astype(wide, copy=False)
    Yt = Y.swapaxes(-1, -2)
    G = (Y @ Yt if m <= n else Yt @ Y).astype(np.float64, copy=False)
    if min(m, n) >= TORCH_EIG_FROM:
        torch = compute_torch()
        clamp_threads()
        lam = torch.linalg.eigvalsh(torch.from_numpy(G)).numpy()
    else:
        lam = np.linalg.eigvalsh(G)
    return _like(lam, X)


def eigenvalues(W: Matrix, settings: SpectralSettings | None = None) -> Matrix:
    """ESD λ = σ²/N ascending, shape (…, M), float64; batched over leading dims in memory-bounded chunks.
    W is first cast to the compute dtype (SPEC §1), then the route's Gram. On a CPU device kind it is all
    numpy (a torch W goes the same way, zero-copy) and the result is W's kind; on a GPU it is torch's,
    on the compute device (a numpy array back for a numpy W)."""
    settings = settings or SpectralSettings()
    _check_matrix(W)
    return _eigenvalues(W, settings)


def _eigenvalues(W: Matrix, settings: SpectralSettings) -> Matrix:
    """`eigenvalues` without the input check, for matrices derived from checked ones (the permuted null)."""
    if _cpu_kind(settings):
        return _like(_eigenvalues_numpy(as_numpy(W), settings), W)
    lam = _eigenvalues_torch(_torch_of(W), settings)
    return lam if _is_torch(W) else lam.cpu().numpy()


def _stack_plan(W: Matrix) -> tuple[int, int, tuple, Matrix, int]:
    """(N, M, leading dims, W as a (B, m, n) stack, bytes one matrix needs while solved) for the chunked eigen
    routes: the CPU (numpy) and GPU (torch) ones cut the same chunks."""
    m, n = W.shape[-2:]
    M = min(m, n)
    return max(m, n), M, tuple(W.shape[:-2]), W.reshape(-1, m, n), 8 * (m * n + 3 * M * M) + 4 * m * n


def _eigenvalues_numpy(W: np.ndarray, settings: SpectralSettings) -> np.ndarray:
    """The CPU route: unit scaling, compute-dtype cast, Gram + eigvalsh per memory chunk, all in numpy."""
    clamp_numpy_threads()        # PERF-NOTES: more threads than physical cores is 3–10× slower in LAPACK
    N, M, lead, flat, per_item = _stack_plan(W)
    out = np.empty((flat.shape[0], M), dtype=np.float64)
    compute = np.dtype(settings.dtype)
    for a, b in chunks(flat.shape[0], per_item, memory_budget("cpu")):
        X, exponent = _unit_scaled(flat[a:b])
        lam = _eig_chunk(X.astype(compute, copy=False), settings.eig_route).astype(np.float64, copy=False)
        out[a:b] = np.ldexp(lam, 2 * exponent[:, None])
    out[out < 0.0] = 0.0                       # clipped as torch's clamp_min did (−0.0 and NaN kept)
    out /= N
    return out.reshape(*lead, M)


def _eigenvalues_torch(W: "torch.Tensor", settings: SpectralSettings) -> "torch.Tensor":
    """The GPU route: the same steps in torch, on the compute device (Gram formed there)."""
    import torch

    device = settings.torch_device
    N, M, lead, flat, per_item = _stack_plan(W)
    out = torch.empty((flat.shape[0], M), dtype=torch.float64, device=device)
    for a, b in chunks(flat.shape[0], per_item, memory_budget(device)):
        X, exponent = _unit_scaled_torch(flat[a:b].to(device=device))
        lam = _eig_chunk_torch(X.to(dtype=settings.torch_dtype), settings.eig_route).to(torch.float64)
        out[a:b] = torch.ldexp(lam, (2 * exponent).to(torch.float64)[:, None])
    out = out.clamp_min(0.0) / N
    return out.reshape(*lead, M)


def _eig_chunk_torch(X: "torch.Tensor", route: str) -> "torch.Tensor":
    """Eigenvalues σ² (ascending, not yet /N) of a (B, m, n) chunk on the GPU, in one call per routine."""
    import torch

    m, n = X.shape[-2:]
    if route == "svd":
        tall = X if m >= n else X.transpose(-1, -2)
        s = torch.linalg.svdvals(tall.to(torch.float64))
        return torch.flip(s * s, [-1])
    Y = X.to(torch.float64 if route == "gram64" else torch.float32)
    G = Y @ Y.transpose(-1, -2) if m <= n else Y.transpose(-1, -2) @ Y
    return torch.linalg.eigvalsh(G.to(torch.float64))   # float64 on every route, as the CPU's


def _unit_scaled(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(X / 2^e, e) per matrix of a (B, m, n) stack, with 2^e the power of two just above max|X|.

    The spectrum is scale-equivariant (λ(cW) = c²λ(W)), so eigenvalues are computed on max|X| ∈ [½, 1)
    and multiplied back by 4^e in float64: weights ×1e25 no longer overflow a float32 Gram (the null's
    route) nor ×1e-25 underflow it. A power of two is exact in every floating-point step (np.frexp/np.ldexp),
    so the result has the same bits as unscaled wherever unscaled neither overflows nor underflows — which is
    why a stack with every |e| ≤ SAFE_EXPONENT is returned as it is (no copy). Done in X's own dtype, before
    the compute cast.
    """
    amax = np.maximum(X.max(axis=(-2, -1)), -X.min(axis=(-2, -1))).astype(np.float64)  # no |X| copy
    exponent = np.frexp(amax)[1]                 # amax = mantissa·2^e, mantissa ∈ [½, 1); 0 → e = 0
    if bool((np.abs(exponent) <= SAFE_EXPONENT).all()):
        return X, np.zeros_like(exponent)
    return np.ldexp(X, -exponent[:, None, None]).astype(X.dtype, copy=False), exponent


def _unit_scaled_torch(X: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
    """`_unit_scaled` in torch, on X's device (the GPU route)."""
    import torch

    amax = torch.maximum(X.amax(dim=(-2, -1)), -X.amin(dim=(-2, -1))).to(torch.float64)
    exponent = torch.frexp(amax).exponent
    if bool((exponent.abs() <= SAFE_EXPONENT).all()):
        return X, torch.zeros_like(exponent)
    return torch.ldexp(X, (-exponent).to(X.dtype)[:, None, None]), exponent


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


# On the float32-Gram route λ_min is reported only from GRAM32_LAMBDA_MIN_FLOOR·ε₃₂·√N·λ_max up: below that it
# is the Gram's round-off, not the matrix (measured on 106 real and 1B-shaped matrices: every eigenvalue within
# 0.21·ε₃₂·√N·λ_max of the float64 Gram's, so a reported λ_min is within 0.21 % of it; rxnfp's layer-8 query
# has λ_min 2.3e-11 where the float32 Gram says 2.2e-10) — an empty cell instead of a wrong number.
GRAM32_LAMBDA_MIN_FLOOR = 100.0


def lambda_min_floor(settings: SpectralSettings, N: int, lam_max: float) -> float:
    """The smallest λ_min the route resolves (0: every one) for a matrix with N = max(m, n) and this λ_max."""
    if settings.eig_route != "gram32":
        return 0.0
    return GRAM32_LAMBDA_MIN_FLOOR * float(np.finfo(np.float32).eps) * math.sqrt(N) * lam_max


def _norms_and_ranks(lam: np.ndarray, N: int, rtol: float, floor: float = 0.0) -> dict[str, Any]:
    """Norms, ranks and ESD statistics of one ascending ESD (λ = σ²/N); λ_min below `floor` (the route's
    resolution, `lambda_min_floor`) is NaN."""
    sig2 = lam * N
    sig = np.sqrt(sig2)
    frob2 = float(np.sum(sig2))
    lam_max = float(lam[-1])
    s_max = float(sig[-1])
    total_sig = float(np.sum(sig))
    if total_sig > 0:
        p = sig[sig > 0] / total_sig
        eff_rank = float(math.exp(-np.sum(p * np.log(p))))
    else:
        eff_rank = math.nan
    return {
        "esd_n": int(lam.size),
        "lambda_max": lam_max,
        "lambda_min": float(lam[0]) if not lam[0] < floor else math.nan,
        "esd_mean": float(np.mean(lam)),
        "esd_std": float(np.std(lam)),
        "esd_n_clipped": int(np.sum(lam <= 0.0)),
        "frob_norm": math.sqrt(frob2),
        "nuclear_norm": total_sig,
        "l2_norm": s_max,
        # WeightWatcher/diffract convention: log_norm = log10 ‖W‖²_F (squared Frobenius norm) and
        # log_spectral_norm = log10 λ_max with λ_max the largest ESD value σ²_max/N (the λ of pl_alpha_weighted).
        "log_norm": math.log10(frob2) if frob2 > 0 else -math.inf,
        "log_spectral_norm": math.log10(lam_max) if lam_max > 0 else -math.inf,
        "stable_rank": frob2 / (s_max * s_max) if s_max > 0 else math.nan,
        "effective_rank": eff_rank,
        "hard_rank": int(np.sum(lam > rtol * lam_max)) if lam_max > 0 else 0,
    }


def _fit_metrics(lam: np.ndarray, fit: PowerLawFit, b: int, settings: SpectralSettings) -> dict[str, Any]:
    """The power-law group of one ESD: α, xmin, KS, tail size, α-weighted and the reliability verdict."""
    alpha = float(fit.alpha[b])
    xmin = float(fit.xmin[b])
    n_tail = int(fit.n_tail[b])
    lam_max = float(lam[-1])
    reasons = []
    if lam.size < settings.fit_min_esd:
        reasons.append(f"ESD has {lam.size} eigenvalues (< {settings.fit_min_esd})")
    if n_tail < settings.fit_min_tail:
        reasons.append(f"tail has {n_tail} eigenvalues (< {settings.fit_min_tail})")
    if not math.isfinite(alpha):
        reasons.append("no power-law fit (fewer than 2 distinct positive eigenvalues)")
    reliable = not reasons
    return {
        "pl_alpha": alpha,
        "pl_esd_xmin": xmin,
        "pl_ks": float(fit.ks[b]),
        "pl_n_tail": n_tail,
        "pl_alpha_weighted": alpha * math.log10(lam_max) if lam_max > 0 and math.isfinite(alpha) else math.nan,
        "pl_alpha_reliable": reliable,
        "fit_reliable": reliable,
        "fit_warning": "; ".join(reasons),
    }


def _tail_metrics(lam: np.ndarray, fit: PowerLawFit, b: int) -> dict[str, Any]:
    """The tails group: truncated power law and exponential from the PL fit's xmin, and the PL-vs-TPL LLR."""
    xmin, alpha = float(fit.xmin[b]), float(fit.alpha[b])
    tails = fit_tails(lam, xmin, alpha)
    return {
        "tpl_alpha": tails.tpl_alpha,
        "tpl_lambda": tails.tpl_lambda,
        "tpl_esd_xmin": xmin,
        "tpl_ks": tails.tpl_ks,
        "expon_lambda": tails.expon_lambda,
        "expon_esd_xmin": xmin,
        "expon_ks": tails.expon_ks,
        "pl_tpl_llr": tails.llr,
        "pl_tpl_p": tails.llr_p,
        "shape": tails.shape,
    }


def _metrics_batch(Ws: Matrix, lam: np.ndarray, settings: SpectralSettings,
                   metrics: MetricSet = ALL) -> list[dict[str, Any]]:
    """The SPEC §3 metric groups `metrics` needs, for a (B, m, n) stack whose ascending ESDs (B, M) are given.

    Each group is computed from the ESD alone (and, for MP/TW/W₁, the permuted null's ESD, whose eigensolve
    runs only when one of those is asked), so a number never depends on the set that asked for it. `lam` is
    on the host (float64); only the MP/TW/W₁ groups (the null's torch.randperm, var(W)) import torch."""
    m, n = Ws.shape[-2:]
    N, M = max(m, n), min(m, n)
    groups = metrics.groups
    fit = fit_power_law(lam, xmin_rule=settings.xmin_rule) if groups & {"pl", "tails"} else None
    lam_np = np.asarray(fit.evals) if fit is not None else np.sort(lam.astype(np.float64, copy=False), axis=-1)
    null = var = None
    if metrics.needs_null:
        from analysis.spectral.rmt import marchenko_pastur, tracy_widom, w1_rand_distance

        Wt = _torch_of(Ws) if _cpu_kind(settings) else _torch_of(Ws).to(settings.torch_device)
        null = as_numpy(_eigenvalues(permuted(Wt, settings.seed), null_settings(settings)))
        if "mp" in groups:
            var = _entry_variances(Wt, lam_np, N, settings)
    rows = []
    for b in range(lam_np.shape[0]):
        row: dict[str, Any] = {}
        if groups & {"norms", "ranks"}:
            base = _norms_and_ranks(lam_np[b], N, settings.rtol,
                                    lambda_min_floor(settings, N, float(lam_np[b][-1])))
            row.update({k: v for g in ("norms", "ranks") if g in groups for k, v in base.items()
                        if k in GROUPS[g]})
        if "pl" in groups:
            row.update(_fit_metrics(lam_np[b], fit, b, settings))
        if "tails" in groups:
            row.update(_tail_metrics(lam_np[b], fit, b))
        if "mp" in groups:
            mp = marchenko_pastur(lam_np[b], null[b], float(var[b]), N, M)
            row.update(mp)
            if "tw" in groups:
                row.update(tracy_widom(lam_np[b], mp["mp_bulk_var"], N, M))
        if "w1" in groups:
            row["w1_rand_distance"] = w1_rand_distance(lam_np[b], null[b])
        rows.append(row)
    return rows


def _entry_variances(Ws: "torch.Tensor", lam: np.ndarray, N: int, settings: SpectralSettings
                     ) -> list[float]:
    """Population var(W) of each compute-dtype matrix: ‖W‖²_F/(mn) − mean², with ‖W‖²_F = N·Σλ read off the
    ESD (the trace of the Gram matrix, already formed in float64) and the mean from row sums in the compute
    dtype added in float64 — one cheap pass over W instead of a float64 copy (2048×5632: 8 ms vs 78 ms).
    Agrees with the direct float64 variance to ≈1e-13 relative on the default route (tests/test_rmt.py; the
    float32-Gram route's ESD carries ~1e-7). Where |mean|² > 1e-6·mean of squares — small matrices, whose mean
    is not negligible by chance (≈ 1/(mn)), where the direct route is cheap anyway, or a real offset — it
    takes the direct route, so the subtraction never cancels more than 6 digits."""
    m, n = Ws.shape[-2:]
    out = []
    for b in range(Ws.shape[0]):
        X = Ws[b].to(dtype=settings.torch_dtype)
        mean = float(X.sum(dim=-1).double().sum()) / (m * n)
        mean_sq = float(np.sum(lam[b])) * N / (m * n)
        if mean * mean > 1e-6 * mean_sq or not (mean_sq > 0):
            out.append(float(X.double().var(correction=0)))
        else:
            out.append(mean_sq - mean * mean)
    return out


def null_settings(settings: SpectralSettings) -> SpectralSettings:
    """Settings for the permuted null's ESD: float32 Gram when W itself is float32.

    The null is only used through absolute-scale sums (MP re-estimate Σλ≤edge, W₁ = mean|λ−λ_rand|), where
    float32 Gram's error (≤ ~1e-6·λ_max per value) is negligible; it saves ≈5× on batched heads
    (32×128×4096: 83 ms vs 420 ms) and ≈2× on whole matrices. Tested: tests/test_spectra.py::test_null_route.
    """
    if settings.dtype == "float32" and settings.eig_route == "gram64":
        return replace(settings, eig_route="gram32")
    return settings


def _given_evals(evals, B: int, M: int) -> np.ndarray:
    """Given eigenvalues (array, tensor or sequence) as ascending host float64 (B, M), clipped at 0."""
    lam = np.array(as_numpy(evals), dtype=np.float64).reshape(B, -1)     # a copy: clipped in place below
    if lam.shape[-1] != M:
        raise DiffractError(f"{lam.shape[-1]} eigenvalues given for matrices with min(m, n) = {M}",
                            hint="pass the eigenvalues of these matrices (eigenvalues(W, settings))")
    lam[lam < 0.0] = 0.0                       # as torch's clamp_min (−0.0 and NaN kept)
    return np.sort(lam, axis=-1)


def batched_spectral_metrics(Ws: Matrix, settings: SpectralSettings | None = None,
                             evals=None, metrics: "MetricSet | str | None" = None) -> list[dict[str, Any]]:
    """SPEC §3 metrics of every matrix of a (…, m, n) stack (e.g. all heads of one projection), using ONE
    batched eigen call per memory chunk and one batched power-law scan; rows in flattened batch order.
    `metrics` (default `all`) names the set: only its groups are computed (metric_sets.py)."""
    _check_matrix(Ws)
    return _checked_batch_metrics(Ws, settings or SpectralSettings(), evals, metrics)


def _checked_batch_metrics(Ws: Matrix, settings: SpectralSettings, evals,
                           metrics: "MetricSet | str | None") -> list[dict[str, Any]]:
    """`batched_spectral_metrics` of a stack `_check_matrix` has passed (its finiteness pass is not repeated)."""
    m, n = Ws.shape[-2:]
    flat = Ws.reshape(-1, m, n)
    B, M = flat.shape[0], min(m, n)
    lam = _given_evals(evals, B, M) if evals is not None else as_numpy(_eigenvalues(flat, settings))
    return _metrics_batch(flat, lam, settings, metric_set(metrics))


def spectral_metrics(W: Matrix, settings: SpectralSettings | None = None, evals=None,
                     metrics: "MetricSet | str | None" = None) -> dict[str, Any]:
    """SPEC §3 metrics of one (m × n) matrix; `evals` = its ESD when already computed (ascending or not);
    `metrics` = the set (default `all`)."""
    _check_matrix(W)
    if W.ndim != 2:
        raise DiffractError(f"spectral_metrics takes one matrix, got shape {tuple(W.shape)}",
                            hint="use batched_spectral_metrics for a stack")
    return _checked_batch_metrics(W[None], settings or SpectralSettings(), evals, metrics)[0]


# --------------------------------------------------------------------------------------------------
# What a chart needs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpectrumResult:
    """One matrix's ESD, its permuted null ESD, its metrics, and the fitted curves a chart draws."""

    evals: np.ndarray
    null_evals: np.ndarray
    metrics: dict[str, Any]
    N: int
    M: int
    lines: dict[str, np.ndarray] = field(default_factory=dict)


def fit_lines(evals: np.ndarray, metrics: dict[str, Any], N: int, M: int, points: int = 200) -> dict[str, np.ndarray]:
    """Density curves in ESD units, scaled to the share of eigenvalues they describe: PL and TPL from xmin
    to λ_max (× n_tail/M, so they overlay a histogram of the whole ESD), MP bulk between its edges."""
    from analysis.spectral.powerlaw_fit import _tpl_J

    out: dict[str, np.ndarray] = {}
    lam_max = float(evals[-1]) if evals.size else math.nan
    xmin, alpha = metrics.get("pl_esd_xmin", math.nan), metrics.get("pl_alpha", math.nan)
    share = metrics.get("pl_n_tail", 0) / max(1, evals.size)
    if math.isfinite(xmin) and xmin > 0 and lam_max > xmin and math.isfinite(alpha):
        x = np.geomspace(xmin, lam_max, points)
        out["pl_x"], out["pl_pdf"] = x, share * (alpha - 1.0) / xmin * (x / xmin) ** (-alpha)
        ta, tl = metrics.get("tpl_alpha", math.nan), metrics.get("tpl_lambda", math.nan)
        if math.isfinite(ta) and math.isfinite(tl):
            c = tl * xmin
            norm = xmin ** (1.0 - ta) * _tpl_J(ta, c)
            out["tpl_x"], out["tpl_pdf"] = x, share * x ** (-ta) * np.exp(-tl * (x - xmin)) / norm
    s2 = metrics.get("mp_bulk_var", math.nan)
    if math.isfinite(s2) and s2 > 0:
        from analysis.spectral.rmt import mp_density      # rmt imports torch (the null): only an MP row needs it

        lo = metrics.get("mp_esd_min", 0.0)
        hi = (1.0 + 1.0 / math.sqrt(N / M)) ** 2 * s2
        x = np.linspace(lo, hi, points)[1:-1]
        out["mp_x"], out["mp_pdf"] = x, mp_density(x, s2, N / M)
    return out


def spectrum_result(W: Matrix, settings: SpectralSettings | None = None) -> SpectrumResult:
    """Everything the ESD chart draws for one matrix: eigenvalues, null eigenvalues, metrics, fit lines."""
    settings = settings or SpectralSettings()
    _check_matrix(W)
    m, n = W.shape[-2:]
    N, M = max(m, n), min(m, n)
    ev = as_numpy(eigenvalues(W, settings))
    metrics = spectral_metrics(W, settings, evals=ev)
    null = as_numpy(eigenvalues(permuted(W, settings.seed), null_settings(settings)))
    return SpectrumResult(ev, null, metrics, N, M, fit_lines(ev, metrics, N, M))

"""Where and how spectra are computed: settings, device, compute threads and memory chunks.

Everything here is pure policy (no numbers about weights): the spectral engine (`analysis.spectral.spectra`)
asks it which device, which dtype, how many threads and how many matrices fit in one batched call.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Iterator

from analysis.errors import DiffractError

if TYPE_CHECKING:  # pragma: no cover - typing only: settings, keys and policy need no torch (issue 13)
    import torch

DTYPE_NAMES = ("float32", "float64")
XMIN_RULES = ("ks", "local_min")
EIG_ROUTES = ("gram64", "gram32", "svd")
THREADS_ENV = "DIFFRACT_TUI_THREADS"
DEFAULT_CPU_BUDGET = 1 << 30          # bytes one batched eigen call may use on the CPU (1 GiB)
CUDA_BUDGET_FRACTION = 0.5            # share of the free GPU memory one batched call may use


@dataclass(frozen=True)
class SpectralSettings:
    """Every setting that changes a spectral number (SPEC §8 provenance), immutable so it can key a cache.

    `dtype` is the compute dtype of W itself (and of ΔW, SPEC §1). `eig_route` says how eigenvalues are
    obtained: "gram64" (default) forms W·Wᵀ over the smaller side in float64 and calls eigvalsh — exact
    over the whole spectrum; "gram32" keeps the Gram in float32 and solves it in float64 (the Gram ≈2×
    faster, a 1B fit scan ≈1.4×; eigenvalues carry ≤ ≈0.21·ε₃₂·√N·λ_max of round-off, measured: on trained,
    full-rank weights every `fit` column agrees with gram64 to ≤ 1.5e-5 relative and λ_min is left empty
    below its resolution, but on a low-rank ΔW the bottom of the spectrum, the effective rank and α can be
    wrong — so it is `scan --metrics fit`'s default, never delta's); "svd" uses svdvals on the tall
    orientation (slowest, the reference).
    """

    device: str = "auto"
    dtype: str = "float32"
    xmin_rule: str = "ks"             # or "local_min" (leftmost significant local minimum of KS(xmin))
    seed: int = 42
    rtol: float = 1e-5
    fit_min_tail: int = 50
    fit_min_esd: int = 100
    eig_route: str = "gram64"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_NAMES:
            raise DiffractError(f"dtype must be float32 or float64, not {self.dtype!r}",
                                hint="use dtype='float32' (default) or 'float64'")
        if self.xmin_rule not in XMIN_RULES:
            raise DiffractError(f"xmin_rule must be one of {', '.join(XMIN_RULES)}, not {self.xmin_rule!r}",
                                hint="use xmin_rule='ks' (global KS minimum) or 'local_min'")
        if self.eig_route not in EIG_ROUTES:
            raise DiffractError(f"eig_route must be one of {', '.join(EIG_ROUTES)}, not {self.eig_route!r}",
                                hint="use eig_route='gram64' (default)")

    @property
    def torch_dtype(self) -> "torch.dtype":
        """The compute dtype as torch's (the one name → dtype map of the engine: `torch_dtypes`)."""
        return torch_dtypes()[self.dtype]

    @functools.cached_property
    def torch_device(self) -> "torch.device":
        """The device string resolved once (`resolve_device`) and carried with the settings."""
        return resolve_device(self.device)

    @functools.cached_property
    def device_kind(self) -> str:
        """The device KIND ("cpu", "cuda", …) numbers are computed on, without importing torch where that is
        certain: "cpu", and "auto" under a torch build without CUDA/ROCm (`torch_build_has_gpu`); otherwise the
        resolved device's kind. A cached rerun of a CPU request thus starts no torch (issue 13)."""
        name = (self.device or "auto").strip().lower()
        if name == "cpu" or (name == "auto" and "torch" not in sys.modules and not torch_build_has_gpu()):
            return "cpu"
        return self.torch_device.type

    def key(self) -> dict:
        """Settings that change numbers, for cache keys and provenance: the device KIND, not its index."""
        key = asdict(self)
        key["device"] = self.device_kind
        return key


def torch_dtypes() -> dict[str, "torch.dtype"]:
    """The compute dtype names → torch dtypes (torch imported on the first call)."""
    import torch

    return {"float32": torch.float32, "float64": torch.float64}


@functools.lru_cache(maxsize=1)
def torch_build_has_gpu() -> bool:
    """True unless the installed torch is a build without CUDA and ROCm, read from its `torch/version.py`
    without importing torch (which costs ≈3 s): such a build's torch.cuda.is_available() is always False.
    Anything unreadable counts as "may have a GPU" (the caller then asks torch itself)."""
    try:
        spec = importlib.util.find_spec("torch")
        text = Path(next(iter(spec.submodule_search_locations or ())), "version.py").read_text()  # type: ignore
        values: dict[str, object] = {}
        for node in ast.parse(text).body:
            target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
            if isinstance(target, ast.Name) and getattr(node, "value", None) is not None:
                values[target.id] = ast.literal_eval(node.value)  # type: ignore[arg-type]
    except (ImportError, StopIteration, OSError, SyntaxError, ValueError, AttributeError, TypeError):
        return True
    return not ("cuda" in values and "hip" in values and values["cuda"] is None and values["hip"] is None)


def resolve_device(device: str) -> "torch.device":
    """"auto" → the first CUDA device when one is usable, else CPU; "cpu"; "cuda"/"cuda:N" if present."""
    import torch

    name = (device or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DiffractError(f"device {device!r} is not available: this torch build sees no CUDA GPU",
                                hint="use --device cpu (or auto)")
        index = 0
        if ":" in name:
            try:
                index = int(name.split(":", 1)[1])
            except ValueError:
                raise DiffractError(f"device {device!r} is not a device name",
                                    hint="use auto, cpu, cuda or cuda:N") from None
        if not 0 <= index < torch.cuda.device_count():
            raise DiffractError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s)",
                                hint=f"use cuda:0 … cuda:{torch.cuda.device_count() - 1}, or cpu")
        return torch.device("cuda", index)
    raise DiffractError(f"device {device!r} is not a device name", hint="use auto, cpu, cuda or cuda:N")


# --------------------------------------------------------------------------------------------------
# Threads: physical cores, never more (PERF-NOTES: 2 threads on one shared core are 3–10× slower)
# --------------------------------------------------------------------------------------------------


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=1)
def physical_cores() -> int:
    """Physical cores this process may run on (read once per process: the engine asks before every eigen
    call, and reading /sys + /proc/cpuinfo each time cost ≈0.7 ms — 10 % of a small matrix's whole scan).

    Counts distinct sibling groups in /sys topology among the CPUs in our affinity mask. Under a
    hypervisor that reports every vCPU as its own core (no SMT siblings visible, as on this machine,
    where 2 "cores" are in fact two hyperthreads of one core), assume the cloud convention
    1 vCPU = 1 hyperthread and halve the count.
    """
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cpus = list(range(os.cpu_count() or 1))
    groups: set[str] = set()
    smt_visible = False
    for cpu in cpus:
        path = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            siblings = path.read_text().strip()
        except OSError:
            groups.add(str(cpu))
            continue
        groups.add(siblings)
        smt_visible |= ("," in siblings or "-" in siblings)
    cores = max(1, len(groups))
    if not smt_visible and "hypervisor" in _cpu_flags() and "ht" in _cpu_flags():
        cores = max(1, cores // 2)
    return cores


def compute_threads() -> int:
    """Threads for LAPACK/BLAS: `$DIFFRACT_TUI_THREADS` when set (a positive integer), else physical cores."""
    raw = os.environ.get(THREADS_ENV, "").strip()
    if raw:
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if value < 1:
            raise DiffractError(f"{THREADS_ENV}={raw!r} is not a positive integer",
                                hint=f"unset {THREADS_ENV} or set it to e.g. 1")
        return value
    return physical_cores()


_numpy_threads_set: list[int] = []
_pending_torch_threads: list[int] = []   # a policy set before torch was imported (`apply_thread_policy(lazy=True)`)


def set_numpy_blas_threads(n: int) -> None:
    """Give numpy's OpenBLAS (the CPU Gram + eigvalsh route) the same thread count as torch: by default it
    starts one thread per vCPU, which on this machine's 2 hyperthreads of one core made a 576² eigvalsh
    9× slower (0.35 s vs 0.04 s). Set once per change, not per call."""
    if _numpy_threads_set == [n]:
        return
    import numpy  # noqa: F401 — loads numpy's BLAS, so that threadpoolctl finds it
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:   # a bare engine install (e.g. the GPU check's machine): BLAS keeps its own count
        return
    threadpool_limits(limits=n, user_api="blas")   # kept (not a context): the process's BLAS pools, every build
    _numpy_threads_set[:] = [n]


def apply_thread_policy(threads: int | None = None, *, lazy: bool = False) -> int:
    """Set torch's intra-op threads to `threads` (default `compute_threads()`); returns the number set.

    An explicit `threads` (e.g. the CLI's --threads) is also written to $DIFFRACT_TUI_THREADS, the one
    documented override, so `clamp_threads` in the engine keeps honouring it. `lazy`: when torch is not
    imported yet, do not import it for this; `compute_torch()` sets the count when compute starts (a cached
    `delta` never imports torch).
    """
    if threads is not None:
        if threads < 1:
            raise DiffractError(f"threads must be ≥ 1, not {threads}", hint="pass --threads 1 or more")
        os.environ[THREADS_ENV] = str(threads)
    n = threads if threads is not None else compute_threads()
    _pending_torch_threads[:] = [n]
    if not lazy or "torch" in sys.modules:
        compute_torch()
    set_numpy_blas_threads(n)
    return n


def compute_torch() -> ModuleType:
    """torch, imported now, with the thread count of an `apply_thread_policy` made before it was imported."""
    import torch

    if _pending_torch_threads:
        n = _pending_torch_threads.pop()
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
    return torch


def clamp_threads() -> int:
    """Never compute with more torch threads than the policy allows (physical cores or the override):
    lowers torch's thread count when it is above `compute_threads()`, never raises it. Returns the count."""
    torch = compute_torch()
    limit = compute_threads()
    if torch.get_num_threads() > limit:
        torch.set_num_threads(limit)
    n = torch.get_num_threads()
    set_numpy_blas_threads(n)
    return n


def clamp_numpy_threads() -> int:
    """`clamp_threads` for the numpy CPU route, without importing torch: torch's own clamp once torch is loaded
    (numpy then follows torch's count, as before), else numpy's BLAS gets the policy's count
    (`compute_threads`); a policy pending for torch stays pending until torch is imported. Returns the count."""
    if "torch" in sys.modules:
        return clamp_threads()
    n = compute_threads()
    set_numpy_blas_threads(n)
    return n


# --------------------------------------------------------------------------------------------------
# Memory budget
# --------------------------------------------------------------------------------------------------


def memory_budget(device: "torch.device | str") -> int:
    """Bytes one batched call may allocate: half the free GPU memory, or 1 GiB on the CPU (`device`: a torch
    device or a device kind such as "cpu")."""
    if getattr(device, "type", device) == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(device)
        return max(1 << 26, int(free * CUDA_BUDGET_FRACTION))
    return DEFAULT_CPU_BUDGET


def chunks(batch_size: int, bytes_per_item: int, budget: int) -> Iterator[tuple[int, int]]:
    """[start, stop) ranges covering `batch_size` items, each range using at most `budget` bytes
    (always at least one item per range, so an item larger than the budget still runs alone)."""
    if batch_size < 0 or bytes_per_item < 0 or budget <= 0:
        raise ValueError(f"chunks({batch_size}, {bytes_per_item}, {budget}): sizes must be ≥ 0, budget > 0")
    per = max(1, budget // max(1, bytes_per_item))
    for start in range(0, batch_size, per):
        yield start, min(batch_size, start + per)

"""Where a scan's, a delta table's or a rewind sweep's work runs: in this process (`LocalExecutor`) or as Ray
tasks (`RayExecutor`, `--executor ray`) on a local Ray started for the run or an existing cluster
(`--ray-address`, default `$RAY_ADDRESS`).

Ray tasks get paths, not tensors: each opens the checkpoints itself (so every node must see them at the same
path — a shared filesystem), computes its share through the same engine code as the local run, writes the
shared cache and returns rows (a sweep task loads the model once and returns the losses of its batch of
candidates). The driver keeps the local executor's row order (results that finish early
wait in a buffer), reports progress as tasks finish, lets Ray retry a task whose worker died (`max_retries`),
and cancels every pending task (`ray.cancel(force=True)`) on cancel, Ctrl-C or an error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from analysis.errors import DiffractError, MatrixFailure

R = TypeVar("R")   # what a task's work returns

if TYPE_CHECKING:  # pragma: no cover
    from analysis.deltas.delta_table import DeltaOptions, DeltaPart, DeltaTable
    from analysis.edit.rewind import RewindInputs
    from analysis.edit.rewind_list import RewindList
    from analysis.eval.evaluator import EvalText
    from analysis.eval.loss import EvalProgress, LossResult
    from analysis.eval.sweep import Candidate
    from analysis.io.checkpoint import Checkpoint
    from analysis.progress import Cancel, Progress
    from analysis.run.cache import Cache
    from analysis.run.scan import _Context, _Item
    from analysis.spectral.backend import SpectralSettings

EXECUTORS: tuple[str, ...] = ("local", "ray")
RAY_INSTALL_HINT = "pip install 'diffract-tui[ray]'"
WORKERS_LACK_PROJECT = "the Ray workers cannot import diffract-tui — install it on every node"
SHARED_FS_HINT = "put the checkpoints on a filesystem every Ray node mounts at the same path"
CONNECT_TIMEOUT_S = 3.0         # an unreachable --ray-address fails in seconds, not after Ray's long retries
PROBE_TIMEOUT_S = 300.0         # the first task may wait for a worker process to start
PROBE_MODULE = "analysis.run.executors"   # what the probe imports on a worker (a test points it elsewhere)
_WAIT_S = 0.2                   # how often the driver polls `cancel` while tasks run


# ------------------------------------------------------------------------------------------------
# Choosing an executor
# ------------------------------------------------------------------------------------------------


class LocalExecutor:
    """Everything in this process: the engine's plain loops (the default)."""

    local = True
    name = "local"

    def close(self) -> None:
        """Nothing to release."""


def import_ray() -> Any:
    """The `ray` module, or one line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise DiffractError("--executor ray needs Ray, which is not installed",
                            hint=f"run: {RAY_INSTALL_HINT} (or use --executor local)") from None
    return ray


def make_executor(name: str = "local", *, address: str | None = None,
                  num_cpus: int | None = None) -> "LocalExecutor | RayExecutor":
    """The executor called `name` ("local" or "ray"); for Ray, connected (or started) now so that a bad
    address or a missing Ray is one line before any work."""
    if name == "local":
        return LocalExecutor()
    if name != "ray":
        raise DiffractError(f"unknown executor {name!r}", hint=f"use --executor {' or '.join(EXECUTORS)}")
    executor = RayExecutor(address=address, num_cpus=num_cpus)
    executor.start()
    return executor


def project_root() -> Path:
    """The folder holding the `analysis` package (a source checkout's root, or site-packages)."""
    import analysis

    return Path(analysis.__file__).resolve().parent.parent


def _runtime_env() -> dict[str, Any]:
    """Workers import the project from the driver's source checkout when it is one (a fresh clone's CI, a
    checkout on a shared filesystem); an installed package is imported as installed."""
    root = project_root()
    if root.name in ("site-packages", "dist-packages"):
        return {}
    paths = [str(root), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}}


def _check_reachable(address: str) -> None:
    """One line at once when nothing listens at a `host:port` (or `ray://host:port`) address."""
    if address in ("auto", "local") or ":" not in address:
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            return
    except (OSError, ValueError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else (str(err) or type(err).__name__)
        raise DiffractError(f"cannot reach the Ray cluster at {address} ({reason})",
                            hint="check --ray-address / $RAY_ADDRESS (`ray status` on the head node)") from None


# ------------------------------------------------------------------------------------------------
# The Ray executor (driver side)
# ------------------------------------------------------------------------------------------------


@dataclass
class RayExecutor:
    """Runs task functions as Ray tasks; results come back in submission order."""

    address: str | None = None          # None: $RAY_ADDRESS, else a local Ray started for the run
    num_cpus: int | None = None         # of a local Ray started here (default: every CPU)
    max_retries: int = 3                # Ray resubmits a task whose worker process died this often
    cpus_per_task: float = 1.0
    local = False
    name = "ray"
    started: bool = field(default=False, init=False)     # this executor called ray.init (and will shut it down)
    cancelled: list = field(default_factory=list, init=False)   # refs cancelled by the last run

    def start(self) -> None:
        """Connect to the cluster (or start a local Ray) unless Ray is already up in this process."""
        ray = import_ray()
        if ray.is_initialized():
            return
        address = self.address or os.environ.get("RAY_ADDRESS") or None
        common = dict(log_to_driver=False, logging_level=logging.ERROR, runtime_env=_runtime_env())
        try:
            if address:
                _check_reachable(address)
                with _quiet_stderr():   # Ray's C++ core logs each failed retry there; the error is our one line
                    ray.init(address=address, **common)
            else:
                with _quiet_stderr():
                    ray.init(address="local", num_cpus=self.num_cpus or os.cpu_count() or 1,  # never a stray cluster
                             include_dashboard=False, **common)
        except DiffractError:
            raise
        except Exception as err:  # ConnectionError, RuntimeError, TimeoutError …: Ray's many ways to say "no"
            where = f"the Ray cluster at {address}" if address else "a local Ray"
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise DiffractError(f"cannot start or reach {where}: {first}",
                                hint="check --ray-address / $RAY_ADDRESS, or use --executor local") from None
        self.started = True

    def close(self) -> None:
        """Stop the local Ray this executor started, or disconnect from the cluster it joined (a cluster keeps
        running); a Ray that was already up in this process is left as it was."""
        ray = sys.modules.get("ray")
        if self.started and ray is not None and ray.is_initialized():
            ray.shutdown()
        self.started = False

    def slots(self, num_gpus: float = 0) -> int:
        """How many tasks the cluster runs at once: its CPUs per task, or its GPUs when a task takes some."""
        ray = import_ray()
        self.start()
        resources = ray.cluster_resources()
        n = resources.get("GPU", 0) / num_gpus if num_gpus else resources.get("CPU", 1) / self.cpus_per_task
        return max(1, int(n))

    def check_workers(self, paths: Sequence[str]) -> list[str]:
        """One probe task on every alive node (pinned there: a multi-host cluster with one bad host is caught):
        the project imports there and every checkpoint path is readable there. Returns the hosts probed."""
        ray = import_ray()
        self.start()
        probe = ray.remote(_probe_function())
        try:
            refs = [probe.options(num_cpus=0, max_retries=self.max_retries, **placement)
                    .remote(PROBE_MODULE, list(paths)) for placement in _node_placements(ray)]
            answers = ray.get(refs, timeout=PROBE_TIMEOUT_S)
        except Exception as err:
            raise DiffractError(f"the Ray workers did not answer ({_first_line(err)})",
                                hint="check the cluster (`ray status`), or use --executor local") from None
        for host, import_error, unreadable in answers:
            if import_error:
                raise DiffractError(f"{WORKERS_LACK_PROJECT} (host {host} lacks it)")
            if unreadable:
                raise DiffractError(f"a Ray worker on host {host} cannot read {unreadable[0]}", hint=SHARED_FS_HINT)
        return [host for host, _, _ in answers]

    def run(self, fn: Callable[[Any], Any], payloads: Sequence[Any], *, num_gpus: float = 0,
            cancel: "Cancel | None" = None, on_result: Callable[[Any], None] | None = None) -> Iterator[Any]:
        """`fn(payload)` of each payload as Ray tasks, yielded in payload order; `on_result(result)` as each
        finishes (any order). `cancel()` turning True, Ctrl-C, an error or closing the iterator cancels every
        pending task and stops (on cancel: without an error)."""
        ray = import_ray()
        self.start()
        self.cancelled = []
        remote = ray.remote(fn).options(num_cpus=self.cpus_per_task, num_gpus=num_gpus, max_retries=self.max_retries,
                                        retry_exceptions=False)
        refs = [remote.remote(p) for p in payloads]
        position = {ref: i for i, ref in enumerate(refs)}
        pending, ready, following = list(refs), {}, 0
        try:
            while following < len(refs):
                if cancel is not None and cancel():
                    self._cancel(ray, pending)
                    return
                if pending:
                    done, pending = ray.wait(pending, num_returns=1, timeout=_WAIT_S)
                    for ref in done:
                        ready[position[ref]] = result = self._result(ray, ref)
                        if on_result is not None:
                            on_result(result)
                while following in ready:
                    yield ready.pop(following)
                    following += 1
        except BaseException:   # KeyboardInterrupt, an error, the consumer closing the generator
            self._cancel(ray, pending)
            raise

    def _cancel(self, ray: Any, pending: list) -> None:
        """Cancel every task not finished yet (running ones are killed: force=True)."""
        for ref in pending:
            try:
                ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 — already finished or gone: nothing left to stop
                pass
        self.cancelled = list(pending)

    def _result(self, ray: Any, ref: Any) -> Any:
        """The task's result; its failure as one line (a worker's own error line, a missing project, a
        worker that died more often than `max_retries`); an engine exception is re-raised as it is."""
        try:
            result = ray.get(ref)
        except ray.exceptions.RayTaskError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, ImportError) or _mentions_import(err):
                raise DiffractError(WORKERS_LACK_PROJECT) from None
            if isinstance(cause, BaseException):
                raise cause from None
            raise DiffractError(f"a Ray task failed: {_first_line(err)}") from None
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError) as err:
            raise DiffractError(f"a Ray worker died {self.max_retries + 1} times running one task ({_first_line(err)})",
                                hint="check the workers' memory (`ray status`), or use --executor local") from None
        except ray.exceptions.RaySystemError as err:
            if _mentions_import(err):
                raise DiffractError(WORKERS_LACK_PROJECT) from None
            raise DiffractError(f"Ray failed: {_first_line(err)}") from None
        if isinstance(result, TaskError):
            raise DiffractError(result.line)
        return result


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """File descriptor 2 sent to /dev/null for the block: Ray's native code writes its retry warnings there,
    past Python's sys.stderr (a failure still ends as the project's one line)."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _node_placements(ray: Any) -> list[dict[str, Any]]:
    """Task options pinning a task to each alive node of the cluster (hard node affinity); one default
    placement when the cluster lists no node."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n.get("NodeID")]
    return [{"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node, soft=False)} for node in nodes] or [{}]


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)


def _mentions_import(err: BaseException) -> bool:
    """A Ray error that is a worker failing to import the project (while unpickling the task function)."""
    text = str(err)
    return "ModuleNotFoundError" in text and any(f"'{m}" in text for m in ("analysis", "diffract_tui"))


_PROBE_SOURCE = '''
def probe(module, paths):
    """Runs on a worker: its host, whether `module` imports, and the paths it cannot read."""
    import importlib, os, socket
    try:
        importlib.import_module(module)
        error = None
    except ImportError as err:
        error = repr(err)
    return socket.gethostname(), error, [p for p in paths if not os.access(p, os.R_OK)]
'''


def _probe_function() -> Callable[..., Any]:
    """The probe, defined outside any importable module so Ray ships it by value: it runs on a worker that
    lacks the project and says so."""
    namespace: dict[str, Any] = {"__name__": "diffract_tui_ray_probe"}
    exec(_PROBE_SOURCE, namespace)  # noqa: S102 — a fixed source string, not input
    return namespace["probe"]


# ------------------------------------------------------------------------------------------------
# What tasks return
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskError:
    """A task's bad input as one line (already formatted with the worker's host)."""

    line: str


@dataclass
class ScanResult:
    """The rows of one (layer group, checkpoint) task, its failures and how many items it ran."""

    rows: list[dict]
    failures: list[MatrixFailure]
    items: int
    label: str


def _open_on_worker(paths: Sequence[str], labels: Sequence[str]) -> "list[Checkpoint] | TaskError":
    """The checkpoints opened on this worker, or the line naming the path and host it cannot read."""
    from analysis.io.checkpoint import open_checkpoint

    opened: list = []
    for path, label in zip(paths, labels):
        try:
            opened.append(open_checkpoint(path, label=label))
        except (DiffractError, OSError) as err:
            for c in opened:
                c.close()
            reason = err.message if isinstance(err, DiffractError) else (err.strerror or str(err))
            return TaskError(f"a Ray worker on host {socket.gethostname()} cannot read {path} ({reason}) — "
                             f"{SHARED_FS_HINT}")
    return opened


def _worker_setup(threads: int) -> None:
    """Compute threads of a task: its CPU share (Ray sets no torch thread count itself), for numpy's BLAS now
    and for torch when the task first computes with it — the CLI's lazy policy, so a task that needs no torch
    (a CPU `fit` scan, a cached delta) never imports it (≈ 3 s of a worker's first task)."""
    from analysis.spectral.backend import apply_thread_policy

    apply_thread_policy(threads, lazy=True)


def _on_worker(paths: Sequence[str], labels: Sequence[str], threads: int, cache_root: str | None,
               work: "Callable[[list[Checkpoint], Cache | None], R]", read_path: str) -> "R | TaskError":
    """Every task's frame: threads set, checkpoints opened (or the line naming path and host), `work` run
    with the shared cache, the cache's staged entries written, the checkpoints closed on every way out; an
    OSError while working names the host and the file (`read_path` when the error carries none)."""
    from analysis.run.cache import Cache, flush_cache

    _worker_setup(threads)
    opened = _open_on_worker(paths, labels)
    if isinstance(opened, TaskError):
        return opened
    cache = Cache(cache_root) if cache_root is not None else None
    try:
        result = work(opened, cache)
        flush_cache(cache)
        return result
    except OSError as err:
        return TaskError(f"a Ray worker on host {socket.gethostname()} cannot read "
                         f"{err.filename or read_path} ({err.strerror or err}) — {SHARED_FS_HINT}")
    finally:
        for c in opened:
            c.close()


# ------------------------------------------------------------------------------------------------
# Scan tasks
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScanTask:
    """One (layer group, checkpoint) share of a scan: what a worker needs to compute it from the paths."""

    paths: tuple[str, ...]          # the base, then the checkpoint (just the base for checkpoint 0)
    labels: tuple[str, ...]
    group: int | None               # layer index, or None for the globals
    heads: bool
    delta: bool
    settings: "SpectralSettings"
    cache_root: str | None
    metrics: str
    threads: int


def scan_task(task: ScanTask) -> "ScanResult | TaskError":
    """Runs on a worker: the rows of the last checkpoint of `task.paths` in one layer group."""
    from analysis.run.scan import _context, _plan_layer, run_plan

    def work(opened: "list[Checkpoint]", cache: "Cache | None") -> ScanResult:
        ctx = _context(opened, task.settings, cache, metrics=task.metrics)
        mine = len(opened) - 1
        plan = [it for it in _plan_layer(ctx, task.group, task.heads, task.delta) if it.ckpt == mine]
        failures: list[MatrixFailure] = []
        rows = [row for _, item_rows in run_plan(ctx, plan, failures.append) for row in item_rows]
        return ScanResult(rows=rows, failures=failures, items=len(plan), label=plan[-1].label if plan else "")

    return _on_worker(task.paths, task.labels, task.threads, task.cache_root, work, task.paths[-1])


def _gpus(settings: "SpectralSettings") -> float:
    """One GPU per task when the work runs on CUDA."""
    return 1.0 if settings.torch_device.type == "cuda" else 0.0


def _task_settings(settings: "SpectralSettings") -> "SpectralSettings":
    """The settings with the device resolved on the driver ("auto" → its kind), so workers key the cache alike."""
    return replace(settings, device=settings.torch_device.type) if settings.device == "auto" else settings


def scan_remote(executor: RayExecutor, ctx: "_Context", groups: Sequence[int | None],
                plans: Sequence[Sequence["_Item"]], *, heads: bool, delta: bool, progress: "Progress | None",
                cancel: "Cancel | None", fail: Callable[[MatrixFailure], None]) -> Iterator[dict]:
    """The scan's rows computed by Ray tasks per (layer group, checkpoint), in the local scan's order."""
    cks = ctx.checkpoints
    paths, labels = [str(c.path) for c in cks], [c.label for c in cks]
    settings = _task_settings(ctx.settings)
    cache_root = str(ctx.cache.root) if ctx.cache is not None else None
    threads = max(1, int(executor.cpus_per_task))
    tasks: list[ScanTask] = []
    for group, plan in zip(groups, plans):
        for i in dict.fromkeys(item.ckpt for item in plan):     # checkpoint order, as the plan has it
            picked = (0,) if i == 0 else (0, i)
            tasks.append(ScanTask(paths=tuple(paths[j] for j in picked), labels=tuple(labels[j] for j in picked),
                                  group=group, heads=heads, delta=delta, settings=settings, cache_root=cache_root,
                                  metrics=ctx.metrics.name, threads=threads))
    if not tasks:
        return
    executor.check_workers(paths)
    total = sum(len(p) for p in plans)
    done = 0

    def finished(result: ScanResult) -> None:
        nonlocal done
        done += result.items
        if progress is not None:
            progress(done, total, result.label)

    fn = globals()["scan_task"]   # looked up at run time (a test wraps it)
    for result in executor.run(fn, tasks, num_gpus=_gpus(ctx.settings), cancel=cancel, on_result=finished):
        for failure in result.failures:
            fail(failure)
        yield from result.rows


# ------------------------------------------------------------------------------------------------
# Delta-table tasks
# ------------------------------------------------------------------------------------------------


DELTA_MATRICES_PER_TASK = 8


@dataclass(frozen=True)
class DeltaTask:
    """One share of a delta table (a batch of whole matrices, or the heads) with what a worker needs."""

    paths: tuple[str, ...]          # the base, then every target
    labels: tuple[str, ...]
    options: "DeltaOptions"
    cache_root: str | None
    part: "DeltaPart"
    threads: int


def delta_task(task: DeltaTask) -> "DeltaTable | TaskError":
    """Runs on a worker: the rows (and, for the heads part, head scores and agreement) of one share."""
    from analysis.deltas.delta_table import build_delta_table

    def work(opened: "list[Checkpoint]", cache: "Cache | None") -> "DeltaTable":
        return build_delta_table(opened[0], opened[1:], options=task.options, cache=cache, part=task.part)

    return _on_worker(task.paths, task.labels, task.threads, task.cache_root, work, task.paths[0])


def delta_remote(executor: RayExecutor, base: "Checkpoint", targets: Sequence["Checkpoint"], *,
                 options: "DeltaOptions", cache: "Cache | None", progress: "Progress | None",
                 cancel: "Cancel | None" = None) -> "DeltaTable":
    """The delta table computed by Ray tasks (batches of matrices, then the heads), assembled on the driver
    exactly as the local build (`analysis.deltas.delta_table.assemble`); raises `Cancelled` on cancel."""
    from analysis.deltas.delta_table import DeltaPart, assemble, plan_delta
    from analysis.progress import Cancelled

    plan = plan_delta(base, targets, options)
    cks = [base, *targets]
    task_options = replace(options, settings=_task_settings(options.settings))
    parts = [DeltaPart(start, min(start + DELTA_MATRICES_PER_TASK, plan.matrices), heads=False)
             for start in range(0, plan.matrices, DELTA_MATRICES_PER_TASK)]
    if plan.heads_on:
        parts.append(DeltaPart(0, 0, heads=True))
    tasks = [DeltaTask(paths=tuple(str(c.path) for c in cks), labels=tuple(c.label for c in cks), options=task_options,
                       cache_root=str(cache.root) if cache is not None else None, part=p,
                       threads=max(1, int(executor.cpus_per_task))) for p in parts]
    executor.check_workers([str(c.path) for c in cks])
    done = 0

    def finished(part_table: "DeltaTable") -> None:
        nonlocal done
        done += part_table.summary.get("ticks", 0)
        if progress is not None:
            progress(done, plan.total, part_table.summary.get("last", "delta"))

    fn = globals()["delta_task"]
    results = list(executor.run(fn, tasks, num_gpus=_gpus(options.settings), cancel=cancel, on_result=finished))
    if len(results) < len(tasks):
        raise Cancelled()
    return assemble(base, targets, options, plan, results)


# ------------------------------------------------------------------------------------------------
# Rewind-sweep tasks
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepJob:
    """One evaluation of a sweep: the target as loaded, one candidate plan, or the base."""

    kind: str                       # "target" | "plan" | "base"
    plan: "RewindList | None" = None
    candidates: int = 0             # how many of the sweep's candidates this plan is (progress)


@dataclass(frozen=True)
class SweepTask:
    """A batch of a sweep's evaluations with what a worker needs: the model is loaded once per task, from the
    target's path, and every job patches and restores it as the local sweep does."""

    paths: tuple[str, str]          # the base, the target
    labels: tuple[str, str]
    device: str                     # the driver's device kind ("cpu", "cuda"): a task's GPU is its cuda:0
    dtype: str
    texts: tuple["EvalText", ...]   # tokenised on the driver: every task sees the same windows
    jobs: tuple[SweepJob, ...]
    cache_root: str | None
    threads: int


@dataclass
class SweepResult:
    """The losses of one task's jobs (per job, per text) and its cache hits and misses."""

    losses: list[list["LossResult"]]
    hits: int
    misses: int
    candidates: int                 # how many of the sweep's candidates its jobs evaluated (progress)


def sweep_task(task: SweepTask) -> "SweepResult | TaskError":
    """Runs on a worker: load the target once, then each job's loss on every text (the local sweep's code)."""
    import torch

    from analysis.eval.evaluator import Evaluator
    from analysis.eval.loss import load_model, parse_dtype
    from analysis.eval.patch import LivePatch
    from analysis.eval.sweep import base_losses, plan_losses, target_losses
    from analysis.model.architecture import layout_of

    def work(opened: "list[Checkpoint]", cache: "Cache | None") -> SweepResult:
        base, target = opened
        device = torch.device(task.device)
        lm = load_model(target.path, device=device, dtype=parse_dtype(task.dtype, device))
        evaluator = Evaluator(lm, target.fingerprint, cache)
        patch = LivePatch(lm.model, base, layout_of(target))
        losses = []
        for i, job in enumerate(task.jobs):
            if job.kind == "target":
                losses.append(target_losses(evaluator, task.texts))
            elif job.kind == "base":   # the target is loaded back only when a job follows
                losses.append(base_losses(evaluator, patch, task.texts, target if i + 1 < len(task.jobs) else None))
            else:
                assert job.plan is not None
                losses.append(plan_losses(evaluator, patch, job.plan, task.texts))
        return SweepResult(losses=losses, hits=evaluator.hits, misses=evaluator.misses,
                           candidates=sum(job.candidates for job in task.jobs))

    return _on_worker(task.paths, task.labels, task.threads, task.cache_root, work, task.paths[-1])


def _batches(jobs: Sequence[SweepJob], count: int) -> list[tuple[SweepJob, ...]]:
    """`jobs` cut into `count` contiguous batches of near-equal size (order kept: the base stays last)."""
    count = max(1, min(count, len(jobs)))
    size, extra = divmod(len(jobs), count)
    out, start = [], 0
    for i in range(count):
        end = start + size + (i < extra)
        out.append(tuple(jobs[start:end]))
        start = end
    return out


@dataclass
class RemoteSweep:
    """The sweep's rows as the local `run_sweep` gives them, with the evaluations' cache hits and misses."""

    rows: list[dict]
    hits: int
    misses: int


def sweep_remote(executor: RayExecutor, candidates: Sequence["Candidate"], texts: Sequence["EvalText"], *,
                 base: "Checkpoint", target: "Checkpoint", device: str, dtype: str, cache: "Cache | None",
                 inputs: "RewindInputs | None" = None, batch: int | None = None,
                 progress: "EvalProgress | None" = None, cancel: "Cancel | None" = None) -> RemoteSweep:
    """A rewind sweep's losses computed by Ray tasks, each loading the model once and evaluating a batch of the
    distinct plans (`batch` per task; default one batch per worker the cluster runs at once), the target first
    and the base last; the rows are assembled as the local sweep's (`sweep_rows`). Raises `Cancelled` on
    cancel."""
    import time
    from collections import Counter

    from analysis.eval.loss import eta_text
    from analysis.eval.sweep import plan_key, sweep_rows, unique_plans
    from analysis.progress import Cancelled

    plans = unique_plans(candidates)
    weight = Counter(plan_key(c.plan) for c in candidates)
    jobs = [SweepJob("target"), *(SweepJob("plan", p, weight[k]) for k, p in plans.items()), SweepJob("base")]
    gpus = 1.0 if device == "cuda" else 0.0
    count = -(-len(jobs) // batch) if batch else executor.slots(gpus)
    paths = (str(base.path), str(target.path))
    tasks = [SweepTask(paths=paths, labels=(base.label, target.label), device=device, dtype=dtype,
                       texts=tuple(texts), jobs=part, cache_root=str(cache.root) if cache is not None else None,
                       threads=max(1, int(executor.cpus_per_task))) for part in _batches(jobs, count)]
    executor.check_workers(list(paths))
    done, start = 0, time.monotonic()

    def finished(result: SweepResult) -> None:
        nonlocal done
        done += result.candidates
        if progress is not None:
            progress(done, len(candidates), eta_text(start, done, len(candidates)))

    fn = globals()["sweep_task"]   # looked up at run time (a test wraps it)
    results = list(executor.run(fn, tasks, num_gpus=gpus, cancel=cancel, on_result=finished))
    if len(results) < len(tasks):
        raise Cancelled()
    losses = [loss for result in results for loss in result.losses]
    memo = dict(zip(plans, losses[1:-1]))
    rows = sweep_rows(candidates, texts, losses[0], memo, losses[-1], inputs)
    return RemoteSweep(rows=rows, hits=sum(r.hits for r in results), misses=sum(r.misses for r in results))

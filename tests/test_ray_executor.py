"""The Ray executor (`--executor ray`, analysis/run/executors.py) on one local Ray cluster started by this
module (2 CPUs, no dashboard, workers' output not sent to the terminal): `scan` and `delta` through Ray write
the same bytes as the local executor, the cache the workers wrote is read back locally without recomputing,
a task whose worker dies is retried, cancel and Ctrl-C stop every task, and a cluster whose workers lack the
project or cannot read a checkpoint is one line. Cancelling tests come last (they kill worker processes)."""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from pathlib import Path

import pytest
import ray  # the `ray` extra, installed by `make test` through [dev]: missing, these tests fail (never skip)

from analysis.generate import write_family  # noqa: E402
from analysis.run import executors  # noqa: E402
from diffract_tui.cli import main  # noqa: E402
from tests.test_hostile_writers import one_line_error, sha_tree  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    """One new local Ray for the module, never a cluster already on the machine (an executor finding Ray up uses
    it and leaves it running)."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env=executors._runtime_env())
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def trio(tmp_path_factory) -> list[Path]:
    """A generated base + two CPT domains (llama, 2 layers, hidden 64, 4 heads, 2 kv heads)."""
    root = tmp_path_factory.mktemp("ray-family")
    write_family(root, num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                 intermediate_size=96, vocab_size=128)
    return [root / "base", root / "math", root / "code"]


def _scan(trio: list[Path], out: Path, *extra: str) -> int:
    return main(["scan", *map(str, trio), "--heads", "--delta", "--threads", "1", "-q", "--out", str(out), *extra])


def _delta(trio: list[Path], out: Path, *extra: str) -> int:
    return main(["delta", *map(str, trio), "--threads", "1", "--out", str(out), *extra])


@pytest.fixture(scope="module")
def local_scan(trio, tmp_path_factory) -> bytes:
    """The local executor's scan table (no cache): the bytes every Ray run must reproduce."""
    out = tmp_path_factory.mktemp("local") / "scan.csv"
    assert _scan(trio, out, "--no-cache") == 0
    return out.read_bytes()


def test_scan_through_ray_writes_the_local_bytes_and_a_local_rerun_reads_the_workers_cache(
        cluster, trio, local_scan, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    out = tmp_path / "ray.csv"
    assert _scan(trio, out, "--executor", "ray", "--cache-dir", str(cache)) == 0
    assert out.read_bytes() == local_scan
    from analysis.run.cache import Cache

    info = Cache(cache).info()   # the workers' entries: packs (one per task) and single-file arrays
    assert info.entries > 0 and info.packs > 0, f"the workers wrote no cache entry: {info}"

    import analysis.run.scan as scan_module

    def no_compute(*args, **kwargs):
        raise AssertionError("a spectrum was recomputed although the workers cached it")

    for name in ("_weight_metrics", "_weight_batch_metrics", "_delta_metrics"):
        monkeypatch.setattr(scan_module, name, no_compute)
    again = tmp_path / "local.csv"
    assert _scan(trio, again, "--cache-dir", str(cache)) == 0
    assert again.read_bytes() == local_scan


def test_delta_through_ray_writes_the_local_bytes_and_its_matrix_entries_are_cached(cluster, trio, tmp_path,
                                                                                     monkeypatch):
    local, remote = tmp_path / "local.json", tmp_path / "ray.json"
    assert _delta(trio, local, "--no-cache") == 0
    cache = tmp_path / "cache"
    assert _delta(trio, remote, "--executor", "ray", "--cache-dir", str(cache)) == 0
    assert remote.read_bytes() == local.read_bytes()

    import analysis.deltas.delta_compute as table_module   # the compute side of delta_table

    def no_compute(*args, **kwargs):
        raise AssertionError("a delta row was recomputed although the workers cached it")

    monkeypatch.setattr(table_module, "batched_delta_metrics", no_compute)
    again = tmp_path / "again.json"
    assert _delta(trio, again, "--cache-dir", str(cache)) == 0
    assert again.read_bytes() == local.read_bytes()


def dies_first(real, marker: str):
    """`real` wrapped so that the first attempt of all (on a worker) kills its process: Ray must retry it."""
    def wrapped(task):
        if not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)
        return real(task)
    return wrapped


def test_a_task_whose_worker_dies_is_retried_and_the_table_is_unchanged(cluster, trio, local_scan, tmp_path,
                                                                       monkeypatch):
    marker = str(tmp_path / "killed-once")
    monkeypatch.setattr(executors, "scan_task", dies_first(executors.scan_task, marker))
    out = tmp_path / "ray.csv"
    assert _scan(trio, out, "--executor", "ray", "--no-cache") == 0
    assert os.path.exists(marker), "no worker was killed: the test tested nothing"
    assert out.read_bytes() == local_scan


def test_workers_without_the_project_are_one_line(cluster, trio, tmp_path, capsys, monkeypatch):
    before = sha_tree(*trio)
    monkeypatch.setattr(executors, "PROBE_MODULE", "diffract_tui_not_installed_here")
    out = tmp_path / "ray.csv"
    capsys.readouterr()
    assert _scan(trio, out, "--executor", "ray") == 1
    one_line_error(capsys.readouterr().err, "the Ray workers cannot import diffract-tui", "install it on every node")
    assert not out.exists() and sha_tree(*trio) == before


def test_a_task_failing_to_import_the_project_is_the_same_line(cluster, trio, tmp_path, capsys, monkeypatch):
    def cannot_import(task):
        raise ModuleNotFoundError("No module named 'analysis'", name="analysis")

    monkeypatch.setattr(executors, "scan_task", cannot_import)
    out = tmp_path / "ray.csv"
    capsys.readouterr()
    assert _scan(trio, out, "--executor", "ray", "--no-cache") == 1
    one_line_error(capsys.readouterr().err, "the Ray workers cannot import diffract-tui")
    assert not out.exists()


def test_a_worker_that_cannot_read_a_checkpoint_names_the_path_and_host(cluster, trio, tmp_path, capsys,
                                                                        monkeypatch):
    before = sha_tree(*trio)
    missing = str(tmp_path / "not-mounted-here" / "base")
    real = executors.scan_task

    def elsewhere(task):      # the worker's filesystem lacks the base's path
        return real(dataclasses.replace(task, paths=(missing, *task.paths[1:])))

    monkeypatch.setattr(executors, "scan_task", elsewhere)
    out = tmp_path / "ray.csv"
    capsys.readouterr()
    assert _scan(trio, out, "--executor", "ray", "--no-cache") == 1
    one_line_error(capsys.readouterr().err, f"a Ray worker on host {socket.gethostname()} cannot read {missing}",
                   "a filesystem every Ray node mounts")
    assert not out.exists() and sha_tree(*trio) == before


def test_the_explorers_compute_all_through_ray_caches_what_a_local_session_reads(cluster, trio, tmp_path,
                                                                                 monkeypatch):
    from analysis.run.session import ExplorerSession
    import analysis.run.scan as scan_module

    cache = tmp_path / "cache"
    session = ExplorerSession.open([str(p) for p in trio], device="cpu", cache_dir=cache)
    session.executor = executors.RayExecutor()
    try:
        count = session.compute_all()
    finally:
        session.close()   # the executor found Ray up: it leaves the module's cluster running

    def no_compute(*args, **kwargs):
        raise AssertionError("a spectrum was recomputed although compute-all's Ray tasks cached it")

    for name in ("_weight_metrics", "_weight_batch_metrics", "_delta_metrics"):
        monkeypatch.setattr(scan_module, name, no_compute)
    again = ExplorerSession.open([str(p) for p in trio], device="cpu", cache_dir=cache)
    try:
        assert again.compute_all() == count > 0
    finally:
        again.close()


def test_results_finishing_out_of_order_are_yielded_in_submission_order(cluster):
    def sleepy(x):   # the first payloads take longest
        import time as t

        t.sleep(0.3 * x)
        return x

    arrived: list[int] = []
    executor = executors.RayExecutor()
    got = list(executor.run(sleepy, [3, 0, 2, 1], on_result=arrived.append))
    assert got == [3, 0, 2, 1]
    assert sorted(arrived) == [0, 1, 2, 3] and arrived != got, "no result came out of order: the test tested nothing"


def test_the_probe_runs_once_on_every_alive_node(cluster, trio, monkeypatch):
    placed: list[dict] = []
    real = executors._node_placements

    def recorded(r):
        placed.extend(real(r))
        return placed

    monkeypatch.setattr(executors, "_node_placements", recorded)
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    hosts = executors.RayExecutor().check_workers([str(p) for p in trio])
    assert hosts == [socket.gethostname()] * len(alive)
    assert {p["scheduling_strategy"].node_id for p in placed} == alive and len(placed) == len(alive)
    assert all(p["scheduling_strategy"].soft is False for p in placed)


def test_one_bad_node_among_good_ones_is_caught(cluster, trio, tmp_path, monkeypatch):
    from analysis.errors import DiffractError

    marker = str(tmp_path / "first-node-answered")

    def probe(module, paths):   # runs on a worker: the first node to answer sees the paths, the other does not
        import os as o

        try:
            o.close(o.open(marker, o.O_CREAT | o.O_EXCL))
            return "good-host", None, []
        except FileExistsError:
            return "bad-host", None, list(paths)

    real = executors._node_placements
    monkeypatch.setattr(executors, "_probe_function", lambda: probe)
    monkeypatch.setattr(executors, "_node_placements", lambda r: real(r) * 2)   # as if the cluster had two nodes
    with pytest.raises(DiffractError, match=f"a Ray worker on host bad-host cannot read {trio[0]}"):
        executors.RayExecutor().check_workers([str(p) for p in trio])


@pytest.mark.slow
def test_real_rxnfp_checkpoints_scan_to_the_same_bytes_through_ray(cluster, rxnfp_dirs, tmp_path):
    pair = [str(rxnfp_dirs["bert_pretrained"]), str(rxnfp_dirs["bert_ft"])]
    local, remote = tmp_path / "local.csv", tmp_path / "ray.csv"
    common = ["scan", *pair, "--threads", "1", "-q", "--no-cache", "--metrics", "fit"]
    assert main([*common, "--out", str(local)]) == 0
    assert main([*common, "--out", str(remote), "--executor", "ray"]) == 0
    assert remote.read_bytes() == local.read_bytes()


# ---- cancelling (kills workers: last) ------------------------------------------------------------


def test_cancel_after_the_first_rows_cancels_every_pending_task(cluster, trio, monkeypatch):
    from analysis.io.checkpoint import open_checkpoint
    from analysis.run.scan import plan_size, scan
    from analysis.spectral.backend import SpectralSettings

    real = executors.scan_task

    def slow_after_first(task):   # every task but the first layer's takes long: still running when cancelled
        if task.group != 0:
            import time as t

            t.sleep(60)
        return real(task)

    monkeypatch.setattr(executors, "scan_task", slow_after_first)
    opened = [open_checkpoint(p) for p in trio]
    executor = executors.RayExecutor()
    rows: list[dict] = []
    start = time.monotonic()
    for row in scan(opened, heads=True, delta=True, settings=SpectralSettings(device="cpu"), cache=None,
                    executor=executor, cancel=lambda: bool(rows)):
        rows.append(row)
    assert time.monotonic() - start < 45, "cancel waited for the running tasks"
    assert 0 < len(rows) < plan_size(opened, heads=True, delta=True)
    assert executor.cancelled, "no task was cancelled"
    with pytest.raises((ray.exceptions.TaskCancelledError, ray.exceptions.WorkerCrashedError)):
        ray.get(executor.cancelled[-1], timeout=30)


@pytest.mark.parametrize("command", ["scan", "delta"])
def test_ctrl_c_cancels_the_tasks_and_writes_nothing(cluster, trio, tmp_path, monkeypatch, command):
    calls = {"wait": 0, "cancel": 0}
    real_wait, real_cancel = ray.wait, ray.cancel

    def interrupted_wait(*args, **kwargs):
        calls["wait"] += 1
        if calls["wait"] == 2:
            raise KeyboardInterrupt
        return real_wait(*args, **kwargs)

    def counted_cancel(*args, **kwargs):
        calls["cancel"] += 1
        return real_cancel(*args, **kwargs)

    monkeypatch.setattr(ray, "wait", interrupted_wait)
    monkeypatch.setattr(ray, "cancel", counted_cancel)
    out = tmp_path / "ray.csv"
    run = _scan if command == "scan" else _delta
    assert run(trio, out, "--executor", "ray", "--no-cache") == 130   # typer's exit status for Ctrl-C
    assert not out.exists()
    assert calls["cancel"] >= 1

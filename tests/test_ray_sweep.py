"""`rewind sweep --executor ray` (analysis/run/executors.py `sweep_remote`/`sweep_task`) on the tiny CPT family and
one local Ray cluster (the `cluster` fixture of tests/test_ray_executor.py: 2 CPUs, no dashboard, workers' output
not printed): the Ray sweep writes the local sweep's bytes, its workers' cache entries serve a local rerun, a
task whose worker dies is retried with the same bytes, a cluster whose workers lack the project or cannot read a
checkpoint is one line, and cancel / Ctrl-C stop the tasks. Few candidates and tiny windows keep it quick;
cancelling tests come last (they kill worker processes)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import time
from pathlib import Path

import pytest
import ray  # the `ray` extra, installed by `make test`: missing, these tests fail (never skip)

from analysis.run import executors
from diffract_tui.cli import eval as eval_cli
from diffract_tui.cli import main
from tests.test_hostile_writers import one_line_error, sha_tree
from tests.test_ray_executor import cluster, dies_first  # noqa: F401 — the module's one local Ray
from tests.tiny_cpt import family  # noqa: F401 — the session's tiny CPT family

T, N = 32, 2   # tokens per window, windows per text: the smallest evaluation that still has two windows


def _inputs(family) -> list[Path]:
    return [family.base, family.code, family.code_text, family.prose_text]


def _sweep(family, out: Path, *extra: str) -> int:
    """A small sweep (greedy and top at f = 0 and 0.5: two distinct plans besides the target) on both texts."""
    return main(["rewind", "sweep", str(family.base), str(family.code), "--text", str(family.code_text),
                 "--general-text", str(family.prose_text), "--patterns", "greedy,top", "--fractions", "0,0.5",
                 "--tokens", str(T), "--windows", str(N), "--device", "cpu", "--threads", "1", "--out", str(out),
                 *extra])


@pytest.fixture(scope="module")
def local_sweep(family, tmp_path_factory) -> bytes:
    """The local executor's sweep table (no cache): the bytes every Ray sweep must reproduce."""
    out = tmp_path_factory.mktemp("local-sweep") / "sweep.csv"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFRACT_TUI_THREADS", "1")   # --threads 1 exports it: restored after the fixture
        assert _sweep(family, out, "--no-cache") == 0
    return out.read_bytes()


def test_a_ray_sweep_writes_the_local_bytes_and_a_local_rerun_reads_the_workers_cache(
        cluster, family, local_sweep, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DIFFRACT_TUI_THREADS", "1")   # --threads 1 exports it: restored after the test
    before = sha_tree(*_inputs(family))
    cache, out = tmp_path / "cache", tmp_path / "ray.csv"
    import analysis.eval.loss as loss_module

    built: list[str] = []   # models transformers builds in THIS process (the driver; tasks run in the workers)
    real_build = loss_module._build
    monkeypatch.setattr(loss_module, "_build", lambda cls, folder, *a, **k: built.append(str(folder))
                        or real_build(cls, folder, *a, **k))
    capsys.readouterr()
    assert _sweep(family, out, "--executor", "ray", "--cache-dir", str(cache)) == 0
    assert "runs in this process" not in capsys.readouterr().err
    assert out.read_bytes() == local_sweep
    assert sha_tree(*_inputs(family)) == before
    assert built == []      # the driver read config + tokenizer only: no second copy of the model beside the tasks'

    import analysis.eval.evaluator as evaluator_module

    def no_eval(*args, **kwargs):
        raise AssertionError("a loss was evaluated although the Ray workers cached it")

    monkeypatch.setattr(evaluator_module, "evaluate", no_eval)
    again = tmp_path / "local.csv"
    assert _sweep(family, again, "--cache-dir", str(cache)) == 0
    assert again.read_bytes() == local_sweep
    assert " 0 evaluated" in capsys.readouterr().err
    assert built == [str(family.code)]   # the local sweep builds its one model here (the probe sees builds)


def test_one_evaluation_per_task_gives_the_same_bytes_and_progress_per_task(cluster, family, local_sweep, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFRACT_TUI_THREADS", "1")
    seen: list[int] = []
    real = executors.sweep_remote

    def counted(executor, candidates, texts, **kwargs):
        real_run = executor.run

        def run(fn, payloads, **kw):
            seen.append(len(payloads))
            return real_run(fn, payloads, **kw)

        executor.run = run
        return real(executor, candidates, texts, **kwargs)

    ticks: list[tuple[int, int]] = []

    @contextlib.contextmanager
    def recorded(description):
        yield lambda done, total, text: ticks.append((done, total))

    monkeypatch.setattr(executors, "sweep_remote", counted)
    monkeypatch.setattr(eval_cli, "eta_progress", recorded)
    out = tmp_path / "ray.csv"
    assert _sweep(family, out, "--executor", "ray", "--no-cache", "--batch", "1") == 0
    assert out.read_bytes() == local_sweep
    assert seen and seen[0] >= 4, f"--batch 1 did not make one task per evaluation: {seen}"
    # progress as each task finishes: one tick per task, ending at every candidate (greedy and top × 2 fractions)
    assert len(ticks) == seen[0] and ticks[-1] == (4, 4), ticks
    assert [done for done, _ in ticks] == sorted(done for done, _ in ticks)


def test_a_sweep_task_whose_worker_dies_is_retried_and_the_table_is_unchanged(cluster, family, local_sweep,
                                                                             tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFRACT_TUI_THREADS", "1")
    marker = str(tmp_path / "killed-once")
    monkeypatch.setattr(executors, "sweep_task", dies_first(executors.sweep_task, marker))
    out = tmp_path / "ray.csv"
    assert _sweep(family, out, "--executor", "ray", "--no-cache") == 0
    assert os.path.exists(marker), "no worker was killed: the test tested nothing"
    assert out.read_bytes() == local_sweep


def test_sweep_workers_without_the_project_are_one_line(cluster, family, tmp_path, capsys, monkeypatch):
    before = sha_tree(*_inputs(family))
    monkeypatch.setattr(executors, "PROBE_MODULE", "diffract_tui_not_installed_here")
    out = tmp_path / "ray.csv"
    capsys.readouterr()
    assert _sweep(family, out, "--executor", "ray", "--no-cache") == 1
    one_line_error(capsys.readouterr().err, "the Ray workers cannot import diffract-tui", "install it on every node")
    assert not out.exists() and sha_tree(*_inputs(family)) == before


def test_a_sweep_worker_that_cannot_read_the_target_names_the_path_and_host(cluster, family, tmp_path, capsys,
                                                                            monkeypatch):
    before = sha_tree(*_inputs(family))
    missing = str(tmp_path / "not-mounted-here" / "code")
    real = executors.sweep_task

    def elsewhere(task):      # the worker's filesystem lacks the target's path
        return real(dataclasses.replace(task, paths=(task.paths[0], missing)))

    monkeypatch.setattr(executors, "sweep_task", elsewhere)
    out = tmp_path / "ray.csv"
    capsys.readouterr()
    assert _sweep(family, out, "--executor", "ray", "--no-cache") == 1
    one_line_error(capsys.readouterr().err, f"a Ray worker on host {socket.gethostname()} cannot read {missing}",
                   "a filesystem every Ray node mounts")
    assert not out.exists() and sha_tree(*_inputs(family)) == before


# ---- cancelling (kills workers: last) ------------------------------------------------------------


def test_cancel_after_the_first_task_cancels_every_pending_sweep_task(cluster, family, monkeypatch):
    import torch

    from analysis.edit.rewind import checkpoint_ref, rewind_inputs
    from analysis.eval.evaluator import prepare_text
    from analysis.eval.loss import load_model
    from analysis.eval.sweep import sweep_candidates
    from analysis.eval.texts import load_text
    from analysis.io.checkpoint import open_checkpoint
    from analysis.progress import Cancelled

    real = executors.sweep_task

    def slow_after_first(task):   # every task but the target's takes long: still running when cancelled
        if task.jobs[0].kind != "target":
            import time as t

            t.sleep(60)
        return real(task)

    monkeypatch.setattr(executors, "sweep_task", slow_after_first)
    b, t = open_checkpoint(family.base), open_checkpoint(family.code)
    lm = load_model(family.code, device=torch.device("cpu"), dtype=torch.float32)
    texts = [prepare_text(lm, load_text(family.code_text), T, N)]
    cands = sweep_candidates(rewind_inputs(b, t, None), base=checkpoint_ref(b), target=checkpoint_ref(t),
                             reference=None, patterns=["greedy", "top"], fractions=[0.25, 0.5])
    executor = executors.RayExecutor()
    ticks: list[int] = []
    start = time.monotonic()
    with pytest.raises(Cancelled):
        executors.sweep_remote(executor, cands, texts, base=b, target=t, device="cpu", dtype="float32", cache=None,
                               batch=1, progress=lambda done, total, text: ticks.append(done),
                               cancel=lambda: bool(ticks))
    assert time.monotonic() - start < 45, "cancel waited for the running tasks"
    assert ticks, "no task finished before the cancel: the test tested nothing"
    assert executor.cancelled, "no task was cancelled"
    with pytest.raises((ray.exceptions.TaskCancelledError, ray.exceptions.WorkerCrashedError)):
        ray.get(executor.cancelled[-1], timeout=30)


def test_ctrl_c_cancels_the_sweep_tasks_and_writes_nothing(cluster, family, tmp_path, monkeypatch):
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
    assert _sweep(family, out, "--executor", "ray", "--no-cache") == 130   # typer's exit status for Ctrl-C
    assert not out.exists()
    assert calls["cancel"] >= 1

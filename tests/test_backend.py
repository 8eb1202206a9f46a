"""Spectral settings, device resolution, thread policy and the memory chunker."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from analysis.spectral import backend
from analysis.spectral.backend import (SpectralSettings, apply_thread_policy, chunks, compute_threads, physical_cores,
                              resolve_device)
from analysis.errors import DiffractError


def test_settings_defaults_and_key():
    """Contract defaults; key() carries every number-changing setting with the device KIND, is JSON-plain,
    and differs when dtype, rule, seed or route differ."""
    s = SpectralSettings(device="cpu")
    assert (s.dtype, s.xmin_rule, s.seed, s.rtol, s.fit_min_tail, s.fit_min_esd) == ("float32", "ks", 42, 1e-5, 50, 100)
    k = s.key()
    assert k["device"] == "cpu" and k["dtype"] == "float32" and k["eig_route"] == "gram64"
    assert set(k) >= {"device", "dtype", "xmin_rule", "seed", "rtol", "fit_min_tail", "fit_min_esd"}
    for change in ({"dtype": "float64"}, {"xmin_rule": "local_min"}, {"seed": 1}, {"eig_route": "svd"}):
        assert SpectralSettings(device="cpu", **change).key() != k
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.seed = 3  # type: ignore[misc]
    assert SpectralSettings(device="cpu", dtype="float64").torch_dtype is torch.float64


@pytest.mark.parametrize("field,value", [("dtype", "bfloat16"), ("xmin_rule", "best"), ("eig_route", "qr")])
def test_bad_settings_are_one_line_errors(field, value):
    with pytest.raises(DiffractError) as e:
        SpectralSettings(**{field: value})
    assert "\n" not in str(e.value) and value in str(e.value)


def test_resolve_device():
    """cpu and auto work everywhere; cuda on a machine without CUDA is a one-line DiffractError; names are
    case-insensitive; nonsense is refused."""
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("CPU") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        for name in ("cuda", "cuda:0"):
            with pytest.raises(DiffractError) as e:
                resolve_device(name)
            assert "\n" not in str(e.value) and "--device cpu" in str(e.value)
    else:
        with pytest.raises(DiffractError):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
    for bad in ("gpu", "cuda:x", "tpu"):
        with pytest.raises(DiffractError):
            resolve_device(bad)


def test_threads_env_override_and_bad_value(monkeypatch):
    """$DIFFRACT_TUI_THREADS wins; a non-positive or non-integer value is a one-line error; unset → physical
    cores (≥ 1, ≤ the CPUs we may run on)."""
    monkeypatch.setenv("DIFFRACT_TUI_THREADS", "3")
    assert compute_threads() == 3
    for bad in ("0", "-2", "many"):
        monkeypatch.setenv("DIFFRACT_TUI_THREADS", bad)
        with pytest.raises(DiffractError) as e:
            compute_threads()
        assert "\n" not in str(e.value)
    monkeypatch.delenv("DIFFRACT_TUI_THREADS")
    import os
    assert 1 <= compute_threads() == physical_cores() <= len(os.sched_getaffinity(0))


def test_hypervisor_without_visible_smt_is_halved(monkeypatch, tmp_path):
    """This machine's case: 2 vCPUs that /sys reports as 2 single-thread cores under a hypervisor with the
    ht flag are one physical core (PERF-NOTES: 2 LAPACK threads were 3–10× slower) → 1 thread."""
    monkeypatch.setattr(backend, "_cpu_flags", lambda: {"hypervisor", "ht", "avx2"})
    monkeypatch.setattr(backend.os, "sched_getaffinity", lambda pid: {0, 1})
    real_path = backend.Path

    def fake_path(p):
        text = str(p)
        if text.startswith("/sys/devices/system/cpu/cpu") and text.endswith("thread_siblings_list"):
            cpu = text.split("/cpu/cpu")[1].split("/")[0]
            f = tmp_path / f"sib{cpu}"
            f.write_text(f"{cpu}\n")
            return f
        return real_path(p)

    monkeypatch.setattr(backend, "Path", fake_path)
    physical_cores.cache_clear()          # read once per process: forget the real machine's answer
    try:
        assert physical_cores() == 1
        monkeypatch.setattr(backend, "_cpu_flags", lambda: {"avx2"})      # bare metal: 2 real cores
        physical_cores.cache_clear()
        assert physical_cores() == 2
    finally:
        physical_cores.cache_clear()


def test_apply_thread_policy_and_engine_clamp(monkeypatch):
    """An explicit count is set and becomes the override; the engine lowers torch's threads to the policy
    before an eigen call (never raises them)."""
    from analysis.spectral.spectra import eigenvalues

    before = torch.get_num_threads()
    monkeypatch.setenv("DIFFRACT_TUI_THREADS", "1")   # records the original state, so teardown restores it
    monkeypatch.delenv("DIFFRACT_TUI_THREADS")
    try:
        assert apply_thread_policy(1) == 1 and torch.get_num_threads() == 1
        assert compute_threads() == 1
        monkeypatch.setenv("DIFFRACT_TUI_THREADS", "1")
        torch.set_num_threads(2)
        eigenvalues(torch.randn(4, 6), SpectralSettings(device="cpu"))
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("DIFFRACT_TUI_THREADS", "2")
        eigenvalues(torch.randn(4, 6), SpectralSettings(device="cpu"))
        assert torch.get_num_threads() == 1                       # clamps down only
        with pytest.raises(DiffractError):
            apply_thread_policy(0)
    finally:
        torch.set_num_threads(before)


def test_chunks_cover_the_batch_within_budget():
    """Every item exactly once, in order; each chunk's bytes ≤ budget; an item bigger than the budget runs alone."""
    assert list(chunks(10, 3, 7)) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert list(chunks(5, 100, 1)) == [(i, i + 1) for i in range(5)]
    assert list(chunks(0, 10, 10)) == []
    for B, item, budget in ((32, 128 * 4096 * 8, 64 << 20), (7, 1000, 10_000), (100, 1, 1 << 30)):
        ranges = list(chunks(B, item, budget))
        assert [i for a, b in ranges for i in range(a, b)] == list(range(B))
        assert all((b - a) * item <= budget or b - a == 1 for a, b in ranges)
    with pytest.raises(ValueError):
        list(chunks(3, 1, 0))


def test_eigenvalues_respects_the_chunker(monkeypatch):
    """With a tiny memory budget a 9-matrix batch is computed in several chunks with identical results."""
    from analysis.spectral import spectra

    Ws = torch.randn(9, 8, 20, generator=torch.Generator().manual_seed(0))
    whole = spectra.eigenvalues(Ws, SpectralSettings(device="cpu"))
    calls = []
    real = spectra._eig_chunk
    monkeypatch.setattr(spectra, "memory_budget", lambda device: 3 * (8 * (8 * 20 + 3 * 64) + 4 * 8 * 20))
    monkeypatch.setattr(spectra, "_eig_chunk", lambda X, route: calls.append(X.shape[0]) or real(X, route))
    chunked = spectra.eigenvalues(Ws, SpectralSettings(device="cpu"))
    assert calls == [3, 3, 3]
    assert torch.allclose(chunked, whole, rtol=1e-12, atol=0)

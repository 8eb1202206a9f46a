"""The engine's seams (issue 10 A): the heads grids computed by the engine behind the session with cache keys
carrying the session's real dtype and device kind; one settings object (DeltaOptions holds SpectralSettings,
device resolved once); one progress-and-cancel protocol; one provenance helper that never imports the app."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from analysis.generate import write_family
from analysis.progress import Cancelled
from analysis.run.session import ExplorerSession
from analysis.spectral.backend import SpectralSettings

CONFIG = dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2)
L, H = 2, 4


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return write_family(tmp_path_factory.mktemp("family"), **CONFIG)


def _open(family, cache_dir: Path, dtype: str = "float32") -> ExplorerSession:
    return ExplorerSession.open([family.base, family.domains["math"], family.domains["code"]], cache_dir=cache_dir,
                                settings=SpectralSettings(device="cpu", dtype=dtype))


class KeyLog:
    """Wraps a Cache and records the keyword arguments of every `key()` call."""

    def __init__(self, cache):
        self._cache = cache
        self.calls: list[dict] = []

    def key(self, **parts):
        self.calls.append(parts)
        return self._cache.key(**parts)

    def __getattr__(self, name):
        return getattr(self._cache, name)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_grid_cache_keys_carry_the_sessions_dtype_and_device(family, tmp_path, dtype) -> None:
    """Every grid entry is keyed with the session's compute dtype and resolved device kind (was: always
    float32/cpu, so a float64 or GPU session read float32 CPU numbers)."""
    s = _open(family, tmp_path / "cache", dtype)
    try:
        s.cache = KeyLog(s.cache)
        s.magnitude_grids(0)
        s.a1_grid(0, "q")
        s.agreement_grids()
        assert {c["operation"].split("/")[1] for c in s.cache.calls} >= {"head-energies", "a1-grid",
                                                                         "domain-agreement"}
        assert {(c["dtype"], c["device_kind"]) for c in s.cache.calls} == {(dtype, "cpu")}
    finally:
        s.close()


def test_grids_are_typed_results_and_float64_keys_do_not_hit_float32_entries(family, tmp_path) -> None:
    """The session returns typed grids (L × H); a float64 session does not reuse a float32 session's entries."""
    from analysis.run.session import AgreementGrids, HeadGrid, MagnitudeGrids

    s32 = _open(family, tmp_path / "cache")
    try:
        mg = s32.magnitude_grids(0)
        a1 = s32.a1_grid(0, "k")
        ag = s32.agreement_grids()
        assert isinstance(mg, MagnitudeGrids) and set(mg.grids) == {"all", "q", "k", "v", "o"}
        assert isinstance(a1, HeadGrid) and a1.values.shape == (L, H) and a1.kv_grouped
        assert isinstance(ag, AgreementGrids) and ag.pairs == ((0, 1),)
        assert set(ag.counts) == {("a2", (0, 1)), ("a3", (0, 1)), ("a2", ("mean",)), ("a3", ("mean",))}
        assert sum(ag.counts[("a2", (0, 1))].values()) == L * H
        n32 = len(list((tmp_path / "cache").rglob("*")))
    finally:
        s32.close()
    s64 = _open(family, tmp_path / "cache", "float64")
    try:
        mg64 = s64.magnitude_grids(0)
        assert len(list((tmp_path / "cache").rglob("*"))) > n32   # new entries, not float32's
        np.testing.assert_allclose(mg64.grids["all"], mg.grids["all"], rtol=1e-5)
    finally:
        s64.close()


def test_long_grid_calls_stop_on_cancel_and_report_done_total_text(family, tmp_path) -> None:
    """The engine's one protocol: progress(done, total, text) with done ≤ total, and Cancelled when cancel()."""
    s = _open(family, tmp_path / "cache")
    try:
        seen: list[tuple] = []
        s.magnitude_grids(0, progress=lambda d, t, text: seen.append((d, t, text)))
        assert seen and all(isinstance(d, int) and t == L and d <= t and isinstance(x, str) for d, t, x in seen)
        with pytest.raises(Cancelled):
            s.agreement_grids(cancelled=lambda: True)
        with pytest.raises(Cancelled):
            s.alpha_grid(0, "q", cancelled=lambda: True)
        with pytest.raises(Cancelled):
            s.rewind_inputs(0, 1, cancelled=lambda: True)
    finally:
        s.close()


def test_the_views_worker_adapts_the_protocol_once() -> None:
    from diffract_tui.views.worker import status_of

    assert status_of(3, 10, "layer 2") == (0.3, "3/10 layer 2")
    assert status_of(7, None, "writing") == (None, "writing")
    assert status_of(1, 1, "done") == (1.0, "done")


def test_delta_options_hold_one_spectral_settings() -> None:
    """No re-declared device/dtype/xmin_rule/seed: they live in the SpectralSettings the options carry."""
    from analysis.deltas.delta_table import DeltaOptions

    names = {f.name for f in dataclasses.fields(DeltaOptions)}
    assert not names & {"device", "dtype", "xmin_rule", "seed"}
    assert isinstance(DeltaOptions().settings, SpectralSettings)


def test_the_device_is_resolved_once_per_settings(monkeypatch) -> None:
    import analysis.spectral.backend as backend

    calls = []
    real = backend.resolve_device
    monkeypatch.setattr(backend, "resolve_device", lambda d: calls.append(d) or real(d))
    s = SpectralSettings(device="cpu")
    for _ in range(3):
        s.key()
        assert s.torch_device.type == "cpu"
    assert calls == ["cpu"]


def test_one_dtype_map() -> None:
    """The name → torch dtype map lives in analysis.spectral.backend only."""
    root = Path(__file__).resolve().parents[1] / "analysis"
    holders = [p.relative_to(root).as_posix() for p in root.rglob("*.py")
               if '"float64": torch.float64' in p.read_text()]
    assert holders == ["spectral/backend.py"]


def test_provenance_names_tool_engine_inputs_and_settings(family) -> None:
    from importlib.metadata import version

    from analysis import ENGINE_VERSION
    from analysis.io.checkpoint import open_checkpoint
    from analysis.run.provenance import provenance, tool_version

    assert tool_version() == f"diffract-tui {version('diffract-tui')}"
    ck = open_checkpoint(family.base)
    try:
        p = provenance([ck], SpectralSettings(device="cpu", dtype="float64"), command="test")
    finally:
        ck.close()
    assert p["created_by"] == tool_version() and p["engine_version"] == ENGINE_VERSION and p["command"] == "test"
    assert p["checkpoints"] == [{"path": str(ck.path), "fingerprint": ck.fingerprint, "label": ck.label}]
    assert p["settings"]["dtype"] == "float64" and p["settings"]["device"] == "cpu"


def test_provenance_falls_back_when_the_package_is_not_installed(monkeypatch) -> None:
    import importlib.metadata as md

    from analysis.run import provenance as prov

    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(md, "version", missing)
    assert prov.tool_version() == f"diffract-tui {prov.SOURCE_TREE_VERSION}"

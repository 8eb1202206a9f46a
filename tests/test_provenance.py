"""The one provenance builder (`analysis.run.provenance`): its fields, the tool version read without importing
the app, and that `scan` and `delta` stamp the same inputs with the same provenance."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from analysis import ENGINE_VERSION
from analysis.io.checkpoint import open_checkpoint
from analysis.run.provenance import provenance, tool_version
from analysis.run.tables import read_table
from analysis.spectral.backend import SpectralSettings
from diffract_tui import __version__
from diffract_tui.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_the_tool_version_is_the_apps_without_importing_the_app() -> None:
    assert tool_version() == f"diffract-tui {__version__}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    code = "import sys; from analysis.run.provenance import tool_version; v = tool_version(); " \
           "print(v, 'diffract_tui' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.stdout.split() == ["diffract-tui", __version__, "False"], proc.stderr


def test_the_fields(make_llama_folder) -> None:
    base = make_llama_folder("base", layers=1, hidden=16, heads=2, kv_heads=1, intermediate=8, vocab=10)
    with open_checkpoint(base) as ck:
        settings = SpectralSettings(device="cpu")
        meta = provenance([ck], settings, device_kind="cpu", command="x")
        assert meta == {"created_by": f"diffract-tui {__version__}", "engine_version": ENGINE_VERSION,
                        "checkpoints": [{"label": "base", "path": str(base.resolve()), "fingerprint": ck.fingerprint}],
                        "device_kind": "cpu", "settings": settings.key(), "command": "x"}
        plain = provenance([ck], {"a": 1})
        assert plain["settings"] == {"a": 1} and "device_kind" not in plain


def test_scan_and_delta_stamp_the_same_provenance(make_llama_folder, tmp_path) -> None:
    kw = dict(layers=1, hidden=16, heads=2, kv_heads=1, intermediate=8, vocab=10)
    base, cpt = make_llama_folder("base", **kw), make_llama_folder("cpt", seed=1, **kw)
    scan_out, delta_out = tmp_path / "s.json", tmp_path / "d.json"
    assert main(["scan", str(base), str(cpt), "--out", str(scan_out), "--device", "cpu", "--no-cache",
                 "--quiet"]) == 0
    assert main(["delta", str(base), str(cpt), "--out", str(delta_out), "--device", "cpu", "--no-cache",
                 "--no-heads", "--no-spectral"]) == 0
    _, scan_meta = read_table(scan_out)
    _, delta_meta = read_table(delta_out)
    for key in ("created_by", "engine_version", "checkpoints", "device_kind"):
        assert scan_meta[key] == delta_meta[key], key
    assert scan_meta["created_by"] == f"diffract-tui {__version__}" and scan_meta["device_kind"] == "cpu"
    assert [c["label"] for c in scan_meta["checkpoints"]] == ["base", "cpt"]
    assert (scan_meta["command"], delta_meta["command"]) == ("scan", "delta")

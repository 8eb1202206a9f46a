"""What a `diffract-tui scan` process imports (issue 13's whole-process speed): the app's UI (textual, plotext),
the hub, transformers, pyarrow, gguf, ray and pandas stay out of a scan that does not need them, and `fit` also
skips scipy (its TPL/exponential fits and stats are what `all` adds) — each of these costs a start-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from analysis.generate import write_checkpoint

ROOT = Path(__file__).resolve().parents[1]
NEVER = ("textual", "textual_plotext", "plotext", "transformers", "huggingface_hub", "pyarrow", "gguf", "ray",
         "pandas", "platformdirs", "tokenizers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("imports") / "m", "llama", seed=1, num_layers=1, hidden_size=32,
                            num_heads=2, num_kv_heads=1, intermediate_size=48, vocab_size=40)


def _scan_modules(args: list[str], tmp_path: Path) -> tuple[int, set[str]]:
    """(exit code, top-level packages imported) of one scan in a fresh interpreter."""
    code = f"""
import json, sys
from diffract_tui.cli import main
rc = main({args!r})
print(json.dumps([rc, sorted({{m.split('.')[0] for m in sys.modules}})]))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DIFFRACT_TUI_THREADS": "1",
           "DIFFRACT_TUI_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rc, modules = json.loads(done.stdout.strip().splitlines()[-1])
    return rc, set(modules)


@pytest.mark.parametrize("metrics, quiet", [("fit", True), ("all", False)])
def test_scan_imports_no_ui_hub_or_table_library(tiny, tmp_path, metrics, quiet):
    out = tmp_path / "rows.csv"
    args = ["scan", str(tiny), "--metrics", metrics, "--out", str(out), "--device", "cpu"] + (["--quiet"] * quiet)
    rc, modules = _scan_modules(args, tmp_path)
    assert rc == 0 and out.is_file()
    assert "torch" in modules and "analysis" in modules       # the probe sees what the scan imported
    assert not modules & set(NEVER), sorted(modules & set(NEVER))
    if metrics == "fit":
        assert "scipy" not in modules   # only the tail fits and the MP/TW group import scipy
    else:
        assert "scipy" in modules and "rich" in modules       # `all` fits tails; the progress bar is rich

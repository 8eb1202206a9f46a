"""constraints.txt (`.ci/constraints.py`): the committed file was made from pyproject's current dependency
lists; a changed list makes the check fail with one line naming `make constraints`; pins drop local versions
and the project itself."""

from __future__ import annotations

import importlib.util
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "constraints.py"


def _script():
    """.ci/constraints.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("ci_constraints", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _makefile_args() -> list[str]:
    """The check's arguments exactly as `make check-constraints` passes them (EXTRAS, TORCH, RXNFP)."""
    out = subprocess.run(["make", "-s", "-n", "check-constraints"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    line = next(x for x in out.splitlines() if "constraints.py check" in x)
    words = shlex.split(line)
    return words[words.index("check") + 1:]


def test_the_committed_constraints_match_pyproject() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "check", *_makefile_args()], cwd=ROOT,
                          capture_output=True, text=True)
    assert (proc.returncode, proc.stderr) == (0, "")


def test_a_changed_dependency_list_fails_the_check_in_one_line(tmp_path: Path) -> None:
    shutil.copy(ROOT / "constraints.txt", tmp_path / "constraints.txt")
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert '"pyarrow>=15",' in text
    (tmp_path / "pyproject.toml").write_text(text.replace('"pyarrow>=15",', '"pyarrow>=15",\n    "gguf>=0.10",'),
                                             encoding="utf-8")
    args = _makefile_args()
    proc = subprocess.run([sys.executable, str(SCRIPT), "check", *args], cwd=tmp_path, capture_output=True,
                          text=True)
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "run `make constraints`" in lines[0], proc.stderr
    # a comment or reordering alone does not count as a change
    (tmp_path / "pyproject.toml").write_text(text.replace('"numpy>=1.26",', '"numpy>=1.26",  # arrays'),
                                             encoding="utf-8")
    again = subprocess.run([sys.executable, str(SCRIPT), "check", *args], cwd=tmp_path, capture_output=True,
                           text=True)
    assert again.returncode == 0, again.stderr


def test_pins_drop_local_versions_and_the_project() -> None:
    freeze = "torch==2.13.0+cpu\nnumpy==2.4.6\n-e /work/x\ndiffract_tui==0.1.0\n# comment\n"
    with pytest.raises(SystemExit, match="cannot pin '-e /work/x'"):
        _script().pins_from_freeze(freeze, exclude={"diffract-tui"})
    pins = _script().pins_from_freeze(freeze.replace("-e /work/x\n", ""), exclude={"diffract-tui"})
    assert pins == ["numpy==2.4.6", "torch==2.13.0"]


def test_the_committed_constraints_pin_torch_without_a_local_version() -> None:
    lines = (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("# pyproject-deps-sha256: ")
    assert "torch==2.13.0" in lines
    assert not any("+" in line for line in lines if not line.startswith("#"))

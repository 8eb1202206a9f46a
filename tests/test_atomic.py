"""Atomic writes (analysis/io/atomic.py): what users export gets ordinary file permissions, and a failed write
leaves the target as it was with no temp file behind."""

from __future__ import annotations

import os
import stat

import pytest

from analysis.io.atomic import atomic_writer, process_umask
from analysis.edit.rewind_list import write_rewind_list
from analysis.run.tables import write_table
from tests.test_rewind_list import _list


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_umask_is_read_without_changing_it(umask_027):
    assert process_umask() == 0o027
    assert process_umask() == 0o027


def test_exports_get_0666_minus_umask_not_mkstemps_0600(tmp_path, umask_027):
    """A table, its .meta.json sidecar and a rewind list written under umask 027 are 0640 (= 0666 & ~027),
    what `open()` would make — mkstemp alone makes 0600, which hides exports from the rest of a team."""
    write_table([{"checkpoint": "a", "pl_alpha": 2.5}], tmp_path / "t.csv", metadata={"tool": "x"})
    rl = write_rewind_list(_list(), tmp_path / "r.json")
    for p in (tmp_path / "t.csv", tmp_path / "t.csv.meta.json", rl):
        assert _mode(p) == 0o640, p


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "x.txt"
    target.write_text("old", encoding="utf-8")
    with pytest.raises(RuntimeError):
        with atomic_writer(target, "w") as fh:
            fh.write("half of the new")
            raise RuntimeError("disk went away")
    assert target.read_text(encoding="utf-8") == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]

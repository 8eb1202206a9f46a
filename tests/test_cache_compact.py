"""`diffract-tui cache compact` (`Cache.compact`): the packs of many writers are merged into as few as the size limit
allows, every readable entry kept byte for byte; torn or corrupt packs and unreadable entries are dropped, one copy
of a duplicated key is kept (the newest pack's); concurrent writers' new packs and readers that indexed the old packs
are safe; a compaction killed before its deletes leaves harmless duplicates; the CLI prints one line, an unwritable
cache is one error line. Also: a Ctrl-C during the cache flush at the end of any command is the one interrupted line."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

import analysis.run.cache as cache_module
from analysis.run.cache import PACK_DIR, Cache, _pack_bytes, _read_pack_body, _read_pack_index, cache_key
from diffract_tui.cli import main

WRITERS = 50


def _key(i: int) -> str:
    return cache_key(fingerprint=f"fp-{i}", tensor="layers.0.mlp.up_proj.weight", operation="weight/metrics",
                     settings={"seed": i}, dtype="float32", device_kind="cpu")


def _fill(root: Path, writers: int = WRITERS) -> dict[str, tuple[dict, np.ndarray]]:
    """`writers` Cache objects, each packing one JSON value and one small array under its own key, and all of them
    the same value under one shared key (a duplicate in every pack): one pack per writer."""
    expected: dict[str, tuple[dict, np.ndarray]] = {}
    for i in range(writers):
        writer = Cache(root)
        value, array = {"alpha": 2.0 + i / 7, "n": i, "nan": float("nan")}, np.arange(i + 3, dtype=np.float32) * i
        writer.put_json(_key(i), value)
        writer.put_array(_key(i), array)
        writer.put_json(_key(-1), {"shared": True})
        writer.flush()
        expected[_key(i)] = (value, array)
    return expected


def _packs(root: Path) -> list[Path]:
    return sorted((root / PACK_DIR).glob("*.pack"))


def _packed(root: Path) -> dict[tuple[str, str], bytes]:
    """Every readable packed entry's bytes, read straight from the pack files."""
    out: dict[tuple[str, str], bytes] = {}
    for path in _packs(root):
        try:
            entries, offset, length = _read_pack_index(path)
            body = _read_pack_body(path, offset, length)
        except (OSError, ValueError):
            continue
        out.update((k, body[at.offset:at.offset + at.length]) for k, at in entries.items())
    return out


def _same(a: dict, b: dict) -> bool:
    """Two decoded metric dicts are equal (NaN equal to NaN)."""
    return a.keys() == b.keys() and all(x == y or (x != x and y != y) for x, y in zip(a.values(), b.values()))


def _assert_reads(cache: Cache, expected: dict[str, tuple[dict, np.ndarray]]) -> None:
    """Every expected entry is a hit with the expected value."""
    for key, (value, array) in expected.items():
        got = cache.get_json(key)
        assert got is not None and _same(got, value), key
        got_array = cache.get_array(key)
        assert got_array is not None and got_array.dtype == array.dtype and np.array_equal(got_array, array), key
    assert cache.get_json(_key(-1)) == {"shared": True}


def _sha(paths: list[Path]) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def test_fifty_writers_packs_merge_into_one_and_every_entry_reads_back_identical(tmp_path):
    expected = _fill(tmp_path)
    before, bytes_before = _packed(tmp_path), sum(p.stat().st_size for p in _packs(tmp_path))
    assert len(_packs(tmp_path)) == WRITERS and len(before) == 2 * WRITERS + 1
    stats = Cache(tmp_path).compact()
    packs = _packs(tmp_path)
    assert len(packs) == 1 and _packed(tmp_path) == before            # byte for byte
    assert (stats.packs_before, stats.packs_after, stats.entries) == (WRITERS, 1, 2 * WRITERS + 1)
    assert stats.duplicates == WRITERS - 1 and stats.dropped == 0 and stats.corrupt == 0
    assert stats.bytes_before == bytes_before and stats.bytes_after == packs[0].stat().st_size < bytes_before
    _assert_reads(Cache(tmp_path), expected)
    assert Cache(tmp_path).info().packs == 1 and Cache(tmp_path).info().entries == 2 * WRITERS + 1
    # compacting a compacted cache changes nothing
    sha = _sha(packs)
    again = Cache(tmp_path).compact()
    assert _sha(_packs(tmp_path)) == sha and (again.packs_before, again.packs_after, again.duplicates) == (1, 1, 0)


def test_the_size_limit_bounds_each_merged_pack(tmp_path, monkeypatch):
    _fill(tmp_path, writers=12)
    before = _packed(tmp_path)
    limit = sum(len(v) for v in before.values()) // 3 + 1        # the entries fit in 3 packs, tightly
    monkeypatch.setattr(cache_module, "PACK_MAX_BYTES", limit)
    stats = Cache(tmp_path).compact()
    assert 3 <= stats.packs_after == len(_packs(tmp_path)) <= 4 and _packed(tmp_path) == before
    for path in _packs(tmp_path):
        entries = _read_pack_index(path)[0]
        assert sum(at.length for at in entries.values()) <= limit


def test_of_two_copies_of_a_key_the_newest_packs_is_kept(tmp_path):
    for value, age in (({"v": "old"}, 600), ({"v": "new"}, 0)):
        writer = Cache(tmp_path)
        writer.put_json(_key(0), value)
        writer.flush()
        newest = max(_packs(tmp_path), key=lambda p: p.stat().st_mtime_ns)
        os.utime(newest, (time.time() - age, time.time() - age))
    stats = Cache(tmp_path).compact()
    assert stats.duplicates == 1 and len(_packs(tmp_path)) == 1 and Cache(tmp_path).get_json(_key(0)) == {"v": "new"}


def test_a_corrupt_pack_is_dropped_and_the_rest_kept(tmp_path):
    expected = _fill(tmp_path, writers=10)
    before = _packed(tmp_path)
    folder = tmp_path / PACK_DIR
    torn = folder / "otherhost-1-dead-0.pack"
    torn.write_bytes(_packs(tmp_path)[0].read_bytes()[:-7])              # a torn copy: size check fails
    young = folder / "otherhost-2-beef-0.pack"
    young.write_bytes(b"diffract-pack/1\n" + b"\0" * 40)                # corrupt, but may still be arriving over NFS
    bad_entry = folder / "otherhost-3-cafe-0.pack"                     # valid pack, an entry failing its checks
    bad_entry.write_bytes(_pack_bytes([((_key(99), ".json"), b"not an entry"), ((_key(98), ".npy"), b"\x93NUMPY")],
                                      "otherhost-3-cafe"))
    hour_ago = time.time() - 3600
    for path in (torn, bad_entry):
        os.utime(path, (hour_ago, hour_ago))
    stats = Cache(tmp_path).compact()
    assert young.exists() and not torn.exists() and not bad_entry.exists()
    assert len(_packs(tmp_path)) == 2                                   # the merged pack and the young corrupt one
    assert (stats.packs_before, stats.packs_after, stats.corrupt, stats.dropped) == (13, 2, 1, 2)
    assert _packed(tmp_path) == before
    reader = Cache(tmp_path)
    _assert_reads(reader, expected)
    assert reader.get_json(_key(99)) is None and reader.get_array(_key(98)) is None


def test_a_corrupt_body_falls_back_to_an_older_copy_and_a_fifo_is_left_alone(tmp_path):
    for value, age in (({"v": "older"}, 900), ({"v": "newer"}, 600)):
        writer = Cache(tmp_path)
        writer.put_json(_key(0), value)
        writer.put_json(_key(1), value)
        writer.flush()
        newest = max(_packs(tmp_path), key=lambda p: p.stat().st_mtime_ns)
        os.utime(newest, (time.time() - age, time.time() - age))
    data = bytearray(newest.read_bytes())
    data[-3] ^= 0xFF                                          # the newer pack's body fails its CRC
    newest.write_bytes(bytes(data))
    os.utime(newest, (time.time() - 600, time.time() - 600))
    fifo = tmp_path / PACK_DIR / "otherhost-9-f1f0-0.pack"
    os.mkfifo(fifo)                                           # not a regular file: never opened, never deleted
    stats = Cache(tmp_path).compact()
    assert not newest.exists() and fifo.exists() and len(_packs(tmp_path)) == 2
    assert (stats.packs_before, stats.packs_after, stats.entries, stats.corrupt) == (3, 2, 2, 1)
    assert Cache(tmp_path).get_json(_key(0)) == {"v": "older"} == Cache(tmp_path).get_json(_key(1))


def test_a_pack_written_during_compaction_survives(tmp_path, monkeypatch):
    expected = _fill(tmp_path, writers=8)
    write_merged = Cache._write_merged
    late: list[Path] = []

    def merge_then_write(self, sources):
        merged = write_merged(self, sources)
        writer = Cache(tmp_path)                              # a concurrent writer, between merge write and deletes
        writer.put_json(_key(500), {"late": 1})
        writer.flush()
        late.extend(p for p in _packs(tmp_path) if writer._token in p.name)
        return merged

    monkeypatch.setattr(Cache, "_write_merged", merge_then_write)
    stats = Cache(tmp_path).compact()
    assert len(late) == 1 and late[0].exists() and len(_packs(tmp_path)) == 2 and stats.packs_after == 1
    reader = Cache(tmp_path)
    _assert_reads(reader, expected)
    assert reader.get_json(_key(500)) == {"late": 1}


def test_readers_that_indexed_the_old_packs_read_every_entry_afterwards(tmp_path, monkeypatch):
    expected = _fill(tmp_path, writers=10)
    early = Cache(tmp_path)
    assert early.contains(_key(0))                           # indexed every old pack (no body read yet) …
    first = next(iter(expected))
    assert _same(early.get_json(first), expected[first][0])  # … and holds one old pack's body in memory
    remove, between = Cache._remove_compacted, []

    def index_then_remove(self, paths):
        reader = Cache(tmp_path)                             # indexed the old packs AND the merged one
        assert reader.contains(_key(1))
        between.append(reader)
        remove(self, paths)

    monkeypatch.setattr(Cache, "_remove_compacted", index_then_remove)
    Cache(tmp_path).compact()
    assert len(_packs(tmp_path)) == 1
    for reader in (early, *between):                         # their old packs are gone: the merged pack serves them
        _assert_reads(reader, expected)


KILLED = """
import os, signal, sys
from analysis.run.cache import Cache
Cache._remove_compacted = lambda self, paths: os.kill(os.getpid(), signal.SIGKILL)
Cache(sys.argv[1]).compact()
"""


def test_a_compaction_killed_before_its_deletes_leaves_a_cache_that_reads_and_compacts_cleanly(tmp_path):
    expected = _fill(tmp_path, writers=10)
    before = _packed(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILLED, str(tmp_path)], env=env, capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    names = [p.name for p in (tmp_path / PACK_DIR).iterdir()]
    assert len(_packs(tmp_path)) == 11 and len(names) == 11        # old packs + the merged one, no temp file
    assert _packed(tmp_path) == before
    _assert_reads(Cache(tmp_path), expected)
    stats = Cache(tmp_path).compact()
    assert (stats.packs_before, stats.packs_after, stats.entries) == (11, 1, 21)
    assert stats.duplicates == 9 + 21                              # the shared key's copies, and each merged entry's
    assert _packed(tmp_path) == before
    _assert_reads(Cache(tmp_path), expected)


def test_cli_compact_prints_one_line_and_info_shows_the_packs(tmp_path, capsys):
    _fill(tmp_path, writers=5)
    size = sum(p.stat().st_size for p in _packs(tmp_path))
    assert main(["cache", "info", "--cache-dir", str(tmp_path)]) == 0
    assert "packs:   5\n" in capsys.readouterr().out
    assert main(["cache", "compact", "--cache-dir", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    after = _packs(tmp_path)[0].stat().st_size
    from diffract_tui.cli.cache import _human_bytes

    assert err == "" and out == (f"compacted {tmp_path}: 5 packs → 1, 11 entries, {_human_bytes(size)} → "
                                 f"{_human_bytes(after)} (dropped 4 duplicate copies)\n")
    assert main(["cache", "info", "--cache-dir", str(tmp_path)]) == 0
    assert "packs:   1\n" in capsys.readouterr().out
    assert main(["cache", "compact", "--cache-dir", str(tmp_path / "none")]) == 0
    assert capsys.readouterr().out == f"compacted {tmp_path / 'none'}: 0 packs → 0, 0 entries, 0 B → 0 B\n"


def test_cli_compact_of_an_unwritable_cache_is_one_line_and_exit_1(capsys):
    # the suite runs as root, for whom no folder is read-only: the command runs as `nobody` (effective uid only)
    shared = Path(tempfile.mkdtemp(prefix="diffract-compact-ro-"))
    try:
        os.chmod(shared, 0o755)
        _fill(shared, writers=4)
        os.chmod(shared / PACK_DIR, 0o755)
        before = _sha(_packs(shared))
        if os.geteuid() == 0:
            os.seteuid(65534)
            try:
                code = main(["cache", "compact", "--cache-dir", str(shared)])
            finally:
                os.seteuid(0)
        else:  # pragma: no cover - a non-root developer: a plain read-only folder does it
            os.chmod(shared / PACK_DIR, 0o555)
            code = main(["cache", "compact", "--cache-dir", str(shared)])
            os.chmod(shared / PACK_DIR, 0o755)
        out, err = capsys.readouterr()
        assert code == 1 and out == "" and err.count("\n") == 1, err
        assert err.startswith(f"diffract-tui: error: {shared / PACK_DIR}")
        assert "cannot write a compacted cache pack (Permission denied); nothing was written — " in err
        assert _sha(_packs(shared)) == before and len(list((shared / PACK_DIR).iterdir())) == 4
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def _interrupt(*args: object) -> None:
    raise KeyboardInterrupt


@pytest.mark.parametrize("argv", [["cache", "info"], ["--version"]])
def test_a_ctrl_c_during_the_final_cache_flush_is_the_one_interrupted_line(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cache_module, "flush_all_caches", _interrupt)
    assert main([*argv, *(["--cache-dir", str(tmp_path)] if argv[0] == "cache" else [])]) == 130
    assert capsys.readouterr().err == "diffract-tui: interrupted\n"


def test_a_ctrl_c_in_the_command_and_again_in_the_flush_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Cache, "info", _interrupt)
    monkeypatch.setattr(cache_module, "flush_all_caches", _interrupt)
    assert main(["cache", "info", "--cache-dir", str(tmp_path)]) == 130
    assert capsys.readouterr().err == "diffract-tui: interrupted\n"

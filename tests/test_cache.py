"""The persistent spectra cache: keys, hits, invalidation, corruption, NaN, concurrency, CLI."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest

from analysis import ENGINE_VERSION
from analysis.run.cache import CACHE_ENV_VAR, Cache, cache_key
from diffract_tui.cli import main

BASE_PARTS = dict(
    fingerprint="fp-aaaa",
    tensor="layers.0.self_attn.q_proj.weight",
    slice=None,
    operation="weight/metrics",
    settings={"xmin_rule": "ks", "seed": 42, "rtol": 1e-5},
    dtype="float32",
    device_kind="cpu",
)


def test_key_is_sha256_hex_and_stable_under_dict_order():
    k1 = cache_key(**BASE_PARTS)
    reordered = dict(BASE_PARTS, settings={"rtol": 1e-5, "seed": 42, "xmin_rule": "ks"})
    assert len(k1) == 64 and all(c in "0123456789abcdef" for c in k1)
    assert cache_key(**reordered) == k1  # canonical JSON sorts keys


@pytest.mark.parametrize(
    "change",
    [
        {"dtype": "float64"},
        {"settings": {"xmin_rule": "local_min", "seed": 42, "rtol": 1e-5}},
        {"settings": {"xmin_rule": "ks", "seed": 7, "rtol": 1e-5}},
        {"engine_version": ENGINE_VERSION + ".post1"},
        {"fingerprint": "fp-bbbb"},
        {"fingerprint": ["fp-aaaa", "fp-bbbb"]},
        {"tensor": "layers.1.self_attn.q_proj.weight"},
        {"slice": {"proj": "q", "head": 3}},
        {"operation": "delta/metrics"},
        {"device_kind": "cuda"},
    ],
)
def test_every_part_changes_the_key(change):
    # each of these changes a number, so each must address a different entry
    assert cache_key(**{**BASE_PARTS, **change}) != cache_key(**BASE_PARTS)


def test_miss_then_hit_calls_the_function_once(tmp_path):
    cache = Cache(tmp_path / "c")
    key = cache_key(**BASE_PARTS)
    calls = []

    def compute():
        calls.append(1)
        return {"pl_alpha": 3.25, "hard_rank": 64}

    assert cache.get_json(key) is None
    assert cache.get_or_compute(key, compute) == {"pl_alpha": 3.25, "hard_rank": 64}
    assert cache.get_or_compute(key, compute) == {"pl_alpha": 3.25, "hard_rank": 64}
    assert len(calls) == 1
    cache.flush()  # small entries land in a pack at the end of a run (issue 13)
    # a fresh Cache object on the same folder (another process, later) also hits
    assert Cache(tmp_path / "c").get_or_compute(key, compute)["pl_alpha"] == 3.25
    assert len(calls) == 1


def test_array_round_trip_is_bit_exact_and_lives_in_a_fanout_folder(tmp_path):
    cache = Cache(tmp_path)
    key = cache_key(**BASE_PARTS)
    # big enough to be its own file (small arrays are packed: tests/test_cache_packs.py)
    values = np.concatenate([[0.0, 1e-30, 2.5, np.nan, np.inf], np.arange(10_000.0)])
    cache.put_array(key, values)
    back = cache.get_array(key)
    assert back.dtype == np.float64
    assert np.array_equal(back, values, equal_nan=True)
    assert (tmp_path / key[:2] / f"{key}.npy").is_file()
    assert not list(tmp_path.rglob(".tmp-*"))  # the temp file was renamed, not left behind


def test_nan_and_inf_round_trip_through_strict_json(tmp_path):
    cache = Cache(tmp_path)
    key = cache_key(**BASE_PARTS)
    metrics = {"pl_alpha": float("nan"), "tpl_lambda": float("inf"), "x": float("-inf"), "ok": 1.5, "flag": True,
               "fit_warning": "n_tail < 50", "nested": [float("nan"), 2], "pad": "x" * 70_000}  # a file
    cache.put_json(key, metrics)
    # the file is strict JSON (no NaN/Infinity tokens), so any JSON reader accepts it
    raw = (tmp_path / key[:2] / f"{key}.json").read_text()
    json.loads(raw, parse_constant=lambda c: pytest.fail(f"non-standard JSON token {c}"))
    back = cache.get_json(key)
    assert math.isnan(back["pl_alpha"]) and back["tpl_lambda"] == math.inf and back["x"] == -math.inf
    assert back["ok"] == 1.5 and back["flag"] is True and back["fit_warning"] == "n_tail < 50"
    assert math.isnan(back["nested"][0]) and back["nested"][1] == 2


def test_truncated_npy_is_a_miss_removed_and_recomputed(tmp_path):
    cache = Cache(tmp_path)
    key = cache_key(**BASE_PARTS)
    cache.put_array(key, np.arange(10_000, dtype=np.float64))  # a big array: its own file
    path = tmp_path / key[:2] / f"{key}.npy"
    path.write_bytes(path.read_bytes()[:300])  # header intact, data cut short
    assert cache.get_array(key) is None
    assert not path.exists()
    calls = []
    value = cache.get_or_compute(key, lambda: calls.append(1) or np.arange(3.0))
    assert calls == [1] and np.array_equal(value, [0.0, 1.0, 2.0])
    assert np.array_equal(cache.get_array(key), [0.0, 1.0, 2.0])


def test_garbage_and_foreign_json_are_misses(tmp_path):
    cache = Cache(tmp_path)
    key = cache_key(**BASE_PARTS)
    other = cache_key(**{**BASE_PARTS, "tensor": "other"})
    cache.put_json(key, {"a": 1, "pad": "x" * 70_000})  # big: a single-file entry (packs: test_cache_packs.py)
    path = tmp_path / key[:2] / f"{key}.json"
    path.write_bytes(b'{"format": "diffract-cache/1", "key": "')  # truncated JSON
    assert cache.get_json(key) is None and not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xfe garbage")
    assert cache.get_json(key) is None
    # an entry copied under the wrong name (its key does not match) is not trusted
    cache.put_json(other, {"a": 2, "pad": "x" * 70_000})
    path.write_bytes((tmp_path / other[:2] / f"{other}.json").read_bytes())
    assert cache.get_json(key) is None
    assert cache.get_or_compute(key, lambda: {"a": 3}) == {"a": 3}


def test_pickled_object_arrays_are_refused(tmp_path):
    cache = Cache(tmp_path)
    key = cache_key(**BASE_PARTS)
    path = tmp_path / key[:2] / f"{key}.npy"
    path.parent.mkdir(parents=True)
    np.save(path, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    assert cache.get_array(key) is None  # allow_pickle=False refuses it; never unpickled
    with pytest.raises(TypeError):
        cache.put_array(key, np.array([{"x": 1}], dtype=object))


def test_env_var_and_explicit_root(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "from-env"))
    assert Cache().root == tmp_path / "from-env"
    assert Cache(tmp_path / "explicit").root == tmp_path / "explicit"  # --cache-dir wins
    monkeypatch.delenv(CACHE_ENV_VAR)
    assert Cache().root.name == "diffract-tui"  # platformdirs user cache


def test_info_and_clear_touch_only_cache_files(tmp_path):
    cache = Cache(tmp_path)
    assert cache.info().entries == 0
    for i in range(5):
        cache.put_json(cache_key(**{**BASE_PARTS, "tensor": f"t{i}"}), {"i": i})
    cache.put_array(cache_key(**BASE_PARTS), np.zeros(10))
    cache.flush()
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "ab").mkdir(exist_ok=True)
    (tmp_path / "ab" / "keep.me").write_text("mine too")
    stats = cache.info()
    assert stats.entries == 6 and stats.bytes > 0 and stats.root == tmp_path
    assert cache.clear() == 6
    assert cache.info().entries == 0
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / "ab" / "keep.me").exists()


def test_unwritable_root_warns_once_and_is_only_read(tmp_path, capsys):
    # issue 9 item 12: an unwritable cache no longer fails the computation that wanted to store an entry
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cache = Cache(blocker / "cache")  # a folder cannot be created under a file
    cache.put_json(cache_key(**BASE_PARTS), {"a": 1})
    cache.put_array(cache_key(**BASE_PARTS), np.arange(3.0))
    cache.flush()  # small entries are written (and fail) when the pack is flushed
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("diffract-tui: warning: cannot write the cache (Not a directory)")
    assert "going on without caching" in err and cache.write_error == "Not a directory"
    assert cache.get_json(cache_key(**BASE_PARTS)) is None  # reading is still just a miss
    assert blocker.read_text() == "x"


def _hammer(root: str, worker: int, rounds: int, queue) -> None:
    """Write and read one key many times; report any read that was neither a miss nor whole."""
    cache = Cache(root)
    key = cache_key(**BASE_PARTS)
    expected = np.arange(16384, dtype=np.float64)  # big: a single file; the JSON goes through a pack
    bad = 0
    for _ in range(rounds):
        cache.put_array(key, expected)
        cache.put_json(key, {"pl_alpha": float("nan"), "n": 4096})
        cache.flush()
        got = cache.get_array(key)
        if got is not None and not np.array_equal(got, expected):
            bad += 1
        meta = cache.get_json(key)
        if meta is not None and (meta["n"] != 4096 or not math.isnan(meta["pl_alpha"])):
            bad += 1
    queue.put((worker, bad))


def test_processes_hammering_one_key_never_see_a_partial_entry(tmp_path):
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(str(tmp_path), w, 150, queue)) for w in range(3)]
    for p in procs:
        p.start()
    _hammer(str(tmp_path), 99, 150, queue)  # and this process at the same time
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    results = sorted(queue.get(timeout=10) for _ in range(4))
    assert results == [(0, 0), (1, 0), (2, 0), (99, 0)]
    assert Cache(tmp_path).info().entries == 2
    assert not list(tmp_path.rglob(".tmp-*"))


def test_cli_cache_info_and_clear(tmp_path, capsys, monkeypatch):
    cache = Cache(tmp_path / "c")
    for i in range(3):
        cache.put_json(cache_key(**{**BASE_PARTS, "tensor": f"t{i}"}), {"i": i})
    cache.flush()
    assert main(["cache", "info", "--cache-dir", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "entries: 3" in out and str(tmp_path / "c") in out
    # without --yes and without a terminal to confirm on, nothing is deleted
    monkeypatch.setattr("sys.stdin", open("/dev/null"))
    assert main(["cache", "clear", "--cache-dir", str(tmp_path / "c")]) != 0
    assert cache.info().entries == 3
    capsys.readouterr()
    assert main(["cache", "clear", "--cache-dir", str(tmp_path / "c"), "--yes"]) == 0
    assert "removed 3 entries" in capsys.readouterr().out
    assert cache.info().entries == 0
    # the environment variable is honoured when --cache-dir is absent
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "env"))
    with Cache(tmp_path / "env") as env_cache:  # closing flushes
        env_cache.put_json(cache_key(**BASE_PARTS), {"a": 1})
    assert main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "env") in out and "entries: 1" in out


def test_cache_entries_are_not_fsynced_but_exports_are(tmp_path, monkeypatch):
    """A cache needs atomicity, not durability (a torn entry is recomputed): no fsync per entry; a table
    export still fsyncs before its rename."""
    import os

    import numpy as np

    from analysis.run.cache import Cache
    from analysis.run.tables import write_table

    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    cache = Cache(tmp_path / "c")
    key = cache.key(fingerprint=["f"], tensor="t", operation="op", settings={}, dtype="float32", device_kind="cpu")
    cache.put_array(key, np.arange(4.0))
    cache.put_json(key, {"a": 1.0})
    assert calls == []
    assert cache.get_json(key) == {"a": 1.0}
    write_table([{"a": 1.0}], tmp_path / "t.csv", metadata={})
    assert len(calls) >= 1

"""Issue 13 item 3, a rerun is free: a cached `delta` reads no tensor and writes the same bytes; small cache
entries are packed (one pack per writer and flush) so thousands of tiny tensors cost a handful of files;
concurrent writers never share a file; a torn or corrupt pack is recomputed; `cache clear` removes packs; delta
entries are shared by every metric set."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import pickle
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from analysis.generate import random_state_dict, write_checkpoint
from analysis.model.families import family_config
from analysis.run.cache import PACK_DIR, PACK_MAGIC, Cache, cache_key
from diffract_tui.cli import main

CFG = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48, vocab_size=64)


@pytest.fixture(scope="module")
def trio(tmp_path_factory) -> list[Path]:
    """A base and two CPT checkpoints of it (every matrix changed, differently per domain)."""
    root = tmp_path_factory.mktemp("packs_trio")
    config = family_config("llama", **CFG)
    base = random_state_dict("llama", config, seed=1)
    paths = [write_checkpoint(root / "base", "llama", state_dict=base, **CFG)]
    for seed in (2, 3):
        g = torch.Generator().manual_seed(seed)
        sd = {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        paths.append(write_checkpoint(root / f"dom{seed}", "llama", state_dict=sd, **CFG))
    return paths


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _input_hashes(folders: list[Path]) -> dict[Path, str]:
    return {f: _sha(f) for folder in folders for f in sorted(folder.iterdir()) if f.is_file()}


def _delta(trio: list[Path], out: Path, cache: Path, capsys, *extra: str) -> str:
    """Run `delta` (exit 0 asserted) and return the sha256 of the table it wrote."""
    code = main(["delta", *map(str, trio), "--out", str(out), "--device", "cpu", "--cache-dir", str(cache), *extra])
    err = capsys.readouterr().err
    assert code == 0, err
    return _sha(out)


def _forbid_tensor_reads(monkeypatch) -> list[str]:
    """Every tensor read of every reader raises (and is recorded): a cached run must not read one."""
    from analysis.io.checkpoint import Checkpoint
    from analysis.io.readers.pickle_file import PickleFile
    from analysis.io.readers.safetensors_file import SafetensorsFile

    reads: list[str] = []

    def refuse(*args, **kwargs):
        reads.append(str(args[1]) if len(args) > 1 else "?")
        raise AssertionError(f"a tensor was read on a cached run: {args[1:]}")

    for cls in (Checkpoint, SafetensorsFile, PickleFile):
        monkeypatch.setattr(cls, "tensor", refuse)
        monkeypatch.setattr(cls, "rows", refuse)
    return reads


def test_cached_delta_reads_no_tensor_and_writes_the_same_bytes(trio, tmp_path, capsys, monkeypatch):
    before = _input_hashes(trio)
    cold = _delta(trio, tmp_path / "cold.csv", tmp_path / "cache", capsys)
    reads = _forbid_tensor_reads(monkeypatch)
    warm = _delta(trio, tmp_path / "warm.csv", tmp_path / "cache", capsys)
    assert reads == [] and warm == cold
    # changed thresholds only reclassify heads: still nothing is read (the grids are cached)
    _delta(trio, tmp_path / "t.csv", tmp_path / "cache", capsys, "--agreement", "a3", "--magnitude-threshold", "0.001")
    assert reads == [] and _input_hashes(trio) == before


def test_cached_single_target_delta_reads_no_tensor(trio, tmp_path, capsys, monkeypatch):
    # one CPT checkpoint: head scores come from their own cache entry instead of the agreement walk
    cold = _delta(trio[:2], tmp_path / "cold.json", tmp_path / "cache", capsys)
    reads = _forbid_tensor_reads(monkeypatch)
    assert _delta(trio[:2], tmp_path / "warm.json", tmp_path / "cache", capsys) == cold and reads == []


def _count(monkeypatch) -> dict[str, int]:
    """Counts of the delta's expensive work: A1 decompositions, agreement layers, full and spectral-only rows."""
    import analysis.deltas.agreement as agreement
    import analysis.deltas.delta_compute as table   # the compute side of delta_table (what a cache miss runs)

    counts = {"top_svd": 0, "agreement_layers": 0, "full_rows": 0, "spectral_rows": 0}   # top_svd: the A1 route
    top_svd, layer_grids, rows = table.narrow_svd, agreement._layer_grids, table.batched_delta_metrics

    def counted_svd(*a, **k):
        counts["top_svd"] += 1
        return top_svd(*a, **k)

    def counted_layer(*a, **k):
        counts["agreement_layers"] += 1
        return layer_grids(*a, **k)

    def counted_rows(*a, **k):
        counts["full_rows" if k.get("agreement", True) else "spectral_rows"] += 1
        return rows(*a, **k)

    monkeypatch.setattr(table, "narrow_svd", counted_svd)
    monkeypatch.setattr(agreement, "_layer_grids", counted_layer)
    monkeypatch.setattr(table, "batched_delta_metrics", counted_rows)
    return counts


def test_fit_then_all_reuses_the_entries_and_equals_cold_runs(trio, tmp_path, capsys, monkeypatch):
    cold_all = _delta(trio, tmp_path / "cold_all.csv", tmp_path / "ref_all", capsys, "--metrics", "all")
    cold_fit = _delta(trio, tmp_path / "cold_fit.csv", tmp_path / "ref_fit", capsys, "--metrics", "fit")
    counts = _count(monkeypatch)
    assert _delta(trio, tmp_path / "fit.csv", tmp_path / "c", capsys, "--metrics", "fit") == cold_fit
    first = dict(counts)
    assert first["top_svd"] > 0 and first["agreement_layers"] == CFG["num_layers"] and first["full_rows"] > 0
    counts.update(dict.fromkeys(counts, 0))
    # `all` after `fit`: only the spectral groups `fit` lacks are computed; no A1 SVD, no agreement, no full row
    assert _delta(trio, tmp_path / "all.csv", tmp_path / "c", capsys, "--metrics", "all") == cold_all
    assert counts["top_svd"] == 0 and counts["agreement_layers"] == 0 and counts["full_rows"] == 0
    assert counts["spectral_rows"] == first["full_rows"]      # one widening per matrix and head batch
    counts.update(dict.fromkeys(counts, 0))
    # and `fit` after `all`: the widened entries serve it as they are — nothing computed, the cold fit's bytes
    assert _delta(trio, tmp_path / "fit2.csv", tmp_path / "c", capsys, "--metrics", "fit") == cold_fit
    assert counts == dict.fromkeys(counts, 0)


# ------------------------------------------------------------------------------------------------
# Packs
# ------------------------------------------------------------------------------------------------


def _key(i: int, tensor: str = "t") -> str:
    return cache_key(fingerprint="fp", tensor=f"{tensor}{i}", operation="test", settings={}, dtype="float32",
                     device_kind="cpu")


def _packs(root: Path) -> list[Path]:
    return sorted((root / PACK_DIR).glob("*.pack"))


@pytest.mark.slow
def test_thousands_of_tiny_tensors_make_a_small_cache_of_a_handful_of_files(tmp_path, monkeypatch):
    # issue 13: a checkpoint of 25k tiny tensors made a 203 MB cache (100× its size), one file per entry
    from analysis.io.checkpoint import open_checkpoint
    from analysis.run.scan import scan
    from analysis.spectral.backend import SpectralSettings
    from tests.conftest import write_safetensors

    g = torch.Generator().manual_seed(0)
    weights = write_safetensors(tmp_path / "tiny" / "model.safetensors",
                                {f"blocks.{i}.weight": torch.randn(8, 8, generator=g) for i in range(2000)})
    root = tmp_path / "cache"
    ckpt = open_checkpoint(weights)
    rows = list(scan([ckpt], settings=SpectralSettings(device="cpu"), cache=Cache(root), metrics="fit"))
    assert len(rows) == 2000
    files = [p for p in root.rglob("*") if p.is_file()]
    used = sum(p.stat().st_size for p in files)
    info = Cache(root).info()
    tag = (root / "CACHEDIR.TAG").stat().st_size
    assert info.entries == 2 * 2000 and info.packs == 1 and info.bytes == used - tag
    assert len(files) <= 3 and used < 3 * weights.stat().st_size, (len(files), used, weights.stat().st_size)
    # and a rerun is served by the pack: the same rows, no eigensolve
    import analysis.spectral.spectra as spectra

    def no_eigen(*a, **k):
        raise AssertionError("recomputed a packed entry")

    monkeypatch.setattr(spectra, "_eigenvalues", no_eigen)
    assert list(scan([ckpt], settings=SpectralSettings(device="cpu"), cache=Cache(root), metrics="fit")) == rows


def _writer(root: str, name: str, n: int, queue) -> None:
    """Write n keys (flushing every 50, so several packs) into the shared cache, then report the pack names."""
    cache = Cache(root)
    for i in range(n):
        cache.put_json(_key(i, name), {"writer": name, "i": i})
        cache.put_array(_key(i, name), np.full(3, i, dtype=np.float64))
        if i % 50 == 49:
            cache.flush()
    cache.flush()
    queue.put(sorted(p.name for p in _packs(Path(root)) if cache._token in p.name))


def test_two_writer_processes_write_one_cache_and_a_third_reader_sees_both(tmp_path):
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), name, 200, queue)) for name in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    names = [queue.get(timeout=10) for _ in procs]
    assert all(len(n) == 4 for n in names) and not set(names[0]) & set(names[1])   # never the same file
    reader = Cache(tmp_path)
    for name in ("a", "b"):
        for i in range(200):
            assert reader.get_json(_key(i, name)) == {"writer": name, "i": i}
            assert np.array_equal(reader.get_array(_key(i, name)), np.full(3, i, dtype=np.float64))
    assert reader.info().entries == 2 * 2 * 200 and reader.info().packs == 8
    assert not list(tmp_path.rglob(".tmp-*"))


def test_two_cache_objects_are_two_writers_and_a_pickled_cache_is_a_new_one(tmp_path):
    a, b = Cache(tmp_path), Cache(tmp_path)
    a.put_json(_key(1), {"v": "a"})
    b.put_json(_key(2), {"v": "b"})
    assert Cache(tmp_path).get_json(_key(1)) is None      # staged, not written yet …
    a.flush()
    b.flush()
    assert len(_packs(tmp_path)) == 2                      # … then one pack each, under different names
    c = Cache(tmp_path)
    assert c.get_json(_key(1)) == {"v": "a"} and c.get_json(_key(2)) == {"v": "b"}
    b.put_json(_key(3), {"v": "late"})                     # a reader that looked before sees later packs
    b.flush()
    assert c.get_json(_key(3)) == {"v": "late"}
    clone = pickle.loads(pickle.dumps(a))                  # what a Ray task receives
    assert clone.root == a.root and clone._token != a._token and clone.get_json(_key(2)) == {"v": "b"}


def test_staged_entries_are_flushed_at_interpreter_exit(tmp_path):
    code = ("import numpy as np\nfrom analysis.run.cache import Cache\n"
            f"c = Cache({str(tmp_path)!r})\nc.put_json('{_key(1)}', {{'x': 1}})\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert len(_packs(tmp_path)) == 1 and Cache(tmp_path).get_json(_key(1)) == {"x": 1}


def test_a_full_stage_is_flushed_before_the_end(tmp_path, monkeypatch):
    monkeypatch.setattr("analysis.run.cache.PACK_MAX_ENTRIES", 10)
    cache = Cache(tmp_path)
    for i in range(25):
        cache.put_json(_key(i), i)
    assert len(_packs(tmp_path)) == 2                      # bounded memory: 10 + 10 written, 5 staged
    cache.flush()
    assert len(_packs(tmp_path)) == 3 and all(Cache(tmp_path).get_json(_key(i)) == i for i in range(25))


def _body(pack: Path) -> bytes:
    """The decompressed body of a pack, read by the documented format (docs/architecture.md)."""
    raw = pack.read_bytes()
    assert raw.startswith(PACK_MAGIC)
    index_len, body_len, _, _ = struct.unpack("<QQII", raw[16:40])
    return zlib.decompress(raw[40 + index_len:40 + index_len + body_len])


def test_packed_json_is_strict_json_and_big_arrays_stay_files(tmp_path):
    cache = Cache(tmp_path)
    cache.put_json(_key(1), {"nan": float("nan"), "inf": float("inf")})
    cache.put_array(_key(2), np.arange(100_000, dtype=np.float64))      # 800 kB: its own .npy file
    cache.flush()
    entry = json.loads(_body(_packs(tmp_path)[0]), parse_constant=lambda c: pytest.fail(f"non-standard {c}"))
    assert entry["key"] == _key(1) and entry["value"]["nan"] == {"$float": "nan"}
    assert (tmp_path / _key(2)[:2] / f"{_key(2)}.npy").is_file()
    assert np.array_equal(Cache(tmp_path).get_array(_key(2)), np.arange(100_000, dtype=np.float64))


@pytest.mark.parametrize("damage", ["truncate", "flip_body_byte", "flip_index_byte", "garbage", "empty"])
def test_a_torn_or_corrupt_pack_is_ignored_and_its_entries_recomputed(trio, tmp_path, capsys, monkeypatch, damage):
    cold = _delta(trio[:2], tmp_path / "a.csv", tmp_path / "c", capsys, "--no-heads")
    (pack,) = _packs(tmp_path / "c")
    raw = bytearray(pack.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "flip_body_byte":
        raw[-5] ^= 0xFF
    elif damage == "flip_index_byte":
        raw[45] ^= 0xFF
    elif damage == "garbage":
        raw = bytearray(b"\x00not a pack at all" * 10)
    else:
        raw = bytearray()
    pack.write_bytes(bytes(raw))
    counts = _count(monkeypatch)
    assert _delta(trio[:2], tmp_path / "b.csv", tmp_path / "c", capsys, "--no-heads") == cold   # no crash
    assert counts["full_rows"] == 16                       # every matrix recomputed (16 per CPT checkpoint)
    counts.update(dict.fromkeys(counts, 0))
    assert _delta(trio[:2], tmp_path / "b.csv", tmp_path / "c", capsys, "--no-heads") == cold
    assert counts["full_rows"] == 0                        # the new pack serves the next run


def test_cache_clear_removes_packs_and_only_them(trio, tmp_path, capsys):
    _delta(trio[:2], tmp_path / "a.csv", tmp_path / "c", capsys, "--no-heads", "--no-spectral")
    (tmp_path / "c" / PACK_DIR / "notes.txt").write_text("mine")
    info = Cache(tmp_path / "c").info()
    assert info.packs == 1 and info.entries == 16          # one core entry per matrix, one pack
    assert main(["cache", "info", "--cache-dir", str(tmp_path / "c")]) == 0
    assert "entries: 16" in capsys.readouterr().out
    assert main(["cache", "clear", "--cache-dir", str(tmp_path / "c"), "--yes"]) == 0
    assert "removed 16 entries" in capsys.readouterr().out
    assert _packs(tmp_path / "c") == [] and Cache(tmp_path / "c").info().entries == 0
    assert (tmp_path / "c" / PACK_DIR / "notes.txt").read_text() == "mine"


def test_a_command_leaves_its_entries_packed_for_the_next_one(trio, tmp_path, capsys, monkeypatch):
    # each CLI command ends by flushing every Cache of the process: a second command in it reuses the packs
    import analysis.spectral.spectra as spectra

    args = ["scan", str(trio[0]), "--device", "cpu", "--quiet", "--metrics", "fit", "--cache-dir", str(tmp_path / "c")]
    assert main([*args, "--out", str(tmp_path / "a.csv")]) == 0
    assert len(_packs(tmp_path / "c")) == 1

    def no_eigen(*a, **k):
        raise AssertionError("the second command recomputed")

    monkeypatch.setattr(spectra, "_eigenvalues", no_eigen)
    assert main([*args, "--out", str(tmp_path / "b.csv")]) == 0
    capsys.readouterr()
    assert _sha(tmp_path / "a.csv") == _sha(tmp_path / "b.csv")

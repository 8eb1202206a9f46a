"""Hostile numbers and a hostile cache (issue 9, items 11 and 12): weights scaled by 1e±25 give the same
spectrum up to c²; a NaN/inf matrix is named (checkpoint, tensor), the other rows are still written and the
exit code is 3; a cache cleared, corrupted or unwritable under a running scan never fails the scan."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from analysis.errors import DiffractError, MatrixFailure
from analysis.io.checkpoint import open_checkpoint
from analysis.run.scan import scan
from analysis.run.tables import read_table
from analysis.spectral.backend import SpectralSettings
from analysis.spectral.spectra import NonFiniteError, eigenvalues, spectral_metrics
from conftest import llama_checkpoint, write_safetensors
from diffract_tui.cli import main

SETTINGS = SpectralSettings(device="cpu")
INVARIANT = ("pl_alpha", "stable_rank", "effective_rank", "mp_soft_rank")
NAN_TENSOR = "model.layers.1.mlp.up_proj.weight"          # a whole matrix with one NaN
INF_HEADS = "model.layers.0.self_attn.q_proj.weight"      # one inf inside query head 1 (rows 16–31)


def _sha256(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _folder(root: Path, name: str, seed: int, edit=None) -> Path:
    """A tiny llama checkpoint folder (4 heads of 16, 2 layers); `edit(tensors)` changes it before writing."""
    config, tensors = llama_checkpoint(seed=seed)
    if edit is not None:
        edit(tensors)
    folder = root / name
    write_safetensors(folder / "model.safetensors", tensors)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _poison(tensors: dict) -> None:
    tensors[NAN_TENSOR][3, 5] = float("nan")
    tensors[INF_HEADS][20, 7] = float("inf")


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile_numbers")
    return {"base": _folder(root, "base", 0), "clean": _folder(root, "clean", 1),
            "bad": _folder(root, "bad", 1, _poison)}


# ------------------------------------------------------------------------------------------------
# Item 11a: the spectrum is scale-equivariant, at any float32 scale
# ------------------------------------------------------------------------------------------------


def _cases(rxnfp_dirs) -> dict[str, torch.Tensor]:
    sd = torch.load(rxnfp_dirs["bert_ft"] / "pytorch_model.bin", map_location="cpu", weights_only=True)
    g = torch.Generator().manual_seed(3)
    return {"rxnfp query 256×256": sd["encoder.layer.0.attention.self.query.weight"],
            "random 200×400": torch.randn(200, 400, generator=g) * 0.05}


@pytest.mark.parametrize("scale", [1e25, 1e-20, 1e-25])
def test_scaled_float32_weights_have_the_same_spectrum_up_to_c_squared(rxnfp_dirs, scale):
    # before: ×1e25 raised LinAlgError (the null's float32 Gram overflowed); ×1e-25 gave w1_rand_distance 1.0
    for name, W in _cases(rxnfp_dirs).items():
        cW = W * scale
        assert cW.dtype == torch.float32 and bool(torch.isfinite(cW).all())
        m0, m = spectral_metrics(W, SETTINGS), spectral_metrics(cW, SETTINGS)
        for key in INVARIANT:
            assert m[key] == pytest.approx(m0[key], rel=1e-6), (name, key)
        # W₁ to the null is a small difference of ESDs whose null takes the float32 Gram: cW's own float32
        # rounding moves it by ≈6e-6 relative (the old engine: 1.0 instead of 0.0088 at ×1e-25)
        assert m["w1_rand_distance"] == pytest.approx(m0["w1_rand_distance"], rel=1e-4), name
        assert m["pl_esd_xmin"] / m["lambda_max"] == pytest.approx(m0["pl_esd_xmin"] / m0["lambda_max"], rel=1e-6)
        for key in ("hard_rank", "pl_n_tail", "mp_num_spikes", "esd_n_clipped"):
            assert m[key] == m0[key], (name, key)
        e0, e = eigenvalues(W, SETTINGS).numpy(), eigenvalues(cW, SETTINGS).numpy()
        np.testing.assert_allclose(e, e0 * scale * scale, rtol=1e-5, err_msg=name)


def test_power_of_two_scaling_is_exact():
    # the engine rescales by a power of two, so 2^k·W gives exactly 4^k·λ (and ordinary weights the same bits)
    W = torch.randn(64, 300, generator=torch.Generator().manual_seed(1))
    e0 = eigenvalues(W, SETTINGS)
    for k in (-90, -3, 40, 100):
        assert torch.equal(eigenvalues(torch.ldexp(W, torch.tensor(float(k))), SETTINGS),
                           torch.ldexp(e0, torch.tensor(2.0 * k)))


def test_scan_of_a_checkpoint_scaled_by_1e25_matches_the_unscaled(family, tmp_path, capsys):
    def scale(tensors: dict) -> None:
        for name in tensors:
            if tensors[name].dim() == 2:
                tensors[name] *= 1e25

    big = _folder(tmp_path, "big", 0, scale)
    for folder, out in ((family["base"], "a.csv"), (big, "b.csv")):
        assert main(["scan", str(folder), "--out", str(tmp_path / out), "--device", "cpu", "--heads",
                     "--no-cache", "--quiet"]) == 0, capsys.readouterr().err
    a, _ = read_table(tmp_path / "a.csv")
    b, _ = read_table(tmp_path / "b.csv")
    assert len(a) == len(b) == 2 * 7 + 2 + 2 * (4 + 2 + 2 + 4)    # matrices, globals, heads
    for ra, rb in zip(a, b):
        assert (ra["tensor"], ra["head"], ra["kv_head"]) == (rb["tensor"], rb["head"], rb["kv_head"])
        for key in ("pl_alpha", "stable_rank", "effective_rank"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-6, nan_ok=True), (ra["tensor"], key)
        assert rb["lambda_max"] == pytest.approx(ra["lambda_max"] * 1e50, rel=1e-5)


# ------------------------------------------------------------------------------------------------
# Item 11b: a NaN/inf matrix is named, the rest is written, exit code 3
# ------------------------------------------------------------------------------------------------


def _row_ids(rows: list[dict]) -> list[tuple]:
    return [(r["checkpoint"], r["operation"], r["tensor"], r["head"], r["kv_head"]) for r in rows]


def _scan_cli(family, tmp_path, capsys, cpt: str) -> tuple[int, list[dict], list[str]]:
    out = tmp_path / f"{cpt}.csv"
    code = main(["scan", str(family["base"]), str(family[cpt]), "--out", str(out), "--heads", "--delta",
                 "--device", "cpu", "--no-cache", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    rows, _ = read_table(out)
    return code, rows, err


def test_scan_with_a_nan_tensor_writes_every_other_row_names_it_and_exits_3(family, tmp_path, capsys):
    before = _sha256(family["bad"])
    code, clean_rows, _ = _scan_cli(family, tmp_path, capsys, "clean")
    assert code == 0
    code, rows, err = _scan_cli(family, tmp_path, capsys, "bad")
    assert code == 3
    assert _sha256(family["bad"]) == before
    up, q = NAN_TENSOR[len("model."):], INF_HEADS[len("model."):]
    renamed = [("bad",) + i[1:] if i[0] == "clean" else i for i in _row_ids(clean_rows)]
    lost = [i for i in renamed if i[0] == "bad" and (i[2] == up or (i[2] == q and i[3] in (None, 1)))]
    assert len(lost) == 6                # up, q and q head 1, each as a weight and as a delta row
    assert _row_ids(rows) == [i for i in renamed if i not in lost]
    # the rows that were computed carry the clean scan's numbers (the poison is only in those tensors)
    clean = dict(zip(renamed, clean_rows))
    for r in rows:
        assert r["pl_alpha"] == pytest.approx(clean[_row_ids([r])[0]]["pl_alpha"], nan_ok=True)
    failures = [line for line in err if line.startswith("diffract-tui: error: ")]
    assert len(failures) == 6            # up: weight + delta; q: weight + delta; q head 1: weight + delta
    for line in failures:
        assert "checkpoint bad" in line and str(family["bad"]) in line and "NaN/inf entries" in line
    assert sum(NAN_TENSOR[len("model."):] in line for line in failures) == 2
    assert sum("q head 1" in line for line in failures) == 2
    assert sum("ΔW against the base" in line for line in failures) == 3
    assert err[-1].startswith("diffract-tui: partial result: 6 matrix(es) failed")
    assert all("Traceback" not in line for line in err)


def test_library_scan_reports_failures_or_raises_one_named_error(family):
    ckpts = [open_checkpoint(family["base"]), open_checkpoint(family["bad"])]
    failures: list[MatrixFailure] = []
    rows = list(scan(ckpts, settings=SETTINGS, cache=None, on_failure=failures.append))
    assert [(f.checkpoint, f.tensor, f.operation) for f in failures] == [
        ("bad", INF_HEADS[len("model."):], "weight"), ("bad", NAN_TENSOR[len("model."):], "weight")]
    assert len(rows) == 2 * (2 * 7 + 2) - 2
    with pytest.raises(NonFiniteError, match=r"checkpoint bad, tensor layers\.0\.self_attn\.q_proj\.weight "
                                             r"\(layer 0 q\): 1 NaN/inf entries"):
        list(scan(ckpts, settings=SETTINGS, cache=None))


def test_explorer_node_with_nan_shows_a_named_error_and_other_nodes_work(family, tmp_path):
    from types import SimpleNamespace as NS

    from analysis.run.session import ExplorerSession

    s = ExplorerSession.open([family["base"], family["bad"]], device="cpu", cache_dir=tmp_path / "cache")
    up, head1 = NS(layer=1, module="up", head=None), NS(layer=0, module="q", head=1)
    head0 = NS(layer=0, module="q", head=0)
    with pytest.raises(DiffractError, match=r"checkpoint bad, tensor layers\.1\.mlp\.up_proj\.weight \(layer 1 up\)"):
        s.spectrum(up)
    with pytest.raises(DiffractError, match=r"layer 0 q head 1, ΔW against the base\): 1 NaN/inf entries in bad"):
        s.delta(head1)
    assert len(s.spectrum(head0).spectra) == 2 and len(s.delta(head0).deltas) == 1
    with pytest.raises(DiffractError, match=r"^6 matrices could not be computed, the other \d+ are cached"):
        s.compute_all()
    assert s.cached_spectrum(NS(layer=1, module="down", head=None)) is not None   # the rest was cached


def test_matrix_of_only_infinities_and_nan_base_are_named(tmp_path):
    def all_inf(tensors: dict) -> None:
        tensors["model.layers.0.mlp.down_proj.weight"].fill_(float("inf"))

    base = _folder(tmp_path, "nanbase", 0, all_inf)
    cpt = _folder(tmp_path, "cpt", 1)
    failures: list[MatrixFailure] = []
    ckpts = [open_checkpoint(base), open_checkpoint(cpt)]
    list(scan(ckpts, delta=True, settings=SETTINGS, cache=None, on_failure=failures.append))
    lines = [f.line() for f in failures]
    assert len(lines) == 2
    assert lines[0].startswith("checkpoint nanbase, tensor layers.0.mlp.down_proj.weight (layer 0 down): "
                               "6144 NaN/inf entries")
    # the delta of a clean CPT against a broken base names the base as the side with the NaN/inf
    assert lines[1].startswith("checkpoint cpt, tensor layers.0.mlp.down_proj.weight (layer 0 down, ΔW against "
                               "the base): 6144 NaN/inf entries in nanbase")


def _delta_cli(family, tmp_path, capsys, *cpts: str) -> tuple[int, list[dict], list[str]]:
    out = tmp_path / f"delta-{'-'.join(cpts)}.csv"
    code = main(["delta", str(family["base"]), *[str(family[c]) for c in cpts], "--out", str(out), "--device", "cpu",
                 "--no-cache"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("diffract-tui: ")]
    return code, read_table(out)[0], err


def test_delta_with_a_nan_tensor_writes_every_other_row_names_it_and_exits_3(family, tmp_path, capsys):
    before = {c: _sha256(family[c]) for c in family}
    code, clean_rows, err = _delta_cli(family, tmp_path, capsys, "clean")
    assert code == 0 and err == []
    code, rows, err = _delta_cli(family, tmp_path, capsys, "bad")
    assert code == 3
    up, q = NAN_TENSOR[len("model."):], INF_HEADS[len("model."):]
    ids = lambda rs: [(r["tensor"], r["module"], r["head"], r["kv_head"]) for r in rs]  # noqa: E731
    lost = [i for i in ids(clean_rows) if i[0] == up or (i[0] == q and i[1] == "q" and i[2] in (None, 1))]
    assert len(lost) == 3 and ids(rows) == [i for i in ids(clean_rows) if i not in lost]
    assert len(err) == 4 and err[-1].startswith("diffract-tui: partial result: 3 matrix(es) failed")
    assert all(line.startswith("diffract-tui: error: checkpoint bad, tensor ") and str(family["bad"]) in line
               and "NaN/inf entries in bad" in line for line in err[:3])
    assert sum(up in line for line in err) == 1 and sum("(layer 0 q head 1, " in line for line in err) == 1
    # two CPT checkpoints: the agreement pass cannot run over the broken head; it says so and the rows stay
    code, rows2, err2 = _delta_cli(family, tmp_path, capsys, "bad", "clean")
    assert code == 3 and len(rows2) == len(rows) + len(clean_rows)
    assert sum("cross-domain agreement" in line and "A2/A3 agreement columns" in line for line in err2) == 1
    assert {c: _sha256(family[c]) for c in family} == before


# ------------------------------------------------------------------------------------------------
# Item 12: a cache cleared, forged or unwritable under a scan never fails the scan
# ------------------------------------------------------------------------------------------------


def _scan_rows(folder: Path, out: Path, capsys, *cache_args: str) -> tuple[list[dict], str]:
    """Rows of `scan FOLDER --heads` (exit code 0 asserted) and its stderr."""
    code = main(["scan", str(folder), "--out", str(out), "--heads", "--device", "cpu", "--quiet", *cache_args])
    err = capsys.readouterr().err
    assert code == 0, err
    return read_table(out)[0], err


@pytest.fixture(scope="module")
def uncached(family, tmp_path_factory) -> list[dict]:
    """The reference: rows of an uncached scan of the base."""
    out = tmp_path_factory.mktemp("uncached") / "ref.csv"
    assert main(["scan", str(family["base"]), "--out", str(out), "--heads", "--device", "cpu", "--quiet",
                 "--no-cache"]) == 0
    return read_table(out)[0]


@pytest.fixture
def single_file_entries(monkeypatch):
    """Every cache entry as its own file (the layout these tests forge; packs: tests/test_cache_packs.py)."""
    monkeypatch.setattr("analysis.run.cache.SMALL_ENTRY_BYTES", -1)


def test_cache_cleared_while_the_scan_writes_is_made_again(family, uncached, tmp_path, capsys, monkeypatch,
                                                             single_file_entries):
    # `cache clear` removes the fan-out folder a writer has just made, before its temp file is created: that
    # was "cannot write a cache entry (No such file or directory) — free some space", exit 1
    import analysis.io.atomic as atomic
    from analysis.run.cache import Cache

    root = tmp_path / "cache"
    create_temp, cleared, seen = atomic._create_temp, [], set()

    def clear_first(path: Path):
        if len(cleared) < 6 and path.parent.parent == root and path not in seen:
            seen.add(path)                                 # each of the first 6 entries, on its first try
            cleared.append(Cache(root).clear())            # the concurrent `diffract-tui cache clear`
            assert not path.parent.exists()
        return create_temp(path)

    monkeypatch.setattr(atomic, "_create_temp", clear_first)
    rows, err = _scan_rows(family["base"], tmp_path / "a.csv", capsys, "--cache-dir", str(root))
    assert len(cleared) == 6 and err.strip() == f"wrote {len(uncached)} rows to {tmp_path / 'a.csv'}"
    assert rows == uncached
    # every entry was written in the end, except those an earlier clear removed after they were written
    assert Cache(root).info().entries == 2 * len(uncached) - sum(cleared)


def test_cache_folder_removed_between_every_write_skips_those_entries(family, uncached, tmp_path, capsys,
                                                                       monkeypatch):
    import shutil

    import analysis.io.atomic as atomic

    root = tmp_path / "cache"
    create_temp = atomic._create_temp

    def always_gone(path: Path):
        if root in path.parents:
            shutil.rmtree(root, ignore_errors=True)        # an `rm -rf` of the cache that never stops
        return create_temp(path)

    monkeypatch.setattr(atomic, "_create_temp", always_gone)
    rows, err = _scan_rows(family["base"], tmp_path / "a.csv", capsys, "--cache-dir", str(root))
    assert rows == uncached
    warnings = [line for line in err.splitlines() if line.startswith("diffract-tui: warning: ")]
    assert len(warnings) == 1 and "cannot write the cache (No such file or directory)" in warnings[0]


def _forge_shapes(root: Path, shape: str) -> int:
    """Rewrite every cached .npy header to claim `shape` (same header length); returns how many."""
    count = 0
    for path in root.glob("*/*.npy"):
        raw = path.read_bytes()
        length = int.from_bytes(raw[8:10], "little")
        header = raw[10:10 + length].decode("latin1")
        start = header.index("'shape': (") + len("'shape': ")
        stop = header.index(")", start) + 1
        forged = header[:start] + shape + header[stop:]
        forged = forged.rstrip(" \n") + " " * (length - len(forged.rstrip(" \n")) - 1) + "\n"
        assert len(forged) == length
        path.write_bytes(raw[:10] + forged.encode("latin1") + raw[10 + length:])
        count += 1
    return count


@pytest.mark.parametrize("shape", ["(1000000000000,)", "(3,)", "(1000000, 1000000)"])
def test_npy_whose_header_claims_another_shape_is_recomputed(family, uncached, tmp_path, capsys, shape,
                                                             single_file_entries):
    # before: np.load allocated what the header claimed: MemoryError for (10¹²,)
    from analysis.model.architecture import layout_of
    from analysis.run.cache import Cache
    from analysis.run.scan import node_metrics

    root = tmp_path / "cache"
    _scan_rows(family["base"], tmp_path / "a.csv", capsys, "--cache-dir", str(root))
    assert _forge_shapes(root, shape) == len(uncached)
    rows, _ = _scan_rows(family["base"], tmp_path / "b.csv", capsys, "--cache-dir", str(root))
    assert rows == uncached
    ckpt = open_checkpoint(family["base"])
    cache, layout = Cache(root), layout_of(ckpt)
    got = node_metrics(ckpt, layout, 1, "up", settings=SETTINGS, cache=cache)["eigenvalues"]
    W = ckpt.tensor(NAN_TENSOR[len("model."):], torch.float32)
    np.testing.assert_array_equal(got, eigenvalues(W, SETTINGS).numpy())
    assert _forge_shapes(root, shape) == len(uncached)   # node_metrics replaced its forged entry with a good one


def test_npy_with_an_object_dtype_or_short_data_is_a_miss(tmp_path, single_file_entries):
    from analysis.run.cache import Cache

    cache, key = Cache(tmp_path), "ab" * 32
    for forge in (lambda raw: raw.replace(b"'<f8'", b"'|O' "), lambda raw: raw[:-8], lambda raw: raw + b"\0" * 8):
        cache.put_array(key, np.arange(4.0))
        path = cache._path(key, ".npy")
        path.write_bytes(forge(path.read_bytes()))
        assert cache.get_array(key) is None and not path.exists()


def test_cache_under_a_regular_file_warns_once_and_the_scan_runs_uncached(family, uncached, tmp_path, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("mine")
    rows, err = _scan_rows(family["base"], tmp_path / "a.csv", capsys, "--cache-dir", str(blocker / "cache"))
    assert rows == uncached and blocker.read_text() == "mine"
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("diffract-tui: warning: cannot write the cache (Not a directory), ")
    assert str(blocker / "cache") in lines[0] and "going on without caching" in lines[0]


DROP_PRIVILEGES = """
import os, sys
from diffract_tui.cli import main
args = sys.argv[1:]
# warm-up as root, uncached, so every module is imported while the interpreter's own folder is readable
assert main([*args[:3], args[3] + ".warm.csv", *args[4:-2], "--no-cache"]) == 0
os.setgroups([]); os.setgid(65534); os.setuid(65534)           # nobody: the root-owned cache is read-only
sys.exit(main(args))
"""


def test_read_only_cache_warns_once_and_the_scan_runs_uncached(family, uncached, tmp_path):
    # CI runs as root, for whom no folder is read-only: the scan runs as `nobody` in a subprocess
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    shared = Path(tempfile.mkdtemp(prefix="diffract-ro-"))
    try:
        os.chmod(shared, 0o755)
        ckpt = shutil.copytree(family["base"], shared / "base")
        for path in ckpt.iterdir():
            os.chmod(path, 0o644)                           # readable by nobody (safetensors writes 0600)
        cache = shared / "cache"
        cache.mkdir(mode=0o755)
        out_dir = shared / "out"
        out_dir.mkdir()
        os.chmod(out_dir, 0o777)
        before = _sha256(ckpt)
        if os.geteuid() == 0:
            cmd = [sys.executable, "-c", DROP_PRIVILEGES]
        else:  # pragma: no cover - a non-root developer: a plain read-only folder does it
            os.chmod(cache, 0o555)
            cmd = [sys.executable, "-c", "import sys; from diffract_tui.cli import main; sys.exit(main(sys.argv[1:]))"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([*cmd, "scan", str(ckpt), "--out", str(out_dir / "a.csv"), "--heads", "--device", "cpu",
                               "--quiet", "--cache-dir", str(cache)], capture_output=True, text=True, env=env,
                              cwd=shared, timeout=300)
        assert proc.returncode == 0, proc.stderr
        warnings = [line for line in proc.stderr.splitlines() if "warning" in line]
        assert len(warnings) == 1, proc.stderr
        assert warnings[0].startswith("diffract-tui: warning: cannot write the cache (Permission denied), ")
        assert proc.stderr.strip().endswith(f"wrote {len(uncached)} rows to {out_dir / 'a.csv'}")
        assert read_table(out_dir / "a.csv")[0] == uncached
        assert list(cache.iterdir()) == [] and _sha256(ckpt) == before
    finally:
        shutil.rmtree(shared, ignore_errors=True)

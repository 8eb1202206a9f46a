"""The scan engine and `diffract-tui scan`: row counts, SPEC names, values against direct slices,
one read per tensor, one batched call per projection, the cache (hits, invalidation, corruption,
concurrency), progress/cancel, node_metrics and the CLI's three table formats."""

from __future__ import annotations

import math
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import analysis
from analysis.spectral.backend import SpectralSettings
from analysis.run.cache import CACHE_ENV_VAR, Cache
from analysis.io.checkpoint import Checkpoint, open_checkpoint
from analysis.generate import write_checkpoint
from analysis.run.scan import ID_COLUMNS, node_metrics, plan_size, scan
from analysis.run.tables import read_table
from diffract_tui.cli import main

L, D, H, HKV, FF, VOCAB = 2, 64, 4, 2, 96, 80
DH = D // H
# Every SPEC §3 metric name (a scan row must carry all of them).
SPEC3_NAMES = [
    "frob_norm", "nuclear_norm", "l2_norm", "log_norm", "stable_rank", "effective_rank", "hard_rank",
    "pl_alpha", "pl_esd_xmin", "pl_ks", "pl_n_tail",
    "tpl_alpha", "tpl_lambda", "tpl_esd_xmin", "tpl_ks", "expon_lambda", "expon_esd_xmin", "expon_ks",
    "mp_esd_max", "mp_esd_min", "mp_bulk_std", "mp_num_spikes", "mp_ks", "mp_soft_rank",
    "tw_esd_bound", "tw_num_spikes", "pl_alpha_weighted", "w1_rand_distance",
]
SPEC4_DELTA_NAMES = ["delta_frob", "delta_rel", "delta_cos", "delta_rho"]
MATRICES_PER_LAYER = 7          # q, k, v, o, gate, up, down (the two norms have no spectrum)
GLOBAL_MATRICES = 2             # embed_tokens and lm_head (llama does not tie them); the final norm is 1-D
HEAD_ROWS_PER_LAYER = 2 * H + 2 * HKV   # q and o per query head, k and v per kv head


def _llama(path: Path, seed: int) -> Path:
    return write_checkpoint(path, "llama", seed=seed, num_layers=L, hidden_size=D, num_heads=H, num_kv_heads=HKV,
                            intermediate_size=FF, vocab_size=VOCAB, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("scan_family")
    return _llama(root / "base", 0), _llama(root / "cpt", 1)


@pytest.fixture(scope="module")
def scanned(family, tmp_path_factory) -> tuple[Path, list[dict]]:
    """ONE cold scan of base + cpt with heads and deltas (the slow part, shared): its cache folder and rows."""
    torch.set_num_threads(1)
    cache_dir = tmp_path_factory.mktemp("scan_cache")
    return cache_dir, _rows(list(family), Cache(cache_dir), heads=True, delta=True)


TINY_MATRICES = 1 * MATRICES_PER_LAYER + GLOBAL_MATRICES  # a one-layer model: 9 matrices


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A one-layer llama (cheap to recompute) for the invalidation and concurrency tests."""
    return write_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny", "llama", seed=5, num_layers=1, hidden_size=32,
                            num_heads=2, num_kv_heads=1, intermediate_size=48, vocab_size=40,
                            tie_word_embeddings=False)


def _settings(**kw) -> SpectralSettings:
    return SpectralSettings(device="cpu", **kw)


def _rows(paths, cache, **kw) -> list[dict]:
    ckpts = [open_checkpoint(p) for p in paths]
    return list(scan(ckpts, settings=kw.pop("settings", _settings()), cache=cache, **kw))


def _raw(path: Path, key: str) -> torch.Tensor:
    """A tensor straight from the safetensors file (HF name), independent of the engine's readers."""
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return f.get_tensor(key).to(torch.float32)


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    return a == b


def _rows_equal(r1: list[dict], r2: list[dict]) -> bool:
    return len(r1) == len(r2) and all(
        r1[i].keys() == r2[i].keys() and all(_same(r1[i][k], r2[i][k]) for k in r1[i]) for i in range(len(r1)))


# ------------------------------------------------------------------------------------------------
# rows: counts, names, values
# ------------------------------------------------------------------------------------------------


def test_whole_matrix_rows_count_names_and_values(family, scanned):
    base, _ = family
    rows = _rows([base], Cache(scanned[0]))
    assert len(rows) == L * MATRICES_PER_LAYER + GLOBAL_MATRICES  # 16
    for name in (*ID_COLUMNS, *SPEC3_NAMES):
        assert name in rows[0], name
    assert {r["operation"] for r in rows} == {"weight"}
    q0 = next(r for r in rows if r["layer"] == 0 and r["module"] == "q")
    W = _raw(base, "model.layers.0.self_attn.q_proj.weight")
    assert (q0["rows"], q0["cols"]) == (H * DH, D)
    # frob_norm and l2_norm against torch on the raw tensor (an independent route)
    assert q0["frob_norm"] == pytest.approx(torch.linalg.norm(W).item(), rel=1e-4)
    assert q0["l2_norm"] == pytest.approx(torch.linalg.matrix_norm(W, ord=2).item(), rel=1e-4)
    down = next(r for r in rows if r["layer"] == 1 and r["module"] == "down")
    assert (down["rows"], down["cols"]) == (D, FF)
    embed = next(r for r in rows if r["layer"] is None and r["module"] == "embed")
    assert (embed["rows"], embed["cols"]) == (VOCAB, D)


def test_head_rows_count_groups_and_slices(family, scanned):
    base, _ = family
    rows = _rows([base], Cache(scanned[0]), heads=True)
    head_rows = [r for r in rows if r["head"] is not None or r["kv_head"] is not None]
    assert len(rows) == L * MATRICES_PER_LAYER + GLOBAL_MATRICES + L * HEAD_ROWS_PER_LAYER  # 16 + 24
    assert len(head_rows) == L * HEAD_ROWS_PER_LAYER
    # q/o rows carry the query head and its kv group g(h) = h // (H/H_kv); k/v rows a kv head only
    q_heads = [(r["head"], r["kv_head"]) for r in head_rows if r["layer"] == 1 and r["module"] == "q"]
    assert q_heads == [(0, 0), (1, 0), (2, 1), (3, 1)]
    k_heads = [(r["head"], r["kv_head"]) for r in head_rows if r["layer"] == 1 and r["module"] == "k"]
    assert k_heads == [(None, 0), (None, 1)]
    # values match SPEC §2 slices cut here from the raw tensors: q rows, k rows of the group, o columns
    Wq = _raw(base, "model.layers.1.self_attn.q_proj.weight")
    Wk = _raw(base, "model.layers.1.self_attn.k_proj.weight")
    Wo = _raw(base, "model.layers.1.self_attn.o_proj.weight")
    by = {(r["module"], r["head"], r["kv_head"]): r for r in head_rows if r["layer"] == 1}
    q2 = by[("q", 2, 1)]
    assert (q2["rows"], q2["cols"]) == (DH, D)
    assert q2["frob_norm"] == pytest.approx(torch.linalg.norm(Wq[2 * DH:3 * DH]).item(), rel=1e-5)
    assert by[("k", None, 1)]["frob_norm"] == pytest.approx(torch.linalg.norm(Wk[DH:2 * DH]).item(), rel=1e-5)
    o3 = by[("o", 3, 1)]
    assert (o3["rows"], o3["cols"]) == (D, DH)
    assert o3["l2_norm"] == pytest.approx(torch.linalg.matrix_norm(Wo[:, 3 * DH:], ord=2).item(), rel=1e-4)
    # per-head q/k/v ESDs have only d_h = 16 values: the α fit is flagged unreliable (SPEC §3)
    assert q2["pl_n_tail"] <= DH


def test_delta_rows(family, scanned):
    base, cpt = family
    rows = scanned[1]
    per_ckpt = L * MATRICES_PER_LAYER + GLOBAL_MATRICES + L * HEAD_ROWS_PER_LAYER
    delta = [r for r in rows if r["operation"] == "delta"]
    assert len(rows) == 3 * per_ckpt  # weights of both + deltas of cpt against base
    assert len(delta) == per_ckpt and {r["checkpoint"] for r in delta} == {"cpt"}
    for name in (*SPEC3_NAMES, *SPEC4_DELTA_NAMES):
        assert name in delta[0], name
    up = next(r for r in delta if r["layer"] == 0 and r["module"] == "up" and r["head"] is None)
    W0 = _raw(base, "model.layers.0.mlp.up_proj.weight")
    W1 = _raw(cpt, "model.layers.0.mlp.up_proj.weight")
    assert up["delta_frob"] == pytest.approx(torch.linalg.norm(W1 - W0).item(), rel=1e-5)
    assert up["delta_rel"] == pytest.approx((torch.linalg.norm(W1 - W0) / torch.linalg.norm(W0)).item(), rel=1e-5)
    assert up["frob_norm"] == pytest.approx(torch.linalg.norm(W1 - W0).item(), rel=1e-4)  # §3 metrics of ΔW
    v1 = next(r for r in delta if r["layer"] == 1 and r["module"] == "v" and r["kv_head"] == 1)
    Wv0 = _raw(base, "model.layers.1.self_attn.v_proj.weight")[DH:]
    Wv1 = _raw(cpt, "model.layers.1.self_attn.v_proj.weight")[DH:]
    assert v1["delta_frob"] == pytest.approx(torch.linalg.norm(Wv1 - Wv0).item(), rel=1e-5)


def test_fused_and_transposed_gpt2_parts_and_heads(tmp_path):
    # GPT-2 stores c_attn as Conv1D (in × out) with q|k|v along out: parts and heads must be cut from columns
    path = write_checkpoint(tmp_path / "g", "gpt2", seed=2, num_layers=1, hidden_size=32, num_heads=2,
                            intermediate_size=48, vocab_size=40)
    rows = _rows([path], None, heads=True)
    whole = [r for r in rows if r["head"] is None and r["kv_head"] is None]
    # qkv (fused), its q/k/v parts, o, fc_in, fc_out + wte and wpe (lm_head is tied, the norms are 1-D)
    assert [r["module"] for r in whole] == ["qkv", "q", "k", "v", "o", "fc_in", "fc_out", "embed", "pos_embed"]
    assert len(rows) == 9 + 4 * 2  # q, k, v, o for each of the 2 heads (no GQA in gpt2)
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        c_attn = f.get_tensor("transformer.h.0.attn.c_attn.weight")  # (D, 3·D) stored in × out
        c_proj = f.get_tensor("transformer.h.0.attn.c_proj.weight")  # (D, D) stored in × out
    by = {(r["module"], r["head"], r["kv_head"]): r for r in rows}
    assert (by[("fc_in", None, None)]["rows"], by[("fc_in", None, None)]["cols"]) == (48, 32)  # logical out × in
    k_part = by[("k", None, None)]
    assert k_part["frob_norm"] == pytest.approx(torch.linalg.norm(c_attn[:, 32:64]).item(), rel=1e-5)
    v_head1 = by[("v", None, 1)]  # logical rows [16, 32) of W_v = stored columns 64 + [16, 32) of c_attn
    assert (v_head1["rows"], v_head1["cols"]) == (16, 32)
    assert v_head1["l2_norm"] == pytest.approx(torch.linalg.matrix_norm(c_attn[:, 80:96], ord=2).item(), rel=1e-4)
    o_head0 = by[("o", 0, 0)]  # logical columns [0, 16) of W_o = c_projᵀ = stored rows [0, 16) of c_proj
    assert (o_head0["rows"], o_head0["cols"]) == (32, 16)
    assert o_head0["frob_norm"] == pytest.approx(torch.linalg.norm(c_proj[:16]).item(), rel=1e-5)


def test_each_tensor_read_once_and_one_batched_call_per_projection(tiny, tmp_path, monkeypatch):
    other = write_checkpoint(tmp_path / "other", "llama", seed=6, num_layers=1, hidden_size=32, num_heads=2,
                             num_kv_heads=1, intermediate_size=48, vocab_size=40, tie_word_embeddings=False)
    reads: dict[tuple[str, str], int] = {}
    real_tensor, real_rows, real_array = Checkpoint.tensor, Checkpoint.rows, Checkpoint.array

    def tensor(self, name, dtype=torch.float32):
        reads[(self.label, name)] = reads.get((self.label, name), 0) + 1
        return real_tensor(self, name, dtype)

    def rows(self, name, start, stop, dtype=torch.float32):
        reads[(self.label, name)] = reads.get((self.label, name), 0) + 1
        return real_rows(self, name, start, stop, dtype)

    def array(self, name, dtype="float32"):     # a CPU scan's weight items read numpy arrays (issue 13)
        reads[(self.label, name)] = reads.get((self.label, name), 0) + 1
        return real_array(self, name, dtype)

    import analysis.spectral.spectra as spectra

    calls = []
    real_batched = spectra.batched_spectral_metrics

    def batched(Ws, settings=None, evals=None, **kw):
        import inspect

        if inspect.stack()[1].filename.endswith(os.path.join("analysis", "run", "scan.py")):  # the scan's own calls
            calls.append(tuple(Ws.shape))
        return real_batched(Ws, settings, evals=evals, **kw)

    monkeypatch.setattr(Checkpoint, "tensor", tensor)
    monkeypatch.setattr(Checkpoint, "rows", rows)
    monkeypatch.setattr(Checkpoint, "array", array)
    monkeypatch.setattr(spectra, "batched_spectral_metrics", batched)
    _rows([tiny, other], None, heads=True, delta=True)
    assert len(reads) == 2 * TINY_MATRICES and set(reads.values()) == {1}  # the base read once despite the deltas
    # the scan's batched calls: one per (checkpoint, projection) with every head of it — q (H=2, d_h, D),
    # k and v (H_kv=1, d_h, D), o (H, D, d_h); deltas go through analysis.deltas.delta's own batched call
    assert sorted(calls) == sorted([(2, 16, 32), (1, 16, 32), (1, 16, 32), (2, 32, 16)] * 2)


# ------------------------------------------------------------------------------------------------
# the cache
# ------------------------------------------------------------------------------------------------


def _forbid_compute(monkeypatch):
    import analysis.deltas.delta as delta
    import analysis.spectral.spectra as spectra

    def boom(*a, **k):
        raise AssertionError("computed although every entry should be cached")

    for name in ("eigenvalues", "spectral_metrics", "batched_spectral_metrics"):
        monkeypatch.setattr(spectra, name, boom)
    monkeypatch.setattr(delta, "batched_delta_metrics", boom)
    monkeypatch.setattr(Checkpoint, "tensor", boom)
    monkeypatch.setattr(Checkpoint, "rows", boom)


def test_second_scan_reads_only_the_cache(family, scanned, monkeypatch):
    cache_dir, first = scanned
    _forbid_compute(monkeypatch)
    second = _rows(list(family), Cache(cache_dir), heads=True, delta=True)
    assert _rows_equal(first, second)


def _count_eigen(monkeypatch) -> list[int]:
    import analysis.spectral.spectra as spectra

    calls: list[int] = []
    real = spectra._eigenvalues          # what both `eigenvalues` (W) and the permuted null go through

    def counting(W, settings):
        calls.append(1)
        return real(W, settings)

    monkeypatch.setattr(spectra, "_eigenvalues", counting)
    return calls


@pytest.mark.parametrize("change", [{"dtype": "float64"}, {"xmin_rule": "local_min"}, {"seed": 7}])
def test_a_changed_setting_misses(tiny, tmp_path, monkeypatch, change):
    cache = Cache(tmp_path / "c")
    _rows([tiny], cache)
    calls = _count_eigen(monkeypatch)
    _rows([tiny], cache)
    assert calls == []  # same settings: all hits
    _rows([tiny], cache, settings=_settings(**change))
    # every matrix recomputed: one eigen call for W and one for its permuted null (SPEC §3 MP edge)
    assert len(calls) == 2 * TINY_MATRICES


def test_engine_version_and_touched_file_miss(tiny, tmp_path, monkeypatch):
    import shutil

    model = Path(shutil.copytree(tiny, tmp_path / "m"))
    cache = Cache(tmp_path / "c")
    _rows([model], cache)
    calls = _count_eigen(monkeypatch)
    monkeypatch.setattr(analysis, "ENGINE_VERSION", analysis.ENGINE_VERSION + "-next")
    _rows([model], cache)
    assert len(calls) == 2 * TINY_MATRICES
    calls.clear()
    _rows([model], cache)
    assert calls == []
    st = os.stat(model / "model.safetensors")
    os.utime(model / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    _rows([model], cache)  # same bytes, new mtime: a new fingerprint, so nothing is trusted
    assert len(calls) == 2 * TINY_MATRICES


def test_corrupt_entries_are_recomputed(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr("analysis.run.cache.SMALL_ENTRY_BYTES", -1)  # single files (corrupt packs: test_cache_packs)
    cache = Cache(tmp_path / "c")
    first = _rows([tiny], cache)
    metrics_entries = sorted((tmp_path / "c").rglob("*.json"))
    assert len(metrics_entries) == TINY_MATRICES
    metrics_entries[0].write_bytes(b"{ not json")
    metrics_entries[1].write_bytes(metrics_entries[1].read_bytes()[:20])
    calls = _count_eigen(monkeypatch)
    second = _rows([tiny], cache)
    assert len(calls) == 2 * 2  # exactly the two damaged matrices (W and its permuted null each)
    assert _rows_equal(first, second)
    calls.clear()
    _rows([tiny], cache)
    assert calls == []  # and they were rewritten


def _scan_into(args) -> list[dict]:
    path, cache_dir = args
    torch.set_num_threads(1)
    return list(scan([open_checkpoint(path)], heads=True, settings=_settings(), cache=Cache(cache_dir)))


def test_two_processes_scanning_into_one_cache(tiny, tmp_path):
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        a, b = pool.map(_scan_into, [(str(tiny), str(tmp_path / "c"))] * 2)
    assert _rows_equal(a, b)
    assert len(a) == TINY_MATRICES + (2 * 2 + 2 * 1)  # + q,o per query head and k,v per kv head
    assert _rows_equal(a, _scan_into((str(tiny), str(tmp_path / "c"))))  # and the cache they left is sound
    assert not list((tmp_path / "c").rglob(".tmp-*"))


def test_no_cache_computes_and_stores_nothing(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "env"))
    assert len(_rows([tiny], None)) == TINY_MATRICES
    assert not (tmp_path / "env").exists()


# ------------------------------------------------------------------------------------------------
# progress, cancel, node_metrics
# ------------------------------------------------------------------------------------------------


def test_progress_reaches_total_and_cancel_stops_early(family, scanned):
    ckpts = [open_checkpoint(p) for p in family]
    seen = []
    rows = list(scan(ckpts, heads=True, delta=True, settings=_settings(), cache=Cache(scanned[0]),
                     progress=lambda d, t, label: seen.append((d, t))))
    total = plan_size(ckpts, heads=True, delta=True)
    # items: per checkpoint and layer 7 matrices + 4 head batches, plus 2 globals; cpt's deltas the same again
    assert total == 3 * (L * (MATRICES_PER_LAYER + 4) + GLOBAL_MATRICES)
    assert seen[0] == (0, total) and seen[-1] == (total, total)
    assert [d for d, _ in seen] == list(range(total + 1))
    stop_after = 3
    progressed = []
    partial = list(scan(ckpts, settings=_settings(), cache=Cache(scanned[0]),
                        progress=lambda d, t, label: progressed.append(d), cancel=lambda: len(progressed) > stop_after))
    assert len(partial) == stop_after and len(rows) > stop_after


def test_node_metrics_matches_the_scan_and_returns_eigenvalues(family, scanned, tmp_path, monkeypatch):
    from analysis.model.architecture import layout_of

    base, cpt = family
    cache_dir, rows = scanned
    b, c = open_checkpoint(base), open_checkpoint(cpt)
    layout = layout_of(b)
    fresh = node_metrics(c, layout, 1, "o", 2, settings=_settings(), cache=Cache(tmp_path / "other"))
    assert fresh["eigenvalues"].shape == (DH,)  # the o slice is D × d_h: M = d_h eigenvalues
    assert np.all(np.diff(fresh["eigenvalues"]) >= 0)  # ascending
    want = next(r for r in rows if r["checkpoint"] == "cpt" and r["operation"] == "weight" and r["layer"] == 1
                and r["module"] == "o" and r["head"] == 2)
    for k in want:  # a head computed alone equals the same head computed in its batch
        if isinstance(want[k], float):
            assert fresh[k] == pytest.approx(want[k], rel=1e-6, abs=1e-12, nan_ok=True), k
        else:
            assert fresh[k] == want[k], k
    # the ESD's largest value is σ_max²/N of the slice
    Wo = _raw(cpt, "model.layers.1.self_attn.o_proj.weight")[:, 2 * DH:3 * DH]
    assert fresh["eigenvalues"][-1] == pytest.approx(torch.linalg.matrix_norm(Wo, ord=2).item() ** 2 / D, rel=1e-4)
    # after a scan, a node's metrics and eigenvalues come from the scan's entries: nothing is computed
    _forbid_compute(monkeypatch)
    node = node_metrics(b, layout, 0, "gate", settings=_settings(), cache=Cache(cache_dir))
    want = next(r for r in rows if r["checkpoint"] == "base" and r["layer"] == 0 and r["module"] == "gate")
    assert all(_same(node[k], want[k]) for k in want) and node["eigenvalues"].shape == (D,)
    monkeypatch.undo()
    d = node_metrics(c, layout, 0, "up", delta_against=b, settings=_settings(), cache=Cache(cache_dir))
    want = next(r for r in rows if r["operation"] == "delta" and r["layer"] == 0 and r["module"] == "up"
                and r["head"] is None)
    assert all(_same(d[k], want[k]) for k in want)
    W0 = _raw(base, "model.layers.0.mlp.up_proj.weight").double()
    W1 = _raw(cpt, "model.layers.0.mlp.up_proj.weight").double()
    assert d["eigenvalues"][-1] == pytest.approx(torch.linalg.matrix_norm(W1 - W0, ord=2).item() ** 2 / FF, rel=1e-6)


# ------------------------------------------------------------------------------------------------
# the CLI
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".json", ".parquet"])
def test_cli_writes_tables_that_read_back_equal(family, scanned, tmp_path, suffix, capsys):
    base, cpt = family
    cache_dir, expected = scanned
    out = tmp_path / f"scan{suffix}"
    code = main(["scan", str(base), str(cpt), "--out", str(out), "--heads", "--delta", "--device", "cpu",
                 "--cache-dir", str(cache_dir), "--quiet"])
    assert code == 0, capsys.readouterr().err
    rows, meta = read_table(out)
    per_ckpt = L * MATRICES_PER_LAYER + GLOBAL_MATRICES + L * HEAD_ROWS_PER_LAYER
    assert len(rows) == len(expected) == 3 * per_ckpt
    # the CLI orders rows base weights, cpt weights, cpt deltas; match them by their identity
    ident = lambda r: (r["checkpoint"], r["operation"], r["tensor"], r["module"], r["head"], r["kv_head"])  # noqa
    got = {ident(r): r for r in rows}
    assert len(got) == len(rows)
    for r in expected:
        back = got[ident(r)]
        for k, v in r.items():
            if isinstance(back[k], float) and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)  # an int in a float column (e.g. a count that is NaN elsewhere)
            assert _same(back[k], v), (suffix, k, back[k], v)
    assert [c["label"] for c in meta["checkpoints"]] == ["base", "cpt"]
    assert meta["checkpoints"][0]["fingerprint"] == open_checkpoint(base).fingerprint
    assert meta["settings"]["dtype"] == "float32" and meta["device_kind"] == "cpu"


def test_cli_bad_suffix_is_one_line_exit_1(tiny, tmp_path, capsys):
    assert main(["scan", str(tiny), "--out", str(tmp_path / "scan.xlsx"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("diffract-tui: error:") and ".csv, .json or .parquet" in err
    assert not (tmp_path / "scan.xlsx").exists()


def test_cli_cache_dir_and_env_var_and_second_run_computes_nothing(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "envcache"))
    assert main(["scan", str(tiny), "--out", str(tmp_path / "a.csv"), "--device", "cpu",
                 "--cache-dir", str(tmp_path / "flag")]) == 0
    assert Cache(tmp_path / "flag").info().entries == 2 * TINY_MATRICES  # metrics + eigenvalues per matrix
    assert not (tmp_path / "envcache").exists()  # --cache-dir wins over the variable
    assert main(["scan", str(tiny), "--out", str(tmp_path / "b.csv"), "--device", "cpu"]) == 0
    assert Cache(tmp_path / "envcache").info().entries == 2 * TINY_MATRICES
    first, _ = read_table(tmp_path / "b.csv")
    _forbid_compute(monkeypatch)
    assert main(["scan", str(tiny), "--out", str(tmp_path / "c.csv"), "--device", "cpu"]) == 0
    second, _ = read_table(tmp_path / "c.csv")
    assert _rows_equal(first, second)
    # a re-run from the cache writes the same file, columns in the same order (cached metrics keep their order)
    assert (tmp_path / "c.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert f"wrote {TINY_MATRICES} rows" in capsys.readouterr().err


def test_cli_delta_needs_two_checkpoints(tiny, tmp_path, capsys):
    assert main(["scan", str(tiny), "--delta", "--out", str(tmp_path / "x.csv"), "--quiet"]) == 1
    assert "--delta needs at least two checkpoints" in capsys.readouterr().err

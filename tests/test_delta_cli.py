"""`diffract-tui delta` end to end on small generated llama checkpoints with a planted shared and a planted
domain-specific head: row layout, the three table formats, agreement columns, errors as one line, cache."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from analysis.generate import random_state_dict, write_checkpoint
from analysis.model.families import family_config
from analysis.run.tables import read_table
from diffract_tui.cli import main

CFG = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48, vocab_size=64)
DH = 8  # 32 / 4
SHARED = (1, 2)     # (layer, head) that both domains change the same way
SPECIFIC = (0, 1)   # (layer, head) each domain changes its own way
# rows per CPT checkpoint: 2 layers × 7 matrices + embed + lm_head = 16; heads per layer q 4 + k 2 + v 2 + o 4 = 12
MATRIX_ROWS, HEAD_ROWS = 16, 24


def _plant(sd: dict, layer: int, head: int, gen: torch.Generator, scale: float = 0.01) -> None:
    p = f"model.layers.{layer}.self_attn."
    sd[p + "q_proj.weight"][head * DH:(head + 1) * DH] += scale * torch.randn(DH, 32, generator=gen)
    sd[p + "o_proj.weight"][:, head * DH:(head + 1) * DH] += scale * torch.randn(32, DH, generator=gen)


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("delta_cli")
    config = family_config("llama", **CFG)
    base = random_state_dict("llama", config, seed=1)
    domains = []
    for seed in (2, 3):
        g = torch.Generator().manual_seed(seed)
        sd = {k: v + 1e-4 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        _plant(sd, *SHARED, torch.Generator().manual_seed(99))   # same generator seed → same update
        _plant(sd, *SPECIFIC, g)                                   # domain's own generator → its own update
        domains.append(sd)
    paths = [write_checkpoint(root / name, "llama", state_dict=sd, **CFG)
             for name, sd in (("base", base), ("dom_a", domains[0]), ("dom_b", domains[1]))]
    return paths[0], paths[1], paths[2]


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_two_domains_json_rows_agreement_and_classes(family, tmp_path, capsys):
    base, a, b = family
    out = tmp_path / "delta.json"
    code, stdout, err = _run(["delta", str(base), str(a), str(b), "--out", str(out), "--no-spectral",
                              "--magnitude-threshold", "0.1", "--no-cache"], capsys)
    assert code == 0, err
    rows, meta = read_table(out)
    assert len(rows) == 2 * (MATRIX_ROWS + HEAD_ROWS)
    assert list(rows[0])[:8] == ["checkpoint", "tensor", "layer", "module", "head", "kv_head", "rows", "cols"]
    for name in ("delta_frob", "delta_rel", "delta_cos", "delta_rho", "avg_max_l_agreement", "a2_agreement",
                 "a3_agreement", "head_class", "head_a2_agreement", "head_score"):
        assert name in rows[0], name
    q_rows = {(r["checkpoint"], r["layer"], r["head"]): r for r in rows if r["module"] == "q" and r["head"] is not None}
    assert len(q_rows) == 2 * 2 * 4
    for ck in ("dom_a", "dom_b"):
        assert q_rows[(ck, *SHARED)]["head_class"] == "agnostic"
        assert q_rows[(ck, *SPECIFIC)]["head_class"] == "specific"
        assert q_rows[(ck, *SHARED)]["head_a2_agreement"] > 0.99       # same update, plus 1 % noise
        assert abs(q_rows[(ck, *SPECIFIC)]["head_a2_agreement"]) < 0.4  # independent 8×32 + 32×8 updates
        # the two planted heads carry the largest head scores
        top2 = sorted(((r["head_score"], (r["layer"], r["head"])) for (c, _, _), r in q_rows.items() if c == ck),
                      reverse=True)[:2]
        assert {pos for _, pos in top2} == {SHARED, SPECIFIC}
    # k/v rows are per kv head under GQA: head empty, kv_head set
    k_rows = [r for r in rows if r["module"] == "k" and r["kv_head"] is not None]
    assert len(k_rows) == 2 * 2 * 2 and all(r["head"] is None for r in k_rows)
    assert all(r["rows"] == DH and r["cols"] == 32 for r in k_rows)
    summary = meta["summary"]
    assert summary["agreement"]["classes"] == {"agnostic": 1, "specific": 1, "inert": 6}
    assert [c["checkpoint"] for c in summary["checkpoints"]] == ["dom_a", "dom_b"]
    for c in summary["checkpoints"]:
        assert 0.0 < c["top10_share"] <= 1.0 and 0.0 <= c["gini"] < 1.0
    assert meta["base"]["fingerprint"] and len(meta["targets"]) == 2
    assert meta["settings"]["dtype"] == "float32"
    assert "cross-domain agreement" in err and "top-10 %" in err


def test_single_domain_csv_and_parquet_have_the_same_rows(family, tmp_path, capsys):
    base, a, _ = family
    rows_by_format = {}
    for suffix in (".csv", ".parquet"):
        out = tmp_path / f"delta{suffix}"
        code, _, err = _run(["delta", str(base), str(a), "--out", str(out), "--no-spectral", "--no-cache",
                             "--top-k", "4"], capsys)
        assert code == 0, err
        rows_by_format[suffix], meta = read_table(out)
        assert meta["summary"]["checkpoints"][0]["checkpoint"] == "dom_a"
        assert "agreement" not in meta["summary"]
    csv_rows, pq_rows = rows_by_format[".csv"], rows_by_format[".parquet"]
    assert len(csv_rows) == len(pq_rows) == MATRIX_ROWS + HEAD_ROWS
    assert "a2_agreement" not in csv_rows[0] and "head_score" in csv_rows[0]
    for r1, r2 in zip(csv_rows, pq_rows):
        assert r1["tensor"] == r2["tensor"] and r1["delta_frob"] == pytest.approx(r2["delta_frob"], rel=1e-12)
    assert all(r["a1_k"] == 4 for r in pq_rows)


def test_no_heads_gives_matrix_rows_only(family, tmp_path, capsys):
    base, a, b = family
    out = tmp_path / "m.json"
    code, _, err = _run(["delta", str(base), str(a), str(b), "--out", str(out), "--no-heads", "--no-spectral",
                         "--no-cache"], capsys)
    assert code == 0, err
    rows, meta = read_table(out)
    assert len(rows) == 2 * MATRIX_ROWS and all(r["head"] is None for r in rows)
    assert meta["summary"]["heads"] is False


def test_shape_mismatch_is_one_line(family, tmp_path, capsys):
    base, _, _ = family
    other = write_checkpoint(tmp_path / "wider", "llama", seed=5, **{**CFG, "intermediate_size": 40})
    code, _, err = _run(["delta", str(base), str(other), "--out", str(tmp_path / "x.csv"), "--no-cache"], capsys)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "shape mismatch" in lines[0] and "mlp" in lines[0]
    assert not (tmp_path / "x.csv").exists()


def test_bad_suffix_and_dtype_are_one_line_errors(family, tmp_path, capsys):
    base, a, _ = family
    code, _, err = _run(["delta", str(base), str(a), "--out", str(tmp_path / "x.txt")], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and ".txt" in err
    code, _, err = _run(["delta", str(base), str(a), "--out", str(tmp_path / "x.csv"), "--dtype", "int8"], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "int8" in err


def test_cache_reuses_results(family, tmp_path, capsys):
    base, a, _ = family
    cache_dir = tmp_path / "cache"
    outs = []
    for i in range(2):
        out = tmp_path / f"c{i}.json"
        code, _, err = _run(["delta", str(base), str(a), "--out", str(out), "--no-spectral",
                             "--cache-dir", str(cache_dir)], capsys)
        assert code == 0, err
        outs.append(read_table(out)[0])
    assert outs[0] == outs[1]
    from analysis.run.cache import Cache

    # one entry per matrix (16), per (layer, projection) head batch (8), the target's head scores (1, issue 13:
    # a rerun reads no tensor) and the head grids the head rows and summary use (1: a rerun imports no torch),
    # all small, so they are packed (a single pack: one writer, one flush)
    info = Cache(cache_dir).info()
    assert info.entries == MATRIX_ROWS + 8 + 1 + 1 and info.packs == 1


def test_help_is_fast_and_lists_the_options():
    proc = subprocess.run([sys.executable, "-m", "diffract_tui", "delta", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0
    for opt in ("--out", "--heads", "--device", "--dtype", "--top-k", "--cache-dir"):
        assert opt in proc.stdout


def test_unchanged_checkpoints_give_zero_deltas_and_strict_json(family, tmp_path, capsys):
    # The base against two copies of itself: every ΔW = 0 → delta_frob = delta_rel = 0, ρ and A2 undefined
    # (empty in the table), every head inert, and the summary still valid JSON (undefined numbers are null).
    import json
    import shutil

    base, _, _ = family
    copy1, copy2 = tmp_path / "same1", tmp_path / "same2"
    shutil.copytree(base, copy1)
    shutil.copytree(base, copy2)
    out = tmp_path / "same.json"
    code, stdout, err = _run(["delta", str(base), str(copy1), str(copy2), "--out", str(out), "--no-spectral",
                              "--no-cache", "--summary-json"], capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["agreement"]["classes"] == {"agnostic": 0, "specific": 0, "inert": 8}
    assert summary["agreement"]["mean_a2"] is None and summary["agreement"]["spearman"] is None
    assert all(c["top10_share"] == 0.0 and c["gini"] == 0.0 for c in summary["checkpoints"])
    rows, _ = read_table(out)
    assert all(r["delta_frob"] == 0.0 and r["delta_rel"] == 0.0 for r in rows)
    # unchanged (issue 9 item 13): ρ is 0/0 for a zero delta, so its cell is empty
    assert all(r["unchanged"] is True and r["delta_rho"] is None for r in rows)

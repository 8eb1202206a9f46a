"""Held-out loss in the loop (SPEC §9) on a real tiny continual pre-training trained inside the suite
(tests/tiny_cpt.py: a GQA Llama trained on prose, continued on code): the loss definition by hand, in-memory
rewinds against `rewind apply` + reload, the f = 0 and all-heads invariants, reproducibility, the Taylor
score against a finite difference, loss paths and the barrier, and the eval / sweep / plan / interpolate CLIs."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from analysis.edit.rewind import apply_rewind, checkpoint_ref, plan_from_inputs, rewind_inputs  # noqa: E402
from analysis.eval.evaluator import Evaluator, prepare_text  # noqa: E402
from analysis.eval.loss import load_model  # noqa: E402
from analysis.eval.patch import LivePatch, parameter_map  # noqa: E402
from analysis.eval.path import loss_barrier, loss_path  # noqa: E402
from analysis.eval.sweep import run_sweep, sweep_candidates  # noqa: E402
from analysis.eval.taylor import taylor_scores  # noqa: E402
from analysis.eval.texts import load_text  # noqa: E402
from analysis.io.checkpoint import open_checkpoint  # noqa: E402
from analysis.model.architecture import layout_of  # noqa: E402
from analysis.run.tables import read_table  # noqa: E402
from diffract_tui.cli import main  # noqa: E402
from tiny_cpt import family  # noqa: E402,F401  (the session fixture)

CPU = torch.device("cpu")
T, N = 64, 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # evaluations compare bit for bit


@pytest.fixture(scope="module")
def target_lm(family):
    return load_model(family.code, device=CPU, dtype=torch.float32)


def _et(lm, path: Path, role: str = "domain", tokens: int = T, windows: int = N):
    return prepare_text(lm, load_text(path), tokens, windows, role)


def _sha(paths: list[Path]) -> dict[str, str]:
    out = {}
    for p in paths:
        files = sorted(x for x in Path(p).rglob("*") if x.is_file()) if Path(p).is_dir() else [Path(p)]
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def _inputs(family, reference: bool = False):
    b, t = open_checkpoint(family.base), open_checkpoint(family.code)
    r = open_checkpoint(family.code2) if reference else None
    return b, t, r, rewind_inputs(b, t, r)


def _plan(family, inputs, b, t, **kw):
    return plan_from_inputs(inputs, base=checkpoint_ref(b), target=checkpoint_ref(t), **kw)


# ------------------------------------------------------------------------------------------------ the loss


def test_continued_model_has_lower_code_loss_and_forgets_prose(family):
    base = load_model(family.base, device=CPU, dtype=torch.float32)
    cpt = load_model(family.code, device=CPU, dtype=torch.float32)
    code_b = Evaluator(base, "b").loss(_et(base, family.code_text)).loss
    code_c = Evaluator(cpt, "c").loss(_et(cpt, family.code_text)).loss
    prose_b = Evaluator(base, "b").loss(_et(base, family.prose_text)).loss
    prose_c = Evaluator(cpt, "c").loss(_et(cpt, family.prose_text)).loss
    assert code_c < code_b - 0.05
    assert prose_c > prose_b  # the forgetting a rewind is meant to recover


def test_loss_is_mean_next_token_nll_by_hand(family, target_lm):
    et = _et(target_lm, family.code_text, windows=3)
    got = Evaluator(target_lm, "x").loss(et)
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in et.windows.ids:
            logp = torch.log_softmax(target_lm.model(input_ids=w[None]).logits[0].double(), dim=-1)
            for i in range(T - 1):
                nll -= float(logp[i, int(w[i + 1])])
                count += 1
        hf = [float(target_lm.model(input_ids=w[None], labels=w[None]).loss) for w in et.windows.ids]
    assert got.predicted == count == 3 * (T - 1)
    assert got.loss == pytest.approx(nll / count, rel=1e-6)
    assert got.loss == pytest.approx(sum(hf) / len(hf), rel=1e-6)  # transformers' labels=input_ids convention
    assert got.ppl == pytest.approx(math.exp(got.loss))


def test_evaluation_reports_progress_through_the_engines_one_protocol(family, target_lm):
    """progress(done, total, text) as every long engine call (analysis/progress.py): windows counted up to
    their total, the text the time left."""
    from analysis.eval.loss import evaluate

    et = _et(target_lm, family.code_text, windows=3)
    calls = []
    evaluate(target_lm, et.windows, progress=lambda done, total, text: calls.append((done, total, text)))
    assert calls and calls[-1][:2] == (3, 3) and [c[0] for c in calls] == sorted(c[0] for c in calls)
    assert all(isinstance(text, str) and text.startswith("ETA ") for _, _, text in calls)


def test_windows_are_the_first_n_consecutive_of_the_whole_text(family, target_lm):
    text = load_text(family.code_text)
    ids = target_lm.tokenizer(text.content, add_special_tokens=False)["input_ids"]
    et = _et(target_lm, family.code_text, windows=5)
    assert et.windows.ids.flatten().tolist() == ids[: 5 * T]
    long = _et(target_lm, family.code_text, tokens=256, windows=10_000)
    assert long.windows.short and long.windows.count == len(ids) // 256


# ------------------------------------------------------------------------------------------------ rewind


def test_patch_restores_bit_for_bit_and_f0_equals_target(family, target_lm):
    b, t, _, inputs = _inputs(family)
    before = {k: v.detach().clone() for k, v in parameter_map(target_lm.model).items()}
    ev = Evaluator(target_lm, t.fingerprint)
    et = _et(target_lm, family.code_text)
    patch = LivePatch(target_lm.model, b, layout_of(t))
    cands = sweep_candidates(inputs, base=checkpoint_ref(b), target=checkpoint_ref(t), reference=None,
                             patterns=["greedy", "top", "random"], fractions=[0.0, 0.5], seeds=2)
    rows = run_sweep(ev, patch, cands, [et], target=t, inputs=inputs)
    after = parameter_map(target_lm.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    target_row = next(r for r in rows if r["pattern"] == "target")
    f0 = [r for r in rows if r["fraction"] == 0.0 and r["pattern"] != "target"]
    assert len(f0) == 4 and all(r["loss"] == target_row["loss"] for r in f0)
    assert target_row["loss"] == Evaluator(target_lm, "fresh").loss(et).loss
    half = [r for r in rows if r["fraction"] == 0.5]
    assert all(r["heads"] == 4 and r["loss"] != target_row["loss"] for r in half)


def test_rewinding_every_head_is_the_target_with_base_attention(family, target_lm):
    b, t, _, inputs = _inputs(family)
    rl = _plan(family, inputs, b, t, pattern="greedy", fraction=1.0)
    et = _et(target_lm, family.code_text)
    with LivePatch(target_lm.model, b, layout_of(t)).rewound(rl):
        rewound = Evaluator(target_lm, "x").loss(et).loss
    hybrid = load_model(family.code, device=CPU, dtype=torch.float32)
    base_model = load_model(family.base, device=CPU, dtype=torch.float32)
    base_params = parameter_map(base_model.model)
    with torch.no_grad():
        for name, p in parameter_map(hybrid.model).items():
            if "self_attn" in name:
                p.copy_(base_params[name])
    assert rewound == Evaluator(hybrid, "y").loss(et).loss
    assert rewound != Evaluator(base_model, "z").loss(et).loss  # MLP, norms, embeddings stay the target's


@pytest.mark.parametrize("kw", [dict(pattern="greedy", fraction=0.25), dict(pattern="random", fraction=0.5, seed=1),
                                dict(pattern="top", fraction=0.5, gqa_policy="any")])
def test_in_memory_rewind_equals_apply_and_reload(family, target_lm, tmp_path, kw):
    b, t, _, inputs = _inputs(family)
    rl = _plan(family, inputs, b, t, **kw)
    et = _et(target_lm, family.code_text)
    with LivePatch(target_lm.model, b, layout_of(t)).rewound(rl):
        live = Evaluator(target_lm, "x").loss(et).loss
    apply_rewind(rl, tmp_path / "out")
    written = load_model(tmp_path / "out", device=CPU, dtype=torch.float32)
    assert live == pytest.approx(Evaluator(written, "y").loss(_et(written, family.code_text)).loss, abs=1e-5)


def test_measured_plan_loss_repeats_bit_for_bit(family, target_lm):
    b, t, _, inputs = _inputs(family)
    et = _et(target_lm, family.code_text)
    losses = []
    for _ in range(2):
        rl = _plan(family, inputs, b, t, pattern="random", fraction=0.5, seed=7)
        with LivePatch(target_lm.model, b, layout_of(t)).rewound(rl):
            losses.append(Evaluator(target_lm, "x").loss(et).loss)
    assert losses[0].hex() == losses[1].hex()
    other = _plan(family, inputs, b, t, pattern="random", fraction=0.5, seed=8)
    same = _plan(family, inputs, b, t, pattern="random", fraction=0.5, seed=7)
    assert [(e.layer, e.head) for e in same.heads] == [(e.layer, e.head) for e in rl.heads]
    assert [(e.layer, e.head) for e in other.heads] != [(e.layer, e.head) for e in rl.heads]


def test_taylor_score_is_the_directional_derivative_of_the_loss(family, target_lm):
    b, t, _, _ = _inputs(family)
    layout = layout_of(t)
    et = _et(target_lm, family.prose_text, role="general")
    grid = taylor_scores(target_lm, b, layout, [et])
    assert grid.shape == (2, 4) and torch.isfinite(grid).all()
    from analysis.model.heads import head_slots

    params = parameter_map(target_lm.model)
    layer, head, G, eps = 1, 2, 2, 1e-2
    moves = []  # (param, axis, index, Δ scaled by the head's share: 1 for q/o, 1/G for its kv group)
    for proj, h, w in (("q", head, 1.0), ("o", head, 1.0), ("k", head // G, 1 / G), ("v", head // G, 1 / G)):
        for s in head_slots(layout, layer, proj, h):
            p = params[s.tensor]
            d = b.tensor(s.tensor).index_select(s.axis, s.index) - p.detach().index_select(s.axis, s.index)
            moves.append((p, s.axis, s.index, w * d))

    def loss_at(step: float) -> float:
        with torch.no_grad():
            for p, ax, idx, d in moves:
                p.index_add_(ax, idx, step * d)
        try:
            return Evaluator(target_lm, "x").loss(et).nll / (N * (T - 1))
        finally:
            with torch.no_grad():
                for p, ax, idx, d in moves:
                    p.index_add_(ax, idx, -step * d)

    fd = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    assert float(grid[layer, head]) == pytest.approx(fd, rel=0.05, abs=2e-4)


def test_plan_patterns_top_random_and_taylor_in_the_list(family, tmp_path):
    import json

    out = tmp_path / "top.json"
    assert main(["rewind", "plan", str(family.base), str(family.code), "--pattern", "top", "--fraction", "0.25",
                 "--out", str(out)]) == 0
    top = json.loads(out.read_text())
    assert top["pattern"]["name"] == "top" and len(top["heads"]) == 2
    low = tmp_path / "low.json"
    assert main(["rewind", "plan", str(family.base), str(family.code), "--fraction", "0.25", "--out", str(low)]) == 0
    assert min(h["score"] for h in top["heads"]) >= max(h["score"] for h in json.loads(low.read_text())["heads"])
    rnd = tmp_path / "rnd.json"
    assert main(["rewind", "plan", str(family.base), str(family.code), "--pattern", "random", "--seed", "3",
                 "--fraction", "0.5", "--out", str(rnd)]) == 0
    assert json.loads(rnd.read_text())["settings"]["seed"] == 3
    tay = tmp_path / "taylor.json"
    assert main(["rewind", "plan", str(family.base), str(family.code), "--score", "taylor", "--fraction", "0.25",
                 "--text", str(family.code_text), "--general-text", str(family.prose_text), "--tokens", str(T),
                 "--windows", str(N), "--device", "cpu", "--out", str(tay)]) == 0
    doc = json.loads(tay.read_text())
    assert doc["pattern"]["score"] == "taylor" and len(doc["heads"]) == 2
    assert main(["rewind", "apply", str(tay), "--out", str(tmp_path / "applied")]) == 0


# ------------------------------------------------------------------------------------------------ paths


def test_barrier_of_a_hand_made_curve_with_a_bump():
    b, at = loss_barrier([0.0, 0.25, 0.5, 0.75, 1.0], [1.0, 1.5, 2.5, 2.0, 3.0])
    assert (b, at) == (pytest.approx(0.5), 0.5)  # line at 0.5 is 2.0, the curve 2.5
    assert loss_barrier([0.0, 0.5, 1.0], [2.0, 1.0, 2.0])[0] == pytest.approx(0.0)  # a dip: only the endpoints


def test_loss_path_endpoints_are_the_checkpoints(family):
    a, b = open_checkpoint(family.code), open_checkpoint(family.code2)
    lm = load_model(family.code2, device=CPU, dtype=torch.float32)  # endpoints are laid out like B
    et = _et(lm, family.code_text)
    ev = Evaluator(lm, b.fingerprint)
    rows, barriers = loss_path(ev, [et], "endpoints", [0.0, 0.5, 1.0], a, b, None)
    la = Evaluator(load_model(family.code, device=CPU, dtype=torch.float32), "a").loss(et).loss
    assert rows[0]["loss"] == la and rows[2]["loss"] == Evaluator(lm, "fresh").loss(et).loss
    line = 0.5 * (rows[0]["loss"] + rows[2]["loss"])
    assert barriers[0]["barrier"] == pytest.approx(max(0.0, rows[1]["loss"] - line))


# ------------------------------------------------------------------------------------------------ CLI


def test_eval_cli_rows_cache_and_inputs_untouched(family, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DIFFRACT_TUI_THREADS", "1")  # --threads 1 exports it: restored after the test
    inputs = [family.base, family.code, family.code_text, family.prose_text]
    before = _sha(inputs)
    out = tmp_path / "eval.csv"
    args = ["eval", str(family.base), str(family.code), "--text", str(family.code_text), "--text",
            str(family.prose_text), "--tokens", str(T), "--windows", str(N), "--device", "cpu", "--out", str(out),
            "--cache-dir", str(tmp_path / "cache"), "--threads", "1"]
    assert main(args) == 0
    rows, meta = read_table(out)
    assert [(r["checkpoint"], r["text"]) for r in rows] == [("base", "code.txt"), ("base", "prose.txt"),
                                                          ("code", "code.txt"), ("code", "prose.txt")]
    assert all(r["windows"] == N and r["tokens"] == T and r["ppl"] == pytest.approx(math.exp(r["loss"]))
               for r in rows)
    assert meta["device_kind"] == "cpu" and meta["dtype"] == "float32" and len(meta["texts"]) == 2
    first = out.read_bytes()
    assert main(args) == 0  # served from the cache: byte-identical
    assert out.read_bytes() == first
    assert _sha(inputs) == before
    assert main(["eval", str(family.base), "--text", str(family.code_text), "--tokens", "256", "--windows",
                 "100000", "--device", "cpu", "--no-cache", "--out", str(tmp_path / "short.csv")]) == 0
    assert "fewer than the 100000 asked" in capsys.readouterr().err


def test_rewind_sweep_cli_equals_engine_and_reports_levels(family, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFRACT_TUI_THREADS", "1")  # --threads 1 exports it: restored after the test
    out = tmp_path / "sweep.csv"
    before = _sha([family.base, family.code, family.code2])
    assert main(["rewind", "sweep", str(family.base), str(family.code), "--text", str(family.code_text),
                 "--general-text", str(family.prose_text), "--reference", str(family.code2),
                 "--patterns", "greedy,reference,random,top", "--fractions", "0,0.25", "--seeds", "2",
                 "--tokens", str(T), "--windows", str(N), "--device", "cpu", "--no-cache", "--threads", "1",
                 "--out", str(out)]) == 0
    assert _sha([family.base, family.code, family.code2]) == before
    rows, meta = read_table(out)
    pats = {r["pattern"] for r in rows}
    assert pats == {"target", "base", "greedy", "reference", "random", "top"}
    # per text: target + base + 2 fractions × (greedy, reference, top) + 2 fractions × 2 seeds
    assert len(rows) == 2 * (2 + 6 + 4)
    lvl = {(r["pattern"], r["text"]): r["loss"] for r in rows if r["pattern"] in ("base", "target")}
    lm = load_model(family.base, device=CPU, dtype=torch.float32)
    assert lvl[("base", "code.txt")] == Evaluator(lm, "b").loss(_et(lm, family.code_text)).loss
    dom = [r for r in rows if r["role"] == "domain" and r["fraction"] == 0.0]
    assert all(r["gain_kept"] == pytest.approx(1.0) for r in dom)
    assert meta["command"] == "rewind sweep"


def test_interpolate_cli_loss_path_writes_no_checkpoint(family, tmp_path):
    out = tmp_path / "path.csv"
    assert main(["interpolate", str(family.code), "--base", str(family.base), "--mode", "base-cpt", "--alphas",
                 "0,0.5,1", "--text", str(family.code_text), "--tokens", str(T), "--windows", str(N),
                 "--device", "cpu", "--no-cache", "--out", str(out)]) == 0
    rows, meta = read_table(out)
    assert [r["alpha"] for r in rows] == [0.0, 0.5, 1.0]
    assert rows[0]["loss"] > rows[2]["loss"]  # base → code CPT on code text
    assert meta["barriers"][0]["text"] == "code.txt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["path.csv", "path.csv.meta.json"]

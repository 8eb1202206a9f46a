"""The Rewind view's loss engine (`analysis.run.loss_preview`, issue 11 item 5) on the real tiny CPT family
(tests/tiny_cpt.py): the preview's f = 0 rows are the target's loss exactly, its greedy rows are `rewind sweep`'s
for the same settings, a plan's measured loss is the in-memory rewind's, cancel stops it with the model restored,
the texts are named by file, and a rewind list carries and reloads measured losses (bad input: test_hostile_loss.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from analysis.edit.rewind_list import LossEntry, read_rewind_list, rewind_list_from_dict, write_rewind_list  # noqa: E402
from analysis.eval.evaluator import Evaluator, prepare_text  # noqa: E402
from analysis.eval.loss import load_model  # noqa: E402
from analysis.eval.patch import parameter_map  # noqa: E402
from analysis.eval.texts import load_text  # noqa: E402
from analysis.eval.windows import DEFAULT_WINDOWS  # noqa: E402
from analysis.progress import Cancelled  # noqa: E402
from analysis.run.loss_preview import REFINED_WINDOWS  # noqa: E402
from analysis.run.session import ExplorerSession  # noqa: E402
from analysis.run.tables import read_table  # noqa: E402
from diffract_tui.cli import main  # noqa: E402
from tiny_cpt import family  # noqa: E402,F401  (the session fixture)

CPU = torch.device("cpu")
T, N = 64, 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # evaluations compare bit for bit


@pytest.fixture(scope="module")
def session(family, tmp_path_factory):
    s = ExplorerSession.open([family.base, family.code, family.code2], device="cpu",
                             cache_dir=tmp_path_factory.mktemp("cache"), texts=[family.code_text],
                             general_texts=[family.prose_text])
    s.eval_tokens = T
    yield s
    s.close()


@pytest.fixture(scope="module")
def preview(session):
    torch.set_num_threads(1)
    inputs = session.rewind_inputs(0, 1)
    return session.loss_preview(inputs, 0, 1, windows=N)


def _sha(paths) -> dict[str, str]:
    out = {}
    for p in paths:
        for f in sorted(x for x in Path(p).rglob("*") if x.is_file()) if Path(p).is_dir() else [Path(p)]:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def test_refined_windows_are_the_cli_default():
    assert REFINED_WINDOWS == DEFAULT_WINDOWS == 64


def test_f0_rows_are_the_target_loss_exactly(family, preview):
    lm = load_model(family.code, device=CPU, dtype=torch.float32)
    for name, path in (("code.txt", family.code_text), ("prose.txt", family.prose_text)):
        et = prepare_text(lm, load_text(path), T, N)
        expected = Evaluator(lm, "fresh").loss(et).loss
        assert preview.level("target", name) == expected
        f0 = [r["loss"] for r in preview.candidate_rows() if r["fraction"] == 0.0 and r["text"] == name]
        assert len(f0) == 6 and set(f0) == {expected}  # greedy, reference, top and 3 random seeds
    assert {r["pattern"] for r in preview.rows} == {"target", "base", "greedy", "reference", "random", "top"}
    assert preview.texts == [("code.txt", "domain"), ("prose.txt", "general")]
    assert (preview.windows, preview.tokens) == (N, T)


def test_greedy_reference_top_rows_equal_rewind_sweep(family, preview, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFRACT_TUI_THREADS", "1")
    out = tmp_path / "sweep.csv"
    before = _sha([family.base, family.code, family.code2, family.code_text, family.prose_text])
    assert main(["rewind", "sweep", str(family.base), str(family.code), "--text", str(family.code_text),
                 "--general-text", str(family.prose_text), "--reference", str(family.code2),
                 "--patterns", "greedy,reference,top", "--fractions", "0,0.15,0.3,0.6", "--tokens", str(T),
                 "--windows", str(N), "--device", "cpu", "--no-cache", "--threads", "1", "--out", str(out)]) == 0
    assert _sha([family.base, family.code, family.code2, family.code_text, family.prose_text]) == before
    rows, _ = read_table(out)
    cli = {(r["pattern"], r["fraction"], r["text"]): r["loss"] for r in rows}
    mine = {(r["pattern"], r["fraction"], r["text"]): r["loss"] for r in preview.rows
            if r["pattern"] in ("greedy", "reference", "top", "target", "base")
            and (r["fraction"] is None or r["fraction"] in (0.0, 0.15, 0.3, 0.6))}
    assert mine == cli  # the same numbers, bit for bit
    assert any(r["pattern"] == "greedy" and r["fraction"] == 0.6 and r["heads"] == 4 for r in preview.rows)


def test_curves_and_tradeoff_derive_from_the_rows(preview):
    curves = {(c.pattern, c.text): c for c in preview.curves()}
    assert len(curves) == 8  # 4 patterns × 2 texts
    greedy = curves[("greedy", "code.txt")]
    assert greedy.fractions[:4] == (0.0, 0.05, 0.1, 0.15)
    assert greedy.losses[3] == preview.losses_at("greedy", 0.15)["code.txt"]
    rand = curves[("random", "prose.txt")]
    seeds = [preview.losses_at("random", 0.3, s)["prose.txt"] for s in range(3)]
    assert rand.losses[rand.fractions.index(0.3)] == pytest.approx(sum(seeds) / 3, abs=0)
    points = {(p.pattern, p.fraction, p.seed): p for p in preview.tradeoff()}
    assert len(points) == 9 * 3 + 9 * 3  # 9 fractions × (greedy, reference, top) + 9 × 3 seeds
    p0 = points[("greedy", 0.0, None)]
    assert (p0.gain_kept, p0.forgetting_recovered) == (1.0, 0.0)
    lb, lc = preview.level("base", "code.txt"), preview.level("target", "code.txt")
    lg_b, lg_c = preview.level("base", "prose.txt"), preview.level("target", "prose.txt")
    loss = preview.losses_at("greedy", 0.3)
    p = points[("greedy", 0.3, None)]
    assert p.gain_kept == pytest.approx((lb - loss["code.txt"]) / (lb - lc), abs=1e-12)
    assert p.forgetting_recovered == pytest.approx((lg_c - loss["prose.txt"]) / (lg_c - lg_b), abs=1e-12)


def test_plan_loss_equals_the_preview_candidate_and_restores_the_model(session, preview):
    inputs = session.rewind_inputs(0, 1)
    rl, _ = session.rewind_plan(inputs, 0, 1, pattern="greedy", fraction=0.3, heads=None, gqa_policy="group",
                                variant="lowest")
    lm = session.loss_previewer()._state[1]
    before = {k: v.detach().clone() for k, v in parameter_map(lm.model).items()}
    pl = session.plan_loss(rl, 0, windows=N)
    assert {r["text"]: r["loss"] for r in pl.rows} == preview.losses_at("greedy", 0.3)
    assert all(r["base"] == preview.level("base", r["text"]) and r["target"] == preview.level("target", r["text"])
               for r in pl.rows)
    assert [(r["windows"], r["tokens"]) for r in pl.rows] == [(N, T), (N, T)]
    assert pl.matches(rl) and pl.point.gain_kept is not None
    assert all(torch.equal(before[k], v) for k, v in parameter_map(lm.model).items())


def test_cancel_stops_with_no_rows_and_the_model_restored(session):
    inputs = session.rewind_inputs(0, 1)
    lm = session.loss_previewer()._state[1]
    params = parameter_map(lm.model)
    before = {k: v.detach().clone() for k, v in params.items()}
    seen = []

    def patched() -> bool:  # True while some head is rewound in the live model: cancel there, mid-evaluation
        return any(not torch.equal(before[k], params[k]) for k in before if "self_attn" in k)

    with pytest.raises(Cancelled):  # N + 1 windows: nothing is cached, every candidate is evaluated
        session.loss_preview(inputs, 0, 1, windows=N + 1, progress=lambda d, t, x: seen.append(d),
                             cancelled=patched)
    assert seen == [0, 1, 2, 3]  # the start and the 0-head candidates (f 0, 0.05, 0.1: ⌊f·8⌋ = 0), then cancelled
    assert all(torch.equal(before[k], v) for k, v in parameter_map(lm.model).items())


def test_the_list_carries_the_measured_losses_and_reloads(session, tmp_path):
    inputs = session.rewind_inputs(0)
    rl, _ = session.rewind_plan(inputs, 0, None, pattern="greedy", fraction=0.15, heads=None, gqa_policy="group",
                                variant="lowest")
    pl = session.plan_loss(rl, 0, windows=N)
    out = write_rewind_list(pl.attach(rl), tmp_path / "plan.json")
    data = json.loads(out.read_text(encoding="utf-8"))
    assert [e["text"] for e in data["losses"]] == ["code.txt", "prose.txt"]
    assert data["losses"][0] == {"text": "code.txt", "role": "domain", "text_sha256": pl.rows[0]["text_sha256"],
                                 "loss": pl.rows[0]["loss"], "base": pl.rows[0]["base"],
                                 "target": pl.rows[0]["target"], "windows": N, "tokens": T}
    back = read_rewind_list(out)
    assert back.losses == pl.entries() and back.heads == rl.heads
    # another plan does not get these losses; a list without the field still loads
    other, _ = session.rewind_plan(inputs, 0, None, pattern="top", fraction=0.15, heads=None, gqa_policy="group",
                                   variant="lowest")
    assert pl.attach(other) is other and "losses" not in other.to_dict()
    plain = dict(data)
    del plain["losses"]
    assert rewind_list_from_dict(plain).losses == ()


def test_loss_entry_round_trips_through_its_dict():
    e = LossEntry("code.txt", "domain", "ab", 4.0, 4.2, 4.1, 4, 64)
    assert e.to_dict()["windows"] == 4 and e.to_dict()["role"] == "domain"

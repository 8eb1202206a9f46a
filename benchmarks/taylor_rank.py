"""How well the Taylor head score (`--score taylor`, SPEC §9) predicts the measured single-head loss change
(issue 11 item 3): for every head h, the score s_h = gᵀ(θ₀ − θ_d) over h's slots, against the loss change
measured by rewinding h alone in the live model (the in-memory patch of `rewind sweep`); Spearman rank
correlation (and Pearson) over all heads, per text, for the two single-head rewinds a score can stand for.

    python benchmarks/taylor_rank.py                      # the test-trained tiny CPT family (tests/tiny_cpt.py)
    python benchmarks/taylor_rank.py --tokens 64 --windows 64

The family: base trained on prose, target = CPT on code, texts = held-out code (domain) and prose (general).
The score is computed on the same text its correlation is measured on. Single-head rewinds:
`never` — q rows and o columns of h only (the k/v of its group stay: the score's 1/G share of k/v is then
not part of the measurement); `any` — h's whole kv group's k/v too (measured change includes all G heads' k/v,
the score only 1/G of it). One thread; one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def single_head_changes(ev, patch, et, inputs, refs, layout, policy: str) -> torch.Tensor:  # noqa: ANN001
    """(L × H) measured loss change of rewinding each head alone under the GQA `policy`."""
    from analysis.edit.rewind import plan_from_inputs

    base_loss = ev.loss(et).loss
    out = torch.zeros(layout.num_layers, layout.num_heads, dtype=torch.float64)
    for layer in range(layout.num_layers):
        for h in range(layout.num_heads):
            rl = plan_from_inputs(inputs, pattern="manual", heads=[(layer, h)], gqa_policy=policy, **refs)
            with patch.rewound(rl):
                out[layer, h] = ev.loss(et, {"single": [layer, h, policy]}).loss - base_loss
    return out


def family_rank_report(tokens: int, windows: int) -> dict:
    """Spearman/Pearson of the Taylor grid against the measured single-head changes on the tiny CPT family."""
    from scipy.stats import pearsonr, spearmanr
    from tiny_cpt import build_family

    from analysis.edit.rewind import checkpoint_ref, rewind_inputs
    from analysis.eval.evaluator import Evaluator, prepare_text
    from analysis.eval.loss import load_model
    from analysis.eval.patch import LivePatch
    from analysis.eval.taylor import taylor_scores
    from analysis.eval.texts import load_text
    from analysis.io.checkpoint import open_checkpoint
    from analysis.model.architecture import layout_of

    fam = build_family()
    b, t = open_checkpoint(fam.base), open_checkpoint(fam.code)
    lm = load_model(fam.code, device=torch.device("cpu"), dtype=torch.float32)
    layout = layout_of(t)
    patch, ev, inputs = LivePatch(lm.model, b, layout), Evaluator(lm, t.fingerprint), rewind_inputs(b, t)
    refs = dict(base=checkpoint_ref(b), target=checkpoint_ref(t))
    out: dict = {"model": "tests/tiny_cpt.py family (base → code CPT)", "tokens": tokens,
                 "layers": layout.num_layers, "heads": layout.num_heads, "kv_heads": layout.num_kv_heads}
    start = time.perf_counter()
    for role, path in (("domain", fam.code_text), ("general", fam.prose_text)):
        et = prepare_text(lm, load_text(path), tokens, windows, role)
        grid = taylor_scores(lm, b, layout, [et])
        out[f"windows/{role}"] = et.windows.count
        out[f"taylor/{role}"] = grid.tolist()
        for policy in ("never", "any"):
            measured = single_head_changes(ev, patch, et, inputs, refs, layout, policy)
            x, y = grid.flatten().numpy(), measured.flatten().numpy()
            out[f"measured/{role}/{policy}"] = measured.tolist()
            out[f"spearman/{role}/{policy}"] = float(spearmanr(x, y).statistic)
            out[f"pearson/{role}/{policy}"] = float(pearsonr(x, y).statistic)
    out["seconds"] = time.perf_counter() - start
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--windows", type=int, default=32)
    a = ap.parse_args()
    torch.set_num_threads(1)
    print(json.dumps(family_rank_report(a.tokens, a.windows), indent=1))


if __name__ == "__main__":
    main()

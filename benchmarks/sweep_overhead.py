"""Per-candidate overhead of an in-memory rewind (patch + restore in the live model) against `rewind apply` +
reloading the written checkpoint, measured apart from the forward passes (issue 11, performance); and the
held-out loss throughput in tokens per second.

    python benchmarks/sweep_overhead.py --shape 135m            # SmolLM2-135M-shaped (30 layers, 9/3 heads)
    python benchmarks/sweep_overhead.py --shape 1b --dtype bfloat16 --reloads 1   # Llama-3.2-1B-shaped
    python benchmarks/sweep_overhead.py --shape tiny            # the test suite's GQA Llama
    python benchmarks/sweep_overhead.py --family                # the whole sweep on the test-trained CPT family,
                                                                # losses at 15 %, Taylor rank correlation

Random weights (the overhead does not depend on them): a base, and a target = base + noise, saved with
save_pretrained in a temp folder. The plan is greedy at --fraction. One JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    "tiny": dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
}


def build(shape: str, dtype: torch.dtype, root: Path) -> tuple[Path, Path]:
    """Save a random base and a perturbed target of the shape under root (safetensors, HF folders)."""
    import transformers

    cfg = transformers.LlamaConfig(max_position_embeddings=2048, **SHAPES[shape])
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_((0.01 * torch.randn(p.shape, generator=g)).to(p.dtype))
    model.save_pretrained(root / "target")
    del model
    return root / "base", root / "target"


def family_report(tokens: int, windows: int) -> dict:
    """The whole sweep (greedy, reference, random ×3, top × 13 fractions) on the tiny test-trained CPT family,
    its wall time, the losses at f = 0.15, and the Taylor score's rank correlation with the measured
    single-head loss change (domain and general text)."""
    from scipy.stats import spearmanr

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_cpt import build_family

    from analysis.edit.rewind import checkpoint_ref, plan_from_inputs, rewind_inputs
    from analysis.eval.evaluator import Evaluator, prepare_text
    from analysis.eval.loss import load_model
    from analysis.eval.patch import LivePatch
    from analysis.eval.sweep import DEFAULT_FRACTIONS, run_sweep, sweep_candidates
    from analysis.eval.taylor import taylor_scores
    from analysis.eval.texts import load_text
    from analysis.io.checkpoint import open_checkpoint
    from analysis.model.architecture import layout_of

    fam = build_family()
    b, t, r = open_checkpoint(fam.base), open_checkpoint(fam.code), open_checkpoint(fam.code2)
    lm = load_model(fam.code, device=torch.device("cpu"), dtype=torch.float32)
    texts = [prepare_text(lm, load_text(fam.code_text), tokens, windows, "domain"),
             prepare_text(lm, load_text(fam.prose_text), tokens, windows, "general")]
    out: dict = {"tokens": tokens, "windows": [et.windows.count for et in texts]}
    inputs = rewind_inputs(b, t, r)
    layout = layout_of(t)
    patch = LivePatch(lm.model, b, layout)
    ev = Evaluator(lm, t.fingerprint)
    refs = dict(base=checkpoint_ref(b), target=checkpoint_ref(t), reference=checkpoint_ref(r))
    cands = sweep_candidates(inputs, patterns=["greedy", "reference", "random", "top"], fractions=DEFAULT_FRACTIONS,
                             seeds=3, **refs)
    t0 = time.perf_counter()
    rows = run_sweep(ev, patch, cands, texts, target=t, inputs=inputs)
    out["sweep_candidates"] = len(cands)
    out["sweep_evaluations"] = ev.misses
    out["sweep_s"] = time.perf_counter() - t0
    out["levels"] = {f"{x['pattern']}/{x['text']}": x["loss"] for x in rows if x["pattern"] in ("base", "target")}
    out["at_0.15"] = [{k: x[k] for k in ("pattern", "seed", "heads", "text", "loss", "gain_kept",
                                         "forgetting_recovered")} for x in rows if x["fraction"] == 0.15]
    out["at_0.25"] = [{k: x[k] for k in ("pattern", "seed", "heads", "text", "loss")}
                      for x in rows if x["fraction"] == 0.25]
    L, H = layout.num_layers, layout.num_heads
    for et in texts:
        grid = taylor_scores(lm, b, layout, [et])
        target_loss = ev.loss(et).loss
        for policy in ("never", "any"):
            measured = torch.zeros(L, H, dtype=torch.float64)
            for layer in range(L):
                for h in range(H):
                    rl = plan_from_inputs(inputs, pattern="manual", heads=[(layer, h)], gqa_policy=policy,
                                          base=refs["base"], target=refs["target"])
                    with patch.rewound(rl):
                        measured[layer, h] = ev.loss(et, {"single": [layer, h, policy]}).loss - target_loss
            rho = spearmanr(grid.flatten().numpy(), measured.flatten().numpy()).statistic
            out[f"taylor_spearman/{et.role}/{policy}"] = float(rho)
        out[f"taylor/{et.role}"] = grid.tolist()
    return out


def main() -> None:
    if "--family" in sys.argv:
        ap = argparse.ArgumentParser()
        ap.add_argument("--family", action="store_true")
        ap.add_argument("--tokens", type=int, default=128)
        ap.add_argument("--windows", type=int, default=32)
        a = ap.parse_args()
        torch.set_num_threads(1)
        print(json.dumps(family_report(a.tokens, a.windows), indent=1))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="135m")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--fraction", type=float, default=0.15)
    ap.add_argument("--patches", type=int, default=20, help="patch+restore repetitions")
    ap.add_argument("--reloads", type=int, default=3, help="apply+reload repetitions")
    ap.add_argument("--tokens", type=int, default=512, help="T of the throughput measurement")
    ap.add_argument("--windows", type=int, default=4, help="N of the throughput measurement")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    import transformers

    from analysis.edit.rewind import apply_rewind, plan_rewind
    from analysis.eval.loss import LoadedModel, evaluate
    from analysis.eval.patch import LivePatch
    from analysis.eval.windows import Windows
    from analysis.io.checkpoint import open_checkpoint
    from analysis.model.architecture import layout_of
    from analysis.spectral.backend import apply_thread_policy

    threads = apply_thread_policy(args.threads)
    dtype = getattr(torch, args.dtype)
    result: dict = {"shape": args.shape, "dtype": args.dtype, "fraction": args.fraction, "threads": threads,
                    "device": "cpu"}
    with tempfile.TemporaryDirectory(prefix="sweep-overhead-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        base_dir, target_dir = build(args.shape, dtype, root)
        result["build_s"] = time.perf_counter() - t0
        base, target = open_checkpoint(base_dir), open_checkpoint(target_dir)
        rl = plan_rewind(base, target, pattern="greedy", fraction=args.fraction)
        result["heads_rewound"] = len(rl.heads)
        model = transformers.AutoModelForCausalLM.from_pretrained(target_dir, dtype=dtype).eval()
        result["params"] = sum(p.numel() for p in model.parameters())
        patch = LivePatch(model, base, layout_of(target))
        from analysis.edit.rewind import rewind_edits

        times = []
        for _ in range(args.patches):
            t = time.perf_counter()
            saved = patch.apply(rewind_edits(rl, patch.layout))
            patch.restore(saved)
            times.append(time.perf_counter() - t)
        result["patch_restore_s"] = statistics.median(times)
        reload = []
        for i in range(args.reloads):
            out = root / f"applied-{i}"
            t = time.perf_counter()
            apply_rewind(rl, out)
            m2 = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()
            reload.append(time.perf_counter() - t)
            del m2
        result["apply_reload_s"] = statistics.median(reload)
        result["ratio"] = result["apply_reload_s"] / result["patch_restore_s"]
        # held-out loss throughput (random tokens: the cost does not depend on the text)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, SHAPES[args.shape]["vocab_size"], (args.windows, args.tokens), generator=g)
        lm = LoadedModel(model=model, kind="causal", folder=target_dir, tokenizer=None, tokenizer_hash="",
                         context=2048, device=torch.device("cpu"), dtype=dtype)
        w = Windows(ids=ids, tokens=args.tokens, requested=args.windows, text_tokens=ids.numel())
        evaluate(lm, Windows(ids=ids[:1, :16], tokens=16, requested=1, text_tokens=16))  # warm-up
        t = time.perf_counter()
        evaluate(lm, w)
        dt = time.perf_counter() - t
        result["eval_tokens"] = int(ids.numel())
        result["eval_tokens_per_s"] = ids.numel() / dt
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""Per-candidate overhead of an in-memory rewind (patch + restore in the live model) against `rewind apply` +
reloading the written checkpoint, measured apart from the forward passes (issue 11, performance); and the
held-out loss throughput in tokens per second.

    python benchmarks/sweep_overhead.py --shape 135m            # SmolLM2-135M-shaped (30 layers, 9/3 heads)
    python benchmarks/sweep_overhead.py --shape 1b --dtype bfloat16 --reloads 1   # Llama-3.2-1B-shaped
    python benchmarks/sweep_overhead.py --shape tiny            # the test suite's GQA Llama
    python benchmarks/sweep_overhead.py --gguf FILE.gguf        # loss tokens/s of a real GGUF through eval's loader
    python benchmarks/sweep_overhead.py --family                # the whole sweep on the test-trained CPT family,
                                                                # and its losses at 15 %

Random weights (the overhead does not depend on them): a base, and a target = base + noise, saved with
save_pretrained in a temp folder (or --root, kept and reused). The plan is greedy at --fraction. Patch + restore
and apply + reload are timed interleaved (each reload between --patches patch rounds), wall and CPU medians;
`--compare F` times another version's LivePatch (F = `git show REV:analysis/eval/patch.py`) in the same rounds
and checks it patches the same weights. One JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import shutil
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
    its wall time and the losses at f = 0.15 (the Taylor rank correlation: benchmarks/taylor_rank.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_cpt import build_family

    from analysis.edit.rewind import checkpoint_ref, rewind_inputs
    from analysis.eval.evaluator import Evaluator, prepare_text
    from analysis.eval.loss import load_model
    from analysis.eval.patch import LivePatch
    from analysis.eval.sweep import DEFAULT_FRACTIONS, run_sweep, sweep_candidates
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
    return out


def gguf_throughput(path: Path, tokens: int, windows: int) -> dict:
    """Held-out loss throughput of a real GGUF model through `eval`'s loader (transformers' GGUF loader, the
    tokenizer from the GGUF metadata) on Python's own prose (pydoc_data.topics): load time, tokens per second."""
    import pydoc_data.topics

    from analysis.eval.evaluator import prepare_text
    from analysis.eval.loss import evaluate, load_model
    from analysis.eval.texts import load_text

    with tempfile.TemporaryDirectory(prefix="gguf-eval-") as tmp:
        text = Path(tmp) / "prose.txt"
        text.write_text("\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)),
                        encoding="utf-8")
        w, c = time.perf_counter(), time.process_time()
        lm = load_model(path, device=torch.device("cpu"), dtype=torch.float32)
        out: dict = {"model": str(path), "load_s": time.perf_counter() - w, "load_cpu_s": time.process_time() - c}
        et = prepare_text(lm, load_text(text), tokens, windows)
        evaluate(lm, type(et.windows)(ids=et.windows.ids[:1, :16], tokens=16, requested=1, text_tokens=16))
        w, c = time.perf_counter(), time.process_time()
        r = evaluate(lm, et.windows)
        wall, cpu = time.perf_counter() - w, time.process_time() - c
    n = et.windows.count * tokens
    return {**out, "tokens": tokens, "windows": et.windows.count, "loss": r.loss, "eval_s": wall, "eval_cpu_s": cpu,
            "tokens_per_s": n / wall, "tokens_per_cpu_s": n / cpu}


def main() -> None:
    if "--gguf" in sys.argv:
        ap = argparse.ArgumentParser()
        ap.add_argument("--gguf", type=Path, required=True, help="a GGUF file (e.g. SmolLM2-135M-Instruct.Q4_1.gguf)")
        ap.add_argument("--tokens", type=int, default=512)
        ap.add_argument("--windows", type=int, default=8)
        a = ap.parse_args()
        torch.set_num_threads(1)
        print(json.dumps(gguf_throughput(a.gguf, a.tokens, a.windows), indent=1))
        return
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
    ap.add_argument("--patches", type=int, default=10, help="patch+restore repetitions per apply+reload")
    ap.add_argument("--reloads", type=int, default=3, help="apply+reload repetitions")
    ap.add_argument("--tokens", type=int, default=512, help="T of the throughput measurement")
    ap.add_argument("--windows", type=int, default=4, help="N of the throughput measurement (0: none)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--root", type=Path, default=None, help="keep the generated base/target here (reused if present)")
    ap.add_argument("--compare", type=Path, default=None,
                    help="another version's analysis/eval/patch.py (git show REV:analysis/eval/patch.py > F): its "
                         "LivePatch is timed interleaved with ours and must give the same patched weights")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.root is not None:
        args.root.mkdir(parents=True, exist_ok=True)
        overhead(args, args.root)
        return
    with tempfile.TemporaryDirectory(prefix="sweep-overhead-") as tmp:
        overhead(args, Path(tmp))


def _load_patch_module(path: Path):  # noqa: ANN202
    """The patch module of another version, imported from its file."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare_patch", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def overhead(args: argparse.Namespace, root: Path) -> None:
    """Patch + restore against apply + reload, interleaved (each reload between `--patches` patch rounds, so both
    see the same machine load); wall and CPU medians; then the loss throughput."""
    import transformers

    from analysis.edit.rewind import apply_rewind, plan_rewind, rewind_edits
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
    t0 = time.perf_counter()
    if (root / "target" / "config.json").is_file() and (root / "base" / "config.json").is_file():
        base_dir, target_dir = root / "base", root / "target"
    else:
        base_dir, target_dir = build(args.shape, dtype, root)
    result["build_s"] = time.perf_counter() - t0
    base, target = open_checkpoint(base_dir), open_checkpoint(target_dir)
    rl = plan_rewind(base, target, pattern="greedy", fraction=args.fraction)
    result["heads_rewound"] = len(rl.heads)
    model = transformers.AutoModelForCausalLM.from_pretrained(target_dir, dtype=dtype).eval()
    result["params"] = sum(p.numel() for p in model.parameters())
    patches = {"ours": LivePatch(model, base, layout_of(target))}
    if args.compare is not None:
        patches["compare"] = _load_patch_module(args.compare).LivePatch(model, base, layout_of(target))
        states = {}
        for k, pt in patches.items():
            saved = pt.apply(rewind_edits(rl, pt.layout))
            states[k] = [p.detach().clone() for p in model.parameters()]
            pt.restore(saved)
        assert all(torch.equal(a, b) for a, b in zip(states["ours"], states["compare"])), "patched weights differ"
        del states

    def patch_round(pt) -> tuple[float, float]:  # noqa: ANN001
        w, c = time.perf_counter(), time.process_time()
        saved = pt.apply(rewind_edits(rl, pt.layout))
        pt.restore(saved)
        return time.perf_counter() - w, time.process_time() - c

    for pt in patches.values():
        patch_round(pt)  # warm-up
    timed: dict[str, list[tuple[float, float]]] = {k: [] for k in [*patches, "reload"]}
    for i in range(args.reloads):
        for _ in range(args.patches):
            for k, pt in patches.items():
                timed[k].append(patch_round(pt))
        out = root / f"applied-{i}"
        w, c = time.perf_counter(), time.process_time()
        apply_rewind(rl, out)
        m2 = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()
        timed["reload"].append((time.perf_counter() - w, time.process_time() - c))
        del m2
        shutil.rmtree(out)
    med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for k, v in timed.items()}
    result["patch_restore_s"], result["patch_restore_cpu_s"] = med["ours"]
    result["apply_reload_s"], result["apply_reload_cpu_s"] = med["reload"]
    result["ratio"] = med["reload"][0] / med["ours"][0]
    result["ratio_cpu"] = med["reload"][1] / med["ours"][1]
    if "compare" in med:
        result["compare_patch_restore_s"], result["compare_patch_restore_cpu_s"] = med["compare"]
        result["compare_ratio"] = med["reload"][0] / med["compare"][0]
        result["speedup_over_compare"] = med["compare"][0] / med["ours"][0]
        result["speedup_over_compare_cpu"] = med["compare"][1] / med["ours"][1]
    if args.windows < 1:  # no throughput measurement (bf16 forward passes on a CPU can take many minutes)
        print(json.dumps(result, indent=1))
        return
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

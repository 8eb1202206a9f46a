"""GPU figures (issue 13 item 5), run by benchmarks/gpu_check.sh: scan, a rewind sweep point and delta of a
7B-shaped generated checkpoint on one GPU, engine only (no textual/plotext/platformdirs/gguf/ray on the GPU machine).

Stages, in this order (the two targets of issue 13 first), each timed in this process with
`torch.cuda.synchronize()` and recorded in the JSON even when a later one fails or is skipped for lack of time
(`--budget` seconds in all; a stage whose estimate no longer fits is skipped with the reason):
  generate  a Llama-2-7B-shaped bf16 checkpoint (32 × 4096, ff 11008, vocab 32000, context 4096, Student-t ν=3
            entries); the sweep's base (the first ⌈f·L⌉ layers' attention moved by 5 %: the shards holding them
            written again, the others hard links); for the delta, a base + 2 CPT trio of the same width with
            `--delta-layers` layers
  scan      `--metrics fit` at gram64 (cold cache)
  sweep     one `rewind sweep` point through the sweep's own code: the model built by `load_model` (transformers
            LlamaForCausalLM, bf16 on the GPU), pattern top at `--sweep-fraction`, patch + loss over 64 × 512
            token ids + restore: warm-up call apart, median of `--sweep-repeats`; patch + restore and the loss alone
  rescan    the cached `fit` rescan
  delta     base + 2 CPT, cold, then the cached rerun
  scan      `fit` at gram32, then `all` at gram64 (their needs scale with the measured first scan)
`--cpu-smoke` does the same on a tiny model on the CPU in seconds (sweep: 8 × 64 tokens): it proves the script
end to end (tests/test_gpu_bench.py checks its sweep loss against `rewind apply` + `Evaluator.loss`).

    python benchmarks/gpu_bench.py --out gpu_figures.json [--cpu-smoke] [--workdir DIR] [--keep] [--budget 360]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SEVEN_B = dict(num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=32, intermediate_size=11008,
               vocab_size=32000, max_positions=4096, tie_word_embeddings=False)
TINY = dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=4, intermediate_size=128, vocab_size=200,
            tie_word_embeddings=False)
SMOKE_TOKENS, SMOKE_WINDOWS = 64, 8     # the smoke's sweep windows (the tiny model's context is 128)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def heavy_tailed_state(config: dict, seed: int, device: str, base: dict | None = None,
                       delta_scale: float = 0.05) -> dict[str, torch.Tensor]:
    """bf16 CPU tensors for every llama key: Student-t (ν = 3) matrices × 0.02, drawn on `device`; with `base`,
    base + delta_scale·(fresh Student-t) on every matrix (a real, different delta per checkpoint)."""
    from analysis.model.families import family_config, weight_shapes

    cfg = family_config("llama", **config)
    gen = torch.Generator(device=device).manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, shape in weight_shapes("llama", cfg).items():
        if len(shape) == 1:
            out[key] = torch.ones(shape, dtype=torch.bfloat16)
            continue
        t = student_t(shape, gen, device)
        if base is not None:
            t = base[key].to(device, torch.float32) + delta_scale * t
        out[key] = t.to(torch.bfloat16).cpu()
        del t
    return out


def student_t(shape: tuple[int, ...], gen: torch.Generator, device: str) -> torch.Tensor:
    """0.02 × Student-t (ν = 3) float32 entries drawn on `device`: heavy-tailed, like trained weights."""
    z = torch.randn(shape, generator=gen, device=device)
    g = sum(torch.randn(shape, generator=gen, device=device) ** 2 for _ in range(3))    # χ²₃
    return 0.02 * z / torch.sqrt(g / 3.0)


def write_model(folder: Path, config: dict, seed: int, device: str, base: dict | None = None) -> dict:
    from analysis.generate import write_checkpoint

    state = heavy_tailed_state(config, seed, device, base)
    write_checkpoint(folder, "llama", dtype="bfloat16", fmt="sharded", shards=4, state_dict=state, **config)
    return state


def sweep_layers(config: dict, fraction: float) -> list[int]:
    """The first ⌈fraction·L⌉ layers: the sweep's base differs from its target in their attention, so the `top`
    pattern at `fraction` rewinds only heads that really changed."""
    return list(range(max(1, min(config["num_layers"], math.ceil(fraction * config["num_layers"] - 1e-9)))))


def write_sweep_base(target: Path, state: dict[str, torch.Tensor], folder: Path, layers: list[int], seed: int,
                     device: str, scale: float = 0.05) -> dict:
    """The sweep's base: the target with `layers`' q/k/v/o weights moved by scale·(fresh Student-t). Only the
    target's shards that hold one of them are written again (tagged in their metadata, so the base's headers and
    fingerprint differ); the others are hard links of the target's: no second 13.5 GB write."""
    from safetensors.torch import save_file

    keys = {f"model.layers.{l}.self_attn.{p}_proj.weight" for l in layers for p in "qkvo"}
    index = "model.safetensors.index.json"
    by_shard: dict[str, list[str]] = {}
    for key, shard in json.loads((target / index).read_text())["weight_map"].items():
        by_shard.setdefault(shard, []).append(key)
    folder.mkdir(parents=True)
    for name in ("config.json", index):
        shutil.copyfile(target / name, folder / name)
    gen = torch.Generator(device=device).manual_seed(seed)
    written = 0
    for shard, names in sorted(by_shard.items()):
        if not keys & set(names):
            try:
                os.link(target / shard, folder / shard)
            except OSError:  # a filesystem without hard links: a copy
                shutil.copyfile(target / shard, folder / shard)
            continue
        part = {}
        for k in names:
            t = state[k]
            if k in keys:
                moved = t.to(device, torch.float32) + scale * student_t(tuple(t.shape), gen, device)
                t = moved.to(torch.bfloat16).cpu()
            part[k] = t.contiguous()
        save_file(part, str(folder / shard), metadata={"format": "pt", "diffract_bench": "sweep base"})
        written += (folder / shard).stat().st_size
    return {"layers": layers, "bytes_written": written,
            "shards_written": sum(bool(keys & set(v)) for v in by_shard.values())}


def write_tokenizer(folder: Path) -> None:
    """A tiny byte-level BPE tokenizer (the test family's, analysis.tiny_models) saved into the model folder:
    `load_model`, like `rewind sweep`, needs one; the windows are drawn as token ids, so its vocabulary is unused."""
    from analysis.tiny_models import _tokenizer

    if not (folder / "tokenizer.json").is_file():
        _tokenizer(["diffract-tui gpu bench"]).save_pretrained(str(folder))


def token_windows(vocab: int, windows: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """windows·tokens token ids drawn uniformly from the vocabulary (seeded): the sweep's evaluation stream."""
    return torch.randint(0, vocab, (windows * tokens,), generator=torch.Generator().manual_seed(seed))


def eval_text(lm, ids: torch.Tensor, tokens: int, windows: int, folder: Path):  # noqa: ANN001, ANN201
    """The ids as the Evaluator's EvalText (`make_windows`: the first `windows` windows of `tokens`)."""
    import hashlib

    from analysis.eval.evaluator import EvalText
    from analysis.eval.texts import Text
    from analysis.eval.windows import make_windows

    text = Text(path=folder / "random-ids", name=f"random ids {windows}×{tokens}", content="",
                sha256=hashlib.sha256(ids.numpy().tobytes()).hexdigest())
    return EvalText(text=text, windows=make_windows(ids, tokens, windows, context=lm.context, text=text,
                                                    model=lm.folder))


class Budget:
    """Seconds left of the whole run; a stage whose estimate does not fit is skipped and recorded as such."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def timed_scan(paths: list[Path], *, device: str, route: str, metrics: str, cache_dir: Path | None) -> dict:
    from analysis.io.checkpoint import open_checkpoint
    from analysis.run.cache import Cache
    from analysis.run.scan import scan
    from analysis.spectral.backend import SpectralSettings

    settings = SpectralSettings(device=device, eig_route=route)
    cache = Cache(cache_dir) if cache_dir is not None else None
    _sync()
    t0 = time.perf_counter()
    ckpts = [open_checkpoint(p) for p in paths]
    rows = list(scan(ckpts, settings=settings, cache=cache, metrics=metrics))
    _sync()
    seconds = time.perf_counter() - t0
    for c in ckpts:
        c.close()
    alphas = sorted(r["pl_alpha"] for r in rows if r.get("pl_alpha") == r.get("pl_alpha"))
    return {"seconds": round(seconds, 3), "rows": len(rows), "route": route, "metrics": metrics,
            "median_alpha": alphas[len(alphas) // 2] if alphas else None}


def timed_delta(base: Path, cpts: list[Path], *, device: str, metrics: str, cache_dir: Path) -> dict:
    from analysis.deltas.delta_table import DeltaOptions, open_and_build
    from analysis.run.cache import Cache
    from analysis.spectral.backend import SpectralSettings

    _sync()
    t0 = time.perf_counter()
    options = DeltaOptions(settings=SpectralSettings(device=device), metrics=metrics)
    table = open_and_build(base, cpts, options=options, cache=Cache(cache_dir))
    _sync()
    return {"seconds": round(time.perf_counter() - t0, 3), "rows": len(table.rows), "metrics": metrics,
            "failures": len(table.failures)}


def timed_sweep(target: Path, base: Path, *, device: str, tokens: int, windows: int, fraction: float,
                repeats: int, work: Path) -> dict:
    """One `rewind sweep` point through the sweep's own code: `load_model` (transformers, the device's default
    dtype: bf16 on a GPU), `rewind_inputs` + `sweep_candidates` (pattern top at `fraction`), `Evaluator` (no cache:
    every call computes) + `LivePatch`; `plan_losses` (run_sweep's per-candidate step: patch, loss over
    windows × tokens, restore) timed first alone (the warm-up), then the median of `repeats`; and its two parts
    apart: patch + restore, and the unpatched target's loss."""
    from analysis.edit.rewind import checkpoint_ref, rewind_inputs
    from analysis.eval.evaluator import Evaluator
    from analysis.eval.loss import default_dtype, load_model
    from analysis.eval.patch import LivePatch, rewind_description
    from analysis.eval.sweep import plan_losses, sweep_candidates
    from analysis.io.checkpoint import open_checkpoint
    from analysis.model.architecture import layout_of

    write_tokenizer(target)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    b, t = open_checkpoint(base), open_checkpoint(target)
    inputs = rewind_inputs(b, t)
    (cand,) = sweep_candidates(inputs, base=checkpoint_ref(b), target=checkpoint_ref(t), reference=None,
                               patterns=["top"], fractions=[fraction])
    t1 = time.perf_counter()
    lm = load_model(target, device=dev, dtype=default_dtype(dev))
    _sync()
    t2 = time.perf_counter()
    try:
        et = eval_text(lm, token_windows(t.config["vocab_size"], windows, tokens), tokens, windows, work)
        ev, patch = Evaluator(lm, t.fingerprint), LivePatch(lm.model, b, layout_of(t))

        def clock(fn):  # noqa: ANN001, ANN202
            _sync()
            s0 = time.perf_counter()
            out = fn()
            _sync()
            return time.perf_counter() - s0, out

        def patch_restore() -> None:
            with patch.rewound(cand.plan):
                pass

        first_s, (first,) = clock(lambda: plan_losses(ev, patch, cand.plan, [et]))
        points = [clock(lambda: plan_losses(ev, patch, cand.plan, [et])) for _ in range(repeats)]
        patches = [clock(patch_restore)[0] for _ in range(repeats)]
        targets = [clock(lambda: ev.loss(et)) for _ in range(repeats)]
        point_s = statistics.median(x for x, _ in points)
        n_tok = et.windows.count * et.windows.tokens
        matmul_params = sum(p.numel() for p in lm.model.parameters()) - lm.model.get_input_embeddings().weight.numel()
        out = {
            "seconds": round(point_s, 4), "first_call_s": round(first_s, 3),
            "patch_restore_s": round(statistics.median(patches), 4),
            "loss_only_s": round(statistics.median(x for x, _ in targets), 4),
            "setup_inputs_s": round(t1 - t0, 2), "load_model_s": round(t2 - t1, 2),
            "repeats": repeats, "points_s": [round(x, 4) for x, _ in points],
            "pattern": cand.pattern, "fraction": cand.fraction, "heads": len(cand.plan.heads),
            "heads_rewound": rewind_description(cand.plan)["heads"],
            "windows": et.windows.count, "tokens": et.windows.tokens, "ids_seed": 0,
            "loss_candidate": first.loss,
            "loss_candidate_repeats_equal": all(r[0].loss == first.loss for _, r in points),
            "loss_target": targets[0][1].loss,
            "live_dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."),
            "tokens_per_s": round(n_tok / point_s),
            "model_tflops": round(2 * matmul_params * n_tok / point_s / 1e12, 1),
        }
        if dev.type == "cuda":
            out["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        return out
    finally:
        for c in (b, t):
            c.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="the figures' JSON file")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU: check the script works")
    p.add_argument("--workdir", type=Path, default=None, help="where the generated models go (deleted after)")
    p.add_argument("--keep", action="store_true", help="keep the generated models (their folder is in the JSON)")
    p.add_argument("--budget", type=float, default=360.0, help="seconds for all stages together")
    p.add_argument("--delta-layers", type=int, default=2, help="layers of the 7B-wide delta trio")
    p.add_argument("--sweep-fraction", type=float, default=0.15, help="the sweep point's fraction of heads (top)")
    p.add_argument("--sweep-repeats", type=int, default=3, help="timed sweep points after the warm-up one")
    args = p.parse_args(argv)

    smoke = args.cpu_smoke
    device = "cpu" if smoke else "cuda"
    if not smoke and not torch.cuda.is_available():
        print("gpu_bench: error: no CUDA GPU visible to torch — run with --cpu-smoke on a CPU machine",
              file=sys.stderr)
        return 1
    torch.set_num_threads(1 if smoke else max(1, min(16, os.cpu_count() or 1)))
    config = TINY if smoke else SEVEN_B
    delta_config = dict(config, num_layers=2 if smoke else args.delta_layers)
    tokens, windows = (SMOKE_TOKENS, SMOKE_WINDOWS) if smoke else (512, 64)
    budget = Budget(args.budget)
    figures: dict = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.node(), "python": platform.python_version(),
        "torch": torch.__version__, "device": device,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "cpu_smoke": smoke, "model": config, "delta_model": delta_config, "stages": {},
    }
    stages = figures["stages"]

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text(json.dumps(figures, indent=1) + "\n")
        os.replace(tmp, args.out)

    def stage(name: str, need: float, fn) -> None:
        if budget.left() < need:
            stages[name] = {"skipped": f"{budget.left():.0f} s left, needs ≈{need:.0f} s"}
        else:
            try:
                stages[name] = fn()
            except Exception as err:  # noqa: BLE001 — a figure file with the failure beats no file
                stages[name] = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-1500:]}
        print(f"gpu_bench: {name}: {stages[name]}", file=sys.stderr, flush=True)
        save()

    def took(name: str, default: float) -> float:
        """A finished stage's seconds (to size the stages like it), else `default`."""
        return float(stages.get(name, {}).get("seconds", default))

    work = Path(tempfile.mkdtemp(prefix="gpu_bench_", dir=args.workdir))
    if args.keep:
        figures["workdir"] = str(work)
    try:
        model, trio = work / "7b", [work / "d_base", work / "d_cpt1", work / "d_cpt2"]
        sweep_base = work / "7b_sweep_base"

        def generate() -> dict:
            t0 = time.perf_counter()
            state = write_model(model, config, 0, device)
            t1 = time.perf_counter()
            base_info = write_sweep_base(model, state, sweep_base, sweep_layers(config, args.sweep_fraction), 4,
                                         device)
            del state
            t2 = time.perf_counter()
            base = write_model(trio[0], delta_config, 1, device)
            write_model(trio[1], delta_config, 2, device, base)
            write_model(trio[2], delta_config, 3, device, base)
            return {"seconds_7b": round(t1 - t0, 1), "seconds_sweep_base": round(t2 - t1, 1),
                    "seconds_trio": round(time.perf_counter() - t2, 1),
                    "bytes_7b": sum(f.stat().st_size for f in model.iterdir()), "sweep_base": base_info}

        stage("generate", 30 if smoke else 150, generate)
        if "error" in stages["generate"] or "skipped" in stages["generate"]:
            return 1
        # the two targets of issue 13 first (a 7B scan, a 7B sweep point), then the cheap stages that each run
        # another path (the cache, delta), then the scans that cost a multiple of the first (needs from it)
        est = 5 if smoke else 60
        stage("scan_fit_gram64", est, lambda: timed_scan([model], device=device, route="gram64", metrics="fit",
                                                         cache_dir=work / "cache_fit64"))
        stage("sweep", 20 if smoke else 45, lambda: timed_sweep(model, sweep_base, device=device, tokens=tokens,
                                                             windows=windows, fraction=args.sweep_fraction,
                                                             repeats=args.sweep_repeats, work=work))
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        stage("rescan_fit_gram64_cached", 5, lambda: timed_scan([model], device=device, route="gram64",
                                                                metrics="fit", cache_dir=work / "cache_fit64"))
        stage("delta_fit_cold", 5 if smoke else 30, lambda: timed_delta(trio[0], trio[1:], device=device,
                                                                        metrics="fit", cache_dir=work / "cache_delta"))
        stage("delta_fit_cached", 10, lambda: timed_delta(trio[0], trio[1:], device=device, metrics="fit",
                                                           cache_dir=work / "cache_delta"))
        fit = took("scan_fit_gram64", est)
        stage("scan_fit_gram32", 0.8 * fit, lambda: timed_scan([model], device=device, route="gram32",
                                                               metrics="fit", cache_dir=None))
        stage("scan_all_gram64", 2 * fit, lambda: timed_scan([model], device=device, route="gram64", metrics="all",
                                                             cache_dir=None))
        if device == "cuda":
            figures["cuda_max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        save()
        failed = [n for n, s in stages.items() if "error" in s]
        return 1 if failed else 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    # `timeout` (gpu_check.sh) sends SIGTERM: leave through `finally`, so the generated models are removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())

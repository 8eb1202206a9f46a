"""GPU figures (issue 13 item 5), run by benchmarks/gpu_check.sh: scan and delta of a 7B-shaped generated
checkpoint on one GPU, engine only (no textual/plotext/platformdirs/gguf/ray on the GPU machine).

Stages, each timed in this process with `torch.cuda.synchronize()` and recorded in the JSON even when a
later one fails or is skipped for lack of time (`--budget` seconds in all):
  generate  a Llama-2-7B-shaped bf16 checkpoint (32 × 4096, ff 11008, vocab 32000, Student-t ν=3 entries)
            and, for the delta, a base + 2 CPT trio of the same width with `--delta-layers` layers
  scan      `--metrics fit` and `all` at gram64, `fit` at gram32 (cold caches), then a cached `fit` rescan
  delta     base + 2 CPT, cold, then the cached rerun
`--cpu-smoke` does the same on a tiny model on the CPU in seconds: it proves the script end to end.

    python benchmarks/gpu_bench.py --out gpu_figures.json [--cpu-smoke] [--workdir DIR] [--budget 360]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SEVEN_B = dict(num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=32, intermediate_size=11008,
               vocab_size=32000, tie_word_embeddings=False)
TINY = dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=4, intermediate_size=128, vocab_size=200,
            tie_word_embeddings=False)


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
        z = torch.randn(shape, generator=gen, device=device)
        g = sum(torch.randn(shape, generator=gen, device=device) ** 2 for _ in range(3))    # χ²₃
        t = 0.02 * z / torch.sqrt(g / 3.0)
        if base is not None:
            t = base[key].to(device, torch.float32) + delta_scale * t
        out[key] = t.to(torch.bfloat16).cpu()
        del z, g, t
    return out


def write_model(folder: Path, config: dict, seed: int, device: str, base: dict | None = None) -> dict:
    from analysis.generate import write_checkpoint

    state = heavy_tailed_state(config, seed, device, base)
    write_checkpoint(folder, "llama", dtype="bfloat16", fmt="sharded", shards=4, state_dict=state, **config)
    return state


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

    _sync()
    t0 = time.perf_counter()
    table = open_and_build(base, cpts, options=DeltaOptions(device=device, metrics=metrics), cache=Cache(cache_dir))
    _sync()
    return {"seconds": round(time.perf_counter() - t0, 3), "rows": len(table.rows), "metrics": metrics,
            "failures": len(table.failures)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="the figures' JSON file")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU: check the script works")
    p.add_argument("--workdir", type=Path, default=None, help="where the generated models go (deleted after)")
    p.add_argument("--budget", type=float, default=360.0, help="seconds for all stages together")
    p.add_argument("--delta-layers", type=int, default=2, help="layers of the 7B-wide delta trio")
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

    work = Path(tempfile.mkdtemp(prefix="gpu_bench_", dir=args.workdir))
    try:
        model, trio = work / "7b", [work / "d_base", work / "d_cpt1", work / "d_cpt2"]

        def generate() -> dict:
            t0 = time.perf_counter()
            write_model(model, config, 0, device)
            t1 = time.perf_counter()
            base = write_model(trio[0], delta_config, 1, device)
            write_model(trio[1], delta_config, 2, device, base)
            write_model(trio[2], delta_config, 3, device, base)
            return {"seconds_7b": round(t1 - t0, 1), "seconds_trio": round(time.perf_counter() - t1, 1),
                    "bytes_7b": sum(f.stat().st_size for f in model.iterdir())}

        stage("generate", 30 if smoke else 150, generate)
        if "error" in stages["generate"] or "skipped" in stages["generate"]:
            return 1
        est = 5 if smoke else 45
        stage("scan_fit_gram64", est, lambda: timed_scan([model], device=device, route="gram64", metrics="fit",
                                                         cache_dir=work / "cache_fit64"))
        stage("rescan_fit_gram64_cached", 5, lambda: timed_scan([model], device=device, route="gram64",
                                                                metrics="fit", cache_dir=work / "cache_fit64"))
        stage("scan_fit_gram32", est, lambda: timed_scan([model], device=device, route="gram32", metrics="fit",
                                                         cache_dir=None))
        stage("scan_all_gram64", 2 * est, lambda: timed_scan([model], device=device, route="gram64", metrics="all",
                                                             cache_dir=None))
        stage("delta_fit_cold", est, lambda: timed_delta(trio[0], trio[1:], device=device, metrics="fit",
                                                          cache_dir=work / "cache_delta"))
        stage("delta_fit_cached", 10, lambda: timed_delta(trio[0], trio[1:], device=device, metrics="fit",
                                                           cache_dir=work / "cache_delta"))
        if device == "cuda":
            figures["cuda_max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        save()
        failed = [n for n, s in stages.items() if "error" in s]
        return 1 if failed else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

"""Streaming writes at scale: peak memory and throughput of `rewind apply` and `interpolate` on a ≥ 2 GB
checkpoint, side by side with a plain `shutil.copyfile` of the same bytes, each in a fresh process.

    python benchmarks/stream_write.py                 # fp32, hidden 4096, 2 layers ≈ 2.8 GB per checkpoint
    python benchmarks/stream_write.py --repeats 3 --json-out results.json

Targets (issue 4): peak RSS < 4 × largest tensor + a constant (the Python/torch process itself);
throughput within 2× of the copy. Needs ≈ 3 × the checkpoint size of free disk next to --dir; everything
it writes is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------
# memory probes (Linux /proc)
# --------------------------------------------------------------------------------------------------

def proc_status() -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile of this process in bytes."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) * 1024
    return out


class PeakSampler:
    """Samples RssAnon / RssFile every few ms in a thread (VmHWM gives the exact total peak)."""

    def __init__(self, every: float = 0.005):
        self.every, self.peak_anon, self.peak_file = every, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            s = proc_status()
            self.peak_anon = max(self.peak_anon, s["RssAnon"])
            self.peak_file = max(self.peak_file, s["RssFile"])
            time.sleep(self.every)

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------------------------------
# child: one operation in a fresh process
# --------------------------------------------------------------------------------------------------

def child(op: str, args: list[str]) -> None:
    import torch

    torch.set_num_threads(1)
    from analysis.io.checkpoint import open_checkpoint
    from analysis.edit.interpolate import endpoints, run_interpolation
    from analysis.edit.rewind import apply_rewind
    from analysis.edit.rewind_list import read_rewind_list

    before = proc_status()
    with PeakSampler() as sampler:
        t0 = time.perf_counter()
        if op in ("copy", "copy_inputs"):  # copy: the target's bytes; copy_inputs: every folder given but the last
            *srcs, dst = (Path(x) for x in args)
            dst.mkdir()
            nbytes = 0
            for i, src in enumerate(srcs):
                for f in sorted(src.glob("*.safetensors")):
                    shutil.copyfile(f, dst / f"{i}-{f.name}")
                    nbytes += f.stat().st_size
        elif op == "rewind":
            res = apply_rewind(read_rewind_list(args[0]), args[1])
            nbytes = res.total_size
        elif op == "interpolate":
            rep = run_interpolation(endpoints(open_checkpoint(args[0]), open_checkpoint(args[1]), 0.5), args[2])
            nbytes = rep.written.total_size
        else:
            raise SystemExit(f"unknown op {op}")
        seconds = time.perf_counter() - t0
    after = proc_status()
    print(json.dumps({"op": op, "seconds": seconds, "bytes": nbytes, "vmhwm": after["VmHWM"],
                      "rss_before": before["VmRSS"], "peak_anon": sampler.peak_anon, "peak_file": sampler.peak_file}))


def run_child(op: str, *args: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, __file__, "--child", op, *args], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{op} failed:\n{proc.stderr}")
    os.sync()  # write-back outside the timed region, so each run starts from clean pages
    return json.loads(proc.stdout.strip().splitlines()[-1])


def baseline_rss() -> int:
    """Peak RSS of a fresh process that imports the engine and does nothing (the 'constant')."""
    code = ("import torch; torch.set_num_threads(1); import analysis.edit.rewind, analysis.edit.interpolate, "
            "analysis.io.checkpoint; print(open('/proc/self/status').read())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    for line in out.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------

def llama_shapes(hidden: int, layers: int, heads: int, kv_heads: int, inter: int, vocab: int) -> dict[str, tuple]:
    dh = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (heads * dh, hidden),
                   p + "self_attn.k_proj.weight": (kv_heads * dh, hidden),
                   p + "self_attn.v_proj.weight": (kv_heads * dh, hidden),
                   p + "self_attn.o_proj.weight": (hidden, heads * dh),
                   p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                   p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
                   p + "post_attention_layernorm.weight": (hidden,)}
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    return shapes


def generate(folder: Path, shapes: dict[str, tuple], dtype, noise: float, config: dict) -> None:
    """Seeded N(0, 0.02²) weights (+ noise·N(0,1) for a CPT), one tensor at a time through the writer."""
    import torch

    from analysis.io.writer import TensorSpec, write_checkpoint_streaming

    def tensors():
        for i, (name, shape) in enumerate(shapes.items()):
            g = torch.Generator().manual_seed(i)
            t = torch.randn(shape, generator=g).mul_(0.02)
            if noise:
                t.add_(torch.randn(shape, generator=torch.Generator().manual_seed(10_000 + i)), alpha=noise)
            yield name, t.to(dtype)

    cfg_dir = folder.parent / (folder.name + ".cfg")
    cfg_dir.mkdir()
    (cfg_dir / "config.json").write_text(json.dumps(config))
    specs = [TensorSpec(n, s, dtype) for n, s in shapes.items()]
    write_checkpoint_streaming(folder, tensors(), specs=specs, aux_files=[cfg_dir / "config.json"])
    shutil.rmtree(cfg_dir)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--dir", default=None, help="Folder for the temporary checkpoints (default: system temp).")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json-out", default=None)
    a = ap.parse_args()
    if a.child:
        child(a.child[0], a.child[1:])
        return

    import signal

    import torch

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-up below when killed
    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    dtype = getattr(torch, a.dtype)
    heads, kv = 32, 8
    shapes = llama_shapes(a.hidden, a.layers, heads, kv, a.intermediate, a.vocab)
    esize = torch.empty((), dtype=dtype).element_size()
    sizes = {n: esize * int(torch.Size(s).numel()) for n, s in shapes.items()}
    total, largest = sum(sizes.values()), max(sizes.values())
    config = {"model_type": "llama", "hidden_size": a.hidden, "num_attention_heads": heads,
              "num_key_value_heads": kv, "num_hidden_layers": a.layers, "intermediate_size": a.intermediate,
              "vocab_size": a.vocab, "torch_dtype": a.dtype}
    tmp = Path(tempfile.mkdtemp(prefix="diffract-stream-bench-", dir=a.dir))
    results: dict = {"checkpoint_bytes": total, "largest_tensor_bytes": largest,
                     "tensors_over_200MB": sum(v >= 200e6 for v in sizes.values()), "dtype": a.dtype, "runs": []}
    try:
        t0 = time.perf_counter()
        generate(tmp / "base", shapes, dtype, 0.0, config)
        generate(tmp / "target", shapes, dtype, 0.002, config)
        os.sync()
        results["generate_seconds"] = time.perf_counter() - t0
        print(f"generated 2 × {total / 1e9:.2f} GB ({a.dtype}, largest tensor {largest / 1e6:.0f} MB, "
              f"{results['tensors_over_200MB']} tensors ≥ 200 MB) in {results['generate_seconds']:.0f} s", flush=True)
        lst = tmp / "rewind.json"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "diffract_tui", "rewind", "plan", str(tmp / "base"), str(tmp / "target"),
                        "--pattern", "greedy", "--fraction", "0.25", "--out", str(lst)], check=True, cwd=ROOT,
                       capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"))
        results["plan_seconds"] = time.perf_counter() - t0
        results["baseline_rss"] = baseline_rss()
        for folder in ("base", "target"):  # warm the page cache so the first repeat is not the only cold one
            for f in (tmp / folder).glob("*.safetensors"):
                with open(f, "rb") as src, open(os.devnull, "wb") as sink:
                    shutil.copyfileobj(src, sink, 16 << 20)
        for rep in range(a.repeats):
            for op, args in (("copy", (str(tmp / "target"), str(tmp / "out"))),
                             ("copy_inputs", (str(tmp / "base"), str(tmp / "target"), str(tmp / "out"))),
                             ("rewind", (str(lst), str(tmp / "out"))),
                             ("interpolate", (str(tmp / "base"), str(tmp / "target"), str(tmp / "out")))):
                r = run_child(op, *args)
                shutil.rmtree(tmp / "out")
                r["repeat"] = rep
                results["runs"].append(r)
                print(f"  {op:12s} {r['seconds']:6.2f} s  {r['bytes'] / r['seconds'] / 1e9:5.2f} GB/s  "
                      f"VmHWM {r['vmhwm'] / 1e9:5.2f} GB  peak anon {r['peak_anon'] / 1e9:5.2f} GB  "
                      f"peak file {r['peak_file'] / 1e9:5.2f} GB", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    summary = {}
    for op in ("copy", "copy_inputs", "rewind", "interpolate"):
        runs = [r for r in results["runs"] if r["op"] == op]
        summary[op] = {"median_seconds": statistics.median(r["seconds"] for r in runs),
                       "best_seconds": min(r["seconds"] for r in runs),
                       "throughput_GBps": statistics.median(r["bytes"] / r["seconds"] for r in runs) / 1e9,
                       "vmhwm_GB": max(r["vmhwm"] for r in runs) / 1e9,
                       "peak_anon_GB": max(r["peak_anon"] for r in runs) / 1e9}
    limit = 4 * largest + results["baseline_rss"]
    for op in ("rewind", "interpolate"):
        summary[op]["slowdown_vs_copy"] = summary[op]["median_seconds"] / summary["copy"]["median_seconds"]
        summary[op]["best_slowdown_vs_copy"] = summary[op]["best_seconds"] / summary["copy"]["best_seconds"]
        summary[op]["peak_within_4x_largest_plus_baseline"] = summary[op]["vmhwm_GB"] * 1e9 < limit
    # interpolation reads two checkpoints: also compare with copying both (the bytes it must read)
    summary["interpolate"]["slowdown_vs_copy_inputs"] = (summary["interpolate"]["median_seconds"]
                                                         / summary["copy_inputs"]["median_seconds"])
    results["summary"] = summary
    results["limit_4x_largest_plus_baseline_GB"] = limit / 1e9
    print(f"baseline process (imports only) VmHWM {results['baseline_rss'] / 1e9:.2f} GB; "
          f"limit 4 × largest + baseline = {limit / 1e9:.2f} GB")
    for op, s in summary.items():
        extra = ""
        if "slowdown_vs_copy" in s:
            extra = (f"  {s['slowdown_vs_copy']:.2f}× copy time (best {s['best_slowdown_vs_copy']:.2f}×), "
                     f"peak within limit: {s['peak_within_4x_largest_plus_baseline']}")
        if "slowdown_vs_copy_inputs" in s:
            extra += f", {s['slowdown_vs_copy_inputs']:.2f}× the time to copy both inputs"
        print(f"{op:12s} median {s['median_seconds']:6.2f} s (best {s['best_seconds']:.2f})  "
              f"{s['throughput_GBps']:5.2f} GB/s  VmHWM {s['vmhwm_GB']:.2f} GB  anon {s['peak_anon_GB']:.2f} GB{extra}")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

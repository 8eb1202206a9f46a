"""Benchmark: open a 7B-shaped Llama checkpoint (bf16, sharded safetensors + index) and build its
layout tree. Targets (issue 2): < 1 s and < 200 MB RSS growth from open_checkpoint to tree-ready.

The checkpoint is written as SPARSE files (real headers, data left as holes via truncate), so it
costs ~nothing on disk. The measurement runs in a fresh subprocess.

    python benchmarks/open_7b.py            # make a temp checkpoint, measure, clean up
    python benchmarks/open_7b.py --keep DIR # write into DIR and keep it
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LAYERS, HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 32, 4096, 11008, 32, 32, 32000
SHARDS = 3


def llama_7b_shapes() -> dict[str, tuple[int, ...]]:
    """HF names and shapes of a Llama-2-7B-shaped model (6.74 B parameters)."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (HIDDEN, HIDDEN),
                   p + "self_attn.v_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                   p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN), p + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
                   p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE), p + "input_layernorm.weight": (HIDDEN,),
                   p + "post_attention_layernorm.weight": (HIDDEN,)}
    shapes |= {"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)}
    return shapes


def write_sparse_checkpoint(folder: Path) -> int:
    """Write config.json, SHARDS sparse bf16 safetensors shards and the index; returns total tensor bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    shapes = llama_7b_shapes()
    names = list(shapes)
    per_shard = -(-len(names) // SHARDS)
    weight_map: dict[str, str] = {}
    total = 0
    for s in range(SHARDS):
        shard = f"model-{s + 1:05d}-of-{SHARDS:05d}.safetensors"
        header: dict[str, dict] = {}
        offset = 0
        for name in names[s * per_shard:(s + 1) * per_shard]:
            nbytes = 2
            for d in shapes[name]:
                nbytes *= d
            header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = shard
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # 8-byte alignment, as the safetensors writer does
        with open(folder / shard, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + offset)  # the data section is a hole
        total += offset
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "num_hidden_layers": LAYERS, "vocab_size": VOCAB, "torch_dtype": "bfloat16"}))
    return total


def rss_bytes() -> tuple[int, int]:
    """(current RSS, peak RSS) of this process in bytes: psutil when installed, else /proc/self/status."""
    try:
        import psutil

        info = psutil.Process().memory_info()
        peak = getattr(info, "peak_wset", None)
        rss = info.rss
    except ImportError:
        rss = peak = None
    fields = {}
    if os.path.exists("/proc/self/status"):
        for line in open("/proc/self/status"):
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                fields[key] = int(value.split()[0]) * 1024
    return (rss if rss is not None else fields.get("VmRSS", 0)), (peak or fields.get("VmHWM", 0))


def measure(folder: Path) -> dict:
    """Run in the fresh subprocess: time and RSS growth of open_checkpoint + layout_of."""
    t_import = time.perf_counter()
    import torch

    torch.set_num_threads(1)
    from analysis.io.checkpoint import open_checkpoint

    try:
        from analysis.model.architecture import layout_of
    except ImportError:  # the layout module is optional for this benchmark
        layout_of = None
    import_s = time.perf_counter() - t_import
    rss0, peak0 = rss_bytes()
    t0 = time.perf_counter()
    ckpt = open_checkpoint(folder)
    t_open = time.perf_counter()
    layout = layout_of(ckpt) if layout_of else None
    t_tree = time.perf_counter()
    rss1, peak1 = rss_bytes()
    t_rows = time.perf_counter()
    head = ckpt.rows("layers.31.self_attn.q_proj.weight", 31 * 128, 32 * 128)  # one head's q rows (holes → zeros)
    rows_s = time.perf_counter() - t_rows
    rss2, _ = rss_bytes()
    return {
        "tensors": len(ckpt.keys()), "bytes": ckpt.total_bytes, "weight_files": len(ckpt.weight_files),
        "layout": layout.describe() if layout else None,
        "import_s": import_s, "open_s": t_open - t0, "layout_s": t_tree - t_open, "tree_ready_s": t_tree - t0,
        "rss_growth_mb": (rss1 - rss0) / 1e6, "peak_growth_mb": (max(peak1, rss1) - max(peak0, rss0)) / 1e6,
        "rss_before_mb": rss0 / 1e6, "one_head_rows_s": rows_s, "one_head_shape": list(head.shape),
        "rss_growth_after_head_mb": (rss2 - rss0) / 1e6,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="write the checkpoint into this folder and keep it")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # internal: the fresh subprocess
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return 0
    tmp = None if args.keep else Path(tempfile.mkdtemp(prefix="diffract-open7b-"))
    folder = args.keep or tmp / "llama-7b"
    try:
        t = time.perf_counter()
        total = write_sparse_checkpoint(folder)
        on_disk = sum(os.stat(p).st_blocks * 512 for p in folder.iterdir())
        print(f"wrote {folder}: {total / 1e9:.2f} GB of bf16 tensors as sparse files "
              f"({on_disk / 1e6:.1f} MB on disk) in {time.perf_counter() - t:.2f} s")
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        proc = subprocess.run([sys.executable, __file__, "--measure", str(folder)], capture_output=True, text=True,
                              env=env)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        r = json.loads(proc.stdout)
        print(f"tensors: {r['tensors']} in {r['weight_files']} shards, {r['bytes'] / 1e9:.2f} GB; layout: {r['layout']}")
        print(f"import torch + engine: {r['import_s']:.2f} s (not counted)")
        print(f"open_checkpoint: {r['open_s'] * 1000:.1f} ms; layout_of: {r['layout_s'] * 1000:.1f} ms; "
              f"tree-ready: {r['tree_ready_s'] * 1000:.1f} ms (target < 1000 ms) "
              f"{'OK' if r['tree_ready_s'] < 1 else 'MISSED'}")
        print(f"RSS growth to tree-ready: {r['rss_growth_mb']:.1f} MB, peak growth {r['peak_growth_mb']:.1f} MB "
              f"(target < 200 MB) {'OK' if max(r['rss_growth_mb'], r['peak_growth_mb']) < 200 else 'MISSED'}")
        print(f"one head's q rows {r['one_head_shape']} read in {r['one_head_rows_s'] * 1000:.1f} ms; RSS growth "
              f"then {r['rss_growth_after_head_mb']:.1f} MB")
        ok = r["tree_ready_s"] < 1 and max(r["rss_growth_mb"], r["peak_growth_mb"]) < 200
        return 0 if ok else 2
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

"""Peak resident memory (VmHWM) of whole `diffract-tui delta` processes on generated base + 2 CPT trios,
this checkout against another one (the code before the issue-13 memory work), in one run.

    python benchmarks/delta_memory.py --before /path/to/old/checkout            # 128256×4096 trio + 135M trio
    python benchmarks/delta_memory.py --shape 128256 1024 --skip-smollm --before OLD
    python benchmarks/delta_memory.py --quick                                   # small trio, < 2 min

Trios (tests/memory_models.write_delta_trio, bf16, tied embedding, every matrix with a real, different delta):
`--shape VOCAB HIDDEN` with `--layers` layers of that width (8 heads × 64, 2 kv heads, intermediate 1024), and a
SmolLM2-135M-shaped one (49152×576 embedding, 30 layers, 9 heads × 64, 3 kv heads, intermediate 1536).
Each process runs one compute thread, no cache. Reported: peak MiB, peak / (largest tensor as float32), and
before / after. The trios go to a temp folder (--tmp) that is deleted at the end; check `df` first
(128256×4096: 3 GB on disk; the old code needs ≈ 16 × 2 GiB of memory there, so --before is skipped for
trios whose estimate exceeds --max-before-gib).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memory_models import delta_peak_rss, write_delta_trio  # noqa: E402

OLD_FACTOR = 16     # peak / largest float32 tensor of the old code, measured on the 32000×1024 and 256000×128 trios
MiB = 2 ** 20


def measure(label: str, trio_kw: dict, largest: int, tmp: Path, before: str | None, max_before: float,
            after: bool = True) -> dict:
    """Generate one trio, run delta with this checkout (and `before`), print and return the figures."""
    root = tmp / label
    t = time.time()
    base, targets = write_delta_trio(root, **trio_kw)
    print(f"[{label}] trio written in {time.time() - t:.0f} s", flush=True)
    out: dict = {"trio": label, "largest_f32_mib": largest / MiB}
    runs = [("after", None)] if after else []
    if before is not None:
        if OLD_FACTOR * largest / 2**30 <= max_before:
            runs.insert(0, ("before", before))
        else:
            print(f"[{label}] before skipped: ≈ {OLD_FACTOR * largest / 2**30:.0f} GiB > --max-before-gib")
    for name, path in runs:
        t = time.time()
        rc, peak, err = delta_peak_rss(base, targets, root / f"{name}.csv", pythonpath=path)
        if rc != 0:
            print(f"[{label}] {name}: exit {rc}\n{err[-2000:]}")
        out[name] = {"peak_mib": peak / MiB, "x_largest": peak / largest, "seconds": time.time() - t, "rc": rc}
        print(f"[{label}] {name}: peak {peak / MiB:.0f} MiB = {peak / largest:.2f} × largest "
              f"({time.time() - t:.0f} s)", flush=True)
    if "before" in out and "after" in out:
        print(f"[{label}] before / after = {out['before']['peak_mib'] / out['after']['peak_mib']:.2f}")
    shutil.rmtree(root, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", nargs=2, type=int, default=[128256, 4096], metavar=("VOCAB", "HIDDEN"))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--before", help="a checkout of the code to compare with (its root goes on PYTHONPATH)")
    ap.add_argument("--max-before-gib", type=float, default=12.0)
    ap.add_argument("--skip-smollm", action="store_true")
    ap.add_argument("--skip-shape", action="store_true")
    ap.add_argument("--skip-after", action="store_true", help="measure only --before")
    ap.add_argument("--quick", action="store_true", help="one small trio (32000×256)")
    ap.add_argument("--tmp", default=tempfile.gettempdir())
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="delta-memory-", dir=args.tmp))
    try:
        if args.quick:
            args.shape, args.skip_smollm = [32000, 256], True
        results = []
        vocab, hidden = args.shape
        if not args.skip_shape:
            results.append(measure(f"{vocab}x{hidden}", dict(vocab=vocab, hidden=hidden, layers=args.layers,
                                                            heads=8, head_dim=64, kv_heads=2, intermediate=1024),
                                   vocab * hidden * 4, tmp, args.before, args.max_before_gib, not args.skip_after))
        if not args.skip_smollm:
            results.append(measure("smollm2-135m-shaped", dict(vocab=49152, hidden=576, layers=30, heads=9,
                                                               head_dim=64, kv_heads=3, intermediate=1536),
                                   49152 * 576 * 4, tmp, args.before, args.max_before_gib, not args.skip_after))
        out_dir = Path(__file__).resolve().parent / "out"
        out_dir.mkdir(exist_ok=True)
        import json

        (out_dir / "delta_memory.json").write_text(json.dumps(results, indent=1) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

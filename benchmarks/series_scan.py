"""Scanning a checkpoint series (issue 12, performance): the scan cost grows linearly with the number of
checkpoints, and a re-scan after an 11th checkpoint is added computes only the new one (the cache serves the
other ten).

    nice python benchmarks/series_scan.py --shape 135m --n 10     # SmolLM2-135M-shaped, bf16 (the issue's case)
    nice python benchmarks/series_scan.py --shape small --n 10    # 8 layers, hidden 256 (a quick check)

Random bf16 checkpoints written by `analysis.generate.write_checkpoint` under names `step-<k×1000>` in a temp
folder, so the inputs are recognised as a series. Cold scans (empty cache) of the first 1, n/2 and n checkpoints
measure the growth; then step n×1000 is added and the n+1 are scanned again into the n-checkpoint cache.
Times are wall and CPU seconds (the ratios use CPU time: a shared machine's wall time is noisy). The
cache's computed entries are counted by wrapping `Cache.put_json` (one per computed matrix row). One thread.
One JSON object on stdout.

Latest figures (135M-shaped, n = 10, --sizes 2,5,10): benchmarks/README.md. Earlier, measured 2026-12-01 on a shared 2-core machine under `nice` (other agents' load; wall times noisy, CPU times used):
135M-shaped, n=2: 32.4 CPU s for 1 checkpoint, 61.7 for 2 (0.95 of linear); the re-scan after adding a 3rd computed
211 rows (one checkpoint's), read 422 from the cache, 30.7 CPU s (0.95 of one cold checkpoint); warm re-scan 0.14 s.
small shape, n=10: 1.82 / 8.75 / 17.36 CPU s for 1 / 5 / 10 (0.96, 0.95 of linear); re-scan with an 11th computed
57 rows, hit 570, 1.86 CPU s (1.02 of one cold checkpoint); warm re-scan of the 10: 0.34 CPU s, 0 computed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.run.cache import Cache  # noqa: E402

SHAPES = {  # analysis.model.families.family_config overrides
    "135m": dict(hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
                 vocab_size=49152, tie_word_embeddings=True),
    "small": dict(hidden_size=256, intermediate_size=768, num_layers=8, num_heads=8, num_kv_heads=4,
                  vocab_size=8192, tie_word_embeddings=True),
}


class CountingCache(Cache):
    """A Cache that counts its rows: a put is a row the scan computed, a hit one it read."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.computed = 0
        self.hits = 0

    def get_json(self, key: str):  # noqa: ANN201
        value = super().get_json(key)
        self.hits += value is not None
        return value

    def put_json(self, key: str, value) -> None:  # noqa: ANN001
        self.computed += 1
        super().put_json(key, value)


def scan_series(paths: list[Path], cache_root: Path) -> dict:
    """Scan `paths` as one series into the cache at `cache_root`; seconds, rows, computed and cached entries."""
    from analysis.io.checkpoint import open_checkpoint
    from analysis.run.scan import scan
    from analysis.run.series import detect_series
    from analysis.spectral.backend import SpectralSettings

    series = detect_series([str(p) for p in paths])
    assert series is not None or len(paths) == 1  # one checkpoint is no series
    cache = CountingCache(cache_root)
    opened = [open_checkpoint(p) for p in (series.reorder(paths) if series else paths)]
    start, cpu = time.perf_counter(), time.process_time()
    try:
        rows = list(scan(opened, settings=SpectralSettings(device="cpu"), cache=cache))
    finally:
        for c in opened:
            c.close()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"checkpoints": len(paths), "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2), "rows": len(rows),
            "computed": cache.computed, "cache_hits": cache.hits,
            "seconds_per_checkpoint": round(seconds / len(paths), 2)}


def main() -> None:
    """Write the series, run the cold scans and the re-scan, print the figures."""
    from analysis.generate import write_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="135m")
    parser.add_argument("--n", type=int, default=10, help="checkpoints in the series before the added one")
    parser.add_argument("--sizes", default=None,
                        help="series lengths of the cold scans, e.g. 2,5,10 (default: 1, n/2 and n)")
    parser.add_argument("--root", type=Path, default=None, help="work folder (default: a temp folder)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="series-scan-") as tmp:
        root = args.root or Path(tmp)
        t0 = time.perf_counter()
        paths = [write_checkpoint(root / f"step-{k * 1000}", "llama", seed=k, dtype="bfloat16", **SHAPES[args.shape])
                 for k in range(args.n + 1)]
        write_s = time.perf_counter() - t0
        series, added = paths[:args.n], paths[args.n]
        sizes = (sorted({int(k) for k in args.sizes.split(",")}) if args.sizes
                 else sorted({1, max(1, args.n // 2), args.n}))
        if args.n not in sizes:
            parser.error("--sizes must include --n (the re-scan adds to the n-checkpoint cache)")
        cold = [scan_series(series[:k], root / f"cache-{k}") for k in sizes]
        rescan = scan_series([added, *series[::-1]], root / f"cache-{args.n}")  # shuffled: the series orders it
        warm = scan_series(series, root / f"cache-{args.n}")
        one = cold[0]["cpu_seconds"] / cold[0]["checkpoints"]  # CPU seconds per checkpoint of the smallest scan
        print(json.dumps({
            "shape": args.shape, "dtype": "bfloat16", "threads": 1, "write_seconds": round(write_s, 1),
            "cold": cold,
            # CPU seconds per checkpoint over the smallest scan's (1.0 = linear; CPU time, as the machine is shared)
            "linearity": [round(c["cpu_seconds"] / (one * c["checkpoints"]), 2) for c in cold],
            "rescan_after_adding_one": rescan,
            "rescan_relative_to_one_cold_checkpoint": round(rescan["cpu_seconds"] / one, 2),
            "rescan_computed_over_one_checkpoints_rows": round(rescan["computed"] / (cold[0]["computed"] / cold[0]["checkpoints"]), 2),
            "warm_rescan_of_the_series": warm,
        }, indent=1))


if __name__ == "__main__":
    main()

"""A cached `delta` rerun against the cold run on the real rxnfp trio (bert_pretrained + bert_ft + bert_ft_10k_25s),
one thread, in one run (issue 13 item 3: goal ≤ 10 %).

Measured three ways: whole `diffract-tui delta` processes (wall and CPU of the child: what a user waits for,
Python start-up included), the engine alone in this process (`open_and_build` + `write_table`, start-up
excluded), and the start-up floor (a process that only imports what a cached `delta` imports: no torch since
a fully cached rerun never imports it; `import torch` alone is timed too, for scale). The rerun's table must be
byte-identical to the cold one, and the rerun must not import torch (both checked, the script fails otherwise).

    python benchmarks/delta_rerun.py [--rounds 3] [--json benchmarks/out/delta_rerun.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "DIFFRACT_TUI_THREADS": "1"}
FLOOR = ("import diffract_tui.cli, rich.progress, analysis.deltas.delta_table, analysis.io.checkpoint, "
         "analysis.run.cache, analysis.run.tables")
TORCH = "import torch"
# the CLI in one process, then whether torch was ever imported
PROBE = ("import sys; from diffract_tui.cli import main; code = main(sys.argv[1:]); "
         "print('torch-imported:', 'torch' in sys.modules, file=sys.stderr); sys.exit(code)")


def _process(args: list[str], stderr: list[str] | None = None) -> tuple[float, float]:
    """(wall s, CPU s of the child) of one whole process; it must exit 0 (its stderr appended to `stderr`)."""
    env = {**os.environ, **ONE_THREAD, "PYTHONPATH": str(REPO)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args[:3])} … failed ({proc.returncode}): {proc.stderr.strip()[-400:]}")
    if stderr is not None:
        stderr.append(proc.stderr)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _engine(paths: list[Path], cache_dir: Path, out: Path) -> float:
    """CPU seconds of the engine alone: open, build, write (this process, one thread)."""
    import torch

    from analysis.deltas.delta_table import open_and_build
    from analysis.run.cache import Cache
    from analysis.run.tables import write_table

    torch.set_num_threads(1)
    start = time.process_time()
    table = open_and_build(paths[0], paths[1:], cache=Cache(cache_dir))
    write_table(table.rows, out, metadata={**table.metadata, "summary": table.summary}, inputs=paths)
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="warm reruns (median reported)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    from analysis.realmodels import rxnfp_checkpoints

    dirs = rxnfp_checkpoints()
    paths = [dirs[k] for k in ("bert_pretrained", "bert_ft", "bert_ft_10k_25s")]
    with tempfile.TemporaryDirectory(prefix="delta-rerun-") as tmp:
        tmp_path = Path(tmp)

        def delta(cache: str, out: str, stderr: list[str] | None = None) -> tuple[float, float]:
            return _process(["-c", PROBE, "delta", *map(str, paths), "--out", str(tmp_path / out),
                             "--device", "cpu", "--cache-dir", str(tmp_path / cache)], stderr)

        cold_err: list[str] = []
        warm_err: list[str] = []
        cold_wall, cold_cpu = delta("c", "cold.csv", cold_err)
        warm = [delta("c", f"warm{i}.csv", warm_err) for i in range(args.rounds)]
        for i in range(args.rounds):
            if _sha(tmp_path / f"warm{i}.csv") != _sha(tmp_path / "cold.csv"):
                raise SystemExit("the cached rerun wrote a different table than the cold run")
        if "torch-imported: True" not in cold_err[0] or any("torch-imported: False" not in e for e in warm_err):
            raise SystemExit("the cold run should import torch and a cached rerun should not")
        floor = [_process(["-c", FLOOR]) for _ in range(args.rounds)]
        torch_only = [_process(["-c", TORCH]) for _ in range(args.rounds)]
        engine_cold = _engine(paths, tmp_path / "e", tmp_path / "e_cold.csv")
        engine_warm = statistics.median(_engine(paths, tmp_path / "e", tmp_path / f"e_warm{i}.csv")
                                        for i in range(args.rounds))
        if _sha(tmp_path / "e_warm0.csv") != _sha(tmp_path / "e_cold.csv"):
            raise SystemExit("the cached engine rerun wrote a different table than the cold one")
        files = [p for p in (tmp_path / "c").rglob("*") if p.is_file()]
        cache_bytes = sum(p.stat().st_size for p in files)
    warm_wall = statistics.median(w for w, _ in warm)
    warm_cpu = statistics.median(c for _, c in warm)
    floor_wall = statistics.median(w for w, _ in floor)
    floor_cpu = statistics.median(c for _, c in floor)
    torch_cpu = statistics.median(c for _, c in torch_only)
    figures = {
        "process_cold_wall_s": cold_wall, "process_warm_wall_s": warm_wall, "wall_ratio": warm_wall / cold_wall,
        "process_cold_cpu_s": cold_cpu, "process_warm_cpu_s": warm_cpu, "cpu_ratio": warm_cpu / cold_cpu,
        "startup_floor_wall_s": floor_wall, "startup_floor_cpu_s": floor_cpu, "import_torch_cpu_s": torch_cpu,
        "engine_cold_cpu_s": engine_cold, "engine_warm_cpu_s": engine_warm, "engine_ratio": engine_warm / engine_cold,
        "cache_files": len(files), "cache_bytes": cache_bytes, "load_average_1m": os.getloadavg()[0],
    }
    print(f"delta of the rxnfp trio, one thread (load average {figures['load_average_1m']:.1f})")
    print(f"  whole process  cold {cold_wall:7.1f} s wall {cold_cpu:6.1f} s CPU   rerun {warm_wall:6.1f} s wall "
          f"{warm_cpu:5.1f} s CPU   rerun/cold: {100 * warm_wall / cold_wall:4.1f} % wall, "
          f"{100 * warm_cpu / cold_cpu:4.1f} % CPU")
    print(f"  start-up floor (a cached delta's imports, no torch): {floor_wall:5.1f} s wall {floor_cpu:5.1f} s CPU "
          f"(rerun minus floor: {warm_cpu - floor_cpu:4.1f} s CPU); `import torch` alone: {torch_cpu:4.1f} s CPU")
    print("  the cold run imported torch, no rerun did")
    print(f"  engine only    cold {engine_cold:6.1f} s CPU   rerun {engine_warm:5.2f} s CPU   rerun/cold: "
          f"{100 * engine_warm / engine_cold:4.1f} %")
    print(f"  cache: {len(files)} files, {cache_bytes / 1024:.0f} KiB; reruns byte-identical to the cold table")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()

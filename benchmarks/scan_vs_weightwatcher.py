#!/usr/bin/env python
"""Whole-model scan vs WeightWatcher `analyze()`, vs the linear-algebra floor, and the cache-hit re-scan.

One run, one compute thread, on (a) the real rxnfp BERT `bert_ft` and (b) a generated Llama-shaped
checkpoint (~1B parameters by default). For each model it measures:

- our cold scan (`analysis.run.scan.scan`, whole matrices, fresh cache) — time per item from the progress
  callback, and every torch.linalg eigen/SVD call it makes (counted by wrapping torch.linalg);
- the floor: the same number of `torch.linalg.eigvalsh` calls (same sizes, same dtype) on the Gram
  matrices of the same weights, Gram matmul included, nothing else;
- the re-scan from the cache (every entry a hit) as a fraction of the cold scan;
- WeightWatcher 0.7.x `analyze()` on exactly the same matrices, wrapped as `nn.Linear` layers, twice:
  with its defaults (one SVD and its own power-law fit per matrix) and at equal settings
  (`randomize=True, mp_fit=True`: the permuted-null ESD and the MP bulk fit that our rows also hold);
  α agreement (median |Δα|) where both fit the same tail.

When WeightWatcher would take too long on the big model, `--ww-layers K` restricts the WeightWatcher
comparison to the first K transformer layers: our time for those layers is read off the same cold
scan's per-item timings, so both tools are compared on the same matrices. Generated files are deleted.

    python benchmarks/scan_vs_weightwatcher.py                  # bert_ft + generated 1B (ww on 4 layers)
    python benchmarks/scan_vs_weightwatcher.py --quick          # small generated model, a smoke run

`--processes` compares WHOLE PROCESSES instead (start-up imports, checkpoint open, everything), both ratios per
model in one run: `diffract-tui scan --metrics fit` vs WeightWatcher `analyze()` at its defaults, and
`diffract-tui scan` (all) vs `analyze(randomize=True, mp_fit=True)`, on rxnfp `bert_pretrained`, the real
SmolLM2-135M GGUF and a generated Llama with the 1B's layer shapes (`--proc-llama-layers` of them). `fit` is
compared with two WeightWatcher processes at its defaults: the favourable one (the matrices read through our
reader into nn.Linear layers) and one as a user runs it (transformers `from_pretrained` — for the GGUF its own
`gguf_file=` loader — then `ww.WeightWatcher(model=model).analyze()`); both ratios are printed:

    python benchmarks/scan_vs_weightwatcher.py --processes [--rounds 1] [--skip-equal]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before numpy/torch/scipy load their BLAS

import argparse
import contextlib
import json
import logging
import math
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from analysis.spectral.backend import SpectralSettings  # noqa: E402
from analysis.run.cache import Cache  # noqa: E402
from analysis.io.checkpoint import open_checkpoint  # noqa: E402
from analysis.run.scan import scan  # noqa: E402

LINALG = ("eigvalsh", "eigh", "svdvals", "svd")
_EIGVALSH = torch.linalg.eigvalsh  # the real routines, for the floor (the scan's are wrapped while it runs)
_SVDVALS = torch.linalg.svdvals


# ------------------------------------------------------------------------------------------------
# Instrumentation
# ------------------------------------------------------------------------------------------------


@dataclass
class LinalgCall:
    item: int
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    seconds: float
    device: str = "cpu"


@dataclass
class ScanTiming:
    rows: list[dict]
    total: float
    item_seconds: list[float]
    calls: list[LinalgCall] = field(default_factory=list)
    floor_seconds: float = 0.0
    floor_calls: int = 0


@contextlib.contextmanager
def counting_linalg(calls: list[LinalgCall], current_item: list[int]):
    """Wrap torch.linalg's eigen/SVD routines to record (item, routine, input shape, dtype, time)."""
    originals = {name: getattr(torch.linalg, name) for name in LINALG}

    def wrap(name, fn):
        def wrapper(A, *args, **kwargs):
            _sync(A.device)
            t0 = time.perf_counter()
            out = fn(A, *args, **kwargs)
            _sync(A.device)
            calls.append(LinalgCall(current_item[0], name, tuple(A.shape), A.dtype, time.perf_counter() - t0,
                                    str(A.device)))
            return out
        return wrapper

    try:
        for name, fn in originals.items():
            setattr(torch.linalg, name, wrap(name, fn))
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch.linalg, name, fn)


def timed_scan(path: Path, cache: Cache, settings: SpectralSettings, instrument: bool,
               floor_items: set[int] | None = None) -> ScanTiming:
    """One whole-matrix scan: rows, time per item (from progress) and the linalg calls.

    With `floor_items`, the floor of each of those items (its recorded eigen calls replayed as Gram +
    eigvalsh) is measured right after the item, inside the progress callback, and kept out of the scan's
    timing: both see the same machine load, which on a shared machine drifts by tens of percent per minute.
    """
    ckpt = open_checkpoint(path)
    floor_ckpt = open_checkpoint(path) if floor_items else None
    current = [0]
    calls: list[LinalgCall] = []
    rows: list[dict] = []
    item_seconds: list[float] = []
    floor = {"seconds": 0.0, "calls": 0}
    clock = [0.0]

    def progress(done: int, total: int, label: str) -> None:
        now = time.perf_counter()
        if done > 0:
            item_seconds.append(now - clock[0])
            item = done - 1
            if floor_items and item in floor_items:
                mine = [c for c in calls if c.item == item]
                sec, n = replay_floor(floor_ckpt, rows[item], mine)
                floor["seconds"] += sec
                floor["calls"] += n
        current[0] = done
        clock[0] = time.perf_counter()

    ctx = counting_linalg(calls, current) if instrument else contextlib.nullcontext()
    with ctx:
        t0 = time.perf_counter()
        for row in scan([ckpt], settings=settings, cache=cache, progress=progress):
            rows.append(row)
        wall = time.perf_counter() - t0
    ckpt.close()
    if floor_ckpt is not None:
        floor_ckpt.close()
    timing = ScanTiming(rows, sum(item_seconds) if floor_items else wall, item_seconds, calls)
    timing.floor_seconds, timing.floor_calls = floor["seconds"], floor["calls"]
    return timing


# ------------------------------------------------------------------------------------------------
# The floor: the same eigen calls on Gram matrices, nothing else
# ------------------------------------------------------------------------------------------------


def _sync(device: torch.device | str) -> None:
    """Wait for queued CUDA work, so wall-clock times cover it (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def gram(W: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    W = W.to(dtype)
    return W @ W.T if W.shape[0] <= W.shape[1] else W.T @ W


def replay_floor(ckpt, row: dict, calls: list[LinalgCall]) -> tuple[float, int]:
    """Replay one item's recorded eigen calls as Gram + eigvalsh of that item's matrix; (seconds, calls)."""
    host = ckpt.tensor(row["tensor"], torch.float32)
    M = min(host.shape)
    total = 0.0
    for c in calls:
        W = host.to(c.device)             # the copy to the device is not part of the floor
        _sync(c.device)
        if c.name in ("eigvalsh", "eigh") and c.shape[-1] == M:
            t0 = time.perf_counter()
            G = gram(W, c.dtype)
            if len(c.shape) == 3:  # a batched call: as many Grams as the batch
                G = G.expand(c.shape[0], M, M).contiguous()
            _EIGVALSH(G)
            _sync(c.device)
            total += time.perf_counter() - t0
        else:  # an eigen/SVD call on something else (e.g. a small matrix): replay it as recorded
            A = torch.randn(c.shape, dtype=c.dtype, device=c.device)
            if c.name in ("eigvalsh", "eigh"):
                A = A @ A.transpose(-2, -1)
            _sync(c.device)
            t0 = time.perf_counter()
            (_EIGVALSH if c.name in ("eigvalsh", "eigh") else _SVDVALS)(A)
            _sync(c.device)
            total += time.perf_counter() - t0
    return total, len(calls)


# ------------------------------------------------------------------------------------------------
# WeightWatcher on the same matrices
# ------------------------------------------------------------------------------------------------


WW_SETTINGS = {
    # its defaults: one SVD per matrix and the power-law fit only
    "defaults": {},
    # what our row also holds: the permuted-null ESD and its distance (randomize) and the MP bulk fit (mp_fit)
    "equal": {"randomize": True, "mp_fit": True},
}


def weightwatcher_run(path: Path, rows: list[dict], items: list[int],
                      options: dict | None = None) -> tuple[float, dict[int, dict]]:
    """WeightWatcher analyze(**options) (its own fitter) on the items' matrices; {item: its row}."""
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import weightwatcher as ww

    ckpt = open_checkpoint(path)
    model = torch.nn.ModuleList()
    for i in items:
        W = ckpt.tensor(rows[i]["tensor"], torch.float32)
        layer = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
        layer.weight.data = W
        model.append(layer)
    ckpt.close()
    watcher = ww.WeightWatcher(model=model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        details = watcher.analyze(**(options or {}))
        seconds = time.perf_counter() - t0
    out = {}
    for rec in details.to_dict("records"):
        out[items[int(rec["longname"])]] = rec
    return seconds, out


def alpha_agreement(rows: list[dict], ww_rows: dict[int, dict]) -> dict:
    """|Δα| between our pl_alpha and WeightWatcher's alpha, overall and where both chose the same tail."""
    all_d, same_d = [], []
    for i, rec in ww_rows.items():
        a, b = rows[i].get("pl_alpha"), rec.get("alpha")
        if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
            continue
        d = abs(a - b)
        all_d.append(d)
        if int(rows[i].get("pl_n_tail", -1)) == int(rec.get("num_pl_spikes", -2)):
            same_d.append(d)
    return {
        "matched": len(all_d),
        "same_tail": len(same_d),
        "median_abs_dalpha_same_tail": statistics.median(same_d) if same_d else math.nan,
        "max_abs_dalpha_same_tail": max(same_d) if same_d else math.nan,
        "median_abs_dalpha_all": statistics.median(all_d) if all_d else math.nan,
    }


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------


def bert_ft_path() -> Path:
    from analysis.realmodels import rxnfp_checkpoints

    return rxnfp_checkpoints()["bert_ft"]


def generate_llama(folder: Path, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int,
                   vocab: int, seed: int = 0) -> Path:
    """A Llama-shaped bf16 checkpoint with heavy-tailed (Student-t, ν=3) matrices, like trained weights."""
    from analysis.model.families import family_config, weight_shapes
    from analysis.generate import write_checkpoint

    config = family_config("llama", hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
                           intermediate_size=intermediate, vocab_size=vocab, tie_word_embeddings=False,
                           dtype="bfloat16")
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in weight_shapes("llama", config).items():
        if len(shape) == 1:
            state[key] = torch.ones(shape, dtype=torch.bfloat16)
            continue
        z = torch.randn(shape, generator=gen)
        chi2 = torch.randn((3,) + tuple(shape), generator=gen).pow_(2).sum(0)  # χ²(3)
        state[key] = (z.mul_(0.02).div_(chi2.div_(3).sqrt_())).to(torch.bfloat16)
        del z, chi2
    return write_checkpoint(folder, "llama", dtype="bfloat16", state_dict=state, fmt="safetensors",
                            hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
                            intermediate_size=intermediate, vocab_size=vocab, tie_word_embeddings=False)


# ------------------------------------------------------------------------------------------------
# One model end to end
# ------------------------------------------------------------------------------------------------


def bench_model(name: str, path: Path, work: Path, ww_layers: int | None, skip_ww: bool,
                floor_all: bool = False, device: str = "cpu") -> dict:
    settings = SpectralSettings(device=device, dtype="float32")
    cache = Cache(work / f"cache-{name}")
    cache.clear()
    from analysis.spectral.spectra import spectral_metrics

    spectral_metrics(torch.randn(64, 200), settings)  # warm-up: lazy imports and first-call costs, untimed
    layouts = open_checkpoint(path)
    from analysis.model.architecture import layout_of

    layout = layout_of(layouts)
    layouts.close()
    # items are whole matrices, layer by layer, then the globals: the first K layers' items come first
    per_layer = [sum(1 for m in lay.modules if len(m.shape) == 2) for lay in layout.layers]
    n_items = sum(per_layer) + sum(1 for m in layout.globals if len(m.shape) == 2)
    k = len(per_layer) if ww_layers is None else min(ww_layers, len(per_layer))
    subset = list(range(n_items)) if ww_layers is None else list(range(sum(per_layer[:k])))
    floor_items = set(range(n_items)) if floor_all else set(subset)
    print(f"[{name}] cold scan, floor interleaved on {len(floor_items)} matrices …", flush=True)
    cold = timed_scan(path, cache, settings, instrument=True, floor_items=floor_items)
    print(f"[{name}] cold scan {cold.total:.1f} s, {len(cold.rows)} matrices, {len(cold.calls)} linalg calls; "
          f"floor {cold.floor_seconds:.1f} s", flush=True)
    print(f"[{name}] re-scan from the cache …", flush=True)
    warm = timed_scan(path, cache, settings, instrument=False)
    same = all(a.keys() == b.keys() for a, b in zip(cold.rows, warm.rows)) and len(cold.rows) == len(warm.rows)
    assert len(cold.rows) == n_items, (len(cold.rows), n_items)
    ww_items = subset
    floor_s, n_floor = cold.floor_seconds, cold.floor_calls
    ours_floor_items = sum(cold.item_seconds[i] for i in floor_items)
    scan_items_seconds = sum(cold.item_seconds)
    result = {
        "model": name,
        "matrices": len(cold.rows),
        "parameters": sum(r["rows"] * r["cols"] for r in cold.rows),
        "linalg_calls": len(cold.calls),
        "linalg_calls_by_routine": {k: sum(1 for c in cold.calls if c.name == k) for k in LINALG},
        "linalg_seconds_inside_scan": sum(c.seconds for c in cold.calls),
        "ours_cold_s": cold.total,
        "ours_items_s": scan_items_seconds,
        "floor_matrices": len(floor_items),
        "floor_s": floor_s,
        "floor_calls": n_floor,
        "ours_on_floor_matrices_s": ours_floor_items,
        "ours_over_floor": ours_floor_items / floor_s if floor_s else math.nan,
        "rescan_s": warm.total,
        "rescan_fraction": warm.total / cold.total,
        "rescan_rows_equal": same,
        "ww_layers": ww_layers,
    }
    if not skip_ww:
        ours_subset = sum(cold.item_seconds[i] for i in ww_items)
        result.update({"ww_matrices": len(ww_items), "ours_same_matrices_s": ours_subset})
        for label, options in WW_SETTINGS.items():
            print(f"[{name}] WeightWatcher analyze({options or ''}) on {len(ww_items)} matrices …", flush=True)
            ww_s, ww_rows = weightwatcher_run(path, cold.rows, ww_items, options)
            print(f"[{name}] WeightWatcher ({label}) {ww_s:.1f} s vs ours {ours_subset:.1f} s", flush=True)
            result.update({
                f"ww_{label}_analyzed": len(ww_rows),
                f"ww_{label}_s": ww_s,
                f"ww_{label}_over_ours": ww_s / ours_subset if ours_subset else math.nan,
                **{f"alpha_{label}_{k}": v for k, v in alpha_agreement(cold.rows, ww_rows).items()},
            })
    return result


def print_table(results: list[dict]) -> None:
    head = (f"{'model':<10} {'mats':>5} {'cold s':>8} {'rescan s':>8} {'rescan %':>8} | {'mats':>4} {'ours s*':>8} "
            f"{'floor s':>8} {'ours/floor':>10} | {'ww dflt s':>9} {'ratio':>6} {'ww equal s':>10} {'ratio':>6} "
            f"{'med|Δα|':>9} {'same/all':>9}")
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r['model']:<10} {r['matrices']:>5} {r['ours_cold_s']:>8.1f} {r['rescan_s']:>8.2f} "
              f"{100 * r['rescan_fraction']:>7.2f}% | {r['floor_matrices']:>4} {r['ours_on_floor_matrices_s']:>8.1f} "
              f"{r['floor_s']:>8.1f} {r['ours_over_floor']:>10.2f} | {r.get('ww_defaults_s', math.nan):>9.1f} "
              f"{r.get('ww_defaults_over_ours', math.nan):>6.2f} {r.get('ww_equal_s', math.nan):>10.1f} "
              f"{r.get('ww_equal_over_ours', math.nan):>6.2f} "
              f"{r.get('alpha_defaults_median_abs_dalpha_same_tail', math.nan):>9.2g} "
              f"{r.get('alpha_defaults_same_tail', 0):>4}/{r.get('alpha_defaults_matched', 0):<4}")
    print("cold/rescan: the whole model. Right of the first |: the matrices compared (with --ww-layers K, the first")
    print("K layers); ours s* = our cold-scan time on exactly those matrices (per-item progress timings);")
    print("ww dflt = WeightWatcher analyze() defaults (PL fit only); ww equal = analyze(randomize=True, mp_fit=True),")
    print("the null ESD and MP fit our rows also hold; ratio = WW time / ours on the same matrices;")
    print("med|Δα| = median |α_ours − α_WW| (defaults run) over matrices where both chose the same tail (same n_tail).")


# ------------------------------------------------------------------------------------------------
# Whole processes (--processes): our CLI vs a WeightWatcher process, both ratios per model
# ------------------------------------------------------------------------------------------------

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "DIFFRACT_TUI_THREADS": "1"}

# WeightWatcher's process: the same 2-D matrices read through our reader (the fastest load it could have: no
# transformers model build, a GGUF already dequantised) as nn.Linear layers, then analyze(**argv[2])
WW_SCRIPT = """
import json, logging, sys, warnings
import torch
torch.set_num_threads(1)
from analysis.io.checkpoint import open_checkpoint
warnings.simplefilter("ignore")
import weightwatcher as ww
logging.getLogger("weightwatcher").setLevel(logging.ERROR)
ckpt = open_checkpoint(sys.argv[1])
model = torch.nn.ModuleList()
for name in ckpt.keys():
    if len(ckpt.info(name).shape) == 2 and min(ckpt.info(name).shape) > 0:
        W = ckpt.tensor(name, torch.float32)
        layer = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
        layer.weight.data = W
        model.append(layer)
details = ww.WeightWatcher(model=model).analyze(**json.loads(sys.argv[2]))
print(len(details), file=sys.stderr)
"""

# WeightWatcher "as a user runs it": the model loaded the usual way with transformers (its own GGUF loader,
# which dequantises through the gguf package; rxnfp's pre-Auto BERT config as rxnfp loads it, a BertModel), then
# ww.WeightWatcher(model=model).analyze(**argv[2]) on whatever layers WeightWatcher picks in that model
WW_USER_SCRIPT = """
import json, logging, sys, warnings
from pathlib import Path
import torch
torch.set_num_threads(1)
warnings.simplefilter("ignore")
import transformers
transformers.logging.set_verbosity_error()
import weightwatcher as ww
logging.getLogger("weightwatcher").setLevel(logging.ERROR)
path = Path(sys.argv[1])
if path.suffix == ".gguf":
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
else:
    config = json.loads((path / "config.json").read_text())
    if "model_type" not in config:
        model = transformers.BertModel.from_pretrained(path)
    elif config.get("architectures", [""])[0].endswith("ForCausalLM"):
        model = transformers.AutoModelForCausalLM.from_pretrained(path)
    else:
        model = transformers.AutoModel.from_pretrained(path)
details = ww.WeightWatcher(model=model).analyze(**json.loads(sys.argv[2]))
print(len(details), file=sys.stderr)
"""

# (label, command maker, what it is compared with): ours `fit` vs WW defaults, ours `all` vs WW at equal settings
PROCESS_PAIRS = (("fit", "ww_defaults", {}), ("all", "ww_equal", WW_SETTINGS["equal"]))
USER = "ww_user_defaults"   # the as-a-user WeightWatcher process, at its defaults, compared with `fit`


def timed_process(cmd: list[str]) -> tuple[float, float, int | None]:
    """(wall s, CPU s = user + sys, the count a WeightWatcher child prints last on stderr) of one `nice`d child
    process with one compute thread: on a shared machine the CPU time is the steadier figure (the wall time also
    counts the other tenants' share of the cores)."""
    import resource
    import subprocess

    env = {**os.environ, **ONE_THREAD, "PYTHONPATH": str(REPO)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(["nice", *cmd], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-1500:]}")
    last = done.stderr.strip().splitlines()[-1:] or [""]
    return (wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            int(last[0]) if last[0].isdigit() else None)


def our_scan_cmd(path: Path, metrics: str, out: Path) -> list[str]:
    """Our whole process: the CLI, no cache, no progress bar, one thread, on the CPU."""
    return [sys.executable, "-m", "diffract_tui", "scan", str(path), "--metrics", metrics, "--no-cache", "--quiet",
            "--threads", "1", "--device", "cpu", "--out", str(out)]


def process_models(work: Path, args: argparse.Namespace) -> dict[str, Path]:
    """The --processes models: rxnfp bert_pretrained, the SmolLM2-135M GGUF (when installed), a generated Llama."""
    from analysis.realmodels import rxnfp_checkpoints

    sys.path.insert(0, str(REPO / "tests"))
    from gguf_models import real_gguf

    out: dict[str, Path] = {}
    if not args.skip_bert:
        out["rxnfp bert_pretrained"] = rxnfp_checkpoints()["bert_pretrained"]
    gguf = real_gguf()
    if gguf is not None and not args.skip_smollm2:
        out["SmolLM2-135M Q4_1 GGUF"] = gguf
    if not args.skip_llama:
        n = args.proc_llama_layers
        t0 = time.perf_counter()
        out[f"Llama {n} L × {args.hidden}, ff {args.intermediate}, vocab {args.vocab}"] = generate_llama(
            work / "llama", n, args.hidden, args.intermediate, args.heads, args.kv_heads, args.vocab)
        print(f"[llama] generated {n} layers in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def bench_processes(args: argparse.Namespace) -> int:
    """Both whole-process ratios per model, rounds interleaved (ours, then WW, per pair), medians of CPU time."""
    work = Path(tempfile.mkdtemp(prefix="diffract-bench-", dir=args.workdir))
    results: dict[str, dict] = {}
    pairs = PROCESS_PAIRS[:1] if args.skip_equal else PROCESS_PAIRS
    load = os.getloadavg()
    print(f"whole processes, one thread, {args.rounds} round(s); load average {load[0]:.1f} {load[1]:.1f} "
          f"{load[2]:.1f}", flush=True)
    try:
        for label, path in process_models(work, args).items():
            cpu: dict[str, list[float]] = {}
            wall: dict[str, list[float]] = {}
            counts: dict[str, int] = {}
            for _ in range(args.rounds):
                for ours, theirs, options in pairs:
                    runs = [(ours, our_scan_cmd(path, ours, work / f"{ours}.csv")),
                            (theirs, [sys.executable, "-c", WW_SCRIPT, str(path), json.dumps(options)])]
                    if ours == "fit" and not args.skip_ww_user:
                        runs.append((USER, [sys.executable, "-c", WW_USER_SCRIPT, str(path), json.dumps(options)]))
                    for key, cmd in runs:
                        w, c, n = timed_process(cmd)
                        wall.setdefault(key, []).append(w)
                        cpu.setdefault(key, []).append(c)
                        if n is not None:
                            counts[key] = n
                        print(f"  [{label}] {key}: {c:.1f} s CPU, {w:.1f} s wall", flush=True)
            med = {k: statistics.median(v) for k, v in cpu.items()}
            row = {"cpu": cpu, "wall": wall, "median_cpu": med, "ww_layers_analysed": counts,
                   "load_after": os.getloadavg()}
            compared = [(ours, theirs) for ours, theirs, _ in pairs]
            if USER in med:
                compared.insert(1, ("fit", USER))
            for ours, theirs in compared:
                row[f"{theirs}_over_{ours}"] = med[theirs] / med[ours]
            results[label] = row
            names = {"ww_defaults": "WW defaults (favourable: our reader, nn.Linear)",
                     USER: "WW defaults as a user (transformers from_pretrained)", "ww_equal": "WW equal settings"}
            ratios = ", ".join(f"{names[theirs]} / {ours} {row[f'{theirs}_over_{ours}']:.2f}×" for ours, theirs in compared)
            print(f"{label}: CPU s " + ", ".join(f"{k} {v:.1f}" for k, v in med.items()) + f" → {ratios}; "
                  f"WW layers analysed {counts}", flush=True)
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"load_before": load, "results": results}, indent=1) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nwrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", action="store_true",
                   help="whole processes: scan --metrics fit vs WW defaults and scan (all) vs WW equal settings")
    p.add_argument("--rounds", type=int, default=1, help="--processes: interleaved rounds (median)")
    p.add_argument("--skip-equal", action="store_true", help="--processes: only fit vs WW defaults")
    p.add_argument("--skip-ww-user", action="store_true",
                   help="--processes: not the as-a-user WeightWatcher process (transformers from_pretrained)")
    p.add_argument("--skip-smollm2", action="store_true", help="--processes: not the SmolLM2 GGUF")
    p.add_argument("--proc-llama-layers", type=int, default=2,
                   help="--processes: layers of the generated Llama (default 2 of the 1B's 16: WW at equal "
                        "settings takes ~25 s per 2048 × 5632 matrix)")
    p.add_argument("--quick", action="store_true", help="small generated model only (smoke run, < 1 min)")
    p.add_argument("--skip-bert", action="store_true")
    p.add_argument("--skip-llama", action="store_true")
    p.add_argument("--skip-ww", action="store_true", help="no WeightWatcher comparison")
    p.add_argument("--layers", type=int, default=16, help="generated model layers (default 16)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--ww-layers", type=int, default=4,
                   help="compare with WeightWatcher on the first K layers of the generated model (0 = all)")
    p.add_argument("--floor-all", action="store_true",
                   help="measure the floor on every matrix (default: on the matrices compared with WeightWatcher)")
    p.add_argument("--device", default="cpu",
                   help="where our scan and the floor run: cpu (default; one thread), cuda or cuda:N on a GPU box "
                        "(WeightWatcher then uses the GPU too, as it does whenever torch sees CUDA)")
    p.add_argument("--workdir", type=Path, default=None, help="where to write the generated model and caches")
    p.add_argument("--json", type=Path, default=None,
                   help="results file (default benchmarks/out/scan_vs_weightwatcher[_processes].json)")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.intermediate, args.vocab, args.heads, args.kv_heads = 2, 256, 704, 1000, 4, 4
        args.skip_bert, args.skip_smollm2, args.ww_layers, args.proc_llama_layers = True, True, 0, 2
    if args.json is None:
        suffix = "_processes" if args.processes else ""
        args.json = REPO / "benchmarks" / "out" / f"scan_vs_weightwatcher{suffix}.json"
    if args.processes:
        return bench_processes(args)

    from analysis.spectral.backend import resolve_device
    from analysis.errors import DiffractError

    try:
        device = resolve_device(args.device)
    except DiffractError as err:
        print(f"scan_vs_weightwatcher: error: {err}", file=sys.stderr)
        return 1
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    work = Path(tempfile.mkdtemp(prefix="diffract-bench-", dir=args.workdir))
    results = []
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {device} (GPU {gpu}), "
          f"workdir {work}", flush=True)
    try:
        if not args.skip_bert:
            results.append(bench_model("bert_ft", bert_ft_path(), work, None, args.skip_ww, device=args.device))
        if not args.skip_llama:
            t0 = time.perf_counter()
            path = generate_llama(work / "llama", args.layers, args.hidden, args.intermediate, args.heads,
                                  args.kv_heads, args.vocab)
            print(f"[llama] generated {args.layers}×{args.hidden} (ff {args.intermediate}) in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
            name = f"llama-{args.layers}L"
            results.append(bench_model(name, path, work, args.ww_layers or None, args.skip_ww, args.floor_all,
                                       device=args.device))
            shutil.rmtree(work / "llama", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print_table(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                                     "device": str(device), "gpu": gpu,
                                     "results": results}, indent=1, default=str) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

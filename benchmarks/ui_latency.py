"""Key-press-to-frame latency of the explorer while "compute all" runs, measured in a real pty (tmux).

The app runs in a detached 80×24 tmux session on a generated base + 2 CPT family. After the scan starts
(`a`), the script presses `j` repeatedly inside an expanded list of heads and, for each press, polls
`tmux capture-pane` until the screen changes: press → visible frame. The same is measured with the app
idle, and with a bare Textual tree (the floor of this harness: tmux polling + Textual's frame pacing). Prints median / p95 / max in milliseconds and whether the scan was still running.

    python benchmarks/ui_latency.py [--presses 40] [--hidden 512] [--layers 8]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SESSION = "diffract-latency"


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], check=True, capture_output=True, text=True).stdout


def capture() -> str:
    return tmux("capture-pane", "-p", "-t", SESSION)


def wait_for(predicate, timeout: float = 60.0, poll: float = 0.05) -> str:
    """Poll the screen until predicate(screen) is true; returns that screen."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        screen = capture()
        if predicate(screen):
            return screen
        time.sleep(poll)
    raise TimeoutError(f"screen never matched; last:\n{capture()}")


def press_and_time(key: str, timeout: float = 10.0) -> float:
    """Seconds from sending `key` to the first screen that differs from the one before it."""
    before = capture()
    t0 = time.perf_counter()
    tmux("send-keys", "-t", SESSION, key)
    end = t0 + timeout
    while time.perf_counter() < end:
        if capture() != before:
            return time.perf_counter() - t0
    raise TimeoutError(f"no frame within {timeout} s after {key!r}")


def make_family(root: Path, hidden: int, layers: int) -> list[Path]:
    """A llama base and two CPT checkpoints (base + small seeded updates)."""
    import torch

    from analysis.generate import random_state_dict, write_checkpoint
    from analysis.model.families import family_config

    overrides = dict(hidden_size=hidden, num_layers=layers, num_heads=max(4, hidden // 64),
                     num_kv_heads=max(2, hidden // 128), intermediate_size=hidden * 2, vocab_size=512)
    config = family_config("llama", **overrides)
    base = random_state_dict("llama", config, seed=0)
    paths = [write_checkpoint(root / "base", "llama", state_dict=base, **overrides)]
    for seed, name in ((1, "chem"), (2, "code")):
        g = torch.Generator().manual_seed(seed)
        sd = {k: v + 0.01 * v.std() * torch.randn(v.shape, generator=g) if v.dim() == 2 else v
              for k, v in base.items()}
        paths.append(write_checkpoint(root / name, "llama", state_dict=sd, **overrides))
    return paths


def run_baseline_app() -> None:
    """A bare Textual tree whose label shows the highlighted node: the harness's floor (tmux + Textual)."""
    from textual.app import App, ComposeResult
    from textual.widgets import Label, Tree

    class Baseline(App):
        def compose(self) -> ComposeResult:
            tree: Tree[None] = Tree("root")
            for i in range(40):
                tree.root.add_leaf(f"node {i}")
            tree.root.expand()
            yield Label("-", id="where")
            yield tree

        def on_tree_node_highlighted(self, event: Tree.NodeHighlighted) -> None:
            self.query_one("#where", Label).update(str(event.node.label))

    Baseline().run()


def measure_baseline(presses: int, gap: float) -> dict[str, float]:
    """Latency of the bare Textual tree under the same harness (what no app can beat here)."""
    subprocess.run(["tmux", "kill-session", "-t", SESSION], capture_output=True)
    tmux("new-session", "-d", "-s", SESSION, "-x", "80", "-y", "24",
         f"{shlex.quote(sys.executable)} {shlex.quote(__file__)} --baseline-app")
    try:
        wait_for(lambda s: "node 3" in s, timeout=30)
        tmux("send-keys", "-t", SESSION, "Down")
        time.sleep(0.5)
        samples = []
        for i in range(presses):
            samples.append(press_and_time("Down" if i % 2 == 0 else "Up"))
            time.sleep(gap)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", SESSION], capture_output=True)
    return summary(samples)


def summary(samples: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in samples)
    p95 = ms[min(len(ms) - 1, int(round(0.95 * (len(ms) - 1))))]
    return {"n": len(ms), "median_ms": round(statistics.median(ms), 1), "p95_ms": round(p95, 1),
            "max_ms": round(ms[-1], 1)}


def run_presses(n: int, gap: float) -> list[float]:
    """Alternate j/k so the cursor stays inside the expanded head list; one sample per press."""
    out = []
    for i in range(n):
        out.append(press_and_time("j" if i % 2 == 0 else "k"))
        time.sleep(gap)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presses", type=int, default=40)
    ap.add_argument("--gap", type=float, default=0.15, help="seconds between presses")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--baseline-app", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.baseline_app:
        run_baseline_app()
        return 0
    baseline = measure_baseline(args.presses // 2, args.gap)

    with tempfile.TemporaryDirectory(prefix="diffract-latency-") as tmp:
        root = Path(tmp)
        paths = make_family(root, args.hidden, args.layers)
        cache = root / "cache"
        exe = Path(sys.executable).with_name("diffract-tui")
        cmd = " ".join(shlex.quote(str(x)) for x in [exe, *paths, "--cache-dir", cache, "--device", "cpu"])
        env = "OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TERM=xterm-256color"
        subprocess.run(["tmux", "kill-session", "-t", SESSION], capture_output=True)
        tmux("new-session", "-d", "-s", SESSION, "-x", "80", "-y", "24", f"env {env} {cmd}")
        try:
            wait_for(lambda s: "1 Spectrum" in s, timeout=60)
            # into layer 0's q heads: ] (L0), l (expand), l (q), l (expand), l (h0)
            for key in ("]", "l", "l", "l", "l"):
                tmux("send-keys", "-t", SESSION, key)
                time.sleep(0.3)
            wait_for(lambda s: "L0 q h0" in s)
            time.sleep(1.0)
            idle = run_presses(args.presses // 2, args.gap)
            tmux("send-keys", "-t", SESSION, "a")
            wait_for(lambda s: "compute all" in s, timeout=30)
            busy = run_presses(args.presses, args.gap)
            still_running = "compute all" in capture()
        finally:
            subprocess.run(["tmux", "send-keys", "-t", SESSION, "Escape"], capture_output=True)
            time.sleep(0.3)
            subprocess.run(["tmux", "kill-session", "-t", SESSION], capture_output=True)
    report = {"terminal": "tmux 80x24", "model": f"llama hidden {args.hidden}, {args.layers} layers, 3 checkpoints",
              "bare_textual_tree_baseline": baseline, "no_scan": summary(idle), "during_compute_all": summary(busy),
              "scan_still_running_at_end": still_running, "cpus": os.cpu_count()}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

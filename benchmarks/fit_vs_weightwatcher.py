"""Whole processes: `diffract-tui scan --metrics fit` vs WeightWatcher `analyze()` at its defaults, on rxnfp
`bert_pretrained` and SmolLM2-135M (GGUF), one thread, no cache, rounds interleaved, medians; two WeightWatcher
processes, the favourable one (our reader, nn.Linear layers) and as a user runs it (transformers from_pretrained).

Kept as the short form of `scan_vs_weightwatcher.py --processes --skip-llama --skip-equal`, where the code lives
(that script also compares `scan` (all) with `analyze(randomize=True, mp_fit=True)` and a generated Llama).

    python benchmarks/fit_vs_weightwatcher.py [--rounds 3] [--json benchmarks/out/fit_vs_weightwatcher.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scan_vs_weightwatcher  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path, default=scan_vs_weightwatcher.REPO / "benchmarks" / "out"
                   / "fit_vs_weightwatcher.json")
    args = p.parse_args(argv)
    return scan_vs_weightwatcher.main(["--processes", "--skip-llama", "--skip-equal", "--rounds", str(args.rounds),
                                       "--json", str(args.json)])


if __name__ == "__main__":
    sys.exit(main())

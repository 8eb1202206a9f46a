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

"""Forward-pass truth for rewind (SPEC §2, §6): after rewinding head h, the model's own attention computes
head h's context (the input to o_proj / c_proj, per head) and its contribution through the output
projection exactly as the base does, and every other head exactly as the target does — on the same input.

Tiny models built with transformers (test-only dependency), eager attention, float32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from analysis.io.checkpoint import open_checkpoint  # noqa: E402
from analysis.edit.rewind import apply_rewind, plan_rewind  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-6)


def _perturbed_copy(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    import copy

    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return other


def _build(kind: str, tmp_path: Path):
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                                       max_position_embeddings=32, tie_word_embeddings=False)
        cls = transformers.LlamaForCausalLM
    else:
        cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                      bos_token_id=0, eos_token_id=0)
        cls = transformers.GPT2LMHeadModel
    cfg._attn_implementation = "eager"
    base = cls(cfg).eval()
    target = _perturbed_copy(base, 1).eval()
    base.save_pretrained(tmp_path / "base")
    target.save_pretrained(tmp_path / "target")
    return cls


def _attn(model, kind: str, layer: int):
    if kind == "llama":
        a = model.model.layers[layer].self_attn
        return a, a.o_proj
    a = model.transformer.h[layer].attn
    return a, a.c_proj


def _contexts(models: dict, kind: str, layer: int, ids: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per model: (input to the output projection, its weight as (D × H·d_h)) for the SAME attention input —
    the one the rewound model's layer receives."""
    captured: dict[str, object] = {}
    attn, _ = _attn(models["rewound"], kind, layer)

    def grab(module, args, kwargs):
        captured["args"], captured["kwargs"] = args, dict(kwargs)

    h = attn.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        models["rewound"](ids, use_cache=False)
    h.remove()
    out = {}
    for name, model in models.items():
        a, proj = _attn(model, kind, layer)
        seen = {}
        hk = proj.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].detach().clone()))
        with torch.no_grad():
            a(*captured["args"], **captured["kwargs"])
        hk.remove()
        W = proj.weight.detach() if kind == "llama" else proj.weight.detach().T  # gpt2 Conv1D stores (in × out)
        out[name] = (seen["x"], W)
    return out


@pytest.mark.parametrize("kind,layer,heads,policy", [
    ("llama", 1, [(1, 2), (1, 3)], "group"),   # head 2 with its whole kv group {2, 3}
    ("gpt2", 1, [(1, 1)], "group"),            # MHA: a group is one head
    ("gpt2", 0, [(0, 0), (0, 3)], "group"),
])
def test_rewound_heads_compute_like_base_others_like_target(tmp_path, kind, layer, heads, policy):
    cls = _build(kind, tmp_path)
    rl = plan_rewind(open_checkpoint(tmp_path / "base"), open_checkpoint(tmp_path / "target"), pattern="manual",
                     heads=heads, gqa_policy=policy)
    assert all(e.projections == ("q", "k", "v", "o") for e in rl.heads)
    apply_rewind(rl, tmp_path / "out")
    models = {n: cls.from_pretrained(tmp_path / n, attn_implementation="eager").eval()
              for n in ("base", "target", "out")}
    models["rewound"] = models.pop("out")
    ids = torch.tensor([[3, 17, 5, 42, 8, 1, 60, 9]])
    ctx = _contexts(models, kind, layer, ids)
    dh = 8
    rewound = {h for l, h in heads if l == layer}
    for h in range(4):
        cols = slice(h * dh, (h + 1) * dh)
        src = "base" if h in rewound else "target"
        other = "target" if h in rewound else "base"
        x_r, W_r = ctx["rewound"]
        x_s, W_s = ctx[src]
        x_o, _ = ctx[other]
        torch.testing.assert_close(x_r[..., cols], x_s[..., cols], **TOL)
        assert not torch.allclose(x_r[..., cols], x_o[..., cols], atol=1e-3)  # the two models really differ
        contrib_r = x_r[..., cols] @ W_r[:, cols].T
        contrib_s = x_s[..., cols] @ W_s[:, cols].T
        torch.testing.assert_close(contrib_r, contrib_s, **TOL)


def test_llama_any_policy_changes_group_partner(tmp_path):
    """`any` rewinds head 2's kv group for head 2 alone: head 2 becomes the base's, heads 0 and 1 (the other
    group) stay the target's, and head 3 (same group, target q) matches neither."""
    cls = _build("llama", tmp_path)
    rl = plan_rewind(open_checkpoint(tmp_path / "base"), open_checkpoint(tmp_path / "target"), pattern="manual",
                     heads=[(1, 2)], gqa_policy="any")
    apply_rewind(rl, tmp_path / "out")
    models = {n: cls.from_pretrained(tmp_path / n, attn_implementation="eager").eval()
              for n in ("base", "target", "out")}
    models["rewound"] = models.pop("out")
    ctx = _contexts(models, "llama", 1, torch.tensor([[3, 17, 5, 42, 8, 1]]))
    x = {n: v[0] for n, v in ctx.items()}
    c = lambda h: slice(h * 8, (h + 1) * 8)  # noqa: E731
    torch.testing.assert_close(x["rewound"][..., c(2)], x["base"][..., c(2)], **TOL)
    for h in (0, 1):
        torch.testing.assert_close(x["rewound"][..., c(h)], x["target"][..., c(h)], **TOL)
    assert not torch.allclose(x["rewound"][..., c(3)], x["target"][..., c(3)], atol=1e-3)
    assert not torch.allclose(x["rewound"][..., c(3)], x["base"][..., c(3)], atol=1e-3)

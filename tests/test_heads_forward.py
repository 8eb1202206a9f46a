"""SPEC §2's truth for head slices: the model's own forward pass (transformers, eager attention).

For every family: a tiny random transformers model is saved with save_pretrained, opened with
open_checkpoint + layout_of, and each head's slots (head_slots) are perturbed in the live model.
Oracles: the per-head context (the o-projection's input, viewed as (T, H, d_h)) and o's output.
- zeroing q slot of head h changes head h's context and no other head's;
- zeroing k (or v) slot of kv head g changes exactly the query heads of group g (GQA);
- zeroing v makes those heads' contexts exactly 0 (tells v from q/k);
- zeroing o columns of head h lowers o's output by exactly ctx_h · head_slice(o, h)ᵀ;
- the slots of all heads partition the stored axis; head_slice/projection_heads read the same values.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from analysis.model.architecture import layout_of  # noqa: E402
from analysis.io.checkpoint import open_checkpoint  # noqa: E402
from analysis.model.families import family_config  # noqa: E402
from analysis.model.heads import head_slice, head_slots, projection_heads  # noqa: E402

# (family, config overrides, note)
CASES = [
    ("llama", {}),                       # GQA 4 query heads / 2 kv heads
    ("mistral", {}),
    ("qwen2", {}),                       # q/k/v biases
    ("qwen3", {}),                       # explicit head_dim 32 ≠ 64/4, per-head q_norm/k_norm
    ("olmo", {}),
    ("olmo2", {}),                       # q_norm over all heads: perturb q/k by an in-head permutation
    ("gemma", {}),                       # head_dim 32 ≠ 64/4
    ("gemma2", {}),
    ("gemma3", {}),
    ("phi3", {}),                        # fused qkv_proj [q; k; v], GQA
    ("gpt2", {}),                        # Conv1D c_attn stored in × out
    ("gpt_neox", {}),                    # fused query_key_value, interleaved per head
    ("bert", {}),
    ("roberta", {}),                     # BERT attention, RobertaModel
    ("xlm-roberta", {}),
]
INPUT_IDS = torch.tensor([[3, 17, 42, 5, 99, 7, 64]])
LAYER = 1  # the last of two layers: checks layer indexing too


class Probe:
    """A tiny model, its saved checkpoint and layout, and a hook on one layer's o-projection."""

    def __init__(self, family: str, overrides: dict, folder):
        cfg = dict(family_config(family, hidden_size=64, num_layers=2, num_heads=4, **overrides))
        model_type = cfg.pop("model_type")
        cfg.pop("architectures")
        config = transformers.AutoConfig.for_model(model_type, **cfg)
        config._attn_implementation = "eager"
        torch.manual_seed(0)
        auto = transformers.AutoModel if family in ("bert", "roberta", "xlm-roberta") else transformers.AutoModelForCausalLM
        self.model = auto.from_config(config, attn_implementation="eager").eval()
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # large, non-zero weights and biases so every slot visibly matters
            for name, p in self.model.named_parameters():
                if p.dim() >= 2:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
                elif name.endswith(".bias"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.model.save_pretrained(folder)
        self.ckpt = open_checkpoint(folder)
        self.layout = layout_of(self.ckpt)
        self.params = dict(self.model.named_parameters())
        self.original = {k: v.detach().clone() for k, v in self.params.items()}
        o_raw = self.ckpt.info(self.layout.attention[LAYER].o.tensor).raw_name
        self.o_module = self.model.get_submodule(o_raw.rsplit(".", 1)[0])
        self.o_module.register_forward_hook(self._hook)
        self.family = family

    def _hook(self, module, args, output):
        self._ctx, self._out = args[0].detach().clone(), output.detach().clone()

    def run(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(context (T, H, d_h), o output (T, D)) at LAYER."""
        with torch.no_grad():
            self.model(input_ids=INPUT_IDS)
        L = self.layout
        return self._ctx[0].reshape(-1, L.num_heads, L.head_dim), self._out[0]

    def restore(self) -> None:
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(self.original[k])

    def apply(self, slots, fn) -> None:
        """Replace each slot's stored values v by fn(v) in the live model."""
        with torch.no_grad():
            for s in slots:
                p = self.params[self.ckpt.info(s.tensor).raw_name]
                p.index_copy_(s.axis, s.index, fn(p.index_select(s.axis, s.index)))

    def perturb(self, proj: str, head: int) -> None:
        """Zero a head's weights and biases — or, for olmo2's cross-head q/k norm, permute them in-head."""
        L = self.layout
        slots = head_slots(L, LAYER, proj, head) + head_slots(L, LAYER, proj, head, bias=True)
        if self.family == "olmo2" and proj in ("q", "k"):
            # RMSNorm over all heads' q (k): a permutation inside head h keeps every token's norm.
            self.apply(slots, lambda v: v.flip(0 if v.dim() == 1 else slots[0].axis))
        else:
            self.apply(slots, torch.zeros_like)


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def probe(request, tmp_path_factory):
    family, overrides = request.param
    torch.set_num_threads(1)
    p = Probe(family, overrides, tmp_path_factory.mktemp(family))
    yield p
    p.ckpt.close()


def _changed_heads(before: torch.Tensor, after: torch.Tensor) -> set[int]:
    scale = before.abs().max().item()
    diff = (before - after).abs().amax(dim=(0, 2))
    for h, d in enumerate(diff.tolist()):
        assert d < 1e-5 * scale or d > 1e-3 * scale, f"head {h}: ambiguous change {d:.2e} (scale {scale:.2e})"
    return {h for h, d in enumerate(diff.tolist()) if d > 1e-3 * scale}


def test_layout_geometry(probe):
    """Layout numbers equal the transformers config the model was built from."""
    L, cfg = probe.layout, probe.model.config
    H = cfg.num_attention_heads
    assert (L.num_layers, L.num_heads) == (2, 4) and L.heads_available
    assert L.num_kv_heads == (getattr(cfg, "num_key_value_heads", None) or H)
    expected_dh = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    assert L.head_dim == expected_dh
    if probe.family in ("qwen3", "gemma", "gemma2", "gemma3"):
        assert L.head_dim == 32 != L.hidden_size // L.num_heads  # explicit head_dim ≠ D/H


def test_zeroing_q_changes_only_that_head(probe):
    base_ctx, _ = probe.run()
    for h in range(probe.layout.num_heads):
        probe.perturb("q", h)
        ctx, _ = probe.run()
        probe.restore()
        assert _changed_heads(base_ctx, ctx) == {h}, f"{probe.family} q head {h}"


@pytest.mark.parametrize("proj", ["k", "v"])
def test_zeroing_kv_changes_exactly_its_group(probe, proj):
    L = probe.layout
    base_ctx, _ = probe.run()
    for g in range(L.num_kv_heads):
        probe.perturb(proj, g)
        ctx, _ = probe.run()
        probe.restore()
        group = set(L.query_heads_of(g))
        assert group == {h for h in range(L.num_heads) if L.kv_group(h) == g}
        assert _changed_heads(base_ctx, ctx) == group, f"{probe.family} {proj} kv head {g}"
        if proj == "v":  # zero values (and value bias) → the group's contexts are exactly zero
            assert ctx[:, sorted(group)].abs().max().item() < 1e-6


def test_gqa_groups_are_contiguous():
    """HF repeat_kv: query head h reads kv head h // (H/H_kv)."""
    from analysis.model.architecture import detect_layout
    from analysis.model.families import weight_shapes
    from analysis.io.checkpoint import normalise_key

    cfg = family_config("llama", hidden_size=128, num_heads=8, num_kv_heads=2)
    L = detect_layout(cfg, {normalise_key(k): s for k, s in weight_shapes("llama", cfg).items()})
    assert [L.kv_group(h) for h in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert list(L.query_heads_of(1)) == [4, 5, 6, 7]


def test_q_bias_and_k_bias_tell_q_from_k(probe):
    """Shifting one bias entry: in q it changes head h's scores; in k it is softmax-invariant where the
    entry is not rotated (no RoPE: bert, gpt2; last dim beyond gpt_neox's rotary 25 %)."""
    L = probe.layout
    if probe.family not in ("bert", "roberta", "xlm-roberta", "gpt2", "gpt_neox"):
        # q and k live in their own tensors, or (phi3) GQA tells them apart in the kv-group test
        q, k = L.attention[LAYER].q.tensor, L.attention[LAYER].k.tensor
        assert (q.endswith("q_proj.weight") and k.endswith("k_proj.weight")) or L.num_kv_heads < L.num_heads
        return
    base_ctx, _ = probe.run()
    h = 1
    for proj, expected in (("q", {h}), ("k", set())):
        (slot,) = head_slots(L, LAYER, proj, h, bias=True)
        last = slot.index[-1:]
        p = probe.params[probe.ckpt.info(slot.tensor).raw_name]
        with torch.no_grad():
            p[last] += 5.0
        ctx, _ = probe.run()
        probe.restore()
        assert _changed_heads(base_ctx, ctx) == expected, f"{probe.family} {proj} bias"


def test_zeroing_o_columns_removes_exactly_that_heads_contribution(probe):
    L = probe.layout
    base_ctx, base_out = probe.run()
    for h in range(L.num_heads):
        o_h = head_slice(probe.ckpt, L, LAYER, "o", h)                        # (D, d_h) from the file
        assert o_h.shape == (L.hidden_size, L.head_dim)
        probe.perturb("o", h)
        ctx, out = probe.run()
        probe.restore()
        assert torch.equal(ctx, base_ctx)                                     # o does not feed back within the layer
        expected = base_out - base_ctx[:, h] @ o_h.T
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * base_out.abs().max().item())


def test_slots_partition_the_stored_tensors(probe):
    """All heads' q/k/v slots cover the projection rows once; o slots cover o's input side once."""
    L = probe.layout
    att = L.attention[LAYER]
    seen: dict[str, list[int]] = {}
    for proj in ("q", "k", "v", "o"):
        n = L.num_heads if proj in ("q", "o") else L.num_kv_heads
        for h in range(n):
            for s in head_slots(L, LAYER, proj, h):
                assert s.index.dtype == torch.int64 and len(s.index) == L.head_dim
                seen.setdefault(f"{s.tensor}@{s.axis}", []).extend(s.index.tolist())
    for key, idx in seen.items():
        tensor, axis = key.split("@")
        size = probe.ckpt.info(tensor).shape[int(axis)]
        assert sorted(idx) == list(range(size)), key
    assert att.q.tensor == att.k.tensor or att.q.tensor.endswith(("q_proj.weight", "query.weight"))


def test_readers_match_the_slots_in_the_live_model(probe):
    """head_slice / projection_heads from the saved file equal the model's parameters at the slots."""
    L = probe.layout
    for proj in ("q", "k", "v", "o"):
        stacked = projection_heads(probe.ckpt, L, LAYER, proj)
        n = L.num_heads if proj in ("q", "o") else L.num_kv_heads
        assert stacked.shape == ((n, L.head_dim, L.hidden_size) if proj != "o" else (n, L.hidden_size, L.head_dim))
        for h in range(n):
            (s,) = head_slots(L, LAYER, proj, h)
            sub = probe.params[probe.ckpt.info(s.tensor).raw_name].detach().index_select(s.axis, s.index)
            expected = sub.T if s.transpose else sub       # (d_h × D) rows for q/k/v, (D × d_h) columns for o
            assert torch.equal(stacked[h], expected), f"{probe.family} {proj} head {h}"
            assert torch.equal(head_slice(probe.ckpt, L, LAYER, proj, h), expected)

"""Layout detection (SPEC §2): family numbers and trees, the real rxnfp BERT trio, LayoutError
messages for configs that contradict the tensors, and the unknown-architecture fallback."""

from __future__ import annotations

import json

import pytest
import torch

from analysis.model.architecture import detect_layout, layout_of
from analysis.io.checkpoint import normalise_key, open_checkpoint
from analysis.errors import DiffractError, LayoutError
from analysis.model.families import FAMILIES, family_config, weight_shapes
from analysis.generate import write_checkpoint
from analysis.model.heads import head_slots, module_matrix


def shapes_of(family: str, cfg: dict) -> dict[str, tuple[int, ...]]:
    return {normalise_key(k): s for k, s in weight_shapes(family, cfg).items()}


def layout_for(family: str, **overrides):
    cfg = family_config(family, **overrides)
    return detect_layout(cfg, shapes_of(family, cfg)), cfg


# family → (model_type, style, H_kv, head_dim, layer module names) with hidden 64, 4 heads, 2 layers
EXPECTED = {
    "llama": ("llama", "separate", 2, 16, ["q", "k", "v", "o", "gate", "up", "down",
                                           "input_layernorm", "post_attention_layernorm"]),
    "mistral": ("mistral", "separate", 2, 16, ["q", "k", "v", "o", "gate", "up", "down",
                                               "input_layernorm", "post_attention_layernorm"]),
    "qwen2": ("qwen2", "separate", 2, 16, ["q", "k", "v", "o", "gate", "up", "down",
                                           "input_layernorm", "post_attention_layernorm"]),
    "qwen3": ("qwen3", "separate", 2, 32, ["q", "k", "v", "o", "gate", "up", "down", "self_attn.q_norm",
                                           "self_attn.k_norm", "input_layernorm", "post_attention_layernorm"]),
    "olmo": ("olmo", "separate", 2, 16, ["q", "k", "v", "o", "gate", "up", "down"]),
    "olmo2": ("olmo2", "separate", 2, 16, ["q", "k", "v", "o", "gate", "up", "down", "self_attn.q_norm",
                                           "self_attn.k_norm", "post_attention_layernorm",
                                           "post_feedforward_layernorm"]),
    "gemma": ("gemma", "separate", 2, 32, ["q", "k", "v", "o", "gate", "up", "down",
                                           "input_layernorm", "post_attention_layernorm"]),
    "gemma2": ("gemma2", "separate", 2, 32, ["q", "k", "v", "o", "gate", "up", "down", "input_layernorm",
                                             "post_attention_layernorm", "pre_feedforward_layernorm",
                                             "post_feedforward_layernorm"]),
    "gemma3": ("gemma3_text", "separate", 2, 32, ["q", "k", "v", "o", "gate", "up", "down", "self_attn.q_norm",
                                                  "self_attn.k_norm", "input_layernorm", "post_attention_layernorm",
                                                  "pre_feedforward_layernorm", "post_feedforward_layernorm"]),
    "phi3": ("phi3", "phi3_fused", 2, 16, ["qkv", "q", "k", "v", "o", "gate_up", "gate", "up", "down",
                                           "input_layernorm", "post_attention_layernorm"]),
    "gpt2": ("gpt2", "gpt2_conv1d", 4, 16, ["qkv", "q", "k", "v", "o", "fc_in", "fc_out", "ln_1", "ln_2"]),
    "gpt_neox": ("gpt_neox", "neox_fused", 4, 16, ["qkv", "q", "k", "v", "o", "fc_in", "fc_out",
                                                   "input_layernorm", "post_attention_layernorm"]),
    "bert": ("bert", "bert", 4, 16, ["q", "k", "v", "o", "fc_in", "fc_out", "attention.output.LayerNorm",
                                     "output.LayerNorm"]),
    "roberta": ("roberta", "bert", 4, 16, ["q", "k", "v", "o", "fc_in", "fc_out", "attention.output.LayerNorm",
                                           "output.LayerNorm"]),
    "xlm-roberta": ("xlm-roberta", "bert", 4, 16, ["q", "k", "v", "o", "fc_in", "fc_out",
                                                   "attention.output.LayerNorm", "output.LayerNorm"]),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_family_layout_numbers_and_tree(family):
    L, cfg = layout_for(family)
    model_type, style, kv, dh, names = EXPECTED[family]
    assert (L.model_type, L.style, L.num_layers, L.num_heads, L.num_kv_heads, L.head_dim, L.hidden_size) == (
        model_type, style, 2, 4, kv, dh, 64)
    assert L.heads_available and L.heads_reason is None and not L.model_type_inferred
    assert [layer.index for layer in L.layers] == [0, 1]
    assert [m.name for m in L.layers[1].modules] == names
    every = {m.tensor for layer in L.layers for m in layer.modules} | {m.tensor for m in L.globals}
    shapes = shapes_of(family, cfg)
    matrices = {k for k, s in shapes.items() if len(s) == 2}
    assert matrices <= every, f"matrices missing from the tree: {sorted(matrices - every)}"
    assert L.globals[0].name == "embed" and L.globals[0].kind == "embedding"
    assert ("lm_head" in [g.name for g in L.globals]) == ("lm_head.weight" in shapes)


def test_fused_parts_describe_the_logical_matrices():
    """phi3 q/k/v/gate/up are row ranges of the fused tensors; gpt2's q/k/v are column ranges of c_attn."""
    L, _ = layout_for("phi3")
    parts = {m.name: m for m in L.layers[0].modules}
    assert parts["q"].segments == ((0, 64),) and parts["k"].segments == ((64, 96),)
    assert parts["v"].segments == ((96, 128),) and parts["q"].part_of == "qkv"
    assert parts["gate"].segments == ((0, 128),) and parts["up"].segments == ((128, 256),)
    L, _ = layout_for("gpt2")
    parts = {m.name: m for m in L.layers[0].modules}
    assert parts["k"].axis == 1 and parts["k"].segments == ((64, 128),) and parts["k"].transpose
    L, _ = layout_for("gpt_neox")
    q = {m.name: m for m in L.layers[0].modules}["q"]
    assert q.segments == ((0, 16), (48, 64), (96, 112), (144, 160))  # [h: q k v] blocks of 3·16 rows


def test_module_matrix_orients_conv1d_and_fused_parts():
    """module_matrix returns (out × in): gpt2's k is c_attn[:, D:2D]ᵀ; neox's v gathers rows 2d_h.. of each head."""
    L, cfg = layout_for("gpt2")
    g = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(s, generator=g) for k, s in shapes_of("gpt2", cfg).items()}

    class R:
        def tensor(self, n, dtype=torch.float32):
            return tensors[n].to(dtype)

        def rows(self, n, a, b, dtype=torch.float32):
            return tensors[n][a:b].to(dtype)

    k = {m.name: m for m in L.layers[1].modules}["k"]
    assert torch.equal(module_matrix(R(), k), tensors["h.1.attn.c_attn.weight"][:, 64:128].T)
    fc_out = {m.name: m for m in L.layers[1].modules}["fc_out"]
    assert module_matrix(R(), fc_out).shape == (64, 128)  # logical (D × intermediate) of a (128 × 64) Conv1D
    L, cfg = layout_for("gpt_neox")
    tensors.update({k: torch.randn(s, generator=g) for k, s in shapes_of("gpt_neox", cfg).items()})
    v = {m.name: m for m in L.layers[0].modules}["v"]
    W = tensors["layers.0.attention.query_key_value.weight"]
    assert torch.equal(module_matrix(R(), v), W.view(4, 3, 16, 64)[:, 2].reshape(64, 64))


def test_bias_slots_where_models_have_them():
    L, _ = layout_for("qwen2")
    (b,) = head_slots(L, 0, "q", 2, bias=True)
    assert b.tensor == "layers.0.self_attn.q_proj.bias" and b.index.tolist() == list(range(32, 48))
    assert head_slots(L, 0, "o", 2, bias=True) == []        # o bias is shared by all heads
    L, _ = layout_for("llama")
    assert head_slots(L, 0, "q", 2, bias=True) == []        # llama has no attention biases
    L, _ = layout_for("gpt_neox")
    (b,) = head_slots(L, 1, "k", 1, bias=True)
    assert b.index.tolist() == list(range(48 + 16, 48 + 32))  # head 1's block starts at 3·16; k after q


def test_gqa_head_ranges_checked():
    L, _ = layout_for("llama")
    with pytest.raises(IndexError):
        head_slots(L, 0, "k", 2)   # only kv heads 0, 1
    with pytest.raises(IndexError):
        head_slots(L, 0, "q", 4)


# ---------------------------------------------------------------------------------------------
# The real rxnfp checkpoints (legacy pickles, 12 layers × 4 heads of 64)

@pytest.mark.parametrize("name,inferred,extra_globals", [
    ("bert_pretrained", True, {"cls.predictions.transform.dense", "cls.predictions.decoder", "cls.seq_relationship"}),
    ("bert_ft", True, set()),
    ("bert_ft_10k_25s", False, {"classifier"}),
])
def test_rxnfp_bert_trio(name, inferred, extra_globals, rxnfp_dirs):
    """bert_pretrained and bert_ft have no model_type in config.json: inferred as bert from the tensor names."""
    with open_checkpoint(rxnfp_dirs[name]) as ck:  # conftest: FAILS, never skips, without rxnfp
        L = layout_of(ck)
    assert (L.model_type, L.num_layers, L.num_heads, L.num_kv_heads, L.head_dim, L.hidden_size) == (
        "bert", 12, 4, 4, 64, 256)
    assert L.model_type_inferred is inferred and L.heads_available
    names = {g.name for g in L.globals}
    assert {"embed", "pos_embed", "type_embed", "embed_norm", "pooler"} <= names
    assert {g.name for g in L.globals if g.kind == "other"} == {"pooler"} | extra_globals
    q = L.module(11, "q")
    assert q.tensor == "encoder.layer.11.attention.self.query.weight" and q.shape == (256, 256)
    assert q.bias == "encoder.layer.11.attention.self.query.bias"
    (slot,) = head_slots(L, 11, "o", 3)
    assert slot.tensor == "encoder.layer.11.attention.output.dense.weight" and slot.axis == 1
    assert slot.index.tolist() == list(range(192, 256))


# ---------------------------------------------------------------------------------------------
# Contradictions → one-line LayoutError naming tensor, shapes and config fields

@pytest.mark.parametrize("family,mutate,needles", [
    ("llama", {"num_attention_heads": 8, "head_dim": 16},
     ["layers.0.self_attn.q_proj.weight", "(64, 64)", "(128, 64)", "num_attention_heads=8", "head_dim=16"]),
    ("qwen3", {"head_dim": 16},
     ["layers.0.self_attn.q_proj.weight", "(128, 64)", "(64, 64)", "head_dim=16"]),
    ("llama", {"num_key_value_heads": 4},
     ["layers.0.self_attn.k_proj.weight", "(32, 64)", "(64, 64)", "num_key_value_heads=4"]),
    ("phi3", {"num_key_value_heads": 4},
     ["layers.0.self_attn.qkv_proj.weight", "(128, 64)", "(192, 64)", "num_key_value_heads=4"]),
    ("gpt2", {"n_head": 2, "n_embd": 32},
     ["h.0.attn.c_attn.weight", "(64, 192)", "(32, 96)", "n_embd=32"]),
    ("gpt_neox", {"hidden_size": 128},
     ["layers.0.attention.query_key_value.weight", "(192, 64)", "(384, 128)", "num_attention_heads=4"]),
    ("llama", {"num_hidden_layers": 3}, ["num_hidden_layers=3", "2 layers", "layers.N.self_attn.q_proj.weight"]),
])
def test_layout_error_names_tensor_shapes_and_fields(family, mutate, needles):
    cfg = family_config(family)
    shapes = shapes_of(family, cfg)
    bad = {**cfg, **mutate}
    with pytest.raises(LayoutError) as exc:
        detect_layout(bad, shapes)
    msg = str(exc.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"


def test_layout_error_from_a_file_names_the_checkpoint(tmp_path):
    folder = write_checkpoint(tmp_path / "m", "llama")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_key_value_heads"] = 1
    (folder / "config.json").write_text(json.dumps(cfg))
    with open_checkpoint(folder) as ck, pytest.raises(LayoutError) as exc:
        layout_of(ck)
    assert str(exc.value).startswith(str(folder.resolve())) or str(folder) in str(exc.value)
    assert isinstance(exc.value, DiffractError)


def test_heads_not_divisible_by_kv_heads():
    cfg = family_config("llama", num_heads=4, num_kv_heads=2)
    shapes = shapes_of("llama", cfg)
    with pytest.raises(LayoutError, match="not a multiple of num_key_value_heads=3"):
        detect_layout({**cfg, "num_key_value_heads": 3}, shapes)


# ---------------------------------------------------------------------------------------------
# Unknown architectures and inference

def test_unknown_architecture_lists_matrices_without_heads():
    shapes = {"backbone.embeddings.weight": (100, 32), "backbone.layers.0.mixer.in_proj.weight": (128, 32),
              "backbone.layers.0.mixer.out_proj.weight": (32, 64), "backbone.layers.0.norm.weight": (32,),
              "backbone.layers.1.mixer.in_proj.weight": (128, 32), "backbone.layers.1.mixer.A_log": (64, 16),
              "lm_head.weight": (100, 32)}
    L = detect_layout({"model_type": "mamba", "hidden_size": 32}, shapes)
    assert L.model_type == "mamba" and not L.heads_available
    assert "'mamba' is not a supported architecture" in L.heads_reason and "heads are not offered" in L.heads_reason
    assert [layer.index for layer in L.layers] == [0, 1]
    assert [(m.name, m.kind) for m in L.layers[0].modules] == [("mixer.in_proj", "other"), ("mixer.out_proj", "other"),
                                                              ("norm", "norm")]
    assert {g.tensor for g in L.globals} == {"backbone.embeddings.weight", "lm_head.weight"}
    with pytest.raises(LayoutError, match="heads are not available"):
        head_slots(L, 0, "q", 0)


def test_missing_model_type_with_unrecognised_names_is_unknown():
    L = detect_layout({}, {"blocks.0.attn.wq.weight": (64, 64), "blocks.0.attn.wo.weight": (64, 64)})
    assert L.model_type == "unknown" and not L.heads_available
    assert "no model_type" in L.heads_reason
    assert [m.name for m in L.layers[0].modules] == ["attn.wq", "attn.wo"]


@pytest.mark.parametrize("family,expected", [("llama", "llama"), ("qwen2", "qwen2"), ("phi3", "phi3"),
                                             ("gpt2", "gpt2"), ("gpt_neox", "gpt_neox"), ("bert", "bert")])
def test_model_type_inferred_from_tensor_names(family, expected):
    cfg = family_config(family)
    cfg.pop("model_type")
    cfg.pop("architectures")
    L = detect_layout(cfg, shapes_of(family, cfg))
    assert L.model_type == expected and L.model_type_inferred and L.heads_available


def test_gemma3_multimodal_uses_the_language_model():
    """Gemma3ForConditionalGeneration: sizes in text_config, the vision tower's own q_proj layers ignored."""
    text = family_config("gemma3")
    shapes = {"language_model." + k: s for k, s in shapes_of("gemma3", text).items()}
    shapes["vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight"] = (32, 32)
    cfg = {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"], "text_config": text}
    L = detect_layout(cfg, shapes)
    assert (L.num_layers, L.num_heads, L.num_kv_heads, L.head_dim) == (2, 4, 2, 32)
    assert L.attention[0].q.tensor == "language_model.layers.0.self_attn.q_proj.weight"
    assert any(g.tensor.startswith("vision_tower.") for g in L.globals)


def test_bare_safetensors_file_without_config_keeps_the_tree_but_offers_no_heads(tmp_path):
    """A lone model.safetensors: family inferred from names (llama), modules named, heads refused with a reason."""
    folder = write_checkpoint(tmp_path / "m", "llama")
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes((folder / "model.safetensors").read_bytes())
    with open_checkpoint(lone) as ck:
        L = layout_of(ck)
    assert L.model_type == "llama" and L.model_type_inferred and not L.heads_available
    assert "no num_attention_heads" in L.heads_reason and "config.json" in L.heads_reason
    assert [m.name for m in L.layers[0].modules][:7] == ["q", "k", "v", "o", "gate", "up", "down"]
    assert L.num_layers == 2 and L.hidden_size == 64
    with pytest.raises(LayoutError, match="heads are not available"):
        L.kv_group(0)


def test_legacy_buffers_are_not_modules_and_embed_out_is_the_lm_head():
    """Older GPT-2 / Pythia files carry attention masks and rotary caches; Pythia names its head embed_out."""
    cfg = family_config("gpt2")
    shapes = shapes_of("gpt2", cfg)
    shapes |= {"h.0.attn.bias": (1, 1, 128, 128), "h.0.attn.masked_bias": (), "h.1.attn.bias": (1, 1, 128, 128)}
    L = detect_layout(cfg, shapes)
    assert all(m.kind != "other" for layer in L.layers for m in layer.modules)
    cfg = family_config("gpt_neox")
    shapes = shapes_of("gpt_neox", cfg)
    shapes["embed_out.weight"] = shapes.pop("lm_head.weight")
    shapes |= {"layers.0.attention.rotary_emb.inv_freq": (4,), "layers.0.attention.bias": (1, 1, 128, 128),
               "layers.0.attention.masked_bias": ()}
    L = detect_layout(cfg, shapes)
    assert all(m.kind != "other" for layer in L.layers for m in layer.modules)
    assert [g.name for g in L.globals if g.tensor == "embed_out.weight"] == ["lm_head"]


class CountingReader:
    """Records every read, to show projection_heads reads once and head_slice only the head's rows."""

    def __init__(self, tensors):
        self.t, self.reads = tensors, []

    def tensor(self, name, dtype=torch.float32):
        self.reads.append((name, None))
        return self.t[name].to(dtype)

    def rows(self, name, start, stop, dtype=torch.float32):
        self.reads.append((name, stop - start))
        return self.t[name][start:stop].to(dtype)


@pytest.mark.parametrize("family,proj,expected_reads", [
    ("llama", "q", [("layers.1.self_attn.q_proj.weight", 64)]),        # all 4 heads' rows, one read
    ("llama", "k", [("layers.1.self_attn.k_proj.weight", 32)]),
    ("phi3", "v", [("layers.1.self_attn.qkv_proj.weight", 32)]),       # only v's rows of the fused tensor
    ("gpt_neox", "v", [("layers.1.attention.query_key_value.weight", 160)]),  # rows 32..191 hold every v
    ("gpt2", "q", [("h.1.attn.c_attn.weight", None)]),                 # Conv1D: heads are columns
])
def test_projection_heads_reads_the_projection_once(family, proj, expected_reads):
    L, cfg = layout_for(family)
    g = torch.Generator().manual_seed(0)
    r = CountingReader({k: torch.randn(s, generator=g) for k, s in shapes_of(family, cfg).items()})
    from analysis.model.heads import head_slice, projection_heads
    stacked = projection_heads(r, L, 1, proj)
    assert r.reads == expected_reads
    r.reads.clear()
    assert torch.equal(head_slice(r, L, 1, proj, 1), stacked[1])
    if family != "gpt2":
        assert r.reads == [(expected_reads[0][0], L.head_dim)]             # one head: only its d_h rows

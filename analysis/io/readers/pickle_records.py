"""A torch-free reading of a `torch.save` pickle's structure: tensor names, shapes, dtypes and storage records.

The pickle is parsed by a restricted `pickle.Unpickler` that executes nothing: `find_class` knows only the few
names a plain state dict uses (torch's tensor/parameter rebuild functions, `torch.<Type>Storage`, OrderedDict)
and turns each into a record; `persistent_load` turns each storage id into a (key, dtype, numel) record. Opening
a checkpoint therefore needs no `import torch` (≈3 s of a cached `delta`'s start-up, issue 13 item 3).

This is only a fast path for metadata: anything it does not model (another global, a sparse, quantized or meta
tensor, a dtype outside the plain ones, a malformed stream) raises `Unmodelled`, and the caller falls back to
`torch.load(weights_only=True)`, which accepts or refuses exactly as before. Tensor data is always read by torch.
`lenient=True` (used only after torch's own weights-only load accepted the file) makes any other global an
inert placeholder, so the storage records of such a file can still be listed for the record-size check.
"""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, BinaryIO

# torch.<Name>Storage -> (torch dtype name, bytes per element): the plain dtypes of
# torch.storage._dtype_to_storage_type_map (tests/test_hostile_pickle_records.py checks it against torch)
STORAGE_DTYPES: dict[str, tuple[str, int]] = {
    "DoubleStorage": ("float64", 8), "FloatStorage": ("float32", 4), "HalfStorage": ("float16", 2),
    "BFloat16Storage": ("bfloat16", 2), "LongStorage": ("int64", 8), "IntStorage": ("int32", 4),
    "ShortStorage": ("int16", 2), "CharStorage": ("int8", 1), "ByteStorage": ("uint8", 1),
    "BoolStorage": ("bool", 1),
}
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C   # torch.serialization.MAGIC_NUMBER
LEGACY_PROTOCOL = 1001                  # torch.serialization.PROTOCOL_VERSION


class Unmodelled(Exception):
    """The pickle holds something this reading does not model: let torch.load decide."""


@dataclass(frozen=True)
class StorageRecord:
    """One storage a pickle refers to: its record key, dtype name, element size and element count."""

    key: str
    dtype: str
    itemsize: int
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


@dataclass(frozen=True)
class TensorRecord:
    """One plain dense tensor of a pickle: its storage, shape, and where in the storage (elements) it lies (no data)."""

    storage: StorageRecord
    shape: tuple[int, ...]
    stride: tuple[int, ...] = ()
    offset: int = 0

    @property
    def nbytes(self) -> int:
        n = self.storage.itemsize
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class _StorageType:
    """`torch.<Name>Storage` as a record."""

    name: str


class _Placeholder:
    """Any other global in lenient mode: accepts every pickle operation and means nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> "_Placeholder":
        return _Placeholder()

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


def _dims(value: Any) -> tuple[int, ...]:
    """A shape or stride argument as a tuple of non-negative ints (Unmodelled otherwise)."""
    if not isinstance(value, tuple) or not all(type(d) is int and d >= 0 for d in value):
        raise Unmodelled(f"shape {value!r}")
    return value


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> TensorRecord:
    """torch._utils._rebuild_tensor(_v2) as a record: (storage, offset, size, stride, [requires_grad, hooks, meta])."""
    if not isinstance(storage, StorageRecord) or type(offset) is not int or len(rest) > 3:
        raise Unmodelled("tensor arguments")
    return TensorRecord(storage, _dims(size), _dims(stride), offset)


def _rebuild_parameter(data: Any, *rest: Any) -> Any:
    """torch._utils._rebuild_parameter(_with_state): the parameter's tensor record."""
    if not isinstance(data, TensorRecord) or len(rest) > 3:
        raise Unmodelled("parameter arguments")
    return data


class _TensorType:
    """torch.Tensor / torch.nn.parameter.Parameter, as _rebuild_from_type_v2's second argument."""


def _rebuild_from_type(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    """torch._tensor._rebuild_from_type_v2 for a plain Tensor or Parameter: func(*args), the state ignored."""
    if func not in (_rebuild_tensor, _rebuild_parameter) or new_type is not _TensorType or not isinstance(args, tuple):
        raise Unmodelled("rebuild from type")
    return func(*args)


GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch", "Tensor"): _TensorType,
    ("torch.nn.parameter", "Parameter"): _TensorType,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class RecordUnpickler(pickle.Unpickler):
    """Unpickles onto records: the globals of `GLOBALS` only (others: Unmodelled, or placeholders when lenient)."""

    def __init__(self, file: BinaryIO, lenient: bool = False):
        super().__init__(file, encoding="utf-8")
        self.lenient = lenient
        self.storages: dict[str, StorageRecord] = {}

    def find_class(self, module: str, name: str) -> Any:
        """A record for a known name; never imports or calls anything."""
        if (module, name) in GLOBALS:
            return GLOBALS[(module, name)]
        if self.lenient:
            return _Placeholder
        raise Unmodelled(f"global {module}.{name}")

    def persistent_load(self, saved_id: Any) -> Any:
        """('storage', storage type, key, location, numel[, view metadata]) → the key's StorageRecord."""
        if not isinstance(saved_id, tuple) or len(saved_id) not in (5, 6) or saved_id[0] not in ("storage", b"storage"):
            raise Unmodelled("persistent id")
        storage_type, key, numel = saved_id[1], saved_id[2], saved_id[4]
        if len(saved_id) == 6 and saved_id[5] is not None:
            raise Unmodelled("storage view")
        key = key.decode("ascii") if isinstance(key, bytes) else str(key)
        if isinstance(storage_type, _StorageType) and type(numel) is int and numel >= 0:
            dtype, itemsize = STORAGE_DTYPES[storage_type.name]
        elif self.lenient and type(numel) is int and numel >= 0:
            dtype, itemsize = "uint8", 1          # UntypedStorage: numel counts bytes
        else:
            raise Unmodelled("storage type")
        record = self.storages.setdefault(key, StorageRecord(key, dtype, itemsize, numel))
        if record.dtype != dtype and not self.lenient:
            raise Unmodelled("storage key reused with another dtype")
        return record


def load_records(data: bytes | BinaryIO, lenient: bool = False) -> tuple[Any, dict[str, StorageRecord]]:
    """One pickle read onto records: (the object, its storages by key); Unmodelled when it holds other things."""
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    unpickler = RecordUnpickler(stream, lenient=lenient)
    try:
        return unpickler.load(), unpickler.storages
    except Unmodelled:
        raise
    except Exception as e:  # a malformed stream: torch.load reports it in its words
        raise Unmodelled(f"{type(e).__name__}: {e}") from None


def load_legacy_records(handle: BinaryIO, size: int) -> tuple[Any, dict[str, StorageRecord], dict[str, int]]:
    """A legacy (non-zip) torch.save file of `size` bytes onto records: magic, protocol, system info, the object,
    then the storage keys; each storage's length prefix is checked against the pickle and its bytes skipped, not
    read (a file cut short is Unmodelled, so that torch's load refuses it at open, as before). Also returns the
    file byte where each storage's data starts (for torch-free reads)."""
    for expected in (LEGACY_MAGIC, LEGACY_PROTOCOL):
        if load_records(handle)[0] != expected:
            raise Unmodelled("legacy header")
    sys_info = load_records(handle)[0]
    if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
        raise Unmodelled("legacy system info")
    obj, storages = load_records(handle)
    keys = load_records(handle)[0]
    if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(storages):
        raise Unmodelled("legacy storage keys")
    starts: dict[str, int] = {}
    for key in keys:
        record = storages[str(key)]
        prefix = handle.read(8)
        if len(prefix) != 8 or int.from_bytes(prefix, "little", signed=True) != record.numel:
            raise Unmodelled(f"legacy storage {key} length")
        starts[str(key)] = handle.tell()
        end = starts[str(key)] + record.nbytes
        if end > size:
            raise Unmodelled(f"legacy storage {key} cut short")
        handle.seek(end)
    return obj, storages, starts


def state_dict_of(obj: Any) -> Any:
    """The state dict inside a loaded pickle: a training checkpoint's `state_dict` entry, else the object."""
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        return obj["state_dict"]
    return obj


def plain_tensors(obj: Any) -> dict[str, TensorRecord]:
    """name → TensorRecord of a plain state dict (str keys, every value a plain tensor); Unmodelled otherwise."""
    obj = state_dict_of(obj)
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, TensorRecord)
                                            for k, v in obj.items()):
        raise Unmodelled("not a plain state dict")
    return dict(obj)

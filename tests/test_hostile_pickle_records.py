"""Hostile pickles against the torch-free metadata reading (`analysis.io.readers.pickle_records`, issue 13 item 3):
a pickle whose globals would run code is never executed by it (and still refused by torch's weights-only load);
legacy files cut inside their storages are refused at open as before (one cut used to crash with a traceback);
a zip pickle holding a global only torch models still has its storage records checked; the storage-type map is
torch's own."""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from analysis.errors import CheckpointError
from analysis.io.checkpoint import open_checkpoint
from analysis.io.readers.pickle_records import STORAGE_DTYPES, Unmodelled, load_records
from conftest import llama_checkpoint
from diffract_tui.cli import main


def _one_line(capsys, args: list[str], *fragments: str) -> str:
    """Run the CLI; assert exit 1 and one stderr line (no traceback) holding every fragment."""
    code = main(args)
    _, err = capsys.readouterr()
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffract-tui: error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


class _Runs:
    """Unpickling this would call builtins.exec (it writes the marker file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_pickle_that_would_run_code_is_never_executed_and_is_refused(capsys, tmp_path, legacy):
    marker = tmp_path / "ran.txt"
    path = tmp_path / "evil.bin"
    torch.save({"w": torch.ones(2, 2), "x": _Runs(marker)}, path, _use_new_zipfile_serialization=not legacy)
    data = zipfile.ZipFile(path).read("evil/data.pkl") if not legacy else None
    if data is not None:
        with pytest.raises(Unmodelled, match=r"global (__builtin__|builtins)\.exec"):
            load_records(data)
    _one_line(capsys, ["info", str(path)], f"{path}: refused: the pickle needs arbitrary unpickling")
    assert not marker.exists()


def test_lenient_records_turn_other_globals_into_inert_placeholders(tmp_path):
    """Lenient mode (used only after torch's own weights-only load accepted a file) still calls nothing."""
    marker = tmp_path / "ran.txt"
    obj, storages = load_records(pickle.dumps({"x": _Runs(marker)}), lenient=True)
    assert not marker.exists() and storages == {} and type(obj["x"]).__name__ == "_Placeholder"


def _legacy(tmp_path: Path) -> bytes:
    path = tmp_path / "full.bin"
    torch.save({"w": torch.randn(64, 64), "b": torch.ones(3)}, path, _use_new_zipfile_serialization=False)
    return path.read_bytes()


@pytest.mark.parametrize(("cut", "fragment"), [
    (100, "not a readable PyTorch checkpoint (RuntimeError: unexpected EOF"),
    (None, "not a readable PyTorch checkpoint (error: unpack requires a buffer of 4 bytes)"),  # was a traceback
], ids=["inside_the_last_storage", "before_the_storages"])
def test_legacy_pickle_cut_inside_its_storages_is_refused_at_open(capsys, tmp_path, cut, fragment):
    data = _legacy(tmp_path)
    path = tmp_path / "cut.bin"
    path.write_bytes(data[: len(data) - cut] if cut else data[:400])
    _one_line(capsys, ["info", str(path)], f"{path}: {fragment}")


def test_legacy_pickle_whose_storage_length_disagrees_is_refused_at_open(capsys, tmp_path):
    """A storage length prefix that does not match the pickle's element count: torch names the mismatch."""
    data = bytearray(_legacy(tmp_path))
    prefix = (4096).to_bytes(8, "little")
    at = bytes(data).index(prefix)
    data[at:at + 8] = (4095).to_bytes(8, "little")
    path = tmp_path / "wrong.bin"
    path.write_bytes(bytes(data))
    _one_line(capsys, ["info", str(path)], f"{path}: not a readable PyTorch checkpoint")


def test_zip_pickle_with_a_global_only_torch_models_still_has_its_records_checked(capsys, tmp_path):
    """torch.Size is outside the records parse (so torch's weights-only load opens the file), and a record cut
    short is refused all the same: the lenient parse lists the storages."""
    cfg, tensors = llama_checkpoint()
    src = tmp_path / "src.bin"
    torch.save({"state_dict": tensors, "shape": torch.Size([2, 3])}, src)
    folder = tmp_path / "m"
    folder.mkdir()
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(folder / "pytorch_model.bin", "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            body = zin.read(info.filename)
            zout.writestr(info, body[:-256] if info.filename.endswith("/data/0") else body)
    (folder / "config.json").write_text(json.dumps(cfg))
    _one_line(capsys, ["info", str(folder)], "tensor 'model.embed_tokens.weight' needs 12800 bytes of storage but "
              "its record src/data/0 holds only 12544")


def test_zip_pickle_with_a_global_only_torch_models_opens_intact(tmp_path):
    """The control of the test above: uncut, it opens (through torch) with the stored values."""
    _, tensors = llama_checkpoint()
    path = tmp_path / "w.bin"
    torch.save({"state_dict": tensors, "shape": torch.Size([2, 3])}, path)
    with open_checkpoint(path) as ckpt:
        assert torch.equal(ckpt.tensor("embed_tokens.weight", dtype=None), tensors["model.embed_tokens.weight"])


def test_malformed_pickle_streams_are_unmodelled_not_crashes():
    """Garbage, a stream cut short and a storage id of the wrong shape: Unmodelled (torch then decides)."""
    good = pickle.dumps({"a": 1}, protocol=2)
    for data in (b"\x00garbage", good[:-3], b""):
        with pytest.raises(Unmodelled):
            load_records(data)

    class _Id(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", "FloatStorage") if obj == "s" else None

    buf = io.BytesIO()
    _Id(buf, protocol=2).dump(["s"])
    with pytest.raises(Unmodelled, match="persistent id"):
        load_records(buf.getvalue())


def test_storage_type_map_is_torchs_own():
    """Every plain dtype's storage name and element size agree with torch's map (a drift would misread dtypes)."""
    from torch.storage import _dtype_to_storage_type_map

    torch_map = {name: dtype for dtype, name in _dtype_to_storage_type_map().items()}
    for name, (dtype, itemsize) in STORAGE_DTYPES.items():
        assert str(torch_map[name]).removeprefix("torch.") == dtype
        assert torch.empty(0, dtype=torch_map[name]).element_size() == itemsize


def test_open_of_a_meta_tensor_zip_still_refused_by_torch(tmp_path):
    """A meta-device tensor is outside the records parse: torch's load refuses it at open, as before."""
    path = tmp_path / "meta.pt"
    torch.save({"w": torch.empty(4, 4, device="meta")}, path)
    with pytest.raises(CheckpointError, match=r"tensor 'w' was saved without data \(on the meta device\)"):
        open_checkpoint(path)

"""Every kind of bad input reaches the user as ONE stderr line naming the file and the fault,
exit code 1, and no traceback (run through `diffract-tui info`)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import torch
from conftest import llama_checkpoint, write_safetensors

from diffract_tui.cli import main


class NotATensor:
    """A class torch's weights_only unpickler must refuse to construct."""

    def __init__(self) -> None:
        self.x = 1


def _fails(capsys, args: list[str], *fragments: str) -> str:
    """Run `diffract-tui info ARGS`; assert exit 1 and one stderr line holding every fragment."""
    code = main(["info", *map(str, args)])
    out, err = capsys.readouterr()
    assert code == 1, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("diffract-tui: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def _good(tmp_path: Path, name: str = "good.safetensors") -> Path:
    return write_safetensors(tmp_path / name, {"a": torch.ones(16, 16), "b": torch.arange(8.0)})


def test_missing_path(capsys, tmp_path):
    missing = tmp_path / "nope"
    _fails(capsys, [missing], f"{missing}: no such file or folder")


def test_folder_without_weights(capsys, tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "training_args.bin").write_bytes(b"x")  # a stray .bin is not taken for weights
    _fails(capsys, [folder], f"{folder}: no weights found in folder", "model.safetensors")


def test_truncated_safetensors_inside_header(capsys, tmp_path):
    path = _good(tmp_path)
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    path.write_bytes(data[: 8 + n // 2])
    _fails(capsys, [path], f"{path}: truncated safetensors file: header claims {n} bytes but the file has only "
                           f"{8 + n // 2}")


def test_truncated_safetensors_inside_data(capsys, tmp_path):
    path = _good(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    _fails(capsys, [path], str(path), "past the end of the file")


def test_file_too_short_for_header_length(capsys, tmp_path):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\x01\x02")
    _fails(capsys, [path], f"{path}: truncated safetensors file: 2 bytes")


def test_header_not_json(capsys, tmp_path):
    path = tmp_path / "bad.safetensors"
    junk = b"{this is not json}"
    path.write_bytes(struct.pack("<Q", len(junk)) + junk + b"\0" * 16)
    _fails(capsys, [path], f"{path}: safetensors header is not valid JSON")


def test_tensor_offsets_past_end_of_file(capsys, tmp_path):
    path = tmp_path / "offsets.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]},
                         "v": {"dtype": "F32", "shape": [4, 4], "data_offsets": [64, 128]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)  # only w's 64 bytes present
    _fails(capsys, [path], f"{path}: tensor 'v' data ends at byte 128", "past the end of the file",
           "data section has 64 bytes")


def _index_folder(tmp_path: Path, shard_name: str) -> Path:
    folder = tmp_path / "idx"
    folder.mkdir()
    write_safetensors(folder / "model-00001-of-00002.safetensors", {"a": torch.ones(2)})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": shard_name}}))
    return folder


def test_index_naming_parent_folder(capsys, tmp_path):
    write_safetensors(tmp_path / "x.safetensors", {"b": torch.ones(2)})  # exists, but outside the folder
    folder = _index_folder(tmp_path, "../x.safetensors")
    _fails(capsys, [folder], f"{folder / 'model.safetensors.index.json'}: index names a shard outside its folder "
                             f"'../x.safetensors'")


def test_index_naming_absolute_path(capsys, tmp_path):
    target = write_safetensors(tmp_path / "abs.safetensors", {"b": torch.ones(2)})
    folder = _index_folder(tmp_path, str(target))
    _fails(capsys, [folder], "index names an absolute shard path", str(target))


def test_index_naming_link_leaving_folder(capsys, tmp_path):
    target = write_safetensors(tmp_path / "outside.safetensors", {"b": torch.ones(2)})
    folder = _index_folder(tmp_path, "link.safetensors")
    os.symlink(target, folder / "link.safetensors")
    _fails(capsys, [folder], "index names a shard 'link.safetensors' that links outside its folder")


def test_index_naming_missing_shard(capsys, tmp_path):
    folder = _index_folder(tmp_path, "model-00002-of-00002.safetensors")
    _fails(capsys, [folder], f"{folder / 'model.safetensors.index.json'}: index names a missing shard "
                             f"'model-00002-of-00002.safetensors'")


def test_pickle_with_non_tensor_value(capsys, tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(2), "note": "hello"}, path)
    _fails(capsys, [tmp_path], f"{path}: holds a non-tensor value at key 'note' (str)")


def test_pickle_needing_arbitrary_unpickling_is_refused_not_executed(capsys, tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"w": NotATensor()}, path)
    _fails(capsys, [path], f"{path}: refused: the pickle needs arbitrary unpickling, which is never executed")


def test_shape_mismatch_between_checkpoints(capsys, tmp_path):
    a = write_safetensors(tmp_path / "a" / "model.safetensors", {"model.q.weight": torch.ones(8, 4)})
    b = write_safetensors(tmp_path / "b" / "model.safetensors", {"q.weight": torch.ones(6, 4)})
    _fails(capsys, [a.parent, b.parent], "shape mismatch on shared tensor 'q.weight': (8, 4)", str(a), "(6, 4)",
           str(b))
    assert main(["info", str(a.parent), str(b.parent), "--lenient", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["alignment"]
    assert report["mismatched"] == [{"key": "q.weight", "shapes": [[8, 4], [6, 4]], "files": [str(a), str(b)]}]


def test_config_contradicting_shapes(capsys, tmp_path):
    config, tensors = llama_checkpoint(layers=1, hidden=64, heads=4, kv_heads=2)
    config["head_dim"] = 32  # 4 heads × 32 = 128 ≠ 64 rows of q_proj
    folder = tmp_path / "contradiction"
    write_safetensors(folder / "model.safetensors", tensors)
    (folder / "config.json").write_text(json.dumps(config))
    _fails(capsys, [folder], str(folder), "q_proj.weight has shape (64, 64)", "implies (128, 64)")


def test_config_not_json(capsys, tmp_path):
    folder = tmp_path / "cfg"
    _good(folder, "model.safetensors")
    (folder / "config.json").write_text("{oops")
    _fails(capsys, [folder], f"{folder / 'config.json'}: config.json is not valid JSON")


def test_no_traceback_in_a_real_process(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 5) + b"nope!")
    proc = subprocess.run([sys.executable, "-m", "diffract_tui", "info", str(path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.strip() == (f"diffract-tui: error: {path}: safetensors header is not valid JSON "
                                   f"(line 1, column 1: Expecting value) — the file is "
                                   f"damaged or incomplete; download or export it again")


def test_checkpoint_without_tensors(capsys, tmp_path):
    path = write_safetensors(tmp_path / "empty.safetensors", {})
    _fails(capsys, [path], f"{path}: holds no tensors")


def test_pickle_holding_a_bare_tensor(capsys, tmp_path):
    path = tmp_path / "bare.pt"
    torch.save(torch.ones(3), path)
    _fails(capsys, [path], f"{path}: holds a Tensor, not a state dict of tensors")


def test_legacy_pickle_with_non_tensor_value(capsys, tmp_path):
    path = tmp_path / "old.bin"
    torch.save({"w": torch.ones(2), "epoch": 3}, path, _use_new_zipfile_serialization=False)
    _fails(capsys, [path], f"{path}: holds a non-tensor value at key 'epoch' (int)")


def test_hf_cache_snapshot_links_into_own_blobs_are_allowed(capsys, tmp_path):
    """Hugging Face hub caches store shards as links snapshots/<rev>/x -> ../../blobs/<hash>: not refused."""
    repo = tmp_path / "models--org--tiny"
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    blob = write_safetensors(repo / "blobs" / "deadbeef", {"model.w": torch.ones(4, 4)})
    os.symlink("../../blobs/deadbeef", snap / "model-00001-of-00001.safetensors")
    (snap / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.w": "model-00001-of-00001.safetensors"}}))
    assert main(["info", str(snap), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["checkpoints"][0]["weight_files"] == [str(blob.resolve())]
    # ...but a link from the snapshot to anywhere else is still refused
    other = write_safetensors(tmp_path / "elsewhere.safetensors", {"model.w": torch.ones(4, 4)})
    (snap / "model-00001-of-00001.safetensors").unlink()
    os.symlink(other, snap / "model-00001-of-00001.safetensors")
    _fails(capsys, [snap], "links outside its folder")

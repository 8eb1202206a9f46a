"""Alignment across checkpoints (SPEC §1): prefixes normalised, extra tensors listed, shape
mismatches on shared keys an error naming the key, both shapes and both files."""

from __future__ import annotations

import pytest
import torch
from conftest import write_safetensors

from analysis.io.alignment import align
from analysis.io.checkpoint import open_checkpoint
from analysis.errors import AlignmentError


def _open(tmp_path, name, tensors):
    return open_checkpoint(write_safetensors(tmp_path / name / "model.safetensors", tensors).parent)


def test_prefixes_align_and_extra_tensors_are_listed(tmp_path):
    a = _open(tmp_path, "a", {"bert.encoder.layer.0.w": torch.ones(4, 2), "bert.pooler.w": torch.ones(2, 2),
                              "cls.head": torch.ones(3)})
    b = _open(tmp_path, "b", {"encoder.layer.0.w": torch.ones(4, 2), "pooler.w": torch.ones(2, 2),
                              "classifier.weight": torch.ones(2, 2)})
    report = align([a, b])
    assert report.labels == ("a", "b")
    assert report.shared == ("encoder.layer.0.w", "pooler.w")
    assert report.missing == {"a": ("classifier.weight",), "b": ("cls.head",)}
    assert report.only_in == {"a": ("cls.head",), "b": ("classifier.weight",)}
    assert report.mismatched == ()
    assert report.to_dict() == {"checkpoints": ["a", "b"], "shared": 2,
                                "missing": {"a": ["classifier.weight"], "b": ["cls.head"]}, "mismatched": []}


def test_three_checkpoints_key_in_two_is_missing_in_the_third_not_only_in(tmp_path):
    a = _open(tmp_path, "a", {"x": torch.ones(2), "y": torch.ones(2)})
    b = _open(tmp_path, "b", {"x": torch.ones(2), "y": torch.ones(2)})
    c = _open(tmp_path, "c", {"x": torch.ones(2)})
    report = align([a, b, c])
    assert report.shared == ("x",)
    assert report.missing == {"a": (), "b": (), "c": ("y",)}
    assert report.only_in == {"a": (), "b": (), "c": ()}
    assert report.present_in["y"] == ("a", "b")


def test_shape_mismatch_strict_names_key_shapes_and_files(tmp_path):
    a = _open(tmp_path, "a", {"model.layers.0.q.weight": torch.ones(8, 4), "model.norm": torch.ones(4)})
    b = _open(tmp_path, "b", {"layers.0.q.weight": torch.ones(6, 4), "norm": torch.ones(4)})
    with pytest.raises(AlignmentError) as err:
        align([a, b])
    msg = str(err.value)
    assert "\n" not in msg
    assert "'layers.0.q.weight'" in msg and "(8, 4)" in msg and "(6, 4)" in msg
    assert str(a.weight_files[0]) in msg and str(b.weight_files[0]) in msg


def test_shape_mismatch_lenient_lists_it_and_excludes_it_from_shared(tmp_path):
    a = _open(tmp_path, "a", {"q": torch.ones(8, 4), "n": torch.ones(4)})
    b = _open(tmp_path, "b", {"q": torch.ones(6, 4), "n": torch.ones(4)})
    report = align([a, b], strict=False)
    assert report.shared == ("n",)
    assert len(report.mismatched) == 1
    m = report.mismatched[0]
    assert (m.key, m.shapes) == ("q", ((8, 4), (6, 4)))
    assert report.to_dict()["mismatched"][0]["shapes"] == [[8, 4], [6, 4]]


def test_duplicate_labels_are_made_unique(tmp_path):
    a = _open(tmp_path / "1", "m", {"x": torch.ones(2)})
    b = _open(tmp_path / "2", "m", {"x": torch.ones(2)})
    # the one label rule (analysis.io.labels): the shortest trailing path that tells them apart
    assert align([a, b]).labels == ("1/m", "2/m")

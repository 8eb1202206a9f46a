"""The rewind list JSON (SPEC §6): exact keys, round trip, atomic write, and one-line errors that name the
file and the field for every kind of malformed list; stale lists refused unless forced."""

from __future__ import annotations

import copy
import json

import pytest

from analysis.errors import RewindListError
from analysis.edit.rewind_list import (FORMAT, Architecture, CheckpointRef, HeadEntry, Pattern, RewindList, check_fresh,
                                  read_rewind_list, rewind_list_from_dict, write_rewind_list)


def _list(policy="group", heads=None) -> RewindList:
    # llama-like: 2 layers, 4 query heads, 2 kv heads (groups {0,1} and {2,3})
    heads = heads if heads is not None else (
        HeadEntry(0, 0, ("q", "k", "v", "o"), 0.01), HeadEntry(0, 1, ("q", "k", "v", "o"), 0.02),
        HeadEntry(1, 3, ("q", "o"), 0.03))
    return RewindList(base=CheckpointRef("/ck/base", "fpb"), target=CheckpointRef("/ck/target", "fpt"),
                      reference=None, architecture=Architecture("llama", 2, 4, 2, 8),
                      pattern=Pattern("greedy", 0.375, "rel_frob", policy), heads=tuple(heads),
                      created_by="diffract-tui 0.1.0", settings={"exclude_kv": False})


def test_json_has_exactly_the_spec_keys_and_round_trips(tmp_path):
    rl = _list()
    path = write_rewind_list(rl, tmp_path / "r.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert list(data) == ["format", "base", "target", "reference", "architecture", "pattern", "heads",
                          "created_by", "settings"]
    assert data["format"] == "diffract-rewind/1"
    assert data["architecture"] == {"model_type": "llama", "layers": 2, "heads": 4, "kv_heads": 2, "head_dim": 8}
    assert data["pattern"] == {"name": "greedy", "fraction": 0.375, "score": "rel_frob", "gqa_policy": "group"}
    assert data["heads"][2] == {"layer": 1, "head": 3, "projections": ["q", "o"], "score": 0.03}
    assert data["reference"] is None
    assert read_rewind_list(path) == rl
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temp file left


def test_nan_score_is_written_as_null(tmp_path):
    rl = _list(heads=[HeadEntry(0, 2, ("q", "o"), float("nan"))])
    data = json.loads(write_rewind_list(rl, tmp_path / "r.json").read_text())
    assert data["heads"][0]["score"] is None


def test_relative_paths_anchor_at_the_list(tmp_path):
    d = _list().to_dict()
    d["base"]["path"] = "models/base"
    (tmp_path / "r.json").write_text(json.dumps(d))
    assert read_rewind_list(tmp_path / "r.json").base.path == str(tmp_path / "models" / "base")


def _mutations():
    good = _list().to_dict()

    def m(fn):
        d = copy.deepcopy(good)
        fn(d)
        return d

    return [
        ("wrong format", m(lambda d: d.update(format="diffract-rewind/2")), "'format'"),
        ("missing heads", m(lambda d: d.pop("heads")), "'heads': missing"),
        ("missing base fp", m(lambda d: d["base"].pop("fingerprint")), "'base.fingerprint': missing"),
        ("layer out of range", m(lambda d: d["heads"][0].update(layer=2)), "'heads[0].layer': 2 is out of range"),
        ("head out of range", m(lambda d: d["heads"][1].update(head=4)), "'heads[1].head': 4 is out of range"),
        ("negative head", m(lambda d: d["heads"][1].update(head=-1)), "'heads[1].head'"),
        ("duplicate", m(lambda d: d["heads"].append(dict(d["heads"][2]))), "'heads[3]': layer 1 head 3 is listed twice"),
        ("unknown projection", m(lambda d: d["heads"][2].update(projections=["q", "x"])), "unknown projection 'x'"),
        ("fraction > 1", m(lambda d: d["pattern"].update(fraction=1.5)), "'pattern.fraction': 1.5 is outside"),
        ("fraction text", m(lambda d: d["pattern"].update(fraction="0.2")), "'pattern.fraction': expected a number"),
        ("bad pattern", m(lambda d: d["pattern"].update(name="spiral")), "'pattern.name'"),
        ("bad policy", m(lambda d: d["pattern"].update(gqa_policy="some")), "'pattern.gqa_policy'"),
        ("bool layer", m(lambda d: d["heads"][0].update(layer=True)), "'heads[0].layer': expected an integer"),
        ("half a kv group", m(lambda d: d["heads"].pop(1)), "only 1 of the 2 query heads of kv group 0"),
        ("kv with never", m(lambda d: d["pattern"].update(gqa_policy="never")), "policy is 'never'"),
        ("reference pattern without reference", m(lambda d: d["pattern"].update(name="reference")), "'reference'"),
        ("kv_heads not dividing", m(lambda d: d["architecture"].update(kv_heads=3)), "'architecture.kv_heads'"),
        ("top level list", [1, 2], "(top level)"),
    ]


@pytest.mark.parametrize("name,data,expected", _mutations(), ids=[m[0] for m in _mutations()])
def test_malformed_lists_give_one_line_errors(tmp_path, name, data, expected):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(RewindListError) as info:
        read_rewind_list(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(str(path) + ": ")
    assert expected in msg, msg


def test_any_policy_allows_partial_groups():
    d = _list(policy="any").to_dict()
    d["heads"].pop(1)  # head 0 alone carries k/v for group 0: fine under 'any'
    assert len(rewind_list_from_dict(d).heads) == 2


def test_invalid_json_and_missing_file(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    with pytest.raises(RewindListError, match=r"x\.json: not valid JSON \(line 1"):
        read_rewind_list(bad)
    with pytest.raises(RewindListError, match="not found"):
        read_rewind_list(tmp_path / "nope.json")


def test_write_refuses_invalid_list_and_leaves_old_file(tmp_path):
    path = write_rewind_list(_list(), tmp_path / "r.json")
    before = path.read_bytes()
    with pytest.raises(RewindListError, match="kv group"):
        write_rewind_list(_list(heads=[HeadEntry(0, 0, ("q", "k"), 0.1)]), path)
    assert path.read_bytes() == before


def test_stale_fingerprints():
    rl = _list()
    assert check_fresh(rl, {"base": "fpb", "target": "fpt"}) == []
    with pytest.raises(RewindListError, match=r"stale list: the target \(/ck/target\) changed.*--force"):
        check_fresh(rl, {"base": "fpb", "target": "other"}, source="r.json")
    assert check_fresh(rl, {"base": "x", "target": "other"}, force=True) == ["base", "target"]


def test_format_constant():
    assert FORMAT == "diffract-rewind/1"

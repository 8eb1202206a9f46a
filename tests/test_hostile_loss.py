"""Hostile input to the Rewind view's loss (issue 11 items 5 and 7): empty, binary and too-short texts, the same
text twice, no text at all, and a rewind list whose optional `losses` field is malformed — each one line naming the
file (and the field), nothing crashes. The app-level counterparts (status-bar lines, no transformers) are pilot
tests in tests/test_app_loss.py."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from analysis.edit.rewind_list import rewind_list_from_dict  # noqa: E402
from analysis.errors import DiffractError, RewindListError  # noqa: E402
from analysis.run.loss_preview import add_text, named_texts  # noqa: E402
from analysis.run.session import ExplorerSession  # noqa: E402
from tiny_cpt import family  # noqa: E402,F401  (the session fixture)

T, N = 64, 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # evaluations compare bit for bit


@pytest.fixture(scope="module")
def session(family, tmp_path_factory):
    s = ExplorerSession.open([family.base, family.code], device="cpu", cache_dir=tmp_path_factory.mktemp("cache"))
    yield s
    s.close()


@pytest.mark.parametrize("bad, fragment", [
    ("notalist", "field 'losses': expected a list"),
    ([{"text": "a", "role": "other", "text_sha256": "x", "loss": 1, "base": 1, "target": 1, "windows": 1,
       "tokens": 2}], "field 'losses[0].role'"),
    ([{"text": "a", "role": "domain", "text_sha256": "x", "loss": "1", "base": 1, "target": 1, "windows": 1,
       "tokens": 2}], "field 'losses[0].loss': expected a number"),
    ([{"text": "a", "role": "domain", "text_sha256": "x", "loss": 1, "base": 1, "target": 1, "windows": 0,
       "tokens": 2}], "field 'losses[0].windows': must be ≥ 1"),
])
def test_a_malformed_losses_field_is_one_line(session, tmp_path, bad, fragment):
    rl, _ = session.rewind_plan(session.rewind_inputs(0), 0, None, pattern="greedy", fraction=0.25, heads=None,
                                gqa_policy="group", variant="lowest")
    data = rl.to_dict()
    data["losses"] = bad
    with pytest.raises(RewindListError) as err:
        rewind_list_from_dict(data, tmp_path / "x.json")
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_texts_are_named_by_file_and_bad_ones_are_one_line(family, tmp_path):
    """Two files named alike get their trailing paths; the same file twice, an empty or a binary file is one
    DiffractError naming the file, at run time (add_text) and at launch (ExplorerSession.open)."""
    a = tmp_path / "a" / "code.txt"
    a.parent.mkdir()
    a.write_text("x = 1\n" * 50, encoding="utf-8")
    texts = named_texts([family.code_text, a], [family.prose_text])
    assert [(t.name, r) for t, r in texts] == [(f"{family.root.name}/code.txt", "domain"), ("a/code.txt", "domain"),
                                              ("prose.txt", "general")]
    more = add_text(named_texts([family.code_text]), family.prose_text, "general")
    assert [(t.name, r) for t, r in more] == [("code.txt", "domain"), ("prose.txt", "general")]
    with pytest.raises(DiffractError, match="already a domain text"):
        add_text(more, family.code_text, "domain")
    empty, binary = tmp_path / "empty.txt", tmp_path / "bin.txt"
    empty.write_text("  \n", encoding="utf-8")
    binary.write_bytes(b"ab\0cd")
    for path, fragment in ((empty, "the text is empty"), (binary, "binary")):
        with pytest.raises(DiffractError) as err:
            add_text(more, path, "domain")
        assert fragment in str(err.value) and str(path) in str(err.value)
        with pytest.raises(DiffractError, match=fragment):
            ExplorerSession.open([family.base, family.code], device="cpu", cache_dir=tmp_path / "c",
                                 texts=[path])


def test_a_text_shorter_than_one_window_and_no_text_are_one_line(family, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("def f(): pass\n", encoding="utf-8")
    s = ExplorerSession.open([family.base, family.code], device="cpu", cache_dir=tmp_path / "c")
    try:
        s.eval_tokens = T
        inputs = s.rewind_inputs(0)
        with pytest.raises(DiffractError, match="no text to evaluate"):
            s.loss_preview(inputs, 0, windows=N)
        s.add_eval_text(short, "domain")
        with pytest.raises(DiffractError) as err:
            s.loss_preview(inputs, 0, windows=N)
        assert "fewer than one window of 64" in str(err.value) and "short.txt" in str(err.value)
    finally:
        s.close()

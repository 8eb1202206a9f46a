"""Hostile GGUF input to `eval` (issue 11 item 2 with issue 12's GGUF reader): a GGUF file without tokenizer
metadata — one line on stderr naming the file, exit 1, no output written, the file byte-identical."""

from __future__ import annotations

import hashlib

import pytest
from conftest import llama_checkpoint
from gguf_models import write_llama_gguf

pytest.importorskip("transformers")
pytest.importorskip("gguf")

from diffract_tui.cli import main  # noqa: E402


def test_eval_of_a_gguf_without_a_tokenizer_is_one_line(tmp_path, capsys):
    config, tensors = llama_checkpoint(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=96, vocab=50)
    model = write_llama_gguf(tmp_path / "m.gguf", config, tensors, "F32", tokens=50)  # tokens, no tokenizer model
    text = tmp_path / "t.txt"
    text.write_text("some held-out text " * 50, encoding="utf-8")
    out = tmp_path / "loss.csv"
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (model, text)}
    capsys.readouterr()
    assert main(["eval", str(model), "--text", str(text), "--tokens", "8", "--windows", "2", "--out", str(out),
                 "--no-cache", "--device", "cpu"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("diffract-tui: error: ") and err[0].count("m.gguf") == 1, err[0]
    assert "m.gguf: the GGUF file holds no tokenizer (no tokenizer.ggml.* metadata)" in err[0], err[0]
    assert not out.exists()
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (model, text)} == before

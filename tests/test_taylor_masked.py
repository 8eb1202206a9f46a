"""The Taylor head score (SPEC §9) of a masked LM: a tiny BertForMaskedLM pair (base, and a target = base + a small
perturbation of every weight) with a word-level tokenizer that loads offline (`tokenizers` WordLevel wrapped as a
transformers PreTrainedTokenizerFast, saved into each checkpoint folder). The engine's grid must equal s_h computed
independently: transformers' own masked-LM loss (`labels` with −100 off the mask) on the same masked windows, one
backward, and g·(θ₀ − θ_d) summed by hand over head h's query/key/value rows and biases and its output columns
(BERT has no GQA, so G = 1)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from analysis.eval.evaluator import prepare_text  # noqa: E402
from analysis.eval.loss import evaluate, load_model, mlm_mask  # noqa: E402
from analysis.eval.taylor import taylor_scores  # noqa: E402
from analysis.eval.texts import load_text  # noqa: E402
from analysis.io.checkpoint import open_checkpoint  # noqa: E402
from analysis.model.architecture import layout_of  # noqa: E402

LAYERS, HIDDEN, HEADS = 2, 32, 4
T, N = 32, 8
WORDS = [f"w{i}" for i in range(40)]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # evaluations compare bit for bit


def word_tokenizer() -> "transformers.PreTrainedTokenizerFast":
    """A whitespace word-level tokenizer over WORDS with BERT's special tokens (the mask token included)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                                cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


@pytest.fixture(scope="module")
def bert_pair(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(base folder, target folder, text file): the target is the base with every weight moved by 2 % noise."""
    root = tmp_path_factory.mktemp("bert")
    tok = word_tokenizer()
    config = transformers.BertConfig(vocab_size=len(SPECIAL) + len(WORDS), hidden_size=HIDDEN,
                                     num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=64,
                                     max_position_embeddings=64, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(config).eval()
    for name, folder in (("base", root / "base"), ("target", root / "target")):
        if name == "target":
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.02 * torch.randn(p.shape, generator=g))
        model.save_pretrained(folder, safe_serialization=True)
        tok.save_pretrained(folder)
    state = 12345
    words = []
    for _ in range(T * N + 50):  # a deterministic word stream (an LCG), enough for N windows of T words
        state = (1103515245 * state + 12345) % (1 << 31)
        words.append(WORDS[(state >> 16) % len(WORDS)])
    text = root / "text.txt"
    text.write_text(" ".join(words), encoding="utf-8")
    return root / "base", root / "target", text


def independent_scores(base: Path, target: Path, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(L × H) s_h from transformers' own masked-LM loss and backward, summed by hand over h's slices."""
    b_model = transformers.BertForMaskedLM.from_pretrained(str(base), local_files_only=True)
    model = transformers.BertForMaskedLM.from_pretrained(str(target), local_files_only=True).eval()
    mask_id = word_tokenizer().mask_token_id
    loss = model(input_ids=ids.masked_fill(mask, mask_id), labels=ids.masked_fill(~mask, -100)).loss
    loss.backward()
    d = HIDDEN // HEADS
    theta0 = {n: p.detach().double() for n, p in b_model.named_parameters()}
    scores = torch.zeros(LAYERS, HEADS, dtype=torch.float64)
    for n, p in model.named_parameters():
        if ".attention." not in n or p.grad is None:
            continue
        layer = int(n.split("encoder.layer.")[1].split(".")[0])
        prod = p.grad.double() * (theta0[n] - p.detach().double())
        for h in range(HEADS):
            rows = slice(h * d, (h + 1) * d)
            if ".attention.self." in n:  # query/key/value weight rows and bias entries of head h
                scores[layer, h] += prod[rows].sum()
            elif n.endswith("attention.output.dense.weight"):  # the output columns that read head h
                scores[layer, h] += prod[:, rows].sum()
    return scores


def test_the_taylor_score_of_a_masked_lm_equals_transformers_own_backward(bert_pair) -> None:
    base, target, text = bert_pair
    lm = load_model(target, device=torch.device("cpu"), dtype=torch.float32)
    assert lm.kind == "masked"
    et = prepare_text(lm, load_text(text), T, N, "general")
    tok = word_tokenizer()
    ids = torch.tensor(tok(text.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"][:T * N])
    assert torch.equal(et.windows.ids, ids.view(N, T))  # the same windows, tokenised independently
    mask = mlm_mask(et.windows.ids, 0)
    grid = taylor_scores(lm, open_checkpoint(base), layout_of(open_checkpoint(target)), [et])
    expected = independent_scores(base, target, et.windows.ids, mask)
    assert grid.shape == (LAYERS, HEADS) and grid.dtype == torch.float64
    assert expected.abs().min() > 0 and len({round(float(v), 12) for v in expected.flatten()}) == LAYERS * HEADS
    torch.testing.assert_close(grid, expected, rtol=1e-5, atol=1e-7 * float(expected.abs().max()))
    # and the loss the gradient is of is transformers' own masked-LM loss on those windows
    with torch.no_grad():
        hf = transformers.BertForMaskedLM.from_pretrained(str(target), local_files_only=True).eval()
        hf_loss = hf(input_ids=ids.view(N, T).masked_fill(mask, tok.mask_token_id),
                     labels=ids.view(N, T).masked_fill(~mask, -100)).loss
    assert evaluate(lm, et.windows).loss == pytest.approx(float(hf_loss), rel=1e-5)

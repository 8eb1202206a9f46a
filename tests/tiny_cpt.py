"""A tiny real continual pre-training family, trained in seconds on one CPU core from text that ships with
every Python: a byte-level BPE tokenizer (the `tokenizers` library, wrapped as a transformers
PreTrainedTokenizerFast), a 2-layer Llama with GQA (hidden 64, 4 query / 2 kv heads) trained from scratch on
English prose (`pydoc_data.topics`), then continued on code (the text of standard-library .py files), and a
second CPT on other code (the `reference` domain). Saved as real Hugging Face folders with tokenizer files.

`build_family(root)` writes root/{base,code,code2} and the held-out texts root/{prose,code}.txt; a folder that
already holds a finished family (its recipe stamp matches) is reused, so a test session trains once.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

RECIPE = "tiny-cpt/6"
SEQ = 64
VOCAB = 384
# stdlib sources: CPT training, the second (reference) CPT, and the held-out code text
TRAIN_CODE = ("textwrap.py", "shlex.py", "bisect.py", "heapq.py", "fnmatch.py", "glob.py", "colorsys.py")
TRAIN_CODE2 = ("string.py", "keyword.py", "stat.py", "queue.py", "netrc.py", "sched.py")
HELDOUT_CODE = ("calendar.py", "base64.py")


@dataclass(frozen=True)
class Family:
    """Where the family lives: three checkpoint folders and two held-out texts."""

    root: Path
    base: Path
    code: Path
    code2: Path
    prose_text: Path
    code_text: Path


def _stdlib(names: tuple[str, ...]) -> str:
    """The concatenated text of some standard-library modules."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    return "\n\n".join((lib / n).read_text(encoding="utf-8") for n in names)


def _prose() -> tuple[str, str]:
    """(training prose, held-out prose) from pydoc_data.topics, split by topic."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    held = set(keys[::8])
    train = "\n\n".join(topics[k] for k in keys if k not in held)
    test = "\n\n".join(topics[k] for k in keys if k in held)
    return train, test


def _tokenizer(corpus: list[str]):
    """A byte-level BPE tokenizer trained on `corpus`, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", model_max_length=1 << 30)


def _train(model, ids, steps: int, lr: float, seed: int, batch: int = 8) -> None:
    """Plain AdamW next-token training on random windows of `ids` (seeded)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, ids.numel() - SEQ - 1, (batch,), generator=g)
        x = torch.stack([ids[s:s + SEQ] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _stamp() -> str:
    return hashlib.sha256(f"{RECIPE}|{TRAIN_CODE}|{TRAIN_CODE2}|{HELDOUT_CODE}".encode()).hexdigest()[:16]


def _family(root: Path) -> Family:
    return Family(root=root, base=root / "base", code=root / "code", code2=root / "code2",
                  prose_text=root / "prose.txt", code_text=root / "code.txt")


def shared_root() -> Path:
    """The family's folder in the system temp dir, named by the recipe (reused across test sessions)."""
    import tempfile

    return Path(tempfile.gettempdir()) / f"diffract-tiny-cpt-{_stamp()}"


def build_family(root: Path | None = None) -> Family:
    """Train (or reuse) the family under `root` (default `shared_root()`); built in a temp sibling folder and
    renamed into place, so a half-built family is never reused."""
    import os
    import shutil

    root = Path(root) if root is not None else shared_root()
    stamp = root / "recipe.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("stamp") == _stamp():
        return _family(root)
    work = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    _train_family(_family(work))
    (work / "recipe.json").write_text(json.dumps({"stamp": _stamp()}))
    shutil.rmtree(root, ignore_errors=True)
    try:
        os.replace(work, root)
    except OSError:  # another session finished first: use theirs
        shutil.rmtree(work, ignore_errors=True)
    return _family(root)


def _train_family(fam: Family) -> None:
    """Tokenizer, base and the two CPTs, saved under `fam.root` (~10-40 s on one core)."""
    import torch
    import transformers

    fam.root.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        prose_train, prose_test = _prose()
        code_train, code2_train = _stdlib(TRAIN_CODE), _stdlib(TRAIN_CODE2)
        tok = _tokenizer([prose_train, code_train])
        enc = lambda s: torch.tensor(tok(s, add_special_tokens=False)["input_ids"], dtype=torch.long)  # noqa: E731
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=SEQ * 4, tie_word_embeddings=False,
                                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        model = transformers.LlamaForCausalLM(cfg)
        _train(model, enc(prose_train), steps=120, lr=6e-3, seed=1)
        model.save_pretrained(fam.base)
        tok.save_pretrained(fam.base)
        for folder, text, seed in ((fam.code, code_train, 2), (fam.code2, code2_train, 3)):
            cpt = transformers.LlamaForCausalLM.from_pretrained(fam.base)
            _train(cpt, enc(text), steps=50, lr=1e-3, seed=seed)
            cpt.save_pretrained(folder)
            tok.save_pretrained(folder)
        fam.prose_text.write_text(prose_test, encoding="utf-8")
        fam.code_text.write_text(_stdlib(HELDOUT_CODE), encoding="utf-8")
    finally:
        torch.set_num_threads(threads)


try:  # the fixture, for the test modules that import it (tests/test_eval.py, tests/test_hostile_eval.py)
    import pytest

    @pytest.fixture(scope="session")
    def family() -> Family:
        """The tiny CPT family (trained once on one thread, then reused from the system temp folder)."""
        return build_family()
except ImportError:  # pragma: no cover - build_family works without pytest
    pass

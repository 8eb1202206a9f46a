"""Two real tiny models trained on first use in seconds on one CPU core, from text that ships with every Python,
so the demo's loss preview (Rewind view) and Evolution view show something true (issues 11 and 12):

- the **CPT family** (`build_cpt_family`): a byte-level BPE tokenizer (the `tokenizers` library, wrapped as a
  transformers PreTrainedTokenizerFast), a 2-layer Llama with GQA (hidden 64, 4 query / 2 kv heads) trained from
  scratch on English prose (`pydoc_data.topics`), then continued on code (the text of standard-library .py files),
  and a second CPT on other code (the `reference` domain); root/{base,code,code2} as real Hugging Face folders with
  tokenizer files, and the held-out texts root/{prose,code}.txt;
- the **series** (`build_series`): a real short training run of a 2-layer GQA Llama on `pydoc_data.topics` with
  byte-level tokens (vocab 256), saved at steps 0, 10, 20, 30 and 40 under names in the formats real runs use.

Each build is deterministic (fixed seeds, one thread) and atomic: trained into a temp folder beside the root,
stamped last, renamed into place; a root whose recipe stamp matches is reused, and what a killed build left
(an unstamped temp folder) is never reused and is removed by the next build. torch, transformers and tokenizers
are imported only when a model is trained.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analysis.errors import DiffractError
from analysis.io.atomic import (TMP_PREFIX, owner_tag, remove_path, remove_stale_temp_files,
                                sigterm_as_interrupt)

STAMP_FILE = "recipe.json"
# a callback told, before any training starts, which folder is about to be trained (the demo's one line)
Announce = Callable[[Path], None]

# ---- the CPT family's recipe ----------------------------------------------------------------------------
CPT_RECIPE = "tiny-cpt/6"
CPT_SEQ = 64
CPT_VOCAB = 384
# stdlib sources: CPT training, the second (reference) CPT, and the held-out code text
TRAIN_CODE = ("textwrap.py", "shlex.py", "bisect.py", "heapq.py", "fnmatch.py", "glob.py", "colorsys.py")
TRAIN_CODE2 = ("string.py", "keyword.py", "stat.py", "queue.py", "netrc.py", "sched.py")
HELDOUT_CODE = ("calendar.py", "base64.py")

# ---- the series' recipe ---------------------------------------------------------------------------------
SERIES_RECIPE = "series-run/1"
SERIES_SEQ, SERIES_BATCH = 64, 8
# step → folder name, in the formats real runs use (tokens = step × BATCH × SEQ, rounded as runs name them)
SERIES_NAMES = {0: "step-0", 10: "checkpoint-10", 20: "stage1-step20-tokens10K", 30: "global_step30",
                40: "run-step40-20K"}
SERIES_TOKENS = {0: None, 10: None, 20: 10_000, 30: None, 40: 20_000}


@dataclass(frozen=True)
class Family:
    """Where the CPT family lives: three checkpoint folders and two held-out texts."""

    root: Path
    base: Path
    code: Path
    code2: Path
    prose_text: Path
    code_text: Path


@dataclass(frozen=True)
class SeriesRun:
    """The run's folder and its checkpoints by step."""

    root: Path
    paths: dict[int, Path]


# ------------------------------------------------------------------------------------------------
# Dependencies and the atomic build
# ------------------------------------------------------------------------------------------------


def require_training(tokenizers: bool) -> None:
    """Fail with one line when transformers (and, for a tokenizer, tokenizers) cannot be imported: the `eval`
    extra; checked only when a model must be trained (a finished build opens without them)."""
    from analysis.eval.loss import INSTALL_HINT

    needed = ["transformers", "tokenizers"] if tokenizers else ["transformers"]
    for name in needed:
        try:
            __import__(name)
        except ImportError:
            raise DiffractError(f"training the demo's tiny models needs {' and '.join(needed)}, "
                                f"and {name} is not installed", hint=f"run {INSTALL_HINT}") from None


def stamp_matches(root: Path, stamp: dict[str, str]) -> bool:
    """Whether `root` holds a finished build of this recipe (its stamp file, written last, says so)."""
    try:
        return json.loads((root / STAMP_FILE).read_text(encoding="utf-8")) == stamp
    except (OSError, ValueError):
        return False


def _temp_sibling(root: Path) -> Path:
    """A fresh temp name beside `root` that `remove_stale_temp_files(root)` removes once its process is dead."""
    return root.with_name(f"{TMP_PREFIX}{owner_tag()}-{secrets.token_hex(8)}-{root.name}")


def _rename_into_place(work: Path, root: Path, stamp: dict[str, str]) -> None:
    """Rename the finished `work` to `root`; a finished build already there (another process) is kept, an old or
    foreign one is renamed aside first and removed."""
    if stamp_matches(root, stamp):
        return
    if root.exists() or root.is_symlink():
        aside = _temp_sibling(root)
        os.rename(root, aside)
        remove_path(aside)
    try:
        os.rename(work, root)
    except OSError:
        if not stamp_matches(root, stamp):  # not a concurrent build that finished first: a real failure
            raise


def build_once(root: Path, stamp: dict[str, str], train: Callable[[Path], None],
               announce: Announce | None = None, needs: Callable[[], None] | None = None) -> bool:
    """Reuse `root` when its stamp matches, else check `needs()` (the dependencies), `train(folder)` into a temp
    sibling, stamp it and rename it to `root`; True when it trained. A failure or kill leaves no stamped folder,
    so nothing half-made is reused."""
    root = Path(root)
    if stamp_matches(root, stamp):
        return False
    if needs is not None:
        needs()
    root.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(root)
    if announce is not None:
        announce(root)
    work = _temp_sibling(root)
    try:
        with sigterm_as_interrupt():
            work.mkdir()
            train(work)
            (work / STAMP_FILE).write_text(json.dumps(stamp), encoding="utf-8")
            _rename_into_place(work, root, stamp)
    except OSError as err:
        raise DiffractError(f"cannot write the demo's tiny models ({err.strerror or err})", path=root,
                            hint="check that you may write there, or pass --cache-dir DIR") from None
    finally:
        remove_path(work)  # a failed build's leftovers (nothing once renamed)
    return True


@contextlib.contextmanager
def _training_scope() -> Iterator[None]:
    """torch on one thread inside (bit-for-bit reproducible training) and transformers' save/load bars off
    (the demo prints one line, not a bar per folder); both as they were after."""
    import torch
    import transformers

    from analysis.eval.loss import quiet_loading

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with quiet_loading(transformers):
            yield
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------
# The CPT family
# ------------------------------------------------------------------------------------------------


def cpt_stamp() -> str:
    """The CPT recipe's stamp: its version and the source files it trains and tests on."""
    return hashlib.sha256(f"{CPT_RECIPE}|{TRAIN_CODE}|{TRAIN_CODE2}|{HELDOUT_CODE}".encode()).hexdigest()[:16]


def cpt_family_at(root: Path) -> Family:
    """The family's paths under `root` (whether or not it is built)."""
    root = Path(root)
    return Family(root=root, base=root / "base", code=root / "code", code2=root / "code2",
                  prose_text=root / "prose.txt", code_text=root / "code.txt")


def build_cpt_family(root: str | Path, announce: Announce | None = None) -> Family:
    """Train (or reuse) the tiny CPT family under `root` (~10-40 s on one core the first time)."""
    root = Path(root)
    build_once(root, {"stamp": cpt_stamp()}, lambda work: _train_family(cpt_family_at(work)), announce,
               needs=lambda: require_training(tokenizers=True))
    return cpt_family_at(root)


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


def _tokenizer(corpus: list[str]) -> Any:
    """A byte-level BPE tokenizer trained on `corpus`, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=CPT_VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", model_max_length=1 << 30)


def _train(model: Any, ids: Any, steps: int, lr: float, seed: int, batch: int = 8) -> None:
    """Plain AdamW next-token training on random windows of `ids` (seeded)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, ids.numel() - CPT_SEQ - 1, (batch,), generator=g)
        x = torch.stack([ids[s:s + CPT_SEQ] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _train_family(fam: Family) -> None:
    """Tokenizer, base and the two CPTs, saved under `fam.root`."""
    import torch
    import transformers

    fam.root.mkdir(parents=True, exist_ok=True)
    with _training_scope():
        prose_train, prose_test = _prose()
        code_train, code2_train = _stdlib(TRAIN_CODE), _stdlib(TRAIN_CODE2)
        tok = _tokenizer([prose_train, code_train])
        enc = lambda s: torch.tensor(tok(s, add_special_tokens=False)["input_ids"], dtype=torch.long)  # noqa: E731
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=CPT_SEQ * 4, tie_word_embeddings=False,
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


# ------------------------------------------------------------------------------------------------
# The series
# ------------------------------------------------------------------------------------------------


def series_at(root: Path) -> SeriesRun:
    """The run's checkpoint paths under `root` (whether or not it is built)."""
    root = Path(root)
    return SeriesRun(root=root, paths={s: root / n for s, n in SERIES_NAMES.items()})


def build_series(root: str | Path, announce: Announce | None = None) -> SeriesRun:
    """Train (or reuse) the checkpoint series under `root` (seconds on one core the first time)."""
    root = Path(root)
    build_once(root, {"recipe": SERIES_RECIPE}, _train_series, announce,
               needs=lambda: require_training(tokenizers=False))
    return series_at(root)


def _train_series(folder: Path) -> None:
    """AdamW next-token training on one thread, saving at every step in SERIES_NAMES."""
    import torch
    import transformers
    from pydoc_data.topics import topics

    seq, batch = SERIES_SEQ, SERIES_BATCH
    with _training_scope():
        ids = torch.tensor(list("\n\n".join(topics[k] for k in sorted(topics)).encode()), dtype=torch.long)
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq * 2,
                                       tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(cfg)
        g = torch.Generator().manual_seed(1)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        for step in range(max(SERIES_NAMES) + 1):
            if step in SERIES_NAMES:
                model.save_pretrained(folder / SERIES_NAMES[step])
            if step == max(SERIES_NAMES):
                break
            starts = torch.randint(0, ids.numel() - seq - 1, (batch,), generator=g)
            x = torch.stack([ids[s:s + seq] for s in starts.tolist()])
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()

"""Token windows (SPEC §9): the whole text tokenised once with the checkpoint's own tokenizer, without
special tokens; the first N consecutive, non-overlapping windows of T tokens."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from analysis.errors import DiffractError
from analysis.eval.texts import Text

DEFAULT_TOKENS = 512
DEFAULT_WINDOWS = 64
# the files a Hugging Face tokenizer is made of (hashed into the cache key)
TOKENIZER_PATTERNS = ("tokenizer*.json", "tokenizer.model", "vocab*", "merges.txt", "special_tokens_map.json",
                      "added_tokens.json", "spiece.model", "sentencepiece*.model", "*.tiktoken")
_CORE = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "merges.txt")


def tokenizer_files(folder: Path) -> list[Path]:
    """The tokenizer files of a checkpoint folder, sorted (empty when it has none)."""
    found: set[Path] = set()
    for pattern in TOKENIZER_PATTERNS:
        found.update(p for p in folder.glob(pattern) if p.is_file())
    return sorted(found)


def tokenizer_hash(folder: Path) -> str:
    """sha256 over the names and bytes of the tokenizer files: a retrained tokenizer is a new cache key."""
    h = hashlib.sha256()
    for f in tokenizer_files(folder):
        h.update(f.name.encode("utf-8") + b"\0")
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def load_tokenizer(folder: Path) -> Any:
    """The checkpoint's own tokenizer (transformers AutoTokenizer, local files only)."""
    from analysis.eval.loss import require_transformers

    transformers = require_transformers()
    files = {f.name for f in tokenizer_files(folder)}
    if not files & set(_CORE) and not any(n.endswith(".tiktoken") or n.endswith(".model") for n in files):
        raise DiffractError("no tokenizer in the checkpoint folder", path=folder,
                            hint="copy the model's tokenizer files (tokenizer.json, …) into the folder")
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:  # transformers raises many kinds; one line is the contract
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DiffractError(f"transformers cannot load the tokenizer ({msg[:160]})", path=folder,
                            hint="check the tokenizer files in the folder") from None
    tok.model_max_length = 1 << 62  # we window ourselves; silence the "sequence too long" warning
    return tok


def gguf_tokenizer_hash(file: Path) -> str:
    """sha256 of a GGUF file's header, metadata and tensor table: its tokenizer lives in that metadata."""
    from analysis.io.readers.gguf_file import GGUFFile

    return hashlib.sha256(GGUFFile(file).fingerprint_bytes()).hexdigest()


def load_gguf_tokenizer(file: Path) -> Any:
    """The tokenizer stored in a GGUF file's metadata (`tokenizer.ggml.*`), built by transformers (gguf_file=)."""
    from analysis.eval.loss import require_transformers
    from analysis.io.readers.gguf_file import GGUFFile

    transformers = require_transformers()
    if "tokenizer.ggml.model" not in GGUFFile(file).metadata:
        raise DiffractError("the GGUF file holds no tokenizer (no tokenizer.ggml.* metadata)", path=file,
                            hint="evaluate a GGUF converted with its tokenizer, or the model's Hugging Face folder")
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name,
                                                         local_files_only=True)
    except Exception as err:  # transformers raises many kinds; one line is the contract
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DiffractError(f"transformers cannot build the GGUF file's tokenizer ({msg[:160]})", path=file,
                            hint="evaluate the model's Hugging Face folder instead") from None
    tok.model_max_length = 1 << 62  # we window ourselves
    return tok


@dataclass(frozen=True)
class Windows:
    """The evaluation windows of one text: ids (n × T), how many were asked for and the text's token count."""

    ids: torch.Tensor
    tokens: int
    requested: int
    text_tokens: int

    @property
    def count(self) -> int:
        return int(self.ids.shape[0])

    @property
    def short(self) -> bool:
        """True when the text held fewer than the requested windows."""
        return self.count < self.requested


def tokenize(tokenizer: Any, text: Text) -> torch.Tensor:
    """The whole text's token ids (int64), without special tokens."""
    ids = tokenizer(text.content, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def make_windows(ids: torch.Tensor, tokens: int, windows: int, *, context: int | None, text: Text,
                 model: Path | None = None) -> Windows:
    """The first `windows` non-overlapping windows of `tokens` tokens; fewer when the text is short."""
    if tokens < 2:
        raise DiffractError(f"--tokens {tokens} is too small", hint="a window needs at least 2 tokens")
    if windows < 1:
        raise DiffractError(f"--windows {windows} must be at least 1", hint="pass --windows 1 or more")
    if context is not None and tokens > context:
        raise DiffractError(f"--tokens {tokens} is larger than the model's context of {context} tokens", path=model,
                            hint=f"pass --tokens {context} or less")
    n = min(windows, ids.numel() // tokens)
    if n == 0:
        raise DiffractError(f"the text has {ids.numel()} tokens, fewer than one window of {tokens}", path=text.path,
                            hint="pass a longer text or a smaller --tokens")
    return Windows(ids=ids[: n * tokens].view(n, tokens).clone(), tokens=tokens, requested=windows,
                   text_tokens=int(ids.numel()))

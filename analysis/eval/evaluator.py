"""Cached evaluation (SPEC §9): the loss of the live model on a prepared text, keyed by the checkpoint's
fingerprint, the text's sha256, the tokenizer files' hash, T, N, dtype, device kind and what was patched."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from analysis.eval.loss import EvalProgress, LoadedModel, LossResult, evaluate
from analysis.eval.texts import Text
from analysis.eval.windows import Windows, make_windows, tokenize

ROLES = ("domain", "general")


@dataclass(frozen=True)
class EvalText:
    """A text tokenised with the model's tokenizer and cut into windows, with its role (domain or general)."""

    text: Text
    windows: Windows
    role: str = "domain"

    @property
    def name(self) -> str:
        return self.text.name


def prepare_text(lm: LoadedModel, text: Text, tokens: int, windows: int, role: str = "domain") -> EvalText:
    """Tokenise once and cut the windows; T beyond the context or a too-short text is one error."""
    ids = tokenize(lm.tokenizer, text)
    return EvalText(text=text, windows=make_windows(ids, tokens, windows, context=lm.context, text=text,
                                                    model=lm.folder), role=role)


class Evaluator:
    """Loss of the live model, served from the cache when the same (model, text, settings, patch) was seen."""

    def __init__(self, lm: LoadedModel, fingerprint: str, cache: Any = None, *, seed: int = 0,
                 progress: EvalProgress | None = None):
        self.lm = lm
        self.fingerprint = fingerprint
        self.cache = cache
        self.seed = seed
        self.progress = progress
        self.hits = 0
        self.misses = 0

    def key(self, et: EvalText, patched: Any) -> str:
        """The cache key of one evaluation (`patched` describes what differs from the loaded checkpoint)."""
        from analysis.run.cache import cache_key

        settings = {"text_sha256": et.text.sha256, "tokenizer_sha256": self.lm.tokenizer_hash,
                    "tokens": et.windows.tokens, "windows": et.windows.requested, "kind": self.lm.kind,
                    "mlm_seed": self.seed if self.lm.kind == "masked" else None, "patched": patched}
        return cache_key(fingerprint=self.fingerprint, tensor="", operation="eval/loss", settings=settings,
                         dtype=self.lm.dtype_name, device_kind=self.lm.device.type)

    def loss(self, et: EvalText, patched: Any = None) -> LossResult:
        """The loss on `et` of the model as it is now (the caller has applied `patched`)."""
        key = self.key(et, patched) if self.cache is not None else None
        if key is not None:
            hit = self.cache.get_json(key)
            cached = None
            if isinstance(hit, dict):
                try:
                    cached = LossResult.from_dict(hit)
                except (KeyError, TypeError, ValueError):  # an entry of another shape: recompute it
                    cached = None
            if cached is not None:
                self.hits += 1
                return cached
        self.misses += 1
        result = evaluate(self.lm, et.windows, seed=self.seed, progress=self.progress)
        if key is not None:
            self.cache.put_json(key, result.to_dict())
        return result

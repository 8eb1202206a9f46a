"""The model's own loss on token windows (SPEC §9): build the model with transformers from the checkpoint
folder (causal LMs; masked LMs with an MLM head), mean next-token cross-entropy over all predicted tokens
(T − 1 per window, transformers' `labels=input_ids` convention), perplexity exp(loss). Masked LMs: the mean
MLM loss over a seeded 15 % of positions (each replaced by the mask token)."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from analysis.errors import DiffractError
from analysis.progress import Progress
from analysis.eval.windows import Windows, gguf_tokenizer_hash, load_gguf_tokenizer, load_tokenizer, tokenizer_hash

INSTALL_HINT = "pip install 'diffract-tui[eval]'"
MLM_FRACTION = 0.15
_ENCODERS = ("bert", "roberta", "xlm-roberta")
# the engine's one protocol (analysis/progress.py): progress(done, total, text); the text here is the time left
EvalProgress = Progress


def eta_text(start: float, done: int, total: int) -> str:
    """'ETA n s' from the time since `start` after `done` of `total` steps (the text of an eval progress call)."""
    left = (time.monotonic() - start) / done * (total - done) if done else 0.0
    return f"ETA {left:.0f} s"


def require_transformers() -> Any:
    """The transformers module, or one line saying what to install."""
    try:
        import transformers
    except ImportError:
        raise DiffractError("evaluating a model needs transformers, which is not installed",
                            hint=f"run {INSTALL_HINT}") from None
    transformers.logging.set_verbosity_error()
    return transformers


@contextlib.contextmanager
def quiet_loading(transformers: Any) -> Iterator[None]:
    """transformers' weight-loading bars off while a model loads, and back as they were after: switching them
    off for good would also silence huggingface_hub's download progress elsewhere in the process."""
    logging = transformers.utils.logging
    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU, float32 on the CPU (SPEC §9 defaults)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def parse_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """--dtype bfloat16|float32 (None: the device's default)."""
    if name is None or name == "auto":
        return default_dtype(device)
    table = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}
    if name not in table:
        raise DiffractError(f"--dtype {name!r} is not bfloat16 or float32", hint="pass --dtype bfloat16 or float32")
    return table[name]


@dataclass
class LoadedModel:
    """A model built from a checkpoint folder, with its tokenizer and what the cache key needs."""

    model: Any                # None when loaded with weights=False (config and tokenizer only)
    kind: str                 # "causal" | "masked"
    folder: Path              # the checkpoint folder, or the GGUF file
    tokenizer: Any
    tokenizer_hash: str
    context: int | None
    device: torch.device
    dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def _model_kind(config: dict, keys: set[str], folder: Path) -> str:
    """causal or masked, from config.json's architectures / model_type and the stored head tensors."""
    archs = [str(a) for a in config.get("architectures") or []]
    if any(a.endswith("ForMaskedLM") for a in archs):
        return "masked"
    if str(config.get("model_type", "")) in _ENCODERS:
        if any(k.startswith(("cls.predictions", "lm_head")) for k in keys):
            return "masked"
        raise DiffractError("the encoder checkpoint has no MLM head (no cls.predictions / lm_head weights), so it "
                            "has no loss to evaluate", path=folder, hint="evaluate a checkpoint with a language-model head")
    return "causal"


def _context(config: Any) -> int | None:
    """The model's context length from its config (max_position_embeddings, n_positions or n_ctx)."""
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        v = getattr(config, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:200]


def _gguf_file(ck: Any) -> Path | None:
    """The GGUF weight file of a checkpoint opened from one (its config comes from GGUF metadata), else None."""
    if "gguf" not in ck.config:
        return None
    files = {ck.info(k).file for k in ck.keys()}
    return next(iter(files)) if len(files) == 1 else None


def _build(cls: Any, folder: Path, transformers: Any, *, dtype: torch.dtype, where: Path, **kwargs: Any) -> Any:
    """`cls.from_pretrained(folder, …)` with every failure one line, and no weight the model needs missing."""
    try:
        with quiet_loading(transformers):
            model, info = cls.from_pretrained(str(folder), dtype=dtype, local_files_only=True,
                                              output_loading_info=True, **kwargs)
    except Exception as err:  # any failure to build is one line (the contract of SPEC §9 / issue 11 item 7)
        raise DiffractError(f"transformers cannot build this model ({_one_line(err)})", path=where,
                            hint="evaluate a causal LM, or a masked LM with its MLM head") from None
    missing = list(info.get("missing_keys") or [])
    if missing:
        raise DiffractError(f"the checkpoint lacks {len(missing)} weight(s) the model needs (e.g. {missing[0]}), "
                            "so its loss would be that of random weights", path=where,
                            hint="evaluate a checkpoint with all its weights, language-model head included")
    return model


def load_model(path: str | Path, *, device: torch.device, dtype: torch.dtype, weights: bool = True) -> LoadedModel:
    """Build the model of a checkpoint folder with transformers (eval mode, on `device` in `dtype`); a GGUF file
    (or a folder holding one) is built by transformers' GGUF loader, its tokenizer from the GGUF metadata.
    `weights=False` reads the config and the tokenizer only (`model` is None): what a driver needs to tokenise and
    describe a run whose evaluations happen elsewhere (a Ray sweep's tasks), without a second copy of the model."""
    from analysis.io.checkpoint import open_checkpoint

    transformers = require_transformers()
    ck = open_checkpoint(path)
    folder = ck.path if ck.path.is_dir() else ck.path.parent
    try:
        gguf = _gguf_file(ck)
        if gguf is None and not (folder / "config.json").is_file():
            raise DiffractError("no config.json in the checkpoint folder, so transformers cannot build the model",
                                path=folder, hint="evaluate a Hugging Face model folder")
        kind = "causal" if gguf is not None else _model_kind(ck.config, set(ck.keys()), folder)
    finally:
        ck.close()
    gguf_kwargs = {"gguf_file": gguf.name} if gguf is not None else {}
    where = gguf or folder
    if gguf is not None:  # llama.cpp files hold causal LMs only
        tokenizer, tok_hash = load_gguf_tokenizer(gguf), gguf_tokenizer_hash(gguf)
    else:
        tokenizer, tok_hash = load_tokenizer(folder), tokenizer_hash(folder)
    if kind == "masked" and tokenizer.mask_token_id is None:
        raise DiffractError("the tokenizer has no mask token, which a masked LM's loss needs", path=folder,
                            hint="use the model's own tokenizer")
    model = None
    if weights:
        cls = transformers.AutoModelForMaskedLM if kind == "masked" else transformers.AutoModelForCausalLM
        model = _build(cls, where.parent if gguf is not None else folder, transformers, dtype=dtype, where=where,
                       **gguf_kwargs)
        model.to(device).eval()
        config = model.config
    else:
        config = _config(where.parent if gguf is not None else folder, transformers, where=where, **gguf_kwargs)
    return LoadedModel(model=model, kind=kind, folder=where, tokenizer=tokenizer, tokenizer_hash=tok_hash,
                       context=_context(config), device=device, dtype=dtype)


def _config(folder: Path, transformers: Any, *, where: Path, **kwargs: Any) -> Any:
    """The model's transformers config alone (no weights read), every failure one line as in `_build`."""
    try:
        with quiet_loading(transformers):
            return transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True, **kwargs)
    except Exception as err:  # the same contract as _build: one line
        raise DiffractError(f"transformers cannot read this model's config ({_one_line(err)})", path=where,
                            hint="evaluate a causal LM, or a masked LM with its MLM head") from None


@dataclass(frozen=True)
class LossResult:
    """Mean loss over the predicted tokens, its perplexity, and what it was averaged over."""

    loss: float
    nll: float
    predicted: int
    windows: int
    tokens: int

    @property
    def ppl(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "nll": self.nll, "predicted": self.predicted, "windows": self.windows,
                "tokens": self.tokens}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LossResult":
        return cls(loss=float(d["loss"]), nll=float(d["nll"]), predicted=int(d["predicted"]),
                   windows=int(d["windows"]), tokens=int(d["tokens"]))


def mlm_mask(ids: torch.Tensor, seed: int) -> torch.Tensor:
    """Boolean mask of ⌈15 %⌉ of each window's positions, the same for every call with the same seed."""
    n, t = ids.shape
    k = max(1, math.ceil(MLM_FRACTION * t))
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, t, dtype=torch.bool)
    for i in range(n):
        mask[i, torch.randperm(t, generator=g)[:k]] = True
    return mask


def batch_size(lm: LoadedModel, tokens: int) -> int:
    """Windows per forward pass: ~8k tokens on the CPU, ~32k on a GPU (the logits dominate memory)."""
    budget = 32768 if lm.device.type == "cuda" else 8192
    return max(1, budget // tokens)


def window_losses(lm: LoadedModel, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Summed loss of a batch of windows (float64 scalar); gradients flow when enabled."""
    if lm.kind == "masked":
        assert mask is not None
        inp = x.masked_fill(mask, int(lm.tokenizer.mask_token_id))
        logits = lm.model(input_ids=inp.to(lm.device)).logits
        return torch.nn.functional.cross_entropy(logits[mask.to(lm.device)].float(), x[mask].to(lm.device),
                                                 reduction="sum").double()
    logits = lm.model(input_ids=x.to(lm.device), use_cache=False).logits
    v = logits.shape[-1]
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, v),
                                             x[:, 1:].reshape(-1).to(lm.device), reduction="sum").double()


def predicted_tokens(lm: LoadedModel, windows: Windows, mask: torch.Tensor | None) -> int:
    """How many tokens the loss averages over: T − 1 per window (causal) or the masked positions."""
    return int(mask.sum()) if mask is not None else windows.count * (windows.tokens - 1)


def evaluate(lm: LoadedModel, windows: Windows, *, seed: int = 0, progress: EvalProgress | None = None) -> LossResult:
    """Mean loss of the model over the windows (the same batching every call, so results repeat bit for bit)."""
    mask = mlm_mask(windows.ids, seed) if lm.kind == "masked" else None
    bs = batch_size(lm, windows.tokens)
    total = torch.zeros((), dtype=torch.float64, device=lm.device)
    start = time.monotonic()
    n = windows.count
    with torch.inference_mode():
        for i in range(0, n, bs):
            x = windows.ids[i:i + bs]
            total += window_losses(lm, x, mask[i:i + bs] if mask is not None else None)
            if progress is not None:
                done = min(n, i + bs)
                progress(done, n, eta_text(start, done, n))
    nll = float(total)
    predicted = predicted_tokens(lm, windows, mask)
    return LossResult(loss=nll / predicted, nll=nll, predicted=predicted, windows=n, tokens=windows.tokens)

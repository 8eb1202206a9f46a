"""`diffract-tui eval CKPT [CKPT …] --text FILE [--text FILE …] --out FILE`: the held-out loss of each
checkpoint on each text (SPEC §9) — the model built with transformers from the folder, the text tokenised with
its own tokenizer, the first N windows of T tokens, mean next-token cross-entropy and perplexity. Also the
shared set-up (device, dtype, texts, cache, progress with ETA) of `rewind sweep`, `rewind plan --score taylor`
and `interpolate --text`."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, List, Optional, Sequence

import typer

TOKENS_HELP = "T: tokens per window (default 512)."
WINDOWS_HELP = "N: the first N non-overlapping windows (default 64; fewer if the text is short)."
DEVICE_HELP = "auto (a GPU when there is one), cpu, cuda or cuda:N."
DTYPE_HELP = "bfloat16 | float32 (default: bfloat16 on a GPU, float32 on the CPU)."


@contextmanager
def eta_progress(description: str) -> Iterator[Callable[[int, Optional[int], str], None]]:
    """A rich bar on stderr with the time left; yields the engine's `progress(done, total, text)`."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[eta]}"), console=console, transient=True,
                  disable=not console.is_terminal) as bar:
        task = bar.add_task(description, total=None, eta="")

        def update(done: int, total: Optional[int], text: str) -> None:
            bar.update(task, completed=done, total=total, eta=text)

        yield update


@contextmanager
def eval_device(device: str, dtype: Optional[str], threads: Optional[int]) -> Iterator[tuple[Any, Any]]:
    """(torch device, torch dtype) from the options, with the thread policy applied."""
    from analysis.eval.loss import parse_dtype, require_transformers
    from analysis.spectral.backend import apply_thread_policy, resolve_device

    require_transformers()
    apply_thread_policy(threads)
    dev = resolve_device(device)
    yield dev, parse_dtype(dtype, dev)


def load_texts(domain: List[Path], general: Optional[List[Path]] = None) -> list[tuple[Any, str]]:
    """(Text, role) for every --text (domain) and --general-text (general) file; bad files fail first."""
    from analysis.run.loss_preview import named_texts

    return named_texts(domain, general or [])


def prepare_all(lm: Any, texts: list[tuple[Any, str]], tokens: int, windows: int) -> list[Any]:
    """EvalTexts for the model's tokenizer; a text with fewer windows than asked is said on stderr."""
    from analysis.eval.evaluator import prepare_text

    out = []
    for text, role in texts:
        et = prepare_text(lm, text, tokens, windows, role)
        if et.windows.short:
            typer.echo(f"note: {text.path} holds {et.windows.count} window(s) of {tokens} tokens "
                       f"({et.windows.text_tokens} tokens), fewer than the {windows} asked", err=True)
        out.append(et)
    return out


def make_cache(cache_dir: Optional[Path], no_cache: bool) -> Any:
    """The project's cache (None with --no-cache)."""
    from analysis.run.cache import Cache

    return None if no_cache else Cache(cache_dir)


def eval_provenance(command: str, lm: Any, texts: list[Any], opened: Sequence[Any] = (),
                    **extra: Any) -> dict[str, Any]:
    """Table metadata (SPEC §11): the engine's provenance of the `opened` checkpoints, plus device kind, dtype,
    model kind, tokenizer hash, T, N and every text's sha256; `extra` keys are added last (they win)."""
    from analysis.run.provenance import provenance

    meta = provenance([c for c in opened if c is not None], device_kind=lm.device.type, command=command,
                      dtype=lm.dtype_name, model_kind=lm.kind, tokenizer_sha256=lm.tokenizer_hash,
                      texts=[{"name": et.name, "path": str(et.text.path.resolve()), "sha256": et.text.sha256,
                              "role": et.role, "windows": et.windows.count, "tokens": et.windows.tokens,
                              "windows_requested": et.windows.requested, "text_tokens": et.windows.text_tokens}
                             for et in texts])
    meta.update(extra)
    return meta


def eval_command(
    checkpoints: Annotated[List[Path], typer.Argument(help="Checkpoint folders (Hugging Face, with tokenizer).")],
    text: Annotated[List[Path], typer.Option("--text",
        help="UTF-8 text (plain, or .jsonl with a \"text\" field); repeatable.")],
    out: Annotated[Path, typer.Option("--out", help="Output table: .csv, .json or .parquet.")],
    tokens: Annotated[int, typer.Option("--tokens", help=TOKENS_HELP)] = 512,
    windows: Annotated[int, typer.Option("--windows", help=WINDOWS_HELP)] = 64,
    device: Annotated[str, typer.Option("--device", help=DEVICE_HELP)] = "auto",
    dtype: Annotated[Optional[str], typer.Option("--dtype", help=DTYPE_HELP)] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the 15 % mask (masked LMs).")] = 0,
    cache_dir: Annotated[Optional[Path], typer.Option("--cache-dir", help="Cache folder.")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache",
        help="Evaluate everything; read and write no cache.")] = False,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="Compute threads.")] = None,
) -> None:
    """Held-out loss and perplexity of each checkpoint on each text (one row per pair)."""
    from analysis.eval.evaluator import Evaluator
    from analysis.eval.loss import load_model
    from analysis.io.checkpoint import open_checkpoint
    from analysis.io.guard import refuse_input_overlap
    from analysis.run.tables import table_format, write_table

    table_format(out)
    refuse_input_overlap(out, [*checkpoints, *text], option="--out")
    texts = load_texts(text)
    cache = make_cache(cache_dir, no_cache)
    rows: list[dict[str, Any]] = []
    meta_ckpts = []
    with eval_device(device, dtype, threads) as (dev, dt):
        for path in checkpoints:
            ck = open_checkpoint(path)
            fp, label = ck.fingerprint, ck.label
            ck.close()
            lm = load_model(path, device=dev, dtype=dt)
            prepared = prepare_all(lm, texts, tokens, windows)
            with eta_progress(f"evaluating {label}") as progress:
                ev = Evaluator(lm, fp, cache, seed=seed, progress=progress)
                for et in prepared:
                    r = ev.loss(et)
                    rows.append({"checkpoint": label, "text": et.name, "windows": r.windows, "tokens": r.tokens,
                                 "loss": r.loss, "ppl": r.ppl, "predicted_tokens": r.predicted,
                                 "windows_requested": windows, "path": str(Path(path).resolve()),
                                 "fingerprint": fp, "text_sha256": et.text.sha256, "dtype": lm.dtype_name,
                                 "device_kind": dev.type})
            meta_ckpts.append({"label": label, "path": str(Path(path).resolve()), "fingerprint": fp,
                               "tokenizer_sha256": lm.tokenizer_hash, "model_kind": lm.kind})
            meta = eval_provenance("eval", lm, prepared, checkpoints=meta_ckpts, seed=seed)
            del lm
    write_table(rows, out, metadata=meta)
    typer.echo(f"wrote {len(rows)} rows to {out}", err=True)


def register(app: typer.Typer) -> None:
    """Add `eval` to the root app."""
    app.command("eval")(eval_command)

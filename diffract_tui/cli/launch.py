"""`diffract-tui BASE CPT [CPT …]` (the `open` command): open checkpoints in the explorer.

Checkpoints of one run (SPEC §10: steps in their names, or `--steps`; `--no-series` turns recognition off) are
resolved into a series here, once, as `scan` and `delta` do, and the session opens them in its step order.
The checkpoints are opened, aligned and their layout detected BEFORE the screen opens, so a missing path or
incompatible checkpoints end with the engine's one-line message and exit status 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from diffract_tui.cli.scan import (EXECUTOR_HELP, RAY_ADDRESS_HELP, SERIES_HELP, STEPS_HELP, executor_option,
                                  open_executor, resolve_series)

if TYPE_CHECKING:  # pragma: no cover
    from analysis.run.session import ExplorerSession


def run_explorer(session: "ExplorerSession") -> None:
    """Run the explorer app on an opened session until the user quits; then close the session."""
    from diffract_tui.ui import DiffractApp

    try:
        DiffractApp(session).run()
    finally:
        session.close()


def open_command(
    checkpoints: Annotated[list[str], typer.Argument(metavar="BASE CPT [CPT …]",
                                                     help="Base checkpoint first, then one or more continually "
                                                          "pre-trained checkpoints (HF folders, .safetensors, .bin, .gguf, "
                                                          "hub repo ids org/name[@revision]).")],
    label: Annotated[Optional[list[str]], typer.Option(
        "--label", metavar="NAME=PATH", help="Show the checkpoint at PATH as NAME (repeatable).")] = None,
    device: Annotated[str, typer.Option(
        "--device", help="auto, cpu, cuda or cuda:N: where spectra are computed.")] = "auto",
    cache_dir: Annotated[Optional[Path], typer.Option("--cache-dir",
                                                      help="Spectra cache folder (default: $DIFFRACT_TUI_CACHE_DIR, "
                                                           "else the user cache folder).")] = None,
    text: Annotated[Optional[list[Path]], typer.Option(
        "--text", metavar="FILE", help="Domain text of the Rewind view's loss (UTF-8, or .jsonl with a \"text\" "
                                       "field; repeatable, named by file).")] = None,
    general_text: Annotated[Optional[list[Path]], typer.Option(
        "--general-text", metavar="FILE", help="General text (an ability to keep) of the loss and the trade-off "
                                               "(repeatable).")] = None,
    executor: Annotated[str, typer.Option("--executor", callback=executor_option,
                                          help=EXECUTOR_HELP + " Used by compute-all.")] = "local",
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", help=RAY_ADDRESS_HELP)] = None,
    series: Annotated[bool, typer.Option("--series/--no-series", help=SERIES_HELP + " The first step is then the "
                                                                                   "base.")] = True,
    steps: Annotated[Optional[str], typer.Option("--steps", help=STEPS_HELP)] = None,
) -> None:
    """Open the explorer: walk layers and heads, see spectra and deltas, mark heads, export a rewind list.

    Checkpoints of one run (steps in their names, or --steps) open in step order, the first step as the base."""
    from analysis.run.session import ExplorerSession, parse_labels

    run_series = resolve_series(checkpoints, series, steps)  # the one order every view uses (SPEC §10)
    session = ExplorerSession.open(checkpoints, labels=parse_labels(label or [], checkpoints), device=device,
                                   cache_dir=cache_dir, texts=list(text or []), general_texts=list(general_text or []),
                                   series=run_series if run_series is not None else False)
    try:
        session.executor = open_executor(executor, ray_address)   # a bad address or no Ray: one line, no screen
    except BaseException:
        session.close()
        raise
    run_explorer(session)


def register(app: typer.Typer) -> None:
    """Add the `open` command (the root's default command: `diffract-tui PATH …` runs it)."""
    app.command("open")(open_command)

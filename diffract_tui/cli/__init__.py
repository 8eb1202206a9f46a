"""The `diffract-tui` command line: `diffract-tui CKPT CKPT …` opens the explorer; subcommands
(info, scan, delta, rewind, interpolate, cache, demo) run headless.

Each subcommand lives in its own module with a ``register(app)`` function. Heavy imports
(torch, textual) happen inside the commands so that ``--help`` stays fast.
"""

from __future__ import annotations

import os
import sys

import click
import typer

from diffract_tui.cli import cache, delta, demo, eval, info, interpolate, launch, rewind, scan  # noqa: A004

app = typer.Typer(
    name="diffract-tui",
    help="Explore how continual pre-training changes an LLM, head by head, through weight spectra.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
for _module in (launch, demo, info, scan, delta, rewind, interpolate, cache, eval):
    _module.register(app)

SUBCOMMANDS = {"open", "demo", "info", "scan", "delta", "rewind", "interpolate", "cache", "eval"}


def _route(argv: list[str]) -> list[str]:
    """`diffract-tui A B` means `diffract-tui open A B`: insert `open` when the first word is a path."""
    if argv and not argv[0].startswith("-") and argv[0] not in SUBCOMMANDS:
        return ["open", *argv]
    if argv and argv[0] in SUBCOMMANDS and os.path.exists(argv[0]) and len(argv) > 1 and os.path.exists(argv[1]):
        return ["open", *argv]  # a checkpoint folder that happens to be named like a subcommand
    return argv


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI; engine errors become one line on stderr and exit code 1."""
    from analysis.errors import DiffractError

    args = _route(list(sys.argv[1:] if argv is None else argv))
    try:
        result = app(args=args, prog_name="diffract-tui", standalone_mode=False)
    except DiffractError as err:
        typer.echo(f"diffract-tui: error: {err}", err=True)
        return 1
    except (click.exceptions.Abort, typer.Abort):
        typer.echo("diffract-tui: aborted", err=True)
        return 130
    except click.ClickException as err:
        err.show()
        return err.exit_code
    except click.exceptions.Exit as err:
        return err.exit_code
    except KeyboardInterrupt:
        typer.echo("diffract-tui: interrupted", err=True)
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


def run() -> None:
    """Console-script entry: exit with main()'s status."""
    sys.exit(main())

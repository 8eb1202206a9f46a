"""The `diffract-tui` command line: `diffract-tui CKPT CKPT …` opens the explorer; subcommands
(info, scan, delta, rewind, interpolate, eval, cache, demo) run headless.

Each subcommand is a plain module-level function in its own module (importable and callable from tests),
added to the root app by that module's ``register(app)``. A first word that names no command runs the
default command ``open`` (`DefaultCommandGroup`). Heavy imports (torch, textual) happen inside the commands
so that ``--help`` stays fast.
"""

from __future__ import annotations

import errno
import os
import sys
from types import ModuleType

import typer
from typer.core import TyperGroup

from diffract_tui import __version__
from diffract_tui.cli import cache, delta, demo, eval, info, interpolate, launch, rewind, scan  # noqa: A004

DEFAULT_COMMAND = "open"


class DefaultCommandGroup(TyperGroup):
    """The root group: `diffract-tui A B …` means `diffract-tui open A B …` when `A` names no command
    (and when it does but `A` and `B` are both existing paths: a checkpoint folder named like a command)."""

    def route(self, args: list[str]) -> list[str]:
        """`args` with the default command put first where the first word is not a command (or an option)."""
        if not args or args[0].startswith("-") or DEFAULT_COMMAND not in self.commands:
            return args
        if args[0] not in self.commands:
            return [DEFAULT_COMMAND, *args]
        if len(args) > 1 and os.path.exists(args[0]) and os.path.exists(args[1]):
            return [DEFAULT_COMMAND, *args]
        return args

    def parse_args(self, ctx, args: list[str]) -> list[str]:  # noqa: ANN001 — click's Context
        """Route to the default command, then parse as any group does."""
        return super().parse_args(ctx, self.route(list(args)))

    def make_context(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201 — click's signature and Context
        """Make the root context (parse the root's words, run the root options' callbacks) as any group does,
        with Ctrl-C passed on as `Interrupted`: typer's main runs this phase too, and would exit 130 silently."""
        try:
            return super().make_context(*args, **kwargs)
        except KeyboardInterrupt as err:
            raise Interrupted() from err

    def invoke(self, ctx):  # noqa: ANN001, ANN201 — click's Context, the command's result
        """Invoke as any group does, with Ctrl-C (and SIGTERM's `Terminated`) passed on as `Interrupted`:
        typer's main turns a KeyboardInterrupt into a silent exit 130, so `main` could not say so."""
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as err:
            raise Interrupted() from err


class Interrupted(Exception):
    """A command stopped by Ctrl-C or SIGTERM (its cleanup already ran), on its way to `main`'s one line."""


INTERRUPTED_LINE = "diffract-tui: interrupted"


app = typer.Typer(
    cls=DefaultCommandGroup,
    name="diffract-tui",
    help="Explore how continual pre-training changes an LLM, head by head, through weight spectra.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _show_version(value: bool) -> None:
    """`--version`: print `diffract-tui X.Y.Z` and stop before any command runs."""
    if value:
        typer.echo(f"diffract-tui {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_show_version,
                                 help="Print the version and exit."),
) -> None:
    """Root options (`--version`); the help text is the Typer's, the commands are registered below."""


for _module in (launch, demo, info, scan, delta, rewind, interpolate, cache, eval):
    _module.register(app)


def _click_modules() -> list[ModuleType]:
    """The click typer really uses (its vendored `typer._click` in recent typer, e.g. 0.29; the click package
    in older ones), then the click package itself if installed: their exception classes are distinct."""
    import typer.main as typer_main

    modules = [m for m in (getattr(typer_main, "_click", None), getattr(typer_main, "click", None)) if m]
    try:
        import click
    except ImportError:  # a typer that vendors click does not install it
        pass
    else:
        modules.append(click)
    return modules


def _exception_classes(name: str) -> tuple[type[BaseException], ...]:
    """Every class called `name` in typer and in the click modules it may raise from, without duplicates."""
    found: list[type[BaseException]] = []
    for holder in (typer, *(getattr(m, "exceptions", None) for m in _click_modules())):
        cls = getattr(holder, name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException) and cls not in found:
            found.append(cls)
    return tuple(found)


_CLICK_ERRORS = _exception_classes("ClickException")  # usage errors (exit 2) and click's other errors (exit 1)
_EXITS = _exception_classes("Exit")  # --help, --version, typer.Exit(n)
_ABORTS = _exception_classes("Abort")  # a declined confirmation, EOF at a prompt
_USAGE_ERRORS = _exception_classes("UsageError")


def _command_chain(args: list[str]) -> tuple[object, int]:
    """The context of the deepest (sub)command that `args` name, and how many words of `args` named one."""
    command = typer.main.get_command(app)
    ctx = command.make_context("diffract-tui", [], resilient_parsing=True)
    named = 0
    route = getattr(command, "route", None)
    words = route(list(args)) if route is not None else args
    named_default = len(words) - len(args)  # the default command inserted: it names no word of `args`
    for word in words:
        if word.startswith("-"):
            continue
        sub = command.get_command(ctx, word) if hasattr(command, "get_command") else None
        if sub is None:
            break
        command, named = sub, named + 1
        ctx = command.make_context(word, [], parent=ctx, resilient_parsing=True)
    return ctx, named - named_default


def _context_for(args: list[str]) -> object:
    """A context for usage errors the option parser raises without one (`--out` given no value,
    `--version=yes`): they then show the usage line and help hint like the others."""
    return _command_chain(args)[0]


def _names_only_a_group(args: list[str]) -> bool:
    """True for `diffract-tui` or `diffract-tui rewind` alone: a command group given nothing to run."""
    ctx, named = _command_chain(args)
    return named == len(args) and hasattr(ctx.command, "get_command")


def _os_error_line(err: OSError) -> str:
    """One line for an OS error no command turned into a DiffractError: `<strerror>: <filename>`."""
    what = err.strerror or str(err) or type(err).__name__
    return f"diffract-tui: error: {what}: {err.filename}" if err.filename else f"diffract-tui: error: {what}"


def _interrupted() -> int:
    """The one line of a Ctrl-C (or SIGTERM) on stderr, and its exit status 130."""
    typer.echo(INTERRUPTED_LINE, err=True)
    return 130


def _flush_caches() -> bool:
    """Write what every cache of this process still stages; False when a Ctrl-C (or SIGTERM) cut that short."""
    cache = sys.modules.get("analysis.run.cache")
    try:
        if cache is not None:
            cache.flush_all_caches()
    except KeyboardInterrupt:
        return False
    return True


def _invoke(args: list[str]) -> int:
    """Run the typer app on `args`; every failure becomes a short message and an exit code, never a traceback."""
    from analysis.errors import DiffractError

    try:
        result = app(args=args, prog_name="diffract-tui", standalone_mode=False)
    except DiffractError as err:
        typer.echo(f"diffract-tui: error: {err}", err=True)
        return 1
    except _ABORTS:
        typer.echo("diffract-tui: aborted", err=True)
        return 130
    except _USAGE_ERRORS as err:
        if err.ctx is None:
            err.ctx = _context_for(args)
        err.show()  # the usage line, "Try 'diffract-tui … --help' for help.", "Error: …"
        return int(getattr(err, "exit_code", 2))
    except _CLICK_ERRORS as err:  # not a usage error (a click.File that cannot be opened): the project's line
        typer.echo(f"diffract-tui: error: {err.format_message()}", err=True)
        return int(getattr(err, "exit_code", 1))
    except _EXITS as err:
        return int(getattr(err, "exit_code", 0))
    except (Interrupted, KeyboardInterrupt):  # KeyboardInterrupt: one raised outside a command's invocation
        return _interrupted()
    except SystemExit as err:  # typer calls sys.exit(1) itself on a closed pipe, even when not standalone
        if isinstance(err.code, str):
            typer.echo(err.code, err=True)
        return err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
    except OSError as err:
        if err.errno == errno.EPIPE:  # the reader went away (`… | head`): nothing left to tell anyone
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 — keeps the interpreter's final flush quiet
            return 1
        typer.echo(_os_error_line(err), err=True)
        return 1
    return result if isinstance(result, int) else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI; engine errors become one line on stderr and exit 1, usage errors exit 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        code = _invoke(args)
    finally:  # staged cache entries land in packs when a command ends (the next command in this process sees them)
        flushed = _flush_caches()
    if not flushed and code != 130:  # a Ctrl-C during the flush: the same one line (once)
        return _interrupted()
    # A group given no command is a usage error whichever click prints its help: click ≥ 8.2 exits 2, older 0.
    # Args with an option word name more than commands, so they skip rebuilding the whole command tree (≈ 0.1 s).
    only_words = not any(a.startswith("-") for a in args)
    try:
        return 2 if code == 0 and only_words and _names_only_a_group(args) else code
    except (Interrupted, KeyboardInterrupt):  # a Ctrl-C while the command tree is rebuilt for that check
        return _interrupted()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


def run() -> None:
    """Console-script entry: exit with main()'s status."""
    sys.exit(main())

"""`diffract-tui cache info|clear|compact`: show, empty or compact the persistent spectra cache."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

if TYPE_CHECKING:
    from analysis.run.cache import CompactStats

CACHE_DIR_HELP = "Cache folder (default: $DIFFRACT_TUI_CACHE_DIR, else the user cache folder)."


def _human_bytes(n: int) -> str:
    """1536 → '1.5 KiB'."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def cache_info(
    cache_dir: Annotated[Optional[Path], typer.Option("--cache-dir", help=CACHE_DIR_HELP)] = None,
) -> None:
    """Print the cache folder, its number of entries and their total size."""
    from analysis.run.cache import Cache

    cache = Cache(cache_dir)
    stats = cache.info()
    typer.echo(f"root:    {stats.root}{'' if stats.exists else '  (not created yet)'}")
    typer.echo(f"entries: {stats.entries}")
    typer.echo(f"packs:   {stats.packs}")
    typer.echo(f"size:    {_human_bytes(stats.bytes)} ({stats.bytes} bytes)")


def cache_clear(
    cache_dir: Annotated[Optional[Path], typer.Option("--cache-dir", help=CACHE_DIR_HELP)] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete every cached spectrum (only files the cache wrote are touched)."""
    from analysis.run.cache import Cache

    cache = Cache(cache_dir)
    stats = cache.info()
    if stats.entries == 0:
        typer.echo(f"cache at {stats.root} is already empty")
        return
    if not yes:
        question = f"Delete {stats.entries} cached entries ({_human_bytes(stats.bytes)}) from {stats.root}?"
        try:
            confirmed = typer.confirm(question, err=True)
        except (typer.Abort, EOFError):  # no terminal to answer on
            confirmed = False
        if not confirmed:
            typer.echo("diffract-tui: cache not cleared (pass --yes to clear without asking)", err=True)
            raise typer.Exit(1)
    removed = cache.clear()
    typer.echo(f"removed {removed} entries ({_human_bytes(stats.bytes)}) from {stats.root}")


def compact_line(stats: "CompactStats") -> str:
    """The one line `cache compact` prints: packs and bytes before → after, entries, and what was dropped."""
    dropped = [f"{n} {what}" for n, what in ((stats.duplicates, "duplicate copies"),
                                             (stats.corrupt, "corrupt packs"), (stats.dropped, "unreadable entries"))
               if n]
    return (f"compacted {stats.root}: {stats.packs_before} packs → {stats.packs_after}, {stats.entries} entries, "
            f"{_human_bytes(stats.bytes_before)} → {_human_bytes(stats.bytes_after)}"
            + (f" (dropped {', '.join(dropped)})" if dropped else ""))


def cache_compact(
    cache_dir: Annotated[Optional[Path], typer.Option("--cache-dir", help=CACHE_DIR_HELP)] = None,
) -> None:
    """Merge the cache's pack files into as few as possible (safe while other runs read and write the cache)."""
    from analysis.run.cache import Cache

    typer.echo(compact_line(Cache(cache_dir).compact()))


def register(app: typer.Typer) -> None:
    """Add the `cache` command group (info, clear, compact) to the root app."""
    group = typer.Typer(help="Show, clear or compact the persistent spectra cache.", no_args_is_help=True)
    group.command("info")(cache_info)
    group.command("clear")(cache_clear)
    group.command("compact")(cache_compact)
    app.add_typer(group, name="cache")

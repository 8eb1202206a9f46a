"""`diffract-tui scan CKPT … --out FILE`: SPEC §3 metrics of every matrix (and head, and delta) to a table."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from diffract_tui import __version__ as TOOL_VERSION


def unique_labels(paths: list[Path]) -> list[str]:
    """Display names: the folder/file name, or the whole path when two inputs share a name."""
    names = [p.name or str(p) for p in paths]
    return [str(p) if names.count(n) > 1 else n for p, n in zip(paths, names)]


def metrics_option(value: str) -> str:
    """--metrics: all, fit or a comma list of SPEC §3 names; an unknown name is a usage error (exit 2)."""
    from analysis.errors import DiffractError
    from analysis.spectral.metric_sets import metric_set

    try:
        return metric_set(value).name
    except DiffractError as err:
        raise typer.BadParameter(str(err)) from None


def route_option(value: str) -> str:
    """--route: the eigen route (gram64, gram32 or svd); anything else is a usage error (exit 2)."""
    from analysis.spectral.backend import EIG_ROUTES

    if value not in EIG_ROUTES:
        raise typer.BadParameter(f"unknown eigen route {value!r} — use {', '.join(EIG_ROUTES)}")
    return value


METRICS_HELP = ("Metric set: all (every SPEC §3 metric), fit (norms, ranks, power-law fit: WeightWatcher's "
                "defaults) or a comma list of metric names.")
ROUTE_HELP = ("Eigen route, shared by every metric set: gram64 (float64 Gram, exact), gram32 (float32 Gram: "
              "faster, tail metrics only) or svd (float64 svdvals, the reference).")


def register(app: typer.Typer) -> None:
    """Add the `scan` command to the root app."""

    @app.command("scan")
    def scan_command(
        checkpoints: List[Path] = typer.Argument(..., help="Checkpoints to scan; the first is the base for --delta."),
        out: Path = typer.Option(..., "--out", "-o", help="Output table: .csv, .json or .parquet."),
        heads: bool = typer.Option(False, "--heads", help="Also every q/k/v/o head slice."),
        delta: bool = typer.Option(False, "--delta", help="Also ΔW = θ_i − θ_0 against the first checkpoint."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
        dtype: str = typer.Option("float32", "--dtype", help="Compute dtype: float32 or float64."),
        cache_dir: Optional[Path] = typer.Option(
            None, "--cache-dir", help="Cache folder (default: $DIFFRACT_TUI_CACHE_DIR, else the user cache folder)."
        ),
        no_cache: bool = typer.Option(False, "--no-cache", help="Compute everything; read and write no cache."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
        threads: Optional[int] = typer.Option(
            None, "--threads", min=1, help="Compute threads (default: $DIFFRACT_TUI_THREADS, else physical cores)."
        ),
        metrics: str = typer.Option("all", "--metrics", callback=metrics_option, help=METRICS_HELP),
        route: str = typer.Option("gram64", "--route", callback=route_option, help=ROUTE_HELP),
    ) -> int:
        """Scan checkpoints: one row per matrix (and head slice, and delta) with every spectral metric.

        Columns: see docs/reference.md; on delta rows the spectral columns describe ΔW itself, not W_d.
        Exit code 3 is a partial result: the table is written, but matrices with NaN/inf weights have no row
        (each is named on stderr)."""
        from analysis.errors import DiffractError
        from analysis.run.tables import table_format

        table_format(out)  # a bad suffix fails before any work
        if dtype not in ("float32", "float64"):
            raise DiffractError(f"--dtype must be float32 or float64, not {dtype!r}",
                                hint="pass --dtype float32 or --dtype float64")
        if delta and len(checkpoints) < 2:
            raise DiffractError("--delta needs at least two checkpoints (the first is the base)",
                                hint="pass the base and one or more continually-pretrained checkpoints")

        from analysis import ENGINE_VERSION
        from analysis.spectral.backend import SpectralSettings, apply_thread_policy, resolve_device
        from analysis.run.cache import Cache
        from analysis.io.checkpoint import open_checkpoint
        from analysis.run.scan import scan
        from analysis.io.guard import checkpoint_files
        from analysis.run.tables import check_table_output, write_table

        apply_thread_policy(threads)
        settings = SpectralSettings(device=device, dtype=dtype, eig_route=route)
        device_kind = resolve_device(device).type
        cache = None if no_cache else Cache(cache_dir)
        opened = [open_checkpoint(p, label=l) for p, l in zip(checkpoints, unique_labels(checkpoints))]
        inputs = [f for c in opened for f in checkpoint_files(c)]
        check_table_output(out, inputs)  # refuse an output on, in or around an input before any work
        failures: list = []
        try:
            if delta:
                from analysis.io.alignment import require_same_model

                require_same_model(opened)  # different models: one line before the progress bar
            rows = _run(opened, heads=heads, delta=delta, settings=settings, cache=cache, quiet=quiet, scan=scan,
                        on_failure=failures.append, metrics=metrics)
        finally:
            for c in opened:
                c.close()
        order = {c.label: i for i, c in enumerate(opened)}
        rows.sort(key=lambda r: (order[r["checkpoint"]], r["operation"] != "weight"))  # stable: layer order kept
        metadata = {
            "created_by": f"diffract-tui {TOOL_VERSION}",
            "engine_version": ENGINE_VERSION,
            "command": "scan",
            "checkpoints": [{"label": c.label, "path": str(c.path), "fingerprint": c.fingerprint} for c in opened],
            "heads": heads,
            "delta": delta,
            "device_kind": device_kind,
            "settings": settings.key(),
            "metrics": metrics,
        }
        write_table(rows, out, metadata=metadata, inputs=inputs)
        typer.echo(f"wrote {len(rows)} rows to {out}", err=True)
        return report_failures([f.line() for f in failures], what=f"{len(rows)} rows in {out}")


PARTIAL_EXIT = 3   # the result was written but some matrices are missing from it


def report_failures(lines: list[str], what: str) -> int:
    """Each failure as one line on stderr, then what was still written; the exit code: 0, or 3 for a partial result."""
    if not lines:
        return 0
    for line in lines:
        typer.echo(f"diffract-tui: error: {line}", err=True)
    typer.echo(f"diffract-tui: partial result: {len(lines)} matrix(es) failed (listed above); "
               f"the other {what} are complete", err=True)
    return PARTIAL_EXIT


def _run(opened, *, heads, delta, settings, cache, quiet, scan, on_failure, metrics="all") -> list[dict]:
    """Collect the scan's rows with a rich progress bar on stderr (none with --quiet)."""
    if quiet:
        return list(scan(opened, heads=heads, delta=delta, settings=settings, cache=cache, on_failure=on_failure,
                         metrics=metrics))
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=False) as bar:
        task = bar.add_task("scanning", total=None)

        def progress(done: int, total: int, label: str) -> None:
            bar.update(task, completed=done, total=total, description=label[:60])

        rows = list(scan(opened, heads=heads, delta=delta, settings=settings, cache=cache, progress=progress,
                         on_failure=on_failure, metrics=metrics))
        bar.update(task, description="done")
    return rows

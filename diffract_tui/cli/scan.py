"""`diffract-tui scan CKPT … --out FILE`: SPEC §3 metrics of every matrix (and head, and delta) to a table."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, List, Optional

import typer

if TYPE_CHECKING:  # pragma: no cover
    from analysis.run.series import Series

SERIES_HELP = "Recognise checkpoints of one run from step numbers in their names and order them by step."
STEPS_HELP = "The step of each checkpoint, in argument order (e.g. 0,500,1000): makes the inputs a series."


def metrics_option(value: str) -> str:
    """--metrics: all, fit or a comma list of SPEC §3 names; an unknown name is a usage error (exit 2)."""
    from analysis.errors import DiffractError
    from analysis.spectral.metric_sets import metric_set

    try:
        return metric_set(value).name
    except DiffractError as err:
        raise typer.BadParameter(str(err)) from None


def route_option(value: Optional[str]) -> Optional[str]:
    """--route: the eigen route (gram64, gram32 or svd; None: the set's default); else a usage error (exit 2)."""
    from analysis.spectral.backend import EIG_ROUTES

    if value is not None and value not in EIG_ROUTES:
        raise typer.BadParameter(f"unknown eigen route {value!r} — use {', '.join(EIG_ROUTES)}")
    return value


def executor_option(value: str) -> str:
    """--executor: local or ray; anything else is a usage error (exit 2)."""
    from analysis.run.executors import EXECUTORS

    if value not in EXECUTORS:
        raise typer.BadParameter(f"unknown executor {value!r} — use {' or '.join(EXECUTORS)}")
    return value


EXECUTOR_HELP = ("Where the work runs: local (this process) or ray (Ray tasks on --ray-address, else a local Ray "
                 "started for the run; needs the `ray` extra).")
RAY_ADDRESS_HELP = ("Ray cluster to run on with --executor ray (default: $RAY_ADDRESS, else a local Ray); its workers "
                    "need diffract-tui installed and the checkpoints at the same paths.")


def open_executor(name: str, address: Optional[str]) -> Any:
    """The executor of --executor/--ray-address, connected now (bad address or no Ray: one line, before any work)."""
    from analysis.run.executors import make_executor

    if name != "ray" and address:
        raise typer.BadParameter("only with --executor ray", param_hint="--ray-address")
    return make_executor(name, address=address)


METRICS_HELP = ("Metric set: all (every spectral metric), fit (norms, ranks, power-law fit: WeightWatcher's "
                "defaults) or a comma list of metric names (docs/reference.md).")
ROUTE_HELP = ("Eigen route, shared by every metric set: gram64 (float64 Gram, exact), gram32 (float32 Gram solved "
              "in float64: faster; fit columns agree to 1.5e-5, λ_min empty below its resolution) or svd (float64 "
              "svdvals, the reference).")
SCAN_ROUTE_HELP = ROUTE_HELP + (" Default: gram32 for --metrics fit (norms, ranks, power law) without --delta, "
                               "else gram64.")


def resolve_series(paths: List[Path], series: bool, steps: Optional[str]) -> "Series | None":
    """The series the inputs form (SPEC §10) or None; a bad --steps is a usage error (exit 2)."""
    from analysis.run.series import detect_series, parse_steps_option

    try:
        explicit = parse_steps_option(steps) if steps is not None else None
        return detect_series([str(p) for p in paths], explicit_steps=explicit, enabled=series)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--steps") from None


def scan_command(
    checkpoints: Annotated[List[Path], typer.Argument(help="Checkpoints to scan; the first is the base for --delta.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output table: .csv, .json or .parquet.")],
    heads: Annotated[bool, typer.Option("--heads", help="Also every q/k/v/o head slice.")] = False,
    delta: Annotated[bool, typer.Option(
        "--delta", help="Also ΔW = θ_i − θ_0 against the first checkpoint.")] = False,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="Compute dtype: float32 or float64.")] = "float32",
    cache_dir: Annotated[Optional[Path], typer.Option(
        "--cache-dir", help="Cache folder (default: $DIFFRACT_TUI_CACHE_DIR, else the user cache folder).")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Compute everything; read and write no cache.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    threads: Annotated[Optional[int], typer.Option(
        "--threads", min=1, help="Compute threads (default: $DIFFRACT_TUI_THREADS, else physical cores).")] = None,
    series: Annotated[bool, typer.Option("--series/--no-series", help=SERIES_HELP)] = True,
    steps: Annotated[Optional[str], typer.Option("--steps", help=STEPS_HELP)] = None,
    metrics: Annotated[str, typer.Option("--metrics", callback=metrics_option, help=METRICS_HELP)] = "all",
    route: Annotated[Optional[str], typer.Option("--route", callback=route_option, help=SCAN_ROUTE_HELP,
                                                 show_default=False)] = None,
    executor: Annotated[str, typer.Option("--executor", callback=executor_option, help=EXECUTOR_HELP)] = "local",
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", help=RAY_ADDRESS_HELP)] = None,
) -> int:
    """Scan checkpoints: one row per matrix (and head slice, and delta) with every spectral metric.

    Columns: see docs/reference.md; on delta rows the spectral columns describe ΔW itself, not W_d.
    Exit code 3 is a partial result: the table is written, but matrices with NaN/inf weights have no row
    (each is named on stderr)."""
    from analysis.errors import DiffractError
    from analysis.run.tables import table_format

    table_format(out)  # a bad suffix fails before any work
    run_series = resolve_series(checkpoints, series, steps)
    if run_series is not None:
        checkpoints = run_series.reorder(checkpoints)  # step order: the first step is the base for --delta
    if dtype not in ("float32", "float64"):
        raise DiffractError(f"--dtype must be float32 or float64, not {dtype!r}",
                            hint="pass --dtype float32 or --dtype float64")
    if delta and len(checkpoints) < 2:
        raise DiffractError("--delta needs at least two checkpoints (the first is the base)",
                            hint="pass the base and one or more continually-pretrained checkpoints")

    from analysis.spectral.backend import SpectralSettings, apply_thread_policy
    from analysis.run.cache import Cache
    from analysis.io.checkpoint import open_checkpoint
    from analysis.io.labels import unique_labels
    from analysis.run.scan import scan
    from analysis.io.guard import checkpoint_files
    from analysis.run.provenance import provenance
    from analysis.run.tables import check_table_output, write_table

    apply_thread_policy(threads, lazy=True)   # torch's count is set when compute starts (a cached scan: never)
    from analysis.spectral.metric_sets import default_route

    settings = SpectralSettings(device=device, dtype=dtype, eig_route=route or default_route(metrics, deltas=delta))
    device_kind = settings.device_kind   # an unusable --device is one line here (cpu/auto: without torch)
    cache = None if no_cache else Cache(cache_dir)
    opened = [open_checkpoint(p, label=l) for p, l in zip(checkpoints, unique_labels(checkpoints))]
    inputs = [f for c in opened for f in checkpoint_files(c)]
    check_table_output(out, inputs)  # refuse an output on, in or around an input before any work
    failures: list = []
    runner = None
    try:
        if delta:
            from analysis.io.alignment import require_same_model

            require_same_model(opened)  # different models: one line before the progress bar
        runner = open_executor(executor, ray_address)
        rows = _run(opened, heads=heads, delta=delta, settings=settings, cache=cache, quiet=quiet, scan=scan,
                    on_failure=failures.append, metrics=metrics, executor=runner)
    finally:
        if runner is not None:
            runner.close()
        for c in opened:
            c.close()
    order = {c.label: i for i, c in enumerate(opened)}
    rows.sort(key=lambda r: (order[r["checkpoint"]], r["operation"] != "weight"))  # stable: layer order kept
    metadata = provenance(opened, settings, device_kind=device_kind, command="scan", heads=heads, delta=delta,
                          metrics=metrics)
    if run_series is not None:
        from analysis.run.series import annotate_rows

        annotate_rows(rows, run_series, [c.label for c in opened])
        metadata["series"] = {"steps": list(run_series.steps), "tokens": list(run_series.tokens)}
    write_table(rows, out, metadata=metadata, inputs=inputs)
    typer.echo(f"wrote {len(rows)} rows to {out}", err=True)
    return report_failures([f.line() for f in failures], what=f"{len(rows)} rows in {out}")


def register(app: typer.Typer) -> None:
    """Add the `scan` command to the root app."""
    app.command("scan")(scan_command)


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


def _run(opened, *, heads, delta, settings, cache, quiet, scan, on_failure, metrics="all",
         executor=None) -> list[dict]:
    """Collect the scan's rows with a rich progress bar on stderr (none with --quiet)."""
    if quiet:
        return list(scan(opened, heads=heads, delta=delta, settings=settings, cache=cache, on_failure=on_failure,
                         metrics=metrics, executor=executor))
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=False) as bar:
        task = bar.add_task("scanning", total=None)

        def progress(done: int, total: int, label: str) -> None:
            bar.update(task, completed=done, total=total, description=label[:60])

        rows = list(scan(opened, heads=heads, delta=delta, settings=settings, cache=cache, progress=progress,
                         on_failure=on_failure, metrics=metrics, executor=executor))
        bar.update(task, description="done")
    return rows

"""`diffract-tui delta BASE CPT [CPT …] --out FILE`: what continual pre-training changed, matrix by matrix
and head by head (SPEC §4), with cross-domain agreement when two or more CPT checkpoints are given."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Annotated, Any, Iterator, List, Optional

import typer

from diffract_tui.cli.scan import (EXECUTOR_HELP, METRICS_HELP, RAY_ADDRESS_HELP, ROUTE_HELP, SERIES_HELP, STEPS_HELP,
                                   executor_option, metrics_option, open_executor, resolve_series, route_option)

CACHE_DIR_HELP = "Cache folder for computed deltas (default: $DIFFRACT_TUI_CACHE_DIR, else the user cache folder)."


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def print_summary(summary: dict[str, Any], out: Path, rows: int) -> None:
    """The concentration and agreement summary as rich tables on stderr."""
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    console.print(f"[bold]delta[/bold] of {len(summary['checkpoints'])} checkpoint(s) against "
                  f"[bold]{summary['base']}[/bold]: {rows} rows → {out}")
    if not summary["heads"]:
        console.print(f"heads not analysed: {summary.get('heads_reason')}")
    else:
        table = Table(title="head concentration (energy Σ‖ΔW_h‖², Gini of head scores r)")
        for col in ("checkpoint", "top-10 % share of Σ‖Δ‖²", "Gini of r", "mean r", "Σ‖Δ‖² (heads)",
                    "unchanged heads"):
            table.add_column(col, justify="left" if col == "checkpoint" else "right")
        for c in summary["checkpoints"]:
            table.add_row(c["checkpoint"], _fmt(c.get("top10_share")), _fmt(c.get("gini")),
                          _fmt(c.get("mean_head_score"), 4), _fmt(c.get("total_delta_energy"), 2),
                          _fmt(c.get("unchanged_heads")))
        console.print(table)
    for c in summary["checkpoints"]:
        if c.get("unchanged_matrices") or c.get("unchanged_head_slices"):
            console.print(f"{c['checkpoint']}: {c['unchanged_matrices']} of {c['matrices']} matrices and "
                          f"{c['unchanged_head_slices']} of {c['head_slices']} head slices unchanged (bit-identical "
                          "to the base: column `unchanged`, their ratio and spectral columns are empty)",
                          markup=False, highlight=False)
    agreement = summary.get("agreement")
    if agreement:
        table = Table(title="cross-domain agreement per head")
        table.add_column("metric")
        table.add_column("value", justify="right")
        table.add_row("mean A2 (cos of head deltas)", _fmt(agreement["mean_a2"]))
        table.add_row(f"mean A3 (top-{agreement['a3_k']} subspace overlap; random ≈ {_fmt(agreement['a3_random'])})",
                      _fmt(agreement["mean_a3"]))
        table.add_row("Spearman of head scores (mean over pairs)", _fmt(agreement["spearman"]))
        classes = agreement["classes"]
        table.add_row("agnostic / specific / inert heads",
                      f"{classes['agnostic']} / {classes['specific']} / {classes['inert']}")
        table.add_row("thresholds: agreement / magnitude r",
                      f"{_fmt(agreement['agreement_threshold'])} / {_fmt(agreement['magnitude_threshold'], 4)}")
        console.print(table)
    missing = summary.get("missing")
    if missing:
        for label, keys in missing.items():
            console.print(f"[dim]{label} lacks {len(keys)} tensor(s) another checkpoint has (e.g. {keys[0]}); "
                          f"those are skipped[/dim]")


def delta_command(
    base: Annotated[Path, typer.Argument(help="The base checkpoint θ₀ (folder or weight file).")],
    cpts: Annotated[List[Path], typer.Argument(help="One or more CPT checkpoints of that base.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output table: .csv, .json or .parquet.")],
    heads: Annotated[bool, typer.Option("--heads/--no-heads", help="Also one row per attention head slice.")] = True,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N, mps.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="Compute dtype: float32 or float64.")] = "float32",
    top_k: Annotated[Optional[int], typer.Option("--top-k", min=1,
        help="A1 singular-vector agreement over the k largest components (default: all).")] = None,
    a3_k: Annotated[int, typer.Option("--a3-k", min=1,
        help="A3 subspace agreement: top-k left singular vectors.")] = 8,
    spectral: Annotated[bool, typer.Option("--spectral/--no-spectral",
        help="Also the spectral metrics of ΔW itself (power-law fits etc.).")] = True,
    exclude_kv: Annotated[bool, typer.Option("--exclude-kv", help="Head scores and agreement without k/v.")] = False,
    agreement_metric: Annotated[str, typer.Option("--agreement", help="Classify heads by a2 or a3.")] = "a2",
    agreement_threshold: Annotated[Optional[float], typer.Option("--agreement-threshold",
        help="Default: median over the non-inert heads.")] = None,
    magnitude_threshold: Annotated[Optional[float], typer.Option("--magnitude-threshold",
        help="Head score r below which a head is inert (default: the median).")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option("--cache-dir", help=CACHE_DIR_HELP)] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Neither read nor write the cache.")] = False,
    summary_json: Annotated[bool, typer.Option("--summary-json",
        help="Print the summary as JSON on stdout.")] = False,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1,
        help="Compute threads (default: $DIFFRACT_TUI_THREADS, else physical cores).")] = None,
    series: Annotated[bool, typer.Option("--series/--no-series", help=SERIES_HELP)] = True,
    steps: Annotated[Optional[str], typer.Option("--steps", help=STEPS_HELP)] = None,
    previous: Annotated[bool, typer.Option(
        "--previous", help="Along a series: Δ of each step against the previous one, not the first.")] = False,
    metrics: Annotated[str, typer.Option("--metrics", callback=metrics_option, help=METRICS_HELP)] = "all",
    route: Annotated[str, typer.Option("--route", callback=route_option,
                                       help=ROUTE_HELP + " ΔW is often low-rank: the default is gram64.")] = "gram64",
    executor: Annotated[str, typer.Option("--executor", callback=executor_option, help=EXECUTOR_HELP)] = "local",
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", help=RAY_ADDRESS_HELP)] = None,
) -> int:
    """Per matrix and per head: ‖ΔW‖, relative and cosine change, ρ, spectra of ΔW, singular-vector
    agreement; with ≥ 2 CPT checkpoints also cross-domain agreement (A2, A3) and head classes.

    Columns (ρ, A1 floor, truncatable_fraction = trunc. t@0.1, …): see docs/reference.md; the spectral
    columns describe ΔW itself, not W_d.

    Exit code 3 is a partial result: the table is written, but matrices with NaN/inf weights have no row
    (each is named on stderr)."""

    from analysis.deltas.delta_table import DeltaOptions, build_and_close, open_checkpoints
    from analysis.errors import DiffractError
    from analysis.io.guard import checkpoint_files, checkpoint_inputs
    from analysis.run.tables import check_table_output, write_table

    run_series = resolve_series([base, *cpts], series, steps)
    if run_series is not None:  # SPEC §10: Δ along a series is against its first step
        base, *cpts = run_series.reorder([base, *cpts])
    elif previous:
        raise typer.BadParameter("needs checkpoints of one run (step numbers in their names, or --steps)",
                                 param_hint="--previous")
    opened, open_error = None, None
    if not previous:  # each checkpoint opened once: its files protect the output, then the same objects are read
        try:
            opened = open_checkpoints([base, *cpts])
        except DiffractError as err:     # reported where the build would report it (after the usage checks)
            open_error = err
    inputs = ([f for c in opened for f in checkpoint_files(c)] if opened is not None
              else checkpoint_inputs([base, *cpts]))
    try:
        check_table_output(out, inputs)  # bad suffix or an output on/in/around an input → one line, before any work
        if agreement_metric not in ("a2", "a3"):
            raise DiffractError(f"unknown agreement metric {agreement_metric!r}", hint="use --agreement a2 or a3")
        from analysis.spectral.backend import apply_thread_policy

        apply_thread_policy(threads, lazy=True)   # torch's count is set when compute starts (a rerun: never)
        from analysis.spectral.backend import SpectralSettings

        options = DeltaOptions(heads=heads, top_k=top_k, a3_k=a3_k, spectral=spectral, exclude_kv=exclude_kv,
                               agreement_metric=agreement_metric, agreement_threshold=agreement_threshold,
                               magnitude_threshold=magnitude_threshold, metrics=metrics,
                               settings=SpectralSettings(device=device, dtype=dtype, eig_route=route))
        options.settings.device_kind   # an unusable --device is one line before any work (cpu/auto: no torch)
    except BaseException:
        for c in opened or ():  # a usage error after the opening: nothing stays mapped
            c.close()
        raise
    cache = None
    if not no_cache:
        from analysis.run.cache import Cache

        cache = Cache(cache_dir)

    if previous and executor != "local":
        typer.echo("diffract-tui: note: --previous runs in this process (--executor ray covers a delta against one "
                   "base)", err=True)
    runner = open_executor("local", None) if previous else open_executor(executor, ray_address)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)

    with runner_closed(runner), Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), transient=True, console=console,
                  disable=not console.is_terminal) as bar:  # a log or a pipe gets no bar, only messages
        task = bar.add_task("delta", total=None)

        def progress(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=what[:60])

        if previous:
            from analysis.run.series import previous_step_deltas

            result = previous_step_deltas([base, *cpts], options=options, cache=cache, progress=progress)
        elif open_error is not None:
            raise open_error
        else:
            result = build_and_close(opened, options=options, cache=cache, progress=progress, executor=runner)
    metadata = {**result.metadata, "summary": result.summary}   # provenance: analysis.run.provenance
    if run_series is not None:
        from analysis.run.series import annotate_rows

        labels = [result.metadata["base"]["label"], *(t["label"] for t in result.metadata["targets"])]
        annotate_rows(result.rows, run_series, labels)
        metadata["series"] = {"steps": list(run_series.steps), "tokens": list(run_series.tokens)}
    write_table(result.rows, out, metadata=metadata, inputs=inputs)
    print_summary(result.summary, out, len(result.rows))
    if summary_json:
        typer.echo(json.dumps(result.summary, indent=1, default=_json_default))
    from diffract_tui.cli.scan import report_failures

    return report_failures([f.line() for f in result.failures], what=f"{len(result.rows)} rows in {out}")


@contextlib.contextmanager
def runner_closed(runner: Any) -> Iterator[Any]:
    """The executor, closed (a Ray it started is stopped) when the block ends, however it ends."""
    try:
        yield runner
    finally:
        runner.close()


def register(app: typer.Typer) -> None:
    """Add the `delta` command to the root app."""
    app.command("delta")(delta_command)


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)

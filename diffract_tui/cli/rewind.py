"""`diffract-tui rewind plan BASE TARGET … --out rewind.json` chooses heads to set back to the base and
previews what that removes; `diffract-tui rewind apply rewind.json --out DIR` writes the rewound checkpoint
(SPEC §6). Progress goes to stderr; the preview to stdout."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, List, Optional

import typer

from diffract_tui.cli.scan import EXECUTOR_HELP, RAY_ADDRESS_HELP, executor_option, open_executor

@contextmanager
def stderr_progress(description: str, unit_bytes: bool = False, quiet: bool = False
                    ) -> Iterator[Callable[[int, "int | None", str], None]]:
    """A rich progress bar on stderr (none with `quiet`); yields the engine's `progress(done, total, text)`
    callback (`analysis.progress`)."""
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TransferSpeedColumn)

    columns: list[Any] = [TextColumn("{task.description}"), BarColumn()]
    columns += [DownloadColumn(), TransferSpeedColumn()] if unit_bytes else [MofNCompleteColumn()]
    columns.append(TimeElapsedColumn())
    console = Console(stderr=True)
    # not a terminal (a log, a test): no bar, so stderr holds only real messages
    with Progress(*columns, console=console, transient=True, disable=quiet or not console.is_terminal) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int | None, text: str = "") -> None:
            bar.update(task, completed=done, total=total)

        yield update


def print_preview(rl: Any, pv: Any, limit: int = 40) -> None:
    """The plan's preview on stdout: pattern, heads per layer, share of ‖Δ‖² removed, the first rows."""
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    p = rl.pattern
    console.print(f"pattern {p.name}  fraction {p.fraction:.4g}  score {p.score}  gqa-policy {p.gqa_policy}  "
                  f"→ {len(rl.heads)} of {rl.architecture.layers * rl.architecture.heads} heads", markup=False)
    console.print(f"share of attention ‖Δ‖² removed: {pv.share_removed:.4%}", markup=False)
    console.print("heads per layer: " + " ".join(str(n) for n in pv.heads_per_layer), markup=False)
    table = Table(title_justify="left")
    for col in ("layer", "head", "projections", p.score):
        table.add_column(col, justify="right" if col != "projections" else "left")
    for layer, head, projs, score in pv.rows[:limit]:
        table.add_row(str(layer), str(head), ",".join(projs), "—" if score is None else f"{score:.6g}")
    if pv.rows:
        console.print(table)
    if len(pv.rows) > limit:
        console.print(f"… {len(pv.rows) - limit} more in the list file", markup=False)


def rewind_plan(
    base: Annotated[Path, typer.Argument(help="The base checkpoint θ₀.")],
    target: Annotated[Path, typer.Argument(help="The CPT checkpoint θ_d whose heads are rewound.")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the rewind list (JSON).")],
    pattern: Annotated[str, typer.Option("--pattern", help="greedy | reference | top | random | manual.")] = "greedy",
    fraction: Annotated[Optional[float], typer.Option("--fraction",
        help="f: rewind ⌊f·L·H⌋ heads (greedy, reference).")] = None,
    heads: Annotated[Optional[str], typer.Option("--heads",
        help="manual heads LAYER:HEAD,… e.g. 3:5,4:1 (0-based).")] = None,
    reference: Annotated[Optional[Path], typer.Option("--reference",
        help="Reference CPT checkpoint (pattern reference).")] = None,
    variant: Annotated[str, typer.Option("--variant",
        help="reference: lowest (its lowest scores) | most_agreeing.")] = "lowest",
    gqa_policy: Annotated[str, typer.Option("--gqa-policy", help="k/v rows: group | never | any.")] = "group",
    score: Annotated[str, typer.Option("--score",
        help="Ranking score: rel_frob | frob | taylor (needs --text).")] = "rel_frob",
    exclude_kv: Annotated[bool, typer.Option("--exclude-kv", help="Rank by q/o energy only.")] = False,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed of the random pattern.")] = None,
    text: Annotated[Optional[List[Path]], typer.Option("--text",
        help="Domain text for --score taylor; repeatable.")] = None,
    general_text: Annotated[Optional[List[Path]], typer.Option("--general-text",
        help="General text for --score taylor (used instead of --text).")] = None,
    tokens: Annotated[int, typer.Option("--tokens", help="T for --score taylor.")] = 512,
    windows: Annotated[int, typer.Option("--windows", help="N for --score taylor.")] = 64,
    device: Annotated[str, typer.Option("--device", help="Device for --score taylor: auto, cpu, cuda[:N].")] = "auto",
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="bfloat16 | float32 for --score taylor.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Choose heads to rewind and write the list; prints the preview.

    Scores (r), the share of ‖Δ‖² removed and the list format: see docs/reference.md."""
    from analysis.io.checkpoint import open_checkpoint
    from analysis.errors import DiffractError
    from analysis.edit.rewind import checkpoint_ref, parse_heads, plan_from_inputs, preview, rewind_inputs
    from analysis.edit.rewind_list import write_rewind_list
    from analysis.io.guard import checkpoint_files, refuse_input_overlap

    if pattern == "reference" and reference is None:
        raise DiffractError("the reference pattern needs a reference checkpoint", hint="pass --reference REF")
    if fraction is not None and not 0.0 <= fraction <= 1.0:
        raise DiffractError(f"fraction {fraction} is outside [0, 1]", hint="pass --fraction between 0 and 1")
    head_list = parse_heads(heads) if heads is not None else None
    b, t = open_checkpoint(base), open_checkpoint(target)
    r = open_checkpoint(reference) if reference is not None else None
    protected = [f for ck in (b, t, r) if ck is not None for f in checkpoint_files(ck)]
    refuse_input_overlap(out, protected)  # before any work: the list never lands on, in or around an input
    if pattern == "random" and seed is None:
        raise DiffractError("the random pattern needs a seed", hint="pass --seed N")
    with stderr_progress("reading head energies", quiet=quiet) as progress:
        inputs = rewind_inputs(b, t, r if pattern == "reference" else None, progress=progress)
    if score == "taylor":
        inputs = _with_taylor(inputs, b, t, target, text or [], general_text or [], tokens, windows, device,
                              dtype, quiet=quiet)
    rl = plan_from_inputs(inputs, base=checkpoint_ref(b), target=checkpoint_ref(t),
                          reference=checkpoint_ref(r) if r is not None else None, pattern=pattern,
                          fraction=fraction, heads=head_list, score=score, gqa_policy=gqa_policy,
                          exclude_kv=exclude_kv, variant=variant, seed=seed)
    write_rewind_list(rl, out, inputs=protected)
    print_preview(rl, preview(rl, inputs))
    typer.echo(f"wrote {out}")


def rewind_apply(
    rewind_list: Annotated[Path, typer.Argument(help="A rewind list (diffract-rewind/1 JSON).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the rewound checkpoint (must not exist).")],
    force: Annotated[bool, typer.Option("--force", help="Apply a stale list and replace an existing --out.")] = False,
) -> None:
    """Write the target with the listed heads set back to the base (safetensors shards + index)."""
    from analysis.edit.rewind import apply_rewind
    from analysis.edit.rewind_list import read_rewind_list

    rl = read_rewind_list(rewind_list)
    with stderr_progress("writing", unit_bytes=True) as progress:
        result = apply_rewind(rl, out, force=force, source=rewind_list, progress=progress)
    typer.echo(f"wrote {result.out_dir}: {result.num_tensors} tensors in {len(result.shards)} shard(s), "
               f"{result.total_size / 1e9:.3f} GB in {result.seconds:.1f} s "
               f"({len(rl.heads)} heads rewound)")
    note = result.config_note()
    if note:
        typer.echo(note)


def register(app: typer.Typer) -> None:
    """Add `rewind plan`, `rewind apply` and `rewind sweep` to the root app."""
    rewind_app = typer.Typer(help="Head-wise rewind: set chosen attention heads of a CPT checkpoint back to the base.",
                             no_args_is_help=True)
    rewind_app.command("plan")(rewind_plan)
    rewind_app.command("apply")(rewind_apply)
    rewind_app.command("sweep")(rewind_sweep)
    app.add_typer(rewind_app, name="rewind")


TAYLOR_LABEL = "taylor score: gradient pass (windows)"


def _with_taylor(inputs: Any, base: Any, target: Any, target_path: Path, text: List[Path], general: List[Path],
                 tokens: int, windows: int, device: str, dtype: Optional[str], lm: Any = None,
                 prepared: Optional[list] = None, quiet: bool = False) -> Any:
    """`inputs` with the Taylor grid (SPEC §9) on the general texts when given, else the domain texts; the
    gradient pass's windows counted on a bar (none with `quiet`), one tick per backward call."""
    import dataclasses

    from analysis.errors import DiffractError
    from analysis.eval.loss import load_model
    from analysis.eval.taylor import taylor_scores
    from analysis.model.architecture import layout_of
    from diffract_tui.cli.eval import eval_device, load_texts, prepare_all

    if prepared is None:
        if not text and not general:
            raise DiffractError("--score taylor needs a text to take the loss gradient on",
                                hint="pass --text FILE (and --general-text FILE for an ability to keep)")
        with eval_device(device, dtype, None) as (dev, dt):
            lm = load_model(target_path, device=dev, dtype=dt)
        prepared = prepare_all(lm, load_texts(text, general), tokens, windows)
    chosen = [et for et in prepared if et.role == "general"] or list(prepared)
    with stderr_progress(TAYLOR_LABEL, quiet=quiet) as progress:
        grid = taylor_scores(lm, base, layout_of(target), chosen, progress=progress)
    return dataclasses.replace(inputs, taylor=grid)


def _run_sweep(runner: Any, lm: Any, base: Any, target: Any, candidates: list, texts: list, *, cache: Any,
               inputs: Any, batch: Optional[int], progress: Callable[[int, Optional[int], str], None]
               ) -> tuple[list[dict], int, int]:
    """The sweep's rows and its cache hits and misses: on the loaded model in this process (local), or as Ray
    tasks that each load the model from the target's path (the same rows, bit for bit)."""
    from analysis.eval.evaluator import Evaluator
    from analysis.eval.patch import LivePatch
    from analysis.eval.sweep import run_sweep
    from analysis.model.architecture import layout_of
    from analysis.run.executors import sweep_remote

    if runner.local:
        evaluator = Evaluator(lm, target.fingerprint, cache)
        patch = LivePatch(lm.model, base, layout_of(target))
        rows = run_sweep(evaluator, patch, candidates, texts, target=target, inputs=inputs, progress=progress)
        return rows, evaluator.hits, evaluator.misses
    remote = sweep_remote(runner, candidates, texts, base=base, target=target, device=lm.device.type,
                          dtype=lm.dtype_name, cache=cache, inputs=inputs, batch=batch, progress=progress)
    return remote.rows, remote.hits, remote.misses


SWEEP_EXECUTOR_HELP = (EXECUTOR_HELP + " With ray the candidates are split into Ray tasks; each loads the model "
                       "once and evaluates its batch (same rows, same bytes).")


def rewind_sweep(
    base: Annotated[Path, typer.Argument(help="The base checkpoint θ₀.")],
    target: Annotated[Path, typer.Argument(help="The CPT checkpoint θ_d.")],
    text: Annotated[List[Path], typer.Option("--text", help="Domain text (what the CPT was for); repeatable.")],
    out: Annotated[Path, typer.Option("--out", help="Output table: .csv, .json or .parquet.")],
    general_text: Annotated[Optional[List[Path]], typer.Option("--general-text",
        help="General text (an ability to keep); repeatable.")] = None,
    reference: Annotated[Optional[Path], typer.Option("--reference",
        help="Reference CPT (pattern reference).")] = None,
    patterns: Annotated[str, typer.Option("--patterns",
        help="Comma list of greedy, reference, random, top, manual.")] = "greedy,random,top",
    fractions: Annotated[str, typer.Option("--fractions",
        help="Comma list of fractions f.")] = "0,0.05,0.1,0.15,0.2,0.25,0.3,0.35,0.4,0.45,0.5,0.55,0.6",
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="Seeds 0…n−1 of the random pattern.")] = 3,
    score: Annotated[str, typer.Option("--score", help="rel_frob | frob | taylor.")] = "rel_frob",
    gqa_policy: Annotated[str, typer.Option("--gqa-policy", help="k/v rows: group | never | any.")] = "group",
    heads: Annotated[Optional[str], typer.Option("--heads", help="Heads of the manual pattern LAYER:HEAD,…")] = None,
    tokens: Annotated[int, typer.Option("--tokens", help="T: tokens per window.")] = 512,
    windows: Annotated[int, typer.Option("--windows", help="N: windows per text.")] = 64,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="bfloat16 | float32.")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option("--cache-dir", help="Cache folder.")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Read and write no cache.")] = False,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="Compute threads.")] = None,
    executor: Annotated[str, typer.Option("--executor", callback=executor_option,
        help=SWEEP_EXECUTOR_HELP)] = "local",
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", help=RAY_ADDRESS_HELP)] = None,
    batch: Annotated[Optional[int], typer.Option("--batch", min=1,
        help="With --executor ray: evaluations per Ray task (distinct candidates; the target and the base count "
             "one each). Default: one batch per task the cluster runs at once.")] = None,
) -> None:
    """Loss of every candidate rewind (pattern × fraction × seed) on every text, in memory.

    Rows pattern, fraction, seed, heads, text, loss, ppl (and gain kept / forgetting recovered), with the base
    and the target as reference rows; no checkpoint is written. With --executor ray the same rows (same bytes)
    come from Ray tasks."""
    from analysis.edit.rewind import checkpoint_ref, parse_heads, rewind_inputs
    from analysis.errors import DiffractError
    from analysis.eval.loss import load_model
    from analysis.eval.sweep import parse_fractions, sweep_candidates
    from analysis.io.checkpoint import open_checkpoint
    from analysis.io.guard import refuse_input_overlap
    from analysis.run.tables import table_format, write_table
    from diffract_tui.cli.eval import eta_progress, eval_device, load_texts, make_cache, prepare_all, eval_provenance

    table_format(out)
    if batch is not None and executor != "ray":
        raise typer.BadParameter("only with --executor ray", param_hint="--batch")
    inputs_paths = [base, target, *text, *(general_text or [])] + ([reference] if reference else [])
    refuse_input_overlap(out, inputs_paths, option="--out")
    pattern_list = [p.strip() for p in patterns.split(",") if p.strip()]
    if "reference" in pattern_list and reference is None:
        raise DiffractError("the reference pattern needs a reference checkpoint", hint="pass --reference REF")
    fraction_list = parse_fractions(fractions)
    head_list = parse_heads(heads) if heads is not None else None
    texts = load_texts(text, general_text)
    cache = make_cache(cache_dir, no_cache)
    b, t = open_checkpoint(base), open_checkpoint(target)
    r = open_checkpoint(reference) if reference is not None else None
    runner = open_executor(executor, ray_address)   # no Ray, an unreachable address: one line before any work
    try:
        with stderr_progress("reading head energies") as progress:
            inputs = rewind_inputs(b, t, r, progress=progress)
        with eval_device(device, dtype, threads) as (dev, dt):   # Ray tasks load their own model: the driver
            lm = load_model(target, device=dev, dtype=dt,      # needs one only for Taylor's gradient pass
                            weights=runner.local or score == "taylor")
        prepared = prepare_all(lm, texts, tokens, windows)
        if score == "taylor":
            inputs = _with_taylor(inputs, b, t, target, [], [], tokens, windows, device, dtype, lm=lm,
                                  prepared=prepared)
        candidates = sweep_candidates(inputs, base=checkpoint_ref(b), target=checkpoint_ref(t),
                                      reference=checkpoint_ref(r) if r is not None else None, patterns=pattern_list,
                                      fractions=fraction_list, seeds=seeds, score=score, gqa_policy=gqa_policy,
                                      heads=head_list)
        with eta_progress(f"sweeping {len(candidates)} candidates") as progress:
            rows, hits, misses = _run_sweep(runner, lm, b, t, candidates, prepared, cache=cache, inputs=inputs,
                                            batch=batch, progress=progress)
    finally:
        runner.close()
    meta = eval_provenance("rewind sweep", lm, prepared, (b, t, r), score=score, gqa_policy=gqa_policy,
                           seeds=seeds, patterns=pattern_list, fractions=fraction_list,
                           base={"path": str(b.path), "fingerprint": b.fingerprint},
                           target={"path": str(t.path), "fingerprint": t.fingerprint},
                           reference=None if r is None else {"path": str(r.path), "fingerprint": r.fingerprint})
    write_table(rows, out, metadata=meta)
    typer.echo(f"wrote {len(rows)} rows ({len(candidates)} candidates, {misses} evaluated, "
               f"{hits} from the cache) to {out}", err=True)




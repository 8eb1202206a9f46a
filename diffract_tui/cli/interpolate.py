"""`diffract-tui interpolate A B --alpha 0.5 --out DIR`: write θ(α) = (1−α)θ_A + αθ_B; with `--base BASE`,
`--mode base-cpt` writes θ₀ + α(θ_A − θ₀) and `--mode task-arithmetic` θ₀ + λ_Aτ_A + λ_Bτ_B (SPEC §7).
`--diagnostics-json` adds ‖τ‖ and cos(τ_A, τ_B) globally, per matrix and per head (needs --base);
`--barrier scores.csv` (columns alpha,metric,score) gives the barrier B per metric. A metric is read as a
loss (lower is better, the sign flips) when `--loss` is given or its name contains "loss", "ppl" or
"perplexity"; otherwise higher is better."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, List, Optional

import typer


def interpolate_command(
    a: Annotated[Path, typer.Argument(help="Checkpoint A (α = 0), or the CPT with --mode base-cpt.")],
    b: Annotated[Optional[Path], typer.Argument(help="Checkpoint B (α = 1); the second CPT with --base.")] = None,
    alpha: Annotated[float, typer.Option("--alpha", help="α for endpoints and base-cpt.")] = 0.5,
    out: Annotated[Optional[Path], typer.Option("--out",
        help="Folder for the written checkpoint (must not exist).")] = None,
    base: Annotated[Optional[Path], typer.Option("--base",
        help="Base θ₀: enables base-cpt, task-arithmetic and diagnostics.")] = None,
    mode: Annotated[Optional[str], typer.Option("--mode",
        help="endpoints | base-cpt | task-arithmetic (default: endpoints with B, base-cpt with --base and no "
             "B).")] = None,
    lambda_a: Annotated[float, typer.Option("--lambda-a", help="λ_A for task arithmetic.")] = 1.0,
    lambda_b: Annotated[float, typer.Option("--lambda-b", help="λ_B for task arithmetic.")] = 1.0,
    dtype: Annotated[str, typer.Option("--dtype",
        help="Compute dtype: float32 | float64 (output keeps the stored dtype).")] = "float32",
    diagnostics_json: Annotated[Optional[Path], typer.Option("--diagnostics-json",
        help="Write ‖τ‖/cos diagnostics here (needs --base).")] = None,
    barrier_csv: Annotated[Optional[Path], typer.Option("--barrier",
        help="CSV alpha,metric,score: barrier B per metric.")] = None,
    loss: Annotated[bool, typer.Option("--loss",
        help="Read every metric in --barrier as a loss (lower is better).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out.")] = False,
    alphas: Annotated[Optional[str], typer.Option("--alphas",
        help="With --text: α values of the loss path, e.g. 0,0.1,…,1.")] = None,
    text: Annotated[Optional[List[Path]], typer.Option("--text",
        help="Evaluate the loss along the path on this text (no checkpoint written; --out is then a "
             ".csv/.json/.parquet table).")] = None,
    general_text: Annotated[Optional[List[Path]], typer.Option("--general-text",
        help="Also a general text (role general).")] = None,
    tokens: Annotated[int, typer.Option("--tokens", help="T: tokens per window (with --text).")] = 512,
    windows: Annotated[int, typer.Option("--windows", help="N: windows per text (with --text).")] = 64,
    device: Annotated[str, typer.Option("--device", help="Device of the evaluation: auto, cpu, cuda[:N].")] = "auto",
    eval_dtype: Annotated[Optional[str], typer.Option("--eval-dtype",
        help="bfloat16 | float32 for the evaluation.")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option("--cache-dir", help="Cache folder (with --text).")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Read and write no cache (with --text).")] = False,
) -> None:
    """Interpolate checkpoints, base→CPT or task arithmetic; diagnostics and barriers.

    endpoints: (1−α)A + αB, laid out like B. base-cpt: θ₀ + α(A − θ₀), laid out like A (a B given too is used only for the diagnostics' cos). task-arithmetic: θ₀ + λ_A(A − θ₀) + λ_B(B − θ₀), laid out like A. Computed in float32/float64, written in each tensor's stored dtype.

    --barrier: B = max over α of [(1−α)f(0) + αf(1) − f(α)]; a metric is a loss (sign flipped) with --loss or when its name contains "loss", "ppl" or "perplexity".
    """
    import torch

    from analysis.io.checkpoint import open_checkpoint
    from analysis.errors import DiffractError
    from analysis.edit.interpolate import (MODES, barriers_from_csv, base_to_cpt, endpoints, run_interpolation,
                                           task_arithmetic, write_report)
    from analysis.io.guard import checkpoint_files, refuse_input_overlap
    from diffract_tui.cli.rewind import stderr_progress

    chosen = mode or ("endpoints" if b is not None else "base-cpt")
    if chosen not in MODES:
        raise DiffractError(f"unknown mode {chosen!r}", hint=f"use one of {', '.join(MODES)}")
    if chosen in ("base-cpt", "task-arithmetic") and base is None:
        raise DiffractError(f"--mode {chosen} needs --base BASE")
    if chosen in ("endpoints", "task-arithmetic") and b is None:
        raise DiffractError(f"--mode {chosen} needs two checkpoints A and B")
    if text or general_text:
        if out is None:
            raise DiffractError("the loss path needs --out FILE (.csv, .json or .parquet)")
        _loss_path_command(chosen, a, b, base, alphas or "0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1", text or [],
                           general_text or [], tokens, windows, device, eval_dtype, out, cache_dir, no_cache)
        return
    if alphas is not None:
        raise DiffractError("--alphas is for the loss path", hint="pass --text FILE, or --alpha for one checkpoint")
    if diagnostics_json is not None and base is None:
        raise DiffractError("diagnostics of task vectors need --base BASE", hint="pass the common base checkpoint")
    if dtype not in ("float32", "float64"):
        raise DiffractError(f"compute dtype {dtype!r} is not float32 or float64")
    barriers = barriers_from_csv(barrier_csv, loss=True if loss else None) if barrier_csv is not None else None
    wants_pass = out is not None or diagnostics_json is not None
    if not wants_pass and barriers is None:
        raise DiffractError("nothing to do", hint="pass --out DIR, --diagnostics-json FILE or --barrier CSV")

    if wants_pass:
        ck_a = open_checkpoint(a)
        ck_b = open_checkpoint(b) if b is not None else None
        ck_0 = open_checkpoint(base) if base is not None else None
        inputs = [f for ck in (ck_a, ck_b, ck_0) if ck is not None for f in checkpoint_files(ck)]
        inputs += [barrier_csv] if barrier_csv is not None else []
        if diagnostics_json is not None:  # before the pass: a report never lands on, in or around an input
            refuse_input_overlap(diagnostics_json, inputs, option="--diagnostics-json")
        if chosen == "endpoints":
            comb = endpoints(ck_a, ck_b, alpha)
        elif chosen == "base-cpt":
            comb = base_to_cpt(ck_0, ck_a, alpha)
        else:
            comb = task_arithmetic(ck_0, ck_a, ck_b, lambda_a, lambda_b)
        diag_sides = (ck_0, ck_a, ck_b) if diagnostics_json is not None else None
        with stderr_progress("interpolating" if out is not None else "diagnostics",
                             unit_bytes=out is not None) as progress:
            report = run_interpolation(comb, out, force=force, compute_dtype=getattr(torch, dtype),
                                       diagnostics_of=diag_sides, progress=progress)
        if report.written is not None:
            w = report.written
            typer.echo(f"wrote {w.out_dir}: {w.num_tensors} tensors, {w.total_size / 1e9:.3f} GB in "
                       f"{w.seconds:.1f} s ({chosen}, {', '.join(f'{k} {v:g}' for k, v in comb.parameters.items())})")
            note = w.config_note()
            if note:
                typer.echo(note)
        if report.copied_from_target:
            typer.echo(f"{len(report.copied_from_target)} tensor(s) copied unchanged from {comb.target.label} "
                       f"(missing in another input or not floating point): "
                       + ", ".join(report.copied_from_target[:5])
                       + (" …" if len(report.copied_from_target) > 5 else ""))
        if report.diagnostics is not None:
            g = report.diagnostics["global"]
            line = f"‖τ_A‖ = {g['tau_a_norm']:.6g}"
            if "cos" in g:
                line += f"  ‖τ_B‖ = {g['tau_b_norm']:.6g}  cos(τ_A, τ_B) = {g['cos']:.6g}"
            typer.echo(line)
            diag = dict(report.diagnostics)
            diag["mode"] = chosen
            diag["parameters"] = comb.parameters
            if barriers is not None:
                diag["barriers"] = [vars(x) for x in barriers]
            write_report(diagnostics_json, diag, inputs=inputs)
            typer.echo(f"wrote {diagnostics_json}")
    if barriers is not None:
        for x in barriers:
            kind = "loss, lower is better" if x.is_loss else "score, higher is better"
            typer.echo(f"barrier {x.metric}: B = {x.barrier:.6g} at α = {x.alpha_at_max:g} "
                       f"({kind}; {x.points} points)")


def register(app: typer.Typer) -> None:
    """Add `interpolate` to the root app."""
    app.command("interpolate")(interpolate_command)


def _loss_path_command(mode: str, a: Path, b: Optional[Path], base: Optional[Path], alphas: str, text: List[Path],
                       general: List[Path], tokens: int, windows: int, device: str, dtype: Optional[str], out: Path,
                       cache_dir: Optional[Path], no_cache: bool) -> None:
    """`interpolate … --text FILE --out path.csv`: the loss along θ(α) in memory, and the barrier per text."""
    from analysis.eval.evaluator import Evaluator
    from analysis.eval.loss import load_model
    from analysis.eval.path import loss_path, parse_alphas, path_combination
    from analysis.io.checkpoint import open_checkpoint
    from analysis.io.guard import refuse_input_overlap
    from analysis.run.tables import table_format, write_table
    from diffract_tui.cli.eval import eta_progress, eval_device, load_texts, make_cache, prepare_all, eval_provenance

    table_format(out)
    refuse_input_overlap(out, [p for p in (a, b, base) if p is not None] + [*text, *general], option="--out")
    alpha_list = parse_alphas(alphas)
    texts = load_texts(text, general)
    ck_a = open_checkpoint(a)
    ck_b = open_checkpoint(b) if b is not None else None
    ck_0 = open_checkpoint(base) if base is not None else None
    layout_ck = path_combination(mode, 0.0, ck_a, ck_b, ck_0).target
    with eval_device(device, dtype, None) as (dev, dt):
        lm = load_model(layout_ck.path, device=dev, dtype=dt)
    prepared = prepare_all(lm, texts, tokens, windows)
    evaluator = Evaluator(lm, layout_ck.fingerprint, make_cache(cache_dir, no_cache))
    with eta_progress(f"loss along {len(alpha_list)} points") as progress:
        rows, barriers = loss_path(evaluator, prepared, mode, alpha_list, ck_a, ck_b, ck_0, progress=progress)
    refs = {name: None if ck is None else {"path": str(ck.path), "fingerprint": ck.fingerprint}
            for name, ck in (("a", ck_a), ("b", ck_b), ("base", ck_0))}
    write_table(rows, out, metadata=eval_provenance("interpolate", lm, prepared, (ck_a, ck_b, ck_0), mode=mode,
                                                    alphas=alpha_list, barriers=barriers, **refs))
    for x in barriers:
        typer.echo(f"barrier {x['text']}: B = {x['barrier']:.6g} at α = {x['alpha_at_max']:g} (loss, lower is better)")
    if not barriers:
        typer.echo("no barrier: the path needs α = 0 and α = 1", err=True)
    typer.echo(f"wrote {len(rows)} rows to {out}", err=True)

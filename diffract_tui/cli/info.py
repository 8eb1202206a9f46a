"""`diffract-tui info CKPT [CKPT …] [--json]`: what each checkpoint holds (architecture, heads,
tensors, dtypes, bytes, fingerprint) and how the checkpoints align, without reading tensor data."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, List

import typer


def _human_bytes(n: int) -> str:
    """1536 → '1.5 KiB'."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def quant_groups(quant: dict[str, str]) -> list[tuple[str, str, str]]:
    """(name pattern with `layers.*`, storage type, layer list) rows: every tensor's GGUF type, compactly."""
    groups: dict[tuple[str, str], list[int]] = {}
    for name, qtype in quant.items():
        m = re.match(r"^(.*?layers\.)(\d+)(\..+)$", name)
        key = (f"{m.group(1)}*{m.group(3)}", qtype) if m else (name, qtype)
        groups.setdefault(key, []).append(int(m.group(2)) if m else -1)
    rows = []
    for (pattern, qtype), layers in groups.items():
        layers = sorted(set(layers))
        if layers == [-1]:
            where = ""
        elif layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
            where = f"{layers[0]}–{layers[-1]}"
        else:
            where = ",".join(map(str, layers))
        rows.append((pattern, qtype, where))
    return rows


def checkpoint_summary(ckpt: Any, layout: Any) -> dict[str, Any]:
    """JSON-ready description of one opened checkpoint and its detected layout."""
    dtypes = Counter(ckpt.info(k).dtype for k in ckpt.keys())
    quant = {k: ckpt.info(k).quant for k in ckpt.keys() if getattr(ckpt.info(k), "quant", None)}
    matrices = [{"tensor": m.tensor, "shape": list(m.shape), "quant": quant.get(m.tensor)}
                for modules in [layout.globals, *(layer.modules for layer in layout.layers)]
                for m in modules if len(m.shape) >= 2]
    return {
        "label": ckpt.label,
        "path": str(ckpt.path),
        "fingerprint": ckpt.fingerprint,
        "weight_files": [str(f) for f in ckpt.weight_files],
        "model_type": layout.model_type,
        "model_type_inferred": bool(getattr(layout, "model_type_inferred", False)),
        "layers": layout.num_layers,
        "heads": layout.num_heads,
        "kv_heads": layout.num_kv_heads,
        "head_dim": layout.head_dim,
        "hidden_size": layout.hidden_size,
        "heads_available": layout.heads_available,
        "heads_reason": layout.heads_reason,
        "tensors": len(ckpt.keys()),
        "dtypes": dict(sorted(dtypes.items())),
        "quant_types": dict(sorted(Counter(quant.values()).items())),
        "quant": quant,   # GGUF: storage type per tensor (dtypes are what reads return)
        "bytes": sum(ckpt.info(k).nbytes for k in ckpt.keys()),
        "matrices": matrices,
    }


def _print_rich(summaries: list[dict[str, Any]], alignment: dict[str, Any]) -> None:
    """Rich output: one column per checkpoint, matrices of unknown architectures, then the alignment."""
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    table = Table(title="Checkpoints", title_justify="left")
    table.add_column("", style="bold")
    for s in summaries:
        table.add_column(s["label"], overflow="fold")
    rows = [
        ("architecture", lambda s: s["model_type"] + (" (inferred)" if s["model_type_inferred"] else "")),
        ("layers", lambda s: str(s["layers"])),
        ("heads", lambda s: str(s["heads"]) if s["heads_available"] else f"{s['heads']} (not offered)"),
        ("kv heads", lambda s: str(s["kv_heads"])),
        ("head_dim", lambda s: str(s["head_dim"])),
        ("hidden", lambda s: str(s["hidden_size"])),
        ("tensors", lambda s: str(s["tensors"])),
        ("dtypes", lambda s: ", ".join(f"{d} ×{n}" for d, n in s["dtypes"].items())),
        ("quantisation", lambda s: ", ".join(f"{q} ×{n}" for q, n in s["quant_types"].items()) or "—"),
        ("size", lambda s: _human_bytes(s["bytes"])),
        ("weight files", lambda s: str(len(s["weight_files"]))),
        ("fingerprint", lambda s: s["fingerprint"]),
    ]
    for name, cell in rows:
        table.add_row(name, *(cell(s) for s in summaries))
    console.print(table)
    for s in summaries:
        console.print(f"{s['label']}: {s['path']}", soft_wrap=True, markup=False)
    for s in summaries:
        if not s["quant"]:
            continue
        quant = Table(title=f"Quantisation of {s['label']}", title_justify="left")
        for column in ("tensor", "type", "layers"):
            quant.add_column(column, overflow="fold")
        for row in quant_groups(s["quant"]):
            quant.add_row(*row)
        console.print(quant)
    for s in summaries:
        if s["heads_available"]:
            continue
        console.print(f"{s['label']}: heads not offered: {s['heads_reason']}", soft_wrap=True, markup=False)
        matrices = Table(title=f"Matrices of {s['label']}", title_justify="left")
        matrices.add_column("tensor", overflow="fold")
        matrices.add_column("shape")
        if s["quant"]:
            matrices.add_column("type")
        for m in s["matrices"]:
            quant_cell = [m["quant"] or ""] if s["quant"] else []
            matrices.add_row(m["tensor"], " × ".join(map(str, m["shape"])), *quant_cell)
        console.print(matrices)
    console.print(f"Alignment: {alignment['shared']} tensors shared by all {len(summaries)} checkpoint(s)")
    for label, keys in alignment["missing"].items():
        if keys:
            console.print(f"  missing in {label} ({len(keys)}): {', '.join(keys)}", soft_wrap=True, markup=False)
    for m in alignment["mismatched"]:
        shapes = " vs ".join("×".join(map(str, s)) for s in m["shapes"])
        console.print(f"  shape mismatch on {m['key']}: {shapes}", soft_wrap=True, markup=False)


def info_command(
    checkpoints: Annotated[List[Path], typer.Argument(help="Checkpoint folders or weight files.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")] = False,
    lenient: Annotated[bool, typer.Option("--lenient",
        help="List shape mismatches on shared tensors instead of failing.")] = False,
) -> None:
    """Show architecture, heads, tensors, dtypes, size and fingerprint of each checkpoint, and their alignment."""
    from analysis.io.alignment import require_same_model
    from analysis.model.architecture import layout_of
    from analysis.io.checkpoint import open_checkpoint
    from analysis.io.labels import unique_labels

    opened = [open_checkpoint(p, label=lab) for p, lab in zip(checkpoints, unique_labels(checkpoints))]
    try:
        layouts = [layout_of(c) for c in opened]
        alignment = require_same_model(opened, strict=not lenient, layouts=layouts).to_dict()
        summaries = [checkpoint_summary(c, layout) for c, layout in zip(opened, layouts)]
    finally:
        for c in opened:
            c.close()
    if as_json:
        typer.echo(json.dumps({"checkpoints": summaries, "alignment": alignment}, indent=2))
    else:
        _print_rich(summaries, alignment)


def register(app: typer.Typer) -> None:
    """Add the `info` command to the root app."""
    app.command("info")(info_command)

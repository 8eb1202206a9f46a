"""`diffract-tui demo`: the explorer on the real rxnfp BERT trio (a pretrained base and two fine-tunes);
`diffract-tui demo --synthetic`: on a generated base + domain family with planted structure."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

RXNFP_LABELS = {"bert_pretrained": "pretrained", "bert_ft": "ft", "bert_ft_10k_25s": "ft_10k_25s"}
SYNTHETIC_FOLDER = "demo-synthetic"
SYNTHETIC_DOMAINS = ("math", "code")


def rxnfp_paths(cache_root: Path | None) -> list[Path]:
    """The three rxnfp checkpoint folders, installing rxnfp into the cache on first use (with a message)."""
    from analysis.errors import DiffractError
    from analysis.realmodels import RXNFP_MODELS, RXNFP_VERSION, default_rxnfp_cache, ensure_rxnfp, rxnfp_checkpoints

    target = (cache_root / f"rxnfp-{RXNFP_VERSION}") if cache_root is not None else default_rxnfp_cache()
    try:
        found = rxnfp_checkpoints(target)
        return [found[name] for name in RXNFP_MODELS]
    except DiffractError:
        typer.echo(f"diffract-tui: first use: installing rxnfp=={RXNFP_VERSION} (three BERT checkpoints, ~300 MB) "
                   f"into {target} …", err=True)
    folder = ensure_rxnfp(target)
    return [folder / name for name in RXNFP_MODELS]


def synthetic_paths(cache_root: Path) -> list[Path]:
    """A generated base + two domains with planted structure (`analysis.generate.write_family`), written
    once into the cache folder and reused afterwards (so cached spectra stay valid)."""
    from analysis.generate import FamilyManifest, write_family

    root = cache_root / SYNTHETIC_FOLDER
    try:
        manifest = FamilyManifest.load(root)
    except (OSError, ValueError, KeyError):
        typer.echo(f"diffract-tui: writing the synthetic demo family into {root} …", err=True)
        manifest = write_family(root, domains=SYNTHETIC_DOMAINS)
    return [manifest.base, *manifest.domains.values()]


def demo_command(
    synthetic: Annotated[bool, typer.Option("--synthetic",
        help="Use a generated base + domains family with planted structure.")] = False,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    cache_dir: Annotated[Optional[Path], typer.Option("--cache-dir",
        help="Spectra cache (and demo files) folder.")] = None,
) -> None:
    """Open the explorer on demo checkpoints (no files of your own needed)."""
    from analysis.run.cache import default_cache_root
    from analysis.run.session import ExplorerSession
    from diffract_tui.cli.launch import run_explorer

    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    if synthetic:
        paths = synthetic_paths(root)
        labels = None
    else:
        paths = rxnfp_paths(Path(cache_dir).expanduser() if cache_dir is not None else None)
        labels = [RXNFP_LABELS.get(p.name, p.name) for p in paths]
    session = ExplorerSession.open(paths, labels=labels, device=device, cache_dir=root)
    run_explorer(session)


def register(app: typer.Typer) -> None:
    """Add the `demo` command."""
    app.command("demo")(demo_command)

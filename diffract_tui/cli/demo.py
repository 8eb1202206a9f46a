"""`diffract-tui demo [--family rxnfp|cpt|series|synthetic]`: the explorer on demo checkpoints —
the real rxnfp BERT trio (a pretrained base and two fine-tunes; the default), a tiny real continual pre-training
family with held-out texts for the loss preview (`cpt`), a real short training run's checkpoint series for the
Evolution view (`series`), or a generated base + domain family with planted structure (`synthetic`, also
`--synthetic`). The tiny models are trained on first use into the cache folder and reused afterwards."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional

import typer

RXNFP_LABELS = {"bert_pretrained": "pretrained", "bert_ft": "ft", "bert_ft_10k_25s": "ft_10k_25s"}
SYNTHETIC_FOLDER = "demo-synthetic"
SYNTHETIC_DOMAINS = ("math", "code")
CPT_FOLDER = "demo-tiny-cpt"
SERIES_FOLDER = "demo-series"
FAMILIES = ("rxnfp", "cpt", "series", "synthetic")


@dataclass(frozen=True)
class DemoInputs:
    """What the demo opens: checkpoints (base first), their labels (None = folder names) and held-out texts."""

    paths: list[Path]
    labels: list[str] | None = None
    texts: list[Path] = field(default_factory=list)
    general_texts: list[Path] = field(default_factory=list)


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


def _announce(what: str, seconds: str) -> Callable[[Path], None]:
    """The one first-use line: what is trained, about how long it takes, and where it goes."""
    def say(root: Path) -> None:
        typer.echo(f"diffract-tui: first use: training {what} (~{seconds} on one CPU core) into {root} …", err=True)
    return say


def cpt_inputs(cache_root: Path) -> DemoInputs:
    """The tiny CPT family (base, code, code2), trained once into the cache, with its held-out code text as the
    domain text and its held-out prose as the general text (the Rewind view's loss preview)."""
    from analysis.tiny_models import build_cpt_family

    fam = build_cpt_family(cache_root / CPT_FOLDER,
                           announce=_announce("a tiny Llama on Python's docs, continued on its code", "20 s"))
    return DemoInputs(paths=[fam.base, fam.code, fam.code2], texts=[fam.code_text], general_texts=[fam.prose_text])


def series_inputs(cache_root: Path) -> DemoInputs:
    """The checkpoint series of a real short training run (steps 0-40), trained once into the cache, in step
    order (the Evolution view)."""
    from analysis.tiny_models import build_series

    run = build_series(cache_root / SERIES_FOLDER,
                       announce=_announce("a 5-checkpoint run of a tiny Llama on Python's docs", "3 s"))
    return DemoInputs(paths=[run.paths[s] for s in sorted(run.paths)])


def demo_inputs(family: str, cache_root: Path, rxnfp_cache: Path | None) -> DemoInputs:
    """The checkpoints, labels and texts of one demo family (building or installing it on first use)."""
    if family == "cpt":
        return cpt_inputs(cache_root)
    if family == "series":
        return series_inputs(cache_root)
    if family == "synthetic":
        return DemoInputs(paths=synthetic_paths(cache_root))
    paths = rxnfp_paths(rxnfp_cache)
    return DemoInputs(paths=paths, labels=[RXNFP_LABELS.get(p.name, p.name) for p in paths])


def _check_family(value: str) -> str:
    """--family must name one of FAMILIES (a usage error otherwise)."""
    if value not in FAMILIES:
        raise typer.BadParameter(f"unknown demo family {value!r} — use {', '.join(FAMILIES)}")
    return value


def demo_command(
    family: Annotated[str, typer.Option("--family", callback=_check_family,
        help="rxnfp (three real BERT checkpoints), cpt (a tiny Llama CPT family with held-out texts, trained on "
             "first use), series (a tiny training run's checkpoints, trained on first use) or synthetic.")] = "rxnfp",
    synthetic: Annotated[bool, typer.Option("--synthetic",
        help="Same as --family synthetic: a generated base + domains family with planted structure.")] = False,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    cache_dir: Annotated[Optional[Path], typer.Option("--cache-dir",
        help="Spectra cache (and demo files) folder.")] = None,
) -> None:
    """Open the explorer on demo checkpoints (no files of your own needed)."""
    from analysis.run.cache import default_cache_root
    from analysis.run.session import ExplorerSession
    from diffract_tui.cli.launch import run_explorer

    if synthetic and family not in ("rxnfp", "synthetic"):
        raise typer.BadParameter(f"--synthetic is --family synthetic; it cannot go with --family {family}",
                                 param_hint="--synthetic")
    chosen = "synthetic" if synthetic else family
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    inputs = demo_inputs(chosen, root, Path(cache_dir).expanduser() if cache_dir is not None else None)
    session = ExplorerSession.open(inputs.paths, labels=inputs.labels, device=device, cache_dir=root,
                                   texts=inputs.texts, general_texts=inputs.general_texts)
    run_explorer(session)


def register(app: typer.Typer) -> None:
    """Add the `demo` command."""
    app.command("demo")(demo_command)

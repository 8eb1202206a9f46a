"""Locate the three real rxnfp BERT checkpoints (pretrained + two fine-tunes of one base): from an
installed `rxnfp` package (found without importing it), else from a private copy under a cache folder."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from analysis.errors import DiffractError

RXNFP_VERSION = "0.1.0"
RXNFP_MODELS = ("bert_pretrained", "bert_ft", "bert_ft_10k_25s")
MODELS_SUBDIR = Path("models") / "transformers"


def _models_dir(package_dir: Path) -> Path | None:
    """`<package>/models/transformers` when it holds all three checkpoint folders, else None."""
    folder = package_dir / MODELS_SUBDIR
    if all((folder / name / "pytorch_model.bin").is_file() for name in RXNFP_MODELS):
        return folder
    return None


def installed_rxnfp_dir() -> Path | None:
    """The installed rxnfp package folder, found with find_spec (the package is never imported)."""
    try:
        spec = importlib.util.find_spec("rxnfp")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def default_rxnfp_cache() -> Path:
    """Where `ensure_rxnfp` installs a private copy by default: <diffract cache root>/rxnfp-<version>."""
    from analysis.run.cache import default_cache_root

    return default_cache_root() / f"rxnfp-{RXNFP_VERSION}"


def rxnfp_checkpoints(cache_dir: Path | None = None) -> dict[str, Path]:
    """{name: folder} for bert_pretrained, bert_ft, bert_ft_10k_25s; DiffractError when neither the
    installed package nor the cached copy (cache_dir, default `default_rxnfp_cache()`) has them."""
    candidates = [installed_rxnfp_dir(), (cache_dir or default_rxnfp_cache()) / "rxnfp"]
    for package_dir in candidates:
        if package_dir is not None and (folder := _models_dir(package_dir)) is not None:
            return {name: folder / name for name in RXNFP_MODELS}
    raise DiffractError("the rxnfp BERT checkpoints are not installed", path=cache_dir or default_rxnfp_cache(),
                        hint=f"run `pip install --no-deps rxnfp=={RXNFP_VERSION}` or call ensure_rxnfp()")


def ensure_rxnfp(target_dir: Path | None = None) -> Path:
    """Return the folder holding the three checkpoint folders, installing rxnfp with
    `pip install --no-deps --target <target_dir>` when neither the package nor a copy is present."""
    target_dir = Path(target_dir) if target_dir is not None else default_rxnfp_cache()
    try:
        return rxnfp_checkpoints(target_dir)[RXNFP_MODELS[0]].parent
    except DiffractError:
        pass
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
           "--target", str(target_dir), f"rxnfp=={RXNFP_VERSION}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        ok = proc.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if not ok or (folder := _models_dir(target_dir / "rxnfp")) is None:
        raise DiffractError(f"could not install rxnfp=={RXNFP_VERSION} (the package registry is unreachable or "
                            f"refused)", path=target_dir,
                            hint=f"connect to the internet, or run `pip download --no-deps rxnfp=={RXNFP_VERSION}` "
                                 f"elsewhere and `pip install --no-deps --target {target_dir} <the file>`")
    return folder

"""Hugging Face repo ids (`org/name[@revision]`) and hub-cache folders as checkpoint arguments.

Resolution is huggingface_hub's own (`snapshot_download`, its cache constants `HF_HUB_CACHE` / `HF_HOME` and
`HF_HUB_OFFLINE`): the local cache first; a download (with the hub's progress bars on stderr) only when the hub
may be used and the cache lacks the weights. A path that exists on disk always wins over a repo id. Every failure
(repo or revision missing, gated, offline, unreachable) is one CheckpointError line saying which and what to do.
"""

from __future__ import annotations

import re
from pathlib import Path

from analysis.errors import CheckpointError

REPO_PREFIX = "models--"
_SPEC = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.\-]*/[\w.\-]+)(?:@(?P<rev>\S+))?$")
# What a download fetches: weights in one format plus the files the layout and the copy need.
_DOWNLOAD_PASSES = (
    ["*.safetensors", "*.safetensors.index.json"],
    ["pytorch_model*.bin", "pytorch_model.bin.index.json"],
)
_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.index.json")


def _offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as huggingface_hub read it."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _cache_dir() -> Path:
    """The hub cache folder huggingface_hub uses (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser()


def _download_hint(spec: str) -> str:
    """What to do when the cache lacks `spec`: download it where the hub is reachable (or allow downloads here)."""
    where = f"run `hf download {_cli_spec(spec)}` on a machine with network and copy its hub cache here"
    return f"{where}, or unset HF_HUB_OFFLINE to download it" if _offline() else where


def _cli_spec(spec: str) -> str:
    """`org/name@rev` as the hub CLI takes it: `org/name --revision rev`."""
    repo, _, rev = spec.partition("@")
    return f"{repo} --revision {rev}" if rev else repo


def parse_repo_spec(arg: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when `arg` reads as `org/name[@revision]` with a valid hub repo id, else None."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    m = _SPEC.match(arg)
    if not m:
        return None
    try:
        validate_repo_id(m["repo"])
    except HFValidationError:
        return None
    return m["repo"], m["rev"]


def _repo_folder(path: Path) -> Path | None:
    """The `models--org--name` folder that is `path` or holds it (a snapshot, a file in one, a blob), else None."""
    for p in (path, *path.parents):
        if p.name.startswith(REPO_PREFIX) and len(p.name) > len(REPO_PREFIX) and (p / "snapshots").is_dir():
            return p
    return None


def _repo_id_of(folder: Path) -> str:
    """`models--org--name` → `org/name` (the hub forbids `--` inside names, so the split is exact)."""
    return folder.name[len(REPO_PREFIX):].replace("--", "/")


def _refs(folder: Path) -> dict[str, str]:
    """{ref name: commit hash} of a cached repo (`refs/main`, `refs/step1000`, `refs/pr/1` …)."""
    refs = folder / "refs"
    if not refs.is_dir():
        return {}
    out: dict[str, str] = {}
    for f in sorted(refs.rglob("*")):
        if f.is_file():
            try:
                out[f.relative_to(refs).as_posix()] = f.read_text().strip()
            except OSError:
                continue
    return out


def hub_label(path: str | Path) -> str | None:
    """The label of a hub-cache path: `org/name` for the repo folder or the snapshot `refs/main` names,
    `org/name@ref` for a snapshot another ref names (`@<hash12>` when none does); None outside a hub cache."""
    p = Path(path).expanduser().absolute()
    folder = _repo_folder(p)
    if folder is None:
        return None
    repo = _repo_id_of(folder)
    snapshots = folder / "snapshots"
    if p == folder or snapshots not in p.parents:
        return repo
    commit = p.relative_to(snapshots).parts[0]
    names = [name for name, sha in _refs(folder).items() if sha == commit]
    if "main" in names:
        return repo
    return f"{repo}@{names[0]}" if names else f"{repo}@{commit[:12]}"


def _has_weights(folder: Path) -> bool:
    """True when a snapshot folder holds at least one weight file or index (a config-only snapshot does not)."""
    return any(any(folder.glob(g)) for g in _WEIGHT_GLOBS)


def _local_miss(repo: str, revision: str | None, spec: str, cache: Path) -> CheckpointError:
    """The one line for a repo id the local cache cannot serve: which of repo / revision / weights is missing."""
    from huggingface_hub.file_download import repo_folder_name

    folder = cache / repo_folder_name(repo_id=repo, repo_type="model")
    offline = " (HF_HUB_OFFLINE is set)" if _offline() else ""
    if not (folder / "snapshots").is_dir():
        return CheckpointError(f"no such file or folder, and the Hugging Face repo {repo} is not in the hub cache "
                               f"{cache}{offline}", path=spec,
                               hint=f"check the path or the repo id, or {_download_hint(spec)}")
    rev = revision or "main"
    cached = ", ".join(sorted(_refs(folder))) or "none"
    return CheckpointError(f"revision {rev} of {repo} is not in the hub cache {cache}{offline} (cached refs: {cached})",
                           path=spec, hint=f"pick a cached revision, or {_download_hint(spec)}")


def _cached_snapshot(repo: str, revision: str | None, cache: Path) -> Path | None:
    """The cached snapshot folder of `repo` at `revision` through huggingface_hub (refs/<rev> or a commit hash)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, revision=revision, cache_dir=cache, local_files_only=True))
    except LocalEntryNotFoundError:  # IncompleteSnapshotError included: treated as absent, a download completes it
        return None


def _download(repo: str, revision: str | None, spec: str, cache: Path) -> Path:
    """Download the weights (safetensors, else PyTorch .bin) and JSON/tokenizer files of `repo` with the hub's
    progress bars; every hub failure becomes one CheckpointError line."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)

    from analysis.io.checkpoint import AUX_PATTERNS

    try:
        for weights in _DOWNLOAD_PASSES:
            folder = Path(snapshot_download(repo, revision=revision, cache_dir=cache,
                                            allow_patterns=[*weights, *AUX_PATTERNS, "*.json"]))
            if _has_weights(folder):
                return folder
    except GatedRepoError:
        raise CheckpointError(f"the Hugging Face repo {repo} is gated", path=spec,
                              hint=f"accept its terms on https://huggingface.co/{repo} and log in (`hf auth login`) "
                                   "or set HF_TOKEN") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"revision {revision or 'main'} does not exist in the Hugging Face repo {repo}",
                              path=spec, hint="check the revision (a branch, tag or commit hash)") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"no such file or folder, and no Hugging Face repo {repo} (or it is private)",
                              path=spec, hint="check the path or the repo id; for a private repo log in "
                                              "(`hf auth login`) or set HF_TOKEN") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        raise CheckpointError(f"cannot reach the Hugging Face hub to download {repo}, and it is not in the hub "
                              f"cache {cache} ({type(e).__name__})", path=spec,
                              hint=f"check the network, or {_download_hint(spec)}") from None
    except (HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"downloading {repo} from the Hugging Face hub failed ({type(e).__name__})", path=spec,
                              hint="retry, or check the network, the disk space and the hub token") from None
    raise CheckpointError(f"the Hugging Face repo {repo} holds no safetensors or PyTorch weights", path=spec,
                          hint="point at a repo with model.safetensors or pytorch_model.bin, or at a local file")


def _resolve_repo(repo: str, revision: str | None, spec: str) -> Path:
    """The snapshot folder of `repo@revision`: from the local cache, else downloaded when the hub may be used."""
    cache = _cache_dir()
    folder = _cached_snapshot(repo, revision, cache)
    if folder is not None and _has_weights(folder):
        return folder
    if _offline():
        if folder is not None:
            raise CheckpointError(f"the hub cache holds {spec} without weight files (HF_HUB_OFFLINE is set)",
                                  path=folder, hint=_download_hint(spec))
        raise _local_miss(repo, revision, spec, cache)
    return _download(repo, revision, spec, cache)


def _repo_folder_snapshot(folder: Path) -> Path:
    """The snapshot `refs/main` names in a `models--org--name` folder, found the way huggingface_hub finds it."""
    repo = _repo_id_of(folder)
    snapshot = _cached_snapshot(repo, None, folder.parent)
    if snapshot is None:
        raise CheckpointError("hub-cache folder has no snapshot for refs/main", path=folder,
                              hint="point at one of its snapshots/<hash> folders, or "
                                   f"run `hf download {repo}` to complete it")
    return snapshot


def arg_label(arg: str | Path) -> str | None:
    """The hub label of a checkpoint argument without resolving it: `org/name[@rev]` for a repo id that is not an
    existing path, the hub_label of an existing path, None otherwise (the caller's own name rule applies)."""
    given = Path(arg).expanduser()
    if given.exists() or given.is_symlink():
        return hub_label(given)
    spec = parse_repo_spec(str(arg))
    if spec is None:
        return None
    repo, revision = spec
    return repo if revision in (None, "main") else f"{repo}@{revision}"


def resolve_checkpoint_arg(arg: str | Path) -> tuple[Path, str | None]:
    """(path to open, label or None) for a checkpoint argument: an existing path as given (a `models--org--name`
    folder mapped to its main snapshot), else a hub repo id `org/name[@revision]` resolved through the hub cache;
    any other argument comes back unchanged so that the opener reports the missing path."""
    given = Path(arg).expanduser()
    if given.exists() or given.is_symlink():
        folder = _repo_folder(given.absolute())
        if folder is not None and folder == given.absolute():
            return _repo_folder_snapshot(folder), hub_label(folder)
        return given, hub_label(given)
    spec = parse_repo_spec(str(arg))
    if spec is None:
        return given, None
    repo, revision = spec
    return _resolve_repo(repo, revision, str(arg)), arg_label(arg)

"""Sharded-checkpoint index files (`*.index.json`): tensor name -> shard file, confined to the folder."""

from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath

from analysis.errors import CheckpointError
from analysis.io.safe_read import REGULAR_HINT, NotRegularFileError, load_json, regular_stat

HINT = "an index may name only shard files inside its own folder; fix or regenerate the index"


def read_index(index: Path) -> dict[str, Path]:
    """Parse `weight_map` and resolve every shard inside the index's folder (SPEC §1: no `..`,
    no absolute paths, no links leaving the folder, every shard must exist)."""
    data = load_json(index, CheckpointError, "index", "fix or regenerate the index file")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError("index has no 'weight_map' object mapping tensor names to shard files", path=index,
                              hint="fix or regenerate the index file")
    folder = index.parent.resolve()
    allowed = [folder, *_hf_cache_blobs(folder)]
    shards: dict[str, Path] = {}
    result: dict[str, Path] = {}
    for name, shard in weight_map.items():
        if shard not in shards:
            shards[shard] = _shard_path(index, folder, shard, allowed)
        result[name] = shards[shard]
    return result


def _hf_cache_blobs(folder: Path) -> list[Path]:
    """In a Hugging Face hub cache (`models--org--name/snapshots/<rev>/`) shards are links into the
    repository's own `blobs/` folder; those links stay inside the model and are allowed."""
    repo = folder.parent.parent
    if folder.parent.name == "snapshots" and repo.name.startswith("models--") and (repo / "blobs").is_dir():
        return [(repo / "blobs").resolve()]
    return []


def _shard_path(index: Path, folder: Path, shard: object, allowed: list[Path]) -> Path:
    """The resolved shard path, or a CheckpointError naming the offending entry."""
    if not isinstance(shard, str) or not shard:
        raise CheckpointError(f"index names an invalid shard {shard!r}", path=index, hint=HINT)
    if PurePosixPath(shard).is_absolute() or PureWindowsPath(shard).is_absolute() or shard.startswith(("/", "\\")):
        raise CheckpointError(f"index names an absolute shard path {shard!r}", path=index, hint=HINT)
    if ".." in PurePosixPath(shard.replace("\\", "/")).parts:
        raise CheckpointError(f"index names a shard outside its folder {shard!r}", path=index, hint=HINT)
    candidate = folder / shard
    resolved = candidate.resolve()
    if not any(resolved.is_relative_to(root) for root in allowed):
        raise CheckpointError(f"index names a shard {shard!r} that links outside its folder (to {resolved})",
                              path=index, hint=HINT)
    try:
        regular_stat(resolved)
    except NotRegularFileError as err:
        raise CheckpointError(f"index names a shard {shard!r} that is {err.kind}, not a regular file", path=index,
                              hint=REGULAR_HINT) from None
    except OSError:
        raise CheckpointError(f"index names a missing shard {shard!r}", path=index,
                              hint="download the missing shard or regenerate the index") from None
    return resolved

"""The rewind list (SPEC §6): the JSON exchange format between the UI, the CLI and the user's tools —
build, validate (one-line errors naming the file and the field), read, write atomically, check freshness."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from analysis.io.atomic import write_text_atomic
from analysis.errors import RewindListError
from analysis.io.guard import checkpoint_inputs, refuse_input_overlap
from analysis.io.safe_read import (MAX_JSON_BYTES, REGULAR_HINT, FileTooLargeError, NotRegularFileError, parse_json,
                                   read_regular_bytes)

FORMAT = "diffract-rewind/1"
PATTERNS = ("manual", "greedy", "reference", "top", "random")
GQA_POLICIES = ("group", "never", "any")
SCORES = ("rel_frob", "frob", "agreement", "taylor")  # agreement: A2 delta_cos with the reference (variant
# most_agreeing); taylor: the first-order predicted loss change of rewinding (SPEC §9)
PROJECTIONS = ("q", "k", "v", "o")
KV = ("k", "v")
LOSS_ROLES = ("domain", "general")  # the text roles of SPEC §9
_REQUIRED = ("format", "base", "target", "architecture", "pattern", "heads")


@dataclass(frozen=True)
class CheckpointRef:
    """A checkpoint named in a list: its path and its fingerprint when the list was made (SPEC §1)."""

    path: str
    fingerprint: str


@dataclass(frozen=True)
class Architecture:
    """The head geometry a list was made for; every head in the list must fit it."""

    model_type: str
    layers: int
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        return self.heads // self.kv_heads

    def kv_group(self, head: int) -> int:
        """g(h) = ⌊h / (H/H_kv)⌋ (SPEC §2)."""
        return head // self.group_size

    @classmethod
    def from_layout(cls, layout: Any) -> "Architecture":
        return cls(model_type=str(layout.model_type), layers=int(layout.num_layers), heads=int(layout.num_heads),
                   kv_heads=int(layout.num_kv_heads), head_dim=int(layout.head_dim))


@dataclass(frozen=True)
class Pattern:
    """How the heads were chosen: pattern name, fraction f, the ranking score and the GQA policy for k/v."""

    name: str
    fraction: float
    score: str = "rel_frob"
    gqa_policy: str = "group"


@dataclass(frozen=True)
class HeadEntry:
    """One rewound query head and which of its projections go back to the base (k/v: its kv group's rows)."""

    layer: int
    head: int
    projections: tuple[str, ...]
    score: float | None = None


@dataclass(frozen=True)
class LossEntry:
    """The measured loss of the list's plan on one text (SPEC §9), with the base and target levels: the optional
    `losses` field the explorer writes when it measured this plan."""

    text: str
    role: str                 # domain | general
    text_sha256: str
    loss: float
    base: float
    target: float
    windows: int
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "role": self.role, "text_sha256": self.text_sha256, "loss": self.loss,
                "base": self.base, "target": self.target, "windows": self.windows, "tokens": self.tokens}


@dataclass(frozen=True)
class RewindList:
    """A validated rewind list; `settings` holds extra provenance (SPEC §8), additive to the SPEC §6 keys;
    `losses` the measured losses of this plan per text, when they were measured (optional)."""

    base: CheckpointRef
    target: CheckpointRef
    reference: CheckpointRef | None
    architecture: Architecture
    pattern: Pattern
    heads: tuple[HeadEntry, ...]
    created_by: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    losses: tuple[LossEntry, ...] = ()

    def rewound_kv_groups(self, proj: str) -> set[tuple[int, int]]:
        """(layer, kv group) pairs whose ``proj`` (k or v) rows go back to the base."""
        return {(e.layer, self.architecture.kv_group(e.head)) for e in self.heads if proj in e.projections}

    def heads_per_layer(self) -> list[int]:
        counts = [0] * self.architecture.layers
        for e in self.heads:
            counts[e.layer] += 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        """The SPEC §6 JSON object (NaN scores become null, since JSON has no NaN)."""
        def ref(r: CheckpointRef | None) -> dict[str, str] | None:
            return None if r is None else {"path": r.path, "fingerprint": r.fingerprint}

        a, p = self.architecture, self.pattern
        out: dict[str, Any] = {
            "format": FORMAT,
            "base": ref(self.base),
            "target": ref(self.target),
            "reference": ref(self.reference),
            "architecture": {"model_type": a.model_type, "layers": a.layers, "heads": a.heads,
                             "kv_heads": a.kv_heads, "head_dim": a.head_dim},
            "pattern": {"name": p.name, "fraction": p.fraction, "score": p.score, "gqa_policy": p.gqa_policy},
            "heads": [{"layer": e.layer, "head": e.head, "projections": list(e.projections),
                       "score": None if e.score is None or not math.isfinite(e.score) else e.score}
                      for e in self.heads],
            "created_by": self.created_by,
        }
        if self.settings:
            out["settings"] = dict(self.settings)
        if self.losses:
            out["losses"] = [e.to_dict() for e in self.losses]
        return out


# --------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------


def _fail(source: str | Path | None, where: str, what: str, hint: str = "fix the list or make a new one with "
          "`diffract-tui rewind plan`") -> RewindListError:
    return RewindListError(f"field '{where}': {what}", path=source, hint=hint)


def _obj(value: Any, source: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _fail(source, where, f"expected an object, got {type(value).__name__}")
    return value


def _key(obj: Mapping[str, Any], key: str, source: Any, where: str) -> Any:
    if key not in obj:
        raise _fail(source, f"{where}.{key}" if where else key, "missing")
    return obj[key]


def _int(value: Any, source: Any, where: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(source, where, f"expected an integer, got {value!r}")
    if value < minimum:
        raise _fail(source, where, f"must be ≥ {minimum}, got {value}")
    return value


def _str(value: Any, source: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(source, where, f"expected a non-empty string, got {value!r}")
    return value


def _number(value: Any, source: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(source, where, f"expected a number, got {value!r}")
    return float(value)


def _ref(value: Any, source: Any, where: str) -> CheckpointRef:
    obj = _obj(value, source, where)
    return CheckpointRef(path=_str(_key(obj, "path", source, where), source, f"{where}.path"),
                         fingerprint=_str(_key(obj, "fingerprint", source, where), source, f"{where}.fingerprint"))


def rewind_list_from_dict(data: Any, source: str | Path | None = None) -> RewindList:
    """Parse and validate a rewind list object; RewindListError (one line: file, field, what) when wrong."""
    top = _obj(data, source, "(top level)")
    for key in _REQUIRED:
        _key(top, key, source, "")
    if top["format"] != FORMAT:
        raise _fail(source, "format", f"expected {FORMAT!r}, got {top['format']!r}",
                    hint="this file is not a diffract rewind list (or a newer version)")
    base = _ref(top["base"], source, "base")
    target = _ref(top["target"], source, "target")
    reference = None if top.get("reference") is None else _ref(top["reference"], source, "reference")

    a = _obj(top["architecture"], source, "architecture")
    arch = Architecture(
        model_type=_str(_key(a, "model_type", source, "architecture"), source, "architecture.model_type"),
        layers=_int(_key(a, "layers", source, "architecture"), source, "architecture.layers", 1),
        heads=_int(_key(a, "heads", source, "architecture"), source, "architecture.heads", 1),
        kv_heads=_int(_key(a, "kv_heads", source, "architecture"), source, "architecture.kv_heads", 1),
        head_dim=_int(_key(a, "head_dim", source, "architecture"), source, "architecture.head_dim", 1))
    if arch.heads % arch.kv_heads:
        raise _fail(source, "architecture.kv_heads", f"{arch.kv_heads} does not divide {arch.heads} heads")

    p = _obj(top["pattern"], source, "pattern")
    name = _key(p, "name", source, "pattern")
    if name not in PATTERNS:
        raise _fail(source, "pattern.name", f"{name!r} is not one of {', '.join(PATTERNS)}")
    fraction = _number(_key(p, "fraction", source, "pattern"), source, "pattern.fraction")
    if not 0.0 <= fraction <= 1.0:
        raise _fail(source, "pattern.fraction", f"{fraction} is outside [0, 1]")
    score = p.get("score", "rel_frob")
    if score not in SCORES:
        raise _fail(source, "pattern.score", f"{score!r} is not one of {', '.join(SCORES)}")
    policy = p.get("gqa_policy", "group")
    if policy not in GQA_POLICIES:
        raise _fail(source, "pattern.gqa_policy", f"{policy!r} is not one of {', '.join(GQA_POLICIES)}")
    if name == "reference" and reference is None:
        raise _fail(source, "reference", "the reference pattern needs a reference checkpoint, got null")
    pattern = Pattern(name=name, fraction=fraction, score=score, gqa_policy=policy)

    raw_heads = _key(top, "heads", source, "")
    if not isinstance(raw_heads, list):
        raise _fail(source, "heads", f"expected a list, got {type(raw_heads).__name__}")
    heads: list[HeadEntry] = []
    seen: set[tuple[int, int]] = set()
    for i, item in enumerate(raw_heads):
        where = f"heads[{i}]"
        obj = _obj(item, source, where)
        layer = _int(_key(obj, "layer", source, where), source, f"{where}.layer")
        head = _int(_key(obj, "head", source, where), source, f"{where}.head")
        if layer >= arch.layers:
            raise _fail(source, f"{where}.layer", f"{layer} is out of range for {arch.layers} layers (0-based)")
        if head >= arch.heads:
            raise _fail(source, f"{where}.head", f"{head} is out of range for {arch.heads} query heads (0-based)")
        if (layer, head) in seen:
            raise _fail(source, where, f"layer {layer} head {head} is listed twice")
        seen.add((layer, head))
        projs = obj.get("projections", list(PROJECTIONS))
        if not isinstance(projs, list) or not projs:
            raise _fail(source, f"{where}.projections", f"expected a non-empty list, got {projs!r}")
        for pr in projs:
            if pr not in PROJECTIONS:
                raise _fail(source, f"{where}.projections", f"unknown projection {pr!r} (use q, k, v, o)")
        if len(set(projs)) != len(projs):
            raise _fail(source, f"{where}.projections", f"a projection is listed twice in {projs!r}")
        sc = obj.get("score")
        sc = None if sc is None else _number(sc, source, f"{where}.score")
        heads.append(HeadEntry(layer=layer, head=head, projections=tuple(p_ for p_ in PROJECTIONS if p_ in projs),
                               score=sc))
    _check_gqa(heads, arch, policy, source)
    created_by = top.get("created_by") or "unknown"
    if not isinstance(created_by, str):
        raise _fail(source, "created_by", f"expected a string, got {created_by!r}")
    settings = top.get("settings") or {}
    _obj(settings, source, "settings")
    return RewindList(base=base, target=target, reference=reference, architecture=arch, pattern=pattern,
                      heads=tuple(heads), created_by=created_by, settings=dict(settings),
                      losses=_losses(top.get("losses"), source))


def _finite(value: Any, source: Any, where: str) -> float:
    v = _number(value, source, where)
    if not math.isfinite(v):
        raise _fail(source, where, f"expected a finite number, got {value!r}")
    return v


def _losses(value: Any, source: Any) -> tuple[LossEntry, ...]:
    """The optional `losses` field: absent or null → none; else a list of per-text measured losses."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _fail(source, "losses", f"expected a list, got {type(value).__name__}")
    out = []
    for i, item in enumerate(value):
        where = f"losses[{i}]"
        obj = _obj(item, source, where)
        role = _str(_key(obj, "role", source, where), source, f"{where}.role")
        if role not in LOSS_ROLES:
            raise _fail(source, f"{where}.role", f"{role!r} is not one of {', '.join(LOSS_ROLES)}")
        out.append(LossEntry(
            text=_str(_key(obj, "text", source, where), source, f"{where}.text"), role=role,
            text_sha256=_str(_key(obj, "text_sha256", source, where), source, f"{where}.text_sha256"),
            loss=_finite(_key(obj, "loss", source, where), source, f"{where}.loss"),
            base=_finite(_key(obj, "base", source, where), source, f"{where}.base"),
            target=_finite(_key(obj, "target", source, where), source, f"{where}.target"),
            windows=_int(_key(obj, "windows", source, where), source, f"{where}.windows", 1),
            tokens=_int(_key(obj, "tokens", source, where), source, f"{where}.tokens", 2)))
    return tuple(out)


def _check_gqa(heads: Iterable[HeadEntry], arch: Architecture, policy: str, source: Any) -> None:
    """k/v entries must agree with the GQA policy: none for `never`; for `group`, only when every query
    head of that kv group is in the list with the same k/v projection."""
    heads = list(heads)
    if policy == "any":
        return
    listed: dict[tuple[int, int, str], int] = {}
    for e in heads:
        for pr in KV:
            if pr in e.projections:
                k = (e.layer, arch.kv_group(e.head), pr)
                listed[k] = listed.get(k, 0) + 1
    for i, e in enumerate(heads):
        for pr in KV:
            if pr not in e.projections:
                continue
            if policy == "never":
                raise _fail(source, f"heads[{i}].projections",
                            f"lists {pr!r} but the GQA policy is 'never'", hint="drop k/v or set gqa_policy 'any'")
            g = arch.kv_group(e.head)
            n = listed[(e.layer, g, pr)]
            if n != arch.group_size:
                raise _fail(source, f"heads[{i}].projections",
                            f"lists {pr!r} but only {n} of the {arch.group_size} query heads of kv group "
                            f"{g} in layer {e.layer} do (policy 'group')",
                            hint="list the whole group, drop k/v, or set gqa_policy 'any'")


def validate_rewind_list(rl: RewindList, source: str | Path | None = None) -> RewindList:
    """Re-validate a list built in code (same rules as reading one)."""
    return rewind_list_from_dict(rl.to_dict(), source)


# --------------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------------


def read_rewind_list(path: str | Path) -> RewindList:
    """Read and validate a rewind list; relative checkpoint paths are taken relative to the list's folder."""
    p = Path(path)
    try:
        raw = read_regular_bytes(p, MAX_JSON_BYTES)
    except FileNotFoundError:
        raise RewindListError("rewind list not found", path=p, hint="check the path") from None
    except NotRegularFileError as err:
        raise RewindListError(f"is {err.kind}, not a regular file", path=p, hint=REGULAR_HINT) from None
    except FileTooLargeError as err:
        raise RewindListError(f"is {err.size} bytes, far more than a rewind list", path=p,
                              hint="point at the JSON list that `rewind plan` wrote") from None
    except OSError as err:
        raise RewindListError(f"cannot read the rewind list ({type(err).__name__})", path=p,
                              hint="check the file is a UTF-8 JSON file you can read") from None
    data = parse_json(raw, p, RewindListError, hint="fix the JSON syntax")
    rl = rewind_list_from_dict(data, p)

    def anchored(ref: CheckpointRef | None) -> CheckpointRef | None:
        if ref is None or Path(ref.path).is_absolute():
            return ref
        return CheckpointRef(path=str((p.parent / ref.path).resolve()), fingerprint=ref.fingerprint)

    return RewindList(base=anchored(rl.base), target=anchored(rl.target), reference=anchored(rl.reference),
                      architecture=rl.architecture, pattern=rl.pattern, heads=rl.heads, created_by=rl.created_by,
                      settings=rl.settings, losses=rl.losses)


def list_inputs(rl: RewindList) -> list[Path]:
    """The files of every checkpoint the list names (base, target, reference): what writing it must spare."""
    return checkpoint_inputs(Path(r.path) for r in (rl.base, rl.target, rl.reference) if r is not None)


def write_rewind_list(rl: RewindList, path: str | Path, *, inputs: Iterable[str | Path] | None = None,
                      option: str = "--out") -> Path:
    """Validate and write the list as UTF-8 JSON atomically (temp file in the same folder + os.replace).

    Refused (one line) when `path` is, holds or lies in an input — ``inputs``, by default the checkpoints the
    list names (`list_inputs`) — so the app's exports and `rewind plan --out` follow the same rule."""
    p = Path(path)
    validate_rewind_list(rl, p)
    refuse_input_overlap(p, list_inputs(rl) if inputs is None else inputs, option=option)
    text = json.dumps(rl.to_dict(), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    if not p.parent.is_dir():
        raise RewindListError("the folder for the rewind list does not exist", path=p, hint="create it first")
    return write_text_atomic(p, text, "the rewind list")


def check_fresh(rl: RewindList, fingerprints: Mapping[str, str], *, force: bool = False,
                source: str | Path | None = None) -> list[str]:
    """Compare the list's fingerprints with the checkpoints' current ones (`{"base": fp, "target": fp,
    "reference": fp}`); RewindListError for a stale list unless ``force``; returns the stale roles."""
    stale = []
    for role in ("base", "target", "reference"):
        ref: CheckpointRef | None = getattr(rl, role)
        if ref is None or role not in fingerprints:
            continue
        if fingerprints[role] != ref.fingerprint:
            stale.append(role)
    if stale and not force:
        names = ", ".join(f"{r} ({getattr(rl, r).path})" for r in stale)
        raise RewindListError(f"stale list: the {names} changed since the list was made (fingerprint differs)",
                              path=source, hint="re-plan with `diffract-tui rewind plan` or pass --force")
    return stale

"""Synthetic Hugging Face checkpoints: one model folder, or a base + domain family with planted structure.

`write_checkpoint` writes a real HF folder (config.json transformers accepts, exact HF key names,
safetensors / sharded / pytorch .bin). `write_family` writes a base and CPT "domain" checkpoints
whose deltas have known structure (see `write_family`'s docstring and manifest.json), so tests,
the demo and benchmarks can assert that the analysis recovers it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from analysis.model.families import FAMILIES, check_family, family_config, weight_shapes

__all__ = ["FAMILIES", "FamilyManifest", "HeadPlant", "LowRankPlant", "random_state_dict", "write_checkpoint",
           "write_family"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FORMATS = ("safetensors", "sharded", "bin", "bin_sharded")
INIT_STD = 0.02


def _is_norm_key(key: str) -> bool:
    stem = key.rsplit(".", 2)[-2] if key.count(".") >= 1 else key
    return "norm" in stem.lower() or stem.startswith("ln_")


def random_state_dict(family: str, config: Mapping[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """float32 weights for every key of `family`: matrices and biases N(0, 0.02²), norm gains 1, seeded."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, shape in weight_shapes(family, dict(config)).items():
        if len(shape) == 1 and key.endswith(".weight") and _is_norm_key(key):
            out[key] = torch.ones(shape)
        elif len(shape) == 1 and key.endswith(".bias") and _is_norm_key(key):
            out[key] = torch.zeros(shape)
        else:
            out[key] = torch.randn(shape, generator=gen) * INIT_STD
    return out


def _shards(keys: Sequence[str], n: int) -> list[list[str]]:
    n = max(1, min(n, len(keys)))
    per = math.ceil(len(keys) / n)
    return [list(keys[i:i + per]) for i in range(0, len(keys), per)]


def write_checkpoint(directory: str | Path, family: str = "llama", *, seed: int = 0, dtype: str = "float32",
                     fmt: str = "safetensors", state_dict: Mapping[str, torch.Tensor] | None = None,
                     shards: int = 2, **config_overrides: Any) -> Path:
    """Write a Hugging Face model folder for `family` and return its path.

    config_overrides go to `families.family_config` (hidden_size, num_layers, num_heads, num_kv_heads,
    head_dim, intermediate_size, vocab_size, tie_word_embeddings, ...). `state_dict` (raw HF keys,
    exactly the family's key set) replaces the seeded random weights. fmt: "safetensors",
    "sharded" (safetensors shards + index), "bin", "bin_sharded".
    """
    check_family(family)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(FORMATS)}, not {fmt!r}")
    config = family_config(family, dtype=dtype, **config_overrides)
    expected = weight_shapes(family, config)
    sd = dict(state_dict) if state_dict is not None else random_state_dict(family, config, seed)
    if set(sd) != set(expected):
        missing, extra = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
        raise ValueError(f"state_dict keys differ from {family}'s: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, shape in expected.items():
        if tuple(sd[k].shape) != shape:
            raise ValueError(f"state_dict[{k!r}] has shape {tuple(sd[k].shape)}, config implies {shape}")
    tensors = {k: sd[k].detach().to(DTYPES[dtype]).contiguous() for k in expected}

    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    keys = list(tensors)
    if fmt == "safetensors":
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    elif fmt == "bin":
        torch.save(tensors, folder / "pytorch_model.bin")
    else:
        groups = _shards(keys, shards)
        ext, stem, index = ((".safetensors", "model", "model.safetensors.index.json") if fmt == "sharded"
                            else (".bin", "pytorch_model", "pytorch_model.bin.index.json"))
        weight_map: dict[str, str] = {}
        for i, group in enumerate(groups, 1):
            name = f"{stem}-{i:05d}-of-{len(groups):05d}{ext}"
            part = {k: tensors[k] for k in group}
            if fmt == "sharded":
                save_file(part, str(folder / name), metadata={"format": "pt"})
            else:
                torch.save(part, folder / name)
            weight_map.update({k: name for k in group})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (folder / index).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                               indent=2) + "\n")
    return folder


# ---------------------------------------------------------------------------------------------
# A base + domain family with planted structure

MANIFEST_FORMAT = "diffract-family/1"
LOW_MAGNITUDE = (1e-3, 1.5e-3)     # "low" heads: ‖ΔW_h‖/‖W₀_h‖ in this range (the greedy-rewind set)
SMALL_MAGNITUDE = (0.01, 0.03)     # "small" heads (inert by magnitude, but not in the low set)
LARGE_MAGNITUDE = (0.2, 0.6)       # "large" heads
FAMILY_DEFAULTS = dict(hidden_size=256, num_layers=4, num_heads=8, intermediate_size=512, vocab_size=256)
# MLP planted low-rank deltas: module name → (rank, relative magnitude, direction)
MLP_PLANTS = {"gate": (4, 0.05, "shared"), "up": (8, 0.10, "specific"), "down": (16, 0.20, "shared"),
              "fc_in": (4, 0.05, "shared"), "fc_out": (8, 0.10, "specific")}
EMBED_PLANT = (2, 0.02, "shared")      # token embedding: rank 2, rel 0.02, same in every domain
LM_HEAD_PLANT = (2, 0.02, "specific")  # untied output head: rank 2, rel 0.02, own direction per domain
NORM_DELTA_STD = 0.01                  # every norm gain (and norm bias) += N(0, 0.01²), per domain


@dataclass
class HeadPlant:
    """What was planted in one query head (the same in every domain except `specific` directions)."""

    layer: int
    head: int
    kv_head: int
    cls: str                 # "low" | "small" | "large"
    direction: str           # "shared" (one ΔW for every domain: A2 = 1) | "specific" (independent: A2 ≈ 0)
    magnitude: float         # ‖ΔW^q_h‖_F/‖W₀^q_h‖_F = ‖ΔW^o_h‖_F/‖W₀^o_h‖_F (and for its q/k/v bias entries)
    kv_magnitude: float      # the same ratio for k and v of its kv head (mean of its query heads' magnitudes)
    expected_score: float    # SPEC §4 head score r_{ℓ,h} (k/v energy split equally over the group), float64
    expected_class: str      # SPEC §4 classification with default (median) thresholds: agnostic/specific/inert


@dataclass
class LowRankPlant:
    """A matrix whose delta is exactly rank r: ΔW = s·‖W₀‖_F·(A·B)/‖A·B‖_F, A m×r, B r×n."""

    tensor: str              # normalised key
    raw_tensor: str          # key as stored
    layer: int | None
    module: str
    rank: int
    rel: float               # ‖ΔW‖_F/‖W₀‖_F
    direction: str           # "shared" | "specific"


@dataclass
class FamilyManifest:
    """A generated base + domain family and the structure planted in its deltas (manifest.json)."""

    root: Path
    family: str
    model_type: str
    seed: int
    dtype: str
    fmt: str
    base: Path
    domains: dict[str, Path]
    architecture: dict[str, int]
    heads: list[HeadPlant]
    low_importance: list[tuple[int, int]]     # (layer, head): clearly the lowest scores, whole kv groups
    greedy_fraction: float                    # ⌊f·L·H⌋ == len(low_importance)
    low_rank: list[LowRankPlant]
    unchanged: list[str]                      # normalised keys whose delta is exactly zero in every domain
    notes: list[str] = field(default_factory=list)

    def head(self, layer: int, head: int) -> HeadPlant:
        """The plant of query head `head` in layer `layer`."""
        return self.heads[layer * self.architecture["heads"] + head]

    def grid(self, attr: str) -> list[list[Any]]:
        """An L × H grid of one HeadPlant attribute (e.g. "magnitude", "expected_score", "cls")."""
        H = self.architecture["heads"]
        return [[getattr(self.heads[l * H + h], attr) for h in range(H)] for l in range(self.architecture["layers"])]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d = {"format": MANIFEST_FORMAT, **d}
        d["root"] = str(self.root)
        d["base"] = self.base.name
        d["domains"] = {k: v.name for k, v in self.domains.items()}
        d["low_importance"] = [list(x) for x in self.low_importance]
        return d

    def save(self) -> Path:
        path = self.root / "manifest.json"
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, root: str | Path) -> "FamilyManifest":
        """Read root/manifest.json back (paths resolved against root)."""
        root = Path(root)
        d = json.loads((root / "manifest.json").read_text())
        if d.pop("format", None) != MANIFEST_FORMAT:
            raise ValueError(f"{root / 'manifest.json'} is not a {MANIFEST_FORMAT} manifest")
        d["root"] = root
        d["base"] = root / d["base"]
        d["domains"] = {k: root / v for k, v in d["domains"].items()}
        d["heads"] = [HeadPlant(**h) for h in d["heads"]]
        d["low_rank"] = [LowRankPlant(**p) for p in d["low_rank"]]
        d["low_importance"] = [tuple(x) for x in d["low_importance"]]
        return cls(**d)


class _DictReader:
    """The `.tensor` / `.rows` reader protocol over an in-memory {normalised name: tensor} dict."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self._t = tensors

    def tensor(self, name: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        t = self._t[name]
        return t if dtype is None else t.to(dtype)

    def rows(self, name: str, start: int, stop: int, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        return self.tensor(name, dtype)[start:stop]


def _unit(shape: Sequence[int], gen: torch.Generator, rank: int | None = None) -> torch.Tensor:
    """A random direction of unit Frobenius norm, exactly rank `rank` when given (float64)."""
    if rank is None:
        d = torch.randn(tuple(shape), generator=gen, dtype=torch.float64)
    else:
        m, n = shape
        d = torch.randn(m, rank, generator=gen, dtype=torch.float64) @ torch.randn(rank, n, generator=gen,
                                                                                      dtype=torch.float64)
    return d / d.norm()


def _add_logical(stored: torch.Tensor, slot_axis: int, index: torch.Tensor, transpose: bool,
                 delta: torch.Tensor) -> None:
    """Add a logical (out × in)-oriented slice delta into a stored tensor at a head slot."""
    stored.index_add_(slot_axis, index, (delta.T if transpose else delta).to(stored.dtype))


def _head_classes(units: int, gen: torch.Generator) -> list[tuple[str, str]]:
    """(class, direction) per kv-group unit: ¼ low, ¼ small, ½ large; half of each class shared."""
    n_low = max(1, units // 4)
    n_small = max(1, units // 4)
    n_large = units - n_low - n_small
    plan: list[tuple[str, str]] = []
    for cls, n in (("low", n_low), ("small", n_small), ("large", n_large)):
        plan += [(cls, "shared" if i % 2 == 0 else "specific") for i in range(n)]
    perm = torch.randperm(units, generator=gen).tolist()
    return [plan[i] for i in perm]


def write_family(root: str | Path, *, family: str = "llama", domains: Sequence[str] = ("math", "code"),
                 seed: int = 0, dtype: str = "float32", fmt: str = "safetensors",
                 **config_overrides: Any) -> FamilyManifest:
    """Write root/base and root/<domain> checkpoints with planted deltas; return (and save) the manifest.

    Planted in every domain d (ΔW = W_d − W₀; default llama: 4 layers, hidden 256, 8 heads of 32,
    4 kv heads, float32):
    - Heads, planted per kv group (both query heads of a group share class and direction): ¼ of the
      groups "low" (q/o/k/v magnitude ‖ΔW_h‖/‖W₀_h‖ ∈ [1e-3, 1.5e-3]), ¼ "small" ([0.01, 0.03]), ½
      "large" ([0.2, 0.6]); distinct graded magnitudes per query head, k/v at the group mean. The
      "low" heads are `low_importance`: the ⌊greedy_fraction·L·H⌋ lowest head scores, with a gap of
      ≥ 6× to the next. Half of each class is "shared" (the identical ΔW in every domain, A2 = 1,
      A3 = 1) and half "specific" (independent Gaussian directions, A2 ≈ 0 ± 1/√(d_h·D)).
      q/k/v biases (qwen2, gpt2, gpt_neox, bert) move with their head (same magnitude, direction).
    - MLP: ΔW exactly rank r (`low_rank`: gate r4 rel .05 shared, up r8 rel .10 specific, down r16
      rel .20 shared; fc_in r4 .05 shared, fc_out r8 .10 specific); phi3's gate/up inside gate_up.
    - Token embedding rank 2 rel .02 shared; untied lm_head rank 2 rel .02 specific; every norm gain
      and norm bias + N(0, 0.01²) per domain; o/MLP biases + N(0, 0.005²) per domain.
    - `unchanged`: tensors with zero delta (position/type embeddings, pooler, ...).
    Facts hold to float32 precision; bf16/fp16 quantise the low heads' deltas (noted in the manifest).
    """
    check_family(family)
    if not domains or len(set(domains)) != len(domains) or "base" in domains:
        raise ValueError(f"domains must be distinct names other than 'base', not {tuple(domains)!r}")
    from analysis.model.architecture import detect_layout
    from analysis.io.checkpoint import normalise_key
    from analysis.model.heads import head_slice, head_slots, module_matrix

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    overrides = {**FAMILY_DEFAULTS, **config_overrides}
    config = family_config(family, dtype=dtype, **overrides)
    base_raw = random_state_dict(family, config, seed)
    norm_of = {raw: normalise_key(raw) for raw in base_raw}
    raw_of = {n: r for r, n in norm_of.items()}
    base = {norm_of[k]: v.to(torch.float64) for k, v in base_raw.items()}
    layout = detect_layout(config, {k: tuple(v.shape) for k, v in base.items()})
    L, H, G, dh = layout.num_layers, layout.num_heads, layout.num_kv_heads, layout.head_dim
    per = H // G
    if L * G < 4:
        raise ValueError(f"a planted family needs layers × kv heads ≥ 4 (got {L} × {G}) to hold every head class")
    gen = torch.Generator().manual_seed(seed + 1)
    reader = _DictReader(base)

    # --- head plan
    unit_plan = _head_classes(L * G, gen)
    ranges = {"low": LOW_MAGNITUDE, "small": SMALL_MAGNITUDE, "large": LARGE_MAGNITUDE}
    heads_in = {c: [(l, h) for l in range(L) for h in range(H) if unit_plan[l * G + h // per][0] == c] for c in ranges}
    magnitude: dict[tuple[int, int], float] = {}
    for c, members in heads_in.items():
        lo, hi = ranges[c]
        order = torch.randperm(len(members), generator=gen).tolist()
        for rank_, i in enumerate(order):
            t = rank_ / max(1, len(members) - 1)
            magnitude[members[i]] = lo + (hi - lo) * t
    kv_mag = {(l, g): sum(magnitude[(l, h)] for h in layout.query_heads_of(g)) / per
              for l in range(L) for g in range(G)}

    def slot_norm2(l: int, proj: str, j: int) -> float:
        return float(head_slice(reader, layout, l, proj, j, torch.float64).pow(2).sum())

    # --- directions: "shared" ones drawn once (from `gen`), "specific" ones per domain (from `dgen`)
    shared_dirs: dict[tuple, torch.Tensor] = {}

    def pick(key: tuple, shape: Sequence[int], shared: bool, dgen: torch.Generator, rank: int | None = None):
        if shared:
            if key not in shared_dirs:
                shared_dirs[key] = _unit(shape, gen, rank)
            return shared_dirs[key]
        return _unit(shape, dgen, rank)


    low_rank: list[LowRankPlant] = []
    changed: set[str] = set()
    domain_paths: dict[str, Path] = {}
    notes = [f"planted with seed {seed}; magnitudes are ‖ΔW‖_F/‖W₀‖_F of the head slice (SPEC §2)"]
    if dtype != "float32":
        notes.append(f"stored as {dtype}: deltas below ~1e-2 relative (the low heads) are quantised; "
                     "exact facts hold for float32 families")

    for di, domain in enumerate(domains):
        dgen = torch.Generator().manual_seed(seed * 1000 + 17 * (di + 1))
        W = {k: v.clone() for k, v in base.items()}
        # heads: q/o per query head, k/v per kv head (+ their bias entries)
        for l in range(L):
            for proj in ("q", "k", "v", "o"):
                n = H if proj in ("q", "o") else G
                for j in range(n):
                    unit = j if proj in ("q", "o") else j * per  # a query head of the unit (its group)
                    cls, direction = unit_plan[l * G + unit // per]
                    m = magnitude[(l, j)] if proj in ("q", "o") else kv_mag[(l, j)]
                    (slot,) = head_slots(layout, l, proj, j)
                    shape = (dh, layout.hidden_size) if proj != "o" else (layout.hidden_size, dh)
                    d = pick(("head", l, proj, j), shape, direction == "shared", dgen)
                    _add_logical(W[slot.tensor], slot.axis, slot.index, slot.transpose,
                                 d * (m * slot_norm2(l, proj, j) ** 0.5))
                    changed.add(slot.tensor)
                    for bslot in head_slots(layout, l, proj, j, bias=True):
                        b0 = base[bslot.tensor].index_select(0, bslot.index)
                        db = pick(("bias", l, proj, j), (dh,), direction == "shared", dgen).flatten()
                        W[bslot.tensor].index_add_(0, bslot.index, db * (m * float(b0.norm())))
                        changed.add(bslot.tensor)
        # MLP: exact low rank
        for l, layer in enumerate(layout.layers):
            for mod in layer.modules:
                if mod.kind != "mlp" or mod.name not in MLP_PLANTS:
                    continue
                rank, rel, direction = MLP_PLANTS[mod.name]
                W0 = module_matrix(reader, mod, torch.float64)
                d = pick(("mlp", l, mod.name), tuple(W0.shape), direction == "shared", dgen, rank)
                delta = d * (rel * float(W0.norm()))
                stored = delta.T if mod.transpose else delta
                if mod.segments:
                    (a, b), = mod.segments
                    W[mod.tensor].narrow(mod.axis, a, b - a).add_(stored)
                else:
                    W[mod.tensor].add_(stored)
                changed.add(mod.tensor)
                if di == 0:
                    low_rank.append(LowRankPlant(mod.tensor, raw_of[mod.tensor], l, mod.name, rank, rel, direction))
        # embeddings, output head
        for g in layout.globals:
            plant = {"embed": EMBED_PLANT, "lm_head": LM_HEAD_PLANT}.get(g.name)
            if plant is None:
                continue
            rank, rel, direction = plant
            d = pick(("global", g.name), g.shape, direction == "shared", dgen, rank)
            W[g.tensor].add_(d * (rel * float(base[g.tensor].norm())))
            changed.add(g.tensor)
            if di == 0:
                low_rank.append(LowRankPlant(g.tensor, raw_of[g.tensor], None, g.name, rank, rel, direction))
        # norms and the remaining biases (the q/k/v biases were planted with their heads)
        head_biases = {s.tensor for l in range(L) for p in ("q", "k", "v") for s in head_slots(layout, l, p, 0, bias=True)}
        for k, v in W.items():
            if v.dim() == 1 and _is_norm_key(raw_of[k]):
                v.add_(torch.randn(v.shape, generator=dgen, dtype=torch.float64) * NORM_DELTA_STD)
                changed.add(k)
            elif v.dim() == 1 and k.endswith(".bias") and k not in head_biases and _is_layer_bias(k):
                v.add_(torch.randn(v.shape, generator=dgen, dtype=torch.float64) * 0.005)
                changed.add(k)
        folder = root / domain
        write_checkpoint(folder, family, dtype=dtype, fmt=fmt,
                         state_dict={raw_of[k]: v.to(torch.float32) for k, v in W.items()}, **overrides)
        domain_paths[domain] = folder
    base_path = write_checkpoint(root / "base", family, dtype=dtype, fmt=fmt, state_dict=base_raw, **overrides)

    # --- expected scores (SPEC §4) and classes from the plan
    heads: list[HeadPlant] = []
    scores = {}
    for l in range(L):
        kv_e0 = {g: slot_norm2(l, "k", g) + slot_norm2(l, "v", g) for g in range(G)}
        for h in range(H):
            g = layout.kv_group(h)
            qo0 = slot_norm2(l, "q", h) + slot_norm2(l, "o", h)
            num = magnitude[(l, h)] ** 2 * qo0 + kv_mag[(l, g)] ** 2 * kv_e0[g] / per
            scores[(l, h)] = (num / (qo0 + kv_e0[g] / per)) ** 0.5
    for l in range(L):
        for h in range(H):
            g = layout.kv_group(h)
            cls, direction = unit_plan[l * G + g]
            expected = "inert" if cls != "large" else ("agnostic" if direction == "shared" else "specific")
            if len(domains) < 2 and cls == "large":
                expected = "n/a"
            heads.append(HeadPlant(l, h, g, cls, direction, magnitude[(l, h)], kv_mag[(l, g)],
                                   scores[(l, h)], expected))
    low = [(p.layer, p.head) for p in heads if p.cls == "low"]
    unchanged = sorted(k for k in base if k not in changed)
    manifest = FamilyManifest(
        root=root, family=family, model_type=layout.model_type, seed=seed, dtype=dtype, fmt=fmt,
        base=base_path, domains=domain_paths, architecture={**layout.describe(), "hidden_size": layout.hidden_size},
        heads=heads, low_importance=low, greedy_fraction=(len(low) + 0.5) / (L * H), low_rank=low_rank,
        unchanged=unchanged, notes=notes)
    manifest.save()
    return manifest


def _is_layer_bias(key: str) -> bool:
    """A bias of a layer matrix (o-projection, MLP; q/k/v ones are planted with their heads first)."""
    return not key.startswith(("embeddings.", "pooler."))

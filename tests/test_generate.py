"""The checkpoint generator: folders transformers loads with no missing/unexpected keys, every
format and dtype, and a family whose planted facts hold on the written files (checked here with
plain tensor slicing and torch.linalg, independent of the analysis engine)."""

from __future__ import annotations

import math
import time

import pytest
import torch

from analysis.io.checkpoint import open_checkpoint
from analysis.model.families import FAMILIES, family_config, weight_shapes
from analysis.generate import FamilyManifest, write_checkpoint, write_family

torch.set_num_threads(1)


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_loads_every_family_without_missing_or_unexpected_keys(family, tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = write_checkpoint(tmp_path / family, family, seed=3)
    auto = transformers.AutoModel if family in ("bert", "roberta", "xlm-roberta") else transformers.AutoModelForCausalLM
    model, info = auto.from_pretrained(folder, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}, info
    assert type(model).__name__ == family_config(family)["architectures"][0]
    # the values transformers loaded are the values written
    with open_checkpoint(folder) as ck:
        params = dict(model.named_parameters())
        for raw in weight_shapes(family, family_config(family)):
            assert torch.equal(params[raw].detach(), ck.tensor(ck_name(ck, raw))), raw


def ck_name(ck, raw: str) -> str:
    return next(n for n in ck.keys() if ck.info(n).raw_name == raw)


@pytest.mark.parametrize("fmt,files", [
    ("safetensors", {"model.safetensors"}),
    ("sharded", {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                 "model.safetensors.index.json"}),
    ("bin", {"pytorch_model.bin"}),
    ("bin_sharded", {"pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
                     "pytorch_model.bin.index.json"}),
])
def test_every_format_round_trips_the_same_tensors(fmt, files, tmp_path):
    ref = write_checkpoint(tmp_path / "ref", "qwen2", seed=7)
    out = write_checkpoint(tmp_path / fmt, "qwen2", seed=7, fmt=fmt)
    assert {p.name for p in out.iterdir()} == files | {"config.json"}
    with open_checkpoint(ref) as a, open_checkpoint(out) as b:
        assert a.keys() == b.keys() and len(a.keys()) == len(weight_shapes("qwen2", family_config("qwen2")))
        for k in a.keys():
            assert torch.equal(a.tensor(k), b.tensor(k)), k


@pytest.mark.parametrize("dtype,torch_dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_half_precision_dtypes_are_stored_as_such(dtype, torch_dtype, tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = write_checkpoint(tmp_path / dtype, "llama", dtype=dtype)
    with open_checkpoint(folder) as ck:
        assert {ck.info(k).dtype for k in ck.keys()} == {dtype}
        assert ck.config["torch_dtype"] == dtype
    model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True,
                                                                     dtype=torch_dtype)
    assert not any(info.values())


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown family"):
        write_checkpoint(tmp_path / "x", "t5")
    with pytest.raises(ValueError, match="fmt must be one of"):
        write_checkpoint(tmp_path / "x", "llama", fmt="gguf")
    sd = {k: torch.zeros(s) for k, s in weight_shapes("llama", family_config("llama")).items()}
    sd.pop("lm_head.weight")
    with pytest.raises(ValueError, match="missing"):
        write_checkpoint(tmp_path / "x", "llama", state_dict=sd)


# ---------------------------------------------------------------------------------------------
# write_family: planted structure, asserted on the files

@pytest.fixture(scope="module")
def llama_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("fam")
    start = time.perf_counter()
    manifest = write_family(root, family="llama", domains=("math", "code", "law"), seed=5)
    manifest.seconds = time.perf_counter() - start
    return manifest


def open_all(m: FamilyManifest):
    return open_checkpoint(m.base), {d: open_checkpoint(p) for d, p in m.domains.items()}


def q_rows(ck, layer, h, dh=32):   # llama q_proj: head h = rows [h·d_h, (h+1)·d_h) — plain slicing
    return ck.tensor(f"layers.{layer}.self_attn.q_proj.weight", torch.float64)[h * dh:(h + 1) * dh]


def o_cols(ck, layer, h, dh=32):
    return ck.tensor(f"layers.{layer}.self_attn.o_proj.weight", torch.float64)[:, h * dh:(h + 1) * dh]


def kv_rows(ck, proj, layer, g, dh=32):
    return ck.tensor(f"layers.{layer}.self_attn.{proj}_proj.weight", torch.float64)[g * dh:(g + 1) * dh]


def test_family_is_quick_and_described(llama_family):
    m = llama_family
    assert m.seconds < 3.0, f"write_family took {m.seconds:.2f} s"  # ≈ 0.3 s on an idle dev core
    assert m.architecture == {"model_type": "llama", "layers": 4, "heads": 8, "kv_heads": 4, "head_dim": 32,
                              "hidden_size": 256}
    assert sorted(m.domains) == ["code", "law", "math"] and (m.root / "manifest.json").exists()
    again = FamilyManifest.load(m.root)
    assert again.heads == m.heads and again.low_rank == m.low_rank and again.low_importance == m.low_importance
    counts = {c: sum(p.cls == c for p in m.heads) for c in ("low", "small", "large")}
    assert counts == {"low": 8, "small": 8, "large": 16}
    assert math.floor(m.greedy_fraction * 32) == len(m.low_importance) == 8


def test_planted_head_magnitudes_hold_on_the_files(llama_family):
    """‖ΔW^q_h‖/‖W₀^q_h‖ = ‖ΔW^o_h‖/‖W₀^o_h‖ = magnitude; k/v of group g at kv_magnitude (rtol 1e-4)."""
    base, domains = open_all(llama_family)
    for ck in domains.values():
        for p in llama_family.heads:
            for slicer in (q_rows, o_cols):
                w0, wd = slicer(base, p.layer, p.head), slicer(ck, p.layer, p.head)
                assert (wd - w0).norm() / w0.norm() == pytest.approx(p.magnitude, rel=1e-4)
            for proj in ("k", "v"):
                w0, wd = kv_rows(base, proj, p.layer, p.kv_head), kv_rows(ck, proj, p.layer, p.kv_head)
                assert (wd - w0).norm() / w0.norm() == pytest.approx(p.kv_magnitude, rel=1e-4)


def spec_scores(base, ck, L=4, H=8, G=4):
    """SPEC §4 head score computed from plain slices: k/v group energy split equally over its query heads."""
    out = {}
    for l in range(L):
        for h in range(H):
            g = h // (H // G)
            d2 = b2 = 0.0
            for w0, wd, share in ((q_rows(base, l, h), q_rows(ck, l, h), 1.0), (o_cols(base, l, h), o_cols(ck, l, h), 1.0),
                                  (kv_rows(base, "k", l, g), kv_rows(ck, "k", l, g), G / H),
                                  (kv_rows(base, "v", l, g), kv_rows(ck, "v", l, g), G / H)):
                d2 += share * float((wd - w0).pow(2).sum())
                b2 += share * float(w0.pow(2).sum())
            out[(l, h)] = math.sqrt(d2 / b2)
    return out


def test_low_importance_set_is_exactly_the_greedy_pick(llama_family):
    """Greedy rewind at greedy_fraction picks the ⌊f·L·H⌋ lowest scores: exactly low_importance, with a gap ≥ 6×."""
    m = llama_family
    base, domains = open_all(m)
    n = math.floor(m.greedy_fraction * 32)
    for ck in domains.values():
        scores = spec_scores(base, ck)
        ranked = sorted(scores, key=scores.get)
        assert set(ranked[:n]) == set(m.low_importance)
        assert scores[ranked[n]] > 6 * scores[ranked[n - 1]]
        for p in m.heads:
            assert scores[(p.layer, p.head)] == pytest.approx(p.expected_score, rel=1e-4)
    # low heads come in whole kv groups, so the `group` GQA policy rewinds their k/v too
    groups = {(l, h // 2) for l, h in m.low_importance}
    assert len(groups) * 2 == len(m.low_importance)


def test_shared_heads_agree_and_specific_heads_do_not(llama_family):
    """A2 between every pair of domains: 1 for shared heads (identical ΔW), |cos| < 0.1 for specific ones."""
    m = llama_family
    base, domains = open_all(m)
    names = sorted(domains)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            for p in m.heads:
                da = q_rows(domains[a], p.layer, p.head) - q_rows(base, p.layer, p.head)
                db = q_rows(domains[b], p.layer, p.head) - q_rows(base, p.layer, p.head)
                cos = float((da * db).sum() / (da.norm() * db.norm()))
                if p.direction == "shared":
                    assert cos > 0.999, (a, b, p)
                else:
                    assert abs(cos) < 0.1, (a, b, p)
    large = [p for p in m.heads if p.cls == "large"]
    assert sum(p.direction == "shared" for p in large) == len(large) // 2   # median split for classification
    assert {p.expected_class for p in m.heads} == {"agnostic", "specific", "inert"}


def test_low_rank_plants_have_exactly_their_rank(llama_family):
    """Each low_rank delta has exactly r singular values above 1e-4·σ_max, and ‖ΔW‖/‖W₀‖ = rel."""
    m = llama_family
    base, domains = open_all(m)
    assert {(p.module, p.rank) for p in m.low_rank} == {("gate", 4), ("up", 8), ("down", 16), ("embed", 2),
                                                        ("lm_head", 2)}
    for p in m.low_rank:
        w0 = base.tensor(p.tensor, torch.float64)
        deltas = []
        for ck in domains.values():
            dW = ck.tensor(p.tensor, torch.float64) - w0
            s = torch.linalg.svdvals(dW)
            assert int((s > 1e-4 * s[0]).sum()) == p.rank, p
            assert dW.norm() / w0.norm() == pytest.approx(p.rel, rel=1e-4)
            deltas.append(dW)
        same = torch.allclose(deltas[0], deltas[1], atol=1e-6)
        assert same == (p.direction == "shared"), p


def test_norms_change_and_unchanged_tensors_are_bit_identical(tmp_path):
    m = write_family(tmp_path, family="bert", domains=("a", "b"), seed=1)
    base, domains = open_all(m)
    assert set(m.unchanged) == {"embeddings.position_embeddings.weight", "embeddings.token_type_embeddings.weight",
                                "pooler.dense.weight", "pooler.dense.bias"}
    for ck in domains.values():
        for k in base.keys():
            equal = torch.equal(base.tensor(k, None), ck.tensor(k, None))
            assert equal == (k in m.unchanged), k
    # bert's q bias entries of a head move by the head's magnitude
    p = m.head(2, 5)
    b0 = base.tensor("encoder.layer.2.attention.self.query.bias", torch.float64)[160:192]
    bd = domains["a"].tensor("encoder.layer.2.attention.self.query.bias", torch.float64)[160:192]
    assert (bd - b0).norm() / b0.norm() == pytest.approx(p.magnitude, rel=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "phi3"])
def test_fused_families_plant_through_the_stored_layout(family, tmp_path):
    """Magnitudes hold when read the way transformers splits the fused tensors (independent of head_slots)."""
    m = write_family(tmp_path, family=family, domains=("a", "b"), num_layers=2)
    base, domains = open_all(m)
    H, G, dh, D = 8, m.architecture["kv_heads"], 32, 256

    def q_head(ck, l, h):
        if family == "gpt2":      # Conv1D c_attn (D × 3D): q = columns [0, D), head h columns h·d_h..
            return ck.tensor(f"h.{l}.attn.c_attn.weight", torch.float64)[:, :D].T[h * dh:(h + 1) * dh]
        if family == "gpt_neox":  # rows viewed as (H, 3·d_h, D): q = first d_h of each head block
            return ck.tensor(f"layers.{l}.attention.query_key_value.weight", torch.float64).view(H, 3 * dh, D)[h, :dh]
        return ck.tensor(f"layers.{l}.self_attn.qkv_proj.weight", torch.float64)[h * dh:(h + 1) * dh]

    for p in m.heads:
        w0, wd = q_head(base, p.layer, p.head), q_head(domains["a"], p.layer, p.head)
        assert (wd - w0).norm() / w0.norm() == pytest.approx(p.magnitude, rel=1e-4)

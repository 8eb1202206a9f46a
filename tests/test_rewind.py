"""Head-wise rewind (SPEC §6) on small hand-built checkpoints: the invariants (f = 0 is the target bit for
bit; every head rewound restores every attention projection and its q/k/v biases to the base and leaves
everything else, the o bias included, at the target), the GQA policies, the planted greedy choice,
atomicity and refusals, the CLI's one-line errors, and the real rxnfp BERT trio."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from analysis.io import writer
from analysis.model.architecture import layout_of
from analysis.io.checkpoint import open_checkpoint
from analysis.errors import DiffractError
from analysis.edit.rewind import (apply_rewind, plan_from_inputs, plan_rewind, preview, rank_heads, rewind_inputs,
                             checkpoint_ref)
from analysis.edit.rewind_list import read_rewind_list, write_rewind_list
from diffract_tui.cli import main

L, H, HKV, DH, D, FF, V = 2, 4, 2, 8, 32, 48, 64


def llama_state(seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """A 2-layer llama with GQA (4 query heads, 2 kv heads) and biases on q/k/v/o."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    sd = {"model.embed_tokens.weight": r(V, D), "model.norm.weight": r(D), "lm_head.weight": r(V, D)}
    for i in range(L):
        p = f"model.layers.{i}."
        sd |= {p + "self_attn.q_proj.weight": r(H * DH, D), p + "self_attn.q_proj.bias": r(H * DH),
               p + "self_attn.k_proj.weight": r(HKV * DH, D), p + "self_attn.k_proj.bias": r(HKV * DH),
               p + "self_attn.v_proj.weight": r(HKV * DH, D), p + "self_attn.v_proj.bias": r(HKV * DH),
               p + "self_attn.o_proj.weight": r(D, H * DH), p + "self_attn.o_proj.bias": r(D),
               p + "mlp.gate_proj.weight": r(FF, D), p + "mlp.up_proj.weight": r(FF, D),
               p + "mlp.down_proj.weight": r(D, FF), p + "input_layernorm.weight": r(D),
               p + "post_attention_layernorm.weight": r(D)}
    return sd


LLAMA_CONFIG = {"model_type": "llama", "hidden_size": D, "num_attention_heads": H, "num_key_value_heads": HKV,
                "num_hidden_layers": L, "intermediate_size": FF, "vocab_size": V, "attention_bias": True}


def save_ckpt(folder: Path, sd: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    save_file(sd, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config or LLAMA_CONFIG))
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    return folder


def perturb(sd: dict[str, torch.Tensor], seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (v.float() + scale * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in sd.items()}


def bits(t: torch.Tensor) -> bytes:
    return bytes(writer.tensor_bytes(t))


def read_out(folder: Path) -> dict[str, torch.Tensor]:
    ck = open_checkpoint(folder)
    return {ck.info(n).raw_name: ck.tensor(n, dtype=None) for n in ck.keys()}


@pytest.fixture()
def pair(tmp_path):
    base_sd = llama_state(0)
    target_sd = perturb(base_sd, 1)
    base = save_ckpt(tmp_path / "base", base_sd)
    target = save_ckpt(tmp_path / "target", target_sd)
    return base, target, base_sd, target_sd


def _plan(base: Path, target: Path, **kw):
    return plan_rewind(open_checkpoint(base), open_checkpoint(target), **kw)


def test_fraction_zero_reproduces_target_bit_for_bit(tmp_path, pair):
    base, target, _, target_sd = pair
    rl = _plan(base, target, pattern="greedy", fraction=0.0)
    assert rl.heads == ()
    apply_rewind(rl, tmp_path / "out")
    out = read_out(tmp_path / "out")
    assert set(out) == set(target_sd)  # the target's raw names (with the `model.` prefix)
    for name, t in target_sd.items():
        assert out[name].dtype == t.dtype and bits(out[name]) == bits(t), name
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == LLAMA_CONFIG


def test_bf16_target_keeps_dtype_and_bits(tmp_path):
    base_sd = llama_state(0, torch.bfloat16)
    target_sd = perturb(base_sd, 1)
    base = save_ckpt(tmp_path / "b", base_sd)
    target = save_ckpt(tmp_path / "t", target_sd)
    rl = _plan(base, target, pattern="manual", heads=[(1, 2)], gqa_policy="never")
    apply_rewind(rl, tmp_path / "out")
    out = read_out(tmp_path / "out")
    q = "model.layers.1.self_attn.q_proj.weight"
    assert out[q].dtype == torch.bfloat16
    assert bits(out[q][16:24]) == bits(base_sd[q][16:24])
    assert bits(out[q][:16]) == bits(target_sd[q][:16]) and bits(out[q][24:]) == bits(target_sd[q][24:])


def test_every_head_restores_attention_and_nothing_else(tmp_path, pair):
    base, target, base_sd, target_sd = pair
    rl = _plan(base, target, pattern="greedy", fraction=1.0)
    assert len(rl.heads) == L * H and all(e.projections == ("q", "k", "v", "o") for e in rl.heads)
    apply_rewind(rl, tmp_path / "out")
    out = read_out(tmp_path / "out")
    restored = [n for n in target_sd if any(f"{p}_proj." in n for p in "qkv") or n.endswith("o_proj.weight")]
    assert len(restored) == L * 7  # q/k/v weights + biases and the o weight, per layer
    for name in target_sd:
        expected = base_sd[name] if name in restored else target_sd[name]
        assert bits(out[name]) == bits(expected), name
    assert not torch.equal(base_sd["model.layers.0.self_attn.o_proj.bias"], target_sd["model.layers.0.self_attn.o_proj.bias"])


def _kv_rows_from_base(out, base_sd, target_sd, layer: int, group: int, proj: str) -> bool | None:
    name = f"model.layers.{layer}.self_attn.{proj}_proj.weight"
    rows = slice(group * DH, (group + 1) * DH)
    if bits(out[name][rows]) == bits(base_sd[name][rows]):
        return True
    if bits(out[name][rows]) == bits(target_sd[name][rows]):
        return False
    return None  # neither: a bug


@pytest.mark.parametrize("policy,heads,expected_groups", [
    ("group", [(0, 0), (0, 1), (0, 2)], {(0, 0)}),          # group 0 = heads {0,1} complete; group 1 half
    ("group", [(1, 3)], set()),
    ("any", [(0, 2), (1, 1)], {(0, 1), (1, 0)}),
    ("never", [(0, 0), (0, 1), (0, 2), (0, 3)], set()),
])
def test_gqa_policies(tmp_path, pair, policy, heads, expected_groups):
    base, target, base_sd, target_sd = pair
    rl = _plan(base, target, pattern="manual", heads=heads, gqa_policy=policy)
    apply_rewind(rl, tmp_path / "out")
    out = read_out(tmp_path / "out")
    for layer in range(L):
        for g in range(HKV):
            for proj in ("k", "v"):
                assert _kv_rows_from_base(out, base_sd, target_sd, layer, g, proj) == ((layer, g) in expected_groups)
            bias = f"model.layers.{layer}.self_attn.k_proj.bias"
            rows = slice(g * DH, (g + 1) * DH)
            src = base_sd if (layer, g) in expected_groups else target_sd
            assert bits(out[bias][rows]) == bits(src[bias][rows])
    for layer in range(L):  # q rows and o columns: exactly the listed heads
        q = out[f"model.layers.{layer}.self_attn.q_proj.weight"]
        o = out[f"model.layers.{layer}.self_attn.o_proj.weight"]
        for h in range(H):
            src = base_sd if (layer, h) in heads else target_sd
            assert bits(q[h * DH:(h + 1) * DH]) == bits(src[f"model.layers.{layer}.self_attn.q_proj.weight"][h * DH:(h + 1) * DH])
            assert bits(o[:, h * DH:(h + 1) * DH].contiguous()) == bits(
                src[f"model.layers.{layer}.self_attn.o_proj.weight"][:, h * DH:(h + 1) * DH].contiguous())


def test_greedy_picks_planted_low_delta_heads_and_preview_share(tmp_path):
    # plant: every head's delta is 0.2·noise, except three heads whose q/o and whole kv group are nearly still
    base_sd = llama_state(0)
    target_sd = perturb(base_sd, 1, scale=0.2)
    planted = [(0, 2), (0, 3), (1, 0)]  # (0,2),(0,3) = all of kv group 1 in layer 0
    for layer, h in planted:
        p = f"model.layers.{layer}.self_attn."
        for proj, rows in (("q", slice(h * DH, (h + 1) * DH)), ("k", slice(h // 2 * DH, (h // 2 + 1) * DH)),
                           ("v", slice(h // 2 * DH, (h // 2 + 1) * DH))):
            w = p + f"{proj}_proj.weight"
            target_sd[w][rows] = base_sd[w][rows] + 1e-4
        w = p + "o_proj.weight"
        target_sd[w][:, h * DH:(h + 1) * DH] = base_sd[w][:, h * DH:(h + 1) * DH] + 1e-4
    base = save_ckpt(tmp_path / "b", base_sd)
    target = save_ckpt(tmp_path / "t", target_sd)
    b, t = open_checkpoint(base), open_checkpoint(target)
    inputs = rewind_inputs(b, t)
    rl = plan_from_inputs(inputs, base=checkpoint_ref(b), target=checkpoint_ref(t), pattern="greedy",
                          fraction=3 / 8)  # ⌊3/8 · 2 · 4⌋ = 3
    assert [(e.layer, e.head) for e in rl.heads] == planted
    # group 1 of layer 0 is complete → k/v; head (1,0)'s group partner (1,1) is not → q/o only
    assert [e.projections for e in rl.heads] == [("q", "k", "v", "o")] * 2 + [("q", "o")]
    pv = preview(rl, inputs)
    assert pv.heads_per_layer == (2, 1)
    # the planted heads hold almost no delta energy: the share removed is tiny but positive
    assert 0 < pv.share_removed < 1e-5
    full = plan_from_inputs(inputs, base=checkpoint_ref(b), target=checkpoint_ref(t), pattern="greedy", fraction=1.0)
    assert preview(full, inputs).share_removed == pytest.approx(1.0, abs=1e-12)
    # scores agree with delta.head_scores (the grid the app shows)
    from analysis.deltas.delta import head_scores
    hs = head_scores(b, t, layout_of(t))
    assert torch.allclose(inputs.target.scores, hs.scores, rtol=1e-6)


def test_rank_heads_ties_and_nan():
    grid = torch.tensor([[0.5, float("nan")], [0.1, 0.5]], dtype=torch.float64)
    assert rank_heads(grid) == [(1, 0), (0, 0), (1, 1), (0, 1)]
    assert rank_heads(grid, lowest=False) == [(0, 0), (1, 1), (1, 0), (0, 1)]


def test_reference_pattern_uses_reference_ranking(tmp_path):
    base_sd = llama_state(0)
    target_sd = perturb(base_sd, 1)
    ref_sd = perturb(base_sd, 2)
    # in the reference, head (1,3)'s q rows barely move; in the target they move a lot
    w = "model.layers.1.self_attn.q_proj.weight"
    ref_sd[w][24:32] = base_sd[w][24:32]
    target_sd[w][24:32] = base_sd[w][24:32] + 5.0
    paths = [save_ckpt(tmp_path / n, sd) for n, sd in (("b", base_sd), ("t", target_sd), ("r", ref_sd))]
    b, t, r = (open_checkpoint(p) for p in paths)
    rl = plan_rewind(b, t, reference=r, pattern="reference", fraction=1 / 8)
    assert [(e.layer, e.head) for e in rl.heads] == [(1, 3)]
    assert rl.reference is not None and rl.reference.fingerprint == r.fingerprint
    greedy = plan_rewind(b, t, pattern="greedy", fraction=1 / 8)
    assert [(e.layer, e.head) for e in greedy.heads] != [(1, 3)]
    # most_agreeing: make (0,1) the head whose target and reference deltas are identical
    agree_sd = dict(ref_sd)
    for name in target_sd:
        if "layers.0.self_attn" in name:
            agree_sd[name] = target_sd[name].clone()
    a = open_checkpoint(save_ckpt(tmp_path / "a", agree_sd))
    rl2 = plan_rewind(b, t, reference=a, pattern="reference", fraction=4 / 8, variant="most_agreeing")
    assert sorted((e.layer, e.head) for e in rl2.heads) == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert rl2.pattern.score == "agreement" and all(e.score == pytest.approx(1.0) for e in rl2.heads)


def test_failure_midway_leaves_no_output_and_inputs_unchanged(tmp_path, pair, monkeypatch):
    base, target, _, _ = pair
    rl = _plan(base, target, pattern="greedy", fraction=0.5)
    before = {p: p.read_bytes() for folder in (base, target) for p in folder.iterdir()}
    fps = (open_checkpoint(base).fingerprint, open_checkpoint(target).fingerprint)
    calls = {"n": 0}
    real = writer.shard_header

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("No space left on device (simulated)")
        return real(*a, **k)

    monkeypatch.setattr(writer, "shard_header", failing)
    with pytest.raises(DiffractError, match="cannot write the checkpoint .No space left on device .simulated"):
        apply_rewind(rl, tmp_path / "out", max_shard_bytes=4096)  # several shards; fails as the 2nd starts
    assert calls["n"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "target"]
    assert {p: p.read_bytes() for folder in (base, target) for p in folder.iterdir()} == before
    assert (open_checkpoint(base).fingerprint, open_checkpoint(target).fingerprint) == fps


def test_refuses_to_write_into_an_input(tmp_path, pair):
    base, target, _, _ = pair
    rl = _plan(base, target, pattern="greedy", fraction=0.25)
    before = sorted(p.name for p in target.iterdir())
    with pytest.raises(DiffractError, match="inside the input folder"):
        apply_rewind(rl, target / "rewound")
    with pytest.raises(DiffractError, match="inside the input folder"):
        apply_rewind(rl, base, force=True)
    assert sorted(p.name for p in target.iterdir()) == before


def test_cli_plan_apply_and_errors(tmp_path, pair, capsys):
    base, target, base_sd, target_sd = pair
    lst = tmp_path / "r.json"
    assert main(["rewind", "plan", str(base), str(target), "--pattern", "manual", "--heads", "0:1,1:2",
                 "--gqa-policy", "any", "--out", str(lst)]) == 0
    rl = read_rewind_list(lst)
    assert [(e.layer, e.head, e.projections) for e in rl.heads] == [(0, 1, ("q", "k", "v", "o")),
                                                                   (1, 2, ("q", "k", "v", "o"))]
    assert main(["rewind", "apply", str(lst), "--out", str(tmp_path / "out")]) == 0
    out = read_out(tmp_path / "out")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert bits(out[q][8:16]) == bits(base_sd[q][8:16]) and bits(out[q][:8]) == bits(target_sd[q][:8])
    capsys.readouterr()

    # existing output without --force
    assert main(["rewind", "apply", str(lst), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err and err.startswith("diffract-tui: error: ")

    # malformed list: head out of range
    data = json.loads(lst.read_text())
    data["heads"][0]["head"] = 9
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    assert main(["rewind", "apply", str(bad), "--out", str(tmp_path / "o2")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bad}: field 'heads[0].head': 9 is out of range for 4 query heads" in err

    # stale list: the target changed after planning
    save_file(perturb(target_sd, 5), str(target / "model.safetensors"))
    assert main(["rewind", "apply", str(lst), "--out", str(tmp_path / "o3")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "stale list: the target" in err and "--force" in err
    assert not (tmp_path / "o3").exists()
    assert main(["rewind", "apply", str(lst), "--out", str(tmp_path / "o3"), "--force"]) == 0


def test_cli_plan_errors(tmp_path, pair, capsys):
    base, target, _, _ = pair
    assert main(["rewind", "plan", str(base), str(target), "--pattern", "greedy", "--fraction", "1.5",
                 "--out", str(tmp_path / "r.json")]) == 1
    assert "fraction 1.5 is outside [0, 1]" in capsys.readouterr().err
    assert main(["rewind", "plan", str(base), str(target), "--pattern", "reference", "--fraction", "0.5",
                 "--out", str(tmp_path / "r.json")]) == 1
    assert "--reference" in capsys.readouterr().err
    assert main(["rewind", "plan", str(base), str(target), "--pattern", "manual", "--heads", "0:x",
                 "--out", str(tmp_path / "r.json")]) == 1
    assert "cannot read head '0:x'" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


# --------------------------------------------------------------------------------------------------
# real weights: the rxnfp BERT trio
# --------------------------------------------------------------------------------------------------

def _rxnfp_models() -> Path | None:
    spec = importlib.util.find_spec("rxnfp")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]) / "models" / "transformers"
    return root if (root / "bert_ft").is_dir() else None


@pytest.mark.skipif(_rxnfp_models() is None, reason="rxnfp is not installed")
def test_rxnfp_trio_plan_and_apply(tmp_path, capsys):
    root = _rxnfp_models()
    base, target, ref = root / "bert_pretrained", root / "bert_ft", root / "bert_ft_10k_25s"
    t_ck = open_checkpoint(target)
    stamp = {p: p.stat().st_mtime_ns for folder in (base, target, ref) for p in folder.iterdir()}
    lg, lr = tmp_path / "greedy.json", tmp_path / "ref.json"
    assert main(["rewind", "plan", str(base), str(target), "--pattern", "greedy", "--fraction", "0.25",
                 "--out", str(lg)]) == 0
    assert main(["rewind", "plan", str(base), str(target), "--reference", str(ref), "--pattern", "reference",
                 "--fraction", "0.25", "--out", str(lr)]) == 0
    layout = layout_of(t_ck)
    n = int(0.25 * layout.num_layers * layout.num_heads)
    g, r = read_rewind_list(lg), read_rewind_list(lr)
    assert len(g.heads) == len(r.heads) == n
    assert g.architecture.model_type == "bert" and r.reference is not None
    assert main(["rewind", "apply", str(lg), "--out", str(tmp_path / "out")]) == 0
    out = open_checkpoint(tmp_path / "out")
    assert [out.info(k).raw_name for k in out.keys()] == [t_ck.info(k).raw_name for k in t_ck.keys()]
    b_ck = open_checkpoint(base)
    e = g.heads[0]
    q = layout.projection(e.layer, "q")
    rows = slice(e.head * layout.head_dim, (e.head + 1) * layout.head_dim)
    # the base's keys carry a `bert.` prefix and the target's don't: normalised names align them
    assert torch.equal(out.tensor(q.tensor)[rows], b_ck.tensor(q.tensor)[rows])
    assert not torch.equal(out.tensor(q.tensor)[rows], t_ck.tensor(q.tensor)[rows])
    untouched = [k for k in t_ck.keys() if "attention" not in k]
    assert all(torch.equal(out.tensor(k, None), t_ck.tensor(k, None)) for k in untouched)
    assert {p: p.stat().st_mtime_ns for folder in (base, target, ref) for p in folder.iterdir()} == stamp


# --------------------------------------------------------------------------------------------------
# planted structure from analysis.generate.write_family
# --------------------------------------------------------------------------------------------------

def test_greedy_and_reference_select_planted_low_heads(tmp_path):
    """write_family plants whole kv groups of `low_importance` heads (‖ΔW_h‖/‖W₀_h‖ ≈ 1e-3, ≥ 6× below the
    rest) in every domain: greedy at its `greedy_fraction` must pick exactly those, and so must the
    reference pattern ranked by the other domain. After apply, those heads' scores against the base are
    exactly 0 and every other head's score is the target's."""
    from analysis.deltas.delta import head_scores
    from analysis.generate import write_family

    m = write_family(tmp_path / "fam")
    planted = sorted(tuple(x) for x in m.low_importance)
    b, math_, code = open_checkpoint(m.base), open_checkpoint(m.domains["math"]), open_checkpoint(m.domains["code"])
    g = plan_rewind(b, math_, pattern="greedy", fraction=m.greedy_fraction)
    assert sorted((e.layer, e.head) for e in g.heads) == planted
    assert all(e.projections == ("q", "k", "v", "o") for e in g.heads)  # whole groups → k/v under 'group'
    r = plan_rewind(b, math_, reference=code, pattern="reference", fraction=m.greedy_fraction)
    assert sorted((e.layer, e.head) for e in r.heads) == planted
    apply_rewind(g, tmp_path / "out")
    out = open_checkpoint(tmp_path / "out")
    layout = layout_of(math_)
    after, before = head_scores(b, out, layout).scores, head_scores(b, math_, layout).scores
    for layer in range(layout.num_layers):
        for head in range(layout.num_heads):
            if (layer, head) in planted:
                assert after[layer, head] == 0.0
            else:
                assert after[layer, head] == before[layer, head]


@pytest.mark.parametrize("family", ["qwen2", "phi3", "gpt2", "gpt_neox", "bert"])
def test_apply_across_storage_layouts(tmp_path, family):
    """Fused qkv (phi3), Conv1D in × out (gpt2), per-head interleaving (gpt_neox), biases (qwen2, gpt2,
    neox, bert): greedy picks the planted heads; after apply those heads read back (through the engine's
    own head slices) exactly as the base, every other head exactly as the target, and only the attention
    tensors changed."""
    from analysis.deltas.delta import head_scores
    from analysis.generate import write_family
    from analysis.edit.rewind import rewind_edits

    kv = 2 if family in ("qwen2", "phi3") else 4
    m = write_family(tmp_path / "fam", family=family, domains=("math",), hidden_size=128, num_layers=2,
                     num_heads=4, num_kv_heads=kv)
    b, t = open_checkpoint(m.base), open_checkpoint(m.domains["math"])
    rl = plan_rewind(b, t, pattern="greedy", fraction=m.greedy_fraction)
    planted = sorted(tuple(x) for x in m.low_importance)
    assert sorted((e.layer, e.head) for e in rl.heads) == planted and planted
    apply_rewind(rl, tmp_path / "out")
    out = open_checkpoint(tmp_path / "out")
    layout = layout_of(t)
    after, before = head_scores(b, out, layout).scores, head_scores(b, t, layout).scores
    for layer in range(layout.num_layers):
        for head in range(layout.num_heads):
            expected = 0.0 if (layer, head) in planted else float(before[layer, head])
            assert float(after[layer, head]) == expected, (layer, head)
    edited = set(rewind_edits(rl, layout))
    for name in t.keys():
        assert out.info(name).raw_name == t.info(name).raw_name
        if name not in edited:
            assert bits(out.tensor(name, None)) == bits(t.tensor(name, None)), name
    if family != "phi3":  # o-projection bias (shared by all heads) stays the target's
        o_bias = layout.projection(0, "o").tensor.removesuffix(".weight") + ".bias"
        if o_bias in t:
            assert bits(out.tensor(o_bias, None)) == bits(t.tensor(o_bias, None))


@pytest.mark.parametrize("mutate,expected", [
    (lambda d: d.update(format="diffract-rewind/9"), "field 'format': expected 'diffract-rewind/1'"),
    (lambda d: d["heads"].append(dict(d["heads"][0])), "is listed twice"),
    (lambda d: d["pattern"].update(fraction=-0.1), "field 'pattern.fraction': -0.1 is outside [0, 1]"),
    (lambda d: d.pop("target"), "field 'target': missing"),
    (lambda d: d["heads"][0].update(projections=["q", "z"]), "unknown projection 'z'"),
])
def test_cli_malformed_lists_one_line(tmp_path, pair, capsys, mutate, expected):
    base, target, _, _ = pair
    lst = tmp_path / "r.json"
    assert main(["rewind", "plan", str(base), str(target), "--pattern", "manual", "--heads", "0:0,0:1",
                 "--out", str(lst)]) == 0
    capsys.readouterr()
    data = json.loads(lst.read_text())
    mutate(data)
    lst.write_text(json.dumps(data))
    assert main(["rewind", "apply", str(lst), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"diffract-tui: error: {lst}: ") and expected in err, err
    assert not (tmp_path / "out").exists()

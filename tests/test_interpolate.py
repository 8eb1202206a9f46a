"""Interpolation (SPEC §7): endpoints reproduced bit for bit, α = 0.5 is the mean, task arithmetic against a
float64 oracle, task-vector diagnostics against analytic cosines, barriers of known curves, and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from analysis.io import writer
from analysis.io.checkpoint import open_checkpoint
from analysis.errors import DiffractError
from analysis.edit.interpolate import (barrier, barriers_from_csv, base_to_cpt, combine, endpoints, is_loss_metric,
                                  run_interpolation, task_arithmetic)
from diffract_tui.cli import main

L, H, HKV, DH, D, FF, V = 2, 4, 2, 8, 32, 48, 64
CONFIG = {"model_type": "llama", "hidden_size": D, "num_attention_heads": H, "num_key_value_heads": HKV,
          "num_hidden_layers": L, "intermediate_size": FF, "vocab_size": V}


def state(seed: int, dtype=torch.float32, prefix: str = "model.") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    sd = {prefix + "embed_tokens.weight": r(V, D), prefix + "norm.weight": r(D), "lm_head.weight": r(V, D)}
    for i in range(L):
        p = f"{prefix}layers.{i}."
        sd |= {p + "self_attn.q_proj.weight": r(H * DH, D), p + "self_attn.k_proj.weight": r(HKV * DH, D),
               p + "self_attn.v_proj.weight": r(HKV * DH, D), p + "self_attn.o_proj.weight": r(D, H * DH),
               p + "mlp.gate_proj.weight": r(FF, D), p + "mlp.up_proj.weight": r(FF, D),
               p + "mlp.down_proj.weight": r(D, FF), p + "input_layernorm.weight": r(D),
               p + "post_attention_layernorm.weight": r(D)}
    return sd


def save(folder: Path, sd: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    save_file(sd, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return folder


def bits(t: torch.Tensor) -> bytes:
    return bytes(writer.tensor_bytes(t))


def read(folder: Path) -> dict[str, torch.Tensor]:
    ck = open_checkpoint(folder)
    return {ck.info(n).raw_name: ck.tensor(n, dtype=None) for n in ck.keys()}


def strip(name: str) -> str:
    return name.removeprefix("model.")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_endpoints_bit_exact_and_midpoint_is_mean(tmp_path, dtype):
    sa = state(0, dtype)
    sa["model.layers.0.mlp.up_proj.weight"][0, 0] = -0.0   # a negative zero survives α = 0
    sb = state(1, dtype, prefix="")                        # B stores names without `model.`
    sb["layers.0.mlp.up_proj.weight"][0, 0] = 0.0
    a, b = open_checkpoint(save(tmp_path / "a", sa)), open_checkpoint(save(tmp_path / "b", sb))
    for alpha, src in ((0.0, sa), (1.0, sb)):
        out = tmp_path / f"o{alpha}"
        run_interpolation(endpoints(a, b, alpha), out)
        got = read(out)
        assert set(got) == set(sb)  # the output takes B's raw names
        for name, t in got.items():
            ref = src[name] if src is sb else src["model." + name if name != "lm_head.weight" else name]
            assert t.dtype == dtype and bits(t) == bits(ref), (alpha, name)
    run_interpolation(endpoints(a, b, 0.5), tmp_path / "mid")
    mid = read(tmp_path / "mid")
    for name, t in mid.items():
        ta = sa[name if name == "lm_head.weight" else "model." + name].double()
        oracle = ((ta + sb[name].double()) / 2).to(dtype)
        if dtype == torch.float32:
            # 0.5·a and 0.5·b are exact, so the float32 sum rounds once like the float64 mean does
            assert bits(t) == bits(oracle), name
        else:
            assert torch.allclose(t.float(), oracle.float(), rtol=2 ** -7, atol=0), name


def test_task_arithmetic_and_base_cpt(tmp_path):
    s0, sa, sb = state(0), state(1), state(2)
    b0, a, b = (open_checkpoint(save(tmp_path / n, sd)) for n, sd in (("0", s0), ("a", sa), ("b", sb)))
    run_interpolation(task_arithmetic(b0, a, b, 0.0, 0.0), tmp_path / "zero")
    assert all(bits(t) == bits(s0[n]) for n, t in read(tmp_path / "zero").items())
    run_interpolation(task_arithmetic(b0, a, b, 0.7, -0.3), tmp_path / "ta", compute_dtype=torch.float64)
    for n, t in read(tmp_path / "ta").items():
        oracle = s0[n].double() + 0.7 * (sa[n].double() - s0[n].double()) - 0.3 * (sb[n].double() - s0[n].double())
        assert torch.allclose(t.double(), oracle, rtol=0, atol=1e-6), n
    run_interpolation(base_to_cpt(b0, a, 0.25), tmp_path / "bc")
    for n, t in read(tmp_path / "bc").items():
        oracle = s0[n].double() + 0.25 * (sa[n].double() - s0[n].double())
        assert torch.allclose(t.double(), oracle, rtol=0, atol=1e-6), n


def test_combine_never_mutates_inputs():
    x = torch.tensor([1.0, -0.0, 3.0])
    keep = x.clone()
    y = combine([x, torch.ones(3)], [1.0, 2.0], torch.float32)
    assert torch.equal(x, keep) and torch.equal(y, torch.tensor([3.0, 2.0, 5.0]))


def test_non_float_and_missing_tensors_are_copied_from_target(tmp_path):
    sa, sb = state(0), state(1)
    sb["model.position_ids"] = torch.arange(5)
    sa["model.position_ids"] = torch.arange(5) * 2
    sb["model.extra.weight"] = torch.ones(3)  # only in B
    a, b = open_checkpoint(save(tmp_path / "a", sa)), open_checkpoint(save(tmp_path / "b", sb))
    rep = run_interpolation(endpoints(a, b, 0.5), tmp_path / "o")
    assert sorted(rep.copied_from_target) == ["extra.weight", "position_ids"]
    got = read(tmp_path / "o")
    assert torch.equal(got["model.position_ids"], torch.arange(5)) and torch.equal(got["model.extra.weight"], torch.ones(3))


def test_diagnostics_against_analytic_cosines(tmp_path):
    s0 = state(0)
    sa = {n: t + 0.1 * torch.randn(t.shape, generator=torch.Generator().manual_seed(5)) for n, t in s0.items()}
    tau = {n: sa[n] - s0[n] for n in s0}
    # B: τ_B = 2τ_A in layer 0, −τ_A in layer 1, independent noise elsewhere
    g = torch.Generator().manual_seed(9)
    sb = {}
    for n, t in s0.items():
        if ".layers.0." in n:
            sb[n] = t + 2 * tau[n]
        elif ".layers.1." in n:
            sb[n] = t - tau[n]
        else:
            sb[n] = t + 0.1 * torch.randn(t.shape, generator=g)
    b0, a, b = (open_checkpoint(save(tmp_path / n, sd)) for n, sd in (("0", s0), ("a", sa), ("b", sb)))
    rep = run_interpolation(base_to_cpt(b0, a, 0.5), None, diagnostics_of=(b0, a, b))
    d = rep.diagnostics
    ta = torch.cat([tau[n].double().flatten() for n in s0])
    tb = torch.cat([(sb[n].double() - s0[n].double()).flatten() for n in s0])
    assert d["global"]["tau_a_norm"] == pytest.approx(float(ta.norm()), rel=1e-6)
    assert d["global"]["cos"] == pytest.approx(float(ta @ tb / (ta.norm() * tb.norm())), rel=1e-5)
    heads = {(h["layer"], h["head"]): h for h in d["heads"]}
    assert len(heads) == L * H
    assert all(heads[(0, h)]["cos"] == pytest.approx(1.0, abs=1e-6) for h in range(H))
    assert all(heads[(1, h)]["cos"] == pytest.approx(-1.0, abs=1e-6) for h in range(H))
    # per head: ‖τ_A‖² = ‖q_h‖² + ‖o_h‖² + (‖k_g‖² + ‖v_g‖²)/2 (k/v energy split over the 2 heads of a group)
    p = "model.layers.1.self_attn."
    h, grp = 3, 1
    e = (tau[p + "q_proj.weight"][h * DH:(h + 1) * DH].double().pow(2).sum()
         + tau[p + "o_proj.weight"][:, h * DH:(h + 1) * DH].double().pow(2).sum()
         + (tau[p + "k_proj.weight"][grp * DH:(grp + 1) * DH].double().pow(2).sum()
            + tau[p + "v_proj.weight"][grp * DH:(grp + 1) * DH].double().pow(2).sum()) / 2)
    assert heads[(1, 3)]["tau_a_norm"] == pytest.approx(math.sqrt(float(e)), rel=1e-6)
    mats = {m["tensor"]: m for m in d["matrices"]}
    assert mats["layers.0.mlp.up_proj.weight"]["cos"] == pytest.approx(1.0, abs=1e-6)
    assert not (tmp_path / "o").exists()


def test_barrier_of_line_and_dip():
    alphas = [0.0, 0.25, 0.5, 0.75, 1.0]
    line = [0.8 + 0.1 * a for a in alphas]
    assert barrier(alphas, line, loss=False) == (pytest.approx(0.0, abs=1e-12), 0.0)
    dip = [0.8, 0.7, 0.5, 0.7, 0.9]   # the line at 0.5 is 0.85 → depth 0.35
    assert barrier(alphas, dip, loss=False) == (pytest.approx(0.35), 0.5)
    bump = [2.0, 2.5, 3.1, 2.4, 2.2]  # a loss: 3.1 − 2.1 = 1.0 above the line at 0.5
    assert barrier(alphas, bump, loss=True) == (pytest.approx(1.0), 0.5)
    assert barrier(alphas, bump, loss=False)[0] == pytest.approx(0.0)  # as a score, only the endpoints touch the line
    with pytest.raises(DiffractError, match="alpha 0 and alpha 1"):
        barrier([0.0, 0.5], [1.0, 0.5], loss=False)


def test_barriers_from_csv_and_loss_detection(tmp_path):
    assert is_loss_metric("val_loss") and is_loss_metric("PPL") and not is_loss_metric("accuracy")
    csv = tmp_path / "s.csv"
    csv.write_text("alpha,metric,score\n0,acc,0.8\n0.5,acc,0.5\n1,acc,0.9\n0,ppl,10\n0.5,ppl,14\n1,ppl,12\n")
    got = {b.metric: b for b in barriers_from_csv(csv)}
    assert got["acc"].barrier == pytest.approx(0.35) and not got["acc"].is_loss
    assert got["ppl"].barrier == pytest.approx(3.0) and got["ppl"].is_loss
    forced = {b.metric: b for b in barriers_from_csv(csv, loss=True)}
    assert forced["acc"].barrier == pytest.approx(0.0) and forced["acc"].is_loss
    csv.write_text("alpha,metric,score\n0,acc,0.8\n0,acc,0.7\n1,acc,0.9\n")
    with pytest.raises(DiffractError, match="line 3: metric 'acc' has two scores"):
        barriers_from_csv(csv)
    csv.write_text("a,b,c\n")
    with pytest.raises(DiffractError, match="header alpha,metric,score"):
        barriers_from_csv(csv)


def test_cli_interpolate(tmp_path, capsys):
    s0, sa, sb = state(0), state(1), state(2)
    p0, pa, pb = (save(tmp_path / n, sd) for n, sd in (("0", s0), ("a", sa), ("b", sb)))
    assert main(["interpolate", str(pa), str(pb), "--alpha", "0", "--out", str(tmp_path / "o")]) == 0
    assert all(bits(t) == bits(sa[n]) for n, t in read(tmp_path / "o").items())
    diag = tmp_path / "d.json"
    csv = tmp_path / "s.csv"
    csv.write_text("alpha,metric,score\n0,loss,2\n0.5,loss,2.5\n1,loss,2\n")
    assert main(["interpolate", str(pa), str(pb), "--base", str(p0), "--mode", "task-arithmetic", "--lambda-a", "0.5",
                 "--lambda-b", "0.5", "--out", str(tmp_path / "ta"), "--diagnostics-json", str(diag),
                 "--barrier", str(csv)]) == 0
    out = capsys.readouterr().out
    assert "barrier loss: B = 0.5 at α = 0.5" in out and "cos(τ_A, τ_B)" in out
    data = json.loads(diag.read_text())
    assert data["mode"] == "task-arithmetic" and data["barriers"][0]["barrier"] == pytest.approx(0.5)
    assert {"global", "matrices", "heads", "base", "a", "b"} <= set(data)
    idx = json.loads((tmp_path / "ta" / "model.safetensors.index.json").read_text())
    assert idx["metadata"]["diffract"]["mode"] == "task-arithmetic"
    # refusals, one line each
    assert main(["interpolate", str(pa), str(pb), "--out", str(pa / "x")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "inside the input folder" in err
    assert main(["interpolate", str(pa), str(pb), "--diagnostics-json", str(diag)]) == 1
    assert "need --base" in capsys.readouterr().err
    assert main(["interpolate", str(pa), "--out", str(tmp_path / "z")]) == 1
    assert "needs --base" in capsys.readouterr().err


def test_pickle_and_safetensors_inputs_mix(tmp_path):
    """A as a PyTorch pickle (read through the checkpoint), B as safetensors (read straight into the
    workspace): the midpoint is still the exact float32 mean and α = 1 is B bit for bit."""
    sa, sb = state(3), state(4)
    (tmp_path / "a").mkdir()
    torch.save(sa, tmp_path / "a" / "pytorch_model.bin")
    (tmp_path / "a" / "config.json").write_text(json.dumps(CONFIG))
    a, b = open_checkpoint(tmp_path / "a"), open_checkpoint(save(tmp_path / "b", sb))
    run_interpolation(endpoints(a, b, 0.5), tmp_path / "mid")
    for n, t in read(tmp_path / "mid").items():
        assert bits(t) == bits(((sa[n].double() + sb[n].double()) / 2).float()), n
    run_interpolation(endpoints(b, a, 0.0), tmp_path / "one")  # output laid out like A (the pickle), values of B
    got = read(tmp_path / "one")
    assert set(got) == set(sa) and all(bits(got[n]) == bits(sb[n]) for n in sb)

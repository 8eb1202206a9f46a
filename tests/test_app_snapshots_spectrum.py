"""Snapshots and pilot tests of the Spectrum view on a real-LLM-shaped matrix (issue 10 B.1): a GQA llama whose
q projections are rank-deficient (a 128×128 matrix of rank 96 plus noise 1e-5 of its scale), so that most
eigenvalues sit 10 decades below λmax, as in a real model's q projection. The default x-range must show the bulk
and the tail, say how many eigenvalues it leaves out, and `i` / `o` must zoom on the tail / show them all.

Deterministic like tests/test_app_snapshots_core.py (seeded checkpoints, fixed folder names, cache in tmp_path,
cpu, every worker finished before the screenshot). Record with `--snapshot-update` and look at the SVGs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from analysis.run.session import ExplorerSession
from diffract_tui.node import NodeRef
from tests.conftest import llama_checkpoint, write_safetensors
from tests.test_app_snapshots_core import at, make_app

SIZES = [(80, 24), (160, 48)]
HIDDEN, RANK = 128, 96


def rank_deficient(shape: tuple[int, int], rank: int, g: torch.Generator) -> torch.Tensor:
    """A (rows × cols) matrix of `rank` plus noise 1e-4 of its entries: the other eigenvalues are ~1e-9·λmax."""
    a = torch.randn(shape[0], rank, generator=g) / math.sqrt(rank)
    b = torch.randn(rank, shape[1], generator=g) * 0.05
    return a @ b + 1e-5 * torch.randn(shape, generator=g)


def cpt_update(key: str, w: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A CPT checkpoint's tensor: small noise on matrices, a rank-2 update on q (which stays rank-deficient)."""
    if w.dim() != 2:
        return w.clone()
    if key.endswith("q_proj.weight"):
        return w + 0.2 * rank_deficient(tuple(w.shape), 2, g)
    return w + 0.005 * torch.randn(w.shape, generator=g)


def write_trio(root: Path) -> list[Path]:
    """base / chem / code folders of a GQA llama (4 heads, 2 kv heads) with rank-deficient q projections."""
    config, base = llama_checkpoint(layers=2, hidden=HIDDEN, heads=4, kv_heads=2, intermediate=192, seed=0)
    g = torch.Generator().manual_seed(7)
    for key in [k for k in base if k.endswith("q_proj.weight")]:
        base[key] = rank_deficient(tuple(base[key].shape), RANK, g)
    paths = []
    for seed, name in ((None, "base"), (1, "chem"), (2, "code")):
        tensors = base
        if seed is not None:
            g = torch.Generator().manual_seed(seed)
            tensors = {k: cpt_update(k, v, g) for k, v in base.items()}
        folder = root / name
        write_safetensors(folder / "model.safetensors", tensors)
        (folder / "config.json").write_text(json.dumps(config))
        paths.append(folder)
    return paths


@pytest.fixture
def session(tmp_path: Path) -> ExplorerSession:
    s = ExplorerSession.open(write_trio(tmp_path), device="cpu", cache_dir=tmp_path / "cache")
    yield s
    s.close()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_spectrum_of_a_rank_deficient_q_projection(snap_compare, session, size) -> None:
    assert snap_compare(make_app(session), terminal_size=size, run_before=at(NodeRef(1, "q")))


def test_zoom_keys_change_the_x_range_and_the_clipped_count(session) -> None:
    import asyncio

    from diffract_tui.views.spectrum import SpectrumView

    async def run() -> None:
        app = make_app(session)
        async with app.run_test(size=(80, 24)) as pilot:
            await at(NodeRef(1, "q"))(pilot)
            view = app.query_one(SpectrumView)
            base = view.result.spectra[0]
            xmin, lam_max = float(base.metrics["pl_esd_xmin"]), float(base.evals.max())
            lo, hi = view.x_limits
            # default: the bulk and the tail, not the near-zero eigenvalues (below 1e-3·xmin); their count said
            assert lo >= 1e-3 * xmin and hi >= lam_max
            assert view.hidden_text.startswith(f"{HIDDEN - RANK} of {HIDDEN} < ")
            assert "i tail, o all" in view.hidden_text
            await pilot.press("i")
            await pilot.pause()
            assert view.x_limits == (pytest.approx(0.8 * xmin), hi)    # the tail, from just below xmin
            assert view.hidden_text.startswith("tail: ") and "(i back)" in view.hidden_text
            await pilot.press("i")
            await pilot.pause()
            assert view.x_limits == (lo, hi)                          # i again: back to the default
            await pilot.press("o")
            await pilot.pause()
            lo_all = view.x_limits[0]
            assert lo_all < 1e-8 * hi                                 # all: the near-zero eigenvalues too
            assert lo_all == min(float(s.evals[s.evals > 1e-12 * s.evals.max()].min()) for s in view.result.spectra)
            assert "(log axis; o back)" in view.hidden_text or view.hidden_text == ""
            await pilot.press("o")
            await pilot.pause()
            assert view.x_limits == (lo, hi)

    asyncio.run(run())


def test_zoom_keys_are_listed_and_taken_by_no_other_binding() -> None:
    from diffract_tui.ui import DiffractApp
    from diffract_tui.views.spectrum import SpectrumView
    from diffract_tui.widgets.tree import ModelTree

    def keys(bindings) -> set[str]:
        return {k.strip() for b in bindings for k in b.key.split(",")}

    mine = {b.key: b for b in SpectrumView.BINDINGS}
    assert {"i", "o"} <= set(mine) and all(mine[k].show for k in ("i", "o"))   # in the footer and the help
    assert not {"i", "o"} & (keys(DiffractApp.BINDINGS) | keys(ModelTree.BINDINGS))


def test_two_eigenvalues_are_points_and_a_tpl_equal_to_the_pl_is_said_not_overdrawn(session) -> None:
    import asyncio
    from types import SimpleNamespace

    import numpy as np
    from textual_plotext import PlotextPlot

    from diffract_tui.views.spectrum import SpectrumView

    def spectrum(label: str, evals: list[float], tpl_lambda: float) -> SimpleNamespace:
        x = np.geomspace(0.5, 2.0, 8)
        pdf = 0.5 * x ** -2.5
        return SimpleNamespace(label=label, evals=np.array(evals),
                               metrics={"pl_alpha": 2.5, "tpl_alpha": 2.5, "tpl_lambda": tpl_lambda,
                                        "pl_esd_xmin": 0.5},
                               lines={"pl_x": x, "pl_pdf": pdf, "tpl_x": x, "tpl_pdf": pdf})

    async def run() -> None:
        app = make_app(session)
        async with app.run_test(size=(80, 24)) as pilot:
            await at(NodeRef(1, "q"))(pilot)
            view = app.query_one(SpectrumView)
            plt = view.query_one("#spectrum-plot", PlotextPlot).plt
            calls: list[str] = []
            for name in ("plot", "scatter"):
                original = getattr(plt, name)
                setattr(plt, name, lambda *a, _n=name, _o=original, **k: (calls.append(_n), _o(*a, **k))[1])
            view._draw(SimpleNamespace(spectra=(spectrum("base", [0.5, 2.0], 0.0), spectrum("chem", [0.5, 2.0], 0.0))))
            assert calls[:2] == ["scatter", "scatter"]        # 2 eigenvalues each: points, not a curve
            assert calls[2:] == ["plot"]                      # the PL line only: the TPL one (Λ = 0) would cover it
            legend = str(view.query_one("#spectrum-legend").render())
            assert "PL α 2.5 = TPL (Λ=0)" in legend and "TPL α" not in legend
            assert "chem ≈ base" in legend                    # the same ESD as the base: said, as it is hidden

    asyncio.run(run())

"""Snapshots of the core views (Spectrum, Delta) and the help screen at 80×24 and 160×48.

Deterministic: seeded generated checkpoints in fixed folder names (labels base/chem/code), a cache in
tmp_path, device cpu, and every worker finished before the screenshot. Update after an intended change
with `pytest tests/test_app_snapshots_core.py --snapshot-update` and look at the SVGs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from analysis.run.session import ExplorerSession
from diffract_tui.node import NodeRef
from tests.conftest import llama_checkpoint, write_safetensors

SIZES = [(80, 24), (160, 48)]


@pytest.fixture
def session(tmp_path: Path) -> ExplorerSession:
    config, base = llama_checkpoint(layers=2, hidden=64, heads=4, kv_heads=2, seed=0)
    paths = []
    for seed, name in ((None, "base"), (1, "chem"), (2, "code")):
        tensors = base
        if seed is not None:
            g = torch.Generator().manual_seed(seed)
            tensors = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.dim() == 2 else v.clone()
                       for k, v in base.items()}
        folder = tmp_path / name
        write_safetensors(folder / "model.safetensors", tensors)
        (folder / "config.json").write_text(json.dumps(config))
        paths.append(folder)
    s = ExplorerSession.open(paths, device="cpu", cache_dir=tmp_path / "cache")
    yield s
    s.close()


def at(node: NodeRef, *keys: str):
    """run_before: move the tree to `node`, press `keys`, and wait until every worker has finished."""

    async def run_before(pilot) -> None:
        app = pilot.app
        await pilot.pause()
        app.go_to_node(node)
        for key in keys:
            await pilot.press(key)
        for _ in range(200):
            await pilot.pause(0.1)
            await app.workers.wait_for_complete()
            if not app.busy:
                break
        await pilot.pause(0.3)  # let the tables settle their column widths
        await pilot.pause()

    return run_before


def make_app(session: ExplorerSession):
    from diffract_tui.ui import DiffractApp

    return DiffractApp(session)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_spectrum_view_of_a_head(snap_compare, session, size) -> None:
    assert snap_compare(make_app(session), terminal_size=size, run_before=at(NodeRef(1, "q", 2)))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_spectrum_view_of_a_matrix(snap_compare, session, size) -> None:
    assert snap_compare(make_app(session), terminal_size=size, run_before=at(NodeRef(1, "down")))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_delta_view_of_a_matrix(snap_compare, session, size) -> None:
    assert snap_compare(make_app(session), terminal_size=size, run_before=at(NodeRef(0, "up"), "2"))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_help_screen(snap_compare, session, size) -> None:
    assert snap_compare(make_app(session), terminal_size=size, run_before=at(NodeRef(0), "question_mark"))

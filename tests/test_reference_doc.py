"""docs/reference.md keeps up with the engine: every column a real `scan` / `delta` table has, every summary
key and every label of the explorer's metric panels is explained there, and the README, the docs and the
`--help` texts point users at it instead of a file they do not have."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "reference.md"


def reference_text() -> str:
    return REFERENCE.read_text(encoding="utf-8")


def csv_header(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8") as f:
        return next(csv.reader(f))


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny generated base + two domains (2 layers, 4 heads in 2 kv groups, hidden 64)."""
    from analysis.generate import write_family

    root = tmp_path_factory.mktemp("family")
    write_family(root, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96,
                 vocab_size=64)
    return root


@pytest.fixture(scope="module")
def scan_columns(family: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Column headers of a real `scan --heads --delta` CSV of the generated family."""
    from analysis.io.checkpoint import open_checkpoint
    from analysis.run.scan import scan
    from analysis.run.tables import write_table
    from analysis.spectral.backend import SpectralSettings

    ckpts = [open_checkpoint(family / name) for name in ("base", "math")]
    try:
        rows = list(scan(ckpts, heads=True, delta=True, settings=SpectralSettings(device="cpu"), cache=None))
    finally:
        for c in ckpts:
            c.close()
    out = tmp_path_factory.mktemp("scan") / "scan.csv"
    write_table(rows, out, metadata={})
    return csv_header(out)


@pytest.fixture(scope="module")
def delta_result(family: Path, tmp_path_factory: pytest.TempPathFactory):
    """(column headers of a real two-domain `delta` CSV, its summary)."""
    from analysis.deltas.delta_table import DeltaOptions, open_and_build
    from analysis.run.tables import write_table
    from analysis.spectral.backend import SpectralSettings

    result = open_and_build(family / "base", [family / "math", family / "code"],
                            options=DeltaOptions(settings=SpectralSettings(device="cpu")))
    out = tmp_path_factory.mktemp("delta") / "delta.csv"
    write_table(result.rows, out, metadata={})
    return csv_header(out), result.summary


def undocumented(names) -> list[str]:
    text = reference_text()
    return [n for n in names if f"`{n}`" not in text]


def test_every_scan_column_is_in_the_reference(scan_columns: list[str]) -> None:
    assert {"operation", "pl_alpha", "delta_rho", "mp_esd_max", "tw_esd_bound"} <= set(scan_columns)
    assert len(scan_columns) > 50
    assert undocumented(scan_columns) == []


def test_every_delta_column_and_summary_key_is_in_the_reference(delta_result) -> None:
    columns, summary = delta_result
    assert {"truncatable_fraction", "a1_noise_floor_l", "head_score", "head_class", "a3_agreement"} <= set(columns)
    assert undocumented(columns) == []
    entry_keys = {k for c in summary["checkpoints"] for k in c} - {"checkpoint"}
    assert {"top10_share", "gini"} <= entry_keys
    assert undocumented(sorted(entry_keys)) == []
    assert undocumented(sorted(summary["agreement"])) == []


def test_every_panel_label_is_in_the_reference() -> None:
    from diffract_tui.views.delta import DELTA_ROWS
    from diffract_tui.views.spectrum import SPECTRUM_ROWS

    text = reference_text()
    labels = [label for label, _key, _fit in SPECTRUM_ROWS] + [label for label, _key in DELTA_ROWS]
    assert [label for label in labels if f'"{label}"' not in text] == []
    # the panels' metric keys are table columns, documented as such
    keys = [key for _label, key, _fit in SPECTRUM_ROWS] + [key for _label, key in DELTA_ROWS]
    assert undocumented(keys) == []
    for header in ("Δrel", "ρ", "α", "srank Δ"):  # the Table view's column headers (before the label)
        assert f'"{header} ⟨' in text, header


def test_reference_explains_the_obscure_numbers() -> None:
    text = reference_text()
    for needle in ("√(2 ln k / d)", "trunc. t@0.1", "Mirsky", "describes ΔW itself", "fewer than 50",
                   "fewer than 100", "only d_h eigenvalues", "DIFFRACT_TUI_CACHE_DIR", "--cache-dir",
                   "DIFFRACT_TUI_CONFIG_DIR", "diffract-rewind/1", "settings.json"):
        assert needle in text, needle


def test_no_user_facing_link_to_the_shared_spec() -> None:
    """Users have no ../shared/SPEC.md: the README and docs link the reference instead."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "(docs/reference.md)" in readme
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        assert "shared/SPEC" not in path.read_text(encoding="utf-8"), path
    # every relative link in the README resolves to a file of the repository
    for target in re.findall(r"\]\(([^)#:]+)\)", readme):
        assert (ROOT / target).exists(), target


@pytest.mark.parametrize("args", [["scan", "--help"], ["delta", "--help"], ["rewind", "plan", "--help"]])
def test_help_names_the_reference(args: list[str]) -> None:
    from typer.testing import CliRunner

    from diffract_tui.cli import app

    result = CliRunner().invoke(app, args, env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    assert "docs/reference.md" in flat
    assert "SPEC" not in flat

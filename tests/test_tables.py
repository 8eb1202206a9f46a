"""Tables of result rows: every format reads back the same values, NaN/inf and nulls included."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from analysis.errors import DiffractError
from analysis.run.tables import read_table, write_table

ROWS = [
    {"checkpoint": "base", "tensor": "layers.0.q", "layer": 0, "head": None, "rows": 64, "pl_alpha": 3.5,
     "tpl_lambda": float("nan"), "pl_ks": np.float32(0.125), "pl_alpha_reliable": True, "fit_warning": None},
    {"checkpoint": "cpt", "tensor": "layers.0.q", "layer": 0, "head": 3, "rows": 64, "pl_alpha": float("inf"),
     "tpl_lambda": 1e-300, "pl_ks": 0.1, "pl_alpha_reliable": False, "fit_warning": "n_tail < 50"},
    # a row with a column the others lack, and an int in a float column
    {"checkpoint": "cpt", "tensor": "embed", "layer": None, "head": None, "rows": 32000, "pl_alpha": 2,
     "tpl_lambda": float("-inf"), "pl_ks": 0.3, "pl_alpha_reliable": True, "fit_warning": None,
     "operation": "delta"},
]

EXPECTED_COLUMNS = ["checkpoint", "tensor", "layer", "head", "rows", "pl_alpha", "tpl_lambda", "pl_ks",
                    "pl_alpha_reliable", "fit_warning", "operation"]


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("suffix", [".csv", ".json", ".parquet"])
def test_round_trip_equal_in_every_format(tmp_path, suffix):
    path = tmp_path / f"t{suffix}"
    meta = {"tool": "diffract-tui 0.1.0", "settings": {"dtype": "float32", "seed": 42}}
    write_table(ROWS, path, metadata=meta)
    rows, back_meta = read_table(path)
    assert back_meta == meta
    assert len(rows) == 3 and list(rows[0]) == EXPECTED_COLUMNS
    for original, back in zip(ROWS, rows):
        for col in EXPECTED_COLUMNS:
            want = original.get(col)
            if col in ("pl_alpha", "pl_ks", "tpl_lambda") and want is not None:
                want = float(want)  # a float column: 2 → 2.0, float32 0.125 → 0.125
            assert _same(back[col], want), (suffix, col, back[col], want)
    assert rows[1]["tpl_lambda"] == 1e-300  # full float64 precision survives text formats


def test_json_is_strict_and_csv_is_plain(tmp_path):
    write_table(ROWS, tmp_path / "t.json")
    json.loads((tmp_path / "t.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    write_table(ROWS, tmp_path / "t.csv")
    with open(tmp_path / "t.csv", newline="") as handle:
        lines = list(csv.reader(handle))
    assert lines[0] == EXPECTED_COLUMNS and len(lines) == 4
    assert not (tmp_path / "t.csv.meta.json").exists()  # no sidecar without metadata


@pytest.mark.parametrize("name", ["out.xlsx", "out", "out.CSVX"])
def test_unknown_suffix_is_a_one_line_error(tmp_path, name):
    with pytest.raises(DiffractError) as err:
        write_table(ROWS, tmp_path / name)
    message = str(err.value)
    assert "\n" not in message and ".csv, .json or .parquet" in message and name in message
    assert not list(tmp_path.iterdir())  # nothing written


def test_write_is_atomic_and_replaces(tmp_path):
    path = tmp_path / "t.parquet"
    write_table(ROWS, path)
    write_table(ROWS[:1], path)
    assert len(read_table(path)[0]) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]  # no temp files left behind


def test_missing_folder_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DiffractError) as err:
        write_table(ROWS, blocker / "out.csv")
    assert "\n" not in str(err.value)

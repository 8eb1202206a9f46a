"""Write (and read back) tables of result rows as .csv, .json or .parquet, chosen by the suffix.

Shared by `diffract-tui scan` and `diffract-tui delta`. Writes are atomic (temp file + rename).
Columns are the ordered union of the rows' keys; a missing value is empty/null. Each column gets
one type (bool, int, float or str) so every format reads back the same values, NaN and ±inf
included. Provenance (SPEC §8) travels as `metadata`: a top-level object in JSON, the schema
metadata in Parquet, and a `<file>.meta.json` sidecar for CSV (CSV has nowhere else to put it).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from analysis.io.atomic import atomic_writer, write_error, write_text_atomic
from analysis.errors import DiffractError
from analysis.io.guard import refuse_input_overlap

TABLE_FORMATS = (".csv", ".json", ".parquet")
JSON_TABLE_FORMAT = "diffract-table/1"
_PARQUET_META_KEY = b"diffract"


def table_format(path: Path) -> str:
    """'.csv' | '.json' | '.parquet' from the file name, else a one-line DiffractError."""
    suffix = Path(path).suffix.lower()
    if suffix not in TABLE_FORMATS:
        raise DiffractError(
            f"cannot write a table with suffix {suffix or '(none)'!r}",
            path=path,
            hint="name the output .csv, .json or .parquet",
        )
    return suffix


def sidecar_path(path: Path) -> Path:
    """The `<file>.meta.json` that carries a CSV table's metadata."""
    return path.with_name(path.name + ".meta.json")


def check_table_output(path: str | Path, inputs: Iterable[str | Path], *, option: str = "--out") -> Path:
    """Refuse a bad suffix and a table (or its CSV sidecar) that would land on, in or around an input
    (`guard.refuse_input_overlap`); called before any work and again by `write_table`."""
    p = Path(path)
    fmt = table_format(p)
    inputs = list(inputs)
    refuse_input_overlap(p, inputs, option=option)
    if fmt == ".csv":
        refuse_input_overlap(sidecar_path(p), inputs, option=option)
    return p


def _plain(value: Any) -> Any:
    """Python scalar for numpy/torch scalars; everything else unchanged."""
    if isinstance(value, np.generic):
        return value.item()
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        return value.item()
    return value


def _column_type(values: Iterable[Any]) -> str:
    """One type per column: bool, int, float or str (anything mixed or unknown is str)."""
    kinds = set()
    for v in values:
        if v is None:
            continue
        if isinstance(v, bool):
            kinds.add("bool")
        elif isinstance(v, int):
            kinds.add("int")
        elif isinstance(v, float):
            kinds.add("float")
        else:
            kinds.add("str")
    if not kinds:
        return "str"
    if len(kinds) == 1:
        return kinds.pop()
    if kinds <= {"int", "float"}:
        return "float"
    return "str"


def _coerce(value: Any, kind: str) -> Any:
    if value is None:
        return None
    if kind == "float":
        return float(value)
    if kind == "str" and not isinstance(value, str):
        return str(value)
    return value


def normalise_rows(rows: Sequence[dict]) -> tuple[list[str], dict[str, str], list[dict]]:
    """Columns (first-seen order), a type per column, and rows with every column, coerced to it."""
    columns: list[str] = []
    seen: set[str] = set()
    plain_rows = []
    for row in rows:
        plain = {str(k): _plain(v) for k, v in row.items()}
        plain_rows.append(plain)
        for k in plain:
            if k not in seen:
                seen.add(k)
                columns.append(k)
    types = {c: _column_type(r.get(c) for r in plain_rows) for c in columns}
    out = [{c: _coerce(r.get(c), types[c]) for c in columns} for r in plain_rows]
    return columns, types, out


def _float_to_json(v: float | None) -> Any:
    if v is None or math.isfinite(v):
        return v
    return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")


def write_table(rows: list[dict], path: Path, *, metadata: dict | None = None,
                inputs: Iterable[str | Path] = (), option: str = "--out") -> None:
    """Write `rows` to `path` atomically in the format its suffix names (.csv/.json/.parquet); refused
    (one line) when it overlaps an input (`check_table_output`), an OSError is one line naming the file."""
    path = Path(path)
    fmt = table_format(path)
    check_table_output(path, inputs, option=option)
    columns, types, norm = normalise_rows(rows)
    if metadata is not None:
        meta_json = json.dumps(metadata, sort_keys=True, default=str)
    if fmt == ".csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        for row in norm:
            writer.writerow(["" if row[c] is None else (repr(row[c]) if types[c] == "float" else row[c])
                             for c in columns])
        write_text_atomic(path, buffer.getvalue(), "the table")
        if metadata is not None:
            write_text_atomic(sidecar_path(path), meta_json + "\n", "the table's metadata")
    elif fmt == ".json":
        doc = {
            "format": JSON_TABLE_FORMAT,
            "metadata": json.loads(meta_json) if metadata is not None else {},
            "columns": [{"name": c, "type": types[c]} for c in columns],
            "rows": [
                {c: (_float_to_json(r[c]) if types[c] == "float" else r[c]) for c in columns} for r in norm
            ],
        }
        write_text_atomic(path, json.dumps(doc, allow_nan=False, indent=1) + "\n", "the table")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        arrow_types = {"bool": pa.bool_(), "int": pa.int64(), "float": pa.float64(), "str": pa.string()}
        schema = pa.schema([pa.field(c, arrow_types[types[c]]) for c in columns])
        if metadata is not None:
            schema = schema.with_metadata({_PARQUET_META_KEY: meta_json.encode("utf-8")})
        table = pa.Table.from_pylist(norm, schema=schema)
        try:
            with atomic_writer(path, "wb") as handle:
                pq.write_table(table, handle)
        except OSError as err:
            raise write_error(err, path, "the table") from None


def _parse_csv_column(cells: list[str]) -> list[Any]:
    """Cells of one CSV column → typed values (the column's type is inferred from all its cells)."""
    present = [c for c in cells if c != ""]
    if present and all(c in ("True", "False") for c in present):
        return [None if c == "" else c == "True" for c in cells]
    try:
        if present and all(c.lstrip("-").isdigit() for c in present):
            return [None if c == "" else int(c) for c in cells]
        if present:
            return [None if c == "" else float(c) for c in cells]
    except ValueError:
        pass
    return [None if c == "" else c for c in cells]


def read_table(path: Path) -> tuple[list[dict], dict]:
    """Rows and metadata from a table written by `write_table` (for tests and for other tools)."""
    path = Path(path)
    fmt = table_format(path)
    if fmt == ".csv":
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = next(reader, [])
            body = list(reader)
        cols = [_parse_csv_column([r[i] for r in body]) for i in range(len(header))]
        rows = [{h: cols[i][j] for i, h in enumerate(header)} for j in range(len(body))]
        sidecar = sidecar_path(path)
        metadata = json.loads(sidecar.read_text(encoding="utf-8")) if sidecar.exists() else {}
        return rows, metadata
    if fmt == ".json":
        doc = json.loads(path.read_text(encoding="utf-8"))
        floats = {c["name"] for c in doc["columns"] if c["type"] == "float"}
        rows = [
            {k: (float(v) if k in floats and v is not None else v) for k, v in row.items()} for row in doc["rows"]
        ]
        return rows, doc.get("metadata", {})
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    meta = (table.schema.metadata or {}).get(_PARQUET_META_KEY)
    return table.to_pylist(), (json.loads(meta) if meta else {})

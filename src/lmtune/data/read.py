"""Read records from JSONL / JSON / CSV / Parquet, keeping where each came from for error messages."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from lmtune.errors import LmtuneError

Record = tuple[str, dict[str, Any]]  # ("file:line", record)
ENCODING = "utf-8-sig"  # UTF-8, ignoring the byte-order mark that spreadsheet exports put first


def read_records(path: str | Path) -> list[Record]:
    p = Path(path)
    if not p.is_file():
        raise LmtuneError(f"data file not found: {p}")
    reader = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}.get(
        p.suffix.lower())
    if reader is None:
        raise LmtuneError(f"{p}: unknown data format '{p.suffix}'; use .jsonl, .json, .csv or .parquet")
    try:
        records = reader(p)
    except UnicodeDecodeError as err:
        raise LmtuneError(f"{p}: not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8") from None
    if not records:
        raise LmtuneError(f"{p}: no records")
    for where, record in records:
        if not isinstance(record, dict):
            raise LmtuneError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    return records


def _read_jsonl(p: Path) -> list[Record]:
    records = []
    with p.open(encoding=ENCODING) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append((f"{p}:{number}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise LmtuneError(f"{p}:{number}: not valid JSON ({err.msg} at column {err.colno})") from None
    return records


def _read_json(p: Path) -> list[Record]:
    try:
        data = json.loads(p.read_text(encoding=ENCODING))
    except json.JSONDecodeError as err:
        raise LmtuneError(f"{p}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(data, list):
        raise LmtuneError(f"{p}: a .json data file must hold a list of records")
    return [(f"{p}: record {i}", r) for i, r in enumerate(data, start=1)]


def _read_csv(p: Path) -> list[Record]:
    with p.open(encoding=ENCODING, newline="") as f:
        reader = csv.DictReader(f)
        try:
            # A quoted field may span lines: a row starts where it ends, less the newlines inside it.
            return [(f"{p}:{reader.line_num - _newlines(row)}", dict(row)) for row in reader]
        except csv.Error as err:
            raise LmtuneError(f"{p}:{reader.line_num}: not valid CSV ({err})") from None


def _newlines(row: dict[str, Any]) -> int:
    return sum(value.count("\n") for value in row.values() if isinstance(value, str))


def _read_parquet(p: Path) -> list[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LmtuneError(f"{p}: reading Parquet needs pyarrow: pip install pyarrow") from None
    rows = pq.read_table(p).to_pylist()
    return [(f"{p}: row {i}", r) for i, r in enumerate(rows, start=1)]

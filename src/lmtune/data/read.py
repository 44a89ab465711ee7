"""Read records from JSONL / JSON / CSV / Parquet / plain text files (or, online, a hub dataset via `datasets`),
keeping where each came from for error messages."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from lmtune.errors import LmtuneError

Record = tuple[str, dict[str, Any]]  # ("file:line", record)
ENCODING = "utf-8-sig"  # UTF-8, ignoring the byte-order mark that spreadsheet exports put first


def read_records(path: str | Path, bad: list[str] | None = None) -> list[Record]:
    """Every record of `path`; with a `bad` list, unreadable lines are noted there and skipped, not fatal."""
    p = Path(path)
    if p.is_dir():
        raise LmtuneError(f"{p} is a directory; name a data file in it (.jsonl, .json, .csv, .parquet or .txt)")
    if not p.is_file():
        if _looks_like_hub_id(str(path)):
            return _read_hub(str(path))
        raise LmtuneError(f"data file not found: {p}")
    reader = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet,
              ".txt": _read_text}.get(p.suffix.lower())
    if reader is None:
        raise LmtuneError(f"{p}: unknown data format '{p.suffix}'; use .jsonl, .json, .csv, .parquet or .txt")
    try:
        records = reader(p, bad) if reader is _read_jsonl else reader(p)
    except UnicodeDecodeError as err:
        raise LmtuneError(f"{p}: not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8") from None
    except OSError as err:
        raise LmtuneError(f"cannot read {p}: {err.strerror}") from None
    if not records:
        raise LmtuneError(f"{p}: all {len(bad)} records are bad (first: {bad[0]})" if bad else f"{p}: no records")
    for where, record in records:
        if not isinstance(record, dict):
            raise LmtuneError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    return records


def _read_jsonl(p: Path, bad: list[str] | None = None) -> list[Record]:
    records = []
    with p.open(encoding=ENCODING) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append((f"{p}:{number}", json.loads(line)))
            except json.JSONDecodeError as err:
                message = f"{p}:{number}: not valid JSON ({err.msg} at column {err.colno})"
                if bad is None:
                    raise LmtuneError(message) from None
                bad.append(message)
    return records


def _read_text(p: Path) -> list[Record]:
    """Plain text: each paragraph (lines up to a blank line) is one {"text"} document."""
    records, lines, first = [], [], 0
    for number, line in enumerate([*p.read_text(encoding=ENCODING).splitlines(), ""], start=1):
        if line.strip():
            first = first if lines else number
            lines.append(line)
        elif lines:
            records.append((f"{p}:{first}", {"text": "\n".join(lines)}))
            lines = []
    return records


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not Path(parts[0]).exists() and not Path(name).suffix


def _read_hub(name: str) -> list[Record]:
    """A hub dataset's train split (needs network the first time; `datasets` caches it)."""
    try:
        import datasets

        rows = datasets.load_dataset(name, split="train")
    except Exception as err:  # noqa: BLE001 - offline, unknown name, gated: all one line for the user
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LmtuneError(f"data file not found: {name} (and as a hub dataset: {first})") from None
    return [(f"{name}: row {i}", dict(r)) for i, r in enumerate(rows, start=1)]


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
            rows = [(f"{p}:{reader.line_num - _newlines(row)}", row) for row in reader]
        except csv.Error as err:
            raise LmtuneError(f"{p}:{reader.line_num}: not valid CSV ({err})") from None
    for where, row in rows:
        if None in row:  # DictReader files surplus values under the key None
            raise LmtuneError(f"{where}: more values than the header has columns ({', '.join(reader.fieldnames)})")
    return [(where, dict(row)) for where, row in rows]


def _newlines(row: dict[str, Any]) -> int:
    return sum(value.count("\n") for value in row.values() if isinstance(value, str))


def _read_parquet(p: Path) -> list[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LmtuneError(f"{p}: reading Parquet needs pyarrow: pip install pyarrow") from None
    import pyarrow as pa

    try:
        rows = pq.read_table(p).to_pylist()
    except (pa.ArrowException, OSError) as err:  # a torn or mislabelled file: pyarrow says why in its first line
        raise LmtuneError(f"{p}: not a readable Parquet file ({str(err).strip().splitlines()[0]})") from None
    return [(f"{p}: row {i}", r) for i, r in enumerate(rows, start=1)]

"""``gpuheal export``: any table of a recording as CSV or JSON lines, from the file alone.

CSV keeps the stored values (JSON text columns stay text, booleans are 0/1); JSON lines
decode them again (lists/objects, ``true``/``false``). Rows come in time order.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from gpuheal.records import BOOL_COLUMNS, JSON_COLUMNS
from gpuheal.timespec import since_ts
from recorder.dbfile import RecordingError, open_readonly, require_table
from recorder.progress import Progress
from recorder.schema import TIME_COLUMN

FORMATS = ("csv", "jsonl")
PROGRESS_EVERY = 1000


def run_export(db: Path | str, table: str, fmt: str, out: TextIO = sys.stdout,
               since: str | None = None, progress: bool | None = None,
               err: TextIO | None = None) -> int:
    """Write ``table`` of recording ``db`` to ``out``; 0 on success, 2 on a usage error
    (missing file or table, unknown format, bad ``since``) with the reason on stderr.
    ``progress``: None draws a bar on stderr only when it is a terminal."""
    err = err if err is not None else sys.stderr
    try:
        if fmt not in FORMATS:
            raise RecordingError(f"unknown format {fmt!r}; formats: {', '.join(FORMATS)}")
        start = since_ts(since)
        database = open_readonly(db)
    except ValueError as exc:
        print(f"gpuheal export: {exc}", file=err)
        return 2
    try:
        require_table(database, table, db)
        time_col = TIME_COLUMN[table]
        where, params = ("", []) if start is None else (f' WHERE "{time_col}" >= ?', [start])
        total = int(database.execute(f'SELECT COUNT(*) FROM "{table}"{where}', params)
                    .fetchone()[0])
        cursor = database.execute(
            f'SELECT * FROM "{table}"{where} ORDER BY "{time_col}", rowid', params)
        names = [d[0] for d in cursor.description]
        with Progress(total, f"export {table}", stream=err, enabled=progress) as bar:
            write = _csv_writer(out, names) if fmt == "csv" else _jsonl_writer(out, names)
            for n, row in enumerate(cursor, 1):
                write(row)
                if n % PROGRESS_EVERY == 0:
                    bar.update(n)
            bar.update(total)
        out.flush()
    except RecordingError as exc:
        print(f"gpuheal export: {exc}", file=err)
        return 2
    except BrokenPipeError:
        return 0  # the reader (head, less) went away: not an error
    finally:
        database.close()
    return 0


def _csv_writer(out: TextIO, names: list[str]) -> Any:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(names)
    return writer.writerow


def _jsonl_writer(out: TextIO, names: list[str]) -> Any:
    decode = [(i, n in JSON_COLUMNS, n in BOOL_COLUMNS) for i, n in enumerate(names)]

    def write(row: tuple[Any, ...]) -> None:
        obj: dict[str, Any] = {}
        for (i, is_json, is_bool), name in zip(decode, names, strict=True):
            value = row[i]
            if value is not None and is_json:
                value = json.loads(value)
            elif value is not None and is_bool:
                value = bool(value)
            obj[name] = value
        out.write(json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n")

    return write

"""Opening a recording read-only (history, export, replay): the DB file alone, no broker."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from urllib.parse import quote

from sqlite_utils import Database

from recorder.schema import COLUMNS


class RecordingError(ValueError):
    """A recording that cannot be read; the message says which file and why."""


def open_readonly(path: Path | str) -> Database:
    """The recording at ``path``, opened read-only; :class:`RecordingError` when it is
    missing or not a gpuheal recording (never creates a file)."""
    p = Path(path)
    if not p.exists():
        raise RecordingError(f"no such database: {p}")
    if not p.is_file():
        raise RecordingError(f"not a file: {p}")
    uri = f"file:{quote(str(p.resolve()))}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
        db = Database(conn)
        names = set(db.table_names())
    except sqlite3.DatabaseError as exc:
        raise RecordingError(f"cannot read {p}: {exc}") from None
    if "schema_version" not in names:
        conn.close()
        raise RecordingError(f"{p} is not a gpuheal recording (no schema_version table)")
    return db


def require_table(db: Database, table: str, path: Path | str) -> None:
    """:class:`RecordingError` unless ``table`` is a recorder table present in ``db``."""
    if table not in COLUMNS:
        raise RecordingError(f"unknown table {table!r}; tables: {', '.join(COLUMNS)}")
    if not db[table].exists():
        raise RecordingError(f"{path} has no table {table!r} (recorded by an older gpuheal; "
                             "run the recorder on it once to upgrade)")

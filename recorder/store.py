"""The recording: one SQLite file in WAL mode, written in batches, idempotently.

* :meth:`Store.write` stores a batch of records in one transaction. Rows whose key is
  already there are ignored (``INSERT OR IGNORE`` on the unique keys of ``schema``), so a
  redelivered message is never doubled; ``states`` and ``healer_states`` keep the latest
  row per GPU/host (an older ``ts`` never overwrites a newer one); ``component_status``
  records transitions only (a retained ``online`` seen again on reconnect is not a row).
* A locked or full disk raises :class:`sqlite3.OperationalError` out of ``write`` with
  nothing committed; the caller keeps the batch and retries.
* :meth:`Store.fold_samples` folds raw samples older than a cut-off into 1-minute
  min/avg/max aggregates and deletes them, in chunks of one hour of data.
"""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from gpuheal.records import AGGREGATED_METRICS
from recorder.rows import Record
from recorder.schema import COLUMNS, migrate

FOLD_CHUNK_S = 3600.0
"""Seconds of sample time folded per transaction (keeps the write lock short)."""

_LATEST_TABLES = {"states": ("host", "gpu"), "healer_states": ("host",)}


def _insert_sql(table: str) -> str:
    cols = COLUMNS[table]
    names = ", ".join(f'"{c}"' for c in cols)
    marks = ", ".join("?" for _ in cols)
    return f'INSERT OR IGNORE INTO "{table}" ({names}) VALUES ({marks})'


def _latest_sql(table: str, key: Sequence[str]) -> str:
    """Upsert that keeps the row with the newest ``ts``."""
    cols = COLUMNS[table]
    names = ", ".join(f'"{c}"' for c in cols)
    marks = ", ".join("?" for _ in cols)
    sets = ", ".join(f'"{c}" = excluded."{c}"' for c in cols if c not in key)
    conflict = ", ".join(f'"{c}"' for c in key)
    return (f'INSERT INTO "{table}" ({names}) VALUES ({marks}) '
            f'ON CONFLICT ({conflict}) DO UPDATE SET {sets} WHERE excluded.ts >= "{table}".ts')


_SQL: dict[str, str] = {
    t: (_latest_sql(t, _LATEST_TABLES[t]) if t in _LATEST_TABLES else _insert_sql(t))
    for t in COLUMNS if t != "sample_aggregates"
}


_ROW_TUPLE: dict[str, Callable[[dict[str, Any]], tuple[Any, ...]]] = {
    t: itemgetter(*cols) for t, cols in COLUMNS.items()
}
"""Row dict → the tuple of the table's columns, in order."""


@dataclass(frozen=True)
class FoldResult:
    """What one retention pass did."""

    samples_folded: int
    aggregate_rows: int


class Store:
    """An open recording (one connection; use it from one thread at a time)."""

    def __init__(self, path: Path | str, *, busy_timeout_s: float = 1.0,
                 synchronous: str = "FULL") -> None:
        self.path = Path(path)
        conn = sqlite3.connect(str(self.path), timeout=busy_timeout_s, check_same_thread=False)
        self.db = Database(conn)
        try:
            self.db.enable_wal()
            self.db.execute(f"PRAGMA synchronous={_synchronous(synchronous)}")
            self.migrated = migrate(self.db)
            self._last_status = self._load_last_status()
        except BaseException:
            conn.close()
            raise

    def close(self) -> None:
        self.db.close()

    # --- writing -------------------------------------------------------------------------
    def write(self, records: Iterable[Record]) -> int:
        """Store ``records`` in one transaction; return rows changed (duplicates excluded)."""
        by_table: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
        status = dict(self._last_status)
        for rec in records:
            if rec.table == "component_status":
                key = (rec.row["host"], rec.row["component"])
                if status.get(key) == rec.row["status"]:
                    continue
                status[key] = rec.row["status"]
            by_table[rec.table].append(_ROW_TUPLE[rec.table](rec.row))
        changed = 0
        conn = self.db.conn
        with self.db.atomic():
            for table, rows in by_table.items():
                before = conn.total_changes
                conn.executemany(_SQL[table], rows)
                changed += conn.total_changes - before
        self._last_status = status
        return changed

    def _load_last_status(self) -> dict[tuple[str, str], str]:
        rows = self.db.execute(
            "SELECT host, component, status FROM component_status WHERE id IN "
            "(SELECT MAX(id) FROM component_status GROUP BY host, component)").fetchall()
        return {(h, c): s for h, c, s in rows}

    # --- retention -----------------------------------------------------------------------
    def fold_samples(self, cutoff_ts: float, chunk_s: float = FOLD_CHUNK_S) -> FoldResult:
        """Fold raw samples with ``ts`` before ``cutoff_ts`` (rounded down to the minute)
        into ``sample_aggregates``, then delete them; one transaction per chunk of time."""
        cutoff = (int(cutoff_ts) // 60) * 60
        folded = aggregates = 0
        while True:
            first = self.db.execute("SELECT MIN(ts) FROM samples WHERE ts < ?",
                                    [cutoff]).fetchone()[0]
            if first is None:
                break
            lo = (int(first) // 60) * 60
            hi = min(cutoff, lo + max(60, int(chunk_s) // 60 * 60))
            with self.db.atomic():
                for metric in AGGREGATED_METRICS:
                    aggregates += self.db.execute(_fold_sql(metric), [metric, lo, hi]).rowcount
                folded += self.db.execute("DELETE FROM samples WHERE ts >= ? AND ts < ?",
                                          [lo, hi]).rowcount
        return FoldResult(folded, aggregates)

    # --- reading (tests, bench) ----------------------------------------------------------
    def count(self, table: str) -> int:
        return int(self.db.execute(f'SELECT COUNT(*) FROM "{_table(table)}"').fetchone()[0])


def _fold_sql(metric: str) -> str:
    if metric not in AGGREGATED_METRICS:
        raise ValueError(f"not an aggregated metric: {metric}")
    return (
        "INSERT INTO sample_aggregates (host, gpu, minute_ts, metric, n, min, avg, max) "
        f"SELECT host, gpu, CAST(ts / 60 AS INTEGER) * 60 AS m, ?, COUNT({metric}), "
        f"MIN({metric}), AVG({metric}), MAX({metric}) FROM samples "
        f"WHERE ts >= ? AND ts < ? AND {metric} IS NOT NULL GROUP BY host, gpu, m "
        "ON CONFLICT (host, gpu, minute_ts, metric) DO UPDATE SET "
        "n = sample_aggregates.n + excluded.n, "
        "min = MIN(sample_aggregates.min, excluded.min), "
        "max = MAX(sample_aggregates.max, excluded.max), "
        "avg = (sample_aggregates.avg * sample_aggregates.n + excluded.avg * excluded.n) "
        "/ (sample_aggregates.n + excluded.n)"
    )


def _table(name: str) -> str:
    if name not in COLUMNS:
        raise ValueError(f"unknown table {name!r}; tables: {', '.join(COLUMNS)}")
    return name


def _synchronous(value: str) -> str:
    value = value.upper()
    if value not in ("NORMAL", "FULL", "EXTRA"):
        raise ValueError(f"synchronous must be NORMAL, FULL or EXTRA, got {value!r}")
    return value

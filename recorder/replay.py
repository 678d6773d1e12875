"""Recorded samples back as :class:`Sample` messages, in time order, for ``gpuheal replay``.

The CLI feeds :func:`read_samples` into the publisher's replay source, which republishes
them with their original spacing (``--speed X`` faster, ``--host-name NEW`` rewritten).
Only raw samples replay; those already folded into 1-minute aggregates by retention do not.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from gpuheal.models import Sample
from gpuheal.records import sample_from_row
from recorder.dbfile import open_readonly, require_table


def _where(host: str | None, gpu: int | None, since_ts: float | None,
           until_ts: float | None) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    for clause, value in (("host = ?", host), ("gpu = ?", gpu), ("ts >= ?", since_ts),
                          ("ts < ?", until_ts)):
        if value is not None:
            clauses.append(clause)
            params.append(value)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def _open(db: Path | str) -> Database:
    database = open_readonly(db)
    try:
        require_table(database, "samples", db)
    except ValueError:
        database.close()
        raise
    return database


def recorded_hosts(db: Path | str, host: str | None = None) -> list[str]:
    """The hosts with raw samples in ``db`` (just ``host`` when it has some)."""
    database = _open(db)
    try:
        where, params = _where(host, None, None, None)
        return [row[0] for row in database.execute(
            f"SELECT DISTINCT host FROM samples{where} ORDER BY host", params)]
    finally:
        database.close()


def count_samples(db: Path | str, host: str | None = None, gpu: int | None = None,
                  since_ts: float | None = None, until_ts: float | None = None) -> int:
    """How many samples :func:`read_samples` yields with the same filters."""
    database = _open(db)
    try:
        where, params = _where(host, gpu, since_ts, until_ts)
        return int(database.execute(f"SELECT COUNT(*) FROM samples{where}", params)
                   .fetchone()[0])
    finally:
        database.close()


def read_samples(db: Path | str, host: str | None = None, gpu: int | None = None,
                 since_ts: float | None = None, until_ts: float | None = None,
                 ) -> Iterator[Sample]:
    """Recorded samples with ``since_ts <= ts < until_ts`` (UNIX seconds), in ``ts`` order
    (ties by host, GPU, seq). Opens the file at once: a missing or foreign file raises
    :class:`recorder.dbfile.RecordingError` here, not on the first ``next()``."""
    database = _open(db)
    where, params = _where(host, gpu, since_ts, until_ts)
    sql = f"SELECT * FROM samples{where} ORDER BY ts, host, gpu, seq"
    return _iterate(database, sql, params)


def _iterate(database: Database, sql: str, params: list[Any]) -> Iterator[Sample]:
    try:
        cursor = database.execute(sql, params)
        names = [d[0] for d in cursor.description]
        for row in cursor:
            yield sample_from_row(dict(zip(names, row, strict=True)))
    finally:
        database.close()

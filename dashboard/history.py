"""Read-only queries of the recorder's SQLite file: events, actions, per-GPU history.

Every query opens the file anew, read-only (``mode=ro``, ``PRAGMA query_only``), with a short
busy timeout and a deadline, so a missing, locked, replaced or half-written file costs one
answer (:class:`HistoryUnavailable`, HTTP 503 with the reason), never the live side. The
tables and columns are the recorder's (:data:`gpuheal.records.TABLES`); rows come back as the
messages they recorded.

History (:meth:`History.series`) is downsampled in SQL to at most :data:`MAX_POINTS` points
per series: the window is cut into equal buckets and each bucket's samples averaged. Samples
the recorder already folded into 1-minute aggregates (``sample_aggregates``) count with their
sample count, so a long window past the raw retention still charts.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from gpuheal.records import AGGREGATED_METRICS, TABLES, decode_value

MAX_POINTS = 1000
"""Most points one history series has."""
SERIES_METRICS: tuple[str, ...] = AGGREGATED_METRICS
"""Sample fields a history holds (the ones the recorder keeps as 1-minute aggregates too)."""
BUSY_TIMEOUT_S = 1.0
QUERY_DEADLINE_S = 5.0
EVENT_FILTERS: tuple[str, ...] = ("host", "gpu", "kind", "severity", "phase", "event_id")
ACTION_FILTERS: tuple[str, ...] = ("host", "gpu", "action", "status", "event_id")


class HistoryUnavailable(Exception):
    """The recording cannot answer now; the message says why (one line)."""


@dataclass(frozen=True)
class Page:
    """One page of rows, newest first, and how many match in all."""

    items: list[dict[str, Any]]
    total: int
    limit: int
    offset: int

    def as_json(self) -> dict[str, Any]:
        return {"items": self.items, "total": self.total, "limit": self.limit,
                "offset": self.offset}


class History:
    """The recording at ``path`` (None: the dashboard was started without ``--db``)."""

    def __init__(self, path: Path | None, busy_timeout_s: float = BUSY_TIMEOUT_S,
                 deadline_s: float = QUERY_DEADLINE_S,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.busy_timeout_s = busy_timeout_s
        self.deadline_s = deadline_s
        self.clock = clock

    # --- connection ---------------------------------------------------------------------
    @contextmanager
    def _connect(self, *tables: str) -> Iterator[sqlite3.Connection]:
        if self.path is None:
            raise HistoryUnavailable("no database: start the dashboard with --db FILE (the "
                                     "recorder's) for history, events and actions")
        if not self.path.is_file():
            raise HistoryUnavailable(f"no database at {self.path} (does the recorder run "
                                     f"with --db {self.path}?)")
        uri = f"file:{quote(str(self.path.resolve()))}?mode=ro"
        try:
            con = sqlite3.connect(uri, uri=True, timeout=self.busy_timeout_s,
                                  check_same_thread=False)
        except sqlite3.Error as exc:
            raise HistoryUnavailable(f"cannot open {self.path}: {exc}") from None
        deadline = time.monotonic() + self.deadline_s
        con.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
        try:
            con.execute("PRAGMA query_only = ON")
            present = {r[0] for r in con.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            missing = [t for t in tables if t not in present]
            if missing:
                raise HistoryUnavailable(f"{self.path} is not a gpuheal recording (no "
                                         f"{missing[0]} table)")
            yield con
        except sqlite3.OperationalError as exc:
            text = str(exc)
            if "locked" in text or "busy" in text:
                raise HistoryUnavailable(f"{self.path} is busy (locked by a writer): try "
                                         "again") from None
            if "interrupted" in text:
                raise HistoryUnavailable(f"the query took longer than {self.deadline_s:g} s; "
                                         "narrow it (since, host, gpu)") from None
            raise HistoryUnavailable(f"cannot read {self.path}: {text}") from None
        except sqlite3.DatabaseError as exc:
            raise HistoryUnavailable(f"cannot read {self.path}: {exc}") from None
        finally:
            con.close()

    # --- events and actions ---------------------------------------------------------------
    def events(self, filters: dict[str, Any], since_s: float | None = None, limit: int = 100,
               offset: int = 0) -> Page:
        """Recorded Events, newest first; ``filters`` by :data:`EVENT_FILTERS`; ``since_s``:
        only those of the last so many seconds (of the wall clock)."""
        return self._page("events", EVENT_FILTERS, filters, since_s, limit, offset)

    def actions(self, filters: dict[str, Any], since_s: float | None = None, limit: int = 100,
                offset: int = 0) -> Page:
        """Recorded Action messages, newest first; ``filters`` by :data:`ACTION_FILTERS`."""
        return self._page("actions", ACTION_FILTERS, filters, since_s, limit, offset)

    def _page(self, table: str, allowed: tuple[str, ...], filters: dict[str, Any],
              since_s: float | None, limit: int, offset: int) -> Page:
        clauses: list[str] = []
        params: list[Any] = []
        for name in allowed:
            value = filters.get(name)
            if value is not None:
                clauses.append(f'"{name}" = ?')
                params.append(value)
        if since_s is not None:
            clauses.append("ts >= ?")
            params.append(self.clock() - since_s)
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        spec = TABLES[table]
        with self._connect(table) as con:
            total = con.execute(f'SELECT COUNT(*) FROM "{table}"{where}', params).fetchone()[0]
            cursor = con.execute(f'SELECT * FROM "{table}"{where} ORDER BY ts DESC, id DESC '
                                 "LIMIT ? OFFSET ?", [*params, limit, offset])
            names = [d[0] for d in cursor.description]
            rows = [dict(zip(names, r, strict=True)) for r in cursor]
        items = []
        for row in rows:
            try:
                items.append(spec.message(row).model_dump(mode="json"))
            except ValueError:  # a row this version cannot read as a message: show it as is
                items.append({c.name: decode_value(c, row.get(c.name)) for c in spec.columns})
        return Page(items, int(total), limit, offset)

    # --- per-GPU history --------------------------------------------------------------------
    def series(self, host: str, gpu: int, since_s: float, points: int = MAX_POINTS,
               metrics: tuple[str, ...] = SERIES_METRICS) -> dict[str, Any]:
        """The GPU's readings over the last ``since_s`` seconds of its recorded time (ending
        at its newest sample: a sped-up simulation or a replay charts its own clock), at most
        ``points`` bucket averages per metric; ``ts`` holds each bucket's middle."""
        points = max(1, min(points, MAX_POINTS))
        unknown = [m for m in metrics if m not in SERIES_METRICS]
        if unknown:
            raise ValueError(f"unknown metric {unknown[0]!r}; known: {', '.join(SERIES_METRICS)}")
        with self._connect("samples") as con:
            has_aggregates = con.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = "
                "'sample_aggregates'").fetchone() is not None
            end = con.execute("SELECT MAX(ts) FROM samples WHERE host = ? AND gpu = ?",
                              (host, gpu)).fetchone()[0]
            if has_aggregates:
                folded_end = con.execute(
                    "SELECT MAX(minute_ts) + 60 FROM sample_aggregates WHERE host = ? AND "
                    "gpu = ?", (host, gpu)).fetchone()[0]
                if folded_end is not None and (end is None or folded_end > end):
                    end = float(folded_end)
            result: dict[str, Any] = {"host": host, "index": gpu, "since_s": since_s,
                                      "start_ts": None, "end_ts": None, "bucket_s": None,
                                      "points": 0,
                                      "series": {"ts": [], **{m: [] for m in metrics}}}
            if end is None:
                return result
            start = end - since_s
            bucket = since_s / points
            sums: dict[int, dict[str, list[float]]] = {}
            raw = con.execute(
                "SELECT MIN(CAST((ts - ?) / ? AS INTEGER), ?) AS b, "
                + ", ".join(f'SUM("{m}"), COUNT("{m}")' for m in metrics)
                + " FROM samples WHERE host = ? AND gpu = ? AND ts >= ? AND ts <= ? "
                "GROUP BY b", (start, bucket, points - 1, host, gpu, start, end))
            for row in raw:
                acc = sums.setdefault(int(row[0]), {m: [0.0, 0.0] for m in metrics})
                for i, m in enumerate(metrics):
                    if row[2 + 2 * i]:
                        acc[m][0] += row[1 + 2 * i]
                        acc[m][1] += row[2 + 2 * i]
            if has_aggregates:
                marks = ", ".join("?" for _ in metrics)
                folded = con.execute(
                    "SELECT minute_ts, metric, n, avg FROM sample_aggregates WHERE host = ? "
                    f"AND gpu = ? AND minute_ts + 30 >= ? AND minute_ts + 30 <= ? AND metric "
                    f"IN ({marks})", (host, gpu, start, end, *metrics))
                for minute_ts, metric, n, avg in folded:
                    if avg is None or not n:
                        continue
                    b = min(int((minute_ts + 30 - start) / bucket), points - 1)
                    acc = sums.setdefault(b, {m: [0.0, 0.0] for m in metrics})
                    acc[metric][0] += avg * n
                    acc[metric][1] += n
        series: dict[str, list[Any]] = {"ts": [], **{m: [] for m in metrics}}
        for b in sorted(sums):
            series["ts"].append(round(start + (b + 0.5) * bucket, 3))
            for m in metrics:
                total, n = sums[b][m]
                series[m].append(round(total / n, 3) if n else None)
        result.update(start_ts=start, end_ts=end, bucket_s=bucket, points=len(series["ts"]),
                      series=series)
        return result

"""``gpuheal history``: recorded incidents, and with ``--events`` every event and action.

By default one line per incident (one condition, one ``event_id``): when it started, the GPU,
the kind, its peak severity, how long it lasted (or that it is still open), the actions taken
with their outcomes, and whether a person is still needed (a condition the healer handed over
that has neither recovered nor been acknowledged).

With ``--events``, each event row (raised, escalated, cleared) is followed by the actions of
the same ``event_id`` that happened after it and before the event's next row, indented, so an
incident reads top to bottom. Actions before ``--since`` are left out; those whose event is not in
the selection (no event id, or an event before ``--since``) follow at the end (not with
``--kind``: they have none).
Times are UTC.
"""

from __future__ import annotations

import sys
from bisect import bisect_right
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from gpuheal.models import iso_utc
from gpuheal.timespec import since_ts
from recorder.dbfile import open_readonly, require_table

EVENT_HEADERS = ("TIME (UTC)", "HOST", "GPU", "KIND", "SEVERITY", "PHASE", "MESSAGE")
ACTION_INDENT = "    -> "


@dataclass(frozen=True)
class Filters:
    host: str | None = None
    gpu: int | None = None
    since_ts: float | None = None
    kind: str | None = None

    def where(self, with_kind: bool = True) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        for clause, value in (("host = ?", self.host), ("gpu = ?", self.gpu),
                              ("ts >= ?", self.since_ts),
                              ("kind = ?", self.kind if with_kind else None)):
            if value is not None:
                clauses.append(clause)
                params.append(value)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in (("host", self.host), ("gpu", self.gpu),
                                          ("kind", self.kind)) if v is not None]
        if self.since_ts is not None:
            parts.append(f"since {iso_utc(self.since_ts)}")
        return ", ".join(parts) or "all"


def run_history(db: Path | str, host: str | None = None, gpu: int | None = None,
                since: str | None = None, kind: str | None = None,
                out: TextIO = sys.stdout, err: TextIO | None = None,
                now: float | None = None, incidents: bool = True) -> int:
    """Print the history table; 0 on success, 2 (reason on stderr) when the file is missing
    or not a recording, or ``since`` is not a duration (``30s``, ``15m``, ``1h``, ``2d``)."""
    err = err if err is not None else sys.stderr
    try:
        filters = Filters(host, gpu, since_ts(since, now), kind)
        database = open_readonly(db)
    except ValueError as exc:
        print(f"gpuheal history: {exc}", file=err)
        return 2
    try:
        for table in ("events", "actions"):
            require_table(database, table, db)
        events, actions, orphans = _select(database, filters)
    except ValueError as exc:
        print(f"gpuheal history: {exc}", file=err)
        return 2
    finally:
        database.close()
    out.write(render_incidents(events, actions, filters) if incidents
              else render(events, actions, orphans, filters))
    return 0


def _rows(database: Any, sql: str, params: list[Any]) -> list[dict[str, Any]]:
    cursor = database.execute(sql, params)
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor]


def _select(database: Any, f: Filters) -> tuple[list[dict[str, Any]],
                                                dict[str, list[dict[str, Any]]],
                                                list[dict[str, Any]]]:
    where, params = f.where()
    events = _rows(database, f"SELECT * FROM events{where} ORDER BY ts, id", params)
    actions: dict[str, list[dict[str, Any]]] = defaultdict(list)
    since, since_params = ("", []) if f.since_ts is None else (" AND ts >= ?", [f.since_ts])
    for a in _rows(database,
                   f"SELECT * FROM actions WHERE event_id IN (SELECT event_id FROM events"
                   f"{where}){since} ORDER BY ts, id", params + since_params):
        actions[a["event_id"]].append(a)
    orphans: list[dict[str, Any]] = []
    if f.kind is None:
        where_a, params_a = f.where(with_kind=False)
        glue = " AND " if where_a else " WHERE "
        orphans = _rows(
            database,
            f"SELECT * FROM actions{where_a}{glue}(event_id IS NULL OR event_id NOT IN "
            f"(SELECT event_id FROM events{where})) ORDER BY ts, id", params_a + params)
    return events, actions, orphans


def render(events: list[dict[str, Any]], actions: dict[str, list[dict[str, Any]]],
           orphans: list[dict[str, Any]], filters: Filters) -> str:
    """The history as aligned text."""
    if not events and not orphans:
        return f"no events recorded ({filters.describe()})\n"
    cells = [(iso_utc(e["ts"]), e["host"], str(e["gpu"]), e["kind"], e["severity"],
              e["phase"], _one_line(e["message"])) for e in events]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(EVENT_HEADERS)]
    lines = [_join(EVENT_HEADERS, widths)] if events else []

    # each action goes under the last row of its event at or before the action's time
    rows_of: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(events):
        rows_of[e["event_id"]].append(i)
    under: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for event_id, acts in actions.items():
        idx = rows_of.get(event_id)
        if not idx:
            continue
        times = [events[i]["ts"] for i in idx]
        for a in acts:
            pos = bisect_right(times, a["ts"]) - 1
            under[idx[max(pos, 0)]].append(a)

    for i, row in enumerate(cells):
        lines.append(_join(row, widths))
        lines.extend(ACTION_INDENT + line for line in _action_lines(under.get(i, [])))
    if orphans:
        lines.append("")
        lines.append("actions without a recorded event in this selection:")
        lines.extend(ACTION_INDENT + line for line in _action_lines(orphans, with_gpu=True))
    return "\n".join(lines) + "\n"


FINAL = ("verified", "unresolved", "failed", "skipped", "dry_run", "acknowledged")
HANDED_OVER = ("needs_human", "not_opted_in", "ladder_exhausted", "held_back_too_long")
"""Skip reasons that leave a condition to a person."""
INCIDENT_HEADERS = ("STARTED (UTC)", "HOST/GPU", "KIND", "PEAK", "DURATION", "ACTIONS", "")


@dataclass
class IncidentLine:
    """One incident as the history tells it."""

    started_ts: float
    host: str
    gpu: int
    kind: str
    peak: str
    ended_ts: float | None
    cleared_by: str | None
    outcomes: list[str]
    person: str
    """``PERSON NEEDED``, ``taken over by a person``, or empty."""


def incidents(events: list[dict[str, Any]],
              actions: dict[str, list[dict[str, Any]]]) -> list[IncidentLine]:
    """The incidents of ``events`` (ordered by time) with their actions' final outcomes."""
    by_id: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        by_id[e["event_id"]].append(e)
    out = []
    rank = {"warning": 1, "critical": 2, "emergency": 3}
    for event_id, evs in by_id.items():
        first = evs[0]
        cleared = next((e for e in evs if e["phase"] == "cleared"), None)
        acts = actions.get(event_id, [])
        final: dict[str, dict[str, Any]] = {}
        order: list[str] = []
        for a in acts:  # the last word on each action (its life is several messages)
            if a["action_id"] not in final:
                order.append(a["action_id"])
            previous = final.get(a["action_id"])
            if previous is None or previous["status"] not in FINAL or a["status"] in FINAL:
                final[a["action_id"]] = a
        outcomes = []
        for action_id in order:
            a = final[action_id]
            status = a["status"] if a["status"] in FINAL else "running"
            text = f"{a['action']} {status}"
            if a.get("reason") and status in ("skipped", "failed", "unresolved"):
                text += f" ({_one_line(a['reason'])})"
            outcomes.append(text)
        acknowledged = any(a["status"] == "acknowledged" for a in acts)
        handed = any(a["status"] == "skipped" and a.get("reason") in HANDED_OVER for a in acts)
        person = ""
        if acknowledged:
            person = "taken over by a person"
        elif handed and cleared is None:
            person = "PERSON NEEDED"
        out.append(IncidentLine(
            started_ts=first["started_ts"] or first["ts"], host=first["host"], gpu=first["gpu"],
            kind=first["kind"], peak=max((e["severity"] for e in evs), key=lambda s: rank[s]),
            ended_ts=cleared["ts"] if cleared else None,
            cleared_by=cleared.get("cleared_by") if cleared else None,
            outcomes=[o for o in outcomes if not o.startswith("notify acknowledged")],
            person=person))
    return sorted(out, key=lambda i: i.started_ts)


def render_incidents(events: list[dict[str, Any]], actions: dict[str, list[dict[str, Any]]],
                     filters: Filters) -> str:
    """One line per incident, aligned."""
    found = incidents(events, actions)
    if not found:
        return f"no incidents recorded ({filters.describe()})\n"
    rows = []
    for i in found:
        if i.ended_ts is None:
            duration = "open"
        else:
            duration = _duration(i.ended_ts - i.started_ts)
            if i.cleared_by and i.cleared_by != "recovered":
                duration += f" ({i.cleared_by})"
        rows.append((iso_utc(i.started_ts), f"{i.host}/{i.gpu}", i.kind, i.peak, duration,
                     ", ".join(i.outcomes) or "-", i.person))
    widths = [max(len(INCIDENT_HEADERS[c]), *(len(r[c]) for r in rows))
              for c in range(len(INCIDENT_HEADERS))]
    lines = [_join(INCIDENT_HEADERS, widths).rstrip()]
    lines += [_join(r, widths).rstrip() for r in rows]
    return "\n".join(lines) + "\n"


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"
    return f"{seconds // 3600:.0f}h{(seconds % 3600) // 60:02.0f}m"


def _action_lines(acts: list[dict[str, Any]], with_gpu: bool = False) -> list[str]:
    if not acts:
        return []
    cells = []
    for a in acts:
        extra = [f"attempt {a['attempt']}"]
        if a.get("duration_s") is not None:
            extra.append(f"{a['duration_s']:.1f} s")
        if a.get("reason"):
            extra.append(_one_line(a["reason"]))
        head = [iso_utc(a["ts"])]
        if with_gpu:
            head += [a["host"], str(a["gpu"])]
        cells.append((*head, a["action"], a["status"], "  ".join(extra)))
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
    return [_join(c, widths) for c in cells]


def _join(cells: tuple[str, ...], widths: list[int]) -> str:
    *head, last = cells
    return "  ".join(c.ljust(w) for c, w in zip(head, widths, strict=False)) + "  " + last


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split())

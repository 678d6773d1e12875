"""Tables of a recording and the numbered migrations that build them.

A recording carries its schema version in ``schema_version`` (one row per applied
migration). Opening a file of an older version applies the missing migrations in order,
each in its own transaction; a file of a newer version than this code knows is refused.

Column ``gpu`` holds a message's ``index`` (``index`` is an SQL keyword). Lists and
objects (``processes``, ``throttle_reasons``, ``xids``, ``evidence``, ``detail``,
``active``, ``cooldowns``, ``throttled``) are stored as compact JSON text; a missing
value is NULL. Timestamps (``*ts``) are UNIX seconds; ``received_ts`` is the recorder's
clock, every other ``ts`` the source's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlite_utils import Database

SAMPLE_COLUMNS: tuple[str, ...] = (
    "host", "gpu", "seq", "ts", "uuid", "name", "source",
    "temperature_c", "utilization_pct", "memory_used_mb", "memory_total_mb",
    "power_draw_w", "power_limit_w", "sm_clock_mhz", "mem_clock_mhz", "fan_pct",
    "throttle_reasons", "xids", "ecc_uncorrected", "remapped_rows_pending", "processes",
    "available", "error", "received_ts",
)
STATE_COLUMNS: tuple[str, ...] = (
    "host", "gpu", "uuid", "name", "health", "error", "error_message",
    "temperature", "utilization", "memory_used_mb", "memory_total_mb", "memory_percent",
    "power_draw_w", "power_limit_w", "graphics_mhz", "memory_mhz", "fan_speed",
    "timestamp", "ts", "active", "analyzer_started_ts", "received_ts",
)
EVENT_COLUMNS: tuple[str, ...] = (
    "event_id", "phase", "severity", "host", "gpu", "kind", "started_ts", "ts",
    "message", "evidence", "recommended_action", "received_ts",
)
ACTION_COLUMNS: tuple[str, ...] = (
    "action_id", "status", "event_id", "host", "gpu", "action", "reason", "attempt",
    "ts", "duration_s", "detail", "received_ts",
)
STATUS_COLUMNS: tuple[str, ...] = ("host", "component", "status", "ts")
DEADLETTER_COLUMNS: tuple[str, ...] = ("component", "topic", "reason", "payload", "ts")
HEALER_STATE_COLUMNS: tuple[str, ...] = (
    "host", "enabled", "dry_run", "breaker_open", "breaker_reason", "unresolved_count",
    "budget_left", "budget_per_hour", "cooldowns", "throttled", "ts", "received_ts",
)
AGGREGATE_COLUMNS: tuple[str, ...] = (
    "host", "gpu", "minute_ts", "metric", "n", "min", "avg", "max",
)

COLUMNS: dict[str, tuple[str, ...]] = {
    "samples": SAMPLE_COLUMNS,
    "states": STATE_COLUMNS,
    "events": EVENT_COLUMNS,
    "actions": ACTION_COLUMNS,
    "component_status": STATUS_COLUMNS,
    "deadletter": DEADLETTER_COLUMNS,
    "healer_states": HEALER_STATE_COLUMNS,
    "sample_aggregates": AGGREGATE_COLUMNS,
}
"""Every table a recording holds, with the columns the recorder writes."""

JSON_COLUMNS: frozenset[str] = frozenset({
    "throttle_reasons", "xids", "processes", "evidence", "detail", "active",
    "cooldowns", "throttled",
})
"""Columns holding JSON text (decoded again by ``export --format jsonl`` and replay)."""

BOOL_COLUMNS: frozenset[str] = frozenset({
    "remapped_rows_pending", "available", "enabled", "dry_run", "breaker_open",
})
"""Columns holding booleans as 0/1 (``true``/``false`` again in JSON lines)."""

TIME_COLUMN: dict[str, str] = {t: "ts" for t in COLUMNS} | {"sample_aggregates": "minute_ts"}
"""The column ``--since`` filters on, per table."""

AGGREGATED_METRICS: tuple[str, ...] = (
    "temperature_c", "utilization_pct", "memory_used_mb", "power_draw_w",
)
"""Sample fields kept as 1-minute min/avg/max once raw samples pass retention."""

_REAL = float
_INT = int
_TEXT = str


def _migrate_1_initial(db: Database) -> None:
    """The first schema: raw tables and the keys that make redelivery idempotent."""
    samples = {c: _REAL for c in SAMPLE_COLUMNS}
    samples |= {"host": _TEXT, "gpu": _INT, "seq": _INT, "uuid": _TEXT, "name": _TEXT,
                "source": _TEXT, "throttle_reasons": _TEXT, "xids": _TEXT,
                "ecc_uncorrected": _INT, "remapped_rows_pending": _INT, "processes": _TEXT,
                "available": _INT, "error": _TEXT}
    db["samples"].create({"id": _INT} | samples, pk="id",
                         not_null=["host", "gpu", "seq", "ts", "source"])
    # the key doubles as the index of per-GPU time ranges (history, replay --host/--gpu)
    db["samples"].create_index(["host", "gpu", "ts", "seq"], "samples_key", unique=True)

    states = {c: _REAL for c in STATE_COLUMNS}
    states |= {"host": _TEXT, "gpu": _INT, "uuid": _TEXT, "name": _TEXT, "health": _TEXT,
               "error": _TEXT, "error_message": _TEXT, "timestamp": _TEXT, "active": _TEXT}
    db["states"].create(states, pk=("host", "gpu"), not_null=["health", "ts"])

    events = {c: _TEXT for c in EVENT_COLUMNS}
    events |= {"gpu": _INT, "started_ts": _REAL, "ts": _REAL, "received_ts": _REAL}
    db["events"].create({"id": _INT} | events, pk="id",
                        not_null=["event_id", "phase", "severity", "host", "gpu", "kind", "ts"])
    db["events"].create_index(["event_id", "phase", "severity"], "events_key", unique=True)

    actions = {c: _TEXT for c in ACTION_COLUMNS}
    actions |= {"gpu": _INT, "attempt": _INT, "ts": _REAL, "duration_s": _REAL,
                "received_ts": _REAL}
    db["actions"].create({"id": _INT} | actions, pk="id",
                         not_null=["action_id", "status", "host", "gpu", "action", "ts"])
    db["actions"].create_index(["action_id", "status"], "actions_key", unique=True)

    db["component_status"].create(
        {"id": _INT, "host": _TEXT, "component": _TEXT, "status": _TEXT, "ts": _REAL},
        pk="id", not_null=["host", "component", "status", "ts"])

    db["deadletter"].create(
        {"id": _INT, "component": _TEXT, "topic": _TEXT, "reason": _TEXT, "payload": _TEXT,
         "ts": _REAL}, pk="id", not_null=["reason", "ts"])
    db["deadletter"].create_index(["component", "topic", "reason", "ts"], "deadletter_key",
                                  unique=True)


def _migrate_2_aggregates_and_history_indexes(db: Database) -> None:
    """1-minute aggregates for retention, and indexes for history/export/replay queries."""
    db["sample_aggregates"].create(
        {"host": _TEXT, "gpu": _INT, "minute_ts": _INT, "metric": _TEXT, "n": _INT,
         "min": _REAL, "avg": _REAL, "max": _REAL},
        pk=("host", "gpu", "minute_ts", "metric"))
    db["sample_aggregates"].create_index(["minute_ts"], "sample_aggregates_minute")
    db["samples"].create_index(["ts"], "samples_ts")
    db["events"].create_index(["ts"], "events_ts")
    db["events"].create_index(["host", "gpu", "ts"], "events_host_gpu_ts")
    db["actions"].create_index(["event_id"], "actions_event")
    db["actions"].create_index(["ts"], "actions_ts")
    db["component_status"].create_index(["host", "component", "id"], "component_status_latest")
    db["deadletter"].create_index(["ts"], "deadletter_ts")


def _migrate_3_healer_states(db: Database) -> None:
    """The healer's retained guard state, latest per host."""
    cols = {c: _INT for c in HEALER_STATE_COLUMNS}
    cols |= {"host": _TEXT, "breaker_reason": _TEXT, "cooldowns": _TEXT, "throttled": _TEXT,
             "ts": _REAL, "received_ts": _REAL}
    db["healer_states"].create(cols, pk="host", not_null=["ts"])


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    apply: Callable[[Database], None]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial", _migrate_1_initial),
    Migration(2, "aggregates and history indexes", _migrate_2_aggregates_and_history_indexes),
    Migration(3, "healer states", _migrate_3_healer_states),
)
SCHEMA_VERSION = MIGRATIONS[-1].version


class SchemaError(RuntimeError):
    """A database this code cannot use (newer schema, not a recording)."""


def current_version(db: Database) -> int:
    """The schema version of ``db``; 0 for an empty file."""
    if not db["schema_version"].exists():
        if any(t in db.table_names() for t in COLUMNS):
            raise SchemaError("database has recorder tables but no schema_version table")
        return 0
    row = db.execute("SELECT MAX(version) FROM schema_version").fetchone()
    return int(row[0] or 0)


def migrate(db: Database, target: int = SCHEMA_VERSION) -> list[int]:
    """Apply the missing migrations up to ``target``, each atomically; return those applied."""
    version = current_version(db)
    if version > SCHEMA_VERSION:
        raise SchemaError(
            f"database schema version {version} is newer than this recorder's "
            f"({SCHEMA_VERSION}); upgrade gpuheal")
    if not db["schema_version"].exists():
        with db.atomic():
            db["schema_version"].create(
                {"version": _INT, "name": _TEXT, "applied_ts": _REAL}, pk="version")
    applied: list[int] = []
    for m in MIGRATIONS:
        if version < m.version <= target:
            with db.atomic():
                m.apply(db)
                db["schema_version"].insert(
                    {"version": m.version, "name": m.name, "applied_ts": time.time()})
            applied.append(m.version)
    return applied

"""Tables of a recording and the numbered migrations that build them.

A recording carries its schema version in ``schema_version`` (one row per applied
migration). Opening a file of an older version applies the missing migrations in order,
each in its own transaction; a file of a newer version than this code knows is refused.

The recorded tables and their columns follow the message models (:mod:`gpuheal.records`):
column ``gpu`` holds a message's ``index`` (an SQL keyword), lists and objects are compact
JSON text, a missing value is NULL. A field newer than the file gets its column when the file
is opened (:func:`add_new_columns`). Timestamps (``*ts``) are UNIX seconds; ``received_ts``
is the recorder's clock, every other ``ts`` the source's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlite_utils import Database

from gpuheal.records import TABLES

COLUMNS: dict[str, tuple[str, ...]] = {t: spec.names for t, spec in TABLES.items()} | {
    "sample_aggregates": ("host", "gpu", "minute_ts", "metric", "n", "min", "avg", "max"),
}
"""Every table a recording holds, with the columns the recorder writes (from the models:
:mod:`gpuheal.records`)."""

TIME_COLUMN: dict[str, str] = {t: "ts" for t in COLUMNS} | {"sample_aggregates": "minute_ts"}
"""The column ``--since`` filters on, per table."""


_INT = int
_TEXT = str
_REAL = float
_PY_TYPE = {"REAL": _REAL, "INTEGER": _INT, "TEXT": _TEXT}


def _columns(table: str) -> dict[str, type]:
    """Column → type of a recorded table, from its model."""
    return {c.name: _PY_TYPE[c.sql_type] for c in TABLES[table].columns}


def _migrate_1_initial(db: Database) -> None:
    """The first schema: raw tables and the keys that make redelivery idempotent."""
    db["samples"].create({"id": _INT} | _columns("samples"), pk="id",
                         not_null=["host", "gpu", "seq", "ts", "source"])
    # the key doubles as the index of per-GPU time ranges (history, replay --host/--gpu)
    db["samples"].create_index(["host", "gpu", "ts", "seq"], "samples_key", unique=True)

    db["states"].create(_columns("states"), pk=("host", "gpu"), not_null=["health", "ts"])

    db["events"].create({"id": _INT} | _columns("events"), pk="id",
                        not_null=["event_id", "phase", "severity", "host", "gpu", "kind", "ts"])
    db["events"].create_index(["event_id", "phase", "severity"], "events_key", unique=True)

    db["actions"].create({"id": _INT} | _columns("actions"), pk="id",
                         not_null=["action_id", "status", "host", "gpu", "action", "ts"])
    db["actions"].create_index(["action_id", "status"], "actions_key", unique=True)

    db["component_status"].create({"id": _INT} | _columns("component_status"),
                                  pk="id", not_null=["host", "component", "status", "ts"])

    db["deadletter"].create({"id": _INT} | _columns("deadletter"), pk="id",
                            not_null=["reason", "ts"])
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
    db["healer_states"].create(_columns("healer_states"), pk="host", not_null=["ts"])


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
    if target == SCHEMA_VERSION:
        add_new_columns(db)
    return applied


def add_new_columns(db: Database) -> list[str]:
    """Add the columns of model fields newer than the file (``table.column``, added)."""
    added: list[str] = []
    with db.atomic():
        for table, spec in TABLES.items():
            if not db[table].exists():
                continue
            have = set(db[table].columns_dict)
            for column in spec.columns:
                if column.name not in have:
                    db[table].add_column(column.name, _PY_TYPE[column.sql_type])
                    added.append(f"{table}.{column.name}")
    return added

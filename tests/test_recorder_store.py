"""Recorder store: idempotent batched writes, latest-wins tables, migrations, retention,
and a locked database (real SQLite files, no broker)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlite_utils import Database

from recorder.rows import Record, record_for
from recorder.schema import SCHEMA_VERSION, SchemaError, current_version, migrate
from recorder.store import Store
from tests.factories import (
    NOW,
    T,
    make_action,
    make_event,
    make_healer_state,
    make_sample,
    make_state,
)


def rec(topic: str, payload: bytes, received_ts: float = NOW) -> Record:
    r = record_for(T, topic, payload, received_ts)
    assert r is not None
    return r


@pytest.fixture
def store(tmp_path: Path):
    s = Store(tmp_path / "rec.db", busy_timeout_s=0.1)
    yield s
    s.close()


def test_new_file_is_wal_at_the_latest_schema(store: Store) -> None:
    assert store.db.journal_mode == "wal"
    assert current_version(store.db) == SCHEMA_VERSION
    assert store.migrated == list(range(1, SCHEMA_VERSION + 1))
    indexes = {i.name for t in ("samples", "events", "actions") for i in store.db[t].indexes}
    assert {"samples_key", "events_key", "actions_key", "samples_ts", "events_ts",
            "actions_event"} <= indexes


def test_duplicates_are_ignored_not_doubled(store: Store) -> None:
    e = make_event()
    batch = [
        rec(T.sample("h1", 0), make_sample(seq=1).to_json()),
        rec(T.event("h1", 0), e.to_json()),
        rec(T.action("h1", 0), make_action(e, "started").to_json()),
        rec(T.action("h1", 0), make_action(e, "succeeded").to_json()),
    ]
    assert store.write(batch) == 4
    assert store.write(batch + batch) == 0  # redelivered: nothing new
    # same keys, later receive time: still the same rows
    assert store.write([rec(T.event("h1", 0), e.to_json(), NOW + 99)]) == 0
    assert [store.count(t) for t in ("samples", "events", "actions")] == [1, 1, 2]
    # an escalation of the same event is a new row; so is the same seq at another ts
    store.write([rec(T.event("h1", 0), make_event(phase="escalated",
                                                  severity="critical").to_json()),
                 rec(T.sample("h1", 0), make_sample(seq=1, ts=NOW + 1).to_json())])
    assert store.count("events") == 2
    assert store.count("samples") == 2


def test_states_keep_the_newest_and_statuses_record_transitions(store: Store) -> None:
    store.write([rec(T.state("h1", 0), make_state(ts=NOW + 10, health="critical").to_json())])
    store.write([rec(T.state("h1", 0), make_state(ts=NOW, health="healthy").to_json())])
    assert store.db["states"].get(("h1", 0))["health"] == "critical"  # older never wins
    store.write([rec(T.state("h1", 0), make_state(ts=NOW + 20, health="warning").to_json())])
    assert store.db["states"].get(("h1", 0))["health"] == "warning"
    store.write([rec(T.healer_state("h1"), make_healer_state(ts=NOW).to_json())])
    assert store.db["healer_states"].get("h1")["budget_left"] == 5

    s = T.status("h1", "analyzer")
    store.write([rec(s, b"online"), rec(s, b"online", NOW + 1), rec(s, b"offline", NOW + 2)])
    store.write([rec(s, b"offline", NOW + 3), rec(s, b"online", NOW + 4)])
    rows = [r["status"] for r in store.db["component_status"].rows_where(order_by="id")]
    assert rows == ["online", "offline", "online"]


def test_status_transitions_survive_reopening(tmp_path: Path) -> None:
    s = T.status("h1", "healer")
    with_store = Store(tmp_path / "a.db")
    with_store.write([rec(s, b"online")])
    with_store.close()
    again = Store(tmp_path / "a.db")
    again.write([rec(s, b"online", NOW + 5)])  # retained copy after a restart
    assert again.count("component_status") == 1
    again.close()


def test_migration_from_version_1_keeps_rows_and_adds_tables(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old = Database(path)
    assert migrate(old, target=1) == [1]
    assert not old["sample_aggregates"].exists()
    e = make_event()
    old["events"].insert(rec(T.event("h1", 0), e.to_json()).row)
    old["samples"].insert(rec(T.sample("h1", 0), make_sample().to_json()).row)
    old.close()

    store = Store(path)
    assert store.migrated == [2, 3]
    assert current_version(store.db) == SCHEMA_VERSION
    assert store.db["sample_aggregates"].exists() and store.db["healer_states"].exists()
    assert store.count("events") == 1 and store.count("samples") == 1
    assert store.write([rec(T.event("h1", 0), e.to_json())]) == 0  # key still enforced
    store.close()
    assert Store(path).migrated == []  # opening again changes nothing


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    store = Store(tmp_path / "new.db")
    store.db["schema_version"].insert({"version": SCHEMA_VERSION + 1, "name": "future",
                                       "applied_ts": NOW})
    store.close()
    with pytest.raises(SchemaError, match="newer"):
        Store(tmp_path / "new.db")


def test_retention_folds_old_samples_into_minute_aggregates(store: Store) -> None:
    minute = 1_700_000_040.0  # a minute boundary
    rows = [
        rec(T.sample("h1", 0), make_sample(seq=i, ts=minute + i * 10,
                                           temperature_c=60.0 + i).to_json())
        for i in range(6)  # one full minute: 60..65 °C
    ]
    rows.append(rec(T.sample("h1", 0), make_sample(seq=6, ts=minute + 60,
                                                   temperature_c=None).to_json()))
    rows.append(rec(T.sample("h1", 0), make_sample(seq=7, ts=minute + 3 * 3600).to_json()))
    store.write(rows)

    result = store.fold_samples(cutoff_ts=minute + 2 * 3600 + 30)
    assert result.samples_folded == 7
    assert store.count("samples") == 1  # the recent one stays raw
    agg = {(r["minute_ts"], r["metric"]): r for r in store.db["sample_aggregates"].rows}
    t = agg[(int(minute), "temperature_c")]
    assert (t["n"], t["min"], t["avg"], t["max"]) == (6, 60.0, 62.5, 65.0)
    assert (int(minute) + 60, "temperature_c") not in agg  # None is not a reading
    assert agg[(int(minute) + 60, "power_draw_w")]["n"] == 1
    assert {m for _, m in agg} == {"temperature_c", "utilization_pct", "memory_used_mb",
                                   "power_draw_w"}

    # a late sample of an already folded minute merges into its aggregate
    store.write([rec(T.sample("h1", 0), make_sample(seq=99, ts=minute + 5,
                                                    temperature_c=71.0).to_json())])
    store.fold_samples(cutoff_ts=minute + 2 * 3600)
    t = store.db["sample_aggregates"].get(("h1", 0, int(minute), "temperature_c"))
    assert (t["n"], t["min"], t["max"]) == (7, 60.0, 71.0)
    assert t["avg"] == pytest.approx((60 + 61 + 62 + 63 + 64 + 65 + 71) / 7)
    assert store.count("events") == 0 and store.count("samples") == 1


def test_locked_database_raises_and_commits_nothing(store: Store) -> None:
    other = sqlite3.connect(store.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            store.write([rec(T.event("h1", 0), make_event().to_json())])
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert store.count("events") == 0
    assert store.write([rec(T.event("h1", 0), make_event().to_json())]) == 1


def test_full_disk_raises_and_commits_nothing(store: Store) -> None:
    """``max_page_count`` makes SQLite report SQLITE_FULL, as a full disk does."""
    pages = store.db.execute("PRAGMA page_count").fetchone()[0]
    store.db.execute(f"PRAGMA max_page_count = {pages}")
    big = [rec(T.sample("h1", 0), make_sample(seq=i, name="x" * 2000).to_json())
           for i in range(50)]
    with pytest.raises(sqlite3.OperationalError, match="full"):
        store.write(big)
    assert store.count("samples") == 0
    store.db.execute("PRAGMA max_page_count = 1073741823")
    assert store.write(big) == 50

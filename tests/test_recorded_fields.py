"""One source of truth per field: every model field is published, recorded, exported and
replayed, and a new Sample field is one edit in gpuheal/models.py."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from gpuheal.models import Action, Event, HealerState, Number, Sample, State, Timestamp
from gpuheal.records import FLATTEN, NOT_RECORDED, RENAMES, TABLES, table_spec
from gpuheal.topics import Topics
from gpuheal.wire import decode
from recorder.export import run_export
from recorder.replay import read_samples
from recorder.rows import record_for
from recorder.schema import migrate
from recorder.store import Store
from tests.factories import make_action, make_event, make_healer_state, make_sample, make_state

T = Topics("p")
NOW = 1_700_000_000.0


def _leaf_fields(model: type[BaseModel]) -> set[tuple[str, ...]]:
    """Every field of ``model``, nested models of FLATTEN spelled out."""
    out: set[tuple[str, ...]] = set()
    for name, info in model.model_fields.items():
        if name in NOT_RECORDED:
            continue
        nested = getattr(info.annotation, "model_fields", None)
        if nested and any(f == name for f, _ in FLATTEN):
            out |= {(name, sub) for sub in nested}
        else:
            out.add((name,))
    return out


@pytest.mark.parametrize("table", ["samples", "states", "events", "actions", "healer_states"])
def test_every_model_field_has_a_column(table: str) -> None:
    spec = TABLES[table]
    assert {c.path for c in spec.columns if c.path} == _leaf_fields(spec.model)
    for column in spec.columns:
        if column.path == ("index",):
            assert column.name == RENAMES["index"] == "gpu"


FULL_SAMPLE = make_sample(seq=3, xids=[13, 79], throttle_reasons=["sw_power_cap"],
                          ecc_uncorrected=2, remapped_rows_pending=True, host_boot_ts=NOW - 86_400,
                          processes=[{"pid": 42, "name": "ollama", "used_mb": 9000.0}],
                          error=None)


@pytest.mark.parametrize(("topic", "message"), [
    (T.sample("h1", 0), FULL_SAMPLE),
    (T.state("h1", 0), make_state()),
    (T.event("h1", 0), make_event(phase="cleared").model_copy(update={"cleared_by": "recovered"})),
    (T.action("h1", 0), make_action(make_event(), "verified")),
    (T.healer_state("h1"), make_healer_state()),
])
def test_every_field_is_recorded_and_read_back(tmp_path: Path, topic: str,
                                               message: BaseModel) -> None:
    """Published bytes → recorded row → exported JSON line: every field, same value."""
    store = Store(tmp_path / "r.db")
    record = record_for(T, topic, message.to_json(), NOW)  # type: ignore[attr-defined]
    assert record is not None and record.table != "deadletter", record
    assert store.write([record]) == 1
    store.close()
    out = io.StringIO()
    assert run_export(tmp_path / "r.db", record.table, "jsonl", out) == 0
    [row] = [json.loads(line) for line in out.getvalue().splitlines()]
    spec = TABLES[record.table]
    back = spec.message({k: _stored(spec, k, v) for k, v in row.items()})
    assert back == message


def _stored(spec: Any, name: str, value: Any) -> Any:
    """An exported JSON value as the column stores it (JSON columns are text)."""
    try:
        column = spec.column(name)
    except StopIteration:
        return value
    return json.dumps(value) if column.kind == "json" and value is not None else value


def test_samples_replay_with_every_field(tmp_path: Path) -> None:
    store = Store(tmp_path / "r.db")
    store.write([record_for(T, T.sample("h1", 0), FULL_SAMPLE.to_json(), NOW)])  # type: ignore[list-item]
    store.close()
    [replayed] = list(read_samples(tmp_path / "r.db"))
    assert replayed == FULL_SAMPLE


class SampleWithANewField(Sample):
    """What adding one field to Sample in gpuheal/models.py does."""

    pcie_rx_mb_s: Number | None = None
    throttled_since_ts: Timestamp | None = None


def test_a_new_sample_field_is_one_edit(tmp_path: Path) -> None:
    """A new field is published (JSON), recorded (a new column added to an existing file),
    exported and replayed, with no other edit than the model."""
    old = Store(tmp_path / "old.db")  # a recording made before the field existed
    old.write([record_for(T, T.sample("h1", 0), make_sample(seq=1).to_json(), NOW)])  # type: ignore[list-item]
    old.close()
    spec = table_spec("samples", SampleWithANewField)
    new = SampleWithANewField.model_validate({**make_sample(seq=2).model_dump(),
                                              "pcie_rx_mb_s": 812.5,
                                              "throttled_since_ts": NOW - 5})
    wire = decode(SampleWithANewField, new.to_json())  # published and parsed
    assert wire.pcie_rx_mb_s == 812.5
    import recorder.schema as schema

    original = dict(schema.TABLES)
    schema.TABLES["samples"] = spec
    try:
        store = Store(tmp_path / "old.db")  # opening it adds the missing columns
        assert {"pcie_rx_mb_s", "throttled_since_ts"} <= set(store.db["samples"].columns_dict)
        row = spec.row(wire, NOW)
        store.db["samples"].insert(row)
        store.close()
    finally:
        schema.TABLES.clear()
        schema.TABLES.update(original)
    rows = list(Store(tmp_path / "old.db").db["samples"].rows_where(order_by="seq"))
    assert rows[0]["pcie_rx_mb_s"] is None and rows[1]["pcie_rx_mb_s"] == 812.5
    assert spec.message({k: v for k, v in rows[1].items() if k != "id"}) == wire


def test_internal_construction_refuses_a_misspelt_field() -> None:
    """The wire ignores unknown keys; our own code may not drop a typo silently."""
    with pytest.raises(ValueError, match="temprature_c"):
        Sample(host="h", index=0, source="sim", ts=NOW, seq=0, temprature_c=50.0)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="acton"):
        Action.model_validate({"action_id": "a", "host": "h", "index": 0, "acton": "notify",
                               "action": "notify", "status": "skipped", "ts": NOW})
    assert decode(Event, make_event().to_json().replace(b'"v":1', b'"v":1,"future":1'))


def test_migrate_is_idempotent(tmp_path: Path) -> None:
    store = Store(tmp_path / "r.db")
    assert migrate(store.db) == []
    store.close()


def test_the_healer_state_records_its_incidents(tmp_path: Path) -> None:
    assert "incidents" in TABLES["healer_states"].names
    assert HealerState.model_fields["incidents"]
    assert State.model_fields["analyzer"] and "analyzer" in TABLES["states"].names

"""How every message is recorded: tables and columns derived from the models.

One source of truth per field: the model in :mod:`gpuheal.models`. A table's columns, their
SQLite types, the row a message becomes and the message a row becomes again (replay) all
follow from the model's fields, through two explicit maps:

* :data:`RENAMES`: fields stored under another name (``index`` is an SQL keyword: ``gpu``;
  a status's ``value`` is its ``status``);
* :data:`FLATTEN`: nested objects stored as several columns (``State.memory.used_mb`` →
  ``memory_used_mb``...).

Lists, dicts and other nested objects are stored as compact JSON text; booleans as 0/1; a
missing value as NULL. Adding a field to a model is the one edit: the recorder then adds the
column to existing files (``ALTER TABLE ... ADD COLUMN``), records it, exports it and replays
it.
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, Literal, Union

import pydantic_core
from pydantic import BaseModel

from gpuheal.models import (
    Action,
    DeadLetter,
    Event,
    HealerState,
    Sample,
    State,
    Status,
)
from gpuheal.topics import TopicParts

SqlType = Literal["REAL", "INTEGER", "TEXT"]
Kind = Literal["number", "int", "bool", "text", "json"]

RENAMES: dict[str, str] = {"index": "gpu", "value": "status"}
"""Field name → column name, where the field's own name cannot be a column."""
FLATTEN: dict[tuple[str, str], str] = {
    ("memory", "used_mb"): "memory_used_mb",
    ("memory", "total_mb"): "memory_total_mb",
    ("memory", "percent"): "memory_percent",
    ("power", "draw_w"): "power_draw_w",
    ("power", "limit_w"): "power_limit_w",
    ("clocks", "graphics_mhz"): "graphics_mhz",
    ("clocks", "memory_mhz"): "memory_mhz",
}
"""(object field, its field) → column: the State's nested readings, one column each."""
NOT_RECORDED: frozenset[str] = frozenset({"v"})
"""Fields no table keeps (``v`` is always 1 today; a new version gets new tables)."""


@dataclass(frozen=True)
class Column:
    """One column of a recorded table."""

    name: str
    sql_type: SqlType
    kind: Kind
    path: tuple[str, ...] = ()
    """Where the value is in the message (empty: not from the message, e.g. ``received_ts``)."""


@dataclass(frozen=True)
class TableSpec:
    """One table: the model it records and its columns, in order."""

    table: str
    model: type[BaseModel]
    columns: tuple[Column, ...]
    topic_columns: tuple[str, ...] = ()
    """Columns taken from the topic (``host``, ``component`` of a status)."""
    _getters: tuple[Callable[[Any], Any] | None, ...] = field(init=False, repr=False,
                                                              compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_getters", tuple(
            attrgetter(".".join(c.path)) if c.path else None for c in self.columns))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def column(self, name: str) -> Column:
        return next(c for c in self.columns if c.name == name)

    def row(self, message: BaseModel, received_ts: float,
            parts: TopicParts | None = None) -> dict[str, Any]:
        """The row that records ``message`` (received at ``received_ts``, on ``parts``)."""
        return {c.name: value for c, value in zip(self.columns,
                                                  self._values(message, received_ts, parts),
                                                  strict=True)}

    def row_tuple(self, message: BaseModel, received_ts: float,
                  parts: TopicParts | None = None) -> tuple[Any, ...]:
        """:meth:`row` as a tuple in column order (what an INSERT takes)."""
        return tuple(self._values(message, received_ts, parts))

    def _values(self, message: BaseModel, received_ts: float,
                parts: TopicParts | None) -> list[Any]:
        out: list[Any] = []
        for column, get in zip(self.columns, self._getters, strict=True):
            if get is None:
                if column.name in ("received_ts", "ts"):  # ts: a status's arrival time
                    out.append(received_ts)
                else:
                    out.append(getattr(parts, column.name, None) if parts else None)
                continue
            value = get(message)
            if value is not None and column.kind == "json":
                value = to_json_text(value)
            out.append(value)
        return out

    def message(self, row: dict[str, Any]) -> BaseModel:
        """The message a row recorded (the inverse of :meth:`row`; what replay sends)."""
        data: dict[str, Any] = {}
        for column in self.columns:
            if not column.path or column.name not in row:
                continue
            value = decode_value(column, row[column.name])
            target = data
            for key in column.path[:-1]:
                target = target.setdefault(key, {})
            target[column.path[-1]] = value
        return self.model.model_validate(data)


def decode_value(column: Column, value: Any) -> Any:
    """A stored value as the model holds it (JSON text decoded, 0/1 as a boolean)."""
    if value is None:
        return None
    if column.kind == "json":
        return json.loads(value)
    if column.kind == "bool":
        return bool(value)
    if column.kind == "number":
        return float(value)
    return value


def to_json_text(value: Any) -> str:
    """Compact JSON text (UTF-8, no spaces) of a list/object column, models included."""
    try:
        return pydantic_core.to_json(value).decode()
    except pydantic_core.PydanticSerializationError:
        # deeper than pydantic's 255-level limit; RecursionError/ValueError from here make
        # the message a dead letter
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False,
                          default=_jsonable)


def _jsonable(obj: object) -> object:
    if isinstance(obj, BaseModel):
        return obj.model_dump()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


# --- deriving columns from annotations --------------------------------------------------------
def _unwrap(annotation: Any) -> Any:
    """The type inside ``Annotated[...]`` and ``X | None``."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
            continue
        if origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) == 1:
                annotation = args[0]
                continue
        return annotation


def _kind_of(annotation: Any) -> tuple[SqlType, Kind]:
    t = _unwrap(annotation)
    origin = typing.get_origin(t)
    if origin is Literal:
        values = typing.get_args(t)
        if all(isinstance(v, bool) for v in values):
            return "INTEGER", "bool"
        if all(isinstance(v, int) for v in values):
            return "INTEGER", "int"
        return "TEXT", "text"
    if t is bool:
        return "INTEGER", "bool"
    if t is int:
        return "INTEGER", "int"
    if t is float:
        return "REAL", "number"
    if t is str:
        return "TEXT", "text"
    return "TEXT", "json"  # list, dict, a nested model, Any


def derive_columns(model: type[BaseModel]) -> list[Column]:
    """Every recorded field of ``model`` as columns (renamed, nested objects flattened)."""
    columns: list[Column] = []
    for name, info in model.model_fields.items():
        if name in NOT_RECORDED:
            continue
        inner = _unwrap(info.annotation)
        nested = [(f, c) for (f, sub), c in FLATTEN.items() if f == name]
        if nested and isinstance(inner, type) and issubclass(inner, BaseModel):
            for sub_name, sub_info in inner.model_fields.items():
                column = FLATTEN.get((name, sub_name))
                if column is None:
                    raise TypeError(f"{model.__name__}.{name}.{sub_name} has no column: add it "
                                    "to gpuheal.records.FLATTEN")
                sql_type, kind = _kind_of(sub_info.annotation)
                columns.append(Column(column, sql_type, kind, (name, sub_name)))
            continue
        sql_type, kind = _kind_of(info.annotation)
        columns.append(Column(RENAMES.get(name, name), sql_type, kind, (name,)))
    return columns


def table_spec(table: str, model: type[BaseModel], *, before: tuple[Column, ...] = (),
               received: bool = True) -> TableSpec:
    """The spec of a table recording ``model`` (+ ``received_ts`` unless ``received`` is
    False)."""
    columns = [*before, *derive_columns(model)]
    if received:
        columns.append(Column("received_ts", "REAL", "number"))
    return TableSpec(table, model, tuple(columns),
                     topic_columns=tuple(c.name for c in before))


TABLES: dict[str, TableSpec] = {
    "samples": table_spec("samples", Sample),
    "states": table_spec("states", State),
    "events": table_spec("events", Event),
    "actions": table_spec("actions", Action),
    "healer_states": table_spec("healer_states", HealerState),
    "component_status": TableSpec(
        "component_status", Status,
        (Column("host", "TEXT", "text"), Column("component", "TEXT", "text"),
         *derive_columns(Status), Column("ts", "REAL", "number")),
        topic_columns=("host", "component")),
    "deadletter": table_spec("deadletter", DeadLetter, received=False),
}
"""Every table a message is recorded in, by table name."""

AGGREGATED_METRICS: tuple[str, ...] = (
    "temperature_c", "utilization_pct", "memory_used_mb", "power_draw_w",
)
"""Sample fields the recorder keeps as 1-minute min/avg/max once raw samples pass retention
(and the series a history chart shows)."""

TABLE_OF_KIND: dict[str, str] = {
    "sample": "samples", "state": "states", "event": "events", "action": "actions",
    "healer_state": "healer_states", "status": "component_status", "deadletter": "deadletter",
}
"""Topic kind (:class:`gpuheal.topics.TopicParts`) → the table its messages go to."""
MODEL_OF_KIND: dict[str, type[BaseModel]] = {k: TABLES[t].model for k, t in TABLE_OF_KIND.items()}

JSON_COLUMNS: frozenset[str] = frozenset(
    c.name for spec in TABLES.values() for c in spec.columns if c.kind == "json")
"""Columns holding JSON text (decoded again by ``export --format jsonl`` and replay)."""
BOOL_COLUMNS: frozenset[str] = frozenset(
    c.name for spec in TABLES.values() for c in spec.columns if c.kind == "bool")
"""Columns holding booleans as 0/1 (``true``/``false`` again in JSON lines)."""


def sample_from_row(row: dict[str, Any]) -> Sample:
    """A ``samples`` row as the Sample it recorded."""
    return TABLES["samples"].message(row)  # type: ignore[return-value]

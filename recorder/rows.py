"""A message → the table row that records it (pure: no broker, no database).

The rows follow the models (:mod:`gpuheal.records`): :func:`record_of` turns a message the
Bus already validated into a :class:`Record`; :func:`record_for` does the same from a topic
and raw payload (through the contract's one parse path, :func:`gpuheal.wire.decode`) and
turns a malformed, schema-invalid or inconsistent payload into a ``deadletter`` row with the
reason. An empty payload (a cleared retained topic) records nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pydantic import BaseModel

from gpuheal.records import MODEL_OF_KIND, TABLE_OF_KIND, TABLES
from gpuheal.topics import TopicParts, Topics
from gpuheal.wire import PayloadError, decode, topic_mismatch

RECORDER = "recorder"
DEADLETTER_PAYLOAD_CHARS = 64 * 1024
"""A rejected payload is kept up to this many characters."""
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_INT_COLUMNS: dict[str, tuple[str, ...]] = {
    table: tuple(c.name for c in spec.columns if c.kind == "int")
    for table, spec in TABLES.items()
}
"""Integer columns per table: SQLite integers are 64-bit, a bigger number is bad input."""


@dataclass(frozen=True)
class Record:
    """One row for one table."""

    table: str
    row: dict[str, Any]


def deadletter_record(topic: str, payload: bytes, reason: str, received_ts: float,
                      component: str = RECORDER) -> Record:
    """The row of a payload the recorder (or ``component``) rejected."""
    text = payload[: DEADLETTER_PAYLOAD_CHARS * 4].decode("utf-8", errors="replace")
    return Record("deadletter", {
        "component": component,
        "topic": topic[:1024],
        "reason": reason[:2048],
        "payload": text[:DEADLETTER_PAYLOAD_CHARS],
        "ts": received_ts,
    })


def record_of(parts: TopicParts, message: BaseModel, received_ts: float) -> Record:
    """The row of a valid message received on a topic of kind ``parts.kind``.

    Raises :class:`PayloadError` for a value the table cannot hold (an integer beyond 64
    bits), ValueError/TypeError for one that cannot be stored at all."""
    table = TABLE_OF_KIND[parts.kind]
    record = Record(table, TABLES[table].row(message, received_ts, parts))
    for key in _INT_COLUMNS[table]:
        value = record.row.get(key)
        if value is not None and not _INT64_MIN <= value <= _INT64_MAX:
            raise PayloadError(f"{key}: integer out of range for storage")
    return record


def record_for(topics: Topics, topic: str, payload: bytes, received_ts: float) -> Record | None:
    """The record of one raw message (see the module doc)."""
    parts = _parse_topic(topics, topic)
    if parts is None or parts.kind not in TABLE_OF_KIND:
        return deadletter_record(topic, payload, "not a topic the recorder records", received_ts)
    if not payload:
        return None
    try:
        message = decode(MODEL_OF_KIND[parts.kind], payload)
        mismatch = topic_mismatch(parts, message)
        if mismatch is not None:
            raise PayloadError(mismatch)
        return record_of(parts, message, received_ts)
    except PayloadError as exc:
        return deadletter_record(topic, payload, exc.reason, received_ts)
    except (ValueError, TypeError, RecursionError) as exc:  # valid, yet not storable
        return deadletter_record(topic, payload, f"cannot store: {exc}", received_ts)


@lru_cache(maxsize=8192)
def _parse_topic(topics: Topics, topic: str) -> TopicParts | None:
    """``topics.parse``, remembered: a site has a few thousand distinct topics at most."""
    return topics.parse(topic)

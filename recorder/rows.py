"""Received message → the table row that records it (pure: no broker, no database).

:func:`record_for` takes a topic, its payload and the time it was received and returns a
:class:`Record`: the table and the row for a valid message, a ``deadletter`` row with the
reason for a malformed, schema-invalid or inconsistent one, or ``None`` for an empty
payload (a cleared retained topic: nothing to record).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import pydantic_core
from pydantic import BaseModel, ValidationError

from gpuheal.models import (
    MAX_PAYLOAD_BYTES,
    Action,
    DeadLetter,
    Event,
    HealerState,
    M,
    PayloadError,
    Sample,
    State,
    parse_payload,
)
from gpuheal.topics import TopicParts, Topics

RECORDER = "recorder"
DEADLETTER_PAYLOAD_CHARS = 64 * 1024
"""A rejected payload is kept up to this many characters."""
STATUS_VALUES = frozenset({"online", "offline"})
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


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


def parse_fast(model: type[M], payload: bytes) -> M:
    """Validate with pydantic's JSON parser (3x faster); on failure, the contract's
    :func:`parse_payload` gives the reason (and has the last word on validity). A payload
    that may hold ``NaN``/``Infinity`` literals (which pydantic's parser lets through into
    untyped fields such as ``evidence``) always takes the contract's path, which rejects
    them."""
    if len(payload) <= MAX_PAYLOAD_BYTES and b"NaN" not in payload \
            and b"Infinity" not in payload:
        try:
            return model.model_validate_json(payload)
        except ValidationError:
            pass
    return parse_payload(model, payload)


def record_for(topics: Topics, topic: str, payload: bytes, received_ts: float) -> Record | None:
    """The record of one received message (see module doc)."""
    parts = _parse_topic(topics, topic)
    if parts is None or parts.kind not in _BUILDERS:
        return deadletter_record(topic, payload, "not a topic the recorder records", received_ts)
    if not payload:
        return None
    try:
        record = _BUILDERS[parts.kind](parts, payload, received_ts)
        _check_integers(record, _INT_FIELDS.get(record.table, ()))
    except PayloadError as exc:
        return deadletter_record(topic, payload, exc.reason, received_ts)
    except (ValueError, TypeError, RecursionError) as exc:  # valid, yet not storable
        return deadletter_record(topic, payload, f"cannot store: {exc}", received_ts)
    return record


# --- one builder per topic kind ----------------------------------------------------------
def _sample(parts: TopicParts, payload: bytes, received_ts: float) -> Record:
    s = parse_fast(Sample, payload)
    _check_topic(parts, s.host, s.index)
    return Record("samples", {
        "host": s.host, "gpu": s.index, "seq": s.seq, "ts": s.ts, "uuid": s.uuid,
        "name": s.name, "source": s.source, "temperature_c": s.temperature_c,
        "utilization_pct": s.utilization_pct, "memory_used_mb": s.memory_used_mb,
        "memory_total_mb": s.memory_total_mb, "power_draw_w": s.power_draw_w,
        "power_limit_w": s.power_limit_w, "sm_clock_mhz": s.sm_clock_mhz,
        "mem_clock_mhz": s.mem_clock_mhz, "fan_pct": s.fan_pct,
        "throttle_reasons": to_json(s.throttle_reasons), "xids": to_json(s.xids),
        "ecc_uncorrected": s.ecc_uncorrected,
        "remapped_rows_pending": s.remapped_rows_pending,
        "processes": to_json(s.processes),
        "available": s.available, "error": s.error, "received_ts": received_ts,
    })


def _state(parts: TopicParts, payload: bytes, received_ts: float) -> Record:
    s = parse_fast(State, payload)
    _check_topic(parts, s.host, s.index)
    return Record("states", {
        "host": s.host, "gpu": s.index, "uuid": s.uuid, "name": s.name, "health": s.health,
        "error": s.error, "error_message": s.error_message, "temperature": s.temperature,
        "utilization": s.utilization, "memory_used_mb": s.memory.used_mb,
        "memory_total_mb": s.memory.total_mb, "memory_percent": s.memory.percent,
        "power_draw_w": s.power.draw_w, "power_limit_w": s.power.limit_w,
        "graphics_mhz": s.clocks.graphics_mhz, "memory_mhz": s.clocks.memory_mhz,
        "fan_speed": s.fan_speed, "timestamp": s.timestamp, "ts": s.ts,
        "active": to_json(s.active),
        "analyzer_started_ts": s.analyzer_started_ts, "received_ts": received_ts,
    })


def _event(parts: TopicParts, payload: bytes, received_ts: float) -> Record:
    e = parse_fast(Event, payload)
    _check_topic(parts, e.host, e.index)
    return Record("events", {
        "event_id": e.event_id, "phase": e.phase, "severity": e.severity, "host": e.host,
        "gpu": e.index, "kind": e.kind, "started_ts": e.started_ts, "ts": e.ts,
        "message": e.message, "evidence": to_json(e.evidence),
        "recommended_action": e.recommended_action, "received_ts": received_ts,
    })


def _action(parts: TopicParts, payload: bytes, received_ts: float) -> Record:
    a = parse_fast(Action, payload)
    _check_topic(parts, a.host, a.index)
    return Record("actions", {
        "action_id": a.action_id, "status": a.status, "event_id": a.event_id, "host": a.host,
        "gpu": a.index, "action": a.action, "reason": a.reason, "attempt": a.attempt,
        "ts": a.ts, "duration_s": a.duration_s, "detail": to_json(a.detail),
        "received_ts": received_ts,
    })


def _status(parts: TopicParts, payload: bytes, received_ts: float) -> Record:
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise PayloadError(f"payload too large: {len(payload)} bytes > {MAX_PAYLOAD_BYTES}")
    try:
        value = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise PayloadError("status is not UTF-8") from None
    if value not in STATUS_VALUES:
        raise PayloadError(f"status must be online or offline, got {value[:40]!r}")
    return Record("component_status", {
        "host": parts.host, "component": parts.component, "status": value, "ts": received_ts,
    })


def _healer_state(parts: TopicParts, payload: bytes, received_ts: float) -> Record:
    h = parse_fast(HealerState, payload)
    if h.host != parts.host:
        raise PayloadError(f"topic names host {parts.host}, payload says {h.host}")
    return Record("healer_states", {
        "host": h.host, "enabled": h.enabled, "dry_run": h.dry_run,
        "breaker_open": h.breaker_open, "breaker_reason": h.breaker_reason,
        "unresolved_count": h.unresolved_count, "budget_left": h.budget_left,
        "budget_per_hour": h.budget_per_hour,
        "cooldowns": to_json(h.cooldowns),
        "throttled": to_json(h.throttled), "ts": h.ts, "received_ts": received_ts,
    })


def _deadletter(parts: TopicParts, payload: bytes, received_ts: float) -> Record:
    d = parse_fast(DeadLetter, payload)
    if d.component != parts.component:
        raise PayloadError(f"topic names component {parts.component}, payload says "
                           f"{d.component[:40]}")
    return Record("deadletter", {
        "component": d.component, "topic": d.topic, "reason": d.reason, "payload": d.payload,
        "ts": d.ts,
    })


_BUILDERS: dict[str, Callable[[TopicParts, bytes, float], Record]] = {
    "sample": _sample,
    "state": _state,
    "event": _event,
    "action": _action,
    "status": _status,
    "healer_state": _healer_state,
    "deadletter": _deadletter,
}


# --- helpers -------------------------------------------------------------------------------
def to_json(value: Any) -> str | None:
    """Compact JSON text (UTF-8, no spaces) of a list/object column, pydantic models
    included; ``None`` stays NULL."""
    if value is None:
        return None
    try:
        return pydantic_core.to_json(value).decode()
    except pydantic_core.PydanticSerializationError:
        # deeper than pydantic's 255-level limit (JSON input may nest ~1000 levels);
        # RecursionError/ValueError from here make the message a dead letter
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False,
                          default=_jsonable)


def _jsonable(obj: object) -> object:
    if isinstance(obj, BaseModel):
        return obj.model_dump()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


@lru_cache(maxsize=8192)
def _parse_topic(topics: Topics, topic: str) -> TopicParts | None:
    """``topics.parse``, remembered: a site has a few thousand distinct topics at most."""
    return topics.parse(topic)


def _check_topic(parts: TopicParts, host: str, index: int) -> None:
    if parts.host != host or parts.index != index:
        raise PayloadError(
            f"topic names host {parts.host} GPU {parts.index}, payload says host {host} "
            f"GPU {index}")


_INT_FIELDS: dict[str, tuple[str, ...]] = {
    "samples": ("seq", "ecc_uncorrected"),
    "actions": ("attempt",),
    "healer_states": ("unresolved_count", "budget_left", "budget_per_hour"),
}
"""Unbounded integer columns (``gpu`` is at most 65535; lists are stored as JSON text)."""


def _check_integers(record: Record, fields: tuple[str, ...]) -> None:
    """SQLite integers are 64-bit; a bigger number is bad input, not a crash."""
    for key in fields:
        value = record.row[key]
        if value is not None and not _INT64_MIN <= value <= _INT64_MAX:
            raise PayloadError(f"{key}: integer out of range for storage")

"""The one way a payload off the wire becomes a message: :func:`decode`.

Every component receives through :class:`gpuheal.mqtt.Bus`, which calls :func:`decode` and
:func:`topic_mismatch` for each message; nothing else parses a payload. The rules:

* at most :data:`MAX_PAYLOAD_BYTES`, UTF-8, a JSON object nested at most
  :data:`MAX_JSON_DEPTH` levels, no ``NaN``/``Infinity``, no lone UTF-16 surrogate escape;
* JSON types exactly (``"available": "no"``, ``"index": true`` and ``"seq": "3"`` are invalid);
* unknown keys are ignored at every level (a newer producer never breaks an older consumer).

A payload that breaks a rule raises :class:`PayloadError` whose ``reason`` is one line for the
dead-letter topic. The common case takes pydantic's JSON parser in one pass; anything it refuses
(or that may hold what it would let through) takes the careful path, which states the reason.

The hot models (:data:`CLOSED_MODELS`: Sample and State, every sample and every State a
component receives) first try a stricter pass that needs no scan of the payload: the model's
own config, which refuses unknown keys. Without unknown keys and without ``\\u`` escapes a
payload cannot hide what the scan looks for (every number of these models must be finite,
their nesting is fixed), so what this pass accepts the general path accepts too, as the same
message; anything else (unknown keys from a newer producer included) goes the general way,
which gives every verdict and every dead-letter reason.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from gpuheal.models import M, Sample, State, Status
from gpuheal.topics import TopicParts
from gpuheal.validation import first_error

MAX_PAYLOAD_BYTES = 256 * 1024
"""Largest payload any component accepts; bigger ones go to the dead-letter topic."""
MAX_JSON_DEPTH = 64
"""Deepest nesting of objects and arrays a payload may have (any component, any stack)."""
CLOSED_MODELS: frozenset[type] = frozenset({Sample, State})
"""Models with no free-form field (no ``dict[str, Any]``), decoded by the stricter pass first."""
STATUS_REASON_PROPERTY = "gpuheal-reason"
"""MQTT v5 user property of an ``offline`` status: ``stopped`` (clean goodbye) or ``lost``."""


class PayloadError(ValueError):
    """A payload that is not a valid message; ``reason`` says why, for the dead-letter topic."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def decode(model: type[M], payload: bytes, *, status_reason: str | None = None) -> M:
    """Parse and validate one wire payload, or raise :class:`PayloadError` with a clear reason.

    ``model`` :class:`Status` reads the plain ``online``/``offline`` text; ``status_reason`` is
    the ``gpuheal-reason`` user property that came with it, if any."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise PayloadError(f"payload too large: {len(payload)} bytes > {MAX_PAYLOAD_BYTES}")
    if model is Status:
        return _status(payload, status_reason)  # type: ignore[return-value]
    if model in CLOSED_MODELS and b"\\u" not in payload:
        try:
            return model.model_validate_json(payload)  # unknown keys refused: nothing hidden
        except ValidationError:
            pass  # unknown keys, or invalid: the general path decides, with its reason
    if (payload.count(b"{") + payload.count(b"[") <= MAX_JSON_DEPTH and b"\\u" not in payload
            and b"NaN" not in payload and b"Infinity" not in payload):
        try:
            return model.model_validate_json(payload, extra="ignore")
        except ValidationError:
            pass  # the careful path says why, in the shared wording
    return _careful(model, payload)


def _careful(model: type[M], payload: bytes) -> M:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PayloadError(f"not UTF-8: {exc}") from None
    if _too_deep(text):
        raise PayloadError(f"not JSON: nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise PayloadError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise PayloadError(f"not a JSON object: {type(data).__name__}")
    if "\\u" in text and _has_lone_surrogate(data):
        raise PayloadError("invalid text: a lone UTF-16 surrogate escape")
    try:
        return model.model_validate(data, extra="ignore")
    except ValidationError as exc:
        raise PayloadError(f"invalid {model.__name__}: {first_error(exc)}") from None


def _status(payload: bytes, reason: str | None) -> Status:
    try:
        value = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise PayloadError("status is not UTF-8") from None
    if value not in ("online", "offline"):
        raise PayloadError(f"status must be online or offline, got {value[:40]!r}")
    known = reason if value == "offline" and reason in ("stopped", "lost") else None
    return Status(value=value, reason=known)  # type: ignore[arg-type]


def topic_mismatch(parts: TopicParts, message: Any) -> str | None:
    """Why a message does not belong on its topic (host, GPU index, component), or None."""
    host = getattr(message, "host", None)
    if parts.host is not None and host is not None and host != parts.host:
        return f"topic mismatch: the topic names host {parts.host}, the payload {host}"
    index = getattr(message, "index", None)
    if parts.index is not None and index is not None and index != parts.index:
        return (f"topic mismatch: the topic names GPU {parts.index}, the payload GPU {index} "
                f"of {host}")
    if parts.kind == "deadletter":  # (a model without the field answers getattr slowly)
        component = getattr(message, "component", None)
        if component != parts.component:
            return (f"topic mismatch: the topic names component {parts.component}, the "
                    f"payload {str(component)[:40]}")
    return None


def _too_deep(text: str) -> bool:
    """Whether objects/arrays nest deeper than MAX_JSON_DEPTH (brackets in strings skipped).

    Checked by the same rule in every component, before ``json.loads``, whose own limit is
    Python's recursion limit and so depends on how deep the caller's stack already is."""
    if text.count("{") + text.count("[") <= MAX_JSON_DEPTH:
        return False
    depth = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return True
        elif ch in "}]":
            depth -= 1
    return False


def _has_lone_surrogate(data: Any) -> bool:
    """True when a ``\\uD800``-style escape left a string that cannot be UTF-8 again."""
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a finite number")

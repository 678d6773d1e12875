"""Message models: the wire contract of DESIGN.md.

Every message is JSON, UTF-8, carries ``"v": 1`` and tolerates unknown keys
(``extra="ignore"``) so that a newer producer never breaks an older consumer.
Numbers must be finite; a missing reading is ``None``, never a made-up value.
Units are in the field names (``_c`` degrees Celsius, ``_mb`` MiB, ``_w`` watts,
``_mhz`` megahertz, ``_pct`` percent, ``_ts`` UNIX seconds of the source clock).
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

HOST_PATTERN = r"^[A-Za-z0-9_-]+$"
MAX_PAYLOAD_BYTES = 256 * 1024
"""Largest payload any component accepts; bigger ones go to the dead-letter topic."""

SourceName = Literal["nvml", "nvidia-smi", "jetson", "sim", "replay"]
Health = Literal["healthy", "warning", "critical", "unavailable"]
ErrorKind = Literal[
    "none",
    "out_of_memory",
    "gpu_hang",
    "thermal_throttling",
    "critical_health",
    "xid_error",
    "unavailable",
    "unknown_error",
]
ConditionKind = Literal[
    "out_of_memory",
    "gpu_hang",
    "thermal_throttling",
    "critical_health",
    "xid_error",
    "unavailable",
    "unknown_error",
]
Severity = Literal["warning", "critical", "emergency"]
Phase = Literal["raised", "escalated", "cleared"]
ActionName = Literal[
    "clear_llm_cache",
    "reset_gpu_session",
    "throttle_gpu",
    "restore_power_limit",
    "restart_llm_service",
    "stop_llm_service",
    "reset_gpu",
    "notify",
]
ActionStatus = Literal[
    "dry_run", "started", "succeeded", "failed", "skipped", "verified", "unresolved"
]
ComponentName = Literal["publisher", "analyzer", "healer", "recorder", "dashboard"]

SEVERITY_RANK: dict[str, int] = {"warning": 1, "critical": 2, "emergency": 3}
"""Order of severities; higher is worse."""

Host = Annotated[str, Field(pattern=HOST_PATTERN, min_length=1, max_length=128)]
GpuIndex = Annotated[int, Field(ge=0, le=65535)]
Number = Annotated[float, Field(allow_inf_nan=False)]
MAX_TS = 253_402_300_799.0
"""9999-12-31T23:59:59Z: the last time an ISO 8601 timestamp can say."""
Timestamp = Annotated[float, Field(ge=0.0, le=MAX_TS, allow_inf_nan=False)]
"""UNIX seconds of the source clock, within what an ISO 8601 timestamp can say."""
MAX_JSON_DEPTH = 64
"""Deepest nesting of objects and arrays a payload may have (any component, any stack)."""


class Message(BaseModel):
    """Base of every wire message: ignores unknown keys, rejects NaN/Infinity."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, populate_by_name=True)

    v: Literal[1] = 1

    def to_json(self) -> bytes:
        """Compact UTF-8 JSON, the form every component publishes."""
        return self.model_dump_json(exclude_none=False).encode()


M = TypeVar("M", bound=Message)


class Process(BaseModel):
    """A process holding GPU memory."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    pid: Annotated[int, Field(ge=0)]
    name: str | None = None
    used_mb: Number | None = None


class Sample(Message):
    """One reading of one GPU, as the publisher saw it (``P/H/gpu/I/sample``)."""

    host: Host
    index: GpuIndex
    uuid: str | None = None
    name: str | None = None
    source: SourceName
    ts: Timestamp
    """Source clock, UNIX seconds."""
    seq: Annotated[int, Field(ge=0)]
    """Per (host, index) counter, increasing by one each sample of a publisher run."""
    temperature_c: Number | None = None
    utilization_pct: Number | None = None
    memory_used_mb: Number | None = None
    memory_total_mb: Number | None = None
    power_draw_w: Number | None = None
    power_limit_w: Number | None = None
    sm_clock_mhz: Number | None = None
    mem_clock_mhz: Number | None = None
    fan_pct: Number | None = None
    throttle_reasons: list[str] | None = None
    xids: list[Annotated[int, Field(ge=0)]] | None = None
    ecc_uncorrected: Annotated[int, Field(ge=0)] | None = None
    remapped_rows_pending: bool | None = None
    processes: list[Process] | None = None
    available: bool = True
    """False when the source reports the GPU lost or unreadable; readings are then None."""
    error: str | None = None
    """Why the GPU is unavailable, when it is."""


class Memory(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    used_mb: Number | None = None
    total_mb: Number | None = None
    percent: Number | None = None


class Power(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    draw_w: Number | None = None
    limit_w: Number | None = None


class Clocks(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    graphics_mhz: Number | None = None
    memory_mhz: Number | None = None


class ActiveCondition(BaseModel):
    """One condition the analyzer holds open for a GPU."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    event_id: str
    kind: ConditionKind
    severity: Severity
    started_ts: Timestamp
    message: str | None = None


class State(Message):
    """Retained health of one GPU (``P/H/gpu/I/state``): the origin's ``GET /api/gpu`` object."""

    host: Host
    index: GpuIndex
    uuid: str | None = None
    name: str | None = None
    temperature: Number | None = None
    utilization: Number | None = None
    memory: Memory = Field(default_factory=Memory)
    power: Power = Field(default_factory=Power)
    clocks: Clocks = Field(default_factory=Clocks)
    fan_speed: Number | None = None
    health: Health
    error: ErrorKind = "none"
    error_message: str | None = None
    timestamp: str
    """ISO 8601 UTC of ``ts``."""
    ts: Timestamp
    active: list[ActiveCondition] = Field(default_factory=list)
    analyzer_started_ts: Timestamp | None = None
    """When the analyzer that wrote this state started; a newer one started clean."""


class Event(Message):
    """A condition raised, escalated or cleared (``P/H/gpu/I/event``)."""

    event_id: str
    host: Host
    index: GpuIndex
    kind: ConditionKind
    severity: Severity
    phase: Phase
    started_ts: Timestamp
    ts: Timestamp
    message: str
    evidence: dict[str, Any] = Field(default_factory=dict)
    recommended_action: ActionName | None = None


class Action(Message):
    """One step in the life of a recovery action (``P/H/gpu/I/action``)."""

    action_id: str
    event_id: str | None = None
    host: Host
    index: GpuIndex
    action: ActionName
    status: ActionStatus
    reason: str | None = None
    attempt: Annotated[int, Field(ge=0)] = 1
    ts: Timestamp
    duration_s: Number | None = None
    detail: dict[str, Any] = Field(default_factory=dict)


class Cooldown(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    index: GpuIndex
    action: ActionName
    until_ts: Timestamp


class HealerState(Message):
    """The healer's guards, retained on ``P/H/healer/state``."""

    host: Host
    enabled: bool
    dry_run: bool
    breaker_open: bool
    breaker_reason: str | None = None
    unresolved_count: Annotated[int, Field(ge=0)] = 0
    budget_left: Annotated[int, Field(ge=0)]
    budget_per_hour: Annotated[int, Field(ge=0)]
    cooldowns: list[Cooldown] = Field(default_factory=list)
    throttled: list[GpuIndex] = Field(default_factory=list)
    ts: Timestamp


class HealerSet(Message):
    """An operator's command on ``P/H/healer/set``; unknown keys are ignored."""

    enabled: bool | None = None
    reset_breaker: bool | None = None
    dry_run: bool | None = None

    @field_validator("reset_breaker")
    @classmethod
    def _only_true(cls, value: bool | None) -> bool | None:
        if value is False:
            raise ValueError("reset_breaker only takes true")
        return value


SimCommandName = Literal["unload_models", "restart_service", "stop_service",
                         "set_power_limit", "reset", "fan_max"]


class SimCommand(Message):
    """A command of the healer's simulated actuator to the simulated GPU (``P/H/gpu/I/sim``)."""

    command: SimCommandName
    action_id: str
    power_limit_w: Number | None = None


class DeadLetter(Message):
    """A rejected payload (truncated) and why (``P/deadletter/<component>``)."""

    component: str
    topic: str
    reason: str
    payload: str
    ts: Timestamp


class Status(BaseModel):
    """Not JSON: availability is the plain string ``online`` or ``offline``."""

    value: Literal["online", "offline"]


def iso_utc(ts: float) -> str:
    """ISO 8601 UTC with milliseconds and ``Z``, as the origin's ``timestamp``."""
    dt = datetime.fromtimestamp(ts, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def make_event_id(host: str, index: int, kind: str, started_ts: float) -> str:
    """Deterministic id of a condition: same host, GPU, kind and start → same id."""
    key = f"{host}|{index}|{kind}|{started_ts:.3f}"
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def make_action_id(event_id: str | None, action: str, attempt: int, host: str, index: int) -> str:
    """Deterministic id of an action taken for an event (idempotent on redelivery)."""
    key = f"{host}|{index}|{event_id}|{action}|{attempt}"
    return hashlib.sha256(key.encode()).hexdigest()[:20]


class PayloadError(ValueError):
    """A payload that is not a valid message; ``reason`` says why, for the dead-letter topic."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_payload(model: type[M], payload: bytes) -> M:
    """Parse and validate one wire payload, or raise :class:`PayloadError` with a clear reason."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise PayloadError(f"payload too large: {len(payload)} bytes > {MAX_PAYLOAD_BYTES}")
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
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "<root>"
        raise PayloadError(
            f"invalid {model.__name__}: {where}: {first.get('msg')} ({exc.error_count()} errors)"
        ) from None


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

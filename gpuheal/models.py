"""Message models: the wire contract of DESIGN.md.

Every message is JSON, UTF-8, carries ``"v": 1`` and tolerates unknown keys
(``extra="ignore"``) so that a newer producer never breaks an older consumer.
Numbers must be finite; a missing reading is ``None``, never a made-up value.
Units are in the field names (``_c`` degrees Celsius, ``_mb`` MiB, ``_w`` watts,
``_mhz`` megahertz, ``_pct`` percent, ``_ts`` UNIX seconds of the source clock).
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

HOST_PATTERN = r"^[A-Za-z0-9_-]+$"

SourceName = Literal["nvml", "nvidia-smi", "jetson", "sim", "replay"]
Health = Literal["healthy", "warning", "critical", "unavailable"]
ConditionKind = Literal[
    "out_of_memory",
    "gpu_hang",
    "thermal_throttling",
    "critical_health",
    "xid_error",
    "unavailable",
    "unknown_error",
]
"""What a condition (an Event, an entry of ``State.active``) is about."""
ErrorKind = Literal["none", ConditionKind]
"""The State's ``error``: the worst active condition's kind, or ``none``."""
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
    "dry_run", "started", "succeeded", "failed", "skipped", "verified", "unresolved",
    "acknowledged",
]
"""``acknowledged``: a person took over a condition the healer cannot heal (``notify``)."""
ClearedBy = Literal["recovered", "acknowledged", "source_restarted"]
"""Why a condition ended: the GPU proved healthy again, a person acknowledged it, or the
source (publisher, clock) started anew so the old condition says nothing any more."""
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


STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, populate_by_name=True)
"""Every model: JSON types exactly (``true`` is not ``1``, ``"3"`` is not ``3``), finite numbers,
and no unknown key when our own code builds a message (a misspelt field fails loudly). The wire
tolerates unknown keys: :func:`gpuheal.wire.decode` validates with ``extra="ignore"``."""


class Part(BaseModel):
    """Base of the objects nested in messages."""

    model_config = STRICT


class Message(BaseModel):
    """Base of every wire message (see :data:`STRICT`)."""

    model_config = STRICT

    v: Literal[1] = 1

    @field_validator("v", mode="before")
    @classmethod
    def _v_is_the_integer_1(cls, value: object) -> object:
        if type(value) is not int:  # Literal[1] would take true (and 1.0)
            raise ValueError("v must be the integer 1")
        return value

    def to_json(self) -> bytes:
        """Compact UTF-8 JSON, the form every component publishes."""
        return self.model_dump_json(exclude_none=False).encode()


M = TypeVar("M", bound=Message)


class Process(Part):
    """A process holding GPU memory."""


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
    host_boot_ts: Timestamp | None = None
    """When the host booted (UNIX seconds, Linux ``btime``): a new value means a reboot."""


class Memory(Part):
    used_mb: Number | None = None
    total_mb: Number | None = None
    percent: Number | None = None


class Power(Part):
    draw_w: Number | None = None
    limit_w: Number | None = None


class Clocks(Part):
    graphics_mhz: Number | None = None
    memory_mhz: Number | None = None


class ActiveCondition(Part):
    """One condition the analyzer holds open for a GPU."""

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
    source: SourceName | None = None
    """The ``source`` of the newest sample (``replay``: a replayed recording, never acted on)."""
    analyzer: Host | None = None
    """The host name of the analyzer that wrote this State (its status topic says whether it
    still does: an offline analyzer's States are stale)."""


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
    cleared_by: ClearedBy | None = None
    """On ``cleared`` only: ``recovered`` when the GPU proved healthy again (what the healer
    verifies an action by), else why the condition ended without that."""


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


class Cooldown(Part):
    """``action`` may not run again on GPU ``index`` (None: on any GPU of the host, for the
    host-wide service actions) before ``until_ts`` (event time)."""

    index: GpuIndex | None
    action: ActionName
    until_ts: Timestamp


IncidentPhase = Literal["open", "probing", "acting", "verifying", "waiting", "needs_human"]
"""Where an open incident is: decided nothing yet (below its ladder), asking the workload
whether the GPU still works, an action running, an action being verified, held back by a
guard (``reason`` says which), or a person's turn (``reason`` says why)."""


class OpenIncident(Part):
    """One condition the healer is working on (or waits with, or hands to a person)."""

    event_id: str
    index: GpuIndex
    kind: ConditionKind
    severity: Severity
    phase: IncidentPhase
    reason: str | None = None
    """Why it waits (a guard) or why a person is needed."""
    action: ActionName | None = None
    """The action running, being verified, or wanted."""
    since_ts: Timestamp
    """Event time the incident started."""


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
    incidents: list[OpenIncident] = Field(default_factory=list)
    """Every incident still open, oldest first; ``needs_human`` ones wait for a person."""
    ts: Timestamp


class HealerSet(Message):
    """An operator's command on ``P/H/healer/set``; unknown keys are ignored."""

    enabled: bool | None = None
    reset_breaker: bool | None = None
    dry_run: bool | None = None
    ack: str | None = Field(default=None, min_length=1, max_length=64)
    """The ``event_id`` of a condition a person takes over (one that needs a human)."""

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


StatusReason = Literal["stopped", "lost"]


class Status(Part):
    """A component's availability on ``P/H/<component>/status``: not JSON but the plain string
    ``online`` or ``offline`` (what Home Assistant's availability reads). ``reason`` comes from
    the MQTT v5 user property ``gpuheal-reason`` of an ``offline``: ``stopped`` for a clean
    goodbye, ``lost`` for the Last Will (the component died or lost its connection)."""

    value: Literal["online", "offline"]
    reason: StatusReason | None = None


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

"""The analyzer's pure logic: samples in, retained States and Events out (no MQTT here).

One :class:`Analyzer` serves every GPU of every host it hears. Per GPU it keeps a fixed set of
small detectors and the conditions it holds open, so memory and time per GPU are bounded.

Semantics:

* event time everywhere (``sample.ts``), so a replay at any speed yields the same events;
* a sample whose ``seq`` equals the previous one, or whose ``ts`` is not newer, is ignored and
  counted (a publisher restart resets ``seq``: ``seq`` going backwards with a newer ``ts`` is a
  restart, not a duplicate);
* one ``raised`` per condition, ``escalated`` when its severity rises (never lowered), one
  ``cleared``; ``event_id = make_event_id(host, index, kind, started_ts)`` with ``started_ts``
  the ``ts`` of the sample that raised it;
* every processed sample yields the GPU's State, unless coalescing
  (``state_min_interval_s``) holds it back and nothing in its health changed;
* ``restore(state)`` continues the conditions of a retained State (same ``event_id``, never
  re-raised) before the GPU's first sample.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from analyzer.detectors import (
    KEEP,
    CriticalHealthDetector,
    Detector,
    Finding,
    HangDetector,
    MemoryDetector,
    SilenceTracker,
    ThermalDetector,
    UnavailableDetector,
    XidDetector,
)
from gpuheal.config.detection import AnalyzerConfig
from gpuheal.models import (
    SEVERITY_RANK,
    ConditionKind,
    Event,
    Health,
    Sample,
    Severity,
    State,
    make_event_id,
)

Output = State | Event

KIND_PRIORITY: dict[str, int] = {
    "unavailable": 6,
    "critical_health": 5,
    "gpu_hang": 4,
    "xid_error": 3,
    "thermal_throttling": 2,
    "out_of_memory": 1,
    "unknown_error": 0,
}
"""Which condition names the State's ``error`` when several have the same severity."""


@dataclass(slots=True)
class Condition:
    """A condition the analyzer holds open for one GPU."""

    event_id: str
    kind: ConditionKind
    severity: Severity
    started_ts: float
    message: str


@dataclass
class AnalyzerStats:
    """Counters of what the engine did (for logs and the benchmark)."""

    processed: int = 0
    duplicates: int = 0
    """Samples ignored because their ``seq`` (or ``ts``) repeated the previous one."""
    out_of_order: int = 0
    """Samples ignored because their ``ts`` was older than the newest processed one."""
    publisher_restarts: int = 0
    """``seq`` went backwards with a newer ``ts``: the publisher restarted."""
    states: int = 0
    states_coalesced: int = 0
    events: int = 0
    restored: int = 0


class GpuTrack:
    """Everything the analyzer keeps for one GPU (bounded)."""

    __slots__ = ("active", "clock_reset", "config", "detectors", "host", "index",
                 "last_sample", "last_seq", "last_ts", "name", "pub_signature", "pub_ts",
                 "seen_sample", "silence", "uuid")

    def __init__(self, host: str, index: int, config: AnalyzerConfig) -> None:
        self.host = host
        self.index = index
        self.config = config
        self.name: str | None = None
        self.uuid: str | None = None
        self.detectors = self.fresh_detectors()
        self.clock_reset = False
        """Set when the source clock went back: the detectors start again."""
        self.active: dict[str, Condition] = {}
        self.last_ts: float | None = None
        self.last_seq: int | None = None
        self.last_sample: Sample | None = None
        """The newest sample: what a State is built from (one per GPU, bounded)."""
        self.seen_sample = False
        self.silence = SilenceTracker(config.unavailable)
        self.pub_ts: float | None = None
        self.pub_signature: tuple[Any, ...] | None = None


    def fresh_detectors(self) -> tuple[Detector, ...]:
        config = self.config
        return (
            UnavailableDetector(),
            CriticalHealthDetector(),
            XidDetector(config.xid),
            HangDetector(config.hang),
            ThermalDetector(config.thermal),
            MemoryDetector(config, self.host),
        )


class Analyzer:
    """Per-GPU detectors for every GPU it hears; see the module docstring for the semantics."""

    def __init__(
        self,
        config: AnalyzerConfig,
        started_ts: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``started_ts``: this analyzer's start (UNIX s), written into every State;
        ``clock``: the wall clock used to time sample arrivals (silence detection)."""
        self.config = config
        self.started_ts = started_ts
        self._clock = clock
        self._gpus: dict[tuple[str, int], GpuTrack] = {}
        self.stats = AnalyzerStats()

    # --- queries -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._gpus)

    def gpus(self) -> list[tuple[str, int]]:
        """(host, index) of every GPU tracked."""
        return list(self._gpus)

    def track(self, host: str, index: int) -> GpuTrack | None:
        return self._gpus.get((host, index))

    def has_seen(self, host: str, index: int) -> bool:
        """True once a sample of this GPU was processed (restore no longer applies)."""
        track = self._gpus.get((host, index))
        return track is not None and track.seen_sample

    # --- input ---------------------------------------------------------------------
    def _track(self, host: str, index: int, name: str | None) -> GpuTrack:
        key = (host, index)
        track = self._gpus.get(key)
        if track is None:
            config = self.config.for_gpu(name, host)  # per host / GPU model thresholds
            track = self._gpus[key] = GpuTrack(host, index, config)
        return track

    def process(self, sample: Sample) -> list[Output]:
        """Feed one sample; the Events it caused (in order) and then the GPU's State."""
        events, state_due = self.ingest(sample)
        out: list[Output] = list(events)
        if state_due:
            out.append(self.current_state(sample.host, sample.index))
        return out

    def ingest(self, sample: Sample) -> tuple[list[Event], bool]:
        """Feed one sample; the Events it caused, and whether the GPU's State is due.

        The State itself is built by :meth:`current_state`, so that a caller that falls
        behind can publish only the newest State of a GPU (latest wins) and skip building
        the ones it would throw away.
        """
        track = self._track(sample.host, sample.index, sample.name)
        if not self._accept(track, sample):
            return [], False
        out: list[Event] = []
        if track.clock_reset:
            track.clock_reset = False
            track.detectors = track.fresh_detectors()
            for kind, cond in list(track.active.items()):
                del track.active[kind]
                out.append(self._event(track, cond, "cleared", sample.ts,
                                       f"cleared: the source clock restarted ({cond.message})",
                                       {"source_clock_restarted": True}, None))
        self.stats.processed += 1
        track.seen_sample = True
        track.last_ts = sample.ts
        track.last_seq = sample.seq
        track.last_sample = sample
        if sample.name is not None:
            track.name = sample.name
        if sample.uuid is not None:
            track.uuid = sample.uuid
        track.silence.arrived(sample.ts, self._clock())
        active = track.active
        for detector in track.detectors:
            verdict = detector.update(sample)
            if verdict is KEEP or (verdict is None and detector.kind not in active):
                continue
            self._apply(track, detector.kind, verdict, sample.ts, out, sample)  # type: ignore[arg-type]
        if out and sample.source == "replay":
            for event in out:  # the healer records these but never acts on them
                event.evidence["source"] = "replay"
        return out, self._state_due(track, sample.ts, force=bool(out))

    def current_state(self, host: str, index: int) -> State:
        """The State of a tracked GPU now, from its newest sample."""
        track = self._gpus[(host, index)]
        sample = track.last_sample
        ts = track.last_ts if track.last_ts is not None else 0.0
        health, worst = _health(track.active)
        return build_state(track, sample, ts, health, worst, self.started_ts)

    def _accept(self, track: GpuTrack, sample: Sample) -> bool:
        last_ts = track.last_ts
        if last_ts is None:
            return True
        if sample.ts <= last_ts and sample.seq == 0 and track.last_seq != 0:
            # A publisher's first sample (seq 0) with an older clock: the source restarted
            # behind us (a simulation started anew, a clock stepped back). Ignoring it would
            # blind the analyzer until the clock caught up; the next sample starts clean.
            self.stats.publisher_restarts += 1
            track.clock_reset = True
            return True
        if sample.ts <= last_ts:
            if sample.ts == last_ts or sample.seq == track.last_seq:
                self.stats.duplicates += 1
            else:
                self.stats.out_of_order += 1
            return False
        last_seq = track.last_seq
        if last_seq is not None:
            if sample.seq == last_seq:
                self.stats.duplicates += 1
                return False
            if sample.seq < last_seq:
                self.stats.publisher_restarts += 1
        return True

    def check_silence(self, now_wall: float) -> list[Output]:
        """Raise ``unavailable`` for every GPU silent too long at wall time ``now_wall``."""
        out: list[Output] = []
        for track in self._gpus.values():
            if now_wall < track.silence.deadline_wall or "unavailable" in track.active:
                continue
            finding = track.silence.silent(now_wall)
            if finding is None:
                continue
            ts = max(track.silence.extrapolated_ts(), track.last_ts or 0.0)
            self._apply(track, "unavailable", finding, ts, out, None)
            state = self._state(track, None, ts, force=True)
            if state is not None:
                out.append(state)
        return out

    def hold_silence(self, now_wall: float) -> None:
        """Restart every GPU's silence clock at ``now_wall``: the analyzer itself was cut off
        (broker connection lost), so the missing samples say nothing about the GPUs."""
        for track in self._gpus.values():
            track.silence.hold(now_wall)

    def restore(self, state: State) -> bool:
        """Continue the conditions of a retained State (before the GPU's first sample).

        Returns False (and changes nothing) when a sample of that GPU was already processed
        or the GPU was already restored.
        """
        key = (state.host, state.index)
        if key in self._gpus:
            return False
        track = self._track(state.host, state.index, state.name)
        track.name = state.name
        track.uuid = state.uuid
        track.last_ts = state.ts
        by_kind = {d.kind: d for d in track.detectors}
        for cond in state.active:
            detector = by_kind.get(cond.kind)
            if detector is None:
                continue
            track.active[cond.kind] = Condition(
                event_id=cond.event_id,
                kind=cond.kind,
                severity=cond.severity,
                started_ts=cond.started_ts,
                message=cond.message or "",
            )
            detector.restore(cond.severity, cond.started_ts, state.ts)
        self.stats.restored += 1
        return True

    # --- conditions ------------------------------------------------------------------
    def _apply(
        self,
        track: GpuTrack,
        kind: ConditionKind,
        verdict: Finding | None,
        ts: float,
        out: list[Output],
        sample: Sample | None,
    ) -> None:
        cond = track.active.get(kind)
        if verdict is None:
            if cond is None:
                return
            del track.active[kind]
            out.append(self._event(track, cond, "cleared", ts, f"cleared: {cond.message}",
                                   _clear_evidence(cond, ts, sample), None))
            return
        if cond is None:
            cond = Condition(
                event_id=make_event_id(track.host, track.index, kind, ts),
                kind=kind,
                severity=verdict.severity,
                started_ts=ts,
                message=verdict.message,
            )
            track.active[kind] = cond
            out.append(self._event(track, cond, "raised", ts, verdict.message,
                                   verdict.evidence, verdict.recommended_action))
            return
        if SEVERITY_RANK[verdict.severity] > SEVERITY_RANK[cond.severity]:
            cond.severity = verdict.severity
            cond.message = verdict.message
            out.append(self._event(track, cond, "escalated", ts, verdict.message,
                                   verdict.evidence, verdict.recommended_action))
        elif verdict.severity == cond.severity:
            cond.message = verdict.message

    def _event(
        self,
        track: GpuTrack,
        cond: Condition,
        phase: str,
        ts: float,
        message: str,
        evidence: dict[str, Any],
        action: str | None,
    ) -> Event:
        self.stats.events += 1
        return Event(
            event_id=cond.event_id,
            host=track.host,
            index=track.index,
            kind=cond.kind,
            severity=cond.severity,
            phase=phase,  # type: ignore[arg-type]
            started_ts=cond.started_ts,
            ts=ts,
            message=message,
            evidence=evidence,
            recommended_action=action,  # type: ignore[arg-type]
        )

    # --- state -------------------------------------------------------------------------
    def _state(
        self, track: GpuTrack, sample: Sample | None, ts: float, force: bool
    ) -> State | None:
        if not self._state_due(track, ts, force):
            return None
        health, worst = _health(track.active)
        return build_state(track, sample, ts, health, worst, self.started_ts)

    def _state_due(self, track: GpuTrack, ts: float, force: bool) -> bool:
        """Whether a State is published for this change (``state_min_interval_s``)."""
        health, _ = _health(track.active)
        signature = (health, *((c.event_id, c.severity) for c in track.active.values()))
        interval = self.config.state_min_interval_s
        if (
            not force
            and interval > 0
            and track.pub_ts is not None
            and signature == track.pub_signature
            and ts - track.pub_ts < interval
        ):
            self.stats.states_coalesced += 1
            return False
        track.pub_ts = ts
        track.pub_signature = signature
        self.stats.states += 1
        return True


def _health(active: dict[str, Condition]) -> tuple[Health, Condition | None]:
    """The State's health and the condition that names its error."""
    if not active:
        return "healthy", None
    worst = max(active.values(),
                key=lambda c: (c.kind == "unavailable", SEVERITY_RANK[c.severity],
                               KIND_PRIORITY.get(c.kind, 0)))
    if worst.kind == "unavailable":
        return "unavailable", worst
    return ("warning" if worst.severity == "warning" else "critical"), worst


def _clear_evidence(cond: Condition, ts: float, sample: Sample | None) -> dict[str, Any]:
    evidence: dict[str, Any] = {"duration_s": round(ts - cond.started_ts, 3),
                                "max_severity": cond.severity}
    if sample is not None:
        evidence.update(
            temperature_c=sample.temperature_c,
            utilization_pct=sample.utilization_pct,
            memory_used_mb=sample.memory_used_mb,
            power_draw_w=sample.power_draw_w,
            available=sample.available,
        )
    return evidence


def build_state(
    track: GpuTrack,
    sample: Sample | None,
    ts: float,
    health: Health,
    worst: Condition | None,
    analyzer_started_ts: float,
) -> State:
    """The origin's ``GET /api/gpu`` object for this GPU; readings None without a sample.

    Built from a plain dict in one validation pass (pydantic's core is faster at that than
    ``model_construct`` of the nested models).
    """
    active = [
        {"event_id": c.event_id, "kind": c.kind, "severity": c.severity,
         "started_ts": c.started_ts, "message": c.message}
        for c in sorted(track.active.values(), key=lambda c: (c.started_ts, c.kind))
    ]
    data: dict[str, Any] = {
        "host": track.host,
        "index": track.index,
        "uuid": track.uuid,
        "name": track.name,
        "health": health,
        "error": worst.kind if worst is not None else "none",
        "error_message": worst.message if worst is not None else None,
        "timestamp": fast_iso_utc(ts),
        "ts": ts,
        "active": active,
        "analyzer_started_ts": analyzer_started_ts,
    }
    if sample is not None:
        used, total = sample.memory_used_mb, sample.memory_total_mb
        data.update(
            temperature=sample.temperature_c,
            utilization=sample.utilization_pct,
            memory={
                "used_mb": used,
                "total_mb": total,
                "percent": round(used * 100.0 / total, 1) if used is not None and total else None,
            },
            power={"draw_w": sample.power_draw_w, "limit_w": sample.power_limit_w},
            clocks={"graphics_mhz": sample.sm_clock_mhz, "memory_mhz": sample.mem_clock_mhz},
            fan_speed=sample.fan_pct,
        )
    return State.model_validate(data)


_iso_cache: dict[int, str] = {}
_ISO_CACHE_MAX = 64


def fast_iso_utc(ts: float) -> str:
    """Exactly ``gpuheal.models.iso_utc(ts)``, with the whole-second part cached.

    Rounds like ``datetime.fromtimestamp`` (to the microsecond, half to even, carrying into
    the second) and then truncates to milliseconds, as ``iso_utc`` does.
    """
    frac, whole = math.modf(ts)
    us = round(frac * 1e6)
    sec = int(whole)
    if us >= 1_000_000:
        sec += 1
        us -= 1_000_000
    elif us < 0:
        sec -= 1
        us += 1_000_000
    head = _iso_cache.get(sec)
    if head is None:
        if len(_iso_cache) >= _ISO_CACHE_MAX:
            _iso_cache.clear()
        head = _iso_cache[sec] = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(sec))
    return f"{head}{us // 1000:03d}Z"

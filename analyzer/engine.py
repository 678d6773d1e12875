"""The analyzer's pure logic: samples in, retained States and Events out (no MQTT here).

One :class:`Analyzer` serves every GPU of every host it hears. Per GPU it keeps a fixed set of
small detectors and the conditions it holds open, so memory and time per GPU are bounded.

Semantics:

* event time everywhere (``sample.ts``), so a replay at any speed yields the same events;
* ordering: a sample with the previous ``seq`` is a duplicate, an older ``seq`` with an older
  ``ts`` is out of order: both are ignored and counted;
* a publisher restart: ``seq`` back to 0 with an older ``ts`` (a new simulation, a replay
  started again) clears every open condition with ONE ``cleared`` event each
  (``cleared_by="source_restarted"``) and starts the GPU's detectors clean; ``seq`` going
  backwards with a newer ``ts`` is a restart that continues (conditions stay);
* a source clock step: ``seq`` continues while ``ts`` goes back, or jumps forward more than
  ``max(step_min_s, 10 observed intervals)`` although the sample arrived on time by the wall
  clock. The sample is accepted and the GPU's stored event times are re-anchored (every
  detector, the silence tracker and the conditions' durations shift by the step), so no window
  elapses or restarts by the step; one warning is logged and ``stats.clock_steps`` counted.
  ``started_ts`` (the identity of ``event_id``) never changes;
* one ``raised`` per condition, ``escalated`` when its severity rises (never lowered), one
  ``cleared`` carrying the reading that cleared it and ``cleared_by``;
  ``event_id = make_event_id(host, index, kind, started_ts)`` with ``started_ts`` the ``ts`` of
  the sample that raised it;
* :meth:`Analyzer.acknowledge`: a person takes a condition over; it is cleared
  (``cleared_by="acknowledged"``) and not raised again while the same situation lasts (its
  kind is muted until the detector says it no longer holds, unless it gets worse);
* :meth:`Analyzer.note_reset`: a GPU reset was seen (reset/reboot-class XIDs may recover);
* :meth:`Analyzer.source_stopped`: a host's publisher said goodbye: no silence verdicts for
  its GPUs until they speak again;
* every processed sample makes the GPU's State due; when it is published is the service's
  choice (:mod:`analyzer.service`: at once with an Event, otherwise at most every
  ``state_min_interval_s`` wall seconds, newest wins); :meth:`Analyzer.current_state_json` is
  its wire form, built without a model;
* ``restore(state)`` continues the conditions of a retained State (same ``event_id``, never
  re-raised) before the GPU's first sample.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pydantic_core

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
    ClearedBy,
    ConditionKind,
    Event,
    Health,
    Phase,
    Sample,
    Severity,
    State,
    make_event_id,
)

log = logging.getLogger(__name__)

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

STEP_INTERVALS = 10.0
"""A forward clock step jumps more than this many observed intervals (and ``step_min_s``)."""
BLIND_CHECK_SAMPLES = 5
"""Consecutive sample intervals too long for the hang window before the engine warns."""


@dataclass(slots=True)
class Condition:
    """A condition the analyzer holds open for one GPU."""

    event_id: str
    kind: ConditionKind
    severity: Severity
    started_ts: float
    """Identity (``event_id``): the ``ts`` of the sample that raised it, never changed."""
    message: str
    anchor_ts: float = math.nan
    """When it started on the current (re-anchored) timeline: what durations count from."""

    def __post_init__(self) -> None:
        if math.isnan(self.anchor_ts):
            self.anchor_ts = self.started_ts


@dataclass
class AnalyzerStats:
    """Counters of what the engine did (for logs and the benchmark)."""

    processed: int = 0
    duplicates: int = 0
    """Samples ignored because their ``seq`` (or ``ts``) repeated the previous one."""
    out_of_order: int = 0
    """Samples ignored because their ``seq`` and ``ts`` were older than the newest ones."""
    publisher_restarts: int = 0
    """``seq`` went backwards: the publisher restarted."""
    clock_steps: int = 0
    """A source clock stepped (back, or forward faster than the wall clock): re-anchored."""
    states: int = 0
    """States that became due (one per processed sample, plus silence and acknowledgements)."""
    events: int = 0
    restored: int = 0
    acknowledged: int = 0


class GpuTrack:
    """Everything the analyzer keeps for one GPU (bounded)."""

    __slots__ = ("active", "blind_warned", "config", "detectors", "host", "index",
                 "last_sample", "last_seq", "last_ts", "muted", "name", "seen_sample",
                 "silence", "slow_samples", "source", "source_restarted", "uuid")

    def __init__(self, host: str, index: int, config: AnalyzerConfig) -> None:
        self.host = host
        self.index = index
        self.config = config
        self.name: str | None = None
        self.uuid: str | None = None
        self.source: str | None = None
        """The ``source`` of the newest sample (written into the State)."""
        self.detectors: tuple[Detector, ...] = ()
        self.fresh_detectors()
        self.source_restarted = False
        """Set when the publisher restarted behind us: conditions end, detectors start again."""
        self.active: dict[str, Condition] = {}
        self.muted: dict[str, Severity] = {}
        """Kinds a person acknowledged, with that severity: not raised again until the
        detector says the condition no longer holds (or it gets worse)."""
        self.last_ts: float | None = None
        self.last_seq: int | None = None
        self.last_sample: Sample | None = None
        """The newest sample: what a State is built from (one per GPU, bounded)."""
        self.seen_sample = False
        self.slow_samples = 0
        """Consecutive intervals too long to confirm a hang (warned once at 5)."""
        self.blind_warned = False
        self.silence = SilenceTracker(config.unavailable)

    def fresh_detectors(self) -> None:
        """A new set of detectors (nothing remembered)."""
        config = self.config
        self.detectors = (
            UnavailableDetector(),
            CriticalHealthDetector(),
            XidDetector(config.xid),
            HangDetector(config.hang),
            ThermalDetector(config.thermal),
            MemoryDetector(config, self.host),
        )

    def detector(self, kind: str) -> Detector | None:
        """This GPU's detector of ``kind``."""
        return next((d for d in self.detectors if d.kind == kind), None)

    def shift(self, delta_s: float) -> None:
        """Move every stored event time of this GPU by ``delta_s`` (a re-anchored step)."""
        for detector in self.detectors:
            detector.shift(delta_s)
        self.silence.shift(delta_s)
        for cond in self.active.values():
            cond.anchor_ts += delta_s
        if self.last_ts is not None:
            self.last_ts += delta_s


class Analyzer:
    """Per-GPU detectors for every GPU it hears; see the module docstring for the semantics."""

    def __init__(
        self,
        config: AnalyzerConfig,
        started_ts: float,
        clock: Callable[[], float] = time.time,
        name: str | None = None,
    ) -> None:
        """``started_ts``: this analyzer's start (UNIX s), written into every State;
        ``clock``: the wall clock used to time sample arrivals (silence, clock steps);
        ``name``: the host name this analyzer runs as (``State.analyzer``: whose status
        says whether the States are still written)."""
        self.config = config
        self.started_ts = started_ts
        self.name = name
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
        wall = self._clock()
        if not self._accept(track, sample, wall):
            return [], False
        out: list[Event] = []
        if track.source_restarted:
            track.source_restarted = False
            track.fresh_detectors()
            track.silence.restart()
            track.muted.clear()
            for kind, cond in list(track.active.items()):
                del track.active[kind]
                out.append(self._event(
                    track, cond, "cleared", sample.ts,
                    f"cleared: the source restarted, so the condition says nothing any more "
                    f"(was: {cond.message})",
                    {"source_restarted": True, "max_severity": cond.severity},
                    None, "source_restarted"))
        self.stats.processed += 1
        track.seen_sample = True
        track.last_ts = sample.ts
        track.last_seq = sample.seq
        track.last_sample = sample
        track.source = sample.source
        if sample.name is not None:
            track.name = sample.name
        if sample.uuid is not None:
            track.uuid = sample.uuid
        silence = track.silence
        if not track.blind_warned and silence.last_ts is not None:
            self._watch_interval(track, sample.ts - silence.last_ts)
        gap = silence.gap(sample.ts)
        if gap is not None and "unavailable" not in track.active \
                and "unavailable" not in track.muted:
            # The samples' own clock shows the GPU missed its deadline, though the wall clock
            # did not notice (a fast replay): the same verdict as a live silence check.
            self._apply(track, "unavailable", gap, silence.extrapolated_ts(), out, None, None)
        silence.arrived(sample.ts, wall)
        active = track.active
        muted = track.muted
        for detector in track.detectors:
            verdict = detector.update(sample)
            kind = detector.kind
            if muted and kind in muted:
                if verdict is None:
                    del muted[kind]      # the situation the person took over has ended
                    continue
                if verdict is KEEP or SEVERITY_RANK[verdict.severity] <= SEVERITY_RANK[
                        muted[kind]]:
                    continue
                del muted[kind]          # worse than what the person took over: raise anew
            if verdict is KEEP or (verdict is None and kind not in active):
                continue
            self._apply(track, kind, verdict, sample.ts, out, sample, detector)  # type: ignore[arg-type]
        if out and sample.source == "replay":
            for event in out:  # the healer records these but never acts on them
                event.evidence["source"] = "replay"
        self.stats.states += 1
        return out, True

    def _watch_interval(self, track: GpuTrack, interval_s: float) -> None:
        """Warn once per GPU when its samples keep coming too far apart to confirm a hang."""
        if interval_s <= track.config.hang.window_s / 3:  # the cheap test of blind_spots
            track.slow_samples = 0
            return
        track.slow_samples += 1
        if track.slow_samples < BLIND_CHECK_SAMPLES:
            return
        track.blind_warned = True
        for message in track.config.hang.blind_spots(interval_s,
                                                     f"{track.host}/gpu/{track.index}"):
            log.warning("analyzer: %s", message)

    def current_state(self, host: str, index: int) -> State:
        """The State of a tracked GPU now, from its newest sample."""
        track = self._gpus[(host, index)]
        sample = track.last_sample
        ts = track.last_ts if track.last_ts is not None else 0.0
        health, worst = _health(track.active)
        return build_state(track, sample, ts, health, worst, self.started_ts, self.name)

    def current_state_json(self, host: str, index: int) -> bytes:
        """``current_state(host, index).to_json()``, the same bytes, built without a model
        (see :func:`state_json`). ValueError for a State that cannot be valid (a reading
        whose memory percent overflows)."""
        track = self._gpus[(host, index)]
        ts = track.last_ts if track.last_ts is not None else 0.0
        health, worst = _health(track.active)
        return state_json(track, track.last_sample, ts, health, worst, self.started_ts,
                          self.name)

    def _accept(self, track: GpuTrack, sample: Sample, wall: float) -> bool:
        """Whether to process ``sample``; sets up a restart or re-anchors a clock step."""
        last_ts = track.last_ts
        if last_ts is None:
            return True
        last_seq = track.last_seq
        ts, seq = sample.ts, sample.seq
        if ts <= last_ts and seq == 0 and last_seq != 0:
            # A publisher's first sample (seq 0) with an older clock: the source restarted
            # behind us (a simulation started anew, a replay again). Ignoring it would blind
            # the analyzer until the clock caught up; the conditions of the old run end.
            self.stats.publisher_restarts += 1
            track.source_restarted = True
            return True
        if seq == last_seq:
            self.stats.duplicates += 1
            return False
        if last_seq is not None and seq > last_seq and ts < last_ts:
            # The same run goes on (seq continues) but its clock went back: a step.
            self._step(track, sample, last_ts + (seq - last_seq) * self._interval(track))
            return True
        if ts <= last_ts:
            if ts == last_ts:
                self.stats.duplicates += 1
            else:
                self.stats.out_of_order += 1
            return False
        if last_seq is None:
            return True
        if seq < last_seq:
            self.stats.publisher_restarts += 1  # a new run whose clock is ahead: continues
            track.silence.restart_rate()
            return True
        self._check_forward_step(track, sample, last_ts, last_seq, wall)
        return True

    def _interval(self, track: GpuTrack) -> float:
        return track.silence.ema_event_s or 0.0

    def _check_forward_step(self, track: GpuTrack, sample: Sample, last_ts: float,
                            last_seq: int, wall: float) -> None:
        """Re-anchor a jump forward that the wall clock does not explain."""
        silence = track.silence
        interval = silence.ema_event_s
        if interval is None or silence.last_wall is None:
            return
        seqs = sample.seq - last_seq
        jump = sample.ts - last_ts
        threshold = max(track.config.unavailable.step_min_s, STEP_INTERVALS * interval * seqs)
        if jump <= threshold:
            return
        wall_gap = wall - silence.last_wall
        if wall_gap > 0.0:
            rate = silence.rate()
            if rate is None:
                return  # the wall clock may explain it: cannot tell
            if jump - wall_gap * rate <= threshold:
                return  # the time really passed (the publisher paused, samples were lost)
        self._step(track, sample, last_ts + seqs * interval)

    def _step(self, track: GpuTrack, sample: Sample, expected_ts: float) -> None:
        delta = sample.ts - expected_ts
        track.shift(delta)
        self.stats.clock_steps += 1
        log.warning("analyzer: the source clock of %s/gpu/%d stepped %+.1f s (seq %s -> %d); "
                    "re-anchored, conditions and windows go on", track.host, track.index,
                    delta, track.last_seq, sample.seq)

    def check_silence(self, now_wall: float) -> list[Output]:
        """Raise ``unavailable`` for every GPU silent too long at wall time ``now_wall``."""
        out: list[Output] = []
        for track in self._gpus.values():
            if (now_wall < track.silence.deadline_wall or "unavailable" in track.active
                    or "unavailable" in track.muted):
                continue
            finding = track.silence.silent(now_wall)
            if finding is None:
                continue
            ts = max(track.silence.extrapolated_ts(), track.last_ts or 0.0)
            self._apply(track, "unavailable", finding, ts, out, None, None)
            health, worst = _health(track.active)
            self.stats.states += 1
            out.append(build_state(track, None, ts, health, worst, self.started_ts, self.name))
        return out

    def hold_silence(self, now_wall: float) -> None:
        """Restart every GPU's silence clock at ``now_wall``: the analyzer itself was cut off
        (broker connection lost), so the missing samples say nothing about the GPUs."""
        for track in self._gpus.values():
            track.silence.hold(now_wall)

    def source_stopped(self, host: str, now_wall: float) -> None:
        """The publisher of ``host`` said goodbye (or a replay ended) at ``now_wall``: its
        GPUs' silence is not judged until a new sample of each arrives."""
        for (gpu_host, _index), track in self._gpus.items():
            if gpu_host == host:
                track.silence.stop()

    def note_reset(self, host: str, index: int, ts: float) -> None:
        """A GPU reset of this GPU succeeded at ``ts`` (the healer's ``reset_gpu`` Action):
        reset- and reboot-class XID conditions may recover after their quiet time."""
        track = self._gpus.get((host, index))
        if track is None:
            return
        xid = track.detector("xid_error")
        if isinstance(xid, XidDetector):
            xid.note_reset(ts)
        log.info("analyzer: GPU reset of %s/gpu/%d noted", host, index)

    def acknowledge(self, host: str, index: int, event_id: str, ts: float) -> list[Output]:
        """A person takes over the active condition ``event_id`` (at ``ts``): it is cleared
        (``cleared_by="acknowledged"``); returns that Event and the GPU's new State. Nothing
        for an id that is not active on this GPU."""
        track = self._gpus.get((host, index))
        if track is None:
            return []
        cond = next((c for c in track.active.values() if c.event_id == event_id), None)
        if cond is None:
            return []
        del track.active[cond.kind]
        detector = track.detector(cond.kind)
        if detector is not None:
            detector.acknowledged()
        track.muted[cond.kind] = cond.severity
        self.stats.acknowledged += 1
        event_ts = max(track.last_ts if track.last_ts is not None else ts, cond.anchor_ts)
        event = self._event(
            track, cond, "cleared", event_ts,
            f"cleared: acknowledged, a person took it over (was: {cond.message})",
            {"acknowledged_ts": ts, "duration_s": round(event_ts - cond.anchor_ts, 3),
             "max_severity": cond.severity},
            None, "acknowledged")
        if track.source == "replay":
            event.evidence["source"] = "replay"
        health, worst = _health(track.active)
        self.stats.states += 1
        state = build_state(track, track.last_sample, event_ts, health, worst, self.started_ts,
                            self.name)
        return [event, state]

    def forget(self, host: str, index: int) -> bool:
        """Drop a GPU whose retained State was deleted (a machine gone for good: ``gpuheal
        status --forget``); its next sample, if one ever comes, starts it afresh."""
        return self._gpus.pop((host, index), None) is not None

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
        track.source = state.source
        track.last_ts = state.ts
        for cond in state.active:
            detector = track.detector(cond.kind)
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
        detector: Detector | None,
    ) -> None:
        cond = track.active.get(kind)
        if verdict is None:
            if cond is None:
                return
            del track.active[kind]
            if detector is not None and sample is not None:
                message, evidence = detector.cleared(sample)
            else:
                message, evidence = f"cleared: {cond.message}", {}
            evidence["duration_s"] = round(ts - cond.anchor_ts, 3)
            evidence["max_severity"] = cond.severity
            out.append(self._event(track, cond, "cleared", ts, message, evidence, None,
                                   "recovered"))
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
        phase: Phase,
        ts: float,
        message: str,
        evidence: dict[str, Any],
        action: Any,
        cleared_by: ClearedBy | None = None,
    ) -> Event:
        self.stats.events += 1
        return Event(
            event_id=cond.event_id,
            host=track.host,
            index=track.index,
            kind=cond.kind,
            severity=cond.severity,
            phase=phase,
            started_ts=cond.started_ts,
            ts=ts,
            message=message,
            evidence=evidence,
            recommended_action=action,
            cleared_by=cleared_by,
        )

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


def build_state(
    track: GpuTrack,
    sample: Sample | None,
    ts: float,
    health: Health,
    worst: Condition | None,
    analyzer_started_ts: float,
    analyzer: str | None = None,
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
        "source": track.source,
        "analyzer": analyzer,
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


_enc = json.encoder.encode_basestring  # JSON string with quotes; non-ASCII as is
_NO_READINGS = ('"temperature":null,"utilization":null,'
                '"memory":{"used_mb":null,"total_mb":null,"percent":null},'
                '"power":{"draw_w":null,"limit_w":null},'
                '"clocks":{"graphics_mhz":null,"memory_mhz":null},"fan_speed":null')
_valid_names: set[str] = set()


def _num(value: float | None) -> str:
    """A float field as pydantic writes it: Python's repr, except that pydantic spells small
    numbers without Python's zero-padded exponent (``0.000015``, ``1.5e-6``)."""
    if value is None:
        return "null"
    if value.__class__ is not float:
        value = float(value)
    text = repr(value)
    if "e-" in text:
        return pydantic_core.to_json(value).decode()
    return text


def _text(value: str | None) -> str:
    return "null" if value is None else _enc(value)


def _host_name(value: str | None) -> str:
    """A ``Host | None`` field, checked as the model checks it (once per name)."""
    if value is None:
        return "null"
    if value not in _valid_names:
        if not (0 < len(value) <= 128 and re.fullmatch(r"[A-Za-z0-9_-]+", value)):
            raise ValueError(f"not a valid host name: {value!r}")
        _valid_names.add(value)
    return _enc(value)


def state_json(
    track: GpuTrack,
    sample: Sample | None,
    ts: float,
    health: Health,
    worst: Condition | None,
    analyzer_started_ts: float,
    analyzer: str | None = None,
) -> bytes:
    """``build_state(...).to_json()``, the same bytes, without building and validating a model
    (a State's values come from validated samples and the engine's own conditions; what could
    still be invalid, a memory percent that overflows or a bad analyzer name, raises
    ValueError as the model would)."""
    if sample is None:
        readings = _NO_READINGS
    else:
        used, total = sample.memory_used_mb, sample.memory_total_mb
        percent = round(used * 100.0 / total, 1) if used is not None and total else None
        if percent is not None and not math.isfinite(percent):
            raise ValueError(f"memory percent is not finite ({used} of {total} MiB)")
        readings = (
            f'"temperature":{_num(sample.temperature_c)},'
            f'"utilization":{_num(sample.utilization_pct)},'
            f'"memory":{{"used_mb":{_num(used)},"total_mb":{_num(total)},'
            f'"percent":{_num(percent)}}},'
            f'"power":{{"draw_w":{_num(sample.power_draw_w)},'
            f'"limit_w":{_num(sample.power_limit_w)}}},'
            f'"clocks":{{"graphics_mhz":{_num(sample.sm_clock_mhz)},'
            f'"memory_mhz":{_num(sample.mem_clock_mhz)}}},'
            f'"fan_speed":{_num(sample.fan_pct)}')
    active = ",".join(
        f'{{"event_id":{_enc(c.event_id)},"kind":"{c.kind}","severity":"{c.severity}",'
        f'"started_ts":{_num(c.started_ts)},"message":{_text(c.message)}}}'
        for c in sorted(track.active.values(), key=lambda c: (c.started_ts, c.kind)))
    if worst is None:
        error, error_message = "none", "null"
    else:
        error, error_message = worst.kind, _text(worst.message)
    return (
        f'{{"v":1,"host":{_host_name(track.host)},"index":{track.index:d},'
        f'"uuid":{_text(track.uuid)},"name":{_text(track.name)},{readings},'
        f'"health":"{health}","error":"{error}","error_message":{error_message},'
        f'"timestamp":"{fast_iso_utc(ts)}","ts":{_num(ts)},"active":[{active}],'
        f'"analyzer_started_ts":{_num(analyzer_started_ts)},"source":{_text(track.source)},'
        f'"analyzer":{_host_name(analyzer)}}}'
    ).encode()


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

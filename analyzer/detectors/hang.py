"""GPU hang (``gpu_hang``): sustained full utilization, confirmed only with evidence that a
healthy GPU cannot produce.

Utilization only says that a kernel is resident: a hung NCCL collective shows 100 % exactly like
a healthy training step, and an inference server pinned at its power cap with preallocated
memory shows flat power and constant memory too. So:

* utilization ``>= util_pct`` (99 %) sustained for ``>= window_s`` (30 s) of event time raises a
  *suspected* hang (``warning``, no recommended action);
* it is *confirmed* (``critical``, ``reset_gpu``) only with corroboration: power, memory and SM
  clock flat over the window while the draw is well below the power limit, or a hang XID (the
  GPU itself is stuck: 8, 109, 119) during the high-utilization run;
* a dip below ``util_pct`` restarts the flatness evidence, but the run (and its condition) ends
  only after ``clear_after_s`` (15 s) of event time below it: 1 s dips do not flap;
* a missing utilization (MIG instances report none) says nothing: no hang detection.

Flat power is evidence only while the draw is at most ``flat_power_max_pct`` (85 %) of the
sample's current power limit AND below ``limit - max(limit_margin_w, limit_margin_pct %)``: a
GPU sitting on its cap — whoever set it, the healer's own throttle included — draws flat power
while healthy. A power-cap throttle reason (``sw_power_cap``, ``hw_power_brake_slowdown``) says
the same. A sample without a power limit uses ``assumed_power_limit_w`` (a Jetson's nvpmodel
budget); with no limit at all, flat power is no evidence. Memory must be exactly constant by
default (``memory_tolerance_mb = 0``) and the SM clock, where reported, within one boost bin
(``clock_tolerance_mhz``): a healthy power-capped GPU moves its clock.

Flatness is O(1): a "flat since" time with reference power, memory and clock, restarted whenever
one moves out of tolerance, a sample is not evidence, or two samples are more than a third of
the window apart; it needs at least ``min_flat_samples`` samples.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from analyzer.detectors.base import KEEP, Detector, Finding, Verdict
from gpuheal.config.detection import HangConfig
from gpuheal.models import Sample, Severity

MOVING = "power, memory or clock moving"


@lru_cache(maxsize=64)
def _shared(items: tuple[str | int, ...]) -> frozenset[str | int]:
    """One frozenset per distinct configured list, shared by every GPU's detector."""
    return frozenset(items)


class HangDetector(Detector):
    """Windowed hang detector for one GPU (event time, constant memory)."""

    __slots__ = ("_below_since", "_cap_reasons", "_config", "_flat_count", "_flat_since",
                 "_hang_xids", "_last_below_s", "_last_ts", "_ref_clock", "_ref_mem",
                 "_ref_power", "_run_start", "_why", "_xids_seen")
    kind = "gpu_hang"

    def __init__(self, config: HangConfig) -> None:
        self._config = config
        self._hang_xids = _shared(tuple(config.hang_xids))
        self._cap_reasons = _shared(tuple(config.power_cap_reasons))
        self._run_start: float | None = None
        """Event time of the first sample of the current high-utilization run."""
        self._below_since: float | None = None
        """Event time of the first sample of the current dip below ``util_pct`` (in a run)."""
        self._last_below_s = 0.0
        """How long the dip that ended the last run lasted (for the cleared message)."""
        self._flat_since: float | None = None
        """Event time since which power, memory and clock stayed flat (None: no evidence)."""
        self._ref_power = 0.0
        self._ref_mem = 0.0
        self._ref_clock: float | None = None
        self._flat_count = 0
        """Samples seen since ``_flat_since``: flatness needs several observations."""
        self._last_ts: float | None = None
        self._why = ""
        """Why the newest sample is no flatness evidence ("" when it is)."""
        self._xids_seen: frozenset[int] = frozenset()
        """Hang XIDs seen during the current run (a subset of the configured codes)."""

    def _end_run(self) -> None:
        self._run_start = None
        self._below_since = None
        self._flat_since = None
        self._last_ts = None
        self._xids_seen = frozenset()

    def _not_evidence(self, sample: Sample) -> str:
        """Why this sample's power cannot testify to a hang ("" when it can)."""
        c = self._config
        power, mem = sample.power_draw_w, sample.memory_used_mb
        if power is None or mem is None:
            return "power or memory not reported"
        limit = sample.power_limit_w or c.assumed_power_limit_w
        if not limit:
            return "no power limit known, so flat power says nothing"
        reasons = sample.throttle_reasons
        if reasons:
            capped = self._cap_reasons.intersection(reasons)
            if capped:
                return f"at its power cap ({', '.join(sorted(capped))})"
        margin = max(c.limit_margin_w, limit * c.limit_margin_pct / 100.0)
        if power > limit * c.flat_power_max_pct / 100.0 or power >= limit - margin:
            return (f"power {power:g} W is {100.0 * power / limit:.0f} % of its {limit:g} W "
                    "limit, where a healthy GPU draws flat power")
        return ""

    def _within(self, sample: Sample) -> bool:
        c = self._config
        power, mem = sample.power_draw_w, sample.memory_used_mb
        assert power is not None and mem is not None
        power_tol = max(c.power_tolerance_w, abs(self._ref_power) * c.power_tolerance_pct / 100)
        if abs(power - self._ref_power) > power_tol:
            return False
        if abs(mem - self._ref_mem) > c.memory_tolerance_mb:
            return False
        clock, ref = sample.sm_clock_mhz, self._ref_clock
        if clock is None or ref is None:
            return clock is None and ref is None
        return abs(clock - ref) <= c.clock_tolerance_mhz

    def _track_flat(self, sample: Sample) -> None:
        ts = sample.ts
        last, self._last_ts = self._last_ts, ts
        why = self._not_evidence(sample)
        if why:
            self._flat_since = None
            self._why = why
            return
        # Between two samples further apart than a third of the window anything may have
        # happened (lost QoS 0 samples, a slow interval): flatness starts again.
        gap = last is not None and ts - last > self._config.window_s / 3
        if self._flat_since is not None and not gap and self._within(sample):
            self._flat_count += 1
            self._why = ""
            return
        if gap:
            self._why = f"samples more than {self._config.window_s / 3:g} s apart"
        else:
            self._why = MOVING if self._flat_since is not None else ""
        self._flat_since = ts
        self._flat_count = 1
        self._ref_power = sample.power_draw_w or 0.0
        self._ref_mem = sample.memory_used_mb or 0.0
        self._ref_clock = sample.sm_clock_mhz

    def update(self, sample: Sample) -> Verdict:
        c = self._config
        util = sample.utilization_pct
        if util is None:
            return KEEP
        ts = sample.ts
        if util < c.util_pct:
            if self._run_start is None:
                return None
            # A dip: whatever was flat before says nothing about after (evidence restarts),
            # but only a stretch below the threshold ends the run.
            self._flat_since = None
            self._last_ts = None
            if self._below_since is None:
                self._below_since = ts
            if ts - self._below_since >= c.clear_after_s:
                self._last_below_s = ts - self._below_since
                self._end_run()
                return None
            return KEEP
        self._below_since = None
        if self._run_start is None:
            self._run_start = ts
            self._flat_since = None
            self._last_ts = None
        self._track_flat(sample)
        if sample.xids:
            seen = self._hang_xids.intersection(sample.xids)
            if seen:
                self._xids_seen = self._xids_seen | seen
        sustained = ts - self._run_start
        if sustained < c.window_s:
            return None
        flat_s = ts - self._flat_since if self._flat_since is not None else 0.0
        flat = flat_s >= c.window_s and self._flat_count >= c.min_flat_samples
        xids = sorted(self._xids_seen)
        evidence: dict[str, Any] = {
            "utilization_pct": util,
            "sustained_s": round(sustained, 3),
            "power_memory_flat_s": round(flat_s, 3),
            "power_draw_w": sample.power_draw_w,
            "power_limit_w": sample.power_limit_w or c.assumed_power_limit_w,
            "memory_used_mb": sample.memory_used_mb,
            "sm_clock_mhz": sample.sm_clock_mhz,
            "hang_xids": xids,
            "confirmed": flat or bool(xids),
        }
        if not (flat or xids):
            why = self._why or (f"flat for {flat_s:.0f} s of the {c.window_s:g} s window"
                                if self._flat_since is not None else MOVING)
            evidence["not_confirmed_because"] = why
            return Finding(
                severity="warning",
                message=(f"suspected hang: utilization {util:g} % for {sustained:.0f} s, "
                         f"not confirmed: {why}"),
                evidence=evidence,
                recommended_action=None,
            )
        reasons = []
        if flat:
            reasons.append(f"power, memory and clock flat for {flat_s:.0f} s well below the "
                           "power limit")
        if xids:
            reasons.append(f"hang XID {', '.join(str(x) for x in xids)}")
        return Finding(
            severity="critical",
            message=(f"hang confirmed: utilization {util:g} % for {sustained:.0f} s, "
                     + " and ".join(reasons)),
            evidence=evidence,
            recommended_action="reset_gpu",
        )

    def cleared(self, sample: Sample) -> tuple[str, dict[str, Any]]:
        util = sample.utilization_pct
        below = self._last_below_s
        return (f"cleared: utilization {util:g} % for {below:.0f} s, below "
                f"{self._config.util_pct:g} %",
                {"utilization_pct": util, "below_s": round(below, 3),
                 "util_pct": self._config.util_pct, "power_draw_w": sample.power_draw_w,
                 "memory_used_mb": sample.memory_used_mb})

    def shift(self, delta_s: float) -> None:
        if self._run_start is not None:
            self._run_start += delta_s
        if self._below_since is not None:
            self._below_since += delta_s
        if self._flat_since is not None:
            self._flat_since += delta_s
        if self._last_ts is not None:
            self._last_ts += delta_s

    def restore(self, severity: Severity, started_ts: float, state_ts: float) -> None:
        # The condition was raised when the run reached the window: the run began then.
        self._run_start = started_ts - self._config.window_s
        self._below_since = None
        self._flat_since = None

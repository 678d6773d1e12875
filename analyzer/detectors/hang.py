"""GPU hang (``gpu_hang``): sustained full utilization, confirmed only with corroboration.

Utilization only says that a kernel is resident: a hung NCCL collective shows 100 % exactly like
a healthy training step. So:

* utilization ``>= util_pct`` (99 %) sustained for ``>= window_s`` (30 s) of event time raises a
  *suspected* hang (``warning``, no recommended action);
* it is *confirmed* (``critical``, ``reset_gpu``) only with corroboration: power AND memory flat
  over the window, or a hang XID (8, 43, 45, 109) during the high-utilization run;
* any sample below ``util_pct`` ends the run (the condition clears);
* a missing utilization (MIG instances report none) says nothing: no hang detection.

Flatness is O(1): a "flat since" time with reference power and memory, reset whenever power
moves more than ``max(power_tolerance_w, power_tolerance_pct % of the reference)`` or memory
more than ``memory_tolerance_mb`` from the reference, or when two samples are more than a third
of the window apart; it needs at least ``min_flat_samples`` samples. A GPU doing healthy work
moves its power and memory, so it is never confirmed.
"""

from __future__ import annotations

from analyzer.detectors.base import KEEP, Detector, Finding, Verdict
from gpuheal.config.detection import HangConfig
from gpuheal.models import Sample, Severity


class HangDetector(Detector):
    """Windowed hang detector for one GPU (event time, constant memory)."""

    __slots__ = ("_config", "_flat_count", "_flat_since", "_hang_xids", "_last_ts",
                 "_ref_mem", "_ref_power", "_run_start", "_xids_seen")
    kind = "gpu_hang"

    def __init__(self, config: HangConfig) -> None:
        self._config = config
        self._hang_xids = frozenset(config.hang_xids)
        self._run_start: float | None = None
        """Event time of the first sample of the current high-utilization run."""
        self._flat_since: float | None = None
        """Event time since which power and memory stayed within tolerance (None: unknown)."""
        self._ref_power = 0.0
        self._ref_mem = 0.0
        self._flat_count = 0
        """Samples seen since ``_flat_since``: flatness needs several observations."""
        self._last_ts: float | None = None
        self._xids_seen: frozenset[int] = frozenset()
        """Hang XIDs seen during the current run (a subset of the 4 configured codes)."""

    def _end_run(self) -> None:
        self._run_start = None
        self._flat_since = None
        self._last_ts = None
        self._xids_seen = frozenset()

    def _track_flat(self, ts: float, power: float | None, mem: float | None) -> None:
        last, self._last_ts = self._last_ts, ts
        if power is None or mem is None:
            self._flat_since = None
            return
        c = self._config
        # Between two samples further apart than a third of the window anything may have
        # happened (lost QoS 0 samples, a slow interval): flatness starts again.
        gap = last is not None and ts - last > c.window_s / 3
        if self._flat_since is not None and not gap:
            power_tol = max(c.power_tolerance_w, abs(self._ref_power) * c.power_tolerance_pct / 100)
            if (abs(power - self._ref_power) <= power_tol
                    and abs(mem - self._ref_mem) <= c.memory_tolerance_mb):
                self._flat_count += 1
                return
        self._flat_since = ts
        self._flat_count = 1
        self._ref_power = power
        self._ref_mem = mem

    def update(self, sample: Sample) -> Verdict:
        c = self._config
        util = sample.utilization_pct
        if util is None:
            return KEEP
        if util < c.util_pct:
            self._end_run()
            return None
        ts = sample.ts
        if self._run_start is None:
            self._run_start = ts
            self._flat_since = None
        self._track_flat(ts, sample.power_draw_w, sample.memory_used_mb)
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
        evidence = {
            "utilization_pct": util,
            "sustained_s": round(sustained, 3),
            "power_memory_flat_s": round(flat_s, 3),
            "power_draw_w": sample.power_draw_w,
            "memory_used_mb": sample.memory_used_mb,
            "hang_xids": xids,
            "confirmed": flat or bool(xids),
        }
        if not (flat or xids):
            return Finding(
                severity="warning",
                message=(f"suspected hang: utilization {util:g} % for {sustained:.0f} s, "
                         "but power or memory moving (not confirmed)"),
                evidence=evidence,
                recommended_action=None,
            )
        reasons = []
        if flat:
            reasons.append(f"power and memory flat for {flat_s:.0f} s")
        if xids:
            reasons.append(f"hang XID {', '.join(str(x) for x in xids)}")
        return Finding(
            severity="critical",
            message=(f"hang confirmed: utilization {util:g} % for {sustained:.0f} s, "
                     + " and ".join(reasons)),
            evidence=evidence,
            recommended_action="reset_gpu",
        )

    def restore(self, severity: Severity, started_ts: float, state_ts: float) -> None:
        # The condition was raised when the run reached the window: the run began then.
        self._run_start = started_ts - self._config.window_s
        self._flat_since = None

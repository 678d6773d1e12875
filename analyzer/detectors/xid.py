"""XID errors (``xid_error``): NVIDIA's catalog decides severity and the recommended action.

One condition per GPU. Severity is the worst of the codes seen while it is open: a
``reset_gpu`` code (46/62/64/95/109/119/120) is critical (``reset_gpu``), the ``reboot`` code 79
is an emergency (``notify``: a person reboots), ``restart_app`` codes (13/31/43/94) and unknown
codes are warnings (``restart_llm_service`` / ``notify``). The condition clears after
``clear_after_s`` of event time without a new XID.
"""

from __future__ import annotations

from analyzer.detectors.base import Detector, Finding, Verdict
from gpuheal.config.detection import XidConfig
from gpuheal.models import SEVERITY_RANK, ActionName, Sample, Severity

MAX_CODES = 16
"""Distinct codes kept in the evidence of one condition (bounded memory)."""


def classify_xid(code: int, config: XidConfig) -> tuple[Severity, ActionName, str]:
    """(severity, recommended action, catalog class) of one XID code."""
    if code in config.reboot:
        return "emergency", "notify", "reboot"
    if code in config.reset_gpu:
        return "critical", "reset_gpu", "reset_gpu"
    if code in config.restart_app:
        return "warning", "restart_llm_service", "restart_app"
    return "warning", "notify", "unknown"


class XidDetector(Detector):
    """XID codes since the previous sample → one condition with the worst code's severity."""

    __slots__ = ("_action", "_catalog", "_codes", "_config", "_last_xid_ts", "_severity")
    kind = "xid_error"

    def __init__(self, config: XidConfig) -> None:
        self._config = config
        self._last_xid_ts: float | None = None
        self._codes: tuple[int, ...] = ()
        self._severity: Severity | None = None
        self._action: ActionName | None = None
        self._catalog = ""

    def update(self, sample: Sample) -> Verdict:
        ts = sample.ts
        if sample.xids:
            self._last_xid_ts = ts
            for code in sample.xids:
                severity, action, catalog = classify_xid(code, self._config)
                if self._severity is None or SEVERITY_RANK[severity] > SEVERITY_RANK[
                        self._severity]:
                    self._severity, self._action, self._catalog = severity, action, catalog
                if code not in self._codes and len(self._codes) < MAX_CODES:
                    self._codes = (*self._codes, code)
        if self._last_xid_ts is None or self._severity is None:
            return None
        if not sample.xids and ts - self._last_xid_ts >= self._config.clear_after_s:
            self._last_xid_ts = None
            self._codes = ()
            self._severity = None
            self._action = None
            return None
        codes = ", ".join(str(c) for c in self._codes) or "(codes before a restart)"
        return Finding(
            severity=self._severity,
            message=f"XID {codes} ({self._catalog}: {self._severity})",
            evidence={
                "xids": list(self._codes),
                "new_xids": list(sample.xids or ()),
                "catalog": self._catalog,
                "last_xid_ts": self._last_xid_ts,
                "clear_after_s": self._config.clear_after_s,
            },
            recommended_action=self._action,
        )

    def restore(self, severity: Severity, started_ts: float, state_ts: float) -> None:
        # The last XID came at or before the retained state: clear_after_s counts from there.
        self._last_xid_ts = state_ts
        self._severity = severity
        self._action = {"emergency": "notify", "critical": "reset_gpu"}.get(
            severity, "restart_llm_service")
        self._catalog = "restored"

"""XID errors (``xid_error``): NVIDIA's catalog decides severity, recommended action, and what
it takes for the condition to end.

One condition per GPU. Severity is the worst of the codes seen while it is open: a
``reset_gpu`` code (46/62/64/95/109/119/120) is critical (``reset_gpu``), the ``reboot`` code 79
is an emergency (``notify``: a person reboots), ``restart_app`` codes (13/31/43/94) and unknown
codes are warnings (``restart_llm_service`` / ``notify``).

An XID condition never "recovers" by a timer alone:

* ``restart_app`` and unknown codes clear after ``clear_after_s`` of event time of AVAILABLE
  samples without a new XID; an unavailable sample starts that quiet time again (time while
  the GPU is unavailable never counts);
* a ``reset_gpu`` code first needs a GPU reset to be seen (:meth:`XidDetector.note_reset`, when
  the healer's ``reset_gpu`` succeeded) or a reboot (the sample's ``host_boot_ts`` differs from
  the one when the condition was raised), then the same quiet time;
* the ``reboot`` code likewise needs a reboot (or a reset), then the quiet time; or a person
  acknowledges it (the engine's ``acknowledge``).

XIDs are seen in every sample, an unavailable one included (XID 79 comes with a lost GPU).
"""

from __future__ import annotations

from typing import Any, Literal

from analyzer.detectors.base import Detector, Finding, Verdict
from gpuheal.config.detection import XidConfig
from gpuheal.models import SEVERITY_RANK, ActionName, Sample, Severity

MAX_CODES = 16
"""Distinct codes kept in the evidence of one condition (bounded memory)."""

Needs = Literal["reset", "reboot"]
NEEDS: dict[str, Needs] = {"reset_gpu": "reset", "reboot": "reboot"}
"""The recovery a catalog class needs before quiet samples may clear it."""
NEEDS_TEXT: dict[Needs, str] = {
    "reset": "needs a GPU reset (or a reboot)",
    "reboot": "needs a reboot (or a GPU reset), or a person to acknowledge it",
}


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

    __slots__ = ("_action", "_boot_ts", "_catalog", "_cleared_note", "_codes", "_config",
                 "_last_xid_ts", "_needs", "_quiet_since", "_recovered_by", "_severity")
    kind = "xid_error"

    def __init__(self, config: XidConfig) -> None:
        self._config = config
        self._cleared_note: tuple[str, dict[str, Any]] = ("cleared", {})
        self._reset()

    def _reset(self) -> None:
        self._last_xid_ts: float | None = None
        self._codes: tuple[int, ...] = ()
        self._severity: Severity | None = None
        self._action: ActionName | None = None
        self._catalog = ""
        self._needs: Needs | None = None
        """The recovery the worst class needs before quiet time counts (None: none)."""
        self._recovered_by: str | None = None
        """``reset`` / ``reboot`` once that recovery was seen."""
        self._quiet_since: float | None = None
        """Event time of the first available sample of the current quiet stretch."""
        self._boot_ts: float | None = None
        """The host's boot time when the condition was raised (a new one: a reboot)."""

    @property
    def active(self) -> bool:
        return self._severity is not None

    def note_reset(self, ts: float) -> None:
        """A GPU reset of this GPU succeeded at ``ts``: a reset/reboot-class condition may now
        clear after its quiet time, counted from the next available sample."""
        if self._severity is not None and self._needs is not None:
            self._recovered_by = "reset"
            self._quiet_since = None

    def update(self, sample: Sample) -> Verdict:
        ts = sample.ts
        boot = sample.host_boot_ts
        if self._severity is not None and boot is not None:
            if self._boot_ts is None:
                self._boot_ts = boot
            elif boot != self._boot_ts:
                self._boot_ts = boot
                if self._needs is not None:
                    self._recovered_by = "reboot"
                    self._quiet_since = None
        if sample.xids:
            if self._severity is None:
                self._boot_ts = boot
            for code in sample.xids:
                severity, action, catalog = classify_xid(code, self._config)
                if self._severity is None or SEVERITY_RANK[severity] > SEVERITY_RANK[
                        self._severity]:
                    self._severity, self._action, self._catalog = severity, action, catalog
                needs = NEEDS.get(catalog)
                if needs is not None:
                    # A new stuck-GPU code: whatever recovery came before does not cover it.
                    self._recovered_by = None
                    if self._needs != "reboot":
                        self._needs = needs
                if code not in self._codes and len(self._codes) < MAX_CODES:
                    self._codes = (*self._codes, code)
            self._last_xid_ts = ts
            self._quiet_since = ts if sample.available else None
        elif self._severity is None:
            return None
        elif not sample.available:
            self._quiet_since = None
        elif self._needs is None or self._recovered_by is not None:
            if self._quiet_since is None:
                self._quiet_since = ts
            quiet = ts - self._quiet_since
            if quiet >= self._config.clear_after_s:
                self._cleared_note = self._clear_note(sample, quiet)
                self._reset()
                return None
        return self._finding(sample)

    def _codes_text(self) -> str:
        return ", ".join(str(c) for c in self._codes) or "(codes before a restart)"

    def _finding(self, sample: Sample) -> Finding:
        assert self._severity is not None
        if self._needs is not None and self._recovered_by is None:
            state = NEEDS_TEXT[self._needs]
        else:
            after = f" after a {'GPU reset' if self._recovered_by == 'reset' else 'reboot'}" \
                if self._recovered_by else ""
            state = (f"clears after {self._config.clear_after_s:g} s of available samples "
                     f"without a new XID{after}")
        quiet = sample.ts - self._quiet_since if self._quiet_since is not None else 0.0
        return Finding(
            severity=self._severity,
            message=f"XID {self._codes_text()} ({self._catalog}: {self._severity}); {state}",
            evidence={
                "xids": list(self._codes),
                "new_xids": list(sample.xids or ()),
                "catalog": self._catalog,
                "last_xid_ts": self._last_xid_ts,
                "clear_after_s": self._config.clear_after_s,
                "quiet_s": round(quiet, 3),
                "needs": self._needs,
                "recovered_by": self._recovered_by,
                "available": sample.available,
            },
            recommended_action=self._action,
        )

    def _clear_note(self, sample: Sample, quiet: float) -> tuple[str, dict[str, Any]]:
        after = {"reset": " after a GPU reset", "reboot": " after a reboot"}.get(
            self._recovered_by or "", "")
        return (f"cleared: no XID for {quiet:.0f} s of available samples{after} "
                f"(was XID {self._codes_text()}, {self._catalog})",
                {"xids": list(self._codes), "catalog": self._catalog,
                 "quiet_s": round(quiet, 3), "last_xid_ts": self._last_xid_ts,
                 "recovered_by": self._recovered_by, "available": sample.available,
                 "host_boot_ts": sample.host_boot_ts})

    def cleared(self, sample: Sample) -> tuple[str, dict[str, Any]]:
        return self._cleared_note

    def shift(self, delta_s: float) -> None:
        if self._last_xid_ts is not None:
            self._last_xid_ts += delta_s
        if self._quiet_since is not None:
            self._quiet_since += delta_s

    def acknowledged(self) -> None:
        self._reset()

    def restore(self, severity: Severity, started_ts: float, state_ts: float) -> None:
        # The codes are not in the retained State; their class follows from the severity.
        self._reset()
        self._last_xid_ts = state_ts
        self._severity = severity
        self._action = {"emergency": "notify", "critical": "reset_gpu"}.get(
            severity, "restart_llm_service")
        self._needs = {"emergency": "reboot", "critical": "reset"}.get(severity)  # type: ignore[assignment]
        self._catalog = "restored"

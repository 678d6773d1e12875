"""Critical health (``critical_health``): uncorrectable ECC errors or a pending row remap.

``ecc_uncorrected`` is the volatile count (it goes back to 0 after a GPU reset), so the
condition clears once it is 0 and no row remap is pending. Recommended action: ``reset_gpu``.
"""

from __future__ import annotations

from typing import Any

from analyzer.detectors.base import KEEP, Detector, Finding, Verdict
from gpuheal.models import Sample, Severity


class CriticalHealthDetector(Detector):
    """ECC uncorrected > 0 or remapped rows pending → critical."""

    __slots__ = ()
    kind = "critical_health"

    def update(self, sample: Sample) -> Verdict:
        ecc = sample.ecc_uncorrected
        pending = sample.remapped_rows_pending
        if ecc is None and pending is None:
            return KEEP
        if not ecc and not pending:
            return None
        parts = []
        if ecc:
            parts.append(f"{ecc} uncorrectable ECC error{'s' if ecc != 1 else ''}")
        if pending:
            parts.append("row remap pending")
        return Finding(
            severity="critical",
            message=" and ".join(parts),
            evidence={"ecc_uncorrected": ecc, "remapped_rows_pending": pending},
            recommended_action="reset_gpu",
        )

    def cleared(self, sample: Sample) -> tuple[str, dict[str, Any]]:
        parts = []
        if sample.ecc_uncorrected is not None:
            parts.append(f"uncorrectable ECC count {sample.ecc_uncorrected}")
        if sample.remapped_rows_pending is not None:
            parts.append("no row remap pending")
        return (f"cleared: {' and '.join(parts)}",
                {"ecc_uncorrected": sample.ecc_uncorrected,
                 "remapped_rows_pending": sample.remapped_rows_pending})

    def restore(self, severity: Severity, started_ts: float, state_ts: float) -> None:
        return None

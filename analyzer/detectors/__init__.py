"""Per-GPU detectors, one module per condition kind."""

from analyzer.detectors.base import KEEP, BandedLevel, Detector, Finding, Verdict
from analyzer.detectors.hang import HangDetector
from analyzer.detectors.health import CriticalHealthDetector
from analyzer.detectors.memory import MemoryDetector
from analyzer.detectors.thermal import ThermalDetector
from analyzer.detectors.unavailable import SilenceTracker, UnavailableDetector
from analyzer.detectors.xid import XidDetector

__all__ = [
    "KEEP", "BandedLevel", "CriticalHealthDetector", "Detector", "Finding", "HangDetector",
    "MemoryDetector", "SilenceTracker", "ThermalDetector", "UnavailableDetector", "Verdict",
    "XidDetector",
]

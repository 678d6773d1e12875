"""Jetson source: ``tegrastats --interval MS`` streamed in a reader thread, sysfs where
tegrastats is missing.

Every tegrastats line format of Orin, Xavier, Nano and TX boards is understood:

* GPU load ``GR3D_FREQ 0%@76``, ``0%@[1300,1300]``, plain ``0%`` (non-root), and the older
  Orin ``GR3D_FREQ 0%@1300 GR3D2_FREQ 0%@1300`` (two GPCs: the busier one counts);
* rails ``VDD_GPU_SOC 4368mW/4368mW`` or unit-less ``GPU 463/463`` (current/average, mW);
* sensors ``gpu@39.6C`` / ``GPU@48.2C`` in either case; ``-256C`` means no sensor (None);
* any run of spaces between tokens.

Mapping (Jetson memory is unified, so RAM is the GPU memory):
``memory_used_mb``/``memory_total_mb`` ← ``RAM used/totalMB``; ``temperature_c`` ← ``gpu@``,
else ``tj@``; ``power_draw_w`` ← current value of ``VDD_GPU_SOC``, else ``GPU``, ``VDD_GPU``,
``POM_5V_GPU``, ``VDD_SYS_GPU`` (mW → W; a shared ``VDD_CPU_GPU_CV`` rail is not the GPU's
own, so boards that only have it report None); ``sm_clock_mhz`` ← the GR3D frequency;
``mem_clock_mhz`` ← ``EMC_FREQ``; ``fan_pct``, ``power_limit_w`` None.
"""

from __future__ import annotations

import logging
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from gpuheal.procs import kill_group
from publisher.sources.base import SourceError, SourceUnavailable
from publisher.sources.smi import resolve_executable

log = logging.getLogger(__name__)

GPU_RAILS = ("VDD_GPU_SOC", "GPU", "VDD_GPU", "POM_5V_GPU", "VDD_SYS_GPU")
"""Power rails that carry the GPU, most specific first."""

_RAM_RE = re.compile(r"\bRAM\s+(\d+)/(\d+)MB\b")
_GR3D_RE = re.compile(r"\bGR3D2?_FREQ\s+(\d+(?:\.\d+)?)%(?:@(\[[\d,\s]*\]|\d+))?")
_EMC_RE = re.compile(r"\bEMC_FREQ\s+\d+(?:\.\d+)?%(?:@(\[[\d,\s]*\]|\d+))?")
_SENSOR_RE = re.compile(r"(?<![\w%])([A-Za-z][\w]*)@(-?\d+(?:\.\d+)?)C\b")
_RAIL_RE = re.compile(r"(?<![\w@])([A-Za-z][A-Za-z0-9_]*)\s+(\d+)(?:mW)?/(\d+)(?:mW)?(?![\w/])")
_PREFIX_RE = re.compile(r"^\d+(?:\.\d+)?::")
NO_SENSOR_C = -256.0


def _freq(token: str | None) -> float | None:
    """``1300`` or ``[1300,1300]`` (per GPC) → MHz (the highest)."""
    if not token:
        return None
    values = [float(v) for v in re.findall(r"\d+", token)]
    return max(values) if values else None


def parse_line(line: str) -> dict[str, Any] | None:
    """One tegrastats line → Sample fields (no ``index``); None if it is not a stats line."""
    ram = _RAM_RE.search(line)
    gr3d = _GR3D_RE.findall(line)
    if ram is None and not gr3d:
        return None
    sensors: dict[str, float] = {}
    for name, value in _SENSOR_RE.findall(line):
        celsius = float(value)
        if celsius > NO_SENSOR_C:
            sensors.setdefault(name.lower(), celsius)
    rails: dict[str, float] = {}
    for name, current, _average in _RAIL_RE.findall(line):
        rails.setdefault(name, float(current))
    power_mw = next((rails[r] for r in GPU_RAILS if r in rails), None)
    emc = _EMC_RE.search(line)
    return {
        "temperature_c": sensors.get("gpu", sensors.get("tj")),
        "utilization_pct": max(float(u) for u, _ in gr3d) if gr3d else None,
        "memory_used_mb": float(ram.group(1)) if ram else None,
        "memory_total_mb": float(ram.group(2)) if ram else None,
        "power_draw_w": power_mw / 1000.0 if power_mw is not None else None,
        "power_limit_w": None,
        "sm_clock_mhz": max((f for _, t in gr3d if (f := _freq(t)) is not None), default=None),
        "mem_clock_mhz": _freq(emc.group(1)) if emc else None,
        "fan_pct": None,
    }


def strip_capture_prefix(line: str) -> str:
    """Drop jetsontools' ``<unix epoch>::`` prefix (a log artefact, not tegrastats output)."""
    return _PREFIX_RE.sub("", line)


def board_name(root: Path = Path("/")) -> str | None:
    """The board's model from the device tree (``NVIDIA Jetson AGX Orin Developer Kit``)."""
    try:
        text = (root / "proc/device-tree/model").read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return None
    return text.strip("\x00 \n") or None


# --- sysfs fallback ---------------------------------------------------------------------------
GPU_LOAD_FILES = ("sys/devices/platform/gpu.0/load", "sys/devices/gpu.0/load")


@dataclass
class SysfsReader:
    """GPU load, temperature and unified memory from sysfs/procfs under ``root``."""

    root: Path = Path("/")

    def load_file(self) -> Path | None:
        return next((self.root / p for p in GPU_LOAD_FILES if (self.root / p).is_file()), None)

    def read(self) -> dict[str, Any]:
        load = self.load_file()
        util = _read_number(load)
        total, used = self._meminfo()
        return {
            "temperature_c": self._temperature(),
            "utilization_pct": util / 10.0 if util is not None else None,
            "memory_used_mb": used,
            "memory_total_mb": total,
            "power_draw_w": None,
            "power_limit_w": None,
            "sm_clock_mhz": self._gpu_clock(load),
            "mem_clock_mhz": None,
            "fan_pct": None,
        }

    def _temperature(self) -> float | None:
        zones: dict[str, float] = {}
        for zone in sorted((self.root / "sys/class/thermal").glob("thermal_zone*")):
            kind = _read_text(zone / "type")
            milli = _read_number(zone / "temp")
            if kind is None or milli is None or milli / 1000.0 <= NO_SENSOR_C:
                continue
            key = kind.lower().split("-")[0].split("_")[0]
            zones.setdefault(key, milli / 1000.0)
        return zones.get("gpu", zones.get("tj"))

    def _meminfo(self) -> tuple[float | None, float | None]:
        text = _read_text(self.root / "proc/meminfo")
        if text is None:
            return None, None
        kb = {m.group(1): float(m.group(2))
              for m in re.finditer(r"^(\w+):\s+(\d+)\s*kB", text, re.MULTILINE)}
        total, avail = kb.get("MemTotal"), kb.get("MemAvailable")
        if total is None:
            return None, None
        used = (total - avail) / 1024.0 if avail is not None else None
        return total / 1024.0, used

    def _gpu_clock(self, load: Path | None) -> float | None:
        if load is None:
            return None
        for cur in sorted(load.parent.glob("devfreq/*/cur_freq")):
            hz = _read_number(cur)
            if hz is not None:
                return hz / 1e6
        return None


def _read_text(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None


def _read_number(path: Path | None) -> float | None:
    text = _read_text(path)
    try:
        return float(text) if text else None
    except ValueError:
        return None


# --- the source -------------------------------------------------------------------------------
class JetsonSource:
    """One Jetson GPU (index 0) from a streaming tegrastats, or from sysfs without it."""

    name = "jetson"

    def __init__(self, tegrastats: str = "tegrastats", interval_s: float = 1.0,
                 root: Path = Path("/"), first_line_timeout_s: float = 5.0) -> None:
        self.interval_s = interval_s
        self.root = root
        self.first_line_timeout_s = first_line_timeout_s
        self.gpu_name = board_name(root)
        self.sysfs = SysfsReader(root)
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._new_line = threading.Condition(self._lock)
        self._latest: dict[str, Any] | None = None
        self._latest_at = 0.0
        self.lines_read = 0
        self.bad_lines = 0
        self._why_no_tegrastats = ""
        try:
            self.executable: str | None = resolve_executable(tegrastats, "--tegrastats")
        except SourceUnavailable as exc:
            self.executable = None
            self._why_no_tegrastats = str(exc)

    @property
    def mode(self) -> str:
        return "tegrastats" if self.executable else "sysfs"

    def open(self) -> JetsonSource:
        """Start tegrastats and wait for its first line (or check sysfs); SourceUnavailable."""
        if self.executable is None:
            if self.sysfs.load_file() is None:
                raise SourceUnavailable(
                    f"{self._why_no_tegrastats}, and no Jetson GPU load file in sysfs"
                )
            return self
        self._start()
        if not self._wait_first_line(self.first_line_timeout_s):
            self.close()
            raise SourceUnavailable(
                f"{self.executable} printed no stats line within {self.first_line_timeout_s:g} s"
            )
        return self

    def _start(self) -> None:
        assert self.executable is not None
        interval_ms = max(1, round(self.interval_s * 1000))
        self._proc = subprocess.Popen(
            [self.executable, "--interval", str(interval_ms)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, bufsize=1, start_new_session=True,
        )
        stdout = self._proc.stdout
        assert stdout is not None
        self._thread = threading.Thread(target=self._pump, args=(stdout,),
                                        name="tegrastats-reader", daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            parsed = parse_line(line)
            with self._new_line:
                self.lines_read += 1
                if parsed is None:
                    self.bad_lines += 1
                    continue
                self._latest = parsed
                self._latest_at = time.monotonic()
                self._new_line.notify_all()

    def _wait_first_line(self, timeout_s: float) -> bool:
        with self._new_line:
            return self._new_line.wait_for(lambda: self._latest is not None, timeout_s)

    def read(self, ts: float) -> list[dict[str, Any]]:
        if self.executable is None:
            return [{"index": 0, "name": self.gpu_name, **self.sysfs.read()}]
        if self._proc is None:
            try:
                self.open()
            except SourceUnavailable as exc:
                raise SourceError(str(exc)) from None
        assert self._proc is not None
        if self._proc.poll() is not None:
            rc = self._proc.returncode
            self.close()
            self._latest = None
            raise SourceError(f"tegrastats exited with {rc}; restarting it next interval")
        with self._lock:
            latest, age = self._latest, time.monotonic() - self._latest_at
        stale_after = max(3 * self.interval_s, 5.0)
        if latest is None or age > stale_after:
            raise SourceError(f"no tegrastats line for more than {stale_after:g} s")
        return [{"index": 0, "name": self.gpu_name, **latest}]

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            kill_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                kill_group(proc)
                proc.wait(timeout=2.0)
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()

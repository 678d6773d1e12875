"""NVML source (nvidia-ml-py, imported as ``pynvml``).

Every NVML call goes through one helper, :meth:`NvmlQuery.call`, which decides what an error
means:

* ``NotSupported`` (and the other "this card/driver cannot tell" codes) → None for that value,
  remembered so the call is not repeated every interval;
* ``GpuIsLost``, ``Unknown``, ``ResetRequired``... → :class:`GpuUnavailable`, turned into an
  explicit sample with ``available=False`` and the error text, never a crash;
* ``Timeout`` → None (what :func:`pynvml.nvmlEventSetWait_v2` raises when nothing happened).

``nvmlInit`` runs lazily on first use and ``nvmlShutdown`` at exit. A background thread waits
on an NVML event set for ``XidCriticalError`` (plus double-bit ECC and GPU-unavailable events
where the card supports them) and hands the XID codes to the next sample's ``xids`` (an
unavailable sample too).
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import threading
from collections import defaultdict
from typing import Any

import pynvml

from publisher.sources.base import SourceUnavailable, reason_names, unavailable_reading

log = logging.getLogger(__name__)

MIB = 1024 * 1024

_NO_VALUE_CODES = {
    pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,
    pynvml.NVML_ERROR_NO_PERMISSION, pynvml.NVML_ERROR_NOT_FOUND, pynvml.NVML_ERROR_NO_DATA,
    pynvml.NVML_ERROR_INVALID_ARGUMENT, pynvml.NVML_ERROR_INSUFFICIENT_SIZE,
    pynvml.NVML_ERROR_TIMEOUT, pynvml.NVML_ERROR_DEPRECATED, pynvml.NVML_ERROR_NOT_READY,
    pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH,
}
"""Codes that mean "this value cannot be read here": the value is None."""

_STATIC_NO_VALUE_CODES = {
    pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,
    pynvml.NVML_ERROR_DEPRECATED,
}
"""Of those, the codes that will not change while the process runs: the call is skipped later."""

_LOST_CODES = {
    pynvml.NVML_ERROR_GPU_IS_LOST, pynvml.NVML_ERROR_UNKNOWN, pynvml.NVML_ERROR_RESET_REQUIRED,
    pynvml.NVML_ERROR_IRQ_ISSUE, pynvml.NVML_ERROR_GPU_NOT_FOUND,
    pynvml.NVML_ERROR_DRIVER_NOT_LOADED, pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH,
    pynvml.NVML_ERROR_UNINITIALIZED,
}
"""Codes that mean the GPU (or the driver) cannot be read at all: the sample is unavailable."""

EVENT_TYPES = (
    pynvml.nvmlEventTypeXidCriticalError
    | pynvml.nvmlEventTypeDoubleBitEccError
    | pynvml.nvmlEventTypeGpuUnavailableError
)
"""Events the watcher registers, where the card supports them."""

EVENT_WAIT_MS = 500


class GpuUnavailable(Exception):
    """NVML says the GPU is lost or cannot be read; ``reason`` is NVML's text."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def handle_key(handle: Any) -> Any:
    """A hashable identity of a device handle (the pointer value of a real NVML handle)."""
    try:
        return ctypes.cast(handle, ctypes.c_void_p).value
    except (TypeError, ctypes.ArgumentError):
        return handle


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


class NvmlQuery:
    """The one place pynvml is called. ``lib`` is the :mod:`pynvml` module (a stand-in object
    with the same function names in tests)."""

    def __init__(self, lib: Any = pynvml) -> None:
        self.lib = lib
        self._lock = threading.Lock()
        self._initialised = False
        self._handles: dict[int, Any] = {}
        self._identity: dict[int, dict[str, str | None]] = {}
        self._skip: set[tuple[Any, ...]] = set()
        """Calls that answered NotSupported: (gpu, function, int/str arguments after the
        handle), never repeated."""
        self._warned: set[tuple[str, int]] = set()

    # --- life ---------------------------------------------------------------------------------
    def init(self) -> int:
        """``nvmlInit`` once (lazily); return the GPU count. SourceUnavailable if NVML fails."""
        with self._lock:
            if not self._initialised:
                try:
                    self.lib.nvmlInit()
                except pynvml.NVMLError as exc:
                    raise SourceUnavailable(f"NVML cannot start: {exc}") from None
                self._initialised = True
                atexit.register(self.shutdown)
        try:
            count = self.call("nvmlDeviceGetCount")
        except GpuUnavailable as exc:
            raise SourceUnavailable(f"NVML cannot count GPUs: {exc.reason}") from None
        return int(count or 0)

    def shutdown(self) -> None:
        with self._lock:
            if not self._initialised:
                return
            self._initialised = False
        try:
            self.lib.nvmlShutdown()
        except pynvml.NVMLError as exc:
            log.debug("nvmlShutdown: %s", exc)

    # --- the one call -------------------------------------------------------------------------
    def call(self, fn: str, *args: Any, gpu: int | None = None) -> Any:
        """``lib.<fn>(*args)``: the value, None when it cannot be read, or GpuUnavailable."""
        key = (gpu, fn, *(a for a in args[1:] if isinstance(a, int | str)))
        if key in self._skip:
            return None
        func = getattr(self.lib, fn, None)
        if func is None:  # older bindings without this function
            self._skip.add(key)
            return None
        try:
            return func(*args)
        except pynvml.NVMLError as exc:
            code = getattr(exc, "value", None)
            if code in _LOST_CODES:
                raise GpuUnavailable(str(exc)) from None
            if code in _STATIC_NO_VALUE_CODES:
                self._skip.add(key)
            elif code not in _NO_VALUE_CODES and (fn, code) not in self._warned:
                self._warned.add((fn, code))
                log.warning("NVML %s failed on GPU %s: %s", fn, gpu, exc)
            return None

    # --- readings -----------------------------------------------------------------------------
    def handle(self, index: int) -> Any:
        if index not in self._handles:
            handle = self.call("nvmlDeviceGetHandleByIndex", index, gpu=index)
            if handle is None:
                raise GpuUnavailable(f"NVML has no handle for GPU {index}")
            self._handles[index] = handle
        return self._handles[index]

    def sample(self, index: int, xids: list[int] | None = None) -> dict[str, Any]:
        """One GPU's Sample fields; an unavailable reading when NVML says the GPU is gone.

        ``xids`` (drained from the event watcher for this round) are carried either way: an
        XID 79 comes exactly when the GPU falls off the bus."""
        try:
            return self._sample(index, xids)
        except GpuUnavailable as exc:
            reading = unavailable_reading(index, exc.reason, **self._identity.get(index, {}))
            if xids is not None:
                reading["xids"] = xids
            return reading

    def _sample(self, index: int, xids: list[int] | None) -> dict[str, Any]:
        lib = pynvml
        h = self.handle(index)

        def get(fn: str, *args: Any) -> Any:
            return self.call(fn, h, *args, gpu=index)

        identity = self._identity.get(index)
        if identity is None:
            identity = {"uuid": _text(get("nvmlDeviceGetUUID")),
                        "name": _text(get("nvmlDeviceGetName"))}
            self._identity[index] = identity
        util = get("nvmlDeviceGetUtilizationRates")
        memory = get("nvmlDeviceGetMemoryInfo")
        power_mw = get("nvmlDeviceGetPowerUsage")
        limit_mw = get("nvmlDeviceGetEnforcedPowerLimit")
        if limit_mw is None:
            limit_mw = get("nvmlDeviceGetPowerManagementLimit")
        reasons = get("nvmlDeviceGetCurrentClocksEventReasons")
        if reasons is None:
            reasons = get("nvmlDeviceGetCurrentClocksThrottleReasons")
        remapped = get("nvmlDeviceGetRemappedRows")
        return {
            "index": index,
            **identity,
            "temperature_c": _number(get("nvmlDeviceGetTemperature", lib.NVML_TEMPERATURE_GPU)),
            "utilization_pct": _number(getattr(util, "gpu", None)),
            "memory_used_mb": _mib(getattr(memory, "used", None)),
            "memory_total_mb": _mib(getattr(memory, "total", None)),
            "power_draw_w": power_mw / 1000.0 if power_mw is not None else None,
            "power_limit_w": limit_mw / 1000.0 if limit_mw is not None else None,
            "sm_clock_mhz": _number(get("nvmlDeviceGetClockInfo", lib.NVML_CLOCK_SM)),
            "mem_clock_mhz": _number(get("nvmlDeviceGetClockInfo", lib.NVML_CLOCK_MEM)),
            "fan_pct": _number(get("nvmlDeviceGetFanSpeed")),
            "throttle_reasons": reason_names(int(reasons)) if reasons is not None else None,
            "xids": xids,
            "ecc_uncorrected": _count(get("nvmlDeviceGetTotalEccErrors",
                                          lib.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                                          lib.NVML_VOLATILE_ECC)),
            "remapped_rows_pending": bool(remapped[2]) if remapped is not None else None,
            "processes": self._processes(get("nvmlDeviceGetComputeRunningProcesses"), index),
        }

    def _processes(self, procs: Any, index: int) -> list[dict[str, Any]] | None:
        if procs is None:
            return None
        out = []
        for proc in procs:
            pid = int(proc.pid)
            used = getattr(proc, "usedGpuMemory", None)
            out.append({
                "pid": pid,
                "name": _text(self.call("nvmlSystemGetProcessName", pid, gpu=index)),
                "used_mb": _mib(used),
            })
        return out

    # --- events -------------------------------------------------------------------------------
    def watch_events(self, count: int) -> XidWatcher | None:
        """Register XID (and ECC / unavailable) events of every GPU; None where unsupported."""
        try:
            event_set = self.call("nvmlEventSetCreate")
        except GpuUnavailable as exc:
            log.warning("NVML events unavailable: %s", exc.reason)
            return None
        if event_set is None:
            return None
        by_handle: dict[Any, int] = {}
        for index in range(count):
            try:
                h = self.handle(index)
                supported = self.call("nvmlDeviceGetSupportedEventTypes", h, gpu=index) or 0
                wanted = int(supported) & EVENT_TYPES
                if wanted:
                    self.call("nvmlDeviceRegisterEvents", h, wanted, event_set, gpu=index)
                    by_handle[handle_key(h)] = index
            except GpuUnavailable as exc:
                log.warning("GPU %d: no NVML events: %s", index, exc.reason)
        if not by_handle:
            self.call("nvmlEventSetFree", event_set)
            return None
        return XidWatcher(self, event_set, by_handle)


class XidWatcher:
    """Background thread on ``nvmlEventSetWait_v2``: XID codes per GPU, drained per sample."""

    def __init__(self, query: NvmlQuery, event_set: Any, by_handle: dict[Any, int]) -> None:
        self.query = query
        self.event_set = event_set
        self.by_handle = by_handle
        self.watched = set(by_handle.values())
        self._pending: dict[int, list[int]] = defaultdict(list)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nvml-events", daemon=True)

    def start(self) -> XidWatcher:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.query.call("nvmlEventSetWait_v2", self.event_set, EVENT_WAIT_MS)
            except GpuUnavailable as exc:
                log.warning("NVML event wait: %s", exc.reason)
                self._stop.wait(1.0)
                continue
            if data is not None:
                self.handle_event(data)

    def handle_event(self, data: Any) -> None:
        """File one ``c_nvmlEventData_t`` (``device``, ``eventType``, ``eventData``)."""
        index = self.by_handle.get(handle_key(data.device))
        kind = int(data.eventType)
        if index is None:
            log.warning("NVML event %#x for an unknown device", kind)
            return
        if kind & pynvml.nvmlEventTypeXidCriticalError:
            with self._lock:
                self._pending[index].append(int(data.eventData))
            log.warning("GPU %d: XID %d", index, int(data.eventData))
        else:
            log.warning("GPU %d: NVML event %#x (data %s)", index, kind, data.eventData)

    def drain(self, index: int) -> list[int] | None:
        """XID codes seen on GPU ``index`` since the last drain; None when its events could
        not be registered (the sample then says it cannot know)."""
        if index not in self.watched:
            return None
        with self._lock:
            return self._pending.pop(index, [])

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2.0 + EVENT_WAIT_MS / 1000.0)
        self.query.call("nvmlEventSetFree", self.event_set)


class NvmlSource:
    """Every GPU NVML sees."""

    name = "nvml"

    def __init__(self, lib: Any = pynvml, events: bool = True) -> None:
        self.query = NvmlQuery(lib)
        self.events = events
        self.count = 0
        self.watcher: XidWatcher | None = None

    def open(self) -> NvmlSource:
        self.count = self.query.init()
        if self.count < 1:
            raise SourceUnavailable("NVML sees no GPU")
        if self.events:
            self.watcher = self.query.watch_events(self.count)
            if self.watcher is not None:
                self.watcher.start()
        return self

    def read(self, ts: float) -> list[dict[str, Any]]:
        if self.count < 1:
            self.open()
        return [self.query.sample(i, self._xids(i)) for i in range(self.count)]

    def _xids(self, index: int) -> list[int] | None:
        return self.watcher.drain(index) if self.watcher is not None else None

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None


def _number(value: Any) -> float | None:
    return float(value) if value is not None else None


def _mib(value: Any) -> float | None:
    return round(float(value) / MIB, 3) if value is not None else None


def _count(value: Any) -> int | None:
    return int(value) if value is not None else None

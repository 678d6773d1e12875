"""NVML source: the one query helper's mapping of values and errors, and the XID event thread.

No GPU here, so the GPU is a stand-in object with pynvml's function names that returns what
NVML returns (bytes in mW, structs with ``.gpu``/``.used``...) and raises the real
``pynvml.NVMLError`` subclasses (``NVMLError_NotSupported``, ``NVMLError_GpuIsLost``...).
"""

from __future__ import annotations

import io
import logging
import queue
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest

from gpuheal.models import Sample
from gpuheal.options import CommonOptions, PublisherOptions
from publisher.probe import probe
from publisher.sources import NoSourceError, open_source
from publisher.sources.base import SourceUnavailable
from publisher.sources.nvml import EVENT_TYPES, NvmlQuery, NvmlSource
from tests.support import wait_for

MIB = 1024 * 1024


class FakeNvml:
    """Two GPUs answering like NVML. ``errors[(fn, index)]`` is raised by that call."""

    def __init__(self, gpus: int = 2, events: int = EVENT_TYPES) -> None:
        self.gpus = gpus
        self.events_supported = events
        self.errors: dict[tuple[str, int | None], Exception] = {}
        self.calls: Counter[str] = Counter()
        self.registered: dict[int, int] = {}
        self.event_queue: queue.Queue[Any] = queue.Queue()
        self.shutdowns = 0

    def _do(self, fn: str, index: int | None, value: Any) -> Any:
        self.calls[fn] += 1
        error = self.errors.get((fn, index)) or self.errors.get((fn, None))
        if error is not None:
            raise error
        return value

    # life
    def nvmlInit(self) -> None:
        self._do("nvmlInit", None, None)

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return self._do("nvmlDeviceGetCount", None, self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return self._do("nvmlDeviceGetHandleByIndex", i, 1000 + i)

    # readings (handle h = 1000 + index)
    def nvmlDeviceGetName(self, h: int) -> bytes:
        return self._do("nvmlDeviceGetName", h - 1000, b"NVIDIA H100 80GB HBM3")

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return self._do("nvmlDeviceGetUUID", h - 1000, f"GPU-0000000{h - 1000}")

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return self._do("nvmlDeviceGetTemperature", h - 1000, 59)

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:
        return self._do("nvmlDeviceGetUtilizationRates", h - 1000,
                        SimpleNamespace(gpu=100, memory=37))

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        return self._do("nvmlDeviceGetMemoryInfo", h - 1000,
                        SimpleNamespace(used=19818 * MIB, total=81559 * MIB, free=0))

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        return self._do("nvmlDeviceGetPowerUsage", h - 1000, 631950)

    def nvmlDeviceGetEnforcedPowerLimit(self, h: int) -> int:
        return self._do("nvmlDeviceGetEnforcedPowerLimit", h - 1000, 700000)

    def nvmlDeviceGetPowerManagementLimit(self, h: int) -> int:
        return self._do("nvmlDeviceGetPowerManagementLimit", h - 1000, 650000)

    def nvmlDeviceGetClockInfo(self, h: int, kind: int) -> int:
        value = {pynvml.NVML_CLOCK_SM: 1980, pynvml.NVML_CLOCK_MEM: 2619}[kind]
        return self._do("nvmlDeviceGetClockInfo", h - 1000, value)

    def nvmlDeviceGetFanSpeed(self, h: int) -> int:
        return self._do("nvmlDeviceGetFanSpeed", h - 1000, 41)

    def nvmlDeviceGetCurrentClocksEventReasons(self, h: int) -> int:
        mask = pynvml.nvmlClocksEventReasonSwPowerCap | pynvml.nvmlClocksEventReasonHwSlowdown
        return self._do("nvmlDeviceGetCurrentClocksEventReasons", h - 1000, mask)

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, h: int) -> int:
        return self._do("nvmlDeviceGetCurrentClocksThrottleReasons", h - 1000,
                        pynvml.nvmlClocksThrottleReasonSwThermalSlowdown)

    def nvmlDeviceGetTotalEccErrors(self, h: int, kind: int, counter: int) -> int:
        assert (kind, counter) == (pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                                   pynvml.NVML_VOLATILE_ECC)
        return self._do("nvmlDeviceGetTotalEccErrors", h - 1000, 2)

    def nvmlDeviceGetRemappedRows(self, h: int) -> tuple[int, int, int, int]:
        return self._do("nvmlDeviceGetRemappedRows", h - 1000, (0, 1, 1, 0))

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list[Any]:
        return self._do("nvmlDeviceGetComputeRunningProcesses", h - 1000, [
            SimpleNamespace(pid=4242, usedGpuMemory=1024 * MIB),
            SimpleNamespace(pid=4343, usedGpuMemory=None),
        ])

    def nvmlSystemGetProcessName(self, pid: int) -> bytes:
        return self._do("nvmlSystemGetProcessName", None, {4242: b"ollama"}.get(pid, b"python3"))

    # events
    def nvmlEventSetCreate(self) -> str:
        return self._do("nvmlEventSetCreate", None, "event-set")

    def nvmlDeviceGetSupportedEventTypes(self, h: int) -> int:
        return self._do("nvmlDeviceGetSupportedEventTypes", h - 1000,
                        self.events_supported | pynvml.nvmlEventTypePState)

    def nvmlDeviceRegisterEvents(self, h: int, kinds: int, event_set: str) -> None:
        self._do("nvmlDeviceRegisterEvents", h - 1000, None)
        self.registered[h - 1000] = kinds

    def nvmlEventSetWait_v2(self, event_set: str, timeout_ms: int) -> Any:
        self.calls["nvmlEventSetWait_v2"] += 1
        try:
            return self.event_queue.get(timeout=min(timeout_ms, 50) / 1000)
        except queue.Empty:
            raise pynvml.NVMLError_Timeout() from None

    def nvmlEventSetFree(self, event_set: str) -> None:
        self._do("nvmlEventSetFree", None, None)


def full_reading(index: int) -> dict[str, Any]:
    return {
        "index": index, "uuid": f"GPU-0000000{index}", "name": "NVIDIA H100 80GB HBM3",
        "temperature_c": 59.0, "utilization_pct": 100.0, "memory_used_mb": 19818.0,
        "memory_total_mb": 81559.0, "power_draw_w": 631.95, "power_limit_w": 700.0,
        "sm_clock_mhz": 1980.0, "mem_clock_mhz": 2619.0, "fan_pct": 41.0,
        "throttle_reasons": ["sw_power_cap", "hw_slowdown"], "xids": None,
        "ecc_uncorrected": 2, "remapped_rows_pending": True,
        "processes": [{"pid": 4242, "name": "ollama", "used_mb": 1024.0},
                      {"pid": 4343, "name": "python3", "used_mb": None}],
    }


def test_every_field_is_mapped_with_its_unit() -> None:
    fake = FakeNvml()
    query = NvmlQuery(fake)
    assert query.init() == 2
    assert query.sample(0) == full_reading(0)
    assert query.sample(1, xids=[13]) == full_reading(1) | {"xids": [13]}
    Sample(host="h", source="nvml", ts=1.0, seq=0, **query.sample(0))


def test_not_supported_is_none_and_not_asked_again() -> None:
    fake = FakeNvml()
    fake.errors[("nvmlDeviceGetFanSpeed", None)] = pynvml.NVMLError_NotSupported()
    fake.errors[("nvmlDeviceGetRemappedRows", 0)] = pynvml.NVMLError_NotSupported()
    fake.errors[("nvmlDeviceGetTotalEccErrors", 0)] = pynvml.NVMLError_FunctionNotFound()
    query = NvmlQuery(fake)
    query.init()
    for _ in range(3):
        reading = query.sample(0)
        assert reading["fan_pct"] is None
        assert reading["remapped_rows_pending"] is None and reading["ecc_uncorrected"] is None
        assert reading["temperature_c"] == 59.0
    assert query.sample(1)["remapped_rows_pending"] is True
    assert fake.calls["nvmlDeviceGetFanSpeed"] == 2  # once per GPU, then skipped
    assert fake.calls["nvmlDeviceGetTotalEccErrors"] == 2


@pytest.mark.parametrize(("error", "text"), [
    (pynvml.NVMLError_GpuIsLost, "GPU is lost"),
    (pynvml.NVMLError_Unknown, "Unknown Error"),
    (pynvml.NVMLError_ResetRequired, "GPU requires restart"),
])
def test_lost_gpu_gives_an_unavailable_sample(error: type, text: str) -> None:
    fake = FakeNvml()
    query = NvmlQuery(fake)
    query.init()
    query.sample(0)
    fake.errors[("nvmlDeviceGetTemperature", 0)] = error()
    reading = query.sample(0)
    assert reading == {"index": 0, "available": False, "error": text,
                       "uuid": "GPU-00000000", "name": "NVIDIA H100 80GB HBM3"}
    sample = Sample(host="h", source="nvml", ts=1.0, seq=0, **reading)
    assert sample.temperature_c is None and sample.memory_used_mb is None
    assert query.sample(1)["temperature_c"] == 59.0, "the other GPU is unaffected"
    del fake.errors[("nvmlDeviceGetTemperature", 0)]
    assert query.sample(0) == full_reading(0), "it comes back when NVML answers again"


def test_a_gpu_lost_before_its_handle_is_unavailable() -> None:
    fake = FakeNvml()
    fake.errors[("nvmlDeviceGetHandleByIndex", 1)] = pynvml.NVMLError_GpuIsLost()
    query = NvmlQuery(fake)
    query.init()
    assert query.sample(1) == {"index": 1, "available": False, "error": "GPU is lost"}


def test_other_errors_are_none_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeNvml()
    fake.errors[("nvmlDeviceGetPowerUsage", None)] = pynvml.NVMLError_InsufficientPower()
    fake.errors[("nvmlDeviceGetEnforcedPowerLimit", None)] = pynvml.NVMLError_NoPermission()
    query = NvmlQuery(fake)
    query.init()
    with caplog.at_level(logging.WARNING, logger="publisher.sources.nvml"):
        for _ in range(3):
            reading = query.sample(0)
            assert reading["power_draw_w"] is None
            assert reading["power_limit_w"] == 650.0, "falls back to the management limit"
    assert [r.getMessage() for r in caplog.records].count(
        "NVML nvmlDeviceGetPowerUsage failed on GPU 0: Insufficient External Power") == 1


def test_throttle_reasons_fall_back_to_the_old_call() -> None:
    fake = FakeNvml()
    fake.errors[("nvmlDeviceGetCurrentClocksEventReasons", None)] = \
        pynvml.NVMLError_FunctionNotFound()
    query = NvmlQuery(fake)
    query.init()
    assert query.sample(0)["throttle_reasons"] == ["sw_thermal_slowdown"]


def test_bindings_without_a_function_give_none() -> None:
    fake = FakeNvml()
    query = NvmlQuery(fake)
    query.init()
    assert query.call("nvmlDeviceGetSomethingNew", 1000, gpu=0) is None


def test_init_failure_is_source_unavailable() -> None:
    fake = FakeNvml()
    fake.errors[("nvmlInit", None)] = pynvml.NVMLError_LibraryNotFound()
    with pytest.raises(SourceUnavailable, match="NVML Shared Library Not Found"):
        NvmlSource(fake).open()
    with pytest.raises(SourceUnavailable, match="no GPU"):
        NvmlSource(FakeNvml(gpus=0)).open()


def test_init_is_lazy_and_shutdown_once() -> None:
    fake = FakeNvml()
    query = NvmlQuery(fake)
    assert fake.calls["nvmlInit"] == 0
    query.init()
    query.init()
    assert fake.calls["nvmlInit"] == 1
    query.shutdown()
    query.shutdown()
    assert fake.shutdowns == 1


def xid_event(index: int, code: int) -> Any:
    return SimpleNamespace(device=1000 + index, eventType=pynvml.nvmlEventTypeXidCriticalError,
                           eventData=code)


def test_xid_events_go_into_the_next_sample() -> None:
    fake = FakeNvml()
    source = NvmlSource(fake).open()
    try:
        assert source.watcher is not None
        assert fake.registered == {0: EVENT_TYPES, 1: EVENT_TYPES}, "only the wanted types"
        fake.event_queue.put(xid_event(1, 79))
        fake.event_queue.put(xid_event(1, 13))
        fake.event_queue.put(SimpleNamespace(
            device=1000, eventType=pynvml.nvmlEventTypeDoubleBitEccError, eventData=0))
        wait_for(lambda: fake.event_queue.empty() and len(source.watcher._pending[1]) == 2,
                 5, "the watcher to take the events")
        first = source.read(0.0)
        assert [r["xids"] for r in first] == [[], [79, 13]]
        assert [r["xids"] for r in source.read(0.0)] == [[], []], "each XID is reported once"
    finally:
        source.close()
    assert fake.calls["nvmlEventSetFree"] == 1


def test_no_event_support_means_no_watcher() -> None:
    fake = FakeNvml(events=0)
    source = NvmlSource(fake).open()
    assert source.watcher is None
    assert source.read(0.0)[0]["xids"] is None, "None: this source cannot see XIDs here"
    assert fake.calls["nvmlEventSetFree"] == 1


def test_events_of_a_lost_gpu_do_not_stop_the_watcher() -> None:
    fake = FakeNvml()
    source = NvmlSource(fake).open()
    try:
        fake.errors[("nvmlEventSetWait_v2", None)] = pynvml.NVMLError_GpuIsLost()
        assert source.read(0.0)[0]["xids"] == []
        assert source.watcher is not None and source.watcher._thread.is_alive()
    finally:
        source.close()


def test_open_source_reports_why_nvml_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    opts = PublisherOptions(common=CommonOptions(host_name="h"), source="nvml")
    monkeypatch.setattr(pynvml, "nvmlInit", _raise_library_not_found)
    with pytest.raises(NoSourceError, match="source nvml does not work here: NVML cannot start"):
        open_source(opts)
    err = io.StringIO()
    assert probe(opts, io.StringIO(), err) == 1
    assert "NVML Shared Library Not Found" in err.getvalue()


def _raise_library_not_found() -> None:
    raise pynvml.NVMLError_LibraryNotFound()


def test_an_unsupported_clock_does_not_hide_the_other() -> None:
    fake = FakeNvml()
    sm_only = fake.nvmlDeviceGetClockInfo

    def clock(h: int, kind: int) -> int:
        if kind == pynvml.NVML_CLOCK_SM:
            raise pynvml.NVMLError_NotSupported()
        return sm_only(h, kind)

    fake.nvmlDeviceGetClockInfo = clock  # type: ignore[method-assign]
    query = NvmlQuery(fake)
    query.init()
    for _ in range(2):
        reading = query.sample(0)
        assert (reading["sm_clock_mhz"], reading["mem_clock_mhz"]) == (None, 2619.0)


def test_a_lost_gpu_does_not_cost_the_others_their_events() -> None:
    fake = FakeNvml()
    fake.errors[("nvmlDeviceGetSupportedEventTypes", 0)] = pynvml.NVMLError_GpuIsLost()
    source = NvmlSource(fake).open()
    try:
        assert fake.registered == {1: EVENT_TYPES}
        fake.event_queue.put(xid_event(1, 48))
        wait_for(lambda: fake.event_queue.empty() and source.watcher._pending.get(1),
                 5, "the XID")
        assert [r.get("xids") for r in source.read(0.0)] == [None, [48]]
    finally:
        source.close()


def test_xids_drained_with_an_unavailable_reading_are_carried_in_it() -> None:
    """XID 79 comes exactly when the GPU falls off the bus: the round that reads the GPU as
    lost drains the XID and must report it (it used to be dropped: issue 10 #11)."""
    fake = FakeNvml()
    source = NvmlSource(fake).open()
    try:
        fake.event_queue.put(xid_event(0, 79))
        wait_for(lambda: fake.event_queue.empty() and source.watcher._pending.get(0),
                 5, "the XID")
        fake.errors[("nvmlDeviceGetTemperature", 0)] = pynvml.NVMLError_GpuIsLost()
        lost, other = source.read(0.0)
        assert lost == {"index": 0, "available": False, "error": "GPU is lost", "xids": [79],
                        "uuid": "GPU-00000000", "name": "NVIDIA H100 80GB HBM3"}
        assert other["xids"] == []
        sample = Sample(host="h", source="nvml", ts=1.0, seq=0, **lost)
        assert sample.xids == [79] and not sample.available
        assert source.read(0.0)[0]["xids"] == [], "reported once"
    finally:
        source.close()

"""``GET /metrics``: the live model in the Prometheus exposition format.

A custom collector builds every family at scrape time from the live model, so the series of
a GPU whose retained State was deleted disappear with it. Names and units follow Prometheus'
conventions (base units: bytes, seconds, hertz, ratios 0-1) and stay close to NVIDIA's
dcgm-exporter (``DCGM_FI_DEV_GPU_TEMP`` → ``gpuheal_gpu_temperature_celsius``,
``DCGM_FI_DEV_FB_USED`` → ``gpuheal_gpu_memory_used_bytes``, ``DCGM_FI_DEV_POWER_USAGE`` →
``gpuheal_gpu_power_usage_watts``...). GPU labels: ``host``, ``gpu`` (index), ``uuid``,
``name``. A reading the GPU does not report is left out (never a made-up 0).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from dashboard.live import LiveModel

MIB = 1024 * 1024
HEALTH_VALUE = {"healthy": 0, "warning": 1, "critical": 2, "unavailable": 3}
GPU_LABELS = ("host", "gpu", "uuid", "name")

GPU_GAUGES: tuple[tuple[str, str, Callable[[dict[str, Any]], float | None]], ...] = (
    ("gpuheal_gpu_temperature_celsius", "GPU temperature (degrees Celsius)",
     lambda s: s["temperature"]),
    ("gpuheal_gpu_utilization_ratio", "GPU utilization (0-1; dcgm-exporter's GPU_UTIL / 100)",
     lambda s: _scaled(s["utilization"], 0.01)),
    ("gpuheal_gpu_memory_used_bytes", "GPU memory used (bytes)",
     lambda s: _scaled(s["memory"]["used_mb"], MIB)),
    ("gpuheal_gpu_memory_total_bytes", "GPU memory total (bytes)",
     lambda s: _scaled(s["memory"]["total_mb"], MIB)),
    ("gpuheal_gpu_power_usage_watts", "GPU power draw (watts)",
     lambda s: s["power"]["draw_w"]),
    ("gpuheal_gpu_power_limit_watts", "GPU power limit (watts)",
     lambda s: s["power"]["limit_w"]),
    ("gpuheal_gpu_sm_clock_hertz", "GPU graphics/SM clock (hertz)",
     lambda s: _scaled(s["clocks"]["graphics_mhz"], 1e6)),
    ("gpuheal_gpu_memory_clock_hertz", "GPU memory clock (hertz)",
     lambda s: _scaled(s["clocks"]["memory_mhz"], 1e6)),
    ("gpuheal_gpu_fan_speed_ratio", "GPU fan speed (0-1)",
     lambda s: _scaled(s["fan_speed"], 0.01)),
    ("gpuheal_gpu_health", "GPU health: 0 healthy, 1 warning, 2 critical, 3 unavailable",
     lambda s: HEALTH_VALUE.get(s["health"])),
    ("gpuheal_gpu_active_conditions", "Conditions the analyzer holds open for the GPU",
     lambda s: len(s["active"])),
    ("gpuheal_gpu_stale", "1 when the State is stale (analyzer offline, old, or no broker)",
     lambda s: 1 if s["stale"] else 0),
    ("gpuheal_gpu_state_timestamp_seconds", "Source-clock time of the GPU's newest State "
     "(UNIX seconds)", lambda s: s["ts"]),
)


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


class DashboardCollector:
    """Builds the gpuheal families from the live model on every scrape."""

    def __init__(self, live: LiveModel) -> None:
        self.live = live

    def collect(self) -> Iterator[Metric]:
        states = self.live.states()
        for name, doc, get in GPU_GAUGES:
            family = GaugeMetricFamily(name, doc, labels=GPU_LABELS)
            for s in states:
                value = get(s)
                if value is not None:
                    family.add_metric(_gpu_labels(s), float(value))
            yield family

        events, actions = self.live.counts()
        family_c = CounterMetricFamily("gpuheal_events", "Events seen since the dashboard "
                                       "started", labels=("host", "kind", "severity", "phase"))
        for labels, n in sorted(events.items()):
            family_c.add_metric(list(labels), n)
        yield family_c
        family_c = CounterMetricFamily("gpuheal_actions", "Action messages seen since the "
                                       "dashboard started", labels=("host", "action", "status"))
        for labels, n in sorted(actions.items()):
            family_c.add_metric(list(labels), n)
        yield family_c

        hosts = self.live.hosts()
        up = GaugeMetricFamily("gpuheal_component_up", "1 when the component says online",
                               labels=("host", "component"))
        enabled = GaugeMetricFamily("gpuheal_healer_enabled", "1 when self-healing is on",
                                    labels=("host",))
        breaker = GaugeMetricFamily("gpuheal_healer_breaker_open", "1 when the healer's "
                                    "circuit breaker is open (a person must reset it)",
                                    labels=("host",))
        budget = GaugeMetricFamily("gpuheal_healer_budget_left", "Actions the healer may "
                                   "still start this hour", labels=("host",))
        for h in hosts:
            for component, status in h["components"].items():
                up.add_metric([h["host"], component], 1 if status["value"] == "online" else 0)
            healer = h["healer"]
            if healer is not None:
                enabled.add_metric([h["host"]], 1 if healer["enabled"] else 0)
                breaker.add_metric([h["host"]], 1 if healer["breaker_open"] else 0)
                budget.add_metric([h["host"]], healer["budget_left"])
        yield from (up, enabled, breaker, budget)
        yield GaugeMetricFamily("gpuheal_broker_connected", "1 while the dashboard is "
                                "connected to the broker",
                                value=1 if self.live.broker_connected else 0)


def _gpu_labels(s: dict[str, Any]) -> list[str]:
    return [s["host"], str(s["index"]), s.get("uuid") or "", s.get("name") or ""]


def registry_for(live: LiveModel) -> CollectorRegistry:
    """A registry holding only the gpuheal collector (no process metrics of the dashboard)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DashboardCollector(live))  # type: ignore[arg-type]
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The text exposition format (``text/plain; version=0.0.4``)."""
    return generate_latest(registry)

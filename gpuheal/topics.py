"""Topic names and subscription patterns: the only place a topic string is built.

``P`` is the prefix (default ``gpuheal``), ``H`` the host name, ``I`` the GPU index.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import get_args

from gpuheal.models import HOST_PATTERN, ComponentName

COMPONENTS: tuple[str, ...] = get_args(ComponentName)
"""Every component that has a status topic."""
GPU_KINDS = ("sample", "state", "event", "action", "sim")
HA_GPU_ENTITIES: tuple[tuple[str, str], ...] = (
    ("sensor", "temperature"), ("sensor", "utilization"), ("sensor", "memory_used"),
    ("sensor", "memory_percent"), ("sensor", "power"), ("sensor", "health"),
    ("sensor", "last_action"), ("binary_sensor", "problem"),
)
"""(platform, key) of the Home Assistant entities of one GPU (the analyzer announces them)."""
HA_HOST_ENTITIES: tuple[tuple[str, str], ...] = (
    ("switch", "healing_enabled"), ("button", "reset_breaker"),
)
"""(platform, key) of the Home Assistant entities of one host's healer."""
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_HOST = re.compile(HOST_PATTERN)


def valid_host(name: str | None) -> bool:
    """Whether ``name`` can be a host in a topic (``[A-Za-z0-9_-]+``)."""
    return bool(name) and _HOST.match(name) is not None  # type: ignore[arg-type]


@dataclass(frozen=True)
class TopicParts:
    """What a received topic names."""

    host: str | None
    kind: str
    """``sample``/``state``/``event``/``action``/``sim``, ``status``, ``healer_state``,
    ``healer_set``, ``deadletter`` or ``ha_status``."""
    index: int | None = None
    component: str | None = None


@dataclass(frozen=True)
class Topics:
    """Topic builder for one prefix."""

    prefix: str = "gpuheal"
    discovery_prefix: str = "homeassistant"

    def __post_init__(self) -> None:
        if not self.prefix or any(c in self.prefix for c in "+#") or self.prefix.endswith("/"):
            raise ValueError(f"invalid topic prefix: {self.prefix!r}")

    # --- one topic -------------------------------------------------------------
    def gpu(self, host: str, index: int, kind: str) -> str:
        _check_host(host)
        if kind not in GPU_KINDS:
            raise ValueError(f"unknown GPU topic kind: {kind!r}")
        if index < 0:
            raise ValueError(f"GPU index must be >= 0: {index}")
        return f"{self.prefix}/{host}/gpu/{index}/{kind}"

    def sample(self, host: str, index: int) -> str:
        return self.gpu(host, index, "sample")

    def state(self, host: str, index: int) -> str:
        return self.gpu(host, index, "state")

    def event(self, host: str, index: int) -> str:
        return self.gpu(host, index, "event")

    def action(self, host: str, index: int) -> str:
        return self.gpu(host, index, "action")

    def sim(self, host: str, index: int) -> str:
        return self.gpu(host, index, "sim")

    def status(self, host: str, component: str) -> str:
        _check_host(host)
        if component not in COMPONENTS:
            raise ValueError(f"unknown component: {component!r}")
        return f"{self.prefix}/{host}/{component}/status"

    def healer_state(self, host: str) -> str:
        _check_host(host)
        return f"{self.prefix}/{host}/healer/state"

    def healer_set(self, host: str) -> str:
        _check_host(host)
        return f"{self.prefix}/{host}/healer/set"

    def deadletter(self, component: str) -> str:
        if component not in COMPONENTS:
            raise ValueError(f"unknown component: {component!r}")
        return f"{self.prefix}/deadletter/{component}"

    # --- Home Assistant --------------------------------------------------------
    def ha_status(self) -> str:
        return f"{self.discovery_prefix}/status"

    def ha_object_id(self, host: str, *parts: str | int) -> str:
        """A discovery object id / unique id: ``gpuheal_<prefix>_<host>_<parts>``, reduced to
        ``[A-Za-z0-9_-]``."""
        return _UNSAFE.sub("_", "_".join(str(p) for p in ("gpuheal", self.prefix, host,
                                                            *parts)))

    def ha_gpu_configs(self, host: str, index: int) -> list[str]:
        """Every discovery config topic of one GPU's entities."""
        return [self.ha_config(platform, self.ha_object_id(host, "gpu", index, key))
                for platform, key in HA_GPU_ENTITIES]

    def ha_host_configs(self, host: str) -> list[str]:
        """Every discovery config topic of one host's healer entities."""
        return [self.ha_config(platform, self.ha_object_id(host, key))
                for platform, key in HA_HOST_ENTITIES]

    def ha_config(self, platform: str, object_id: str) -> str:
        """``homeassistant/<platform>/<object_id>/config`` (object_id: [A-Za-z0-9_-])."""
        if not valid_host(object_id):
            raise ValueError(f"invalid discovery object id: {object_id!r}")
        return f"{self.discovery_prefix}/{platform}/{object_id}/config"

    # --- subscription patterns -------------------------------------------------
    def gpu_pattern(self, kind: str, host: str | None = None) -> str:
        """``P/<host or +>/gpu/+/<kind>``."""
        if kind not in GPU_KINDS:
            raise ValueError(f"unknown GPU topic kind: {kind!r}")
        return f"{self.prefix}/{_host_or_plus(host)}/gpu/+/{kind}"

    def status_pattern(self, host: str | None = None, component: str | None = None) -> str:
        """``P/<host or +>/<component or +>/status``."""
        if component is not None and component not in COMPONENTS:
            raise ValueError(f"unknown component: {component!r}")
        return f"{self.prefix}/{_host_or_plus(host)}/{component or '+'}/status"

    def healer_state_pattern(self, host: str | None = None) -> str:
        return f"{self.prefix}/{_host_or_plus(host)}/healer/state"

    def healer_set_pattern(self, host: str | None = None) -> str:
        return f"{self.prefix}/{_host_or_plus(host)}/healer/set"

    def deadletter_pattern(self) -> str:
        return f"{self.prefix}/deadletter/+"

    def everything(self) -> str:
        return f"{self.prefix}/#"

    # --- parsing ---------------------------------------------------------------
    def parse(self, topic: str) -> TopicParts | None:
        """What a topic under this prefix names, or None when it is not one of ours."""
        if topic == self.ha_status():
            return TopicParts(host=None, kind="ha_status")
        head = self.prefix + "/"
        if not topic.startswith(head):
            return None
        parts = topic[len(head):].split("/")
        if len(parts) == 2 and parts[0] == "deadletter" and parts[1] in COMPONENTS:
            return TopicParts(host=None, kind="deadletter", component=parts[1])
        if not parts or not _HOST.match(parts[0]):
            return None
        host = parts[0]
        if len(parts) == 4 and parts[1] == "gpu" and parts[3] in GPU_KINDS:
            if not parts[2].isdigit() or len(parts[2]) > 5 or parts[2] != str(int(parts[2])):
                return None  # one spelling per GPU: "7", never "007"
            return TopicParts(host=host, kind=parts[3], index=int(parts[2]))
        if len(parts) == 3 and parts[2] == "status" and parts[1] in COMPONENTS:
            return TopicParts(host=host, kind="status", component=parts[1])
        if len(parts) == 3 and parts[1] == "healer" and parts[2] in ("state", "set"):
            return TopicParts(host=host, kind=f"healer_{parts[2]}", component="healer")
        return None


def _check_host(host: str) -> None:
    if not valid_host(host):
        raise ValueError(f"invalid host name {host!r}: must match [A-Za-z0-9_-]+")


def _host_or_plus(host: str | None) -> str:
    if host is None:
        return "+"
    _check_host(host)
    return host

"""Healer ladder, guards and actuators (``[healer]`` in the TOML config)."""

from __future__ import annotations

from pydantic import Field

from gpuheal.config.base import ConfigModel
from gpuheal.models import ActionName, Severity


class Rung(ConfigModel):
    """One step of a ladder: ``action`` is the first choice from ``min_severity`` up."""

    action: ActionName
    min_severity: Severity = "warning"


def _ladders() -> dict[str, list[Rung]]:
    return {
        "out_of_memory": [
            Rung(action="clear_llm_cache", min_severity="warning"),
            Rung(action="reset_gpu_session", min_severity="critical"),
            Rung(action="stop_llm_service", min_severity="emergency"),
        ],
        "thermal_throttling": [
            Rung(action="throttle_gpu", min_severity="warning"),
            Rung(action="restart_llm_service", min_severity="critical"),
            Rung(action="stop_llm_service", min_severity="emergency"),
        ],
        "gpu_hang": [Rung(action="reset_gpu", min_severity="critical")],
        "critical_health": [Rung(action="reset_gpu", min_severity="critical")],
        "unavailable": [Rung(action="notify", min_severity="warning")],
    }


class GuardsConfig(ConfigModel):
    enabled: bool = True
    dry_run: bool = False
    cooldown_s: float = 300.0
    """Event-time seconds before the same action may run again on the same GPU."""
    budget_per_hour: int = 12
    """Actions (not skips) per host per rolling hour."""
    breaker_threshold: int = 3
    """Unresolved escalations that open the circuit breaker (only a person closes it)."""
    verify_window_s: float = 120.0
    """Event-time seconds the State has to clear after an action."""
    restore_after_s: float = 300.0
    """Healthy event-time seconds after which a throttled GPU gets its power limit back."""
    destructive_opt_in: list[ActionName] = Field(default_factory=list)
    """Destructive actions (``reset_gpu``, ``stop_llm_service``) run only when listed here."""


class ActuatorsConfig(ConfigModel):
    ollama_url: str = "http://127.0.0.1:11434"
    http_timeout_s: float = 10.0
    command_timeout_s: float = 60.0
    restart_llm_service: list[str] = Field(
        default_factory=lambda: ["systemctl", "restart", "ollama"])
    reset_gpu_session: list[str] = Field(
        default_factory=lambda: ["systemctl", "restart", "ollama"])
    stop_llm_service: list[str] = Field(default_factory=lambda: ["systemctl", "stop", "ollama"])
    stop_gpu_users: list[list[str]] = Field(
        default_factory=lambda: [["systemctl", "stop", "ollama"]])
    """Commands run before a GPU reset to stop the GPU's users."""
    nvidia_smi: str = "nvidia-smi"
    jetson_clocks: str = "jetson_clocks"
    throttle_pct: float = 80.0
    """Power limit as percent of the default limit."""


class HealerConfig(ConfigModel):
    ladders: dict[str, list[Rung]] = Field(default_factory=_ladders)
    guards: GuardsConfig = Field(default_factory=GuardsConfig)
    actuators: ActuatorsConfig = Field(default_factory=ActuatorsConfig)

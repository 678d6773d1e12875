"""Healer ladder, guards and actuators (``[healer]`` in the TOML config).

Every duration is in seconds of *event time* (the source clock of the samples), so a replay or
a simulation at ``--speed X`` runs the guards X times faster, exactly as it runs the detectors.
"""

from __future__ import annotations

from typing import Annotated, get_args

from pydantic import Field, field_validator

from gpuheal.config.base import ConfigModel
from gpuheal.models import SEVERITY_RANK, ActionName, ConditionKind, Severity

DESTRUCTIVE_ACTIONS: frozenset[str] = frozenset({"reset_gpu", "stop_llm_service"})
"""Actions that run only when opted in (``guards.destructive_opt_in`` or ``--allow``)."""
HOST_WIDE_ACTIONS: frozenset[str] = frozenset(
    {"reset_gpu_session", "restart_llm_service", "stop_llm_service"})
"""Actions on the host's LLM service, which every GPU of the host serves: one cooldown and one
running at a time per host, whichever GPU asked."""

XID_ACTIONS: frozenset[str] = frozenset({"restart_llm_service", "reset_gpu", "notify"})
"""What an XID's ``recommended_action`` may ask of the healer; anything else is ``notify``."""

CONDITION_KINDS: frozenset[str] = frozenset(get_args(ConditionKind))

Seconds = Annotated[float, Field(ge=0)]


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
    """False starts the healer paused (every decision is skipped with reason ``paused``)."""
    dry_run: bool = False
    cooldown_s: Seconds = 300.0
    """Event-time seconds before the same action may run again on the same GPU."""
    budget_per_hour: Annotated[int, Field(ge=0)] = 12
    """Actions (not skips) per host per rolling hour of event time."""
    breaker_threshold: Annotated[int, Field(ge=0)] = 3
    """Incidents left unresolved after the whole ladder that open the circuit breaker (only a
    person closes it); 0 disables the breaker."""
    verify_window_s: Seconds = 120.0
    """Event-time seconds the State has to clear after an action."""
    restore_after_s: Seconds = 300.0
    """Healthy event-time seconds after which a throttled GPU gets its power limit back."""
    destructive_opt_in: list[ActionName] = Field(default_factory=list)
    """Destructive actions (``reset_gpu``, ``stop_llm_service``) run only when listed here."""
    remember_events: Annotated[int, Field(ge=16, le=100_000)] = 2048
    """How many handled (event_id, phase, severity) keys are kept to ignore redeliveries."""
    give_up_after_s: Seconds = 1800.0
    """A condition a guard (pause, breaker, cooldown, budget, a busy GPU, a workload that
    answers) has held back this long ends as needing a person, counted by the breaker."""
    verify_wall_grace_s: Seconds = 30.0
    """Wall seconds an action is verified beyond its window when no sample moves event time
    (a wedged GPU, a dead publisher): then it ends ``unresolved`` (``no_samples``)."""
    clock_step_min_s: Annotated[float, Field(gt=0)] = 60.0
    """A forward jump of the source clock is a *step* (absorbed, not lived through) only when
    it is longer than this (event seconds) and ten times what the wall clock allows."""
    restore_tolerance_pct: Annotated[float, Field(ge=0, le=50)] = 2.0
    """A restored power limit is verified when the State's limit is within this percent of
    the limit given back."""

    @field_validator("destructive_opt_in")
    @classmethod
    def _only_destructive(cls, value: list[str]) -> list[str]:
        extra = sorted(set(value) - DESTRUCTIVE_ACTIONS)
        if extra:
            known = ", ".join(sorted(DESTRUCTIVE_ACTIONS))
            raise ValueError(
                f"only destructive actions need an opt-in ({known}); not: {', '.join(extra)}"
            )
        return value


class ActuatorsConfig(ConfigModel):
    ollama_url: str = Field(default="http://127.0.0.1:11434", pattern=r"^https?://")
    http_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    command_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    restart_llm_service: list[str] = Field(
        default_factory=lambda: ["systemctl", "restart", "ollama"])
    reset_gpu_session: list[str] = Field(
        default_factory=lambda: ["systemctl", "restart", "ollama"])
    stop_llm_service: list[str] = Field(default_factory=lambda: ["systemctl", "stop", "ollama"])
    stop_gpu_users: list[list[str]] = Field(
        default_factory=lambda: [["systemctl", "stop", "ollama"]])
    """Commands run before a GPU reset to stop the GPU's users."""
    start_gpu_users: list[list[str]] = Field(
        default_factory=lambda: [["systemctl", "start", "ollama"]])
    """Commands run after a GPU reset, whatever its outcome (refused, failed or done), to bring
    back what ``stop_gpu_users`` stopped: the other GPUs serve it too."""
    nvidia_smi: str = "nvidia-smi"
    jetson_clocks: str = "jetson_clocks"
    jetson_clocks_store: str = "~/.local/state/gpuheal/jetson_clocks.conf"
    """Where ``jetson_clocks --store`` saves the clocks before a throttle, for the restore."""
    throttle_pct: Annotated[float, Field(gt=0, le=100)] = 80.0
    """Power limit as percent of the default limit."""

    @field_validator("restart_llm_service", "reset_gpu_session", "stop_llm_service")
    @classmethod
    def _argv(cls, value: list[str]) -> list[str]:
        return _check_argv(value)

    @field_validator("stop_gpu_users", "start_gpu_users")
    @classmethod
    def _argvs(cls, value: list[list[str]]) -> list[list[str]]:
        return [_check_argv(argv) for argv in value]


def _check_argv(argv: list[str]) -> list[str]:
    if not argv or not argv[0]:
        raise ValueError("a command is a non-empty argv list, e.g. ['systemctl', 'restart', "
                         "'ollama']")
    return argv


class ProbeConfig(ConfigModel):
    """The workload probe: before a ``reset_gpu`` of a hang, a tiny request to the LLM the GPU
    serves. An answer vetoes the reset (the GPU works); no answer within ``deadline_s``
    confirms the hang. No endpoint, or no model loaded, says nothing either way."""

    enabled: bool = True
    url: str | None = None
    """Ollama's URL; None: ``[healer.actuators] ollama_url``."""
    model: str | None = None
    """The model to ask; None: the first one Ollama has loaded (``/api/ps``)."""
    deadline_s: Annotated[float, Field(gt=0)] = 30.0
    """Wall seconds the workload has to answer."""


class HealerConfig(ConfigModel):
    ladders: dict[str, list[Rung]] = Field(default_factory=_ladders)
    """Per condition kind, rungs in climbing order. ``xid_error`` has no ladder: the event's
    ``recommended_action`` decides."""
    guards: GuardsConfig = Field(default_factory=GuardsConfig)
    actuators: ActuatorsConfig = Field(default_factory=ActuatorsConfig)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)

    @field_validator("ladders")
    @classmethod
    def _valid_ladders(cls, value: dict[str, list[Rung]]) -> dict[str, list[Rung]]:
        for kind, rungs in value.items():
            if kind not in CONDITION_KINDS:
                raise ValueError(f"ladder for unknown condition kind {kind!r}; known: "
                                 f"{', '.join(sorted(CONDITION_KINDS))}")
            ranks = [SEVERITY_RANK[r.min_severity] for r in rungs]
            if ranks != sorted(ranks):
                raise ValueError(f"ladder {kind!r}: rungs must climb in min_severity")
        return value

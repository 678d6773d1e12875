"""Actuators against real stand-ins: an HTTP server speaking Ollama's API, a command that
records its argv, a fake nvidia-smi printing the real format, a fake NVML module."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from gpuheal.config import ActuatorsConfig
from gpuheal.models import SimCommand
from gpuheal.procs import run_command
from healer.actuators import InvalidIndexError, Result, validate_index
from healer.actuators.commands import CommandActuator
from healer.actuators.dispatch import Dispatcher, real_actuators
from healer.actuators.ollama import OllamaActuator
from healer.actuators.power import (
    PowerActuator,
    PowerLimits,
    jetson_restore_argvs,
    jetson_throttle_argvs,
    nvml_target_mw,
    parse_smi_limits,
    smi_query_limits_argv,
    smi_set_limit_argv,
    smi_target_w,
)
from healer.actuators.probe import NoProbe, WorkloadProbe
from healer.actuators.reset import (
    ResetActuator,
    parse_compute_pids,
    smi_compute_apps_argv,
    smi_reset_argv,
)
from healer.actuators.sim import SimActuator, sim_command
from healer.policy import ActuatorRequest
from healer.runner import ActionRunner
from tests.support import FIXTURES, FakeOllama, wait_for

RECORD_ARGV = str(FIXTURES / "bin" / "record-argv")
FAKE_SMI = str(FIXTURES / "healer" / "nvidia-smi")


@pytest.fixture
def argv_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "argv.jsonl"
    monkeypatch.setenv("RECORD_ARGV_FILE", str(path))
    return path


def recorded(path: Path) -> list[list[str]]:
    if not path.exists():
        return []
    return [json.loads(line)[1:] for line in path.read_text().splitlines()]


# --- Ollama ----------------------------------------------------------------------------
def test_ollama_unloads_every_loaded_model() -> None:
    with FakeOllama(["llama3.1:8b", "qwen2.5:14b"]) as fake:
        result = OllamaActuator(fake.url + "/", timeout_s=5).run("clear_llm_cache", 0, {})
    assert result.ok, result
    assert result.detail["unloaded"] == ["llama3.1:8b", "qwen2.5:14b"]
    assert fake.requests == [
        ("GET", "/api/ps", None),
        ("POST", "/api/generate", {"model": "llama3.1:8b", "keep_alive": 0}),
        ("POST", "/api/generate", {"model": "qwen2.5:14b", "keep_alive": 0}),
    ]
    assert fake.models == []


def test_ollama_with_nothing_loaded_succeeds() -> None:
    with FakeOllama([]) as fake:
        result = OllamaActuator(fake.url).run("clear_llm_cache", 0, {})
    assert result.ok and result.detail["unloaded"] == []


def test_ollama_http_error_fails_clearly() -> None:
    with FakeOllama(["llama3.1:8b"], fail_generate=True) as fake:
        result = OllamaActuator(fake.url).run("clear_llm_cache", 0, {})
    assert not result.ok and result.reason == "http_error"
    assert "HTTP 500" in result.detail["message"]


def test_ollama_unreachable() -> None:
    with FakeOllama([]) as fake:
        url = fake.url
    result = OllamaActuator(url, timeout_s=2).run("clear_llm_cache", 0, {})
    assert not result.ok and result.reason == "unreachable"


# --- configured commands -----------------------------------------------------------------
def test_service_commands_run_their_argv(argv_log: Path) -> None:
    config = ActuatorsConfig(restart_llm_service=[RECORD_ARGV, "restart", "ollama"],
                             reset_gpu_session=[RECORD_ARGV, "restart", "llm-service"],
                             stop_llm_service=[RECORD_ARGV, "stop", "ollama"])
    actuator = CommandActuator(config)
    for action in ("restart_llm_service", "reset_gpu_session", "stop_llm_service"):
        result = actuator.run(action, 0, {})
        assert result.ok and result.detail["returncode"] == 0, result
    assert recorded(argv_log) == [["restart", "ollama"], ["restart", "llm-service"],
                                  ["stop", "ollama"]]


def test_service_command_exit_status_fails(argv_log: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECORD_ARGV_EXIT", "5")
    config = ActuatorsConfig(restart_llm_service=[RECORD_ARGV, "restart", "ollama"])
    result = CommandActuator(config).run("restart_llm_service", 0, {})
    assert not result.ok and result.reason == "command_failed"
    assert result.detail["returncode"] == 5 and "status 5" in result.detail["message"]


def test_service_command_timeout_is_killed(argv_log: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECORD_ARGV_SLEEP_S", "30")
    config = ActuatorsConfig(restart_llm_service=[RECORD_ARGV, "restart", "ollama"],
                             command_timeout_s=0.5)
    result = CommandActuator(config).run("restart_llm_service", 0, {})
    assert not result.ok and result.reason == "timeout"
    assert "timed out" in result.detail["message"]
    assert result.duration_s < 10
    assert recorded(argv_log) == [["restart", "ollama"]]


def test_missing_command_fails_clearly(tmp_path: Path) -> None:
    outcome = run_command([str(tmp_path / "no-such-systemctl"), "restart", "x"], 5)
    assert outcome.error == "not_found" and not outcome.ok


# --- power limit -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("default_mw", "min_mw", "max_mw", "pct", "expected"),
    [
        (300_000, 100_000, 350_000, 80, 240_000),
        (300_000, 250_000, 350_000, 80, 250_000),  # clamped up to NVML's minimum
        (300_000, 100_000, 200_000, 100, 200_000),  # clamped down to the maximum
        (60_000, 15_000, 60_000, 80, 48_000),
        (333_333, 100_000, 400_000, 80, 266_666),
    ],
)
def test_nvml_target_is_clamped(default_mw: int, min_mw: int, max_mw: int, pct: float,
                                expected: int) -> None:
    assert nvml_target_mw(default_mw, min_mw, max_mw, pct) == expected


@pytest.mark.parametrize(
    ("limits", "pct", "expected"),
    [
        (PowerLimits(300.0, 100.0, 350.0), 80, 240),
        (PowerLimits(300.0, 250.5, 350.0), 80, 251),  # whole watts inside [min, max]
        (PowerLimits(700.0, 200.0, 700.0), 100, 700),
        (PowerLimits(125.0, 62.5, 125.0), 80, 100),
    ],
)
def test_smi_target_is_clamped_whole_watts(limits: PowerLimits, pct: float,
                                           expected: int) -> None:
    assert smi_target_w(limits, pct) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("300.00, 100.00, 350.00\n", PowerLimits(300.0, 100.0, 350.0)),
        ("300.00 W, 100.00 W, 350.00 W\n", PowerLimits(300.0, 100.0, 350.0)),
        ("\n700.00, 200.00, 700.00", PowerLimits(700.0, 200.0, 700.0)),
    ],
)
def test_parse_smi_limits(text: str, expected: PowerLimits) -> None:
    assert parse_smi_limits(text) == expected


@pytest.mark.parametrize("text", ["[N/A], [N/A], [N/A]", "[Not Supported], 1, 2", "", "1, 2"])
def test_parse_smi_limits_rejects_missing(text: str) -> None:
    with pytest.raises(ValueError):
        parse_smi_limits(text)


def test_argv_building() -> None:
    assert smi_query_limits_argv("nvidia-smi", 1) == [
        "nvidia-smi", "-i", "1", "--query-gpu=power.default_limit,power.min_limit,"
        "power.max_limit,power.limit", "--format=csv,noheader,nounits"]
    assert smi_set_limit_argv("nvidia-smi", 0, 240) == ["nvidia-smi", "-i", "0", "-pl", "240"]
    assert smi_reset_argv("/usr/bin/nvidia-smi", 3) == ["/usr/bin/nvidia-smi", "--gpu-reset",
                                                        "-i", "3"]
    assert smi_compute_apps_argv("nvidia-smi", 0) == [
        "nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader", "-i", "0"]
    assert jetson_throttle_argvs("jetson_clocks", "/s/jc.conf") == [
        ["jetson_clocks", "--store", "/s/jc.conf"], ["jetson_clocks", "--fan"]]
    assert jetson_restore_argvs("jetson_clocks", "/s/jc.conf") == [
        ["jetson_clocks", "--restore", "/s/jc.conf"]]
    with pytest.raises(ValueError):
        smi_set_limit_argv("nvidia-smi", 0, 0)


@pytest.mark.parametrize("bad", [-1, 65536, True, "0", "0; reboot", 1.0, None])
def test_only_a_valid_int_index_reaches_argv(bad: Any) -> None:
    with pytest.raises(InvalidIndexError):
        validate_index(bad)
    with pytest.raises(InvalidIndexError):
        smi_reset_argv("nvidia-smi", bad)
    result = PowerActuator(ActuatorsConfig(), nvml=None, jetson=False).run("throttle_gpu", bad,
                                                                         {})
    assert not result.ok and result.reason == "invalid_index"


class FakeNVML:
    """The few pynvml calls the power and reset actuators use, on one pretend GPU."""

    class NVMLError(Exception):
        pass

    class NVMLError_NoPermission(NVMLError):  # pynvml's name
        pass

    def __init__(self, deny: bool = False, pids: tuple[int, ...] = ()) -> None:
        self.limit_mw = 300_000
        self.calls: list[tuple[str, Any]] = []
        self.deny = deny
        self.pids = pids

    def nvmlInit(self) -> None:
        self.calls.append(("init", None))

    def nvmlShutdown(self) -> None:
        self.calls.append(("shutdown", None))

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        return f"gpu{index}"

    def nvmlDeviceGetPowerManagementDefaultLimit(self, handle: str) -> int:
        return 300_000

    def nvmlDeviceGetPowerManagementLimitConstraints(self, handle: str) -> list[int]:
        return [100_000, 350_000]

    def nvmlDeviceGetPowerManagementLimit(self, handle: str) -> int:
        return self.limit_mw

    def nvmlDeviceSetPowerManagementLimit(self, handle: str, limit_mw: int) -> None:
        if self.deny:
            raise self.NVMLError_NoPermission("Insufficient Permissions")
        self.calls.append(("set", limit_mw))
        self.limit_mw = limit_mw

    def nvmlDeviceGetComputeRunningProcesses(self, handle: str) -> list[Any]:
        return [type("P", (), {"pid": p, "usedGpuMemory": 1 << 30})() for p in self.pids]


def test_power_through_nvml() -> None:
    nvml = FakeNVML()
    actuator = PowerActuator(ActuatorsConfig(throttle_pct=80), nvml=nvml, jetson=False)
    result = actuator.run("throttle_gpu", 0, {})
    assert result.ok and result.detail["limit_mw"] == 240_000
    assert result.detail["previous_mw"] == 300_000
    assert actuator.run("restore_power_limit", 0, {}).ok
    assert [c for c in nvml.calls if c[0] == "set"] == [("set", 240_000), ("set", 300_000)]
    assert nvml.calls.count(("init", None)) == nvml.calls.count(("shutdown", None)) == 2


def test_nvml_throttle_never_raises_a_lower_limit() -> None:
    nvml = FakeNVML()
    nvml.limit_mw = 200_000  # the operator already runs it below 80 % of the default
    result = PowerActuator(ActuatorsConfig(throttle_pct=80), nvml=nvml,
                           jetson=False).run("throttle_gpu", 0, {})
    assert result.ok and result.detail["limit_mw"] == 200_000
    assert nvml.limit_mw == 200_000


def test_power_nvml_permission_denied() -> None:
    result = PowerActuator(ActuatorsConfig(), nvml=FakeNVML(deny=True),
                           jetson=False).run("throttle_gpu", 0, {})
    assert not result.ok and result.reason == "permission_denied"
    assert "Insufficient Permissions" in result.detail["message"]


def test_power_through_nvidia_smi(argv_log: Path) -> None:
    actuator = PowerActuator(ActuatorsConfig(nvidia_smi=FAKE_SMI), nvml=None, jetson=False)
    result = actuator.run("throttle_gpu", 0, {})
    assert result.ok, result
    assert result.detail["limit_w"] == 240 and "was set to 240.00 W" in result.detail["stdout"]
    assert actuator.run("restore_power_limit", 0, {}).ok
    calls = recorded(argv_log)
    assert calls[1] == ["-i", "0", "-pl", "240"] and calls[3] == ["-i", "0", "-pl", "300"]


def test_power_not_supported(argv_log: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_SMI_LIMITS", "[N/A]")
    result = PowerActuator(ActuatorsConfig(nvidia_smi=FAKE_SMI), nvml=None,
                           jetson=False).run("throttle_gpu", 0, {})
    assert not result.ok and result.reason == "not_supported"
    assert all("-pl" not in argv for argv in recorded(argv_log))


def test_power_on_jetson(argv_log: Path, tmp_path: Path) -> None:
    store = tmp_path / "state" / "jc.conf"
    config = ActuatorsConfig(jetson_clocks=RECORD_ARGV, jetson_clocks_store=str(store))
    actuator = PowerActuator(config, nvml=FakeNVML(), jetson=True)
    assert actuator.run("throttle_gpu", 0, {}).ok
    assert actuator.run("restore_power_limit", 0, {}).ok
    assert recorded(argv_log) == [["--store", str(store)], ["--fan"], ["--restore", str(store)]]


# --- GPU reset ---------------------------------------------------------------------------
def test_reset_refused_while_processes_remain_brings_the_service_back(
        argv_log: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Defect 3: a refused reset must not leave the host-wide LLM service stopped."""
    monkeypatch.setenv("FAKE_SMI_PIDS", "4242,777")
    config = ActuatorsConfig(nvidia_smi=FAKE_SMI,
                             stop_gpu_users=[[RECORD_ARGV, "stop", "ollama"]],
                             start_gpu_users=[[RECORD_ARGV, "start", "ollama"]])
    result = ResetActuator(config).run("reset_gpu", 0, {})
    assert not result.ok and result.reason == "processes_remain"
    assert result.detail["pids"] == [4242, 777] and "refusing" in result.detail["message"]
    calls = recorded(argv_log)
    assert calls[0] == ["stop", "ollama"] and calls[-1] == ["start", "ollama"]
    assert not any("--gpu-reset" in c for c in calls)


def test_reset_after_users_stopped_then_started_again(argv_log: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_SMI_PIDS", "")
    config = ActuatorsConfig(nvidia_smi=FAKE_SMI,
                             stop_gpu_users=[[RECORD_ARGV, "stop", "ollama"],
                                             [RECORD_ARGV, "stop", "llm-worker"]],
                             start_gpu_users=[[RECORD_ARGV, "start", "llm-worker"],
                                              [RECORD_ARGV, "start", "ollama"]])
    result = ResetActuator(config).run("reset_gpu", 0, {})
    assert result.ok, result
    assert "successfully reset" in result.detail["stdout"]
    assert recorded(argv_log) == [
        ["stop", "ollama"], ["stop", "llm-worker"],
        ["--query-compute-apps=pid", "--format=csv,noheader", "-i", "0"],
        ["--gpu-reset", "-i", "0"], ["start", "llm-worker"], ["start", "ollama"]]
    assert len(result.detail["start_gpu_users"]) == 2


def test_a_service_that_does_not_come_back_is_said(argv_log: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_SMI_PIDS", "")
    config = ActuatorsConfig(nvidia_smi=FAKE_SMI, stop_gpu_users=[],
                             start_gpu_users=[["/nonexistent/systemctl", "start", "ollama"]])
    result = ResetActuator(config).run("reset_gpu", 0, {})
    assert result.ok  # the reset itself worked
    assert "command not found" in result.detail["services_not_started"][0]


def test_reset_refused_when_process_check_fails(argv_log: Path) -> None:
    config = ActuatorsConfig(nvidia_smi=FAKE_SMI, stop_gpu_users=[],
                             start_gpu_users=[[RECORD_ARGV, "start", "ollama"]])
    result = ResetActuator(config).run("reset_gpu", 7, {})  # the stand-in knows only GPU 0
    assert not result.ok and result.reason == "process_check_failed"
    assert recorded(argv_log)[-1] == ["start", "ollama"]


# --- the workload probe ------------------------------------------------------------------
def test_probe_a_workload_that_answers() -> None:
    with FakeOllama(["llama3.1:8b"]) as fake:
        result = WorkloadProbe(fake.url, deadline_s=5).run("probe_workload", 0, {})
    assert result.ok and result.detail["verdict"] == "answers"
    assert result.detail["model"] == "llama3.1:8b"
    [(_, path, body)] = [r for r in fake.requests if r[0] == "POST"]
    assert path == "/api/generate" and body["options"] == {"num_predict": 1}
    assert body["stream"] is False


def test_probe_a_workload_that_does_not_answer_in_time() -> None:
    release = threading.Event()
    try:
        with FakeOllama(["llama3.1:8b"], stuck=release) as fake:
            result = WorkloadProbe(fake.url, deadline_s=0.5).run("probe_workload", 0, {})
    finally:
        release.set()
    assert result.ok and result.detail["verdict"] == "stuck"
    assert result.detail["why"] == "timeout"


@pytest.mark.parametrize("models", [[], None])
def test_probe_with_nothing_to_ask_is_inconclusive(models: list[str] | None) -> None:
    if models is None:  # no Ollama at all
        from gpuheal.net import free_port

        result = WorkloadProbe(f"http://127.0.0.1:{free_port()}", 1).run("probe_workload", 0,
                                                                           {})
        assert result.detail["why"] == "unreachable"
    else:
        with FakeOllama(models) as fake:
            result = WorkloadProbe(fake.url, 1).run("probe_workload", 0, {})
        assert result.detail["why"] == "no_model_loaded"
    assert result.ok and result.detail["verdict"] == "inconclusive"
    assert NoProbe().run("probe_workload", 0, {}).detail["verdict"] == "inconclusive"


def test_reset_with_nvml_process_list() -> None:
    config = ActuatorsConfig(nvidia_smi=FAKE_SMI, stop_gpu_users=[])
    result = ResetActuator(config, nvml=FakeNVML(pids=(99,))).run("reset_gpu", 0, {})
    assert result.reason == "processes_remain" and result.detail["pids"] == [99]


@pytest.mark.parametrize(("text", "pids"), [("", []), ("1234\n5678\n", [1234, 5678]),
                                            ("No running processes found\n", [])])
def test_parse_compute_pids(text: str, pids: list[int]) -> None:
    assert parse_compute_pids(text) == pids


def test_parse_compute_pids_refuses_garbage() -> None:
    with pytest.raises(ValueError):
        parse_compute_pids("[Not Supported]\n")


# --- simulated actuator ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("action", "command", "limit_w"),
    [
        ("clear_llm_cache", "unload_models", None),
        ("reset_gpu_session", "restart_service", None),
        ("restart_llm_service", "restart_service", None),
        ("stop_llm_service", "stop_service", None),
        ("throttle_gpu", "set_power_limit", 240.0),
        ("restore_power_limit", "set_power_limit", 300.0),
        ("reset_gpu", "reset", None),
    ],
)
def test_sim_commands(action: str, command: str, limit_w: float | None) -> None:
    params = {"default_power_limit_w": 300.0, "power_limit_w": 240.0}
    cmd = sim_command(action, "a1", params, 80.0)
    assert (cmd.command, cmd.power_limit_w, cmd.action_id) == (command, limit_w, "a1")


def test_sim_actuator_publishes() -> None:
    sent: list[tuple[int, SimCommand]] = []

    def publish(index: int, command: SimCommand) -> bool:
        sent.append((index, command))
        return True

    sim = SimActuator(publish, throttle_pct=80)
    assert sim.run("throttle_gpu", 1, {"action_id": "x", "power_limit_w": 250.0}).ok
    assert sent == [(1, SimCommand(command="set_power_limit", action_id="x",
                                   power_limit_w=200.0))]
    assert not sim.run("notify", 1, {}).ok
    assert sim.run("throttle_gpu", 1, {}).reason == "unsupported"  # no limit known
    failing = SimActuator(lambda i, c: False)
    assert failing.run("reset_gpu", 0, {}).reason == "not_published"


# --- dispatch and the worker runner ------------------------------------------------------
def test_dispatcher_turns_a_crash_into_a_failure() -> None:
    class Broken:
        def run(self, action: str, index: int, params: dict[str, Any]) -> Result:
            raise RuntimeError("boom")

    result = Dispatcher({"reset_gpu": Broken()}).run("reset_gpu", 0, {})
    assert not result.ok and result.reason == "error" and "boom" in result.detail["message"]
    assert Dispatcher({}).run("notify", 0, {}).reason == "unsupported"
    assert set(real_actuators(ActuatorsConfig(), jetson=False).routes) == {
        "clear_llm_cache", "reset_gpu_session", "restart_llm_service", "stop_llm_service",
        "throttle_gpu", "restore_power_limit", "reset_gpu", "probe_workload"}


def test_runner_watchdog_times_out_a_stuck_actuator() -> None:
    release = threading.Event()
    results: list[tuple[str, Result]] = []

    class Stuck:
        def run(self, action: str, index: int, params: dict[str, Any]) -> Result:
            release.wait(10)
            return Result(True)

    runner = ActionRunner(Stuck(), lambda a, r: results.append((a, r)), watchdog_s=0.05)
    runner.submit(ActuatorRequest("id1", "reset_gpu", 0, {}))
    runner.submit(ActuatorRequest("id1", "reset_gpu", 0, {}))  # never twice

    def overdue() -> list[tuple[str, Result]]:
        runner.check_overdue()
        return results

    wait_for(overdue, 5, "the watchdog")
    release.set()
    runner.shutdown()
    assert runner.join(5)
    assert [(a, r.reason) for a, r in results] == [("id1", "timeout")]


def test_restore_puts_back_the_operators_own_limit_not_the_default() -> None:
    nvml = FakeNVML()
    nvml.limit_mw = 280_000  # the operator's choice, below the 300 W default
    actuator = PowerActuator(ActuatorsConfig(throttle_pct=80), nvml=nvml, jetson=False)
    assert actuator.run("throttle_gpu", 0, {}).ok and nvml.limit_mw == 240_000
    assert actuator.run("throttle_gpu", 0, {}).ok  # a second throttle keeps the first memory
    assert actuator.run("restore_power_limit", 0, {}).ok
    assert nvml.limit_mw == 280_000
    assert actuator.run("restore_power_limit", 0, {}).ok  # nothing remembered: the default
    assert nvml.limit_mw == 300_000


def test_smi_throttle_never_raises_a_lower_limit_and_restores_it(
        argv_log: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_SMI_CURRENT", "200.00")
    actuator = PowerActuator(ActuatorsConfig(nvidia_smi=FAKE_SMI), nvml=None, jetson=False)
    assert actuator.run("throttle_gpu", 0, {}).ok
    assert actuator.run("restore_power_limit", 0, {}).ok
    calls = recorded(argv_log)
    assert calls[1] == ["-i", "0", "-pl", "200"] and calls[3] == ["-i", "0", "-pl", "200"]


def test_parse_smi_limits_reads_the_current_limit() -> None:
    assert parse_smi_limits("300.00, 100.00, 350.00, 250.00").current_w == 250.0
    assert parse_smi_limits("300.00, 100.00, 350.00, [N/A]").current_w is None

"""Only validated values reach a command line: the GPU index as a plain int, numbers the
healer computed, and words from the configuration; never text from a payload.

The actuators run real subprocesses (``tests/fixtures/bin/record-argv`` records each argv it
is started with, the ``nvidia-smi`` stand-in speaks the real tool's CSV); the argv builders
are checked directly with hostile indices.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gpuheal.config import ActuatorsConfig
from healer.actuators import InvalidIndexError, validate_index
from healer.actuators.commands import CommandActuator
from healer.actuators.dispatch import real_actuators
from healer.actuators.power import (
    PowerActuator,
    jetson_restore_argvs,
    jetson_throttle_argvs,
    smi_query_limits_argv,
    smi_set_limit_argv,
)
from healer.actuators.reset import ResetActuator, smi_compute_apps_argv, smi_reset_argv
from tests.support import FIXTURES

HOSTILE_INDEX: list[Any] = [
    "0", "0; reboot", "$(reboot)", "0 --gpu-reset", "-1", -1, 65536, 2**70, 1.0, 0.5, True,
    False, None, b"0", [0], {"index": 0}, float("nan"), "٣",
]
"""Not a GPU index: text (even of digits, even Arabic-Indic ones), out of range, a float, a
bool (an int to Python), containers."""
HOSTILE_TEXT = "; reboot $(id) `id` | rm -rf / && -i 1 --gpu-reset"


class EvilInt(int):
    """An int whose text is a command: only ``int(...)`` of it may reach an argv."""

    def __str__(self) -> str:
        return "0; reboot"

    __repr__ = __str__

    def __format__(self, spec: str) -> str:
        return "0; reboot"


@pytest.mark.parametrize("bad", HOSTILE_INDEX, ids=[repr(b)[:20] for b in HOSTILE_INDEX])
def test_argv_builders_take_only_a_validated_int_index(bad: Any) -> None:
    with pytest.raises(InvalidIndexError):
        validate_index(bad)
    for build in (lambda i: smi_reset_argv("nvidia-smi", i),
                  lambda i: smi_compute_apps_argv("nvidia-smi", i),
                  lambda i: smi_query_limits_argv("nvidia-smi", i),
                  lambda i: smi_set_limit_argv("nvidia-smi", i, 200)):
        with pytest.raises(InvalidIndexError):
            build(bad)


def test_an_int_subclass_reaches_argv_as_its_plain_value() -> None:
    evil = EvilInt(3)
    assert validate_index(evil) == 3 and type(validate_index(evil)) is int
    for argv in (smi_reset_argv("nvidia-smi", evil), smi_compute_apps_argv("nvidia-smi", evil),
                 smi_query_limits_argv("nvidia-smi", evil),
                 smi_set_limit_argv("nvidia-smi", evil, 200)):
        assert "3" in argv and not any("reboot" in a for a in argv), argv
    with pytest.raises(ValueError):
        smi_set_limit_argv("nvidia-smi", 0, "200; reboot")  # type: ignore[arg-type]
    assert jetson_throttle_argvs("jc", "/s") == [["jc", "--store", "/s"], ["jc", "--fan"]]
    assert jetson_restore_argvs("jc", "/s") == [["jc", "--restore", "/s"]]


def test_payload_text_never_reaches_a_command_line(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Every real actuator, with params full of payload-derived hostile text: the commands it
    runs hold only configured words, numbers it computed and the validated index."""
    log = tmp_path / "argv.jsonl"
    monkeypatch.setenv("RECORD_ARGV_FILE", str(log))
    monkeypatch.setenv("FAKE_SMI_PIDS", "")
    record = str(FIXTURES / "bin" / "record-argv")
    smi = str(FIXTURES / "healer" / "nvidia-smi")
    config = ActuatorsConfig(
        nvidia_smi=smi, restart_llm_service=[record, "restart", "llm"],
        reset_gpu_session=[record, "restart", "llm"], stop_llm_service=[record, "stop", "llm"],
        stop_gpu_users=[[record, "stop", "users"]], start_gpu_users=[[record, "start", "users"]],
        ollama_url="http://127.0.0.1:9", http_timeout_s=1.0, command_timeout_s=20.0,
        jetson_clocks=record, jetson_clocks_store=str(tmp_path / "clocks.conf"))
    params = {"action_id": HOSTILE_TEXT, "gpu_name": HOSTILE_TEXT,
              "power_limit_w": HOSTILE_TEXT, "default_power_limit_w": HOSTILE_TEXT,
              "throttle_pct": HOSTILE_TEXT, "argv": [HOSTILE_TEXT], "index": HOSTILE_TEXT}
    actuators = real_actuators(config, nvml=None, jetson=False)
    for action in ("reset_gpu_session", "restart_llm_service", "stop_llm_service",
                   "throttle_gpu", "restore_power_limit", "reset_gpu", "clear_llm_cache"):
        result = actuators.run(action, 0, dict(params))
        assert HOSTILE_TEXT not in json.dumps(result.detail), (action, result.detail)
    for bad in ("0; reboot", -1, 1.0, True):
        for actuator in (PowerActuator(config, nvml=None, jetson=False),
                         ResetActuator(config)):
            action = "reset_gpu" if isinstance(actuator, ResetActuator) else "throttle_gpu"
            assert actuator.run(action, bad, dict(params)).reason == "invalid_index"
    assert CommandActuator(config).run("stop_llm_service", 0, dict(params)).ok
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    ran = {tuple(argv) for argv in calls}
    assert {(smi, "-i", "0", "-pl", "240"), (smi, "--gpu-reset", "-i", "0"),
            (record, "stop", "users"), (record, "start", "users")} <= ran, ran
    allowed = {record, smi, "restart", "stop", "start", "llm", "users", "-i", "0", "-pl",
               "240", "300", "--gpu-reset", "--query-compute-apps=pid",
               "--format=csv,noheader",
               "--query-gpu=power.default_limit,power.min_limit,power.max_limit,power.limit",
               "--format=csv,noheader,nounits"}
    for argv in calls:
        assert set(argv) <= allowed, argv

"""Every component starts, stops and fails the same way: the same exit codes, the same log
lines; none of them imports paho (the Bus is the one way in and out)."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
from pathlib import Path

import pytest

from gpuheal.net import free_port
from tests.support import REPO, Collector

COMPONENTS = ["publisher", "analyzer", "healer", "recorder", "dashboard"]


def _argv(component: str, tmp_path: Path) -> list[str]:
    extra = {"publisher": ["--source", "sim", "--scenario", "healthy"],
             "healer": ["--source", "sim", "--state-file", str(tmp_path / "h.json")],
             "recorder": ["--db", str(tmp_path / "r.db")],
             "dashboard": ["--port", "0", "--db", str(tmp_path / "r.db")],
             "analyzer": []}[component]
    return [component, *extra]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("GPUHEAL_")}


@pytest.mark.parametrize("component", COMPONENTS)
def test_a_bad_broker_url_is_one_line_and_exit_2(component: str, tmp_path: Path,
                                                 gpuheal_cmd: list[str]) -> None:
    done = subprocess.run([*gpuheal_cmd, *_argv(component, tmp_path), "--broker",
                           "http://nowhere"], capture_output=True, text=True, timeout=30,
                          env=_env())
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"gpuheal {component}: broker URL must start with mqtt:// or mqtts://, got "
        "'http://nowhere'")
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("component", COMPONENTS)
def test_a_bad_config_is_exit_2_without_a_traceback(component: str, tmp_path: Path,
                                                    gpuheal_cmd: list[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[analyzer.thermal]\nwarning_c = -5\n")
    done = subprocess.run([*gpuheal_cmd, *_argv(component, tmp_path), "--config", str(bad)],
                          capture_output=True, text=True, timeout=30, env=_env())
    assert done.returncode == 2 and "analyzer.thermal.warning_c" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
@pytest.mark.parametrize("component", COMPONENTS)
def test_a_signal_stops_it_cleanly_with_a_goodbye(component: str, how: signal.Signals,
                                                  broker, prefix: str, tmp_path: Path,
                                                  gpuheal_cmd: list[str]) -> None:
    status = f"{prefix}/life/{component}/status"
    with Collector(broker.url, status) as seen:
        proc = subprocess.Popen([*gpuheal_cmd, *_argv(component, tmp_path), "--broker",
                                 broker.url, "--prefix", prefix, "--host-name", "life",
                                 "--log-level", "INFO"], stderr=subprocess.PIPE, text=True,
                                env=_env())
        try:
            seen.wait(lambda ms: any(m.payload == b"online" for m in ms), 30, "online")
            proc.send_signal(how)
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, err
        seen.wait(lambda ms: ms[-1].payload == b"offline", 10, "offline")
    lines = err.splitlines()
    assert any(f"gpuheal INFO {component}: running for host life on mqtt://127.0.0.1:"
               in line for line in lines), err
    assert any(f"gpuheal INFO {component}: stopped; " in line for line in lines), err
    assert not [line for line in lines if " ERROR " in line or "Traceback" in line], err


@pytest.mark.parametrize("component", ["analyzer", "recorder"])
def test_a_broker_that_never_answers_is_exit_1_with_the_reason(component: str,
                                                               tmp_path: Path,
                                                               gpuheal_cmd: list[str]) -> None:
    port = free_port()
    proc = subprocess.Popen([*gpuheal_cmd, *_argv(component, tmp_path), "--broker",
                             f"mqtt://127.0.0.1:{port}"], stderr=subprocess.PIPE, text=True,
                            env=_env())
    try:
        line = ""
        assert proc.stderr is not None
        while "cannot reach broker" not in line:
            line = proc.stderr.readline()
            assert line, "no connection error said"
        assert f"cannot reach broker 127.0.0.1:{port} (connection refused), retrying in" in line
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    assert err.strip().splitlines()[-1].startswith(
        f"gpuheal {component}: never reached the broker at mqtt://127.0.0.1:{port}")


def test_no_component_imports_paho() -> None:
    for package in ("publisher", "analyzer", "healer", "recorder", "dashboard"):
        for path in (REPO / package).rglob("*.py"):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or ""]
                assert not any(n == "paho" or n.startswith("paho.") for n in names), path

"""The umbrella CLI as a person runs it: real subprocesses, a real broker, real files."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

from gpuheal.models import HealerState, State, iso_utc
from gpuheal.topics import Topics
from tests.support import publish


def run(cmd: list[str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout)


def test_status_prints_every_retained_state(broker, prefix: str, gpuheal_cmd) -> None:
    t = Topics(prefix)
    now = time.time()
    for host, index, health, analyzer in (("alpha", 0, "healthy", "central"),
                                          ("alpha", 1, "critical", "central"),
                                          ("beta", 0, "healthy", "edge-b")):
        state = State(host=host, index=index, name="NVIDIA H100 80GB HBM3", health=health,
                      error="none" if health == "healthy" else "gpu_hang",
                      error_message=None if health == "healthy" else "hang confirmed: flat",
                      temperature=61.0, utilization=100.0, timestamp=iso_utc(now), ts=now,
                      analyzer=analyzer)
        publish(broker.url, t.state(host, index), state.to_json(), retain=True)
    publish(broker.url, t.status("central", "analyzer"), b"online", retain=True)
    publish(broker.url, t.status("edge-b", "analyzer"), b"offline", retain=True)
    publish(broker.url, t.status("alpha", "publisher"), b"online", retain=True)
    healer = HealerState(host="alpha", enabled=False, dry_run=False, breaker_open=True,
                         breaker_reason="3 unresolved", budget_left=9, budget_per_hour=12,
                         ts=now)
    publish(broker.url, t.healer_state("alpha"), healer.to_json(), retain=True)
    table = run(gpuheal_cmd, "status", "--broker", broker.url, "--prefix", prefix)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:4] == ["HOST", "GPU", "NAME", "HEALTH"]
    rows = [line.split() for line in lines[1:4]]
    assert [(r[0], r[1]) for r in rows] == [("alpha", "0"), ("alpha", "1"), ("beta", "0")]
    assert "critical" in lines[2] and "hang confirmed: flat" in lines[2]
    # beta's analyzer is offline: its last State says nothing about now
    assert rows[2][6] == "stale", lines[3]
    host_lines = {line.split(":")[0]: line for line in lines[5:]}
    assert "publisher online" in host_lines["alpha"]
    assert "healer paused, breaker OPEN (3 unresolved), budget 9/12" in host_lines["alpha"]
    as_json = run(gpuheal_cmd, "status", "--broker", broker.url, "--prefix", prefix, "--json")
    assert [json.loads(line)["health"] for line in as_json.stdout.splitlines()] == [
        "healthy", "critical", "healthy"]
    only = run(gpuheal_cmd, "status", "--broker", broker.url, "--prefix", prefix,
               "--host-name", "beta")
    assert [line.split()[0] for line in only.stdout.splitlines()[1:2]] == ["beta"]
    forget = run(gpuheal_cmd, "status", "--broker", broker.url, "--prefix", prefix,
                 "--forget", "alpha")
    assert forget.returncode == 0, forget.stderr
    assert f"cleared {t.state('alpha', 1)}" in forget.stdout
    assert f"cleared {t.healer_state('alpha')}" in forget.stdout
    after = run(gpuheal_cmd, "status", "--broker", broker.url, "--prefix", prefix, "--json")
    assert [json.loads(line)["host"] for line in after.stdout.splitlines()] == ["beta"]


def test_status_watch_redraws_until_stopped(broker, prefix: str, gpuheal_cmd) -> None:
    t = Topics(prefix)
    state = State(host="w", index=0, health="healthy", timestamp=iso_utc(1.7e9), ts=1.7e9)
    publish(broker.url, t.state("w", 0), state.to_json(), retain=True)
    proc = subprocess.Popen([*gpuheal_cmd, "status", "--broker", broker.url, "--prefix",
                             prefix, "--watch", "0.2"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    seen = [proc.stdout.readline() for _ in range(12)]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(10) == 0
    assert sum(line.startswith("gpuheal status") for line in seen) >= 2


def test_status_says_clearly_when_there_is_nothing_or_no_broker(broker, prefix,
                                                                gpuheal_cmd) -> None:
    empty = run(gpuheal_cmd, "status", "--broker", broker.url, "--prefix", prefix)
    assert empty.returncode == 1 and "no GPU state" in empty.stderr
    from gpuheal.broker import free_port

    down = run(gpuheal_cmd, "status", "--broker", f"mqtt://127.0.0.1:{free_port()}",
               "--timeout", "1")
    assert down.returncode == 2 and "connection refused" in down.stderr
    assert "Traceback" not in down.stderr


def test_bad_options_fail_with_a_clear_message(tmp_path: Path, gpuheal_cmd) -> None:
    bad_url = run(gpuheal_cmd, "status", "--broker", "http://x")
    assert bad_url.returncode == 2 and "mqtt://" in bad_url.stderr
    typo = tmp_path / "typo.toml"
    typo.write_text("[healer.guards]\ncooldwn_s = 1\n")
    config = run(gpuheal_cmd, "analyzer", "--config", str(typo))
    assert config.returncode == 2 and "cooldwn_s" in config.stderr
    assert "Traceback" not in config.stderr
    missing = run(gpuheal_cmd, "history", "--db", str(tmp_path / "nope.db"))
    assert missing.returncode != 0 and "Traceback" not in missing.stderr


def test_broker_init_writes_a_config_and_refuses_to_overwrite(tmp_path: Path,
                                                               gpuheal_cmd) -> None:
    target = tmp_path / "broker"
    first = run(gpuheal_cmd, "broker", "init", str(target), "--port", "18999")
    assert first.returncode == 0, first.stderr
    for name in ("mosquitto.conf", "passwd", "acl", "publisher.env", "viewer.env",
                 "operator.env"):
        assert (target / name).is_file(), name
    conf = (target / "mosquitto.conf").read_text()
    assert "allow_anonymous false" in conf and "listener 18999 127.0.0.1" in conf
    assert "GPUHEAL_BROKER=mqtt://publisher:" in (target / "publisher.env").read_text()
    again = run(gpuheal_cmd, "broker", "init", str(target), "--port", "18999")
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert "gpuheal broker: " in again.stderr


def test_broker_init_adds_a_tls_listener_from_the_command_line(tmp_path: Path,
                                                                gpuheal_cmd) -> None:
    for name in ("ca.crt", "server.crt", "server.key"):
        (tmp_path / name).write_text("PEM\n")
    target = tmp_path / "broker"
    done = run(gpuheal_cmd, "broker", "init", str(target), "--port", "18997",
               "--tls-ca", str(tmp_path / "ca.crt"), "--tls-cert", str(tmp_path / "server.crt"),
               "--tls-key", str(tmp_path / "server.key"), "--tls-port", "8884",
               "--tls-host", "broker.example.net")
    assert done.returncode == 0, done.stderr
    conf = (target / "mosquitto.conf").read_text()
    assert "listener 8884 0.0.0.0" in conf and f"cafile {tmp_path / 'ca.crt'}" in conf
    env = (target / "healer.env").read_text()
    assert "GPUHEAL_BROKER_TLS=mqtts://healer:" in env
    assert "@broker.example.net:8884?ca=" in env
    half = run(gpuheal_cmd, "broker", "init", str(tmp_path / "other"), "--tls-ca",
               str(tmp_path / "ca.crt"))
    assert half.returncode == 2 and "go together" in half.stderr

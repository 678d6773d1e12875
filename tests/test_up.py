"""``gpuheal up`` as an operator leans on it: checks before starting, one `up` per state
directory and database, a private broker reused after a crash, supervision with restarts,
no orphans after ``kill -9``. Real processes, real signals, a real Mosquitto."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from gpuheal.broker import start_broker
from gpuheal.broker_init import ensure_broker_dir, read_env_file
from gpuheal.mqtt import BrokerURL
from gpuheal.net import free_port, port_answers
from tests.support import Collector, wait_for


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for var in [v for v in env if v.startswith("GPUHEAL_")]:
        env.pop(var)
    return env


def start_up(gpuheal_cmd: list[str], tmp_path: Path, port: int, *extra: str,
             name: str = "up") -> subprocess.Popen[bytes]:
    log = (tmp_path / f"{name}.log").open("wb")
    return subprocess.Popen(
        [*gpuheal_cmd, "up", "--broker", f"mqtt://127.0.0.1:{port}", "--source", "sim",
         "--scenario", "healthy", "--speed", "5", "--host-name", "uphost",
         "--state-dir", str(tmp_path / "state"), "--db", str(tmp_path / "up.db"),
         "--dashboard-port", str(free_port()), "--log-level", "INFO", *extra],
        env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def log_of(tmp_path: Path, name: str = "up") -> str:
    return (tmp_path / f"{name}.log").read_text(errors="replace")


def stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
    return proc.wait(40)


def viewer(tmp_path: Path) -> str:
    """The viewer's broker URL, once the private broker accepts connections (its credentials
    are written before it listens)."""
    env = tmp_path / "state" / "broker" / "viewer.env"
    wait_for(env.exists, 30, "the private broker's credentials")
    url = read_env_file(env)["GPUHEAL_BROKER"]
    broker = BrokerURL.parse(url)
    wait_for(lambda: port_answers(broker.host, broker.port), 30, "the private broker listening")
    return url


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def gpuheal_processes(state_dir: Path) -> list[int]:
    """Processes whose command line names ``state_dir`` or its broker config."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(state_dir) in cmd:
            found.append(int(entry.name))
    return found


@pytest.mark.timeout(120)
def test_a_second_up_is_refused_naming_the_first(tmp_path: Path, gpuheal_cmd) -> None:
    port = free_port()
    first = start_up(gpuheal_cmd, tmp_path, port)
    try:
        wait_for(lambda: "dashboard:" in log_of(tmp_path), 60, "the first up's banner")
        second = subprocess.run(
            [*gpuheal_cmd, "up", "--broker", f"mqtt://127.0.0.1:{free_port()}",
             "--source", "sim", "--state-dir", str(tmp_path / "state"),
             "--db", str(tmp_path / "other.db")], env=_env(), capture_output=True, text=True,
            timeout=30)
        assert second.returncode == 2, second.stderr
        assert f"(pid {first.pid})" in second.stderr and "Traceback" not in second.stderr
        same_db = subprocess.run(
            [*gpuheal_cmd, "up", "--broker", f"mqtt://127.0.0.1:{free_port()}",
             "--source", "sim", "--state-dir", str(tmp_path / "state2"),
             "--db", str(tmp_path / "up.db")], env=_env(), capture_output=True, text=True,
            timeout=30)
        assert same_db.returncode == 2 and "database" in same_db.stderr, same_db.stderr
    finally:
        assert stop(first) == 0, log_of(tmp_path)[-3000:]


def test_bad_paths_and_scenarios_fail_before_anything_starts(tmp_path: Path,
                                                             gpuheal_cmd) -> None:
    port = free_port()
    base = [*gpuheal_cmd, "up", "--broker", f"mqtt://127.0.0.1:{port}", "--source", "sim"]
    bad_scenario = subprocess.run([*base, "--scenario", "no-such", "--state-dir",
                                   str(tmp_path / "s1")], env=_env(), capture_output=True,
                                  text=True, timeout=30)
    assert bad_scenario.returncode == 2 and "unknown scenario" in bad_scenario.stderr
    assert not port_answers("127.0.0.1", port)  # nothing was started
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o500)
    if os.access(readonly, os.W_OK):
        pytest.skip("the read-only check needs a user who cannot write everywhere (not root)")
    bad_db = subprocess.run([*base, "--db", str(readonly / "x.db"), "--state-dir",
                             str(tmp_path / "s2")], env=_env(), capture_output=True, text=True,
                            timeout=30)
    assert bad_db.returncode == 2 and "not writable" in bad_db.stderr
    assert not port_answers("127.0.0.1", port)  # nothing was started


def test_root_sees_read_only_and_missing_paths_too(tmp_path: Path, gpuheal_cmd) -> None:
    base = [*gpuheal_cmd, "up", "--broker", f"mqtt://127.0.0.1:{free_port()}", "--source",
            "sim", "--state-dir", str(tmp_path / "s")]
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    not_a_dir = subprocess.run([*base, "--db", str(a_file / "x.db")], env=_env(),
                               capture_output=True, text=True, timeout=30)
    assert not_a_dir.returncode == 2 and "is not a directory" in not_a_dir.stderr
    db_dir = tmp_path / "dbdir"
    db_dir.mkdir()
    is_dir = subprocess.run([*base, "--db", str(db_dir)], env=_env(), capture_output=True,
                            text=True, timeout=30)
    assert is_dir.returncode == 2 and "is a directory" in is_dir.stderr


@pytest.mark.timeout(150)
def test_a_dead_component_is_restarted_and_kill_9_leaves_no_orphans(tmp_path: Path,
                                                                     gpuheal_cmd) -> None:
    port = free_port()
    up = start_up(gpuheal_cmd, tmp_path, port)
    try:
        url = viewer(tmp_path)
        with Collector(url, "gpuheal/uphost/+/status") as status:
            status.wait(lambda ms: {m.topic.split("/")[2] for m in ms if m.payload == b"online"}
                        >= {"publisher", "analyzer", "healer", "recorder", "dashboard"}, 60,
                        "every component online")
            analyzer = next(pid for pid in children_of(up.pid)
                            if b"analyzer" in Path(f"/proc/{pid}/cmdline").read_bytes())
            os.kill(analyzer, signal.SIGKILL)
            wait_for(lambda: "analyzer exited with -9; starting it again" in log_of(tmp_path),
                     20, "the supervisor noticing")
            status.wait(lambda ms: [m.payload for m in ms
                                    if m.topic.endswith("/analyzer/status")][-1:] == [b"online"]
                        and sum(1 for m in ms if m.topic.endswith("/analyzer/status")
                                and m.payload == b"online") >= 2, 30, "the analyzer back online")
        children = children_of(up.pid)
        assert len(children) >= 5
        os.kill(up.pid, signal.SIGKILL)  # no goodbye at all
        up.wait(10)
        wait_for(lambda: not [p for p in children if Path(f"/proc/{p}").exists()
                              and "Z" not in Path(f"/proc/{p}/stat").read_text().split()[2]],
                 30, "every child gone with its parent")
        wait_for(lambda: not port_answers("127.0.0.1", port), 20, "the broker gone")
    finally:
        if up.poll() is None:
            stop(up)


@pytest.mark.timeout(150)
def test_a_later_up_reuses_its_private_broker(tmp_path: Path, gpuheal_cmd) -> None:
    """A private broker left running (an earlier `up` hung up, another tool started it) is
    used with the credentials of the state directory, not fought with."""
    port = free_port()
    init = ensure_broker_dir(tmp_path / "state" / "broker", port)
    broker = start_broker(init.conf_path, port, tmp_path / "left.log")
    try:
        up = start_up(gpuheal_cmd, tmp_path, port)
        try:
            with Collector(init.urls["viewer"], "gpuheal/uphost/+/status") as status:
                status.wait(lambda ms: {m.topic.split("/")[2] for m in ms
                                        if m.payload == b"online"}
                            >= {"publisher", "analyzer", "healer", "recorder"}, 60,
                            "the pipeline online on the broker that was already there")
            assert "already answers" in log_of(tmp_path)
            assert "Not authorized" not in log_of(tmp_path)
        finally:
            assert stop(up) == 0, log_of(tmp_path)[-3000:]
        assert broker.process.poll() is None  # not ours to stop
    finally:
        broker.stop()


def test_sighup_stops_up_cleanly(tmp_path: Path, gpuheal_cmd) -> None:
    port = free_port()
    up = start_up(gpuheal_cmd, tmp_path, port)
    try:
        wait_for(lambda: "dashboard:" in log_of(tmp_path), 60, "the banner")
        t0 = time.monotonic()
        os.kill(up.pid, signal.SIGHUP)
        assert up.wait(40) == 0
        assert time.monotonic() - t0 < 40
        assert not port_answers("127.0.0.1", port)
        assert not gpuheal_processes(tmp_path / "state")
    finally:
        if up.poll() is None:
            stop(up)

"""A private Mosquitto: render the project's config, start it, wait until it answers."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template

from gpuheal.net import free_port, port_answers
from gpuheal.procs import find_executable

MOSQUITTO_BIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/usr/bin", "/usr/local/bin")
"""Where Debian and source builds put Mosquitto's programs (outside a user's PATH)."""

__all__ = ["BrokerError", "PrivateBroker", "find_mosquitto", "free_port", "port_answers",
           "read_template", "render_local_config", "start_broker", "start_local_broker"]


class BrokerError(RuntimeError):
    """The private broker could not be started."""


def read_template(name: str) -> str:
    """A broker config template shipped inside the package (``gpuheal/data/mosquitto/``), so
    that a wheel install works as well as a checkout."""
    try:
        return resources.files("gpuheal").joinpath("data", "mosquitto", name).read_text()
    except (FileNotFoundError, NotADirectoryError):
        raise BrokerError(f"broker config template {name} is missing from the gpuheal "
                          "package (a broken install?)") from None


def render_local_config(port: int, data_dir: Path) -> str:
    """The local broker config (``local.conf.tmpl``) for this port and data dir."""
    return Template(read_template("local.conf.tmpl")).substitute(port=port,
                                                                 data_dir=str(data_dir))


def mosquitto_program(name: str) -> str:
    """Mosquitto's ``name`` program (``mosquitto``, ``mosquitto_passwd``), or BrokerError."""
    exe = find_executable(name, [f"{d}/{name}" for d in MOSQUITTO_BIN_DIRS])
    if exe is None:
        raise BrokerError(f"{name} is not installed: run `sudo apt-get install mosquitto` "
                          "or point --broker at a running broker")
    return exe


def find_mosquitto() -> str:
    return mosquitto_program("mosquitto")


@dataclass
class PrivateBroker:
    """A Mosquitto process this program started (and will stop)."""

    process: subprocess.Popen[bytes]
    port: int
    config_path: Path
    log_path: Path

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout_s)


def start_broker(
    config_path: Path, port: int, log_path: Path, timeout_s: float = 10.0,
    preexec_fn: Callable[[], None] | None = None,
) -> PrivateBroker:
    """Start ``mosquitto -c config_path`` and wait until ``port`` accepts connections
    (``preexec_fn`` runs in the child before exec, e.g. to die with its parent)."""
    log_file = log_path.open("ab")
    proc = subprocess.Popen(
        [find_mosquitto(), "-c", str(config_path)],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        # Its own session: a Ctrl-C in the terminal reaches the components, which still
        # need the broker to say `offline`; whoever started the broker stops it last.
        start_new_session=True,
        preexec_fn=preexec_fn,
    )
    log_file.close()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BrokerError(
                f"mosquitto exited with {proc.returncode}: {log_path.read_text()[-2000:]}"
            )
        if port_answers("127.0.0.1", port, 0.2):
            return PrivateBroker(proc, port, config_path, log_path)
        time.sleep(0.05)
    proc.kill()
    raise BrokerError(f"mosquitto did not listen on port {port} within {timeout_s} s")


def start_local_broker(workdir: Path, port: int | None = None) -> PrivateBroker:
    """Render the local (anonymous, 127.0.0.1) config into ``workdir`` and start it."""
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "data"
    data.mkdir(exist_ok=True)
    port = port or free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(render_local_config(port, data))
    return start_broker(conf, port, workdir / "mosquitto.log")

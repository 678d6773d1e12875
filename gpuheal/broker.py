"""A private Mosquitto: render the project's config, start it, wait until it answers."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from string import Template

REPO_ROOT = Path(__file__).resolve().parent.parent
MOSQUITTO_DIR = REPO_ROOT / "mosquitto"


class BrokerError(RuntimeError):
    """The private broker could not be started."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_answers(host: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def render_local_config(port: int, data_dir: Path, template: Path | None = None) -> str:
    """The local broker config (``mosquitto/local.conf.tmpl``) for this port and data dir."""
    tmpl = template or MOSQUITTO_DIR / "local.conf.tmpl"
    if not tmpl.is_file():
        raise BrokerError(f"broker config template not found: {tmpl}")
    return Template(tmpl.read_text()).substitute(port=port, data_dir=str(data_dir))


def find_mosquitto() -> str:
    exe = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()),
        None,
    )
    if exe is None:
        raise BrokerError(
            "mosquitto is not installed: run `sudo apt-get install mosquitto` "
            "or point --broker at a running broker"
        )
    return exe


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
    config_path: Path, port: int, log_path: Path, timeout_s: float = 10.0
) -> PrivateBroker:
    """Start ``mosquitto -c config_path`` and wait until ``port`` accepts connections."""
    log_file = log_path.open("ab")
    proc = subprocess.Popen(
        [find_mosquitto(), "-c", str(config_path)],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        # Its own session: a Ctrl-C in the terminal reaches the components, which still
        # need the broker to say `offline`; whoever started the broker stops it last.
        start_new_session=True,
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

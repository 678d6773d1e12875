"""A second MQTT 5 broker for the tests: Debian's ejabberd (23.01) with its MQTT service.

gpuheal uses standard MQTT 5 only (retained messages, QoS 1, a retained Last Will with user
properties, persistent sessions with clean start off and session expiry, No Local, Receive
Maximum, payloads up to 256 KiB), so any broker that implements the standard must carry the
pipeline. ejabberd is a broker written apart from Mosquitto (Erlang, its own MQTT stack) that
installs from Debian (``apt-get install ejabberd``; ``scripts/setup.sh --test`` does it).

:func:`start_ejabberd` starts it the way the tests start Mosquitto: a config of its own in a
fresh directory, a free port on 127.0.0.1, in the foreground through ``erl`` (no system
service, no ``ejabberdctl``, no Erlang distribution: no ``epmd``, no cookie), as an
unprivileged process (when the tests run as root it runs as the package's ``ejabberd`` user),
and it is stopped with SIGTERM. Anonymous MQTT logins are allowed, but ejabberd wants a user
name in the CONNECT anyway: :attr:`EjabberdBroker.url` carries one (any name and password).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from gpuheal.net import free_port, port_answers

ERL = "/usr/bin/erl"
EJABBERD_APPS = "/usr/lib/*/ejabberd-*/ebin/ejabberd.app"
"""Where Debian's package puts the ejabberd application (its parent is the ERL_LIBS dir)."""
UNPRIVILEGED_USER = "ejabberd"
"""The system user Debian's package creates; the broker runs as it when the tests are root."""
LOGIN = "gpuheal:any"
"""ejabberd's anonymous MQTT login still needs a user name (and a password) in the CONNECT."""

CONFIG = """\
hosts: ["localhost"]
loglevel: warning
auth_method: [anonymous]
anonymous_protocol: login_anon
listen:
  -
    port: {port}
    ip: "127.0.0.1"
    module: mod_mqtt
    backlog: 1000
modules:
  mod_mqtt:
    max_queue: 100000
"""


class EjabberdError(RuntimeError):
    """ejabberd could not be started."""


def ejabberd_lib_dir() -> str | None:
    """The directory holding the ejabberd application (ERL_LIBS), or None."""
    apps = sorted(glob.glob(EJABBERD_APPS))
    if not apps:
        return None
    return str(Path(apps[-1]).parent.parent.parent)


def ejabberd_missing() -> str | None:
    """Why ejabberd cannot run here (a skip reason), or None when it can."""
    if not os.access(ERL, os.X_OK):
        return (f"ejabberd is not installed ({ERL} is missing): `sudo apt-get install "
                "ejabberd` (scripts/setup.sh --test does it) to run the second-broker tests")
    if ejabberd_lib_dir() is None:
        return (f"ejabberd is not installed (no {EJABBERD_APPS}): `sudo apt-get install "
                "ejabberd` (scripts/setup.sh --test does it) to run the second-broker tests")
    return None


@dataclass
class EjabberdBroker:
    """An ejabberd process these tests started (and will stop)."""

    process: subprocess.Popen[bytes]
    port: int
    workdir: Path
    log_path: Path
    owns_workdir: bool = False
    start_s: float = 0.0
    """Wall seconds from the start until the MQTT port answered."""

    @property
    def url(self) -> str:
        return f"mqtt://{LOGIN}@127.0.0.1:{self.port}"

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM (Erlang stops its applications cleanly), then SIGKILL if it hangs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout_s)
        if self.owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def _unprivileged() -> pwd.struct_passwd | None:
    """Who the broker runs as: None (the current user) unless we are root."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(UNPRIVILEGED_USER)
    except KeyError:
        return pwd.getpwnam("nobody")


def start_ejabberd(workdir: Path | None = None, port: int | None = None,
                   timeout_s: float = 60.0) -> EjabberdBroker:
    """Write a config for ``port`` (default: a free one), start ``erl -s ejabberd`` and wait
    until the MQTT port answers. As root, the broker runs as an unprivileged user in a
    directory of its own (``workdir`` is then ignored and removed at stop)."""
    missing = ejabberd_missing()
    if missing:
        raise EjabberdError(missing)
    user = _unprivileged()
    owns = False
    if user is not None:
        # a root-owned pytest tmp dir (mode 0700) is out of the unprivileged user's reach
        workdir = Path(tempfile.mkdtemp(prefix="gpuheal-ejabberd-"))
        owns = True
    elif workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="gpuheal-ejabberd-"))
        owns = True
    port = port or free_port()
    spool, logs = workdir / "spool", workdir / "logs"
    for d in (workdir, spool, logs):
        d.mkdir(parents=True, exist_ok=True)
    config = workdir / "ejabberd.yml"
    config.write_text(CONFIG.format(port=port))
    log_path = logs / "stdout.log"
    if user is not None:
        for path in (workdir, spool, logs, config):
            os.chown(path, user.pw_uid, user.pw_gid)
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(workdir),
        "LANG": "C.UTF-8",
        "ERL_LIBS": ejabberd_lib_dir() or "",
        "EJABBERD_CONFIG_PATH": str(config),
        "EJABBERD_LOG_PATH": str(logs / "ejabberd.log"),
        "ERL_CRASH_DUMP": str(logs / "erl_crash.dump"),
    }
    argv = [ERL, "-noinput", "-noshell", "+K", "true", "-mnesia", "dir", f'"{spool}"',
            "-s", "ejabberd"]
    t0 = time.monotonic()
    with log_path.open("ab") as log:
        if user is not None:
            os.chown(log_path, user.pw_uid, user.pw_gid)
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            cwd=workdir, start_new_session=True,
            user=user.pw_uid if user else None, group=user.pw_gid if user else None,
            extra_groups=[] if user else None)
    broker = EjabberdBroker(proc, port, workdir, log_path, owns_workdir=owns)
    deadline = t0 + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = broker.log_tail()
            broker.stop()
            raise EjabberdError(f"ejabberd exited with {proc.returncode}: {tail}")
        if port_answers("127.0.0.1", port, 0.2):
            broker.start_s = time.monotonic() - t0
            return broker
        time.sleep(0.05)
    tail = broker.log_tail()
    broker.stop()
    raise EjabberdError(f"ejabberd did not listen on port {port} within {timeout_s} s: {tail}")

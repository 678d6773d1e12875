#!/usr/bin/env bash
# Packaging that works outside a checkout: build the wheel, install it into a fresh venv in a
# temporary directory, and from there run `gpuheal broker init` and a short `gpuheal up` on
# the simulated GPU (until a GPU's retained State is on the broker), then Ctrl-C.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$repo/.venv/bin/python" -m pip wheel -q --no-deps --disable-pip-version-check -w "$tmp/dist" "$repo"
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q --disable-pip-version-check "$tmp"/dist/gpuheal-*.whl
cd "$tmp"  # nothing of the checkout is importable from here
"$tmp/venv/bin/python" - "$repo" <<'PY'
import os, signal, subprocess, sys, time
from pathlib import Path

import gpuheal
repo = Path(sys.argv[1])
assert repo not in Path(gpuheal.__file__).resolve().parents, gpuheal.__file__
from gpuheal.net import free_port
venv = Path(sys.executable).parent
port = free_port()
init = subprocess.run([venv / "gpuheal", "broker", "init", "broker", "--port", str(port)],
                      capture_output=True, text=True)
assert init.returncode == 0, init.stderr
assert (Path("broker") / "mosquitto.conf").is_file()
up_port = free_port()
log = open("up.log", "wb")
up = subprocess.Popen([venv / "gpuheal", "up", "--broker", f"mqtt://127.0.0.1:{up_port}",
                       "--source", "sim", "--scenario", "healthy", "--speed", "10",
                       "--state-dir", "state", "--db", "smoke.db", "--host-name", "wheel",
                       "--dashboard-port", str(free_port())],
                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
try:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        env = Path("state/broker/viewer.env")
        if env.is_file():
            status = subprocess.run(
                [venv / "gpuheal", "status", "--env-file", str(env), "--json"],
                capture_output=True, text=True)
            if status.returncode == 0 and '"host":"wheel"' in status.stdout:
                break
        time.sleep(0.5)
    else:
        raise SystemExit("no State from `gpuheal up` of the wheel:\n"
                         + Path("up.log").read_text()[-3000:])
finally:
    os.killpg(up.pid, signal.SIGINT)
    code = up.wait(60)
assert code == 0, Path("up.log").read_text()[-3000:]
print(f"wheel smoke: broker init and up ok from {venv.parent}")
PY

#!/usr/bin/env bash
# Runs gpuheal's Home Assistant discovery in a real Home Assistant against a real Mosquitto:
# installs Home Assistant core, with the requirements of the integrations the test sets up,
# into a virtual environment of its own in a cache directory (once: about two minutes; reused
# when present), then runs tests/test_home_assistant.py (about 20 s) with GPUHEAL_HA_PYTHON set
# to that environment's python. Needs PyPI for the install only. Slow, so CI skips it (the
# test skips itself without GPUHEAL_HA_PYTHON). Extra arguments go to pytest.
#   HA_CACHE    where Home Assistant is installed
#               (default ${XDG_CACHE_HOME:-$HOME/.cache}/gpuheal/home-assistant)
#   HA_PYTHON   the Python 3.11 that makes the environment (default python3.11, then python3)
#   HA_VERSION  the Home Assistant core release (default 2024.3.3, the newest for Python 3.11;
#               the test knows what 2024.3 ignores of gpuheal's discovery)
set -euo pipefail
cd "$(dirname "$0")/.."

version="${HA_VERSION:-2024.3.3}"
cache="${HA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/gpuheal/home-assistant}"
venv="$cache/venv"
py="$venv/bin/python"

[ -x .venv/bin/python ] || { echo "check_home_assistant: run scripts/setup.sh --test first" >&2; exit 1; }
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || {
  echo "check_home_assistant: mosquitto is not installed" >&2; exit 1; }

base="${HA_PYTHON:-}"
if [ -z "$base" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 \
        && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
      base="$candidate"; break
    fi
  done
fi
[ -n "$base" ] || { echo "check_home_assistant: Home Assistant $version needs Python 3.11 (set HA_PYTHON)" >&2; exit 1; }

marker="$venv/gpuheal-installed"  # written last: a broken install is redone
installed="$(cat "$marker" 2>/dev/null || true)"
if [ "$installed" != "$version" ] || [ ! -x "$py" ]; then
  echo "check_home_assistant: installing homeassistant==$version into $venv" \
    "(pip's output: $cache/install.log)" >&2
  start=$SECONDS
  rm -rf "$venv"
  mkdir -p "$cache"
  log="$cache/install.log"
  : >"$log"
  pip_install() {
    "$py" -m pip install "$@" >>"$log" 2>&1 || {
      tail -n 40 "$log" >&2
      echo "check_home_assistant: pip install $* failed (whole output: $log)" >&2
      exit 1
    }
  }
  "$base" -m venv "$venv"
  pip_install --upgrade pip
  # josepy 2 dropped what acme (a dependency of HA 2024.3) imports.
  pip_install "homeassistant==$version" "josepy<2"
  # The requirements of every integration the test's Home Assistant sets up (its defaults,
  # what tests/test_home_assistant.py configures, every entity platform of MQTT, and their
  # dependencies), within Home Assistant's own constraints: the test starts Home Assistant
  # with --skip-pip, so it installs nothing and needs no network.
  "$py" - "$cache/requirements.txt" <<'EOF'
import json
import sys
from pathlib import Path

import homeassistant.components as components
from homeassistant import bootstrap
from homeassistant.components.mqtt.const import PLATFORMS

root = Path(components.__file__).parent
todo = set(bootstrap.DEFAULT_INTEGRATIONS) | set(bootstrap.CORE_INTEGRATIONS) | {
    "http", "api", "auth", "config", "onboarding", "websocket_api", "system_log", "mqtt"} | {
    str(platform) for platform in PLATFORMS}
seen: set[str] = set()
requirements: list[str] = []
while todo:
    domain = todo.pop()
    if domain in seen:
        continue
    seen.add(domain)
    manifest = json.loads((root / domain / "manifest.json").read_text())
    # after_dependencies too: some import them (analytics imports the recorder).
    todo |= set(manifest.get("dependencies", [])) | set(manifest.get("after_dependencies", []))
    requirements += manifest.get("requirements", [])
Path(sys.argv[1]).write_text("\n".join(sorted(set(requirements))) + "\n")
EOF
  constraints="$("$py" -c 'import homeassistant, pathlib; print(pathlib.Path(homeassistant.__file__).parent / "package_constraints.txt")')"
  pip_install -r "$cache/requirements.txt" --constraint "$constraints"
  installed="$("$py" -c 'from homeassistant.const import __version__; print(__version__)')"
  echo "$installed" >"$marker"
  echo "check_home_assistant: installed in $((SECONDS - start)) s" >&2
fi
echo "check_home_assistant: Home Assistant $installed ($py)" >&2

GPUHEAL_HA_PYTHON="$py" exec .venv/bin/python -m pytest -q -x -rxs tests/test_home_assistant.py "$@"

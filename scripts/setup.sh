#!/usr/bin/env bash
# Install what gpuheal needs on Debian/Ubuntu: Mosquitto (via apt when missing), a Python
# venv in .venv with gpuheal installed (editable) and, with --test, the test tools (and
# Chromium for the dashboard's browser test).
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

sudo_cmd=()
[ "$(id -u)" -ne 0 ] && sudo_cmd=(sudo)

apt_install() {
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup: please install: $* (no apt-get on this machine)" >&2
    exit 1
  fi
  echo "setup: installing $* with apt-get" >&2
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "$@" >/dev/null
}

python3 - <<'PY' || { echo "setup: gpuheal needs Python >= 3.11 (python3 is $(python3 -V 2>&1))" >&2; exit 1; }
import sys
raise SystemExit(0 if sys.version_info >= (3, 11) else 1)
PY

missing=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
command -v mosquitto_sub >/dev/null 2>&1 || missing+=(mosquitto-clients)
python3 -c "import venv, ensurepip" >/dev/null 2>&1 || missing+=(python3-venv)
# the dashboard's browser test drives Debian's Chromium (skipped with a reason without it)
if [ "$want_test" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
  missing+=(chromium)
fi
# the second-broker tests run the pipeline on Debian's ejabberd (skipped with a reason without it)
if [ "$want_test" = 1 ] && ! [ -x /usr/sbin/ejabberdctl ]; then
  missing+=(ejabberd)
fi
[ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
# Debian starts ejabberd as a service listening for MQTT on port 1883: the tests start their
# own on free ports, and 1883 belongs to Mosquitto
if [[ " ${missing[*]} " == *" ejabberd "* ]] && command -v systemctl >/dev/null 2>&1; then
  "${sudo_cmd[@]}" systemctl disable --now ejabberd >/dev/null 2>&1 || true
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
extra=""
[ "$want_test" = 1 ] && extra="[test]"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extra}"
echo "setup: ready (.venv/bin/gpuheal)" >&2

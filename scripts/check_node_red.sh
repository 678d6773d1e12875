#!/usr/bin/env bash
# Runs the Node-RED example flow (examples/node-red/flows.json) in a real Node-RED 4 against a
# real Mosquitto: installs Node-RED 4 with npm into a cache directory (reused when present),
# then runs tests/test_node_red.py with GPUHEAL_NODE_RED set. Needs Node.js >= 18 and npm;
# Node-RED 5 needs Node 22, hence the pin to 4. Extra arguments go to pytest.
#   NODE_RED_CACHE  where Node-RED is installed (default ${XDG_CACHE_HOME:-$HOME/.cache}/gpuheal/node-red)
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${NODE_RED_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/gpuheal/node-red}"
bin="$cache/node_modules/.bin/node-red"

for tool in node npm; do
  command -v "$tool" >/dev/null 2>&1 || { echo "check_node_red: $tool is not installed" >&2; exit 1; }
done
node_major="$(node -p 'process.versions.node.split(".")[0]')"
if [ "$node_major" -lt 18 ]; then
  echo "check_node_red: Node-RED 4 needs Node.js >= 18 (this is $(node --version))" >&2
  exit 1
fi
[ -x .venv/bin/python ] || { echo "check_node_red: run scripts/setup.sh --test first" >&2; exit 1; }

installed=""
if [ -f "$cache/node_modules/node-red/package.json" ]; then
  installed="$(node -p "require(process.argv[1]).version" "$cache/node_modules/node-red/package.json")"
fi
if [ ! -x "$bin" ] || [ "${installed%%.*}" != "4" ]; then
  mkdir -p "$cache"
  echo "check_node_red: installing node-red@4 into $cache" >&2
  start=$SECONDS
  npm install --prefix "$cache" --no-audit --no-fund --loglevel=error node-red@4 >&2
  echo "check_node_red: installed in $((SECONDS - start)) s" >&2
  installed="$(node -p "require(process.argv[1]).version" "$cache/node_modules/node-red/package.json")"
fi
echo "check_node_red: Node-RED $installed ($bin), Node.js $(node --version)" >&2

GPUHEAL_NODE_RED="$bin" exec .venv/bin/python -m pytest -q -x -rs tests/test_node_red.py "$@"

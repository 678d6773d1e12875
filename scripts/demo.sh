#!/usr/bin/env bash
# One command: set everything up, then run the whole pipeline on this machine
# (the simulated GPU's demo when no NVIDIA GPU is present). Extra arguments go to `gpuheal up`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/gpuheal up --broker "${GPUHEAL_BROKER:-mqtt://127.0.0.1:18830}" \
  --source auto --scenario demo --speed "${GPUHEAL_SPEED:-10}" --db gpuheal-demo.db "$@"

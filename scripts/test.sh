#!/usr/bin/env bash
# One command: install what the tests need, lint, run the whole suite, then check that the
# wheel works outside the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
bash scripts/wheel_smoke.sh

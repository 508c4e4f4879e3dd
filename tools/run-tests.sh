#!/usr/bin/env bash
# Sets up everything the test suite needs, then runs all of it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec .venv/bin/python -m pytest "$@"

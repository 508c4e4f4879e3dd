#!/usr/bin/env bash
# Sets up mvcckv, then serves etcd's v3 API on 127.0.0.1:2379 with data in
# ./default.mvcckv.  Extra arguments go to `mvcckv serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
MVCCKV_SKIP_APT=${MVCCKV_SKIP_APT:-1} bash tools/setup.sh
exec .venv/bin/mvcckv serve "$@"

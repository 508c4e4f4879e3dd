#!/usr/bin/env bash
# Creates ./.venv with mvcckv and its test dependencies, and installs the
# Debian packages the tests drive (etcdctl, a real etcd for differential
# tests) when they are missing.  Safe to run again: it only adds what is
# missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v etcdctl >/dev/null 2>&1 || need_apt+=(etcd-client)
command -v etcd >/dev/null 2>&1 || [ -x /usr/bin/etcd ] || need_apt+=(etcd-server)
# h2load: the low-CPU gRPC load generator of the benchmarks (and their tests).
command -v h2load >/dev/null 2>&1 || need_apt+=(nghttp2-client)
# gcc builds the power-cut simulator and the fsync counter (tests/powercut_shim.c,
# bench/fsync_count.c), preloaded into the processes under test.
command -v gcc >/dev/null 2>&1 || need_apt+=(gcc libc6-dev)
# PostgreSQL server binaries for the PostgreSQL engine's throwaway clusters.
command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt+=(postgresql)
if [ "${MVCCKV_SKIP_APT:-0}" != 1 ] && [ ${#need_apt[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo"
    echo "setup: installing Debian packages: ${need_apt[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
    # The etcd-server package starts a system etcd on 2379; the tests and
    # `mvcckv serve` need that port free and run their own instances.
    if command -v systemctl >/dev/null 2>&1; then $SUDO systemctl disable --now etcd >/dev/null 2>&1 || true; fi
    pkill -x etcd >/dev/null 2>&1 || true
    # Likewise Debian's postgresql package may start a cluster on 5432; the
    # tests run their own on free ports.
    if command -v pg_ctlcluster >/dev/null 2>&1; then
        for v in /usr/lib/postgresql/*; do
            pg_ctlcluster "$(basename "$v")" main stop >/dev/null 2>&1 || true
        done
    fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
if ! .venv/bin/python -c 'import mvcckv, pytest, hypothesis, grpc_tools' >/dev/null 2>&1 \
   || [ pyproject.toml -nt .venv/.installed ]; then
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    .venv/bin/python -m pip install -q -e '.[test]'
    touch .venv/.installed
fi

"""Shared fixtures: real etcd and mvcckv servers (see harness.py).

``etcd_binary``           path of the etcd binary, for tests that start their
                          own ``EtcdProcess``.
``etcd``                  one real etcd for the whole session.  Shared state:
                          use keys unique to the test, and never compact it
                          (compaction is global); take ``etcd_fresh`` instead.
``etcd_fresh``            a new, empty etcd per test (0.1-1.0 s to start,
                          median 0.7 s: etcd's randomized first election).
``mvcckv_server``         ``python -m mvcckv serve`` on ``tmp_path/"data"``,
                          log in ``tmp_path/"mvcckv.log"``; per test.
``mvcckv_server_module``  the same, shared by the tests of one module.
``postgres_bindir``       the directory of PostgreSQL's server binaries, for
                          tests that start their own ``PostgresServer``.
``postgres``              one throwaway PostgreSQL server for the whole
                          session (pg_harness.py).  Shared: give each test
                          (or example) a schema of its own, and stop or
                          restart only a server of the test's own.

A missing etcd binary or PostgreSQL skips the tests that need it locally;
under CI (``CI=true``) it fails them, so CI cannot pass by testing nothing.
This file imports nothing from ``mvcckv``: the server is a child process.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Keeps ``import harness`` working even if tests/ becomes a package.
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from harness import EtcdProcess, MvcckvProcess, find_binary  # noqa: E402
from pg_harness import PostgresServer, find_postgres  # noqa: E402


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _require_etcd() -> str:
    binary = find_binary("etcd")
    if binary is not None:
        return binary
    reason = "etcd binary not found (install Debian's etcd-server: bash tools/setup.sh)"
    if _in_ci():
        pytest.fail(f"{reason}; CI must run the etcd tests", pytrace=False)
    pytest.skip(reason)


def _require_postgres():
    bindir = find_postgres()
    if bindir is not None:
        return bindir
    reason = "PostgreSQL server binaries not found (install Debian's postgresql: bash tools/setup.sh)"
    if _in_ci():
        pytest.fail(f"{reason}; CI must run the PostgreSQL tests", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def etcd_binary() -> str:
    return _require_etcd()


@pytest.fixture(scope="session")
def etcd(etcd_binary):
    with EtcdProcess(binary=etcd_binary) as server:
        yield server


@pytest.fixture
def etcd_fresh(etcd_binary):
    with EtcdProcess(binary=etcd_binary) as server:
        yield server


@pytest.fixture
def mvcckv_server(tmp_path):
    with MvcckvProcess(tmp_path / "data", log_path=tmp_path / "mvcckv.log") as server:
        yield server


@pytest.fixture(scope="module")
def mvcckv_server_module(tmp_path_factory):
    root = tmp_path_factory.mktemp("mvcckv")
    with MvcckvProcess(root / "data", log_path=root / "mvcckv.log") as server:
        yield server


@pytest.fixture(scope="session")
def postgres_bindir():
    return _require_postgres()


@pytest.fixture(scope="session")
def postgres(postgres_bindir):
    with PostgresServer(postgres_bindir) as server:
        yield server

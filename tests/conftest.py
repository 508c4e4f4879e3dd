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
``engine``                the storage engine under ``mvcckv serve``: a test
                          that takes it runs once per engine, with ids
                          ``[lmdb]`` and ``[pg]``.  ``engine.process(data_dir,
                          log_path=..., extra_args=...)`` makes an unstarted
                          ``MvcckvProcess`` on a keyspace of its own: the
                          data dir (LMDB), or a new schema in a database
                          made for the test module (PostgreSQL; the session's
                          ``postgres`` server, the database dropped after the
                          module).  ``@pytest.mark.engines("lmdb",
                          reason="...")`` limits a test to some engines.
``engine_server_module``  ``engine.process(...)`` started, shared by the
                          tests of one module (per engine).

A missing etcd binary or PostgreSQL skips the tests that need it locally;
under CI (``CI=true``) it fails them, so CI cannot pass by testing nothing.
This file imports nothing from ``mvcckv``: the server is a child process.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path
from typing import Any

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


# --- mvcckv serve on each engine ---------------------------------------------

ENGINES = ("lmdb", "pg")


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        'engines(*names, reason): run a test that takes the ``engine`` fixture only on these '
        'engines (of "lmdb", "pg"); the reason says why the others do not apply',
    )


def pytest_generate_tests(metafunc):
    if "engine" not in metafunc.fixturenames:
        return
    names = ENGINES
    marker = metafunc.definition.get_closest_marker("engines")
    if marker is not None:
        names = tuple(marker.args)
        unknown = set(names) - set(ENGINES)
        if not names or unknown or not marker.kwargs.get("reason"):
            raise pytest.UsageError(
                f"{metafunc.definition.nodeid}: @pytest.mark.engines takes engine names from "
                f"{ENGINES} and a reason= (got {marker.args}, {marker.kwargs})")
    # Module scope: the module's tests are grouped by engine, so a shared
    # server (and the PostgreSQL database) is started once per engine.
    metafunc.parametrize("engine", names, indirect=True, scope="module")


class ServedEngine:
    """How ``mvcckv serve`` is started on one engine (see ``engine``)."""

    def __init__(self, name: str, database_url: str | None = None):
        self.name = name
        self.database_url = database_url
        self._schemas = 0

    def __repr__(self) -> str:
        return f"ServedEngine({self.name!r})"

    def process(self, data_dir: str | os.PathLike[str], *, log_path: str | os.PathLike[str] | None = None,
                extra_args: tuple[str, ...] | list[str] = (), **kwargs: Any) -> MvcckvProcess:
        """A new, unstarted server on a keyspace no other server uses.

        ``restart()`` keeps the keyspace: the data dir, or the schema (the
        PostgreSQL server passes ``--data-dir`` too but does not use it).
        """
        backend = self.new_backend()
        args = (("--backend", backend) if backend else ()) + tuple(extra_args)
        return MvcckvProcess(data_dir, log_path=log_path, extra_args=args, **kwargs)

    def new_backend(self) -> str:
        """What ``--backend`` (``Config.backend``) takes for a new keyspace:
        empty for LMDB (the data dir is the keyspace), else a URL naming a
        schema not used before in this module's database."""
        if self.name != "pg":
            return ""
        self._schemas += 1
        # The schema travels as the URL's search_path (mvcckv.server.engines).
        return f"{self.database_url}?options=-csearch_path%3Detcd{self._schemas}"


@pytest.fixture(scope="module")
def engine(request):
    name = request.param
    if name == "lmdb":
        yield ServedEngine(name)
        return
    server = request.getfixturevalue("postgres")
    database = f"m_{uuid.uuid4().hex[:16]}"
    url = server.create_database(database)
    try:
        yield ServedEngine(name, url)
    finally:
        server.drop_database(database)


@pytest.fixture(scope="module")
def engine_server_module(engine, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"mvcckv-{engine.name}")
    with engine.process(root / "data", log_path=root / "mvcckv.log") as server:
        yield server

"""Throwaway PostgreSQL servers for tests.

    with PostgresServer() as pg:
        engine = mvcckv.pg.open(pg.dsn(), schema="t1")
        ...
        pg.restart()                  # same port, same data
        pg.stop_server()              # down (data kept) ...
        pg.start_server()             # ... and up again
        url = pg.create_database("m1")    # another database, dropped with
        pg.drop_database("m1")            # pg.drop_database

Each server is a fresh cluster: ``initdb`` into a temporary directory
(trust authentication, user ``postgres``, C locale), then ``postgres`` on a
free 127.0.0.1 port with its Unix socket in that directory.  ``fsync`` and
``full_page_writes`` are off (only an operating-system crash could lose
data, and tests want speed); ``synchronous_commit`` stays on, so a server
killed by a test (``stop_server("immediate")``) loses no acknowledged commit.

The server runs as a direct child under ``setpriv --pdeathsig KILL``
rather than daemonized by ``pg_ctl``: a test run that is killed takes its
server with it (backends exit when the postmaster dies), so no postgres is
ever left behind.  PostgreSQL refuses to run as root; as root, the server
runs as the ``postgres`` user (Debian's package creates it), else
``nobody``.  Every wait is bounded; servers still running at interpreter
exit are stopped by an ``atexit`` hook.

The binaries are found on PATH, else in Debian's
``/usr/lib/postgresql/<version>/bin`` (the newest version);
:func:`find_postgres` returns None when there are none.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Self

STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
_POLL = 0.02

# Server settings for tests: no fsync, room for many engines.
_SETTINGS = (
    "listen_addresses=127.0.0.1",
    "fsync=off",
    "full_page_writes=off",
    "max_connections=300",
    "shared_buffers=32MB",
)

_LIVE: set["PostgresServer"] = set()


@atexit.register
def stop_all() -> None:
    for server in list(_LIVE):
        server.close()


def find_postgres() -> Path | None:
    """The directory holding ``initdb`` and ``postgres``, or None."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("postgres"):
        return Path(os.path.realpath(on_path)).parent
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: [int(x) if x.isdigit() else x for x in p.split("/")[4].split(".")],
    )
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_as() -> tuple[list[str], int, int] | None:
    """(setpriv prefix, uid, gid) to drop root; None when not root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            continue
        return [
            "setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups",
        ], pw.pw_uid, pw.pw_gid
    raise RuntimeError("running as root, and there is no postgres or nobody user to run PostgreSQL as")


class PostgresServer:
    """One throwaway PostgreSQL cluster (see the module docstring)."""

    def __init__(self, bindir: Path | None = None, settings: tuple[str, ...] = ()):
        """``settings`` (``name=value``) override the test defaults, e.g.
        ``fsync=on`` for a test of durability; :attr:`env` is added to the
        postmaster's environment at each start."""
        self.bindir = bindir or find_postgres()
        if self.bindir is None:
            raise FileNotFoundError("PostgreSQL server binaries (initdb, postgres) not found")
        self.workdir: Path | None = None
        self.port = 0
        self.settings = settings
        self.env: dict[str, str] = {}
        self._proc: subprocess.Popen | None = None
        self._as = _run_as()

    @property
    def pid(self) -> int | None:
        """The postmaster's process ID while it runs."""
        return self._proc.pid if self.alive() else None

    @property
    def owner(self) -> tuple[int, int] | None:
        """(uid, gid) the server runs as when started as root, else None."""
        return (self._as[1], self._as[2]) if self._as else None

    # -- addresses --

    @property
    def data_dir(self) -> Path:
        assert self.workdir is not None, "server not started"
        return self.workdir / "data"

    @property
    def socket_dir(self) -> Path:
        assert self.workdir is not None, "server not started"
        return self.workdir

    @property
    def log_path(self) -> Path:
        assert self.workdir is not None, "server not started"
        return self.workdir / "postgres.log"

    def dsn(self, dbname: str = "postgres") -> str:
        """A ``postgresql://`` URL over TCP (what ``--backend`` takes)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def socket_dsn(self, dbname: str = "postgres") -> str:
        """A libpq connection string over the Unix socket."""
        return f"host={self.socket_dir} port={self.port} user=postgres dbname={dbname}"

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- databases --

    def create_database(self, name: str) -> str:
        """Create an empty database; returns its ``postgresql://`` URL.

        A database per test module is cheap (a copy of ``template1``) and
        isolates more than a schema: dropping it also ends any session a
        crashed server left behind.
        """
        self._admin(f'CREATE DATABASE "{_identifier(name)}"')
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, ending the sessions still connected to it."""
        self._admin(f'DROP DATABASE IF EXISTS "{_identifier(name)}" WITH (FORCE)')

    def _admin(self, statement: str) -> None:
        import psycopg  # a test dependency; only the database helpers need it

        with psycopg.connect(self.dsn(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(statement)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except (OSError, AssertionError):
            return ""

    # -- life cycle --

    def start(self) -> Self:
        """initdb a new cluster and start it."""
        self.workdir = Path(tempfile.mkdtemp(prefix="mvcckv-pg-"))
        _LIVE.add(self)
        try:
            if self._as is not None:
                os.chown(self.workdir, self._as[1], self._as[2])
            self._run([
                str(self.bindir / "initdb"), "-D", str(self.data_dir), "-U", "postgres",
                "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions",
            ])
            for attempt in range(3):
                self.port = _free_port()
                try:
                    self.start_server()
                    return self
                except RuntimeError:
                    if "already in use" not in self.log_text() or attempt == 2:
                        raise
        except BaseException:
            self.close()
            raise
        raise AssertionError("unreachable")

    def start_server(self) -> None:
        """Start the postmaster on the existing cluster (same port)."""
        assert not self.alive(), "postgres already running"
        command = [str(self.bindir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port),
                   "-k", str(self.socket_dir)]
        for setting in _SETTINGS + tuple(self.settings):
            command += ["-c", setting]
        prefix = (self._as[0] if self._as else ["setpriv"]) + ["--pdeathsig", "KILL", "--"]
        if shutil.which("setpriv") is None:
            if self._as is not None:
                raise RuntimeError("running as root needs setpriv (util-linux) to start PostgreSQL")
            prefix = []
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(prefix + command, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, env={**os.environ, **self.env})
        self._wait_ready()

    def stop_server(self, mode: str = "fast") -> None:
        """Stop the postmaster, keeping the cluster: ``fast`` (roll back and
        disconnect every session), ``immediate`` (crash-like) or ``smart``."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        sig = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}[mode]
        proc.send_signal(sig)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)

    def restart(self, mode: str = "fast") -> None:
        self.stop_server(mode)
        self.start_server()

    def close(self) -> None:
        """Stop the server and delete the cluster.  Idempotent."""
        self.stop_server("immediate")
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        _LIVE.discard(self)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals --

    def _run(self, command: list[str]) -> None:
        prefix = self._as[0] + ["--"] if self._as else []
        proc = subprocess.run(prefix + command, capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n"
                               f"{proc.stdout.decode(errors='replace')}{proc.stderr.decode(errors='replace')}")

    def _wait_ready(self) -> None:
        """Until the server accepts connections (it says so in its log)."""
        assert self._proc is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT
        marker = "database system is ready to accept connections"
        seen = self.log_text().count(marker)
        for _ in range(int(STARTUP_TIMEOUT / _POLL) + 10):
            if self._proc.poll() is not None:
                break
            if self.log_text().count(marker) > seen and _accepts_tcp(self.port):
                return
            if time.monotonic() > deadline:
                break
            time.sleep(_POLL)
        code = self._proc.poll()
        self.stop_server("immediate")
        state = f"exited with code {code}" if code is not None else f"not ready after {STARTUP_TIMEOUT:.0f} s"
        raise RuntimeError(f"postgres on port {self.port} {state}; log tail:\n{self.log_text()[-4000:]}")


def _identifier(name: str) -> str:
    """``name`` if it is a plain lower-case identifier (it goes into SQL text)."""
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
        raise ValueError(f"not a plain identifier: {name!r}")
    return name


def _accepts_tcp(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False

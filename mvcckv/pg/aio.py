"""Reads awaited on the server's event loop: prepared statements on a few
libpq connections whose sockets the loop watches.

A Range is one statement (view.read_statement) and needs no transaction,
so it runs in autocommit, and nothing else ever runs on these connections.
That lets a read be as little Python as possible: each connection's socket
is registered with the event loop once, for the connection's life; a read
sends its prepared statement (binary parameters and results) and awaits a
future that the socket's callback resolves once libpq holds the whole
answer.  No thread hand-off each way (the server otherwise runs each
PostgreSQL read in a worker thread), and none of the per-wait timer and
reader registration of psycopg's own async connections: a point read cost
135 us of CPU through those and 71 us through this (one reader awaiting
3,000 reads in a row, PostgreSQL on the other core, this project's machine).

psycopg still opens the connections (``AsyncConnection.connect``: its
connect timeout and error messages) and decodes the results
(``psycopg.adapt.Transformer``); the queries themselves go through its
libpq wrapper (``conn.pgconn``).  Each statement is prepared on a
connection the first time that connection runs it.

The connections belong to the event loop that first used them, the only
one they are awaited on (``serves_this_loop``; a read from another loop
takes the thread path).  Up to ``max_size`` are open; a read finding all of
them busy waits for one up to ``acquire_timeout`` and then fails with
UnavailableError, as a read on the thread path does.  A connection that
breaks (PostgreSQL restarted) is dropped, with the idle ones, and the read
tried once more on a fresh one, since a stale connection is expected after
a restart; one abandoned mid-statement (a cancelled request) is dropped
too, as nothing tells what it will answer next.  A socket that breaks while
idle is no longer watched, so a dead connection never spins the loop.

``close`` may be called from any thread: idle connections are closed at
once, busy ones when their read ends.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque

import psycopg
from psycopg import pq
from psycopg.adapt import Transformer

from mvcckv import errors
from mvcckv.pg.errors import CONNECTION_ERRORS, UnavailableError

_BINARY = 1


class _Reader:
    """One autocommit connection and its socket, watched by the loop."""

    __slots__ = ("conn", "_pgconn", "_loop", "_fd", "_prepared", "_future", "_results", "_writing", "_broken")

    def __init__(self, conn: psycopg.AsyncConnection, loop: asyncio.AbstractEventLoop):
        self.conn = conn
        self._pgconn = conn.pgconn
        self._pgconn.nonblocking = 1
        self._loop = loop
        self._fd = self._pgconn.socket
        self._prepared: set[bytes] = set()
        self._future: asyncio.Future | None = None
        self._results: list = []
        self._writing = False
        self._broken: BaseException | None = None
        loop.add_reader(self._fd, self._readable)

    async def run(self, name: bytes, statement: bytes, types, params) -> list[tuple]:
        """The rows of prepared statement ``name`` (``statement``, with
        $n parameters of the given type OIDs) run with binary ``params``."""
        if self._broken is not None:
            raise self._broken
        if name not in self._prepared:
            self._pgconn.send_prepare(name, statement, param_types=types)
            _check(await self._answer(), pq.ExecStatus.COMMAND_OK)
            self._prepared.add(name)
        self._pgconn.send_query_prepared(name, params, param_formats=[_BINARY] * len(params), result_format=_BINARY)
        result = _check(await self._answer(), pq.ExecStatus.TUPLES_OK)
        tx = Transformer()
        tx.set_pgresult(result)
        return tx.load_rows(0, result.ntuples, tuple)

    def _answer(self) -> asyncio.Future:
        self._future = self._loop.create_future()
        self._flush()
        return self._future

    def _flush(self) -> None:
        try:
            pending = self._pgconn.flush()
        except psycopg.Error as e:
            self._fail(e)
            return
        # A statement nearly always fits the socket buffer at once.
        if pending and not self._writing:
            self._writing = True
            self._loop.add_writer(self._fd, self._flush)
        elif not pending and self._writing:
            self._writing = False
            self._loop.remove_writer(self._fd)

    def _readable(self) -> None:
        pgconn = self._pgconn
        try:
            pgconn.consume_input()
            # get_result would block while libpq waits for more input.
            while not pgconn.is_busy():
                result = pgconn.get_result()
                if result is None:
                    break
                self._results.append(result)
            else:
                return
        except psycopg.Error as e:
            self._fail(e)
            return
        results, self._results = self._results, []
        future = self._future
        if future is not None and not future.done() and results:
            future.set_result(results)

    def _fail(self, e: BaseException) -> None:
        # A broken socket stays readable: stop watching it, or the loop spins.
        self._broken = e
        self._unwatch()
        future = self._future
        if future is not None and not future.done():
            future.set_exception(e)

    def _unwatch(self) -> None:
        self._loop.remove_reader(self._fd)
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._fd)

    def close(self) -> None:
        """Stop watching the socket and close the connection; from any
        thread for an idle reader, from the loop for one in use."""
        if self._loop.is_running() and not _on_loop(self._loop):
            # The loop may be polling the socket right now: close it there.
            self._loop.call_soon_threadsafe(self.close)
            return
        if not self._loop.is_closed():
            self._unwatch()
        # AsyncConnection.close() only closes the libpq connection, which
        # needs no event loop; this does the same.
        self._pgconn.finish()


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _check(results: list, status: pq.ExecStatus):
    """The statement's one result, or its error as psycopg raises it."""
    result = results[-1]
    if result.status != status:
        sqlstate = (result.error_field(pq.DiagnosticField.SQLSTATE) or b"").decode()
        message = result.error_message.decode(errors="replace").strip()
        cls = psycopg.errors.lookup(sqlstate) if sqlstate else psycopg.OperationalError
        raise cls(message or f"unexpected result status {result.status!r}")
    return result


class AsyncReads:
    """``fetchall(statement, params, types)`` on a small set of autocommit
    connections of one event loop."""

    def __init__(self, dsn: str, connect_kwargs: dict, max_size: int, acquire_timeout: float):
        self._dsn = dsn
        self._kwargs = dict(connect_kwargs, autocommit=True)
        self._max = max(1, max_size)
        self._timeout = acquire_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._names: dict[str, tuple[bytes, bytes]] = {}
        # Guards the fields below against close() from another thread.
        self._mu = threading.Lock()
        self._idle: deque[_Reader] = deque()
        self._open = 0
        self._closed = False
        self._waiters: deque[asyncio.Future] = deque()

    def serves_this_loop(self) -> bool:
        """Whether reads on the running event loop can come here (the first
        loop to ask is the one)."""
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        return self._loop is loop

    async def fetchall(self, statement: str, params, types) -> list[tuple]:
        """Rows of ``statement`` ($n parameters of the type OIDs ``types``,
        binary ``params``)."""
        named = self._names.get(statement)
        if named is None:
            named = self._names[statement] = (f"mvcckv_read_{len(self._names)}".encode(), statement.encode())
        last: Exception | None = None
        for _ in range(2):
            reader = await self._acquire(last)
            try:
                rows = await reader.run(*named, types, params)
            except CONNECTION_ERRORS as e:
                last = e
                self._drop(reader)
                # Those idle beside it most likely died with it.
                self._drop_idle()
                continue
            except BaseException:
                self._drop(reader)
                raise
            self._release(reader)
            return rows
        raise UnavailableError(str(last))

    async def _acquire(self, last: Exception | None) -> _Reader:
        deadline = None
        while True:
            with self._mu:
                if self._closed:
                    raise errors.StoppedError()
                if self._idle:
                    return self._idle.pop()
                opening = self._open < self._max
                if opening:
                    self._open += 1
            if opening:
                return await self._connect()
            loop = asyncio.get_running_loop()
            if deadline is None:
                deadline = loop.time() + self._timeout
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                got = await asyncio.wait_for(waiter, max(0.0, deadline - loop.time()))
            except TimeoutError:
                detail = f" (last error: {last})" if last else ""
                raise UnavailableError(f"no connection within {self._timeout:g} s{detail}") from None
            finally:
                if not waiter.done():
                    waiter.cancel()
            if got is not None:
                return got
            # None: a connection was dropped, so there is room to open one.

    async def _connect(self) -> _Reader:
        try:
            conn = await psycopg.AsyncConnection.connect(self._dsn, **self._kwargs)
        except psycopg.Error as e:
            with self._mu:
                self._open -= 1
            self._wake(None)
            raise UnavailableError(str(e)) from None
        return _Reader(conn, asyncio.get_running_loop())

    def _release(self, reader: _Reader) -> None:
        with self._mu:
            closed = self._closed
        if closed:
            reader.close()
        elif not self._wake(reader):
            with self._mu:
                self._idle.append(reader)

    def _drop(self, reader: _Reader) -> None:
        with self._mu:
            self._open -= 1
        reader.close()
        self._wake(None)

    def _drop_idle(self) -> None:
        with self._mu:
            idle, self._idle = list(self._idle), deque()
            self._open -= len(idle)
        for reader in idle:
            reader.close()
            self._wake(None)

    def _wake(self, item) -> bool:
        """Hand ``item`` (a connection, or None: room for one) to the first
        read still waiting; False if there is none."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(item)
                return True
        return False

    def close(self) -> None:
        with self._mu:
            self._closed = True
            idle, self._idle = list(self._idle), deque()
            self._open -= len(idle)
        for reader in idle:
            reader.close()

"""Reads awaited on the server's event loop: prepared statements, pipelined
on a few libpq connections whose sockets the loop watches.

A Range is one statement (view.read_statement) and needs no transaction,
so it runs in autocommit, and nothing else ever runs on these connections.
That lets a read be as little Python as possible: each connection's socket
is registered with the event loop once, for the connection's life; a read
queues its prepared statement (binary parameters and results) and a sync
point, and awaits a future that the socket's callback resolves once libpq
holds the answer.  No thread hand-off each way (the server otherwise runs
each PostgreSQL read in a worker thread), and none of the per-wait timer
and reader registration of psycopg's own async connections: a point read
cost 135 us of CPU through those and 71 us through this (one reader
awaiting 3,000 reads in a row, PostgreSQL on the other core, this
project's machine).

The connections are in pipeline mode: a read does not wait for a free
connection but queues behind the reads in flight on the least busy one
(a new connection is opened, up to ``max_size``, while every one has reads
in flight), and answers come back in order, many per wake-up under load
(100 concurrent reads: 40-60 us of CPU each, against 55-80 us with one
read per connection at a time).  A sync point after each statement makes
each read's error its own.  A read given up on (a cancelled request) is
still answered by PostgreSQL, and the answer dropped.

psycopg still opens the connections (``AsyncConnection.connect``: its
connect timeout and error messages) and decodes the results
(``psycopg.adapt.Transformer``); the statements go through its libpq
wrapper (``conn.pgconn``).  Each statement is prepared on a connection the
first time that connection runs it.

The connections belong to the event loop that first used them, the only
one they are awaited on (``serves_this_loop``; a read from another loop
takes the thread path).  A connection that breaks (PostgreSQL restarted)
fails its reads in flight and is dropped, with the idle ones beside it,
and each read is tried once more on a fresh one, since a stale connection
is expected after a restart.  A socket that breaks while idle is no longer
watched, so a dead connection never spins the loop.

``close`` may be called from any thread; it closes the connections on the
loop's thread while the loop runs.
"""

from __future__ import annotations

import asyncio
from collections import deque

import psycopg
from psycopg import pq
from psycopg.adapt import Transformer

from mvcckv import errors
from mvcckv.pg.errors import CONNECTION_ERRORS, UnavailableError

# Every parameter in binary, by parameter count.
_BINARY_PARAMS = [[1] * n for n in range(8)]


class _Reader:
    """One autocommit connection in pipeline mode, its socket watched by the
    loop; every statement is followed by a sync point, so each read has its
    own answer (or error) and the reads in flight are answered in order."""

    __slots__ = ("_pgconn", "_loop", "_fd", "_prepared", "_inflight", "_writing", "_broken")

    def __init__(self, conn: psycopg.AsyncConnection, loop: asyncio.AbstractEventLoop):
        # Only the libpq connection is used from here on; psycopg opened it.
        self._pgconn = conn.pgconn
        self._pgconn.nonblocking = 1
        self._pgconn.enter_pipeline_mode()
        self._loop = loop
        self._fd = self._pgconn.socket
        self._prepared: set[bytes] = set()
        # [future, results] of each statement sent and not yet answered.
        self._inflight: deque[list] = deque()
        self._writing = False
        self._broken: BaseException | None = None
        loop.add_reader(self._fd, self._readable)

    @property
    def busy(self) -> int:
        return len(self._inflight)

    async def run(self, name: bytes, statement: bytes, types, params) -> list[tuple]:
        """The rows of prepared statement ``name`` (``statement``, with
        $n parameters of the given type OIDs) run with binary ``params``."""
        if self._broken is not None:
            raise self._broken
        pgconn = self._pgconn
        if name not in self._prepared:
            # Reads sent after this one on this connection run after it.
            self._prepared.add(name)
            try:
                try:
                    pgconn.send_prepare(name, statement, param_types=types)
                except psycopg.Error as e:
                    self._fail(e)
                    raise
                _check(await self._sync(), pq.ExecStatus.COMMAND_OK)
            except BaseException:
                self._prepared.discard(name)
                raise
        try:
            pgconn.send_query_prepared(name, params, param_formats=_BINARY_PARAMS[len(params)], result_format=1)
        except psycopg.Error as e:
            self._fail(e)
            raise
        result = _check(await self._sync(), pq.ExecStatus.TUPLES_OK)
        tx = Transformer()
        tx.set_pgresult(result)
        return tx.load_rows(0, result.ntuples, tuple)

    def _sync(self) -> asyncio.Future:
        """End the statement just queued with a sync point, send it, and
        return the future of its results."""
        try:
            self._pgconn.pipeline_sync()
        except psycopg.Error as e:
            self._fail(e)  # what was queued cannot be told apart any more
            raise
        future = self._loop.create_future()
        self._inflight.append([future, []])
        self._flush()
        return future

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
            ended = False
            # get_result would block while libpq waits for more input.
            while self._inflight and not pgconn.is_busy():
                result = pgconn.get_result()
                if result is None:
                    if ended:
                        break  # nothing more to read now
                    ended = True  # the end of a statement's results; its sync follows
                    continue
                ended = False
                if result.status == pq.ExecStatus.PIPELINE_SYNC:
                    future, results = self._inflight.popleft()
                    if not future.done():  # a read given up on is answered all the same
                        future.set_result(results)
                else:
                    self._inflight[0][1].append(result)
        except psycopg.Error as e:
            self._fail(e)

    def _fail(self, e: BaseException) -> None:
        """Fail every read in flight; a broken socket stays readable, so it
        is no longer watched (or the loop would spin)."""
        self._broken = e
        if not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
            if self._writing:
                self._writing = False
                self._loop.remove_writer(self._fd)
        inflight, self._inflight = self._inflight, deque()
        for future, _ in inflight:
            if not future.done():
                future.set_exception(e)

    def close(self, why: BaseException) -> None:
        """On the loop's thread, or with the loop not running."""
        if self._broken is None:
            self._fail(why)
        # AsyncConnection.close() only closes the libpq connection.
        self._pgconn.finish()


def _check(results: list, status: pq.ExecStatus):
    """The statement's one result, or its error as psycopg raises it."""
    result = results[-1] if results else None
    if result is None or result.status != status:
        sqlstate = (result and result.error_field(pq.DiagnosticField.SQLSTATE) or b"").decode()
        message = result.error_message.decode(errors="replace").strip() if result else ""
        cls = psycopg.errors.lookup(sqlstate) if sqlstate else psycopg.OperationalError
        raise cls(message or "no result")
    return result


class AsyncReads:
    """``fetchall(statement, params, types)`` on up to ``max_size``
    pipelined autocommit connections of one event loop."""

    def __init__(self, dsn: str, connect_kwargs: dict, max_size: int):
        self._dsn = dsn
        self._kwargs = dict(connect_kwargs, autocommit=True)
        self._max = max(1, max_size)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._names: dict[str, tuple[bytes, bytes]] = {}
        self._readers: list[_Reader] = []
        self._connecting = 0
        self._closed = False

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
            reader = await self._pick(last)
            try:
                return await reader.run(*named, types, params)
            except CONNECTION_ERRORS as e:
                last = e
                # Those idle beside it most likely died with it.
                self._drop([r for r in self._readers if r is reader or not r.busy], e)
        raise UnavailableError(str(last))

    async def _pick(self, last: Exception | None) -> _Reader:
        """The connection with the fewest reads in flight, or a new one when
        every one has some and there is room."""
        if self._closed:
            raise errors.StoppedError()
        for reader in self._readers:
            if not reader.busy:
                return reader
        best = min(self._readers, key=lambda r: r.busy, default=None)
        if best is not None and (not best.busy or len(self._readers) + self._connecting >= self._max):
            return best
        self._connecting += 1
        try:
            conn = await psycopg.AsyncConnection.connect(self._dsn, **self._kwargs)
        except psycopg.Error as e:
            if best is not None:
                return best
            detail = f" (after: {last})" if last else ""
            raise UnavailableError(f"{e}{detail}") from None
        finally:
            self._connecting -= 1
        if self._closed:
            await conn.close()
            raise errors.StoppedError()
        reader = _Reader(conn, asyncio.get_running_loop())
        self._readers.append(reader)
        return reader

    def _drop(self, readers: list[_Reader], why: BaseException) -> None:
        for reader in readers:
            self._readers.remove(reader)
            reader.close(why)

    def close(self) -> None:
        """Close every connection (any thread); reads in flight fail."""
        loop = self._loop
        if loop is not None and loop.is_running() and not _on_loop(loop):
            # The loop may be reading these sockets right now: close them there.
            loop.call_soon_threadsafe(self.close)
            return
        self._closed = True
        self._drop(list(self._readers), errors.StoppedError())


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False

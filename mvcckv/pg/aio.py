"""Reads awaited on the server's event loop: a few psycopg async connections.

A Range is one statement (view.read_statement) and needs no transaction,
so it runs in autocommit on an ``AsyncConnection``: the event loop sends it
and is woken when the answer arrives, with no thread hand-off each way (the
server otherwise runs each PostgreSQL read in a worker thread).

The connections belong to the event loop that first used them, the only
one they are awaited on (``serves_this_loop``; a read from another loop
takes the thread path).  Up to ``max_size`` are open; a read finding all of
them busy waits for one up to ``acquire_timeout`` and then fails with
UnavailableError, as a read on the thread path does.  A connection that
breaks (PostgreSQL restarted) is dropped and the read tried once more on a
fresh one, since a stale connection is expected after a restart; one
abandoned mid-statement (a cancelled request) is dropped too, as nothing
tells what it will answer next.

``close`` may be called from any thread: idle connections are closed at
once, busy ones when their read ends.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque

import psycopg

from mvcckv import errors
from mvcckv.pg.errors import CONNECTION_ERRORS, UnavailableError


class AsyncReads:
    """``fetchall(statement, params)`` on a small set of autocommit
    ``AsyncConnection``\\ s of one event loop."""

    def __init__(self, dsn: str, connect_kwargs: dict, max_size: int, acquire_timeout: float):
        self._dsn = dsn
        self._kwargs = dict(connect_kwargs, autocommit=True)
        self._max = max(1, max_size)
        self._timeout = acquire_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        # Guards the fields below against close() from another thread.
        self._mu = threading.Lock()
        self._idle: deque = deque()  # (connection, binary cursor)
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

    async def fetchall(self, statement: str, params) -> list:
        last: Exception | None = None
        for _ in range(2):
            conn, cur = await self._acquire(last)
            try:
                await cur.execute(statement, params, prepare=True)
                rows = await cur.fetchall()
            except CONNECTION_ERRORS as e:
                last = e
                await self._drop(conn)
                continue
            except BaseException:
                await self._drop(conn)
                raise
            self._release(conn, cur)
            return rows
        raise UnavailableError(str(last))

    async def _acquire(self, last: Exception | None):
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

    async def _connect(self):
        try:
            conn = await psycopg.AsyncConnection.connect(self._dsn, **self._kwargs)
        except psycopg.Error as e:
            with self._mu:
                self._open -= 1
            self._wake(None)
            raise UnavailableError(str(e)) from None
        return conn, conn.cursor(binary=True)

    def _release(self, conn, cur) -> None:
        with self._mu:
            closed = self._closed
        if closed:
            self._finish(conn)
        elif not self._wake((conn, cur)):
            with self._mu:
                self._idle.append((conn, cur))

    async def _drop(self, conn) -> None:
        with self._mu:
            self._open -= 1
        await conn.close()
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
        for conn, _ in idle:
            self._finish(conn)

    @staticmethod
    def _finish(conn) -> None:
        # AsyncConnection.close() only closes the libpq connection, which
        # needs no event loop; this does the same from any thread.
        conn.pgconn.finish()

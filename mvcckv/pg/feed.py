"""The change feed: every committed revision, once and in order, from LISTEN/NOTIFY.

This is the article's watch client — LISTEN, then read from the last seen
revision, then de-duplicate — made gap-free:

1. Connect and ``LISTEN`` first; only then read the current revision (or,
   after a reconnect, catch up on every revision after the last delivered
   one from the table).  A change committed in between is both read and
   notified, and the duplicate is dropped; none can fall between the two.
2. Rows arrive as notifications (``row_to_json`` of each ``config`` row, or
   just its revision when the row is too large for pg_notify) and are held
   until the ``end`` marker of their transaction arrives (see schema.py);
   then every revision up to the marker is delivered, reading from the
   table whatever the notifications did not carry in full.
3. A revision at or below the last delivered one is dropped; one above the
   next expected one first fills the gap from the table.  Revisions are
   dense and commit in order (schema.py), so "gap" always means "missed",
   never "not committed yet".

If the connection drops, notifications sent meanwhile are lost; the
reconnect (step 1) reads them from the table instead.  Every
``poll_interval`` without a notification, the feed also compares the
table's revision with its own, so even a notification lost some other way
is late by at most that long.

Auth changes (``{"auth": generation}``, schema.py) are passed to
``on_auth`` as they arrive, and every catch-up (reconnect, idle poll)
passes the table's current generation too, so an auth change whose
notification was lost is heard of within ``poll_interval`` as well.

The local writer hands its own committed revisions to :meth:`deliver`
before answering its callers, so a client never learns of a revision its
watchers have not been given (etcd's progress guarantee).  The listener's
copy of them would be a duplicate: notifications sent by the writer's
backend (``writer_pid``) are dropped unread.  Should the writer's commit
be cut off (it does not know whether it committed, so it delivers
nothing), its revisions are read from the table at the next delivery that
finds them missing, or the next idle catch-up.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Callable

import psycopg
from psycopg import sql

from mvcckv.pb import kv_pb2

log = logging.getLogger("mvcckv.pg")

KeyValue = kv_pb2.KeyValue

# Changes of revisions [lo, hi] from the table, in (revision, sub) order.
_CHANGES = """SELECT revision, sub, tombstone, key, value, create_revision, version, lease
    FROM config WHERE revision BETWEEN %s AND %s ORDER BY revision, sub"""

_MAX_BACKOFF = 1.0
# Longest wait for a notification before looking at the stop flag.
_WAIT_SLICE = 0.2

Changes = list[tuple[int, list[tuple[bool, KeyValue]]]]


def changes_from_rows(rows) -> Changes:
    """Group ``_CHANGES`` rows into (revision, [(is_delete, KeyValue)])."""
    out: Changes = []
    for revision, _sub, tombstone, key, value, create_revision, version, lease in rows:
        if not out or out[-1][0] != revision:
            out.append((revision, []))
        if tombstone:
            out[-1][1].append((True, KeyValue(key=key, mod_revision=revision)))
        else:
            out[-1][1].append((False, KeyValue(
                key=key, create_revision=create_revision, mod_revision=revision,
                version=version, value=value or b"", lease=lease,
            )))
    return out


def read_changes(cur, lo: int, hi: int) -> Changes:
    if hi < lo:
        return []
    return changes_from_rows(cur.execute(_CHANGES, (lo, hi)))


def _unhex(s: str | None) -> bytes:
    # row_to_json writes bytea as "\\x<hex>".
    return bytes.fromhex(s[2:]) if s else b""


def _event(row: dict) -> tuple[bool, KeyValue]:
    key = _unhex(row["key"])
    if row["tombstone"]:
        return True, KeyValue(key=key, mod_revision=row["revision"])
    return False, KeyValue(
        key=key, create_revision=row["create_revision"], mod_revision=row["revision"],
        version=row["version"], value=_unhex(row["value"]), lease=row["lease"],
    )


class ChangeFeed:
    """Delivers committed revisions to ``emit`` exactly once, in order.

    ``connect()`` opens an autocommit connection; ``emit(changes)`` is
    called with the feed's lock held, in revision order; ``on_compact(rev)``
    hears of compactions done by any process, ``on_auth(generation)`` of
    auth changes (on the listener thread, without the feed's lock).
    """

    def __init__(
        self,
        connect: Callable[[], psycopg.Connection],
        channel: str,
        emit: Callable[[Changes], None],
        on_compact: Callable[[int], None],
        *,
        poll_interval: float = 1.0,
        on_auth: Callable[[int], None] = lambda generation: None,
    ):
        self._connect = connect
        self._channel = channel
        self._emit = emit
        self._on_compact = on_compact
        self._on_auth = on_auth
        self.poll_interval = poll_interval
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.last = 0
        self._conn: psycopg.Connection | None = None
        self._thread: threading.Thread | None = None
        self._pending: dict[int, list[dict]] = {}
        self._next_poll = 0.0
        # The backend PID of the local writer's connection (see above).
        self.writer_pid: int | None = None

    # -- life cycle ------------------------------------------------------------

    def start(self) -> None:
        """Listen, learn the current revision, start the listener thread.

        Raises psycopg's error if the database cannot be reached.
        """
        conn = self._listen()
        revision, compact = conn.execute("SELECT revision, compact_revision FROM meta").fetchone()
        self.last = revision
        self._on_compact(compact)
        self._conn = conn
        self._thread = threading.Thread(target=self._run, name="mvcckv-pg-listen", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._conn is not None:
            self._conn.close()

    def _listen(self) -> psycopg.Connection:
        conn = self._connect()
        try:
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
        except BaseException:
            conn.close()
            raise
        return conn

    # -- delivery ----------------------------------------------------------------

    def deliver(self, changes: Changes, fill: Callable[[int, int], Changes]) -> None:
        """Hand ``changes`` (ascending revisions) on, skipping revisions
        already delivered and first filling any gap with ``fill(lo, hi)``."""
        with self._lock:
            for rev, events in changes:
                if rev <= self.last:
                    continue
                if rev > self.last + 1:
                    self._emit_all(fill(self.last + 1, rev - 1), rev - 1)
                # The revision moves before watchers hear of it (as the LMDB
                # store's does): a watcher created in between starts after
                # it and is skipped, instead of starting before it and
                # missing it.
                self.last = rev
                self._emit([(rev, events)])

    def _emit_all(self, changes: Changes, through: int) -> None:
        """Emit ``changes`` and account for every revision up to ``through``
        (a revision whose rows compaction removed has nothing to emit)."""
        fresh = [(r, evs) for r, evs in changes if r > self.last]
        self.last = max(self.last, through)
        if fresh:
            self._emit(fresh)

    def catch_up(self, cur) -> None:
        """Deliver everything committed after the last delivered revision."""
        revision, compact, auth = cur.execute(
            "SELECT revision, compact_revision, (SELECT 2 * revision + enabled::int FROM auth_meta) FROM meta"
        ).fetchone()
        self._on_compact(compact)
        self._on_auth(auth)
        with self._lock:
            if revision <= self.last:
                return
            if self.last < compact:
                log.warning(
                    "change feed resumes at revision %d, below the compaction at %d: "
                    "watchers may miss the compacted changes", self.last + 1, compact,
                )
            self._emit_all(read_changes(cur, self.last + 1, revision), revision)

    # -- the listener thread ------------------------------------------------------

    def _run(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            try:
                if self._conn is None:
                    self._conn = self._listen()
                    self._pending.clear()
                    self.catch_up(self._conn)
                    log.info("change feed reconnected at revision %d", self.last)
                self._receive(self._conn)
                backoff = 0.05
            except psycopg.Error as e:
                if self._stop.is_set():
                    return
                log.warning("change feed lost its connection (%s); reconnecting", " ".join(str(e).split()))
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
                self._stop.wait(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)
            except Exception:  # noqa: BLE001 - a watcher callback failed; keep feeding
                log.exception("change feed delivery failed")

    def _receive(self, conn: psycopg.Connection) -> None:
        # stop_after=1 returns as soon as one network read brought
        # notifications, with every notification of that read.
        got = list(conn.notifies(timeout=min(_WAIT_SLICE, self.poll_interval), stop_after=1))
        if not got:
            now = time.monotonic()
            if now >= self._next_poll:
                self._next_poll = now + self.poll_interval
                self.catch_up(conn)  # idle: make sure nothing was missed
            return
        for n in got:
            if n.pid == self.writer_pid:
                continue
            payload = json.loads(n.payload)
            if "end" in payload:
                self._on_compact(payload["compact"])
                self._commit(conn, payload["end"])
            elif "auth" in payload:
                self._on_auth(payload["auth"])
            elif payload["revision"] > self.last:
                self._pending.setdefault(payload["revision"], []).append(payload)

    def _commit(self, conn: psycopg.Connection, end: int) -> None:
        """Deliver every revision up to ``end`` (a transaction's marker)."""
        changes: Changes = []
        missing: list[int] = []
        for rev in range(self.last + 1, end + 1):
            rows = self._pending.pop(rev, None)
            if rows is None or any(r.get("large") for r in rows):
                missing.append(rev)
                changes.append((rev, []))
            else:
                rows.sort(key=lambda r: r["sub"])
                changes.append((rev, [_event(r) for r in rows]))
        for rev in [r for r in self._pending if r <= end]:
            del self._pending[rev]  # already delivered by the local writer
        if missing:
            read = dict(read_changes(conn, missing[0], missing[-1]))
            changes = [(rev, read.get(rev, []) if not evs else evs) for rev, evs in changes]
        self.deliver([(rev, evs) for rev, evs in changes if evs], lambda lo, hi: read_changes(conn, lo, hi))
        with self._lock:
            self.last = max(self.last, end)

"""PgEngine: the engine contract (kv.py) on PostgreSQL.

Write path::

    callers ──propose()──► queue ──► writer thread, one SQL transaction per batch:
                                       SELECT ... FROM meta FOR UPDATE   (the revision lock)
                                       apply each request through txn.py over a WriteView
                                       UPDATE meta SET revision = ...    (fires the end marker)
                                       COMMIT
                                     hand the batch's changes to the change feed
                                     resolve the callers' futures

A batch of nothing but plain puts (no lease, prev_kv or ignore_*: the
common write) is instead one call of the ``put_many`` SQL function
(schema.py), which does the same lock, rows and meta update in one
statement; run in autocommit, the statement and its COMMIT are one round
trip, against five (BEGIN, the lock, the put, the meta update, COMMIT).
If the connection breaks during that call the puts fail as a COMMIT cut
off does: they may or may not have been applied.

The ``meta`` row lock makes every writer in every process sharing the
schema take turns, so revisions are one dense sequence committed in order
(schema.py explains why a sequence would not do).  A request is validated
before it is queued, with the same functions as the LMDB engine, so both
refuse a bad request with the same error; the request-level rules (range
options, compares, check-then-execute) are txn.py's, run over SQL views
(view.py), so both engines answer alike.

A Range is one statement that reads the revision and the rows from its one
snapshot (view.read_statement), in autocommit: one round trip.  The server
awaits it on its event loop over an async connection (``range_async``,
aio.py); the embedded API runs it on a pooled connection.  Other reads (a
read-only Txn, lease and maintenance reads) run in a REPEATABLE READ READ
ONLY transaction on a pooled connection.  Watchers are
fed by the change feed (feed.py) from LISTEN/NOTIFY, so a write on any
process reaches the watchers of every process.

Faults: a connection that breaks (PostgreSQL restarted, network cut) fails
the request with :class:`~mvcckv.pg.errors.UnavailableError` (gRPC
UNAVAILABLE: retry).  A transaction cut off before its COMMIT is rolled
back by PostgreSQL, so a txn is never applied in part.  Each thread
reconnects on its next request, a read retries once at once (a pooled
connection may be stale after a restart), and the change feed reconnects
and catches up from the table, so service resumes by itself.

Leases live in the ``lease`` table; any process finds expired ones
(``FOR UPDATE SKIP LOCKED``) and revokes them as its own revision, each
lease in one revision as etcd does.  Compaction records the compaction
revision in the batch that asks for it (reads below it fail at once) and
deletes the dead rows in the background (compaction.py).

Auth (``auth.py``'s :class:`~mvcckv.auth.AuthStore`, the LMDB engine's
rules unchanged) keeps its state in ``auth_meta``, ``auth_user`` and
``auth_role`` (schema.py).  Its changes are requests applied in the batch's
transaction like any other, after the revision lock, so they are serialised
with every write of every process.  A batch that holds an auth change or a
request the server authorized first compares the table's auth state with
its own and reloads it if another process changed it; the check of a
request's auth revision is then made against the database's revision as
of that transaction, never against a stale copy.

Other processes' auth changes reach this one:

* on their notification (``{"auth": generation}``, feed.py), within the
  notify latency, milliseconds; or at the change feed's next catch-up
  (reconnect, or ``poll_interval`` of silence) if it was lost;
* on every read: its snapshot includes the auth generation, and a newer one
  is loaded from that same snapshot before the read returns, so a read
  checked against the older state is withdrawn (``revision of auth store
  is old``) by the server's check after the read;
* on every batch that touches auth (above), and on every embedded auth
  read (``user_get``, ``auth_status``, ...).

So the staleness is bounded: a permission revoked on server A is enforced
by server B for writes at once (B's write carries the auth revision it was
checked at and fails at apply time against the database's revision), for
reads at once (the withdrawn read), and for every other check (Watch
create, lease calls, Authenticate, token validity) once B hears the
notification, or ``poll_interval`` at worst.  One window remains: a
request that B checked while it still believed auth off carries no auth
revision, so it is not re-checked at apply time; auth being turned on
elsewhere takes effect on B when B hears of it.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import queue
import re
import secrets
import select
import tempfile
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import crc32c
import psycopg
from psycopg import IsolationLevel
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from mvcckv import errors, etcdfile, txn as txnmod, validate
from mvcckv.auth import DEFAULT_BCRYPT_COST, ENABLED_KEY, REVISION_KEY, AuthAdmin, AuthStore, AuthWrites
from mvcckv.backend import (
    ALARM,
    AUTH,
    AUTH_ROLES,
    AUTH_USERS,
    DEFAULT_QUOTA,
    LEASE,
    META_FINISHED_COMPACT,
    META_SCHEDULED_COMPACT,
    Backend,
    encode_u64,
)
from mvcckv.hash import KeyValueHash
from mvcckv.kv import (
    AUTH_KINDS,
    AUTH_OFF,
    AUTH_OFF_FLAG,
    AUTHORIZED_FLAG,
    KIND_ALARM,
    KIND_COMPACT,
    KIND_DELETE_RANGE,
    KIND_LEASE_CHECKPOINT,
    KIND_LEASE_GRANT,
    KIND_LEASE_REVOKE,
    KIND_PUT,
    KIND_TXN,
    PASSWORD_KINDS,
    Authorized,
    fail,
    settle,
    take_batch,
)
from mvcckv.lease import DEFAULT_MIN_TTL, MAX_LEASE_TTL, lease_key
from mvcckv.pb import kv_pb2, lease_pb2
from mvcckv.pb import rpc_pb2 as pb
from mvcckv.pg import compaction
from mvcckv.pg.aio import AsyncReads
from mvcckv.pg.errors import CONNECTION_ERRORS as _CONNECTION_ERRORS
from mvcckv.pg.errors import ConnectError, SchemaError, UnavailableError
from mvcckv.pg.feed import ChangeFeed, Changes, read_changes
from mvcckv.pg.schema import channel, check_schema_name, migrate
from mvcckv.pg.view import READ_PARAM_TYPES, ReadView, WriteView, numbered, range_at, read_result, read_statement
from mvcckv.revision import to_bytes
from mvcckv.admission import DEFAULT_MAX_REQUEST_BYTES, DEFAULT_MAX_TXN_OPS, Admission
from mvcckv.store import Store, StoreStatus

log = logging.getLogger("mvcckv.pg")

_EXPIRE = -1  # internal writer item: revoke expired leases
_WAKE = object()  # wakes the compactor thread to stop

_MAX_BATCH = 256

_LOCK_META = """SELECT revision, compact_revision, finished_compact_revision,
    (SELECT coalesce(json_agg(json_build_array(member_id, alarm)), '[]') FROM alarm)
    FROM meta FOR UPDATE"""
_SIZE = """SELECT coalesce(sum(pg_total_relation_size(oid)), 0)::bigint FROM pg_class
    WHERE relnamespace = current_schema()::regnamespace AND relkind = 'r'"""

_U64 = 1 << 64

_AUTH_META = "SELECT enabled, revision, enabled_revision FROM auth_meta"
# See schema.py: grows with every auth change, enable included.
_AUTH_GENERATION = "SELECT 2 * revision + enabled::int FROM auth_meta"
_READ_META = f"SELECT revision, compact_revision, ({_AUTH_GENERATION}) FROM meta"


_PUT_MANY = "SELECT * FROM put_many(%s, %s)"


def _is_plain_put(kind: int, req) -> bool:
    """A Put that ``put_many`` can write: no lease, prev_kv or ignore_*,
    not re-checked against auth at apply time."""
    return (
        kind > 0 and kind & ~AUTH_OFF_FLAG == KIND_PUT
        and not (req.lease or req.prev_kv or req.ignore_value or req.ignore_lease)
    )


def _touches_auth(kind: int) -> bool:
    """Whether a batch item changes auth or must be checked against it."""
    # A key-value write let through with auth off (AUTH_OFF_FLAG) is checked
    # against this process's view only: reading the database's auth state
    # for every write while auth is off would cost a round trip per batch.
    if kind <= 0:
        return False
    return (kind & ~AUTH_OFF_FLAG) in AUTH_KINDS or bool(kind & AUTHORIZED_FLAG)


@dataclass(frozen=True)
class _AuthRows:
    """The auth tables as one transaction saw them."""

    enabled: bool
    revision: int
    enabled_revision: int
    users: list
    roles: list

    @property
    def generation(self) -> int:
        return 2 * self.revision + self.enabled


def _read_auth(cur, meta=None) -> _AuthRows:
    """The auth tables; consistent when ``cur`` reads one snapshot or holds
    the revision lock (auth is written only under it)."""
    enabled, revision, enabled_revision = meta or cur.execute(_AUTH_META).fetchone()
    users = cur.execute("SELECT name, data FROM auth_user ORDER BY name").fetchall()
    roles = cur.execute("SELECT name, data FROM auth_role ORDER BY name").fetchall()
    return _AuthRows(enabled, revision, enabled_revision, users, roles)


class _PgAuthWrites(AuthWrites):
    """AuthStore's changes as SQL in the batch's transaction."""

    __slots__ = ("_cur", "enabled_revision")

    def __init__(self, cur):
        self._cur = cur
        self.enabled_revision: int | None = None

    def put_user(self, name: bytes, data: bytes) -> None:
        self._cur.execute(
            "INSERT INTO auth_user (name, data) VALUES (%s, %s)"
            " ON CONFLICT (name) DO UPDATE SET data = excluded.data", (name, data),
        )

    def delete_user(self, name: bytes) -> None:
        self._cur.execute("DELETE FROM auth_user WHERE name = %s", (name,))

    def put_role(self, name: bytes, data: bytes) -> None:
        self._cur.execute(
            "INSERT INTO auth_role (name, data) VALUES (%s, %s)"
            " ON CONFLICT (name) DO UPDATE SET data = excluded.data", (name, data),
        )

    def delete_role(self, name: bytes) -> None:
        self._cur.execute("DELETE FROM auth_role WHERE name = %s", (name,))

    def set_enabled(self, enabled: bool) -> None:
        # Enabling does not move the auth revision, so the revision it
        # happened at tells an off-and-on-again apart from no change.
        self.enabled_revision = self._cur.execute(
            "UPDATE auth_meta SET enabled = %s,"
            " enabled_revision = CASE WHEN %s THEN revision ELSE enabled_revision END"
            " RETURNING enabled_revision", (enabled, enabled),
        ).fetchone()[0]

    def set_revision(self, revision: int) -> None:
        self._cur.execute("UPDATE auth_meta SET revision = %s", (revision,))


def _signed(v: int) -> int:
    """A uint64 (member IDs) as the int64 PostgreSQL stores."""
    return v - _U64 if v >= 1 << 63 else v


def _unsigned(v: int) -> int:
    return v + _U64 if v < 0 else v


@dataclass(frozen=True)
class PgOptions:
    schema: str = "mvcckv"
    """PostgreSQL schema holding the tables; one schema is one etcd keyspace."""
    quota_bytes: int = DEFAULT_QUOTA
    """Size of the schema's tables at which writes fail with NOSPACE (<= 0: none)."""
    max_txn_ops: int = DEFAULT_MAX_TXN_OPS
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    member_id: int = 0
    min_lease_ttl: int = DEFAULT_MIN_TTL
    lease_expiry_tick: float = 0.5
    """How often expired leases are looked for (and sizes refreshed)."""
    pool_min_size: int = 1
    pool_max_size: int = 8
    """Most connections of each of the two read pools: the threads' (embedded
    reads, read-only txns, leases, maintenance) and the event loop's
    (served Ranges, aio.py), opened as needed."""
    connect_timeout: int = 5
    """Seconds to wait for a new connection (libpq; at least 2)."""
    acquire_timeout: float = 1.0
    """Seconds a request waits for a pooled connection before failing."""
    lock_timeout: float = 7.0
    """Seconds a write waits for the revision lock (etcd's request timeout)."""
    poll_interval: float = 1.0
    """Idle seconds after which the change feed checks for missed revisions."""
    compaction_batch_limit: int = 1000
    """Revisions whose dead rows one compaction transaction deletes."""
    compaction_sleep: float = 0.01
    bcrypt_cost: int = DEFAULT_BCRYPT_COST
    """Cost of the bcrypt hashing of auth passwords."""


@dataclass
class _Batch:
    """The state of one write transaction."""

    begin: int
    current: int
    compact: int
    finished: int
    alarms: set[tuple[int, int]]
    results: list = field(default_factory=list)
    changes: Changes = field(default_factory=list)
    jobs: list = field(default_factory=list)
    view: WriteView | None = None
    auth: _PgAuthWrites | None = None

    def has_alarm(self, alarm: int) -> bool:
        return any(a == alarm for _, a in self.alarms)


class _PartialWrite(Exception):
    """A request failed after writing: the batch must not commit."""


class _Deferred:
    """A physical compaction's response, answered when the rows are gone."""

    __slots__ = ("response", "future")

    def __init__(self, response):
        self.response = response
        self.future: Future = Future()


class PgEngine(Admission, AuthAdmin):
    """An etcd-semantics MVCC engine on a PostgreSQL schema.

    Thread-safe.  Use :func:`mvcckv.pg.open`.  Several engines (in one
    process or many) on one schema behave as one etcd: one revision
    sequence, every write visible to the reads and watches of all.
    """

    # Every read is a round trip to PostgreSQL (the engine contract, kv.py).
    reads_may_block = True

    def __init__(self, dsn: str, options: PgOptions | None = None):
        self.options = options or PgOptions()
        schema = check_schema_name(self.options.schema)
        self.dsn = dsn
        # Where iter_snapshot stages a snapshot copy (the LMDB engine uses
        # its data dir).
        self.path = tempfile.gettempdir()
        self._server_options = self._make_server_options(dsn)
        self._mu = threading.Lock()
        self._compact_rev = -1
        self._finished_compact_rev = -1
        self._alarms: set[tuple[int, int]] = set()
        self._db_size = 0
        self._listeners: list[Callable[[Changes], None]] = []
        self._watch_hub = None
        self._closed = False
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue()
        self._jobs: queue.Queue = queue.Queue()
        self._expire_pending = False
        self._compaction_queued = 0
        self._auth = AuthStore(bcrypt_cost=self.options.bcrypt_cost, kv_revision=lambda: self.revision)
        # Held while the auth state is replaced, and by the writer from its
        # first look at the auth tables until its batch commits or rolls
        # back; never while waiting for a pooled connection.
        self._auth_mu = threading.Lock()
        # auth_meta.enabled_revision as of the local state.
        self._auth_enabled_revision = 0
        # Writer thread: (state before the batch, the batch's writes) while
        # it holds _auth_mu.
        self._auth_batch: tuple | None = None
        self._pool = None
        where = f"PostgreSQL at {describe_dsn(dsn)}, schema {schema}"
        try:
            with self._connect("setup") as conn:
                if conn.info.server_version >= 110000:
                    # Statements of a few milliseconds at most: JIT
                    # compilation (set off by a cost estimate, 6-300 ms per
                    # execution) never pays.  Before the connection string's
                    # own options, so those can turn it on; PostgreSQL
                    # before 11 has no such setting and would refuse it.
                    self._server_options = f"-c jit=off {self._server_options}"
                migrate(conn, schema)
                self._refresh(conn.cursor())
            self._feed = ChangeFeed(
                lambda: self._connect("listen"), channel(schema), self._emit, self._saw_compaction,
                poll_interval=self.options.poll_interval, on_auth=self._heard_auth,
            )
            self._feed.start()
        except SchemaError as e:
            raise SchemaError(f"{where}: {e}") from None
        except psycopg.Error as e:
            raise ConnectError(f"{where}: {_one_line(e)}") from None
        try:
            self._pool = self._make_pool()
            self._aio = AsyncReads(self.dsn, self._connect_kwargs("aio"), self.options.pool_max_size)
            # After LISTEN (feed.start): a change committed from here on is
            # notified, one committed before is read now.
            rows = self._pooled(_read_auth)
            self._auth.load(rows.enabled, rows.revision, rows.users, rows.roles)
            self._auth_enabled_revision = rows.enabled_revision
        except BaseException:
            self._feed.stop()
            if self._pool is not None:
                self._pool.close()
            raise
        self._writer = threading.Thread(target=self._run_writer, name="mvcckv-pg-writer", daemon=True)
        self._background = threading.Thread(target=self._run_background, name="mvcckv-pg-background", daemon=True)
        self._compactor = threading.Thread(target=self._run_compactor, name="mvcckv-pg-compactor", daemon=True)
        self._writer.start()
        self._background.start()
        self._compactor.start()

    # ------------------------------------------------------------------
    # connections

    def _make_pool(self) -> ConnectionPool:
        return ConnectionPool(
            self.dsn,
            kwargs=self._connect_kwargs("pool", autocommit=False),
            min_size=self.options.pool_min_size,
            max_size=self.options.pool_max_size,
            name=f"mvcckv:{self.options.schema}",
            timeout=self.options.acquire_timeout,
            # Give up reconnecting quickly: the next request asks again, so
            # service resumes as soon as PostgreSQL is back instead of after
            # a long backoff.
            reconnect_timeout=max(self.options.acquire_timeout, 1.0),
            open=True,
        )

    def _make_server_options(self, dsn: str) -> str:
        try:
            given = conninfo_to_dict(dsn).get("options") or ""
        except psycopg.ProgrammingError as e:
            raise ConnectError(f"invalid PostgreSQL connection string: {_one_line(e)}") from None
        ours = (
            f"-c search_path={self.options.schema}"
            f" -c lock_timeout={int(self.options.lock_timeout * 1000)}"
            # A process that stops while holding the revision lock must not
            # stall every other one for long.
            " -c idle_in_transaction_session_timeout=60000"
        )
        return f"{given} {ours}".strip()

    def _connect_kwargs(self, role: str, autocommit: bool = True) -> dict:
        return {
            "autocommit": autocommit,
            "connect_timeout": self.options.connect_timeout,
            "application_name": f"mvcckv:{self.options.schema}:{role}",
            "options": self._server_options,
        }

    def _connect(self, role: str, autocommit: bool = True) -> psycopg.Connection:
        return psycopg.connect(self.dsn, **self._connect_kwargs(role, autocommit))

    def _connect_writer(self) -> psycopg.Connection:
        conn = self._connect("writer", autocommit=False)
        # The writer delivers its own commits; the feed skips their notifications.
        self._feed.writer_pid = conn.info.backend_pid
        return conn

    def _pooled(self, fn, *, read_only: bool = True, single: bool = False):
        """``fn(cursor)`` in one transaction on a pooled connection:
        REPEATABLE READ READ ONLY for reads, READ COMMITTED otherwise;
        ``single``: ``fn`` runs one statement, in autocommit (a statement
        sees one snapshot by itself, so BEGIN and COMMIT would be two
        round trips for nothing).

        ``fn`` must be safe to run twice: after a broken connection (a stale
        one is expected after a PostgreSQL restart) it runs once more on a
        fresh one before the request fails with UnavailableError.
        """
        self._check_open()
        last: Exception | None = None
        for _ in range(2):
            try:
                conn = self._pool.getconn()
            except PoolTimeout:
                detail = f" (last error: {_one_line(last)})" if last else ""
                raise UnavailableError(
                    f"no connection within {self.options.acquire_timeout:g} s{detail}"
                ) from None
            except PoolClosed:
                raise errors.StoppedError() from None
            broken = False
            try:
                conn.autocommit = single
                conn.isolation_level = IsolationLevel.REPEATABLE_READ if read_only else IsolationLevel.READ_COMMITTED
                conn.read_only = read_only
                with conn.cursor() as cur:
                    result = fn(cur)
                conn.commit()
                return result
            except _CONNECTION_ERRORS as e:
                last = e
                broken = conn.broken or not _rollback(conn)
            except BaseException:
                _rollback(conn)
                raise
            finally:
                self._pool.putconn(conn)
            if broken:
                # Drop every idle connection that died with this one.
                self._pool.check()
        raise UnavailableError(_one_line(last))

    # ------------------------------------------------------------------
    # reads

    def range_request(self, req: pb.RangeRequest) -> pb.RangeResponse:
        """A Range: one statement, one round trip (view.read_statement)."""
        statement = self._range_statement(req)
        rows = self._pooled(lambda cur: cur.execute(*statement, binary=True).fetchall(), single=True)
        if self._range_needs_auth(rows):
            self._refresh_auth()
        return self._range_answer(req, rows)

    async def range_async(self, req: pb.RangeRequest) -> pb.RangeResponse:
        """:meth:`range_request` awaited on the caller's event loop, on an
        async connection (aio.py): no thread hop per read."""
        statement = self._range_statement(req)
        if not self._aio.serves_this_loop():
            return await asyncio.to_thread(self.range_request, req)
        rows = await self._aio.fetchall(*numbered(*statement), READ_PARAM_TYPES)
        if self._range_needs_auth(rows):
            await asyncio.to_thread(self._refresh_auth)
        return self._range_answer(req, rows)

    def _range_statement(self, req: pb.RangeRequest):
        validate.check_range(req)
        self._check_open()
        self._check_corrupt()
        return read_statement(req.key, req.range_end, req.revision, txnmod.range_fetch_limit(req), req.count_only)

    def _range_needs_auth(self, rows) -> bool:
        """Whether the read saw a newer auth state than ours.  Loading it
        (from a later snapshot: at least as new) before the read returns
        makes the server withdraw a read it checked against the old one."""
        return rows[0][2] > self._auth.generation

    def _range_answer(self, req: pb.RangeRequest, rows) -> pb.RangeResponse:
        current, compact, _, kvs, count = read_result(rows, req.count_only)
        self._saw_compaction(compact)
        txnmod.read_revision(current, req.revision, compact)
        return txnmod.range_response(req, kvs, count, current)

    def txn_request(self, req: pb.TxnRequest) -> pb.TxnResponse:
        """A Txn: read-only ones are answered at once, others are written."""
        if validate.txn_is_read_only(req):
            self._check_open()
            self._check_corrupt()
            validate.check_txn(req, self.options.max_txn_ops)
            return self._pooled(lambda cur: txnmod.apply_txn(self._read_view(cur), req))
        return self.propose(KIND_TXN, req).result()

    def _read_view(self, cur) -> ReadView:
        revision, compact, auth = cur.execute(_READ_META).fetchone()
        self._saw_compaction(compact)
        if auth > self._auth.generation:
            # Another process changed auth: take its state from this
            # read's snapshot, so the server sees the auth revision move
            # and withdraws a read it checked against the old one.
            self._install_auth(_read_auth(cur))
        return ReadView(cur, revision, compact)

    def get_kv(self, key: bytes, revision: int = 0) -> kv_pb2.KeyValue | None:
        """The KeyValue of ``key`` at ``revision`` (0 = current), or None."""

        def get(cur):
            view = self._read_view(cur)
            kvs, _, _ = view.range_keys(key, b"", max(revision, 0), 0, False)
            return kvs[0] if kvs else None

        return self._pooled(get)

    @property
    def revision(self) -> int:
        """The last revision handed to watchers (1 for an empty store).

        Every revision this engine wrote is included by the time its writer
        is answered; revisions written elsewhere arrive within milliseconds
        (notifications) or ``poll_interval`` at worst.
        """
        return self._feed.last

    @property
    def compact_revision(self) -> int:
        """The last compaction's revision, -1 if never compacted."""
        return self._compact_rev

    def _saw_compaction(self, rev: int) -> None:
        with self._mu:
            if rev > self._compact_rev:
                self._compact_rev = rev

    # ------------------------------------------------------------------
    # writes

    def propose(self, kind: int, req, auth_revision: int = 0) -> Future:
        """Admit and queue a write; the future resolves to its response.

        Raises the request's error at once when it fails a static check; a
        request over the space quota gets a future that fails once the
        NOSPACE alarm it raised is applied (``admission.py``).  A non-zero
        ``auth_revision`` is the auth revision the server checked the
        request at: if auth is on and the database's auth revision has
        moved past it when the request is applied, it fails with
        AuthOldRevisionError.  UserAdd and UserChangePassword must come
        through ``AuthStore.prepare`` (no plain-text password is stored).
        """
        self._check_open()
        refused = self._admit(kind, req)
        if refused is not None:
            return refused
        if kind in PASSWORD_KINDS and req.password:
            raise ValueError("a password must be hashed (AuthStore.prepare) before the request is proposed")
        self._check_size(req.ByteSize())
        fut: Future = Future()
        if auth_revision > 0:
            self._queue.put((kind | AUTHORIZED_FLAG, Authorized(auth_revision, req), fut))
        elif auth_revision == AUTH_OFF:
            self._queue.put((kind | AUTH_OFF_FLAG, req, fut))
        else:
            self._queue.put((kind, req, fut))
        return fut

    def new_lease_request(self, ttl: int, lease_id: int = 0) -> pb.LeaseGrantRequest:
        while lease_id == 0:
            lease_id = secrets.randbits(63)
        return pb.LeaseGrantRequest(TTL=ttl, ID=lease_id)

    def _check_open(self) -> None:
        if self._closed:
            raise errors.StoppedError()

    def _run_writer(self) -> None:
        conn: psycopg.Connection | None = None
        while True:
            batch, stop = take_batch(self._queue, _MAX_BATCH)
            if not batch:
                break
            if any(kind == _EXPIRE for kind, _, _ in batch):
                # Applied or failed, the next tick looks again.
                self._expire_pending = False
            try:
                conn = self._write_batch(conn, batch)
            except BaseException as e:  # noqa: BLE001 - answer the callers, keep writing
                log.exception("write batch failed")
                self._end_auth(committed=False)
                self._fail(batch, e)
                conn = _close(conn)
            if stop:
                break
        _close(conn)
        self._fail_queued()

    def _write_batch(self, conn: psycopg.Connection | None, batch) -> psycopg.Connection | None:
        """One transaction for ``batch``; returns the connection to reuse."""
        if _gone(conn):
            conn = _close(conn)
        if all(_is_plain_put(kind, req) for kind, req, _ in batch):
            return self._write_puts(conn, batch)
        for attempt in range(2):
            fresh = conn is None  # none yet, or a dead one closed (above, or by attempt 1)
            if fresh:
                try:
                    conn = self._connect_writer()
                except psycopg.Error as e:
                    self._fail(batch, UnavailableError(_one_line(e)))
                    return None
            try:
                conn.autocommit = False
                state = self._apply_batch(conn, batch)
            except _CONNECTION_ERRORS as e:
                if not conn.broken and _rollback(conn):
                    # e.g. the revision lock timed out
                    self._fail(batch, UnavailableError(_one_line(e)))
                    return conn
                conn = _close(conn)
                if not fresh and attempt == 0:
                    continue  # stale after a restart; nothing was sent to commit
                self._fail(batch, UnavailableError(_one_line(e)))
                return None
            except _PartialWrite as e:
                self._fail(batch, errors.StorageError(str(e)))
                return conn if _rollback(conn) else _close(conn)
            except BaseException:
                _close(conn)
                raise
            try:
                conn.commit()
            except _CONNECTION_ERRORS as e:
                _close(conn)
                # Possibly committed after all: forget the batch's auth
                # changes and let the next look at the table decide.
                self._end_auth(committed=False)
                self._fail(batch, UnavailableError(f"the write may or may not have been applied: {_one_line(e)}"))
                return None
            self._end_auth(committed=True)
            self._after_commit(state)
            return conn
        return None

    def _write_puts(self, conn: psycopg.Connection | None, batch) -> psycopg.Connection | None:
        """A batch of plain puts: one ``put_many`` call (schema.py) in
        autocommit, so one round trip writes and commits them all; each is
        answered after the COMMIT, as in a batch of any other kind."""
        if conn is None:  # none yet, or _write_batch closed a dead one
            try:
                conn = self._connect_writer()
            except psycopg.Error as e:
                self._fail(batch, UnavailableError(_one_line(e)))
                return None
        refused: list = []
        puts: list = []
        for kind, req, fut in batch:
            try:
                if kind & AUTH_OFF_FLAG:
                    self._auth.check_still_off()
            except errors.MvccError as e:
                refused.append((fut, None, e))
            else:
                puts.append((fut, req))
        row = None
        if puts:
            try:
                conn.autocommit = True
                row = conn.execute(
                    _PUT_MANY, ([req.key for _, req in puts], [req.value for _, req in puts]), prepare=True,
                ).fetchone()
            except _CONNECTION_ERRORS as e:
                if conn.broken:
                    conn = _close(conn)
                    error = UnavailableError(f"the write may or may not have been applied: {_one_line(e)}")
                else:
                    # The statement failed (e.g. the revision lock timed out): nothing was written.
                    error = UnavailableError(_one_line(e))
                self._fail([(None, None, fut) for fut, _ in puts], error)
                for fut, _, err in refused:
                    fail(fut, err)
                return conn
            except BaseException:
                _close(conn)
                raise
        if row is None:
            state = _Batch(self.revision, self.revision, self._compact_rev, self._finished_compact_rev, self._alarms)
        else:
            begin, compact, alarms, create_revisions, versions = row
            state = _Batch(begin, begin, compact, self._finished_compact_rev,
                           {(_unsigned(m), a) for m, a in alarms})
            for i, (fut, req) in enumerate(puts):
                if create_revisions is None:
                    state.results.append((fut, None, errors.NoSpaceError()))
                    continue
                rev = begin + 1 + i
                state.changes.append((rev, [(False, kv_pb2.KeyValue(
                    key=req.key, create_revision=create_revisions[i], mod_revision=rev,
                    version=versions[i], value=req.value,
                ))]))
                resp = pb.PutResponse()
                resp.header.revision = rev
                state.results.append((fut, resp, None))
                state.current = rev
        state.results.extend(refused)
        self._after_commit(state)
        return conn

    def _apply_batch(self, conn: psycopg.Connection, batch) -> _Batch:
        try:
            return self._apply_batch_locked(conn, batch)
        except BaseException:
            self._end_auth(committed=False)
            raise

    def _apply_batch_locked(self, conn: psycopg.Connection, batch) -> _Batch:
        cur = conn.cursor()
        current, compact, finished, alarms = cur.execute(_LOCK_META).fetchone()
        state = _Batch(current, current, compact, finished, {(_unsigned(m), a) for m, a in alarms})
        if any(_touches_auth(kind) for kind, _, _ in batch):
            self._begin_auth(cur, state)
        for kind, req, fut in batch:
            state.view = None
            try:
                resp = self._apply(cur, state, kind, req)
            except errors.MvccError as e:
                if state.view is not None and state.view.changes:
                    raise _PartialWrite(f"a request failed after writing ({e}); the batch was rolled back") from e
                state.results.append((fut, None, e))
            else:
                state.results.append((fut, resp, None))
        if state.current != current or state.compact != compact:
            cur.execute("UPDATE meta SET revision = %s, compact_revision = %s", (state.current, state.compact))
        return state

    def _after_commit(self, state: _Batch) -> None:
        self._saw_compaction(state.compact)
        self._alarms = state.alarms
        if state.changes:
            # Watchers hear of a revision before its writer is answered.
            try:
                self._feed.deliver(state.changes, self._fill)
            except (errors.MvccError, psycopg.Error) as e:
                log.warning("watchers will get revisions %d-%d from the listener: %s",
                            state.changes[0][0], state.changes[-1][0], e)
        for job in state.jobs:
            with self._mu:
                self._compaction_queued += 1
            self._jobs.put(job)
        for fut, resp, err in state.results:
            if fut is None:
                continue
            if err is not None:
                fail(fut, err)
            elif isinstance(resp, _Deferred):
                resp.future.add_done_callback(_chain(fut))
            else:
                settle(fut, resp)

    def _fill(self, lo: int, hi: int) -> Changes:
        return self._pooled(lambda cur: read_changes(cur, lo, hi))

    def _fail(self, batch, err: BaseException) -> None:
        for _, _, fut in batch:
            if fut is not None and not fut.done():
                fail(fut, err)

    def _fail_queued(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None and item[2] is not None:
                fail(item[2], errors.StoppedError())

    def _apply(self, cur, state: _Batch, kind: int, req):
        """Apply one request inside the batch's transaction.

        As in the LMDB engine every check that can fail runs before the
        request's first write; _apply_batch refuses to commit if one did not.
        """
        if kind in (KIND_PUT, KIND_DELETE_RANGE, KIND_TXN, KIND_LEASE_REVOKE):
            view = state.view = WriteView(cur, state.current, state.compact)
            if kind == KIND_PUT:
                if state.has_alarm(pb.NOSPACE):
                    raise errors.NoSpaceError()
                resp = txnmod.apply_put(view, req)
            elif kind == KIND_DELETE_RANGE:
                resp = txnmod.execute_delete(view, req)
            elif kind == KIND_TXN:
                if state.has_alarm(pb.NOSPACE) and validate.txn_put_cost(req) > 0:
                    raise errors.NoSpaceError()
                resp = txnmod.apply_txn(view, req)
            else:
                resp = self._revoke(cur, view, req.ID)
            self._end(state, view)
            return resp
        if kind == KIND_COMPACT:
            return self._apply_compact(state, req)
        if kind == KIND_ALARM:
            return self._apply_alarm(cur, state, req)
        if kind == KIND_LEASE_GRANT:
            return self._apply_lease_grant(cur, state, req)
        if kind == KIND_LEASE_CHECKPOINT:
            # Expiry times are stored, not counted down in memory, so there
            # is no remaining TTL to record.
            resp = pb.LeaseCheckpointResponse()
            resp.header.revision = state.current
            return resp
        if kind == _EXPIRE:
            return self._expire(cur, state)
        if kind in AUTH_KINDS:
            resp = self._auth.apply_writes(kind, req, state.auth)
            resp.header.revision = state.current
            return resp
        if kind > 0 and kind & AUTHORIZED_FLAG:
            # The local auth state is the database's here (_begin_auth).
            self._auth.check_revision(req.revision)
            return self._apply(cur, state, kind & ~AUTHORIZED_FLAG, req.request)
        if kind > 0 and kind & AUTH_OFF_FLAG:
            self._auth.check_still_off()
            return self._apply(cur, state, kind & ~AUTH_OFF_FLAG, req)
        raise errors.StorageError(f"unknown request kind {kind}")

    # ------------------------------------------------------------------
    # auth

    @property
    def auth(self) -> AuthStore:
        """The auth store: state, password and permission checks."""
        return self._auth

    def _auth_view(self) -> AuthStore:
        """The auth store, up to date with the database (one round trip)."""
        self._check_open()
        self._refresh_auth()
        return self._auth

    def _refresh_auth(self) -> None:
        local = self._auth.generation

        def read(cur):
            return _read_auth(cur) if cur.execute(_AUTH_GENERATION).fetchone()[0] > local else None

        rows = self._pooled(read)
        if rows is not None:
            self._install_auth(rows)

    def _heard_auth(self, generation: int) -> None:
        """The change feed's news of an auth change (listener thread)."""
        if generation <= self._auth.generation or self._pool is None or self._closed:
            return
        try:
            self._refresh_auth()
        except (errors.MvccError, psycopg.Error) as e:
            # The next catch-up of the feed, or the next read, tries again.
            log.warning("could not reload the auth state: %s", _one_line(e))

    def _install_auth(self, rows: _AuthRows) -> None:
        """Install a committed auth state, unless ours is as new."""
        with self._auth_mu:
            if rows.generation > self._auth.generation:
                self._replace_auth(rows)

    def _replace_auth(self, rows: _AuthRows) -> None:
        # Held: _auth_mu.
        reenabled = rows.enabled_revision != self._auth_enabled_revision
        self._auth.reload(rows.enabled, rows.revision, rows.users, rows.roles, reenabled=reenabled)
        self._auth_enabled_revision = rows.enabled_revision

    def _begin_auth(self, cur, state: _Batch) -> None:
        """Writer thread, revision lock held: make the local auth state the
        database's and keep it until the batch ends (:meth:`_end_auth`).

        Every auth change takes the revision lock first, so what this reads
        now stays the database's auth state until this transaction ends; no
        lock on ``auth_meta`` itself is needed.  (READ COMMITTED: this
        statement, run after the lock was granted, sees every commit made
        before it.)
        """
        self._auth_mu.acquire()
        try:
            meta = cur.execute(_AUTH_META).fetchone()
            enabled, revision, enabled_revision = meta
            auth = self._auth
            if (2 * revision + enabled, enabled_revision) != (auth.generation, self._auth_enabled_revision):
                self._replace_auth(_read_auth(cur, meta))
        except BaseException:
            self._auth_mu.release()
            raise
        state.auth = _PgAuthWrites(cur)
        self._auth_batch = (self._auth.save(), state.auth)

    def _end_auth(self, *, committed: bool) -> None:
        """Writer thread: announce the batch's auth changes, or undo them
        if its transaction did not commit; let go of the auth state."""
        if self._auth_batch is None:
            return
        (saved, writes), self._auth_batch = self._auth_batch, None
        try:
            if committed:
                if writes.enabled_revision is not None:
                    self._auth_enabled_revision = writes.enabled_revision
                self._auth.committed()
            else:
                self._auth.rollback(saved)
        finally:
            self._auth_mu.release()

    def _end(self, state: _Batch, view: WriteView) -> None:
        if view.changes:
            state.current += 1
            state.changes.append((state.current, view.changes))

    # ------------------------------------------------------------------
    # compaction

    def _apply_compact(self, state: _Batch, req: pb.CompactionRequest):
        rev = req.revision
        if rev <= state.compact:
            raise errors.CompactedError()
        if rev > state.current:
            raise errors.FutureRevisionError()
        prev = state.compact
        prev_completed = state.finished == state.compact
        state.compact = rev
        resp = pb.CompactionResponse()
        resp.header.revision = state.current
        deferred = _Deferred(resp) if req.physical else None
        state.jobs.append((rev, prev, prev_completed, deferred))
        return deferred if deferred is not None else resp

    def _run_compaction(self, job) -> None:
        rev, prev, record_hash, deferred = job
        outcome = compaction.STOPPED
        try:
            with self._connect("compact") as conn:
                outcome = compaction.compact(
                    conn, rev, prev, record_hash,
                    batch_revisions=self.options.compaction_batch_limit,
                    pause=self.options.compaction_sleep,
                    stopping=self._stop.is_set,
                )
        except psycopg.Error as e:
            # Still scheduled in meta: a later tick (here or in another
            # process) resumes it.
            log.warning("compaction at revision %d interrupted: %s", rev, _one_line(e))
            if deferred is not None:
                fail(deferred.future, UnavailableError(_one_line(e)))
            deferred = None
        if outcome == compaction.BUSY and deferred is not None and not self._stop.is_set():
            # Another process is compacting; the caller waits for ours.
            self._stop.wait(0.05)
            self._jobs.put(job)
            return
        with self._mu:
            self._compaction_queued -= 1
        if deferred is not None:
            if outcome == compaction.STOPPED:
                fail(deferred.future, errors.StoppedError())
            else:
                settle(deferred.future, deferred.response)

    def compact(self, revision: int, *, physical: bool = False) -> pb.CompactionResponse:
        """Drop history before ``revision``; with ``physical`` wait until the
        rows are gone too."""
        return self.propose(KIND_COMPACT, pb.CompactionRequest(revision=revision, physical=physical)).result()

    # ------------------------------------------------------------------
    # alarms

    def _apply_alarm(self, cur, state: _Batch, req: pb.AlarmRequest):
        resp = pb.AlarmResponse()
        resp.header.revision = state.current
        if req.action == pb.AlarmRequest.GET:
            for mid, a in sorted(state.alarms):
                if req.alarm == pb.NONE or req.alarm == a:
                    resp.alarms.add(memberID=mid, alarm=a)
        elif req.action == pb.AlarmRequest.ACTIVATE:
            if req.alarm != pb.NONE:
                cur.execute(
                    "INSERT INTO alarm (member_id, alarm) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                    (_signed(req.memberID), req.alarm),
                )
                state.alarms = state.alarms | {(req.memberID, req.alarm)}
                resp.alarms.add(memberID=req.memberID, alarm=req.alarm)
        elif req.action == pb.AlarmRequest.DEACTIVATE:
            if (req.memberID, req.alarm) in state.alarms:
                cur.execute(
                    "DELETE FROM alarm WHERE member_id = %s AND alarm = %s", (_signed(req.memberID), req.alarm)
                )
                state.alarms = state.alarms - {(req.memberID, req.alarm)}
                resp.alarms.add(memberID=req.memberID, alarm=req.alarm)
        return resp

    def alarms(self) -> list[tuple[int, int]]:
        """Active alarms as (member ID, AlarmType) pairs."""
        return sorted(self._alarms)

    # ------------------------------------------------------------------
    # leases

    def _apply_lease_grant(self, cur, state: _Batch, req: pb.LeaseGrantRequest):
        if state.has_alarm(pb.NOSPACE):
            raise errors.NoSpaceError()
        if req.ID == 0:
            raise errors.LeaseNotFoundError()
        if req.TTL > MAX_LEASE_TTL:
            raise errors.LeaseTTLTooLargeError()
        ttl = max(req.TTL, self.options.min_lease_ttl)
        row = cur.execute(
            "INSERT INTO lease (id, ttl, last_keepalive, expires_at)"
            " VALUES (%s, %s, clock_timestamp(), clock_timestamp() + %s * interval '1 second')"
            " ON CONFLICT (id) DO NOTHING RETURNING id",
            (req.ID, ttl, ttl),
        ).fetchone()
        if row is None:
            raise errors.LeaseExistsError()
        resp = pb.LeaseGrantResponse(ID=req.ID, TTL=ttl)
        resp.header.revision = state.current
        return resp

    def _revoke(self, cur, view: WriteView, lease_id: int) -> pb.LeaseRevokeResponse:
        # Every attached key is deleted in this one write: one revision, one
        # sub revision per key in key order.
        if cur.execute("DELETE FROM lease WHERE id = %s RETURNING id", (lease_id,)).fetchone() is None:
            raise errors.LeaseNotFoundError()
        keys = sorted(k for (k,) in cur.execute("DELETE FROM key_lease WHERE lease = %s RETURNING key", (lease_id,)))
        view.delete_keys(keys)
        resp = pb.LeaseRevokeResponse()
        resp.header.revision = view.rev
        return resp

    def _expire(self, cur, state: _Batch) -> None:
        """Revoke expired leases, each in its own revision (§9.4).

        SKIP LOCKED passes over a lease whose keep-alive is being written
        right now: the keep-alive wins, as it would have a moment earlier.
        """
        ids = [lid for (lid,) in cur.execute(
            "SELECT id FROM lease WHERE expires_at <= clock_timestamp()"
            " ORDER BY expires_at LIMIT 500 FOR UPDATE SKIP LOCKED"
        )]
        for lid in ids:
            view = state.view = WriteView(cur, state.current, state.compact)
            self._revoke(cur, view, lid)
            self._end(state, view)
        if ids:
            log.info("revoked %d expired lease(s)", len(ids))

    def lease_grant(self, ttl: int, lease_id: int = 0) -> pb.LeaseGrantResponse:
        """Grant a lease of ``ttl`` seconds (raised to the minimum TTL);
        ``lease_id`` 0 picks a fresh positive ID."""
        return self.propose(KIND_LEASE_GRANT, self.new_lease_request(ttl, lease_id)).result()

    def lease_keepalive(self, lease_id: int) -> int:
        """Renew a lease; its TTL, or 0 if it does not exist or has expired.

        A lease that expired but is still being revoked answers 0 once the
        revoke is done (the UPDATE waits for the revoke's row lock).
        """

        def renew(cur):
            row = cur.execute(
                "UPDATE lease SET last_keepalive = clock_timestamp(),"
                " expires_at = clock_timestamp() + ttl * interval '1 second'"
                " WHERE id = %s AND expires_at > clock_timestamp() RETURNING ttl",
                (lease_id,),
            ).fetchone()
            return row[0] if row else 0

        return self._pooled(renew, read_only=False)

    def lease_ttl(self, lease_id: int, keys: bool = False) -> pb.LeaseTimeToLiveResponse:
        """etcd's LeaseTimeToLive; an unknown lease answers TTL -1."""

        def ttl(cur):
            resp = pb.LeaseTimeToLiveResponse(ID=lease_id)
            resp.header.revision = cur.execute("SELECT revision FROM meta").fetchone()[0]
            row = cur.execute(
                "SELECT ttl, extract(epoch FROM expires_at - clock_timestamp())::float8 FROM lease WHERE id = %s",
                (lease_id,),
            ).fetchone()
            if row is None:
                resp.TTL = -1
                return resp
            resp.grantedTTL, remaining = row
            resp.TTL = int(max(0.0, remaining))
            if keys:
                resp.keys.extend(
                    k for (k,) in cur.execute("SELECT key FROM key_lease WHERE lease = %s ORDER BY key", (lease_id,))
                )
            return resp

        return self._pooled(ttl)

    def leases(self) -> pb.LeaseLeasesResponse:
        """All lease IDs, soonest to expire first."""

        def list_leases(cur):
            resp = pb.LeaseLeasesResponse()
            resp.header.revision = cur.execute("SELECT revision FROM meta").fetchone()[0]
            for (lid,) in cur.execute("SELECT id FROM lease ORDER BY expires_at, id"):
                resp.leases.add(ID=lid)
            return resp

        return self._pooled(list_leases)

    def lease_revoke(self, lease_id: int) -> pb.LeaseRevokeResponse:
        """Revoke a lease, deleting its keys in one revision."""
        return self.propose(KIND_LEASE_REVOKE, pb.LeaseRevokeRequest(ID=lease_id)).result()

    # ------------------------------------------------------------------
    # background: lease expiry, sizes, compaction jobs

    def _run_background(self) -> None:
        """Lease expiry and cached sizes and alarms, every tick."""
        while not self._stop.wait(self.options.lease_expiry_tick):
            try:
                self._tick()
            except errors.StoppedError:
                pass  # PostgreSQL unavailable or closing; try again next tick
            except Exception:  # noqa: BLE001 - keep ticking; say why
                log.exception("background tick failed")

    def _run_compactor(self) -> None:
        """Compaction jobs, one at a time, on a thread of their own so that a
        long compaction never holds up lease expiry."""
        while True:
            job = self._jobs.get()
            if job is _WAKE or self._stop.is_set():
                break
            self._run_compaction(job)
        while True:  # answer physical compactions that will not run now
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not _WAKE and job[3] is not None:
                fail(job[3].future, errors.StoppedError())

    def _tick(self) -> None:
        pause = max(3 * self.options.lease_expiry_tick, 2.0)

        def tick(cur):
            row = cur.execute("SELECT heartbeat, clock_timestamp() FROM lessor FOR UPDATE SKIP LOCKED").fetchone()
            if row is not None:
                heartbeat, now = row
                if heartbeat is not None and (now - heartbeat).total_seconds() > pause:
                    # Nobody checked leases for a while (every server was
                    # down, or PostgreSQL was): that time does not count.
                    gap = now - heartbeat + datetime.timedelta(seconds=1)
                    n = cur.execute("UPDATE lease SET expires_at = expires_at + %s", (gap,)).rowcount
                    if n:
                        log.info("leases were unattended for %.1f s; extended %d lease(s)", gap.total_seconds(), n)
                cur.execute("UPDATE lessor SET heartbeat = %s", (now,))
            expired = cur.execute("SELECT EXISTS (SELECT 1 FROM lease WHERE expires_at <= clock_timestamp())").fetchone()[0]
            self._refresh(cur)
            return expired

        expired = self._pooled(tick, read_only=False)
        if expired and not self._expire_pending:
            self._expire_pending = True
            self._queue.put((_EXPIRE, None, None))
        with self._mu:
            resume = self._compaction_queued == 0 and self._finished_compact_rev < self._compact_rev
            if resume:
                self._compaction_queued += 1
        if resume:
            # Scheduled but not finished: its process died, or the job failed.
            self._jobs.put((self._compact_rev, self._finished_compact_rev, False, None))

    def _refresh(self, cur) -> None:
        _, compact, finished = cur.execute(
            "SELECT revision, compact_revision, finished_compact_revision FROM meta"
        ).fetchone()
        self._saw_compaction(compact)
        self._finished_compact_rev = finished
        self._alarms = {(_unsigned(m), a) for m, a in cur.execute("SELECT member_id, alarm FROM alarm")}
        self._db_size = cur.execute(_SIZE).fetchone()[0]

    # ------------------------------------------------------------------
    # watch

    def add_commit_listener(self, fn: Callable[[Changes], None]) -> None:
        """Call ``fn(changes)`` with every committed revision, in order and
        once, whichever process wrote it; ``changes`` is a list of
        (revision, [(is_delete, KeyValue), ...]).  ``fn`` must not block."""
        self._listeners.append(fn)

    def remove_commit_listener(self, fn: Callable[[Changes], None]) -> None:
        self._listeners.remove(fn)

    def _emit(self, changes: Changes) -> None:
        for fn in list(self._listeners):
            try:
                fn(changes)
            except Exception:  # noqa: BLE001 - a listener must not stop the feed
                log.exception("commit listener failed")

    @property
    def watch_hub(self):
        """The engine's WatchHub (created on first use)."""
        if self._watch_hub is None:
            from mvcckv.watch import WatchHub

            with self._mu:
                if self._watch_hub is None:
                    self._watch_hub = WatchHub(self)
        return self._watch_hub

    def prev_kv(self, key: bytes, revision: int) -> kv_pb2.KeyValue | None:
        """The KeyValue of ``key`` at ``revision`` if still known (watch prev_kv)."""
        try:
            return self.get_kv(key, revision)
        except (errors.CompactedError, errors.FutureRevisionError):
            return None
        except UnavailableError as e:
            log.warning("watch event of %r sent without prev_kv: %s", key, e)
            return None

    def read_changes(self, low: int, max_revisions: int):
        """Changes of revisions >= ``low`` from the table, for watch catch-up.

        Returns ``(changes, current, upto)`` as the LMDB engine does.
        """

        def read(cur):
            current = cur.execute("SELECT revision FROM meta").fetchone()[0]
            upto = min(current, max(low, 1) + max_revisions - 1)
            return read_changes(cur, max(low, 1), upto), current, upto

        try:
            return self._pooled(read)
        except UnavailableError as e:
            # Not a StoppedError to the watch hub: its catch-up pass must
            # fail and be retried, not end.
            raise ConnectionError(str(e)) from None

    # ------------------------------------------------------------------
    # maintenance

    def hash_kv(self, revision: int = 0) -> tuple[KeyValueHash, int]:
        """etcd's HashKV: (hash of history up to revision, current revision)."""

        def hash_kv(cur):
            current, compact = cur.execute("SELECT revision, compact_revision FROM meta").fetchone()
            if 0 < revision < compact:
                raise errors.CompactedError()
            if revision > current:
                raise errors.FutureRevisionError()
            return compaction.hash_kv(cur.connection, compact, revision, current), current

        return self._pooled(hash_kv)

    def hash(self) -> tuple[int, int]:
        """CRC-32C over the schema's tables (name, then each row as a key and
        a value), like the LMDB engine's Hash.  Implementation-specific: it
        matches another PostgreSQL engine with the same contents."""

        def hash_all(cur):
            current = cur.execute("SELECT revision FROM meta").fetchone()[0]
            h = crc32c.crc32c(b"alarm")
            for mid, alarm in cur.execute("SELECT member_id, alarm FROM alarm ORDER BY member_id, alarm"):
                h = crc32c.crc32c(pb.AlarmMember(memberID=_unsigned(mid), alarm=alarm).SerializeToString(), h)
            h = crc32c.crc32c(b"config", h)
            with cur.connection.cursor(name="mvcckv_hash_all") as rows:
                rows.itersize = 2000
                rows.execute(
                    "SELECT revision, sub, tombstone, key, value, create_revision, version, lease"
                    " FROM config ORDER BY revision, sub"
                )
                for row in rows:
                    k, v = compaction.entry(row)
                    h = crc32c.crc32c(v, crc32c.crc32c(k, h))
            h = crc32c.crc32c(b"lease", h)
            for lid, ttl in cur.execute("SELECT id, ttl FROM lease ORDER BY id"):
                h = crc32c.crc32c(lease_pb2.Lease(ID=lid, TTL=ttl).SerializeToString(), crc32c.crc32c(lease_key(lid), h))
            return h, current

        return self._pooled(hash_all)

    def status(self) -> StoreStatus:
        def status(cur):
            revision, compact = cur.execute("SELECT revision, compact_revision FROM meta").fetchone()
            _, keys = range_at(cur, b"\0", b"\0", revision, 0, True)
            size = cur.execute(_SIZE).fetchone()[0]
            # raft_index / applied_index: the revision is this engine's log position.
            return StoreStatus(revision, compact, size, size, keys, revision, revision)

        return self._pooled(status)

    def defrag(self) -> tuple[int, int]:
        """VACUUM the schema's tables; (size before, size after).

        Plain VACUUM, not VACUUM FULL: it makes the space of deleted rows
        reusable while reads and writes go on (FULL would lock every table
        for the whole rewrite).
        """
        self._check_open()
        try:
            with self._connect("defrag") as conn:
                before = conn.execute(_SIZE).fetchone()[0]
                for table in ("config", "key_lease", "lease", "meta", "lessor", "alarm", "compaction_hash",
                              "auth_meta", "auth_user", "auth_role"):
                    conn.execute(f"VACUUM (ANALYZE) {table}")
                return before, conn.execute(_SIZE).fetchone()[0]
        except _CONNECTION_ERRORS as e:
            raise UnavailableError(_one_line(e)) from None

    def snapshot(self, target) -> int:
        """Write a snapshot in etcd's format (bbolt file and SHA-256) of
        the schema to ``target``, a path or a binary file; returns the
        bytes written.  One repeatable-read transaction is copied into a
        scratch LMDB backend in the LMDB engine's layout first, then that
        is written out (``mvcckv.etcdfile``).  Leases keep their remaining
        TTL."""

        def copy(cur):
            with tempfile.TemporaryDirectory(prefix="mvcckv-pg-snapshot-", dir=self.path) as tmp:
                backend = Backend(tmp, quota_bytes=0)
                try:
                    _copy_to_backend(cur, backend)
                    with backend.begin_read() as txn:
                        return etcdfile.save(target, etcdfile.lmdb_source(txn, backend.dbs), tmp_dir=tmp)
                finally:
                    backend.close()

        return self._pooled(copy)

    def identity(self, cluster_id: int, member_id: int) -> tuple[int, int]:
        """The schema's (cluster ID, member ID), recording these on first use."""
        cid, mid = self._pooled(
            lambda cur: cur.execute(
                "UPDATE meta SET cluster_id = coalesce(cluster_id, %s), member_id = coalesce(member_id, %s)"
                " RETURNING cluster_id, member_id",
                (_signed(cluster_id), _signed(member_id)),
            ).fetchone(),
            read_only=False,
        )
        return _unsigned(cid), _unsigned(mid)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._watch_hub is not None:
            self._watch_hub.close()
        self._queue.put(None)
        self._writer.join()
        self._stop.set()
        self._jobs.put(_WAKE)
        self._background.join()
        self._compactor.join()
        self._feed.stop()
        self._aio.close()
        self._pool.close()

    def __enter__(self) -> "PgEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------
    # the embedded API: the LMDB store's methods, which only propose and
    # read through the engine contract, so both engines offer the same one.

    put = Store.put
    get = Store.get
    range = Store.range
    delete = Store.delete
    txn = Store.txn
    alarm = Store.alarm
    watch = Store.watch


def _copy_to_backend(cur, backend: Backend) -> None:
    revision, compact, finished = cur.execute(
        "SELECT revision, compact_revision, finished_compact_revision FROM meta"
    ).fetchone()
    with cur.connection.cursor(name="mvcckv_snapshot") as rows:
        rows.itersize = 2000
        rows.execute(
            "SELECT revision, sub, tombstone, key, value, create_revision, version, lease"
            " FROM config ORDER BY revision, sub"
        )
        batch: list[tuple[bytes, bytes]] = []
        for row in rows:
            batch.append(compaction.entry(row))
            if len(batch) >= 10000:
                _put_all(backend, backend.key_db, batch)
                batch = []
        _put_all(backend, backend.key_db, batch)
    leases = [
        (lease_key(lid), lease_pb2.Lease(ID=lid, TTL=ttl, RemainingTTL=max(1, int(-(-remaining // 1)))).SerializeToString())
        for lid, ttl, remaining in cur.execute(
            "SELECT id, ttl, extract(epoch FROM expires_at - clock_timestamp())::float8 FROM lease"
        )
    ]
    _put_all(backend, backend.dbs[LEASE], leases)
    alarms = [
        (pb.AlarmMember(memberID=_unsigned(m), alarm=a).SerializeToString(), b"")
        for m, a in cur.execute("SELECT member_id, alarm FROM alarm")
    ]
    _put_all(backend, backend.dbs[ALARM], alarms)
    meta = []
    if compact >= 0:
        meta.append((META_SCHEDULED_COMPACT, to_bytes((compact, 0))))
    if finished >= 0:
        meta.append((META_FINISHED_COMPACT, to_bytes((finished, 0))))
    _put_all(backend, backend.meta_db, meta)
    enabled, auth_revision = cur.execute("SELECT enabled, revision FROM auth_meta").fetchone()
    _put_all(backend, backend.dbs[AUTH], [
        (ENABLED_KEY, b"\x01" if enabled else b"\x00"), (REVISION_KEY, encode_u64(auth_revision)),
    ])
    for table, db in (("auth_user", AUTH_USERS), ("auth_role", AUTH_ROLES)):
        _put_all(backend, backend.dbs[db], [
            (bytes(name), bytes(data)) for name, data in cur.execute(f"SELECT name, data FROM {table}")
        ])


def _put_all(backend: Backend, db, items: list[tuple[bytes, bytes]]) -> None:
    if items:
        with backend.begin_write() as txn:
            for k, v in items:
                txn.put(k, v, db=db)


def _chain(caller: Future):
    def done(f: Future) -> None:
        if f.exception() is not None:
            fail(caller, f.exception())
        else:
            settle(caller, f.result())

    return done


def _rollback(conn: psycopg.Connection) -> bool:
    """Roll back; False if the connection died doing it."""
    try:
        conn.rollback()
    except _CONNECTION_ERRORS:
        return False
    return True


def _close(conn: psycopg.Connection | None) -> None:
    if conn is not None:
        conn.close()
    return None


def _gone(conn: psycopg.Connection | None) -> bool:
    """Whether the writer's idle connection is closed or on its way out.

    An idle connection of the writer's expects nothing from the server (it
    does not LISTEN), so a readable socket means the server sent what it
    sends before it goes away: a FATAL "terminating connection" on a fast
    shutdown, or end of file after a crash.  Finding that out before a
    write is what lets the write go out on a fresh connection: sent on the
    dead one, its fate could not be told (an autocommit ``put_many``
    commits with the statement).  A needless reconnect (the server reports
    a setting changed by a reload) costs one connection, nothing more.
    """
    if conn is None or conn.closed:
        return True
    try:
        readable, _, _ = select.select([conn.fileno()], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def _one_line(e: BaseException | None) -> str:
    return " ".join(str(e).split()) if e is not None else ""


def schema_of(dsn: str, default: str = PgOptions.schema) -> str:
    """The schema a connection string names with ``options=-c search_path=...``
    (its first entry), else ``default``.

    >>> schema_of("postgresql://u@h/db?options=-csearch_path%3Detcd1")
    'etcd1'
    >>> schema_of("host=/tmp dbname=db")
    'mvcckv'
    """
    try:
        options = conninfo_to_dict(dsn).get("options") or ""
    except psycopg.ProgrammingError:
        return default
    found = default
    for m in re.finditer(r"(?:-c\s*|--)search_path\s*=\s*([^\s,]+)", options):
        found = m.group(1).strip('"')
    return found


def describe_dsn(dsn: str) -> str:
    """The connection string without its password, for messages."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<invalid connection string>"
    shown = [f"{k}={params[k]}" for k in ("host", "port", "dbname", "user") if params.get(k)]
    return " ".join(shown) or "the default PostgreSQL server"

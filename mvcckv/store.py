"""The MVCC store: one writer applying logged requests, many readers.

Write path (group commit)::

    caller threads ──propose()──► queue ──► writer thread:
                                              append every queued request to the WAL
                                              one fsync for the whole batch
                                              apply each request in order
                                                (index + one LMDB write txn)
                                              commit (with consistent_index)
                                              resolve the callers' futures

A request is validated before it is queued (a bad request never reaches
the WAL) and acknowledged only after its record is on disk and applied.
The WAL holds requests, not results; applying is deterministic, so a
replay after a crash reproduces the same revisions and the same hash.

Read path: a reader takes ``_lock`` (held by the writer only while it
applies, never while it fsyncs), looks the revisions up in the treeIndex
and reads their values from LMDB, both at the published revision.

Locks, always taken in this order:

* ``_checkpoint_lock`` — one checkpoint at a time, none during a defrag
  (its fsync runs outside the locks below).
* ``_wlock``    — the one LMDB writer: the writer thread's apply, the
  compactor's delete batches, defrag.
* ``_swap_lock`` — keeps the LMDB environment from being swapped (defrag)
  under a long read (snapshot, hash) or a checkpoint.
* ``_lock``     — index and published state (revision, compact revision).

Auth (``auth.py``) rides the same path: its changes are logged requests
applied in the batch's LMDB transaction.  A request the server authorized
carries the auth revision it was checked at; the writer refuses it if auth
has changed since (etcd's check in its applier), and the WAL records that
revision with it, so replay refuses the same requests.

Compaction (§7): the Compact request sets the compact revision at apply
time (reads below it fail from then on) and persists it as scheduled; a
background thread then compacts the index in chunks and deletes the dead
backend entries in batches, so writers are never paused for more than one
chunk or batch.  An interrupted compaction resumes on open.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import secrets
import struct
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import BinaryIO, Callable

import crc32c
import lmdb
from google.protobuf.message import DecodeError

from mvcckv import errors, etcdfile, txn as txnmod, validate
from mvcckv.txn import read_revision
from mvcckv.admission import (
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_MAX_TXN_OPS,
    Admission,
)
from mvcckv.auth import AuthAdmin, AuthStore
from mvcckv.backend import (
    ALARM,
    DEFAULT_QUOTA,
    LEASE,
    META_CLUSTER_ID,
    META_CONSISTENT_INDEX,
    META_FINISHED_COMPACT,
    META_MEMBER_ID,
    META_SCHEDULED_COMPACT,
    Backend,
    decode_u64,
    encode_u64,
)
from mvcckv.hash import HASH_HISTORY, KeyValueHash, KVHasher
from mvcckv.index import PACKED_SUB_BITS, PACKED_SUB_MASK, RevisionNotFoundError, TreeIndex
from mvcckv.kv import (
    AUTH_KINDS,
    AUTH_REQUEST_TYPES,
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
from mvcckv.lease import DEFAULT_MIN_TTL, Lessor, lease_key
from mvcckv.pb import kv_pb2
from mvcckv.pb import rpc_pb2 as pb
from mvcckv.revision import REV_BYTES_LEN, from_bytes, main_prefix, to_bytes
from mvcckv.stats import EngineStats
from mvcckv.wal import WAL

log = logging.getLogger("mvcckv.store")

# WAL record types are the proposal kinds of the engine contract (kv.py).
_REQUEST_TYPES = {
    KIND_PUT: pb.PutRequest,
    KIND_DELETE_RANGE: pb.DeleteRangeRequest,
    KIND_TXN: pb.TxnRequest,
    KIND_COMPACT: pb.CompactionRequest,
    KIND_ALARM: pb.AlarmRequest,
    KIND_LEASE_GRANT: pb.LeaseGrantRequest,
    KIND_LEASE_REVOKE: pb.LeaseRevokeRequest,
    KIND_LEASE_CHECKPOINT: pb.LeaseCheckpointRequest,
    **AUTH_REQUEST_TYPES,
}


def _authorized_decoder(parse):
    def decode(payload: bytes) -> Authorized:
        return Authorized(decode_u64(payload[:8]), parse(payload[8:]))

    return decode


# WAL record type -> parser of its payload.
_DECODERS = {kind: cls.FromString for kind, cls in _REQUEST_TYPES.items()}
_DECODERS.update({kind | AUTHORIZED_FLAG: _authorized_decoder(cls.FromString) for kind, cls in _REQUEST_TYPES.items()})
_DECODERS.update({kind | AUTH_OFF_FLAG: cls.FromString for kind, cls in _REQUEST_TYPES.items()})


# LMDB errors that mean the file is damaged (not, say, a lock held elsewhere).
_LMDB_DAMAGE = (
    lmdb.CorruptedError, lmdb.InvalidError, lmdb.PageNotFoundError,
    lmdb.VersionMismatchError, lmdb.PanicError, lmdb.BadTxnError,
)
_REPAIR_HINT = "`mvcckv repair --data-dir {0}` rebuilds it from the WAL (or from a snapshot plus the WAL)"
_MAX_BATCH = 512
# What a NOSPACE alarm refuses (etcd's capped applier): writes that take space.
_SPACE_TAKING = frozenset((KIND_PUT, KIND_TXN, KIND_LEASE_GRANT))
_WORK = 0  # queue item kind: a callable run on the writer thread


@dataclass(frozen=True)
class Options:
    quota_bytes: int = DEFAULT_QUOTA
    max_txn_ops: int = DEFAULT_MAX_TXN_OPS
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    # Turning fsync off trades durability for speed (etcd's
    # --unsafe-no-fsync); only for tests and benchmarks.
    fsync: bool = True
    wal_segment_bytes: int = 64 * 1024 * 1024
    # WAL segments kept after a checkpoint covers them (etcd's --max-wals),
    # so that `mvcckv repair --from-snapshot` can combine a snapshot older
    # than the last checkpoint with the WAL.  Each costs its bytes on disk
    # and a CRC check of them at every open.
    wal_kept_segments: int = 0
    compaction_batch_limit: int = 1000
    compaction_sleep: float = 0.01
    index_compaction_chunk: int = 10000
    # How often the backend is synced and the WAL it covers released.  A
    # checkpoint pins its state, so LMDB cannot reuse pages freed until the
    # next one: longer intervals grow the file (at 16 writers, 5 s grew a
    # 4 MB database to ~60 MB and cost throughput; 0.5 s: ~20 MB, as fast
    # as the unpinned design) for 3 fsyncs per checkpoint saved.
    checkpoint_interval: float = 0.5
    member_id: int = 0
    min_lease_ttl: int = DEFAULT_MIN_TTL
    # How often expired leases are looked for, and after how long a revoke
    # that has not been applied is asked for again (etcd: 500 ms, 7 s).
    lease_expiry_tick: float = 0.5
    lease_revoke_retry: float = 7.0
    # How often aged leases record their remaining TTL, so a restart resumes
    # their countdown instead of granting a full TTL again.
    lease_checkpoint_interval: float = 300.0
    # Bcrypt cost of password hashes (etcd's --bcrypt-cost).
    bcrypt_cost: int = 10


@dataclass(frozen=True)
class StoreStatus:
    revision: int
    compact_revision: int
    db_size: int
    db_size_in_use: int
    keys: int
    raft_index: int
    applied_index: int


class _ReadView:
    """A consistent read of the store at one revision (see txn.py)."""

    __slots__ = ("_store", "_txn", "begin_rev", "first_rev", "ranges", "puts", "deletes")

    def __init__(self, store: "Store", txn, rev: int, first_rev: int):
        self._store = store
        self._txn = txn
        self.begin_rev = rev
        self.first_rev = first_rev
        # Operations, for the store's stats (mvcckv.stats).
        self.ranges = self.puts = self.deletes = 0

    @property
    def rev(self) -> int:
        return self.begin_rev

    def range_keys(self, key: bytes, end: bytes, at_rev: int, limit: int, count_only: bool):
        """(kvs, count, header revision) of keys in range at ``at_rev``."""
        raw, count, cur = self.range_raw(key, end, at_rev, limit, count_only)
        return [_parse_kv(v) for v in raw], count, cur

    def range_raw(self, key: bytes, end: bytes, at_rev: int, limit: int, count_only: bool):
        """``range_keys`` with each KeyValue as its stored bytes."""
        self.ranges += 1
        cur = self.rev
        rev = read_revision(cur, at_rev, self.first_rev)
        index = self._store._index
        if not end:
            # A single key: one index lookup instead of a range scan (the
            # most common request of all).
            try:
                mod, _, _ = index.get(key, rev)
            except RevisionNotFoundError:
                return [], 0, cur
            if count_only:
                return [], 1, cur
            return [self._txn.get(to_bytes(mod), db=self._store._backend.key_db)], 1, cur
        if count_only:
            return [], index.range_count(key, end, rev), cur
        packed, total = index.range_packed(key, end, rev, limit)
        if not packed:
            return [], total, cur
        # Keys packed here, without to_bytes' checks: the index only holds
        # valid revisions, and these loops are most of a long range's cost;
        # one getmulti reads them all in one call into LMDB.
        pack = _REV_KEY.pack
        keys = [pack(p >> PACKED_SUB_BITS, b"_", p & PACKED_SUB_MASK) for p in packed]
        found = self._txn.cursor(db=self._store._backend.key_db).getmulti(keys)
        if len(found) != len(keys):
            raise errors.StorageError("the index names a revision the backend does not hold")
        return [value for _, value in found], total, cur

    def lease_exists(self, lease_id: int) -> bool:
        return self._store._lease_exists(lease_id)


class _WriteView(_ReadView):
    """A write transaction: one new main revision if anything changes."""

    __slots__ = ("changes",)

    def __init__(self, store: "Store", txn):
        super().__init__(store, txn, store._current, store._compact_rev)
        self.changes: list[tuple[bool, kv_pb2.KeyValue]] = []

    @property
    def rev(self) -> int:
        return self.begin_rev + 1 if self.changes else self.begin_rev

    def put(self, key: bytes, value: bytes, lease: int) -> int:
        store = self._store
        self.puts += 1
        store.stats.put_bytes += len(key) + len(value)
        rev = self.begin_rev + 1
        try:
            _, created, ver = store._index.get(key, rev)
            create_rev = created.main
            old_lease = store._lessor.lease_of(key)
        except RevisionNotFoundError:
            create_rev, ver, old_lease = rev, 0, 0
            store._live_keys += 1
        sub = len(self.changes)
        kv = kv_pb2.KeyValue(
            key=key, create_revision=create_rev, mod_revision=rev, version=ver + 1, value=value, lease=lease
        )
        self._txn.put(to_bytes((rev, sub)), kv.SerializeToString(), db=store._backend.key_db)
        store._index.put(key, rev, sub)
        self.changes.append((False, kv))
        if old_lease != lease:
            if old_lease:
                store._lessor.detach(key)
            if lease:
                store._lessor.attach(lease, key)
        return rev

    def delete_range(self, key: bytes, end: bytes) -> tuple[int, int]:
        self.deletes += 1
        keys, _, _ = self._store._index.range(key, end, self.rev, 0)
        for k in keys:
            self._delete(k)
        if keys or self.changes:
            return len(keys), self.begin_rev + 1
        return 0, self.begin_rev

    def _delete(self, key: bytes) -> None:
        store = self._store
        rev = self.begin_rev + 1
        sub = len(self.changes)
        self._txn.put(
            to_bytes((rev, sub), tombstone=True),
            kv_pb2.KeyValue(key=key).SerializeToString(),
            db=store._backend.key_db,
        )
        store._index.tombstone(key, rev, sub)
        store._live_keys -= 1
        store._lessor.detach(key)
        # Watchers see a DELETE carrying the key and the deletion revision.
        self.changes.append((True, kv_pb2.KeyValue(key=key, mod_revision=rev)))

    def end(self) -> None:
        if self.changes:
            self._store._current = self.begin_rev + 1


class Store(Admission, AuthAdmin):
    """An etcd-semantics MVCC key-value store in a data directory.

    Thread-safe.  Use :func:`mvcckv.open` for the public constructor.
    """

    # Reads come from memory and the page cache (the engine contract, kv.py).
    reads_may_block = False

    def __init__(self, path: str, options: Options | None = None):
        self.path = os.path.abspath(path)
        self.options = options or Options()
        os.makedirs(self.path, exist_ok=True)
        self._checkpoint_lock = threading.Lock()
        self._wlock = threading.Lock()
        self._swap_lock = threading.Lock()
        # Held while a snapshot reads the backend: a defrag, which swaps the
        # environment under open transactions, waits for it instead of
        # Status and HashKV waiting for the whole snapshot on _swap_lock.
        self._snapshot_lock = threading.Lock()
        self._lock = threading.Lock()
        self._closed = False
        self._fatal: BaseException | None = None
        self._hashes: list[KeyValueHash] = []
        # SimpleQueue: the writer's hand-off is on every write's path and
        # SimpleQueue's put/get cost a fraction of Queue's (bench_store put1).
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._jobs: queue.Queue = queue.Queue()
        self._alarms: set[tuple[int, int]] = set()
        self.stats = EngineStats()
        # A NOSPACE alarm raised by a full WAL (in memory only, see _log_batch).
        self._wal_full = False
        try:
            self._backend = Backend(os.path.join(self.path, "db"), quota_bytes=self.options.quota_bytes)
        except _LMDB_DAMAGE as e:
            raise errors.BackendCorruptError(f"backend in {self.path}/db is damaged ({e!r}); {_REPAIR_HINT.format(self.path)}") from e
        except errors.BackendCorruptError as e:
            raise errors.BackendCorruptError(f"{e}; {_REPAIR_HINT.format(self.path)}") from e
        self._index = TreeIndex()
        self._lessor = Lessor(min_ttl=self.options.min_lease_ttl)
        self._listeners: list[Callable[[list], None]] = []
        self._watch_hub = None
        self._current = 1
        self._compact_rev = -1
        self._scheduled_compact_rev = -1
        self._live_keys = 0
        self._applied_index = 0
        self._db_size = 0
        # WAL records up to _durable_index are known to be in an fsynced
        # backend and may be released.  What the backend holds at open may
        # still be only in the page cache (the last process was killed), so
        # nothing counts as durable until this process's first checkpoint.
        self._durable_index = 0
        self._released_index = 0
        self._last_checkpoint = 0.0
        self._auth = AuthStore(bcrypt_cost=self.options.bcrypt_cost, kv_revision=lambda: self._current)
        try:
            self._restore()
        except (*_LMDB_DAMAGE, struct.error, ValueError, DecodeError) as e:
            # Damage inside the tree (the meta pages were checked before
            # LMDB mapped the file): a page of the wrong type, a value that
            # does not parse.
            self._backend.close(checkpoint=False)
            raise errors.BackendCorruptError(
                f"backend {self._backend.data_file} is damaged ({e!r}); {_REPAIR_HINT.format(self.path)}"
            ) from e
        self._db_size = self._backend.size()
        try:
            self._wal = WAL.open(
                os.path.join(self.path, "wal"),
                first_index=self._applied_index + 1,
                segment_bytes=self.options.wal_segment_bytes,
                fsync=self.options.fsync,
            )
        except BaseException:
            self._backend.close(checkpoint=False)
            raise
        try:
            self._replay()
        except BaseException:
            # Nothing synced or released: the next open starts over.
            self._wal.close()
            self._backend.close(checkpoint=False)
            raise
        self._lessor.promote()
        self._writer = threading.Thread(target=self._run_writer, name="mvcckv-writer", daemon=True)
        self._background = threading.Thread(target=self._run_background, name="mvcckv-background", daemon=True)
        self._writer.start()
        self._background.start()
        if self._scheduled_compact_rev > self._finished_compact_rev:
            log.info("resuming interrupted compaction at revision %d", self._scheduled_compact_rev)
            self._jobs.put(("compact", self._scheduled_compact_rev, self._finished_compact_rev, False, None))

    # ------------------------------------------------------------------
    # opening: rebuild the index from the backend, then replay the WAL

    def _restore(self) -> None:
        be = self._backend
        with be.begin_read() as txn:
            ci = txn.get(META_CONSISTENT_INDEX, db=be.meta_db)
            self._applied_index = decode_u64(ci) if ci else 0
            sched = txn.get(META_SCHEDULED_COMPACT, db=be.meta_db)
            fin = txn.get(META_FINISHED_COMPACT, db=be.meta_db)
            self._scheduled_compact_rev = from_bytes(sched).main if sched else -1
            self._finished_compact_rev = from_bytes(fin).main if fin else -1
            # An interrupted compaction was acknowledged: reads below it must
            # keep failing while it is resumed (etcd re-schedules it, which
            # sets its compact revision to the scheduled one).
            self._compact_rev = max(self._finished_compact_rev, self._scheduled_compact_rev)
            current = 1
            parse = kv_pb2.KeyValue.FromString
            unpack = _REV_KEY.unpack_from
            key_lease: dict[bytes, int] = {}
            k = None
            with self._index.bulk_restore() as restore:
                for k, v in txn.cursor(db=be.key_db):
                    main, _, sub = unpack(k)
                    kv = parse(v)
                    tomb = len(k) > REV_BYTES_LEN
                    try:
                        restore(kv.key, main, sub, tomb, kv.create_revision, kv.version)
                    except RevisionNotFoundError:
                        # A tombstone for a key that is not live: the backend
                        # is inconsistent; etcd logs it and carries on.
                        log.error("tombstone at %d.%d for non-live key %r ignored", main, sub, kv.key)
                    # A key's lease is the one its newest revision carries.
                    if tomb or not kv.lease:
                        if key_lease:
                            key_lease.pop(kv.key, None)
                    else:
                        key_lease[kv.key] = kv.lease
                # Entries come in revision order: the last one is the newest.
                if k is not None:
                    current = max(current, unpack(k)[0])
            stored = [v for _, v in txn.cursor(db=be.dbs[LEASE])]
            for key in self._lessor.recover(stored, key_lease):
                log.warning("key %r is attached to an unknown lease; left unattached", key)
            for k, _ in txn.cursor(db=be.dbs[ALARM]):
                am = pb.AlarmMember.FromString(k)
                self._alarms.add((am.memberID, am.alarm))
            self._auth.recover(txn, be.dbs)
        # Compaction may have removed the newest revisions (a tombstone);
        # the revision must never go backwards.
        self._current = max(current, self._finished_compact_rev, self._scheduled_compact_rev)
        self._live_keys = self._index.range_count(b"\0", b"\0", self._current)

    def _replay(self) -> None:
        batch = []
        for index, kind, payload in self._wal.replay(self._applied_index):
            batch.append((index, kind, payload))
            if len(batch) >= _MAX_BATCH:
                self._apply_logged(batch)
                batch = []
        if batch:
            self._apply_logged(batch)

    def _apply_logged(self, batch) -> None:
        with self._wlock:
            txn = self._backend.begin_write()
            with self._lock:
                for index, kind, payload in batch:
                    try:
                        self._apply(txn, kind, _DECODERS[kind](payload))
                    except errors.MvccError:
                        pass  # it failed the same way when first applied
                txn.put(META_CONSISTENT_INDEX, encode_u64(batch[-1][0]), db=self._backend.meta_db)
                txn.commit()
                self._applied_index = batch[-1][0]
        self._after_commit([])

    # ------------------------------------------------------------------
    # writes

    def propose(self, kind: int, req, auth_revision: int = 0, data: bytes | None = None) -> Future:
        """Admit and queue a logged request; the future resolves to its response.

        Raises the request's error at once when it fails a static check
        (see ``admission.py``, also for requests over the space quota).
        A positive ``auth_revision`` is the auth revision the server checked
        the request's permissions at: if auth is on and has changed since
        when the request is applied, it fails with AuthOldRevisionError.
        ``AUTH_OFF`` says the server let it through with auth off: if auth
        is on when it is applied, it fails with UserEmptyError.
        UserAdd and UserChangePassword must come through
        ``AuthStore.prepare`` (no plain-text password is ever logged).
        ``data``: as in ``propose_on_loop``.
        """
        fut: Future = Future()
        refused = self._queue_request(kind, req, auth_revision, fut, data)
        return fut if refused is None else refused

    def propose_on_loop(self, kind: int, req, auth_revision: int = 0, data: bytes | None = None):
        """``propose`` for a caller on an asyncio event loop: returns an
        asyncio future of that loop, resolved together with every other
        future of its batch in one wake-up of the loop (``_answer``),
        instead of one cross-thread wake-up per request.

        ``data``, when given, is the request as it arrived on the wire: it
        is logged as is instead of serializing ``req`` again (the WAL holds
        request bytes, and these parse back to ``req``).
        """
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        refused = self._queue_request(kind, req, auth_revision, fut, data)
        return fut if refused is None else asyncio.wrap_future(refused, loop=loop)

    def _queue_request(self, kind: int, req, auth_revision: int, fut, data: bytes | None) -> Future | None:
        """Admit ``req`` and queue it with ``fut``; a refusal future when it
        is over the space quota (then nothing is queued)."""
        self._check_open()
        if self._wal_full and kind in _SPACE_TAKING:
            # The alarm raised by a full WAL is not logged (it could not
            # be), so what it refuses must not be logged either, or replay
            # without the alarm would apply it.
            refused: Future = Future()
            fail(refused, errors.NoSpaceError())
            return refused
        refused = self._admit(kind, req)
        if refused is not None:
            return refused
        if kind in PASSWORD_KINDS and req.password:
            raise ValueError("a password must be hashed (AuthStore.prepare) before the request is proposed")
        if data is None:
            data = req.SerializeToString()
        self._check_size(len(data))
        if auth_revision > 0:
            logged = encode_u64(auth_revision) + data
            self._queue.put((kind | AUTHORIZED_FLAG, logged, Authorized(auth_revision, req), fut))
        elif auth_revision == AUTH_OFF:
            self._queue.put((kind | AUTH_OFF_FLAG, data, req, fut))
        else:
            self._queue.put((kind, data, req, fut))
        return None

    @property
    def pending_proposals(self) -> int:
        """Requests queued for the writer (etcd_server_proposals_pending)."""
        return self._queue.qsize()

    def _check_open(self) -> None:
        if self._fatal is not None:
            raise errors.StoppedError(f"etcdserver: server stopped: {self._fatal}")
        if self._closed:
            raise errors.StoppedError()

    def _run_writer(self) -> None:
        while True:
            batch, stop = take_batch(self._queue, _MAX_BATCH)
            if not batch:
                return
            try:
                self._write_batch(batch)
            except BaseException as e:  # noqa: BLE001 - the store must stop, not limp on
                log.exception("writer failed; the store stops accepting writes")
                self._fatal = e
                self._answer([(fut, None, errors.StoppedError()) for _, _, _, fut in batch])
                self._drain_failed()
                return
            if stop:
                return

    def _drain_failed(self) -> None:
        failed = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                failed.append((item[3], None, errors.StoppedError()))
        self._answer(failed)

    def _log_batch(self, batch) -> list:
        """Append the batch's requests to the WAL and make them durable with
        one fsync; returns ``(index, kind, request, future)`` for each.

        A full disk refuses the whole batch (the WAL is cut back to its last
        synced record, so none of it can come back on replay) and raises the
        NOSPACE alarm in memory: puts, txns and lease grants are refused
        before they are logged from then on, reads go on, and disarming the
        alarm once there is space again (a logged request like any other)
        resumes writes.  The alarm cannot be logged while the log itself is
        full, so it does not survive a restart; the next full disk raises
        it again.
        """
        logged = []
        try:
            for kind, data, req, fut in batch:
                if kind != _WORK:
                    logged.append((self._wal.append(kind, data), kind, req, fut))
            if logged:
                started = time.perf_counter()
                self._wal.sync()
                self.stats.wal_fsync.observe(time.perf_counter() - started)
        except errors.WALNoSpaceError as e:
            log.error("%s; raising the NOSPACE alarm", e)
            with self._lock:
                self._alarms.add((self.options.member_id, pb.NOSPACE))
                self._wal_full = True
            self._answer([(fut, None, errors.NoSpaceError()) for kind, _, _, fut in batch
                          if kind != _WORK and fut is not None])
            return []
        return logged

    def _write_batch(self, batch) -> None:
        logged = self._log_batch(batch)
        results = []
        changes = []
        if logged:
            with self._wlock:
                txn = self._backend.begin_write()
                try:
                    with self._lock:
                        for index, kind, req, fut in logged:
                            try:
                                resp = self._apply(txn, kind, req, changes)
                                results.append((fut, resp, None))
                            except errors.MvccError as e:
                                results.append((fut, None, e))
                        txn.put(META_CONSISTENT_INDEX, encode_u64(logged[-1][0]), db=self._backend.meta_db)
                        started = time.perf_counter()
                        txn.commit()
                        self.stats.backend_commit.observe(time.perf_counter() - started)
                        self._applied_index = logged[-1][0]
                        self.stats.proposals_applied += len(logged)
                except BaseException:
                    txn.abort()
                    raise
        # Watchers hear of a revision before its writer is answered, so no
        # client can know of a revision that a progress report does not.
        self._after_commit(changes)
        self._answer(results)
        for kind, _, work, fut in batch:
            if kind == _WORK:
                try:
                    settle(fut, work())
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    fail(fut, e)

    @staticmethod
    def _answer(results) -> None:
        """Resolve the callers' futures: ``(future, response, error)``.

        A ``concurrent.futures.Future`` is settled here.  Futures of an
        asyncio loop (``propose_on_loop``) are handed to their loop in one
        ``call_soon_threadsafe`` per loop for the whole list: one wake-up
        answers the batch, where ``asyncio.wrap_future`` would cost one
        cross-thread wake-up per request (grpc_load put, c=16 and 64).
        """
        loops: dict = {}
        for fut, resp, err in results:
            if isinstance(resp, _Deferred):
                resp.chain(fut)
            elif isinstance(fut, Future):
                if err is not None:
                    fail(fut, err)
                else:
                    settle(fut, resp)
            elif fut is not None:
                loop = fut.get_loop()
                answers = loops.get(loop)
                if answers is None:
                    answers = loops[loop] = []
                answers.append((fut, resp, err))
        for loop, answers in loops.items():
            try:
                loop.call_soon_threadsafe(_resolve_on_loop, answers)
            except RuntimeError:
                pass  # the loop is closed: nobody is waiting any more

    def _after_commit(self, changes) -> None:
        """Runs on the writer thread after each commit."""
        self._db_size = self._backend.size()
        self._auth.committed()
        if changes:
            for fn in self._listeners:
                try:
                    fn(changes)
                except Exception:  # noqa: BLE001 - a listener must not stop writes
                    log.exception("commit listener failed")
        if self._durable_index > self._released_index:
            self._wal.release(self._durable_index, self.options.wal_kept_segments)
            self._released_index = self._durable_index

    def _apply(self, txn, kind: int, req, changes: list | None = None):
        """Apply one logged request; must be deterministic.

        Every check that can fail runs before the first change is made, so a
        request that raises leaves nothing behind.
        """
        if kind == KIND_PUT:
            if self._has_alarm(pb.NOSPACE):
                raise errors.NoSpaceError()
            view = _WriteView(self, txn)
            resp = txnmod.apply_put(view, req)
        elif kind == KIND_DELETE_RANGE:
            view = _WriteView(self, txn)
            resp = txnmod.execute_delete(view, req)
        elif kind == KIND_TXN:
            if self._has_alarm(pb.NOSPACE) and validate.txn_put_cost(req) > 0:
                raise errors.NoSpaceError()
            view = _WriteView(self, txn)
            resp = txnmod.apply_txn(view, req)
        elif kind == KIND_COMPACT:
            return self._apply_compact(txn, req)
        elif kind == KIND_ALARM:
            return self._apply_alarm(txn, req)
        elif kind == KIND_LEASE_GRANT:
            return self._apply_lease_grant(txn, req)
        elif kind == KIND_LEASE_REVOKE:
            view = _WriteView(self, txn)
            resp = self._apply_lease_revoke(view, txn, req)
        elif kind == KIND_LEASE_CHECKPOINT:
            return self._apply_lease_checkpoint(txn, req)
        elif kind in AUTH_KINDS:
            resp = self._auth.apply(kind, req, txn, self._backend.dbs)
            resp.header.revision = self._current
            return resp
        elif kind & AUTHORIZED_FLAG:
            self._auth.check_revision(req.revision)
            return self._apply(txn, kind & ~AUTHORIZED_FLAG, req.request, changes)
        elif kind & AUTH_OFF_FLAG:
            self._auth.check_still_off()
            return self._apply(txn, kind & ~AUTH_OFF_FLAG, req, changes)
        else:
            raise errors.StorageError(f"unknown WAL record type {kind}")
        view.end()
        self.stats.ended(view.ranges, view.puts, view.deletes)
        if changes is not None and view.changes:
            changes.append((view.begin_rev + 1, view.changes))
        return resp

    # ------------------------------------------------------------------
    # compaction

    def _apply_compact(self, txn, req: pb.CompactionRequest):
        rev = req.revision
        if rev <= self._compact_rev:
            raise errors.CompactedError()
        if rev > self._current:
            raise errors.FutureRevisionError()
        prev = self._compact_rev
        prev_completed = self._scheduled_compact_rev == self._finished_compact_rev
        self._compact_rev = rev
        self._scheduled_compact_rev = rev
        txn.put(META_SCHEDULED_COMPACT, to_bytes((rev, 0)), db=self._backend.meta_db)
        resp = pb.CompactionResponse()
        resp.header.revision = self._current
        deferred = _Deferred(resp) if req.physical else None
        self._jobs.put(("compact", rev, prev, prev_completed, deferred))
        return deferred if deferred is not None else resp

    def _compact(self, rev: int, prev: int, prev_completed: bool) -> KeyValueHash | None:
        keep: set = set()
        steps = self._index.compact_steps(rev, keep, chunk=self.options.index_compaction_chunk)
        while True:
            with self._lock:
                if next(steps, _DONE) is _DONE:
                    break
        be = self._backend
        end = main_prefix(rev + 1)
        hasher = KVHasher(prev, rev, keep)
        last = b""
        limit = self.options.compaction_batch_limit
        while True:
            if self._closed:
                return None
            with self._wlock:
                txn = be.begin_write()
                try:
                    cur = txn.cursor(db=be.key_db)
                    ok = cur.set_range(last) if last else cur.first()
                    n = 0
                    while ok and n < limit:
                        k = cur.key()
                        if k >= end:
                            ok = False
                            break
                        hasher.write(k, cur.value())
                        n += 1
                        last = k + b"\x00"
                        if from_bytes(k) in keep:
                            ok = cur.next()
                        else:
                            ok = cur.delete()
                    finished = not ok or n < limit
                    if finished:
                        txn.put(META_FINISHED_COMPACT, to_bytes((rev, 0)), db=be.meta_db)
                    txn.commit()
                except BaseException:
                    txn.abort()
                    raise
            if finished:
                break
            self._maybe_checkpoint()
            time.sleep(self.options.compaction_sleep)
        with self._lock:
            self._finished_compact_rev = max(self._finished_compact_rev, rev)
        h = hasher.result()
        if prev_completed:
            self._hashes.append(h)
            self._hashes.sort(key=lambda x: x.revision)
            del self._hashes[:-HASH_HISTORY]
        log.info("finished compaction at revision %d (hash %d)", rev, h.hash)
        return h

    # ------------------------------------------------------------------
    # background thread: compaction jobs and checkpoints

    def _run_background(self) -> None:
        tick = min(self.options.lease_expiry_tick, self.options.checkpoint_interval)
        next_lease_cp = time.monotonic() + self.options.lease_checkpoint_interval
        while True:
            try:
                job = self._jobs.get(timeout=tick)
            except queue.Empty:
                job = ("tick",)
            if job is None:
                return
            try:
                if job[0] == "tick":
                    if not self._closed and self._fatal is None:
                        self._expire_leases()
                        if time.monotonic() >= next_lease_cp:
                            next_lease_cp = time.monotonic() + self.options.lease_checkpoint_interval
                            self._checkpoint_leases()
                    self._maybe_checkpoint()
                    continue
                if job[0] == "compact":
                    _, rev, prev, prev_completed, deferred = job
                    done = self._compact(rev, prev, prev_completed)
                    if deferred is not None:
                        if done is None:
                            fail(deferred.future, errors.StoppedError())
                        else:
                            settle(deferred.future, deferred.response)
                self._maybe_checkpoint()
            except BaseException:  # noqa: BLE001 - keep the thread alive, say why
                log.exception("background job %r failed", job[0])
                if job[0] == "compact" and job[4] is not None and not job[4].future.done():
                    fail(job[4].future, errors.StoppedError())

    def _maybe_checkpoint(self) -> None:
        if time.monotonic() - self._last_checkpoint >= self.options.checkpoint_interval:
            self.checkpoint()

    def checkpoint(self) -> None:
        """Make the backend durable so the WAL it covers can be released.

        Writers are held out only while the committed state is pinned; the
        fsync runs while they go on, and no reader ever waits for it.
        """
        with self._checkpoint_lock:
            with self._wlock:
                applied = self._applied_index
                token = self._backend.begin_checkpoint()
            try:
                self._backend.finish_checkpoint(token)
            except BaseException as e:
                # A failed fsync cannot be retried (the kernel may have
                # dropped the pages it could not write, and a later fsync
                # would succeed without them), and releasing the WAL on a
                # later checkpoint would then lose writes: stop, as etcd
                # stops when its backend cannot commit.  The WAL still
                # holds every write since the last good checkpoint.
                if self._fatal is None:
                    log.error("backend checkpoint failed (%s); the store stops accepting writes", e)
                    self._fatal = e
                raise
            self._durable_index = max(self._durable_index, applied)
            self._last_checkpoint = time.monotonic()

    # ------------------------------------------------------------------
    # alarms

    def _has_alarm(self, alarm: int) -> bool:
        return any(a == alarm for _, a in self._alarms)

    def _apply_alarm(self, txn, req: pb.AlarmRequest):
        resp = pb.AlarmResponse()
        resp.header.revision = self._current
        db = self._backend.dbs[ALARM]
        if req.action == pb.AlarmRequest.GET:
            for mid, a in sorted(self._alarms):
                if req.alarm == pb.NONE or req.alarm == a:
                    resp.alarms.add(memberID=mid, alarm=a)
        elif req.action == pb.AlarmRequest.ACTIVATE:
            if req.alarm != pb.NONE:
                m = pb.AlarmMember(memberID=req.memberID, alarm=req.alarm)
                self._alarms.add((req.memberID, req.alarm))
                txn.put(m.SerializeToString(), b"", db=db)
                resp.alarms.append(m)
        elif req.action == pb.AlarmRequest.DEACTIVATE:
            if req.alarm == pb.NOSPACE:
                self._wal_full = False
            if (req.memberID, req.alarm) in self._alarms:
                m = pb.AlarmMember(memberID=req.memberID, alarm=req.alarm)
                self._alarms.discard((req.memberID, req.alarm))
                txn.delete(m.SerializeToString(), db=db)
                resp.alarms.append(m)
        return resp

    def alarms(self) -> list[tuple[int, int]]:
        """Active alarms as (member ID, AlarmType) pairs."""
        return sorted(self._alarms)

    # ------------------------------------------------------------------
    # leases (see lease.py: logged changes here, clock in the background)

    def _lease_exists(self, lease_id: int) -> bool:
        return lease_id in self._lessor.leases

    def _apply_lease_grant(self, txn, req: pb.LeaseGrantRequest):
        if self._has_alarm(pb.NOSPACE):
            raise errors.NoSpaceError()
        lease = self._lessor.grant(req.ID, req.TTL)
        txn.put(lease_key(lease.id), lease.encode(), db=self._backend.dbs[LEASE])
        resp = pb.LeaseGrantResponse(ID=lease.id, TTL=lease.ttl)
        resp.header.revision = self._current
        self.stats.leases_granted += 1
        return resp

    def _apply_lease_revoke(self, view: "_WriteView", txn, req: pb.LeaseRevokeRequest):
        # Every attached key is deleted in this one write: one revision, one
        # sub revision per key in key order.
        for key in self._lessor.revoke(req.ID):
            view.delete_range(key, b"")
        txn.delete(lease_key(req.ID), db=self._backend.dbs[LEASE])
        self.stats.leases_revoked += 1
        resp = pb.LeaseRevokeResponse()
        resp.header.revision = view.rev
        return resp

    def _apply_lease_checkpoint(self, txn, req: pb.LeaseCheckpointRequest):
        db = self._backend.dbs[LEASE]
        for cp in req.checkpoints:
            lease = self._lessor.checkpoint(cp.ID, cp.remaining_TTL)
            if lease is not None:
                txn.put(lease_key(lease.id), lease.encode(), db=db)
        resp = pb.LeaseCheckpointResponse()
        resp.header.revision = self._current
        return resp

    def lease_grant(self, ttl: int, lease_id: int = 0) -> pb.LeaseGrantResponse:
        """Grant a lease of ``ttl`` seconds (raised to the minimum TTL);
        ``lease_id`` 0 lets the store pick a fresh positive ID."""
        return self.propose(KIND_LEASE_GRANT, self.new_lease_request(ttl, lease_id)).result()

    def new_lease_request(self, ttl: int, lease_id: int = 0) -> pb.LeaseGrantRequest:
        # The ID is chosen before logging so that replay grants the same one.
        if lease_id == 0:
            while lease_id == 0 or lease_id in self._lessor.leases:
                lease_id = secrets.randbits(63)
        return pb.LeaseGrantRequest(TTL=ttl, ID=lease_id)

    def lease_revoke(self, lease_id: int) -> pb.LeaseRevokeResponse:
        """Revoke a lease, deleting its keys in one revision."""
        return self.propose(KIND_LEASE_REVOKE, pb.LeaseRevokeRequest(ID=lease_id)).result()

    def lease_keepalive(self, lease_id: int) -> int:
        """Renew a lease; its TTL, or 0 if it does not exist or has expired."""
        self._check_open()
        with self._lock:
            lease = self._lessor.lookup(lease_id)
            had_checkpoint = lease is not None and lease.remaining_ttl > 0
            ttl = self._lessor.renew(lease_id)
            if ttl:
                self.stats.leases_renewed += 1
        if ttl and had_checkpoint:
            # The recorded remaining TTL no longer holds; log that, or a
            # restart would resume the old countdown.
            cp = pb.LeaseCheckpointRequest(checkpoints=[pb.LeaseCheckpoint(ID=lease_id, remaining_TTL=0)])
            self.propose(KIND_LEASE_CHECKPOINT, cp)
        return ttl

    def lease_ttl(self, lease_id: int, keys: bool = False) -> pb.LeaseTimeToLiveResponse:
        """etcd's LeaseTimeToLive; an unknown lease answers TTL -1."""
        self._check_open()
        resp = pb.LeaseTimeToLiveResponse(ID=lease_id)
        with self._lock:
            resp.header.revision = self._current
            lease = self._lessor.lookup(lease_id)
            if lease is None:
                resp.TTL = -1
                return resp
            resp.TTL = int(self._lessor.remaining(lease_id))
            resp.grantedTTL = lease.ttl
            if keys:
                resp.keys.extend(sorted(lease.keys))
        return resp

    def leases(self) -> pb.LeaseLeasesResponse:
        """All lease IDs, soonest to expire first."""
        self._check_open()
        resp = pb.LeaseLeasesResponse()
        with self._lock:
            resp.header.revision = self._current
            for lease in self._lessor.by_expiry():
                resp.leases.add(ID=lease.id)
        return resp

    def _expire_leases(self) -> None:
        with self._lock:
            expired = self._lessor.expired(500, self.options.lease_revoke_retry)
            self.stats.leases_expired += len(expired)
        for lid in expired:
            self.propose(KIND_LEASE_REVOKE, pb.LeaseRevokeRequest(ID=lid))

    def _checkpoint_leases(self) -> None:
        with self._lock:
            due = self._lessor.due_checkpoints(1000)
        if due:
            cps = [pb.LeaseCheckpoint(ID=lid, remaining_TTL=rem) for lid, rem in due]
            self.propose(KIND_LEASE_CHECKPOINT, pb.LeaseCheckpointRequest(checkpoints=cps))

    # ------------------------------------------------------------------
    # watch

    @property
    def watch_hub(self):
        """The store's WatchHub (created on first use)."""
        hub = self._watch_hub
        if hub is None:
            from mvcckv.watch import WatchHub

            with self._lock:
                if self._watch_hub is None:
                    self._watch_hub = WatchHub(self)
                hub = self._watch_hub
        return hub

    def watch(
        self,
        key: bytes | str,
        range_end: bytes | str = b"",
        *,
        start_revision: int = 0,
        prev_kv: bool = False,
        filters=(),
    ):
        """Watch a key or range; returns a :class:`mvcckv.watch.WatchIterator`
        yielding etcd's WatchResponse messages (iterate, or ``async for``).

        >>> import mvcckv, tempfile
        >>> with mvcckv.open(tempfile.mkdtemp()) as store:
        ...     _ = store.put("k", "v1")
        ...     with store.watch("k", start_revision=1) as w:
        ...         _ = store.put("k", "v2")
        ...         [(e.kv.value, e.kv.mod_revision) for r in w.take(2) for e in r.events]
        [(b'v1', 2), (b'v2', 3)]
        """
        from mvcckv.watch import WatchIterator

        return WatchIterator(
            self.watch_hub, _b(key), _b(range_end), start_revision, prev_kv=prev_kv, filters=filters
        )

    def prev_kv(self, key: bytes, revision: int) -> kv_pb2.KeyValue | None:
        """The KeyValue of ``key`` at ``revision`` if still known (watch prev_kv)."""
        try:
            return self.get_kv(key, revision)
        except (errors.CompactedError, errors.FutureRevisionError):
            return None

    def read_changes(self, low: int, max_revisions: int):
        """Changes of revisions >= ``low`` from the backend, for watch catch-up.

        Returns ``(changes, current, upto)``: ``changes`` is a list of
        (revision, [(is_delete, KeyValue), ...]) covering at most
        ``max_revisions`` revisions, ``current`` the store's revision when
        read, ``upto`` the last revision covered (``current`` unless cut).
        """
        with self._swap_lock:
            with self._lock:
                cur = self._current
                txn = self._backend.begin_read()
            try:
                changes: list = []
                upto = cur
                parse = kv_pb2.KeyValue.FromString
                cursor = txn.cursor(db=self._backend.key_db)
                ok = cursor.set_range(main_prefix(max(low, 0)))
                while ok:
                    k = cursor.key()
                    main = from_bytes(k).main
                    if main > cur:
                        break
                    if not changes or changes[-1][0] != main:
                        if len(changes) >= max_revisions:
                            upto = changes[-1][0]
                            break
                        changes.append((main, []))
                    kv = parse(cursor.value())
                    if len(k) > REV_BYTES_LEN:
                        kv.mod_revision = main
                        changes[-1][1].append((True, kv))
                    else:
                        changes[-1][1].append((False, kv))
                    ok = cursor.next()
            finally:
                txn.abort()
        return changes, cur, upto

    # ------------------------------------------------------------------
    # commit listeners (watch)

    def add_commit_listener(self, fn: Callable[[list], None]) -> None:
        """Call ``fn(changes)`` on the writer thread after every commit that
        changed keys; ``changes`` is a list of (revision, [(is_delete,
        KeyValue), ...]) in revision order.  ``fn`` must not block."""
        self._listeners.append(fn)

    def remove_commit_listener(self, fn: Callable[[list], None]) -> None:
        self._listeners.remove(fn)

    # ------------------------------------------------------------------
    # reads

    def range_request(self, req: pb.RangeRequest) -> pb.RangeResponse:
        validate.check_range(req)
        self._check_open()
        self._check_corrupt()
        with self._lock:
            txn = self._backend.begin_read()
            try:
                view = _ReadView(self, txn, self._current, self._compact_rev)
                try:
                    return txnmod.execute_range(view, req)
                finally:
                    # Counted also when refused (a future revision), as etcd
                    # counts a range its store transaction began.
                    self.stats.ended(view.ranges, 0, 0)
            finally:
                txn.abort()

    def range_raw(self, req: pb.RangeRequest) -> tuple[list[bytes], bool, int, int] | None:
        """A Range answered with the stored KeyValue bytes: ``(kvs, more,
        count, header revision)``, ready to be spliced into a response
        (``wire.py``).  None when the request needs the KeyValues
        themselves (sorting, revision filters, keys_only): then ask
        :meth:`range_request`.  Same checks and errors as ``range_request``.
        """
        if (req.sort_target or req.sort_order > pb.RangeRequest.ASCEND or req.keys_only
                or req.min_mod_revision or req.max_mod_revision
                or req.min_create_revision or req.max_create_revision):
            return None
        validate.check_range(req)
        if self._closed or self._fatal is not None:
            self._check_open()
        if self._alarms:
            self._check_corrupt()
        limit = req.limit
        with self._lock:
            txn = self._backend.begin_read()
            view = _ReadView(self, txn, self._current, self._compact_rev)
            try:
                kvs, count, rev = view.range_raw(
                    req.key, req.range_end, req.revision, limit + 1 if limit > 0 else limit, req.count_only)
            finally:
                txn.abort()
                # Counted also when refused, as range_request counts it.
                self.stats.ended(view.ranges, 0, 0)
        more = limit > 0 and len(kvs) > limit
        if more:
            del kvs[limit:]
        return kvs, more, count, rev

    def txn_request(self, req: pb.TxnRequest) -> pb.TxnResponse:
        """A Txn: read-only ones are answered at once, others are logged."""
        if validate.txn_is_read_only(req):
            self._check_open()
            self._check_corrupt()
            validate.check_txn(req, self.options.max_txn_ops)
            with self._lock:
                txn = self._backend.begin_read()
                try:
                    view = _ReadView(self, txn, self._current, self._compact_rev)
                    try:
                        return txnmod.apply_txn(view, req)
                    finally:
                        self.stats.ended(view.ranges, 0, 0)
                finally:
                    txn.abort()
        return self.propose(KIND_TXN, req).result()

    def get_kv(self, key: bytes, revision: int = 0) -> kv_pb2.KeyValue | None:
        """The KeyValue of ``key`` at ``revision`` (0 = current), or None."""
        if self._closed or self._fatal is not None:
            self._check_open()
        be = self._backend
        with self._lock:
            rev = read_revision(self._current, revision, self._compact_rev)
            try:
                mod, _, _ = self._index.get(key, rev)
            except RevisionNotFoundError:
                return None
            # A read-only txn bound to the key database, used positionally:
            # the cheapest LMDB point read py-lmdb offers (bench_store get).
            txn = be.env.begin(db=be.key_db)
            data = txn.get(to_bytes(mod))
            txn.abort()
        return _parse_kv(data)

    @property
    def revision(self) -> int:
        """The current revision: that of the last change (1 for an empty store)."""
        return self._current

    @property
    def compact_revision(self) -> int:
        """The last compaction's revision, -1 if never compacted."""
        return self._compact_rev

    # ------------------------------------------------------------------
    # the embedded API: etcd's requests as keyword arguments

    def put(
        self,
        key: bytes | str,
        value: bytes | str = b"",
        *,
        lease: int = 0,
        prev_kv: bool = False,
        ignore_value: bool = False,
        ignore_lease: bool = False,
    ) -> pb.PutResponse:
        """Put ``key`` = ``value``; returns etcd's PutResponse.

        >>> import mvcckv, tempfile
        >>> with mvcckv.open(tempfile.mkdtemp()) as store:
        ...     store.put("greeting", "hello").header.revision
        2
        """
        req = pb.PutRequest(
            key=_b(key), value=_b(value), lease=lease, prev_kv=prev_kv,
            ignore_value=ignore_value, ignore_lease=ignore_lease,
        )
        return self.propose(KIND_PUT, req).result()

    def get(self, key: bytes | str, *, revision: int = 0) -> kv_pb2.KeyValue | None:
        """The KeyValue of one key at ``revision`` (0 = current), or None.

        >>> import mvcckv, tempfile
        >>> with mvcckv.open(tempfile.mkdtemp()) as store:
        ...     _ = store.put(b"k", b"v1"); _ = store.put(b"k", b"v2")
        ...     kv = store.get(b"k")
        ...     (kv.value, kv.version, kv.create_revision, kv.mod_revision)
        (b'v2', 2, 2, 3)
        """
        return self.get_kv(key.encode() if isinstance(key, str) else key, revision)

    def range(
        self,
        key: bytes | str,
        range_end: bytes | str = b"",
        *,
        revision: int = 0,
        limit: int = 0,
        sort_order: int = 0,
        sort_target: int = 0,
        keys_only: bool = False,
        count_only: bool = False,
        min_mod_revision: int = 0,
        max_mod_revision: int = 0,
        min_create_revision: int = 0,
        max_create_revision: int = 0,
    ) -> pb.RangeResponse:
        """etcd's Range: keys in ``[key, range_end)`` (see :func:`prefix_end`)."""
        req = pb.RangeRequest(
            key=_b(key), range_end=_b(range_end), revision=revision, limit=limit,
            sort_order=sort_order, sort_target=sort_target, keys_only=keys_only,
            count_only=count_only, min_mod_revision=min_mod_revision,
            max_mod_revision=max_mod_revision, min_create_revision=min_create_revision,
            max_create_revision=max_create_revision,
        )
        return self.range_request(req)

    def delete(self, key: bytes | str, range_end: bytes | str = b"", *, prev_kv: bool = False) -> pb.DeleteRangeResponse:
        """etcd's DeleteRange; deleting nothing creates no revision."""
        req = pb.DeleteRangeRequest(key=_b(key), range_end=_b(range_end), prev_kv=prev_kv)
        return self.propose(KIND_DELETE_RANGE, req).result()

    def txn(self, compare=(), success=(), failure=()) -> pb.TxnResponse:
        """etcd's Txn; build compares and ops with :mod:`mvcckv.ops`.

        >>> import mvcckv, tempfile
        >>> from mvcckv import ops
        >>> with mvcckv.open(tempfile.mkdtemp()) as store:
        ...     r = store.txn([ops.version("lock") == 0], [ops.put("lock", "me")], [ops.get("lock")])
        ...     r.succeeded, store.get("lock").value
        (True, b'me')
        """
        return self.txn_request(pb.TxnRequest(compare=list(compare), success=list(success), failure=list(failure)))

    def compact(self, revision: int, *, physical: bool = False) -> pb.CompactionResponse:
        """Drop history before ``revision``; with ``physical`` wait until the
        backend entries are gone too."""
        return self.propose(KIND_COMPACT, pb.CompactionRequest(revision=revision, physical=physical)).result()

    def alarm(self, action: int, alarm: int = 0, member_id: int | None = None) -> pb.AlarmResponse:
        """etcd's Alarm (GET / ACTIVATE / DEACTIVATE)."""
        mid = self.options.member_id if member_id is None else member_id
        return self.propose(KIND_ALARM, pb.AlarmRequest(action=action, alarm=alarm, memberID=mid)).result()

    # ------------------------------------------------------------------
    # auth (§11): the embedded API administers it directly, as root would

    @property
    def auth(self) -> AuthStore:
        """The auth store: state, password and permission checks."""
        return self._auth

    def _auth_view(self) -> AuthStore:
        self._check_open()
        return self._auth

    # ------------------------------------------------------------------
    # hashes

    def hash_kv(self, revision: int = 0) -> tuple[KeyValueHash, int]:
        """etcd's HashKV: (hash of history up to revision, current revision)."""
        self._check_open()
        with self._swap_lock:
            with self._lock:
                compact_rev, current = self._compact_rev, self._current
                if 0 < revision < compact_rev:
                    raise errors.CompactedError()
                if revision > current:
                    raise errors.FutureRevisionError()
                # A hash recorded by a compaction is looked up by the revision
                # asked for, so 0 ("current") never matches one and is always
                # computed, with the current compact revision.
                if revision > 0:
                    for h in self._hashes:
                        if h.revision == revision:
                            return h, current
                # Only 0 means "current": a negative revision hashes nothing
                # but the bucket name, as etcd does.
                rev = current if revision == 0 else revision
                keep = self._index.keep(rev)
                txn = self._backend.begin_read()
            try:
                hasher = KVHasher(compact_rev, rev, keep)
                end = main_prefix(max(rev + 1, 0))
                for k, v in txn.cursor(db=self._backend.key_db):
                    if k >= end:
                        break
                    hasher.write(k, v)
            finally:
                txn.abort()
        return hasher.result(), current

    def hash(self) -> tuple[int, int]:
        """CRC-32C over every database (name, keys, values), as etcd's Hash.

        Implementation-specific: it matches another mvcckv store with the
        same contents, not etcd's bbolt file.  WAL bookkeeping in ``meta``
        is left out, as etcd leaves out its consistent index.
        """
        self._check_open()
        skip = {META_CONSISTENT_INDEX}
        with self._swap_lock:
            with self._lock:
                current = self._current
                txn = self._backend.begin_read()
            try:
                h = 0
                for name in sorted(self._backend.dbs):
                    h = crc32c.crc32c(name, h)
                    for k, v in txn.cursor(db=self._backend.dbs[name]):
                        if name == b"meta" and k in skip:
                            continue
                        h = crc32c.crc32c(v, crc32c.crc32c(k, h))
            finally:
                txn.abort()
        return h, current

    # ------------------------------------------------------------------
    # maintenance

    def status(self) -> StoreStatus:
        with self._lock:
            rev, crev, keys, applied = self._current, self._compact_rev, self._live_keys, self._applied_index
        # The defrag swap closes the environment; sizes are read outside it.
        with self._swap_lock:
            size, in_use = self._backend.size(), self._backend.size_in_use()
        return StoreStatus(
            revision=rev,
            compact_revision=crev,
            db_size=size,
            db_size_in_use=in_use,
            keys=keys,
            raft_index=self._wal.last_index,
            applied_index=applied,
        )

    def defrag(self) -> tuple[int, int]:
        """Rewrite the backend file without free space; (size before, after).

        Reads are served throughout; writes wait until the swap is done.
        """
        self._check_open()
        with self._checkpoint_lock, self._wlock, self._snapshot_lock:
            return self._backend.defrag(_Both(self._swap_lock, self._lock))

    def snapshot(self, target: str | os.PathLike[str] | BinaryIO) -> int:
        """Write a snapshot in etcd's format to ``target`` (a path or a
        binary file): etcd's bbolt backend file, then its SHA-256, so
        ``etcdctl snapshot status|restore`` and a real etcd read it.
        Returns the bytes written.  One read transaction, so one committed
        state, while writes go on.  See ``mvcckv.etcdfile``."""
        self._check_open()
        with self._snapshot_lock:
            with self._swap_lock:
                txn = self._backend.begin_read()
            try:
                return etcdfile.save(target, etcdfile.lmdb_source(txn, self._backend.dbs), tmp_dir=self.path)
            finally:
                txn.abort()

    def run_on_writer(self, fn: Callable[[], object]) -> Future:
        """Run ``fn`` on the writer thread between batches (ordered with writes)."""
        self._check_open()
        fut: Future = Future()
        self._queue.put((_WORK, None, fn, fut))
        return fut

    def identity(self, cluster_id: int, member_id: int) -> tuple[int, int]:
        """The data dir's (cluster ID, member ID), recording these on first use."""

        def ensure():
            be = self._backend
            with self._wlock:
                with be.begin_write() as txn:
                    cid = txn.get(META_CLUSTER_ID, db=be.meta_db)
                    mid = txn.get(META_MEMBER_ID, db=be.meta_db)
                    if cid is None or mid is None:
                        txn.put(META_CLUSTER_ID, encode_u64(cluster_id), db=be.meta_db)
                        txn.put(META_MEMBER_ID, encode_u64(member_id), db=be.meta_db)
                        return cluster_id, member_id
                    return decode_u64(cid), decode_u64(mid)

        return self.run_on_writer(ensure).result()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._watch_hub is not None:
            self._watch_hub.close()
        self._queue.put(None)
        self._writer.join()
        self._jobs.put(None)
        self._background.join()
        self._drain_failed()
        # After a failure nothing more is synced or released: what is on
        # disk is what a restart recovers from.
        healthy = self._fatal is None
        try:
            if healthy:
                self.checkpoint()
                if self._durable_index > self._released_index:
                    self._wal.release(self._durable_index, self.options.wal_kept_segments)
        finally:
            self._wal.close()
            self._backend.close(checkpoint=healthy)

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Deferred:
    """A response whose future resolves later (a physical compaction)."""

    __slots__ = ("response", "future")

    def __init__(self, response):
        self.response = response
        self.future: Future = Future()

    def chain(self, caller) -> None:
        """Answer ``caller`` (either kind of future, see ``Store._answer``)
        when the deferred work is done."""

        def done(f: Future) -> None:
            err = f.exception()
            Store._answer([(caller, None if err is not None else f.result(), err)])

        self.future.add_done_callback(done)


def _resolve_on_loop(answers) -> None:
    """On the event loop: settle a batch's asyncio futures."""
    for fut, resp, err in answers:
        if fut.done():
            continue  # its caller went away (cancelled)
        if err is not None:
            fut.set_exception(err)
        else:
            fut.set_result(resp)


class _Both:
    """Context manager taking two locks in order."""

    __slots__ = ("_a", "_b")

    def __init__(self, a, b):
        self._a, self._b = a, b

    def __enter__(self):
        self._a.acquire()
        self._b.acquire()

    def __exit__(self, *exc):
        self._b.release()
        self._a.release()


_DONE = object()
_parse_kv = kv_pb2.KeyValue.FromString
_REV_KEY = struct.Struct(">QcQ")


def _b(v: bytes | str) -> bytes:
    return v.encode() if isinstance(v, str) else v


def prefix_end(prefix: bytes | str) -> bytes:
    """The range_end selecting every key that starts with ``prefix``.

    >>> prefix_end(b"aa"), prefix_end(b"a\\xff"), prefix_end(b"\\xff")
    (b'ab', b'b', b'\\x00')
    """
    p = bytearray(_b(prefix))
    while p:
        if p[-1] < 0xFF:
            p[-1] += 1
            return bytes(p)
        p.pop()
    # Every byte was 0xff: no upper bound, i.e. all keys >= prefix.
    return b"\0"

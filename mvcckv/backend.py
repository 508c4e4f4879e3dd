"""The LMDB backend: named databases holding the store's durable state.

One LMDB environment (``<data-dir>/db/data.mdb``) with etcd's buckets as
named databases:

========  ==================================================================
``key``   17/18-byte revision (see ``revision.py``) -> encoded
          ``mvccpb.KeyValue`` (the bytes etcd stores, so HashKV matches)
``meta``  ``consistent_index`` (8-byte BE: last WAL record applied),
          ``scheduledCompactRev`` / ``finishedCompactRev`` (17-byte revision),
          ``cluster_id`` / ``member_id`` (8-byte BE)
``lease`` 8-byte BE lease ID -> encoded ``leasepb.Lease``
``alarm`` encoded ``AlarmMember`` -> b""
``auth``, ``authUsers``, ``authRoles``  the auth store (see ``auth.py``)
========  ==================================================================

Durability comes from the WAL and from checkpoints, never from "the page
cache will get there" (see ``docs/durability.md`` for the whole argument).
Commits are written without fsync (``sync=False``), so each costs page-cache
writes only.  A checkpoint (:meth:`begin_checkpoint` with writers held out,
then :meth:`finish_checkpoint`) fsyncs the file and then records the meta
page of the synced state in ``synced-meta`` (``metapage.py``); only then may
the WAL records it covers be released.

Unsynced commits may reach the disk in any order and in part.  What keeps
the synced state intact under them is a read transaction held open on it
(the *pin*): LMDB reuses a page freed by transaction ``k`` only when every
reader is newer than ``k`` (``mdb_page_alloc`` takes free-list records
whose txnid is below ``mdb_find_oldest``: the writer's txnid - 1, or the
oldest reader's), so no page of the pinned tree is overwritten until the
next checkpoint's pin replaces it.  On open, :func:`metapage.prepare` puts
the recorded meta page back when the file's newest one is not it, which
rolls LMDB back to that intact tree, and the WAL replays every record after
its ``consistent_index``.

The map size is a ceiling on the file, not an allocation; it is set well
above the space quota so that the quota, not LMDB, is what refuses writes.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import struct

import lmdb

from mvcckv import metapage
from mvcckv.errors import StorageError
from mvcckv.fsutil import fsync_dir

KEY = b"key"
META = b"meta"
LEASE = b"lease"
ALARM = b"alarm"
AUTH = b"auth"
AUTH_USERS = b"authUsers"
AUTH_ROLES = b"authRoles"
DATABASES = (KEY, META, LEASE, ALARM, AUTH, AUTH_USERS, AUTH_ROLES)

META_CONSISTENT_INDEX = b"consistent_index"
META_SCHEDULED_COMPACT = b"scheduledCompactRev"
META_FINISHED_COMPACT = b"finishedCompactRev"
META_CLUSTER_ID = b"cluster_id"
META_MEMBER_ID = b"member_id"

_U64 = struct.Struct(">Q")

DEFAULT_QUOTA = 2 * 1024 * 1024 * 1024
# Room above the quota so a batch that crosses it still commits; the quota
# check refuses the next one.
_MAP_HEADROOM = 1 * 1024 * 1024 * 1024
_UNLIMITED_MAP = 1 << 40


def encode_u64(v: int) -> bytes:
    return _U64.pack(v)


def decode_u64(b: bytes) -> int:
    return _U64.unpack(b)[0]


class Backend:
    """An LMDB environment with etcd's buckets.

    Thread-safety: LMDB allows many concurrent readers and one writer; read
    transactions may be used from any thread.  ``defrag`` swaps the
    environment under a guard supplied by the caller, which must keep every
    reader of ``env`` out while it is held.
    """

    def __init__(self, path: str, *, quota_bytes: int = DEFAULT_QUOTA):
        self.path = path
        self.quota_bytes = quota_bytes
        os.makedirs(path, exist_ok=True)
        # Locked before anything is checked or rolled back: rewriting the
        # meta pages of a file another process is using would destroy it.
        self._dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(self._dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._dir_fd)
            raise StorageError(f"backend directory {path} is already open by another process") from None
        try:
            self._record = metapage.SyncedMeta(path)
            self._pin: lmdb.Transaction | None = None
            if not self._record.exists() and not os.path.exists(self.data_file):
                # A new file: say so durably before LMDB creates it, so that
                # a cut before its first checkpoint is recognised as such.
                self._record.write([])
            metapage.prepare(path, self.data_file)
            self._open()
            self.checkpoint()
        except BaseException:
            os.close(self._dir_fd)
            raise

    # -- environment -----------------------------------------------------

    def _map_size(self) -> int:
        if self.quota_bytes <= 0:
            return _UNLIMITED_MAP
        return self.quota_bytes + _MAP_HEADROOM

    def _open(self) -> None:
        self.env = lmdb.open(
            self.path,
            subdir=True,
            map_size=self._map_size(),
            max_dbs=len(DATABASES) + 2,
            max_readers=2048,
            sync=False,
            metasync=False,
            readahead=False,
            lock=True,
        )
        self.dbs = {name: self.env.open_db(name) for name in DATABASES}
        self.key_db = self.dbs[KEY]
        self.meta_db = self.dbs[META]

    @property
    def data_file(self) -> str:
        return os.path.join(self.path, "data.mdb")

    def begin_read(self) -> lmdb.Transaction:
        return self.env.begin(buffers=False)

    def begin_write(self) -> lmdb.Transaction:
        return self.env.begin(write=True, buffers=False)

    # -- checkpoints -----------------------------------------------------

    def begin_checkpoint(self) -> tuple[lmdb.Transaction, metapage.Meta]:
        """Pin the last committed state; call with every writer held out.

        Returns a token for :meth:`finish_checkpoint`, which may run while
        writers go on.  O(1): one read transaction, two page reads.
        """
        pin = self.env.begin()
        try:
            meta = metapage.newest(metapage.read_metas(self.data_file, self.env.stat()["psize"]))
            last = self.env.info()["last_txnid"]
            if meta is None or meta.txnid != last:
                raise StorageError(
                    f"backend {self.data_file}: meta page says txn "
                    f"{None if meta is None else meta.txnid}, LMDB says {last}"
                )
        except BaseException:
            pin.abort()
            raise
        return pin, meta

    def finish_checkpoint(self, token: tuple[lmdb.Transaction, metapage.Meta]) -> None:
        """Make the pinned state durable and record it; the previous pin goes.

        One fdatasync of the data file (every page committed so far), then
        the record (one file fsync, one directory fsync).
        """
        pin, meta = token
        try:
            self.env.sync(True)
            self._record.write([meta])
        except BaseException:
            pin.abort()
            raise
        old, self._pin = self._pin, pin
        if old is not None:
            old.abort()

    def checkpoint(self) -> None:
        """Both halves of a checkpoint at once; call with writers held out."""
        self.finish_checkpoint(self.begin_checkpoint())

    def close(self, *, checkpoint: bool = True) -> None:
        """Checkpoint (unless told not to, after a failure) and close; call
        with writers held out."""
        try:
            if checkpoint:
                self.checkpoint()
        finally:
            self._unpin()
            self.env.close()
            os.close(self._dir_fd)  # also drops the lock

    def _unpin(self) -> None:
        if self._pin is not None:
            self._pin.abort()
            self._pin = None

    # -- sizes -----------------------------------------------------------

    def size(self) -> int:
        """Physical size of the database file in bytes (etcd's ``dbSize``)."""
        try:
            return os.path.getsize(self.data_file)
        except FileNotFoundError:
            return 0

    def size_in_use(self) -> int:
        """Bytes held by live pages (etcd's ``dbSizeInUse``).

        LMDB does not expose its free list, so this sums the pages of every
        database's B+tree plus the two meta pages; pages on the free list
        (left behind by compaction) are what it leaves out, which is what
        ``dbSize - dbSizeInUse`` is meant to show.
        """
        with self.env.begin() as txn:
            st = self.env.stat()
            psize = st["psize"]
            pages = 2 + st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
            for db in self.dbs.values():
                s = txn.stat(db)
                pages += s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"]
        return min(pages * psize, self.size() or pages * psize)

    # -- maintenance -----------------------------------------------------

    def defrag(self, swap_guard) -> tuple[int, int]:
        """Rewrite the file without its free pages; returns (before, after) sizes.

        The compacting copy runs from a read transaction, so readers are
        served throughout; the caller must keep writers and checkpoints out
        until this returns (the store runs it under its writer lock).  Only
        the swap (close, rename, reopen) runs inside ``swap_guard``.

        Crash safety: the old file is checkpointed first and the copy is
        fsynced before the record names both (each matches the disk
        exactly, whichever the rename left); once the rename is durable the
        record names the new file alone, before anything is committed to it.
        """
        before = self.size()
        tmp_dir = self.path + ".defrag"
        shutil.rmtree(tmp_dir, ignore_errors=True)
        os.makedirs(tmp_dir)
        self.checkpoint()
        old_meta = metapage.newest(metapage.read_metas(self.data_file))
        self.env.copy(tmp_dir, compact=True)
        tmp_file = os.path.join(tmp_dir, "data.mdb")
        fd = os.open(tmp_file, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        new_meta = metapage.newest(metapage.read_metas(tmp_file))
        self._record.write([old_meta, new_meta])
        try:
            self._swap(swap_guard, tmp_file, new_meta)
        except BaseException:
            if os.path.exists(tmp_file):  # the old file is still in place
                self._record.write([old_meta])
            raise
        shutil.rmtree(tmp_dir, ignore_errors=True)
        return before, self.size()

    def _swap(self, swap_guard, tmp_file: str, new_meta: metapage.Meta) -> None:
        # Readers wait only for the swap itself; the syncs after it need
        # only writers kept out, which the caller does until we return.
        with swap_guard:
            self._unpin()
            self.env.close()
            os.replace(tmp_file, self.data_file)
            self._open()
        fsync_dir(self.path)
        self._record.write([new_meta])
        self.checkpoint()

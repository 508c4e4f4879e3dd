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

Durability comes from the WAL, not from LMDB: the environment is opened
without per-commit fsync (``sync=False``), commits are cheap page-cache
writes, and ``checkpoint()`` makes everything committed so far durable
before the WAL segments it covers are released.  A killed process loses
nothing (the page cache survives it); after an OS crash LMDB may roll back
its last commits, which the WAL then replays, because ``consistent_index``
is written in the same LMDB transaction as the changes it names.

The map size is a ceiling on the file, not an allocation; it is set well
above the space quota so that the quota, not LMDB, is what refuses writes.
"""

from __future__ import annotations

import os
import shutil
import struct

import lmdb

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
        self._open()

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

    def checkpoint(self) -> None:
        """Make every committed transaction durable (fsync the data file)."""
        self.env.sync(True)

    def close(self) -> None:
        try:
            self.env.sync(True)
        finally:
            self.env.close()

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
        served throughout; the caller must keep writers out until this
        returns (the store's writer thread runs defrag itself).  Only the
        swap (close, rename, reopen) runs inside ``swap_guard``.
        """
        before = self.size()
        tmp_dir = self.path + ".defrag"
        shutil.rmtree(tmp_dir, ignore_errors=True)
        os.makedirs(tmp_dir)
        self.env.copy(tmp_dir, compact=True)
        with swap_guard:
            self.env.sync(True)
            self.env.close()
            os.replace(os.path.join(tmp_dir, "data.mdb"), self.data_file)
            shutil.rmtree(tmp_dir, ignore_errors=True)
            _fsync_dir(self.path)
            self._open()
        return before, self.size()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""HashKV: etcd's hash of the MVCC history up to a revision (§10.3).

The hash is CRC-32C (Castagnoli) over the bucket name ``key`` followed by
the raw backend key and value of every entry that a store compacted at
``compact_revision`` would still hold at ``revision``.  Because our backend
keys and values are byte-for-byte etcd's, two stores with the same history
hash alike — including against a real etcd.

The same hasher runs during compaction (fed with every entry the compaction
visits), so the hash at a compaction revision is known without a second
scan; the store remembers the last ``HASH_HISTORY`` of them.
"""

from __future__ import annotations

from typing import NamedTuple

import crc32c

from mvcckv.revision import REV_BYTES_LEN, Revision, from_bytes, is_tombstone

HASH_HISTORY = 10
_BUCKET = b"key"


class KeyValueHash(NamedTuple):
    hash: int
    compact_revision: int
    revision: int


class KVHasher:
    """Feeds backend entries (in key order) into etcd's HashKV rule."""

    __slots__ = ("_crc", "compact_revision", "revision", "_keep")

    def __init__(self, compact_revision: int, revision: int, keep: set[Revision]):
        self._crc = crc32c.crc32c(_BUCKET)
        self.compact_revision = compact_revision
        self.revision = revision
        self._keep = keep

    def write(self, k: bytes, v: bytes) -> None:
        rev = from_bytes(k)
        if rev.main > self.revision:
            return
        # Entries at or below the compact revision are the ones a compaction
        # removes unless they are still visible; with no keep set (nothing to
        # keep at all) everything is hashed, as etcd does.
        if rev.main <= self.compact_revision and self._keep and rev not in self._keep:
            return
        # A tombstone exactly at the compact revision is kept by newer etcd
        # and dropped by older; it is skipped so both hash alike.
        if rev.main == self.compact_revision and len(k) > REV_BYTES_LEN and is_tombstone(k):
            return
        self._crc = crc32c.crc32c(v, crc32c.crc32c(k, self._crc))

    def result(self) -> KeyValueHash:
        return KeyValueHash(self._crc, self.compact_revision, self.revision)


def hash_entries(entries, compact_revision: int, revision: int, keep: set[Revision]) -> KeyValueHash:
    """Hash an iterable of (backend key, value) pairs in key order."""
    h = KVHasher(compact_revision, revision, keep)
    for k, v in entries:
        h.write(k, v)
    return h.result()

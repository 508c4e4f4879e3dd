"""LMDB's meta pages, the synced-meta record, and the check before mapping.

LMDB keeps two meta pages at the start of ``data.mdb`` (pages 0 and 1);
transaction ``t`` writes its meta into page ``t % 2`` and an opening LMDB
uses the page with the higher transaction ID.  Each meta page names the
roots of the free-page tree and the main tree, the last page in use and the
transaction ID.  Layout on 64-bit builds (LMDB 0.9, ``MDB_meta`` after a
16-byte page header; all integers native little-endian)::

    offset  size  field
        16     4  mm_magic      0xBEEFC0DE
        20     4  mm_version    1
        40     4  mm_psize      (mm_dbs[FREE].md_pad)
        80     8  free-tree root page (mm_dbs[FREE].md_root)
       128     8  main-tree root page (mm_dbs[MAIN].md_root)
       136     8  mm_last_pg
       144     8  mm_txnid

The backend commits without fsync and syncs only at checkpoints (see
``backend.py`` and ``docs/durability.md``).  After a power cut the page
cache may have written back any meta page written since the last sync
while the pages it points at never made it; LMDB would map that tree and
fail with ``MDB_CORRUPTED``, SIGBUS, or, worst, read stale pages as data.
So every checkpoint records, after the fsync that made it durable, the
meta page of the synced state in ``<db>/synced-meta`` (:class:`SyncedMeta`),
and :func:`prepare` runs before LMDB maps the file:

* the file's newest meta page equals the record: nothing to do;
* it is newer than the record (commits after the last checkpoint, synced
  or not -- a killed process and a cut machine look the same), or a meta
  page is unreadable (torn): both meta pages are rewritten with the
  recorded one and synced, rolling LMDB back to the checkpoint, whose tree
  is intact (the backend kept its pages from being reused, see
  ``backend.py``); the WAL replays the rest;
* older than the record, or a tree that cannot fit in the file (which
  LMDB would answer with SIGBUS): :class:`~mvcckv.errors.BackendCorruptError`,
  naming what is wrong.

A record with no meta (written before a new file's first checkpoint)
means the file holds nothing durable yet, and it is recreated.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass

import crc32c

from mvcckv.errors import BackendCorruptError
from mvcckv.fsutil import fsync_dir

log = logging.getLogger("mvcckv.backend")

MAGIC = 0xBEEFC0DE
VERSION = 1
META_BYTES = 152  # page header and MDB_meta: everything a meta page holds
INVALID_PAGE = (1 << 64) - 1
RECORD_NAME = "synced-meta"

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_RECORD_MAGIC = b"MVCKMETA"
_HEADER_PAGE_SIZES = (4096, 8192, 16384, 65536, 2048, 1024, 512, 32768)


@dataclass(frozen=True)
class Meta:
    """One meta page as read from the file."""

    slot: int
    raw: bytes  # META_BYTES from the start of the page

    @property
    def valid(self) -> bool:
        return (
            len(self.raw) == META_BYTES
            and _U32.unpack_from(self.raw, 16)[0] == MAGIC
            and _U32.unpack_from(self.raw, 20)[0] == VERSION
        )

    @property
    def psize(self) -> int:
        return _U32.unpack_from(self.raw, 40)[0]

    @property
    def txnid(self) -> int:
        return _U64.unpack_from(self.raw, 144)[0]

    @property
    def last_pg(self) -> int:
        return _U64.unpack_from(self.raw, 136)[0]

    @property
    def roots(self) -> tuple[int, int]:
        return _U64.unpack_from(self.raw, 80)[0], _U64.unpack_from(self.raw, 128)[0]

    @property
    def body(self) -> bytes:
        """The meta without the page header (which names the slot)."""
        return self.raw[16:]


def read_metas(path: str, psize: int | None = None) -> list[Meta]:
    """Both meta pages of ``path`` (invalid ones included, as read)."""
    with open(path, "rb") as f:
        first = f.read(META_BYTES)
        m0 = Meta(0, first)
        if psize is None:
            psize = m0.psize if m0.valid else None
        candidates = [psize] if psize else list(_HEADER_PAGE_SIZES)
        m1 = Meta(1, b"")
        for ps in candidates:
            f.seek(ps)
            m1 = Meta(1, f.read(META_BYTES))
            if m1.valid:
                break
    return [m0, m1]


def newest(metas: list[Meta]) -> Meta | None:
    """The meta page LMDB would use: the valid one with the higher txnid."""
    valid = [m for m in metas if m.valid]
    return max(valid, key=lambda m: m.txnid) if valid else None


def check(path: str, meta: Meta) -> None:
    """Refuse a meta page whose tree cannot be in the file (SIGBUS, garbage)."""
    psize = meta.psize
    if psize < 512 or psize > 65536 or psize & (psize - 1):
        raise BackendCorruptError(f"backend {path}: meta page {meta.slot} has page size {psize}")
    size = os.path.getsize(path)
    pages = size // psize
    if meta.last_pg < 1 or meta.last_pg >= pages:
        raise BackendCorruptError(
            f"backend {path} is truncated: {size} bytes ({pages} pages), but its meta page "
            f"(txn {meta.txnid}) uses pages up to {meta.last_pg}"
        )
    for name, root in zip(("free-page", "main"), meta.roots):
        if root != INVALID_PAGE and not 2 <= root <= meta.last_pg:
            raise BackendCorruptError(
                f"backend {path}: meta page {meta.slot} (txn {meta.txnid}) has its {name} tree "
                f"root at page {root}, outside pages 2..{meta.last_pg}"
            )


class SyncedMeta:
    """The record of the last synced meta page(s), beside ``data.mdb``.

    Format: ``MVCKMETA``, a u32 count, then per meta page its u32 page size
    and META_BYTES, then a CRC-32C of all that.  Replaced atomically
    (write, fsync, rename, fsync directory).  It holds one meta page
    normally, none before a new file's first checkpoint, and two while a
    defrag swaps files (the old file's and the new one's, both synced and
    unchanged until the record holds one again, so the file on disk
    matches one of them exactly).
    """

    def __init__(self, dirpath: str):
        self.dirpath = dirpath
        self.path = os.path.join(dirpath, RECORD_NAME)

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def read(self) -> list[Meta]:
        with open(self.path, "rb") as f:
            data = f.read()
        body, crc = data[:-4], data[-4:]
        if len(data) < 16 or body[:8] != _RECORD_MAGIC or _U32.pack(crc32c.crc32c(body)) != crc:
            raise BackendCorruptError(f"backend record {self.path} is damaged (bad magic or CRC)")
        count = _U32.unpack_from(body, 8)[0]
        metas = []
        for i in range(count):
            start = 12 + i * (4 + META_BYTES) + 4
            meta = Meta(-1, body[start : start + META_BYTES])
            if not meta.valid:
                raise BackendCorruptError(f"backend record {self.path}: entry {i} is not a valid meta page")
            metas.append(meta)
        if len(body) != 12 + count * (4 + META_BYTES) or count > 2:
            raise BackendCorruptError(f"backend record {self.path} has a wrong length for {count} entries")
        return metas

    def write(self, metas: list[Meta]) -> None:
        body = _RECORD_MAGIC + _U32.pack(len(metas))
        for meta in metas:
            body += _U32.pack(meta.psize) + meta.raw
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, body + _U32.pack(crc32c.crc32c(body)))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        fsync_dir(self.dirpath)


def prepare(dirpath: str, data_file: str) -> None:
    """Check ``data_file`` against its record, rolling back unsynced commits.

    Runs before LMDB maps the file; see the module docstring for the cases.
    """
    record = SyncedMeta(dirpath)
    if not record.exists():
        if os.path.exists(data_file):
            # A data dir from before the record existed: trust LMDB's
            # choice, but never map a file that cannot hold its tree.
            _check_newest(data_file, read_metas(data_file))
        return
    entries = record.read()
    if not entries:
        # Created, but never checkpointed: nothing in it was durable, and
        # no WAL record was written before the first checkpoint.
        if os.path.exists(data_file):
            log.warning("%s: never checkpointed; starting it afresh", data_file)
            os.unlink(data_file)
        return
    if not os.path.exists(data_file):
        raise BackendCorruptError(f"backend {data_file} is missing, but {record.path} says it was synced")
    metas = read_metas(data_file, entries[0].psize)
    current = newest(metas)
    other = [m for m in metas if m is not current]
    exact = current is not None and all(m.valid for m in other) and any(e.body == current.body for e in entries)
    if exact:
        check(data_file, current)
        return
    if len(entries) > 1:
        raise BackendCorruptError(
            f"backend {data_file} matches neither file of the defrag {record.path} recorded"
        )
    synced = entries[0]
    if current is not None and current.txnid < synced.txnid:
        raise BackendCorruptError(
            f"backend {data_file} has lost synced data: its newest meta page is txn "
            f"{current.txnid}, but txn {synced.txnid} was synced ({record.path})"
        )
    log.warning(
        "%s: rolling back from txn %s to the last synced txn %d; the WAL replays the rest",
        data_file, "?" if current is None else current.txnid, synced.txnid,
    )
    check(data_file, Meta(synced.txnid % 2, synced.raw))
    fd = os.open(data_file, os.O_WRONLY | os.O_CLOEXEC)
    try:
        for slot in (0, 1):
            # The page header's first field is the page number (the slot).
            os.pwrite(fd, _U64.pack(slot) + synced.raw[8:], slot * synced.psize)
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_newest(data_file: str, metas: list[Meta]) -> None:
    current = newest(metas)
    if current is None:
        raise BackendCorruptError(f"backend {data_file} has no valid meta page (not an LMDB file, or damaged)")
    bad = [m.slot for m in metas if not m.valid]
    if bad:
        raise BackendCorruptError(f"backend {data_file}: meta page {bad[0]} is damaged")
    check(data_file, current)

"""Compaction and HashKV over the ``config`` table (§7.1, §10.3).

The article compacts with ``DELETE FROM config WHERE revision < R``, which
loses the value of every key that was last written before ``R``.  etcd's
rule (index.py's, for the same history) keeps, per key, the newest row with
``revision <= R`` if it is a put, or if it is a tombstone exactly at ``R``,
and every row above ``R``; everything else at or below ``R`` goes::

    foo: put@2 put@3 del@4 put@6      compact(5) keeps put@6 only
                                      compact(4) keeps del@4 (and put@6)
                                      compact(3) keeps put@3, del@4, put@6

So a row at or below ``R`` is deleted when a newer row of its key is also at
or below ``R``, or when it is a tombstone below ``R``.  Deletion runs in
batches of revisions, one short transaction each, so writers are never held
up for long; a session advisory lock keeps two processes from compacting
at once, and the last batch records ``finished_compact_revision``.

Entries are hashed exactly as the LMDB engine hashes its backend entries:
the 17/18-byte revision key and the encoded ``KeyValue`` of each row (see
:func:`entry`), so both engines give the same HashKV for the same history.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import psycopg

from mvcckv.hash import HASH_HISTORY, KeyValueHash, KVHasher
from mvcckv.pb import kv_pb2
from mvcckv.revision import Revision, to_bytes

log = logging.getLogger("mvcckv.pg")

# Rows of revisions <= R in backend-key order, as hashed.
_ENTRIES = """SELECT revision, sub, tombstone, key, value, create_revision, version, lease
    FROM config WHERE revision <= %s ORDER BY revision, sub"""

# Per key, the newest row at or below R.
_NEWEST_AT = """SELECT revision, sub, tombstone FROM (
    SELECT DISTINCT ON (key) key, revision, sub, tombstone FROM config
    WHERE revision <= %(at)s ORDER BY key, revision DESC, sub DESC) v"""

# What compaction at R keeps at or below R (index.py's "available" set) ...
_KEPT = _NEWEST_AT + " WHERE NOT tombstone OR revision = %(at)s"
# ... and what HashKV at R treats as kept (index.py's keep(): no tombstones).
_LIVE = _NEWEST_AT + " WHERE NOT tombstone"

_DELETE_BATCH = """DELETE FROM config c
    WHERE c.revision BETWEEN %(lo)s AND %(hi)s
      AND ((c.tombstone AND c.revision < %(at)s)
           OR EXISTS (SELECT 1 FROM config n
                      WHERE n.key = c.key AND n.revision <= %(at)s
                        AND (n.revision, n.sub) > (c.revision, c.sub)))"""


def entry(row) -> tuple[bytes, bytes]:
    """A row as the LMDB engine's backend entry: (revision key, KeyValue bytes)."""
    revision, sub, tombstone, key, value, create_revision, version, lease = row
    if tombstone:
        return to_bytes((revision, sub), tombstone=True), kv_pb2.KeyValue(key=key).SerializeToString()
    kv = kv_pb2.KeyValue(
        key=key, create_revision=create_revision, mod_revision=revision,
        version=version, value=value or b"", lease=lease,
    )
    return to_bytes((revision, sub)), kv.SerializeToString()


def _revisions(conn, query: str, at: int) -> set[Revision]:
    return {Revision(r, s) for r, s, _ in conn.execute(query, {"at": at})}


def _hash_rows(conn: psycopg.Connection, hasher: KVHasher, at: int) -> KeyValueHash:
    # A named (server-side) cursor streams the rows: memory stays bounded
    # whatever the history's size.
    with conn.cursor(name="mvcckv_hash") as cur:
        cur.itersize = 2000
        cur.execute(_ENTRIES, (at,))
        for row in cur:
            hasher.write(*entry(row))
    return hasher.result()


def hash_kv(conn: psycopg.Connection, compact_rev: int, revision: int, current: int) -> KeyValueHash:
    """HashKV at ``revision`` (already checked against the compaction and
    current revisions) on a store compacted at ``compact_rev``.

    As the LMDB engine and etcd: a hash recorded by a compaction answers a
    request for exactly its revision (so 0, "current", never matches one);
    only 0 means current, and a negative revision hashes nothing but the
    bucket name.  ``conn`` must be in a REPEATABLE READ transaction.
    """
    if revision > 0:
        row = conn.execute(
            "SELECT hash, compact_revision FROM compaction_hash WHERE revision = %s", (revision,)
        ).fetchone()
        if row is not None:
            return KeyValueHash(row[0], row[1], revision)
    rev = current if revision == 0 else revision
    keep = _revisions(conn, _LIVE, rev)
    return _hash_rows(conn, KVHasher(compact_rev, rev, keep), rev)


DONE, FINISHED_BEFORE, BUSY, STOPPED = "done", "finished before", "busy", "stopped"


def compact(
    conn: psycopg.Connection,
    at: int,
    prev: int,
    record_hash: bool,
    *,
    batch_revisions: int,
    pause: float,
    stopping: Callable[[], bool],
) -> str:
    """Physically compact at ``at`` (already recorded as the compaction
    revision); ``prev`` is the compaction revision before it.  ``conn`` is an
    autocommit connection.

    Returns DONE; FINISHED_BEFORE if a compaction at or above ``at`` already
    finished; BUSY if another session is compacting (ask again later);
    STOPPED if ``stopping()`` said so between batches.
    """
    lock = "hashtext('mvcckv-compact:' || current_schema())"
    if not conn.execute(f"SELECT pg_try_advisory_lock({lock})").fetchone()[0]:
        return BUSY
    try:
        finished = conn.execute("SELECT finished_compact_revision FROM meta").fetchone()[0]
        if finished >= at:
            return FINISHED_BEFORE
        if record_hash:
            with conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                keep = _revisions(conn, _KEPT, at)
                h = _hash_rows(conn, KVHasher(prev, at, keep), at)
            conn.execute(
                "INSERT INTO compaction_hash (revision, compact_revision, hash) VALUES (%s, %s, %s) "
                "ON CONFLICT (revision) DO NOTHING",
                (h.revision, h.compact_revision, h.hash),
            )
            conn.execute(
                "DELETE FROM compaction_hash WHERE revision NOT IN "
                "(SELECT revision FROM compaction_hash ORDER BY revision DESC LIMIT %s)",
                (HASH_HISTORY,),
            )
            log.info("compaction at revision %d: hash %d", at, h.hash)
        lo = conn.execute("SELECT coalesce(min(revision), %s) FROM config", (at,)).fetchone()[0]
        removed = 0
        while True:
            if stopping():
                return STOPPED
            hi = min(lo + batch_revisions - 1, at)
            with conn.transaction():
                removed += conn.execute(_DELETE_BATCH, {"lo": lo, "hi": hi, "at": at}).rowcount
                if hi >= at:
                    conn.execute(
                        "UPDATE meta SET finished_compact_revision = greatest(finished_compact_revision, %s)",
                        (at,),
                    )
                    break
            lo = hi + 1
            time.sleep(pause)
        log.info("finished compaction at revision %d (%d rows removed)", at, removed)
        return DONE
    finally:
        conn.execute(f"SELECT pg_advisory_unlock({lock})")

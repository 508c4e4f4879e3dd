"""Read and write views over the ``config`` table: txn.py's view contract in SQL.

``txn.py`` holds etcd's request rules (range options, compares, the txn's
check-then-execute order) and runs them over a *view*; these views answer
its questions with SQL on one connection inside one transaction, so a Txn
on PostgreSQL is exactly a Txn on the LMDB engine.

Which row of a key is visible at revision ``R``: its newest row with
``revision <= R``, unless that row is a tombstone (the article's get1 /
get_all, made exact with ``sub``)::

    key  revision sub tombstone value
    foo  2        0   f         a      -- visible at 2
    foo  3        0   f         b      -- visible at 3
    foo  4        0   t                -- foo absent at 4
    foo  5        1   f         c      -- visible at 5.., version 1 again

A write view holds the ``meta`` row lock (see schema.py), so nothing else
writes while it runs, and its own inserts are visible to its later
statements: a txn's ranges, ``prev_kv`` and deletes see its earlier puts, as
etcd's do (§5.4).
"""

from __future__ import annotations

import struct

from mvcckv.pb import kv_pb2
from mvcckv.txn import read_revision

KeyValue = kv_pb2.KeyValue

_TO_THE_END = b"\0"

# The WHERE clause selecting a range's rows, by range kind.
_WHERE = {
    "point": "key = %(key)s",
    "from": "key >= %(key)s",
    "interval": "key >= %(key)s AND key < %(end)s",
}



def _newest(where: str, rev: str) -> str:
    return f"""
    SELECT DISTINCT ON (key) key, revision, tombstone, create_revision, version, value, lease
    FROM config WHERE {where} AND revision <= {rev}
    ORDER BY key, revision DESC, sub DESC"""


def _rows(where: str, rev: str) -> str:
    return f"""SELECT key, revision, create_revision, version, value, lease
    FROM ({_newest(where, rev)}) v WHERE NOT tombstone ORDER BY key LIMIT %(limit)s"""


def _count(where: str, rev: str) -> str:
    return f"SELECT count(*) FROM ({_newest(where, rev)}) v WHERE NOT tombstone"


_ROWS = {kind: _rows(where, "%(rev)s") for kind, where in _WHERE.items()}
_COUNT = {kind: _count(where, "%(rev)s") for kind, where in _WHERE.items()}
_GET = """SELECT key, revision, create_revision, version, value, lease, tombstone
    FROM config WHERE key = %(key)s AND revision <= %(rev)s
    ORDER BY revision DESC, sub DESC LIMIT 1"""

# A put: read the key's newest row and insert the next one in one round
# trip.  A live previous row keeps create_revision and counts the version
# on; after a tombstone (or none) the key starts a new life.
_PUT = """
WITH prev AS (
    SELECT tombstone, create_revision, version, lease FROM config
    WHERE key = %(key)s ORDER BY revision DESC, sub DESC LIMIT 1
), live AS (
    SELECT create_revision, version, lease FROM prev WHERE NOT tombstone
), ins AS (
    INSERT INTO config (key, revision, sub, value, create_revision, version, lease)
    SELECT %(key)s, %(rev)s, %(sub)s, %(value)s,
           coalesce(live.create_revision, %(rev)s), coalesce(live.version, 0) + 1, %(lease)s
    FROM (VALUES (1)) one LEFT JOIN live ON true
    RETURNING create_revision, version
)
SELECT ins.create_revision, ins.version, coalesce(live.lease, 0)
FROM ins LEFT JOIN live ON true"""

# A delete: tombstone every live key of the range, sub revisions in key
# order (§2.1); returns the deleted keys and the leases they were on.
_DELETE_WHERE = dict(_WHERE, keys="key = ANY(%(keys)s)")
_DELETE = {
    kind: f"""
WITH live AS MATERIALIZED (
    SELECT key, lease FROM (
        SELECT DISTINCT ON (key) key, tombstone, lease FROM config WHERE {where}
        ORDER BY key, revision DESC, sub DESC) v
    WHERE NOT tombstone
), ins AS (
    INSERT INTO config (key, revision, sub, tombstone)
    SELECT key, %(rev)s, %(sub)s + (row_number() OVER (ORDER BY key))::integer - 1, true FROM live
)
SELECT key, lease FROM live ORDER BY key"""
    for kind, where in _DELETE_WHERE.items()
}


def range_kind(key: bytes, end: bytes) -> str | None:
    """The kind of ``[key, end)`` in etcd's conventions; None if it is empty."""
    if not end:
        return "point"
    if end == _TO_THE_END:
        return "from"
    if end <= key:
        return None  # an end at or before the start selects nothing, no error
    return "interval"


def to_kv(row) -> KeyValue:
    key, revision, create_revision, version, value, lease = row[:6]
    return KeyValue(
        key=key, create_revision=create_revision, mod_revision=revision,
        version=version, value=value or b"", lease=lease,
    )


def range_at(cur, key: bytes, end: bytes, rev: int, limit: int, count_only: bool) -> tuple[list[KeyValue], int]:
    """(kvs, count) of the keys in ``[key, end)`` visible at ``rev``.

    ``limit`` > 0 caps the kvs; ``count`` is always over the whole range.
    """
    kind = range_kind(key, end)
    if kind is None:
        return [], 0
    params = {"key": key, "end": end, "rev": rev, "limit": limit if limit > 0 else None}
    if kind == "point":
        row = cur.execute(_GET, params).fetchone()
        if row is None or row[6]:
            return [], 0
        return ([] if count_only else [to_kv(row)]), 1
    if count_only:
        return [], cur.execute(_COUNT[kind], params).fetchone()[0]
    kvs = [to_kv(row) for row in cur.execute(_ROWS[kind], params)]
    if 0 < limit <= len(kvs):
        # The page is full: only a count query knows how many there are.
        return kvs, cur.execute(_COUNT[kind], params).fetchone()[0]
    return kvs, len(kvs)


# -- a Range in one statement ---------------------------------------------------
#
# A Range needs the meta row (current revision, compaction, auth generation)
# and the rows at the revision it asks for, from one snapshot.  One
# statement sees one snapshot, so it needs no transaction: run in
# autocommit it is a single round trip, no BEGIN and no COMMIT.  The
# revision asked for is resolved in SQL (``at`` <= 0: the current one); one
# above the current revision or below the compaction is refused afterwards
# by read_revision, from the same statement's meta (its rows are dropped).
#
# Columns: revision, compact_revision, auth generation, total (count of the
# whole range, NULL when the rows give it), then a row's key, revision,
# create_revision, version, value, lease, tombstone (key NULL: no row).
_AT = "(CASE WHEN %(at)s::bigint > 0 THEN %(at)s::bigint ELSE m.revision END)"
_TOTAL_AND_ROWS = {
    # (need the total, fetch rows)
    "point": (False, f"""SELECT key, revision, create_revision, version, value, lease, tombstone FROM config
        WHERE key = %(key)s AND revision <= {_AT} ORDER BY revision DESC, sub DESC LIMIT 1"""),
    **{kind: (True, f"SELECT *, false FROM ({_rows(where, _AT)}) r") for kind, where in _WHERE.items()
       if kind != "point"},
}


def _read_sql(kind: str | None, total: bool, rows: bool) -> str:
    if kind is None:  # an empty range: the meta alone
        count = "0::bigint"
    else:
        count = f"({_count(_WHERE[kind], _AT)})" if total else "NULL::bigint"
    # LIMIT 1 keeps the one-row meta subquery from being pulled up into
    # the join, which would evaluate the count once per row, and tells the
    # planner it is one row.  Until ``meta`` is first analyzed PostgreSQL
    # guesses ~118 rows per page (at least 10 pages), and that guess
    # multiplies the cost of the lateral join: with OFFSET 0 a range over
    # 100,000 rows (or a point read once meta reached ~100 pages) passed
    # jit_above_cost and each execution spent 7-15 ms compiling (~0.05 ms
    # running), a range with a count over 200 ms.
    meta = f"""SELECT revision, compact_revision, (SELECT 2 * revision + enabled::int FROM auth_meta) AS auth,
        {count} AS total FROM meta m LIMIT 1"""
    if not rows:
        return f"SELECT *, NULL, NULL, NULL, NULL, NULL, NULL, NULL FROM ({meta}) m"
    return f"SELECT * FROM ({meta}) m LEFT JOIN LATERAL ({_TOTAL_AND_ROWS[kind][1]}) r ON true"


_READ = {
    (kind, total, rows): _read_sql(kind, total, rows)
    for kind in _WHERE for total in (False, True) for rows in (False, True)
    if (total or rows) and not (kind == "point" and total)
}
_READ[None, True, False] = _read_sql(None, True, False)


def read_statement(key: bytes, end: bytes, at_rev: int, limit: int, count_only: bool) -> tuple[str, dict]:
    """The one statement answering ``range_keys(key, end, at_rev, limit,
    count_only)`` with the meta it needs (parse with :func:`read_result`)."""
    kind = range_kind(key, end)
    if kind is None:
        need_total, rows = True, False
    elif kind == "point":
        need_total, rows = False, True
    else:
        # Without a limit the rows give the count; with one a full page
        # does not, so the count comes along (an empty range costs little).
        need_total, rows = count_only or limit > 0, not count_only
    params = {"key": key, "end": end, "at": at_rev, "limit": limit if limit > 0 else None}
    return _READ[kind, need_total, rows], params


# The read statements for libpq directly (aio.py): $n parameters, binary.
READ_PARAM_TYPES = (17, 17, 20, 20)  # bytea, bytea, int8, int8
_NUMBERED = {
    statement: statement.replace("%(key)s", "$1").replace("%(end)s", "$2").replace(
        "%(at)s", "$3").replace("%(limit)s", "$4")
    for statement in _READ.values()
}
_INT8 = struct.Struct("!q")


def numbered(statement: str, params: dict) -> tuple[str, list]:
    """A :func:`read_statement` as ``$n`` SQL (parameter types
    READ_PARAM_TYPES) and its parameters in binary."""
    limit = params["limit"]
    return _NUMBERED[statement], [
        params["key"], params["end"], _INT8.pack(params["at"]), None if limit is None else _INT8.pack(limit),
    ]


def read_result(rows: list, count_only: bool) -> tuple[int, int, int, list[KeyValue], int]:
    """(current revision, compact revision, auth generation, kvs, count)
    from the rows of a :func:`read_statement`."""
    current, compact, auth, total = rows[0][:4]
    found = [r[4:] for r in rows if r[4] is not None and not r[10]]
    kvs = [] if count_only else [to_kv(r) for r in found]
    return current, compact, auth, kvs, len(found) if total is None else total


def lease_exists(cur, lease_id: int) -> bool:
    return cur.execute("SELECT 1 FROM lease WHERE id = %s", (lease_id,)).fetchone() is not None


class ReadView:
    """A consistent read at one revision (txn.py's ReadView), on a cursor
    inside a REPEATABLE READ transaction or a write view's transaction."""

    __slots__ = ("_cur", "begin_rev", "first_rev")

    def __init__(self, cur, rev: int, first_rev: int):
        self._cur = cur
        self.begin_rev = rev
        self.first_rev = first_rev

    @property
    def rev(self) -> int:
        return self.begin_rev

    def range_keys(self, key: bytes, end: bytes, at_rev: int, limit: int, count_only: bool):
        """(kvs, count, header revision) of keys in range at ``at_rev``."""
        cur = self.rev
        rev = read_revision(cur, at_rev, self.first_rev)
        kvs, count = range_at(self._cur, key, end, rev, limit, count_only)
        return kvs, count, cur

    def lease_exists(self, lease_id: int) -> bool:
        return lease_exists(self._cur, lease_id)


class WriteView(ReadView):
    """A write transaction: one new main revision if anything changes.

    ``changes`` lists what it did as (is_delete, KeyValue), in sub order:
    the events watchers get.
    """

    __slots__ = ("changes",)

    def __init__(self, cur, rev: int, first_rev: int):
        super().__init__(cur, rev, first_rev)
        self.changes: list[tuple[bool, KeyValue]] = []

    @property
    def rev(self) -> int:
        return self.begin_rev + 1 if self.changes else self.begin_rev

    def put(self, key: bytes, value: bytes, lease: int) -> int:
        rev = self.begin_rev + 1
        params = {"key": key, "rev": rev, "sub": len(self.changes), "value": value, "lease": lease}
        create_rev, version, old_lease = self._cur.execute(_PUT, params).fetchone()
        if old_lease != lease:
            if lease:
                self._cur.execute(
                    "INSERT INTO key_lease (key, lease) VALUES (%s, %s) "
                    "ON CONFLICT (key) DO UPDATE SET lease = EXCLUDED.lease",
                    (key, lease),
                )
            else:
                self._cur.execute("DELETE FROM key_lease WHERE key = %s", (key,))
        self.changes.append((False, KeyValue(
            key=key, create_revision=create_rev, mod_revision=rev, version=version, value=value, lease=lease,
        )))
        return rev

    def delete_range(self, key: bytes, end: bytes) -> tuple[int, int]:
        kind = range_kind(key, end)
        deleted = self._delete(kind, {"key": key, "end": end}) if kind else 0
        if deleted or self.changes:
            return deleted, self.begin_rev + 1
        return 0, self.begin_rev

    def delete_keys(self, keys: list[bytes]) -> int:
        """Tombstone those of ``keys`` that are live (a lease revoke)."""
        return self._delete("keys", {"keys": keys}) if keys else 0

    def _delete(self, kind: str, params: dict) -> int:
        rev = self.begin_rev + 1
        params.update(rev=rev, sub=len(self.changes))
        rows = self._cur.execute(_DELETE[kind], params).fetchall()
        leased = [k for k, lease in rows if lease]
        if leased:
            self._cur.execute("DELETE FROM key_lease WHERE key = ANY(%s)", (leased,))
        # Watchers see a DELETE carrying the key and the deletion revision.
        self.changes.extend((True, KeyValue(key=k, mod_revision=rev)) for k, _ in rows)
        return len(rows)

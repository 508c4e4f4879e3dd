"""Restoring an etcd snapshot into a PostgreSQL schema.

The schema is created (or migrated) as the engine would, and must hold no
data yet: no revision past 1, no row in ``config``, ``lease`` or the auth
tables.  Everything is loaded in one transaction, so a bad file (the bbolt
reader raises on the first corrupt page) leaves the schema as it was.

How etcd's buckets become rows:

* ``key``: one ``config`` row per revision, columns decoded from the
  stored ``KeyValue`` (a tombstone keeps only its key, as etcd stores it);
  ``compaction.entry`` turns each row back into the same bytes, so HashKV
  is unchanged.  A key's lease (``key_lease``) is the one its newest
  revision carries, as the LMDB engine derives it when it opens.
* ``lease``: ``ttl`` is the granted TTL; the lease expires after its
  checkpointed remaining TTL if etcd recorded one, else after its TTL,
  counted from the restore (etcd's own restore lets leases run from the
  start of the restored member too).
* ``meta``: the revision is the largest stored main revision (or the
  compaction's, if larger); the compact revisions come from
  ``scheduledCompactRev`` / ``finishedCompactRev``.
* ``auth``, ``authUsers``, ``authRoles``, ``alarm``: the same bytes.

Rows go in with ``COPY`` while the change-notification trigger is off for
the transaction: a restore is no change for watchers to hear of, and a
notification per row would flood the channel.
"""

from __future__ import annotations

from collections.abc import Callable

import psycopg
from google.protobuf.message import DecodeError
from psycopg import sql

from mvcckv.auth import ENABLED_KEY, REVISION_KEY
from mvcckv.backend import (
    ALARM,
    AUTH,
    AUTH_ROLES,
    AUTH_USERS,
    KEY,
    LEASE,
    META,
    META_FINISHED_COMPACT,
    META_SCHEDULED_COMPACT,
    decode_u64,
)
from mvcckv.bbolt import Reader
from mvcckv.errors import SnapshotError
from mvcckv.etcdfile import FileStatus, check_key_entry, scan
from mvcckv.pb import kv_pb2, lease_pb2
from mvcckv.pb import rpc_pb2 as pb
from mvcckv.pg.engine import describe_dsn, schema_of
from mvcckv.pg.schema import check_schema_name, migrate
from mvcckv.revision import REV_BYTES_LEN, from_bytes

_NOT_EMPTY = """
    SELECT (SELECT revision FROM meta) > 1
        OR EXISTS (SELECT 1 FROM config) OR EXISTS (SELECT 1 FROM lease)
        OR EXISTS (SELECT 1 FROM auth_user) OR EXISTS (SELECT 1 FROM auth_role)
"""


def load(dsn: str, reader: Reader, progress: Callable[[int], object] = lambda n: None) -> FileStatus:
    """Load the etcd file ``reader`` into the schema ``dsn`` names; the file's status."""
    schema = check_schema_name(schema_of(dsn))
    where = f"PostgreSQL at {describe_dsn(dsn)}, schema {schema}"
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            migrate(conn, schema)
            with conn.transaction():
                conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(schema)))
                conn.execute("LOCK TABLE meta, config IN EXCLUSIVE MODE")
                if conn.execute(_NOT_EMPTY).fetchone()[0]:
                    raise SnapshotError(f"{where}: the schema already holds data; restore needs an empty one")
                conn.execute("ALTER TABLE config DISABLE TRIGGER notify_config_change")
                loader = _Loader(conn, reader.name)
                st = scan(reader, loader.sink, progress)
                loader.finish()
                conn.execute("ALTER TABLE config ENABLE TRIGGER notify_config_change")
    except psycopg.Error as e:
        raise SnapshotError(f"{where}: restore failed: {' '.join(str(e).split())}") from None
    except DecodeError as e:
        raise SnapshotError(f"{reader.name}: a lease or alarm that does not decode: {e}") from None
    return st


class _Loader:
    """Receives each bucket's items in file order and writes the rows."""

    def __init__(self, conn: psycopg.Connection, name: str):
        self._conn = conn
        self._name = name
        self._revision = 1
        self._compact = -1
        self._finished = -1
        self._auth_enabled = False
        self._auth_revision = 1
        self._key_lease: dict[bytes, int] = {}
        self._lease_ids: set[int] = set()

    def sink(self, bucket: bytes):
        """A writer of ``(key, value)`` for ``bucket``, or None to skip it."""
        write = {
            KEY: self._keys, LEASE: self._leases, META: self._meta, AUTH: self._auth,
            AUTH_USERS: self._users, AUTH_ROLES: self._roles, ALARM: self._alarms,
        }.get(bucket)
        if write is None:
            return None
        return lambda batches: write(kv for items in batches for kv in items)

    def _keys(self, items) -> None:
        parse = kv_pb2.KeyValue.FromString
        key_lease = self._key_lease
        main = 0
        with self._conn.cursor().copy(
            "COPY config (key, revision, sub, tombstone, value, create_revision, version, lease) FROM STDIN"
        ) as copy:
            for k, v in items:
                check_key_entry(self._name, k, v)
                rev = from_bytes(k)
                main = rev.main
                kv = parse(v)
                tomb = len(k) > REV_BYTES_LEN
                if tomb:
                    copy.write_row((kv.key, main, rev.sub, True, None, 0, 0, 0))
                    key_lease.pop(kv.key, None)
                else:
                    copy.write_row((kv.key, main, rev.sub, False, kv.value, kv.create_revision, kv.version, kv.lease))
                    if kv.lease:
                        key_lease[kv.key] = kv.lease
                    else:
                        key_lease.pop(kv.key, None)
        self._revision = max(self._revision, main)

    def _leases(self, items) -> None:
        rows = []
        for _, v in items:
            lease = lease_pb2.Lease.FromString(v)
            remaining = lease.RemainingTTL if lease.RemainingTTL > 0 else lease.TTL
            rows.append((lease.ID, lease.TTL, remaining))
            self._lease_ids.add(lease.ID)
        with self._conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO lease (id, ttl, last_keepalive, expires_at)"
                " VALUES (%s, %s, clock_timestamp(), clock_timestamp() + make_interval(secs => %s))",
                rows,
            )

    def _meta(self, items) -> None:
        for k, v in items:
            if k == META_SCHEDULED_COMPACT:
                self._compact = from_bytes(v).main
            elif k == META_FINISHED_COMPACT:
                self._finished = from_bytes(v).main

    def _auth(self, items) -> None:
        for k, v in items:
            if k == ENABLED_KEY:
                self._auth_enabled = v == b"\x01"
            elif k == REVISION_KEY:
                self._auth_revision = decode_u64(v)

    def _users(self, items) -> None:
        self._copy_pairs("auth_user", items)

    def _roles(self, items) -> None:
        self._copy_pairs("auth_role", items)

    def _copy_pairs(self, table: str, items) -> None:
        with self._conn.cursor().copy(f"COPY {table} (name, data) FROM STDIN") as copy:
            for k, v in items:
                copy.write_row((k, v))

    def _alarms(self, items) -> None:
        with self._conn.cursor() as cur:
            for k, _ in items:
                am = pb.AlarmMember.FromString(k)
                # member IDs are unsigned 64-bit; the column is a signed bigint
                member = am.memberID - (1 << 64) if am.memberID >= 1 << 63 else am.memberID
                cur.execute("INSERT INTO alarm (member_id, alarm) VALUES (%s, %s)", (member, am.alarm))

    def finish(self) -> None:
        conn = self._conn
        # Compaction may have removed the newest revisions; the revision
        # never goes backwards.
        revision = max(self._revision, self._compact, self._finished)
        conn.execute(
            "UPDATE meta SET revision = %s, compact_revision = %s, finished_compact_revision = %s",
            (revision, self._compact, self._finished),
        )
        with conn.cursor().copy("COPY key_lease (key, lease) FROM STDIN") as copy:
            for key, lease in self._key_lease.items():
                # A key attached to a lease the file does not hold stays
                # unattached, as the LMDB engine leaves it when it opens.
                if lease in self._lease_ids:
                    copy.write_row((key, lease))
        conn.execute(
            "UPDATE auth_meta SET enabled = %s, revision = %s, enabled_revision = %s",
            (self._auth_enabled, self._auth_revision, self._auth_revision if self._auth_enabled else 0),
        )

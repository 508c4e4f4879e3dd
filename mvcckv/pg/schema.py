"""The PostgreSQL schema of the engine: versioned DDL, applied on first start.

The design is the article's ("etcd vs PostgreSQL", Jinhua Luo, 2023) — one
``config`` table of revisioned rows with tombstones, an AFTER INSERT trigger
calling ``pg_notify`` for watch, a ``lease`` table with the last keep-alive —
extended until etcd's semantics hold exactly:

``config``  one row per change: ``(key, revision, sub)`` is etcd's backend
            key (main and sub revision, §2.1), ``tombstone`` marks a
            deletion, and ``create_revision``, ``version``, ``lease`` are
            stored with the value so a row *is* etcd's ``KeyValue``.
            The article's primary key ``(key, revision)`` gains ``sub``:
            one txn may delete a key and put it again (a DeleteRange to
            ``"\\0"`` is not checked against the txn's puts, §5.3), which
            gives the key two rows of one revision.
``meta``    one row: the current revision, the compaction revision (reads
            below it fail) and how far physical compaction got.  The
            article's ``bigserial`` revision is replaced by this counter,
            locked ``FOR UPDATE`` by every writing transaction: a sequence
            hands out numbers in call order but transactions commit in any
            order (and a rolled-back one leaves a hole), so a watcher
            reading "everything after revision R" could miss a row that
            commits late.  With the lock, revisions are dense and commit in
            order, across every process sharing the database.
``key_lease`` which lease each live key is attached to, so a revoke finds
            its keys without scanning history.
``lease``   ``ttl`` and ``last_keepalive`` as in the article, plus
            ``expires_at`` (indexed) so expiry is an index range scan.
``lessor``  a heartbeat of the processes checking lease expiry: time during
            which none ran does not count against any lease (etcd renews
            every lease when a leader starts; this is the same promise for a
            database that outlives its servers).
``alarm``, ``compaction_hash``  etcd's alarm bucket and the HashKV values
            recorded at compaction time (§7.1 step 5e).
``auth_meta`` one row: auth on or off and the auth revision (the LMDB
            engine's ``authEnabled`` / ``authRevision``), and
            ``enabled_revision``, the auth revision auth was last turned on
            at, so another process can tell that auth went off and on again
            while it was not looking (etcd drops every token on a disable).
``put_many(keys, values)`` a function writing a batch of plain puts (no
            lease, prev_kv or ignore_*) under the revision lock, each its
            own revision, by the rules of view.py's single put: one
            statement, so in autocommit one round trip writes and commits
            a whole batch.
``auth_user``, ``auth_role``  name -> encoded ``authpb.User`` /
            ``authpb.Role``, byte for byte what the LMDB engine stores.
            Written only by a transaction holding the ``meta`` row lock, so
            auth changes are serialised with every other write.

Notifications (one channel per schema, :func:`channel`):

* every ``config`` row, as the article's ``row_to_json(NEW)`` — or, when
  that would not fit pg_notify's 8000-byte payload limit, only
  ``{"revision", "sub", "large": true}`` and the listener reads the row;
* a ``{"end": revision, "compact": compact_revision}`` marker from the
  ``meta`` update that ends every writing transaction, after its rows.
  The listener hands a revision to watchers once it has seen the marker
  covering it, so a transaction's events are never delivered in part;
* ``{"auth": generation}`` from every ``auth_meta`` update (every auth
  change), generation being ``2 * revision + enabled``, which grows with
  every change, enable included: other processes reload their auth state.

Migrations run in one transaction under an advisory lock, so several
servers starting at once on an empty database create the schema once.
"""

from __future__ import annotations

import re

import psycopg
from psycopg import sql

from mvcckv.pg.errors import SchemaError

SCHEMA_VERSION = 3

# Used in identifiers and in the server's search_path option, so kept to
# characters that need no quoting anywhere; short enough for the channel.
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,47}")

# Statements of each schema version; ``{channel}`` is the notify channel.
_MIGRATIONS: dict[int, list[str]] = {
    1: [
        """
        CREATE TABLE meta (
            id boolean PRIMARY KEY DEFAULT true CHECK (id),
            revision bigint NOT NULL DEFAULT 1,
            compact_revision bigint NOT NULL DEFAULT -1,
            finished_compact_revision bigint NOT NULL DEFAULT -1,
            cluster_id bigint,
            member_id bigint
        )""",
        "INSERT INTO meta DEFAULT VALUES",
        """
        CREATE TABLE config (
            key bytea NOT NULL,
            revision bigint NOT NULL,
            sub integer NOT NULL,
            tombstone boolean NOT NULL DEFAULT false,
            value bytea,
            create_revision bigint NOT NULL DEFAULT 0,
            version bigint NOT NULL DEFAULT 0,
            lease bigint NOT NULL DEFAULT 0,
            PRIMARY KEY (key, revision, sub)
        )""",
        "CREATE UNIQUE INDEX config_revision_idx ON config (revision, sub)",
        "CREATE TABLE key_lease (key bytea PRIMARY KEY, lease bigint NOT NULL)",
        "CREATE INDEX key_lease_lease_idx ON key_lease (lease)",
        """
        CREATE TABLE lease (
            id bigint PRIMARY KEY,
            ttl bigint NOT NULL,
            last_keepalive timestamptz NOT NULL,
            expires_at timestamptz NOT NULL
        )""",
        "CREATE INDEX lease_expires_at_idx ON lease (expires_at)",
        """
        CREATE TABLE lessor (
            id boolean PRIMARY KEY DEFAULT true CHECK (id),
            heartbeat timestamptz
        )""",
        "INSERT INTO lessor DEFAULT VALUES",
        """
        CREATE TABLE alarm (
            member_id bigint NOT NULL,
            alarm integer NOT NULL,
            PRIMARY KEY (member_id, alarm)
        )""",
        """
        CREATE TABLE compaction_hash (
            revision bigint PRIMARY KEY,
            compact_revision bigint NOT NULL,
            hash bigint NOT NULL
        )""",
        # The article's trigger, with its payload kept under the limit.
        """
        CREATE FUNCTION notify_config_change() RETURNS trigger
        LANGUAGE plpgsql AS $$
        DECLARE
            payload text := row_to_json(NEW)::text;
        BEGIN
            IF octet_length(payload) >= 8000 THEN
                payload := json_build_object(
                    'revision', NEW.revision, 'sub', NEW.sub, 'large', true)::text;
            END IF;
            PERFORM pg_notify(TG_ARGV[0], payload);
            RETURN NULL;
        END $$""",
        """
        CREATE TRIGGER notify_config_change AFTER INSERT ON config
            FOR EACH ROW EXECUTE FUNCTION notify_config_change('{channel}')""",
        """
        CREATE FUNCTION notify_commit() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify(TG_ARGV[0], json_build_object(
                'end', NEW.revision, 'compact', NEW.compact_revision)::text);
            RETURN NULL;
        END $$""",
        """
        CREATE TRIGGER notify_commit AFTER UPDATE ON meta FOR EACH ROW
            WHEN (OLD.revision <> NEW.revision OR OLD.compact_revision <> NEW.compact_revision)
            EXECUTE FUNCTION notify_commit('{channel}')""",
    ],
    2: [
        """
        CREATE TABLE auth_meta (
            id boolean PRIMARY KEY DEFAULT true CHECK (id),
            enabled boolean NOT NULL DEFAULT false,
            revision bigint NOT NULL DEFAULT 1,
            enabled_revision bigint NOT NULL DEFAULT 0
        )""",
        "INSERT INTO auth_meta DEFAULT VALUES",
        "CREATE TABLE auth_user (name bytea PRIMARY KEY, data bytea NOT NULL)",
        "CREATE TABLE auth_role (name bytea PRIMARY KEY, data bytea NOT NULL)",
        """
        CREATE FUNCTION notify_auth_change() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify(TG_ARGV[0], json_build_object(
                'auth', 2 * NEW.revision + NEW.enabled::int)::text);
            RETURN NULL;
        END $$""",
        """
        CREATE TRIGGER notify_auth_change AFTER UPDATE ON auth_meta FOR EACH ROW
            EXECUTE FUNCTION notify_auth_change('{channel}')""",
    ],
    3: [
        # A batch of plain puts (no lease, prev_kv or ignore_*) in one
        # statement, so that, run in autocommit, the batch costs one round
        # trip, COMMIT included.  The same rows and rules as view.py's
        # _PUT, one revision per put in order; under a NOSPACE alarm
        # (AlarmType 1) nothing is written and create_revisions is NULL.
        """
        CREATE FUNCTION put_many(keys bytea[], vals bytea[],
            OUT begin_revision bigint, OUT compact bigint, OUT alarms json,
            OUT create_revisions bigint[], OUT versions bigint[])
        LANGUAGE plpgsql AS $$
        DECLARE
            prev record;
            rev bigint;
        BEGIN
            SELECT m.revision, m.compact_revision INTO begin_revision, compact FROM meta m FOR UPDATE;
            SELECT coalesce(json_agg(json_build_array(a.member_id, a.alarm)), '[]') INTO alarms FROM alarm a;
            IF EXISTS (SELECT 1 FROM alarm a WHERE a.alarm = 1) THEN
                RETURN;
            END IF;
            create_revisions := ARRAY[]::bigint[];
            versions := ARRAY[]::bigint[];
            FOR i IN 1 .. coalesce(cardinality(keys), 0) LOOP
                rev := begin_revision + i;
                SELECT c.tombstone, c.create_revision, c.version, c.lease INTO prev FROM config c
                    WHERE c.key = keys[i] ORDER BY c.revision DESC, c.sub DESC LIMIT 1;
                IF FOUND AND NOT prev.tombstone THEN
                    create_revisions[i] := prev.create_revision;
                    versions[i] := prev.version + 1;
                    IF prev.lease <> 0 THEN
                        DELETE FROM key_lease kl WHERE kl.key = keys[i];
                    END IF;
                ELSE
                    create_revisions[i] := rev;
                    versions[i] := 1;
                END IF;
                INSERT INTO config (key, revision, sub, value, create_revision, version, lease)
                    VALUES (keys[i], rev, 0, vals[i], create_revisions[i], versions[i], 0);
            END LOOP;
            IF cardinality(keys) > 0 THEN
                UPDATE meta SET revision = begin_revision + cardinality(keys);
            END IF;
        END $$""",
    ],
}


def check_schema_name(schema: str) -> str:
    if not _SCHEMA_NAME.fullmatch(schema):
        raise ValueError(
            f"schema name {schema!r}: use lowercase letters, digits and '_' "
            "(at most 48, not starting with a digit)"
        )
    return schema


def channel(schema: str) -> str:
    """The LISTEN/NOTIFY channel of a schema's changes."""
    return f"mvcckv_{schema}"


def migrate(conn: psycopg.Connection, schema: str) -> int:
    """Create or upgrade ``schema`` to :data:`SCHEMA_VERSION`; returns the
    version found before.  ``conn`` must not be in a transaction."""
    with conn.transaction():
        # Serialises concurrent first starts; CREATE ... IF NOT EXISTS alone
        # is not safe against a concurrent CREATE.
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"mvcckv-migrate:{schema}",))
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(schema)))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        found = conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()[0]
        if found > SCHEMA_VERSION:
            raise SchemaError(
                f"schema {schema!r} is at version {found}, newer than this mvcckv's "
                f"{SCHEMA_VERSION}; upgrade mvcckv"
            )
        for version in range(found + 1, SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[version]:
                conn.execute(statement.replace("{channel}", channel(schema)))
            conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
    return found

-- The design of the article "etcd vs PostgreSQL" (Jinhua Luo, 2023), as the
-- article describes it, for `bench/compare.py`: these functions are
-- called directly, with no mvcckv in the path.  mvcckv's own engine
-- (mvcckv/pg/schema.py) starts from the same table and trigger and adds
-- what etcd's semantics need: sub revisions, create_revision / version,
-- a locked revision counter instead of bigserial, exact compaction.
--
-- Load it into an empty schema with search_path pointing there, e.g.
--     CREATE SCHEMA article; SET search_path TO article;  \i article.sql
-- Every statement is idempotent, so loading it twice is harmless.
--
-- What the design does, and what it leaves to the client:
--   set(k, v) / del(k)   append a row (a tombstone for del); the revision
--                        is the row's bigserial number
--   get1(k)              the newest live value of one key
--   get_all(prefix)      the newest row of every key under prefix, minus
--                        tombstones
--   get_all_from_rev_with_stale(prefix, rev)
--                        the newest row of every key changed after rev,
--                        tombstones included: what a watcher reads after
--                        reconnecting, before de-duplicating by revision
--   trigger              every inserted row is sent with pg_notify on the
--                        channel named by the key's first path segment
--                        ("/routes/a" -> "routes"), as row_to_json
--   lease / keepalive()  a lease table with the last keep-alive time
--   compact(rev)         DELETE of the rows older than rev
-- Known limits (why mvcckv's engine differs): bigserial numbers commit out
-- of order and leave holes, so "rows after rev" can miss a late commit;
-- pg_notify refuses payloads of 8000 bytes or more, so large values fail
-- the insert; compact(rev) also deletes the only row of keys last written
-- before rev.

CREATE TABLE IF NOT EXISTS config (
    key text,
    value text,
    revision bigserial,
    tombstone boolean NOT NULL DEFAULT false,
    PRIMARY KEY (key, revision)
);

CREATE OR REPLACE FUNCTION set(k text, v text) RETURNS bigint
LANGUAGE sql AS $$
    INSERT INTO config (key, value) VALUES (k, v) RETURNING revision;
$$;

CREATE OR REPLACE FUNCTION del(k text) RETURNS bigint
LANGUAGE sql AS $$
    INSERT INTO config (key, tombstone) VALUES (k, true) RETURNING revision;
$$;

CREATE OR REPLACE FUNCTION get1(kk text) RETURNS TABLE (r bigint, k text, v text)
LANGUAGE sql AS $$
    SELECT revision, key, value FROM config
    WHERE key = kk AND NOT tombstone
    ORDER BY revision DESC
    LIMIT 1;
$$;

CREATE OR REPLACE FUNCTION get_all(prefix text) RETURNS TABLE (r bigint, k text, v text)
LANGUAGE sql AS $$
    SELECT revision, key, value FROM (
        SELECT DISTINCT ON (key) revision, key, value, tombstone FROM config
        WHERE key LIKE prefix || '%'
        ORDER BY key, revision DESC
    ) newest
    WHERE NOT tombstone;
$$;

CREATE OR REPLACE FUNCTION get_all_from_rev_with_stale(prefix text, rev bigint)
RETURNS TABLE (r bigint, k text, v text, tomb boolean)
LANGUAGE sql AS $$
    SELECT DISTINCT ON (key) revision, key, value, tombstone FROM config
    WHERE key LIKE prefix || '%' AND revision > rev
    ORDER BY key, revision DESC;
$$;

CREATE OR REPLACE FUNCTION notify_config_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(substring(NEW.key FROM '/(.*)/'), row_to_json(NEW)::text);
    RETURN NULL;  -- an AFTER trigger's result is ignored
END;
$$;

DROP TRIGGER IF EXISTS notify_config_change ON config;
CREATE TRIGGER notify_config_change AFTER INSERT ON config
    FOR EACH ROW EXECUTE FUNCTION notify_config_change();

CREATE TABLE IF NOT EXISTS lease (
    id bigint PRIMARY KEY,
    ttl integer NOT NULL,
    last_keepalive timestamptz NOT NULL DEFAULT now()
);

CREATE OR REPLACE FUNCTION keepalive(lease_id bigint) RETURNS boolean
LANGUAGE sql AS $$
    UPDATE lease SET last_keepalive = now() WHERE id = lease_id RETURNING true;
$$;

CREATE OR REPLACE FUNCTION compact(rev bigint) RETURNS bigint
LANGUAGE sql AS $$
    WITH gone AS (DELETE FROM config WHERE revision < rev RETURNING 1)
    SELECT count(*) FROM gone;
$$;

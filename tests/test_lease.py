"""Tests for leases in the engine (ETCD_SEMANTICS §9, §2.2, §10.6).

Grant, attach and detach through puts, revoke, TimeToLive and keep-alive
first (tables where the rule is a table), then what needs the clock:
expiry, keep-alive postponing it, restart renewing every lease, checkpoints
resuming the remaining TTL, and the deterministic replay of an expiry.

Clock-driven tests use ``min_lease_ttl=1`` and a 50 ms expiry scan, so a
lease of 1 s expires between 1.0 and about 1.1 s after its last renewal.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

import mvcckv
from mvcckv import errors, ops
from mvcckv.lease import MAX_LEASE_TTL
from mvcckv.pb import kv_pb2
from mvcckv.pb import rpc_pb2 as pb
from mvcckv.watch import BufferedStream

FAST_EXPIRY = dict(min_lease_ttl=1, lease_expiry_tick=0.05)


@pytest.fixture
def store(tmp_path):
    with mvcckv.open(str(tmp_path / "data"), fsync=False) as s:
        yield s


@pytest.fixture
def fast(tmp_path):
    with mvcckv.open(str(tmp_path / "data"), fsync=False, **FAST_EXPIRY) as s:
        yield s


def attached(store, lease_id) -> list[bytes]:
    return list(store.lease_ttl(lease_id, keys=True).keys)


def keys_at(store, revision=0) -> list[bytes]:
    return [kv.key for kv in store.range(b"\0", b"\0", revision=revision).kvs]


def lease_ids(store) -> set[int]:
    return {s.ID for s in store.leases().leases}


def wait_for(cond, timeout: float, what: str) -> float:
    """Seconds until ``cond()`` held; fails after ``timeout``."""
    start = time.monotonic()
    for _ in range(100_000):
        if cond():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            break
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def drain_events(stream, n: int, timeout: float = 5.0) -> list:
    """(response header revision, [(type, key, mod_revision)]) until ``n`` events."""
    out, got = [], 0
    deadline = time.monotonic() + timeout
    for _ in range(100_000):
        if got >= n or time.monotonic() > deadline:
            break
        resp = stream.get(timeout=0.05)
        if resp is not None:
            evs = [(kv_pb2.Event.EventType.Name(e.type), e.kv.key, e.kv.mod_revision) for e in resp.events]
            out.append((resp.header.revision, evs))
            got += len(evs)
    return out


# --- grant -------------------------------------------------------------------

FRESH = "fresh"

GRANT_TABLE = [
    # requested ID, requested TTL, granted ID, granted TTL
    (0, 10, FRESH, 10),
    (7, 10, 7, 10),
    (-3, 10, -3, 10),  # any non-zero ID is used as given, even negative
    (0, 1, FRESH, 2),  # below the minimum: raised to it
    (0, 0, FRESH, 2),
    (0, -5, FRESH, 2),
    (0, 2, FRESH, 2),
    (8, MAX_LEASE_TTL, 8, MAX_LEASE_TTL),
]


@pytest.mark.parametrize("lease_id, ttl, want_id, want_ttl", GRANT_TABLE)
def test_grant(store, lease_id, ttl, want_id, want_ttl):
    store.put(b"k", b"v")
    resp = store.lease_grant(ttl, lease_id)
    if want_id == FRESH:
        assert resp.ID > 0
    else:
        assert resp.ID == want_id
    assert resp.TTL == want_ttl and resp.error == ""
    # A grant creates no revision.
    assert resp.header.revision == store.revision == 2
    t = store.lease_ttl(resp.ID)
    assert t.grantedTTL == want_ttl and want_ttl - 1 <= t.TTL <= want_ttl
    assert lease_ids(store) == {resp.ID}


def test_fresh_ids_are_positive_and_distinct(store):
    ids = [store.lease_grant(5).ID for _ in range(50)]
    assert all(i > 0 for i in ids)
    assert len(set(ids)) == 50
    assert lease_ids(store) == set(ids)


@pytest.mark.parametrize(
    "lease_id, ttl, error, message",
    [
        (7, 10, errors.LeaseExistsError, "etcdserver: lease already exists"),
        (8, MAX_LEASE_TTL + 1, errors.LeaseTTLTooLargeError, "etcdserver: too large lease TTL"),
        (0, 2**62, errors.LeaseTTLTooLargeError, "etcdserver: too large lease TTL"),
    ],
)
def test_grant_errors(store, lease_id, ttl, error, message):
    store.lease_grant(30, 7)
    with pytest.raises(error) as exc:
        store.lease_grant(ttl, lease_id)
    assert str(exc.value) == message
    assert lease_ids(store) == {7}
    assert store.lease_ttl(7).grantedTTL == 30


# --- attach and detach -----------------------------------------------------------


def test_put_with_lease_attaches(store):
    lease = store.lease_grant(60).ID
    store.put(b"b", b"1", lease=lease)
    store.put(b"a", b"1", lease=lease)
    store.put(b"c", b"1")
    assert attached(store, lease) == [b"a", b"b"]
    assert store.get(b"a").lease == lease and store.get(b"c").lease == 0
    # Rewriting the value keeps the key on its lease only if the put says so.
    store.put(b"a", b"2", ignore_lease=True)
    assert store.get(b"a").lease == lease
    assert attached(store, lease) == [b"a", b"b"]


@pytest.mark.parametrize(
    "write",
    [
        lambda s, lease: s.put(b"k", b"new", lease=lease),
        lambda s, lease: s.put(b"fresh", b"new", lease=lease),
        lambda s, lease: s.txn(success=[ops.put(b"other", b"x"), ops.put(b"k", b"new", lease=lease)]),
    ],
    ids=["put existing key", "put new key", "txn"],
)
def test_put_with_unknown_lease_writes_nothing(store, write):
    store.put(b"k", b"old")
    real = store.lease_grant(60).ID
    with pytest.raises(errors.LeaseNotFoundError) as exc:
        write(store, real + 1)
    assert str(exc.value) == "etcdserver: requested lease not found"
    assert store.revision == 2
    assert keys_at(store) == [b"k"] and store.get(b"k").value == b"old"
    assert attached(store, real) == []


def test_put_moves_key_to_another_lease_or_to_none(store):
    one = store.lease_grant(60).ID
    two = store.lease_grant(60).ID
    store.put(b"k", b"1", lease=one)
    store.put(b"j", b"1", lease=one)
    store.put(b"k", b"2", lease=two)
    assert (attached(store, one), attached(store, two)) == ([b"j"], [b"k"])
    store.put(b"k", b"3")
    assert (attached(store, one), attached(store, two)) == ([b"j"], [])
    assert store.get(b"k").lease == 0
    # Revoking either lease leaves k alone; revoking one with no keys left
    # creates no revision.
    rev = store.revision
    assert store.lease_revoke(two).header.revision == rev
    assert store.revision == rev
    store.lease_revoke(one)
    assert keys_at(store) == [b"k"]
    assert store.revision == rev + 1


def test_delete_detaches(store):
    lease = store.lease_grant(60).ID
    store.put(b"k", b"1", lease=lease)
    store.put(b"j", b"1", lease=lease)
    store.delete(b"k")
    store.put(b"k", b"again")
    assert attached(store, lease) == [b"j"]
    store.lease_revoke(lease)
    assert keys_at(store) == [b"k"]


# --- revoke ------------------------------------------------------------------------


def test_revoke_deletes_every_attached_key_in_one_revision(store):
    lease = store.lease_grant(60).ID
    for k in (b"c", b"a", b"d", b"b"):
        store.put(k, b"v", lease=lease)
    store.put(b"x", b"not leased")
    live = BufferedStream()
    store.watch_hub.watch(live, b"\0", b"\0")
    before = store.revision
    resp = store.lease_revoke(lease)
    rev = before + 1
    assert resp.header.revision == store.revision == rev
    assert keys_at(store, before) == [b"a", b"b", b"c", b"d", b"x"]
    assert keys_at(store, rev) == [b"x"]
    assert [kv.mod_revision for kv in store.range(b"\0", b"\0").kvs] == [before]
    assert store.lease_ttl(lease).TTL == -1 and lease_ids(store) == set()
    # A watcher replaying from the backend sees the sub revisions in the
    # order they were written: the keys in ascending order.
    replay = BufferedStream()
    store.watch_hub.watch(replay, b"\0", b"\0", rev)
    want = [("DELETE", k, rev) for k in (b"a", b"b", b"c", b"d")]
    assert drain_events(live, 4) == [(rev, want)]
    assert [evs for _, evs in drain_events(replay, 4)] == [want]


def test_revoke_unknown_lease(store):
    store.put(b"k", b"v")
    with pytest.raises(errors.LeaseNotFoundError) as exc:
        store.lease_revoke(12345)
    assert str(exc.value) == "etcdserver: requested lease not found"
    assert store.revision == 2


def test_revoke_twice(store):
    lease = store.lease_grant(60).ID
    store.put(b"k", b"v", lease=lease)
    store.lease_revoke(lease)
    with pytest.raises(errors.LeaseNotFoundError):
        store.lease_revoke(lease)


# --- time to live, keep-alive, listing ------------------------------------------------


def test_unknown_lease_ttl_and_keepalive(store):
    t = store.lease_ttl(42, keys=True)
    assert (t.ID, t.TTL, t.grantedTTL, list(t.keys)) == (42, -1, 0, [])
    assert store.lease_keepalive(42) == 0
    lease = store.lease_grant(60).ID
    store.lease_revoke(lease)
    assert store.lease_keepalive(lease) == 0
    assert store.lease_ttl(lease).TTL == -1


def test_ttl_and_keepalive_of_a_live_lease(store):
    lease = store.lease_grant(100).ID
    store.put(b"k", b"v")
    t = store.lease_ttl(lease)
    assert (t.ID, t.grantedTTL) == (lease, 100) and 99 <= t.TTL <= 100
    assert t.header.revision == store.revision
    assert store.lease_keepalive(lease) == 100


def test_leases_lists_soonest_expiry_first(store):
    late = store.lease_grant(300).ID
    soon = store.lease_grant(5).ID
    middle = store.lease_grant(60).ID
    assert [s.ID for s in store.leases().leases] == [soon, middle, late]
    assert store.leases().header.revision == store.revision


# --- expiry ------------------------------------------------------------------------------


def test_expiry_revokes_each_lease_in_one_revision(fast):
    granted = time.monotonic()
    lease = fast.lease_grant(1).ID
    second = fast.lease_grant(1).ID
    for k in (b"b", b"c", b"a"):
        fast.put(k, b"v", lease=lease)
    fast.put(b"y", b"v", lease=second)
    fast.put(b"x", b"v", lease=second)
    fast.put(b"z", b"stays")
    stream = BufferedStream()
    fast.watch_hub.watch(stream, b"\0", b"\0")
    before = fast.revision
    wait_for(lambda: keys_at(fast) == [b"z"], 5.0, "the leases to expire")
    # Not before the TTL, and soon after it.
    assert 1.0 <= time.monotonic() - granted < 3.0
    # Each expired lease is its own revoke: its own revision, keys in order.
    assert fast.revision == before + 2
    got = sorted(drain_events(stream, 5), key=lambda r: [k for _, k, _ in r[1]])
    assert got == [
        (got[0][0], [("DELETE", k, got[0][0]) for k in (b"a", b"b", b"c")]),
        (got[1][0], [("DELETE", k, got[1][0]) for k in (b"x", b"y")]),
    ]
    assert {got[0][0], got[1][0]} == {before + 1, before + 2}
    assert fast.lease_ttl(lease).TTL == -1 and fast.lease_ttl(second).TTL == -1
    assert fast.lease_keepalive(lease) == 0


def test_keepalive_postpones_expiry(fast):
    lease = fast.lease_grant(1).ID
    fast.put(b"k", b"v", lease=lease)
    start = time.monotonic()
    last = start
    for _ in range(8):  # about 2 s, twice the TTL
        assert fast.lease_keepalive(lease) == 1
        last = time.monotonic()
        time.sleep(0.25)
        assert fast.get(b"k") is not None, "expired despite keep-alives"
    assert time.monotonic() - start > 1.5
    wait_for(lambda: fast.get(b"k") is None, 5.0, "the lease to expire after the keep-alives stopped")
    assert time.monotonic() - last >= 0.95


# --- restart --------------------------------------------------------------------------


def test_leases_and_attachments_survive_reopen(tmp_path):
    path = str(tmp_path / "data")
    with mvcckv.open(path, fsync=False) as s:
        lease = s.lease_grant(100).ID
        other = s.lease_grant(50, 9).ID
        s.put(b"b", b"1", lease=lease)
        s.put(b"a", b"1", lease=lease)
        s.put(b"c", b"1", lease=other)
        s.put(b"c", b"2", lease=lease)  # moved: the newest revision decides
        s.put(b"d", b"1")
        time.sleep(1.1)
        assert s.lease_ttl(lease).TTL <= 98
        revision = s.revision
    with mvcckv.open(path, fsync=False) as s:
        assert lease_ids(s) == {lease, other}
        assert attached(s, lease) == [b"a", b"b", b"c"] and attached(s, other) == []
        # A restart starts every lease's countdown again (plus a second of grace).
        t = s.lease_ttl(lease)
        assert (t.grantedTTL, t.TTL) == (100, 100)
        assert s.revision == revision
        s.lease_revoke(lease)
        assert keys_at(s) == [b"d"] and s.revision == revision + 1


def test_expired_revoke_survives_reopen(tmp_path):
    path = str(tmp_path / "data")
    with mvcckv.open(path, fsync=False, **FAST_EXPIRY) as s:
        lease = s.lease_grant(1).ID
        s.put(b"b", b"v", lease=lease)
        s.put(b"a", b"v", lease=lease)
        s.put(b"z", b"v")
        wait_for(lambda: keys_at(s) == [b"z"], 5.0, "the lease to expire")
        live = s.hash_kv()
    with mvcckv.open(path, fsync=False, **FAST_EXPIRY) as s:
        assert s.hash_kv() == live
        assert lease_ids(s) == set() and keys_at(s) == [b"z"]
        # Nothing is revoked twice: the revision stays where it was.
        time.sleep(0.2)
        assert s.revision == live[1]


def test_expired_revoke_replays_to_the_same_hash(tmp_path):
    """Expiry is a logged revoke: a store rebuilt from an older backend plus
    the WAL reaches the same state as the live one."""
    live_dir, crashed_dir = tmp_path / "live", tmp_path / "crashed"
    with mvcckv.open(str(live_dir), fsync=True, **FAST_EXPIRY) as s:
        s.put(b"x", b"1")
        lease = s.lease_grant(1).ID
        keeper = s.lease_grant(60).ID
        for k in (b"c", b"a", b"b"):
            s.put(k, b"v", lease=lease)
        s.put(b"y", b"1", lease=keeper)
        # The backend as it is now (consistent index included): what an
        # older on-disk state would hold.
        s.snapshot(str(tmp_path / "snap.db"))
        mvcckv.restore(tmp_path / "snap.db", crashed_dir)
        before = s.revision
        wait_for(lambda: s.get(b"a") is None, 5.0, "the lease to expire")
        s.put(b"x", b"2")
        live_hash, live_rev = s.hash_kv()
        assert live_rev == before + 2
        # Every record is synced, so the log's files hold them all now.
        shutil.copytree(live_dir / "wal", crashed_dir / "wal")
    with mvcckv.open(str(crashed_dir), fsync=True, **FAST_EXPIRY) as s:
        assert s.revision == live_rev
        assert s.hash_kv() == (live_hash, live_rev)
        assert keys_at(s) == [b"x", b"y"]
        assert lease_ids(s) == {keeper}
        assert attached(s, keeper) == [b"y"]
        assert [kv.mod_revision for kv in s.range(b"a", b"d", revision=before).kvs] == [before - 2, before - 1, before - 3]


def test_checkpoint_makes_reopen_resume_the_remaining_ttl(tmp_path):
    path = str(tmp_path / "data")
    opts = dict(fsync=False, lease_checkpoint_interval=0.2, **FAST_EXPIRY)
    with mvcckv.open(path, **opts) as s:
        lease = s.lease_grant(10).ID
        s.put(b"k", b"v", lease=lease)
        # Over 3 s old: the last checkpoint (every 0.2 s) recorded 7 or 8 s left.
        wait_for(lambda: s.lease_ttl(lease).TTL <= 6, 6.0, "the lease to age")
    with mvcckv.open(path, **opts) as s:
        t = s.lease_ttl(lease, keys=True)
        # Without the checkpoint it would be the full TTL again: 10.
        assert t.grantedTTL == 10 and 6 <= t.TTL <= 8
        assert list(t.keys) == [b"k"]
        # A keep-alive forgets the checkpoint: the next restart grants the full TTL.
        assert s.lease_keepalive(lease) == 10
        s.put(b"flush", b"1")
    with mvcckv.open(path, fsync=False, **FAST_EXPIRY) as s:
        assert s.lease_ttl(lease).TTL == 10


# --- quota ------------------------------------------------------------------------------


def test_nospace_rejects_lease_grant(tmp_path):
    path = str(tmp_path / "data")
    with mvcckv.open(path, fsync=False) as s:
        lease = s.lease_grant(60).ID
        s.put(b"k", b"v", lease=lease)
    with mvcckv.open(path, fsync=False, quota_bytes=1) as s:
        with pytest.raises(errors.NoSpaceError) as exc:
            s.lease_grant(60)
        assert str(exc.value) == "etcdserver: mvcc: database space exceeded"
        # The alarm goes through the log like any change, without making the
        # refused caller wait for it: it is active moments later.
        deadline = time.monotonic() + 5
        while (s.options.member_id, pb.NOSPACE) not in s.alarms() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (s.options.member_id, pb.NOSPACE) in s.alarms()
        assert lease_ids(s) == {lease}
        with pytest.raises(errors.NoSpaceError):
            s.put(b"j", b"v")
        # Reads and revokes still work.
        assert keys_at(s) == [b"k"]
        s.lease_revoke(lease)
        assert keys_at(s) == [] and lease_ids(s) == set()


def test_nospace_alarm_rejects_lease_grant_until_disarmed(store):
    store.alarm(pb.AlarmRequest.ACTIVATE, pb.NOSPACE)
    with pytest.raises(errors.NoSpaceError):
        store.lease_grant(60, 5)
    assert lease_ids(store) == set()
    store.alarm(pb.AlarmRequest.DEACTIVATE, pb.NOSPACE)
    assert store.lease_grant(60, 5).ID == 5


@pytest.mark.parametrize("request_", ["grant", "revoke"])
def test_corrupt_alarm_rejects_lease_grant_and_revoke(store, request_):
    lease = store.lease_grant(60).ID
    store.put(b"k", b"v", lease=lease)
    store.alarm(pb.AlarmRequest.ACTIVATE, pb.CORRUPT)
    with pytest.raises(errors.CorruptError) as exc:
        if request_ == "grant":
            store.lease_grant(60)
        else:
            store.lease_revoke(lease)
    assert str(exc.value) == "etcdserver: corrupt cluster"
    assert lease_ids(store) == {lease}
    assert attached(store, lease) == [b"k"]

"""Watch and Lease, differential: the same operations against real etcd and
``mvcckv serve``, and the answers compared after ``harness.normalize``.

Both servers are fresh and private to this module, and every test applies
the same writes to both in the same order, so revisions stay equal and are
compared as they are.  Leases are granted with explicit IDs (etcd picks
random ones otherwise).

The etcd here is Debian's 3.4.23, while mvcckv answers as etcd 3.6, which
differs on purpose in two places left out: a negative ``start_revision``
(3.4.23 has no check for it) and ``progress_request`` while a watcher is
unsynced or none exists (3.4.23 answers at once; since 3.4.31 etcd answers
only when every watcher is synced).
"""

from __future__ import annotations

import time

import grpc
import pytest

from harness import EtcdProcess, MvcckvProcess, normalize, stub
from mvcckv import ops
from mvcckv.pb import rpc_pb2 as pb
from mvcckv.store import prefix_end
from test_server_watch_lease import NODELETE, NOPUT, WatchStream

NAMES = ("etcd", "mvcckv")


@pytest.fixture(scope="module")
def servers(etcd_binary, tmp_path_factory):
    root = tmp_path_factory.mktemp("diff-watch-lease")
    with EtcdProcess(binary=etcd_binary) as etcd, \
            MvcckvProcess(root / "data", log_path=root / "mvcckv.log") as mvcckv:
        yield etcd, mvcckv


class Side:
    """One server's stubs."""

    def __init__(self, server):
        self.server = server
        self.channel = server.channel()
        self.kv = stub(self.channel, "KV")
        self.lease = stub(self.channel, "Lease")

    def watch(self) -> WatchStream:
        return WatchStream(self.channel, identity=None)


@pytest.fixture(scope="module")
def sides(servers):
    pair = [Side(s) for s in servers]
    yield pair
    for side in pair:
        side.channel.close()


def both(sides, fn):
    """``fn(side)`` for etcd and for mvcckv; the two results."""
    return [fn(side) for side in sides]


def same(sides, fn):
    """``fn`` on both sides; asserts the normalized results are equal."""
    theirs, ours = both(sides, fn)
    assert normalize(ours) == normalize(theirs)
    return ours


def write_history(side, p: bytes) -> int:
    """A mix of writes under prefix ``p``; returns the first revision."""
    kv = side.kv
    first = kv.Put(pb.PutRequest(key=p + b"a", value=b"1"), timeout=10).header.revision
    kv.Put(pb.PutRequest(key=p + b"b", value=b"2"), timeout=10)
    kv.Put(pb.PutRequest(key=p + b"a", value=b"3"), timeout=10)
    kv.Txn(pb.TxnRequest(success=[ops.put(p + b"c", b"4"), ops.delete(p + b"b"), ops.put(p + b"a", b"5")]),
           timeout=10)
    kv.Put(pb.PutRequest(key=p + b"d", value=b""), timeout=10)
    kv.DeleteRange(pb.DeleteRangeRequest(key=p, range_end=prefix_end(p)), timeout=10)
    kv.Put(pb.PutRequest(key=p + b"a", value=b"6"), timeout=10)
    return first


def current(side) -> int:
    return side.kv.Range(pb.RangeRequest(key=b"\0", count_only=True), timeout=10).header.revision


def drain(ws: WatchStream, n_events: int, timeout: float = 10.0) -> list[pb.WatchResponse]:
    """Responses until ``n_events`` events came, then nothing for a while."""
    out: list[pb.WatchResponse] = []
    deadline = time.monotonic() + timeout
    while sum(len(r.events) for r in out) < n_events:
        resp = ws.next(max(0.01, deadline - time.monotonic()))
        if resp.events:
            out.append(resp)
    ws.quiet(0.3)
    return out


def by_watcher(resps, wid: int) -> list[pb.WatchResponse]:
    return [r for r in resps if r.watch_id == wid]


def flat_events(resps) -> list:
    return [normalize(e) for r in resps for e in r.events]


# --- watch ------------------------------------------------------------------------------


def test_watch_event_streams_match(sides):
    p = b"dw/"
    watches = [
        dict(key=p, range_end=prefix_end(p)),
        dict(key=p, range_end=prefix_end(p), prev_kv=True),
        dict(key=p + b"a", filters=[NOPUT], prev_kv=True),
        dict(key=p + b"a", range_end=p + b"c", filters=[NODELETE]),
        dict(key=p + b"c", range_end=b"\0"),
    ]

    def run(side, expect=None):
        """mvcckv's responses are complete after a progress round trip;
        etcd 3.4.23 may send progress ahead of queued events, so its side
        reads as many events as mvcckv sent, then checks that no more come."""
        with side.watch() as ws:
            created = []
            for w in watches:
                created.append(ws.created(**w))
            first = write_history(side, p)
            live = ws.sync(current(side)) if expect is None else drain(ws, expect[0])
        with side.watch() as ws:
            # Watchers replaying history may send events before the next
            # watcher's created response is read (etcd does): keep them.
            for w in watches:
                ws.create(start_revision=first, **w)
            early, n_created = [], 0
            while n_created < len(watches):
                resp = ws.next()
                if resp.created:
                    n_created += 1
                else:
                    early.append(resp)
            got = sum(len(r.events) for r in early)
            rest = ws.sync(current(side)) if expect is None else drain(ws, expect[1] - got)
            replay = early + rest
        return created, live, replay

    m_created, m_live, m_replay = run(sides[1])
    counts = (sum(len(r.events) for r in m_live), sum(len(r.events) for r in m_replay))
    e_created, e_live, e_replay = run(sides[0], counts)
    assert normalize(m_created) == normalize(e_created)
    # Live: one response per watcher and write, with the write's revision
    # (the order among watchers of one write is not defined).
    for wid in range(len(watches)):
        assert normalize(by_watcher(m_live, wid)) == normalize(by_watcher(e_live, wid)), wid
    assert len(m_live) > len(watches)
    # History: the same events per watcher (catch-up responses may group them
    # differently, and report the revision the server was at).
    for wid in range(len(watches)):
        e = flat_events(r for r in e_replay if r.watch_id == wid)
        m = flat_events(r for r in m_replay if r.watch_id == wid)
        assert m == e, wid
        assert m == flat_events(r for r in m_live if r.watch_id == wid), wid


def test_watch_control_responses_match(sides):
    p = b"dc/"

    def run(side):
        side.kv.Put(pb.PutRequest(key=p + b"k", value=b"v"), timeout=10)
        out = []
        with side.watch() as ws:
            for create in (dict(key=p + b"k", watch_id=5), dict(key=p + b"k"), dict(key=p + b"k", watch_id=5),
                           dict(key=p + b"z", range_end=p + b"a"), dict(key=p + b"k"), dict(key=b"")):
                ws.create(**create)
                out.append(ws.next())
            ws.cancel(1)
            out.append(ws.next())
            ws.cancel(99)  # unknown: no answer, so the next one is the progress
            ws.progress()
            out.append(ws.next())
        return out

    same(sides, run)


def test_watch_from_a_compacted_revision_matches(sides):
    p = b"dz/"

    def run(side):
        kv = side.kv
        first = kv.Put(pb.PutRequest(key=p + b"k", value=b"1"), timeout=10).header.revision
        last = kv.Put(pb.PutRequest(key=p + b"k", value=b"2"), timeout=10).header.revision
        kv.Compact(pb.CompactionRequest(revision=last), timeout=10)
        with side.watch() as ws:
            created = ws.created(p + b"k", start_revision=first)
            canceled = ws.next()
            at = ws.created(p + b"k", start_revision=last)
            events = ws.events(1)
        return created, canceled, at, list(events)

    same(sides, run)


# --- lease ------------------------------------------------------------------------------


def test_lease_time_to_live_keys_match(sides):
    lid = 0x0D1F_0001

    def run(side):
        lease, kv = side.lease, side.kv
        grant = lease.LeaseGrant(pb.LeaseGrantRequest(TTL=100, ID=lid), timeout=10)
        for key in (b"dl/c", b"dl/a", b"dl/b"):
            kv.Put(pb.PutRequest(key=key, value=b"v", lease=lid), timeout=10)
        kv.Put(pb.PutRequest(key=b"dl/b", value=b"v"), timeout=10)  # detached again
        ttl = lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=lid, keys=True), timeout=10)
        plain = lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=lid), timeout=10)
        listed = lid in {s.ID for s in lease.LeaseLeases(pb.LeaseLeasesRequest(), timeout=10).leases}
        # Remaining TTL is a clock reading; it may differ by a second.
        assert 98 <= ttl.TTL <= 100
        ttl.TTL = plain.TTL = 0
        # etcd lists the keys in Go map order (random); mvcckv sorts them.
        keys = sorted(ttl.keys)
        del ttl.keys[:]
        return grant, ttl, keys, plain, listed

    keys = same(sides, run)[2]
    assert keys == [b"dl/a", b"dl/c"]


def test_lease_revoke_matches(sides):
    lid = 0x0D1F_0002

    def run(side):
        lease, kv = side.lease, side.kv
        lease.LeaseGrant(pb.LeaseGrantRequest(TTL=100, ID=lid), timeout=10)
        for key in (b"dr/c", b"dr/a", b"dr/b", b"dr/d"):
            kv.Put(pb.PutRequest(key=key, value=key, lease=lid), timeout=10)
        kv.Put(pb.PutRequest(key=b"dr/d", value=b"free"), timeout=10)
        with side.watch() as ws:
            ws.created(b"dr/", prefix_end(b"dr/"), prev_kv=True)
            revoked = lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=lid), timeout=10)
            resp = ws.next()
            ws.quiet(0.2)
        rest = kv.Range(pb.RangeRequest(key=b"dr/", range_end=prefix_end(b"dr/")), timeout=10)
        gone = lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=lid), timeout=10)
        return revoked, resp, rest, gone

    revoked, resp, _, _ = same(sides, run)
    # One revision, a DELETE per attached key, in key order.
    assert [(e.type, e.kv.key, e.kv.mod_revision) for e in resp.events] == \
        [(1, k, revoked.header.revision) for k in (b"dr/a", b"dr/b", b"dr/c")]


def test_lease_errors_match(sides):
    lid = 0x0D1F_0003

    def outcome(call, request):
        try:
            return normalize(call(request, timeout=10))
        except grpc.RpcError as err:
            return err.code(), err.details()

    def run(side):
        lease, kv = side.lease, side.kv
        out = [outcome(lease.LeaseGrant, pb.LeaseGrantRequest(TTL=30, ID=lid))]
        for call, request in [
            (lease.LeaseGrant, pb.LeaseGrantRequest(TTL=30, ID=lid)),
            (lease.LeaseGrant, pb.LeaseGrantRequest(TTL=9_000_000_001, ID=lid + 1)),
            (lease.LeaseGrant, pb.LeaseGrantRequest(TTL=0, ID=lid + 2)),
            (lease.LeaseGrant, pb.LeaseGrantRequest(TTL=-4, ID=-(lid + 3))),
            (lease.LeaseRevoke, pb.LeaseRevokeRequest(ID=lid + 4)),
            (lease.LeaseTimeToLive, pb.LeaseTimeToLiveRequest(ID=lid + 4, keys=True)),
            (kv.Put, pb.PutRequest(key=b"de/k", lease=lid + 4)),
            (lease.LeaseRevoke, pb.LeaseRevokeRequest(ID=lid)),
            (lease.LeaseRevoke, pb.LeaseRevokeRequest(ID=lid + 2)),
            (lease.LeaseRevoke, pb.LeaseRevokeRequest(ID=-(lid + 3))),
            (lease.LeaseRevoke, pb.LeaseRevokeRequest(ID=lid)),
        ]:
            out.append(outcome(call, request))
        return out

    same(sides, run)


def test_keepalive_streams_match(sides):
    lid = 0x0D1F_0004

    def run(side):
        lease = side.lease
        lease.LeaseGrant(pb.LeaseGrantRequest(TTL=50, ID=lid), timeout=10)
        try:
            ids = [lid, lid + 1, lid, 0, -1, lid]
            return list(lease.LeaseKeepAlive(iter(pb.LeaseKeepAliveRequest(ID=i) for i in ids), timeout=10))
        finally:
            lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=lid), timeout=10)

    same(sides, run)


def test_lease_expiry_matches(sides):
    """Both servers revoke an expired lease as one write; etcd's minimum TTL
    (2 s) applies to both, so this waits for real expiry."""
    lid = 0x0D1F_0005

    def grant(side):
        resp = side.lease.LeaseGrant(pb.LeaseGrantRequest(TTL=1, ID=lid), timeout=10)
        for key in (b"dx/b", b"dx/a"):
            side.kv.Put(pb.PutRequest(key=key, value=b"v", lease=lid), timeout=10)
        ws = side.watch()
        ws.created(b"dx/", prefix_end(b"dx/"))
        return resp, ws

    (e_grant, e_ws), (m_grant, m_ws) = both(sides, grant)
    try:
        assert normalize(m_grant) == normalize(e_grant) and m_grant.TTL == 2
        start = time.monotonic()
        e_events, m_events = e_ws.events(2, timeout=10), m_ws.events(2, timeout=10)
        assert time.monotonic() - start >= 1.0
    finally:
        e_ws.close()
        m_ws.close()
    assert [normalize(e) for e in m_events] == [normalize(e) for e in e_events]
    assert [e.kv.key for e in m_events] == [b"dx/a", b"dx/b"]
    assert m_events[0].kv.mod_revision == m_events[1].kv.mod_revision
    same(sides, lambda side: side.lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=lid), timeout=10))

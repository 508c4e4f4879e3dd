"""Tests for mvcckv.watch against the engine (ETCD_SEMANTICS §8).

Tables of etcd's watch cases (range kinds, start revisions, filters,
prev_kv, compaction, progress, cancel), then a property test comparing what
watchers receive with a plain list-of-changes model of the store's history,
then a slow consumer that must neither slow writers down nor buffer the
whole history.

Most tests use their own ``WatchHub`` with a short sync interval so that
catch-up takes milliseconds; the rules do not depend on the interval.
Waiting for a watcher to be complete uses a progress request, as an etcd
client would: a progress response at revision R, which travels behind every
event already queued, proves that nothing at or below R is still pending.
"""

from __future__ import annotations

import gc
import statistics
import tempfile
import threading
import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mvcckv
from mvcckv import errors, ops
from mvcckv.pb import kv_pb2
from mvcckv.pb import rpc_pb2 as pb
from mvcckv.watch import BufferedStream, WatchHub, WatchRangeError

PUT, DELETE = "PUT", "DELETE"
NOPUT = pb.WatchCreateRequest.NOPUT
NODELETE = pb.WatchCreateRequest.NODELETE
ALL = (b"\0", b"\0")  # every key

FAST = dict(sync_interval=0.005, victim_retry=0.005)


@pytest.fixture
def store(tmp_path):
    with mvcckv.open(str(tmp_path / "data"), fsync=False) as s:
        yield s


@pytest.fixture
def hub(store):
    h = WatchHub(store, **FAST)
    yield h
    h.close()


# --- helpers ----------------------------------------------------------------


def watch(hub, key, range_end=b"", start=0, stream=None, **kw):
    """(watcher, stream, created revision) of a new watcher on its own stream."""
    stream = stream if stream is not None else BufferedStream()
    w, created = hub.watch(stream, key, range_end, start, **kw)
    return w, stream, created


def is_progress(resp) -> bool:
    return resp.watch_id == -1 and not resp.events and not resp.canceled


def drain(hub, stream, w, upto: int, timeout: float = 10.0) -> list:
    """Every response for ``w`` up to revision ``upto`` (progress ones left out)."""
    out = []
    deadline = time.monotonic() + timeout
    for _ in range(1_000_000):
        if time.monotonic() > deadline:
            break
        resp = stream.get(timeout=0.02)
        if resp is None:
            hub.request_progress(stream, [w])
            continue
        if is_progress(resp):
            if resp.header.revision >= upto:
                return out
            continue
        out.append(resp)
    raise AssertionError(f"watcher {w.id} not caught up to {upto} in {timeout}s (state {w.state}); got {out}")


def drain_until_canceled(stream, timeout: float = 5.0):
    """The canceled response, after checking nothing else came before it."""
    deadline = time.monotonic() + timeout
    for _ in range(100_000):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        resp = stream.get(timeout=left)
        if resp is None:
            continue
        assert resp.canceled, f"expected only a cancel, got {resp}"
        return resp
    raise AssertionError("no canceled response")


def wait_for(cond, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    for _ in range(100_000):
        if cond():
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.002)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def quiet(stream, wait: float = 0.1) -> list:
    """Whatever arrives within ``wait`` seconds (expected: nothing)."""
    out = []
    deadline = time.monotonic() + wait
    for _ in range(10_000):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        resp = stream.get(timeout=left)
        if resp is not None:
            out.append(resp)
    return out


def brief(responses) -> list[tuple]:
    """Events as (type, key, mod_revision), in arrival order."""
    return [(kv_pb2.Event.EventType.Name(e.type), e.kv.key, e.kv.mod_revision) for r in responses for e in r.events]


def kv_tuple(kv) -> tuple:
    return (kv.key, kv.create_revision, kv.mod_revision, kv.version, kv.value, kv.lease)


def full(responses) -> list[tuple]:
    """Events with every KeyValue field, and prev_kv (None when absent)."""
    return [
        (
            kv_pb2.Event.EventType.Name(e.type),
            kv_tuple(e.kv),
            kv_tuple(e.prev_kv) if e.HasField("prev_kv") else None,
        )
        for r in responses
        for e in r.events
    ]


# --- range kinds ------------------------------------------------------------
#
# One history, watched through each kind of range, live (watcher first) and
# from history (start revision 1 after the writes):
#
#   2 put a      5 put b        8 txn: put a, put b
#   3 put ab     6 put c        9 delete [a, c): a, abc, b (ab is gone)
#   4 put abc    7 delete ab


def write_range_history(store):
    store.put(b"a", b"1")
    store.put(b"ab", b"1")
    store.put(b"abc", b"1")
    store.put(b"b", b"1")
    store.put(b"c", b"1")
    store.delete(b"ab")
    store.txn(success=[ops.put(b"a", b"2"), ops.put(b"b", b"2")])
    assert store.delete(b"a", b"c").deleted == 3
    assert store.revision == 9


RANGE_TABLE = [
    # name, key, range_end, expected (type, key, revision)
    ("single key", b"a", b"", [(PUT, b"a", 2), (PUT, b"a", 8), (DELETE, b"a", 9)]),
    ("single key, deleted in between", b"ab", b"", [(PUT, b"ab", 3), (DELETE, b"ab", 7)]),
    ("single key never written", b"zz", b"", []),
    (
        "range [a, b)", b"a", b"b",
        [(PUT, b"a", 2), (PUT, b"ab", 3), (PUT, b"abc", 4), (DELETE, b"ab", 7),
         (PUT, b"a", 8), (DELETE, b"a", 9), (DELETE, b"abc", 9)],
    ),
    (
        "range [abc, c)", b"abc", b"c",
        [(PUT, b"abc", 4), (PUT, b"b", 5), (PUT, b"b", 8), (DELETE, b"abc", 9), (DELETE, b"b", 9)],
    ),
    (
        "prefix ab", b"ab", mvcckv.prefix_end(b"ab"),
        [(PUT, b"ab", 3), (PUT, b"abc", 4), (DELETE, b"ab", 7), (DELETE, b"abc", 9)],
    ),
    ("from key b", b"b", b"\0", [(PUT, b"b", 5), (PUT, b"c", 6), (PUT, b"b", 8), (DELETE, b"b", 9)]),
    (
        "every key", *ALL,
        [(PUT, b"a", 2), (PUT, b"ab", 3), (PUT, b"abc", 4), (PUT, b"b", 5), (PUT, b"c", 6),
         (DELETE, b"ab", 7), (PUT, b"a", 8), (PUT, b"b", 8),
         (DELETE, b"a", 9), (DELETE, b"abc", 9), (DELETE, b"b", 9)],
    ),
]


@pytest.mark.parametrize("path", ["live", "history"])
@pytest.mark.parametrize("name, key, range_end, want", RANGE_TABLE, ids=[c[0] for c in RANGE_TABLE])
def test_range_kinds(store, hub, path, name, key, range_end, want):
    if path == "live":
        w, stream, created = watch(hub, key, range_end)
        assert (created, w.state) == (1, "synced")
        write_range_history(store)
    else:
        write_range_history(store)
        w, stream, created = watch(hub, key, range_end, start=1)
        assert (created, w.state) == (9, "unsynced")
    got = drain(hub, stream, w, 9)
    assert brief(got) == want
    assert all(r.watch_id == w.id and r.events and not r.canceled for r in got)
    if path == "live":
        # One response per revision, carrying that revision in its header.
        assert [r.header.revision for r in got] == sorted({rev for _, _, rev in want})
        assert all(e.kv.mod_revision == r.header.revision for r in got for e in r.events)
    else:
        assert all(r.header.revision >= max(e.kv.mod_revision for e in r.events) for r in got)


@pytest.mark.parametrize(
    "key, range_end",
    [(b"b", b"a"), (b"a", b"a"), (b"abc", b"ab"), (b"\x01", b"\x00\xff")],
)
def test_empty_range_is_refused(store, hub, key, range_end):
    with pytest.raises(WatchRangeError) as exc:
        hub.watch(BufferedStream(), key, range_end)
    assert str(exc.value) == "mvcc: watcher range is empty"
    assert hub.stats() == {"synced": 0, "unsynced": 0, "victims": 0}
    with pytest.raises(WatchRangeError):
        store.watch(key, range_end)


def test_negative_start_revision_is_compacted(store):
    with pytest.raises(errors.CompactedError) as exc:
        store.watch(b"k", start_revision=-1)
    assert str(exc.value) == "etcdserver: mvcc: required revision has been compacted"


# --- start revision -----------------------------------------------------------
#
# History: k = v2 @2, v3 @3, v4 @4; the watcher is created at revision 4,
# then k = v5..v8 @5..8.

START_TABLE = [
    # start, state right after create, first revision received
    (0, "synced", 5),  # only future events
    (1, "unsynced", 2),  # everything
    (3, "unsynced", 3),
    (4, "unsynced", 4),  # the current revision itself
    (5, "synced", 5),  # current + 1: same as 0
    (7, "synced", 7),  # in the future: nothing before it
]


@pytest.mark.parametrize("start, state, first", START_TABLE)
def test_start_revision(store, hub, start, state, first):
    for rev in (2, 3, 4):
        store.put(b"k", b"v%d" % rev)
    w, stream, created = watch(hub, b"k", start=start)
    assert (created, w.state) == (4, state)
    for rev in (5, 6, 7, 8):
        store.put(b"k", b"v%d" % rev)
    got = drain(hub, stream, w, 8)
    assert brief(got) == [(PUT, b"k", rev) for rev in range(first, 9)]
    assert [e.kv.value for r in got for e in r.events] == [b"v%d" % rev for rev in range(first, 9)]


def test_catch_up_while_writes_continue_has_no_gap_and_no_duplicate(store):
    """History replay switching to live delivery while another thread writes."""
    for i in range(2000):
        store.put(b"k%02d" % (i % 50), b"h%d" % i)
    h = WatchHub(store, max_revisions_per_sync=100, **FAST)
    try:
        w, stream, created = watch(h, *ALL, start=2)
        assert w.state == "unsynced"
        stop_at = {}
        writer_error = []

        def writer():
            try:
                # Write before, during and after the switch to the synced group.
                n = 0
                deadline = time.monotonic() + 20
                while w.state != "synced" and n < 100_000 and time.monotonic() < deadline:
                    store.put(b"k%02d" % (n % 50), b"w%d" % n)
                    n += 1
                stop_at["switch"] = n
                for _ in range(300):
                    store.put(b"k%02d" % (n % 50), b"w%d" % n)
                    n += 1
                stop_at["total"] = n
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                writer_error.append(e)

        t = threading.Thread(target=writer)
        received = []
        t.start()
        try:
            deadline = time.monotonic() + 20
            while t.is_alive() and time.monotonic() < deadline:
                resp = stream.get(timeout=0.05)
                if resp is not None:
                    received.append(resp)
        finally:
            t.join(timeout=30)
        assert not t.is_alive() and not writer_error, writer_error
        final = store.revision
        assert final == 2001 + stop_at["total"]
        received += drain(h, stream, w, final)
    finally:
        h.close()
    revs = [e.kv.mod_revision for r in received for e in r.events]
    assert revs == list(range(2, final + 1))
    values = [e.kv.value for r in received for e in r.events]
    assert values == [b"h%d" % i for i in range(2000)] + [b"w%d" % i for i in range(stop_at["total"])]
    assert stop_at["switch"] > 0, "the watcher caught up before any concurrent write"


# --- filters ------------------------------------------------------------------


FILTER_TABLE = [
    # filters, expected (type, revision); history: put@2 put@3 delete@4 txn(put k, put other)@5
    ((), [(PUT, 2), (PUT, 3), (DELETE, 4), (PUT, 5)]),
    ((NOPUT,), [(DELETE, 4)]),
    ((NODELETE,), [(PUT, 2), (PUT, 3), (PUT, 5)]),
    ((NOPUT, NODELETE), []),
]


@pytest.mark.parametrize("path", ["live", "history"])
@pytest.mark.parametrize("filters, want", FILTER_TABLE)
def test_filters(store, hub, path, filters, want):
    def write():
        store.put(b"k", b"1")
        store.put(b"k", b"2")
        store.delete(b"k")
        store.txn(success=[ops.put(b"k", b"3"), ops.put(b"other", b"x")])

    if path == "live":
        w, stream, _ = watch(hub, b"k", filters=filters)
        write()
    else:
        write()
        w, stream, _ = watch(hub, b"k", start=1, filters=filters)
    got = drain(hub, stream, w, 5)
    assert [(t, rev) for t, _, rev in brief(got)] == want
    # A response that the filters emptied is not sent at all.
    assert all(r.events for r in got)
    if path == "live":
        assert len(got) == len(want)


# --- event contents -------------------------------------------------------------


@pytest.mark.parametrize("path", ["live", "history"])
def test_prev_kv(store, hub, path):
    def write():
        store.put(b"k", b"v1")  # 2: creation
        store.put(b"k", b"v2")  # 3: update
        store.delete(b"k")  # 4
        store.put(b"k", b"v3")  # 5: creation again

    if path == "live":
        w, stream, _ = watch(hub, b"k", prev_kv=True)
        write()
    else:
        write()
        w, stream, _ = watch(hub, b"k", start=1, prev_kv=True)
    assert full(drain(hub, stream, w, 5)) == [
        (PUT, (b"k", 2, 2, 1, b"v1", 0), None),
        (PUT, (b"k", 2, 3, 2, b"v2", 0), (b"k", 2, 2, 1, b"v1", 0)),
        (DELETE, (b"k", 0, 4, 0, b"", 0), (b"k", 2, 3, 2, b"v2", 0)),
        (PUT, (b"k", 5, 5, 1, b"v3", 0), None),
    ]


def test_prev_kv_is_absent_when_compacted(store, hub):
    store.put(b"k", b"v1")  # 2
    store.put(b"k", b"v2")  # 3
    store.put(b"k", b"v3")  # 4
    store.compact(4, physical=True)
    w, stream, _ = watch(hub, b"k", start=4, prev_kv=True)
    store.put(b"k", b"v4")  # 5
    got = full(drain(hub, stream, w, 5))
    # Revision 3, the one before 4, is compacted; revision 4 is still readable.
    assert got == [
        (PUT, (b"k", 2, 4, 3, b"v3", 0), None),
        (PUT, (b"k", 2, 5, 4, b"v4", 0), (b"k", 2, 4, 3, b"v3", 0)),
    ]


@pytest.mark.parametrize("path", ["live", "history"])
def test_delete_event_carries_only_key_and_mod_revision(store, hub, path):
    lease = store.lease_grant(60).ID
    if path == "live":
        w, stream, _ = watch(hub, *ALL)
    store.put(b"k", b"value", lease=lease)
    store.put(b"k", b"value2", lease=lease)
    rev = store.delete(b"k").header.revision
    if path == "history":
        w, stream, _ = watch(hub, *ALL, start=rev)
    (ev,) = drain(hub, stream, w, rev)[-1].events
    assert ev.type == kv_pb2.Event.DELETE
    assert ev.kv == kv_pb2.KeyValue(key=b"k", mod_revision=rev)
    assert not ev.HasField("prev_kv")


@pytest.mark.parametrize("path", ["live", "history"])
def test_txn_changes_arrive_as_one_response_in_sub_order(store, hub, path):
    for k in (b"b", b"c", b"d", b"e"):
        store.put(k, b"old")
    store.put(b"x", b"unrelated")
    begin = store.revision
    if path == "live":
        w, stream, _ = watch(hub, *ALL)
    # Sub order: put z, then the deleted keys of [b, e) in key order, then put a.
    r = store.txn(success=[ops.put(b"z", b"1"), ops.delete(b"b", b"e"), ops.put(b"a", b"1")])
    rev = r.header.revision
    assert rev == begin + 1
    if path == "history":
        w, stream, _ = watch(hub, *ALL, start=rev)
    got = drain(hub, stream, w, rev)
    assert len(got) == 1 and got[0].header.revision == rev
    assert brief(got) == [(PUT, b"z", rev), (DELETE, b"b", rev), (DELETE, b"c", rev), (DELETE, b"d", rev), (PUT, b"a", rev)]


@pytest.mark.parametrize("path", ["live", "history"])
def test_lease_revoke_is_one_revision_with_deletes_in_key_order(store, hub, path):
    lease = store.lease_grant(60).ID
    for k in (b"c", b"a", b"e", b"b"):
        store.put(k, b"v", lease=lease)
    store.put(b"d", b"not leased")
    if path == "live":
        w, stream, _ = watch(hub, *ALL)
    rev = store.lease_revoke(lease).header.revision
    if path == "history":
        w, stream, _ = watch(hub, *ALL, start=rev)
    got = drain(hub, stream, w, rev)
    assert len(got) == 1
    assert brief(got) == [(DELETE, k, rev) for k in (b"a", b"b", b"c", b"e")]
    assert store.revision == rev


# --- compaction -----------------------------------------------------------------


def test_start_below_compact_revision_is_canceled_with_compact_revision(store, hub):
    for i in range(5):
        store.put(b"k", b"%d" % i)  # revisions 2..6
    store.compact(5, physical=True)
    w, stream, created = watch(hub, b"k", start=4)
    # Created normally, then canceled at its first sync.
    assert created == 6
    got = drain_until_canceled(stream)
    assert got.canceled and got.watch_id == w.id
    assert got.compact_revision == 5
    assert got.header.revision == 0 and not got.events
    wait_for(lambda: w.state == "canceled", what="the watcher to be removed")
    store.put(b"k", b"after")
    assert quiet(stream) == []
    assert hub.stats() == {"synced": 0, "unsynced": 0, "victims": 0}


def test_start_at_compact_revision_is_fine(store, hub):
    for i in range(5):
        store.put(b"k", b"%d" % i)  # revisions 2..6
    store.compact(5, physical=True)
    w, stream, _ = watch(hub, b"k", start=5)
    store.put(b"k", b"live")
    assert brief(drain(hub, stream, w, 7)) == [(PUT, b"k", 5), (PUT, b"k", 6), (PUT, b"k", 7)]


def test_delete_at_compact_revision_is_still_delivered(store, hub):
    """Checklist 11: the tombstone at the compact revision survives compaction."""
    store.put(b"k", b"1")  # 2
    store.put(b"j", b"1")  # 3
    assert store.delete(b"k").header.revision == 4
    store.compact(4, physical=True)
    w, stream, _ = watch(hub, *ALL, start=4)
    store.put(b"j", b"2")  # 5
    assert brief(drain(hub, stream, w, 5)) == [(DELETE, b"k", 4), (PUT, b"j", 5)]


def test_victim_overtaken_by_compaction_is_canceled(store):
    """A stalled watcher that falls behind a compaction gets what was
    buffered, its parked response, then the compaction cancel."""
    h = WatchHub(store, **FAST)
    try:
        stream = BufferedStream(capacity=4)
        w, _, _ = watch(h, b"k", stream=stream)
        for i in range(10):
            store.put(b"k", b"%d" % i)  # revisions 2..11
        wait_for(lambda: w.state == "victim", what="the watcher to become a victim")
        store.compact(store.revision, physical=True)
        got = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not (got and got[-1].canceled):
            resp = stream.get(timeout=0.1)
            if resp is not None:
                got.append(resp)
    finally:
        h.close()
    # Four buffered responses and the parked one, in order, then the cancel.
    assert brief(got[:-1]) == [(PUT, b"k", rev) for rev in range(2, 7)]
    assert got[-1].canceled and got[-1].compact_revision == 11


# --- progress and cancel ----------------------------------------------------------


def test_progress_when_every_watcher_is_synced(store, hub):
    store.put(b"other", b"1")
    a, stream, _ = watch(hub, b"a")
    b, _, _ = watch(hub, b"b", b"c", stream=stream)
    assert hub.request_progress(stream, [a, b])
    (resp,) = quiet(stream)
    assert resp.watch_id == -1 and resp.header.revision == store.revision == 2
    assert not resp.events and not resp.canceled and not resp.created and resp.compact_revision == 0


def test_no_progress_while_a_watcher_is_unsynced(store, hub):
    for i in range(3):
        store.put(b"k", b"%d" % i)
    synced, out, _ = watch(hub, b"k")
    # A catch-up cannot finish while its stream is full, so this watcher
    # stays unsynced for as long as the test needs.
    full_stream = BufferedStream(capacity=1)
    assert full_stream.try_send(pb.WatchResponse(watch_id=99))
    behind, _, _ = watch(hub, b"k", start=2, stream=full_stream)
    time.sleep(0.05)
    assert behind.state == "unsynced"
    assert not hub.request_progress(out, [synced, behind])
    assert quiet(out) == []
    # Once it has caught up, the same request is answered.
    assert full_stream.get(timeout=1).watch_id == 99
    assert brief([full_stream.get(timeout=5)]) == [(PUT, b"k", 2), (PUT, b"k", 3), (PUT, b"k", 4)]
    wait_for(lambda: behind.state == "synced", what="the watcher to sync")
    assert hub.request_progress(out, [synced, behind])
    (resp,) = quiet(out)
    assert is_progress(resp) and resp.header.revision == 4


def test_no_progress_for_no_watchers_or_a_future_start(store, hub):
    stream = BufferedStream()
    assert not hub.request_progress(stream, [])
    future, _, _ = watch(hub, b"k", start=10, stream=stream)
    assert future.state == "synced"
    assert not hub.request_progress(stream, [future])
    assert quiet(stream) == []


def test_progress_notify_reaches_an_idle_synced_watcher(store):
    h = WatchHub(store, progress_interval=0.05, **FAST)
    try:
        store.put(b"other", b"1")
        w, stream, _ = watch(h, b"k", progress_notify=True)
        silent, silent_stream, _ = watch(h, b"k")
        resp = stream.get(timeout=5)
        assert resp is not None, "no progress notification"
        assert resp.watch_id == w.id and resp.header.revision == 2
        assert not resp.events and not resp.canceled
        assert quiet(silent_stream) == []
    finally:
        h.close()


def test_progress_is_not_behind_an_acknowledged_write(tmp_path):
    with mvcckv.open(str(tmp_path / "data"), fsync=False) as s:
        # A listener registered before the hub runs first; holding it stands
        # for the writer thread being preempted between answering the put
        # and notifying the watchers.
        gate = threading.Event()
        s.add_commit_listener(lambda changes: gate.wait(2))
        h = WatchHub(s, **FAST)
        try:
            w, stream, _ = watch(h, b"k")
            rev = s.put(b"other", b"1").header.revision
            assert h.request_progress(stream, [w])
            resp = stream.get(timeout=5)
            assert resp.header.revision >= rev, f"progress at {resp.header.revision} after put at {rev}"
        finally:
            gate.set()
            h.close()


def test_cancel(store, hub):
    w, stream, _ = watch(hub, b"k")
    other, other_stream, _ = watch(hub, b"k")
    store.put(b"k", b"1")
    assert brief(drain(hub, stream, w, 2)) == [(PUT, b"k", 2)]
    assert hub.cancel(w)
    assert w.state == "canceled"
    assert not hub.cancel(w)
    store.put(b"k", b"2")
    assert quiet(stream) == []
    assert brief(drain(hub, other_stream, other, 3)) == [(PUT, b"k", 2), (PUT, b"k", 3)]
    assert hub.stats() == {"synced": 1, "unsynced": 0, "victims": 0}


def test_cancel_an_unsynced_watcher(store, hub):
    for i in range(3):
        store.put(b"k", b"%d" % i)
    full_stream = BufferedStream(capacity=1)
    full_stream.try_send(pb.WatchResponse(watch_id=99))
    w, _, _ = watch(hub, b"k", start=2, stream=full_stream)
    assert hub.cancel(w)
    assert full_stream.get(timeout=1).watch_id == 99
    store.put(b"k", b"late")
    assert quiet(full_stream) == []
    assert hub.stats() == {"synced": 0, "unsynced": 0, "victims": 0}


def test_watch_iterator_close_cancels(store):
    store.put(b"k", b"1")
    with store.watch(b"k", start_revision=1) as it:
        assert brief(it.take(1)) == [(PUT, b"k", 2)]
        watcher = it.watcher
    assert watcher.state == "canceled"
    store.put(b"k", b"2")
    with pytest.raises(StopIteration):
        next(it)


# --- property: watchers against a model of the history -------------------------
#
# The model is etcd's revision semantics in a few lines: a dict of live keys
# and a list of changes, each (revision, type, key, KeyValue).  A watcher of
# [key, range_end) from start revision s must receive exactly the changes
# with revision >= s in that range, in revision then sub order; from below
# the compact revision it must be canceled with the compact revision.

KEYS = [b"a", b"ab", b"abc", b"b", b"c"]


class Model:
    def __init__(self):
        self.rev = 1
        self.compact_rev = -1
        self.live: dict[bytes, tuple] = {}  # key -> KeyValue tuple
        self.changes: list[tuple] = []  # (type, KeyValue tuple)
        self.states = {1: {}}  # revision -> live keys after it

    def apply(self, writes) -> None:
        """One write request: ("put", key, value) / ("delete", key) in sub order."""
        rev = self.rev + 1
        changed = False
        for op, key, *value in writes:
            if op == "put":
                old = self.live.get(key)
                create, version = (old[1], old[3] + 1) if old else (rev, 1)
                kv = (key, create, rev, version, value[0], 0)
                self.live[key] = kv
                self.changes.append((PUT, kv))
                changed = True
            elif key in self.live:
                del self.live[key]
                self.changes.append((DELETE, (key, 0, rev, 0, b"", 0)))
                changed = True
        if changed:
            self.rev = rev
            self.states[rev] = dict(self.live)

    def delete_range(self, key, range_end) -> None:
        self.apply([("delete", k) for k in sorted(self.live) if in_range(k, key, range_end)])

    def expected(self, key, range_end, first, filters, prev_kv) -> list[tuple]:
        out = []
        for typ, kv in self.changes:
            if kv[2] < first or not in_range(kv[0], key, range_end):
                continue
            if (typ == PUT and NOPUT in filters) or (typ == DELETE and NODELETE in filters):
                continue
            prev = None
            creation = typ == PUT and kv[3] == 1
            if prev_kv and not creation and kv[2] - 1 >= self.compact_rev:
                prev = self.states[kv[2] - 1].get(kv[0])
            out.append((typ, kv, prev))
        return out


def in_range(k: bytes, key: bytes, range_end: bytes) -> bool:
    if range_end == b"":
        return k == key
    if range_end == b"\0":
        return k >= key
    return key <= k < range_end


key_st = st.sampled_from(KEYS)
value_st = st.sampled_from([b"", b"x", b"yy"])
write_st = st.one_of(
    st.tuples(st.just("put"), key_st, value_st),
    st.tuples(st.just("delete"), key_st),
    st.tuples(st.just("delete_range"), key_st, st.sampled_from(KEYS[1:] + [b"d", b"\0"])),
    st.tuples(
        st.just("txn"),
        st.lists(
            st.one_of(st.tuples(st.just("put"), key_st, value_st), st.tuples(st.just("delete"), key_st)),
            min_size=1, max_size=4, unique_by=lambda w: w[1],
        ),
    ),
)
compacting_write_st = st.one_of(write_st, st.tuples(st.just("compact"), st.integers(0, 100)))
range_st = st.one_of(
    st.tuples(key_st, st.just(b"")),
    st.tuples(key_st, st.sampled_from(KEYS + [b"d"])).filter(lambda r: r[1] > r[0]),
    st.tuples(key_st, st.just(b"\0")),
    st.sampled_from([(b"ab", mvcckv.prefix_end(b"ab")), ALL]),
)
watch_st = st.tuples(
    range_st,
    st.integers(0, 40),  # 0, else spread over 1 .. current + 2
    st.sampled_from([(), (NOPUT,), (NODELETE,)]),
    st.booleans(),
)


def perform(store, model: Model, write) -> None:
    kind = write[0]
    if kind == "put":
        store.put(write[1], write[2])
        model.apply([write])
    elif kind == "delete":
        store.delete(write[1])
        model.apply([write])
    elif kind == "delete_range":
        key, end = write[1], write[2]
        if end != b"\0" and end <= key:
            end = b"\0"
        store.delete(key, end)
        model.delete_range(key, end)
    elif kind == "txn":
        store.txn(success=[ops.put(w[1], w[2]) if w[0] == "put" else ops.delete(w[1]) for w in write[1]])
        model.apply(write[1])
    elif kind == "compact":
        low = max(model.compact_rev + 1, 1)
        if model.rev >= low:
            rev = low + write[1] % (model.rev - low + 1)
            store.compact(rev, physical=True)
            model.compact_rev = rev
    assert store.revision == model.rev


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    before=st.lists(compacting_write_st, max_size=25),
    after=st.lists(write_st, max_size=8),
    watches=st.lists(watch_st, min_size=1, max_size=4),
    max_revs=st.sampled_from([2, 1000]),
)
def test_watchers_receive_exactly_the_model_history(before, after, watches, max_revs):
    with tempfile.TemporaryDirectory() as d, mvcckv.open(d, fsync=False) as store:
        hub = WatchHub(store, max_revisions_per_sync=max_revs, **FAST)
        try:
            model = Model()
            for w in before:
                perform(store, model, w)
            created_at = model.rev
            watchers = []
            for (key, end), raw_start, filters, prev_kv in watches:
                start = raw_start and 1 + (raw_start - 1) % (created_at + 2)
                w, stream, created = watch(hub, key, end, start, filters=filters, prev_kv=prev_kv)
                assert created == created_at
                watchers.append((w, stream, key, end, start, filters, prev_kv))
            for w in after:
                perform(store, model, w)
            # Reach every future start revision, so every watcher can report progress.
            for _ in range(3):
                if model.rev >= max(spec[4] for spec in watchers):
                    break
                perform(store, model, ("put", b"b", b"pad"))

            for w, stream, key, end, start, filters, prev_kv in watchers:
                if 0 < start <= created_at and start < model.compact_rev:
                    resp = drain_until_canceled(stream)
                    assert resp.compact_revision == model.compact_rev
                    continue
                first = created_at + 1 if start == 0 else start
                got = drain(hub, stream, w, model.rev)
                assert full(got) == model.expected(key, end, first, filters, prev_kv)
                for r in got:
                    assert r.watch_id == w.id and r.events and not r.canceled
                    assert r.header.revision >= r.events[-1].kv.mod_revision
        finally:
            hub.close()


# --- slow consumer -----------------------------------------------------------------


def rss_anon() -> int | None:
    """Anonymous resident memory of this process (Linux), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def held_event_cost(kv: kv_pb2.KeyValue, n: int, sample: int = 2000) -> tuple[int, int]:
    """(traced bytes, wire bytes) that holding ``n`` one-event responses takes.

    Traced: what tracemalloc sees of a sample of such responses, as the hub
    builds them, scaled to ``n``.  Wire: their encoded size, a lower bound of
    their memory (the protobuf runtime's own buffers are not traced).
    """
    gc.collect()
    before = tracemalloc.get_traced_memory()[0]
    held = []
    for i in range(sample):
        r = pb.WatchResponse(watch_id=1)
        r.header.revision = i
        r.events.add(type=kv_pb2.Event.PUT).kv.CopyFrom(kv)
        held.append(r)
    traced = (tracemalloc.get_traced_memory()[0] - before) * n // sample
    wire = held[0].ByteSize() * n
    return traced, wire


@pytest.mark.parametrize("n", [20_000, pytest.param(100_000, marks=pytest.mark.slow)])
def test_slow_consumer_does_not_slow_writers_or_buffer_history(tmp_path, n):
    value = b"v" * 1000
    keys = [b"key/%04d" % i for i in range(1000)]
    with mvcckv.open(str(tmp_path / "data"), fsync=False) as store:
        h = WatchHub(store, sync_interval=0.02)
        try:
            # Both phases run with the watch thread up, the keys in the index
            # already, and tracemalloc on, so only the stalled watcher differs.
            idle, _, _ = watch(h, b"idle")
            for k in keys:
                store.put(k, value)

            def phase():
                latencies, revs = [], []
                gc.collect()
                tracemalloc.reset_peak()
                before = tracemalloc.get_traced_memory()[0]
                rss_before = rss_anon()
                for i in range(n):
                    t0 = time.perf_counter()
                    revs.append(store.put(keys[i % 1000], value).header.revision)
                    latencies.append(time.perf_counter() - t0)
                current, peak = tracemalloc.get_traced_memory()
                rss_after = rss_anon()
                rss = None if rss_before is None else rss_after - rss_before
                return statistics.median(latencies), current - before, peak - before, rss, revs

            tracemalloc.start()
            try:
                base_latency, base_growth, _, base_rss, _ = phase()
                stalled, stalled_stream, _ = watch(h, b"key/", mvcckv.prefix_end(b"key/"))
                latency, _, peak, rss, revs = phase()
                traced_cost, wire_cost = held_event_cost(store.get(keys[0]), n)
            finally:
                tracemalloc.stop()
            stats = h.stats()
            state = stalled.state

            print(
                f"\nslow consumer, {n} puts of {len(value)} B: median put latency "
                f"{base_latency * 1e6:.0f} us without, {latency * 1e6:.0f} us with a stalled watcher; "
                f"traced growth {base_growth} B without, peak {peak} B with "
                f"(holding every event: {traced_cost} B traced, >= {wire_cost} B in all); "
                f"RssAnon growth {base_rss} B without, {rss} B with; hub {stats}, watcher {state}"
            )
            assert latency < 3 * base_latency
            # What the stalled watcher adds is a small fraction of holding every event.
            assert peak - base_growth < traced_cost / 4
            if rss is not None:
                assert rss < wire_cost / 2
            assert state in ("victim", "unsynced")
            assert stats["synced"] == 1 and stats["victims"] + stats["unsynced"] == 1

            # Now it reads: every event, exactly once, in order.
            events = []
            deadline = time.monotonic() + 120
            while len(events) < n and time.monotonic() < deadline:
                resp = stalled_stream.get(timeout=1)
                if resp is not None:
                    events.extend((e.kv.mod_revision, e.kv.key) for e in resp.events)
            assert len(events) == n, f"{len(events)} of {n} events within the time limit"
            assert [rev for rev, _ in events] == revs
            assert [k for _, k in events] == [keys[i % 1000] for i in range(n)]
            assert quiet(stalled_stream) == []
            wait_for(lambda: stalled.state == "synced", what="the drained watcher to be synced")
            assert idle.state == "synced"
        finally:
            h.close()

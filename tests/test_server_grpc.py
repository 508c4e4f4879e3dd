"""``mvcckv serve`` over raw gRPC: what etcdctl does not show.

Header fields, inner txn headers, the gRPC code and exact message of every
error type, Status fields, membership answers, metadata checks, message
size limits, listeners, flags and shutdown.  One server is shared by the
module (tests use their own keys); tests that compact, fill the quota,
raise alarms or restart start their own.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness import MvcckvProcess, free_port, grpc_channel, stub
from mvcckv import errors, ops
from mvcckv.pb import rpc_pb2 as pb
from mvcckv.server import rpctypes
from mvcckv.server.app import client_api_version_ok

DEFAULT_MEMBER_ID = 0x8E9E05C52164694D
DEFAULT_CLUSTER_ID = 0xCDF818194E3A8C32
RAFT_TERM = 2

C = grpc.StatusCode
COMPACTED = "etcdserver: mvcc: required revision has been compacted"
FUTURE = "etcdserver: mvcc: required revision is a future revision"
TOO_LARGE = "etcdserver: request is too large"
NOSPACE = "etcdserver: mvcc: database space exceeded"


@pytest.fixture(scope="module")
def server(mvcckv_server_module):
    return mvcckv_server_module


@pytest.fixture(scope="module")
def channel(server):
    ch = server.channel()
    yield ch
    ch.close()


@pytest.fixture(scope="module")
def kv(channel):
    return stub(channel, "KV")


@pytest.fixture(scope="module")
def maint(channel):
    return stub(channel, "Maintenance")


@pytest.fixture(scope="module")
def cluster(channel):
    return stub(channel, "Cluster")


def rpc_error(fn, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, timeout=10, **kwargs)
    return info.value


def assert_error(fn, request, code, message, **kwargs):
    err = rpc_error(fn, request, **kwargs)
    assert (err.code(), err.details()) == (code, message)


def assert_full_header(header, revision=None):
    assert header.cluster_id == DEFAULT_CLUSTER_ID
    assert header.member_id == DEFAULT_MEMBER_ID
    assert header.raft_term == RAFT_TERM
    if revision is not None:
        assert header.revision == revision


def current(kv) -> int:
    return kv.Range(pb.RangeRequest(key=b"\0", count_only=True), timeout=10).header.revision


def put(kv, key, value=b"", **kw) -> pb.PutResponse:
    return kv.Put(pb.PutRequest(key=key, value=value, **kw), timeout=10)


class Server(MvcckvProcess):
    """An mvcckv server of its own, with a log kept under tmp_path."""

    def __init__(self, tmp_path, *args, extra_urls=(), **kwargs):
        super().__init__(tmp_path / "data", *args, log_path=tmp_path / "mvcckv.log", **kwargs)
        self.extra_urls = tuple(extra_urls)

    def _command(self):
        cmd = super()._command()
        if self.extra_urls:
            urls = ",".join((self.client_url, *self.extra_urls))
            cmd[cmd.index("--listen-client-urls") + 1] = urls
            cmd[cmd.index("--advertise-client-urls") + 1] = urls
        return cmd


# --- headers -----------------------------------------------------------------


def test_headers_carry_identity_term_and_revision(kv, maint):
    before = current(kv)
    resp = put(kv, b"hdr/a", b"1")
    assert_full_header(resp.header, before + 1)
    assert_full_header(kv.Range(pb.RangeRequest(key=b"hdr/a"), timeout=10).header, before + 1)
    resp = kv.DeleteRange(pb.DeleteRangeRequest(key=b"hdr/none"), timeout=10)
    assert_full_header(resp.header, before + 1)  # nothing deleted: no new revision
    assert_full_header(maint.Status(pb.StatusRequest(), timeout=10).header, before + 1)
    assert_full_header(maint.Hash(pb.HashRequest(), timeout=10).header, before + 1)
    assert_full_header(maint.Alarm(pb.AlarmRequest(), timeout=10).header, before + 1)


def test_range_at_an_old_revision_reports_the_current_one(kv):
    first = put(kv, b"hdr/old", b"v1").header.revision
    put(kv, b"hdr/old", b"v2")
    resp = kv.Range(pb.RangeRequest(key=b"hdr/old", revision=first), timeout=10)
    assert resp.kvs[0].value == b"v1"
    assert resp.header.revision == current(kv) > first


def test_txn_inner_headers_carry_only_the_revision(kv):
    put(kv, b"txn/b", b"old")
    rev = current(kv)
    req = pb.TxnRequest(
        compare=[ops.version(b"txn/b") > 0],
        success=[
            ops.put(b"txn/a", b"1"),
            ops.get(b"txn/a"),
            ops.delete(b"txn/b"),
            ops.txn([], [ops.put(b"txn/c", b"3")]),
        ],
    )
    resp = kv.Txn(req, timeout=10)
    assert resp.succeeded
    assert_full_header(resp.header, rev + 1)
    put_r, range_r, del_r, txn_r = resp.responses
    for inner in (put_r.response_put, range_r.response_range, del_r.response_delete_range):
        assert (inner.header.cluster_id, inner.header.member_id, inner.header.raft_term) == (0, 0, 0)
        assert inner.header.revision == rev + 1
    assert range_r.response_range.kvs[0].value == b"1"
    assert del_r.response_delete_range.deleted == 1
    nested = txn_r.response_txn
    assert nested.HasField("header") and nested.header.ListFields() == []
    assert nested.responses[0].response_put.header.revision == rev + 1


def test_read_only_txn_creates_no_revision(kv):
    put(kv, b"txn/ro", b"v")
    rev = current(kv)
    resp = kv.Txn(pb.TxnRequest(compare=[ops.value(b"txn/ro") == b"x"], failure=[ops.get(b"txn/ro")]), timeout=10)
    assert not resp.succeeded
    assert_full_header(resp.header, rev)
    assert resp.responses[0].response_range.kvs[0].value == b"v"
    assert resp.responses[0].response_range.header.revision == rev


# --- Range fields etcdctl 3.4 cannot send ------------------------------------


def test_range_count_only_and_revision_filters(kv):
    r1 = put(kv, b"flt/a", b"1").header.revision
    r2 = put(kv, b"flt/b", b"2").header.revision
    r3 = put(kv, b"flt/a", b"3").header.revision
    rng = dict(key=b"flt/", range_end=b"flt0")

    resp = kv.Range(pb.RangeRequest(**rng, count_only=True, limit=1), timeout=10)
    assert (resp.count, list(resp.kvs), resp.more) == (2, [], False)

    def keys(**kw):
        resp = kv.Range(pb.RangeRequest(**rng, **kw), timeout=10)
        assert resp.count == 2  # count ignores the filters
        return [kv_.key for kv_ in resp.kvs]

    assert keys(min_mod_revision=r3) == [b"flt/a"]
    assert keys(max_mod_revision=r2) == [b"flt/b"]
    assert keys(min_create_revision=r2) == [b"flt/b"]
    assert keys(max_create_revision=r1) == [b"flt/a"]
    assert keys(max_create_revision=r2, min_create_revision=r1) == [b"flt/a", b"flt/b"]
    resp = kv.Range(pb.RangeRequest(**rng, max_create_revision=r2, limit=1), timeout=10)
    assert ([k.key for k in resp.kvs], resp.more, resp.count) == ([b"flt/a"], True, 2)
    resp = kv.Range(pb.RangeRequest(**rng, serializable=True, keys_only=True), timeout=10)
    assert [(k.key, k.value) for k in resp.kvs] == [(b"flt/a", b""), (b"flt/b", b"")]


def test_put_prev_kv_and_ignore_value(kv):
    first = put(kv, b"put/k", b"v1")
    resp = put(kv, b"put/k", b"", ignore_value=True, prev_kv=True)
    assert_full_header(resp.header, first.header.revision + 1)
    assert (resp.prev_kv.value, resp.prev_kv.mod_revision) == (b"v1", first.header.revision)
    (kv_,) = kv.Range(pb.RangeRequest(key=b"put/k"), timeout=10).kvs
    assert (kv_.value, kv_.version) == (b"v1", 2)
    resp = kv.DeleteRange(pb.DeleteRangeRequest(key=b"put/k", prev_kv=True), timeout=10)
    assert (resp.deleted, [p.value for p in resp.prev_kvs]) == (1, [b"v1"])
    assert not put(kv, b"put/new", b"x", prev_kv=True).HasField("prev_kv")


# --- error codes and messages ---------------------------------------------------


def _too_many_compares():
    return pb.TxnRequest(compare=[ops.version(f"many/{i}") == 0 for i in range(129)])


@pytest.mark.parametrize("method, request_, code, message", [
    ("Range", pb.RangeRequest(), C.INVALID_ARGUMENT, "etcdserver: key is not provided"),
    ("Put", pb.PutRequest(value=b"v"), C.INVALID_ARGUMENT, "etcdserver: key is not provided"),
    ("DeleteRange", pb.DeleteRangeRequest(), C.INVALID_ARGUMENT, "etcdserver: key is not provided"),
    ("Txn", pb.TxnRequest(compare=[pb.Compare(key=b"")]), C.INVALID_ARGUMENT,
     "etcdserver: key is not provided"),
    ("Put", pb.PutRequest(key=b"err/k", value=b"v", ignore_value=True), C.INVALID_ARGUMENT,
     "etcdserver: value is provided"),
    ("Put", pb.PutRequest(key=b"err/k", lease=7, ignore_lease=True), C.INVALID_ARGUMENT,
     "etcdserver: lease is provided"),
    ("Put", pb.PutRequest(key=b"err/absent", ignore_value=True), C.INVALID_ARGUMENT,
     "etcdserver: key not found"),
    ("Put", pb.PutRequest(key=b"err/k", lease=12345), C.NOT_FOUND, "etcdserver: requested lease not found"),
    ("Txn", pb.TxnRequest(success=[pb.RequestOp()]), C.INVALID_ARGUMENT, "etcdserver: key not found"),
    ("Txn", _too_many_compares(), C.INVALID_ARGUMENT, "etcdserver: too many operations in txn request"),
    ("Txn", pb.TxnRequest(success=[ops.put(b"err/d"), ops.put(b"err/d")]), C.INVALID_ARGUMENT,
     "etcdserver: duplicate key given in txn request"),
    ("Range", pb.RangeRequest(key=b"err/k", sort_order=7), C.INVALID_ARGUMENT,
     "etcdserver: invalid sort option"),
    ("Range", pb.RangeRequest(key=b"err/k", revision=10**9), C.OUT_OF_RANGE, FUTURE),
    ("Txn", pb.TxnRequest(success=[ops.get(b"err/k", revision=10**9)]), C.OUT_OF_RANGE, FUTURE),
    ("Compact", pb.CompactionRequest(revision=10**9), C.OUT_OF_RANGE, FUTURE),
    ("Put", pb.PutRequest(key=b"err/big", value=b"x" * (1536 * 1024)), C.INVALID_ARGUMENT, TOO_LARGE),
])
def test_kv_errors(kv, method, request_, code, message):
    assert_error(getattr(kv, method), request_, code, message)


def test_hashkv_of_a_future_revision(maint):
    assert_error(maint.HashKV, pb.HashKVRequest(revision=10**9), C.OUT_OF_RANGE, FUTURE)


def test_request_size_limits(kv):
    # Just under max-request-bytes (1.5 MiB) once the request's own framing
    # and the WAL record overhead are added: accepted.
    ok = put(kv, b"size/ok", b"x" * (1536 * 1024 - 200))
    assert ok.header.revision > 0
    # Over max-request-bytes + 512 KiB: gRPC refuses it before mvcckv sees it.
    err = rpc_error(kv.Put, pb.PutRequest(key=b"size/huge", value=b"x" * (2 * 1024 * 1024 + 1)))
    assert err.code() == C.RESOURCE_EXHAUSTED
    assert kv.Range(pb.RangeRequest(key=b"size/huge"), timeout=10).count == 0


def test_compaction_errors(tmp_path):
    with Server(tmp_path) as srv, srv.channel() as ch:
        kv, maint = stub(ch, "KV"), stub(ch, "Maintenance")
        for i in range(5):
            put(kv, b"c", str(i).encode())  # revisions 2..6
        resp = kv.Compact(pb.CompactionRequest(revision=4), timeout=10)
        assert_full_header(resp.header, 6)
        assert kv.Range(pb.RangeRequest(key=b"c", revision=4), timeout=10).kvs[0].value == b"2"
        assert_error(kv.Range, pb.RangeRequest(key=b"c", revision=3), C.OUT_OF_RANGE, COMPACTED)
        assert_error(kv.Compact, pb.CompactionRequest(revision=4), C.OUT_OF_RANGE, COMPACTED)
        assert_error(kv.Compact, pb.CompactionRequest(revision=7), C.OUT_OF_RANGE, FUTURE)
        assert_error(maint.HashKV, pb.HashKVRequest(revision=3), C.OUT_OF_RANGE, COMPACTED)
        assert_error(kv.Txn, pb.TxnRequest(success=[ops.get(b"c", revision=3)]), C.OUT_OF_RANGE, COMPACTED)
        resp = kv.Compact(pb.CompactionRequest(revision=6, physical=True), timeout=10)
        assert_full_header(resp.header, 6)
        # Asked for by number, a compaction's revision is answered with the
        # hash taken while compacting, which names the *previous* compaction
        # (4); asked for as 0 ("current") it is computed afresh, as etcd does.
        hkv = maint.HashKV(pb.HashKVRequest(revision=6), timeout=10)
        assert (hkv.compact_revision, hkv.hash_revision, hkv.header.revision) == (4, 6, 6)
        fresh = maint.HashKV(pb.HashKVRequest(), timeout=10)
        assert (fresh.compact_revision, fresh.hash_revision, fresh.header.revision) == (6, 6, 6)


def test_quota_raises_nospace(tmp_path):
    with Server(tmp_path, extra_args=["--quota-backend-bytes", "1"]) as srv, srv.channel() as ch:
        kv, maint = stub(ch, "KV"), stub(ch, "Maintenance")
        assert_error(kv.Put, pb.PutRequest(key=b"k", value=b"v"), C.RESOURCE_EXHAUSTED, NOSPACE)
        assert_error(kv.Txn, pb.TxnRequest(success=[ops.put(b"k")]), C.RESOURCE_EXHAUSTED, NOSPACE)
        alarms = maint.Alarm(pb.AlarmRequest(action=pb.AlarmRequest.GET), timeout=10).alarms
        assert [(a.memberID, a.alarm) for a in alarms] == [(DEFAULT_MEMBER_ID, pb.NOSPACE)]
        status = maint.Status(pb.StatusRequest(), timeout=10)
        assert list(status.errors) == [f"memberID:{DEFAULT_MEMBER_ID} alarm:NOSPACE "]
        assert status.dbSizeQuota == 1
        # Reads, deletes and write-free txns go on.
        assert kv.Range(pb.RangeRequest(key=b"k"), timeout=10).count == 0
        kv.DeleteRange(pb.DeleteRangeRequest(key=b"k"), timeout=10)
        kv.Txn(pb.TxnRequest(success=[ops.get(b"k")]), timeout=10)


def test_corrupt_alarm_refuses_kv_with_data_loss(tmp_path):
    with Server(tmp_path) as srv, srv.channel() as ch:
        kv, maint = stub(ch, "KV"), stub(ch, "Maintenance")
        put(kv, b"k", b"v")
        act = maint.Alarm(pb.AlarmRequest(action=pb.AlarmRequest.ACTIVATE, memberID=DEFAULT_MEMBER_ID,
                                          alarm=pb.CORRUPT), timeout=10)
        assert_full_header(act.header)
        assert [(a.memberID, a.alarm) for a in act.alarms] == [(DEFAULT_MEMBER_ID, pb.CORRUPT)]
        for method, request_ in [
            (kv.Range, pb.RangeRequest(key=b"k")),
            (kv.Put, pb.PutRequest(key=b"k", value=b"w")),
            (kv.DeleteRange, pb.DeleteRangeRequest(key=b"k")),
            (kv.Txn, pb.TxnRequest(success=[ops.put(b"k")])),
            (kv.Compact, pb.CompactionRequest(revision=1)),
        ]:
            assert_error(method, request_, C.DATA_LOSS, "etcdserver: corrupt cluster")
        status = maint.Status(pb.StatusRequest(), timeout=10)
        assert list(status.errors) == [f"memberID:{DEFAULT_MEMBER_ID} alarm:CORRUPT "]
        deact = maint.Alarm(pb.AlarmRequest(action=pb.AlarmRequest.DEACTIVATE, memberID=DEFAULT_MEMBER_ID,
                                            alarm=pb.CORRUPT), timeout=10)
        assert [(a.memberID, a.alarm) for a in deact.alarms] == [(DEFAULT_MEMBER_ID, pb.CORRUPT)]
        assert kv.Range(pb.RangeRequest(key=b"k"), timeout=10).kvs[0].value == b"v"


def test_every_client_error_has_a_code():
    """A new error in mvcckv.errors (or rpctypes) needs its etcd code in
    rpctypes.CODES.  (Errors that etcd only ever reports as text, such as a
    watch's cancel reason, live in their own modules.)"""
    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    missing = [cls.__name__ for cls in subclasses(errors.MvccError)
               if cls.__module__ in ("mvcckv.errors", "mvcckv.server.rpctypes") and cls not in rpctypes.CODES]
    assert missing == []


def test_unmapped_errors_are_unknown_like_etcd():
    class Unlisted(errors.MvccError):
        message = "etcdserver: something new"

    assert rpctypes.status_code(Unlisted()) == C.UNKNOWN
    assert rpctypes.status_code(errors.CompactedError()) == C.OUT_OF_RANGE


class _Aborted(Exception):
    pass


class _FakeContext:
    def __init__(self):
        self.status = None

    async def abort(self, code, details):
        self.status = (code, details)
        raise _Aborted()


def _handle(exc):
    class Servicer:
        @rpctypes.rpc
        async def Method(self, request, context):
            raise exc

    context = _FakeContext()
    with pytest.raises(_Aborted):
        asyncio.run(Servicer().Method(None, context))
    return context.status


def test_rpc_wrapper_maps_errors_and_survives_bugs(caplog):
    assert _handle(errors.FutureRevisionError()) == (C.OUT_OF_RANGE, FUTURE)
    assert _handle(errors.StoppedError("etcdserver: server stopped: disk full")) == \
        (C.UNAVAILABLE, "etcdserver: server stopped: disk full")
    code, details = _handle(KeyError("boom"))
    assert code == C.INTERNAL and "KeyError" in details
    assert "Servicer.Method failed" in caplog.text and "Traceback" in caplog.text


def test_auth_status_of_a_fresh_server(channel):
    st = stub(channel, "Auth").AuthStatus(pb.AuthStatusRequest(), timeout=10)
    assert (st.enabled, st.authRevision) == (False, 1)
    assert st.header.cluster_id and st.header.member_id


# --- Maintenance -------------------------------------------------------------------


def test_status_fields(kv, maint):
    put(kv, b"status/k", b"v")
    st = maint.Status(pb.StatusRequest(), timeout=10)
    assert_full_header(st.header, current(kv))
    assert st.version == "3.6.14"
    assert st.storageVersion == "3.6.0"
    assert st.leader == st.header.member_id == DEFAULT_MEMBER_ID
    assert st.raftTerm == RAFT_TERM
    assert st.raftIndex >= st.raftAppliedIndex >= 1
    assert 0 < st.dbSizeInUse <= st.dbSize
    assert st.dbSizeQuota == 2 * 1024**3
    assert not st.isLearner
    assert list(st.errors) == []
    assert st.HasField("downgradeInfo")
    assert (st.downgradeInfo.enabled, st.downgradeInfo.targetVersion) == (False, "")


def test_raft_indices_follow_the_wal(kv, maint):
    before = maint.Status(pb.StatusRequest(), timeout=10)
    put(kv, b"status/idx", b"1")
    put(kv, b"status/idx", b"2")
    after = maint.Status(pb.StatusRequest(), timeout=10)
    assert after.raftIndex == before.raftIndex + 2
    assert after.raftAppliedIndex == before.raftAppliedIndex + 2


def test_hash_and_hashkv(kv, maint):
    h1 = maint.Hash(pb.HashRequest(), timeout=10)
    assert h1.hash == maint.Hash(pb.HashRequest(), timeout=10).hash
    put(kv, b"hash/k", b"v")
    h2 = maint.Hash(pb.HashRequest(), timeout=10)
    assert h2.hash != h1.hash and h2.header.revision == h1.header.revision + 1
    rev = h2.header.revision
    hkv = maint.HashKV(pb.HashKVRequest(), timeout=10)
    assert_full_header(hkv.header, rev)
    assert (hkv.compact_revision, hkv.hash_revision) == (-1, rev)
    older = maint.HashKV(pb.HashKVRequest(revision=rev - 1), timeout=10)
    assert older.hash_revision == rev - 1 and older.hash != hkv.hash
    assert maint.HashKV(pb.HashKVRequest(revision=rev - 1), timeout=10).hash == older.hash


def test_defragment_answers_without_header(maint):
    resp = maint.Defragment(pb.DefragmentRequest(), timeout=30)
    assert resp.ListFields() == []
    st = maint.Status(pb.StatusRequest(), timeout=10)
    assert 0 < st.dbSizeInUse <= st.dbSize


def test_snapshot_stream_framing(kv, maint):
    put(kv, b"snap/k", b"v")
    msgs = list(maint.Snapshot(pb.SnapshotRequest(), timeout=30))
    assert len(msgs) >= 2
    assert all(not m.HasField("header") and m.version == "3.6.0" for m in msgs)
    data = b"".join(m.blob for m in msgs[:-1])
    assert msgs[-1].blob == hashlib.sha256(data).digest()
    assert msgs[-1].remaining_bytes == 0
    assert len(data) % 512 == 0
    sent = 0
    for m in msgs[:-1]:
        sent += len(m.blob)
        assert m.remaining_bytes == len(data) - sent


def test_snapshot_cancelled_midway_leaves_the_server_serving(kv, maint):
    for i in range(40):
        put(kv, f"snap/big/{i}".encode(), os.urandom(16 * 1024))
    stream = maint.Snapshot(pb.SnapshotRequest(), timeout=30)
    first = next(stream)
    assert first.remaining_bytes > 0
    stream.cancel()
    assert put(kv, b"snap/after", b"v").header.revision > 0
    msgs = list(maint.Snapshot(pb.SnapshotRequest(), timeout=30))
    assert msgs[-1].blob == hashlib.sha256(b"".join(m.blob for m in msgs[:-1])).digest()


def test_alarm_get_activate_deactivate(tmp_path):
    with Server(tmp_path) as srv, srv.channel() as ch:
        maint = stub(ch, "Maintenance")
        get = pb.AlarmRequest(action=pb.AlarmRequest.GET)
        assert list(maint.Alarm(get, timeout=10).alarms) == []
        nospace = dict(memberID=DEFAULT_MEMBER_ID, alarm=pb.NOSPACE)
        maint.Alarm(pb.AlarmRequest(action=pb.AlarmRequest.ACTIVATE, **nospace), timeout=10)
        maint.Alarm(pb.AlarmRequest(action=pb.AlarmRequest.ACTIVATE, memberID=5, alarm=pb.CORRUPT), timeout=10)
        resp = maint.Alarm(get, timeout=10)
        assert_full_header(resp.header, 1)
        assert [(a.memberID, a.alarm) for a in resp.alarms] == [(5, pb.CORRUPT), (DEFAULT_MEMBER_ID, pb.NOSPACE)]
        only = maint.Alarm(pb.AlarmRequest(action=pb.AlarmRequest.GET, alarm=pb.NOSPACE), timeout=10)
        assert [(a.memberID, a.alarm) for a in only.alarms] == [(DEFAULT_MEMBER_ID, pb.NOSPACE)]
        srv.restart()  # alarms are durable
        gone = maint.Alarm(pb.AlarmRequest(action=pb.AlarmRequest.DEACTIVATE, **nospace), timeout=10)
        assert [(a.memberID, a.alarm) for a in gone.alarms] == [(DEFAULT_MEMBER_ID, pb.NOSPACE)]
        none = maint.Alarm(pb.AlarmRequest(action=pb.AlarmRequest.DEACTIVATE, **nospace), timeout=10)
        assert list(none.alarms) == []
        assert [(a.memberID, a.alarm) for a in maint.Alarm(get, timeout=10).alarms] == [(5, pb.CORRUPT)]


def test_move_leader(maint):
    resp = maint.MoveLeader(pb.MoveLeaderRequest(targetID=DEFAULT_MEMBER_ID), timeout=10)
    assert resp.ListFields() == []
    assert_error(maint.MoveLeader, pb.MoveLeaderRequest(targetID=1), C.FAILED_PRECONDITION,
                 "etcdserver: bad leader transferee")


@pytest.mark.parametrize("action, version, code, message", [
    (pb.DowngradeRequest.VALIDATE, "three", C.INVALID_ARGUMENT,
     "etcdserver: wrong downgrade target version format"),
    (pb.DowngradeRequest.ENABLE, "3.4.0", C.INVALID_ARGUMENT, "etcdserver: invalid downgrade target version"),
    (pb.DowngradeRequest.VALIDATE, "3.5", C.UNIMPLEMENTED, rpctypes.DowngradeUnsupportedError.message),
    (pb.DowngradeRequest.ENABLE, "3.5.0", C.UNIMPLEMENTED, rpctypes.DowngradeUnsupportedError.message),
    (9, "3.5", C.UNKNOWN, "etcdserver: unknown method"),
])
def test_downgrade_is_refused(maint, action, version, code, message):
    assert_error(maint.Downgrade, pb.DowngradeRequest(action=action, version=version), code, message)


def test_downgrade_cancel_without_a_downgrade_succeeds(maint):
    resp = maint.Downgrade(pb.DowngradeRequest(action=pb.DowngradeRequest.CANCEL), timeout=10)
    assert resp.version == "3.6"
    assert_full_header(resp.header)


def test_health_service(channel):
    health = health_pb2_grpc.HealthStub(channel)
    resp = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


# --- Cluster ------------------------------------------------------------------------


def test_member_list(server, cluster):
    resp = cluster.MemberList(pb.MemberListRequest(), timeout=10)
    assert (resp.header.cluster_id, resp.header.member_id, resp.header.raft_term, resp.header.revision) == \
        (DEFAULT_CLUSTER_ID, DEFAULT_MEMBER_ID, RAFT_TERM, 0)
    (member,) = resp.members
    assert (member.ID, member.name, list(member.peerURLs), list(member.clientURLs), member.isLearner) == \
        (DEFAULT_MEMBER_ID, "default", ["http://localhost:2380"], [server.client_url], False)


@pytest.mark.parametrize("method, request_, code, message", [
    ("MemberAdd", pb.MemberAddRequest(peerURLs=["localhost:2380"]), C.INVALID_ARGUMENT,
     "etcdserver: given member URLs are invalid"),
    ("MemberAdd", pb.MemberAddRequest(peerURLs=["http://10.0.0.9:2380/path"]), C.INVALID_ARGUMENT,
     "etcdserver: given member URLs are invalid"),
    ("MemberAdd", pb.MemberAddRequest(), C.INVALID_ARGUMENT, "etcdserver: given member URLs are invalid"),
    ("MemberAdd", pb.MemberAddRequest(peerURLs=["http://localhost:2380"]), C.FAILED_PRECONDITION,
     "etcdserver: Peer URLs already exists"),
    ("MemberAdd", pb.MemberAddRequest(peerURLs=["http://10.0.0.9:2380"], isLearner=True), C.UNIMPLEMENTED,
     errors.SingleMemberError.message),
    ("MemberRemove", pb.MemberRemoveRequest(ID=42), C.NOT_FOUND, "etcdserver: member not found"),
    ("MemberRemove", pb.MemberRemoveRequest(ID=DEFAULT_MEMBER_ID), C.UNIMPLEMENTED,
     errors.SingleMemberError.message),
    ("MemberUpdate", pb.MemberUpdateRequest(ID=42, peerURLs=["http://a:1"]), C.NOT_FOUND,
     "etcdserver: member not found"),
    ("MemberUpdate", pb.MemberUpdateRequest(ID=DEFAULT_MEMBER_ID, peerURLs=["http://a:1"]), C.UNIMPLEMENTED,
     errors.SingleMemberError.message),
    ("MemberPromote", pb.MemberPromoteRequest(ID=42), C.NOT_FOUND, "etcdserver: member not found"),
    ("MemberPromote", pb.MemberPromoteRequest(ID=DEFAULT_MEMBER_ID), C.FAILED_PRECONDITION,
     "etcdserver: can only promote a learner member"),
])
def test_membership_changes_are_refused(cluster, method, request_, code, message):
    assert_error(getattr(cluster, method), request_, code, message)


def test_member_update_to_the_same_urls_is_a_no_op(cluster):
    resp = cluster.MemberUpdate(pb.MemberUpdateRequest(ID=DEFAULT_MEMBER_ID, peerURLs=["http://localhost:2380"]),
                                timeout=10)
    assert [m.ID for m in resp.members] == [DEFAULT_MEMBER_ID]
    assert resp.header.member_id == DEFAULT_MEMBER_ID


# --- identity ---------------------------------------------------------------------


def _derived_ids(peer_urls, token):
    mid = int.from_bytes(hashlib.sha1(("".join(sorted(peer_urls)) + token).encode()).digest()[:8], "big")
    cid = int.from_bytes(hashlib.sha1(mid.to_bytes(8, "big")).digest()[:8], "big")
    return cid, mid


def test_ids_derive_from_peer_urls_and_token_and_survive_restart(tmp_path):
    peers = ["http://10.1.2.3:2380", "http://10.1.2.4:2380"]
    args = ["--initial-advertise-peer-urls", ",".join(reversed(peers)), "--initial-cluster-token", "tok",
            "--name", "n1"]
    cid, mid = _derived_ids(peers, "tok")
    srv = Server(tmp_path, extra_args=args)
    with srv, srv.channel() as ch:
        kv, cl = stub(ch, "KV"), stub(ch, "Cluster")
        h = put(kv, b"k", b"v").header
        assert (h.cluster_id, h.member_id) == (cid, mid)
        (member,) = cl.MemberList(pb.MemberListRequest(), timeout=10).members
        assert (member.ID, member.name, list(member.peerURLs)) == (mid, "n1", peers)
        # As with etcd, the IDs are fixed at first start: other flags later
        # do not rename the member.
        srv.extra_args = ("--initial-cluster-token", "other")
        srv.restart()
        h = kv.Range(pb.RangeRequest(key=b"k"), timeout=10).header
        assert (h.cluster_id, h.member_id, h.revision) == (cid, mid, 2)
        st = stub(ch, "Maintenance").Status(pb.StatusRequest(), timeout=10)
        assert st.leader == mid


# --- metadata ---------------------------------------------------------------------


@pytest.mark.parametrize("value, ok", [
    ("3.4", True), ("", True), ("\u20ac", True), ("\u00ff\u00fe", False), ("\u00e9", False),
    ("\u00c3\u00a9", True),  # the Latin-1 reading of valid UTF-8 bytes
])
def test_client_api_version_rule(value, ok):
    assert client_api_version_ok(value) is ok


def test_client_api_version_valid_passes(kv):
    resp = kv.Range(pb.RangeRequest(key=b"md/k"), timeout=10,
                    metadata=[("client-api-version", "3.4"), ("hasleader", "true")])
    assert_full_header(resp.header)


def _raw_grpc_call(port: int, path: str, metadata: list[tuple[bytes, bytes]], body: bytes):
    """One gRPC call over a hand-driven HTTP/2 connection, so that header
    bytes no gRPC client would send (invalid UTF-8) can be sent."""
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        conn.initiate_connection()
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [
            (b":method", b"POST"), (b":scheme", b"http"), (b":path", path.encode()),
            (b":authority", b"127.0.0.1"), (b"content-type", b"application/grpc"), (b"te", b"trailers"),
            *metadata,
        ])
        conn.send_data(sid, b"\0" + len(body).to_bytes(4, "big") + body, end_stream=True)
        sock.sendall(conn.data_to_send())
        trailers: dict[bytes, bytes] = {}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            ended = False
            for event in conn.receive_data(data):
                if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    trailers.update(dict(event.headers))
                if isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                    ended = True
            sock.sendall(conn.data_to_send())
            if ended:
                break
    return trailers


def test_client_api_version_must_be_utf8(server):
    body = pb.RangeRequest(key=b"md/k").SerializeToString()
    bad = _raw_grpc_call(server.port, "/etcdserverpb.KV/Range", [(b"client-api-version", b"\xff\xfe")], body)
    assert (bad.get(b"grpc-status"), bad.get(b"grpc-message")) == \
        (str(C.INVALID_ARGUMENT.value[0]).encode(), b"etcdserver: invalid client api version")
    good = _raw_grpc_call(server.port, "/etcdserverpb.KV/Range", [(b"client-api-version", b"3.6")], body)
    assert good.get(b"grpc-status") == b"0"
    # Streams are checked too.
    bad = _raw_grpc_call(server.port, "/etcdserverpb.Maintenance/Snapshot",
                         [(b"client-api-version", b"\xc3")], b"")
    assert bad.get(b"grpc-message") == b"etcdserver: invalid client api version"


# --- listeners, flags, process ------------------------------------------------------


def test_several_listen_urls_and_only_those_hosts(tmp_path):
    other = free_port()
    srv = Server(tmp_path, extra_urls=[f"http://127.0.0.2:{other}"])
    with srv:
        with grpc_channel(f"127.0.0.2:{other}") as ch:
            members = stub(ch, "Cluster").MemberList(pb.MemberListRequest(), timeout=10).members
        assert list(members[0].clientURLs) == [srv.client_url, f"http://127.0.0.2:{other}"]
        # Bound to 127.0.0.1 and 127.0.0.2 only, not to every address.
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.3", srv.port), timeout=2).close()
        assert f"ready to serve client requests on {srv.client_url}, http://127.0.0.2:{other}" in srv.log_text()


@pytest.mark.parametrize("loop", [None, "asyncio"])
def test_serves_on_either_event_loop(tmp_path, loop):
    """uvloop by default; the standard library's loop serves the same API."""
    with Server(tmp_path, extra_args=["--event-loop", loop] if loop else []) as srv, srv.channel() as ch:
        kv = stub(ch, "KV")
        put(kv, b"loop/k", b"v")
        (got,) = kv.Range(pb.RangeRequest(key=b"loop/k"), timeout=10).kvs
        assert got.value == b"v"
        assert f"{loop or 'uvloop'} loop)" in srv.log_text()


@pytest.mark.parametrize("args, want", [
    ([], "threads"),
    (["--backend", "postgresql://127.0.0.1/x"], "threads"),
    (["--backend", "postgresql://127.0.0.1/x", "--grpc-server", "aio"], "aio"),
    (["--backend", "postgresql://127.0.0.1/x", "--grpc-server", "threads"], "threads"),
    (["--grpc-server", "aio"], "aio"),
])
def test_grpc_server_auto_is_threads_on_either_engine(args, want):
    from mvcckv.cli import build_parser
    from mvcckv.server.config import Config

    assert Config.from_args(build_parser().parse_args(["serve", *args])).grpc_server == want


@pytest.mark.parametrize("front", ["threads", "aio"])
def test_either_grpc_server_serves_every_call_shape(tmp_path, front):
    """--grpc-server threads (the default) and aio answer the same: KV on
    threads or on the loop, errors with etcd's status, a watch stream, a
    keep-alive stream, a server stream."""
    with Server(tmp_path, extra_args=["--grpc-server", front]) as srv, srv.channel() as ch:
        kv = stub(ch, "KV")
        rev = put(kv, b"front/k", b"v").header.revision
        assert kv.Range(pb.RangeRequest(key=b"front/", range_end=b"front0"), timeout=10).kvs[0].value == b"v"
        txn = kv.Txn(pb.TxnRequest(compare=[pb.Compare(key=b"front/k", target=pb.Compare.VALUE,
                                                        result=pb.Compare.EQUAL, value=b"v")],
                                   success=[pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=b"front/k"))]),
                     timeout=10)
        assert txn.succeeded and txn.header.revision == rev + 1
        assert_error(kv.Range, pb.RangeRequest(key=b"front/k", revision=rev + 5),
                     grpc.StatusCode.OUT_OF_RANGE, "etcdserver: mvcc: required revision is a future revision")

        requests = [pb.WatchRequest(create_request=pb.WatchCreateRequest(key=b"front/w"))]
        events = stub(ch, "Watch").Watch(iter(requests), timeout=10)
        assert next(events).created
        put(kv, b"front/w", b"1")
        (event,) = next(events).events
        assert (event.kv.key, event.kv.value) == (b"front/w", b"1")
        events.cancel()

        lease = stub(ch, "Lease")
        granted = lease.LeaseGrant(pb.LeaseGrantRequest(TTL=30), timeout=10)
        (alive,) = list(lease.LeaseKeepAlive(iter([pb.LeaseKeepAliveRequest(ID=granted.ID)]), timeout=10))
        assert alive.ID == granted.ID and alive.TTL == 30

        chunks = list(stub(ch, "Maintenance").Snapshot(pb.SnapshotRequest(), timeout=30))
        assert chunks and chunks[-1].remaining_bytes == 0
        assert f"{front} gRPC server" in srv.log_text()


def test_flags_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MVCCKV_NAME", "from-env")
    monkeypatch.setenv("MVCCKV_EMULATED_VERSION", "3.5.9")
    monkeypatch.setenv("MVCCKV_MAX_TXN_OPS", "2")
    with Server(tmp_path, extra_args=["--max-txn-ops", "3"]) as srv, srv.channel() as ch:
        (member,) = stub(ch, "Cluster").MemberList(pb.MemberListRequest(), timeout=10).members
        assert member.name == "from-env"
        st = stub(ch, "Maintenance").Status(pb.StatusRequest(), timeout=10)
        assert (st.version, st.storageVersion) == ("3.5.9", "3.5.0")
        kv = stub(ch, "KV")
        # The command line wins over the environment: 3 ops pass, 4 do not.
        kv.Txn(pb.TxnRequest(success=[ops.put(f"k{i}") for i in range(3)]), timeout=10)
        assert_error(kv.Txn, pb.TxnRequest(success=[ops.put(f"k{i}") for i in range(4)]),
                     C.INVALID_ARGUMENT, "etcdserver: too many operations in txn request")


def test_frequent_client_pings_do_not_get_goaway(server):
    """etcdctl pings every 10 s, also between calls; grpcio's default server
    policy answers pings closer than 5 min with GOAWAY "too_many_pings"
    (after two strikes).  Pings every second for 4 s must leave the
    connection up."""
    states: list[str] = []
    ch = grpc_channel(server.endpoint, options=[
        ("grpc.keepalive_time_ms", 1000), ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0)])
    try:
        ch.subscribe(lambda state: states.append(state.name))
        kv = stub(ch, "KV")
        kv.Range(pb.RangeRequest(key=b"ping/k"), timeout=10)
        time.sleep(4)
        kv.Range(pb.RangeRequest(key=b"ping/k"), timeout=10)
    finally:
        ch.close()
    ready = states.index("READY")
    assert "IDLE" not in states[ready:] and "TRANSIENT_FAILURE" not in states[ready:], states


def _serve(*args, timeout=30, env=None):
    return subprocess.run([sys.executable, "-m", "mvcckv", "serve", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, stdin=subprocess.DEVNULL)


def test_help_documents_every_flag():
    out = _serve("--help").stdout
    for flag in ["data-dir", "name", "listen-client-urls", "advertise-client-urls",
                 "initial-advertise-peer-urls", "initial-cluster-token", "quota-backend-bytes",
                 "max-request-bytes", "max-txn-ops", "auto-compaction-mode", "auto-compaction-retention",
                 "log-level", "emulated-version", "event-loop", "grpc-server"]:
        assert f"--{flag}" in out
        assert "MVCCKV_" + flag.upper().replace("-", "_") in out


@pytest.mark.parametrize("args, message", [
    (["--listen-client-urls", "https://127.0.0.1:2379"], "TLS key/cert (--cert-file, --key-file) must be provided"),
    (["--listen-client-urls", "http://example.com:2379"], "expected IP in URL for binding"),
    (["--listen-client-urls", "http://127.0.0.1"], "missing port"),
    (["--auto-compaction-mode", "hourly", "--auto-compaction-retention", "1"], "unsupported compaction mode"),
    (["--auto-compaction-mode", "periodic", "--auto-compaction-retention", "5x"], "invalid duration"),
    (["--max-txn-ops", "many"], "not an integer"),
    (["--log-level", "loud"], "--log-level"),
    (["--event-loop", "tokio"], "--event-loop must be one of uvloop, asyncio, not 'tokio'"),
    (["--grpc-server", "nio"], "--grpc-server must be one of auto, threads, aio, not 'nio'"),
])
def test_bad_flags_are_reported(tmp_path, args, message):
    proc = _serve("--data-dir", str(tmp_path / "d"), *args)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_address_in_use_is_reported(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _serve("--data-dir", str(tmp_path / "d"), "--listen-client-urls", f"http://127.0.0.1:{port}")
    assert proc.returncode == 1
    assert f"listen tcp 127.0.0.1:{port}: bind: address already in use" in proc.stderr


def _watch_health(port):
    """An open health Watch stream: an in-flight call that never ends by itself."""
    ch = grpc_channel(f"127.0.0.1:{port}")
    stream = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
    assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
    return ch, stream


def _wait_exit(proc, timeout):
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def test_sigterm_stops_gracefully_and_a_second_signal_at_once(tmp_path):
    srv = Server(tmp_path)
    with srv:
        with srv.channel() as ch:
            put(stub(ch, "KV"), b"k", b"v")
        ch, stream = _watch_health(srv.port)
        proc = srv._proc
        try:
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            # The open stream holds the shutdown in its grace period...
            assert _wait_exit(proc, 1.0) is None
            proc.send_signal(signal.SIGTERM)
            # ...until the second signal ends the process at once.
            assert _wait_exit(proc, 3.0) == 1
            assert time.monotonic() - start < 4.0
        finally:
            ch.close()
        assert "second signal (SIGTERM)" in srv.log_text()
        # Nothing acknowledged is lost by the hard exit.
        srv.restart()
        with srv.channel() as ch2:
            assert stub(ch2, "KV").Range(pb.RangeRequest(key=b"k"), timeout=10).kvs[0].value == b"v"


def test_sigint_waits_for_the_grace_period_then_exits_cleanly(tmp_path):
    srv = Server(tmp_path)
    with srv:
        with srv.channel() as ch:
            put(stub(ch, "KV"), b"k", b"v")
        wch, stream = _watch_health(srv.port)
        proc = srv._proc
        try:
            start = time.monotonic()
            proc.send_signal(signal.SIGINT)
            assert _wait_exit(proc, 15.0) == 0
            assert 4.0 <= time.monotonic() - start < 10.0
        finally:
            wch.close()
        log = srv.log_text()
        assert "received SIGINT" in log and "stopped" in log
        srv.restart()
        with srv.channel() as ch:
            assert stub(ch, "KV").Range(pb.RangeRequest(key=b"k"), timeout=10).kvs[0].value == b"v"

"""Spliced answers (``mvcckv/wire.py``, ``Store.range_raw``, ``EventBatch``) are the bytes
protobuf's own serializer gives for the same answer, and the raw-bytes
handlers keep etcd's answers to requests that do not parse.  Also the
writer's batch hand-off to an event loop (``Store.propose_on_loop``)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

import mvcckv
from mvcckv import errors
from mvcckv.kv import KIND_PUT
from mvcckv.pb import kv_pb2
from mvcckv.pb import rpc_pb2 as pb
from mvcckv import wire
from mvcckv.watch import BufferedStream, EventBatch, encode_events

RR = pb.RangeRequest

IDS = [0, 1, 127, 128, 300, 2**32, 0x8E9E05C52164694D, 2**64 - 1]


@pytest.mark.parametrize("n", [0, 1, 127, 128, 16383, 16384, 2**21 - 1, 2**21, 2**35, 2**64 - 1])
def test_varint_matches_protobuf(n):
    # A uint64 field's encoding minus its one-byte tag is the varint
    # (protobuf leaves a zero field out).
    want = pb.ResponseHeader(cluster_id=n).SerializeToString()[1:] if n else b"\x00"
    assert wire.varint(n) == want


@pytest.mark.parametrize("cluster_id", IDS)
@pytest.mark.parametrize("member_id", IDS[::-1])
@pytest.mark.parametrize("revision", [0, 1, 1000, 2**40])
def test_header_matches_protobuf(cluster_id, member_id, revision):
    want = pb.ResponseHeader(cluster_id=cluster_id, member_id=member_id, revision=revision, raft_term=2)
    got = wire.response_header(wire.header_prefix(cluster_id, member_id), revision, wire.header_suffix(2))
    assert got == want.SerializeToString()


def _kv(i: int, value_size: int) -> kv_pb2.KeyValue:
    return kv_pb2.KeyValue(key=b"k%05d" % i, create_revision=i + 2, mod_revision=i + 5, version=i + 1,
                           value=b"v" * value_size, lease=i % 3)


@pytest.mark.parametrize("n,value_size", [(0, 0), (1, 0), (1, 256), (3, 200), (100, 256), (2, 70000)])
@pytest.mark.parametrize("more", [False, True])
@pytest.mark.parametrize("count", [0, 1, 100, 300])
def test_range_response_matches_protobuf(n, value_size, more, count):
    kvs = [_kv(i, value_size) for i in range(n)]
    header = pb.ResponseHeader(cluster_id=7, member_id=9, revision=42, raft_term=2)
    want = pb.RangeResponse(header=header, kvs=kvs, more=more, count=count).SerializeToString()
    got = wire.range_response(header.SerializeToString(), [kv.SerializeToString() for kv in kvs], more, count)
    assert got == want


@pytest.fixture
def store(tmp_path):
    s = mvcckv.open(str(tmp_path / "s"))
    for i in range(20):
        s.put(b"r/%02d" % i, b"x" * i, lease=0)
    s.put(b"r/05", b"again")
    s.delete(b"r/07")
    s.put(b"single", b"one")
    yield s
    s.close()


def _spliced(store, req: pb.RangeRequest) -> bytes | None:
    answer = store.range_raw(req)
    if answer is None:
        return None
    kvs, more, count, revision = answer
    header = wire.response_header(wire.header_prefix(5, 6), revision, wire.header_suffix(2))
    return wire.range_response(header, kvs, more, count)


def _built(store, req: pb.RangeRequest) -> bytes:
    resp = store.range_request(req)
    resp.header.cluster_id, resp.header.member_id, resp.header.raft_term = 5, 6, 2
    return resp.SerializeToString()


SPLICED = [
    RR(key=b"single"),
    RR(key=b"missing"),
    RR(key=b"r/05"),
    RR(key=b"r/05", revision=3),
    RR(key=b"r/07"),
    RR(key=b"r/07", revision=9),
    RR(key=b"r/", range_end=b"r0"),
    RR(key=b"r/", range_end=b"r0", limit=5),
    RR(key=b"r/", range_end=b"r0", limit=19),
    RR(key=b"r/", range_end=b"r0", limit=100),
    RR(key=b"r/", range_end=b"r0", limit=-1),
    RR(key=b"r/", range_end=b"r0", revision=10),
    RR(key=b"r/", range_end=b"r0", count_only=True),
    RR(key=b"single", count_only=True),
    RR(key=b"\0", range_end=b"\0"),
    RR(key=b"r/03", range_end=b"r/09", serializable=True),
    RR(key=b"r/", range_end=b"r0", sort_order=RR.ASCEND),
]


@pytest.mark.parametrize("req", SPLICED, ids=str)
def test_range_raw_matches_range_request(store, req):
    assert _spliced(store, req) == _built(store, req)


@pytest.mark.parametrize("req", [
    RR(key=b"r/", range_end=b"r0", sort_order=RR.DESCEND),
    RR(key=b"r/", range_end=b"r0", sort_target=RR.MOD),
    RR(key=b"r/", range_end=b"r0", keys_only=True),
    RR(key=b"r/", range_end=b"r0", min_mod_revision=5),
    RR(key=b"r/", range_end=b"r0", max_create_revision=5),
], ids=str)
def test_range_raw_declines_what_needs_messages(store, req):
    assert store.range_raw(req) is None


@pytest.mark.parametrize("req,error", [
    (RR(key=b""), errors.EmptyKeyError),
    (RR(key=b"k", sort_order=-1), errors.InvalidSortOptionError),
    (RR(key=b"k", sort_order=7), errors.InvalidSortOptionError),
    (RR(key=b"k", revision=10**6), errors.FutureRevisionError),
], ids=str)
def test_range_raw_raises_what_range_request_raises(store, req, error):
    with pytest.raises(error):
        store.range_request(req)
    with pytest.raises(error):
        if store.range_raw(req) is None:
            store.range_request(req)


def test_range_raw_after_compaction_is_compacted(store):
    store.compact(10)
    with pytest.raises(errors.CompactedError):
        store.range_raw(RR(key=b"r/", range_end=b"r0", revision=5))


def test_propose_on_loop_answers_every_write_of_a_batch(store):
    async def main():
        futs = [store.propose_on_loop(KIND_PUT, pb.PutRequest(key=b"b%d" % i, value=b"v")) for i in range(50)]
        resps = await asyncio.gather(*futs)
        bad = store.propose_on_loop(KIND_PUT, pb.PutRequest(key=b"x", value=b"v", lease=12345))
        with pytest.raises(errors.LeaseNotFoundError):
            await bad
        return resps

    resps = asyncio.run(main())
    revs = [r.header.revision for r in resps]
    assert revs == sorted(revs) and len(set(revs)) == 50
    assert store.get(b"b49").value == b"v"


def test_propose_on_loop_logs_the_bytes_as_given(tmp_path):
    raw = pb.PutRequest(key=b"k", value=b"from the wire").SerializeToString()
    path = str(tmp_path / "s")
    with mvcckv.open(path) as s:
        async def put():
            return await s.propose_on_loop(KIND_PUT, pb.PutRequest.FromString(raw), data=raw)

        asyncio.run(put())
    # Replayed from the WAL after a restart: the same request.
    with mvcckv.open(path) as s:
        assert s.get(b"k").value == b"from the wire"


def test_propose_on_loop_checks_size_of_the_given_bytes(store):
    req = pb.PutRequest(key=b"k", value=b"v")

    async def put():
        return await store.propose_on_loop(KIND_PUT, req, data=b"x" * (2 * 1024 * 1024))

    with pytest.raises(errors.RequestTooLargeError):
        asyncio.run(put())


# --- served: the raw handlers answer like the message ones did ---------------


@pytest.fixture(scope="module")
def served(mvcckv_server_module):
    return mvcckv_server_module


def _call(served, method: str, body: bytes) -> bytes:
    with grpc.insecure_channel(f"127.0.0.1:{served.port}") as ch:
        return ch.unary_unary(f"/etcdserverpb.KV/{method}")(body, timeout=10)


def test_served_range_is_the_message_answer(served):
    put = pb.PutRequest(key=b"wire/a", value=b"1").SerializeToString()
    _call(served, "Put", put)
    _call(served, "Put", pb.PutRequest(key=b"wire/b", value=b"2").SerializeToString())
    raw = _call(served, "Range", RR(key=b"wire/", range_end=b"wire0", limit=1).SerializeToString())
    resp = pb.RangeResponse.FromString(raw)
    assert [kv.key for kv in resp.kvs] == [b"wire/a"] and resp.more and resp.count == 2
    assert resp.header.cluster_id and resp.header.member_id and resp.header.raft_term == 2
    assert raw == resp.SerializeToString()
    # Sorted ranges take the message path and agree.
    desc = pb.RangeResponse.FromString(
        _call(served, "Range", RR(key=b"wire/", range_end=b"wire0", sort_order=RR.DESCEND).SerializeToString()))
    assert [kv.key for kv in desc.kvs] == [b"wire/b", b"wire/a"]
    assert desc.header == resp.header


@pytest.mark.parametrize("method", ["Range", "Put"])
def test_served_undecodable_request_is_internal(served, method):
    with pytest.raises(grpc.RpcError) as e:
        _call(served, method, b"\x0a\x05ab")  # field 1 claims 5 bytes, has 2
    assert e.value.code() == grpc.StatusCode.INTERNAL
    assert e.value.details().startswith("grpc: error unmarshalling request: ")


@pytest.mark.parametrize("method,body,message", [
    ("Range", RR(key=b"").SerializeToString(), "etcdserver: key is not provided"),
    ("Put", pb.PutRequest(key=b"").SerializeToString(), "etcdserver: key is not provided"),
])
def test_served_bad_request_keeps_etcd_message(served, method, body, message):
    with pytest.raises(grpc.RpcError) as e:
        _call(served, method, body)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details() == message


# --- watch: events encoded once, framed per watcher ---------------------------


def _events() -> list[kv_pb2.Event]:
    put = kv_pb2.Event(type=kv_pb2.Event.PUT, kv=_kv(1, 64))
    delete = kv_pb2.Event(type=kv_pb2.Event.DELETE, kv=kv_pb2.KeyValue(key=b"gone", mod_revision=9),
                          prev_kv=_kv(2, 3))
    return [put, delete, kv_pb2.Event(kv=_kv(3, 0))]


@pytest.mark.parametrize("watch_id", [0, 1, 127, 128, 2**40])
@pytest.mark.parametrize("n", [1, 3])
def test_watch_response_matches_protobuf(watch_id, n):
    events = _events()[:n]
    batch = EventBatch(watch_id, 77, events, encode_events(events))
    msg = batch.message()
    msg.header.cluster_id, msg.header.member_id, msg.header.raft_term = 0xCDF818194E3A8C32, 5, 2
    header = wire.response_header(wire.header_prefix(0xCDF818194E3A8C32, 5), 77, wire.header_suffix(2))
    assert wire.watch_response(header, watch_id, batch.encoded) == msg.SerializeToString()
    assert pb.WatchResponse.FromString(msg.SerializeToString()).events == events


def test_hub_sends_batches_only_to_streams_that_take_them(store):
    plain, encoded = BufferedStream(), BufferedStream(encoded=True)
    hub = store.watch_hub
    w1, _ = hub.watch(plain, b"fan", watch_id=3)
    w2, _ = hub.watch(encoded, b"fan", watch_id=4)
    w3, _ = hub.watch(encoded, b"fan", watch_id=5, prev_kv=True)
    store.put(b"fan", b"1")
    rev = store.put(b"fan", b"2").header.revision
    first_plain, second_plain = plain.get(1), plain.get(1)
    assert isinstance(second_plain, pb.WatchResponse)
    got = [encoded.get(1) for _ in range(4)]
    assert all(isinstance(r, EventBatch) for r in got)
    b4 = [r for r in got if r.watch_id == 4][-1]
    b5 = [r for r in got if r.watch_id == 5][-1]
    assert b4.message().events == second_plain.events and b4.revision == rev
    # Watchers of the same events share the encoded bytes; prev_kv makes others.
    assert pb.WatchResponse.FromString(b5.encoded).events[0].prev_kv.value == b"1"
    assert b4.encoded == pb.WatchResponse(events=second_plain.events).SerializeToString()
    for w in (w1, w2, w3):
        hub.cancel(w)

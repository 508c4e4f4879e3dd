"""The watch guarantee checks of ``mvcckv check`` on hand-made streams:
a clean stream passes, and each broken guarantee is named."""

from __future__ import annotations

import pytest

from mvcckv.pb import kv_pb2
from mvcckv.pb import rpc_pb2 as pb
from mvcckv.testing.concurrent import DELETE, PUT, check_watch


def kv(key: bytes, value: bytes, rev: int, create: int | None = None) -> kv_pb2.KeyValue:
    return kv_pb2.KeyValue(key=key, value=value, mod_revision=rev, create_revision=create or rev)


def put(key, value, rev, prev=None, create=None):
    ev = kv_pb2.Event(type=PUT, kv=kv(key, value, rev, create))
    if prev is not None:
        ev.prev_kv.CopyFrom(prev)
    return ev


def delete(key, rev, prev):
    return kv_pb2.Event(type=DELETE, kv=kv_pb2.KeyValue(key=key, mod_revision=rev), prev_kv=prev)


def resp(*events, rev=None, progress=False):
    r = pb.WatchResponse(watch_id=-1 if progress else 0, events=list(events))
    r.header.revision = rev if rev is not None else max(e.kv.mod_revision for e in events)
    return r


A1 = put(b"a", b"1", 2)
B1 = put(b"b", b"1", 3)
A2 = put(b"a", b"2", 4, prev=A1.kv, create=2)
DA = delete(b"a", 5, A2.kv)
END = put(b"~end", b"end", 6)
WRITTEN = {(b"a", b"1"), (b"b", b"1"), (b"a", b"2"), (b"~end", b"end")}
ACKED = [(2, b"a", PUT, b"1"), (3, b"b", PUT, b"1"), (4, b"a", PUT, b"2"), (5, b"a", DELETE, b""),
         (6, b"~end", PUT, b"end")]
ALL = [A1, B1, A2, DA, END]


def run(responses, replayed=ALL, resumed=None, acked=ACKED, written=WRITTEN, ordered_progress=True):
    resumed = [e for e in ALL if e.kv.mod_revision >= 4] if resumed is None else resumed
    return check_watch(responses, replayed, resumed, 4, acked, written, 6, ordered_progress)


CLEAN = [resp(A1), resp(B1), resp(rev=3, progress=True), resp(A2), resp(DA), resp(END)]


def test_a_clean_stream_passes():
    assert run(CLEAN) == []


@pytest.mark.parametrize("responses, kw, problem", [
    ([resp(A1), resp(A2), resp(B1), resp(DA), resp(END)], {}, "ordered: revision 3 delivered after 4"),
    ([resp(A1), resp(B1), resp(B1), resp(A2), resp(DA), resp(END)], {}, "unique: 1 event(s) delivered twice"),
    ([resp(A1), resp(B1), resp(A2), resp(DA), resp(END), resp(put(b"c", b"1", 6))],
     {"written": WRITTEN | {(b"c", b"1")}}, "atomic"),
    ([resp(A1), resp(A2), resp(DA), resp(END)], {}, "reliable: 1 acknowledged write(s) have no event"),
    (CLEAN, {"replayed": ALL[:-1]}, "reliable: the live watch saw 5 events"),
    (CLEAN, {"resumed": [A2, END]}, "resumable: a watch from revision 4"),
    ([resp(A1), resp(rev=4, progress=True), resp(rev=3, progress=True), resp(B1), resp(A2), resp(DA), resp(END)],
     {}, "bookmarkable: a progress notification went back"),
    ([resp(A1), resp(rev=3, progress=True), resp(B1), resp(A2), resp(DA), resp(END)], {},
     "bookmarkable: an event at revision 3 came after a progress notification at 3"),
    ([resp(A1), resp(B1), resp(put(b"a", b"2", 4, create=2)), resp(DA), resp(END)], {},
     "prev_kv: the event at revision 4 on b'a' carries nothing"),
    ([resp(A1), resp(B1), resp(put(b"a", b"9", 4, prev=A1.kv, create=2)), resp(DA), resp(END)],
     {"acked": ACKED[:2] + ACKED[3:], "replayed": [A1, B1, put(b"a", b"9", 4, prev=A1.kv, create=2), DA, END],
      "resumed": [put(b"a", b"9", 4, prev=A1.kv, create=2), DA, END]},
     "an event writes b'9' to b'a', which no client wrote"),
])
def test_each_broken_guarantee_is_named(responses, kw, problem):
    found = run(responses, **kw)
    assert any(p.startswith(problem) for p in found), found


def test_old_etcd_is_not_held_to_ordered_progress():
    late = [resp(A1), resp(rev=3, progress=True), resp(B1), resp(A2), resp(DA), resp(END)]
    assert run(late, ordered_progress=False) == []

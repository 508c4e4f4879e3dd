"""Tables of etcd's KV rules, run against the embedded store.

Each table is one rule of ETCD_SEMANTICS §15 (items 1-9 and 15) or one
family of errors; every error is checked by type and by etcd's exact text,
and a refused request must leave the store as it was.  The stateful test
(test_store_stateful.py) covers the same ground at random; these tables are
the readable, worked cases.
"""

from __future__ import annotations

import doctest
import struct

import crc32c
import pytest

import mvcckv
import mvcckv.revision
import mvcckv.store
from mvcckv import errors, ops
from mvcckv.pb import kv_pb2
from mvcckv.pb import rpc_pb2 as pb

RR = pb.RangeRequest

EMPTY_KEY = "etcdserver: key is not provided"
KEY_NOT_FOUND = "etcdserver: key not found"
VALUE_PROVIDED = "etcdserver: value is provided"
LEASE_PROVIDED = "etcdserver: lease is provided"
TOO_MANY_OPS = "etcdserver: too many operations in txn request"
DUPLICATE_KEY = "etcdserver: duplicate key given in txn request"
INVALID_SORT = "etcdserver: invalid sort option"
COMPACTED = "etcdserver: mvcc: required revision has been compacted"
FUTURE = "etcdserver: mvcc: required revision is a future revision"
NO_SPACE = "etcdserver: mvcc: database space exceeded"
TOO_LARGE = "etcdserver: request is too large"
LEASE_NOT_FOUND = "etcdserver: requested lease not found"
LEASE_EXISTS = "etcdserver: lease already exists"

# §5.6, mvcckv decision: a request is too large when its serialized size
# plus this allowance for the log record exceeds max_request_bytes.
REQUEST_ALLOWANCE = 64


def open_store(tmp_path, **options) -> mvcckv.Store:
    options.setdefault("fsync", False)
    return mvcckv.open(str(tmp_path / "data"), **options)


@pytest.fixture
def store(tmp_path):
    with open_store(tmp_path) as s:
        yield s


def keys_of(resp) -> list[bytes]:
    return [kv.key for kv in resp.kvs]


def everything(store) -> pb.RangeResponse:
    return store.range(b"\0", b"\0")


def backend_key(main: int, sub: int, tombstone: bool = False) -> bytes:
    """§2.3: 8-byte big-endian main, b"_", 8-byte big-endian sub (+ b"t")."""
    return struct.pack(">Q", main) + b"_" + struct.pack(">Q", sub) + (b"t" if tombstone else b"")


def expected_hash(entries) -> int:
    """§10.3 for a never-compacted store: CRC-32C of b"key" and every entry."""
    data = b"key" + b"".join(k + v for k, v in entries)
    return crc32c.crc32c(data)


# -- §15.1 a fresh store ----------------------------------------------------------


def test_fresh_store_is_at_revision_1_and_never_compacted(store):
    assert store.revision == 1
    assert store.compact_revision == -1
    assert everything(store).header.revision == 1
    h, current = store.hash_kv()
    assert (h.compact_revision, h.revision, current) == (-1, 1, 1)
    assert store.put(b"k", b"v").header.revision == 2


def test_backend_bytes_are_etcds(store):
    """§2.3's worked example: put foo=bar on a fresh store."""
    store.put(b"foo", b"bar")
    key = bytes.fromhex("00000000000000025f0000000000000000")
    value = bytes.fromhex("0a03666f6f1002180220012a03626172")
    assert store.hash_kv()[0].hash == expected_hash([(key, value)])


# -- §15.2 what does not make a revision ----------------------------------------------


def _grant_and_revoke(s):
    s.lease_grant(60, 7)
    return s.lease_revoke(7)


NO_REVISION = [
    ("delete a missing key", lambda s: s.delete(b"missing")),
    ("delete an empty interval", lambda s: s.delete(b"x", b"y")),
    ("delete with range_end <= key", lambda s: s.delete(b"k", b"a")),
    ("range", lambda s: s.range(b"k")),
    ("read-only txn", lambda s: s.txn([ops.version(b"k") > 0], [ops.get(b"k")], [])),
    ("txn taking its range-only branch",
     lambda s: s.txn([ops.value(b"k") == b"no"], [ops.put(b"k", b"x")], [ops.get(b"k")])),
    ("txn failing with an empty failure branch",
     lambda s: s.txn([ops.version(b"k") == 0], [ops.put(b"k", b"x")], [])),
    ("txn deleting nothing", lambda s: s.txn([], [ops.delete(b"missing"), ops.get(b"k")])),
    ("nested txn deleting nothing", lambda s: s.txn([], [ops.txn([], [ops.delete(b"missing")])])),
    ("compaction", lambda s: s.compact(s.revision)),
    ("lease grant", lambda s: s.lease_grant(60, 7)),
    ("revoke of a lease without keys", _grant_and_revoke),
]


@pytest.mark.parametrize("action", [a for _, a in NO_REVISION], ids=[n for n, _ in NO_REVISION])
def test_no_revision(store, action):
    store.put(b"k", b"v")
    before = everything(store)
    resp = action(store)
    assert store.revision == 2
    assert resp.header.revision == 2
    assert everything(store) == before


def test_a_put_of_the_same_value_makes_a_revision(store):
    store.put(b"k", b"v")
    assert store.put(b"k", b"v").header.revision == 3
    assert store.get(b"k").version == 2


def test_lease_revoke_deletes_its_keys_in_one_revision(store):
    store.lease_grant(60, 7)
    for k in (b"c", b"a", b"b"):
        store.put(k, b"v", lease=7)
    store.put(b"other", b"v")
    assert store.lease_revoke(7).header.revision == 6
    assert keys_of(everything(store)) == [b"other"]
    puts = [
        (backend_key(rev, 0), kv_pb2.KeyValue(
            key=k, create_revision=rev, mod_revision=rev, version=1, value=b"v", lease=lease,
        ).SerializeToString())
        for rev, k, lease in ((2, b"c", 7), (3, b"a", 7), (4, b"b", 7), (5, b"other", 0))
    ]
    # §2.2: one sub revision per key, in key order.
    tombstones = [
        (backend_key(6, sub, True), kv_pb2.KeyValue(key=k).SerializeToString())
        for sub, k in enumerate((b"a", b"b", b"c"))
    ]
    assert store.hash_kv()[0].hash == expected_hash(puts + tombstones)


# -- §15.3 one txn, one revision --------------------------------------------------------


def test_txn_is_one_revision_with_subs_in_op_order(store):
    store.put(b"b", b"1")
    store.put(b"c", b"2")
    resp = store.txn([], [ops.put(b"a", b"A"), ops.put(b"x", b"X"), ops.delete(b"b", b"d"), ops.put(b"z", b"Z")])
    assert resp.header.revision == 4 and store.revision == 4
    assert [r.WhichOneof("response") for r in resp.responses] == [
        "response_put", "response_put", "response_delete_range", "response_put",
    ]
    assert resp.responses[2].response_delete_range.deleted == 2
    assert {kv.mod_revision for kv in everything(store).kvs} == {4}
    assert keys_of(everything(store)) == [b"a", b"x", b"z"]

    def put(main, sub, key, value, create=None, version=1):
        kv = kv_pb2.KeyValue(key=key, create_revision=create or main, mod_revision=main, version=version, value=value)
        return backend_key(main, sub), kv.SerializeToString()

    def tombstone(main, sub, key):
        return backend_key(main, sub, True), kv_pb2.KeyValue(key=key).SerializeToString()

    # §2.1: sub = position in execution order; the deleted keys in key order.
    entries = [
        put(2, 0, b"b", b"1"),
        put(3, 0, b"c", b"2"),
        put(4, 0, b"a", b"A"),
        put(4, 1, b"x", b"X"),
        tombstone(4, 2, b"b"),
        tombstone(4, 3, b"c"),
        put(4, 4, b"z", b"Z"),
    ]
    assert store.hash_kv()[0].hash == expected_hash(entries)


# -- §15.4 versions and create revisions ----------------------------------------------------

LIVES = [
    # (name, writes, expected (create_revision, mod_revision, version) of b"k")
    ("created", [("put", b"1")], (2, 2, 1)),
    ("put twice", [("put", b"1"), ("put", b"2")], (2, 3, 2)),
    ("put after delete", [("put", b"1"), ("delete",), ("put", b"2")], (4, 4, 1)),
    ("second life", [("put", b"1"), ("put", b"2"), ("delete",), ("put", b"3"), ("put", b"4")], (5, 6, 2)),
    # §5.3 quirk: a delete to the end and a put of a key in it pass the
    # duplicate check; the key dies and is born again in one revision.
    ("deleted and re-created in one txn", [("put", b"1"), ("delete-and-put", b"2")], (3, 3, 1)),
    ("ignore_value keeps the value", [("put", b"1"), ("put-ignore-value",)], (2, 3, 2)),
]


def _write(store, w):
    if w[0] == "put":
        store.put(b"k", w[1])
    elif w[0] == "delete":
        store.delete(b"k")
    elif w[0] == "put-ignore-value":
        store.put(b"k", ignore_value=True)
    else:
        store.txn([], [ops.delete(b"a", b"\0"), ops.put(b"k", w[1])])


@pytest.mark.parametrize("writes, expected", [c[1:] for c in LIVES], ids=[c[0] for c in LIVES])
def test_generations(tmp_path, writes, expected):
    with open_store(tmp_path) as store:
        for w in writes:
            _write(store, w)
        kv = store.get(b"k")
        assert (kv.create_revision, kv.mod_revision, kv.version) == expected
        # Compaction at the current revision keeps what it shows (§3.6), and
        # a restart rebuilds the same versions from the backend (§3.9).
        store.compact(store.revision, physical=True)
    with open_store(tmp_path) as store:
        kv = store.get(b"k")
        assert (kv.create_revision, kv.mod_revision, kv.version) == expected


def test_history_of_a_key(store):
    """§3.4's worked example, read at every revision."""
    store.put(b"foo", b"v1")  # 2
    store.put(b"foo", b"v2")  # 3
    store.delete(b"foo")  # 4
    store.put(b"foo", b"v3")  # 5
    seen = {}
    for rev in range(1, 6):
        kv = store.get(b"foo", revision=rev)
        seen[rev] = kv and (kv.value, kv.create_revision, kv.mod_revision, kv.version)
    assert seen == {1: None, 2: (b"v1", 2, 2, 1), 3: (b"v2", 2, 3, 2), 4: None, 5: (b"v3", 5, 5, 1)}


# -- §15.5 reads at the compact revision ------------------------------------------------------


def test_range_at_exactly_the_compact_revision(store):
    for v in (b"v1", b"v2", b"v3"):
        store.put(b"k", v)  # revisions 2, 3, 4
    store.compact(3)
    assert store.range(b"k", revision=3).kvs[0].value == b"v2"
    assert store.get(b"k", revision=3).value == b"v2"
    assert store.hash_kv(3)[0].revision == 3
    assert store.txn([], [ops.get(b"k", revision=3)]).responses[0].response_range.kvs[0].value == b"v2"
    with pytest.raises(errors.CompactedError, match=f"^{COMPACTED}$"):
        store.range(b"k", revision=2)
    with pytest.raises(errors.CompactedError, match=f"^{COMPACTED}$"):
        store.txn([], [ops.get(b"k", revision=2)])
    # The header is the current revision even for a historical read (§4.2).
    assert store.range(b"k", revision=3).header.revision == 4


def test_reopen_during_compaction_keeps_compact_revision(tmp_path):
    """An acknowledged compaction holds across a restart that interrupts it (§2.6)."""
    # One entry per batch and a long pause: close() lands mid-compaction.
    with open_store(tmp_path, compaction_batch_limit=1, compaction_sleep=0.5) as store:
        for v in (b"v1", b"v2", b"v3"):
            store.put(b"k", v)  # revisions 2, 3, 4
        store.compact(4)
    with open_store(tmp_path) as store:
        assert store.compact_revision == 4
        with pytest.raises(errors.CompactedError):
            store.range(b"k", revision=2)
        assert store.get(b"k", revision=4).value == b"v3"


# -- §15.6 count, limit, more and the revision filters ------------------------------------------

COUNTS = [
    # (kwargs, keys returned, count, more); keys a..e have mod = create = 2..6
    ({}, b"abcde", 5, False),
    ({"limit": 2}, b"ab", 5, True),
    ({"limit": 5}, b"abcde", 5, False),
    ({"limit": -1}, b"abcde", 5, False),
    ({"min_mod_revision": 4}, b"cde", 5, False),
    ({"min_mod_revision": 4, "limit": 2}, b"cd", 5, True),
    ({"max_mod_revision": 3, "limit": 2}, b"ab", 5, False),
    ({"min_create_revision": 3, "max_create_revision": 4}, b"bc", 5, False),
    ({"max_create_revision": 5, "sort_order": RR.DESCEND, "limit": 2}, b"dc", 5, True),
    ({"count_only": True, "limit": 1}, b"", 5, False),
    ({"count_only": True, "min_mod_revision": 6}, b"", 5, False),
    ({"range_end": b"d"}, b"abc", 3, False),
    ({"key": b"b", "range_end": b"\0"}, b"bcde", 4, False),
    ({"key": b"c", "range_end": b"b"}, b"", 0, False),
    ({"key": b"c", "range_end": b""}, b"c", 1, False),
    ({"revision": 4}, b"abc", 3, False),
    ({"revision": 4, "limit": 1}, b"a", 3, True),
]


@pytest.mark.parametrize("kwargs, keys, count, more", COUNTS, ids=[repr(c[0]) for c in COUNTS])
def test_count_limit_more(store, kwargs, keys, count, more):
    for k in b"abcde":
        store.put(bytes([k]), b"v")
    kwargs = dict(kwargs)
    key = kwargs.pop("key", b"a")
    range_end = kwargs.pop("range_end", b"\0")
    resp = store.range(key, range_end, **kwargs)
    assert (keys_of(resp), resp.count, resp.more) == ([bytes([k]) for k in keys], count, more)
    assert resp.header.revision == 6


def test_keys_only_keeps_everything_but_the_value(store):
    store.put(b"k", b"v")
    kv = store.range(b"k", keys_only=True).kvs[0]
    assert kv == kv_pb2.KeyValue(key=b"k", create_revision=2, mod_revision=2, version=1)


# -- §15.7 sorting ----------------------------------------------------------------------------------

SORTS = [
    # a: create 3, mod 5, version 2, value "0"; b: 4, 4, 1, "2"; c: 2, 2, 1, "1"
    (RR.KEY, RR.NONE, b"abc"),
    (RR.KEY, RR.ASCEND, b"abc"),
    (RR.KEY, RR.DESCEND, b"cba"),
    (RR.MOD, RR.NONE, b"cba"),  # a target without an order sorts ascending
    (RR.MOD, RR.ASCEND, b"cba"),
    (RR.MOD, RR.DESCEND, b"abc"),
    (RR.CREATE, RR.NONE, b"cab"),
    (RR.CREATE, RR.DESCEND, b"bac"),
    (RR.VERSION, RR.NONE, b"bca"),  # ties (b, c) stay in key order
    (RR.VERSION, RR.DESCEND, b"abc"),  # ... in both directions
    (RR.VALUE, RR.ASCEND, b"acb"),
    (RR.VALUE, RR.DESCEND, b"bca"),
]


@pytest.mark.parametrize(
    "target, order, keys", SORTS, ids=[f"{RR.SortTarget.Name(t)}-{RR.SortOrder.Name(o)}" for t, o, _ in SORTS]
)
def test_sort(store, target, order, keys):
    store.put(b"c", b"1")  # 2
    store.put(b"a", b"3")  # 3
    store.put(b"b", b"2")  # 4
    store.put(b"a", b"0")  # 5
    resp = store.range(b"a", b"\0", sort_target=target, sort_order=order)
    assert keys_of(resp) == [bytes([k]) for k in keys]
    limited = store.range(b"a", b"\0", sort_target=target, sort_order=order, limit=2)
    assert (keys_of(limited), limited.more, limited.count) == ([bytes([k]) for k in keys[:2]], True, 3)


def test_sort_target_without_order_sorts_only_the_fetched_keys(store):
    """§4.3 step 2 (quirk): with no order, no filter and a limit, only the
    first limit + 1 keys (in key order) are fetched, then sorted by the target."""
    for k in (b"a", b"ba", b"ab", b"b"):  # create revisions 2, 3, 4, 5
        store.put(k, b"")
    unordered = store.range(b"a", b"\0", sort_target=RR.CREATE, limit=2)
    assert (keys_of(unordered), unordered.more, unordered.count) == ([b"a", b"ab"], True, 4)
    ordered = store.range(b"a", b"\0", sort_target=RR.CREATE, sort_order=RR.ASCEND, limit=2)
    assert keys_of(ordered) == [b"a", b"ba"]


# -- §15.8 txn: the duplicate-key rule and compares ------------------------------------------------

DUPLICATES = [
    ("two puts of one key", [ops.put(b"k"), ops.put(b"k")]),
    ("put inside a deleted interval", [ops.put(b"k"), ops.delete(b"a", b"z")]),
    ("put of a deleted point", [ops.delete(b"k"), ops.put(b"k")]),
    ("put at the interval's start", [ops.delete(b"k", b"l"), ops.put(b"k")]),
    ("nested put and parent put", [ops.txn([], [ops.put(b"k")]), ops.put(b"k")]),
    ("nested failure put and parent put", [ops.txn([], [], [ops.put(b"k")]), ops.put(b"k")]),
    ("puts in two nested txns", [ops.txn([], [ops.put(b"k")]), ops.txn([], [ops.put(b"k")])]),
    ("nested put in a parent's deleted interval", [ops.delete(b"a", b"z"), ops.txn([], [ops.put(b"k")])]),
    ("parent put in a nested deleted interval", [ops.txn([], [ops.delete(b"a", b"z")]), ops.put(b"k")]),
    ("nested delete, then a later nested put", [ops.txn([], [ops.delete(b"k")]), ops.txn([], [ops.put(b"k")])]),
    ("twice within one nested branch", [ops.txn([], [ops.put(b"k"), ops.put(b"k")])]),
    ("deep nesting merges upward", [ops.txn([], [ops.txn([], [ops.put(b"k")])]), ops.put(b"k")]),
]


@pytest.mark.parametrize("branch", [b for _, b in DUPLICATES], ids=[n for n, _ in DUPLICATES])
@pytest.mark.parametrize("where", ["success", "failure"])
def test_duplicate_keys_refused(store, branch, where):
    store.put(b"k", b"v")
    before = everything(store)
    txn = {"success": (branch, []), "failure": ([], branch)}[where]
    with pytest.raises(errors.DuplicateKeyError, match=f"^{DUPLICATE_KEY}$"):
        store.txn([], *txn)
    assert everything(store) == before


NOT_DUPLICATES = [
    ("nested success and failure", [ops.txn([ops.version(b"k") > 0], [ops.put(b"k", b"s")], [ops.put(b"k", b"f")])]),
    ("overlapping deletes", [ops.delete(b"a", b"m"), ops.delete(b"j", b"z"), ops.delete(b"k")]),
    ("ranges and a put", [ops.get(b"k"), ops.put(b"k", b"new"), ops.get(b"a", b"z")]),
    ("a put just outside the interval", [ops.delete(b"a", b"k"), ops.put(b"k", b"new")]),
    # §5.3 quirk: range_end b"\0" makes an empty interval in the check.
    ("delete to the end, then a put in it", [ops.delete(b"a", b"\0"), ops.put(b"k", b"new")]),
    # etcd's order: a nested put is only checked against earlier deletes.
    ("nested put, then a later nested delete", [ops.txn([], [ops.put(b"k", b"new")]), ops.txn([], [ops.delete(b"k")])]),
]


@pytest.mark.parametrize("branch", [b for _, b in NOT_DUPLICATES], ids=[n for n, _ in NOT_DUPLICATES])
def test_not_duplicates(store, branch):
    store.put(b"k", b"v")
    assert store.txn([], branch, [ops.put(b"k", b"other")]).succeeded


def test_put_in_success_and_failure_is_fine(store):
    assert not store.txn([ops.version(b"k") > 0], [ops.put(b"k", b"s")], [ops.put(b"k", b"f")]).succeeded
    assert store.get(b"k").value == b"f"


COMPARES = [
    # (compare, expected) with k = "v" (create 2, mod 3, version 2) and "absent" missing
    (ops.value(b"absent") == b"", False),  # a missing key has no value
    (ops.value(b"absent") != b"x", False),
    (ops.create_revision(b"absent") == 0, True),  # the "absent" idioms
    (ops.version(b"absent") == 0, True),
    (ops.mod_revision(b"absent") == 0, True),
    (ops.lease(b"absent") == 0, True),
    (ops.version(b"absent") > 0, False),
    (ops.version(b"k") > 0, True),
    (ops.version(b"k") == 2, True),
    (ops.create_revision(b"k") == 2, True),
    (ops.mod_revision(b"k") < 4, True),
    (ops.mod_revision(b"k") > 3, False),
    (ops.value(b"k") == b"v", True),
    (ops.value(b"k") > b"u", True),
    (ops.value(b"k") != b"v", False),
    # With a range, the compare must hold for every key in it.
    (ops.version(b"a", b"\0") > 0, True),
    (ops.value(b"a", b"\0") == b"v", False),
    (ops.create_revision(b"j", b"l") == 2, True),
    (ops.version(b"x", b"y") == 0, True),  # an empty range compares a zero KeyValue
]


@pytest.mark.parametrize("compare, expected", COMPARES, ids=[str(c).replace("\n", " ") for c, _ in COMPARES])
def test_compare(store, compare, expected):
    store.put(b"k", b"first")
    store.put(b"k", b"v")
    store.put(b"other", b"w")
    assert store.txn([compare], [], []).succeeded is expected


def test_compare_operand_of_another_target_reads_as_zero(store):
    store.put(b"k", b"v")
    c = pb.Compare(key=b"k", target=pb.Compare.VERSION, result=pb.Compare.GREATER, mod_revision=100)
    assert store.txn([c], [], []).succeeded  # version 1 > 0, not > 100


def test_nested_compares_see_the_state_before_the_txn(store):
    resp = store.txn([], [ops.put(b"k", b"v"), ops.txn([ops.version(b"k") == 0], [ops.get(b"k")], [])])
    nested = resp.responses[1].response_txn
    assert nested.succeeded
    # ...while its range sees the put made earlier in the same txn.
    assert nested.responses[0].response_range.kvs[0].value == b"v"


# -- §15.9 headers inside a txn response ------------------------------------------------------------


def test_inner_headers(store):
    store.put(b"k", b"v")  # 2
    resp = store.txn([], [
        ops.get(b"k"),
        ops.delete(b"missing"),
        ops.put(b"p", b"v"),
        ops.delete(b"missing"),
        ops.get(b"k"),
        ops.txn([], [ops.get(b"k")]),
    ])
    inner = [getattr(r, r.WhichOneof("response")).header for r in resp.responses]
    # Only the revision: what the txn could see at that point, or its new one.
    assert inner[:5] == [pb.ResponseHeader(revision=r) for r in (2, 2, 3, 3, 3)]
    nested = resp.responses[5].response_txn
    assert nested.HasField("header") and nested.header == pb.ResponseHeader()
    assert nested.responses[0].response_range.header == pb.ResponseHeader(revision=3)
    assert resp.header.revision == 3


# -- §15.15 compaction errors ---------------------------------------------------------------------


def test_compaction_revisions(store):
    for v in (b"1", b"2", b"3"):
        store.put(b"k", v)
    assert store.compact(3).header.revision == 4
    assert store.compact_revision == 3
    with pytest.raises(errors.CompactedError, match=f"^{COMPACTED}$"):
        store.compact(3)
    with pytest.raises(errors.CompactedError, match=f"^{COMPACTED}$"):
        store.compact(2)
    with pytest.raises(errors.FutureRevisionError, match=f"^{FUTURE}$"):
        store.compact(5)
    assert store.compact(4).header.revision == 4  # the current revision is allowed
    assert store.revision == 4


def test_compact_on_a_fresh_store(store):
    with pytest.raises(errors.CompactedError):
        store.compact(-1)  # <= -1, the fresh compact revision
    with pytest.raises(errors.FutureRevisionError):
        store.compact(2)
    store.compact(1)
    assert store.compact_revision == 1


# -- errors ---------------------------------------------------------------------------------------

def _compacted(s):
    s.put(b"k", b"2")
    s.compact(s.revision)


ERRORS = [
    # (name, options, setup, call, error type, message)
    ("put: empty key", {}, None, lambda s: s.put(b"", b"v"), errors.EmptyKeyError, EMPTY_KEY),
    ("range: empty key", {}, None, lambda s: s.range(b""), errors.EmptyKeyError, EMPTY_KEY),
    ("delete: empty key", {}, None, lambda s: s.delete(b""), errors.EmptyKeyError, EMPTY_KEY),
    ("txn: empty compare key", {}, None, lambda s: s.txn([ops.version(b"") == 0]), errors.EmptyKeyError, EMPTY_KEY),
    ("txn: empty key in the branch not taken", {}, None,
     lambda s: s.txn([], [], [ops.put(b"")]), errors.EmptyKeyError, EMPTY_KEY),
    ("txn: empty key in a nested txn", {}, None,
     lambda s: s.txn([], [ops.txn([], [ops.delete(b"")])]), errors.EmptyKeyError, EMPTY_KEY),
    ("put: ignore_value with a value", {}, None,
     lambda s: s.put(b"k", b"v", ignore_value=True), errors.ValueProvidedError, VALUE_PROVIDED),
    ("txn: ignore_value with a value", {}, None,
     lambda s: s.txn([], [], [ops.put(b"k", b"v", ignore_value=True)]), errors.ValueProvidedError, VALUE_PROVIDED),
    ("put: ignore_lease with a lease", {}, None,
     lambda s: s.put(b"k", lease=7, ignore_lease=True), errors.LeaseProvidedError, LEASE_PROVIDED),
    ("put: ignore_value on an absent key", {}, None,
     lambda s: s.put(b"absent", ignore_value=True), errors.KeyNotFoundError, KEY_NOT_FOUND),
    ("put: ignore_lease on an absent key", {}, None,
     lambda s: s.put(b"absent", b"v", ignore_lease=True), errors.KeyNotFoundError, KEY_NOT_FOUND),
    ("txn: ignore_value on an absent key", {}, None,
     lambda s: s.txn([], [ops.put(b"absent", ignore_value=True)]), errors.KeyNotFoundError, KEY_NOT_FOUND),
    # etcd panics here (the key is deleted by the time the put runs);
    # mvcckv refuses the txn with nothing applied.
    ("txn: ignore_value on a key deleted earlier in the txn", {}, None,
     lambda s: s.txn([], [ops.delete(b"a", b"\0"), ops.put(b"k", ignore_value=True)]),
     errors.KeyNotFoundError, KEY_NOT_FOUND),
    ("txn: empty RequestOp", {}, None, lambda s: s.txn([], [pb.RequestOp()]), errors.KeyNotFoundError, KEY_NOT_FOUND),
    ("put: unknown lease", {}, None, lambda s: s.put(b"k", lease=99), errors.LeaseNotFoundError, LEASE_NOT_FOUND),
    # etcd 3.4/3.5 order (which mvcckv keeps): the taken path's puts are
    # checked before its ranges, whatever their order in the txn.
    ("txn: a put's error before an earlier range's", {}, None,
     lambda s: s.txn([], [ops.get(b"k", revision=100), ops.put(b"k", lease=99)]),
     errors.LeaseNotFoundError, LEASE_NOT_FOUND),
    ("txn: unknown lease", {}, None,
     lambda s: s.txn([], [ops.put(b"k", lease=99)]), errors.LeaseNotFoundError, LEASE_NOT_FOUND),
    ("lease grant: ID in use", {}, lambda s: s.lease_grant(60, 7),
     lambda s: s.lease_grant(60, 7), errors.LeaseExistsError, LEASE_EXISTS),
    ("lease revoke: unknown lease", {}, None, lambda s: s.lease_revoke(99), errors.LeaseNotFoundError, LEASE_NOT_FOUND),
    ("range: unknown sort order", {}, None,
     lambda s: s.range(b"k", sort_order=7), errors.InvalidSortOptionError, INVALID_SORT),
    ("range: unknown sort target", {}, None,
     lambda s: s.range(b"k", sort_target=9), errors.InvalidSortOptionError, INVALID_SORT),
    ("txn: too many compares", {"max_txn_ops": 2}, None,
     lambda s: s.txn([ops.version(b"k") == 0] * 3), errors.TooManyOpsError, TOO_MANY_OPS),
    ("txn: too many failure ops", {"max_txn_ops": 2}, None,
     lambda s: s.txn([], [], [ops.get(b"k")] * 3), errors.TooManyOpsError, TOO_MANY_OPS),
    # A nested txn gets only what its parent level left: 3 - 2 = 1 op here.
    ("txn: nested txn over the budget left", {"max_txn_ops": 3}, None,
     lambda s: s.txn([], [ops.get(b"k"), ops.txn([], [ops.get(b"k")] * 2)]), errors.TooManyOpsError, TOO_MANY_OPS),
    ("range: future revision", {}, None, lambda s: s.range(b"k", revision=3), errors.FutureRevisionError, FUTURE),
    ("get: future revision", {}, None, lambda s: s.get(b"k", revision=3), errors.FutureRevisionError, FUTURE),
    ("txn range: future revision", {}, None,
     lambda s: s.txn([], [ops.get(b"k", revision=3)]), errors.FutureRevisionError, FUTURE),
    ("hash_kv: future revision", {}, None, lambda s: s.hash_kv(3), errors.FutureRevisionError, FUTURE),
    ("compact: future revision", {}, None, lambda s: s.compact(3), errors.FutureRevisionError, FUTURE),
    ("range: compacted revision", {}, _compacted, lambda s: s.range(b"k", revision=2), errors.CompactedError, COMPACTED),
    ("get: compacted revision", {}, _compacted, lambda s: s.get(b"k", revision=2), errors.CompactedError, COMPACTED),
    ("txn range: compacted revision", {}, _compacted,
     lambda s: s.txn([], [ops.get(b"k", revision=2)]), errors.CompactedError, COMPACTED),
    # §4.2 quirk: inside a txn only 0 means "current"; below the compact
    # revision a negative one is "compacted" (standalone it is current).
    ("txn range: negative revision after a compaction", {}, _compacted,
     lambda s: s.txn([], [ops.get(b"k", revision=-1)]), errors.CompactedError, COMPACTED),
    ("txn range: revision -2 on a fresh store", {}, None,
     lambda s: s.txn([], [ops.get(b"k", revision=-2)]), errors.CompactedError, COMPACTED),
    ("hash_kv: compacted revision", {}, _compacted, lambda s: s.hash_kv(2), errors.CompactedError, COMPACTED),
    ("compact: the compact revision again", {}, _compacted, lambda s: s.compact(3), errors.CompactedError, COMPACTED),
    ("put: request too large", {"max_request_bytes": 1024}, None,
     lambda s: s.put(b"k", b"x" * 1024), errors.RequestTooLargeError, TOO_LARGE),
    ("txn: request too large", {"max_request_bytes": 1024}, None,
     lambda s: s.txn([], [ops.put(b"k", b"x" * 600), ops.put(b"l", b"x" * 600)]),
     errors.RequestTooLargeError, TOO_LARGE),
]


@pytest.mark.parametrize(
    "options, setup, call, error, message", [c[1:] for c in ERRORS], ids=[c[0] for c in ERRORS]
)
def test_errors(tmp_path, options, setup, call, error, message):
    with open_store(tmp_path, **options) as store:
        store.put(b"k", b"1")
        if setup is not None:
            setup(store)
        before, revision = everything(store), store.revision
        with pytest.raises(error) as caught:
            call(store)
        assert type(caught.value) is error and str(caught.value) == message
        assert (everything(store), store.revision) == (before, revision)


def test_ignored_checks_of_the_branch_not_taken(store):
    """Dynamic checks run on the taken path only (§5.4 step 2)."""
    store.put(b"k", b"v")
    resp = store.txn(
        [ops.version(b"k") > 0],
        [ops.put(b"k", b"v")],
        [ops.put(b"absent", ignore_value=True), ops.put(b"x", lease=99), ops.get(b"k", revision=100)],
    )
    assert resp.succeeded and store.revision == 3


def test_negative_revision_in_a_standalone_range_is_current(store):
    store.put(b"k", b"v")
    store.compact(2)
    assert store.range(b"k", revision=-1).kvs[0].value == b"v"
    assert store.get(b"k", revision=-1).value == b"v"


@pytest.mark.parametrize(
    "revision",
    [
        -1,
        -2,
    ],
)
def test_hash_kv_of_a_negative_revision(store, revision):
    """§10.3 (quirk): only 0 means current; a negative revision covers no
    entry, so the hash is that of the bucket name alone."""
    store.put(b"k", b"v")
    h, current = store.hash_kv(revision)
    assert (h.hash, h.revision, current) == (crc32c.crc32c(b"key"), revision, 2)


@pytest.mark.parametrize("value_bytes, too_large", [(0, False), (1, True)])
def test_request_size_limit_boundary(tmp_path, value_bytes, too_large):
    limit = 1024
    fits = limit - REQUEST_ALLOWANCE - pb.PutRequest(key=b"k", value=b"x" * 900).ByteSize() + 900
    value = b"x" * (fits + value_bytes)
    assert pb.PutRequest(key=b"k", value=value).ByteSize() + REQUEST_ALLOWANCE == limit + value_bytes
    with open_store(tmp_path, max_request_bytes=limit) as store:
        if too_large:
            with pytest.raises(errors.RequestTooLargeError, match=f"^{TOO_LARGE}$"):
                store.put(b"k", value)
        else:
            assert store.put(b"k", value).header.revision == 2


def test_no_space(tmp_path):
    """§10.6: NOSPACE, then the operator's way out: compact, defrag, disarm."""
    with open_store(tmp_path, quota_bytes=256 * 1024) as store:
        written = 0
        with pytest.raises(errors.NoSpaceError, match=f"^{NO_SPACE}$"):
            for written in range(1000):
                store.put(b"k%04d" % written, b"x" * 4000)
        revision = store.revision
        # The refusal raised the alarm (and persisted it, through the log).
        assert [a for _, a in store.alarms()] == [pb.NOSPACE]
        listed = store.alarm(pb.AlarmRequest.GET, pb.NONE).alarms
        assert [a.alarm for a in listed] == [pb.NOSPACE]

        with pytest.raises(errors.NoSpaceError, match=f"^{NO_SPACE}$"):
            store.put(b"small", b"")
        with pytest.raises(errors.NoSpaceError, match=f"^{NO_SPACE}$"):
            store.txn([], [ops.put(b"small", b"")])
        assert store.revision == revision
        # Reads, deletes and txns without puts still work.
        assert store.range(b"k", b"l", count_only=True).count == written
        assert store.txn([], [ops.get(b"k0000")]).succeeded
        assert store.delete(b"k", b"l").deleted == written
        assert store.revision == revision + 1

        store.compact(store.revision, physical=True)
        before, after = store.defrag()
        assert after < before
        with pytest.raises(errors.NoSpaceError):
            store.put(b"small", b"")  # the alarm outlives the defrag
        disarmed = store.alarm(pb.AlarmRequest.DEACTIVATE, pb.NOSPACE).alarms
        assert [a.alarm for a in disarmed] == [pb.NOSPACE]
        assert store.alarms() == []
        assert store.put(b"small", b"v").header.revision == revision + 2


# -- the documentation's examples run ------------------------------------------------------------


def test_embedded_example(tmp_path):
    """The package docstring's example, as a user would write it."""
    with mvcckv.open(str(tmp_path / "data.mvcckv")) as store:
        store.put(b"k", b"v")
        assert store.get(b"k").value == b"v"
        r = store.txn([ops.version(b"lock") == 0], [ops.put(b"lock", b"me")], [ops.get(b"lock")])
        assert r.succeeded
        resp = store.range(b"k", mvcckv.prefix_end(b"k"))
        assert keys_of(resp) == [b"k"]
    with mvcckv.open(str(tmp_path / "data.mvcckv")) as store:
        assert store.get(b"lock").value == b"me"


@pytest.mark.parametrize("module", [mvcckv.store, mvcckv.revision], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0

"""bbolt's format: the writer's files read back and pass bbolt's check; the
reader refuses damaged files with an error naming the file and the page,
never hangs and never raises anything else (hypothesis mutates real files)."""

from __future__ import annotations

import doctest
import hashlib
import io
import os
import struct
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mvcckv
import mvcckv.bbolt
from mvcckv import bbolt
from mvcckv.bbolt import PAGE_SIZE, Reader, Writer
from mvcckv.errors import BoltError, SnapshotError
from mvcckv.snapshot import restore, status


def _build(buckets: dict[bytes, list[tuple[bytes, bytes]]]) -> io.BytesIO:
    buf = io.BytesIO()
    w = Writer(buf)
    for name in sorted(buckets):
        w.bucket(name, buckets[name])
    size = w.finish()
    assert size == len(buf.getvalue()) and size % PAGE_SIZE == 0
    return buf


def _read_all(r: Reader) -> dict[bytes, list[tuple[bytes, bytes]]]:
    return {name: list(r.items(name)) for name, _ in r.buckets()}


def _depth(r: Reader, pgid: int) -> int:
    flags, count, _, data = r.page(pgid)
    if flags == bbolt.LEAF_PAGE:
        return 1
    (_, _, child) = struct.unpack_from("<IIQ", data, 16)
    return 1 + _depth(r, child)


def test_doctest_examples():
    assert doctest.testmod(mvcckv.bbolt).failed == 0


# --- what the writer writes ---------------------------------------------------


bucket_items = st.dictionaries(
    st.binary(min_size=1, max_size=40),
    # Mostly small values, some longer than a page (overflow pages).
    st.one_of(st.binary(max_size=64), st.integers(min_value=3000, max_value=9000).map(lambda n: bytes([n % 251]) * n)),
    max_size=120,
).map(lambda d: sorted(d.items()))


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.binary(min_size=1, max_size=16), bucket_items, min_size=1, max_size=6))
def test_writer_output_reads_back_and_passes_the_check(buckets):
    r = Reader(_build(buckets), "mem")
    assert _read_all(r) == buckets
    assert r.check() == []


def test_a_large_bucket_gets_several_branch_levels():
    items = [(b"%017d" % i, b"v" * 40) for i in range(20000)]
    r = Reader(_build({b"key": items, b"meta": [(b"a", b"1")]}), "mem")
    root, _ = struct.unpack_from("<QQ", r.bucket_value(b"key"))
    assert root != 0 and _depth(r, root) >= 3
    assert list(r.items(b"key")) == items
    assert r.check() == []


def test_small_buckets_are_inline_as_bbolt_keeps_them():
    quarter = PAGE_SIZE // 4
    # header 16 + element 16 + key 1 + value: exactly a quarter page is still inline.
    fits = [(b"a", b"x" * (quarter - 33))]
    too_big = [(b"a", b"x" * (quarter - 32))]
    r = Reader(_build({b"fits": fits, b"big": too_big, b"empty": []}), "mem")
    roots = {name: struct.unpack_from("<QQ", v)[0] for name, v in r.buckets()}
    assert roots[b"fits"] == 0 and roots[b"empty"] == 0 and roots[b"big"] != 0
    assert list(r.items(b"fits")) == fits and list(r.items(b"big")) == too_big
    assert list(r.items(b"missing")) == []


def test_writer_refuses_unsorted_input():
    w = Writer(io.BytesIO())
    with pytest.raises(ValueError, match="not after"):
        w.bucket(b"b", [(b"2", b""), (b"1", b"")])
    w = Writer(io.BytesIO())
    w.bucket(b"b", [])
    with pytest.raises(ValueError, match="not after"):
        w.bucket(b"a", [])
    with pytest.raises(ValueError, match="empty"):
        Writer(io.BytesIO()).bucket(b"c", [(b"", b"v")])


def test_writer_output_passes_etcdctls_check(tmp_path):
    # Values of every 100th key span overflow pages.
    buckets = {b"key": [(b"%017d" % i, os.urandom(300 if i % 100 else 10_000)) for i in range(3000)],
               b"meta": [(b"x", b"y")]}
    data = _build(buckets).getvalue()
    (tmp_path / "w.db").write_bytes(data + hashlib.sha256(data).digest())
    proc = subprocess.run(["etcdctl", "snapshot", "status", str(tmp_path / "w.db")],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "ETCDCTL_API": "3"})
    assert proc.returncode == 0, proc.stderr


# --- damaged files --------------------------------------------------------------


def _sample() -> bytearray:
    items = [(b"%05d" % i, b"v" * 100) for i in range(400)]
    return bytearray(_build({b"key": items, b"meta": [(b"m", b"1")]}).getvalue())


def _reader(data) -> Reader:
    return Reader(io.BytesIO(bytes(data)), "damaged.db")


def _meta_fix(data: bytearray, pgid: int) -> None:
    """Recompute a meta page's checksum after editing it."""
    off = pgid * PAGE_SIZE + 16
    struct.pack_into("<Q", data, off + 56, bbolt.fnv1a64(bytes(data[off:off + 56])))


def _key_root(data) -> int:
    return struct.unpack_from("<QQ", _reader(data).bucket_value(b"key"))[0]


def test_wrong_magic_and_checksum():
    data = _sample()
    bad = bytearray(data)
    struct.pack_into("<I", bad, 16, 0x12345678)
    struct.pack_into("<I", bad, PAGE_SIZE + 16, 0x12345678)
    with pytest.raises(BoltError, match="damaged.db: invalid database"):
        _reader(bad)
    bad = bytearray(data)
    bad[16 + 40] ^= 1  # the high water of both metas, checksums left stale
    bad[PAGE_SIZE + 16 + 40] ^= 1
    with pytest.raises(BoltError, match="checksum error"):
        _reader(bad)
    bad = bytearray(data)
    struct.pack_into("<I", bad, 20, 1)
    struct.pack_into("<I", bad, PAGE_SIZE + 20, 1)
    _meta_fix(bad, 0)
    _meta_fix(bad, 1)
    with pytest.raises(BoltError, match="version mismatch"):
        _reader(bad)


def test_a_damaged_first_meta_falls_back_to_the_second():
    data = _sample()
    data[16 + 30] ^= 0xFF
    r = _reader(data)
    assert r.meta.txid == 1
    assert len(list(r.items(b"key"))) == 400


def test_truncated_file():
    data = _sample()
    with pytest.raises(BoltError, match=r"damaged.db: file size too small"):
        _reader(data[:-PAGE_SIZE])
    with pytest.raises(BoltError, match="too short"):
        _reader(data[:100])


def test_a_cycle_is_reported_not_followed():
    data = _sample()
    root = _key_root(data)
    flags, count = struct.unpack_from("<HH", data, root * PAGE_SIZE + 8)
    assert flags == bbolt.BRANCH_PAGE
    # The last child of the root branch points back at the root.
    struct.pack_into("<Q", data, root * PAGE_SIZE + 16 + (count - 1) * 16 + 8, root)
    with pytest.raises(BoltError, match=rf"bucket 'key': page {root}: multiple references"):
        list(_reader(data).items(b"key"))
    assert any("multiple references" in p for p in _reader(data).check())


def test_a_child_past_the_high_water():
    data = _sample()
    root = _key_root(data)
    struct.pack_into("<Q", data, root * PAGE_SIZE + 16 + 8, 10_000)
    with pytest.raises(BoltError, match="page 10000: out of bounds"):
        list(_reader(data).items(b"key"))


def test_an_element_pointing_past_its_page():
    data = _sample()
    leaf = 2  # the first page written is the key bucket's first leaf
    struct.pack_into("<I", data, leaf * PAGE_SIZE + 16 + 4, 1 << 20)
    with pytest.raises(BoltError, match="page 2: element at byte 16 points past the page"):
        list(_reader(data).items(b"key"))


def test_keys_out_of_order():
    data = _sample()
    # First key of leaf 2 ("00000") made larger than the second.
    off = data.find(b"00000", 2 * PAGE_SIZE)
    data[off:off + 5] = b"00009"
    with pytest.raises(BoltError, match="keys out of order"):
        list(_reader(data).items(b"key"))
    assert _reader(data).check()


def test_a_page_of_the_wrong_type():
    data = _sample()
    struct.pack_into("<H", data, 2 * PAGE_SIZE + 8, bbolt.FREELIST_PAGE)
    with pytest.raises(BoltError, match="page 2: invalid type"):
        list(_reader(data).items(b"key"))


# --- fuzzing: mutated real snapshots ----------------------------------------------


@pytest.fixture(scope="module")
def real_snapshots(tmp_path_factory, etcd_binary):
    """One snapshot saved by a real etcd (with history, a lease and a user)
    and one written by mvcckv, both small, as bare databases."""
    from harness import EtcdProcess

    root = tmp_path_factory.mktemp("fuzz")
    with EtcdProcess(binary=etcd_binary) as etcd:
        for i in range(60):
            etcd.etcdctl("put", f"key/{i:03d}", "v" * (i * 20), json=False)
        etcd.etcdctl("del", "key/001", json=False)
        lease = etcd.etcdctl("lease", "grant", "600")["ID"]
        etcd.etcdctl("put", "leased", "x", "--lease", f"{lease:x}", json=False)
        etcd.etcdctl("user", "add", "u1:pw", json=False)
        etcd.etcdctl("snapshot", "save", str(root / "etcd.db"), json=False)
    with mvcckv.open(str(root / "src"), fsync=False) as store:
        for i in range(200):
            store.put(b"k/%03d" % i, b"w" * (i * 7))
        store.snapshot(str(root / "mvcckv.db"))
    for name in ("etcd", "mvcckv"):
        (root / f"{name}.bare").write_bytes((root / f"{name}.db").read_bytes()[:-32])
    return root


mutations = st.lists(
    st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255)), min_size=1, max_size=8
)


def _mutate(data: bytes, edits, cut) -> bytes:
    out = bytearray(data)
    for where, value in edits:
        out[where % len(out)] = value
    return bytes(out[: len(out) - cut])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from(["etcd", "mvcckv"]), edits=mutations,
       cut=st.one_of(st.just(0), st.integers(min_value=1, max_value=20000)))
def test_fuzz_reader_on_mutated_snapshots(real_snapshots, which, edits, cut):
    data = _mutate((real_snapshots / f"{which}.bare").read_bytes(), edits, cut)
    try:
        r = _reader(data)
        r.check()
        for name, _ in r.buckets():
            for _ in r.items(name):
                pass
    except BoltError as e:
        assert str(e).startswith("damaged.db: ")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from(["etcd", "mvcckv"]), edits=mutations)
def test_fuzz_restore_and_status_on_mutated_snapshots(real_snapshots, tmp_path_factory, which, edits):
    work = tmp_path_factory.mktemp("restore")
    path = work / "snap.db"
    path.write_bytes(_mutate((real_snapshots / f"{which}.bare").read_bytes(), edits, 0))
    try:
        restore(path, work / "restored", skip_hash_check=True)
    except SnapshotError as e:
        assert str(e).startswith(str(path))
        assert sorted(os.listdir(work)) == ["snap.db"], "a failed restore left something behind"
    else:
        with mvcckv.open(str(work / "restored"), fsync=False) as store:
            store.range(b"\0", b"\0")
    try:
        status(path)
    except SnapshotError as e:
        assert str(e).startswith(str(path))


def _with_freelist(data: bytearray, free: list[int]) -> bytearray:
    """The file with two more pages: a stored freelist (as bbolt keeps one
    without NoFreelistSync, etcd on other systems than Linux) listing
    ``free``, and one unused page after it."""
    high = len(data) // PAGE_SIZE
    page = bytearray(PAGE_SIZE)
    struct.pack_into("<QHHI", page, 0, high, bbolt.FREELIST_PAGE, len(free), 0)
    for i, pgid in enumerate(free):
        struct.pack_into("<Q", page, 16 + 8 * i, pgid)
    out = data + page + bytearray(PAGE_SIZE)
    for meta in (0, 1):
        off = meta * PAGE_SIZE + 16
        struct.pack_into("<QQ", out, off + 32, high, high + 2)  # freelist pgid, high water
        _meta_fix(out, meta)
    return out


def test_a_stored_freelist_accounts_for_unreachable_pages():
    data = _sample()
    high = len(data) // PAGE_SIZE
    r = _reader(_with_freelist(data, [high + 1]))
    assert r.freed() == {high + 1}
    assert r.check() == []
    assert len(list(r.items(b"key"))) == 400
    assert _reader(_with_freelist(data, [])).check() == [f"damaged.db: page {high + 1}: unreachable unfreed"]
    reachable = _key_root(data)
    assert f"damaged.db: page {reachable}: reachable freed" in _reader(_with_freelist(data, [high + 1, reachable])).check()


def test_freelist_verdicts_are_bbolts(tmp_path):
    """etcdctl's own check agrees (its status then reads the sample's short
    keys as revisions and panics, so only the check's verdict is compared)."""
    data = _sample()
    high = len(data) // PAGE_SIZE
    verdicts = []
    for free in ([high + 1], []):
        body = bytes(_with_freelist(data, free))
        (tmp_path / "f.db").write_bytes(body + hashlib.sha256(body).digest())
        proc = subprocess.run(["etcdctl", "snapshot", "status", str(tmp_path / "f.db")],
                              capture_output=True, text=True, timeout=60, env={**os.environ, "ETCDCTL_API": "3"})
        verdicts.append("integrity check failed" in proc.stderr)
        if free == []:
            assert f"page {high + 1}: unreachable unfreed" in proc.stderr
    assert verdicts == [False, True]

"""Snapshots: framing, save while writing, restore, status, the CLI, etcdctl."""

from __future__ import annotations

import doctest
import hashlib
import json
import os
import struct
import subprocess
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc
import pytest

import mvcckv
import mvcckv.snapshot
from mvcckv import ops
from mvcckv.errors import SnapshotError
from mvcckv.pb import rpc_pb2, rpc_pb2_grpc
from mvcckv.snapshot import (
    SnapshotStatus,
    iter_snapshot,
    restore,
    save,
    save_from_endpoint,
    status,
)

REPO = Path(__file__).resolve().parent.parent
ALL = (b"\0", b"\0")  # key, range_end selecting every key


def _open(path, **options):
    options.setdefault("fsync", False)
    return mvcckv.open(str(path), **options)


def _fill(store, n=2000, value_size=200):
    """n keys in batches of 100, then some history: updates and deletes."""
    for start in range(0, n, 100):
        store.txn([], [ops.put(b"k/%05d" % i, b"v" * value_size) for i in range(start, min(n, start + 100))])
    for i in range(0, n, 7):
        store.put(b"k/%05d" % i, b"updated %d" % i)
    for i in range(0, n, 11):
        store.delete(b"k/%05d" % i)


def _kvs(store, revision=0):
    return list(store.range(*ALL, revision=revision).kvs)


class _Writer(threading.Thread):
    """Puts until stopped (at most ``limit`` of them); keeps the first error."""

    def __init__(self, store, limit=200_000):
        super().__init__(daemon=True)
        self.store = store
        self.limit = limit
        self.stop = threading.Event()
        self.count = 0
        self.error: BaseException | None = None

    def run(self):
        try:
            for i in range(self.limit):
                if self.stop.is_set():
                    return
                self.store.put(b"w/%03d" % (i % 50), b"%d" % i)
                self.count += 1
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e

    def finish(self):
        self.stop.set()
        self.join(timeout=30)
        assert not self.is_alive()
        assert self.error is None, self.error


@pytest.fixture
def src(tmp_path):
    with _open(tmp_path / "src") as store:
        _fill(store)
        yield store


@pytest.fixture
def snap(src, tmp_path):
    path = tmp_path / "snap.db"
    save(src, path)
    return path


def test_doctest_examples():
    assert doctest.testmod(mvcckv.snapshot).failed == 0


# --- framing -----------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [32 * 1024, 1000, 4096])
def test_stream_is_blobs_then_sha256_of_them(src, chunk_size):
    msgs = list(iter_snapshot(src, chunk_size=chunk_size))
    data, (digest, last_remaining) = msgs[:-1], msgs[-1]
    blob = b"".join(b for b, _ in data)
    assert last_remaining == 0
    assert digest == hashlib.sha256(blob).digest()
    assert len(blob) % 512 == 0 and len(blob) > 0
    assert all(0 < len(b) <= chunk_size for b, _ in data)
    assert [r for _, r in data] == [len(blob) - sum(len(b) for b, _ in data[: i + 1]) for i in range(len(data))]
    assert data[-1][1] == 0


def test_save_writes_the_stream_and_leaves_no_part_file(src, tmp_path):
    path = tmp_path / "snap.db"
    size = save(src, path)
    data = path.read_bytes()
    assert size == len(data) and len(data) % 512 == 32
    assert hashlib.sha256(data[:-32]).digest() == data[-32:]
    assert not (tmp_path / "snap.db.part").exists()


def test_iter_snapshot_leaves_nothing_in_the_data_dir(src):
    before = sorted(os.listdir(src.path))
    stream = iter_snapshot(src)
    next(stream)
    stream.close()
    list(iter_snapshot(src))
    assert sorted(os.listdir(src.path)) == before


# --- round trip --------------------------------------------------------------


def test_round_trip_while_writes_continue(tmp_path):
    with _open(tmp_path / "src") as src:
        src.identity(0x1234, 0x5678)
        lease = src.lease_grant(3600, 77).ID
        src.put(b"leased", b"x", lease=lease)
        _fill(src)
        writer = _Writer(src)
        writer.start()
        try:
            for _ in range(10_000):  # let the writer get going
                if writer.count >= 20:
                    break
                writer.join(0.001)
            applied_before = src.status().applied_index
            save(src, tmp_path / "snap.db")
            applied_after = src.status().applied_index
            count_at_save = writer.count
        finally:
            writer.finish()
        assert writer.count > count_at_save > 0, "the writer did not keep writing"

        rev = status(tmp_path / "snap.db").revision
        assert src.revision > rev
        expected_kvs = _kvs(src, rev)
        expected_hash = src.hash_kv(rev)[0]

    restored_status = restore(tmp_path / "snap.db", tmp_path / "restored")
    assert sorted(os.listdir(tmp_path / "restored")) == ["db"]
    # The restored file, and the record of it as the last synced state.
    assert sorted(os.listdir(tmp_path / "restored" / "db")) == ["data.mdb", "synced-meta"]
    with _open(tmp_path / "restored") as store:
        assert store.revision == rev == restored_status.revision
        assert _kvs(store) == expected_kvs
        assert store.hash_kv(rev)[0] == expected_hash
        assert restored_status == status(tmp_path / "snap.db")
        assert store.status().keys == len(expected_kvs)
        assert store.lease_ttl(lease).TTL > 0
        assert store.get(b"leased").lease == lease

        # consistent_index came along: the new WAL starts right after it.
        ci = store.status().applied_index
        assert applied_before <= ci <= applied_after
        assert os.listdir(tmp_path / "restored" / "wal") == [f"{ci + 1:016x}.wal"]

        resp = store.put(b"after", b"restore")
        assert resp.header.revision == rev + 1
        assert store.status().applied_index == ci + 1
        # The identity was dropped: the restored member takes the one it is given.
        assert store.identity(0xAAA, 0xBBB) == (0xAAA, 0xBBB)


def test_restore_into_an_existing_empty_dir(snap, src, tmp_path):
    (tmp_path / "empty").mkdir()
    restore(snap, tmp_path / "empty")
    with _open(tmp_path / "empty") as store:
        assert _kvs(store) == _kvs(src)


def test_restored_store_survives_reopen_and_compaction(snap, src, tmp_path):
    expected = _kvs(src)
    restore(snap, tmp_path / "r")
    with _open(tmp_path / "r") as store:
        rev = store.revision
        store.compact(rev, physical=True)
        store.put(b"k/new", b"1")
    with _open(tmp_path / "r") as store:
        assert store.revision == rev + 1
        assert store.compact_revision == rev
        assert [kv for kv in _kvs(store) if kv.key != b"k/new"] == expected


# --- status ------------------------------------------------------------------


def _etcdctl_status(path):
    proc = subprocess.run(
        ["etcdctl", "snapshot", "status", str(path), "-w", "json"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "ETCDCTL_API": "3"},
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    return SnapshotStatus(got["hash"], got["revision"], got["totalKey"], got["totalSize"], got.get("version", ""))


def test_status_fields_are_etcdctls(tmp_path):
    with _open(tmp_path / "src") as store:
        store.identity(1, 2)
        _fill(store, n=500)
        save(store, tmp_path / "snap.db")
        revision = store.revision
    before = (tmp_path / "snap.db").read_bytes()
    st = status(tmp_path / "snap.db")
    assert st == _etcdctl_status(tmp_path / "snap.db")
    assert (tmp_path / "snap.db").read_bytes() == before
    assert st.revision == revision
    assert st.total_size == len(before) - 32


def test_status_of_an_empty_store(tmp_path):
    with _open(tmp_path / "src") as store:
        save(store, tmp_path / "snap.db")
    st = status(tmp_path / "snap.db")
    assert st == _etcdctl_status(tmp_path / "snap.db")
    assert st.revision == 0


def test_status_reads_a_bare_database_copy(snap, tmp_path):
    bare = tmp_path / "bare.db"
    bare.write_bytes(snap.read_bytes()[:-32])
    assert status(bare) == status(snap)


# --- refused files -----------------------------------------------------------


def _assert_refused(path, tmp_path, match, **kwargs):
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(SnapshotError, match=match):
        restore(path, tmp_path / "restored", **kwargs)
    assert sorted(os.listdir(tmp_path)) == before, "restore left something behind"


@pytest.mark.parametrize("where", ["first", "middle", "last data", "trailer"])
def test_flipped_byte_is_refused(snap, tmp_path, where):
    data = bytearray(snap.read_bytes())
    offset = {"first": 16, "middle": len(data) // 2, "last data": len(data) - 33, "trailer": len(data) - 1}[where]
    data[offset] ^= 0x40
    snap.write_bytes(bytes(data))
    _assert_refused(snap, tmp_path, "sha256 mismatch: the file is corrupt")
    with pytest.raises(SnapshotError, match="sha256 mismatch"):
        status(snap)


@pytest.mark.parametrize(
    ("cut", "skip", "match"),
    [
        (1, False, "no sha256 checksum at the end"),
        (100, False, "no sha256 checksum at the end"),
        (4096, False, "sha256 mismatch"),  # still 32 over a multiple of 512
        (32 + 4096, True, "file size too small"),
        (32 + 4096 + 100, True, "file size too small"),
    ],
)
def test_truncated_file_is_refused(snap, tmp_path, cut, skip, match):
    data = snap.read_bytes()
    snap.write_bytes(data[:-cut])
    _assert_refused(snap, tmp_path, match, skip_hash_check=skip)


@pytest.mark.parametrize("size", [0, 32, 100])
def test_tiny_file_is_refused(tmp_path, size):
    path = tmp_path / "tiny.db"
    path.write_bytes(b"\1" * size)
    _assert_refused(path, tmp_path, "no sha256 checksum|sha256 mismatch", skip_hash_check=False)
    _assert_refused(path, tmp_path, "too short", skip_hash_check=True)


def _with_trailer(data: bytes) -> bytes:
    return data + hashlib.sha256(data).digest()


def test_foreign_files_are_refused(tmp_path):
    bolt = bytearray(8192)
    struct.pack_into("<I", bolt, 16, 0xED0CDAED)
    (tmp_path / "bolt.db").write_bytes(_with_trailer(bytes(bolt)))
    _assert_refused(tmp_path / "bolt.db", tmp_path, r"invalid database|version mismatch")
    (tmp_path / "junk.db").write_bytes(_with_trailer(os.urandom(8192)))
    _assert_refused(tmp_path / "junk.db", tmp_path, "invalid database")


def test_lmdb_file_without_mvcckv_databases_is_refused(tmp_path):
    import lmdb

    env = lmdb.open(str(tmp_path / "other"), max_dbs=2)
    with env.begin(write=True) as txn:
        txn.put(b"a", b"b")
    with open(tmp_path / "other.db", "wb") as f:
        env.copyfd(f.fileno(), compact=True)
    env.close()
    data = (tmp_path / "other.db").read_bytes()
    (tmp_path / "other.db").write_bytes(_with_trailer(data))
    _assert_refused(tmp_path / "other.db", tmp_path, "no 'meta' database")
    with pytest.raises(SnapshotError, match="no 'key' database"):
        status(tmp_path / "other.db")


def test_bare_copy_needs_skip_hash_check(snap, src, tmp_path):
    bare = tmp_path / "bare.db"
    bare.write_bytes(snap.read_bytes()[:-32])
    _assert_refused(bare, tmp_path, "--skip-hash-check")
    restore(bare, tmp_path / "restored", skip_hash_check=True)
    with _open(tmp_path / "restored") as store:
        assert _kvs(store) == _kvs(src)


def test_skip_hash_check_ignores_a_bad_trailer(snap, src, tmp_path):
    data = bytearray(snap.read_bytes())
    data[-1] ^= 1
    snap.write_bytes(bytes(data))
    restore(snap, tmp_path / "restored", skip_hash_check=True)
    with _open(tmp_path / "restored") as store:
        assert _kvs(store) == _kvs(src)


def test_restore_into_a_non_empty_dir_is_refused(snap, tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(FileExistsError, match="not empty"):
        restore(snap, target)
    assert sorted(os.listdir(tmp_path)) == before
    assert os.listdir(target) == ["keep.txt"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileExistsError):
        restore(snap, tmp_path / "afile")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        restore(tmp_path / "nope.db", tmp_path / "restored")
    assert not (tmp_path / "restored").exists()


# --- save from an endpoint (a stand-in Maintenance service) ------------------


class _Maintenance(rpc_pb2_grpc.MaintenanceServicer):
    """Streams whatever ``messages()`` yields as (blob, remaining) pairs."""

    def __init__(self):
        self.messages = lambda: iter(())

    def Snapshot(self, request, context):  # noqa: N802 - gRPC method name
        for blob, remaining in self.messages():
            yield rpc_pb2.SnapshotResponse(blob=blob, remaining_bytes=remaining)


@pytest.fixture
def endpoint():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    service = _Maintenance()
    rpc_pb2_grpc.add_MaintenanceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield service, f"http://127.0.0.1:{port}"
    finally:
        server.stop(grace=None).wait(10)


def test_save_from_endpoint(endpoint, src, tmp_path):
    service, url = endpoint
    service.messages = lambda: iter_snapshot(src, chunk_size=5000)
    size = save_from_endpoint(url, tmp_path / "snap.db", timeout=30)
    data = (tmp_path / "snap.db").read_bytes()
    assert size == len(data) and len(data) % 512 == 32
    assert status(tmp_path / "snap.db").revision == src.revision
    restore(tmp_path / "snap.db", tmp_path / "restored")
    with _open(tmp_path / "restored") as store:
        assert _kvs(store) == _kvs(src)


@pytest.mark.parametrize(
    ("mangle", "match"),
    [
        (lambda msgs: msgs[:-1], r"sha256 checksum not found \[bytes: \d+\]"),
        (lambda msgs: msgs[:-1] + [(b"\0" * 32, 0)], "sha256 mismatch"),
        (lambda msgs: [(b"x" * 100, 0)], r"sha256 checksum not found \[bytes: 100\]"),
    ],
)
def test_save_from_endpoint_checks_the_stream(endpoint, src, tmp_path, mangle, match):
    service, url = endpoint
    msgs = list(iter_snapshot(src))
    service.messages = lambda: iter(mangle(msgs))
    with pytest.raises(SnapshotError, match=match):
        save_from_endpoint(url, tmp_path / "snap.db", timeout=30)
    assert os.listdir(tmp_path) == ["src"]


def test_save_from_endpoint_reports_server_errors(endpoint, tmp_path):
    service, url = endpoint

    def fail():
        yield b"x" * 512, 512
        raise RuntimeError("boom")

    service.messages = fail
    with pytest.raises(SnapshotError, match="failed: UNKNOWN"):
        save_from_endpoint(url, tmp_path / "snap.db", timeout=30)
    assert os.listdir(tmp_path) == []


def test_save_from_endpoint_unreachable(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refuses connections
        with pytest.raises(SnapshotError, match="cannot connect"):
            save_from_endpoint(f"127.0.0.1:{port}", tmp_path / "snap.db", dial_timeout=0.5)
    assert os.listdir(tmp_path) == []
    with pytest.raises(SnapshotError, match="one endpoint"):
        save_from_endpoint("127.0.0.1:1,127.0.0.1:2", tmp_path / "snap.db")


def test_save_from_real_etcd_gives_a_file_status_reads(etcd, tmp_path):
    etcd.etcdctl("put", "snapshot-test", "1", json=False)
    size = save_from_endpoint(etcd.client_url, tmp_path / "etcd.db", timeout=30)
    assert size % 512 == 32
    assert status(tmp_path / "etcd.db") == _etcdctl_status(tmp_path / "etcd.db")


# --- command line ------------------------------------------------------------


def _cli(*args, check=True):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "mvcckv", "snapshot", *map(str, args)],
        capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL,
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def _assert_cli_error(proc, match):
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    assert match in lines[0]


def test_cli_save_status_restore(tmp_path):
    with _open(tmp_path / "src") as store:
        _fill(store, n=300)
        expected_kvs = _kvs(store)
    out = _cli("save", "--data-dir", tmp_path / "src", tmp_path / "snap.db").stdout
    assert out.startswith(f"Snapshot saved at {tmp_path / 'snap.db'}")
    st = status(tmp_path / "snap.db")

    got = json.loads(_cli("status", tmp_path / "snap.db", "-w", "json").stdout)
    assert got == {
        "hash": st.hash, "revision": st.revision, "totalKey": st.total_keys,
        "totalSize": st.total_size, "version": st.version,
    }
    table = _cli("status", tmp_path / "snap.db").stdout.splitlines()
    assert [c.strip() for c in table[1].strip("|").split("|")] == [
        "HASH", "REVISION", "TOTAL KEYS", "TOTAL SIZE", "VERSION",
    ]
    cells = [c.strip() for c in table[3].strip("|").split("|")]
    assert cells[:3] == [f"{st.hash:x}", str(st.revision), str(st.total_keys)]
    assert cells[3].endswith("kB") or cells[3].endswith("MB")

    out = _cli("restore", tmp_path / "snap.db", "--data-dir", tmp_path / "restored", "--progress")
    assert f"revision {st.revision}, {st.total_keys} keys" in out.stdout
    with _open(tmp_path / "restored") as store:
        assert _kvs(store) == expected_kvs


def test_cli_errors_are_one_line(tmp_path):
    with _open(tmp_path / "src") as store:
        _fill(store, n=100)
        save(store, tmp_path / "snap.db")
    _cli("restore", tmp_path / "snap.db", "--data-dir", tmp_path / "restored")
    _assert_cli_error(_cli("restore", tmp_path / "snap.db", "--data-dir", tmp_path / "restored", check=False),
                      "not empty")
    data = bytearray((tmp_path / "snap.db").read_bytes())
    data[1000] ^= 1
    (tmp_path / "bad.db").write_bytes(bytes(data))
    _assert_cli_error(_cli("status", tmp_path / "bad.db", check=False), "sha256 mismatch")
    _assert_cli_error(_cli("restore", tmp_path / "bad.db", "--data-dir", tmp_path / "r2", check=False),
                      "sha256 mismatch")
    assert not (tmp_path / "r2").exists()
    _assert_cli_error(_cli("status", tmp_path / "missing.db", check=False), "No such file")
    _assert_cli_error(_cli("save", "--data-dir", tmp_path / "nowhere", tmp_path / "x.db", check=False),
                      "no mvcckv data dir")
    assert not (tmp_path / "nowhere").exists()


def test_cli_save_refuses_a_data_dir_in_use(tmp_path):
    with _open(tmp_path / "src") as store:
        store.put(b"k", b"v")
        proc = _cli("save", "--data-dir", tmp_path / "src", tmp_path / "snap.db", check=False)
        _assert_cli_error(proc, "already open")
        assert store.put(b"k", b"v2").header.revision == 3
    assert not (tmp_path / "snap.db").exists()
    assert not (tmp_path / "snap.db.part").exists()


def test_cli_save_needs_exactly_one_source(tmp_path):
    assert _cli("save", tmp_path / "x.db", check=False).returncode == 2
    proc = _cli("save", "--endpoints", "127.0.0.1:1", "--data-dir", tmp_path, tmp_path / "x.db", check=False)
    assert proc.returncode == 2


# --- etcdctl against mvcckv serve ----------------------------------------------


def test_etcdctl_snapshot_save_then_restore_and_serve(tmp_path):
    from harness import MvcckvProcess, kvs, stub

    with MvcckvProcess(tmp_path / "data", log_path=tmp_path / "server.log") as server:
        with server.channel() as channel:
            kv = stub(channel, "KV")
            for i in range(200):
                kv.Put(rpc_pb2.PutRequest(key=b"key/%03d" % i, value=b"value %d" % i), timeout=10)
        server.etcdctl("del", "key/000", json=False)
        before = kvs(server.etcdctl("get", "key/", "--prefix"))
        revision = server.etcdctl("get", "key/", "--prefix")["header"]["revision"]

        proc = server.etcdctl("snapshot", "save", str(tmp_path / "etcdctl.db"), json=False)
        assert b"Snapshot saved at" in proc.stdout
        _cli("save", "--endpoints", server.client_url, tmp_path / "mvcckv.db")

    statuses = [json.loads(_cli("status", tmp_path / f, "-w", "json").stdout) for f in ("etcdctl.db", "mvcckv.db")]
    assert statuses[0] == statuses[1]
    assert statuses[0]["revision"] == revision
    assert SnapshotStatus(**dict(zip(SnapshotStatus.__dataclass_fields__, statuses[0].values()))) == \
        _etcdctl_status(tmp_path / "etcdctl.db")

    _cli("restore", tmp_path / "etcdctl.db", "--data-dir", tmp_path / "restored")
    with MvcckvProcess(tmp_path / "restored", log_path=tmp_path / "restored.log") as server:
        assert kvs(server.etcdctl("get", "key/", "--prefix")) == before
        put = server.etcdctl("put", "key/new", "1")
        assert put["header"]["revision"] == revision + 1


# --- snapshots of earlier mvcckv releases (an LMDB copy) -----------------------


def test_an_lmdb_snapshot_still_restores(tmp_path):
    import lmdb

    with _open(tmp_path / "src") as store:
        _fill(store, n=300)
        expected = _kvs(store)
        revision = store.revision
    env = lmdb.open(str(tmp_path / "src" / "db"), readonly=True, lock=False, max_dbs=16)
    with open(tmp_path / "old.db", "wb") as f:
        env.copyfd(f.fileno(), compact=True)
    env.close()
    (tmp_path / "old.db").write_bytes(_with_trailer((tmp_path / "old.db").read_bytes()))
    st = status(tmp_path / "old.db")
    assert (st.revision, st.total_keys) == (revision, len(expected))
    assert restore(tmp_path / "old.db", tmp_path / "restored") == SnapshotStatus(
        **{**st.__dict__, "total_size": (tmp_path / "restored" / "db" / "data.mdb").stat().st_size}
    )
    with _open(tmp_path / "restored") as store:
        assert _kvs(store) == expected


# --- the embedded API ------------------------------------------------------------


def test_store_snapshot_to_a_path_a_file_or_a_stream(src, tmp_path):
    import io

    by_path = tmp_path / "a.db"
    size = src.snapshot(str(by_path))
    buf = io.BytesIO(b"header")  # written from the current position
    buf.seek(6)
    assert src.snapshot(buf) == size
    assert buf.getvalue()[6:] == by_path.read_bytes()

    class Pipe:  # write-only, like a socket's file
        def __init__(self):
            self.parts = []

        def write(self, b):
            self.parts.append(bytes(b))
            return len(b)

    pipe = Pipe()
    assert src.snapshot(pipe) == size
    assert b"".join(pipe.parts) == by_path.read_bytes()
    # A file opened "wb" can seek but not be read back for the hash.
    with open(tmp_path / "wb.db", "wb") as f:
        assert src.snapshot(f) == size
    assert (tmp_path / "wb.db").read_bytes() == by_path.read_bytes()
    with pytest.raises(TypeError, match="a path or a binary file, not int"):
        src.snapshot(3)


def test_mvcckv_restore_takes_a_path_or_a_binary_file(src, tmp_path):
    import io

    src.snapshot(str(tmp_path / "snap.db"))
    st = mvcckv.restore(str(tmp_path / "snap.db"), str(tmp_path / "a"))
    assert mvcckv.restore(io.BytesIO((tmp_path / "snap.db").read_bytes()), str(tmp_path / "b")) == st
    for d in ("a", "b"):
        with _open(tmp_path / d) as store:
            assert _kvs(store) == _kvs(src)
    with pytest.raises(SnapshotError, match=r"<snapshot file>: sha256 mismatch"):
        mvcckv.restore(io.BytesIO(b"\0" * 4096 + b"\1" * 32), str(tmp_path / "c"))
    assert not (tmp_path / "c").exists()


def test_an_etcd_36_file_shows_its_storage_version(tmp_path):
    """etcd 3.6 records its storage version (and 3.5+ the raft term and
    conf state) in ``meta``; status shows the version, restore keeps the
    keys and the store opens."""
    from mvcckv import etcdfile
    from mvcckv.pb import kv_pb2

    kv = kv_pb2.KeyValue(key=b"a", create_revision=2, mod_revision=2, version=1, value=b"1")
    source = {
        b"key": [(struct.pack(">Q", 2) + b"_" + struct.pack(">Q", 0), kv.SerializeToString())],
        b"meta": [(b"confState", b'{"voters":[1]}'), (b"consistent_index", struct.pack(">Q", 9)),
                  (b"storageVersion", b"3.6.0"), (b"term", struct.pack(">Q", 2))],
    }
    etcdfile.save(str(tmp_path / "36.db"), source)
    st = status(tmp_path / "36.db")
    assert (st.revision, st.total_keys, st.version) == (2, 5, "3.6.0")
    restore(tmp_path / "36.db", tmp_path / "r")
    with _open(tmp_path / "r") as store:
        assert store.get(b"a").value == b"1"
        assert store.put(b"b", b"2").header.revision == 3


def test_a_slow_snapshot_blocks_neither_status_nor_hashkv_and_defrag_waits(src, tmp_path):
    release = threading.Event()
    started = threading.Event()

    class SlowPipe:
        def __init__(self):
            self.parts = []

        def write(self, b):
            started.set()
            assert release.wait(30)
            self.parts.append(bytes(b))
            return len(b)

    pipe = SlowPipe()
    expected = _kvs(src)
    with futures.ThreadPoolExecutor(2) as pool:
        snap = pool.submit(src.snapshot, pipe)
        assert started.wait(30)
        # The snapshot holds its read transaction; the store goes on.
        assert pool.submit(src.status).result(timeout=10).revision == src.revision
        assert pool.submit(src.hash_kv).result(timeout=10)[1] == src.revision
        src.put(b"k/after", b"written during the snapshot")
        defrag = pool.submit(src.defrag)
        with pytest.raises(futures.TimeoutError):
            defrag.result(timeout=0.5)
        release.set()
        size = snap.result(timeout=60)
        defrag.result(timeout=60)
    (tmp_path / "slow.db").write_bytes(b"".join(pipe.parts))
    assert (tmp_path / "slow.db").stat().st_size == size
    restore(tmp_path / "slow.db", tmp_path / "restored")
    with _open(tmp_path / "restored") as store:
        assert _kvs(store) == expected

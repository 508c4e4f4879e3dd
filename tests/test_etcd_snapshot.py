"""Snapshots between real etcd 3.4 and mvcckv, both ways, both engines.

One workload (history with overwrites, deletes, a txn's sub-revisions, a
new generation, leases with keys, a physical compaction, users, roles and
auth on) is run over gRPC against a source server; the source's snapshot
is restored by the other side's own tools (``mvcckv snapshot restore`` into
a data dir or a PostgreSQL schema; ``etcdctl snapshot restore`` and a real
etcd started on the result); then the same gRPC observation of both
servers must be equal: every key at every revision from the compaction
on, HashKV, leases (ID, granted TTL, keys), users, roles, auth.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import grpc
import pytest

from harness import EtcdProcess, MvcckvProcess, find_binary, stub
from mvcckv.pb import auth_pb2, rpc_pb2 as pb
from mvcckv.snapshot import restore, status

REPO = Path(__file__).resolve().parent.parent
ROOT_PASSWORD = "root-pw"
LEASES = {0x1234: 600, 0x5678: 900}


def _populate(channel) -> None:
    kv, lease = stub(channel, "KV"), stub(channel, "Lease")
    for i in range(150):
        kv.Put(pb.PutRequest(key=b"k/%03d" % i, value=b"%d" % i * (i % 7 + 1)), timeout=10)
    kv.Txn(pb.TxnRequest(success=[
        pb.RequestOp(request_put=pb.PutRequest(key=b"t/%d" % i, value=b"in a txn")) for i in range(3)
    ]), timeout=10)
    for i in range(0, 150, 5):
        kv.Put(pb.PutRequest(key=b"k/%03d" % i, value=b"second"), timeout=10)
    kv.DeleteRange(pb.DeleteRangeRequest(key=b"k/100", range_end=b"k/121"), timeout=10)
    kv.Put(pb.PutRequest(key=b"k/105", value=b"a new generation"), timeout=10)
    for lease_id, ttl in LEASES.items():
        lease.LeaseGrant(pb.LeaseGrantRequest(ID=lease_id, TTL=ttl), timeout=10)
    for i in range(3):
        kv.Put(pb.PutRequest(key=b"leased/%d" % i, value=b"x", lease=0x1234), timeout=10)
    current = kv.Range(pb.RangeRequest(key=b"k/000"), timeout=10).header.revision
    kv.Compact(pb.CompactionRequest(revision=current - 25, physical=True), timeout=30)
    for i in range(10):
        kv.Put(pb.PutRequest(key=b"after/%d" % i, value=b"after the compaction"), timeout=10)


def _secure(channel) -> None:
    auth = stub(channel, "Auth")
    auth.UserAdd(pb.AuthUserAddRequest(name="root", password=ROOT_PASSWORD), timeout=30)
    auth.RoleAdd(pb.AuthRoleAddRequest(name="root"), timeout=10)
    auth.UserGrantRole(pb.AuthUserGrantRoleRequest(user="root", role="root"), timeout=10)
    auth.UserAdd(pb.AuthUserAddRequest(name="alice", password="alice-pw"), timeout=30)
    auth.RoleAdd(pb.AuthRoleAddRequest(name="reader"), timeout=10)
    auth.RoleGrantPermission(pb.AuthRoleGrantPermissionRequest(name="reader", perm=auth_pb2.Permission(
        permType=auth_pb2.Permission.READ, key=b"k/", range_end=b"k0")), timeout=10)
    auth.RoleGrantPermission(pb.AuthRoleGrantPermissionRequest(name="reader", perm=auth_pb2.Permission(
        permType=auth_pb2.Permission.READWRITE, key=b"after/0")), timeout=10)
    auth.UserGrantRole(pb.AuthUserGrantRoleRequest(user="alice", role="reader"), timeout=10)
    auth.AuthEnable(pb.AuthEnableRequest(), timeout=10)


def _observe(channel) -> dict:
    """Everything a client can see of the data, as comparable values."""
    with pytest.raises(grpc.RpcError) as refused:
        stub(channel, "KV").Range(pb.RangeRequest(key=b"k/000"), timeout=10)
    token = stub(channel, "Auth").Authenticate(
        pb.AuthenticateRequest(name="root", password=ROOT_PASSWORD), timeout=30).token
    md = [("token", token)]
    kv, lease, auth = stub(channel, "KV"), stub(channel, "Lease"), stub(channel, "Auth")
    hkv = stub(channel, "Maintenance").HashKV(pb.HashKVRequest(), metadata=md, timeout=30)
    current = hkv.header.revision
    history = {
        rev: [x.SerializeToString() for x in kv.Range(
            pb.RangeRequest(key=b"\0", range_end=b"\0", revision=rev), metadata=md, timeout=10).kvs]
        for rev in range(hkv.compact_revision, current + 1)
    }
    with pytest.raises(grpc.RpcError, match="compacted"):
        kv.Range(pb.RangeRequest(key=b"k/000", revision=hkv.compact_revision - 1), metadata=md, timeout=10)
    events = _watch_events(channel, md, hkv.compact_revision, current)
    leases = {}
    for item in lease.LeaseLeases(pb.LeaseLeasesRequest(), metadata=md, timeout=10).leases:
        ttl = lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=item.ID, keys=True), metadata=md, timeout=10)
        leases[item.ID] = (ttl.grantedTTL, sorted(ttl.keys))
    users = {
        name: list(auth.UserGet(pb.AuthUserGetRequest(name=name), metadata=md, timeout=10).roles)
        for name in auth.UserList(pb.AuthUserListRequest(), metadata=md, timeout=10).users
    }
    # The root role is stored without permissions by both; etcd 3.5+ (and
    # mvcckv, which answers as 3.6) show it the implicit whole-keyspace
    # one, 3.4 shows none, so only its presence is compared.
    roles = {
        name: [p.SerializeToString() for p in auth.RoleGet(pb.AuthRoleGetRequest(role=name), metadata=md,
                                                           timeout=10).perm] if name != "root" else "root"
        for name in auth.RoleList(pb.AuthRoleListRequest(), metadata=md, timeout=10).roles
    }
    return {
        "auth refuses a request without a user": "user name is empty" in refused.value.details(),
        "hashkv": (hkv.hash, hkv.compact_revision, current),
        "history": history,
        "events": events,
        "leases": leases,
        "users": users,
        "roles": roles,
    }


def _watch_events(channel, md, start: int, end: int) -> list[bytes]:
    """Every event from ``start`` to ``end`` of a watch on the whole keyspace."""
    done = threading.Event()

    def requests():
        yield pb.WatchRequest(create_request=pb.WatchCreateRequest(key=b"\0", range_end=b"\0", start_revision=start))
        done.wait(30)

    stream = stub(channel, "Watch").Watch(requests(), metadata=md, timeout=30)
    events: list[bytes] = []
    try:
        for resp in stream:
            events += [e.SerializeToString() for e in resp.events]
            if resp.events and resp.events[-1].kv.mod_revision >= end:
                break
    finally:
        done.set()
        stream.cancel()
    return events


def _check_observation(seen: dict) -> None:
    """The workload's own facts, so an equal but empty observation fails."""
    assert seen["auth refuses a request without a user"]
    # Compacted 25 revisions back, then 10 more puts.
    assert seen["hashkv"][1] > 0 and len(seen["history"]) == 36
    assert sum(map(len, seen["history"].values())) > 36 * 100
    # One event per revision, but 21 for the delete of k/100..k/120.
    assert len(seen["events"]) == 36 - 1 + 21
    assert seen["leases"] == {0x1234: (600, [b"leased/0", b"leased/1", b"leased/2"]), 0x5678: (900, [])}
    assert seen["users"] == {"alice": ["reader"], "root": ["root"]}
    assert set(seen["roles"]) == {"reader", "root"} and len(seen["roles"]["reader"]) == 2


def _etcdctl_snapshot(endpoint: str, path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL_")}
    proc = subprocess.run(
        [find_binary("etcdctl"), f"--endpoints={endpoint}", "--user", f"root:{ROOT_PASSWORD}",
         "snapshot", "save", str(path)],
        capture_output=True, text=True, timeout=120, env={**env, "ETCDCTL_API": "3"},
    )
    assert proc.returncode == 0, proc.stderr


def _etcdctl_status(path: Path) -> dict:
    proc = subprocess.run(
        [find_binary("etcdctl"), "snapshot", "status", str(path), "-w", "json"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "ETCDCTL_API": "3"},
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _as_etcdctl_prints(st) -> dict:
    return {"hash": st.hash, "revision": st.revision, "totalKey": st.total_keys, "totalSize": st.total_size}


def _mvcckv_cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", "mvcckv", *map(str, args)],
                          capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def from_etcd(etcd_binary, tmp_path_factory):
    """A snapshot saved from a real etcd after the workload, and what its
    clients saw."""
    root = tmp_path_factory.mktemp("from-etcd")
    with EtcdProcess(binary=etcd_binary) as etcd:
        with etcd.channel() as channel:
            _populate(channel)
            _secure(channel)
            seen = _observe(channel)
        _etcdctl_snapshot(etcd.endpoint, root / "etcd.db")
    _check_observation(seen)
    return root / "etcd.db", seen


def test_etcd_snapshot_status_is_etcdctls(from_etcd):
    snap, _ = from_etcd
    assert _as_etcdctl_prints(status(snap)) == _etcdctl_status(snap)


def test_etcd_snapshot_into_an_lmdb_data_dir(from_etcd, tmp_path):
    snap, seen = from_etcd
    st = restore(snap, tmp_path / "data")
    assert (st.revision, st.hash) == (_etcdctl_status(snap)["revision"], _etcdctl_status(snap)["hash"])
    with MvcckvProcess(tmp_path / "data", log_path=tmp_path / "mvcckv.log") as server:
        with server.channel() as channel:
            assert _observe(channel) == seen


def test_etcd_snapshot_into_postgresql(from_etcd, postgres, tmp_path):
    snap, seen = from_etcd
    dsn = postgres.dsn() + "?options=-csearch_path%3Dfrom_etcd"
    out = _mvcckv_cli("snapshot", "restore", snap, "--backend", dsn).stdout
    assert f"revision {seen['hashkv'][2]}" in out
    with MvcckvProcess(tmp_path / "unused", log_path=tmp_path / "mvcckv.log",
                       extra_args=("--backend", dsn)) as server:
        with server.channel() as channel:
            assert _observe(channel) == seen
    # Saved back out of PostgreSQL without a server, it is etcd's file again.
    _mvcckv_cli("snapshot", "save", "--backend", dsn, tmp_path / "back.db")
    back = _etcdctl_status(tmp_path / "back.db")
    assert back == _as_etcdctl_prints(status(tmp_path / "back.db"))
    assert back["revision"] == seen["hashkv"][2]
    # A schema that holds data is not overwritten.
    proc = subprocess.run(
        [sys.executable, "-m", "mvcckv", "snapshot", "restore", str(snap), "--backend", dsn],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 1 and "already holds data" in proc.stderr


@pytest.mark.parametrize("source_engine", ["lmdb", "pg"])
def test_mvcckv_snapshot_into_a_real_etcd(source_engine, etcd_binary, request, tmp_path):
    extra = ()
    if source_engine == "pg":
        extra = ("--backend", request.getfixturevalue("postgres").dsn() + "?options=-csearch_path%3Dto_etcd")
    with MvcckvProcess(tmp_path / "src", log_path=tmp_path / "mvcckv.log", extra_args=extra) as server:
        with server.channel() as channel:
            _populate(channel)
            _secure(channel)
            seen = _observe(channel)
        _etcdctl_snapshot(server.endpoint, tmp_path / "snap.db")
    _check_observation(seen)
    assert _etcdctl_status(tmp_path / "snap.db") == _as_etcdctl_prints(status(tmp_path / "snap.db"))

    etcd = EtcdProcess(binary=etcd_binary)
    etcd.workdir = tmp_path / "etcd"
    peer = "http://127.0.0.1:2380"  # recorded in the restored membership only
    proc = subprocess.run(
        [find_binary("etcdctl"), "snapshot", "restore", str(tmp_path / "snap.db"),
         "--data-dir", str(etcd.workdir / "data"), "--name", "default",
         "--initial-cluster", f"default={peer}", "--initial-advertise-peer-urls", peer],
        capture_output=True, text=True, timeout=120, env={**os.environ, "ETCDCTL_API": "3"},
    )
    assert proc.returncode == 0, proc.stderr
    with etcd:
        with etcd.channel() as channel:
            assert _observe(channel) == seen


def test_python_etcd3_snapshot_against_mvcckv_serve(mvcckv_server, tmp_path):
    """python-etcd3's own snapshot test (save through the API, then
    ``etcdctl snapshot status``).  Its generated protobuf code predates
    protobuf 4, so it runs with the pure-Python protobuf in a child."""
    script = textwrap.dedent(f"""
        import etcd3
        client = etcd3.client(host="127.0.0.1", port={mvcckv_server.port})
        client.put("python-etcd3", "snapshot")
        with open({str(tmp_path / "snap.db")!r}, "wb") as f:
            client.snapshot(f)
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": "python"},
    )
    assert proc.returncode == 0, proc.stderr
    st = _etcdctl_status(tmp_path / "snap.db")
    assert st == _as_etcdctl_prints(status(tmp_path / "snap.db"))
    assert st["revision"] == 2

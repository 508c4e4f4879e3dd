"""The harness against real etcd 3.4: processes, etcdctl, raw gRPC, normalize.

test_etcdctl_json_shapes pins the etcdctl JSON shapes recorded in
docs/etcdctl-json.md; interop tests hold mvcckv to the same shapes.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

import grpc
import pytest

from harness import (
    EtcdctlError,
    EtcdProcess,
    MvcckvProcess,
    ServerProcess,
    ServerStartError,
    as_int64,
    call,
    decode,
    free_port,
    grpc_channel,
    kvs,
    normalize,
    pb_decode,
    pb_encode,
    stub,
)

COMPACTED = "etcdserver: mvcc: required revision has been compacted"
FUTURE = "etcdserver: mvcc: required revision is a future revision"


def _pgrep(pattern: str) -> str:
    """pgrep -af output for processes whose command line contains pattern."""
    found = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True)
    return found.stdout.strip()


def shape(obj):
    """Keys and value types of a JSON document: what etcdctl-json.md records."""
    if isinstance(obj, dict):
        return {k: shape(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [shape(obj[0])] if obj else []
    return type(obj).__name__


HEADER = {"cluster_id": "int", "member_id": "int", "revision": "int", "raft_term": "int"}
KV = {"key": "str", "create_revision": "int", "mod_revision": "int", "version": "int",
      "value": "str"}


# --- helpers without a server -------------------------------------------------


def test_free_port_is_bindable_on_loopback():
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


@pytest.mark.parametrize("fields, wire", [
    ([(1, b"foo")], b"\n\x03foo"),                            # RangeRequest{key: "foo"}
    ([(1, b"a"), (2, b"b"), (3, 5)], b"\n\x01a\x12\x01b\x18\x05"),
    ([(4, 300)], b"\x20\xac\x02"),
    ([(8, True)], b"\x40\x01"),
    ([(3, -1)], b"\x18" + b"\xff" * 9 + b"\x01"),            # int64 -1: ten bytes
    ([(1, pb_encode((3, 7)))], b"\n\x02\x18\x07"),            # nested message
])
def test_pb_encode_and_decode(fields, wire):
    assert pb_encode(*fields) == wire
    decoded = pb_decode(wire)
    for number, value in fields:
        got = decoded[number].pop(0)
        if isinstance(value, (bool, int)):
            assert as_int64(got) == value
        else:
            assert got == value


def test_decode_and_kvs_fill_etcdctl_omissions():
    response = {"header": {"revision": 3},
                "kvs": [{"key": "Zm9v", "create_revision": 2, "mod_revision": 3, "version": 2}]}
    assert kvs(response) == [{"key": b"foo", "create_revision": 2, "mod_revision": 3,
                              "version": 2, "value": b"", "lease": 0}]
    assert decode({"keys": ["YQ==", "Yg=="], "id": 7}) == {"keys": [b"a", b"b"], "id": 7}


def test_normalize_strips_only_volatile_fields():
    status = {"header": {"cluster_id": 1, "member_id": 2, "revision": 5, "raft_term": 2},
              "version": "3.4.23", "dbSize": 20480, "leader": 2, "raftIndex": 9,
              "raftTerm": 2, "raftAppliedIndex": 9, "dbSizeInUse": 16384,
              "errors": ["memberID:2 alarm:NOSPACE "]}
    assert normalize(status) == {"header": {"revision": 5},
                                 "errors": ["memberID:<id> alarm:NOSPACE "]}
    kv = {"key": b"k", "version": 3, "value": b"v"}
    assert normalize({"header": {"revision": 4, "member_id": 9}, "kvs": [kv]}) == \
        {"header": {"revision": 4}, "kvs": [kv]}
    hashkv = {"header": {"revision": 5}, "hash": 123, "compact_revision": -1}
    assert normalize(hashkv) == {"header": {"revision": 5}, "compact_revision": -1}
    assert normalize(hashkv, keep={"hash"}) == hashkv


def test_normalize_accepts_protobuf_messages():
    from google.protobuf import descriptor_pb2

    message = descriptor_pb2.FileDescriptorProto(name="x.proto", dependency=["a", "b"])
    message.message_type.add(name="M")
    assert normalize(message) == {"name": "x.proto", "dependency": ["a", "b"],
                                  "message_type": [{"name": "M"}]}


def test_mvcckv_command_line(tmp_path):
    server = MvcckvProcess(tmp_path / "data", extra_args=["--flag"])
    server.port = 12345
    assert server._command() == [
        sys.executable, "-m", "mvcckv", "serve",
        "--data-dir", str(tmp_path / "data"),
        "--listen-client-urls", "http://127.0.0.1:12345",
        "--advertise-client-urls", "http://127.0.0.1:12345",
        "--flag",
    ]


class _StubbornServer(ServerProcess):
    """A gRPC server (no services) that ignores SIGTERM."""

    name = "stubborn"

    def _command(self):
        script = textwrap.dedent(f"""
            import signal, concurrent.futures, grpc
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            server = grpc.server(concurrent.futures.ThreadPoolExecutor(1))
            server.add_insecure_port("127.0.0.1:{self.port}")
            server.start()
            server.wait_for_termination()
        """)
        return [sys.executable, "-c", script]


def test_stop_escalates_to_sigkill():
    server = _StubbornServer(stop_timeout=0.5).start()
    proc, workdir = server._proc, server.workdir
    server.stop()
    assert proc.returncode == -9
    assert not workdir.exists()


# --- real etcd -----------------------------------------------------------------


def test_etcd_start_stop_leaves_nothing_behind(etcd_binary):
    server = EtcdProcess(binary=etcd_binary).start()
    workdir, pid = server.workdir, server.pid
    assert server.alive()
    assert str(pid) in _pgrep(str(workdir))
    assert server.etcdctl("endpoint", "health")[0]["health"] is True
    server.stop()
    assert not server.alive()
    assert _pgrep(str(workdir)) == ""
    assert not workdir.exists()
    server.stop()  # idempotent


def test_failed_start_shows_the_log(etcd_binary):
    server = EtcdProcess(binary=etcd_binary, extra_args=["--no-such-flag"])
    with pytest.raises(ServerStartError, match="flag provided but not defined"):
        server.start()
    assert not server.alive()
    assert not server.workdir.exists()


def test_start_retries_when_a_port_is_taken(etcd_binary):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        clashes = [taken.getsockname()[1]]

        class Clashing(EtcdProcess):
            def _pick_ports(self):
                super()._pick_ports()
                if clashes:
                    self.peer_port = clashes.pop()

        with Clashing(binary=etcd_binary) as server:
            assert server.peer_port != taken.getsockname()[1]
            assert "address already in use" in server.log_text()
            assert server.etcdctl("endpoint", "health")[0]["health"] is True


def test_restart_keeps_data_and_port(etcd_binary):
    with EtcdProcess(binary=etcd_binary) as server:
        server.etcdctl("put", "k", "v1")
        endpoint = server.endpoint
        server.restart()
        assert server.endpoint == endpoint
        assert kvs(server.etcdctl("get", "k"))[0]["value"] == b"v1"
        server.restart(kill=True)
        assert kvs(server.etcdctl("get", "k"))[0]["value"] == b"v1"


def test_etcdctl_put_get_binary_value(etcd):
    value = bytes(range(256)) + b"\n"
    put = etcd.etcdctl("put", "harness/bin", input=value)  # from stdin: NUL is fine
    got = etcd.etcdctl("get", "harness/bin")
    [kv] = kvs(got)
    assert kv["key"] == b"harness/bin"
    assert kv["value"] == value  # stdin is taken verbatim, trailing newline included
    assert kv["mod_revision"] == kv["create_revision"] == put["header"]["revision"]
    assert kv["version"] == 1 and kv["lease"] == 0
    assert isinstance(got["header"]["revision"], int)
    assert got["header"]["cluster_id"] >= 0 and got["count"] == 1


def test_etcdctl_error_for_future_revision(etcd):
    current = etcd.etcdctl("get", "harness/none")["header"]["revision"]
    with pytest.raises(EtcdctlError) as err:
        etcd.etcdctl("get", "foo", "--rev", str(current + 100))
    assert err.value.message == FUTURE
    assert err.value.returncode == 1
    assert FUTURE in str(err.value)
    failed = etcd.etcdctl("get", "foo", "--rev", str(current + 100), check=False)
    assert failed.returncode == 1 and b"Error: " + FUTURE.encode() in failed.stderr


def test_etcdctl_error_for_compacted_revision(etcd_fresh):
    for i in range(3):
        etcd_fresh.etcdctl("put", "foo", f"v{i}")  # revisions 2, 3, 4
    done = etcd_fresh.etcdctl("compaction", "3", json=False)
    assert done.stdout == b"compacted revision 3\n"
    with pytest.raises(EtcdctlError) as err:
        etcd_fresh.etcdctl("get", "foo", "--rev", "2")
    assert err.value.message == COMPACTED
    assert kvs(etcd_fresh.etcdctl("get", "foo", "--rev", "3"))[0]["value"] == b"v1"
    with pytest.raises(EtcdctlError) as err:
        etcd_fresh.etcdctl("compaction", "3", json=False)
    assert err.value.message == COMPACTED


def test_raw_grpc_range(etcd):
    etcd.etcdctl("put", "foo", "bar")
    expected = etcd.etcdctl("get", "foo")
    with grpc_channel(etcd.endpoint) as channel:
        reply = call(channel, "/etcdserverpb.KV/Range", b"\n\x03foo")
        future = call(channel, "/etcdserverpb.KV/Range", pb_encode((1, b"foo"), (4, 1 << 40)))
    assert reply.ok, reply
    response = pb_decode(reply.data)
    header = pb_decode(response[1][0])
    assert header[1] == [expected["header"]["cluster_id"]]
    assert header[2] == [expected["header"]["member_id"]]
    assert header[3][0] >= expected["header"]["revision"]
    assert header[4] == [expected["header"]["raft_term"]]
    kv = pb_decode(response[2][0])
    assert kv[1] == [b"foo"] and kv[5] == [b"bar"]
    assert response[4] == [1]  # count
    assert (future.code, future.details, future.data) == \
        (grpc.StatusCode.OUT_OF_RANGE, FUTURE, None)


def test_typed_stubs_and_normalize_of_messages(etcd):
    rpc_pb2 = pytest.importorskip("mvcckv.pb.rpc_pb2")
    with etcd.channel() as channel:
        status = stub(channel, "Maintenance").Status(rpc_pb2.StatusRequest(), timeout=10)
        etcd.etcdctl("put", "harness/typed", "v")
        got = stub(channel).Range(rpc_pb2.RangeRequest(key=b"harness/typed"), timeout=10)
    assert status.version.startswith("3.") and status.header.member_id == status.leader
    assert normalize(status) == {"header": {"revision": status.header.revision}}
    revision = got.header.revision
    assert normalize(got) == {
        "header": {"revision": revision},
        "kvs": [{"key": b"harness/typed", "create_revision": revision,
                 "mod_revision": revision, "version": 1, "value": b"v"}],
        "count": 1,
    }


def test_normalize_makes_two_etcds_agree(etcd_binary, etcd_fresh):
    """Same history on two etcds with different ports and member IDs."""
    with EtcdProcess(binary=etcd_binary) as other:
        answers = []
        for server in (etcd_fresh, other):
            server.etcdctl("put", "k", "v")
            answers.append([
                server.etcdctl("get", "k"),
                server.etcdctl("endpoint", "status"),
                server.etcdctl("endpoint", "hashkv"),
                server.etcdctl("member", "list"),
            ])
    assert answers[0] != answers[1]
    assert normalize(answers[0]) == normalize(answers[1])
    hashes = [normalize(a[2], keep={"hash"}) for a in answers]
    assert hashes[0] == hashes[1]  # HashKV depends on the history only


def test_etcdctl_json_shapes(etcd_fresh):
    """etcd 3.4's etcdctl -w json output; kept in docs/etcdctl-json.md."""
    ctl = etcd_fresh.etcdctl
    assert shape(ctl("put", "foo", "bar")) == {"header": HEADER}
    assert shape(ctl("put", "--prev-kv", "foo", "baz")) == {"header": HEADER, "prev_kv": KV}
    assert shape(ctl("get", "foo")) == {"header": HEADER, "kvs": [KV], "count": "int"}
    assert shape(ctl("get", "missing")) == {"header": HEADER}
    assert shape(ctl("del", "--prev-kv", "foo")) == \
        {"header": HEADER, "deleted": "int", "prev_kvs": [KV]}
    assert shape(ctl("del", "--prev-kv", "missing")) == {"header": HEADER}

    ctl("put", "foo", "bar")
    ctl("put", "c", "3")
    inner = {"revision": "int"}
    txn = ctl("txn", input='value("foo") = "bar"\n\nput a 1\nget foo\ndel c\n\nput b 2\n\n')
    assert shape(txn) == {"header": HEADER, "succeeded": "bool", "responses": [
        {"Response": {"ResponsePut": {"header": inner}}}]}
    assert [shape(r) for r in txn["responses"]] == [
        {"Response": {"ResponsePut": {"header": inner}}},
        {"Response": {"ResponseRange": {"header": inner, "kvs": [KV], "count": "int"}}},
        {"Response": {"ResponseDeleteRange": {"header": inner, "deleted": "int"}}},
    ]
    failed = ctl("txn", input='value("foo") = "x"\n\nput a 1\n\nput b 2\n\n')
    assert shape(failed) == {"header": HEADER, "responses": [
        {"Response": {"ResponsePut": {"header": inner}}}]}

    assert shape(ctl("endpoint", "status")) == [{"Endpoint": "str", "Status": {
        "header": HEADER, "version": "str", "dbSize": "int", "leader": "int",
        "raftIndex": "int", "raftTerm": "int", "raftAppliedIndex": "int",
        "dbSizeInUse": "int"}}]
    assert shape(ctl("endpoint", "hashkv")) == [{"Endpoint": "str", "HashKV": {
        "header": HEADER, "hash": "int", "compact_revision": "int"}}]
    assert shape(ctl("endpoint", "health")) == [
        {"endpoint": "str", "health": "bool", "took": "str"}]
    assert shape(ctl("member", "list")) == {
        "header": {"cluster_id": "int", "member_id": "int", "raft_term": "int"},
        "members": [{"ID": "int", "name": "str", "peerURLs": ["str"],
                     "clientURLs": ["str"]}]}
    assert ctl("alarm", "list") == {}
    assert shape(ctl("lease", "grant", "60")) == {
        **HEADER, "ID": "int", "TTL": "int", "Error": "str"}

    compaction = ctl("compaction", "2", json=False)
    assert compaction.stdout == b"compacted revision 2\n"  # -w json is ignored
    assert shape(ctl("endpoint", "hashkv")) == [{"Endpoint": "str", "HashKV": {
        "header": HEADER, "hash": "int", "compact_revision": "int"}}]
    with pytest.raises(EtcdctlError, match="not JSON"):
        ctl("compaction", "3")

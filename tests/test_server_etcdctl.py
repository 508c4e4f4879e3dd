"""Interop: the real etcdctl (3.4, ``ETCDCTL_API=3``) against ``mvcckv serve``.

Every test runs on both engines (ids ``[lmdb]`` and ``[pg]``: the
``engine`` fixture of conftest.py), with the same expectations: etcdctl
must not be able to tell them apart.  Output shapes are etcdctl's
``-w json`` as recorded in docs/etcdctl-json.md; error texts are etcd's,
read after ``Error: `` on stderr.  One server per engine is shared by the
module, so each test uses keys of its own (all below ``~``, which the
--from-key tests own); tests that compact, fill the quota, raise alarms or
restart get their own server (on PostgreSQL: a schema of their own).

etcdctl 3.4 has no ``--count-only`` or min/max revision flags;
test_server_grpc.py covers those fields.
"""

from __future__ import annotations

import base64

import pytest

from harness import EtcdctlError, kvs, stub
from mvcckv.pb import rpc_pb2 as pb

MEMBER_ID = 0x8E9E05C52164694D
CLUSTER_ID = 0xCDF818194E3A8C32
COMPACTED = "etcdserver: mvcc: required revision has been compacted"
FUTURE = "etcdserver: mvcc: required revision is a future revision"


@pytest.fixture(scope="module")
def srv(engine_server_module):
    return engine_server_module


@pytest.fixture
def own(engine, tmp_path):
    """A server of the test's own, started with extra flags by the test."""
    servers = []

    def start(*args):
        server = engine.process(tmp_path / "data", log_path=tmp_path / "mvcckv.log", extra_args=args)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


def ctl(server, *args, **kwargs):
    return server.etcdctl(*args, **kwargs)


def error_of(server, *args, **kwargs) -> str:
    with pytest.raises(EtcdctlError) as info:
        server.etcdctl(*args, **kwargs)
    return info.value.message


def values(resp) -> list[tuple[bytes, bytes]]:
    return [(kv["key"], kv["value"]) for kv in kvs(resp)]


def header_of(resp) -> dict:
    h = resp["header"]
    assert (h["cluster_id"], h["member_id"], h["raft_term"]) == (CLUSTER_ID, MEMBER_ID, 2)
    return h


# --- put / get ------------------------------------------------------------------


def test_put_and_get(srv):
    rev = header_of(ctl(srv, "put", "pg/k", "v1"))["revision"]
    resp = ctl(srv, "get", "pg/k")
    assert header_of(resp)["revision"] == rev
    assert resp["count"] == 1
    assert kvs(resp) == [{"key": b"pg/k", "create_revision": rev, "mod_revision": rev, "version": 1,
                          "value": b"v1", "lease": 0}]
    ctl(srv, "put", "pg/k", "v2")
    (kv,) = kvs(ctl(srv, "get", "pg/k"))
    assert (kv["value"], kv["version"], kv["create_revision"], kv["mod_revision"]) == (b"v2", 2, rev, rev + 1)
    missing = ctl(srv, "get", "pg/none")
    assert "kvs" not in missing and "count" not in missing


def test_put_prev_kv_and_value_from_stdin(srv):
    ctl(srv, "put", "pp/k", "old")
    resp = ctl(srv, "put", "--prev-kv", "pp/k", "new")
    assert resp["prev_kv"]["value"] == base64.b64encode(b"old").decode()
    assert "prev_kv" not in ctl(srv, "put", "--prev-kv", "pp/fresh", "x")
    ctl(srv, "put", "pp/bin", input=b"a\0b\n")
    assert values(ctl(srv, "get", "pp/bin")) == [(b"pp/bin", b"a\0b\n")]


def test_get_prefix_range_and_limit(srv):
    for k in ["gr/a", "gr/b", "gr/c", "gs"]:
        ctl(srv, "put", k, k.upper())
    assert [k for k, _ in values(ctl(srv, "get", "--prefix", "gr/"))] == [b"gr/a", b"gr/b", b"gr/c"]
    assert [k for k, _ in values(ctl(srv, "get", "gr/a", "gr/c"))] == [b"gr/a", b"gr/b"]
    assert "kvs" not in ctl(srv, "get", "gr/c", "gr/a")  # end before start: empty, no error
    resp = ctl(srv, "get", "--prefix", "--limit", "2", "gr/")
    assert ([k for k, _ in values(resp)], resp["more"], resp["count"]) == ([b"gr/a", b"gr/b"], True, 3)
    resp = ctl(srv, "get", "--prefix", "--limit", "3", "gr/")
    assert "more" not in resp and resp["count"] == 3


def test_get_from_key(srv):
    for k in ["~fk/a", "~fk/b", "~fk/c"]:
        ctl(srv, "put", k, "v")
    resp = ctl(srv, "get", "--from-key", "~fk/b")
    assert [k for k, _ in values(resp)] == [b"~fk/b", b"~fk/c"]
    resp = ctl(srv, "get", "--from-key", "--keys-only", "--limit", "1", "~fk/")
    assert (values(resp), resp["more"], resp["count"]) == ([(b"~fk/a", b"")], True, 3)


def test_get_at_a_revision(srv):
    first = header_of(ctl(srv, "put", "rev/k", "v1"))["revision"]
    ctl(srv, "put", "rev/k", "v2")
    ctl(srv, "del", "rev/k")
    resp = ctl(srv, "get", "--rev", str(first), "rev/k")
    assert values(resp) == [(b"rev/k", b"v1")]
    assert header_of(resp)["revision"] == first + 2  # the current revision, not the one read
    assert "kvs" not in ctl(srv, "get", "rev/k")
    assert error_of(srv, "get", "--rev", str(first + 1000), "rev/k") == FUTURE


def test_get_sorted(srv):
    # key, value, and the order of writes (so create/mod/version differ)
    for key, value in [("srt/b", "2"), ("srt/a", "3"), ("srt/c", "1"), ("srt/a", "4")]:
        ctl(srv, "put", key, value)

    def keys(*flags):
        return [k.decode()[4:] for k, _ in values(ctl(srv, "get", "--prefix", "srt/", *flags))]

    assert keys() == ["a", "b", "c"]
    assert keys("--order", "DESCEND") == ["c", "b", "a"]
    assert keys("--sort-by", "VALUE") == ["c", "b", "a"]  # by value, ascending by default
    assert keys("--sort-by", "VALUE", "--order", "DESCEND") == ["a", "b", "c"]
    assert keys("--sort-by", "CREATE") == ["b", "a", "c"]
    assert keys("--sort-by", "MODIFY") == ["b", "c", "a"]
    assert keys("--sort-by", "MODIFY", "--order", "DESCEND") == ["a", "c", "b"]
    assert keys("--sort-by", "VERSION", "--order", "DESCEND") == ["a", "b", "c"]
    assert keys("--sort-by", "KEY", "--order", "DESCEND", "--limit", "2") == ["c", "b"]


def test_get_keys_only_print_value_only_and_serializable(srv):
    ctl(srv, "put", "ko/a", "va")
    ctl(srv, "put", "ko/b", "vb")
    resp = ctl(srv, "get", "--prefix", "--keys-only", "ko/")
    assert values(resp) == [(b"ko/a", b""), (b"ko/b", b"")]
    assert kvs(resp)[0]["version"] == 1
    out = ctl(srv, "get", "--prefix", "--print-value-only", "ko/", json=False)
    assert (out.returncode, out.stdout) == (0, b"va\nvb\n")
    out = ctl(srv, "get", "--prefix", "ko/", json=False)
    assert out.stdout == b"ko/a\nva\nko/b\nvb\n"
    resp = ctl(srv, "get", "--consistency", "s", "--prefix", "ko/")
    assert values(resp) == [(b"ko/a", b"va"), (b"ko/b", b"vb")]


# --- del ---------------------------------------------------------------------------


def test_del(srv):
    for k in ["del/a", "del/b", "del/c", "del/d", "dem"]:
        ctl(srv, "put", k, "v-" + k)
    assert ctl(srv, "del", "del/a")["deleted"] == 1
    assert "deleted" not in ctl(srv, "del", "del/a")  # nothing left to delete
    resp = ctl(srv, "del", "--prev-kv", "del/b", "del/d")
    assert resp["deleted"] == 2
    assert values(resp) == [(b"del/b", b"v-del/b"), (b"del/c", b"v-del/c")]
    assert ctl(srv, "del", "--prefix", "del/")["deleted"] == 1
    assert values(ctl(srv, "get", "--prefix", "de")) == [(b"dem", b"v-dem")]


def test_del_from_key(srv):
    for k in ["~fkd/a", "~fkd/b", "~fkd/c"]:
        ctl(srv, "put", k, "v")
    rev = header_of(ctl(srv, "get", "~fkd/a"))["revision"]
    resp = ctl(srv, "del", "--from-key", "--prev-kv", "~fkd/b")
    assert [k for k, _ in values(resp)] == [b"~fkd/b", b"~fkd/c"]
    assert header_of(resp)["revision"] == rev + 1  # one revision for the whole range
    assert [k for k, _ in values(ctl(srv, "get", "--prefix", "~fkd/"))] == [b"~fkd/a"]


# --- txn ------------------------------------------------------------------------------


TXN = """\
value("tx/k") = "yes"
mod("tx/k") > "0"

put tx/then "then-value"
get tx/k

put tx/else "else-value"
del tx/k

"""


def test_txn_success_branch(srv):
    rev = header_of(ctl(srv, "put", "tx/k", "yes"))["revision"]
    resp = ctl(srv, "txn", input=TXN)
    assert resp["succeeded"] is True
    assert header_of(resp)["revision"] == rev + 1
    put_r, get_r = resp["responses"]
    assert put_r["Response"]["ResponsePut"]["header"] == {"revision": rev + 1}
    rng = get_r["Response"]["ResponseRange"]
    assert rng["header"] == {"revision": rev + 1}
    assert values(rng) == [(b"tx/k", b"yes")]
    assert values(ctl(srv, "get", "tx/then")) == [(b"tx/then", b"then-value")]


def test_txn_failure_branch(srv):
    ctl(srv, "put", "tx/k", "no")
    resp = ctl(srv, "txn", input=TXN)
    assert "succeeded" not in resp  # false is left out
    put_r, del_r = resp["responses"]
    assert "ResponsePut" in put_r["Response"]
    assert del_r["Response"]["ResponseDeleteRange"]["deleted"] == 1
    assert values(ctl(srv, "get", "tx/else")) == [(b"tx/else", b"else-value")]
    assert "kvs" not in ctl(srv, "get", "tx/k")


def test_txn_compares_on_versions_and_empty_branches(srv):
    resp = ctl(srv, "txn", input='ver("tx/absent") = "0"\nc("tx/absent") = "0"\n\n\n\n')
    assert resp["succeeded"] is True and "responses" not in resp
    resp = ctl(srv, "txn", input='val("tx/absent") = ""\n\n\nget tx/absent\n\n')
    assert "succeeded" not in resp  # VALUE compare on a missing key is false


def test_txn_errors(srv):
    dup = "\nput tx/d 1\nput tx/d 2\n\n\n"
    assert error_of(srv, "txn", input=dup) == "etcdserver: duplicate key given in txn request"
    assert error_of(srv, "txn", input="\nget tx/k --rev=100000\n\n\n") == FUTURE


# --- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("args", [("put", "", "v"), ("get", ""), ("del", "")])
def test_empty_key(srv, args):
    assert error_of(srv, *args) == "etcdserver: key is not provided"


def test_too_large_value(srv):
    big = b"x" * (1536 * 1024)
    assert error_of(srv, "put", "big/k", input=big) == "etcdserver: request is too large"
    assert "kvs" not in ctl(srv, "get", "big/k")
    ok = b"y" * (1024 * 1024)
    ctl(srv, "put", "big/k", input=ok)
    assert kvs(ctl(srv, "get", "big/k"))[0]["value"] == ok


# --- compaction -------------------------------------------------------------------------


def test_compaction(own):
    srv = own()
    revs = [header_of(ctl(srv, "put", "c/k", f"v{i}"))["revision"] for i in range(6)]  # 2..7
    out = ctl(srv, "compaction", str(revs[2]), json=False)
    assert (out.returncode, out.stdout.decode().strip()) == (0, f"compacted revision {revs[2]}")
    assert values(ctl(srv, "get", "--rev", str(revs[2]), "c/k")) == [(b"c/k", b"v2")]
    assert error_of(srv, "get", "--rev", str(revs[1]), "c/k") == COMPACTED
    assert error_of(srv, "compaction", str(revs[2]), json=False) == COMPACTED
    assert error_of(srv, "compaction", str(revs[-1] + 1), json=False) == FUTURE
    assert error_of(srv, "get", "--rev", str(revs[-1] + 1), "c/k") == FUTURE
    out = ctl(srv, "compaction", "--physical", str(revs[4]), json=False)
    assert out.stdout.decode().strip() == f"compacted revision {revs[4]}"
    assert error_of(srv, "get", "--rev", str(revs[3]), "c/k") == COMPACTED
    (hkv,) = ctl(srv, "endpoint", "hashkv")
    assert hkv["HashKV"]["compact_revision"] == revs[4]
    # Compaction state survives a restart.
    srv.restart()
    assert error_of(srv, "get", "--rev", str(revs[3]), "c/k") == COMPACTED
    assert values(ctl(srv, "get", "c/k")) == [(b"c/k", b"v5")]


# --- endpoint, member, alarm, defrag -------------------------------------------------------


def test_endpoint_status(srv):
    rev = header_of(ctl(srv, "put", "st/k", "v"))["revision"]
    (entry,) = ctl(srv, "endpoint", "status")
    assert entry["Endpoint"] == srv.endpoint
    st = entry["Status"]
    assert header_of(st)["revision"] >= rev
    assert st["version"] == "3.6.14"
    assert st["leader"] == MEMBER_ID
    assert st["raftTerm"] == 2
    assert st["raftIndex"] >= st["raftAppliedIndex"] >= 1
    assert 0 < st["dbSizeInUse"] <= st["dbSize"]
    assert "errors" not in st
    table = ctl(srv, "endpoint", "status", "-w", "table", json=False).stdout.decode()
    assert "8e9e05c52164694d" in table and "true" in table  # ID, IS LEADER


def test_endpoint_health(srv):
    (entry,) = ctl(srv, "endpoint", "health")
    assert (entry["endpoint"], entry["health"]) == (srv.endpoint, True)


def test_endpoint_hashkv(srv):
    ctl(srv, "put", "hk/k", "v")
    (a,) = ctl(srv, "endpoint", "hashkv")
    (b,) = ctl(srv, "endpoint", "hashkv")
    assert a["HashKV"]["hash"] == b["HashKV"]["hash"]
    assert a["HashKV"]["compact_revision"] == -1
    rev = header_of(a["HashKV"])["revision"]
    ctl(srv, "put", "hk/k", "w")
    (c,) = ctl(srv, "endpoint", "hashkv")
    (d,) = ctl(srv, "endpoint", "hashkv", "--rev", str(rev))
    assert c["HashKV"]["hash"] != a["HashKV"]["hash"]
    assert d["HashKV"]["hash"] == a["HashKV"]["hash"]


def test_hashkv_matches_real_etcd(own, etcd_fresh):
    srv = own()
    script = [("put", "a", "1"), ("put", "b", "2"), ("put", "a", "3"), ("del", "b"), ("put", "c", "4")]
    for server in (srv, etcd_fresh):
        for cmd in script:
            server.etcdctl(*cmd)
    ours = ctl(srv, "endpoint", "hashkv")[0]["HashKV"]
    theirs = etcd_fresh.etcdctl("endpoint", "hashkv")[0]["HashKV"]
    assert (ours["hash"], ours["header"]["revision"]) == (theirs["hash"], theirs["header"]["revision"])
    for rev in (2, 4):
        ours = ctl(srv, "endpoint", "hashkv", "--rev", str(rev))[0]["HashKV"]["hash"]
        theirs = etcd_fresh.etcdctl("endpoint", "hashkv", "--rev", str(rev))[0]["HashKV"]["hash"]
        assert ours == theirs


def test_member_list(srv):
    resp = ctl(srv, "member", "list")
    assert "revision" not in resp["header"]
    assert resp["members"] == [{"ID": MEMBER_ID, "name": "default", "peerURLs": ["http://localhost:2380"],
                                "clientURLs": [srv.client_url]}]
    table = ctl(srv, "member", "list", "-w", "table", json=False).stdout.decode()
    assert "started" in table and "unstarted" not in table


def test_alarm_list_and_disarm(own):
    srv = own()
    assert ctl(srv, "alarm", "list").get("alarms") is None
    with srv.channel() as ch:
        stub(ch, "Maintenance").Alarm(pb.AlarmRequest(action=pb.AlarmRequest.ACTIVATE, memberID=MEMBER_ID,
                                                      alarm=pb.NOSPACE), timeout=10)
    assert ctl(srv, "alarm", "list")["alarms"] == [{"memberID": MEMBER_ID, "alarm": 1}]
    st = ctl(srv, "endpoint", "status")[0]["Status"]
    assert st["errors"] == [f"memberID:{MEMBER_ID} alarm:NOSPACE "]
    assert error_of(srv, "put", "k", "v") == "etcdserver: mvcc: database space exceeded"
    assert ctl(srv, "alarm", "disarm")["alarms"] == [{"memberID": MEMBER_ID, "alarm": 1}]
    assert ctl(srv, "alarm", "list").get("alarms") is None
    ctl(srv, "put", "k", "v")


def test_quota_exceeded(own):
    srv = own("--quota-backend-bytes", "1")
    assert error_of(srv, "put", "k", "v") == "etcdserver: mvcc: database space exceeded"
    assert ctl(srv, "alarm", "list")["alarms"] == [{"memberID": MEMBER_ID, "alarm": 1}]
    assert "errors" in ctl(srv, "endpoint", "status")[0]["Status"]
    ctl(srv, "get", "k")  # reads still work
    ctl(srv, "del", "k")


def test_defrag(srv):
    for i in range(20):
        ctl(srv, "put", f"df/{i}", "x" * 1000)
    ctl(srv, "del", "--prefix", "df/")
    out = ctl(srv, "defrag", json=False)
    assert (out.returncode, out.stdout.decode().strip()) == (0, f"Finished defragmenting etcd member[{srv.endpoint}]")
    st = ctl(srv, "endpoint", "status")[0]["Status"]
    assert 0 < st["dbSizeInUse"] <= st["dbSize"]
    assert "kvs" not in ctl(srv, "get", "--prefix", "df/")


# --- restart ------------------------------------------------------------------------------


def test_restart_keeps_data_revisions_and_ids(own):
    srv = own()
    ctl(srv, "put", "r/a", "1")
    ctl(srv, "put", "r/b", "2")
    rev = header_of(ctl(srv, "del", "r/a"))["revision"]
    srv.restart()
    resp = ctl(srv, "get", "--prefix", "r/")
    assert values(resp) == [(b"r/b", b"2")]
    assert header_of(resp)["revision"] == rev
    assert values(ctl(srv, "get", "--rev", str(rev - 1), "r/a")) == [(b"r/a", b"1")]
    assert header_of(ctl(srv, "put", "r/c", "3"))["revision"] == rev + 1
    # A hard kill loses nothing acknowledged either.
    srv.restart(kill=True)
    assert [k for k, _ in values(ctl(srv, "get", "--prefix", "r/"))] == [b"r/b", b"r/c"]

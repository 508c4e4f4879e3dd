"""A real client of the JSON gateway: etcd3gw (OpenStack's etcd client)
against ``mvcckv serve --listen-client-http-urls``, end to end: version
discovery, put/get/prefix/delete/replace/create, transactions, leases,
locks, watches and status.  etcd3gw reads etcd's JSON exactly as etcd
writes it (``"deleted"`` present only when something was deleted,
``"succeeded"`` only when true, base64 keys), so every call checks the
gateway's field names and omissions as well as the semantics.  Runs on
both engines (LMDB and PostgreSQL)."""

from __future__ import annotations

import threading

import pytest
from etcd3gw.client import Etcd3Client

from http_harness import HttpMvcckv, request


@pytest.fixture(scope="module")
def served(engine, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"etcd3gw-{engine.name}")
    backend = engine.new_backend()
    extra = ("--backend", backend) if backend else ()
    with HttpMvcckv(root / "data", log_path=root / "mvcckv.log", extra_args=extra) as server:
        gw = Etcd3Client(host="127.0.0.1", port=server.http_port, timeout=10)
        yield server, gw
        gw.session.close()


@pytest.fixture
def client(served):
    return served[1]


def test_discovers_v3_and_reads_status_and_members(client):
    assert client.api_path == "/v3/"
    status = client.status()
    assert status["version"] == "3.6.14"
    assert int(status["header"]["revision"]) >= 1
    members = client.members()
    assert len(members) == 1 and members[0]["name"] == "default"
    assert members[0]["clientURLs"]


def test_put_get_prefix_delete(client):
    assert client.put("gw/a", "1") is True
    assert client.put("gw/b", b"2") is True
    assert client.get("gw/a") == [b"1"]
    assert client.get("gw/none") == []
    [(value, meta)] = client.get("gw/a", metadata=True)
    assert value == b"1" and meta["key"] == b"gw/a" and meta["version"] == "1"
    # get_prefix answers (value, metadata) pairs.
    assert [(v, m["key"]) for v, m in client.get_prefix("gw/")] == [(b"1", b"gw/a"), (b"2", b"gw/b")]
    assert client.delete("gw/a") is True
    # etcd3gw reads "no 'deleted' field" as nothing deleted.
    assert client.delete("gw/a") is False
    assert client.delete_prefix("gw/") is True
    assert client.get_prefix("gw/") == []


def test_create_and_replace_are_compare_and_swap(client):
    assert client.create("cas", "first") is True
    assert client.create("cas", "second") is False
    assert client.get("cas") == [b"first"]
    assert client.replace("cas", "first", "third") is True
    assert client.replace("cas", "first", "fourth") is False
    assert client.get("cas") == [b"third"]


def test_leases_keep_keys_until_revoked(client):
    lease = client.lease(ttl=30)
    assert lease.id > 0
    assert client.put("leased", "v", lease=lease) is True
    assert lease.keys() == [b"leased"]
    assert 0 < lease.ttl() <= 30
    assert lease.refresh() == 30
    assert lease.revoke() is True
    assert client.get("leased") == []
    assert lease.ttl() == -1


def test_lock_excludes_a_second_holder(client):
    first = client.lock("gw-lock", ttl=30)
    second = client.lock("gw-lock", ttl=30)
    assert first.acquire() is True
    assert first.is_acquired() is True
    assert second.acquire() is False
    assert first.release() is True
    assert second.acquire() is True
    assert second.release() is True


def test_watch_sees_puts_and_deletes(client):
    events, cancel = client.watch_prefix("watched/")
    try:
        seen: list = []
        reader = threading.Thread(target=lambda: seen.extend(next(events) for _ in range(2)), daemon=True)
        reader.start()
        # The watch is created when its first answer arrives; wait for the
        # stream to be up by writing until an event comes back.
        client.put("watched/x", "1")
        client.delete("watched/x")
        reader.join(10)
        assert not reader.is_alive(), "no events within 10 s"
    finally:
        cancel()
    assert [e["kv"]["key"] for e in seen] == [b"watched/x", b"watched/x"]
    assert seen[0]["kv"]["value"] == b"1" and seen[0].get("type", "PUT") == "PUT"
    assert seen[1]["type"] == "DELETE"


def test_watch_once_times_out_without_events(client):
    from etcd3gw.exceptions import WatchTimedOut

    with pytest.raises(WatchTimedOut):
        client.watch_once("quiet", timeout=0.5)


def test_transaction(client):
    import base64

    key = base64.b64encode(b"txn-key").decode()
    result = client.transaction({
        "compare": [{"key": key, "result": "EQUAL", "target": "VERSION", "version": 0}],
        "success": [{"request_put": {"key": key, "value": base64.b64encode(b"v").decode()}}],
        "failure": [],
    })
    assert result["succeeded"] is True
    again = client.transaction({
        "compare": [{"key": key, "result": "EQUAL", "target": "VERSION", "version": 0}],
        "success": [], "failure": [{"request_range": {"key": key}}],
    })
    assert "succeeded" not in again
    assert again["responses"][0]["response_range"]["kvs"][0]["value"] == base64.b64encode(b"v").decode()


def test_metrics_after_the_client_session(served, engine):
    """/metrics scrapes on either engine; the client's calls were counted."""
    from prometheus_client.parser import text_string_to_metric_families

    server, _ = served
    text = request(server.metrics_url, "GET", "/metrics").body.decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    puts = [s.value for s in families["grpc_server_handled"].samples
            if s.labels["grpc_method"] == "Put" and s.labels["grpc_code"] == "OK"]
    assert puts == [pytest.approx(puts[0])] and puts[0] >= 4
    assert families["etcd_mvcc_db_total_size_in_bytes"].samples[0].value > 0
    assert families["etcd_debugging_mvcc_keys_total"].samples[0].value >= 1
    # The engine's operation counters are LMDB's (mvcckv.stats).
    assert ("etcd_mvcc_put" in families) == (engine.name == "lmdb")

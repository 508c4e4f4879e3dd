"""The HTTP listeners beyond what etcd can be compared with: the metrics-only
listener, https with client certificates, /health under an alarm, bad
flags, big stream messages kept in one chunk, a watch ended by its client,
and the JSON codec's reading of requests."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import time

import pytest
import trustme

from harness import REPO_ROOT, call, grpc_channel, pb_encode
from http_harness import HttpMvcckv, b64, post, request, stream


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("http-gateway")
    with HttpMvcckv(root / "data", log_path=root / "mvcckv.log") as srv:
        yield srv


def test_metrics_listener_serves_only_metrics_and_health(server):
    assert request(server.metrics_url, "GET", "/health").json == {"health": "true", "reason": ""}
    assert b"etcd_server_has_leader 1.0" in request(server.metrics_url, "GET", "/metrics").body
    for method, path in (("POST", "/v3/kv/range"), ("GET", "/version"), ("GET", "/")):
        answer = request(server.metrics_url, method, path, b"{}" if method == "POST" else None)
        assert (answer.status, answer.body) == (404, b"404 page not found\n"), path


def test_health_is_false_under_an_alarm_unless_excluded(server):
    # Maintenance.Alarm ACTIVATE NOSPACE for this member, over gRPC.
    member = int(post(server.http_url, "/v3/maintenance/status", {}).json["header"]["member_id"])
    with grpc_channel(server.endpoint) as channel:
        activate = call(channel, "/etcdserverpb.Maintenance/Alarm", pb_encode((1, 1), (2, member), (3, 1)))
        assert activate.ok, activate
        try:
            unhealthy = request(server.http_url, "GET", "/health")
            assert unhealthy.status == 503
            assert unhealthy.json == {"health": "false", "reason": "ALARM NOSPACE"}
            excluded = request(server.http_url, "GET", "/health?exclude=NOSPACE")
            assert (excluded.status, excluded.json["health"]) == (200, "true")
            # Writes are refused with etcd's message, through the gateway.
            refused = post(server.http_url, "/v3/kv/put", {"key": b64("k"), "value": b64("v")})
            assert (refused.status, refused.json["message"]) == (429, "etcdserver: mvcc: database space exceeded")
        finally:
            assert call(channel, "/etcdserverpb.Maintenance/Alarm",
                        pb_encode((1, 2), (2, member), (3, 1))).ok
    assert request(server.http_url, "GET", "/health").status == 200
    failures = [line for line in request(server.metrics_url, "GET", "/metrics").body.decode().splitlines()
                if line.startswith("etcd_server_health_failures ")]
    assert failures and float(failures[0].split()[1]) >= 1


def test_a_big_event_is_one_chunk(server):
    value = b"x" * 200_000
    assert post(server.http_url, "/v3/kv/put", {"key": b64("big"), "value": b64(value)}).status == 200
    rev = int(post(server.http_url, "/v3/kv/range", {"key": b64("big")}).json["header"]["revision"])
    got = list(stream(server.http_url, "/v3/watch", {"create_request": {"key": b64("big"), "start_revision": rev}},
                      max_chunks=2))
    assert len(got) == 2 and all(chunk.endswith(b"\n") for chunk in got)
    event = json.loads(got[1])["result"]["events"][0]
    assert event["kv"]["value"] == b64(value)


def test_a_watch_ends_when_its_client_hangs_up(server):
    def watchers() -> float:
        text = request(server.metrics_url, "GET", "/metrics").body.decode()
        return float(next(line.split()[1] for line in text.splitlines()
                          if line.startswith("etcd_debugging_mvcc_watcher_total ")))

    # Watches of earlier tests end when their clients hang up, which the
    # server may still be noticing: start from none.
    deadline = time.monotonic() + 10
    while watchers() and time.monotonic() < deadline:
        time.sleep(0.05)
    base = watchers()
    assert base == 0
    chunks = stream(server.http_url, "/v3/watch", {"create_request": {"key": b64("w")}}, max_chunks=1)
    assert json.loads(next(chunks))["result"]["created"] is True
    assert watchers() == base + 1
    chunks.close()  # closes the socket
    deadline = time.monotonic() + 10
    while watchers() != base and time.monotonic() < deadline:
        time.sleep(0.05)
    assert watchers() == base


def test_keepalive_body_of_several_requests(server):
    lease = post(server.http_url, "/v3/lease/grant", {"TTL": 60}).json["ID"]
    body = json.dumps({"ID": lease}) + "\n" + json.dumps({"ID": lease}) + " " + json.dumps({"ID": "1"})
    got = [json.loads(c)["result"] for c in stream(server.http_url, "/v3/lease/keepalive", body, max_chunks=5)]
    assert [r["ID"] for r in got] == [lease, lease, "1"]
    assert got[0]["TTL"] == "60" and "TTL" not in got[2]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("http-pki")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    client = ca.issue_cert("alice")
    paths = {"ca": root / "ca.pem", "cert": root / "cert.pem", "key": root / "key.pem",
             "client": root / "client.pem"}
    ca.cert_pem.write_to_path(paths["ca"])
    cert.cert_chain_pems[0].write_to_path(paths["cert"])
    cert.private_key_pem.write_to_path(paths["key"])
    client.private_key_and_cert_chain_pem.write_to_path(paths["client"])
    return paths


def test_https_listener_with_client_certificates(tmp_path, pki):
    class HttpsMvcckv(HttpMvcckv):
        @property
        def http_url(self) -> str:
            return f"https://127.0.0.1:{self.http_port}"

        def _launch(self) -> None:
            super(HttpMvcckv, self)._launch()

    args = ("--cert-file", str(pki["cert"]), "--key-file", str(pki["key"]),
            "--trusted-ca-file", str(pki["ca"]), "--client-cert-auth")
    with HttpsMvcckv(tmp_path / "data", log_path=tmp_path / "mvcckv.log", extra_args=args) as srv:
        context = ssl.create_default_context(cafile=str(pki["ca"]))
        context.load_cert_chain(str(pki["client"]))
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", srv.http_port), timeout=2) as raw, \
                        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                    body = json.dumps({"key": b64("k"), "value": b64("v")}).encode()
                    tls.sendall(b"POST /v3/kv/put HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
                    answer = b""
                    while chunk := tls.recv(65536):
                        answer += chunk
                break
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        assert answer.startswith(b"HTTP/1.1 200"), answer
        assert b'"revision":"2"' in answer
        # Without a client certificate the handshake fails.
        bare = ssl.create_default_context(cafile=str(pki["ca"]))
        with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
            with socket.create_connection(("127.0.0.1", srv.http_port), timeout=5) as raw, \
                    bare.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                if not tls.recv(1024):
                    raise ConnectionResetError("closed without an answer")


@pytest.mark.parametrize("args, message", [
    (["--listen-client-http-urls", "http://127.0.0.1:2379"], "is given twice"),
    (["--listen-metrics-urls", "http://example.com:2381"], "expected IP in URL for binding"),
    (["--listen-client-http-urls", "https://127.0.0.1:2390"], "TLS key/cert"),
    (["--listen-metrics-urls", "unix:///tmp/x"], "only http:// and https://"),
])
def test_bad_http_flags_are_refused(args, message, tmp_path):
    run = subprocess.run([sys.executable, "-m", "mvcckv", "serve", "--data-dir", str(tmp_path / "d"), *args],
                         capture_output=True, text=True, timeout=30, cwd=REPO_ROOT)
    assert run.returncode == 2 and message in run.stderr, run.stderr


def test_request_json_reading():
    from mvcckv.pb import rpc_pb2 as pb
    from mvcckv.server import jsonpb

    req = jsonpb.parse(b'{"key":"Zm9v","rangeEnd":"Zm9w","limit":"5","sort_order":2,"sortTarget":"MOD",'
                       b'"serializable":true,"unknown":{"deep":[1]}}', pb.RangeRequest)
    assert (req.key, req.range_end, req.limit, req.sort_order, req.sort_target, req.serializable) == \
        (b"foo", b"fop", 5, pb.RangeRequest.DESCEND, pb.RangeRequest.MOD, True)
    txn = jsonpb.parse(b'{"compare":[{"key":"YQ==","mod_revision":0}],"success":[{"request_range":{}}]}',
                       pb.TxnRequest)
    # A oneof member set to zero (or an empty message) is still set.
    assert txn.compare[0].WhichOneof("target_union") == "mod_revision"
    assert txn.success[0].WhichOneof("request") == "request_range"
    assert jsonpb.marshal(pb.RangeResponse(count=0, more=False)) == b"{}"
    assert jsonpb.marshal(pb.HashResponse(hash=7)) == b'{"hash":7}'
    for body, message in [
        (b'{"limit": 9223372036854775808}', "json: cannot unmarshal number 9223372036854775808 into Go value "
                                            "of type int64"),
        (b'{"key": ["Zm9v"]}', "json: cannot unmarshal array into Go value of type []uint8"),
        (b'{"key": "Zm9v", "limit": {}}', "json: cannot unmarshal object into Go value of type int64"),
        (b'{"key": "Zm 9v"}', "illegal base64 data at input byte 2"),
    ]:
        with pytest.raises(jsonpb.DecodeError) as err:
            jsonpb.parse(body, pb.RangeRequest)
        assert str(err.value) == message


def test_health_of_a_stopped_store(tmp_path):
    """A store that no longer answers makes /health false with etcd 3.6's
    reason (a live server closes its HTTP listeners before its store, so
    this is checked on the health check itself)."""
    import asyncio

    import grpc

    import mvcckv
    from mvcckv.server.httpd import HttpServer
    from mvcckv.server.metrics import Metrics
    from mvcckv.server.node import Node

    store = mvcckv.open(str(tmp_path / "data"))
    node = Node(store=store, name="n", member_id=1, cluster_id=2, peer_urls=(), client_urls=(),
                version="3.6.14", quota_bytes=0)

    async def check():
        channel = grpc.aio.insecure_channel(f"unix:{tmp_path / 'nowhere.sock'}")
        try:
            http = HttpServer(node, Metrics(node), channel, 1024)
            before = await http.unhealthy_reason([])
            store.close()
            return before, await http.unhealthy_reason([])
        finally:
            await channel.close()

    before, after = asyncio.run(check())
    assert before is None
    assert after == "RANGE ERROR:etcdserver: server stopped"


def test_a_taken_http_port_stops_the_server_with_etcds_words(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run(
            [sys.executable, "-m", "mvcckv", "serve", "--data-dir", str(tmp_path / "d"),
             "--listen-client-urls", "http://127.0.0.1:0",
             "--listen-client-http-urls", f"http://127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=30, cwd=REPO_ROOT)
    assert run.returncode == 1
    assert f"listen tcp 127.0.0.1:{port}: bind: address already in use" in run.stderr


def test_livez_and_readyz_as_etcd_3_6(server):
    for base in (server.http_url, server.metrics_url):
        assert request(base, "GET", "/livez").body == b"ok\n"
        assert request(base, "GET", "/readyz").body == b"ok\n"
    verbose = request(server.http_url, "GET", "/readyz?verbose")
    assert verbose.body == (b"[+]data_corruption ok\n[+]linearizable_read ok\n[+]non_learner ok\n"
                            b"[+]serializable_read ok\nok\n")
    assert request(server.http_url, "GET", "/livez/serializable_read?verbose").body == \
        b"[+]serializable_read ok\nok\n"
    assert request(server.http_url, "GET", "/readyz?verbose&exclude=non_learner").body.count(b"[+]") == 3
    assert request(server.http_url, "GET", "/livez/nope").status == 404
    assert request(server.http_url, "POST", "/livez", b"").status == 405
    member = int(post(server.http_url, "/v3/maintenance/status", {}).json["header"]["member_id"])
    with grpc_channel(server.endpoint) as channel:
        # Alarm ACTIVATE CORRUPT (alarm type 2) for this member.
        assert call(channel, "/etcdserverpb.Maintenance/Alarm", pb_encode((1, 1), (2, member), (3, 2))).ok
        try:
            ready = request(server.http_url, "GET", "/readyz")
            assert ready.status == 503
            assert b"[-]data_corruption failed: alarm activated: CORRUPT\n" in ready.body
            assert b"[+]serializable_read ok\n" in ready.body
            assert request(server.http_url, "GET", "/readyz?exclude=data_corruption").status == 200
            assert request(server.http_url, "GET", "/livez").status == 200
        finally:
            assert call(channel, "/etcdserverpb.Maintenance/Alarm", pb_encode((1, 2), (2, member), (3, 2))).ok
    assert request(server.http_url, "GET", "/readyz").status == 200

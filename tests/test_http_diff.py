"""Differential tests of the JSON gateway: the same HTTP requests to a real
etcd 3.4.23 (which serves its gateway on its client URL) and to ``mvcckv
serve --listen-client-http-urls``, the same answers.

Compared: the HTTP status, the content type, and the JSON body after
:func:`harness.normalize`, which leaves out only what must differ between
two clusters: cluster and member IDs, the member's URLs, Status' sizes,
versions and raft indices, and hashes of the backend file (bbolt's and
LMDB's bytes differ).  Also dropped here: the ``TTL`` a TimeToLive reports
(the remaining seconds may be one apart between two servers a few
milliseconds apart) and auth tokens (random).  Lease IDs are chosen by the
requests, so they are compared.  Error answers are compared whole: status,
``error``, ``message`` and ``code`` (mvcckv adds ``details: []``, which
etcd 3.6's gateway sends and 3.4's leaves out).

mvcckv runs with ``--emulated-version 3.4.23`` so that ``/version``
matches too.  Both servers receive the same writes in the same order, so
their revisions move in step through the module; the compaction test
comes last because compaction is global.
"""

from __future__ import annotations

import json

import pytest

from harness import FAST_ELECTION, EtcdProcess, normalize
from http_harness import HttpMvcckv, b64, post, request, stream

# 3.4 sends these without "details"; mvcckv sends details: [] as 3.6 does.
_ADDED_BY_MVCCKV = {"details": []}


@pytest.fixture(scope="module")
def pair(etcd_binary, tmp_path_factory):
    root = tmp_path_factory.mktemp("http-diff")
    with EtcdProcess(binary=etcd_binary, extra_args=FAST_ELECTION) as etcd, \
            HttpMvcckv(root / "data", log_path=root / "mvcckv.log",
                       extra_args=("--emulated-version", "3.4.23")) as mvcckv:
        yield etcd.client_url, mvcckv.http_url


def comparable(answer) -> tuple:
    body: object
    if answer.content_type.startswith("application/json"):
        body = answer.json
        if isinstance(body, dict) and "error" in body and isinstance(body.get("code"), int):
            body = {k: v for k, v in body.items() if _ADDED_BY_MVCCKV.get(k, object()) != v}
        body = _drop_volatile(normalize(body))
    else:
        body = answer.body
    return answer.status, answer.content_type.split(";")[0], body


def _drop_volatile(obj):
    if isinstance(obj, list):
        return [_drop_volatile(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    out = {k: _drop_volatile(v) for k, v in obj.items() if k != "token"}
    if "grantedTTL" in out:
        out.pop("TTL", None)
    return out


# Top-level fields mvcckv (etcd 3.6 semantics) sends where 3.4 sends none,
# by path (the same differences as tests/test_diff_kv.py's, over gRPC).
NEWER = {
    # etcd 3.4 answers Alarm without a header; 3.5 and later fill it.
    "/v3/maintenance/alarm": "header",
}


def same(pair, path, body, token=(None, None)):
    etcd, mvcckv = pair
    want = post(etcd, path, body, token[0])
    got = post(mvcckv, path, body, token[1])
    mine = comparable(got)
    newer = NEWER.get(path)
    if newer and want.status == 200:
        assert newer in mine[2] and newer not in want.json, (path, want, got)
        mine = (mine[0], mine[1], {k: v for k, v in mine[2].items() if k != newer})
    assert mine == comparable(want), f"{path} {body!r}\netcd:   {want}\nmvcckv: {got}"
    return want, got


K = b64("http-k")
K2 = b64("http-k2")
V = b64("value")

# In order: each request sees what the ones before it did.
UNARY = [
    ("/v3/kv/put", {"key": K, "value": V}),
    ("/v3/kv/put", {"key": K, "value": b64("v2"), "prev_kv": True}),
    ("/v3/kv/put", {"key": K2, "value": V}),
    ("/v3/kv/range", {"key": K}),
    ("/v3/kv/range", {"key": K, "range_end": b64("http-l")}),
    ("/v3/kv/range", {"key": K, "range_end": b64("http-l"), "limit": 1}),
    ("/v3/kv/range", {"key": K, "range_end": b64("http-l"), "countOnly": True}),
    ("/v3/kv/range", {"key": K, "range_end": b64("http-l"), "keys_only": True, "sort_order": "DESCEND"}),
    ("/v3/kv/range", {"key": K, "range_end": b64("http-l"), "sort_order": 2, "sort_target": "MOD"}),
    ("/v3/kv/range", {"key": K, "revision": "2"}),
    ("/v3/kv/range", {"key": b64("http-none")}),
    ("/v3/kv/range", {"key": K, "unknown_field": 1}),
    ("/v3/kv/range", '{"key": "' + K + '"} trailing'),
    ("/v3/kv/range", {"key": K, "revision": 100000}),
    ("/v3/kv/range", ""),
    ("/v3/kv/range", {"key": None}),
    ("/v3/kv/deleterange", {"key": b64("http-none")}),
    ("/v3/kv/deleterange", {"key": K2, "prev_kv": True}),
    ("/v3/kv/txn", {"compare": [{"key": K, "result": "EQUAL", "target": "VERSION", "version": "2"}],
                    "success": [{"request_put": {"key": K2, "value": V}}, {"request_range": {"key": K}}],
                    "failure": [{"request_range": {"key": K2}}]}),
    ("/v3/kv/txn", {"compare": [{"key": K, "result": "GREATER", "target": "MOD", "mod_revision": 100}],
                    "success": [{"requestPut": {"key": K2, "value": V}}],
                    "failure": [{"requestDeleteRange": {"key": K2}}]}),
    ("/v3/kv/txn", {"compare": [{"key": K, "target": "VALUE", "value": b64("nope")}]}),
    ("/v3/kv/put", {"key": K, "value": V, "lease": "7777"}),
    ("/v3/lease/grant", {"TTL": 60, "ID": 7777}),
    ("/v3/lease/grant", {"TTL": "60", "ID": "7777"}),
    ("/v3/kv/put", {"key": K, "value": V, "lease": "7777"}),
    ("/v3/lease/timetolive", {"ID": 7777, "keys": True}),
    ("/v3/kv/lease/timetolive", {"ID": "7777"}),
    ("/v3/lease/leases", {}),
    ("/v3/kv/lease/leases", {}),
    ("/v3/lease/revoke", {"ID": "7777"}),
    ("/v3/kv/lease/revoke", {"ID": "7777"}),
    ("/v3/lease/timetolive", {"ID": 7777}),
    ("/v3/kv/range", {"key": K}),
    ("/v3beta/kv/range", {"key": K2}),
    ("/v3/maintenance/status", {}),
    ("/v3/maintenance/alarm", {}),
    ("/v3/maintenance/alarm", {"action": "GET"}),
    ("/v3/maintenance/hash", {}),
    ("/v3/maintenance/defragment", {}),
    ("/v3/cluster/member/list", {}),
    ("/v3/kv/compaction", {"revision": 100000}),
    ("/v3/auth/user/get", {"name": "nobody"}),
    ("/v3/auth/role/get", {"role": "nobody"}),
    ("/v3/auth/user/list", {}),
    ("/v3/auth/enable", {}),
    ("/v3/auth/authenticate", {"name": "nobody", "password": "x"}),
]

# Bodies that do not decode: 400, code 3, Go's decoder message.
BAD = [
    "notjson",
    "{",
    '{"key": "' + K + '",',
    "[1]",
    "5",
    '{"key": 5}',
    '{"key": "!!!"}',
    '{"key": "Zm9"}',
    '{"key": "Zm9v=="}',
    '{"key": "' + K + '", "limit": 1.5}',
    '{"key": "' + K + '", "limit": "x"}',
    '{"key": "' + K + '", "limit": true}',
    '{"key": "' + K + '", "sort_order": "BAD"}',
    '{"key": "' + K + '", "serializable": "yes"}',
    '{"key": "' + K + '" "x"}',
    '{"key" 1}',
    '{key: 1}',
    'nul',
    'tru',
]


def test_unary_calls_answer_as_etcd(pair):
    for path, body in UNARY:
        same(pair, path, body)


@pytest.mark.parametrize("body", BAD)
def test_bad_bodies_answer_as_etcd(pair, body):
    want, got = same(pair, "/v3/kv/range", body)
    assert got.status == 400 and got.json["code"] == 3 and got.json["error"] == got.json["message"]


def test_paths_and_methods_answer_as_etcd(pair):
    etcd, mvcckv = pair
    cases = [
        ("GET", "/v3/kv/range"), ("PUT", "/v3/kv/put"), ("DELETE", "/v3/kv/range"),
        ("POST", "/v3/nope"), ("POST", "/v3/"), ("POST", "/v3/kv"), ("GET", "/nope"), ("GET", "/"),
        ("POST", "/v3alpha/kv/range"), ("GET", "/health"), ("POST", "/health"), ("GET", "/version"),
        ("POST", "/version"), ("OPTIONS", "/v3/kv/range"), ("GET", "/livez"), ("GET", "/readyz"),
    ]
    for method, path in cases:
        want = request(etcd, method, path, b"{}" if method == "POST" else None)
        got = request(mvcckv, method, path, b"{}" if method == "POST" else None)
        assert (got.status, got.body) == (want.status, want.body), (method, path, want, got)
        assert got.content_type.split(";")[0] == want.content_type.split(";")[0], (method, path)
        for header in ("access-control-allow-origin", "access-control-allow-methods",
                       "access-control-allow-headers"):
            assert got.headers.get(header) == want.headers.get(header), (method, path, header)
    redirect_etcd = request(etcd, "POST", "/v3")
    redirect = request(mvcckv, "POST", "/v3")
    assert redirect.status == redirect_etcd.status == 301
    assert redirect.headers["location"] == redirect_etcd.headers["location"] == "/v3/"


def test_oversize_requests_answer_as_etcd(pair):
    # Over --max-request-bytes: etcd's own message, compared as it is.
    same(pair, "/v3/kv/put", {"key": K, "value": b64(b"x" * 1600 * 1024)})
    # Over it + 512 KiB the gRPC transport refuses the message, in its own
    # words: grpc-go's "grpc: received message larger than max (N vs. M)",
    # grpcio's "SERVER: Received message larger than max (N vs. M)".  The
    # status, code and sizes must agree.
    body = {"key": K, "value": b64(b"x" * 2100 * 1024)}
    want, got = post(pair[0], "/v3/kv/put", body), post(pair[1], "/v3/kv/put", body)
    assert got.status == want.status == 429
    assert got.json["code"] == want.json["code"] == 8
    assert got.json["message"].lower().removeprefix("server: ") == \
        want.json["message"].lower().removeprefix("grpc: ")


def chunks(base, path, body, n, timeout=2.0, token=None):
    return [json.loads(c) for c in stream(base, path, body, max_chunks=n, timeout=timeout, token=token)]


def test_watch_streams_as_etcd(pair):
    etcd, mvcckv = pair
    # Two requests in one body; the second replays history.
    body = (json.dumps({"create_request": {"key": K}}) + "\n"
            + json.dumps({"create_request": {"key": K, "range_end": b64("http-l"), "start_revision": 2}}))
    want = chunks(etcd, "/v3/watch", body, 4)
    got = chunks(mvcckv, "/v3/watch", body, 4)
    assert normalize(got) == normalize(want)
    assert got[0]["result"]["created"] is True and got[2]["result"]["events"]


def test_keepalive_streams_as_etcd(pair):
    same(pair, "/v3/lease/grant", {"TTL": 60, "ID": 8888})
    for lease in (8888, 1):
        want = chunks(pair[0], "/v3/lease/keepalive", {"ID": lease}, 3)
        got = chunks(pair[1], "/v3/lease/keepalive", {"ID": lease}, 3)
        assert normalize(got) == normalize(want) and len(got) == 1
    same(pair, "/v3/lease/revoke", {"ID": 8888})


def test_watch_progress_request_answers_as_etcd(pair):
    etcd, mvcckv = pair
    body = json.dumps({"create_request": {"key": K}}) + "\n" + json.dumps({"progress_request": {}})
    want = chunks(etcd, "/v3/watch", body, 2)
    got = chunks(mvcckv, "/v3/watch", body, 2)
    assert normalize(got) == normalize(want)
    assert got[1]["result"]["watch_id"] == "-1"


def test_watch_bad_first_request_answers_as_etcd(pair):
    same(pair, "/v3/watch", "garbage")


def test_watch_below_compaction_is_canceled_as_etcd(pair):
    etcd, mvcckv = pair
    status = post(mvcckv, "/v3/kv/range", {"key": K}).json
    rev = int(status["header"]["revision"])
    same(pair, "/v3/kv/compaction", {"revision": rev})
    same(pair, "/v3/kv/range", {"key": K, "revision": 2})
    body = {"create_request": {"key": K, "start_revision": 2}}
    want = chunks(etcd, "/v3/watch", body, 2)
    got = chunks(mvcckv, "/v3/watch", body, 2)
    assert normalize(got) == normalize(want)
    assert got[1]["result"]["canceled"] and "revision" not in got[1]["result"]["header"]


def test_version_and_health_answer_as_etcd(pair):
    etcd, mvcckv = pair
    for path in ("/version", "/health"):
        want, got = request(etcd, "GET", path), request(mvcckv, "GET", path)
        assert (got.status, got.body) == (want.status, want.body)


@pytest.fixture
def auth_pair(etcd_binary, tmp_path):
    with EtcdProcess(binary=etcd_binary, extra_args=FAST_ELECTION) as etcd, \
            HttpMvcckv(tmp_path / "data", log_path=tmp_path / "mvcckv.log",
                       extra_args=("--emulated-version", "3.4.23")) as mvcckv:
        yield etcd.client_url, mvcckv.http_url


def test_auth_answers_as_etcd(auth_pair):
    pair = auth_pair
    for path, body in [
        ("/v3/auth/user/add", {"name": "root", "password": "rootpw"}),
        ("/v3/auth/user/add", {"name": "root", "password": "rootpw"}),
        ("/v3/auth/user/grant", {"user": "root", "role": "root"}),
        ("/v3/auth/user/add", {"name": "alice", "password": "alicepw"}),
        ("/v3/auth/role/add", {"name": "reader"}),
        ("/v3/auth/role/grant", {"name": "reader", "perm": {"permType": "READ", "key": b64("a"),
                                                             "range_end": b64("b")}}),
        ("/v3/auth/role/get", {"role": "reader"}),
        ("/v3/auth/user/grant", {"user": "alice", "role": "reader"}),
        ("/v3/auth/user/get", {"name": "alice"}),
        ("/v3/auth/role/list", {}),
        ("/v3/auth/enable", {}),
        ("/v3/kv/range", {"key": b64("a")}),
        ("/v3/auth/authenticate", {"name": "root", "password": "wrong"}),
    ]:
        same(pair, path, body)
    root = [post(base, "/v3/auth/authenticate", {"name": "root", "password": "rootpw"}).json["token"]
            for base in pair]
    alice = [post(base, "/v3/auth/authenticate", {"name": "alice", "password": "alicepw"}).json["token"]
             for base in pair]
    same(pair, "/v3/kv/put", {"key": b64("a1"), "value": V}, token=root)
    same(pair, "/v3/kv/range", {"key": b64("a1")}, token=alice)
    same(pair, "/v3/kv/put", {"key": b64("a1"), "value": V}, token=alice)
    same(pair, "/v3/kv/range", {"key": b64("z")}, token=alice)
    same(pair, "/v3/kv/range", {"key": b64("a1")}, token=("garbage", "garbage"))
    # etcd 3.4 reads "Bearer <token>" as an invalid token; mvcckv strips the
    # prefix as etcd's main branch does (ETCD_SEMANTICS §1.3).
    bearer = [post(base, "/v3/kv/range", {"key": b64("a1")}, "Bearer " + token)
              for base, token in zip(pair, root)]
    assert bearer[0].status == 401 and bearer[0].json["message"] == "etcdserver: invalid auth token"
    assert bearer[1].status == 200 and bearer[1].json["count"] == "1"
    same(pair, "/v3/auth/user/list", {}, token=alice)
    # Streams carry the token too.
    watch = {"create_request": {"key": b64("a1")}}
    for token in (root, alice):
        want = chunks(pair[0], "/v3/watch", watch, 1, token=token[0])
        got = chunks(pair[1], "/v3/watch", watch, 1, token=token[1])
        assert normalize(got) == normalize(want) and got[0]["result"]["created"] is True
    # A watch the user may not read, and one without a token.
    for token in (alice, (None, None)):
        forbidden = {"create_request": {"key": b64("z")}}
        want = chunks(pair[0], "/v3/watch", forbidden, 2, token=token[0])
        got = chunks(pair[1], "/v3/watch", forbidden, 2, token=token[1])
        assert normalize(got) == normalize(want), (token, want, got)
        # etcd answers created, then canceled with the reason.
        assert got[-1]["result"]["canceled"] is True and got[-1]["result"]["cancel_reason"], got
    same(pair, "/v3/auth/disable", {}, token=root)
    same(pair, "/v3/kv/range", {"key": b64("a1")})

"""``/metrics`` as Prometheus reads it, and moving as etcd's moves.

* Every family a standard etcd dashboard or alert rule uses is present,
  parsed by prometheus_client's own parser (what a scrape does), with the
  type real etcd 3.4.23 gives it.
* The same workload (over the JSON gateway, which both servers count as
  gRPC calls) moves the same counters by the same amounts on a real etcd
  and on mvcckv: per-method gRPC counts by code, the mvcc operation
  counters (etcd's per-operation rules: a Txn counts its compares),
  leases, keys, revisions, applied proposals, health checks.
"""

from __future__ import annotations

import json
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import FAST_ELECTION, EtcdProcess
from http_harness import HttpMvcckv, b64, post, request

# family (as the parser names it: counters without _total) -> type
DASHBOARD_FAMILIES = {
    "etcd_server_has_leader": "gauge",
    "etcd_server_is_leader": "gauge",
    "etcd_server_leader_changes_seen": "counter",
    "etcd_server_proposals_committed_total": "gauge",
    "etcd_server_proposals_applied_total": "gauge",
    "etcd_server_proposals_pending": "gauge",
    "etcd_server_proposals_failed": "counter",
    "etcd_server_version": "gauge",
    "etcd_cluster_version": "gauge",
    "etcd_server_id": "gauge",
    "etcd_server_is_learner": "gauge",
    "etcd_server_quota_backend_bytes": "gauge",
    "etcd_disk_wal_fsync_duration_seconds": "histogram",
    "etcd_disk_backend_commit_duration_seconds": "histogram",
    "etcd_mvcc_db_total_size_in_bytes": "gauge",
    "etcd_mvcc_db_total_size_in_use_in_bytes": "gauge",
    "etcd_debugging_mvcc_db_total_size_in_bytes": "gauge",
    "etcd_debugging_mvcc_keys_total": "gauge",
    "etcd_mvcc_put": "counter",
    "etcd_mvcc_range": "counter",
    "etcd_mvcc_delete": "counter",
    "etcd_mvcc_txn": "counter",
    "etcd_debugging_mvcc_put": "counter",
    "etcd_debugging_mvcc_range": "counter",
    "etcd_debugging_mvcc_delete": "counter",
    "etcd_debugging_mvcc_txn": "counter",
    "etcd_debugging_mvcc_watcher_total": "gauge",
    "etcd_debugging_mvcc_slow_watcher_total": "gauge",
    "etcd_debugging_mvcc_events": "counter",
    "etcd_debugging_mvcc_current_revision": "gauge",
    "etcd_debugging_mvcc_compact_revision": "gauge",
    "etcd_debugging_mvcc_total_put_size_in_bytes": "gauge",
    "etcd_debugging_lease_granted": "counter",
    "etcd_debugging_lease_revoked": "counter",
    "etcd_debugging_lease_renewed": "counter",
    "etcd_debugging_server_lease_expired": "counter",
    "grpc_server_started": "counter",
    "grpc_server_handled": "counter",
    "grpc_server_msg_received": "counter",
    "grpc_server_msg_sent": "counter",
    "etcd_network_client_grpc_received_bytes": "counter",
    "etcd_network_client_grpc_sent_bytes": "counter",
    "process_cpu_seconds": "counter",
    "process_resident_memory_bytes": "gauge",
    "process_virtual_memory_bytes": "gauge",
    "process_open_fds": "gauge",
    "process_max_fds": "gauge",
    "process_start_time_seconds": "gauge",
    "os_fd_used": "gauge",
    "os_fd_limit": "gauge",
    # etcd's counters without a _total suffix: untyped here (the module
    # docstring of mvcckv.server.metrics says why).
    "etcd_server_health_success": "unknown",
    "etcd_server_health_failures": "unknown",
}


@pytest.fixture(scope="module")
def pair(etcd_binary, tmp_path_factory):
    root = tmp_path_factory.mktemp("http-metrics")
    with EtcdProcess(binary=etcd_binary, extra_args=FAST_ELECTION) as etcd, \
            HttpMvcckv(root / "data", log_path=root / "mvcckv.log") as mvcckv:
        yield etcd, mvcckv


def scrape(url: str) -> dict:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = resp.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def samples(families: dict) -> dict[tuple, float]:
    out = {}
    for family in families.values():
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_every_dashboard_family_is_there_with_etcds_type(pair):
    etcd, mvcckv = pair
    ours = scrape(mvcckv.metrics_url)
    # The client HTTP listener serves the same registry.
    assert set(scrape(mvcckv.http_url)) == set(ours)
    theirs = scrape(etcd.client_url)
    for name, kind in DASHBOARD_FAMILIES.items():
        assert name in ours, f"{name} missing"
        assert ours[name].type == kind, (name, ours[name].type)
        assert ours[name].samples, f"{name} has no samples"
        if name in theirs and kind != "unknown":
            assert theirs[name].type == kind, (name, "etcd says", theirs[name].type)
    # grpc_server_handled_total is pre-filled: every method, every code.
    handled = ours["grpc_server_handled"].samples
    codes = {s.labels["grpc_code"] for s in handled}
    assert len(codes) == 17 and "OK" in codes and "Canceled" in codes
    methods = {(s.labels["grpc_service"], s.labels["grpc_method"]) for s in handled}
    assert ("etcdserverpb.KV", "Put") in methods and ("etcdserverpb.Watch", "Watch") in methods
    assert ("grpc.health.v1.Health", "Check") in methods
    assert len(handled) == len(codes) * len(methods)
    versions = {s.labels["server_version"] for s in ours["etcd_server_version"].samples}
    assert versions == {"3.6.14"}
    assert ours["etcd_server_has_leader"].samples[0].value == 1


def _workload(base: str) -> None:
    """The same requests for both servers, over the gateway."""
    for i in range(7):
        assert post(base, "/v3/kv/put", {"key": b64(f"m/{i}"), "value": b64("v")}).status == 200
    for i in range(5):
        assert post(base, "/v3/kv/range", {"key": b64(f"m/{i}")}).status == 200
    assert post(base, "/v3/kv/range", {"key": b64("m/"), "range_end": b64("m0")}).status == 200
    assert post(base, "/v3/kv/range", {"key": b64("m/0"), "revision": 10**6}).status == 400
    assert post(base, "/v3/kv/put", {"key": b64("m/0"), "value": b64("w"), "prev_kv": True}).status == 200
    assert post(base, "/v3/kv/txn", {
        "compare": [{"key": b64("m/1"), "target": "VERSION", "result": "EQUAL", "version": 1}],
        "success": [{"request_put": {"key": b64("m/1"), "value": b64("t")}},
                    {"request_delete_range": {"key": b64("m/2")}}],
    }).status == 200
    assert post(base, "/v3/kv/deleterange", {"key": b64("m/3")}).status == 200
    assert post(base, "/v3/lease/grant", {"ID": 4242, "TTL": 600}).status == 200
    assert post(base, "/v3/kv/put", {"key": b64("m/leased"), "value": b64("v"), "lease": 4242}).status == 200
    assert post(base, "/v3/lease/revoke", {"ID": 4242}).status == 200
    assert post(base, "/v3/lease/revoke", {"ID": 4242}).status == 404
    assert request(base, "GET", "/health").status == 200


# Moved by the same amount on both.
MOVES = [
    ("grpc_server_handled_total", {"grpc_method": "Put", "grpc_code": "OK"}),
    ("grpc_server_handled_total", {"grpc_method": "Range", "grpc_code": "OK"}),
    ("grpc_server_handled_total", {"grpc_method": "Range", "grpc_code": "OutOfRange"}),
    ("grpc_server_handled_total", {"grpc_method": "Txn", "grpc_code": "OK"}),
    ("grpc_server_handled_total", {"grpc_method": "LeaseRevoke", "grpc_code": "NotFound"}),
    ("grpc_server_started_total", {"grpc_method": "Put"}),
    ("grpc_server_started_total", {"grpc_method": "Range"}),
    ("grpc_server_msg_received_total", {"grpc_method": "Range"}),
    ("grpc_server_msg_sent_total", {"grpc_method": "Range"}),
    ("grpc_server_msg_sent_total", {"grpc_method": "LeaseRevoke"}),
    ("etcd_mvcc_put_total", {}),
    ("etcd_mvcc_range_total", {}),
    ("etcd_mvcc_delete_total", {}),
    ("etcd_mvcc_txn_total", {}),
    ("etcd_debugging_mvcc_put_total", {}),
    ("etcd_debugging_mvcc_keys_total", {}),
    ("etcd_debugging_mvcc_current_revision", {}),
    ("etcd_debugging_mvcc_total_put_size_in_bytes", {}),
    ("etcd_debugging_lease_granted_total", {}),
    ("etcd_debugging_lease_revoked_total", {}),
    ("etcd_server_health_success", {}),
]


def _value(sampled: dict, name: str, labels: dict) -> float:
    # prometheus_client's parser names a counter's sample <family>_total
    # even where etcd's wire name has no _total (etcd_server_health_success).
    matching = [v for (n, ls), v in sampled.items()
                if n in (name, name + "_total") and all(dict(ls).get(k) == want for k, want in labels.items())]
    assert matching, f"no sample {name}{labels}"
    return sum(matching)


def test_counters_move_as_etcds_do(pair):
    etcd, mvcckv = pair
    servers = {"etcd": (etcd.client_url, etcd.client_url), "mvcckv": (mvcckv.http_url, mvcckv.metrics_url)}
    before = {who: samples(scrape(urls[1])) for who, urls in servers.items()}
    for api, _ in servers.values():
        _workload(api)
    after = {who: samples(scrape(urls[1])) for who, urls in servers.items()}
    moved = {who: {f"{name}{labels}": _value(after[who], name, labels) - _value(before[who], name, labels)
                   for name, labels in MOVES}
             for who in servers}
    assert moved["mvcckv"] == moved["etcd"], json.dumps(moved, indent=1)
    assert moved["mvcckv"]["grpc_server_handled_total{'grpc_method': 'Put', 'grpc_code': 'OK'}"] == 9
    # etcd's raft log also carries entries of its own (3.4's /health reads
    # through it), so the log-driven counters move by at least the
    # workload's 12 writes on both, not by the same amount.
    for who in servers:
        for name in ("etcd_server_proposals_committed_total", "etcd_server_proposals_applied_total",
                     "etcd_disk_wal_fsync_duration_seconds_count"):
            assert _value(after[who], name, {}) - _value(before[who], name, {}) >= 12, (who, name)
        # etcd commits its backend every 100 ms, mvcckv once per write batch:
        # etcd's commit may come a little after the workload's last answer.
        name = "etcd_disk_backend_commit_duration_seconds_count"
        deadline = time.monotonic() + 5
        latest = after[who]
        while _value(latest, name, {}) <= _value(before[who], name, {}) and time.monotonic() < deadline:
            time.sleep(0.05)
            latest = samples(scrape(servers[who][1]))
        assert _value(latest, name, {}) > _value(before[who], name, {}), (who, name)

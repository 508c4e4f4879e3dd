"""``/metrics``: etcd's Prometheus metrics, with etcd's names, types and labels.

Nothing here runs on a request's path except :class:`GrpcMetrics`' one
dictionary increment per call and per message.  Everything else is read
when Prometheus scrapes: custom collectors turn counters the engine
already keeps (``mvcckv.stats.EngineStats``, the store's status, the watch
hub's sizes) into metric families at that moment.

Families (etcd 3.4's names; an etcd dashboard or alert rule reads them
unchanged):

* server: ``etcd_server_has_leader`` (always 1: this server is its own
  leader), ``etcd_server_is_leader``, ``etcd_server_leader_changes_seen_total``
  (0), ``etcd_server_proposals_committed_total`` and ``_applied_total``
  (gauges in 3.4: the index of the last logged and applied request),
  ``etcd_server_proposals_pending``, ``etcd_server_proposals_failed_total``
  (raft proposal failures; a single process has none, so 0),
  ``etcd_server_version``, ``etcd_cluster_version``, ``etcd_server_id``,
  ``etcd_server_quota_backend_bytes``, ``etcd_server_health_success`` and
  ``_failures``;
* disk: ``etcd_disk_wal_fsync_duration_seconds`` and
  ``etcd_disk_backend_commit_duration_seconds`` histograms (etcd's
  buckets), ``etcd_disk_wal_write_bytes_total``;
* mvcc: ``etcd_mvcc_db_total_size_in_bytes``,
  ``etcd_mvcc_db_total_size_in_use_in_bytes``, ``etcd_debugging_mvcc_keys_total``,
  ``etcd_mvcc_put_total`` / ``range_total`` / ``delete_total`` / ``txn_total``
  (and their ``etcd_debugging_mvcc_*`` twins), ``etcd_debugging_mvcc_watcher_total``,
  ``etcd_debugging_mvcc_slow_watcher_total``, ``etcd_debugging_mvcc_events_total``,
  ``etcd_debugging_mvcc_current_revision``, ``etcd_debugging_mvcc_compact_revision``;
* lease: ``etcd_debugging_lease_granted_total`` / ``revoked_total`` /
  ``renewed_total``, ``etcd_debugging_server_lease_expired_total``;
* gRPC (go-grpc-prometheus' names): ``grpc_server_started_total``,
  ``grpc_server_handled_total`` (every method × every code, zeros
  included, as etcd pre-fills them), ``grpc_server_msg_received_total``,
  ``grpc_server_msg_sent_total``; ``etcd_network_client_grpc_received_bytes_total``
  and ``_sent_bytes_total``;
* process: prometheus_client's ``process_*`` and etcd's ``os_fd_used``,
  ``os_fd_limit``.

Where etcd's counter has no ``_total`` suffix (``etcd_server_health_success``)
the family is exposed untyped: prometheus_client's counters always end in
``_total``, and the name is what rules match on.
"""

from __future__ import annotations

import os
import resource

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import Metric

class Metrics:
    """One server's registry."""

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.registry)
        self.health_success = 0
        self.health_failures = 0
        self.registry.register(_Collected(self._health))

    def health_checked(self, healthy: bool) -> None:
        if healthy:
            self.health_success += 1
        else:
            self.health_failures += 1

    def _health(self):
        yield _untyped("etcd_server_health_success", "The total number of successful health checks",
                       self.health_success)
        yield _untyped("etcd_server_health_failures", "The total number of failed health checks",
                       self.health_failures)
        yield from _fds()


class _Collected:
    """A collector from a generator function."""

    def __init__(self, collect):
        self.collect = collect


def _untyped(name: str, doc: str, value: float) -> Metric:
    metric = Metric(name, doc, "unknown")
    metric.add_sample(name, {}, value)
    return metric


def _fds():
    from prometheus_client.core import GaugeMetricFamily

    try:
        used = len(os.listdir("/proc/self/fd"))
    except OSError:
        return
    yield GaugeMetricFamily("os_fd_used", "The number of used file descriptors.", value=used)
    yield GaugeMetricFamily("os_fd_limit", "The file descriptor limit.",
                            value=resource.getrlimit(resource.RLIMIT_NOFILE)[0])

"""``/metrics``: etcd's Prometheus metrics, with etcd's names, types and labels.

Nothing here runs on a request's path except :class:`GrpcMetrics`, the
server interceptor that counts each call (a few dictionary increments per
call and per streamed message; bench/README.md has its measured cost).
Everything else is read when Prometheus scrapes: custom collectors turn
counters the engine already keeps (``mvcckv.stats.EngineStats``, the
store's status, the watch hub) into metric families at that moment.

Families, by etcd 3.4's names (an etcd dashboard or alert rule reads them
unchanged):

* server: ``etcd_server_has_leader`` and ``etcd_server_is_leader`` (1: a
  single member is always its own leader), ``etcd_server_leader_changes_seen_total``
  (0: it never changes), ``etcd_server_proposals_committed_total`` and
  ``_applied_total`` (gauges in 3.4: the last logged and the last applied
  WAL index, Status' ``raftIndex`` and ``raftAppliedIndex``),
  ``etcd_server_proposals_pending`` (requests waiting for the writer),
  ``etcd_server_proposals_failed_total`` (raft proposals that failed to
  commit — timeouts, lost leadership; a single process has none, so 0),
  ``etcd_server_version``, ``etcd_cluster_version``, ``etcd_server_id``,
  ``etcd_server_is_learner``, ``etcd_server_quota_backend_bytes``,
  ``etcd_server_health_success`` and ``_failures``;
* disk: ``etcd_disk_wal_fsync_duration_seconds`` and
  ``etcd_disk_backend_commit_duration_seconds`` (etcd's buckets);
* mvcc: ``etcd_mvcc_db_total_size_in_bytes``, ``_in_use_in_bytes``,
  ``etcd_mvcc_put_total`` / ``range_total`` / ``delete_total`` /
  ``txn_total`` and their ``etcd_debugging_mvcc_*`` twins (3.4 has both),
  ``etcd_debugging_mvcc_keys_total``, ``_watcher_total``,
  ``_slow_watcher_total``, ``_events_total`` (events handed to watch
  streams), ``_current_revision``, ``_compact_revision``,
  ``_db_total_size_in_bytes``, ``_total_put_size_in_bytes``;
* lease: ``etcd_debugging_lease_granted_total`` / ``revoked_total`` /
  ``renewed_total``, ``etcd_debugging_server_lease_expired_total``;
* gRPC, go-grpc-prometheus' names and labels (``grpc_type``,
  ``grpc_service``, ``grpc_method``, and ``grpc_code`` with Go's code
  names): ``grpc_server_started_total``, ``grpc_server_handled_total``,
  ``grpc_server_msg_received_total``, ``grpc_server_msg_sent_total``,
  every method pre-filled with zeros (``handled`` for every code), as etcd
  does; ``etcd_network_client_grpc_received_bytes_total`` and
  ``_sent_bytes_total``.  The JSON gateway's calls are gRPC calls and count
  here, as in etcd;
* process: prometheus_client's ``process_*``, and etcd's ``os_fd_used`` and
  ``os_fd_limit``.

The PostgreSQL engine keeps no :class:`~mvcckv.stats.EngineStats`: its
server exposes everything above except the operation, disk and lease
counters.

Where etcd's counter has no ``_total`` suffix (``etcd_server_health_success``)
the family is exposed untyped: prometheus_client's counters always end in
``_total``, and the name is what rules match on.
"""

from __future__ import annotations

import inspect
import os
import resource
import threading
from collections import defaultdict

import grpc
from grpc_health.v1 import health_pb2
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from mvcckv.pb import rpc_pb2 as pb
from mvcckv.server import threaded
from mvcckv.server.node import Node
from mvcckv.store import DEFAULT_QUOTA

# grpc-go's names of the codes (grpc_code label), in code order.
GO_CODE_NAMES = {
    grpc.StatusCode.OK: "OK", grpc.StatusCode.CANCELLED: "Canceled", grpc.StatusCode.UNKNOWN: "Unknown",
    grpc.StatusCode.INVALID_ARGUMENT: "InvalidArgument", grpc.StatusCode.DEADLINE_EXCEEDED: "DeadlineExceeded",
    grpc.StatusCode.NOT_FOUND: "NotFound", grpc.StatusCode.ALREADY_EXISTS: "AlreadyExists",
    grpc.StatusCode.PERMISSION_DENIED: "PermissionDenied", grpc.StatusCode.RESOURCE_EXHAUSTED: "ResourceExhausted",
    grpc.StatusCode.FAILED_PRECONDITION: "FailedPrecondition", grpc.StatusCode.ABORTED: "Aborted",
    grpc.StatusCode.OUT_OF_RANGE: "OutOfRange", grpc.StatusCode.UNIMPLEMENTED: "Unimplemented",
    grpc.StatusCode.INTERNAL: "Internal", grpc.StatusCode.UNAVAILABLE: "Unavailable",
    grpc.StatusCode.DATA_LOSS: "DataLoss", grpc.StatusCode.UNAUTHENTICATED: "Unauthenticated",
}

_GRPC_TYPES = {(False, False): "unary", (True, False): "client_stream",
               (False, True): "server_stream", (True, True): "bidi_stream"}


def served_methods() -> dict[str, tuple[str, str, str]]:
    """``/service/Method`` → (grpc_type, grpc_service, grpc_method) for
    every method the server registers."""
    methods = {}
    descriptors = [pb.DESCRIPTOR.services_by_name[name] for name in
                   ("KV", "Watch", "Lease", "Cluster", "Maintenance", "Auth")]
    descriptors.append(health_pb2.DESCRIPTOR.services_by_name["Health"])
    for service in descriptors:
        for method in service.methods:
            kind = _GRPC_TYPES[(method.client_streaming, method.server_streaming)]
            methods[f"/{service.full_name}/{method.name}"] = (kind, service.full_name, method.name)
    return methods


class GrpcMetrics(grpc.aio.ServerInterceptor):
    """go-grpc-prometheus' server counters, as one interceptor.

    Give it first in the server's interceptor list, so that it sees every
    call, also those a later interceptor refuses.  Counting is plain
    ``dict`` increments on the event loop; :meth:`collect` copies them.

    For a servicer that cannot go through an interceptor (a raw handler
    registered by hand), the same counts come from one call per finished
    unary call: ``metrics.grpc.unary_done(method, code, received_bytes,
    sent_bytes)``.
    """

    def __init__(self):
        self.methods = served_methods()
        self.started: dict[str, int] = defaultdict(int)
        self.handled: dict[tuple[str, str], int] = defaultdict(int)
        self.received: dict[str, int] = defaultdict(int)
        self.sent: dict[str, int] = defaultdict(int)
        self.received_bytes = 0
        self.sent_bytes = 0
        # Held by thread handlers' counting (``wrap``); the loop's own
        # counting does not take it, and counts other methods.
        self._lock = threading.Lock()
        # method -> (the handler it was made from, the counting handler)
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """``handler`` counted, for a server without interceptors (the
        thread server's ``threaded.Bridge``): an asyncio handler as the
        interceptor would count it, a thread one (KV's unary methods) by
        the same rules, under a lock since server threads run at once."""
        if threaded.is_async(handler):
            return self._wrap(method, handler)
        fn = threaded.behavior(handler)
        if handler.request_streaming or handler.response_streaming:
            raise ValueError(f"{method}: a streaming thread handler cannot be counted")
        started, handled, received, sent, lock = self.started, self.handled, self.received, self.sent, self._lock

        def unary(request, context):
            with lock:
                started[method] += 1
                received[method] += 1
                if type(request) is bytes:
                    self.received_bytes += len(request)
            try:
                resp = fn(request, context)
            except BaseException:
                with lock:
                    handled[(method, _code(context, "Unknown"))] += 1
                raise
            code = _code(context, "OK")
            with lock:
                handled[(method, code)] += 1
                if code == "OK":
                    sent[method] += 1
                    self.sent_bytes += _size(resp)
            return resp

        return grpc.unary_unary_rpc_method_handler(unary, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)

    def unary_done(self, method: str, code: grpc.StatusCode, received_bytes: int, sent_bytes: int) -> None:
        self.started[method] += 1
        self.received[method] += 1
        self.received_bytes += received_bytes
        self.handled[(method, GO_CODE_NAMES.get(code, "Unknown"))] += 1
        if code == grpc.StatusCode.OK:
            self.sent[method] += 1
            self.sent_bytes += sent_bytes

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        started, handled, received, sent = self.started, self.handled, self.received, self.sent
        options = dict(request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)
        if not handler.request_streaming and not handler.response_streaming:
            behavior = handler.unary_unary

            async def unary(request, context):
                started[method] += 1
                received[method] += 1
                if type(request) is bytes:  # undecoded (the decoding wrapper parses it)
                    self.received_bytes += len(request)
                try:
                    resp = await behavior(request, context)
                except BaseException:
                    handled[(method, _code(context, "Unknown"))] += 1
                    raise
                code = _code(context, "OK")
                handled[(method, code)] += 1
                if code == "OK":
                    sent[method] += 1
                    self.sent_bytes += _size(resp)
                return resp

            return grpc.unary_unary_rpc_method_handler(unary, **options)
        return self._wrap_stream(method, handler, options)

    def _wrap_stream(self, method: str, handler: grpc.RpcMethodHandler, options: dict) -> grpc.RpcMethodHandler:
        started, handled, received = self.started, self.handled, self.received
        kind = (handler.request_streaming, handler.response_streaming)
        behavior = {
            (False, True): handler.unary_stream,
            (True, False): handler.stream_unary,
            (True, True): handler.stream_stream,
        }[kind]

        def counted_requests(requests):
            async def each():
                async for request in requests:
                    received[method] += 1
                    yield request
            return each()

        def begin(request_or_iterator, context):
            started[method] += 1
            if handler.request_streaming:
                request_or_iterator = counted_requests(request_or_iterator)
            else:
                received[method] += 1
            return request_or_iterator, _CountingContext(context, self, method)

        # grpcio tells generator handlers from context.write ones by their
        # kind, so the wrapper is of the same kind as what it wraps.
        if inspect.isasyncgenfunction(behavior):
            async def run(request_or_iterator, context):
                request_or_iterator, counting = begin(request_or_iterator, context)
                try:
                    async for resp in behavior(request_or_iterator, counting):
                        counting.count(resp)
                        yield resp
                except BaseException:
                    handled[(method, _code(context, "Unknown"))] += 1
                    raise
                handled[(method, _code(context, "OK"))] += 1
        else:
            async def run(request_or_iterator, context):
                request_or_iterator, counting = begin(request_or_iterator, context)
                try:
                    resp = await behavior(request_or_iterator, counting)
                except BaseException:
                    handled[(method, _code(context, "Unknown"))] += 1
                    raise
                handled[(method, _code(context, "OK"))] += 1
                if resp is not None:
                    counting.count(resp)
                return resp

        make = {
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[kind]
        return make(run, **options)

    def collect(self):
        with self._lock:  # thread handlers count while this copies
            started, handled, received, sent = (dict(self.started), dict(self.handled),
                                                dict(self.received), dict(self.sent))
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        families = {
            "started": CounterMetricFamily("grpc_server_started_total",
                                           "Total number of RPCs started on the server.", labels=labels),
            "received": CounterMetricFamily("grpc_server_msg_received_total",
                                            "Total number of RPC stream messages received on the server.",
                                            labels=labels),
            "sent": CounterMetricFamily("grpc_server_msg_sent_total",
                                        "Total number of gRPC stream messages sent by the server.", labels=labels),
        }
        handled_family = CounterMetricFamily(
            "grpc_server_handled_total",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            labels=["grpc_code"] + labels)
        methods = dict(self.methods)
        for method in set(started) - set(methods):
            service, _, name = method.strip("/").rpartition("/")
            methods[method] = ("unary", service, name)
        for method, label_values in sorted(methods.items()):
            values = list(label_values)
            families["started"].add_metric(values, started.get(method, 0))
            families["received"].add_metric(values, received.get(method, 0))
            families["sent"].add_metric(values, sent.get(method, 0))
            for code in GO_CODE_NAMES.values():
                handled_family.add_metric([code] + values, handled.get((method, code), 0))
        yield families["started"]
        yield handled_family
        yield families["received"]
        yield families["sent"]
        yield CounterMetricFamily("etcd_network_client_grpc_received_bytes_total",
                                  "The total number of bytes received from grpc clients.", value=self.received_bytes)
        yield CounterMetricFamily("etcd_network_client_grpc_sent_bytes_total",
                                  "The total number of bytes sent to grpc clients.", value=self.sent_bytes)


def _size(message) -> int:
    # A raw-bytes handler answers already serialized messages.
    return len(message) if type(message) is bytes else message.ByteSize()


def _code(context, default: str) -> str:
    """The code the call ended with: what the servicer set or aborted
    with, else ``default`` (OK on return, Unknown on an exception)."""
    code = context.code()
    return default if code is None else GO_CODE_NAMES.get(code, "Unknown")


class _CountingContext:
    """A stream's servicer context whose ``write`` also counts."""

    __slots__ = ("_context", "_metrics", "_method")

    def __init__(self, context, metrics: GrpcMetrics, method: str):
        self._context = context
        self._metrics = metrics
        self._method = method

    def count(self, resp) -> None:
        self._metrics.sent[self._method] += 1
        self._metrics.sent_bytes += _size(resp)

    async def write(self, resp) -> None:
        await self._context.write(resp)
        self.count(resp)

    def __getattr__(self, name):
        return getattr(self._context, name)


class Metrics:
    """One server's registry: the engine's collector, the gRPC counters,
    health checks and the process."""

    def __init__(self, node: Node):
        self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.registry)
        self.grpc = GrpcMetrics()
        self.health_success = 0
        self.health_failures = 0
        self._node = node
        self.registry.register(self.grpc)
        self.registry.register(_Collected(self._collect))

    def health_checked(self, healthy: bool) -> None:
        if healthy:
            self.health_success += 1
        else:
            self.health_failures += 1

    def _collect(self):
        yield from self._server()
        yield from self._mvcc()
        yield _untyped("etcd_server_health_success", "The total number of successful health checks",
                       self.health_success)
        yield _untyped("etcd_server_health_failures", "The total number of failed health checks",
                       self.health_failures)
        yield from _fds()

    def _server(self):
        node, store = self._node, self._node.store
        status = store.status()
        yield GaugeMetricFamily("etcd_server_has_leader", "Whether or not a leader exists. 1 is existence, 0 is not.",
                                value=1)
        yield GaugeMetricFamily("etcd_server_is_leader", "Whether or not this member is a leader. 1 if is, 0 otherwise.",
                                value=1)
        yield GaugeMetricFamily("etcd_server_is_learner", "Whether or not this member is a learner. 1 if is, 0 otherwise.",
                                value=0)
        yield CounterMetricFamily("etcd_server_leader_changes_seen_total", "The number of leader changes seen.",
                                  value=0)
        yield GaugeMetricFamily("etcd_server_proposals_committed_total",
                                "The total number of consensus proposals committed.", value=status.raft_index)
        yield GaugeMetricFamily("etcd_server_proposals_applied_total",
                                "The total number of consensus proposals applied.", value=status.applied_index)
        yield GaugeMetricFamily("etcd_server_proposals_pending", "The current number of pending proposals to commit.",
                                value=getattr(store, "pending_proposals", 0))
        yield CounterMetricFamily("etcd_server_proposals_failed_total", "The total number of failed proposals seen.",
                                  value=0)
        version = GaugeMetricFamily("etcd_server_version", "Which version is running. 1 for 'server_version' label "
                                    "with current version.", labels=["server_version"])
        version.add_metric([node.version], 1)
        yield version
        cluster = GaugeMetricFamily("etcd_cluster_version", "Which version is running. 1 for 'cluster_version' "
                                    "label with current cluster version", labels=["cluster_version"])
        cluster.add_metric([node.cluster_version], 1)
        yield cluster
        server_id = GaugeMetricFamily("etcd_server_id", "Server or member ID in hexadecimal format. 1 for "
                                      "'server_id' label with current ID.", labels=["server_id"])
        server_id.add_metric([f"{node.member_id:x}"], 1)
        yield server_id
        yield GaugeMetricFamily("etcd_server_quota_backend_bytes", "Current backend storage quota size in bytes.",
                                value=node.quota_bytes or DEFAULT_QUOTA)
        yield GaugeMetricFamily("etcd_mvcc_db_total_size_in_bytes",
                                "Total size of the underlying database physically allocated in bytes.",
                                value=status.db_size)
        yield GaugeMetricFamily("etcd_debugging_mvcc_db_total_size_in_bytes",
                                "Total size of the underlying database physically allocated in bytes.",
                                value=status.db_size)
        yield GaugeMetricFamily("etcd_mvcc_db_total_size_in_use_in_bytes",
                                "Total size of the underlying database logically in use in bytes.",
                                value=status.db_size_in_use)
        yield GaugeMetricFamily("etcd_debugging_mvcc_keys_total", "Total number of keys.", value=status.keys)
        yield GaugeMetricFamily("etcd_debugging_mvcc_current_revision", "The current revision of store.",
                                value=status.revision)
        yield GaugeMetricFamily("etcd_debugging_mvcc_compact_revision", "The revision of the last compaction in store.",
                                value=max(status.compact_revision, 0))

    def _mvcc(self):
        store = self._node.store
        hub = store.watch_hub
        watchers = hub.stats()
        yield GaugeMetricFamily("etcd_debugging_mvcc_watcher_total", "Total number of watchers.",
                                value=sum(watchers.values()))
        yield GaugeMetricFamily("etcd_debugging_mvcc_slow_watcher_total", "Total number of unsynced slow watchers.",
                                value=watchers.get("unsynced", 0) + watchers.get("victims", 0))
        yield CounterMetricFamily("etcd_debugging_mvcc_events_total", "Total number of events sent by this member.",
                                  value=getattr(hub, "events_sent", 0))
        stats = getattr(store, "stats", None)
        if stats is None:
            return
        for name, value, doc in (
            ("range", stats.ranges, "Total number of ranges seen by this member."),
            ("put", stats.puts, "Total number of puts seen by this member."),
            ("delete", stats.deletes, "Total number of deletes seen by this member."),
            ("txn", stats.txns, "Total number of txns seen by this member."),
        ):
            yield CounterMetricFamily(f"etcd_mvcc_{name}_total", doc, value=value)
            yield CounterMetricFamily(f"etcd_debugging_mvcc_{name}_total", doc, value=value)
        yield GaugeMetricFamily("etcd_debugging_mvcc_total_put_size_in_bytes",
                                "The total size of put kv pairs seen by this member.", value=stats.put_bytes)
        yield _histogram("etcd_disk_wal_fsync_duration_seconds",
                         "The latency distributions of fsync called by WAL.", stats.wal_fsync)
        yield _histogram("etcd_disk_backend_commit_duration_seconds",
                         "The latency distributions of commit called by backend.", stats.backend_commit)
        for name, value, doc in (
            ("etcd_debugging_lease_granted_total", stats.leases_granted, "The total number of granted leases."),
            ("etcd_debugging_lease_revoked_total", stats.leases_revoked, "The total number of revoked leases."),
            ("etcd_debugging_lease_renewed_total", stats.leases_renewed,
             "The number of renewed leases seen by the leader."),
            ("etcd_debugging_server_lease_expired_total", stats.leases_expired,
             "The total number of expired leases."),
        ):
            yield CounterMetricFamily(name, doc, value=value)


class _Collected:
    """A collector from a generator function."""

    def __init__(self, collect):
        self.collect = collect


def _untyped(name: str, doc: str, value: float) -> Metric:
    metric = Metric(name, doc, "unknown")
    metric.add_sample(name, {}, value)
    return metric


def _histogram(name: str, doc: str, histogram) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, buckets=histogram.cumulative(), sum_value=histogram.total)


def _fds():
    try:
        used = len(os.listdir("/proc/self/fd"))
    except OSError:
        return
    yield GaugeMetricFamily("os_fd_used", "The number of used file descriptors.", value=used)
    yield GaugeMetricFamily("os_fd_limit", "The file descriptor limit.",
                            value=resource.getrlimit(resource.RLIMIT_NOFILE)[0])

"""The ``mvcckv serve`` process: one gRPC server in front of one store.

The server is grpcio's thread server (``--grpc-server threads``, the
default; ``threaded.py``): KV's Range, Put, DeleteRange and Txn and
Lease's Grant and Revoke run on its threads, every other method on the
event loop; or grpc.aio's server, with every call on the loop
(``--grpc-server aio``).

Life cycle::

    open the store (in a thread: it replays the WAL)
    derive / recall the member and cluster IDs
    bind every listen URL, start, log one "ready" line
    ... serve ...
    SIGINT/SIGTERM: stop accepting, give in-flight requests GRACE_SECONDS,
                    stop auto-compaction, close the store
    a second signal: os._exit at once (safe: every acknowledged write is in
                    the WAL, which the next start replays)

Services: KV, Watch, Lease, Maintenance, Cluster, Auth and
grpc.health.v1.Health.  One guard (``guard.py``) does every service's
access checks, with the token provider ``--auth-token`` names.

gRPC settings follow etcd (ETCD_SEMANTICS §1.3): receive limit
max-request-bytes + 512 KiB, send limit 2^31-1, --max-concurrent-streams,
server pings by --grpc-keepalive-interval/-timeout, and keepalive
enforcement that tolerates etcdctl's client pings (every 10 s, also between
calls) instead of answering them with GOAWAY "too_many_pings".

http:// and https:// listeners may be mixed; each https one serves with the
TLS of ``mvcckv.server.tls``, checked before the store is opened.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import logging
import os
import signal
import socket
import sys
import threading

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from mvcckv import errors
from mvcckv.pb import rpc_pb2_grpc
from mvcckv.pb import rpc_pb2 as pb
from mvcckv.server import compactor as compactor_mod
from mvcckv.server import engines, httpd, threaded, tls
from mvcckv.server.auth import AuthServicer, token_listener
from mvcckv.server.cluster import ClusterServicer
from mvcckv.server.config import Config, Listener
from mvcckv.server.guard import Guard
from mvcckv.server.kv import KVServicer
from mvcckv.server.lease import LeaseServicer
from mvcckv.server.maintenance import MaintenanceServicer
from mvcckv.server.metrics import Metrics
from mvcckv.server.node import Node
from mvcckv.server.rpctypes import InvalidClientAPIVersionError, status_code, unmarshal
from mvcckv.server.tokens import token_provider
from mvcckv.server.watch import WatchServicer
from mvcckv.store import KIND_COMPACT

log = logging.getLogger("mvcckv.server")

GRACE_SECONDS = 5.0
GRPC_OVERHEAD_BYTES = 512 * 1024
MAX_SEND_BYTES = 2**31 - 1

CLIENT_API_VERSION_KEY = "client-api-version"


# What grpc-go uses when etcd passes it no setting (a keepalive flag of 0):
# the enforcement policy's minimum ping interval, and the server's ping
# interval and timeout.
GRPC_DEFAULT_MIN_PING_INTERVAL = 5 * 60.0
GRPC_DEFAULT_KEEPALIVE_INTERVAL = 2 * 60 * 60.0
GRPC_DEFAULT_KEEPALIVE_TIMEOUT = 20.0
# grpcio takes channel arguments as C ints.
_MAX_GRPC_INT = 2**31 - 1


def grpc_options(config: Config) -> list[tuple[str, int]]:
    min_ping = config.grpc_keepalive_min_time
    if min_ping <= 0:
        min_ping = GRPC_DEFAULT_MIN_PING_INTERVAL
    interval, timeout = config.grpc_keepalive_interval, config.grpc_keepalive_timeout
    if interval <= 0 or timeout <= 0:
        interval, timeout = GRPC_DEFAULT_KEEPALIVE_INTERVAL, GRPC_DEFAULT_KEEPALIVE_TIMEOUT
    options = [
        ("grpc.max_receive_message_length", config.max_request_bytes + GRPC_OVERHEAD_BYTES),
        ("grpc.max_send_message_length", MAX_SEND_BYTES),
        # grpcio's defaults (5 min, no pings without calls, 2 strikes)
        # would GOAWAY etcdctl's 10 s pings, also those between calls.
        # With unlimited strikes no ping is ever refused, so the minimum
        # (--grpc-keepalive-min-time) only names what counts as a strike.
        ("grpc.http2.min_ping_interval_without_data_ms", _ms(min_ping)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_ping_strikes", 0),
        # etcd's server-side keepalive: ping an idle client every
        # interval (2 h), give up after timeout (20 s) without an answer.
        ("grpc.keepalive_time_ms", _ms(interval)),
        ("grpc.keepalive_timeout_ms", _ms(timeout)),
        # Without this a second server could bind the same port and the
        # kernel would split clients between the two.
        ("grpc.so_reuseport", 0),
    ]
    streams = config.max_concurrent_streams
    # grpc-go reads 0 as "no limit"; grpcio's own default is no limit, and
    # it cannot take etcd's default of 2^32-1.
    if 0 < streams < _MAX_GRPC_INT:
        options.append(("grpc.max_concurrent_streams", streams))
    return options


def _ms(seconds: float) -> int:
    return max(1, min(_MAX_GRPC_INT, round(seconds * 1000)))


# --- metadata ------------------------------------------------------------------


def client_api_version_ok(value: str) -> bool:
    """Whether a ``client-api-version`` value arrived as valid UTF-8.

    grpcio hands non-binary metadata to Python as text: UTF-8-decoded when
    the bytes were valid UTF-8, otherwise Latin-1-decoded.  The raw bytes
    are gone, so invalid input is recognised by its Latin-1 shape: only
    characters below U+0100, at least one above ASCII, whose Latin-1 bytes
    are not valid UTF-8.  (A valid value made only of U+0080..U+00FF
    characters, such as "é", looks the same and is refused too; real
    clients send ASCII such as "3.4".)
    """
    if value.isascii():
        return True
    try:
        raw = value.encode("latin-1")
    except UnicodeEncodeError:
        return True  # characters above U+00FF: it was decoded as UTF-8
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class Dispatcher(grpc.GenericRpcHandler):
    """Every method of every service, found in one dict per call, with
    etcd's request metadata checks.

    ``client-api-version`` must be valid UTF-8.  ``hasleader`` ("fail if
    there is no leader") always holds: this server is its own leader.

    Services register here as they would on a server (the generated
    ``add_*Servicer_to_server`` functions take it as one), and the server
    gets this one generic handler.  It is grpc.aio's cheapest way to look at
    every call: ``service`` is a plain function call, where with a server
    interceptor grpc.aio awaits two more coroutines per call (its
    ``_run_interceptor`` and the interceptor's ``intercept_service``).  It
    is also the one place that sees every call first, should anything need
    to (a per-RPC counter).
    """

    def __init__(self):
        self._methods: dict[str, grpc.RpcMethodHandler] = {}
        self._generic: list[grpc.GenericRpcHandler] = []

    def add_registered_method_handlers(self, service: str, methods: dict[str, grpc.RpcMethodHandler]) -> None:
        """Register (or replace) methods of ``service``."""
        for name, handler in methods.items():
            self._methods[f"/{service}/{name}"] = _decoding_request(handler)

    def add_generic_rpc_handlers(self, handlers) -> None:
        # Generated code registers every service both ways; a handler that
        # only comes this way is asked after the registered methods.
        self._generic.extend(handlers)

    def service(self, handler_call_details):
        handler = self._methods.get(handler_call_details.method)
        if handler is None:
            for generic in self._generic:
                handler = generic.service(handler_call_details)
                if handler is not None:
                    break
            else:
                return None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == CLIENT_API_VERSION_KEY and isinstance(value, str) and not client_api_version_ok(value):
                return _refusing(handler, InvalidClientAPIVersionError())
        return handler


def _decoding_request(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """The handler, decoding its request itself.

    grpcio turns a request its deserializer cannot parse into UNKNOWN
    "Unexpected <class DecodeError>" with a traceback in the log; etcd
    (grpc-go) answers INTERNAL "grpc: error unmarshalling request: ...",
    and so do we, quietly: bad bytes from a client are not a server fault.
    A streaming request (the rpc wrapper answers an undecodable message)
    and a raw-bytes handler (it parses with ``rpctypes.unmarshal``) are
    left as they are.
    """
    parse = handler.request_deserializer
    if handler.request_streaming or parse is None or not threaded.is_async(handler):
        return handler
    if handler.response_streaming:
        behavior = handler.unary_stream

        # grpcio tells generator handlers from context.write ones by their
        # kind, so the wrapper must be of the same kind.
        if inspect.isasyncgenfunction(behavior):
            async def stream(raw, context):
                async for resp in behavior(await unmarshal(parse, raw, context), context):
                    yield resp
        else:
            async def stream(raw, context):
                await behavior(await unmarshal(parse, raw, context), context)

        return grpc.unary_stream_rpc_method_handler(stream, response_serializer=handler.response_serializer)
    behavior = handler.unary_unary

    async def unary(raw, context):
        return await behavior(await unmarshal(parse, raw, context), context)

    return grpc.unary_unary_rpc_method_handler(unary, response_serializer=handler.response_serializer)


def _refusing(handler: grpc.RpcMethodHandler, err: errors.MvccError) -> grpc.RpcMethodHandler:
    async def refuse(request_or_iterator, context):
        await context.abort(status_code(err), str(err))

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


# --- start and stop ---------------------------------------------------------------


class BindError(OSError):
    pass


def _bind(server: grpc.aio.Server, listener: Listener, credentials: grpc.ServerCredentials | None) -> int:
    try:
        if listener.secure:
            port = server.add_secure_port(listener.address, credentials)
        else:
            port = server.add_insecure_port(listener.address)
    except RuntimeError:
        port = 0
    if port == 0:
        raise BindError(f"listen tcp {listener.address}: bind: {_bind_problem(listener)}")
    return port


def _bind_problem(listener: Listener) -> str:
    """Why binding failed, in the operating system's words (gRPC only says
    that it failed)."""
    try:
        infos = socket.getaddrinfo(listener.host, listener.port, type=socket.SOCK_STREAM)
    except OSError as err:
        return str(err)
    for family, kind, proto, _, addr in infos:
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.bind(addr)
        except OSError as err:
            return _go_style(os.strerror(err.errno) if err.errno else str(err))
    return _go_style(os.strerror(errno.EADDRNOTAVAIL))


def _go_style(text: str) -> str:
    # etcd (Go) prints "address already in use"; tools grep for that.
    return text[:1].lower() + text[1:]


def build_guard(node: Node, config: Config) -> Guard:
    """The access checks, with the token provider the flags ask for.

    The provider must hear of every auth change (tokens of a deleted user
    die with it), and starts enabled when the data dir has auth on, as
    etcd's auth store enables its provider at open.
    """
    tokens = token_provider(config.auth_token, config.auth_token_ttl)
    guard = Guard(node.store, tokens, cert_auth=config.client_cert_auth)
    guard.auth.add_listener(token_listener(guard))
    if guard.auth.enabled:
        tokens.enable()
    return guard


def build_server(node: Node, config: Config,
                 metrics: Metrics | None = None) -> tuple[grpc.Server | grpc.aio.Server, health.aio.HealthServicer]:
    """The gRPC server ``--grpc-server`` names (``threaded.py``), with
    every service; the caller binds and starts it."""
    methods, health_servicer = build_services(node, config, threads=config.grpc_server == "threads")
    if config.grpc_server == "threads":
        # The metrics counters wrap each handler before it is bridged, so
        # they see the calls the dispatcher's metadata checks refuse too.
        bridge = threaded.Bridge(methods, asyncio.get_running_loop(),
                                 metrics.grpc.wrap if metrics is not None else None)
        return threaded.new_server(grpc_options(config), bridge), health_servicer
    # The metrics interceptor, when there is one, sees every call before the
    # dispatcher's metadata checks, so it counts the calls they refuse too.
    interceptors = [metrics.grpc] if metrics is not None else None
    server = grpc.aio.server(options=grpc_options(config), interceptors=interceptors)
    server.add_generic_rpc_handlers((methods,))
    return server, health_servicer


def build_services(node: Node, config: Config, threads: bool) -> tuple[Dispatcher, health.aio.HealthServicer]:
    methods = Dispatcher()
    guard = build_guard(node, config)
    kv = KVServicer(node, guard)
    rpc_pb2_grpc.add_KVServicer_to_server(kv, methods)
    methods.add_registered_method_handlers("etcdserverpb.KV", kv.raw_handlers())
    if threads:
        # Over the raw ones: what an engine cannot serve on a thread
        # (PostgreSQL's async Range) stays raw, on the loop.
        methods.add_registered_method_handlers("etcdserverpb.KV", kv.threaded_handlers())
    node.store.watch_hub.progress_interval = config.watch_progress_notify_interval
    watch = WatchServicer(node, config.max_request_bytes + GRPC_OVERHEAD_BYTES, guard)
    rpc_pb2_grpc.add_WatchServicer_to_server(watch, methods)
    methods.add_registered_method_handlers("etcdserverpb.Watch", watch.raw_handlers())
    lease = LeaseServicer(node, guard)
    rpc_pb2_grpc.add_LeaseServicer_to_server(lease, methods)
    if threads:
        methods.add_registered_method_handlers("etcdserverpb.Lease", lease.threaded_handlers())
    rpc_pb2_grpc.add_MaintenanceServicer_to_server(MaintenanceServicer(node, guard), methods)
    rpc_pb2_grpc.add_ClusterServicer_to_server(ClusterServicer(node, guard), methods)
    rpc_pb2_grpc.add_AuthServicer_to_server(AuthServicer(node, guard), methods)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, methods)
    return methods, health_servicer


def start_compactor(node: Node, config: Config, clock=None) -> asyncio.Task | None:
    store = node.store

    async def compact(rev: int) -> None:
        await asyncio.wrap_future(store.propose(KIND_COMPACT, pb.CompactionRequest(revision=rev)))

    comp = compactor_mod.new_compactor(
        config.auto_compaction_mode, config.auto_compaction_retention, lambda: store.revision, compact, clock
    )
    if comp is None:
        return None
    retention = config.auto_compaction_retention
    log.info("auto-compaction: %s", f"every 5 min, keeping {retention} revisions"
             if config.auto_compaction_mode == compactor_mod.MODE_REVISION
             else f"periodic, keeping {retention / compactor_mod.SECOND:g} s of history")
    return asyncio.get_running_loop().create_task(comp.run(), name="mvcckv-auto-compaction")


async def serve(config: Config) -> int:
    backend = engines.for_config(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals: list[str] = []

    def on_signal(sig: signal.Signals) -> None:
        if signals:
            log.warning("second signal (%s): exiting now; every acknowledged write is durable", sig.name)
            logging.shutdown()
            os._exit(1)
        signals.append(sig.name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)

    for warning in config.warnings:
        log.warning("%s", warning)
    try:
        server_tls = await asyncio.to_thread(tls.server_tls, config)
    except tls.TLSError as err:
        log.error("cannot serve TLS: %s", err)
        return 1
    credentials = server_tls.credentials() if server_tls is not None else None
    try:
        node = await asyncio.to_thread(backend.open_node, config)
    except backend.open_errors as err:
        log.error("cannot open the %s: %s", backend.what(config), err)
        return 1
    if stop.is_set():
        await asyncio.to_thread(node.store.close)
        return 0

    server = None
    comp_task = None
    http = None
    loopback = None
    try:
        # Counting gRPC calls costs a little on each; only done when some
        # listener serves /metrics.
        serves_http = bool(config.http_listeners or config.metrics_listeners)
        metrics = Metrics(node) if serves_http else None
        server, health_servicer = build_server(node, config, metrics)
        urls = []
        for listener in config.listeners:
            port = _bind(server, listener, credentials)
            urls.append(listener.url if port == listener.port else
                        f"{listener.scheme}://{listener.address.rpartition(':')[0]}:{port}")
        if serves_http:
            loopback = httpd.Loopback()
            if server.add_insecure_port(loopback.target) == 0:
                raise BindError(f"cannot listen on the gateway's unix socket {loopback.path}")
        await start_server(server)
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        if loopback is not None:
            http = httpd.HttpServer(node, metrics, loopback.channel(), config.max_request_bytes)
            try:
                urls += await http.start(config.http_listeners, False, server_tls)
                metrics_urls = await http.start(config.metrics_listeners, True, server_tls)
            except OSError as err:
                raise BindError(err.strerror or str(err)) from None
            if metrics_urls:
                log.info("serving /metrics and /health on %s", ", ".join(metrics_urls))
        comp_task = start_compactor(node, config)
        log.info(
            "ready to serve client requests on %s (name %s, member %x, cluster %x, %s, etcd %s, %s gRPC server, "
            "%s loop)",
            ", ".join(urls), node.name, node.member_id, node.cluster_id, backend.where(config), node.version,
            config.grpc_server, config.event_loop,
        )
        await stop.wait()
        log.info("received %s: stopping (in-flight requests get %.0f s)", signals[0], GRACE_SECONDS)
        await health_servicer.enter_graceful_shutdown()
        return 0
    except BindError as err:
        log.error("%s", err)
        return 1
    finally:
        if comp_task is not None:
            comp_task.cancel()
            await asyncio.gather(comp_task, return_exceptions=True)
        if http is not None:
            # Before the gRPC server: the gateway's calls are its clients.
            await http.stop()
        if server is not None:
            await stop_server(server, GRACE_SECONDS)
        if loopback is not None:
            loopback.remove()
        await asyncio.to_thread(node.store.close)
        log.info("stopped")


async def start_server(server) -> None:
    started = server.start()
    if started is not None:  # grpc.aio's start is a coroutine
        await started


async def stop_server(server, grace: float) -> None:
    stopped = server.stop(grace)
    if isinstance(stopped, threading.Event):  # the thread server's
        # The loop keeps running meanwhile: calls in their grace period may
        # still need it (everything but the thread handlers runs there).
        await asyncio.to_thread(stopped.wait)
    else:
        await stopped


def configure_logging(level: str) -> None:
    levels = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR}
    logging.basicConfig(
        level=levels[level],
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def main(config: Config) -> int:
    configure_logging(config.log_level)
    with asyncio.Runner(loop_factory=loop_factory(config.event_loop)) as runner:
        return runner.run(serve(config))


def loop_factory(name: str):
    """The event loop constructor ``--event-loop`` names.

    uvloop by default: most of a served call's CPU is grpc.aio's callbacks
    and futures on the loop, which uvloop runs in C (bench/grpc_load.py's
    ``noop-uvloop`` reference against ``noop-aio`` shows the difference).
    """
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop

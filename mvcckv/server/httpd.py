"""The HTTP/1.1 listeners: etcd's JSON gateway, ``/health``, ``/version``
and ``/metrics``, served by aiohttp on the server's own event loop.

Two kinds of listener, as etcd's flags make them:

* ``--listen-client-http-urls``: everything below (etcd 3.4 serves this on
  its client URLs, multiplexed with gRPC; mvcckv gives it ports of its own
  because grpcio owns its listening sockets and cannot hand HTTP/1.1
  connections to another server);
* ``--listen-metrics-urls``: ``/metrics`` and ``/health`` only.

The gateway reaches the gRPC services through a unix socket that the gRPC
server also listens on, in a directory only this user can enter: a
loopback that needs no TLS whatever the client listeners use, and that no
other user on the machine can reach.

Answers outside the gateway, as etcd 3.4.23 gives them:

* ``GET /health``: ``{"health":"true"}`` (200) or ``{"health":"false"}``
  (503) — false while an alarm is raised (``?exclude=NOSPACE`` ignores that
  one) or when a read of the store fails or takes over a second (a stopped
  or failed store); from 3.5 on (``--emulated-version``) with etcd's
  ``"reason"`` (``""``, ``"ALARM NOSPACE"``, ``"RANGE ERROR:..."``); other
  methods get 405 with ``Allow: GET``;
* ``GET /version``: ``{"etcdserver":"3.4.23","etcdcluster":"3.4.0"}``, and
  from 3.6 on ``"storage"`` too (``"3.6.0"``);
* from 3.6 on, ``GET /livez`` and ``/readyz`` (and ``/livez/<check>``,
  ``?exclude=<check>``, ``?verbose``): ``ok``, or 503 listing each check as
  ``[+]name ok`` / ``[-]name failed: why`` — the checks are etcd's
  (serializable and linearizable reads, no CORRUPT alarm, not a learner);
* ``/metrics``: Prometheus' text format (``metrics.py``);
* ``/v3`` redirects to ``/v3/``; ``/v3beta/...`` is ``/v3/...``;
  ``OPTIONS`` on any path answers 200 with etcd's CORS headers, which every
  answer of the client listener carries; any other path 404
  ``404 page not found``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import ssl
import tempfile

import grpc
from aiohttp import web
from prometheus_client import generate_latest

from mvcckv.pb import rpc_pb2 as pb
from mvcckv.server.config import Listener
from mvcckv.server.gateway import Gateway, text_error
from mvcckv.server.metrics import Metrics
from mvcckv.server.node import Node
from mvcckv.server.tls import ServerTLS

log = logging.getLogger("mvcckv.server")

# etcd 3.6's probes and their checks, in the order they are reported
# (etcd's own order is that of a Go map: random).
PROBES = {
    "livez": ("serializable_read",),
    "readyz": ("data_corruption", "linearizable_read", "non_learner", "serializable_read"),
}

HEALTH_TIMEOUT = 1.0
"""Seconds the health check's read may take (etcd's QGET timeout)."""

# The text format etcd (and every Prometheus) speaks; generate_latest
# writes it for names that need no escaping, which all of ours are.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "POST, GET, OPTIONS, PUT, DELETE",
    "Access-Control-Allow-Headers": "accept, content-type, authorization",
}

# Bodies are handed to the gRPC services, which enforce
# --max-request-bytes with etcd's messages; this cap only stops a client
# from making the gateway buffer without end (base64 makes a value 4/3 as
# long, and JSON adds a little).
_BODY_OVERHEAD = 2


class Loopback:
    """The private unix socket the gateway calls the gRPC services on."""

    def __init__(self):
        self._dir = tempfile.mkdtemp(prefix="mvcckv-gw-")  # mode 0700
        self.path = os.path.join(self._dir, "grpc.sock")

    @property
    def target(self) -> str:
        return f"unix:{self.path}"

    def channel(self) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(self.target, options=[
            ("grpc.max_receive_message_length", -1),
            ("grpc.max_send_message_length", -1),
            ("grpc.enable_http_proxy", 0),
        ])

    def remove(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)


class HttpServer:
    def __init__(self, node: Node, metrics: Metrics, channel: grpc.aio.Channel, max_request_bytes: int):
        self._node = node
        self._metrics = metrics
        self._channel = channel
        self._gateway = Gateway(channel)
        self._max_body = (max_request_bytes + 512 * 1024) * _BODY_OVERHEAD
        self._runners: list[web.AppRunner] = []
        # /health gained "reason" in 3.5, /version "storage" in 3.6.
        self._release = tuple(int(part) for part in node.version.split(".")[:2])

    async def start(self, listeners: tuple[Listener, ...], metrics_only: bool,
                    server_tls: ServerTLS | None) -> list[str]:
        """Bind every listener; returns their URLs (with the port a 0 got).
        Raises OSError when an address cannot be bound."""
        app = web.Application(client_max_size=self._max_body)
        app.router.add_route("*", "/{tail:.*}", self._metrics_only if metrics_only else self._client)
        if not metrics_only:
            app.on_response_prepare.append(_add_cors)
        # The handler of a stream is cancelled when its client goes away,
        # which ends the gRPC stream behind it (a watch).
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        self._runners.append(runner)
        urls = []
        for listener in listeners:
            context = _ssl_context(server_tls) if listener.secure else None
            site = web.TCPSite(runner, listener.host, listener.port, ssl_context=context,
                               reuse_address=True, reuse_port=False)
            try:
                await site.start()
            except OSError as err:
                reason = os.strerror(err.errno) if err.errno else str(err)
                # etcd's (Go's) wording, which tools grep for.
                raise OSError(err.errno, f"listen tcp {listener.address}: bind: {reason[:1].lower()}{reason[1:]}") \
                    from None
            port = runner.addresses[-1][1]  # the port a :0 listener got
            urls.append(listener.url if port == listener.port else f"{listener.scheme}://{listener.host}:{port}")
        return urls

    async def stop(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        await self._channel.close()

    # -- dispatch --

    async def _client(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if request.method == "OPTIONS":
            return web.Response(status=200)
        if path.startswith("/v3beta/"):
            path = "/v3/" + path[len("/v3beta/"):]
        if path == "/v3":
            raise web.HTTPMovedPermanently("/v3/")
        if path.startswith("/v3/"):
            return await self._gateway.handle(request, path)
        if path == "/version":
            return self._version(request)
        return await self._metrics_only(request)

    async def _metrics_only(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/metrics":
            # Off the loop: the PostgreSQL engine's status is a query.
            body = await asyncio.to_thread(generate_latest, self._metrics.registry)
            return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})
        if request.path == "/health":
            return await self._health(request)
        kind, _, check = request.path.strip("/").partition("/")
        if kind in PROBES and self._release >= (3, 6) and (not check or check in PROBES[kind]):
            return await self._probe(request, kind, check)
        return text_error(404, "404 page not found")

    # -- /health and /version --

    async def _health(self, request: web.Request) -> web.Response:
        if request.method != "GET":
            return text_error(405, "Method Not Allowed", {"Allow": "GET"})
        reason = await self.unhealthy_reason(request.query.getall("exclude", []))
        self._metrics.health_checked(reason is None)
        answer = {"health": "false" if reason is not None else "true"}
        if self._release >= (3, 5):
            answer["reason"] = reason or ""
        body = json.dumps(answer, separators=(",", ":"))
        if reason is not None:
            return text_error(503, body)
        return web.Response(text=body, content_type="text/plain", charset="utf-8")

    async def _probe(self, request: web.Request, kind: str, check: str) -> web.Response:
        """etcd 3.6's /livez and /readyz (and /livez/<check>): each check
        run, ``ok`` or 503 with the ``[+]``/``[-]`` lines of every check."""
        if request.method != "GET":
            return text_error(405, "Method Not Allowed", {"Allow": "GET"})
        excluded = set(request.query.getall("exclude", []))
        names = [check] if check else [name for name in PROBES[kind] if name not in excluded]
        lines, failed = [], False
        for name in names:
            problem = await self._check(name)
            failed = failed or problem is not None
            lines.append(f"[-]{name} failed: {problem}\n" if problem is not None else f"[+]{name} ok\n")
        report = "".join(lines)
        if failed:
            return text_error(503, report)  # Go's http.Error adds a newline to the report's own
        verbose = report if "verbose" in request.query else ""
        return web.Response(text=verbose + "ok\n", content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    async def _check(self, name: str) -> str | None:
        if name == "data_corruption":
            corrupt = any(alarm == pb.CORRUPT for _, alarm in self._node.store.alarms())
            return "alarm activated: CORRUPT" if corrupt else None
        if name == "non_learner":
            return None  # a single member is never a learner
        # serializable_read and linearizable_read: one member reads locally either way.
        return await self._read_problem()

    async def _read_problem(self) -> str | None:
        store = self._node.store
        try:
            if getattr(store, "reads_may_block", False):
                await asyncio.wait_for(asyncio.to_thread(store.get_kv, b"health"), HEALTH_TIMEOUT)
            else:
                store.get_kv(b"health")
        except Exception as err:  # noqa: BLE001 - any failure is "unhealthy", logged
            log.warning("health check: the store does not answer: %s", err)
            return str(err) or type(err).__name__
        return None

    async def unhealthy_reason(self, excluded_alarms: list[str]) -> str | None:
        """None when healthy, else etcd 3.6's reason."""
        store = self._node.store
        for _, alarm in store.alarms():
            name = pb.AlarmType.Name(alarm)
            if name not in excluded_alarms:
                return f"ALARM {name if name in ('NOSPACE', 'CORRUPT') else 'UNKNOWN'}"
        # etcd reads through raft with a timeout; here a point read of the
        # store proves it open and answering.
        problem = await self._read_problem()
        return None if problem is None else f"RANGE ERROR:{problem}"

    def _version(self, request: web.Request) -> web.Response:
        if request.method not in ("GET", "HEAD"):
            return text_error(405, "Method Not Allowed", {"Allow": "GET,HEAD"})
        body = {"etcdserver": self._node.version, "etcdcluster": self._node.storage_version}
        if self._release >= (3, 6):
            body["storage"] = self._node.storage_version
        return web.Response(body=json.dumps(body, separators=(",", ":")).encode(), content_type="application/json")


async def _add_cors(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(_CORS)


def _ssl_context(server_tls: ServerTLS | None) -> ssl.SSLContext:
    """The https listeners' TLS: the gRPC listeners' certificate and client
    certificate rules."""
    assert server_tls is not None, "Config checks that https:// listeners have TLS settings"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # ssl reads a key pair only from files: written to a private
    # directory, loaded, and removed at once.
    scratch = tempfile.mkdtemp(prefix="mvcckv-tls-")
    try:
        cert, key = os.path.join(scratch, "cert.pem"), os.path.join(scratch, "key.pem")
        for path, data in ((cert, server_tls.certificate_chain), (key, server_tls.private_key)):
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                f.write(data)
        context.load_cert_chain(cert, key)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if server_tls.trusted_ca is not None:
        context.load_verify_locations(cadata=server_tls.trusted_ca.decode())
    if server_tls.require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
    return context

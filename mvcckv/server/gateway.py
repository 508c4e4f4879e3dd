"""etcd's JSON gateway: ``POST /v3/<service>/<call>`` with a JSON body.

As in etcd, the gateway is a gRPC *client* of this very server: each HTTP
request becomes the protobuf request, is sent over a loopback channel to
the server's own gRPC services (a private unix socket, see ``httpd.py``),
and the answer — or the gRPC status — goes back as the JSON etcd's
grpc-gateway writes (``jsonpb.py``).  So every rule (validation, auth,
quotas, the error messages) has exactly one implementation, and gateway
calls count as gRPC calls in ``/metrics``, as etcd's do.  The
``Authorization`` header travels as the ``token`` metadata, raw (no
``Bearer``), as etcd expects it.

Answers, as etcd 3.4.23 gives them (checked by tests/test_http_diff.py):

* success: 200, ``application/json``, the response message;
* a gRPC error: ``{"error": M, "message": M, "code": C, "details": []}``
  with the HTTP status of :data:`HTTP_STATUS` (etcd 3.6's gateway sends
  ``code``, ``message``, ``details``; sending all four serves clients of
  either release);
* a body that does not decode: 400, code 3, Go's decoder message;
* a path under ``/v3/`` that is no call: 404 ``Not Found``; another
  method than POST on a call's path: 405 ``Method Not Allowed``.

Streams (``/v3/watch``, ``/v3/lease/keepalive``, and the server stream
``/v3/maintenance/snapshot``) answer chunked, each response message as
``{"result": {...}}`` and a newline in one chunk, so that a client
decoding chunk by chunk never sees half a message.  The request body is
read as a stream of JSON values (several watch requests may follow each
other, and more may arrive while the answer streams).  The stream lasts
as long as the gRPC stream does: a watch until the client hangs up, a
keep-alive until its request body ends.  An error after the first message
is sent as a last chunk ``{"error": {"grpc_code", "http_code", "message",
"http_status"}}``, grpc-gateway's shape.
"""

from __future__ import annotations

import asyncio
import codecs
import json
from dataclasses import dataclass
from http import HTTPStatus

import grpc
from aiohttp import web
from google.protobuf.message import Message

from mvcckv.pb import rpc_pb2 as pb
from mvcckv.server import jsonpb

TOKEN_METADATA_KEY = "token"

# gRPC code → HTTP status, as etcd 3.4.23 answers (its gateway maps
# FailedPrecondition to 412, which later grpc-gateway releases changed to 400).
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 408,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 412,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}


@dataclass(frozen=True)
class Route:
    method: str
    """The gRPC method, ``/etcdserverpb.KV/Range``."""
    request: type[Message]
    response: type[Message]
    client_streaming: bool
    server_streaming: bool


def _routes() -> dict[str, Route]:
    # (path under /v3/, service, method): etcd's google.api.http bindings,
    # with 3.4's aliases under kv/lease/ that etcd3gw still calls.
    table = (
        ("kv/range", "KV", "Range"),
        ("kv/put", "KV", "Put"),
        ("kv/deleterange", "KV", "DeleteRange"),
        ("kv/txn", "KV", "Txn"),
        ("kv/compaction", "KV", "Compact"),
        ("watch", "Watch", "Watch"),
        ("lease/grant", "Lease", "LeaseGrant"),
        ("lease/revoke", "Lease", "LeaseRevoke"),
        ("kv/lease/revoke", "Lease", "LeaseRevoke"),
        ("lease/keepalive", "Lease", "LeaseKeepAlive"),
        ("lease/timetolive", "Lease", "LeaseTimeToLive"),
        ("kv/lease/timetolive", "Lease", "LeaseTimeToLive"),
        ("lease/leases", "Lease", "LeaseLeases"),
        ("kv/lease/leases", "Lease", "LeaseLeases"),
        ("cluster/member/add", "Cluster", "MemberAdd"),
        ("cluster/member/remove", "Cluster", "MemberRemove"),
        ("cluster/member/update", "Cluster", "MemberUpdate"),
        ("cluster/member/list", "Cluster", "MemberList"),
        ("cluster/member/promote", "Cluster", "MemberPromote"),
        ("maintenance/alarm", "Maintenance", "Alarm"),
        ("maintenance/status", "Maintenance", "Status"),
        ("maintenance/defragment", "Maintenance", "Defragment"),
        # 3.4 bound both Hash and HashKV here and serves Hash; 3.5 moved
        # HashKV to its own path.
        ("maintenance/hash", "Maintenance", "Hash"),
        ("maintenance/hashkv", "Maintenance", "HashKV"),
        ("maintenance/snapshot", "Maintenance", "Snapshot"),
        ("maintenance/transfer-leadership", "Maintenance", "MoveLeader"),
        ("maintenance/downgrade", "Maintenance", "Downgrade"),
        ("auth/enable", "Auth", "AuthEnable"),
        ("auth/disable", "Auth", "AuthDisable"),
        ("auth/status", "Auth", "AuthStatus"),
        ("auth/authenticate", "Auth", "Authenticate"),
        ("auth/user/add", "Auth", "UserAdd"),
        ("auth/user/get", "Auth", "UserGet"),
        ("auth/user/list", "Auth", "UserList"),
        ("auth/user/delete", "Auth", "UserDelete"),
        ("auth/user/changepw", "Auth", "UserChangePassword"),
        ("auth/user/grant", "Auth", "UserGrantRole"),
        ("auth/user/revoke", "Auth", "UserRevokeRole"),
        ("auth/role/add", "Auth", "RoleAdd"),
        ("auth/role/get", "Auth", "RoleGet"),
        ("auth/role/list", "Auth", "RoleList"),
        ("auth/role/delete", "Auth", "RoleDelete"),
        ("auth/role/grant", "Auth", "RoleGrantPermission"),
        ("auth/role/revoke", "Auth", "RoleRevokePermission"),
    )
    services = pb.DESCRIPTOR.services_by_name
    routes = {}
    for path, service, name in table:
        method = services[service].methods_by_name[name]
        routes["/v3/" + path] = Route(
            method=f"/{method.containing_service.full_name}/{name}",
            request=getattr(pb, method.input_type.name),
            response=getattr(pb, method.output_type.name),
            client_streaming=method.client_streaming,
            server_streaming=method.server_streaming,
        )
    return routes


ROUTES = _routes()

JSON = "application/json"
# The gRPC response header grpc-gateway passes on (Grpc-Metadata-<key>).
_FORWARDED = {"Grpc-Metadata-Content-Type": "application/grpc"}


def text_error(status: int, text: str, headers: dict[str, str] | None = None) -> web.Response:
    """Go's ``http.Error``: the text, a newline, ``text/plain``."""
    return web.Response(status=status, text=text + "\n", charset="utf-8", content_type="text/plain",
                        headers={"X-Content-Type-Options": "nosniff", **(headers or {})})


def error_body(code: grpc.StatusCode, message: str) -> bytes:
    return json.dumps({"error": message, "message": message, "code": code.value[0], "details": []},
                             separators=(",", ":")).encode()


def error_response(code: grpc.StatusCode, message: str) -> web.Response:
    return web.Response(status=HTTP_STATUS.get(code, 500), body=error_body(code, message), content_type=JSON)


def stream_error_chunk(code: grpc.StatusCode, message: str) -> bytes:
    status = HTTP_STATUS.get(code, 500)
    error = {"grpc_code": code.value[0], "http_code": status, "message": message,
             "http_status": HTTPStatus(status).phrase}
    return json.dumps({"error": error}, separators=(",", ":")).encode() + b"\n"


class Gateway:
    """The ``/v3/`` handler over one loopback gRPC channel."""

    def __init__(self, channel: grpc.aio.Channel):
        self._channel = channel
        self._calls = {}
        for path, route in ROUTES.items():
            ser, de = route.request.SerializeToString, route.response.FromString
            kind = {
                (False, False): channel.unary_unary,
                (False, True): channel.unary_stream,
                (True, True): channel.stream_stream,
            }[(route.client_streaming, route.server_streaming)]
            self._calls[path] = kind(route.method, request_serializer=ser, response_deserializer=de)

    async def handle(self, request: web.Request, path: str) -> web.StreamResponse:
        route = ROUTES.get(path)
        if route is None:
            return text_error(404, "Not Found")
        if request.method != "POST":
            return text_error(405, "Method Not Allowed")
        token = request.headers.get("Authorization")
        metadata = ((TOKEN_METADATA_KEY, token),) if token else None
        call = self._calls[path]
        if route.client_streaming:
            return await self._bidi(request, route, call, metadata)
        try:
            message = jsonpb.parse(await request.read(), route.request)
        except jsonpb.DecodeError as err:
            return error_response(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        if route.server_streaming:
            return await _forward_stream(request, call(message, metadata=metadata))
        try:
            resp = await call(message, metadata=metadata)
        except grpc.aio.AioRpcError as err:
            return error_response(err.code(), err.details() or "")
        return web.Response(body=jsonpb.marshal(resp), content_type=JSON, headers=_FORWARDED)

    async def _bidi(self, request: web.Request, route: Route, call, metadata) -> web.StreamResponse:
        body = BodyStream(request)
        stream = call(metadata=metadata)
        try:
            first = await body.next(route.request)
        except jsonpb.DecodeError as err:
            stream.cancel()
            # Not a gRPC status: grpc-gateway answers Unknown.
            return error_response(grpc.StatusCode.UNKNOWN, str(err))
        if first is None:
            await stream.done_writing()
            pump = None
        else:
            await stream.write(first)
            pump = asyncio.get_running_loop().create_task(_pump(body, route, stream))
        try:
            return await _forward_stream(request, stream)
        finally:
            if pump is not None:
                pump.cancel()
                await asyncio.gather(pump, return_exceptions=True)


async def _pump(body: "BodyStream", route: Route, stream) -> None:
    """Send the rest of the body's requests; a bad one ends the sending
    (as grpc-gateway's loop does), not the stream."""
    try:
        while True:
            message = await body.next(route.request)
            if message is None:
                break
            await stream.write(message)
    except (jsonpb.DecodeError, ConnectionError):
        pass
    except grpc.aio.AioRpcError:
        return  # the stream ended: its status reaches the reader
    try:
        await stream.done_writing()
    except grpc.aio.AioRpcError:
        pass


async def _forward_stream(request: web.Request, stream) -> web.StreamResponse:
    """The gRPC stream's messages as chunks; the HTTP status is decided by
    the first message (or the error that came instead)."""
    try:
        first = await stream.read()
    except grpc.aio.AioRpcError as err:
        return error_response(err.code(), err.details() or "")
    resp = web.StreamResponse(headers={"Content-Type": JSON, **_FORWARDED})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    message = first
    try:
        while message is not grpc.aio.EOF:
            await resp.write(b'{"result":' + jsonpb.marshal(message) + b"}\n")
            message = await stream.read()
    except grpc.aio.AioRpcError as err:
        await resp.write(stream_error_chunk(err.code(), err.details() or ""))
    finally:
        stream.cancel()
    await resp.write_eof()
    return resp


class BodyStream:
    """A request body read as a stream of JSON values, each parsed as it
    is complete (Go's ``json.Decoder`` over the body)."""

    def __init__(self, request: web.Request):
        self._content = request.content
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text = ""
        self._pos = 0
        self._eof = False

    async def next(self, cls: type[Message]) -> Message | None:
        while not self._eof and not jsonpb.complete(self._text, self._pos):
            chunk = await self._content.readany()
            if not chunk:
                self._eof = True
                self._text += self._decoder.decode(b"", final=True)
            else:
                self._text += self._decoder.decode(chunk)
        found = jsonpb.next_value(self._text, self._pos)
        if found is None:
            return None
        value, self._pos = found
        message = cls()
        jsonpb.fill(message, value)
        return message

"""What the checks drive: a small interface, and adapters for an embedded
mvcckv store and for any server speaking etcd's v3 gRPC API.

A target takes etcd's protobuf requests and returns etcd's protobuf
responses; a request the system refuses raises the
:class:`~mvcckv.errors.MvccError` subclass carrying etcd's message
(``CompactedError``, ``LeaseNotFoundError``, …).  An answer with no such
type (an unknown text, or a known text under the wrong gRPC code) raises
:class:`RpcFailure`, which never equals a model's error, so a wrong code is
a divergence.  A call whose outcome is unknown (deadline exceeded, server
unreachable) raises :class:`Indeterminate`.

To check your own system without a gRPC front end, write a class with the
methods of :class:`Target` (duck typing is enough) and give a factory for
it to a :class:`~mvcckv.testing.Session` run by
:func:`mvcckv.testing.run_sequential`.  ``changes`` may raise
``NotImplementedError``; the history check is then skipped and said so in
the report.  Top-level response headers are compared by revision only:
cluster ID, member ID and raft term are the server's own.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Protocol, Sequence

import grpc

from mvcckv import errors
from mvcckv.pb import kv_pb2
from mvcckv.pb import rpc_pb2 as pb

Changes = list[tuple[int, list[tuple[bool, kv_pb2.KeyValue]]]]
"""A change log: (main revision, [(is_delete, KeyValue)]) in revision order;
a deletion shows the key and the deleting revision (as a DELETE event)."""


class Target(Protocol):
    """The interface the checks drive (see the module docstring)."""

    def range(self, r: pb.RangeRequest) -> pb.RangeResponse: ...
    def put(self, p: pb.PutRequest) -> pb.PutResponse: ...
    def delete_range(self, d: pb.DeleteRangeRequest) -> pb.DeleteRangeResponse: ...
    def txn(self, t: pb.TxnRequest) -> pb.TxnResponse: ...
    def compact(self, c: pb.CompactionRequest) -> pb.CompactionResponse: ...
    def lease_grant(self, g: pb.LeaseGrantRequest) -> pb.LeaseGrantResponse: ...
    def lease_revoke(self, r: pb.LeaseRevokeRequest) -> pb.LeaseRevokeResponse: ...
    def hash_kv(self, h: pb.HashKVRequest) -> pb.HashKVResponse: ...

    def changes(self, low: int, key: bytes, range_end: bytes, last: int, timeout: float) -> Changes:
        """Every change of ``[key, range_end)`` at revisions ``low..last``."""
        ...

    def close(self) -> None: ...


class RpcFailure(Exception):
    """An answer that is no error etcd gives for this request: the gRPC code
    and text as received."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class Indeterminate(Exception):
    """The call may or may not have taken effect (timeout, lost connection)."""


# --- the embedded store --------------------------------------------------------


class EmbeddedTarget:
    """An :class:`mvcckv.Store` opened in-process (``mvcckv.open``)."""

    def __init__(self, store):
        self.store = store

    def range(self, r):
        return self.store.range_request(r)

    def put(self, p):
        return self.store.put(p.key, p.value, lease=p.lease, prev_kv=p.prev_kv,
                              ignore_value=p.ignore_value, ignore_lease=p.ignore_lease)

    def delete_range(self, d):
        return self.store.delete(d.key, d.range_end, prev_kv=d.prev_kv)

    def txn(self, t):
        return self.store.txn_request(t)

    def compact(self, c):
        return self.store.compact(c.revision, physical=c.physical)

    def lease_grant(self, g):
        return self.store.lease_grant(g.TTL, g.ID)

    def lease_revoke(self, r):
        return self.store.lease_revoke(r.ID)

    def hash_kv(self, h):
        kvh, current = self.store.hash_kv(h.revision)
        resp = pb.HashKVResponse(hash=kvh.hash, compact_revision=kvh.compact_revision, hash_revision=kvh.revision)
        resp.header.revision = current
        return resp

    def changes(self, low, key, range_end, last, timeout):
        from mvcckv.testing.model import in_range

        found, _, _ = self.store.read_changes(low, 1 << 30)
        out = []
        for main, items in found:
            mine = [(d, kv) for d, kv in items if in_range(kv.key, key, range_end)]
            if mine and main <= last:
                out.append((main, mine))
        return out

    def close(self):
        self.store.close()


# --- gRPC ------------------------------------------------------------------------


def _known_errors() -> dict[str, type[errors.MvccError]]:
    """etcd's message -> error type, over every type mvcckv defines."""
    found: dict[str, type[errors.MvccError]] = {}
    pending = [errors.MvccError]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls is not errors.MvccError and cls.__module__ == errors.__name__:
            found.setdefault(cls.message, cls)
    return found


_BY_MESSAGE = _known_errors()
_INDETERMINATE = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


def error_from_status(code: grpc.StatusCode, details: str) -> Exception:
    """The exception a target raises for a gRPC error answer."""
    from mvcckv.server.rpctypes import status_code

    cls = _BY_MESSAGE.get(details)
    if cls is not None and status_code(cls()) == code:
        return cls()
    if code in _INDETERMINATE:
        return Indeterminate(f"{code.name}: {details}")
    return RpcFailure(code, details)


@dataclass(frozen=True)
class Connection:
    """How to reach a server, with etcdctl's TLS and auth options.

    ``endpoint`` is ``host:port``, ``http://host:port`` or
    ``https://host:port`` (TLS; so is any endpoint when ``cacert`` is set).
    ``user`` is ``name`` or ``name:password`` as etcdctl's ``--user``.
    """

    endpoint: str
    cacert: str | None = None
    cert: str | None = None
    key: str | None = None
    user: str | None = None
    password: str | None = None
    timeout: float = 10.0

    @property
    def target(self) -> str:
        return self.endpoint.split("://", 1)[-1].rstrip("/")

    @property
    def tls(self) -> bool:
        return self.endpoint.startswith("https://") or self.cacert is not None or self.cert is not None

    def channel(self) -> grpc.Channel:
        options = [("grpc.enable_http_proxy", 0), ("grpc.max_receive_message_length", -1)]
        if not self.tls:
            return grpc.insecure_channel(self.target, options=options)

        def read(path):
            if path is None:
                return None
            with open(path, "rb") as f:
                return f.read()

        creds = grpc.ssl_channel_credentials(read(self.cacert), read(self.key), read(self.cert))
        return grpc.secure_channel(self.target, creds, options=options)

    def metadata(self, channel: grpc.Channel) -> tuple[tuple[str, str], ...]:
        """The auth token header, after Authenticate, or nothing without a user."""
        if not self.user:
            return ()
        name, _, password = self.user.partition(":")
        if self.password is not None:
            password = self.password
        from mvcckv.pb import rpc_pb2_grpc

        auth = rpc_pb2_grpc.AuthStub(channel)
        try:
            resp = auth.Authenticate(pb.AuthenticateRequest(name=name, password=password), timeout=self.timeout)
        except grpc.RpcError as err:
            raise error_from_status(err.code(), err.details() or "") from None
        return (("token", resp.token),)


class GrpcTarget:
    """A server speaking etcd's v3 gRPC API (etcd, mvcckv serve, kine, …)."""

    def __init__(self, connection: Connection):
        from mvcckv.pb import rpc_pb2_grpc

        self.connection = connection
        self.channel = connection.channel()
        self.metadata = connection.metadata(self.channel)
        self.kv = rpc_pb2_grpc.KVStub(self.channel)
        self.lease = rpc_pb2_grpc.LeaseStub(self.channel)
        self.maintenance = rpc_pb2_grpc.MaintenanceStub(self.channel)
        self.watch_stub = rpc_pb2_grpc.WatchStub(self.channel)

    def _call(self, method, request):
        try:
            return method(request, timeout=self.connection.timeout, metadata=self.metadata)
        except grpc.RpcError as err:
            raise error_from_status(err.code(), err.details() or "") from None

    def range(self, r):
        return self._call(self.kv.Range, r)

    def put(self, p):
        return self._call(self.kv.Put, p)

    def delete_range(self, d):
        return self._call(self.kv.DeleteRange, d)

    def txn(self, t):
        return self._call(self.kv.Txn, t)

    def compact(self, c):
        return self._call(self.kv.Compact, c)

    def lease_grant(self, g):
        return self._call(self.lease.LeaseGrant, g)

    def lease_revoke(self, r):
        return self._call(self.lease.LeaseRevoke, r)

    def lease_time_to_live(self, r):
        return self._call(self.lease.LeaseTimeToLive, r)

    def lease_keep_alive(self, lease_id: int) -> pb.LeaseKeepAliveResponse:
        """One keep-alive on a stream of its own."""
        try:
            replies = self.lease.LeaseKeepAlive(iter([pb.LeaseKeepAliveRequest(ID=lease_id)]),
                                                timeout=self.connection.timeout, metadata=self.metadata)
            for reply in replies:
                return reply
        except grpc.RpcError as err:
            raise error_from_status(err.code(), err.details() or "") from None
        raise Indeterminate("the keep-alive stream closed without an answer")

    def hash_kv(self, h):
        return self._call(self.maintenance.HashKV, h)

    def status(self) -> pb.StatusResponse:
        return self._call(self.maintenance.Status, pb.StatusRequest())

    def watch(self, requests: Sequence[pb.WatchRequest] | None = None) -> "WatchStream":
        return WatchStream(self, requests or ())

    def changes(self, low, key, range_end, last, timeout):
        """A watch from ``low`` until an event at ``last`` (or later) arrives."""
        out: Changes = []
        create = pb.WatchRequest(create_request=pb.WatchCreateRequest(
            key=key, range_end=range_end, start_revision=low))
        with self.watch([create]) as stream:
            for resp in stream.responses(timeout):
                if resp.canceled:
                    raise error_from_status(grpc.StatusCode.UNKNOWN, resp.cancel_reason)
                for ev in resp.events:
                    rev = ev.kv.mod_revision
                    if rev > last:
                        return out
                    kv = kv_pb2.KeyValue()
                    kv.CopyFrom(ev.kv)
                    if not out or out[-1][0] != rev:
                        out.append((rev, []))
                    out[-1][1].append((ev.type == ev.DELETE, kv))
                if out and out[-1][0] >= last:
                    return out
        return out

    def close(self):
        self.channel.close()


class WatchStream:
    """A bidirectional Watch stream: requests can be added while it runs;
    responses are read with a deadline.  A context manager."""

    _END = object()

    def __init__(self, target: GrpcTarget, first: Sequence[pb.WatchRequest]):
        self._cond = threading.Condition()
        self._outgoing: list = list(first)
        self._closed = False
        self._call = target.watch_stub.Watch(self._requests(), metadata=target.metadata)
        self._reader = _Reader(self._call)

    def _requests(self):
        while True:
            with self._cond:
                while not self._outgoing and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                item = self._outgoing.pop(0)
            yield item

    def send(self, request: pb.WatchRequest) -> None:
        with self._cond:
            self._outgoing.append(request)
            self._cond.notify_all()

    def responses(self, timeout: float):
        """Responses until ``timeout`` seconds have passed or the stream ends."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            item = self._reader.next(left)
            if item is None or item is self._END:
                return
            yield item

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._call.cancel()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Reader:
    """Reads a response iterator in a thread so a read can time out."""

    def __init__(self, call):
        self._cond = threading.Condition()
        self._items: list = []
        self._done = False
        threading.Thread(target=self._pump, args=(call,), daemon=True).start()

    def _pump(self, call):
        try:
            for item in call:
                with self._cond:
                    self._items.append(item)
                    self._cond.notify_all()
        except grpc.RpcError:
            pass  # cancelled by close(), or the server went away: the end
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def next(self, timeout: float):
        with self._cond:
            if not self._cond.wait_for(lambda: self._items or self._done, timeout):
                return None
            return self._items.pop(0) if self._items else WatchStream._END

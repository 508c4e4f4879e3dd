"""Deliberately broken etcd servers, for proving that ``mvcckv check``
finds what it claims to find.

Each mutant is a gRPC proxy in the test process in front of a correct
``mvcckv serve``: it passes every call through as raw bytes and breaks
exactly one rule on the way, the way a buggy store would show it to its
clients.  A proxy is also what an operator puts in front of etcd, so "a
proxy that does X" is a realistic bug in its own right.

    with Mutant(upstream_endpoint, "limit_ignored") as m:
        ... m.endpoint ...

Mutants (``MUTANTS``):

``reused_revision``  after a delete, the next put answers the delete's revision
``half_txn``         a txn whose compares fail also applies its first success put
``watch_skips``      the watch stream drops every 40th event
``limit_ignored``    a range with a limit answers every key (count right, more false)
``stale_reads``      a range repeated within a second gets the earlier answer
"""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc

from harness import CHANNEL_OPTIONS
from mvcckv.pb import rpc_pb2 as pb

MUTANTS = ("reused_revision", "half_txn", "watch_skips", "limit_ignored", "stale_reads")

_STREAMS = {"/etcdserverpb.Watch/Watch", "/etcdserverpb.Lease/LeaseKeepAlive"}


def _raw(data: bytes) -> bytes:
    return data


class Mutant(grpc.GenericRpcHandler):
    """A proxy to ``upstream`` breaking the rule named ``kind``."""

    def __init__(self, upstream: str, kind: str):
        if kind not in MUTANTS:
            raise ValueError(f"unknown mutant {kind!r}; one of {MUTANTS}")
        self.kind = kind
        self.channel = grpc.insecure_channel(upstream, options=CHANNEL_OPTIONS)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=32), handlers=[self])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.lock = threading.Lock()
        self.deleted_at = 0  # reused_revision: the last delete's revision
        self.cache: dict[bytes, tuple[float, bytes]] = {}  # stale_reads
        self.events = 0  # watch_skips

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self):
        self.server.start()
        return self

    def __exit__(self, *exc):
        self.server.stop(grace=None)
        self.channel.close()

    # -- plumbing ----------------------------------------------------------------

    def service(self, details):
        method = details.method
        if method in _STREAMS:
            return grpc.stream_stream_rpc_method_handler(
                lambda requests, ctx: self._stream(method, requests, ctx), _raw, _raw)
        return grpc.unary_unary_rpc_method_handler(lambda req, ctx: self._unary(method, req, ctx), _raw, _raw)

    def _forward(self, method: str, request: bytes, ctx) -> bytes:
        call = self.channel.unary_unary(method, request_serializer=_raw, response_deserializer=_raw)
        try:
            return call(request, metadata=ctx.invocation_metadata(), timeout=10)
        except grpc.RpcError as err:
            ctx.abort(err.code(), err.details() or "")

    def _stream(self, method, requests, ctx):
        call = self.channel.stream_stream(method, request_serializer=_raw, response_deserializer=_raw)
        replies = call(requests, metadata=ctx.invocation_metadata())
        ctx.add_callback(replies.cancel)
        try:
            for reply in replies:
                if method.endswith("/Watch") and self.kind == "watch_skips":
                    reply = self._skip(reply)
                yield reply
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                ctx.abort(err.code(), err.details() or "")

    # -- the mutations ---------------------------------------------------------------

    def _unary(self, method: str, request: bytes, ctx) -> bytes:
        kind = self.kind
        if kind == "reused_revision" and method.endswith(".KV/DeleteRange"):
            reply = self._forward(method, request, ctx)
            resp = pb.DeleteRangeResponse.FromString(reply)
            if resp.deleted:
                with self.lock:
                    self.deleted_at = resp.header.revision
            return reply
        if kind == "reused_revision" and method.endswith(".KV/Put"):
            resp = pb.PutResponse.FromString(self._forward(method, request, ctx))
            with self.lock:
                if self.deleted_at:
                    resp.header.revision, self.deleted_at = self.deleted_at, 0
            return resp.SerializeToString()
        if kind == "half_txn" and method.endswith(".KV/Txn"):
            reply = self._forward(method, request, ctx)
            txn = pb.TxnRequest.FromString(request)
            if not pb.TxnResponse.FromString(reply).succeeded:
                puts = [op.request_put for op in txn.success if op.WhichOneof("request") == "request_put"]
                if puts:
                    self._forward("/etcdserverpb.KV/Put", puts[0].SerializeToString(), ctx)
            return reply
        if kind == "limit_ignored" and method.endswith(".KV/Range"):
            r = pb.RangeRequest.FromString(request)
            if r.limit > 0 and not r.count_only:
                r.limit = 0
                return self._forward(method, r.SerializeToString(), ctx)
        if kind == "stale_reads" and method.endswith(".KV/Range"):
            now = time.monotonic()
            with self.lock:
                hit = self.cache.get(request)
            if hit is not None and now - hit[0] < 1.0:
                return hit[1]
            reply = self._forward(method, request, ctx)
            with self.lock:
                self.cache[request] = (now, reply)
            return reply
        return self._forward(method, request, ctx)

    def _skip(self, reply: bytes) -> bytes:
        resp = pb.WatchResponse.FromString(reply)
        if not resp.events:
            return reply
        kept = []
        with self.lock:
            for ev in resp.events:
                self.events += 1
                if self.events % 40:
                    kept.append(ev)
        if len(kept) == len(resp.events):
            return reply
        del resp.events[:]
        resp.events.extend(kept)
        return resp.SerializeToString()

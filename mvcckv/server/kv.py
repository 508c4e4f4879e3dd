"""etcd's KV service: Range, Put, DeleteRange, Txn, Compact.

On the thread front end (``threaded.py``, the default) Range, Put,
DeleteRange and Txn run on a server thread: a read there, a write blocking
only its thread until it is durable (``threaded_handlers``).  On grpc.aio,
and for Compact, reads run on the event loop (the store answers them from
memory and the page cache without waiting on a write); writes are proposed
to the store's writer thread and awaited, so the loop never waits for an
fsync.  A Txn
without writes is a read.  The engine fills ``header.revision`` (and the
inner headers of a txn); we add the identity to the top-level header.

With auth on, the guard checks each request first (``guard.py``): a read
is withdrawn if the auth store changed while it ran, a write carries the
auth revision it was checked at into the log.

Range and Put, the calls clients make most, take and give raw bytes
(``raw_handlers``): Range splices the stored KeyValue bytes into its answer
when the engine offers ``range_raw`` (``mvcckv/wire.py``), and Put hands its
request bytes to the engine to log as they arrived.  Every other method,
and an engine without those entry points, goes through protobuf messages.
"""

from __future__ import annotations

import asyncio

import grpc

from mvcckv import wire
from mvcckv.pb import rpc_pb2 as pb
from mvcckv.pb import rpc_pb2_grpc
from mvcckv.server.guard import Guard
from mvcckv.server.node import Node
from mvcckv.server.rpctypes import rpc, rpc_threaded, unmarshal, unmarshal_threaded
from mvcckv.store import KIND_COMPACT, KIND_DELETE_RANGE, KIND_PUT, KIND_TXN
from mvcckv.validate import txn_is_read_only


class KVServicer(rpc_pb2_grpc.KVServicer):
    def __init__(self, node: Node, guard: Guard):
        self._node = node
        self._store = node.store
        self._guard = guard
        # An engine whose reads go over the network (PostgreSQL) must not
        # hold the event loop while they do.
        self._offload_reads = getattr(node.store, "reads_may_block", False)
        self._range_raw = None if self._offload_reads else getattr(node.store, "range_raw", None)
        # An engine with an async Range (PostgreSQL) is awaited on the loop instead.
        self._range_async = getattr(node.store, "range_async", None)

    def raw_handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        """Range and Put as raw-bytes handlers, registered over the
        generated ones (no deserializer, no serializer)."""
        return {
            "Range": grpc.unary_unary_rpc_method_handler(self.Range),
            "Put": grpc.unary_unary_rpc_method_handler(self.Put),
        }

    def threaded_handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        """Range, Put, DeleteRange and Txn as handlers that run on a server
        thread (``--grpc-server threads``, ``threaded.py``): a read runs
        there, a write blocks its thread until it is durable."""
        handlers = {
            "Range": grpc.unary_unary_rpc_method_handler(self.range_threaded),
            "Put": grpc.unary_unary_rpc_method_handler(self.put_threaded),
            "DeleteRange": grpc.unary_unary_rpc_method_handler(self.delete_range_threaded),
            "Txn": grpc.unary_unary_rpc_method_handler(self.txn_threaded),
        }
        if self._range_async is not None:
            # An engine with an async Range (PostgreSQL: one pipelined
            # statement on the loop's connections) keeps it: its blocking
            # range_request takes a transaction and several statements.
            del handlers["Range"]
        return handlers

    @rpc_threaded
    def range_threaded(self, raw: bytes, context) -> bytes:
        request = unmarshal_threaded(_parse_range, raw, context)
        checked = self._guard.range(context, request)
        spliced = self._spliced(request, checked)
        if spliced is not None:
            return spliced
        return self._read_threaded(self._store.range_request, request, checked).SerializeToString()

    @rpc_threaded
    def put_threaded(self, raw: bytes, context) -> bytes:
        request = unmarshal_threaded(_parse_put, raw, context)
        resp = self._node.write_blocking(KIND_PUT, request, self._guard.put(context, request), raw)
        return resp.SerializeToString()

    @rpc_threaded
    def delete_range_threaded(self, raw: bytes, context) -> bytes:
        request = unmarshal_threaded(_parse_delete_range, raw, context)
        checked = self._guard.delete_range(context, request)
        return self._node.write_blocking(KIND_DELETE_RANGE, request, checked).SerializeToString()

    @rpc_threaded
    def txn_threaded(self, raw: bytes, context) -> bytes:
        request = unmarshal_threaded(_parse_txn, raw, context)
        if txn_is_read_only(request):
            checked = self._guard.read_txn(context, request)
            resp = self._read_threaded(self._store.txn_request, request, checked)
        else:
            resp = self._node.write_blocking(KIND_TXN, request, self._guard.txn(context, request))
        return resp.SerializeToString()

    def _spliced(self, request: pb.RangeRequest, checked: int) -> bytes | None:
        """The answer spliced from stored bytes, when the engine can give
        them for this request (``range_raw``); else None."""
        if self._range_raw is None:
            return None
        answer = self._range_raw(request)
        if answer is None:
            return None
        kvs, more, count, revision = answer
        if checked:
            self._guard.settled(checked)
        return wire.range_response(self._node.header_bytes(revision), kvs, more, count)

    def _read_threaded(self, fn, request, checked: int):
        resp = fn(request)
        if checked:
            self._guard.settled(checked)
        self._node.fill(resp.header)
        return resp

    @rpc
    async def Range(self, raw: bytes, context) -> bytes:
        request = await unmarshal(_parse_range, raw, context)
        checked = self._guard.range(context, request)
        spliced = self._spliced(request, checked)
        if spliced is not None:
            return spliced
        if self._range_async is not None:
            resp = await self._range_async(request)
            if checked:
                self._guard.settled(checked)
            self._node.fill(resp.header)
            return resp.SerializeToString()
        resp = await self._read(self._store.range_request, request, checked)
        return resp.SerializeToString()

    @rpc
    async def Put(self, raw: bytes, context) -> bytes:
        request = await unmarshal(_parse_put, raw, context)
        resp = await self._node.write(KIND_PUT, request, self._guard.put(context, request), raw)
        return resp.SerializeToString()

    async def _read(self, fn, request, checked: int):
        if self._offload_reads:
            resp = await asyncio.to_thread(fn, request)
        else:
            resp = fn(request)
        if checked:
            self._guard.settled(checked)
        self._node.fill(resp.header)
        return resp

    @rpc
    async def DeleteRange(self, request, context):
        return await self._node.write(KIND_DELETE_RANGE, request, self._guard.delete_range(context, request))

    @rpc
    async def Txn(self, request, context):
        if txn_is_read_only(request):
            return await self._read(self._store.txn_request, request, self._guard.read_txn(context, request))
        return await self._node.write(KIND_TXN, request, self._guard.txn(context, request))

    @rpc
    async def Compact(self, request, context):
        # Root only, as etcd 3.6.9 and later (3.4 let anyone compact).
        self._guard.admin(context)
        return await self._node.write(KIND_COMPACT, request)


_parse_range = pb.RangeRequest.FromString
_parse_put = pb.PutRequest.FromString
_parse_delete_range = pb.DeleteRangeRequest.FromString
_parse_txn = pb.TxnRequest.FromString

"""etcd's Lease service (ETCD_SEMANTICS §9).

Grant and revoke are logged writes: proposed to the store's writer thread
and awaited.  Keep-alive, TimeToLive and Leases act on the lessor's clock
and memory only, so they are answered on the event loop, as Range is.

etcd's answers kept here:

* ``LeaseGrant`` with ID 0 gets a fresh positive ID, chosen before the
  request is logged so that a replay grants the same one.
* ``LeaseKeepAlive`` answers every request, in order, with a header filled
  *before* the renewal, so its revision is never later than the renewal;
  an unknown or expired lease gets TTL 0, not an error.
* ``LeaseTimeToLive`` of an unknown lease is TTL -1, not an error.
"""

from __future__ import annotations

import grpc

from mvcckv.pb import rpc_pb2 as pb
from mvcckv.pb import rpc_pb2_grpc
from mvcckv.server.guard import Guard
from mvcckv.server.node import Node
from mvcckv.server.rpctypes import rpc, rpc_threaded, unmarshal_threaded
from mvcckv.store import KIND_LEASE_GRANT, KIND_LEASE_REVOKE


class LeaseServicer(rpc_pb2_grpc.LeaseServicer):
    def __init__(self, node: Node, guard: Guard):
        self._node = node
        self._store = node.store
        self._guard = guard

    def threaded_handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        """Grant and revoke as handlers that run on a server thread
        (``--grpc-server threads``): a logged write blocks its thread, as
        KV's do, instead of costing two hops to the event loop."""
        return {
            "LeaseGrant": grpc.unary_unary_rpc_method_handler(self.grant_threaded),
            "LeaseRevoke": grpc.unary_unary_rpc_method_handler(self.revoke_threaded),
        }

    @rpc_threaded
    def grant_threaded(self, raw: bytes, context) -> bytes:
        request = unmarshal_threaded(pb.LeaseGrantRequest.FromString, raw, context)
        self._guard.require(context)
        grant = self._store.new_lease_request(request.TTL, request.ID)
        return self._node.write_blocking(KIND_LEASE_GRANT, grant).SerializeToString()

    @rpc_threaded
    def revoke_threaded(self, raw: bytes, context) -> bytes:
        request = unmarshal_threaded(pb.LeaseRevokeRequest.FromString, raw, context)
        checked = self._guard.lease_write(context, request.ID)
        revoke = pb.LeaseRevokeRequest(ID=request.ID)
        return self._node.write_blocking(KIND_LEASE_REVOKE, revoke, checked).SerializeToString()

    @rpc
    async def LeaseGrant(self, request, context):
        self._guard.require(context)
        return await self._node.write(KIND_LEASE_GRANT, self._store.new_lease_request(request.TTL, request.ID))

    @rpc
    async def LeaseRevoke(self, request, context):
        checked = self._guard.lease_write(context, request.ID)
        return await self._node.write(KIND_LEASE_REVOKE, pb.LeaseRevokeRequest(ID=request.ID), checked)

    @rpc
    async def LeaseKeepAlive(self, request_iterator, context):
        guard = self._guard
        async for req in request_iterator:
            if guard.enabled:
                guard.settled(guard.lease_write(context, req.ID))
            resp = pb.LeaseKeepAliveResponse(ID=req.ID)
            self._node.fill(resp.header)
            resp.TTL = self._store.lease_keepalive(req.ID)
            await context.write(resp)

    @rpc
    async def LeaseTimeToLive(self, request, context):
        # Any user may see a lease's TTL; its keys need READ on each.
        if request.keys:
            checked = self._guard.lease_read(context, (request.ID,))
        else:
            checked = self._guard.require(context)
        resp = self._store.lease_ttl(request.ID, request.keys)
        if request.keys:
            self._guard.settled(checked)
        self._node.fill(resp.header)
        return resp

    @rpc
    async def LeaseLeases(self, request, context):
        resp = self._store.leases()
        if self._guard.enabled:
            self._guard.settled(self._guard.lease_read(context, [lease.ID for lease in resp.leases]))
        self._node.fill(resp.header)
        return resp

"""etcd's Cluster service for a one-member cluster (ETCD_SEMANTICS §12).

MemberList describes this server.  Membership changes cannot succeed: the
answers are etcd's own errors where etcd would give one (bad URLs, a peer
URL already taken, an unknown member, promoting a voter), and otherwise
``UNIMPLEMENTED`` with a message that says why.  Cluster headers carry no
revision, as etcd's do.
"""

from __future__ import annotations

from mvcckv import errors
from mvcckv.pb import rpc_pb2 as pb
from mvcckv.pb import rpc_pb2_grpc
from mvcckv.server import rpctypes
from mvcckv.server.guard import Guard
from mvcckv.server.identity import check_urls
from mvcckv.server.node import RAFT_TERM, Node
from mvcckv.server.rpctypes import rpc


class ClusterServicer(rpc_pb2_grpc.ClusterServicer):
    def __init__(self, node: Node, guard: Guard):
        self._node = node
        self._guard = guard

    def _header(self, header: pb.ResponseHeader) -> None:
        header.cluster_id = self._node.cluster_id
        header.member_id = self._node.member_id
        header.raft_term = RAFT_TERM

    def _members(self, resp):
        self._header(resp.header)
        resp.members.append(self._node.member())
        return resp

    def _check_known(self, member_id: int) -> None:
        if member_id != self._node.member_id:
            raise errors.MemberNotFoundError()

    @rpc
    async def MemberList(self, request, context):
        self._guard.require(context)
        return self._members(pb.MemberListResponse())

    @rpc
    async def MemberAdd(self, request, context):
        try:
            urls = check_urls(request.peerURLs)
        except ValueError:
            raise rpctypes.MemberBadURLsError() from None
        self._guard.admin(context)
        if set(urls) & set(self._node.peer_urls):
            raise rpctypes.PeerURLExistsError()
        raise errors.SingleMemberError()

    @rpc
    async def MemberRemove(self, request, context):
        self._guard.admin(context)
        self._check_known(request.ID)
        raise errors.SingleMemberError()

    @rpc
    async def MemberUpdate(self, request, context):
        self._guard.admin(context)
        self._check_known(request.ID)
        if sorted(request.peerURLs) == sorted(self._node.peer_urls):
            return self._members(pb.MemberUpdateResponse())
        raise errors.SingleMemberError()

    @rpc
    async def MemberPromote(self, request, context):
        self._guard.admin(context)
        self._check_known(request.ID)
        raise errors.NotLearnerError()

"""etcd's Maintenance service (ETCD_SEMANTICS §10).

Everything that reads or rewrites the whole backend (Hash, HashKV,
Defragment, Snapshot) runs in a thread, never on the event loop.  Headers
follow etcd 3.6: Defragment, Snapshot and MoveLeader answer without one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import re

from mvcckv import errors
from mvcckv.pb import rpc_pb2 as pb
from mvcckv.pb import rpc_pb2_grpc
from mvcckv.server import rpctypes
from mvcckv.server.guard import Guard
from mvcckv.server.node import RAFT_TERM, Node
from mvcckv.server.rpctypes import rpc
from mvcckv.store import DEFAULT_QUOTA, KIND_ALARM

log = logging.getLogger("mvcckv.server")

SNAPSHOT_CHUNK = 32 * 1024
_END = object()

# Semantic versions as etcd's downgrade accepts them: MAJOR.MINOR.PATCH with
# optional pre-release and build parts, or MAJOR.MINOR.
_SEMVER = re.compile(r"(\d+)\.(\d+)(?:\.(\d+)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?)?")


def alarm_text(member_id: int, alarm: int) -> str:
    """An alarm as etcd writes it into ``StatusResponse.errors`` (Go's
    protobuf text form of AlarmMember, trailing space included)."""
    return f"memberID:{member_id} alarm:{pb.AlarmType.Name(alarm)} "


class MaintenanceServicer(rpc_pb2_grpc.MaintenanceServicer):
    def __init__(self, node: Node, guard: Guard):
        self._node = node
        self._store = node.store
        self._guard = guard

    @rpc
    async def Alarm(self, request, context):
        if request.action == pb.AlarmRequest.GET:
            self._guard.require(context)
        else:
            self._guard.admin(context)
        if request.action != pb.AlarmRequest.GET:
            return await self._node.write(KIND_ALARM, request)
        # Answered from memory: a read needs no log record.
        resp = pb.AlarmResponse()
        for mid, alarm in self._store.alarms():
            if request.alarm == pb.NONE or request.alarm == alarm:
                resp.alarms.add(memberID=mid, alarm=alarm)
        self._node.fill(resp.header)
        return resp

    @rpc
    async def Status(self, request, context):
        self._guard.require(context)
        node = self._node
        st = self._store.status()
        resp = pb.StatusResponse(
            version=node.version,
            dbSize=st.db_size,
            leader=node.member_id,
            raftIndex=st.raft_index,
            raftTerm=RAFT_TERM,
            raftAppliedIndex=st.applied_index,
            dbSizeInUse=st.db_size_in_use,
            isLearner=False,
            storageVersion=node.storage_version,
            dbSizeQuota=node.quota_bytes or DEFAULT_QUOTA,
            errors=[alarm_text(mid, a) for mid, a in self._store.alarms()],
        )
        resp.downgradeInfo.SetInParent()
        resp.header.revision = st.revision
        node.fill(resp.header)
        return resp

    @rpc
    async def Defragment(self, request, context):
        self._guard.admin(context)
        log.info("starting defragment")
        before, after = await asyncio.to_thread(self._store.defrag)
        log.info("finished defragment: %d -> %d bytes", before, after)
        return pb.DefragmentResponse()

    @rpc
    async def Hash(self, request, context):
        self._guard.admin(context)
        h, rev = await asyncio.to_thread(self._store.hash)
        resp = pb.HashResponse(hash=h)
        resp.header.revision = rev
        self._node.fill(resp.header)
        return resp

    @rpc
    async def HashKV(self, request, context):
        self._guard.admin(context)
        h, current = await asyncio.to_thread(self._store.hash_kv, request.revision)
        resp = pb.HashKVResponse(hash=h.hash, compact_revision=h.compact_revision, hash_revision=h.revision)
        resp.header.revision = current
        self._node.fill(resp.header)
        return resp

    @rpc
    async def Snapshot(self, request, context):
        self._guard.admin(context)
        from mvcckv.snapshot import iter_snapshot

        version = self._node.storage_version
        loop = asyncio.get_running_loop()
        # One thread owns the snapshot generator from start to close; the
        # next chunk is read while the previous one is being sent, so at
        # most two chunks are in memory.
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mvcckv-snapshot")
        chunks = None
        pending = None
        try:
            chunks = await loop.run_in_executor(pool, iter_snapshot, self._store, SNAPSHOT_CHUNK)
            pending = loop.run_in_executor(pool, next, chunks, _END)
            while True:
                item = await pending
                pending = None
                if item is _END:
                    break
                pending = loop.run_in_executor(pool, next, chunks, _END)
                blob, remaining = item
                await context.write(pb.SnapshotResponse(blob=blob, remaining_bytes=remaining, version=version))
        finally:
            # Runs on the same thread after any read in flight, so the
            # generator is closed (its read transaction ended) exactly once.
            if chunks is not None:
                pool.submit(chunks.close)
            pool.shutdown(wait=False)

    @rpc
    async def MoveLeader(self, request, context):
        self._guard.admin(context)
        if request.targetID != self._node.member_id:
            raise errors.BadLeaderTransfereeError()
        # Already the leader: nothing to transfer.  etcd answers this
        # without a header too.
        return pb.MoveLeaderResponse()

    @rpc
    async def Downgrade(self, request, context):
        self._guard.admin(context)
        action = request.action
        if action == pb.DowngradeRequest.CANCEL:
            # etcd 3.6 answers a cancel with no downgrade in progress with
            # success and the cluster version.
            resp = pb.DowngradeResponse(version=self._node.cluster_version)
        elif action in (pb.DowngradeRequest.VALIDATE, pb.DowngradeRequest.ENABLE):
            m = _SEMVER.fullmatch(request.version)
            if m is None:
                raise rpctypes.WrongDowngradeVersionFormatError()
            major, minor = int(m.group(1)), int(m.group(2))
            cur_major, cur_minor = map(int, self._node.cluster_version.split("."))
            if (major, minor) != (cur_major, cur_minor - 1):
                raise rpctypes.InvalidDowngradeTargetVersionError()
            raise rpctypes.DowngradeUnsupportedError()
        else:
            raise rpctypes.UnknownMethodError()
        self._node.fill(resp.header)
        return resp

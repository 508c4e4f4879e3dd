"""etcd's Watch service (ETCD_SEMANTICS §8): one bidirectional gRPC stream
carries many watchers.

Everything a client receives on a stream passes through one
``BufferedStream``, drained by the stream's send task::

    requests ──> _WatchStream.handle ──(created/canceled: force_send)──┐
                                                                        ├──> BufferedStream ──> send task ──> client
    WatchHub (writer and watch threads) ──(events, progress: try_send)──┘

* The hub never waits for a client: on a full buffer ``try_send`` fails
  and the hub parks the response with the watcher (a *victim*, see
  ``mvcckv/watch.py``).  The buffer holds etcd's 128 responses plus one
  per watcher of the stream: one commit gives every watcher of the key a
  response, and with 1,000 watchers on a stream a bound of 128 made most
  of them victims on every revision, each then caught up from the backend
  (bench_watch_lease, many watchers).  It stays bounded, and each extra
  slot holds an EventBatch that shares its events' bytes.
* Control responses are queued in request order, one per create request,
  because Go clientv3 pairs them with its create requests by order, not ID.
* The hub may deliver a commit to a new watcher before its created response
  is queued (the watcher exists from the moment ``hub.watch`` returns).  The
  send task holds a watcher's responses back until its created response is
  out, as etcd's send loop does, so no event precedes its ``created``.

Hub calls take the hub's lock, which a catch-up pass can hold while it reads
up to 1000 revisions, so they run in a worker thread, never on the event
loop.  Requests of one stream are still handled one after the other.

As in etcd, a watcher canceled by compaction keeps its ID on the stream
until the client cancels it, and while it is there a progress request on
the stream gets no answer (the watcher is not synced).
"""

from __future__ import annotations

import asyncio
import threading

import grpc

from mvcckv import errors
from mvcckv.pb import rpc_pb2 as pb
from mvcckv.pb import rpc_pb2_grpc
from mvcckv.server.guard import Guard
from mvcckv.server.node import RAFT_TERM, Node
from mvcckv.server import rpctypes
from mvcckv.server.rpctypes import rpc
from mvcckv import wire
from mvcckv.watch import STREAM_BUFFER, BufferedStream, EventBatch, Watcher, WatchRangeError, normalize_range

AUTO_WATCH_ID = 0
"""A create request's ``watch_id`` that asks the server to pick one."""

INVALID_WATCH_ID = -1
"""The ``watch_id`` of refused creates and of stream-wide progress."""

# Cancel reasons etcd sends as text (§6.4); they are never gRPC errors.
DUPLICATE_WATCH_ID = "mvcc: duplicate watch ID provided on the WatchStream"
COMPACTED = errors.CompactedError.message


class _Control:
    """A created or canceled response, queued in request order."""

    __slots__ = ("resp",)

    def __init__(self, resp: pb.WatchResponse):
        self.resp = resp


def fragments(resp: pb.WatchResponse, limit: int):
    """etcd's ``sendFragments``: ``resp`` itself if it is smaller than
    ``limit`` bytes or has fewer than two events; otherwise consecutive
    responses, each with at least one event and, if it has more than one,
    smaller than ``limit``, all but the last marked ``fragment``.

    >>> from mvcckv.pb import kv_pb2
    >>> r = pb.WatchResponse(watch_id=1)
    >>> r.events.extend(kv_pb2.Event(kv=kv_pb2.KeyValue(key=b"k", value=b"v" * 40)) for _ in range(5))
    >>> [(len(f.events), f.fragment) for f in fragments(r, 120)]
    [(2, True), (2, True), (1, False)]
    """
    if len(resp.events) < 2 or resp.ByteSize() < limit:
        yield resp
        return
    base = pb.WatchResponse()
    base.CopyFrom(resp)
    del base.events[:]
    base.fragment = True
    base_size = base.ByteSize()
    events = resp.events
    i = 0
    while i < len(events):
        part = pb.WatchResponse()
        part.CopyFrom(base)
        size = base_size
        while i < len(events):
            ev_size = events[i].ByteSize()
            # field tag (1 byte) + length varint + the event
            cost = 1 + _varint_len(ev_size) + ev_size
            if part.events and size + cost >= limit:
                break
            part.events.append(events[i])
            size += cost
            i += 1
        if i == len(events):
            part.fragment = False
        yield part


def _serialize(resp) -> bytes:
    return resp if type(resp) is bytes else resp.SerializeToString()


def _varint_len(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def _auth_cancel_reason(err: errors.MvccError) -> str:
    """etcd refuses a watch it may not serve with a cancel, not an RPC
    error, and names only these four reasons, each as the Go client's text
    of its gRPC status."""
    if not isinstance(err, (errors.InvalidAuthTokenError, errors.AuthOldRevisionError, errors.UserEmptyError)):
        err = errors.PermissionDeniedError()
    return rpctypes.go_status_text(err)


class WatchServicer(rpc_pb2_grpc.WatchServicer):
    def __init__(self, node: Node, fragment_bytes: int, guard: Guard):
        """``fragment_bytes``: etcd's max-request-bytes + 512 KiB, the size
        from which responses of ``fragment`` watchers are split."""
        self._node = node
        self._fragment_bytes = fragment_bytes
        self._guard = guard

    def raw_handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        """Watch with a serializer that also takes an answer already encoded
        (events, see ``_WatchStream._send``), registered over the generated one."""
        return {"Watch": grpc.stream_stream_rpc_method_handler(
            self.Watch, request_deserializer=pb.WatchRequest.FromString, response_serializer=_serialize)}

    @rpc
    async def Watch(self, request_iterator, context):
        stream = _WatchStream(self._node, self._fragment_bytes, asyncio.get_running_loop(), self._guard, context)
        sender = asyncio.create_task(stream.send_loop(context.write), name="mvcckv-watch-send")
        try:
            async for req in request_iterator:
                await stream.handle(req)
                if sender.done():
                    break
            # A client that closes its sending side still gets its events:
            # the stream ends when the RPC does.
            await sender
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            await stream.close()


class _WatchStream:
    """The watchers of one gRPC stream and their IDs (etcd's
    serverWatchStream and mvcc.watchStream in one)."""

    def __init__(self, node: Node, fragment_bytes: int, loop: asyncio.AbstractEventLoop, guard: Guard, context):
        self._node = node
        self._guard = guard
        self._context = context
        self._store = node.store
        self._hub = node.store.watch_hub
        self._fragment_bytes = fragment_bytes
        self._out = BufferedStream(capacity=STREAM_BUFFER, loop=loop, encoded=True)
        # Guards _watchers and _closed against a create finishing in a
        # worker thread while the stream closes.
        self._mu = threading.Lock()
        # ID -> watcher; None while the watcher is being created.
        self._watchers: dict[int, Watcher | None] = {}
        self._next_id = 0
        self._closed = False

    # -- requests (one at a time, in order) ------------------------------------

    async def handle(self, req: pb.WatchRequest) -> None:
        kind = req.WhichOneof("request_union")
        if kind == "create_request":
            await self._create(req.create_request)
        elif kind == "cancel_request":
            await self._cancel(req.cancel_request.watch_id)
        elif kind == "progress_request":
            watchers = [w for w in self._watchers.values() if w is not None]
            await asyncio.to_thread(self._hub.request_progress, self._out, watchers)
        # etcd ignores a request with nothing set, and so do we.

    async def _create(self, creq: pb.WatchCreateRequest) -> None:
        key = creq.key or b"\0"  # the smallest key
        if creq.start_revision < 0:
            self._refuse(COMPACTED)
            return
        if self._guard.enabled:
            try:
                self._guard.watch(self._context, key, creq.range_end)
            except errors.MvccError as err:
                self._refuse(_auth_cancel_reason(err))
                return
        try:
            normalize_range(key, creq.range_end)
        except WatchRangeError as err:
            self._refuse(str(err))
            return
        wid = creq.watch_id
        if wid == AUTO_WATCH_ID:
            while self._next_id in self._watchers:
                self._next_id += 1
            wid = self._next_id
            self._next_id += 1
        elif wid in self._watchers:
            self._refuse(DUPLICATE_WATCH_ID)
            return
        self._watchers[wid] = None
        created = await asyncio.to_thread(self._watch, wid, key, creq)
        if created is not None:
            resp = pb.WatchResponse(watch_id=wid, created=True)
            resp.header.revision = created
            self._out.force_send(_Control(resp))

    def _watch(self, wid: int, key: bytes, creq: pb.WatchCreateRequest) -> int | None:
        """Create the watcher (worker thread); its created revision, or None
        if the stream closed meanwhile."""
        w, rev = self._hub.watch(
            self._out, key, creq.range_end, creq.start_revision, watch_id=wid,
            prev_kv=creq.prev_kv, filters=creq.filters,
            progress_notify=creq.progress_notify, fragment=creq.fragment,
        )
        with self._mu:
            if not self._closed:
                self._watchers[wid] = w
                # One more response of room (see the module docstring).
                self._out.capacity += 1
                return rev
        self._hub.cancel(w)
        return None

    def _refuse(self, reason: str) -> None:
        resp = pb.WatchResponse(watch_id=INVALID_WATCH_ID, created=True, canceled=True, cancel_reason=reason)
        resp.header.revision = self._store.revision
        self._out.force_send(_Control(resp))

    async def _cancel(self, wid: int) -> None:
        w = self._watchers.pop(wid, None)
        if w is None:
            return  # unknown ID: etcd does not answer
        await asyncio.to_thread(self._hub.cancel, w)
        self._out.capacity -= 1
        resp = pb.WatchResponse(watch_id=wid, canceled=True)
        resp.header.revision = self._store.revision
        self._out.force_send(_Control(resp))

    async def close(self) -> None:
        """Cancel every watcher and stop the buffer (the RPC is over)."""
        with self._mu:
            self._closed = True
            watchers = [w for w in self._watchers.values() if w is not None]
            self._watchers.clear()
        self._out.close()
        if watchers:
            # Shielded: even if this task is canceled again, the worker
            # thread finishes removing the watchers from the hub.
            await asyncio.shield(asyncio.to_thread(self._cancel_all, watchers))

    def _cancel_all(self, watchers: list[Watcher]) -> None:
        for w in watchers:
            self._hub.cancel(w)

    # -- responses ---------------------------------------------------------------

    async def send_loop(self, write) -> None:
        """Drain the buffer in order until it is closed."""
        announced: set[int] = set()
        held: dict[int, list[pb.WatchResponse]] = {}
        while True:
            items = await self._out.aget_all()
            if not items:
                return  # closed
            for item in items:
                if type(item) is _Control:
                    resp = item.resp
                    await write(self._stamp(resp))
                    wid = resp.watch_id
                    if resp.canceled:
                        announced.discard(wid)
                    elif resp.created:
                        announced.add(wid)
                        for r in held.pop(wid, ()):
                            await self._send(write, r)
                elif item.watch_id != INVALID_WATCH_ID and item.watch_id not in announced:
                    held.setdefault(item.watch_id, []).append(item)
                else:
                    await self._send(write, item)

    async def _send(self, write, resp) -> None:
        w = self._watchers.get(resp.watch_id)
        if type(resp) is EventBatch:
            if w is None or not w.fragment:
                # The events were encoded once for every watcher of the
                # revision; this watcher's answer frames them.
                await write(wire.watch_response(self._node.header_bytes(resp.revision), resp.watch_id, resp.encoded))
                return
            resp = resp.message()
        self._stamp(resp)
        if w is None or not w.fragment:
            await write(resp)
            return
        for part in fragments(resp, self._fragment_bytes):
            await write(part)

    def _stamp(self, resp: pb.WatchResponse) -> pb.WatchResponse:
        """Every watch response carries a header (Go clientv3 dereferences
        it); the revision is the one the response was made with, which is
        0 for a compaction cancel, as in etcd."""
        h = resp.header
        h.cluster_id = self._node.cluster_id
        h.member_id = self._node.member_id
        h.raft_term = RAFT_TERM
        return resp

"""The engine contract: what the server (and the embedded API) codes against.

Two engines implement it: ``mvcckv.store.Store`` (WAL + treeIndex + LMDB)
and the PostgreSQL engine in ``mvcckv.pg``.  Requests and responses are
etcd's protobuf messages, so a request travels from the wire to the engine
and back without conversion, and both engines answer alike.

Writes are *proposed*: ``propose`` validates the request at once (raising
etcd's error for a bad one) and returns a future that resolves to the
response once the write is durable and applied.  Reads are answered
synchronously and must be cheap enough to run on an event loop.

Two entry points are optional fast paths; the server uses them when an
engine has them and the methods of :class:`Engine` otherwise (the
PostgreSQL engine has neither):

* ``range_raw(req)`` -> ``(kvs, more, count, revision)`` with each KeyValue
  as its stored bytes, or None when the request needs messages (see
  ``Store.range_raw``); the server splices the bytes into its answer;
* ``propose_on_loop(kind, req, auth_revision, data)`` -> an asyncio future
  of the running loop, settled a batch per loop wake-up, ``data`` being
  the request's bytes as they arrived (see ``Store.propose_on_loop``).
"""

from __future__ import annotations

import queue
from concurrent.futures import Future, InvalidStateError
from typing import Protocol, runtime_checkable

from mvcckv.pb import kv_pb2
from mvcckv.pb import rpc_pb2 as pb

# Kinds of proposed (logged) requests; the numbers are also the WAL record
# types of the LMDB engine, so they never change meaning.
KIND_PUT = 1
KIND_DELETE_RANGE = 2
KIND_TXN = 3
KIND_COMPACT = 4
KIND_ALARM = 5
KIND_LEASE_GRANT = 6
KIND_LEASE_REVOKE = 7
KIND_LEASE_CHECKPOINT = 8
KIND_AUTH_ENABLE = 9
KIND_AUTH_DISABLE = 10
KIND_AUTH_USER_ADD = 11
KIND_AUTH_USER_DELETE = 12
KIND_AUTH_USER_CHANGE_PASSWORD = 13
KIND_AUTH_USER_GRANT_ROLE = 14
KIND_AUTH_USER_REVOKE_ROLE = 15
KIND_AUTH_ROLE_ADD = 16
KIND_AUTH_ROLE_DELETE = 17
KIND_AUTH_ROLE_GRANT_PERMISSION = 18
KIND_AUTH_ROLE_REVOKE_PERMISSION = 19


# The auth administration kinds and their request messages.
AUTH_REQUEST_TYPES = {
    KIND_AUTH_ENABLE: pb.AuthEnableRequest,
    KIND_AUTH_DISABLE: pb.AuthDisableRequest,
    KIND_AUTH_USER_ADD: pb.AuthUserAddRequest,
    KIND_AUTH_USER_DELETE: pb.AuthUserDeleteRequest,
    KIND_AUTH_USER_CHANGE_PASSWORD: pb.AuthUserChangePasswordRequest,
    KIND_AUTH_USER_GRANT_ROLE: pb.AuthUserGrantRoleRequest,
    KIND_AUTH_USER_REVOKE_ROLE: pb.AuthUserRevokeRoleRequest,
    KIND_AUTH_ROLE_ADD: pb.AuthRoleAddRequest,
    KIND_AUTH_ROLE_DELETE: pb.AuthRoleDeleteRequest,
    KIND_AUTH_ROLE_GRANT_PERMISSION: pb.AuthRoleGrantPermissionRequest,
    KIND_AUTH_ROLE_REVOKE_PERMISSION: pb.AuthRoleRevokePermissionRequest,
}
AUTH_KINDS = frozenset(AUTH_REQUEST_TYPES)

# Requests whose plain-text password must be hashed away before logging
# (``AuthStore.prepare``).
PASSWORD_KINDS = frozenset((KIND_AUTH_USER_ADD, KIND_AUTH_USER_CHANGE_PASSWORD))

# ``propose(..., auth_revision=AUTH_OFF)``: the server let the request
# through because auth was off.  If auth is on by the time it is applied,
# it fails as a request without a user does (etcd's applier sees an empty
# user in its header and refuses it).
AUTH_OFF = -1

# Flags on a proposal's kind (and WAL record type) saying how the server
# checked it: AUTHORIZED_FLAG at some auth revision (logged with it, 8 bytes
# BE before the request), AUTH_OFF_FLAG with auth off (nothing extra), so a
# replay refuses exactly what the live engine refused.
AUTHORIZED_FLAG = 0x80
AUTH_OFF_FLAG = 0x40


class Authorized:
    """A request checked by the server at auth ``revision`` (queued and
    applied in place of the request itself)."""

    __slots__ = ("revision", "request")

    def __init__(self, revision: int, request):
        self.revision = revision
        self.request = request


@runtime_checkable
class Engine(Protocol):
    """An etcd-semantics MVCC key-value engine."""

    # True when reads may wait on I/O (a network round trip), so a server
    # runs them off its event loop.
    reads_may_block: bool

    @property
    def revision(self) -> int:
        """Current revision (1 for an empty store)."""

    @property
    def compact_revision(self) -> int:
        """Last compaction revision, -1 if never compacted."""

    # writes; ``auth_revision``: the auth revision the server authorized
    # the request at (0: not checked), re-checked when it is applied
    def propose(self, kind: int, req, auth_revision: int = 0) -> Future: ...
    def new_lease_request(self, ttl: int, lease_id: int = 0) -> pb.LeaseGrantRequest: ...

    # reads
    def range_request(self, req: pb.RangeRequest) -> pb.RangeResponse: ...
    def txn_request(self, req: pb.TxnRequest) -> pb.TxnResponse: ...
    def get_kv(self, key: bytes, revision: int = 0) -> kv_pb2.KeyValue | None: ...

    # leases (clock side; grant/revoke are proposed)
    def lease_keepalive(self, lease_id: int) -> int: ...
    def lease_ttl(self, lease_id: int, keys: bool = False) -> pb.LeaseTimeToLiveResponse: ...
    def leases(self) -> pb.LeaseLeasesResponse: ...

    # watch: a hub with watch(stream, key, range_end, start_revision, ...),
    # cancel(watcher) and request_progress(stream, watchers); see watch.py
    @property
    def watch_hub(self): ...

    # users, roles and permissions (``mvcckv.auth.AuthStore``)
    @property
    def auth(self): ...

    # maintenance
    def status(self): ...
    def hash_kv(self, revision: int = 0): ...
    def hash(self) -> tuple[int, int]: ...
    def defrag(self) -> tuple[int, int]: ...
    # etcd's bbolt file and its SHA-256 to a path or binary file; bytes written
    def snapshot(self, target) -> int: ...
    def alarms(self) -> list[tuple[int, int]]: ...
    def identity(self, cluster_id: int, member_id: int) -> tuple[int, int]: ...
    def close(self) -> None: ...


def settle(fut: Future, result) -> None:
    """Resolve a proposal's future, unless its caller gave up on it.

    A caller may cancel (a gRPC client that goes away); the write it
    proposed is logged and applied all the same, and nobody is left to
    tell, so the answer is dropped rather than crashing the writer.
    """
    if not fut.cancelled():
        try:
            fut.set_result(result)
        except InvalidStateError:
            pass  # cancelled in between


def fail(fut: Future, error: BaseException) -> None:
    """``settle`` for an error."""
    if not fut.cancelled():
        try:
            fut.set_exception(error)
        except InvalidStateError:
            pass


def take_batch(q, limit: int) -> tuple[list, bool]:
    """Block for the next proposal, then take whatever else is queued.

    Returns ``(batch, stop)``: up to ``limit`` items in queue order, and
    whether the stop marker (``None``) was met.  This is what makes group
    commit: everything that queued up during the previous batch's fsync
    shares the next one.
    """
    item = q.get()
    if item is None:
        return [], True
    batch = [item]
    while len(batch) < limit:
        try:
            nxt = q.get_nowait()
        except queue.Empty:
            break
        if nxt is None:
            return batch, True
        batch.append(nxt)
    return batch, False

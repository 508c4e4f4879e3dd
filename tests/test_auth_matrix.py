"""Who may call what once auth is on: every RPC against seven identities,
on a real etcd and on mvcckv.

Each cell of the matrix is one request sent with one identity's token (gRPC
metadata ``token``), and records "OK" or the error as ``(gRPC code name,
message)``.  A watch create records "OK" when the watcher is created, or
``(WATCH_CANCELED, cancel_reason)`` when etcd answers created+canceled.  Both
servers must give the answers written in ``EXPECTED``: etcd 3.6.14's, which
mvcckv implements.  And mvcckv must give etcd's answer cell by cell, except
where the installed etcd predates a change: those cells are named in
``VERSION_DIFFERENCES`` with the older answer and the reason, keyed by the
version etcd reports in Status (as in test_diff_kv.py).  The older answers
were observed on etcd 3.4.23; the 3.6.14 answers of those cells come from
reading etcd's source, since no etcd 3.6 runs here.

Identities (users, roles and permissions are created through the gRPC API
before auth is enabled):

``none``     no token
``garbage``  a token no server issued
``expired``  the token of user ``stale``, taken before root changed stale's
             password (simple tokens of that user are dropped)
``ro``       role with READ on the prefix ``/r/``
``wo``       role with WRITE on the prefix ``/w/``
``rw``       role with READWRITE on the prefix ``/p/``, on the key ``/s``
             and on the range ``[a, c)``
``root``     role ``root``

Order: cells run request by request, each request for every identity with
root last, so that what root is allowed to do (revoke, delete, compact,
disable auth) never changes another identity's cell.  Requests that change
state act on objects of their own identity (``del-ro``, ``rdel-wo``, a fresh
lease), prepared as root just before the cell; an alarm activated by a cell
is cleared as root right after it; AuthDisable comes last.  Only the answer
is recorded, never the state a request leaves, so whether a key exists does
not matter.

mvcckv runs on both engines (LMDB, and PostgreSQL in a database of its
own).  Each server runs once per module (a private instance: enabling auth would
break any shared server), and the whole matrix is computed by its fixture;
the tests then compare tables.  etcd's own results are checked against
``EXPECTED``, so the etcd half can fail without mvcckv.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import grpc
import pytest

from harness import FAST_ELECTION, EtcdProcess, MvcckvProcess, stub
from mvcckv.pb import auth_pb2
from mvcckv.pb import rpc_pb2 as pb

TIMEOUT = 5.0
"""Seconds for one call, or for the first message of a stream."""

MATRIX_BUDGET = 30.0
"""Seconds one server gets for the whole matrix (etcd needs about one);
cells left then are recorded as not run instead of waiting on a server
that hangs."""

BCRYPT_COST = "4"
"""The cheapest cost bcrypt accepts: the matrix hashes about forty passwords."""

IDENTITIES = ("none", "garbage", "expired", "ro", "wo", "rw", "root")

PASSWORDS = {name: f"pw-{name}" for name in ("root", "ro", "wo", "rw", "stale")}
STALE_NEW_PASSWORD = "pw-stale-changed"

USER_OF = {"none": "ro", "garbage": "ro", "expired": "stale",
           "ro": "ro", "wo": "wo", "rw": "rw", "root": "root"}
"""The user an identity is, or claims to be (for "UserGet self")."""

OTHER_USER = {who: ("ro" if who == "rw" else "rw") for who in IDENTITIES}

ROLE_OF = {"ro": "role-ro", "wo": "role-wo", "rw": "role-rw", "stale": "role-ro", "root": "root"}

OTHER_ROLE = {who: ("role-ro" if who == "rw" else "role-rw") for who in IDENTITIES}

READ, WRITE, READWRITE = auth_pb2.Permission.READ, auth_pb2.Permission.WRITE, auth_pb2.Permission.READWRITE


def prefix_end(key: bytes) -> bytes:
    return key[:-1] + bytes([key[-1] + 1])


ROLE_PERMISSIONS = {
    "role-ro": [(READ, b"/r/", prefix_end(b"/r/"))],
    "role-wo": [(WRITE, b"/w/", prefix_end(b"/w/"))],
    "role-rw": [(READWRITE, b"/p/", prefix_end(b"/p/")),
                (READWRITE, b"/s", b""),
                (READWRITE, b"a", b"c")],
}

SEED_KEYS = (b"/r/k", b"/w/k", b"/p/k", b"/s", b"b", b"/x/k")

X_LEASE = 0x7E57_0001
"""A lease holding a key under /x/, which only root may write: attaching it
to another key needs WRITE on /x/ too."""

FIRST_CELL_LEASE = 0x7E57_1000


# --- outcomes ----------------------------------------------------------------------

Outcome = str | tuple[str, str]

OK = "OK"
WATCH_CANCELED = "WATCH_CANCELED"


EMPTY = ("INVALID_ARGUMENT", "etcdserver: user name is empty")
TOKEN = ("UNAUTHENTICATED", "etcdserver: invalid auth token")
DENIED = ("PERMISSION_DENIED", "etcdserver: permission denied")
# A refused watch carries the text of etcd's gRPC error value as Go prints
# it, code and all: the cancel reason is that error's Error().
W_EMPTY = (WATCH_CANCELED, "rpc error: code = InvalidArgument desc = etcdserver: user name is empty")
W_TOKEN = (WATCH_CANCELED, "rpc error: code = Unauthenticated desc = etcdserver: invalid auth token")
W_DENIED = (WATCH_CANCELED, "rpc error: code = PermissionDenied desc = etcdserver: permission denied")
PEER_URL_EXISTS = ("FAILED_PRECONDITION", "etcdserver: Peer URLs already exists")
MEMBER_NOT_FOUND = ("NOT_FOUND", "etcdserver: member not found")
NOT_LEARNER = ("FAILED_PRECONDITION", "etcdserver: can only promote a learner member")


def _rpc_error(error: grpc.RpcError) -> tuple[str, str]:
    return (error.code().name, error.details() or "")


def _show(outcome: Outcome) -> str:
    return outcome if isinstance(outcome, str) else f"{outcome[0]}: {outcome[1]}"


# --- one server --------------------------------------------------------------------


class Target:
    """One server's stubs, the identities' tokens and what cells prepare."""

    def __init__(self, name: str, server):
        self.name = name
        self.channel = server.channel()
        self.services = {s: stub(self.channel, s)
                         for s in ("KV", "Watch", "Lease", "Maintenance", "Cluster", "Auth")}
        self.tokens: dict[str, str | None] = {"none": None, "garbage": "garbage.1"}
        status = self.services["Maintenance"].Status(pb.StatusRequest(), timeout=TIMEOUT)
        self.version = _version_tuple(status.version)
        self.member_id = status.header.member_id
        (member,) = self.services["Cluster"].MemberList(pb.MemberListRequest(), timeout=TIMEOUT).members
        self.peer_urls = list(member.peerURLs)
        self._next_lease = FIRST_CELL_LEASE

    def close(self) -> None:
        self.channel.close()

    def metadata(self, who: str) -> tuple[tuple[str, str], ...] | None:
        token = self.tokens[who]
        return None if token is None else (("token", token),)

    def method(self, name: str) -> Callable:
        service, rpc = name.split(".")
        return getattr(self.services[service], rpc)

    def must(self, name: str, request, who: str | None = "root") -> Any:
        """A call that has to succeed (setup, preparation, clean-up)."""
        metadata = None if who is None else self.metadata(who)
        try:
            return self.method(name)(request, timeout=TIMEOUT, metadata=metadata)
        except grpc.RpcError as error:
            raise AssertionError(f"{self.name}: {name} as {who} failed: {_rpc_error(error)}") from None

    def lease_id(self) -> int:
        """An ID no lease has had (etcd picks random ones when asked for 0)."""
        self._next_lease += 1
        return self._next_lease

    def new_lease(self, key_prefix: bytes | None) -> int:
        """A fresh lease (granted as root), holding one key under
        ``key_prefix`` unless that is None."""
        lease_id = self.lease_id()
        self.must("Lease.LeaseGrant", pb.LeaseGrantRequest(ID=lease_id, TTL=600))
        if key_prefix is not None:
            key = key_prefix + b"lease/%d" % lease_id
            self.must("KV.Put", pb.PutRequest(key=key, value=b"v", lease=lease_id))
        return lease_id

    def setup(self) -> None:
        """Users, roles, keys and leases, then auth on and tokens."""
        # etcdctl creates role root before granting it; etcd would grant it
        # without, but RoleGet root then answers "role name not found".
        self.must("Auth.RoleAdd", pb.AuthRoleAddRequest(name="root"), who=None)
        for role, perms in ROLE_PERMISSIONS.items():
            self.must("Auth.RoleAdd", pb.AuthRoleAddRequest(name=role), who=None)
            for perm_type, key, range_end in perms:
                self.must("Auth.RoleGrantPermission", pb.AuthRoleGrantPermissionRequest(
                    name=role, perm=auth_pb2.Permission(permType=perm_type, key=key, range_end=range_end)),
                    who=None)
        for user, password in PASSWORDS.items():
            self.must("Auth.UserAdd", pb.AuthUserAddRequest(name=user, password=password), who=None)
            self.must("Auth.UserGrantRole", pb.AuthUserGrantRoleRequest(user=user, role=ROLE_OF[user]),
                      who=None)
        for who in IDENTITIES:
            for user in (f"del-{who}", f"chpw-{who}", f"grant-{who}", f"revoke-{who}"):
                self.must("Auth.UserAdd", pb.AuthUserAddRequest(name=user, password="pw"), who=None)
            self.must("Auth.UserGrantRole", pb.AuthUserGrantRoleRequest(user=f"revoke-{who}", role="role-ro"),
                      who=None)
            for role in (f"rdel-{who}", f"rperm-{who}", f"rrevoke-{who}"):
                self.must("Auth.RoleAdd", pb.AuthRoleAddRequest(name=role), who=None)
            self.must("Auth.RoleGrantPermission", pb.AuthRoleGrantPermissionRequest(
                name=f"rrevoke-{who}", perm=auth_pb2.Permission(permType=READ, key=b"k")), who=None)
        for key in SEED_KEYS:
            self.must("KV.Put", pb.PutRequest(key=key, value=b"seed"), who=None)
        self.must("Lease.LeaseGrant", pb.LeaseGrantRequest(ID=X_LEASE, TTL=600), who=None)
        self.must("KV.Put", pb.PutRequest(key=b"/x/leased", value=b"v", lease=X_LEASE), who=None)

        self.must("Auth.AuthEnable", pb.AuthEnableRequest(), who=None)
        for user in ("root", "ro", "wo", "rw", "stale"):
            resp = self.must("Auth.Authenticate", pb.AuthenticateRequest(name=user, password=PASSWORDS[user]),
                             who=None)
            self.tokens["expired" if user == "stale" else user] = resp.token
        self.must("Auth.UserChangePassword",
                  pb.AuthUserChangePasswordRequest(name="stale", password=STALE_NEW_PASSWORD))


def _version_tuple(text: str) -> tuple[int, int, int]:
    major, minor, patch = (int(part) for part in text.split("-")[0].split(".")[:3])
    return major, minor, patch


# --- cells -------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One row of the matrix.

    ``send(target, who, prepared)`` makes the call and returns its outcome;
    ``prepare(target, who)`` runs before it as root and its result is
    ``prepared``; ``clean(target)`` runs after it as root.
    """

    group: str
    name: str
    send: Callable[[Target, str, Any], Outcome]
    prepare: Callable[[Target, str], Any] | None = None
    clean: Callable[[Target], None] | None = None


Request = Any | Callable[[Target, str, Any], Any]


def unary(group: str, name: str, method: str, request: Request, **hooks) -> Case:
    """A unary call; ``request`` is a message, or a function of (target,
    identity, prepared) for requests that name per-identity objects."""

    def send(t: Target, who: str, prepared: Any) -> Outcome:
        req = request(t, who, prepared) if callable(request) else request
        try:
            t.method(method)(req, timeout=TIMEOUT, metadata=t.metadata(who))
        except grpc.RpcError as error:
            return _rpc_error(error)
        return OK

    return Case(group, name, send, **hooks)


def _first_of_stream(open_call: Callable[[Iterable], Any], requests: list) -> Any:
    """The first response of a bidirectional stream, with the client's side
    kept open until it came (etcd may drop answers of a half-closed stream).
    Raises grpc.RpcError when the stream fails, and never waits past the
    call's deadline."""
    answered = threading.Event()

    def outgoing():
        yield from requests
        answered.wait(TIMEOUT)

    call = open_call(outgoing())
    try:
        return next(call)
    finally:
        answered.set()
        call.cancel()


NO_RESPONSE = ("NO RESPONSE", "the stream ended without one")


def bidi(group: str, name: str, method: str, build: Callable[[Any], Any],
         judge: Callable[[Any], Outcome], **hooks) -> Case:
    """A bidirectional stream: one request (``build(prepared)``), and the
    outcome ``judge`` reads from the first response, or the stream's error."""

    def send(t: Target, who: str, prepared: Any) -> Outcome:
        rpc = t.method(method)
        try:
            resp = _first_of_stream(lambda requests: rpc(requests, timeout=TIMEOUT, metadata=t.metadata(who)),
                                    [build(prepared)])
        except grpc.RpcError as error:
            return _rpc_error(error)
        except StopIteration:
            return NO_RESPONSE
        return judge(resp)

    return Case(group, name, send, **hooks)


def _watch_outcome(resp: pb.WatchResponse) -> Outcome:
    if resp.canceled:
        return (WATCH_CANCELED, resp.cancel_reason)
    return OK if resp.created else ("UNEXPECTED", str(resp))


def watch(name: str, key: bytes, range_end: bytes = b"") -> Case:
    request = pb.WatchRequest(create_request=pb.WatchCreateRequest(key=key, range_end=range_end))
    return bidi("Watch", name, "Watch.Watch", lambda prepared: request, _watch_outcome)


def keepalive(name: str, key_prefix: bytes | None) -> Case:
    return bidi("Lease", name, "Lease.LeaseKeepAlive", lambda lease_id: pb.LeaseKeepAliveRequest(ID=lease_id),
                lambda resp: OK if resp.TTL > 0 else ("UNEXPECTED", str(resp)),
                prepare=lambda t, who: t.new_lease(key_prefix))


def snapshot() -> Case:
    def send(t: Target, who: str, prepared: Any) -> Outcome:
        call = t.services["Maintenance"].Snapshot(pb.SnapshotRequest(), timeout=TIMEOUT,
                                                   metadata=t.metadata(who))
        try:
            next(call)
        except grpc.RpcError as error:
            return _rpc_error(error)
        except StopIteration:
            return NO_RESPONSE
        finally:
            call.cancel()
        return OK

    return Case("Maintenance", "Snapshot (first message)", send)


def lease_case(name: str, method: str, key_prefix: bytes | None, build: Callable[[int], Any]) -> Case:
    return unary("Lease", name, method, lambda t, who, lease_id: build(lease_id),
                 prepare=lambda t, who: t.new_lease(key_prefix))


def _deactivate_nospace(t: Target) -> None:
    t.must("Maintenance.Alarm", pb.AlarmRequest(action=pb.AlarmRequest.DEACTIVATE,
                                                memberID=t.member_id, alarm=pb.NOSPACE))


def _activate_nospace(t: Target, who: str) -> None:
    t.must("Maintenance.Alarm", pb.AlarmRequest(action=pb.AlarmRequest.ACTIVATE,
                                                memberID=t.member_id, alarm=pb.NOSPACE))


def _compactable_revision(t: Target, who: str) -> int:
    """A new revision to compact at: one compaction per cell."""
    return t.must("KV.Put", pb.PutRequest(key=b"/w/compact", value=b"v")).header.revision


def put_op(key: bytes, **kw) -> pb.RequestOp:
    return pb.RequestOp(request_put=pb.PutRequest(key=key, value=b"v", **kw))


def range_op(key: bytes, range_end: bytes = b"") -> pb.RequestOp:
    return pb.RequestOp(request_range=pb.RangeRequest(key=key, range_end=range_end))


def delete_op(key: bytes, range_end: bytes = b"", **kw) -> pb.RequestOp:
    return pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=key, range_end=range_end, **kw))


def txn_op(*success: pb.RequestOp) -> pb.RequestOp:
    return pb.RequestOp(request_txn=pb.TxnRequest(success=success))


def exists(key: bytes, range_end: bytes = b"") -> pb.Compare:
    return pb.Compare(key=key, range_end=range_end, target=pb.Compare.VERSION,
                      result=pb.Compare.GREATER, version=0)


def kv_range(name: str, key: bytes, range_end: bytes = b"") -> Case:
    return unary("KV", name, "KV.Range", pb.RangeRequest(key=key, range_end=range_end))


def kv_put(name: str, key: bytes, **kw) -> Case:
    return unary("KV", name, "KV.Put", pb.PutRequest(key=key, value=b"v", **kw))


def kv_delete(name: str, key: bytes, range_end: bytes = b"", **kw) -> Case:
    return unary("KV", name, "KV.DeleteRange", pb.DeleteRangeRequest(key=key, range_end=range_end, **kw))


def kv_txn(name: str, compare=(), success=(), failure=()) -> Case:
    return unary("KV", name, "KV.Txn", pb.TxnRequest(compare=compare, success=success, failure=failure))


def auth_case(name: str, method: str, build: Callable[[Target, str], Any]) -> Case:
    return unary("Auth", name, method, lambda t, who, prepared: build(t, who))


P = prefix_end

CASES: list[Case] = [
    # KV.Range
    kv_range("Range /r/k", b"/r/k"),
    kv_range("Range prefix /r/", b"/r/", P(b"/r/")),
    kv_range("Range /w/k", b"/w/k"),
    kv_range("Range prefix /p/", b"/p/", P(b"/p/")),
    kv_range("Range key /s", b"/s"),
    kv_range("Range prefix /s", b"/s", P(b"/s")),
    kv_range("Range [a, c)", b"a", b"c"),
    kv_range("Range [b, c)", b"b", b"c"),
    kv_range("Range [a, d)", b"a", b"d"),
    kv_range("Range /x/k", b"/x/k"),
    kv_range("Range all keys", b"\0", b"\0"),
    # KV.Put
    kv_put("Put /w/k", b"/w/k"),
    kv_put("Put /w/k prev_kv", b"/w/k", prev_kv=True),
    kv_put("Put /r/k", b"/r/k"),
    kv_put("Put /p/k prev_kv", b"/p/k", prev_kv=True),
    kv_put("Put /s", b"/s"),
    kv_put("Put b", b"b"),
    kv_put("Put c", b"c"),
    kv_put("Put /x/k", b"/x/k"),
    kv_put("Put /w/leased, lease holding /x/", b"/w/leased", lease=X_LEASE),
    kv_put("Put /p/leased, lease holding /x/", b"/p/leased", lease=X_LEASE),
    # KV.DeleteRange
    kv_delete("DeleteRange /w/d", b"/w/d"),
    kv_delete("DeleteRange /w/d prev_kv", b"/w/d", prev_kv=True),
    kv_delete("DeleteRange prefix /w/d/", b"/w/d/", P(b"/w/d/")),
    kv_delete("DeleteRange /r/d", b"/r/d"),
    kv_delete("DeleteRange prefix /p/d/ prev_kv", b"/p/d/", P(b"/p/d/"), prev_kv=True),
    kv_delete("DeleteRange [a, c)", b"a", b"c"),
    kv_delete("DeleteRange [a, d)", b"a", b"d"),
    kv_delete("DeleteRange /x/d", b"/x/d"),
    # KV.Txn
    kv_txn("Txn compare /r/k", compare=[exists(b"/r/k")]),
    kv_txn("Txn compare /x/k", compare=[exists(b"/x/k")]),
    kv_txn("Txn compare range [a, c)", compare=[exists(b"a", b"c")]),
    kv_txn("Txn get /r/k", success=[range_op(b"/r/k")]),
    kv_txn("Txn get /x/k", success=[range_op(b"/x/k")]),
    kv_txn("Txn put /w/k", success=[put_op(b"/w/k")]),
    kv_txn("Txn put /w/k else put /x/k", success=[put_op(b"/w/k")], failure=[put_op(b"/x/k")]),
    kv_txn("Txn compare /r/k then put /w/k", compare=[exists(b"/r/k")], success=[put_op(b"/w/k")]),
    kv_txn("Txn put /w/k prev_kv", success=[put_op(b"/w/k", prev_kv=True)]),
    kv_txn("Txn put /w/leased, lease holding /x/", success=[put_op(b"/w/leased", lease=X_LEASE)]),
    kv_txn("Txn delete /w/d prev_kv", success=[delete_op(b"/w/d", prev_kv=True)]),
    kv_txn("Txn delete prefix /p/d/", success=[delete_op(b"/p/d/", P(b"/p/d/"))]),
    kv_txn("Txn /p/ and /s, both branches", compare=[exists(b"/p/k")],
           success=[range_op(b"/p/", P(b"/p/")), put_op(b"/p/k"), delete_op(b"/p/d")],
           failure=[range_op(b"/s"), put_op(b"/s")]),
    kv_txn("Txn nested put /w/k", success=[txn_op(put_op(b"/w/k"))]),
    kv_txn("Txn nested put /x/k", success=[txn_op(put_op(b"/x/k"))]),
    kv_txn("Txn nested get /x/k", success=[txn_op(range_op(b"/x/k"))]),
    # KV.Compact
    unary("KV", "Compact", "KV.Compact", lambda t, who, rev: pb.CompactionRequest(revision=rev),
          prepare=_compactable_revision),
    # Watch
    watch("Watch /r/k", b"/r/k"),
    watch("Watch prefix /r/", b"/r/", P(b"/r/")),
    watch("Watch /w/k", b"/w/k"),
    watch("Watch prefix /p/", b"/p/", P(b"/p/")),
    watch("Watch [a, c)", b"a", b"c"),
    watch("Watch [a, d)", b"a", b"d"),
    watch("Watch /x/k", b"/x/k"),
    watch("Watch all keys", b"\0", b"\0"),
    # Lease
    unary("Lease", "LeaseGrant", "Lease.LeaseGrant",
          lambda t, who, lease_id: pb.LeaseGrantRequest(ID=lease_id, TTL=600),
          prepare=lambda t, who: t.lease_id()),
    lease_case("LeaseRevoke, no keys", "Lease.LeaseRevoke", None, lambda i: pb.LeaseRevokeRequest(ID=i)),
    lease_case("LeaseRevoke, key under /w/", "Lease.LeaseRevoke", b"/w/",
               lambda i: pb.LeaseRevokeRequest(ID=i)),
    lease_case("LeaseRevoke, key under /x/", "Lease.LeaseRevoke", b"/x/",
               lambda i: pb.LeaseRevokeRequest(ID=i)),
    keepalive("LeaseKeepAlive, key under /w/", b"/w/"),
    keepalive("LeaseKeepAlive, key under /x/", b"/x/"),
    lease_case("LeaseTimeToLive keys, key under /r/", "Lease.LeaseTimeToLive", b"/r/",
               lambda i: pb.LeaseTimeToLiveRequest(ID=i, keys=True)),
    lease_case("LeaseTimeToLive keys, key under /x/", "Lease.LeaseTimeToLive", b"/x/",
               lambda i: pb.LeaseTimeToLiveRequest(ID=i, keys=True)),
    lease_case("LeaseTimeToLive no keys, key under /x/", "Lease.LeaseTimeToLive", b"/x/",
               lambda i: pb.LeaseTimeToLiveRequest(ID=i, keys=False)),
    unary("Lease", "LeaseLeases", "Lease.LeaseLeases", pb.LeaseLeasesRequest()),
    # Maintenance
    unary("Maintenance", "Status", "Maintenance.Status", pb.StatusRequest()),
    unary("Maintenance", "Hash", "Maintenance.Hash", pb.HashRequest()),
    unary("Maintenance", "HashKV", "Maintenance.HashKV", pb.HashKVRequest(revision=0)),
    unary("Maintenance", "Defragment", "Maintenance.Defragment", pb.DefragmentRequest()),
    snapshot(),
    unary("Maintenance", "Alarm GET", "Maintenance.Alarm", pb.AlarmRequest(action=pb.AlarmRequest.GET)),
    unary("Maintenance", "Alarm ACTIVATE NOSPACE", "Maintenance.Alarm",
          lambda t, who, prepared: pb.AlarmRequest(action=pb.AlarmRequest.ACTIVATE,
                                                   memberID=t.member_id, alarm=pb.NOSPACE),
          clean=_deactivate_nospace),
    unary("Maintenance", "Alarm DEACTIVATE NOSPACE", "Maintenance.Alarm",
          lambda t, who, prepared: pb.AlarmRequest(action=pb.AlarmRequest.DEACTIVATE,
                                                   memberID=t.member_id, alarm=pb.NOSPACE),
          prepare=_activate_nospace, clean=_deactivate_nospace),
    unary("Maintenance", "MoveLeader to itself", "Maintenance.MoveLeader",
          lambda t, who, prepared: pb.MoveLeaderRequest(targetID=t.member_id)),
    # Cluster
    unary("Cluster", "MemberList", "Cluster.MemberList", pb.MemberListRequest()),
    unary("Cluster", "MemberAdd learner, own peer URL", "Cluster.MemberAdd",
          lambda t, who, prepared: pb.MemberAddRequest(peerURLs=t.peer_urls, isLearner=True)),
    unary("Cluster", "MemberRemove unknown ID", "Cluster.MemberRemove", pb.MemberRemoveRequest(ID=0x1D)),
    unary("Cluster", "MemberUpdate unknown ID", "Cluster.MemberUpdate",
          pb.MemberUpdateRequest(ID=0x1D, peerURLs=["http://127.0.0.1:1"])),
    unary("Cluster", "MemberPromote itself", "Cluster.MemberPromote",
          lambda t, who, prepared: pb.MemberPromoteRequest(ID=t.member_id)),
    # Auth; AuthDisable last of all
    auth_case("Authenticate as ro", "Auth.Authenticate",
              lambda t, who: pb.AuthenticateRequest(name="ro", password=PASSWORDS["ro"])),
    auth_case("AuthStatus", "Auth.AuthStatus", lambda t, who: pb.AuthStatusRequest()),
    auth_case("UserAdd", "Auth.UserAdd",
              lambda t, who: pb.AuthUserAddRequest(name=f"add-{who}", password="pw")),
    auth_case("UserGet self", "Auth.UserGet", lambda t, who: pb.AuthUserGetRequest(name=USER_OF[who])),
    auth_case("UserGet other", "Auth.UserGet", lambda t, who: pb.AuthUserGetRequest(name=OTHER_USER[who])),
    auth_case("UserList", "Auth.UserList", lambda t, who: pb.AuthUserListRequest()),
    auth_case("UserDelete", "Auth.UserDelete", lambda t, who: pb.AuthUserDeleteRequest(name=f"del-{who}")),
    auth_case("UserChangePassword", "Auth.UserChangePassword",
              lambda t, who: pb.AuthUserChangePasswordRequest(name=f"chpw-{who}", password="new")),
    auth_case("UserGrantRole", "Auth.UserGrantRole",
              lambda t, who: pb.AuthUserGrantRoleRequest(user=f"grant-{who}", role="role-ro")),
    auth_case("UserRevokeRole", "Auth.UserRevokeRole",
              lambda t, who: pb.AuthUserRevokeRoleRequest(name=f"revoke-{who}", role="role-ro")),
    auth_case("RoleAdd", "Auth.RoleAdd", lambda t, who: pb.AuthRoleAddRequest(name=f"radd-{who}")),
    auth_case("RoleGet own", "Auth.RoleGet",
              lambda t, who: pb.AuthRoleGetRequest(role=ROLE_OF[USER_OF[who]])),
    auth_case("RoleGet other", "Auth.RoleGet", lambda t, who: pb.AuthRoleGetRequest(role=OTHER_ROLE[who])),
    auth_case("RoleList", "Auth.RoleList", lambda t, who: pb.AuthRoleListRequest()),
    auth_case("RoleDelete", "Auth.RoleDelete", lambda t, who: pb.AuthRoleDeleteRequest(role=f"rdel-{who}")),
    auth_case("RoleGrantPermission", "Auth.RoleGrantPermission",
              lambda t, who: pb.AuthRoleGrantPermissionRequest(
                  name=f"rperm-{who}",
                  perm=auth_pb2.Permission(permType=WRITE, key=b"/q/", range_end=b"/q0"))),
    auth_case("RoleRevokePermission", "Auth.RoleRevokePermission",
              lambda t, who: pb.AuthRoleRevokePermissionRequest(role=f"rrevoke-{who}", key=b"k")),
    auth_case("AuthEnable (already on)", "Auth.AuthEnable", lambda t, who: pb.AuthEnableRequest()),
    auth_case("AuthDisable", "Auth.AuthDisable", lambda t, who: pb.AuthDisableRequest()),
]

GROUPS = ("KV", "Watch", "Lease", "Maintenance", "Cluster", "Auth")



# --- what the answers are ----------------------------------------------------------

ADMIN = (EMPTY, TOKEN, TOKEN, DENIED, DENIED, DENIED, OK)
"""Only root: anonymous callers are told the user name is empty."""

ANY_USER = (EMPTY, TOKEN, TOKEN, OK, OK, OK, OK)

R_ONLY = (EMPTY, TOKEN, TOKEN, OK, DENIED, DENIED, OK)
W_ONLY = (EMPTY, TOKEN, TOKEN, DENIED, OK, DENIED, OK)
RW_ONLY = (EMPTY, TOKEN, TOKEN, DENIED, DENIED, OK, OK)

W_R_ONLY = (W_EMPTY, W_TOKEN, W_TOKEN, OK, W_DENIED, W_DENIED, OK)
W_RW_ONLY = (W_EMPTY, W_TOKEN, W_TOKEN, W_DENIED, W_DENIED, OK, OK)
W_ADMIN = (W_EMPTY, W_TOKEN, W_TOKEN, W_DENIED, W_DENIED, W_DENIED, OK)


def root_gets(outcome: Outcome) -> tuple[Outcome, ...]:
    """Admin only, and root's own request fails with ``outcome``."""
    return ADMIN[:-1] + (outcome,)


EXPECTED: dict[str, tuple[Outcome, ...]] = {
    # Columns: none, garbage, expired, ro, wo, rw, root.  etcd 3.6.14's
    # answers; for the cells in VERSION_DIFFERENCES the ones of older etcd
    # are given there.
    "Range /r/k": R_ONLY,
    "Range prefix /r/": R_ONLY,
    "Range /w/k": ADMIN,
    "Range prefix /p/": RW_ONLY,
    "Range key /s": RW_ONLY,
    "Range prefix /s": ADMIN,
    "Range [a, c)": RW_ONLY,
    "Range [b, c)": RW_ONLY,
    "Range [a, d)": ADMIN,
    "Range /x/k": ADMIN,
    "Range all keys": ADMIN,
    "Put /w/k": W_ONLY,
    "Put /w/k prev_kv": ADMIN,  # prev_kv needs READ too
    "Put /r/k": ADMIN,
    "Put /p/k prev_kv": RW_ONLY,
    "Put /s": RW_ONLY,
    "Put b": RW_ONLY,
    "Put c": ADMIN,
    "Put /x/k": ADMIN,
    "Put /w/leased, lease holding /x/": ADMIN,  # the lease's keys need WRITE too
    "Put /p/leased, lease holding /x/": ADMIN,
    "DeleteRange /w/d": W_ONLY,
    "DeleteRange /w/d prev_kv": ADMIN,
    "DeleteRange prefix /w/d/": W_ONLY,
    "DeleteRange /r/d": ADMIN,
    "DeleteRange prefix /p/d/ prev_kv": RW_ONLY,
    "DeleteRange [a, c)": RW_ONLY,
    "DeleteRange [a, d)": ADMIN,
    "DeleteRange /x/d": ADMIN,
    "Txn compare /r/k": R_ONLY,
    "Txn compare /x/k": ADMIN,
    "Txn compare range [a, c)": RW_ONLY,
    "Txn get /r/k": R_ONLY,
    "Txn get /x/k": ADMIN,
    "Txn put /w/k": W_ONLY,
    "Txn put /w/k else put /x/k": ADMIN,  # both branches are checked
    "Txn compare /r/k then put /w/k": ADMIN,
    "Txn put /w/k prev_kv": ADMIN,
    "Txn put /w/leased, lease holding /x/": ADMIN,
    "Txn delete /w/d prev_kv": ADMIN,
    "Txn delete prefix /p/d/": RW_ONLY,
    "Txn /p/ and /s, both branches": RW_ONLY,
    "Txn nested put /w/k": W_ONLY,
    "Txn nested put /x/k": ADMIN,
    "Txn nested get /x/k": ADMIN,
    "Compact": ADMIN,
    "Watch /r/k": W_R_ONLY,
    "Watch prefix /r/": W_R_ONLY,
    "Watch /w/k": W_ADMIN,  # WRITE does not let one watch
    "Watch prefix /p/": W_RW_ONLY,
    "Watch [a, c)": W_RW_ONLY,
    "Watch [a, d)": W_ADMIN,
    "Watch /x/k": W_ADMIN,
    "Watch all keys": W_ADMIN,
    "LeaseGrant": ANY_USER,
    "LeaseRevoke, no keys": ANY_USER,
    "LeaseRevoke, key under /w/": W_ONLY,  # WRITE on every key of the lease
    "LeaseRevoke, key under /x/": ADMIN,
    "LeaseKeepAlive, key under /w/": W_ONLY,
    "LeaseKeepAlive, key under /x/": ADMIN,
    "LeaseTimeToLive keys, key under /r/": R_ONLY,  # READ on every key of the lease
    "LeaseTimeToLive keys, key under /x/": ADMIN,
    "LeaseTimeToLive no keys, key under /x/": ANY_USER,
    "LeaseLeases": ADMIN,  # READ on every key of every lease, and X_LEASE holds /x/
    "Status": ANY_USER,
    "Hash": ADMIN,
    "HashKV": ADMIN,
    "Defragment": ADMIN,
    "Snapshot (first message)": ADMIN,
    "Alarm GET": ANY_USER,
    "Alarm ACTIVATE NOSPACE": ADMIN,
    "Alarm DEACTIVATE NOSPACE": ADMIN,
    "MoveLeader to itself": ADMIN,
    "MemberList": ANY_USER,
    "MemberAdd learner, own peer URL": root_gets(PEER_URL_EXISTS),
    "MemberRemove unknown ID": root_gets(MEMBER_NOT_FOUND),
    "MemberUpdate unknown ID": root_gets(MEMBER_NOT_FOUND),
    "MemberPromote itself": root_gets(NOT_LEARNER),
    "Authenticate as ro": (OK, OK, OK, OK, OK, OK, OK),  # the token sent is not looked at
    "AuthStatus": ADMIN,
    "UserAdd": ADMIN,
    "UserGet self": ANY_USER,
    "UserGet other": ADMIN,
    "UserList": ADMIN,
    "UserDelete": ADMIN,
    "UserChangePassword": ADMIN,
    "UserGrantRole": ADMIN,
    "UserRevokeRole": ADMIN,
    "RoleAdd": ADMIN,
    "RoleGet own": ANY_USER,
    "RoleGet other": ADMIN,
    "RoleList": ADMIN,
    "RoleDelete": ADMIN,
    "RoleGrantPermission": ADMIN,
    "RoleRevokePermission": ADMIN,
    "AuthEnable (already on)": ADMIN,
    "AuthDisable": ADMIN,
}


# --- where etcd versions differ ----------------------------------------------------

UNKNOWN_EMPTY = ("UNKNOWN", "auth: user name is empty")
UNKNOWN_TOKEN = ("UNKNOWN", "auth: invalid auth token")
UNKNOWN_DENIED = ("UNKNOWN", "auth: permission denied")
NO_AUTH_STATUS = ("UNIMPLEMENTED", "unknown method AuthStatus for service etcdserverpb.Auth")


@dataclass(frozen=True)
class VersionDifference:
    """Cells whose answer changed in etcd after 3.4.23: ``older`` holds the
    answers of etcd without the change (observed on 3.4.23), EXPECTED the
    answers of 3.6.14 (read from its source: no etcd 3.6 runs here).

    Most of these changes are security fixes backported as patch releases,
    so ``since`` names, per release line, the first version with 3.6.14's
    answer; a line it does not name never got it, or (3.6 and later) had it
    from the start.
    """

    since: dict[tuple[int, int], int]
    why: str
    older: dict[str, dict[str, Outcome]]

    def applies(self, version: tuple[int, int, int]) -> bool:
        """Whether etcd ``version`` gives the ``older`` answers."""
        line = version[:2]
        if line in self.since:
            return version[2] < self.since[line]
        return line < (3, 6)


def _cells(*identities: str, outcome: Outcome = OK) -> dict[str, Outcome]:
    return {who: outcome for who in identities}


VERSION_DIFFERENCES = {
    "nested-txn-checked": VersionDifference(
        {(3, 4): 42, (3, 5): 28, (3, 6): 11},
        "The ops of a txn inside a txn were not permission-checked (and a txn whose "
        "ops are all txns is not read-only, so it went through without a token).",
        {"Txn nested put /w/k": _cells("none", "ro", "rw"),
         "Txn nested put /x/k": _cells("none", "ro", "wo", "rw"),
         "Txn nested get /x/k": _cells("none", "ro", "wo", "rw")},
    ),
    "txn-put-checked-like-put": VersionDifference(
        {(3, 4): 44, (3, 5): 30, (3, 6): 11},
        "A put inside a txn was checked for WRITE on its key only: prev_kv did not "
        "need READ, and a lease holding keys the user cannot write could be attached.",
        {"Txn put /w/k prev_kv": _cells("wo"),
         "Txn put /w/leased, lease holding /x/": _cells("wo")},
    ),
    "compact-admin": VersionDifference(
        {(3, 4): 42, (3, 5): 28, (3, 6): 9},
        "Compact had no permission check: anyone, even without a token, could compact.",
        {"Compact": _cells("none", "ro", "wo", "rw")},
    ),
    "lease-needs-user": VersionDifference(
        {(3, 4): 42, (3, 5): 28, (3, 6): 9},
        "LeaseGrant, LeaseRevoke of a lease without keys and LeaseTimeToLive "
        "without keys needed no token (LeaseTimeToLive did not even look at one).",
        {"LeaseGrant": _cells("none"),
         "LeaseRevoke, no keys": _cells("none"),
         "LeaseTimeToLive no keys, key under /x/": _cells("none", "garbage", "expired")},
    ),
    "lease-timetolive-keys-read": VersionDifference(
        {(3, 4): 26, (3, 5): 9},
        "LeaseTimeToLive with keys did not check READ on the lease's keys, nor the token.",
        {"LeaseTimeToLive keys, key under /r/": _cells("none", "garbage", "expired", "wo", "rw"),
         "LeaseTimeToLive keys, key under /x/": _cells("none", "garbage", "expired", "ro", "wo", "rw")},
    ),
    "lease-keepalive-checked": VersionDifference(
        {(3, 4): 42, (3, 5): 28, (3, 6): 9},
        "LeaseKeepAlive renewed any lease for anyone, whatever the token.",
        {"LeaseKeepAlive, key under /w/": _cells("none", "garbage", "expired", "ro", "rw"),
         "LeaseKeepAlive, key under /x/": _cells("none", "garbage", "expired", "ro", "wo", "rw")},
    ),
    "lease-leases-checked": VersionDifference(
        {(3, 4): 42, (3, 5): 28, (3, 6): 9},
        "LeaseLeases listed every lease to anyone, whatever the token.",
        {"LeaseLeases": _cells("none", "garbage", "expired", "ro", "wo", "rw")},
    ),
    "status-needs-user": VersionDifference(
        {(3, 5): 32, (3, 6): 12},
        "Status answered anyone, whatever the token.  (3.4.42+, 3.5.28-3.5.31 and "
        "3.6.0-3.6.11 answer root only: neither table fits them.)",
        {"Status": _cells("none", "garbage", "expired")},
    ),
    "alarm-checked": VersionDifference(
        {(3, 4): 42, (3, 5): 28, (3, 6): 9},
        "Alarm had no permission check: anyone could list, raise and clear alarms "
        "without a token, and a bad token came back as the auth package's error "
        "(code UNKNOWN).  (3.6.0-3.6.8 map that error but check nothing else.)",
        {"Alarm GET": {"none": OK, "garbage": UNKNOWN_TOKEN, "expired": UNKNOWN_TOKEN},
         "Alarm ACTIVATE NOSPACE": {"none": OK, "garbage": UNKNOWN_TOKEN, "expired": UNKNOWN_TOKEN,
                                    **_cells("ro", "wo", "rw")},
         "Alarm DEACTIVATE NOSPACE": {"none": OK, "garbage": UNKNOWN_TOKEN, "expired": UNKNOWN_TOKEN,
                                      **_cells("ro", "wo", "rw")}},
    ),
    "move-leader-admin": VersionDifference(
        {(3, 4): 42, (3, 5): 28},
        "MoveLeader had no permission check, nor a look at the token.",
        {"MoveLeader to itself": _cells("none", "garbage", "expired", "ro", "wo", "rw")},
    ),
    "maintenance-errors-mapped": VersionDifference(
        {},
        "Hash, HashKV, Defragment and Snapshot returned the auth package's own "
        "errors, which gRPC sends as code UNKNOWN with texts starting 'auth: '.",
        {name: {"none": UNKNOWN_EMPTY, "garbage": UNKNOWN_TOKEN, "expired": UNKNOWN_TOKEN,
                **_cells("ro", "wo", "rw", outcome=UNKNOWN_DENIED)}
         for name in ("Hash", "HashKV", "Defragment", "Snapshot (first message)")},
    ),
    "member-list-needs-user": VersionDifference(
        {(3, 4): 43, (3, 5): 29, (3, 6): 10},
        "MemberList answered anyone, whatever the token.",
        {"MemberList": _cells("none", "garbage", "expired")},
    ),
    "authenticate-ignores-token": VersionDifference(
        {(3, 4): 28, (3, 5): 0},
        "Authenticate looked at the token sent along and failed on an invalid one.",
        {"Authenticate as ro": _cells("garbage", "expired", outcome=TOKEN)},
    ),
    "auth-status": VersionDifference(
        {(3, 5): 0},
        "AuthStatus is new in 3.5.",
        {"AuthStatus": _cells(*IDENTITIES, outcome=NO_AUTH_STATUS)},
    ),
}


def expected(case: str, who: str, version: tuple[int, int, int]) -> tuple[Outcome, str | None]:
    """The answer a server of ``version`` must give, and the name of the
    version difference that decided it (None: 3.6.14's answer)."""
    for name, difference in VERSION_DIFFERENCES.items():
        if who in difference.older.get(case, {}) and difference.applies(version):
            return difference.older[case][who], name
    return EXPECTED[case][IDENTITIES.index(who)], None


# --- running it --------------------------------------------------------------------


@dataclass
class Matrix:
    """One server's answers: ``cells[(case name, identity)]``."""

    version: tuple[int, int, int]
    cells: dict[tuple[str, str], Outcome] = field(default_factory=dict)


def run_matrix(t: Target) -> Matrix:
    """Every cell in order.  A cell whose preparation fails, or that raises,
    is recorded as such; the matrix goes on."""
    matrix = Matrix(t.version)
    deadline = time.monotonic() + MATRIX_BUDGET
    for case in CASES:
        for who in IDENTITIES:
            if time.monotonic() > deadline:
                matrix.cells[case.name, who] = ("NOT RUN", f"{MATRIX_BUDGET:.0f} s budget spent")
                continue
            try:
                prepared = case.prepare(t, who) if case.prepare else None
            except AssertionError as error:
                matrix.cells[case.name, who] = ("PREPARATION FAILED", str(error))
                continue
            try:
                matrix.cells[case.name, who] = case.send(t, who, prepared)
            except Exception as error:  # recorded: the rest of the matrix still tells
                matrix.cells[case.name, who] = ("EXCEPTION", repr(error))
            if case.clean:
                try:
                    case.clean(t)
                except AssertionError as error:
                    answer = _show(matrix.cells[case.name, who])
                    matrix.cells[case.name, who] = ("CLEAN-UP FAILED", f"after {answer}: {error}")
    return matrix


def compute(name: str, server) -> Matrix:
    t = Target(name, server)
    try:
        t.setup()
        return run_matrix(t)
    finally:
        t.close()


@pytest.fixture(scope="module")
def etcd_matrix(etcd_binary) -> Matrix:
    with EtcdProcess(binary=etcd_binary, extra_args=(*FAST_ELECTION, "--bcrypt-cost", BCRYPT_COST)) as etcd:
        return compute("etcd", etcd)


@pytest.fixture(scope="module")
def mvcckv_matrix() -> Matrix:
    with MvcckvProcess(extra_args=("--bcrypt-cost", BCRYPT_COST)) as mvcckv:
        return compute("mvcckv", mvcckv)


@pytest.fixture(scope="module")
def mvcckv_pg_matrix(postgres) -> Matrix:
    """The same matrix served from PostgreSQL (a database of its own)."""
    database = f"m_{uuid.uuid4().hex[:16]}"
    url = postgres.create_database(database)
    try:
        with MvcckvProcess(extra_args=("--backend", url, "--bcrypt-cost", BCRYPT_COST)) as mvcckv:
            return compute("mvcckv", mvcckv)
    finally:
        postgres.drop_database(database)


# --- the tests ---------------------------------------------------------------------


def _report(title: str, rows: list[tuple[str, str, Outcome, Outcome, str]]) -> str:
    lines = [title]
    for case, who, got, want, why in rows:
        lines.append(f"  {case} [{who}]: got {_show(got)}; want {_show(want)}{why}")
    return "\n".join(lines)


def test_table_is_complete():
    names = [case.name for case in CASES]
    assert len(names) == len(set(names)), "case names must be unique"
    assert names == list(EXPECTED), "EXPECTED has one row per case, in the same order"
    assert {case.group for case in CASES} == set(GROUPS)
    assert all(len(row) == len(IDENTITIES) for row in EXPECTED.values())
    seen: dict[tuple[str, str], str] = {}
    for name, difference in VERSION_DIFFERENCES.items():
        for case, cells in difference.older.items():
            assert case in EXPECTED, f"{name}: unknown case {case!r}"
            for who, outcome in cells.items():
                assert (case, who) not in seen, f"{case} [{who}] in {seen.get((case, who))} and {name}"
                seen[case, who] = name
                assert outcome != EXPECTED[case][IDENTITIES.index(who)], \
                    f"{name}: {case} [{who}] does not differ"


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("target", ["etcd", "mvcckv", "mvcckv_pg"])
def test_matrix(request, target, group):
    """Every cell of ``group`` as EXPECTED says, for this server's version."""
    matrix: Matrix = request.getfixturevalue(f"{target}_matrix")
    wrong = []
    for case in CASES:
        if case.group != group:
            continue
        for who in IDENTITIES:
            want, difference = expected(case.name, who, matrix.version)
            got = matrix.cells[case.name, who]
            if got != want:
                why = f" ({difference}: {VERSION_DIFFERENCES[difference].why})" if difference else ""
                wrong.append((case.name, who, got, want, why))
    if wrong:
        version = ".".join(map(str, matrix.version))
        title = f"{target} {version}: {len(wrong)} cells differ from the table"
        pytest.fail(_report(title, wrong), pytrace=False)


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("backend", ["lmdb", "pg"])
def test_mvcckv_answers_as_etcd(request, etcd_matrix, backend, group):
    """mvcckv and etcd cell by cell, but for the cells where this etcd is
    older than a change that mvcckv follows (test_matrix checks those)."""
    mvcckv_matrix: Matrix = request.getfixturevalue("mvcckv_matrix" if backend == "lmdb" else "mvcckv_pg_matrix")
    wrong = []
    for case in CASES:
        if case.group != group:
            continue
        for who in IDENTITIES:
            if expected(case.name, who, etcd_matrix.version)[1] is not None:
                continue
            ours, theirs = mvcckv_matrix.cells[case.name, who], etcd_matrix.cells[case.name, who]
            if ours != theirs:
                wrong.append((case.name, who, ours, theirs, ""))
    if wrong:
        version = ".".join(map(str, etcd_matrix.version))
        title = f"mvcckv vs etcd {version}: {len(wrong)} cells differ (got: mvcckv, want: etcd)"
        pytest.fail(_report(title, wrong), pytrace=False)

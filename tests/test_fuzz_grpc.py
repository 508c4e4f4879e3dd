"""Fuzzing every gRPC method of ``mvcckv serve``, with and without auth.

The methods come from the service descriptors of ``mvcckv/pb/rpc_pb2`` (KV,
Watch, Lease, Maintenance, Cluster, Auth), so a method added to the proto
is fuzzed without touching this file.  Each call sends one of

* random bytes,
* a random but valid request, built by hypothesis from the request's
  message descriptor (any of its fields set, nested messages, oneofs and
  repeated fields included, a top-level repeated field now and then 129
  times, a top-level bytes field now and then up to past the 2 MiB gRPC
  limit), with values weighted towards ordinary ones (zero, false, known
  enum values) so that many requests get past validation, and drawn partly
  from pools that hit the servers' real objects (keys the limited user may
  or may not touch, user and role names, the long-lived lease, the member
  ID),
* such a request, serialized and then mutated (bytes flipped, cut,
  inserted, unknown fields appended, the message repeated),

with no token, a garbage token, root's token or a limited user's token
(in the ``token`` or the ``authorization: Bearer`` header), to a server with
auth on and to one with auth off (the tokens are the first server's; to
the second they are foreign).  Streaming methods get a short stream of one
to three such messages.

What must hold, call by call (a broken rule is recorded and the fuzzing
goes on; the test then fails listing every kind of broken rule once):

* the server process is alive, and answers a Range right after;
* the call ends: a response (which parses as the method's response type)
  or a status, within a bounded time; a watch stream answers every create
  request it was sent;
* a request that parses gets no INTERNAL, and UNKNOWN only with one of the
  texts etcd itself sends as Unknown; no status is ever mvcckv's own
  "mvcckv: internal error" (an exception nobody handled); a request that
  does not parse gets INTERNAL, as from etcd's grpc-go;
* a Put, DeleteRange or Txn that fails leaves the revision where it was,
  and a failing auth administration call the auth revision (nothing else
  writes meanwhile: calls are sequential, and no lease that holds keys can
  expire, see ``Target.restore_leases``);
* the server log shows no traceback.

Budget: ``FUZZ_EXAMPLES`` hypothesis examples per server (150, so 300 in
all; ``MVCCKV_FUZZ_EXAMPLES`` overrides it for a longer local run), deadline
off, ``CALL_TIMEOUT`` per call, and ``FUZZ_BUDGET`` seconds per server after
which the remaining examples return at once, so the module stays well
under 90 s.  Besides the random examples, every method is called once per
identity with an empty request, so none is ever missed.
"""

from __future__ import annotations

import os
import queue
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import grpc
import pytest
from google.protobuf import message as protobuf_message
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from harness import MvcckvProcess, call, stub
from mvcckv.pb import auth_pb2
from mvcckv.pb import rpc_pb2 as pb

FUZZ_EXAMPLES = int(os.environ.get("MVCCKV_FUZZ_EXAMPLES", "150"))
FUZZ_BUDGET = float(os.environ.get("MVCCKV_FUZZ_BUDGET", "35"))
"""Seconds of fuzzing per server; examples past it return at once."""

CALL_TIMEOUT = 10.0
WATCH_WAIT = 5.0
"""Seconds a watch stream gets to answer its create requests."""

BCRYPT = ("--bcrypt-cost", "4")

# --- the methods ---------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    service: str
    name: str
    path: str
    request: type[protobuf_message.Message]
    response: type[protobuf_message.Message]
    client_streaming: bool
    server_streaming: bool

    def __str__(self) -> str:
        return f"{self.service}.{self.name}"


METHODS: tuple[Method, ...] = tuple(
    Method(service.name, m.name, f"/{service.full_name}/{m.name}",
           message_factory.GetMessageClass(m.input_type), message_factory.GetMessageClass(m.output_type),
           m.client_streaming, m.server_streaming)
    for service in pb.DESCRIPTOR.services_by_name.values()
    for m in service.methods
)

KV_WRITES = frozenset({"KV.Put", "KV.DeleteRange", "KV.Txn"})
AUTH_WRITES = frozenset(f"Auth.{name}" for name in (
    "AuthEnable", "AuthDisable", "UserAdd", "UserDelete", "UserChangePassword", "UserGrantRole",
    "UserRevokeRole", "RoleAdd", "RoleDelete", "RoleGrantPermission", "RoleRevokePermission"))

# --- the servers' fixed objects ----------------------------------------------------

KEEPER = "keeper"
"""A root-role user the fuzzer never names (every generated name is checked
against it): its token restores whatever the fuzzer changed."""

USERS: dict[str, tuple[str, frozenset[str]]] = {
    KEEPER: ("keeper-pw", frozenset({"root"})),
    "root": ("root-pw", frozenset({"root"})),
    "lim": ("lim-pw", frozenset({"limrole"})),
}
LIM_ROLE = "limrole"
LIM_PERMS = (
    auth_pb2.Permission(permType=auth_pb2.Permission.READWRITE, key=b"f/", range_end=b"f0"),
    auth_pb2.Permission(permType=auth_pb2.Permission.READ, key=b"r"),
)
LEASE = 7
"""A lease that lives through the whole test (TTL an hour): requests may
attach keys to it, renew it, look at it, revoke it."""

MEMBER_ID = 0x8E9E05C52164694D
"""Member ID of a server started with the default peer URL and token."""

GARBAGE_TOKEN = "garbagegarbageXY.1"
IDENTITIES = ("none", "garbage", "root", "lim")

# --- what a status may say --------------------------------------------------------

ETCD_UNKNOWN_TEXTS = frozenset({
    # etcd's auth package error, missing from its gRPC error table.
    "auth: authentication failed, password was given for no password user",
    # bcrypt's own error, passed on by etcd's password hashing.
    "bcrypt: password length exceeds 72 bytes",
    # etcdserver's ErrUnknownMethod (Downgrade with an unknown action).
    "etcdserver: unknown method",
})
"""The texts etcd 3.6 sends with code Unknown that mvcckv can produce."""

INTERNAL_ERROR = "mvcckv: internal error"

# --- values -----------------------------------------------------------------------

# Pools start and end with ordinary values: hypothesis picks the first and
# last entries most often.
KEYS = (b"f/a", b"\0", b"f/", b"f/b/c", b"", b"f0", b"r", b"r/", b"x", b"\xff", b"\xff\xff", b"f/z")
NAMES = ("u1", "root", "lim", LIM_ROLE, "", "r1", "u2")
URLS = ("http://localhost:2380", "http://127.0.0.1:2380", "https://127.0.0.1:1", "http://[::1]:2",
        "unix:///tmp/x", "not a url", "")

_RANGES = {
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1), FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1), FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1), FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1), FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1), FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
}
_EDGES = (0, 1, -1, 2, 3, LEASE, 100, 3600, 2**31 - 1, 2**32, 9_000_000_001, 2**63 - 1, -(2**63), MEMBER_ID,
          2**64 - 1)

ALWAYS_DRAWN = frozenset({"key", "name", "role", "user"})

MAX_DEPTH = 3
"""How deep messages nest (a txn in a txn in a txn)."""

OVERSIZED_REPEAT = 129
"""One more than etcd's default --max-txn-ops."""


def _not_keeper(name: str) -> bool:
    return name != KEEPER


def _weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """One of the strategies, picked with the given weights.  Neutral values
    (zero, false, a known enum value, a key from the pool) weigh most, so
    that requests often get past validation into the code behind it; wild
    values still come often enough to probe the validation itself."""
    ranked = sorted(choices, key=lambda c: -c[0])
    pool = [strategy for weight, strategy in ranked for _ in range(weight)]
    # Hypothesis draws the ends of an integer range far more often than
    # the middle: both ends get the heaviest choice.
    pool.append(pool[0])
    return st.integers(0, len(pool) - 1).flatmap(lambda i: pool[i])


def _bytes_value(top: bool) -> st.SearchStrategy[bytes]:
    """Keys from the pool, random bytes, and (in a top-level field only:
    repeated nested messages would multiply it) now and then a value of up
    to 2.2 MB, past max-request-bytes (1.5 MiB) and gRPC's limit (+512 KiB)."""
    big = st.integers(0, 2_200_000).map(lambda n: b"v" * n)
    return _weighted((6, st.sampled_from(KEYS)), (3, st.binary(max_size=48)), (1 if top else 0, big))


def _text() -> st.SearchStrategy[str]:
    return st.text(st.characters(codec="utf-8"), max_size=24)


def _scalar(f: FieldDescriptor, top: bool) -> st.SearchStrategy[Any]:
    t = f.type
    if t == FieldDescriptor.TYPE_BOOL:
        return _weighted((3, st.just(False)), (1, st.just(True)))
    if t == FieldDescriptor.TYPE_BYTES:
        return _bytes_value(top)
    if t == FieldDescriptor.TYPE_STRING:
        if f.name == "peerURLs":
            return _weighted((3, st.sampled_from(URLS)), (1, _text()))
        if "password" in f.name.lower():
            return _weighted((3, st.sampled_from(("", "pw", "root-pw", "lim-pw", "p" * 73))), (1, _text()))
        return _weighted((3, st.sampled_from(NAMES)), (1, _text().filter(_not_keeper)))
    if t == FieldDescriptor.TYPE_ENUM:
        return _weighted((3, st.sampled_from([v.number for v in f.enum_type.values])),
                         (1, st.integers(-(2**31), 2**31 - 1)))
    if t in _RANGES:
        lo, hi = _RANGES[t]
        return _weighted((4, st.just(0)), (2, st.sampled_from([e for e in _EDGES if lo <= e <= hi])),
                         (2, st.integers(max(lo, -3), min(hi, 60))), (1, st.integers(lo, hi)))
    raise AssertionError(f"no strategy for {f.full_name} (type {t})")


_MESSAGES: dict[tuple[str, int], st.SearchStrategy] = {}


def messages(desc: Descriptor, depth: int = 0) -> st.SearchStrategy[protobuf_message.Message]:
    """Valid messages of type ``desc``: the ``ALWAYS_DRAWN`` fields and any
    subset of the others set, at most one field per oneof;
    repeated fields with up to three values or (top level only)
    ``OVERSIZED_REPEAT`` copies of one; nested up to ``MAX_DEPTH``."""
    memo = (desc.full_name, depth)
    if memo in _MESSAGES:
        return _MESSAGES[memo]
    cls = message_factory.GetMessageClass(desc)
    # The field naming what a request acts on is always drawn (left out,
    # it would be empty half of the time and the request refused at once);
    # any other field may be left out, which for a proto3 scalar means its
    # default value.
    named: dict[str, st.SearchStrategy] = {}
    others: dict[str, st.SearchStrategy] = {}
    oneofs: dict[str, list[FieldDescriptor]] = {}
    for f in desc.fields:
        if f.containing_oneof is not None:
            oneofs.setdefault(f.containing_oneof.name, []).append(f)
        elif f.name in ALWAYS_DRAWN and not f.is_repeated:
            named[f.name] = _field(f, depth)
        else:
            others[f.name] = _field(f, depth)
    chosen = {name: st.one_of(st.none(), *(st.tuples(st.just(f.name), _field(f, depth)) for f in fields))
              for name, fields in oneofs.items()}

    def build(values: dict[str, Any], picks: dict[str, tuple[str, Any] | None]) -> protobuf_message.Message:
        msg = cls()
        for name, value in [*values.items(), *(p for p in picks.values() if p is not None)]:
            _set(msg, desc.fields_by_name[name], value)
        return msg

    strategy = st.builds(build, st.fixed_dictionaries(named, optional=others), st.fixed_dictionaries(chosen))
    _MESSAGES[memo] = strategy
    return strategy


def _field(f: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if f.type == FieldDescriptor.TYPE_MESSAGE:
        if depth >= MAX_DEPTH:
            one = st.just(message_factory.GetMessageClass(f.message_type)())
        else:
            one = st.deferred(lambda: messages(f.message_type, depth + 1))
    else:
        one = _scalar(f, top=depth == 0)
    if not f.is_repeated:
        return one
    if depth:
        return st.lists(one, max_size=3)
    return _weighted((12, st.lists(one, max_size=3)), (1, one.map(lambda v: [v] * OVERSIZED_REPEAT)))


def _set(msg: protobuf_message.Message, f: FieldDescriptor, value: Any) -> None:
    if f.is_repeated:
        getattr(msg, f.name).extend(value)
    elif f.type == FieldDescriptor.TYPE_MESSAGE:
        sub = getattr(msg, f.name)
        sub.SetInParent()  # an empty message still marks its oneof
        sub.MergeFrom(value)
    else:
        setattr(msg, f.name, value)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


@st.composite
def mutated(draw, valid: st.SearchStrategy[bytes]) -> bytes:
    data = bytearray(draw(valid))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(("flip", "cut", "insert", "unknown field", "repeat")))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and data:
            at = min(at, len(data) - 1)
            data[at] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "unknown field":
            number = draw(st.integers(1, 2**29 - 1))
            wire = draw(st.sampled_from((0, 1, 2, 5)))
            body = {0: _varint(draw(st.integers(0, 2**64 - 1))), 1: bytes(8), 5: bytes(4)}.get(wire)
            if body is None:
                blob = draw(st.binary(max_size=16))
                body = _varint(len(blob)) + blob
            data += _varint(number << 3 | wire) + body
        else:
            data += bytes(data)  # parsing a message twice merges it
    return bytes(data)


def payloads(method: Method) -> st.SearchStrategy[tuple[str, list[bytes]]]:
    """``(shape, messages)``: one message, or one to three for a client
    stream, all random bytes, all valid or all mutated."""
    valid = messages(method.request.DESCRIPTOR).map(lambda m: m.SerializeToString())
    shapes = {"random": st.binary(max_size=200), "valid": valid, "mutated": mutated(valid)}
    count = st.integers(1, 3) if method.client_streaming else st.just(1)
    return st.sampled_from(("valid",) * 4 + ("mutated", "random")).flatmap(
        lambda shape: st.tuples(st.just(shape), st.lists(shapes[shape], min_size=1, max_size=3)
                                .flatmap(lambda items: count.map(lambda n: items[:n]))))


# --- calling ----------------------------------------------------------------------


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    responses: list[bytes]
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.code == grpc.StatusCode.OK


def _identity(data: bytes) -> bytes:
    return data


def invoke(channel: grpc.Channel, method: Method, messages: list[bytes], metadata) -> Outcome:
    if not method.client_streaming and not method.server_streaming:
        reply = call(channel, method.path, messages[0], timeout=CALL_TIMEOUT, metadata=metadata)
        return Outcome(reply.code, reply.details, [reply.data] if reply.data is not None else [])
    if not method.client_streaming:
        fn = channel.unary_stream(method.path, request_serializer=_identity, response_deserializer=_identity)
        return _drain(fn(messages[0], timeout=CALL_TIMEOUT, metadata=metadata))
    fn = channel.stream_stream(method.path, request_serializer=_identity, response_deserializer=_identity)
    if method.name == "Watch":
        return _watch(fn, messages, metadata)
    # LeaseKeepAlive ends when the client has sent its last request.
    return _drain(fn(iter(messages), timeout=CALL_TIMEOUT, metadata=metadata))


def _drain(responses) -> Outcome:
    got: list[bytes] = []
    try:
        for r in responses:
            got.append(r)
    except grpc.RpcError as e:
        return Outcome(e.code(), e.details() or "", got)
    return Outcome(grpc.StatusCode.OK, "", got)


def _creates(messages: list[bytes]) -> int | None:
    """How many create requests the stream carries; None if one of its
    messages does not parse."""
    n = 0
    for data in messages:
        try:
            req = pb.WatchRequest.FromString(data)
        except protobuf_message.DecodeError:
            return None
        n += req.WhichOneof("request_union") == "create_request"
    return n


def _watch(fn, messages: list[bytes], metadata) -> Outcome:
    """A watch stream never ends by itself: send the messages, keep the
    stream open until every create request is answered (or, for a message
    that does not parse, until the server ends the stream), then cancel."""
    requests: queue.Queue = queue.Queue()
    for m in messages:
        requests.put(m)
    stream = fn(iter(requests.get, None), metadata=metadata)
    got: list[bytes] = []
    ended: list[grpc.RpcError] = []
    arrived = threading.Condition()

    def read() -> None:
        try:
            for r in stream:
                with arrived:
                    got.append(r)
                    arrived.notify_all()
        except grpc.RpcError as e:
            with arrived:
                ended.append(e)
                arrived.notify_all()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    want = _creates(messages)

    def answered() -> bool:
        if ended:
            return True
        if want is None:
            return False
        return sum(pb.WatchResponse.FromString(r).created for r in got) >= want

    with arrived:
        # Nothing to wait for when no create was sent: a short look for an
        # error status is enough.
        done = arrived.wait_for(answered, timeout=0.3 if want == 0 else WATCH_WAIT)
    stream.cancel()
    requests.put(None)
    reader.join(timeout=CALL_TIMEOUT)
    if ended and ended[0].code() != grpc.StatusCode.CANCELLED:
        return Outcome(ended[0].code(), ended[0].details() or "", got)
    if want is None or (want and not done):
        note = "no answer to a message that does not parse" if want is None else \
            f"{want} create requests, {sum(pb.WatchResponse.FromString(r).created for r in got)} answered"
        return Outcome(grpc.StatusCode.DEADLINE_EXCEEDED, "watch stream hung", got, note)
    return Outcome(grpc.StatusCode.OK, "", got)


# --- a server under fuzz ------------------------------------------------------------


class RpcFailed(AssertionError):
    pass


def _must(fn: Callable[..., Any], request, metadata=(), allow: tuple[str, ...] = ()) -> Any:
    """A helper call that must work (or fail with one of ``allow``'s texts,
    then None)."""
    try:
        return fn(request, timeout=CALL_TIMEOUT, metadata=metadata)
    except grpc.RpcError as e:
        if e.details() in allow:
            return None
        raise RpcFailed(f"{type(request).__name__}: {e.code().name} {e.details()}") from None


@dataclass
class Target:
    """One fuzzed server with its canonical state (users, roles, the lease,
    the auth switch) and what the fuzzing saw."""

    name: str
    server: MvcckvProcess
    auth_on: bool
    channel: grpc.Channel = None  # type: ignore[assignment]
    seen: Counter = field(default_factory=Counter)
    calls: Counter = field(default_factory=Counter)
    violations: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    _admin: tuple | None = None

    def __post_init__(self) -> None:
        self.channel = self.server.channel()

    # -- identities --

    def login(self, name: str) -> tuple[tuple[str, str], ...]:
        """Metadata carrying a fresh token of ``name``; none when auth is off."""
        try:
            resp = stub(self.channel, "Auth").Authenticate(
                pb.AuthenticateRequest(name=name, password=USERS[name][0]), timeout=CALL_TIMEOUT)
        except grpc.RpcError as e:
            if e.details() == "etcdserver: authentication is not enabled":
                return ()
            raise RpcFailed(f"login {name}: {e.code().name} {e.details()}") from None
        return (("token", resp.token),)

    def admin(self) -> tuple[tuple[str, str], ...]:
        """Keeper's token metadata, kept until a restore (which is when it
        can have been dropped: auth switched off and on)."""
        if self._admin is None:
            self._admin = self.login(KEEPER)
        return self._admin

    # -- probes --

    def revision(self) -> int:
        """The store's revision, from a serializable Range by keeper; also
        proves the server answers."""
        resp = _must(stub(self.channel).Range, pb.RangeRequest(key=b"health", serializable=True), self.admin())
        return resp.header.revision

    def auth_revision(self) -> int:
        return _must(stub(self.channel, "Auth").AuthStatus, pb.AuthStatusRequest(), self.admin()).authRevision

    # -- canonical state --

    def setup(self) -> None:
        self.restore_auth()
        self.restore_leases()

    def restore_auth(self) -> None:
        """Role limrole with exactly its permissions; users keeper, root and
        lim with their passwords and roles; auth on or off as the target
        wants.  Other users and roles the fuzzer made are left alone."""
        self._admin = None
        auth = stub(self.channel, "Auth")
        md = self.admin()
        role = _must(auth.RoleGet, pb.AuthRoleGetRequest(role=LIM_ROLE), md, allow=("etcdserver: role name not found",))
        if role is None:
            _must(auth.RoleAdd, pb.AuthRoleAddRequest(name=LIM_ROLE), md)
            perms = []
        else:
            perms = list(role.perm)
        if sorted(p.SerializeToString() for p in perms) != sorted(p.SerializeToString() for p in LIM_PERMS):
            for p in perms:
                _must(auth.RoleRevokePermission,
                      pb.AuthRoleRevokePermissionRequest(role=LIM_ROLE, key=p.key, range_end=p.range_end), md)
            for p in LIM_PERMS:
                _must(auth.RoleGrantPermission, pb.AuthRoleGrantPermissionRequest(name=LIM_ROLE, perm=p), md)
        for user, (password, roles) in USERS.items():
            got = _must(auth.UserGet, pb.AuthUserGetRequest(name=user), md, allow=("etcdserver: user name not found",))
            if got is None:
                _must(auth.UserAdd, pb.AuthUserAddRequest(name=user, password=password), md)
                have: set[str] = set()
            else:
                have = set(got.roles)
                if user != KEEPER:
                    # The fuzzer may have changed it; a reset costs one cheap hash.
                    _must(auth.UserChangePassword,
                          pb.AuthUserChangePasswordRequest(name=user, password=password), md)
            for role in have - roles:
                _must(auth.UserRevokeRole, pb.AuthUserRevokeRoleRequest(name=user, role=role), md)
            for role in roles - have:
                _must(auth.UserGrantRole, pb.AuthUserGrantRoleRequest(user=user, role=role), md)
        if self._auth_enabled() != self.auth_on:
            if self.auth_on:
                _must(auth.AuthEnable, pb.AuthEnableRequest())
            else:
                _must(auth.AuthDisable, pb.AuthDisableRequest(), md)
            self._admin = None
        assert self._auth_enabled() == self.auth_on

    def _auth_enabled(self) -> bool:
        try:
            return stub(self.channel, "Auth").AuthStatus(pb.AuthStatusRequest(), timeout=CALL_TIMEOUT).enabled
        except grpc.RpcError as e:
            # Without a token AuthStatus is refused exactly when auth is on.
            if e.details() == "etcdserver: user name is empty":
                return True
            raise

    def restore_leases(self) -> None:
        """Lease ``LEASE`` alive, every other lease revoked: a lease the
        fuzzer granted could expire later and delete keys behind a
        revision check's back."""
        md = self.admin()
        lease = stub(self.channel, "Lease")
        for held in _must(lease.LeaseLeases, pb.LeaseLeasesRequest(), md).leases:
            if held.ID != LEASE:
                _must(lease.LeaseRevoke, pb.LeaseRevokeRequest(ID=held.ID), md,
                      allow=("etcdserver: requested lease not found",))
        if _must(lease.LeaseTimeToLive, pb.LeaseTimeToLiveRequest(ID=LEASE), md).TTL <= 0:
            _must(lease.LeaseGrant, pb.LeaseGrantRequest(ID=LEASE, TTL=3600), md)

    def restore_alarms(self) -> None:
        md = self.admin()
        maintenance = stub(self.channel, "Maintenance")
        for alarm in _must(maintenance.Alarm, pb.AlarmRequest(action=pb.AlarmRequest.GET), md).alarms:
            _must(maintenance.Alarm, pb.AlarmRequest(action=pb.AlarmRequest.DEACTIVATE, memberID=alarm.memberID,
                                                     alarm=alarm.alarm), md)

    def restore_after(self, method: Method) -> None:
        """Undo what a successful call may have changed in the canonical
        state.  Instead of keeping the fuzzer away from destructive calls
        (AuthDisable, deleting or re-passwording root and lim, revoking
        their roles or the lease, raising alarms), they are allowed and
        reverted here, so that the next call finds the same servers."""
        key = str(method)
        if key in AUTH_WRITES:
            self.restore_auth()
        elif method.service == "Lease" and method.name in ("LeaseGrant", "LeaseRevoke"):
            self.restore_leases()
        elif key == "Maintenance.Alarm":
            self.restore_alarms()

    # -- judging --

    def record(self, method: Method, identity: str, shape: str, sent: list[bytes], outcome: Outcome) -> None:
        self.calls[str(method)] += 1
        self.seen[(outcome.code.name, outcome.details)] += 1
        problem = judge(method, [_parses(method.request, m) for m in sent], outcome)
        if problem:
            self.violate(method, problem, f"{outcome.code.name} {_masked(outcome.details)}",
                         f"identity={identity} shape={shape} sent={[m[:80].hex() for m in sent]}"
                         f"{(' note=' + outcome.note) if outcome.note else ''}")

    def violate(self, method: Method | str, problem: str, answer: str, example: str) -> None:
        """Record a broken rule; kinds are (rule, answer), each with the
        first request per method that broke it."""
        self.violations.setdefault((problem, answer), {}).setdefault(str(method), example)


def _parses(cls: type[protobuf_message.Message], data: bytes) -> bool:
    try:
        cls.FromString(data)
    except protobuf_message.DecodeError:
        return False
    return True


_TYPE_NAME = re.compile(r"message with type '[\w.]+'")
_METHOD_PATH = re.compile(r"\[/[\w.]+/\w+\]")


def _masked(details: str) -> str:
    """A status text with the message type masked and its length capped, so
    that one kind of answer from many methods groups as one."""
    details = _TYPE_NAME.sub("message with type '<request>'", details)
    details = _METHOD_PATH.sub("[<method>]", details)
    return details if len(details) <= 200 else details[:200] + "..."


def judge(method: Method, parsed: list[bool], outcome: Outcome) -> str:
    """What is wrong with ``outcome`` (empty: nothing); ``parsed`` says which
    of the messages sent parse."""
    if outcome.note:
        return outcome.note
    if INTERNAL_ERROR in outcome.details:
        return "an exception the server did not handle"
    if outcome.ok:
        for r in outcome.responses:
            if not _parses(method.response, r):
                return "a response that does not parse"
        return ""
    code = outcome.code
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in outcome.details:
        return ""  # gRPC's own size limit, checked before parsing
    if not all(parsed):
        if code == grpc.StatusCode.INTERNAL:
            return ""
        if not parsed[0]:
            return "a request that does not parse: not INTERNAL (etcd's code)"
        # A stream may end on what its first, good messages get (a refused
        # token, say) before the server reads the bad one.
    if code == grpc.StatusCode.INTERNAL:
        return "INTERNAL for a request that parses"
    if code == grpc.StatusCode.UNKNOWN and outcome.details not in ETCD_UNKNOWN_TEXTS:
        return "UNKNOWN with a text etcd does not send"
    if code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        return "no answer in time"
    if code == grpc.StatusCode.UNAVAILABLE and not outcome.details.startswith("etcdserver: "):
        return "the server went away"
    return ""


# --- fixtures ---------------------------------------------------------------------------


def _start(tmp_path_factory, name: str, auth_on: bool):
    root = tmp_path_factory.mktemp(f"fuzz-{name}")
    server = MvcckvProcess(root / "data", log_path=root / "mvcckv.log", extra_args=BCRYPT)
    server.start()
    target = Target(name, server, auth_on)
    try:
        target.setup()
    except BaseException:
        target.channel.close()
        server.stop()
        raise
    return target


@pytest.fixture(scope="module")
def auth_target(tmp_path_factory):
    target = _start(tmp_path_factory, "auth", True)
    yield target
    target.channel.close()
    target.server.stop()


@pytest.fixture(scope="module")
def open_target(tmp_path_factory):
    target = _start(tmp_path_factory, "open", False)
    yield target
    target.channel.close()
    target.server.stop()


@pytest.fixture(params=["auth", "open"])
def target(request) -> Target:
    return request.getfixturevalue(f"{request.param}_target")


class Tokens:
    """Root's and lim's tokens on the auth server, refreshed after every
    restore there (a restore resets passwords, which drops tokens)."""

    def __init__(self, auth: Target):
        self.auth = auth
        self.refresh()

    def refresh(self) -> None:
        self.by_identity = {"none": None, "garbage": GARBAGE_TOKEN,
                            "root": self.auth.login("root")[0][1], "lim": self.auth.login("lim")[0][1]}

    def metadata(self, identity: str, header: str) -> tuple[tuple[str, str], ...]:
        token = self.by_identity[identity]
        if token is None:
            return ()
        if header == "authorization":
            return (("authorization", f"Bearer {token}"),)
        return (("token", token),)


@pytest.fixture(scope="module")
def tokens(auth_target) -> Tokens:
    return Tokens(auth_target)


# --- one fuzz step --------------------------------------------------------------------


def step(t: Target, tokens: Tokens, method: Method, identity: str, header: str, shape: str,
         sent: list[bytes]) -> None:
    key = str(method)
    before = t.revision() if key in KV_WRITES else None
    auth_before = t.auth_revision() if key in AUTH_WRITES else None
    outcome = invoke(t.channel, method, sent, tokens.metadata(identity, header))
    if not t.server.alive():
        raise AssertionError(f"{t.name}: the server died after {method} identity={identity} "
                             f"sent={[m.hex() for m in sent]}\n{t.server.log_text()[-3000:]}")
    t.record(method, identity, shape, sent, outcome)
    example = f"identity={identity} sent={[m[:80].hex() for m in sent]}: {outcome.code.name} {outcome.details}"
    if not outcome.ok:
        if before is not None and t.revision() != before:
            t.violate(method, "a failed write moved the revision", outcome.code.name, example)
        if auth_before is not None and t.auth_revision() != auth_before:
            t.violate(method, "a failed auth change moved the auth revision", outcome.code.name, example)
    if outcome.ok:
        t.restore_after(method)
        if key in AUTH_WRITES and t.name == "auth":
            tokens.refresh()
    try:
        t.revision()
    except (RpcFailed, grpc.RpcError) as e:
        raise AssertionError(f"{t.name}: no answer to a Range after {method} ({example}): {e}") from None


# --- the tests -------------------------------------------------------------------------


def test_every_service_method_is_fuzzed():
    services = {s.name for s in pb.DESCRIPTOR.services_by_name.values()}
    assert services == {"KV", "Watch", "Lease", "Maintenance", "Cluster", "Auth"}
    assert len(METHODS) == sum(len(s.methods) for s in pb.DESCRIPTOR.services_by_name.values())
    streams = {str(m) for m in METHODS if m.client_streaming or m.server_streaming}
    assert streams == {"Watch.Watch", "Lease.LeaseKeepAlive", "Maintenance.Snapshot"}


def _report(t: Target) -> str:
    lines = [f"{t.name} server, {sum(t.calls.values())} calls: {len(t.violations)} kinds of broken rules"]
    for (problem, answer), examples in sorted(t.violations.items()):
        lines.append(f"* {problem}: {answer}\n  methods: {', '.join(sorted(examples))}")
        method, example = next(iter(examples.items()))
        lines.append(f"  e.g. {method} {example}")
    return "\n".join(lines)


_LOGGED_ERROR = re.compile(r"^\S+ \S+ ERROR (.*)$", re.M)


# grpcio logs this when a message it was sending failed because the client
# had already gone, before it noticed the client was gone: the fuzzer
# cancels every watch stream it opens, so the race is ours, not the server's.
_CANCEL_RACE = "ExecuteBatchError raised in core by servicer method"


def _log_problems(t: Target, since: int) -> None:
    """Tracebacks in the server log after offset ``since``, one kind per
    logged error line."""
    text = t.server.log_text()[since:]
    for m in _LOGGED_ERROR.finditer(text):
        if _CANCEL_RACE in m.group(1):
            continue
        if text.startswith("Traceback", m.end() + 1):
            t.violate("server log", "a traceback", _masked(m.group(1)), text[m.end() + 1:m.end() + 1200])


def test_every_method_answers_every_identity(target: Target, tokens: Tokens):
    """Each method once per identity and token header, with an empty request."""
    log_start = len(target.server.log_text())
    target.violations.clear()
    for method in METHODS:
        for identity in IDENTITIES:
            for header in (("token", "authorization") if identity != "none" else ("token",)):
                step(target, tokens, method, identity, header, "empty", [b""])
    _log_problems(target, log_start)
    assert not target.violations, _report(target)


def test_fuzz(target: Target, tokens: Tokens):
    log_start = len(target.server.log_text())
    target.violations.clear()
    started = time.monotonic()
    ran = []

    # No shrinking: the server's state carries over from example to
    # example, so a smaller example would not fail the same way; the
    # report names each broken rule with the first request that broke it.
    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, phases=(Phase.explicit, Phase.generate),
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def fuzz(data) -> None:
        if time.monotonic() - started > FUZZ_BUDGET:
            return
        method = data.draw(st.sampled_from(METHODS), label="method")
        identity = data.draw(st.sampled_from(IDENTITIES), label="identity")
        header = data.draw(st.sampled_from(("token", "authorization")), label="header")
        shape, sent = data.draw(payloads(method), label="payload")
        step(target, tokens, method, identity, header, shape, sent)
        ran.append(str(method))

    fuzz()
    _log_problems(target, log_start)
    assert len(ran) >= min(FUZZ_EXAMPLES, 50), f"only {len(ran)} examples ran in {FUZZ_BUDGET} s"
    assert not target.violations, _report(target) + f"\n(statuses seen: {sorted(target.seen)[:40]})"


# --- what the fuzzing found ------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-plain")
    with MvcckvProcess(root / "data", log_path=root / "mvcckv.log", extra_args=BCRYPT) as server:
        yield server


@pytest.mark.parametrize("method", ["KV.Range", "KV.Put", "Auth.UserAdd", "Lease.LeaseGrant"])
def test_a_unary_request_that_does_not_parse_gets_internal(plain_server, method):
    """etcd (grpc-go) answers INTERNAL "grpc: error unmarshalling request:
    ..."; grpcio's default is UNKNOWN with the Python exception's text."""
    m = next(m for m in METHODS if str(m) == method)
    with plain_server.channel() as ch:
        reply = call(ch, m.path, b"\xff\xff\xff", timeout=CALL_TIMEOUT)
    assert (reply.code, INTERNAL_ERROR in reply.details) == (grpc.StatusCode.INTERNAL, False), reply


@pytest.mark.parametrize("method", ["Watch.Watch", "Lease.LeaseKeepAlive"])
def test_a_stream_message_that_does_not_parse_is_not_an_internal_error(plain_server, method):
    """etcd ends the stream with INTERNAL "grpc: failed to unmarshal the
    received message ..."; mvcckv must not treat it as its own bug
    ("mvcckv: internal error", and a traceback in the log)."""
    m = next(m for m in METHODS if str(m) == method)
    with plain_server.channel() as ch:
        outcome = invoke(ch, m, [b"\xff\xff"], ())
    assert outcome.code == grpc.StatusCode.INTERNAL, outcome
    assert INTERNAL_ERROR not in outcome.details, outcome
    assert "Traceback" not in plain_server.log_text()

"""Who is asking, and may they: etcd's access control at the RPC layer.

Every service asks the guard before it serves a request.  The guard turns a
call's metadata into an :class:`~mvcckv.auth.AuthInfo` (the ``token`` key,
or ``authorization`` with an optional ``Bearer `` prefix as the gateway
sends it; failing both, the verified TLS client certificate's Common Name
when client-certificate auth is on) and asks the engine's auth store
whether that identity may do what the request does.  The rules are etcd's
(``server/etcdserver/apply/apply_auth.go``, ``v3_server.go`` and the v3rpc
maintenance and auth servers):

=====================================  ==================================
request                                needs
=====================================  ==================================
Range, read-only Txn, compare          READ on the key or range
Put                                    WRITE on the key; READ too with
                                       ``prev_kv``; WRITE on every key
                                       already attached to its lease
DeleteRange                            WRITE on the range (+READ: prev_kv)
Txn                                    all of the above for every compare
                                       and every op of both branches
Watch create                           READ on the watched range
LeaseGrant, Status, Alarm GET          any valid identity
LeaseRevoke, LeaseKeepAlive            WRITE on every attached key
LeaseTimeToLive (keys), LeaseLeases    READ on every attached key
LeaseTimeToLive, MemberList            any valid identity
Defragment, Snapshot, Hash, HashKV,    the ``root`` role
Alarm (de)activate, MoveLeader,
Downgrade, member changes, auth
administration, AuthStatus, Compact
UserGet / RoleGet                      root, or oneself / one's own role
Authenticate                           nothing
=====================================  ==================================

When auth is off every check returns after one attribute test, so an
unauthenticated server pays nothing for the guard.  With auth on, a request's
static checks run here first, because etcd rejects a malformed request
before it looks at who sent it; the engine repeats them when the request
is proposed (a few microseconds, paid only with auth on).

Reads are checked here and answered at once; if the auth store changed
while the read ran, the answer is withdrawn (``revision of auth store is
old``), as etcd's ``doSerialize`` does.  Writes are checked here, before
they are logged, and carry the auth revision they were checked at into the
engine, which refuses them at apply time if auth changed in between (etcd's
applier does the same with the revision in the raft request header); a
write let through with auth off carries ``AUTH_OFF`` instead, and is
refused as user-less if auth was turned on before it was applied.
"""

from __future__ import annotations

from mvcckv import errors, validate
from mvcckv.auth import AuthInfo
from mvcckv.kv import AUTH_OFF
from mvcckv.pb import rpc_pb2 as pb
from mvcckv.server import tls
from mvcckv.server.tokens import TokenProvider

_BEARER = "Bearer "


class Guard:
    """The access checks of one server; see the module docstring."""

    def __init__(self, store, tokens: TokenProvider, *, cert_auth: bool = False):
        self._store = store
        self.auth = self._auth = store.auth
        self.tokens = tokens
        self._cert_auth = cert_auth

    @property
    def enabled(self) -> bool:
        return self._auth.enabled

    # ------------------------------------------------------------------
    # identity

    def info(self, context) -> AuthInfo | None:
        """The caller's identity, None if it gave none (or auth is off).

        Raises ``InvalidAuthTokenError`` for a token that is unknown,
        expired or forged: a token, once given, is never ignored.
        """
        auth = self._auth
        if not auth.enabled:
            return None
        token = None
        for key, value in context.invocation_metadata() or ():
            if key == "token":
                token = value
                break
            if key == "authorization" and token is None:
                token = value
        if token is not None:
            if token.startswith(_BEARER):
                token = token[len(_BEARER) :]
            info = self.tokens.info(token, auth.revision)
            if info is None:
                raise errors.InvalidAuthTokenError()
            return info
        if self._cert_auth:
            name = tls.common_name(context)
            if name is not None:
                return AuthInfo(name, auth.revision)
        return None

    def _identity(self, context) -> AuthInfo:
        # The permission checks treat a missing identity as the empty user,
        # which they refuse with "user name is empty".
        return self.info(context) or _NOBODY

    def require(self, context) -> int:
        """Any valid identity (etcd's ``requireAuthInfo``); its auth revision."""
        if not self._auth.enabled:
            return 0
        info = self.info(context)
        if info is None:
            raise errors.UserEmptyError()
        return info.revision

    def admin(self, context) -> int:
        """The ``root`` role (etcd's ``IsAdminPermitted``)."""
        if not self._auth.enabled:
            return AUTH_OFF
        info = self.info(context)
        self._auth.check_admin(info)
        return info.revision

    def is_admin(self, info: AuthInfo | None) -> bool:
        try:
            self._auth.check_admin(info)
        except errors.MvccError:
            return False
        return True

    # ------------------------------------------------------------------
    # reads

    def range(self, context, req: pb.RangeRequest) -> int:
        if not self._auth.enabled:
            return 0
        validate.check_range(req)
        info = self._identity(context)
        self._auth.check_range(info, req.key, req.range_end)
        return info.revision

    def read_txn(self, context, req: pb.TxnRequest) -> int:
        if not self._auth.enabled:
            return 0
        validate.check_txn(req, self._store.options.max_txn_ops)
        info = self._identity(context)
        self._check_txn(info, req)
        return info.revision

    def settled(self, revision: int) -> None:
        """After a read checked at ``revision``: withdraw it if auth moved."""
        if revision and revision != self._auth.revision:
            raise errors.AuthOldRevisionError()

    def watch(self, context, key: bytes, range_end: bytes) -> None:
        if not self._auth.enabled:
            return
        self._auth.check_range(self._identity(context), key, range_end)

    # ------------------------------------------------------------------
    # writes: each returns the auth revision to log with the request

    def put(self, context, req: pb.PutRequest) -> int:
        if not self._auth.enabled:
            return AUTH_OFF
        validate.check_put(req)
        info = self._identity(context)
        self._check_put(info, req)
        return info.revision

    def delete_range(self, context, req: pb.DeleteRangeRequest) -> int:
        if not self._auth.enabled:
            return AUTH_OFF
        validate.check_delete(req)
        info = self._identity(context)
        self._check_delete(info, req)
        return info.revision

    def txn(self, context, req: pb.TxnRequest) -> int:
        if not self._auth.enabled:
            return AUTH_OFF
        validate.check_txn(req, self._store.options.max_txn_ops)
        info = self._identity(context)
        self._check_txn(info, req)
        return info.revision

    def lease_write(self, context, lease_id: int) -> int:
        """LeaseRevoke and LeaseKeepAlive: WRITE on every attached key."""
        if not self._auth.enabled:
            return 0
        info = self.info(context)
        if info is None:
            raise errors.UserEmptyError()
        self._check_lease_keys(info, lease_id, self._may_write_key)
        return info.revision

    def lease_read(self, context, lease_ids) -> int:
        """LeaseTimeToLive and LeaseLeases: READ on every attached key."""
        if not self._auth.enabled:
            return 0
        info = self.info(context)
        if info is None:
            raise errors.UserEmptyError()
        if not self.is_admin(info):
            for lease_id in lease_ids:
                self._check_lease_keys(info, lease_id, self._may_read_key, admin_checked=True)
        return info.revision

    # ------------------------------------------------------------------

    def _check_put(self, info: AuthInfo, p: pb.PutRequest) -> None:
        auth = self._auth
        auth.check_put(info, p.key)
        if p.lease:
            self._check_lease_keys(info, p.lease, self._may_write_key)
        if p.prev_kv:
            auth.check_range(info, p.key, b"")

    def _check_delete(self, info: AuthInfo, d: pb.DeleteRangeRequest) -> None:
        self._auth.check_delete_range(info, d.key, d.range_end)
        if d.prev_kv:
            self._auth.check_range(info, d.key, d.range_end)

    def _check_txn(self, info: AuthInfo, t: pb.TxnRequest) -> None:
        auth = self._auth
        for c in t.compare:
            auth.check_range(info, c.key, c.range_end)
        for ops in (t.success, t.failure):
            for op in ops:
                which = op.WhichOneof("request")
                if which == "request_range":
                    auth.check_range(info, op.request_range.key, op.request_range.range_end)
                elif which == "request_put":
                    self._check_put(info, op.request_put)
                elif which == "request_delete_range":
                    d = op.request_delete_range
                    # etcd checks prev_kv's READ before the WRITE inside a txn.
                    if d.prev_kv:
                        auth.check_range(info, d.key, d.range_end)
                    auth.check_delete_range(info, d.key, d.range_end)
                elif which == "request_txn":
                    self._check_txn(info, op.request_txn)

    def _may_write_key(self, info: AuthInfo, key: bytes) -> None:
        self._auth.check_put(info, key)

    def _may_read_key(self, info: AuthInfo, key: bytes) -> None:
        self._auth.check_range(info, key, b"")

    def _check_lease_keys(self, info: AuthInfo, lease_id: int, check, admin_checked: bool = False) -> None:
        keys = self._store.lease_ttl(lease_id, keys=True).keys
        if not keys:
            return
        if not admin_checked and self.is_admin(info):
            return
        for key in keys:
            check(info, key)


_NOBODY = AuthInfo("", 0)


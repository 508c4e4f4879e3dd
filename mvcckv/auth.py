"""The auth store: users, roles, permissions, auth on/off (ETCD_SEMANTICS §11).

State and durability
====================

Everything here changes only through logged requests (the ``KIND_AUTH_*``
kinds of ``kv.py``), applied by :meth:`AuthStore.apply` on the store's
writer thread inside the batch's LMDB transaction, so the consistent index
that names a request is committed with its effect and a WAL replay after a
crash reapplies exactly the requests the backend lacks.  The backend layout
is etcd's bbolt schema:

==============  ========================================================
``auth``        ``authEnabled`` -> 1 byte (1 on, 0 off);
                ``authRevision`` -> 8-byte BE (absent on a fresh store: 1)
``authUsers``   user name -> encoded ``authpb.User``
``authRoles``   role name -> encoded ``authpb.Role``
==============  ========================================================

The auth revision starts at 1 and grows by one with every request that
changes users, roles or permissions, and with a disable; enabling does not
move it (etcd reads it back unchanged), and a request that changes nothing
(enable when on, disable when off, granting a role the user already has)
or fails leaves it alone.

Readers take no lock.  The whole state is one immutable :class:`_State`
that ``apply`` builds beside the old one and swaps in with a single
assignment, so a permission check, a user lookup or a password check reads
one consistent version however the writer interleaves.

Permission checks
=================

Checks follow etcd's ``isOpPermitted`` and ``IsAdminPermitted``; with auth
off every check returns after one attribute test.  A user's permissions are
merged per type into sorted disjoint intervals on first use (READWRITE
counts as both), cached in the state, and so dropped with it on any change.
A single key needs one interval holding it; a range needs one merged
interval covering all of it: one bisect over the starts either way,
O(log n).  Worked example, a user with two roles::

    role r1: READ      [a, c)
             READ      d               (a key: [d, d\\x00))
    role r2: READWRITE [c, ca)
             WRITE     [x, "\\0")       (range_end "\\0": every key >= x)

    READ  intervals [a, c) [c, ca) [d, d\\x00)   merge to  [a, ca) [d, d\\x00)
    WRITE intervals [c, ca) [x, inf)            stay      [c, ca) [x, inf)

    check_range(b"a", b"c9")   READ  [a, c9)  in [a, ca)           permitted
    check_range(b"b", b"e")    READ  [b, e)   crosses the gap at ca denied
    check_range(b"d", b"")     READ  key d    in [d, d\\x00)        permitted
    check_put(b"zz")           WRITE key zz   in [x, inf)          permitted
    check_delete_range(b"y", b"\\0")  WRITE [y, inf)  in [x, inf)   permitted

Intervals that touch (one's end is the next one's start) merge, as etcd's
interval tree counts them contiguous.  A range whose end is not above its
key is, as in etcd, permitted exactly when its key is.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import logging
from dataclasses import dataclass
from typing import Callable

import bcrypt

from mvcckv import errors
from mvcckv.backend import AUTH, AUTH_ROLES, AUTH_USERS, decode_u64, encode_u64
from mvcckv.kv import (
    KIND_AUTH_DISABLE,
    KIND_AUTH_ENABLE,
    KIND_AUTH_ROLE_ADD,
    KIND_AUTH_ROLE_DELETE,
    KIND_AUTH_ROLE_GRANT_PERMISSION,
    KIND_AUTH_ROLE_REVOKE_PERMISSION,
    KIND_AUTH_USER_ADD,
    KIND_AUTH_USER_CHANGE_PASSWORD,
    KIND_AUTH_USER_DELETE,
    KIND_AUTH_USER_GRANT_ROLE,
    KIND_AUTH_USER_REVOKE_ROLE,
)
from mvcckv.pb import auth_pb2
from mvcckv.pb import rpc_pb2 as pb

log = logging.getLogger("mvcckv.auth")

READ = auth_pb2.Permission.READ
WRITE = auth_pb2.Permission.WRITE
READWRITE = auth_pb2.Permission.READWRITE

ROOT_USER = "root"
ROOT_ROLE = "root"

# Bcrypt's bounds and etcd's default; a cost outside them falls back to
# the default, as etcd does.
MIN_BCRYPT_COST = 4
MAX_BCRYPT_COST = 31
DEFAULT_BCRYPT_COST = 10
# Bcrypt reads at most this many bytes of a password.
_BCRYPT_MAX_PASSWORD = 72

ENABLED_KEY = b"authEnabled"
REVISION_KEY = b"authRevision"


def _root_perm() -> auth_pb2.Permission:
    # What RoleGet shows for role root, whatever was granted to it.
    return auth_pb2.Permission(permType=READWRITE, key=b"", range_end=b"\0")


@dataclass(frozen=True, slots=True)
class AuthInfo:
    """Who a request comes from, and the auth revision that was checked at."""

    username: str
    revision: int


class _Intervals:
    """Sorted, disjoint, non-touching half-open key intervals.

    An end of None is unbounded.  Built in O(n log n); each query is one
    bisect, O(log n).
    """

    __slots__ = ("_starts", "_ends")

    def __init__(self, intervals: list[tuple[bytes, bytes | None]]):
        starts: list[bytes] = []
        ends: list[bytes | None] = []
        for begin, end in sorted(intervals, key=lambda iv: iv[0]):
            if starts:
                last = ends[-1]
                if last is None:
                    break  # the previous interval already runs to the end
                if begin <= last:
                    if end is None or end > last:
                        ends[-1] = end
                    continue
            starts.append(begin)
            ends.append(end)
        self._starts = starts
        self._ends = ends

    def has_key(self, key: bytes) -> bool:
        i = bisect.bisect_right(self._starts, key) - 1
        if i < 0:
            return False
        end = self._ends[i]
        return end is None or end > key

    def covers(self, key: bytes, range_end: bytes | None) -> bool:
        """Whether ``[key, range_end)`` lies within one interval (None: unbounded)."""
        i = bisect.bisect_right(self._starts, key) - 1
        if i < 0:
            return False
        end = self._ends[i]
        if end is None:
            return True
        return range_end is not None and end > key and end >= range_end


class _UserPerms:
    """One user's merged permissions."""

    __slots__ = ("root", "read", "write")

    def __init__(self, root: bool, read: _Intervals | None, write: _Intervals | None):
        self.root = root
        self.read = read
        self.write = write


def _merge_perms(user: auth_pb2.User, roles: dict[str, auth_pb2.Role]) -> _UserPerms:
    if ROOT_ROLE in user.roles:
        return _UserPerms(True, None, None)
    read: list[tuple[bytes, bytes | None]] = []
    write: list[tuple[bytes, bytes | None]] = []
    for name in user.roles:
        role = roles.get(name)
        if role is None:
            continue
        for perm in role.keyPermission:
            if not perm.range_end:
                ivl = (perm.key, perm.key + b"\0")
            elif perm.range_end == b"\0":
                ivl = (perm.key, None)
            else:
                ivl = (perm.key, perm.range_end)
            if perm.permType == READWRITE:
                read.append(ivl)
                write.append(ivl)
            elif perm.permType == READ:
                read.append(ivl)
            elif perm.permType == WRITE:
                write.append(ivl)
    return _UserPerms(False, _Intervals(read), _Intervals(write))


def valid_permission_range(key: bytes, range_end: bytes) -> bool:
    """etcd's rule for a granted range: a non-empty key, and no range_end
    (one key), one above the key, or ``b"\\0"`` (every key from it on)."""
    if not key:
        return False
    return not range_end or key < range_end or range_end == b"\0"


class _State:
    """One immutable version of the auth store; ``perms`` is a cache of
    what ``users`` and ``roles`` imply, filled on demand."""

    __slots__ = ("enabled", "revision", "users", "roles", "perms")

    def __init__(self, enabled: bool, revision: int, users: dict, roles: dict):
        self.enabled = enabled
        self.revision = revision
        self.users: dict[str, auth_pb2.User] = users
        self.roles: dict[str, auth_pb2.Role] = roles
        self.perms: dict[str, _UserPerms] = {}


class AuthWrites:
    """Where an auth change is written: the engine's side of one request.

    :meth:`AuthStore.apply_writes` decides every change (the rules live
    there only) and calls these in the order it makes them, inside the
    engine's write transaction; users and roles are the encoded
    ``authpb.User`` / ``authpb.Role`` under their name.
    """

    __slots__ = ()

    def put_user(self, name: bytes, data: bytes) -> None:
        raise NotImplementedError

    def delete_user(self, name: bytes) -> None:
        raise NotImplementedError

    def put_role(self, name: bytes, data: bytes) -> None:
        raise NotImplementedError

    def delete_role(self, name: bytes) -> None:
        raise NotImplementedError

    def set_enabled(self, enabled: bool) -> None:
        raise NotImplementedError

    def set_revision(self, revision: int) -> None:
        raise NotImplementedError


class LmdbAuthWrites(AuthWrites):
    """The LMDB layout (etcd's bbolt buckets, see the module docstring)."""

    __slots__ = ("_txn", "_dbs")

    def __init__(self, txn, dbs):
        self._txn = txn
        self._dbs = dbs

    def put_user(self, name: bytes, data: bytes) -> None:
        self._txn.put(name, data, db=self._dbs[AUTH_USERS])

    def delete_user(self, name: bytes) -> None:
        self._txn.delete(name, db=self._dbs[AUTH_USERS])

    def put_role(self, name: bytes, data: bytes) -> None:
        self._txn.put(name, data, db=self._dbs[AUTH_ROLES])

    def delete_role(self, name: bytes) -> None:
        self._txn.delete(name, db=self._dbs[AUTH_ROLES])

    def set_enabled(self, enabled: bool) -> None:
        self._txn.put(ENABLED_KEY, b"\x01" if enabled else b"\x00", db=self._dbs[AUTH])

    def set_revision(self, revision: int) -> None:
        self._txn.put(REVISION_KEY, encode_u64(revision), db=self._dbs[AUTH])


class _Update:
    """The changes one request makes: written through :class:`AuthWrites`
    as they are made, swapped in as a new :class:`_State` at the end.
    Every check that can fail runs before the first change."""

    __slots__ = ("_old", "_out", "users", "roles", "enabled")

    def __init__(self, old: _State, out: AuthWrites):
        self._old = old
        self._out = out
        self.users = old.users
        self.roles = old.roles
        self.enabled = old.enabled

    def put_user(self, user: auth_pb2.User) -> None:
        if self.users is self._old.users:
            self.users = dict(self.users)
        self.users[user.name.decode()] = user
        self._out.put_user(user.name, user.SerializeToString())

    def delete_user(self, name: str) -> None:
        if self.users is self._old.users:
            self.users = dict(self.users)
        del self.users[name]
        self._out.delete_user(name.encode())

    def put_role(self, role: auth_pb2.Role) -> None:
        if self.roles is self._old.roles:
            self.roles = dict(self.roles)
        self.roles[role.name.decode()] = role
        self._out.put_role(role.name, role.SerializeToString())

    def delete_role(self, name: str) -> None:
        if self.roles is self._old.roles:
            self.roles = dict(self.roles)
        del self.roles[name]
        self._out.delete_role(name.encode())

    def set_enabled(self, enabled: bool) -> None:
        self.enabled = enabled
        self._out.set_enabled(enabled)

    def state(self, bump: bool = True) -> _State:
        revision = self._old.revision
        if bump:
            revision += 1
            self._out.set_revision(revision)
        return _State(self.enabled, revision, self.users, self.roles)


class AuthStore:
    """etcd's auth store, the engine side: state, logged changes, checks.

    ``store.auth`` of a :class:`mvcckv.Store`.  Changes are proposed to the
    store (its embedded ``user_add``, ``role_grant_permission``, ...
    methods, or ``propose`` with a ``KIND_AUTH_*`` kind); reads and checks
    are answered here from memory, on any thread.

    >>> import mvcckv, tempfile
    >>> from mvcckv.auth import AuthInfo
    >>> with mvcckv.open(tempfile.mkdtemp(), bcrypt_cost=4) as store:
    ...     _ = store.user_add("root", "secret"); _ = store.user_grant_role("root", "root")
    ...     _ = store.user_add("alice", "pw"); _ = store.role_add("reader")
    ...     _ = store.role_grant_permission("reader", b"app/", mvcckv.prefix_end(b"app/"), "read")
    ...     _ = store.user_grant_role("alice", "reader"); _ = store.auth_enable()
    ...     auth = store.auth
    ...     alice = AuthInfo("alice", auth.check_password("alice", "pw"))
    ...     auth.check_range(alice, b"app/config", b"")
    ...     auth.check_put(alice, b"app/config")
    Traceback (most recent call last):
      ...
    mvcckv.errors.PermissionDeniedError: etcdserver: permission denied
    """

    def __init__(self, bcrypt_cost: int = DEFAULT_BCRYPT_COST, kv_revision: Callable[[], int] = lambda: 0):
        if not MIN_BCRYPT_COST <= bcrypt_cost <= MAX_BCRYPT_COST:
            log.warning(
                "bcrypt cost %d is outside [%d, %d]; using the default %d",
                bcrypt_cost, MIN_BCRYPT_COST, MAX_BCRYPT_COST, DEFAULT_BCRYPT_COST,
            )
            bcrypt_cost = DEFAULT_BCRYPT_COST
        self.bcrypt_cost = bcrypt_cost
        self._kv_revision = kv_revision
        self._state = _State(False, 1, {}, {})
        # Mirrors _state.enabled: the one attribute a check reads when auth is off.
        self._enabled = False
        self._listeners: list[Callable[[int, object], None]] = []
        # Changes applied in the current batch, announced once it commits.
        self._pending: list[tuple[int, object]] = []
        self._appliers = {
            KIND_AUTH_ENABLE: self._auth_enable,
            KIND_AUTH_DISABLE: self._auth_disable,
            KIND_AUTH_USER_ADD: self._user_add,
            KIND_AUTH_USER_DELETE: self._user_delete,
            KIND_AUTH_USER_CHANGE_PASSWORD: self._user_change_password,
            KIND_AUTH_USER_GRANT_ROLE: self._user_grant_role,
            KIND_AUTH_USER_REVOKE_ROLE: self._user_revoke_role,
            KIND_AUTH_ROLE_ADD: self._role_add,
            KIND_AUTH_ROLE_DELETE: self._role_delete,
            KIND_AUTH_ROLE_GRANT_PERMISSION: self._role_grant_permission,
            KIND_AUTH_ROLE_REVOKE_PERMISSION: self._role_revoke_permission,
        }

    # ------------------------------------------------------------------
    # state

    @property
    def enabled(self) -> bool:
        return self._enabled

    @property
    def revision(self) -> int:
        """The auth revision: 1 on a fresh store, +1 on every change."""
        return self._state.revision

    def add_listener(self, fn: Callable[[int, object], None]) -> None:
        """Call ``fn(kind, request)`` on the writer thread after each
        committed request that changed the auth store.  ``fn`` must not block."""
        self._listeners.append(fn)

    # ------------------------------------------------------------------
    # passwords (bcrypt: slow on purpose, never run on the writer thread)

    def hash_password(self, password: str) -> str:
        """The request form of a password hash (``hashedPassword``): base64
        of its bcrypt hash at this store's cost.  Slow on purpose."""
        data = password.encode()
        if len(data) > _BCRYPT_MAX_PASSWORD:
            raise errors.PasswordTooLongError()
        hashed = bcrypt.hashpw(data, bcrypt.gensalt(rounds=self.bcrypt_cost, prefix=b"2a"))
        return base64.b64encode(hashed).decode()

    def prepare(self, kind: int, req):
        """The request to log: passwords hashed and the plain text removed.

        A UserAdd gets its password's hash unless it is a no-password user
        (an empty password is hashed too, as etcd does: that user logs in
        with ""); a UserChangePassword with a password gets its hash (with
        none, the given ``hashedPassword`` stands).  Other requests are
        returned as they are.  Slow (bcrypt): run it off the event loop.
        """
        if kind == KIND_AUTH_USER_ADD:
            out = pb.AuthUserAddRequest()
            out.CopyFrom(req)
            if not req.options.no_password:
                out.hashedPassword = self.hash_password(req.password)
            out.password = ""
            return out
        if kind == KIND_AUTH_USER_CHANGE_PASSWORD and req.password:
            out = pb.AuthUserChangePasswordRequest()
            out.CopyFrom(req)
            out.hashedPassword = self.hash_password(req.password)
            out.password = ""
            return out
        return req

    def check_password(self, name: str, password: str) -> int:
        """Check a user's password; the auth revision it was checked at.

        Slow (bcrypt): run it off the event loop.
        """
        st = self._state
        if not st.enabled:
            raise errors.AuthNotEnabledError()
        user = st.users.get(name)
        if user is None:
            raise errors.AuthFailedError()
        if user.options.no_password:
            raise errors.NoPasswordUserError()
        # Bcrypt uses only the first 72 bytes; Go's compare ignores the
        # rest where the Python binding would refuse the call.
        try:
            ok = bcrypt.checkpw(password.encode()[:_BCRYPT_MAX_PASSWORD], user.password)
        except ValueError:
            ok = False  # no valid hash stored (an empty password was set)
        if not ok:
            log.info("invalid password for user %r", name)
            raise errors.AuthFailedError()
        return st.revision

    # ------------------------------------------------------------------
    # reads

    def _header(self, resp):
        resp.header.revision = self._kv_revision()
        return resp

    def user_get(self, name: str) -> pb.AuthUserGetResponse:
        user = self._state.users.get(name)
        if user is None:
            raise errors.UserNotFoundError()
        return self._header(pb.AuthUserGetResponse(roles=user.roles))

    def user_list(self) -> pb.AuthUserListResponse:
        """User names in the backend's key order (bytes of the name)."""
        return self._header(pb.AuthUserListResponse(users=sorted(self._state.users)))

    def role_get(self, name: str) -> pb.AuthRoleGetResponse:
        role = self._state.roles.get(name)
        if role is None:
            raise errors.RoleNotFoundError()
        perms = [_root_perm()] if name == ROOT_ROLE else role.keyPermission
        return self._header(pb.AuthRoleGetResponse(perm=perms))

    def role_list(self) -> pb.AuthRoleListResponse:
        return self._header(pb.AuthRoleListResponse(roles=sorted(self._state.roles)))

    def status(self) -> pb.AuthStatusResponse:
        st = self._state
        return self._header(pb.AuthStatusResponse(enabled=st.enabled, authRevision=st.revision))

    def has_role(self, user: str, role: str) -> bool:
        u = self._state.users.get(user)
        return u is not None and role in u.roles

    def user_exists(self, name: str) -> bool:
        return name in self._state.users

    # ------------------------------------------------------------------
    # permission checks: None when permitted, etcd's error when not

    def check_admin(self, info: AuthInfo | None) -> None:
        """etcd's IsAdminPermitted: the user must have role root."""
        if not self._enabled:
            return
        if info is None or not info.username:
            raise errors.UserEmptyError()
        user = self._state.users.get(info.username)
        if user is None:
            raise errors.UserNotFoundError()
        if ROOT_ROLE not in user.roles:
            raise errors.PermissionDeniedError()

    def check_range(self, info: AuthInfo | None, key: bytes, range_end: bytes) -> None:
        """READ on a key (empty ``range_end``), a range, or every key from
        ``key`` on (``range_end`` b"\\0").  O(log n)."""
        if not self._enabled:
            return
        perms = self._perms(info)
        if perms is None:
            return
        if range_end:
            ok = perms.read.covers(key, None if range_end == b"\0" else range_end)
        else:
            ok = perms.read.has_key(key)
        if not ok:
            raise errors.PermissionDeniedError()

    def check_put(self, info: AuthInfo | None, key: bytes) -> None:
        """WRITE on one key.  O(log n)."""
        if not self._enabled:
            return
        perms = self._perms(info)
        if perms is not None and not perms.write.has_key(key):
            raise errors.PermissionDeniedError()

    def check_delete_range(self, info: AuthInfo | None, key: bytes, range_end: bytes) -> None:
        """WRITE on a key or range (as ``check_range``).  O(log n)."""
        if not self._enabled:
            return
        perms = self._perms(info)
        if perms is None:
            return
        if range_end:
            ok = perms.write.covers(key, None if range_end == b"\0" else range_end)
        else:
            ok = perms.write.has_key(key)
        if not ok:
            raise errors.PermissionDeniedError()

    def _perms(self, info: AuthInfo | None) -> _UserPerms | None:
        """The user's merged permissions, None for a root-role user; raises
        in etcd's order: no identity, old revision, unknown user."""
        # Revision 0 is how etcd tells "no user given".
        if info is None or not info.revision:
            raise errors.UserEmptyError()
        st = self._state
        if info.revision < st.revision:
            raise errors.AuthOldRevisionError()
        perms = st.perms.get(info.username)
        if perms is None:
            user = st.users.get(info.username)
            if user is None:
                raise errors.PermissionDeniedError()
            perms = _merge_perms(user, st.roles)
            # Races with another reader or a newer state are harmless: the
            # entry describes this state and dies with it.
            st.perms[info.username] = perms
        return None if perms.root else perms

    # ------------------------------------------------------------------
    # the engine's side: recovery, logged changes (writer thread only)

    def recover(self, txn, dbs) -> None:
        """Load the state from the LMDB backend (when the store opens)."""
        enabled = txn.get(ENABLED_KEY, db=dbs[AUTH]) == b"\x01"
        raw = txn.get(REVISION_KEY, db=dbs[AUTH])
        revision = decode_u64(raw) if raw else 1
        self.load(enabled, revision, txn.cursor(db=dbs[AUTH_USERS]), txn.cursor(db=dbs[AUTH_ROLES]))

    def load(self, enabled: bool, revision: int, users, roles) -> None:
        """Install a state read from storage; ``users`` and ``roles`` yield
        (name, encoded message) pairs.  No listener hears of it."""
        self._state = _decode_state(enabled, revision, users, roles)
        self._enabled = enabled

    @property
    def generation(self) -> int:
        """A number that grows with every change, enable included: the
        revision moves with every change except an enable, which only ever
        turns ``enabled`` from off to on at an unchanged revision."""
        st = self._state
        return 2 * st.revision + st.enabled

    def reload(self, enabled: bool, revision: int, users, roles, *, reenabled: bool = False) -> None:
        """Install a newer state that another process committed, and tell
        the listeners what they would have heard had the changes been
        applied here: a deleted user, a changed password (a user deleted
        and added again has a new salt), auth turned off or on.  With
        ``reenabled`` auth went off and on again in between."""
        old = self._state
        new = _decode_state(enabled, revision, users, roles)
        heard: list[tuple[int, object]] = []
        if old.enabled and (not new.enabled or reenabled):
            heard.append((KIND_AUTH_DISABLE, pb.AuthDisableRequest()))
        for name, user in old.users.items():
            now = new.users.get(name)
            if now is None:
                heard.append((KIND_AUTH_USER_DELETE, pb.AuthUserDeleteRequest(name=name)))
            elif now.password != user.password or now.options.no_password != user.options.no_password:
                heard.append((KIND_AUTH_USER_CHANGE_PASSWORD, pb.AuthUserChangePasswordRequest(name=name)))
        if new.enabled and (not old.enabled or reenabled):
            heard.append((KIND_AUTH_ENABLE, pb.AuthEnableRequest()))
        self._state = new
        self._enabled = enabled
        self._announce(heard)

    def save(self):
        """The current state, for :meth:`rollback` (writer thread only)."""
        return self._state

    def rollback(self, saved) -> None:
        """Undo what this batch applied: its transaction did not commit."""
        self._pending = []
        self._state = saved
        self._enabled = saved.enabled

    def check_revision(self, revision: int) -> None:
        """At apply time, for a request the server authorized at auth
        ``revision``: refuse it if auth is on and has changed since."""
        if self._enabled and revision < self._state.revision:
            raise errors.AuthOldRevisionError()

    def check_still_off(self) -> None:
        """At apply time, for a request the server let through because auth
        was off: refuse it if auth has been turned on since, as etcd's
        applier refuses a request whose header names no user."""
        if self._enabled:
            raise errors.UserEmptyError()

    def apply(self, kind: int, req, txn, dbs):
        """Apply one logged auth request in the LMDB transaction ``txn``;
        its response (header not filled).  Deterministic; a request that
        raises has changed nothing."""
        return self._appliers[kind](req, _Update(self._state, LmdbAuthWrites(txn, dbs)))

    def apply_writes(self, kind: int, req, out: AuthWrites):
        """:meth:`apply` for any storage: the changes go to ``out``."""
        return self._appliers[kind](req, _Update(self._state, out))

    def committed(self) -> None:
        """Announce the changes of the batch just committed."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        self._announce(pending)

    def _announce(self, changes) -> None:
        for kind, req in changes:
            for fn in self._listeners:
                try:
                    fn(kind, req)
                except Exception:  # noqa: BLE001 - a listener must not stop writes
                    log.exception("auth listener failed")

    def _install(self, kind: int, req, state: _State) -> None:
        self._state = state
        self._enabled = state.enabled
        self._pending.append((kind, req))

    # -- one applier per kind, each in etcd's order of checks --------------

    def _auth_enable(self, req, up: _Update):
        st = self._state
        if st.enabled:
            return pb.AuthEnableResponse()
        root = st.users.get(ROOT_USER)
        if root is None:
            raise errors.RootUserNotExistError()
        if ROOT_ROLE not in root.roles:
            raise errors.RootRoleNotExistError()
        up.set_enabled(True)
        self._install(KIND_AUTH_ENABLE, req, up.state(bump=False))
        log.info("enabled authentication")
        return pb.AuthEnableResponse()

    def _auth_disable(self, req, up: _Update):
        if not self._state.enabled:
            return pb.AuthDisableResponse()
        up.set_enabled(False)
        self._install(KIND_AUTH_DISABLE, req, up.state())
        log.info("disabled authentication")
        return pb.AuthDisableResponse()

    def _user_add(self, req: pb.AuthUserAddRequest, up: _Update):
        if not req.name:
            raise errors.UserEmptyError()
        if req.name in self._state.users:
            raise errors.UserAlreadyExistError()
        user = auth_pb2.User(name=req.name.encode())
        # etcd stores the options even when none were sent.
        user.options.CopyFrom(req.options)
        if not req.options.no_password:
            # Plain-text passwords never reach the log (see prepare); an
            # empty hashedPassword stores an empty hash, which no password
            # matches, as in etcd.
            user.password = _decode_hash(req.hashedPassword)
        up.put_user(user)
        self._install(KIND_AUTH_USER_ADD, req, up.state())
        return pb.AuthUserAddResponse()

    def _user_delete(self, req: pb.AuthUserDeleteRequest, up: _Update):
        if self._state.enabled and req.name == ROOT_USER:
            raise errors.InvalidAuthMgmtError()
        if req.name not in self._state.users:
            raise errors.UserNotFoundError()
        up.delete_user(req.name)
        self._install(KIND_AUTH_USER_DELETE, req, up.state())
        return pb.AuthUserDeleteResponse()

    def _user_change_password(self, req: pb.AuthUserChangePasswordRequest, up: _Update):
        old = self._state.users.get(req.name)
        if old is None:
            raise errors.UserNotFoundError()
        user = auth_pb2.User()
        user.CopyFrom(old)
        if not old.options.no_password:
            user.password = _decode_hash(req.hashedPassword)
        up.put_user(user)
        self._install(KIND_AUTH_USER_CHANGE_PASSWORD, req, up.state())
        return pb.AuthUserChangePasswordResponse()

    def _user_grant_role(self, req: pb.AuthUserGrantRoleRequest, up: _Update):
        st = self._state
        old = st.users.get(req.user)
        if old is None:
            raise errors.UserNotFoundError()
        # Role root needs no role entry: having it is what makes an admin.
        if req.role != ROOT_ROLE and req.role not in st.roles:
            raise errors.RoleNotFoundError()
        if req.role in old.roles:
            return pb.AuthUserGrantRoleResponse()
        user = auth_pb2.User()
        user.CopyFrom(old)
        roles = sorted([*old.roles, req.role])
        del user.roles[:]
        user.roles.extend(roles)
        up.put_user(user)
        self._install(KIND_AUTH_USER_GRANT_ROLE, req, up.state())
        return pb.AuthUserGrantRoleResponse()

    def _user_revoke_role(self, req: pb.AuthUserRevokeRoleRequest, up: _Update):
        st = self._state
        if st.enabled and req.name == ROOT_USER and req.role == ROOT_ROLE:
            raise errors.InvalidAuthMgmtError()
        old = st.users.get(req.name)
        if old is None:
            raise errors.UserNotFoundError()
        if req.role not in old.roles:
            raise errors.RoleNotGrantedError()
        up.put_user(_without_role(old, req.role))
        self._install(KIND_AUTH_USER_REVOKE_ROLE, req, up.state())
        return pb.AuthUserRevokeRoleResponse()

    def _role_add(self, req: pb.AuthRoleAddRequest, up: _Update):
        if not req.name:
            raise errors.RoleEmptyError()
        if req.name in self._state.roles:
            raise errors.RoleAlreadyExistError()
        up.put_role(auth_pb2.Role(name=req.name.encode()))
        self._install(KIND_AUTH_ROLE_ADD, req, up.state())
        return pb.AuthRoleAddResponse()

    def _role_delete(self, req: pb.AuthRoleDeleteRequest, up: _Update):
        st = self._state
        if st.enabled and req.role == ROOT_ROLE:
            raise errors.InvalidAuthMgmtError()
        if req.role not in st.roles:
            raise errors.RoleNotFoundError()
        up.delete_role(req.role)
        for user in st.users.values():
            if req.role in user.roles:
                up.put_user(_without_role(user, req.role))
        self._install(KIND_AUTH_ROLE_DELETE, req, up.state())
        return pb.AuthRoleDeleteResponse()

    def _role_grant_permission(self, req: pb.AuthRoleGrantPermissionRequest, up: _Update):
        if not req.HasField("perm"):
            raise errors.PermissionNotGivenError()
        perm = req.perm
        if not valid_permission_range(perm.key, perm.range_end):
            raise errors.InvalidAuthMgmtError()
        old = self._state.roles.get(req.name)
        if old is None:
            raise errors.RoleNotFoundError()
        role = auth_pb2.Role()
        role.CopyFrom(old)
        perms = role.keyPermission
        # As etcd: only the first permission at or after the key is compared,
        # so the same (key, range_end) can be added twice when another range
        # with the same key sorts before it.
        keys = [p.key for p in perms]
        i = bisect.bisect_left(keys, perm.key)
        if i < len(perms) and perms[i].key == perm.key and perms[i].range_end == perm.range_end:
            perms[i].permType = perm.permType
        else:
            merged = [*perms, auth_pb2.Permission(permType=perm.permType, key=perm.key, range_end=perm.range_end)]
            merged.sort(key=lambda p: p.key)
            del perms[:]
            perms.extend(merged)
        up.put_role(role)
        self._install(KIND_AUTH_ROLE_GRANT_PERMISSION, req, up.state())
        return pb.AuthRoleGrantPermissionResponse()

    def _role_revoke_permission(self, req: pb.AuthRoleRevokePermissionRequest, up: _Update):
        old = self._state.roles.get(req.role)
        if old is None:
            raise errors.RoleNotFoundError()
        kept = [p for p in old.keyPermission if p.key != req.key or p.range_end != req.range_end]
        if len(kept) == len(old.keyPermission):
            raise errors.PermissionNotGrantedError()
        up.put_role(auth_pb2.Role(name=old.name, keyPermission=kept))
        self._install(KIND_AUTH_ROLE_REVOKE_PERMISSION, req, up.state())
        return pb.AuthRoleRevokePermissionResponse()


_PERM_TYPES = {"read": READ, "write": WRITE, "readwrite": READWRITE}


class AuthAdmin:
    """The embedded auth administration of an engine, the same on every
    engine: each change is proposed as root's would be (no auth revision
    to check), each read answered by the engine's auth store.

    The engine provides ``auth``, ``propose(kind, req)`` and
    ``_auth_view()`` (the auth store once the engine is known to be open
    and, where other processes share it, up to date).
    """

    __slots__ = ()

    def _propose_auth(self, kind: int, req):
        return self.propose(kind, self.auth.prepare(kind, req)).result()

    def auth_enable(self) -> pb.AuthEnableResponse:
        """Turn auth on; user ``root`` must exist and have role ``root``."""
        return self._propose_auth(KIND_AUTH_ENABLE, pb.AuthEnableRequest())

    def auth_disable(self) -> pb.AuthDisableResponse:
        return self._propose_auth(KIND_AUTH_DISABLE, pb.AuthDisableRequest())

    def auth_status(self) -> pb.AuthStatusResponse:
        """Whether auth is on, and the auth revision."""
        return self._auth_view().status()

    def user_add(self, name: str, password: str | None = None, *, no_password: bool = False) -> pb.AuthUserAddResponse:
        """Add a user.  A ``no_password`` user cannot authenticate with a
        password; otherwise ``password`` (None: "") is stored as its bcrypt
        hash, hashed here on the calling thread.

        >>> import mvcckv, tempfile
        >>> with mvcckv.open(tempfile.mkdtemp(), bcrypt_cost=4) as store:
        ...     _ = store.user_add("alice", "pw"); _ = store.role_add("ops")
        ...     _ = store.user_grant_role("alice", "ops")
        ...     list(store.user_get("alice").roles), store.auth_status().authRevision
        (['ops'], 4)
        """
        req = pb.AuthUserAddRequest(name=name, password=password or "")
        if no_password:
            req.options.no_password = True
        return self._propose_auth(KIND_AUTH_USER_ADD, req)

    def user_delete(self, name: str) -> pb.AuthUserDeleteResponse:
        return self._propose_auth(KIND_AUTH_USER_DELETE, pb.AuthUserDeleteRequest(name=name))

    def user_change_password(self, name: str, password: str) -> pb.AuthUserChangePasswordResponse:
        req = pb.AuthUserChangePasswordRequest(name=name, password=password)
        return self._propose_auth(KIND_AUTH_USER_CHANGE_PASSWORD, req)

    def user_grant_role(self, user: str, role: str) -> pb.AuthUserGrantRoleResponse:
        """Grant ``role`` (which must exist, unless it is ``root``)."""
        return self._propose_auth(KIND_AUTH_USER_GRANT_ROLE, pb.AuthUserGrantRoleRequest(user=user, role=role))

    def user_revoke_role(self, user: str, role: str) -> pb.AuthUserRevokeRoleResponse:
        return self._propose_auth(KIND_AUTH_USER_REVOKE_ROLE, pb.AuthUserRevokeRoleRequest(name=user, role=role))

    def user_get(self, name: str) -> pb.AuthUserGetResponse:
        return self._auth_view().user_get(name)

    def user_list(self) -> pb.AuthUserListResponse:
        return self._auth_view().user_list()

    def role_add(self, name: str) -> pb.AuthRoleAddResponse:
        return self._propose_auth(KIND_AUTH_ROLE_ADD, pb.AuthRoleAddRequest(name=name))

    def role_delete(self, name: str) -> pb.AuthRoleDeleteResponse:
        """Delete a role; every user that had it loses it."""
        return self._propose_auth(KIND_AUTH_ROLE_DELETE, pb.AuthRoleDeleteRequest(role=name))

    def role_get(self, name: str) -> pb.AuthRoleGetResponse:
        return self._auth_view().role_get(name)

    def role_list(self) -> pb.AuthRoleListResponse:
        return self._auth_view().role_list()

    def role_grant_permission(
        self,
        role: str,
        key: bytes | str,
        range_end: bytes | str = b"",
        perm: str | int = "readwrite",
    ) -> pb.AuthRoleGrantPermissionResponse:
        """Grant ``perm`` ("read", "write", "readwrite" or an
        ``authpb.Permission`` type) on one key (no ``range_end``), on
        ``[key, range_end)``, or on every key from ``key`` on (``b"\\0"``).
        Granting the same key and range again replaces the type."""
        if isinstance(perm, str):
            try:
                perm = _PERM_TYPES[perm.lower()]
            except KeyError:
                raise ValueError(f"unknown permission type {perm!r}") from None
        p = auth_pb2.Permission(permType=perm, key=_b(key), range_end=_b(range_end))
        return self._propose_auth(KIND_AUTH_ROLE_GRANT_PERMISSION, pb.AuthRoleGrantPermissionRequest(name=role, perm=p))

    def role_revoke_permission(
        self, role: str, key: bytes | str, range_end: bytes | str = b""
    ) -> pb.AuthRoleRevokePermissionResponse:
        """Revoke the permission granted on exactly this key and range_end."""
        req = pb.AuthRoleRevokePermissionRequest(role=role, key=_b(key), range_end=_b(range_end))
        return self._propose_auth(KIND_AUTH_ROLE_REVOKE_PERMISSION, req)


def _b(v: bytes | str) -> bytes:
    return v.encode() if isinstance(v, str) else v


def _decode_state(enabled: bool, revision: int, users, roles) -> _State:
    return _State(
        enabled,
        revision,
        {bytes(k).decode(): auth_pb2.User.FromString(bytes(v)) for k, v in users},
        {bytes(k).decode(): auth_pb2.Role.FromString(bytes(v)) for k, v in roles},
    )


def _without_role(user: auth_pb2.User, role: str) -> auth_pb2.User:
    out = auth_pb2.User()
    out.CopyFrom(user)
    kept = [r for r in user.roles if r != role]
    del out.roles[:]
    out.roles.extend(kept)
    return out


def _decode_hash(hashed: str) -> bytes:
    try:
        return base64.b64decode(hashed, validate=True)
    except (binascii.Error, ValueError):
        # etcd answers a hash it cannot decode with this error.
        raise errors.NoPasswordUserError() from None

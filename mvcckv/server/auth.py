"""etcd's Auth service: users, roles, enable/disable and Authenticate.

Administration is proposed to the engine like any write, carrying the auth
revision the caller was checked at, so that two administrators racing each
other cannot slip a change past a revoked right.  Who may call what is the
guard's business (``guard.py``); this module adds the two checks etcd makes
per request rather than per method: anybody may read their own user and
their own roles.

bcrypt is slow on purpose (tens of milliseconds at cost 10), so hashing a
new password and checking a given one run in worker threads, never on the
event loop.  A password check is made at some auth revision; if the store
moved on while it ran (the password changed, the user went away), the
check is repeated, as etcd's ``Authenticate`` loop does.
"""

from __future__ import annotations

import asyncio
import logging

from mvcckv import errors
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
from mvcckv.pb import rpc_pb2 as pb
from mvcckv.pb import rpc_pb2_grpc
from mvcckv.server.guard import Guard
from mvcckv.server.node import Node
from mvcckv.server.rpctypes import rpc

log = logging.getLogger("mvcckv.server")

# A password check that keeps losing the race with auth changes gives up
# rather than spin; etcd's loop has no bound, but a client can retry.
_AUTHENTICATE_ATTEMPTS = 5


class AuthServicer(rpc_pb2_grpc.AuthServicer):
    def __init__(self, node: Node, guard: Guard):
        self._node = node
        self._store = node.store
        self._auth = guard.auth
        self._guard = guard

    async def _admin_write(self, kind: int, request, context, *, slow: bool = False):
        rev = self._guard.admin(context)
        if slow:
            request = await asyncio.to_thread(self._auth.prepare, kind, request)
        return await self._node.write(kind, request, rev)

    def _answer(self, resp):
        self._node.fill(resp.header)
        return resp

    @rpc
    async def AuthEnable(self, request, context):
        return await self._admin_write(KIND_AUTH_ENABLE, request, context)

    @rpc
    async def AuthDisable(self, request, context):
        return await self._admin_write(KIND_AUTH_DISABLE, request, context)

    @rpc
    async def AuthStatus(self, request, context):
        self._guard.admin(context)
        return self._answer(self._auth.status())

    @rpc
    async def Authenticate(self, request, context):
        auth = self._auth
        for _ in range(_AUTHENTICATE_ATTEMPTS):
            try:
                checked = await asyncio.to_thread(auth.check_password, request.name, request.password)
            except errors.AuthFailedError:
                log.warning("authentication failed for user %r", request.name)
                raise
            if checked == auth.revision:
                token = self._guard.tokens.assign(request.name, checked)
                return self._answer(pb.AuthenticateResponse(token=token))
        raise errors.AuthOldRevisionError()

    # --- users -------------------------------------------------------------

    @rpc
    async def UserAdd(self, request, context):
        return await self._admin_write(KIND_AUTH_USER_ADD, request, context, slow=True)

    @rpc
    async def UserGet(self, request, context):
        guard = self._guard
        if guard.enabled:
            info = guard.info(context)
            if not guard.is_admin(info) and (info is None or request.name != info.username):
                guard.admin(context)  # raises etcd's error for this identity
        return self._answer(self._auth.user_get(request.name))

    @rpc
    async def UserList(self, request, context):
        self._guard.admin(context)
        return self._answer(self._auth.user_list())

    @rpc
    async def UserDelete(self, request, context):
        return await self._admin_write(KIND_AUTH_USER_DELETE, request, context)

    @rpc
    async def UserChangePassword(self, request, context):
        return await self._admin_write(KIND_AUTH_USER_CHANGE_PASSWORD, request, context, slow=True)

    @rpc
    async def UserGrantRole(self, request, context):
        return await self._admin_write(KIND_AUTH_USER_GRANT_ROLE, request, context)

    @rpc
    async def UserRevokeRole(self, request, context):
        return await self._admin_write(KIND_AUTH_USER_REVOKE_ROLE, request, context)

    # --- roles -------------------------------------------------------------

    @rpc
    async def RoleAdd(self, request, context):
        return await self._admin_write(KIND_AUTH_ROLE_ADD, request, context)

    @rpc
    async def RoleGet(self, request, context):
        guard = self._guard
        if guard.enabled:
            info = guard.info(context)
            if not guard.is_admin(info) and (info is None or not self._auth.has_role(info.username, request.role)):
                guard.admin(context)
        return self._answer(self._auth.role_get(request.role))

    @rpc
    async def RoleList(self, request, context):
        self._guard.admin(context)
        return self._answer(self._auth.role_list())

    @rpc
    async def RoleDelete(self, request, context):
        return await self._admin_write(KIND_AUTH_ROLE_DELETE, request, context)

    @rpc
    async def RoleGrantPermission(self, request, context):
        return await self._admin_write(KIND_AUTH_ROLE_GRANT_PERMISSION, request, context)

    @rpc
    async def RoleRevokePermission(self, request, context):
        return await self._admin_write(KIND_AUTH_ROLE_REVOKE_PERMISSION, request, context)


def token_listener(guard: Guard):
    """What the token provider must hear of auth changes (etcd's
    ``invalidateUser`` on delete and password change; all tokens go when
    auth is disabled)."""
    tokens = guard.tokens

    def on_change(kind: int, req) -> None:
        if kind == KIND_AUTH_USER_DELETE or kind == KIND_AUTH_USER_CHANGE_PASSWORD:
            tokens.invalidate_user(req.name)
        elif kind == KIND_AUTH_DISABLE:
            tokens.disable()
        elif kind == KIND_AUTH_ENABLE:
            tokens.enable()

    return on_change

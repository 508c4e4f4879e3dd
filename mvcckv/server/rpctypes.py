"""Errors on the wire: each error type's gRPC status code, in one table.

Clients of etcd recognise an error by its *message* (clientv3 looks the
text up in a table and carries the code along), so the message is always
the engine error's own ``str()``, which is etcd's exact text; this module
only chooses the code (ETCD_SEMANTICS §6).

Three outcomes, as in etcd's ``togRPCError``:

* an :class:`~mvcckv.errors.MvccError` listed in :data:`CODES` (or
  subclassing one listed) gets that code;
* any other ``MvccError`` gets ``UNKNOWN`` with its text — what etcd does
  with a server error missing from its map;
* anything else is a bug in mvcckv: ``INTERNAL``, with the traceback in
  the server log.  The server answers and keeps running.

Errors that only the RPC layer can raise (metadata, membership, downgrade)
are defined here, next to their codes; the engine never raises them.
"""

from __future__ import annotations

import asyncio
import functools
import logging

import grpc
from google.protobuf.message import DecodeError

from mvcckv import errors

log = logging.getLogger("mvcckv.server")

Code = grpc.StatusCode


# --- errors raised by the RPC layer ------------------------------------------


class InvalidClientAPIVersionError(errors.MvccError):
    message = "etcdserver: invalid client api version"


class MemberBadURLsError(errors.MvccError):
    message = "etcdserver: given member URLs are invalid"


class PeerURLExistsError(errors.MvccError):
    message = "etcdserver: Peer URLs already exists"


class WrongDowngradeVersionFormatError(errors.MvccError):
    message = "etcdserver: wrong downgrade target version format"


class InvalidDowngradeTargetVersionError(errors.MvccError):
    message = "etcdserver: invalid downgrade target version"


class DowngradeUnsupportedError(errors.MvccError):
    """A downgrade to a valid target: mvcckv has one storage format and no
    cluster version to lower, so there is nothing it could do."""

    message = "mvcckv: downgrade is not supported: this server has a single storage format"


class UnknownMethodError(errors.MvccError):
    message = "etcdserver: unknown method"


# --- the table -----------------------------------------------------------------

CODES: dict[type[errors.MvccError], grpc.StatusCode] = {
    # request validation
    errors.EmptyKeyError: Code.INVALID_ARGUMENT,
    errors.KeyNotFoundError: Code.INVALID_ARGUMENT,
    errors.ValueProvidedError: Code.INVALID_ARGUMENT,
    errors.LeaseProvidedError: Code.INVALID_ARGUMENT,
    errors.TooManyOpsError: Code.INVALID_ARGUMENT,
    errors.DuplicateKeyError: Code.INVALID_ARGUMENT,
    errors.InvalidSortOptionError: Code.INVALID_ARGUMENT,
    errors.RequestTooLargeError: Code.INVALID_ARGUMENT,
    InvalidClientAPIVersionError: Code.INVALID_ARGUMENT,
    # revisions
    errors.CompactedError: Code.OUT_OF_RANGE,
    errors.FutureRevisionError: Code.OUT_OF_RANGE,
    # space and load
    errors.NoSpaceError: Code.RESOURCE_EXHAUSTED,
    errors.CorruptError: Code.DATA_LOSS,
    errors.TooManyRequestsError: Code.RESOURCE_EXHAUSTED,
    errors.StoppedError: Code.UNAVAILABLE,
    # leases
    errors.LeaseNotFoundError: Code.NOT_FOUND,
    errors.LeaseExistsError: Code.FAILED_PRECONDITION,
    errors.LeaseTTLTooLargeError: Code.OUT_OF_RANGE,
    # cluster
    errors.MemberNotFoundError: Code.NOT_FOUND,
    errors.BadLeaderTransfereeError: Code.FAILED_PRECONDITION,
    errors.NotLearnerError: Code.FAILED_PRECONDITION,
    MemberBadURLsError: Code.INVALID_ARGUMENT,
    PeerURLExistsError: Code.FAILED_PRECONDITION,
    # Not an etcd error: a single-member server cannot change membership,
    # and UNIMPLEMENTED tells a client not to retry.
    errors.SingleMemberError: Code.UNIMPLEMENTED,
    # downgrade
    WrongDowngradeVersionFormatError: Code.INVALID_ARGUMENT,
    InvalidDowngradeTargetVersionError: Code.INVALID_ARGUMENT,
    DowngradeUnsupportedError: Code.UNIMPLEMENTED,
    # auth
    errors.RootUserNotExistError: Code.FAILED_PRECONDITION,
    errors.RootRoleNotExistError: Code.FAILED_PRECONDITION,
    errors.UserAlreadyExistError: Code.FAILED_PRECONDITION,
    errors.UserEmptyError: Code.INVALID_ARGUMENT,
    errors.UserNotFoundError: Code.FAILED_PRECONDITION,
    errors.RoleAlreadyExistError: Code.FAILED_PRECONDITION,
    errors.RoleNotFoundError: Code.FAILED_PRECONDITION,
    errors.RoleEmptyError: Code.INVALID_ARGUMENT,
    errors.AuthFailedError: Code.INVALID_ARGUMENT,
    errors.PermissionNotGivenError: Code.INVALID_ARGUMENT,
    errors.PermissionDeniedError: Code.PERMISSION_DENIED,
    errors.RoleNotGrantedError: Code.FAILED_PRECONDITION,
    errors.PermissionNotGrantedError: Code.FAILED_PRECONDITION,
    errors.AuthNotEnabledError: Code.FAILED_PRECONDITION,
    errors.AuthOldRevisionError: Code.INVALID_ARGUMENT,
    errors.InvalidAuthTokenError: Code.UNAUTHENTICATED,
    errors.InvalidAuthMgmtError: Code.INVALID_ARGUMENT,
    # Not in etcd's table: etcd answers them Unknown with their own text.
    errors.NoPasswordUserError: Code.UNKNOWN,
    errors.PasswordTooLongError: Code.UNKNOWN,
    # etcd has no code for it either.
    UnknownMethodError: Code.UNKNOWN,
}


def status_code(err: errors.MvccError) -> grpc.StatusCode:
    """The gRPC code of an engine or RPC-layer error (UNKNOWN if unlisted)."""
    for cls in type(err).__mro__:
        code = CODES.get(cls)
        if code is not None:
            return code
    return Code.UNKNOWN


def go_status_text(err: errors.MvccError) -> str:
    """The error as a Go client prints a gRPC status: where etcd hands an
    error over as text rather than as a status (a refused watch's
    ``cancel_reason``), that text is what it sends."""
    name = "".join(part.capitalize() for part in status_code(err).name.split("_"))
    return f"rpc error: code = {name} desc = {err}"


async def unmarshal(parse, raw: bytes, context):
    """Parse a unary request a handler took as raw bytes; one that does not
    parse gets grpc-go's answer (INTERNAL "grpc: error unmarshalling
    request: ..."), as etcd gives it, instead of grpcio's UNKNOWN."""
    try:
        return parse(raw)
    except DecodeError as err:
        await context.abort(Code.INTERNAL, f"grpc: error unmarshalling request: {err}")


def unmarshal_threaded(parse, raw: bytes, context):
    """``unmarshal`` for a handler on a server thread (``threaded.py``)."""
    try:
        return parse(raw)
    except DecodeError as err:
        context.abort(Code.INTERNAL, f"grpc: error unmarshalling request: {err}")


def rpc_threaded(method):
    """``rpc`` for a handler that runs on a server thread: the same status
    for every error, set with the thread context's (raising) ``abort``."""

    @functools.wraps(method)
    def handler(self, request, context):
        try:
            return method(self, request, context)
        except errors.MvccError as err:
            context.abort(status_code(err), str(err))
        except Exception as err:  # noqa: BLE001 - answer INTERNAL, keep serving
            if _is_abort(err):
                raise
            log.exception("%s failed", method.__qualname__)
            context.abort(Code.INTERNAL, f"mvcckv: internal error: {type(err).__name__}: {err}")

    return handler


def _is_abort(err: BaseException) -> bool:
    # grpcio's thread server aborts a call by raising a bare Exception from
    # context.abort, after it has recorded the status on the call.
    return type(err) is Exception and not err.args


def rpc(method):
    """Decorate a servicer coroutine so that every error becomes a status.

    Cancellation and ``context.abort`` pass through untouched.
    """

    @functools.wraps(method)
    async def handler(self, request, context):
        try:
            return await method(self, request, context)
        except errors.MvccError as err:
            await context.abort(status_code(err), str(err))
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except DecodeError as err:
            # A streamed message that does not parse: grpc-go's answer.
            await context.abort(Code.INTERNAL, f"grpc: failed to unmarshal the received message: {err}")
        except Exception as err:  # noqa: BLE001 - answer INTERNAL, keep serving
            log.exception("%s failed", method.__qualname__)
            await context.abort(Code.INTERNAL, f"mvcckv: internal error: {type(err).__name__}: {err}")

    return handler

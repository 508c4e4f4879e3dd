"""Engine errors.

Every error the engine raises for a bad or impossible request is one of the
types below.  Each carries etcd's exact client-visible message (clients
match errors by text, see ETCD_SEMANTICS §6), so ``str(err)`` is what a
client of real etcd would read.  The gRPC status code of each type is chosen
in exactly one place, ``mvcckv.server.rpctypes``; the engine knows nothing
about gRPC.
"""

from __future__ import annotations


class MvccError(Exception):
    """Base of every error the engine raises on purpose."""

    message = "etcdserver: unknown error"

    def __init__(self, message: str | None = None):
        super().__init__(message or self.message)
        if message:
            self.message = message


# --- request validation -------------------------------------------------


class EmptyKeyError(MvccError):
    message = "etcdserver: key is not provided"


class KeyNotFoundError(MvccError):
    message = "etcdserver: key not found"


class ValueProvidedError(MvccError):
    message = "etcdserver: value is provided"


class LeaseProvidedError(MvccError):
    message = "etcdserver: lease is provided"


class TooManyOpsError(MvccError):
    message = "etcdserver: too many operations in txn request"


class DuplicateKeyError(MvccError):
    message = "etcdserver: duplicate key given in txn request"


class InvalidSortOptionError(MvccError):
    message = "etcdserver: invalid sort option"


class RequestTooLargeError(MvccError):
    message = "etcdserver: request is too large"


# --- revisions ----------------------------------------------------------


class CompactedError(MvccError):
    message = "etcdserver: mvcc: required revision has been compacted"


class FutureRevisionError(MvccError):
    message = "etcdserver: mvcc: required revision is a future revision"


# --- space and load -----------------------------------------------------


class NoSpaceError(MvccError):
    message = "etcdserver: mvcc: database space exceeded"


class CorruptError(MvccError):
    message = "etcdserver: corrupt cluster"


class TooManyRequestsError(MvccError):
    message = "etcdserver: too many requests"


class StoppedError(MvccError):
    message = "etcdserver: server stopped"


# --- leases -------------------------------------------------------------


class LeaseNotFoundError(MvccError):
    message = "etcdserver: requested lease not found"


class LeaseExistsError(MvccError):
    message = "etcdserver: lease already exists"


class LeaseTTLTooLargeError(MvccError):
    message = "etcdserver: too large lease TTL"


# --- cluster (single member) -------------------------------------------


class MemberNotFoundError(MvccError):
    message = "etcdserver: member not found"


class BadLeaderTransfereeError(MvccError):
    message = "etcdserver: bad leader transferee"


class NotLearnerError(MvccError):
    message = "etcdserver: can only promote a learner member"


class SingleMemberError(MvccError):
    """Membership changes on a server that is, by design, one member."""

    message = "mvcckv: membership changes are not supported: this server is a single-member cluster"


# --- auth ---------------------------------------------------------------


class RootUserNotExistError(MvccError):
    message = "etcdserver: root user does not exist"


class RootRoleNotExistError(MvccError):
    message = "etcdserver: root user does not have root role"


class UserAlreadyExistError(MvccError):
    message = "etcdserver: user name already exists"


class UserEmptyError(MvccError):
    message = "etcdserver: user name is empty"


class UserNotFoundError(MvccError):
    message = "etcdserver: user name not found"


class RoleAlreadyExistError(MvccError):
    message = "etcdserver: role name already exists"


class RoleNotFoundError(MvccError):
    message = "etcdserver: role name not found"


class RoleEmptyError(MvccError):
    message = "etcdserver: role name is empty"


class AuthFailedError(MvccError):
    message = "etcdserver: authentication failed, invalid user ID or password"


class NoPasswordUserError(MvccError):
    """etcd has no client-facing text for it, so clients read the auth
    package's own."""

    message = "auth: authentication failed, password was given for no password user"


class PasswordTooLongError(MvccError):
    """Bcrypt reads at most 72 bytes; etcd refuses to hash a longer password
    and passes the bcrypt package's text on."""

    message = "bcrypt: password length exceeds 72 bytes"


class PermissionNotGivenError(MvccError):
    message = "etcdserver: permission not given"


class PermissionDeniedError(MvccError):
    message = "etcdserver: permission denied"


class RoleNotGrantedError(MvccError):
    message = "etcdserver: role is not granted to the user"


class PermissionNotGrantedError(MvccError):
    message = "etcdserver: permission is not granted to the role"


class AuthNotEnabledError(MvccError):
    message = "etcdserver: authentication is not enabled"


class AuthOldRevisionError(MvccError):
    message = "etcdserver: revision of auth store is old"


class InvalidAuthTokenError(MvccError):
    message = "etcdserver: invalid auth token"


class InvalidAuthMgmtError(MvccError):
    message = "etcdserver: invalid auth management"


# --- storage faults (not client errors) --------------------------------


class StorageError(Exception):
    """The data directory is damaged or unusable; never a client mistake."""


class WALCorruptError(StorageError):
    """A WAL record in the middle of the log failed its checks."""


class WALNoSpaceError(StorageError):
    """Appending to the WAL failed for want of space; the log is unchanged."""


class SnapshotError(StorageError):
    """A snapshot file is corrupt, truncated or not a snapshot."""


class BoltError(SnapshotError):
    """A bbolt (etcd backend) file is corrupt, truncated or not a bbolt file."""


class BackendCorruptError(StorageError):
    """The backend file (LMDB) is damaged: refused before it is mapped."""

"""The auth store (ETCD_SEMANTICS §11, etcd's server/auth/store.go), embedded.

Tables of etcd's rules: every administrative operation and its errors (a
refused request changes nothing and leaves the auth revision alone), the
root rules, permission checks against an executable model of etcd's
interval tree, passwords, the apply-time auth revision check, and the
state surviving close/reopen, a killed process (WAL replay) and a snapshot.
"""

from __future__ import annotations

import base64
import doctest
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import mvcckv
import mvcckv.auth
from mvcckv import errors
from mvcckv.auth import READ, READWRITE, WRITE, AuthInfo
from mvcckv.backend import AUTH, AUTH_ROLES, AUTH_USERS
from mvcckv.kv import (
    AUTH_OFF,
    KIND_AUTH_ROLE_ADD,
    KIND_AUTH_ROLE_GRANT_PERMISSION,
    KIND_AUTH_USER_ADD,
    KIND_AUTH_USER_CHANGE_PASSWORD,
    KIND_AUTH_USER_GRANT_ROLE,
    KIND_PUT,
    KIND_TXN,
)
from mvcckv.pb import auth_pb2
from mvcckv.pb import rpc_pb2 as pb
from mvcckv.snapshot import restore, save

REPO = Path(__file__).resolve().parent.parent

ROOT_USER_NOT_EXIST = "etcdserver: root user does not exist"
ROOT_ROLE_NOT_EXIST = "etcdserver: root user does not have root role"
USER_ALREADY_EXIST = "etcdserver: user name already exists"
USER_EMPTY = "etcdserver: user name is empty"
USER_NOT_FOUND = "etcdserver: user name not found"
ROLE_ALREADY_EXIST = "etcdserver: role name already exists"
ROLE_NOT_FOUND = "etcdserver: role name not found"
ROLE_EMPTY = "etcdserver: role name is empty"
AUTH_FAILED = "etcdserver: authentication failed, invalid user ID or password"
NO_PASSWORD_USER = "auth: authentication failed, password was given for no password user"
PERMISSION_NOT_GIVEN = "etcdserver: permission not given"
PERMISSION_DENIED = "etcdserver: permission denied"
ROLE_NOT_GRANTED = "etcdserver: role is not granted to the user"
PERMISSION_NOT_GRANTED = "etcdserver: permission is not granted to the role"
AUTH_NOT_ENABLED = "etcdserver: authentication is not enabled"
AUTH_OLD_REVISION = "etcdserver: revision of auth store is old"
INVALID_AUTH_MGMT = "etcdserver: invalid auth management"
PASSWORD_TOO_LONG = "bcrypt: password length exceeds 72 bytes"


def open_store(path, **options) -> mvcckv.Store:
    options.setdefault("fsync", False)
    options.setdefault("bcrypt_cost", 4)
    return mvcckv.open(str(path), **options)


@pytest.fixture
def store(tmp_path):
    with open_store(tmp_path / "data") as s:
        yield s


def perms_of(store, role: str) -> list[tuple[bytes, bytes, int]]:
    return [(p.key, p.range_end, p.permType) for p in store.role_get(role).perm]


def snapshot_of(store) -> dict:
    """Everything the auth store shows, for comparing before and after."""
    st = store.auth_status()
    users = list(store.user_list().users)
    roles = list(store.role_list().roles)
    return {
        "enabled": st.enabled,
        "revision": st.authRevision,
        "users": {u: list(store.user_get(u).roles) for u in users},
        "roles": {r: perms_of(store, r) for r in roles},
    }


def with_root(store, enable: bool = False) -> None:
    store.user_add("root", "rootpw")
    store.user_grant_role("root", "root")
    if enable:
        store.auth_enable()


def grant_perm_request(role: str, key: bytes, range_end: bytes = b"", perm: int = READWRITE):
    return pb.AuthRoleGrantPermissionRequest(
        name=role, perm=auth_pb2.Permission(permType=perm, key=key, range_end=range_end)
    )


# -- a fresh store -------------------------------------------------------------------------------


def test_fresh_store(store):
    st = store.auth_status()
    assert (st.enabled, st.authRevision, st.header.revision) == (False, 1, 1)
    assert store.auth.enabled is False and store.auth.revision == 1
    assert list(store.user_list().users) == [] and list(store.role_list().roles) == []


def test_bcrypt_cost_outside_bcrypts_bounds_falls_back_to_etcds_default(tmp_path):
    for cost, used in [(3, 10), (32, 10), (4, 4), (31, 31), (12, 12)]:
        assert mvcckv.auth.AuthStore(bcrypt_cost=cost).bcrypt_cost == used
    with open_store(tmp_path / "d", bcrypt_cost=0) as s:
        assert s.auth.bcrypt_cost == 10


# -- every administrative operation: what it changes, and by how much the revision moves -----------


SETUP_FULL = [
    ("user_add", "alice", "pw"),
    ("user_add", "bob", "pw"),
    ("role_add", "r1"),
    ("role_add", "r2"),
    ("role_grant_permission", "r1", b"a", b"c", "read"),
    ("user_grant_role", "alice", "r1"),
    ("user_grant_role", "alice", "r2"),
    ("user_grant_role", "bob", "r1"),
]


def run(store, steps):
    for name, *args in steps:
        getattr(store, name)(*args)


# (operation, revision delta, what it does to snapshot_of)
OPERATIONS = [
    (("user_add", "carol", "pw"), 1, lambda s: s["users"].update(carol=[])),
    (("user_add", "", "pw"), None, None),
    (("user_delete", "bob"), 1, lambda s: s["users"].pop("bob")),
    (("user_change_password", "alice", "new"), 1, lambda s: None),
    (("user_grant_role", "bob", "r2"), 1, lambda s: s["users"].update(bob=["r1", "r2"])),
    (("user_grant_role", "bob", "r1"), 0, lambda s: None),  # already granted: a no-op
    (("user_grant_role", "bob", "root"), 1, lambda s: s["users"].update(bob=["r1", "root"])),
    (("user_revoke_role", "alice", "r1"), 1, lambda s: s["users"].update(alice=["r2"])),
    (("role_add", "r3"), 1, lambda s: s["roles"].update(r3=[])),
    (("role_delete", "r1"), 1, lambda s: (s["roles"].pop("r1"), s["users"].update(alice=["r2"], bob=[]))),
    (("role_grant_permission", "r2", b"x"), 1, lambda s: s["roles"].update(r2=[(b"x", b"", READWRITE)])),
    (("role_grant_permission", "r1", b"a", b"c", "write"), 1,
     lambda s: s["roles"].update(r1=[(b"a", b"c", WRITE)])),  # same key and range: the type is replaced
    (("role_revoke_permission", "r1", b"a", b"c"), 1, lambda s: s["roles"].update(r1=[])),
    (("auth_disable",), 0, lambda s: None),  # already off: a no-op
]


@pytest.mark.parametrize("op, delta, effect", OPERATIONS, ids=lambda v: repr(v) if isinstance(v, tuple) else None)
def test_operation_changes_and_revision(store, op, delta, effect):
    run(store, SETUP_FULL)
    before = snapshot_of(store)
    if delta is None:
        with pytest.raises(errors.MvccError):
            run(store, [op])
        assert snapshot_of(store) == before
        return
    resp = getattr(store, op[0])(*op[1:])
    assert resp.header.revision == store.revision
    expected = {**before, "users": dict(before["users"]), "roles": dict(before["roles"])}
    effect(expected)
    expected["revision"] = before["revision"] + delta
    assert snapshot_of(store) == expected


def test_every_change_bumps_the_revision_by_one_and_enable_does_not(store):
    steps = [
        ("user_add", "root", "pw", 2),
        ("user_grant_role", "root", "root", 3),
        ("role_add", "r", 4),
        ("role_grant_permission", "r", b"k", b"", "read", 5),
        ("auth_enable", 5),  # etcd reads the revision back unchanged
        ("auth_enable", 5),  # already on: a no-op
        ("role_revoke_permission", "r", b"k", b"", 6),
        ("auth_disable", 7),
        ("auth_disable", 7),
        ("user_add", "u", "pw", 8),
        ("user_change_password", "u", "pw2", 9),
        ("user_grant_role", "u", "r", 10),
        ("user_revoke_role", "u", "r", 11),
        ("user_delete", "u", 12),
        ("role_delete", "r", 13),
    ]
    for name, *args, revision in steps:
        getattr(store, name)(*args)
        assert store.auth_status().authRevision == revision, name


# -- errors: etcd's order of checks; a refused request changes nothing -------------------------------


def _propose(kind, req):
    return lambda s: s.propose(kind, req).result()


ERRORS = [
    # (setup, call, error, message)
    ([], lambda s: s.user_add("", "pw"), errors.UserEmptyError, USER_EMPTY),
    ([], lambda s: s.user_add("alice", "other"), errors.UserAlreadyExistError, USER_ALREADY_EXIST),
    ([], lambda s: s.user_delete("nobody"), errors.UserNotFoundError, USER_NOT_FOUND),
    ([], lambda s: s.user_delete(""), errors.UserNotFoundError, USER_NOT_FOUND),
    ([], lambda s: s.user_change_password("nobody", "pw"), errors.UserNotFoundError, USER_NOT_FOUND),
    ([], lambda s: s.user_grant_role("nobody", "r1"), errors.UserNotFoundError, USER_NOT_FOUND),
    ([], lambda s: s.user_grant_role("nobody", "nope"), errors.UserNotFoundError, USER_NOT_FOUND),
    ([], lambda s: s.user_grant_role("alice", "nope"), errors.RoleNotFoundError, ROLE_NOT_FOUND),
    ([], lambda s: s.user_grant_role("alice", ""), errors.RoleNotFoundError, ROLE_NOT_FOUND),
    ([], lambda s: s.user_revoke_role("nobody", "r1"), errors.UserNotFoundError, USER_NOT_FOUND),
    ([], lambda s: s.user_revoke_role("bob", "r2"), errors.RoleNotGrantedError, ROLE_NOT_GRANTED),
    ([], lambda s: s.user_revoke_role("bob", "nope"), errors.RoleNotGrantedError, ROLE_NOT_GRANTED),
    ([], lambda s: s.user_get("nobody"), errors.UserNotFoundError, USER_NOT_FOUND),
    ([], lambda s: s.role_add(""), errors.RoleEmptyError, ROLE_EMPTY),
    ([], lambda s: s.role_add("r1"), errors.RoleAlreadyExistError, ROLE_ALREADY_EXIST),
    ([], lambda s: s.role_delete("nope"), errors.RoleNotFoundError, ROLE_NOT_FOUND),
    ([], lambda s: s.role_get("nope"), errors.RoleNotFoundError, ROLE_NOT_FOUND),
    ([], lambda s: s.role_get("root"), errors.RoleNotFoundError, ROLE_NOT_FOUND),  # no such role yet
    ([], _propose(KIND_AUTH_ROLE_GRANT_PERMISSION, pb.AuthRoleGrantPermissionRequest(name="r1")),
     errors.PermissionNotGivenError, PERMISSION_NOT_GIVEN),
    ([], lambda s: s.role_grant_permission("nope", b"k"), errors.RoleNotFoundError, ROLE_NOT_FOUND),
    # invalid ranges: empty key, range_end not above the key (and not "\0")
    ([], lambda s: s.role_grant_permission("r1", b""), errors.InvalidAuthMgmtError, INVALID_AUTH_MGMT),
    ([], lambda s: s.role_grant_permission("r1", b"", b"\0"), errors.InvalidAuthMgmtError, INVALID_AUTH_MGMT),
    ([], lambda s: s.role_grant_permission("r1", b"b", b"a"), errors.InvalidAuthMgmtError, INVALID_AUTH_MGMT),
    ([], lambda s: s.role_grant_permission("r1", b"b", b"b"), errors.InvalidAuthMgmtError, INVALID_AUTH_MGMT),
    ([], lambda s: s.role_grant_permission("r1", b"b", b"\0\0"), errors.InvalidAuthMgmtError, INVALID_AUTH_MGMT),
    # the range is checked before the role
    ([], lambda s: s.role_grant_permission("nope", b"b", b"a"), errors.InvalidAuthMgmtError, INVALID_AUTH_MGMT),
    ([], lambda s: s.role_revoke_permission("nope", b"a", b"c"), errors.RoleNotFoundError, ROLE_NOT_FOUND),
    ([], lambda s: s.role_revoke_permission("r1", b"a"), errors.PermissionNotGrantedError, PERMISSION_NOT_GRANTED),
    ([], lambda s: s.role_revoke_permission("r1", b"a", b"d"), errors.PermissionNotGrantedError,
     PERMISSION_NOT_GRANTED),
    ([], lambda s: s.role_revoke_permission("r2", b"a", b"c"), errors.PermissionNotGrantedError,
     PERMISSION_NOT_GRANTED),
    # enabling needs user root with role root
    ([], lambda s: s.auth_enable(), errors.RootUserNotExistError, ROOT_USER_NOT_EXIST),
    ([("user_add", "root", "pw")], lambda s: s.auth_enable(), errors.RootRoleNotExistError, ROOT_ROLE_NOT_EXIST),
    ([("user_add", "root", "pw"), ("role_add", "root"), ("user_grant_role", "bob", "root")],
     lambda s: s.auth_enable(), errors.RootRoleNotExistError, ROOT_ROLE_NOT_EXIST),
    # root is protected while auth is on, before any other check
    ([("user_add", "root", "pw"), ("user_grant_role", "root", "root"), ("auth_enable",)],
     lambda s: s.user_delete("root"), errors.InvalidAuthMgmtError, INVALID_AUTH_MGMT),
    ([("user_add", "root", "pw"), ("user_grant_role", "root", "root"), ("auth_enable",)],
     lambda s: s.role_delete("root"), errors.InvalidAuthMgmtError, INVALID_AUTH_MGMT),
    ([("user_add", "root", "pw"), ("user_grant_role", "root", "root"), ("role_add", "root"), ("auth_enable",)],
     lambda s: s.role_delete("root"), errors.InvalidAuthMgmtError, INVALID_AUTH_MGMT),
    ([("user_add", "root", "pw"), ("user_grant_role", "root", "root"), ("auth_enable",)],
     lambda s: s.user_revoke_role("root", "root"), errors.InvalidAuthMgmtError, INVALID_AUTH_MGMT),
    # a hash that is not base64 (a client may send hashedPassword itself)
    ([], _propose(KIND_AUTH_USER_ADD, pb.AuthUserAddRequest(name="carol", hashedPassword="%%%")),
     errors.NoPasswordUserError, NO_PASSWORD_USER),
    ([], _propose(KIND_AUTH_USER_CHANGE_PASSWORD, pb.AuthUserChangePasswordRequest(name="bob", hashedPassword="!")),
     errors.NoPasswordUserError, NO_PASSWORD_USER),
    # bcrypt reads at most 72 bytes; etcd refuses to hash more
    ([], lambda s: s.user_add("carol", "x" * 73), errors.PasswordTooLongError, PASSWORD_TOO_LONG),
    ([], lambda s: s.user_change_password("bob", "é" * 37), errors.PasswordTooLongError, PASSWORD_TOO_LONG),
    ([], lambda s: s.auth.check_password("alice", "pw"), errors.AuthNotEnabledError, AUTH_NOT_ENABLED),
]


@pytest.mark.parametrize("setup, call, error, message", ERRORS)
def test_errors(store, setup, call, error, message):
    run(store, SETUP_FULL)
    run(store, setup)
    before = snapshot_of(store)
    kv_revision = store.revision
    with pytest.raises(error) as info:
        call(store)
    assert str(info.value) == message
    assert snapshot_of(store) == before, "a refused request changed the auth store"
    assert store.revision == kv_revision


def test_a_plain_text_password_is_never_logged(store):
    for kind, req in [
        (KIND_AUTH_USER_ADD, pb.AuthUserAddRequest(name="alice", password="secret")),
        (KIND_AUTH_USER_CHANGE_PASSWORD, pb.AuthUserChangePasswordRequest(name="alice", password="secret")),
    ]:
        with pytest.raises(ValueError, match="prepare"):
            store.propose(kind, req)
    assert store.auth_status().authRevision == 1
    store.user_add("alice", "secret-one")
    store.user_change_password("alice", "secret-two")
    store.user_add("bob", "secret-three", no_password=True)
    wal = b"".join(p.read_bytes() for p in (Path(store.path) / "wal").iterdir())
    assert b"secret" not in wal


# -- root ------------------------------------------------------------------------------------------


def test_role_root_need_not_exist_to_be_granted_and_shows_every_key_readwrite(store):
    store.user_add("root", "pw")
    store.user_grant_role("root", "root")
    assert list(store.role_list().roles) == []
    store.auth_enable()
    assert store.auth_status().enabled
    store.role_add("root")
    # Whatever is granted to it, role root shows READWRITE on every key.
    store.role_grant_permission("root", b"k", b"", "read")
    assert perms_of(store, "root") == [(b"", b"\0", READWRITE)]


def test_root_may_be_removed_once_auth_is_off(store):
    with_root(store, enable=True)
    store.role_add("root")
    store.auth_disable()
    store.user_revoke_role("root", "root")
    store.user_grant_role("root", "root")
    store.role_delete("root")
    assert list(store.user_get("root").roles) == []  # deleting a role takes it from every user
    store.user_delete("root")
    assert list(store.user_list().users) == []


# -- ordering ---------------------------------------------------------------------------------------


def test_user_and_role_lists_are_in_byte_order(store):
    names = ["b", "a", "B", "é", "aa", "Z", "_"]
    for name in names:
        store.user_add(name, no_password=True)
        store.role_add(name)
    expected = sorted(names, key=str.encode)
    assert list(store.user_list().users) == expected
    assert list(store.role_list().roles) == expected


def test_roles_of_a_user_are_sorted(store):
    for role in ["m", "b", "z", "a"]:
        store.role_add(role)
    store.user_add("u", no_password=True)
    for role in ["m", "root", "b", "z", "a"]:
        store.user_grant_role("u", role)
    assert list(store.user_get("u").roles) == ["a", "b", "m", "root", "z"]
    store.user_revoke_role("u", "m")
    assert list(store.user_get("u").roles) == ["a", "b", "root", "z"]


def test_permissions_are_sorted_by_key_and_a_regrant_replaces_the_type(store):
    store.role_add("r")
    for key, end, perm in [(b"c", b"", "read"), (b"a", b"b", "write"), (b"b", b"\0", "readwrite"), (b"a", b"", "read")]:
        store.role_grant_permission("r", key, end, perm)
    assert perms_of(store, "r") == [(b"a", b"b", WRITE), (b"a", b"", READ), (b"b", b"\0", READWRITE), (b"c", b"", READ)]
    store.role_grant_permission("r", b"a", b"b", READWRITE)
    assert perms_of(store, "r") == [(b"a", b"b", READWRITE), (b"a", b"", READ), (b"b", b"\0", READWRITE),
                                    (b"c", b"", READ)]


def test_a_regrant_behind_another_range_of_the_same_key_is_added_again_as_in_etcd(store):
    """etcd compares only the first permission at the key, so the same
    (key, range_end) can appear twice; a revoke removes both."""
    store.role_add("r")
    store.role_grant_permission("r", b"a", b"", "readwrite")
    store.role_grant_permission("r", b"a", b"c", "read")
    store.role_grant_permission("r", b"a", b"c", "readwrite")
    assert perms_of(store, "r") == [(b"a", b"", READWRITE), (b"a", b"c", READ), (b"a", b"c", READWRITE)]
    store.role_revoke_permission("r", b"a", b"c")
    assert perms_of(store, "r") == [(b"a", b"", READWRITE)]


# -- passwords -------------------------------------------------------------------------------------


def test_check_password(store):
    with_root(store)
    store.user_add("alice", "pw")
    store.user_add("nopw", no_password=True)
    store.user_add("empty")  # hashed like any password, as etcd 3.5+ does
    store.auth_enable()
    revision = store.auth.revision
    assert store.auth.check_password("alice", "pw") == revision
    assert store.auth.check_password("root", "rootpw") == revision
    assert store.auth.check_password("empty", "") == revision
    for name, password, error, message in [
        ("alice", "wrong", errors.AuthFailedError, AUTH_FAILED),
        ("alice", "", errors.AuthFailedError, AUTH_FAILED),
        ("nobody", "pw", errors.AuthFailedError, AUTH_FAILED),
        ("nopw", "", errors.NoPasswordUserError, NO_PASSWORD_USER),
        ("nopw", "anything", errors.NoPasswordUserError, NO_PASSWORD_USER),
        ("empty", "x", errors.AuthFailedError, AUTH_FAILED),
    ]:
        with pytest.raises(error) as info:
            store.auth.check_password(name, password)
        assert str(info.value) == message, (name, password)


def test_change_password(store):
    with_root(store)
    store.user_add("alice", "old")
    store.user_add("nopw", no_password=True)
    store.auth_enable()
    store.user_change_password("alice", "new")
    assert store.auth.check_password("alice", "new") == store.auth.revision
    with pytest.raises(errors.AuthFailedError):
        store.auth.check_password("alice", "old")
    # A no-password user stays one.
    store.user_change_password("nopw", "pw")
    with pytest.raises(errors.NoPasswordUserError):
        store.auth.check_password("nopw", "pw")
    # No password (and no hash): etcd stores an empty hash that no password matches.
    store.user_change_password("alice", "")
    for password in ["", "new"]:
        with pytest.raises(errors.AuthFailedError):
            store.auth.check_password("alice", password)


def test_only_the_first_72_bytes_of_a_password_count_as_in_go(store):
    with_root(store)
    store.user_add("alice", "p" * 72)
    store.auth_enable()
    assert store.auth.check_password("alice", "p" * 72 + "ignored") == store.auth.revision


def test_prepare_hashes_and_clears_the_password(store):
    auth = store.auth
    add = auth.prepare(KIND_AUTH_USER_ADD, pb.AuthUserAddRequest(name="a", password="pw"))
    assert add.password == "" and base64.b64decode(add.hashedPassword).startswith(b"$2a$04$")
    nopw = pb.AuthUserAddRequest(name="a", password="pw")
    nopw.options.no_password = True
    prepared = auth.prepare(KIND_AUTH_USER_ADD, nopw)
    assert prepared.password == "" and prepared.hashedPassword == ""
    change = auth.prepare(KIND_AUTH_USER_CHANGE_PASSWORD, pb.AuthUserChangePasswordRequest(name="a", password="pw"))
    assert change.password == "" and change.hashedPassword
    given = pb.AuthUserChangePasswordRequest(name="a", hashedPassword="aGFzaA==")
    assert auth.prepare(KIND_AUTH_USER_CHANGE_PASSWORD, given) == given  # etcd keeps a hash the client sent
    role = pb.AuthRoleAddRequest(name="r")
    assert auth.prepare(KIND_AUTH_ROLE_ADD, role) is role


def test_user_records_are_etcds(store):
    """authUsers/authRoles hold authpb messages by name; the auth bucket
    holds authEnabled (1 byte) and authRevision (8 bytes BE)."""
    with_root(store)
    store.user_add("nopw", no_password=True)
    store.role_add("r")
    store.role_grant_permission("r", b"k", b"", "write")
    store.auth_enable()
    be = store._backend
    with be.begin_read() as txn:
        assert txn.get(b"authEnabled", db=be.dbs[AUTH]) == b"\x01"
        assert txn.get(b"authRevision", db=be.dbs[AUTH]) == struct.pack(">Q", 6)
        root = auth_pb2.User.FromString(txn.get(b"root", db=be.dbs[AUTH_USERS]))
        nopw = auth_pb2.User.FromString(txn.get(b"nopw", db=be.dbs[AUTH_USERS]))
        role = auth_pb2.Role.FromString(txn.get(b"r", db=be.dbs[AUTH_ROLES]))
    assert root.name == b"root" and list(root.roles) == ["root"] and root.password.startswith(b"$2a$04$")
    assert root.HasField("options") and not root.options.no_password
    assert nopw.options.no_password and nopw.password == b""
    assert role == auth_pb2.Role(name=b"r", keyPermission=[auth_pb2.Permission(permType=WRITE, key=b"k")])
    store.auth_disable()
    with be.begin_read() as txn:
        assert txn.get(b"authEnabled", db=be.dbs[AUTH]) == b"\x00"
        assert txn.get(b"authRevision", db=be.dbs[AUTH]) == struct.pack(">Q", 7)


# -- permission checks ----------------------------------------------------------------------------


@pytest.fixture
def alice(store):
    """The worked example of auth.py's docstring, plus root; auth on."""
    with_root(store)
    store.user_add("alice", "pw")
    for role, grants in {
        "r1": [(b"a", b"c", "read"), (b"d", b"", "read")],
        "r2": [(b"c", b"ca", "readwrite"), (b"x", b"\0", "write")],
    }.items():
        store.role_add(role)
        for key, end, perm in grants:
            store.role_grant_permission(role, key, end, perm)
        store.user_grant_role("alice", role)
    store.auth_enable()
    return AuthInfo("alice", store.auth.revision)


CHECKS = [
    # (check, key, range_end, permitted)
    ("check_range", b"a", b"c9", True),
    ("check_range", b"a", b"ca", True),  # two roles' intervals, touching at c
    ("check_range", b"a", b"ca\0", False),
    ("check_range", b"b", b"e", False),  # crosses the gap at ca
    ("check_range", b"d", b"", True),
    ("check_range", b"d", b"d\0", True),
    ("check_range", b"d\0", b"", False),
    ("check_range", b"da", b"", False),
    ("check_range", b"c", b"", True),
    ("check_range", b"ca", b"", False),  # range ends are exclusive
    ("check_range", b"x", b"", False),  # WRITE only
    ("check_range", b"a", b"\0", False),  # every key from a on
    ("check_range", b"\0", b"\0", False),  # every key
    ("check_range", b"b", b"a", True),  # an empty range: permitted as its key is
    ("check_range", b"e", b"d", False),
    ("check_range", b"", b"", False),
    ("check_put", b"c", None, True),
    ("check_put", b"c9", None, True),
    ("check_put", b"a", None, False),  # READ only
    ("check_put", b"d", None, False),
    ("check_put", b"x", None, True),
    ("check_put", b"zz\xff\xff", None, True),
    ("check_put", b"w\xff", None, False),
    ("check_delete_range", b"c", b"ca", True),
    ("check_delete_range", b"c", b"cb", False),
    ("check_delete_range", b"y", b"\0", True),  # from-key within the open-ended grant
    ("check_delete_range", b"x", b"\0", True),
    ("check_delete_range", b"w", b"\0", False),
    ("check_delete_range", b"x", b"", True),
    ("check_delete_range", b"\0", b"\0", False),
]


@pytest.mark.parametrize("check, key, range_end, permitted", CHECKS)
def test_permission_checks(store, alice, check, key, range_end, permitted):
    args = (key,) if range_end is None else (key, range_end)
    fn = getattr(store.auth, check)
    if permitted:
        assert fn(alice, *args) is None
    else:
        with pytest.raises(errors.PermissionDeniedError) as info:
            fn(alice, *args)
        assert str(info.value) == PERMISSION_DENIED
    # root passes everything; with auth off so does anybody, even nobody
    assert fn(AuthInfo("root", alice.revision), *args) is None
    store.auth_disable()
    assert fn(None, *args) is None
    assert store.auth.check_admin(None) is None


def test_check_errors_in_etcds_order(store, alice):
    auth = store.auth
    current = alice.revision
    for info, error in [
        (None, errors.UserEmptyError),
        (AuthInfo("alice", 0), errors.UserEmptyError),  # revision 0: no user given
        (AuthInfo("", 0), errors.UserEmptyError),
        (AuthInfo("alice", current - 1), errors.AuthOldRevisionError),
        (AuthInfo("nobody", current - 1), errors.AuthOldRevisionError),
        (AuthInfo("nobody", current), errors.PermissionDeniedError),
        (AuthInfo("", current), errors.PermissionDeniedError),
    ]:
        for check, args in [("check_range", (b"a", b"")), ("check_put", (b"c",)), ("check_delete_range", (b"c", b""))]:
            with pytest.raises(error):
                getattr(auth, check)(info, *args)
    # admin: no revision check (etcd's IsAdminPermitted), unknown users are named
    for info, error in [
        (None, errors.UserEmptyError),
        (AuthInfo("", current), errors.UserEmptyError),
        (AuthInfo("nobody", current), errors.UserNotFoundError),
        (AuthInfo("alice", current), errors.PermissionDeniedError),
    ]:
        with pytest.raises(error):
            auth.check_admin(info)
    assert auth.check_admin(AuthInfo("root", current)) is None
    assert auth.check_admin(AuthInfo("root", 1)) is None
    assert auth.has_role("alice", "r1") and not auth.has_role("alice", "root") and not auth.has_role("nobody", "r1")
    assert auth.user_exists("alice") and not auth.user_exists("nobody")


def test_checks_follow_every_change(store, alice):
    """The merged permissions are rebuilt after grant, revoke, role and user changes."""
    auth = store.auth

    def me():
        return AuthInfo("alice", auth.revision)

    auth.check_range(me(), b"a", b"b")
    with pytest.raises(errors.PermissionDeniedError):
        auth.check_range(me(), b"p", b"")
    store.role_grant_permission("r1", b"p", b"q", "read")
    auth.check_range(me(), b"p", b"")
    store.role_revoke_permission("r1", b"p", b"q")
    with pytest.raises(errors.PermissionDeniedError):
        auth.check_range(me(), b"p", b"")
    store.user_revoke_role("alice", "r2")
    with pytest.raises(errors.PermissionDeniedError):
        auth.check_put(me(), b"x")
    store.user_grant_role("alice", "r2")
    auth.check_put(me(), b"x")
    store.role_delete("r2")
    with pytest.raises(errors.PermissionDeniedError):
        auth.check_put(me(), b"x")
    store.user_grant_role("alice", "root")
    auth.check_put(me(), b"anything")
    auth.check_admin(me())
    store.user_delete("alice")
    with pytest.raises(errors.PermissionDeniedError):
        auth.check_range(me(), b"a", b"")


def test_a_user_added_under_a_deleted_users_name_starts_afresh(store, alice):
    store.user_delete("alice")
    store.user_add("alice", "pw")
    with pytest.raises(errors.PermissionDeniedError):
        store.auth.check_range(AuthInfo("alice", store.auth.revision), b"a", b"")


# An executable model of etcd's checks: adt's interval tree Contains (the
# intervals meeting the query, by start, must chain without a gap and
# reach both its ends) and Intersects, over "affine" bytes in which the
# empty end is larger than every key.

_INF = None


def _lt(a, b):  # a < b, None being the largest
    if a is _INF:
        return False
    return b is _INF or a < b


def _overlaps(q, ivl):
    qb, qe = q
    ib, ie = ivl
    if _lt(qb, ib) and not _lt(ib, qe):
        return False  # q is left of ivl
    return _lt(qb, ie)


def _etcd_contains(intervals, q):
    visited = sorted((i for i in intervals if _overlaps(q, i)), key=lambda i: i[0])
    if not visited:
        return False
    min_begin, max_end = visited[0]
    for b, e in visited[1:]:
        if _lt(max_end, b):
            return False
        if _lt(max_end, e):
            max_end = e
    return not _lt(max_end, q[1]) and not _lt(q[0], min_begin)


def _model_intervals(perms, want):
    out = []
    for key, end, typ in perms:
        if typ not in (want, READWRITE):
            continue
        if not end:
            out.append((key, key + b"\0"))
        elif end == b"\0":
            out.append((key, _INF))
        else:
            out.append((key, end))
    return out


def _model_permits(perms, want, key, range_end):
    intervals = _model_intervals(perms, want)
    if not range_end:
        return any(_overlaps((key, key + b"\0"), i) for i in intervals)
    return _etcd_contains(intervals, (key, _INF if range_end == b"\0" else range_end))


def test_checks_agree_with_etcds_interval_tree(store):
    """Random grants over a small alphabet, every kind of query, compared
    with the model above."""
    rng = random.Random(20240611)
    alphabet = [b"", b"\0", b"a", b"a\0", b"ab", b"b", b"ba", b"c", b"c\xff", b"d"]
    with_root(store)
    store.user_add("u", no_password=True)
    store.auth_enable()
    for round_ in range(12):
        role = f"r{round_}"
        store.role_add(role)
        store.user_grant_role("u", role)
        for _ in range(rng.randint(1, 3)):
            key = rng.choice(alphabet[1:])
            end = rng.choice([b"", b"\0", *[k for k in alphabet if k > key]])
            store.role_grant_permission(role, key, end, rng.choice([READ, WRITE, READWRITE]))
        perms = [p for name in store.user_get("u").roles for p in perms_of(store, name)]
        info = AuthInfo("u", store.auth.revision)
        for key in alphabet[1:]:
            for end in alphabet:
                for check, want in [("check_range", READ), ("check_delete_range", WRITE)]:
                    expected = _model_permits(perms, want, key, end)
                    try:
                        getattr(store.auth, check)(info, key, end)
                        got = True
                    except errors.PermissionDeniedError:
                        got = False
                    assert got == expected, (check, key, end, perms)
            try:
                store.auth.check_put(info, key)
                got = True
            except errors.PermissionDeniedError:
                got = False
            assert got == _model_permits(perms, WRITE, key, b""), ("check_put", key, perms)


# -- the auth revision a request was authorized at, checked when it is applied ---------------------


def test_a_write_authorized_before_an_auth_change_is_refused_at_apply(store, alice):
    checked = store.auth.revision
    put = pb.PutRequest(key=b"c", value=b"1")
    assert store.propose(KIND_PUT, put, auth_revision=checked).result().header.revision == 2
    store.role_add("another")
    kv_revision = store.revision
    with pytest.raises(errors.AuthOldRevisionError) as info:
        store.propose(KIND_PUT, pb.PutRequest(key=b"c", value=b"2"), auth_revision=checked).result()
    assert str(info.value) == AUTH_OLD_REVISION
    assert store.revision == kv_revision and store.get(b"c").value == b"1"
    # every kind is checked, auth requests included
    before = snapshot_of(store)
    with pytest.raises(errors.AuthOldRevisionError):
        store.propose(KIND_AUTH_ROLE_ADD, pb.AuthRoleAddRequest(name="late"), auth_revision=checked).result()
    assert snapshot_of(store) == before
    current = store.auth.revision
    assert store.propose(KIND_AUTH_ROLE_ADD, pb.AuthRoleAddRequest(name="late"), auth_revision=current).result()
    # a revision from the future (the server checked after this change) passes
    txn = pb.TxnRequest(success=[pb.RequestOp(request_put=pb.PutRequest(key=b"c", value=b"3"))])
    assert store.propose(KIND_TXN, txn, auth_revision=current + 5).result().succeeded
    # with auth off nothing is refused
    store.auth_disable()
    store.propose(KIND_PUT, pb.PutRequest(key=b"c", value=b"4"), auth_revision=1).result()
    assert store.get(b"c").value == b"4"
    store.propose(KIND_PUT, pb.PutRequest(key=b"c", value=b"5"), auth_revision=AUTH_OFF).result()
    assert store.get(b"c").value == b"5"
    # ... but a write let through with auth off is refused once auth is on,
    # as etcd's applier refuses a request whose header names no user
    store.auth_enable()
    kv_revision = store.revision
    with pytest.raises(errors.UserEmptyError):
        store.propose(KIND_PUT, pb.PutRequest(key=b"c", value=b"6"), auth_revision=AUTH_OFF).result()
    with pytest.raises(errors.UserEmptyError):
        store.propose(KIND_AUTH_ROLE_ADD, pb.AuthRoleAddRequest(name="sneaky"), auth_revision=AUTH_OFF).result()
    assert store.revision == kv_revision and store.get(b"c").value == b"5"
    assert "sneaky" not in store.role_list().roles


# -- listeners ------------------------------------------------------------------------------------


def test_listeners_hear_of_committed_changes_only(store):
    heard = []
    store.auth.add_listener(lambda kind, req: heard.append((kind, type(req).__name__)))
    store.auth.add_listener(lambda kind, req: 1 / 0)  # a failing listener does not stop the others
    store.user_add("alice", "pw")
    with pytest.raises(errors.UserAlreadyExistError):
        store.user_add("alice", "pw")
    store.role_add("r")
    store.user_grant_role("alice", "r")
    store.user_grant_role("alice", "r")  # a no-op
    store.auth_disable()  # a no-op
    store.put(b"k", b"v")
    assert heard == [
        (KIND_AUTH_USER_ADD, "AuthUserAddRequest"),
        (KIND_AUTH_ROLE_ADD, "AuthRoleAddRequest"),
        (KIND_AUTH_USER_GRANT_ROLE, "AuthUserGrantRoleRequest"),
    ]


# -- durability: close/reopen, a killed process, a snapshot ----------------------------------------


def build_state(store) -> None:
    with_root(store)
    store.user_add("alice", "alicepw")
    store.user_add("svc", no_password=True)
    store.role_add("reader")
    store.role_add("writer")
    store.role_grant_permission("reader", b"app/", b"app0", "read")
    store.role_grant_permission("writer", b"app/w", b"", "write")
    store.role_grant_permission("writer", b"logs/", b"\0", "readwrite")
    store.user_grant_role("alice", "reader")
    store.user_grant_role("alice", "writer")
    store.user_grant_role("svc", "reader")
    store.role_add("gone")
    store.user_grant_role("svc", "gone")
    store.role_delete("gone")
    store.auth_enable()


def check_state(store, expected) -> None:
    assert snapshot_of(store) == expected
    auth = store.auth
    assert auth.enabled
    assert auth.check_password("alice", "alicepw") == auth.revision
    assert auth.check_password("root", "rootpw") == auth.revision
    with pytest.raises(errors.NoPasswordUserError):
        auth.check_password("svc", "")
    me = AuthInfo("alice", auth.revision)
    auth.check_range(me, b"app/", b"app0")
    auth.check_put(me, b"app/w")
    auth.check_delete_range(me, b"logs/x", b"\0")
    with pytest.raises(errors.PermissionDeniedError):
        auth.check_put(me, b"app/x")
    with pytest.raises(errors.AuthOldRevisionError):
        auth.check_range(AuthInfo("alice", auth.revision - 1), b"app/", b"")


def test_auth_survives_close_and_reopen(tmp_path):
    with open_store(tmp_path / "d") as s:
        build_state(s)
        expected = snapshot_of(s)
        h = s.hash()
    with open_store(tmp_path / "d") as s:
        check_state(s, expected)
        assert s.hash() == h


_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, os.path.join(sys.argv[2], "tests"))
    import mvcckv
    from mvcckv.pb import rpc_pb2 as pb
    from test_auth_store import build_state
    store = mvcckv.open(sys.argv[1], fsync=False, bcrypt_cost=4, checkpoint_interval=1e9)
    build_state(store)
    old = store.auth.revision
    store.role_add("late")
    try:
        store.propose(1, pb.PutRequest(key=b"refused", value=b"v"), auth_revision=old).result()
    except Exception as e:
        print(type(e).__name__, flush=True)
    store.propose(1, pb.PutRequest(key=b"accepted", value=b"v"), auth_revision=store.auth.revision).result()
    # A put the server let through with auth off, queued behind an enable.
    store.auth_disable()
    enabling = store.propose(9, pb.AuthEnableRequest(), auth_revision=-1)
    raced = store.propose(1, pb.PutRequest(key=b"raced", value=b"v"), auth_revision=-1)
    enabling.result()
    try:
        raced.result()
    except Exception as e:
        print(type(e).__name__, flush=True)
    print(store.auth.revision, store.revision, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_auth_survives_a_kill_through_wal_replay(tmp_path):
    """A killed process leaves its changes in the WAL (no checkpoint released
    it); a backend that lost them (here: the file from before) gets them
    back by replay, and decides the apply-time check the same way."""
    data = tmp_path / "d"
    with open_store(data) as s:
        s.put(b"before", b"v")
    before = tmp_path / "data.mdb.before"
    shutil.copy(data / "db" / "data.mdb", before)
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(data), str(REPO)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == -signal.SIGKILL, out.stderr
    refused, raced, counts = out.stdout.splitlines()
    assert refused == "AuthOldRevisionError"
    assert raced == "UserEmptyError"
    auth_revision, kv_revision = map(int, counts.split())

    as_left = tmp_path / "as-left"
    rolled_back = tmp_path / "rolled-back"
    shutil.copytree(data, as_left)
    shutil.copytree(data, rolled_back)
    os.remove(rolled_back / "db" / "lock.mdb")
    shutil.copy(before, rolled_back / "db" / "data.mdb")
    states = []
    for d in (as_left, rolled_back):
        with open_store(d) as s:
            assert s.auth.revision == auth_revision and s.revision == kv_revision
            assert s.get(b"refused") is None and s.get(b"accepted").value == b"v"
            assert s.get(b"raced") is None and s.auth.enabled
            states.append((snapshot_of(s), s.hash()))
            expected = snapshot_of(s)
            check_state(s, expected)
    assert states[0] == states[1]
    assert "late" in states[0][0]["roles"]


def test_auth_survives_snapshot_save_and_restore(tmp_path):
    with open_store(tmp_path / "src") as s:
        build_state(s)
        s.put(b"k", b"v")
        expected = snapshot_of(s)
        expected_hash = s.hash()[0]
        save(s, tmp_path / "snap.db")
    restore(tmp_path / "snap.db", tmp_path / "restored")
    with open_store(tmp_path / "restored") as s:
        check_state(s, expected)
        assert s.hash()[0] == expected_hash
        # and it goes on from there
        s.role_add("after")
        assert s.auth.revision == expected["revision"] + 1


def test_docstring_examples():
    result = doctest.testmod(mvcckv.auth, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0

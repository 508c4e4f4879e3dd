"""Auth on the PostgreSQL engine: the LMDB engine's rules over shared tables.

The rules themselves are tested once, on the LMDB store, by
test_auth_store.py; here the questions are what only the PostgreSQL engine
has to answer: the changes are stored in its tables (byte for byte what the
LMDB engine stores) and survive a reopen; a request authorized at an old
auth revision is refused at apply time against the database's revision,
even when the change came from another engine; several engines on one
schema see each other's changes (notification, the read snapshot, the
writer's look at the tables); and ``mvcckv serve --backend postgresql://``
serves etcd's Auth service to etcdctl, across two servers on one schema.
"""

from __future__ import annotations

import threading
import time
import uuid

import psycopg
import pytest

import mvcckv.pg
from harness import EtcdctlError, MvcckvProcess, find_binary
from mvcckv import errors
from mvcckv.auth import AuthInfo
from mvcckv.kv import AUTH_OFF, KIND_AUTH_ENABLE, KIND_AUTH_ROLE_ADD, KIND_AUTH_USER_ADD, KIND_AUTH_USER_DELETE, KIND_PUT
from mvcckv.pb import auth_pb2
from mvcckv.pb import rpc_pb2 as pb

COST = 4  # bcrypt's cheapest: these tests hash dozens of passwords


def _schema() -> str:
    return "a_" + uuid.uuid4().hex[:12]


@pytest.fixture
def open_pg(postgres):
    """open_pg(schema=None, **options): engines on one fresh schema per test."""
    engines = []
    default = _schema()

    def open_(schema=None, **options):
        options.setdefault("poll_interval", 0.2)
        options.setdefault("bcrypt_cost", COST)
        engine = mvcckv.pg.open(postgres.dsn(), schema=schema or default, **options)
        engines.append(engine)
        return engine

    open_.schema = default
    open_.dsn = postgres.dsn()
    yield open_
    for engine in engines:
        engine.close()


def wait_for(cond, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _setup(store) -> None:
    """root, and alice with READWRITE on [a, b)."""
    store.user_add("root", "rootpw")
    store.user_grant_role("root", "root")
    store.user_add("alice", "pw")
    store.role_add("r")
    store.role_grant_permission("r", b"a", b"b", "readwrite")
    store.user_grant_role("alice", "r")


# --- one engine ---------------------------------------------------------------------


def test_admin_operations_and_errors(open_pg):
    store = open_pg()
    assert store.auth_status().enabled is False and store.auth_status().authRevision == 1
    with pytest.raises(errors.RootUserNotExistError):
        store.auth_enable()
    _setup(store)
    assert store.auth_status().authRevision == 7
    with pytest.raises(errors.UserAlreadyExistError):
        store.user_add("alice", "x")
    with pytest.raises(errors.RoleNotFoundError):
        store.user_grant_role("alice", "nope")
    with pytest.raises(errors.PermissionNotGrantedError):
        store.role_revoke_permission("r", b"zz")
    with pytest.raises(errors.UserEmptyError):
        store.user_add("")
    # A failed request changes nothing, the revision included.
    assert store.auth_status().authRevision == 7
    assert list(store.user_list().users) == ["alice", "root"]
    assert list(store.role_get("r").perm) == [auth_pb2.Permission(permType=auth_pb2.Permission.READWRITE, key=b"a", range_end=b"b")]
    store.auth_enable()
    assert store.auth_status().enabled and store.auth_status().authRevision == 7  # enabling does not move it
    with pytest.raises(errors.InvalidAuthMgmtError):
        store.user_delete("root")

    auth = store.auth
    alice = AuthInfo("alice", auth.check_password("alice", "pw"))
    auth.check_put(alice, b"a1")
    with pytest.raises(errors.PermissionDeniedError):
        auth.check_put(alice, b"c")
    with pytest.raises(errors.AuthFailedError):
        auth.check_password("alice", "wrong")
    # Responses carry the KV revision, as etcd's do.
    store.put(b"k", b"v")
    assert store.user_get("alice").header.revision == store.revision == 2
    store.auth_disable()
    assert store.auth_status().authRevision == 8 and not store.auth.enabled


def test_stored_bytes_match_the_lmdb_layout(open_pg, tmp_path):
    """The same requests leave the same encoded users and roles in both engines."""
    pg = open_pg()
    lmdb = mvcckv.open(str(tmp_path / "data"), fsync=False, bcrypt_cost=COST)
    try:
        for store in (pg, lmdb):
            store.user_add("nopw", no_password=True)
            store.role_add("r")
            store.role_grant_permission("r", b"x", b"\0", "read")
            store.role_grant_permission("r", b"a", b"", "write")
            store.user_grant_role("nopw", "r")
        from mvcckv.backend import AUTH_ROLES, AUTH_USERS

        be = lmdb._backend
        with be.env.begin() as txn:
            want_users = dict(txn.cursor(db=be.dbs[AUTH_USERS]))
            want_roles = dict(txn.cursor(db=be.dbs[AUTH_ROLES]))
        with psycopg.connect(open_pg.dsn, options=f"-c search_path={open_pg.schema}") as conn:
            users = {bytes(k): bytes(v) for k, v in conn.execute("SELECT name, data FROM auth_user")}
            roles = {bytes(k): bytes(v) for k, v in conn.execute("SELECT name, data FROM auth_role")}
            meta = conn.execute("SELECT enabled, revision FROM auth_meta").fetchone()
        assert users == want_users and roles == want_roles
        assert meta == (False, lmdb.auth_status().authRevision) == (False, 6)
    finally:
        lmdb.close()


def test_state_survives_a_reopen(open_pg):
    store = open_pg()
    _setup(store)
    store.auth_enable()
    store.close()
    again = open_pg()
    assert again.auth.enabled and again.auth.revision == 7
    assert list(again.user_get("alice").roles) == ["r"]
    alice = AuthInfo("alice", again.auth.check_password("alice", "pw"))
    again.auth.check_range(alice, b"a", b"b")
    with pytest.raises(errors.PermissionDeniedError):
        again.auth.check_range(alice, b"a", b"c")


def test_request_checked_at_an_old_auth_revision_is_refused_at_apply(open_pg):
    store = open_pg()
    _setup(store)
    store.auth_enable()
    checked = store.auth.revision
    ok = store.propose(KIND_PUT, pb.PutRequest(key=b"a1", value=b"v"), auth_revision=checked).result()
    assert ok.header.revision == 2
    store.role_add("other")  # the auth revision moves on
    with pytest.raises(errors.AuthOldRevisionError):
        store.propose(KIND_PUT, pb.PutRequest(key=b"a2", value=b"v"), auth_revision=checked).result()
    # An auth change checked at the old revision is refused the same way.
    with pytest.raises(errors.AuthOldRevisionError):
        store.propose(KIND_AUTH_ROLE_ADD, pb.AuthRoleAddRequest(name="late"), auth_revision=checked).result()
    assert store.get(b"a2") is None and "late" not in store.role_list().roles
    # With auth off the revision is not checked (etcd's applier).
    store.auth_disable()
    store.propose(KIND_PUT, pb.PutRequest(key=b"a3", value=b"v"), auth_revision=checked).result()
    assert store.get(b"a3").value == b"v"
    store.propose(KIND_PUT, pb.PutRequest(key=b"a4", value=b"v"), auth_revision=AUTH_OFF).result()
    assert store.get(b"a4").value == b"v"
    # A write let through with auth off, applied after auth came on: refused
    # as user-less (etcd's applier), on this engine as on LMDB.
    enabling = store.propose(KIND_AUTH_ENABLE, pb.AuthEnableRequest(), auth_revision=AUTH_OFF)
    raced = store.propose(KIND_PUT, pb.PutRequest(key=b"a5", value=b"v"), auth_revision=AUTH_OFF)
    enabling.result()
    with pytest.raises(errors.UserEmptyError):
        raced.result()
    assert store.get(b"a5") is None and store.auth.enabled


def test_plain_text_passwords_are_never_proposed(open_pg):
    store = open_pg()
    with pytest.raises(ValueError):
        store.propose(KIND_AUTH_USER_ADD, pb.AuthUserAddRequest(name="u", password="pw"))


def test_a_failed_batch_leaves_no_auth_change_behind(open_pg):
    """An auth change applied in a batch that then rolls back is undone in
    memory too."""
    store = open_pg()
    store.user_add("u", "pw")
    before = store.auth.revision
    # The whole batch fails: a request after the auth change writes and
    # then fails, which the engine refuses to commit.
    real = store._apply_batch_locked  # noqa: SLF001 - fault injection

    def failing(conn, batch):
        real(conn, batch)
        raise psycopg.OperationalError("injected")

    store._apply_batch_locked = failing
    try:
        with pytest.raises(mvcckv.pg.UnavailableError):
            store.role_add("ghost")
    finally:
        store._apply_batch_locked = real
    assert store.auth.revision == before and "ghost" not in store.auth.role_list().roles
    assert "ghost" not in store.role_list().roles
    store.role_add("real")
    assert store.auth.revision == before + 1


# --- several engines on one schema ------------------------------------------------------


def test_engines_on_one_schema_see_each_others_changes(open_pg):
    a = open_pg()
    b = open_pg(schema=open_pg.schema)
    heard = []
    b.auth.add_listener(lambda kind, req: heard.append((kind, req.name if hasattr(req, "name") else "")))
    _setup(a)
    a.auth_enable()
    # The notification brings it without anyone asking b.
    wait_for(lambda: b.auth.enabled and b.auth.revision == 7, what="b to hear of auth enable")
    alice = AuthInfo("alice", b.auth.check_password("alice", "pw"))
    b.auth.check_put(alice, b"a1")
    # b administers too; a hears of it.
    b.role_revoke_permission("r", b"a", b"b")
    wait_for(lambda: a.auth.revision == 8, what="a to hear of the revoke")
    with pytest.raises(errors.AuthOldRevisionError):
        a.auth.check_put(alice, b"a1")
    with pytest.raises(errors.PermissionDeniedError):
        a.auth.check_put(AuthInfo("alice", 8), b"a1")
    # A deleted user's tokens must go on every server: b's listeners hear
    # of a's delete as if it had been applied on b.
    a.user_delete("alice")
    wait_for(lambda: (KIND_AUTH_USER_DELETE, "alice") in heard, what="b's listener to hear of the delete")


def test_the_writer_checks_the_databases_auth_revision(open_pg):
    """A write b authorized before a's change is refused, even if b has not
    heard of the change yet: the check reads the table in the transaction."""
    a = open_pg()
    b = open_pg(schema=open_pg.schema, poll_interval=60)
    _setup(a)
    a.auth_enable()
    wait_for(lambda: b.auth.revision == 7, what="b to catch up")
    checked = b.auth.revision
    # b stops hearing notifications: its local copy stays old.
    b._feed._on_auth = lambda generation: None  # noqa: SLF001 - isolate the apply-time check
    a.role_revoke_permission("r", b"a", b"b")
    time.sleep(0.2)
    assert b.auth.revision == checked
    with pytest.raises(errors.AuthOldRevisionError):
        b.propose(KIND_PUT, pb.PutRequest(key=b"a1", value=b"v"), auth_revision=checked).result()
    # That batch also brought b's copy up to date.
    assert b.auth.revision == 8
    assert a.get(b"a1") is None


def test_a_read_brings_the_auth_state_up_to_date(open_pg):
    a = open_pg()
    b = open_pg(schema=open_pg.schema, poll_interval=60)
    _setup(a)
    a.auth_enable()
    wait_for(lambda: b.auth.revision == 7, what="b to catch up")
    b._feed._on_auth = lambda generation: None  # noqa: SLF001 - only the read may tell b
    a.user_revoke_role("alice", "r")
    time.sleep(0.2)
    assert b.auth.revision == 7
    b.get(b"anything")
    assert b.auth.revision == 8
    assert list(b.auth.user_get("alice").roles) == []


def test_off_and_on_again_elsewhere_drops_tokens_here(open_pg):
    """etcd drops every token on a disable; a server that only sees the state
    after a disable and an enable must still hear of the disable."""
    a = open_pg()
    b = open_pg(schema=open_pg.schema, poll_interval=60)
    _setup(a)
    a.auth_enable()
    wait_for(lambda: b.auth.enabled, what="b to hear of enable")
    heard = []
    b.auth.add_listener(lambda kind, req: heard.append(type(req).__name__))
    b._feed._on_auth = lambda generation: None  # noqa: SLF001 - b looks only when asked
    a.auth_disable()
    a.role_add("x")
    a.auth_enable()
    b.auth_status()  # the embedded read looks at the table
    assert heard == ["AuthDisableRequest", "AuthEnableRequest"]


def test_concurrent_admins_on_two_engines(open_pg):
    """Auth changes from two engines at once: one dense auth revision
    sequence, and both end with the same state."""
    a = open_pg()
    b = open_pg(schema=open_pg.schema)

    def add_roles(engine, prefix):
        for i in range(10):
            engine.role_add(f"{prefix}{i}")

    threads = [threading.Thread(target=add_roles, args=(e, p)) for e, p in ((a, "a"), (b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert a.auth_status().authRevision == b.auth_status().authRevision == 21
    assert list(a.role_list().roles) == list(b.role_list().roles) and len(a.role_list().roles) == 20


# --- served ----------------------------------------------------------------------------


@pytest.fixture
def two_servers(postgres, tmp_path):
    if find_binary("etcdctl") is None:
        pytest.skip("etcdctl not found")
    database = f"m_{uuid.uuid4().hex[:16]}"
    url = postgres.create_database(database) + "?options=-csearch_path%3Detcd"
    servers = []
    try:
        for name in ("s1", "s2"):
            server = MvcckvProcess(tmp_path / name, log_path=tmp_path / f"{name}.log",
                                   extra_args=("--backend", url, "--bcrypt-cost", str(COST)))
            servers.append(server.start())
        yield servers
    finally:
        for server in servers:
            server.stop()
        postgres.drop_database(database)


def test_etcdctl_auth_across_two_servers(two_servers):
    s1, s2 = two_servers
    ctl = s1.etcdctl
    ctl("user", "add", "root:rootpw", json=False)
    ctl("role", "add", "app", json=False)
    ctl("role", "grant-permission", "app", "readwrite", "app/", "--prefix=true", json=False)
    ctl("user", "add", "alice:pw", json=False)
    ctl("user", "grant-role", "alice", "app", json=False)
    ctl("auth", "enable", json=False)

    def as_user(server, user, *args, **kwargs):
        return server.etcdctl(f"--user={user}", *args, **kwargs)

    # Both servers enforce it; s2 heard of it through the database.
    for server in (s1, s2):
        wait_for(lambda: server.etcdctl("get", "x", json=False, check=False).returncode != 0,
                 what=f"{server.endpoint} to refuse an anonymous get")
        as_user(server, "alice:pw", "put", "app/k", "v", json=False)
        with pytest.raises(EtcdctlError) as denied:
            as_user(server, "alice:pw", "put", "other", "v", json=False)
        assert denied.value.message == "etcdserver: permission denied"
    users = as_user(s2, "root:rootpw", "user", "list")["users"]
    assert sorted(users) == ["alice", "root"]

    # A revoke on s2 is enforced on s1.
    as_user(s2, "root:rootpw", "role", "revoke-permission", "app", "app/", "--prefix=true", json=False)
    with pytest.raises(EtcdctlError) as denied:
        as_user(s1, "alice:pw", "put", "app/k", "v2", json=False)
    assert denied.value.message == "etcdserver: permission denied"
    with pytest.raises(EtcdctlError) as denied:
        as_user(s1, "alice:pw", "get", "app/k", json=False)
    assert denied.value.message == "etcdserver: permission denied"
    got = as_user(s1, "root:rootpw", "get", "app/k")
    assert got["kvs"][0]["value"] == "dg=="  # base64 "v": the denied put did nothing

    # Restarted, a server starts with auth on.
    s1.restart()
    with pytest.raises(EtcdctlError) as denied:
        s1.etcdctl("put", "x", "y", json=False)
    assert denied.value.message == "etcdserver: user name is empty"
    as_user(s1, "root:rootpw", "auth", "disable", json=False)
    wait_for(lambda: s2.etcdctl("put", "x", "y", json=False, check=False).returncode == 0,
             what="s2 to hear of auth disable")

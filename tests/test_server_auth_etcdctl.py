"""Auth end to end: etcdctl 3.4's user, role and auth commands against
``mvcckv serve``, side by side with a real etcd.

Every etcdctl command of the flows below runs against mvcckv and against
etcd, and both outputs are reduced to ``(exit code, stdout, the error lines
of stderr)`` (etcdctl's JSON retry warnings dropped, the server's address
replaced; where a step says so, lease IDs, revisions and ``endpoint
status`` figures too).  mvcckv's result is checked against
the expectation written in the test, which is etcd 3.6.14's behaviour, and
etcd's result must equal mvcckv's, except for the steps named in
``ETCD_DIFFERENCES``: answers that changed in etcd after the installed
version, with the older answer and the reason.

Flows, each once over plaintext and once over TLS with client certificates
(``--client-cert-auth``; etcdctl then always shows a certificate, whose
Common Name ``guest`` names no user, so "anonymous" requests are a
stranger's rather than nobody's):

* user and role administration with auth off, then on (``user add`` with
  ``user:password``, ``--interactive=false`` and stdin,
  ``--new-user-password`` and ``--no-password``; ``role grant-permission``
  on a key, ``--prefix``, ``--from-key`` and an explicit range; revokes;
  ``auth enable``/``disable``), and the auth revision through gRPC
  ``AuthStatus`` (etcdctl 3.4 has no ``auth status``);
* get/put/del, interactive txn, watch, leases, compaction, endpoint status
  and snapshot save, as root, as a user with some rights, with bad
  credentials and without any.

Then: a client certificate's Common Name is the user of requests without a
token; and users, roles, permissions and the auth switch survive a graceful
restart, a SIGKILL (WAL replay) and ``etcdctl snapshot save`` +
``mvcckv snapshot restore``.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import grpc
import pytest
import trustme

from harness import FAST_ELECTION, REPO_ROOT, EtcdProcess, MvcckvProcess, find_binary, grpc_channel, stub
from mvcckv.pb import rpc_pb2 as pb

BCRYPT = ("--bcrypt-cost", "4")
"""bcrypt's cheapest cost: the flows hash and check dozens of passwords."""

FAIL_FAST = ("--dial-timeout=3s", "--command-timeout=10s")

ROOT = "root:rootpw"
ALICE = "alice:apw"

EMPTY = "etcdserver: user name is empty"
DENIED = "etcdserver: permission denied"
AUTH_FAILED = "etcdserver: authentication failed, invalid user ID or password"
NOT_FOUND_USER = "etcdserver: user name not found"
INVALID_MGMT = "etcdserver: invalid auth management"
NO_PASSWORD_USER = ("rpc error: code = Unknown desc = "
                    "auth: authentication failed, password was given for no password user")
GUEST = "guest"
"""Common Name of the client certificate etcdctl shows when a TLS step names
no certificate: a user that does not exist."""


# --- certificates -----------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    dir: Path

    def pem(self, name: str) -> str:
        return str(self.dir / f"{name}.pem")

    def key(self, name: str) -> str:
        return str(self.dir / f"{name}.key")

    def server_args(self) -> list[str]:
        return ["--cert-file", self.pem("server"), "--key-file", self.key("server"),
                "--trusted-ca-file", self.pem("ca"), "--client-cert-auth"]

    def client_flags(self, cert: str) -> tuple[str, ...]:
        return ("--cacert", self.pem("ca"), "--cert", self.pem(cert), "--key", self.key(cert))

    def credentials(self, cert: str = GUEST) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=Path(self.pem("ca")).read_bytes(),
            private_key=Path(self.key(cert)).read_bytes(),
            certificate_chain=Path(self.pem(cert)).read_bytes(),
        )


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    """A CA; a server certificate for 127.0.0.1 (an IP SAN: gRPC and Go
    check it); client certificates with Common Names guest, alice, carol,
    root and nobody, and one without a Common Name (file ``no-cn``)."""
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    leaves = {"server": ca.issue_cert("127.0.0.1")}
    for cn in (GUEST, "alice", "carol", "root", "nobody"):
        leaves[cn] = ca.issue_cert(f"{cn}.client.example", common_name=cn)
    leaves["no-cn"] = ca.issue_cert("anonymous.client.example")
    for name, leaf in leaves.items():
        leaf.private_key_pem.write_to_path(str(d / f"{name}.key"))
        leaf.cert_chain_pems[0].write_to_path(str(d / f"{name}.pem"))
    return Pki(d)


# --- running etcdctl ----------------------------------------------------------------


@dataclass(frozen=True)
class Out:
    """What an etcdctl run shows a user: exit code, stdout and the lines of
    stderr that are not etcdctl's JSON log records."""

    code: int
    stdout: str
    errors: tuple[str, ...]


def ok(stdout: str) -> Out:
    return Out(0, stdout, ())


def err(message: str, code: int = 1) -> Out:
    return Out(code, "", (f"Error: {message}",))


_LEASE_ID = re.compile(r"\b[0-9a-f]{16}\b")


def ids(out: Out) -> Out:
    """Lease IDs masked: etcd picks them at random."""
    return Out(out.code, _LEASE_ID.sub("<lease>", out.stdout),
               tuple(_LEASE_ID.sub("<lease>", e) for e in out.errors))


_STATUS_LINE = re.compile(r"<endpoint>, [0-9a-f]+, \d+\.\d+\.\d+, [0-9.]+ [kMG]?B, true, false, 2, \d+, \d+, \n")
STATUS_OK = ok("<endpoint>, <member>, <version>, <size>, true, false, 2, <index>, <index>, \n")
"""``endpoint status`` of a leader with its ID, version, size and raft
indexes left out (they differ between the servers)."""


def status_line(out: Out) -> Out:
    if out.code == 0 and _STATUS_LINE.fullmatch(out.stdout):
        return STATUS_OK
    return out


def compacted(out: Out) -> Out:
    return Out(out.code, re.sub(r"compacted revision \d+", "compacted revision <rev>", out.stdout), out.errors)


class Ctl:
    """etcdctl against one server: its endpoint, plus TLS flags when the
    server wants client certificates."""

    def __init__(self, server, pki: Pki | None = None, workdir: Path | None = None):
        self.server = server
        self.pki = pki
        self.workdir = workdir

    @property
    def tls(self) -> bool:
        return self.pki is not None

    def argv(self, *args: str, user: str | None = None, cert: str | None = None) -> list[str]:
        binary = find_binary("etcdctl")
        assert binary, "etcdctl not found"
        flags: tuple[str, ...] = ()
        if self.pki is not None:
            flags = self.pki.client_flags(cert or GUEST)
        else:
            assert cert is None, "client certificates need a TLS server"
        if user is not None:
            flags += ("--user", user)
        return [binary, f"--endpoints={self.server.endpoint}", *FAIL_FAST, *flags, *args]

    def __call__(self, *args: str, user: str | None = None, cert: str | None = None,
                 input: str | None = None) -> Out:
        proc = subprocess.run(
            self.argv(*args, user=user, cert=cert), input=(input or "").encode(),
            capture_output=True, timeout=60, env=etcdctl_env(), cwd=self.workdir)
        return self.reduce(proc.returncode, proc.stdout, proc.stderr)

    def reduce(self, code: int, stdout: bytes, stderr: bytes) -> Out:
        def clean(text: str) -> str:
            return text.replace(self.server.endpoint, "<endpoint>")

        lines = [clean(line) for line in stderr.decode(errors="replace").splitlines()
                 if line.strip() and not line.startswith("{")]
        return Out(code, clean(stdout.decode(errors="replace")), tuple(lines))

    def ok(self, *args: str, **kwargs) -> str:
        out = self(*args, **kwargs)
        assert out.code == 0, f"etcdctl {' '.join(args)}: {out}"
        return out.stdout


def etcdctl_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL_")}
    env["ETCDCTL_API"] = "3"
    return env


# --- what changed in etcd after the installed version ------------------------------------


@dataclass(frozen=True)
class EtcdDifference:
    """A step whose answer changed in etcd: ``older`` is what etcd without the
    change prints (observed on 3.4.23).  ``since`` names, per release line,
    the first patch release with the new answer; a line not named got it
    with 3.6.0."""

    since: dict[tuple[int, int], int]
    why: str
    older: object  # an Out, or a gRPC outcome (see Pair.grpc)
    older_tls: object | None = None
    """The older answer over TLS, when the stranger's certificate changes it."""

    def applies(self, version: tuple[int, int, int]) -> bool:
        line = version[:2]
        if line in self.since:
            return version[2] < self.since[line]
        return line < (3, 6)


COMPACT_ADMIN = {(3, 4): 42, (3, 5): 28, (3, 6): 9}
LEASE_NEEDS_USER = {(3, 4): 42, (3, 5): 28, (3, 6): 9}
STATUS_NEEDS_USER = {(3, 5): 32, (3, 6): 12}
MAINTENANCE_MAPPED: dict[tuple[int, int], int] = {}


NO_AUTH_STATUS = ("UNIMPLEMENTED", "unknown method AuthStatus for service etcdserverpb.Auth")


def _unknown(message: str, code: int = 1) -> Out:
    return err(f"rpc error: code = Unknown desc = {message}", code)


ETCD_DIFFERENCES: dict[str, EtcdDifference] = {
    "grant-permission [/b, /a)": EtcdDifference(
        {(3, 4): 25, (3, 5): 8},
        "Permission ranges were not checked: an empty or reversed range was stored.",
        ok("Role app updated\n")),
    "root gets role root": EtcdDifference(
        {}, "RoleGet of role root listed no permissions; 3.6 shows its implicit READWRITE on all keys.",
        ok("Role root\nKV Read:\nKV Write:\n")),
    **{label: EtcdDifference({(3, 5): 0}, "AuthStatus is new in 3.5.", NO_AUTH_STATUS)
       for label in ("AuthStatus as root", "AuthStatus as alice", "AuthStatus without user")},
    "compaction as alice": EtcdDifference(
        COMPACT_ADMIN, "Compact had no permission check.", ok("compacted revision <rev>\n")),
    "compaction without user": EtcdDifference(
        COMPACT_ADMIN, "Compact had no permission check.", ok("compacted revision <rev>\n")),
    "lease grant without user": EtcdDifference(
        LEASE_NEEDS_USER, "LeaseGrant needed no token.",
        ok("lease <lease> granted with TTL(600s)\n")),
    "endpoint status without user": EtcdDifference(STATUS_NEEDS_USER, "Status answered anyone.", STATUS_OK),
    "snapshot save as alice": EtcdDifference(
        MAINTENANCE_MAPPED,
        "Snapshot returned the auth package's error, sent as code Unknown with an 'auth: ' text.",
        _unknown("auth: permission denied", 5)),
    "snapshot save without user": EtcdDifference(
        MAINTENANCE_MAPPED,
        "Snapshot returned the auth package's error, sent as code Unknown with an 'auth: ' text.",
        _unknown("auth: user name is empty", 5), _unknown("auth: user not found", 5)),
}


def etcd_version(ctl: Ctl) -> tuple[int, int, int]:
    with ctl.server.channel() as ch:
        version = stub(ch, "Maintenance").Status(pb.StatusRequest(), timeout=10,
                                                 metadata=token_metadata(ch, ROOT)).version
    major, minor, patch = (int(part) for part in version.split(".")[:3])
    return major, minor, patch


def token_metadata(channel: grpc.Channel, user: str) -> tuple[tuple[str, str], ...]:
    """A token for ``user`` ("name:password") when auth is on; no metadata
    when it is off."""
    name, _, password = user.partition(":")
    try:
        token = stub(channel, "Auth").Authenticate(
            pb.AuthenticateRequest(name=name, password=password), timeout=10).token
    except grpc.RpcError as e:
        if e.details() == "etcdserver: authentication is not enabled":
            return ()
        raise
    return (("token", token),)


# --- mvcckv and etcd side by side ---------------------------------------------------------


@dataclass
class Pair:
    """Each step runs on mvcckv, then on etcd; the step returns mvcckv's
    result, and etcd's must equal it (or the older answer of an
    ``ETCD_DIFFERENCES`` entry)."""

    mvcckv: Ctl
    etcd: Ctl
    version: tuple[int, int, int] | None = None
    steps: int = 0
    differences_seen: set[str] = field(default_factory=set)

    @property
    def tls(self) -> bool:
        return self.mvcckv.tls

    def __call__(self, label: str, *args: str, normalize: Callable[[Out], Out] | None = None,
                 **kwargs) -> Out:
        mine = self.mvcckv(*args, **kwargs)
        theirs = self.etcd(*args, **kwargs)
        if normalize is not None:
            mine, theirs = normalize(mine), normalize(theirs)
        return self.compare(label, mine, theirs)

    def grpc(self, label: str, call: Callable[[grpc.Channel, tuple], object], *,
             user: str | None = None) -> tuple[str, object]:
        """``call(channel, metadata)`` on both servers, as ``("OK", what it
        returned)`` or ``(status code name, details)``; compared like a step."""
        outcomes = []
        for ctl in (self.mvcckv, self.etcd):
            with ctl.server.channel() as ch:
                md = token_metadata(ch, user) if user else ()
                try:
                    outcomes.append(("OK", call(ch, md)))
                except grpc.RpcError as e:
                    outcomes.append((e.code().name, e.details()))
        return self.compare(label, *outcomes)

    def compare(self, label: str, mine, theirs):
        self.steps += 1
        difference = ETCD_DIFFERENCES.get(label)
        if difference is not None and difference.applies(self.etcd_version()):
            self.differences_seen.add(label)
            older = difference.older_tls if self.tls and difference.older_tls else difference.older
            assert theirs == older, f"{label}: etcd gave {theirs} (expected the older answer)"
        else:
            assert theirs == mine, f"{label}: etcd and mvcckv differ\n  etcd:   {theirs}\n  mvcckv: {mine}"
        return mine

    def etcd_version(self) -> tuple[int, int, int]:
        if self.version is None:
            self.version = etcd_version(self.etcd)
        return self.version


def start_pair(tmp_path: Path, pki: Pki | None, *, mvcckv_args=(), data_dir: Path | None = None):
    """An mvcckv and an etcd, both over TLS with client-cert auth when
    ``pki`` is given; the caller stops them."""
    tls_args = pki.server_args() if pki else []
    creds = pki.credentials() if pki else None
    mvcckv = MvcckvProcess(data_dir or tmp_path / "mvcckv-data", log_path=tmp_path / "mvcckv.log",
                           extra_args=[*BCRYPT, *tls_args, *mvcckv_args], channel_credentials=creds)
    etcd = EtcdProcess(extra_args=[*FAST_ELECTION, *tls_args], channel_credentials=creds)
    mvcckv.start()
    try:
        etcd.start()
    except BaseException:
        mvcckv.stop()
        raise
    return mvcckv, etcd


@pytest.fixture(params=["plain", "tls"])
def pair(request, tmp_path, etcd_binary):
    pki = request.getfixturevalue("pki") if request.param == "tls" else None
    mvcckv, etcd = start_pair(tmp_path, pki)
    (tmp_path / "m").mkdir()
    (tmp_path / "e").mkdir()
    try:
        yield Pair(Ctl(mvcckv, pki, tmp_path / "m"), Ctl(etcd, pki, tmp_path / "e"))
    finally:
        etcd.stop()
        mvcckv.stop()


def auth_status(server, user: str | None = ROOT) -> tuple[bool, int]:
    with server.channel() as ch:
        md = token_metadata(ch, user) if user else ()
        st = stub(ch, "Auth").AuthStatus(pb.AuthStatusRequest(), timeout=10, metadata=md)
    return st.enabled, st.authRevision


def anonymous(p: Pair, message: str) -> Out:
    """What a request without credentials gets when the server needs a user
    for it: over plaintext nobody asked (user name is empty); over TLS the
    certificate's Common Name ``guest`` asked, a user that does not exist,
    which data requests refuse as permission denied and admin requests as
    user not found (etcd's isOpPermitted and IsAdminPermitted)."""
    if not p.tls:
        return err(EMPTY)
    return err({"data": DENIED, "admin": NOT_FOUND_USER}[message])


# --- watch ----------------------------------------------------------------------------------


WATCH_WAIT = 15.0


def watch(ctl: Ctl, *args: str, user: str | None = None, then: Callable[[], object] | None = None,
          lines: int = 0) -> Out:
    """Run ``etcdctl watch`` until it prints ``lines`` lines (then SIGKILL it,
    code -9) or exits by itself; ``then`` runs once it has started."""
    proc = subprocess.Popen(ctl.argv(*args, user=user), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=etcdctl_env())
    stdout = b""
    try:
        if then is not None:
            then()
        deadline = time.monotonic() + WATCH_WAIT
        while time.monotonic() < deadline:
            if lines and stdout.count(b"\n") >= lines:
                proc.kill()
                break
            ready, _, _ = select.select([proc.stdout], [], [], 0.1)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                stdout += chunk
            elif proc.poll() is not None:
                break
        else:
            raise AssertionError(f"watch still running after {WATCH_WAIT} s; printed {stdout!r}")
        rest, stderr = proc.communicate(timeout=WATCH_WAIT)
        return ctl.reduce(proc.returncode, stdout + rest, stderr)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=WATCH_WAIT)


# --- users and roles ---------------------------------------------------------------------------


def test_user_and_role_commands(pair: Pair):
    p = pair
    m = p.mvcckv.server
    assert auth_status(m, None) == (False, 1)

    # Auth off: anybody administers.
    assert p("enable, no root", "auth", "enable") == err("etcdserver: root user does not exist")
    assert p("add root, stdin", "user", "add", "root", "--interactive=false",
             input="rootpw\n") == ok("User root created\n")
    assert p("add root again", "user", "add", ROOT) == err("etcdserver: user name already exists")
    assert p("add alice, flag", "user", "add", "alice", "--interactive=false",
             "--new-user-password=apw") == ok("User alice created\n")
    assert p("add bob", "user", "add", "bob:bpw") == ok("User bob created\n")
    assert p("add carol, no password", "user", "add", "carol", "--no-password") == ok("User carol created\n")
    assert p("user get alice", "user", "get", "alice") == ok("User: alice\nRoles:\n")
    assert p("user get unknown", "user", "get", "nobody") == err(NOT_FOUND_USER)
    assert p("user list", "user", "list") == ok("alice\nbob\ncarol\nroot\n")

    assert p("role add app", "role", "add", "app") == ok("Role app created\n")
    assert p("role add app again", "role", "add", "app") == err("etcdserver: role name already exists")
    assert p("role add ops", "role", "add", "ops") == ok("Role ops created\n")
    granted = ok("Role app updated\n")
    assert p("grant key", "role", "grant-permission", "app", "read", "/cfg") == granted
    assert p("grant prefix", "role", "grant-permission", "app", "readwrite", "/app/", "--prefix") == granted
    assert p("grant from-key", "role", "grant-permission", "app", "write", "~", "--from-key") == granted
    assert p("grant range", "role", "grant-permission", "app", "readwrite", "/r/a", "/r/m") == granted
    assert p("grant-permission [/b, /a)", "role", "grant-permission", "app", "readwrite", "/b", "/a") \
        == err(INVALID_MGMT)
    assert p("grant to unknown role", "role", "grant-permission", "nope", "read", "/x") \
        == err("etcdserver: role name not found")
    assert p("grant bad type", "role", "grant-permission", "app", "bogus", "/x") \
        == err("invalid permission type: bogus", 128)
    if "grant-permission [/b, /a)" in p.differences_seen:
        # Older etcd stored the reversed range; drop it so the roles match.
        assert p.etcd("role", "revoke-permission", "app", "/b", "/a").code == 0
    app_role = ("Role app\n"
                "KV Read:\n\t[/app/, /app0) (prefix /app/)\n\t/cfg\n\t[/r/a, /r/m)\n"
                "KV Write:\n\t[/app/, /app0) (prefix /app/)\n\t[/r/a, /r/m)\n\t[~, <open ended>\n")
    assert p("role get app", "role", "get", "app") == ok(app_role)
    assert p("role get unknown", "role", "get", "nope") == err("etcdserver: role name not found")
    assert p("role list", "role", "list") == ok("app\nops\n")

    # Revoking: a key, a prefix, a range from a key, an explicit range.
    for args in (("read", "/k1"), ("read", "/ops/", "--prefix"), ("read", "~", "--from-key"),
                 ("write", "k1", "k5")):
        assert p(f"grant ops {args}", "role", "grant-permission", "ops", *args) == ok("Role ops updated\n")
    assert p("revoke key", "role", "revoke-permission", "ops", "/k1") \
        == ok("Permission of key /k1 is revoked from role ops\n")
    assert p("revoke prefix", "role", "revoke-permission", "ops", "/ops/", "--prefix") \
        == ok("Permission of range [/ops/, /ops0) is revoked from role ops\n")
    assert p("revoke from-key", "role", "revoke-permission", "ops", "~", "--from-key") \
        == ok("Permission of range [~, <open ended> is revoked from role ops\n")
    assert p("revoke range", "role", "revoke-permission", "ops", "k1", "k5") \
        == ok("Permission of range [k1, k5) is revoked from role ops\n")
    assert p("revoke again", "role", "revoke-permission", "ops", "k1", "k5") \
        == err("etcdserver: permission is not granted to the role")
    assert p("role get ops", "role", "get", "ops") == ok("Role ops\nKV Read:\nKV Write:\n")

    assert p("grant role", "user", "grant-role", "alice", "app") == ok("Role app is granted to user alice\n")
    assert p("grant unknown role", "user", "grant-role", "alice", "nope") \
        == err("etcdserver: role name not found")
    assert p("grant role to unknown", "user", "grant-role", "nobody", "app") == err(NOT_FOUND_USER)
    assert p("grant ops to bob", "user", "grant-role", "bob", "ops") == ok("Role ops is granted to user bob\n")
    assert p("revoke role", "user", "revoke-role", "bob", "ops") == ok("Role ops is revoked from user bob\n")
    assert p("revoke role again", "user", "revoke-role", "bob", "ops") \
        == err("etcdserver: role is not granted to the user")
    assert p("grant app to carol", "user", "grant-role", "carol", "app").code == 0
    assert p("user get --detail", "user", "get", "alice", "--detail") \
        == ok("User: alice\n\n" + app_role)
    assert p("passwd bob", "user", "passwd", "bob", "--interactive=false", input="bpw2\n") \
        == ok("Password updated\n")
    assert p("delete bob", "user", "delete", "bob") == ok("User bob deleted\n")
    assert p("delete bob again", "user", "delete", "bob") == err(NOT_FOUND_USER)
    assert p("delete ops", "role", "delete", "ops") == ok("Role ops deleted\n")
    assert p("delete ops again", "role", "delete", "ops") == err("etcdserver: role name not found")

    # Enabling needs root with role root; etcdctl 3.4 creates role root
    # itself when it is missing, and then fails on the grant it does not make.
    assert p("role add root", "role", "add", "root") == ok("Role root created\n")
    assert p("enable, root lacks role", "auth", "enable") == err("etcdserver: role name already exists")
    assert p("grant root", "user", "grant-role", "root", "root") == ok("Role root is granted to user root\n")
    revision_before = auth_status(m, None)[1]
    assert p("enable", "auth", "enable") == ok("Authentication Enabled\n")
    # etcd's AuthEnable commits no new auth revision (AuthDisable does).
    assert auth_status(m) == (True, revision_before)

    # Auth on.
    assert p("enable again, no user", "auth", "enable") == anonymous(p, "admin")
    assert p("enable again as root", "auth", "enable", user=ROOT) == ok("Authentication Enabled\n")
    assert p("user list, no user", "user", "list") == anonymous(p, "admin")
    assert p("user list as alice", "user", "list", user=ALICE) == err(DENIED)
    assert p("user list as root", "user", "list", user=ROOT) == ok("alice\ncarol\nroot\n")
    assert p("role list as root", "role", "list", user=ROOT) == ok("app\nroot\n")
    assert p("alice gets herself", "user", "get", "alice", user=ALICE) == ok("User: alice\nRoles: app\n")
    assert p("alice gets root", "user", "get", "root", user=ALICE) == err(DENIED)
    assert p("alice gets her role", "role", "get", "app", user=ALICE) == ok(app_role)
    assert p("alice gets role root", "role", "get", "root", user=ALICE) == err(DENIED)
    assert p("root gets role root", "role", "get", "root", user=ROOT) \
        == ok("Role root\nKV Read:\n\t[, <open ended> (prefix )\nKV Write:\n\t[, <open ended> (prefix )\n")
    def status(ch, md):
        st = stub(ch, "Auth").AuthStatus(pb.AuthStatusRequest(), timeout=10, metadata=md)
        return st.enabled

    assert p.grpc("AuthStatus as root", status, user=ROOT) == ("OK", True)
    assert p.grpc("AuthStatus as alice", status, user=ALICE) == ("PERMISSION_DENIED", DENIED)
    assert p.grpc("AuthStatus without user", status) == (
        ("FAILED_PRECONDITION", NOT_FOUND_USER) if p.tls else ("INVALID_ARGUMENT", EMPTY))
    assert p("role add as alice", "role", "add", "x", user=ALICE) == err(DENIED)
    assert p("user add as alice", "user", "add", "x:y", user=ALICE) == err(DENIED)
    assert p("user get with --password", "--password", "apw", "user", "get", "alice",
             user="alice") == ok("User: alice\nRoles: app\n")
    assert p("wrong password", "get", "/app/k", user="alice:wrong") == err(AUTH_FAILED, 2)
    assert p("unknown user", "get", "/app/k", user="nobody:pw") == err(AUTH_FAILED, 2)
    assert p("password for no-password user", "get", "/app/k", user="carol:pw") == err(NO_PASSWORD_USER, 2)
    assert p("delete root", "user", "delete", "root", user=ROOT) == err(INVALID_MGMT)
    assert p("delete role root", "role", "delete", "root", user=ROOT) == err(INVALID_MGMT)
    assert p("revoke root from root", "user", "revoke-role", "root", "root", user=ROOT) == err(INVALID_MGMT)

    # A changed password: the old one stops working at once.
    revision_before = auth_status(m)[1]
    assert p("passwd alice", "user", "passwd", "alice", "--interactive=false", user=ROOT,
             input="apw2\n") == ok("Password updated\n")
    assert auth_status(m)[1] == revision_before + 1
    assert p("old password", "get", "/cfg", user=ALICE) == err(AUTH_FAILED, 2)
    assert p("new password", "get", "/cfg", user="alice:apw2") == ok("")
    assert p("revoke /cfg", "role", "revoke-permission", "app", "/cfg", user=ROOT).code == 0
    assert p("revoked read", "get", "/cfg", user="alice:apw2") == err(DENIED)
    assert p("user add while on", "user", "add", "dave:dpw", user=ROOT) == ok("User dave created\n")

    assert p("disable as alice", "auth", "disable", user="alice:apw2") == err(DENIED)
    assert p("disable, no user", "auth", "disable") == anonymous(p, "admin")
    revision_before = auth_status(m)[1]
    assert p("disable", "auth", "disable", user=ROOT) == ok("Authentication Disabled\n")
    assert auth_status(m, None) == (False, revision_before + 1)

    # Auth off again: no credentials needed, and etcdctl 3.4 ignores that
    # it could not log in (it only warns).
    assert p("get, auth off", "get", "/cfg") == ok("")
    assert p("get with user, auth off", "get", "/cfg", user="alice:apw2") == ok("")
    assert p("user list, auth off", "user", "list") == ok("alice\ncarol\ndave\nroot\n")
    assert p.steps >= 70


# --- data, leases, watch and maintenance under auth ---------------------------------------


def setup_users(p: Pair) -> None:
    """root; alice with READWRITE on /app/ and READ on /ro/; auth on."""
    for args in (("user", "add", ROOT), ("user", "grant-role", "root", "root"),
                 ("user", "add", ALICE), ("role", "add", "app"),
                 ("role", "grant-permission", "app", "readwrite", "/app/", "--prefix"),
                 ("role", "grant-permission", "app", "read", "/ro/", "--prefix"),
                 ("user", "grant-role", "alice", "app"),
                 ("put", "/ro/k", "ro-v"), ("put", "/secret", "s"),
                 ("auth", "enable")):
        assert p(f"setup {args}", *args).code == 0


def revision_of(ctl: Ctl) -> int:
    out = ctl("get", "-w", "json", "/", user=ROOT)
    assert out.code == 0, out
    return json.loads(out.stdout)["header"]["revision"]


def test_data_leases_watch_and_maintenance(pair: Pair):
    p = pair
    setup_users(p)
    anon_data = anonymous(p, "data")

    # get / put / del
    assert p("get, no user", "get", "/app/k") == anon_data
    assert p("put, no user", "put", "/app/k", "v") == anon_data
    assert p("put as alice", "put", "/app/k", "v1", user=ALICE) == ok("OK\n")
    assert p("put as alice, --password", "--password", "apw", "put", "/app/k2", "v2", user="alice") == ok("OK\n")
    assert p("get as alice", "get", "/app/k", user=ALICE) == ok("/app/k\nv1\n")
    assert p("get prefix as alice", "get", "/app/", "--prefix", user=ALICE) == ok("/app/k\nv1\n/app/k2\nv2\n")
    assert p("get read-only", "get", "/ro/k", user=ALICE) == ok("/ro/k\nro-v\n")
    assert p("put read-only", "put", "/ro/k", "x", user=ALICE) == err(DENIED)
    assert p("get secret", "get", "/secret", user=ALICE) == err(DENIED)
    assert p("get all keys", "get", "", "--from-key", user=ALICE) == err(DENIED)
    assert p("put prev-kv on /app/", "put", "/app/k", "v3", "--prev-kv", user=ALICE) == ok("OK\n/app/k\nv1\n")
    assert p("get secret as root", "get", "/secret", user=ROOT) == ok("/secret\ns\n")
    assert p("bad password", "get", "/app/k", user="alice:nope") == err(AUTH_FAILED, 2)
    assert p("del secret", "del", "/secret", user=ALICE) == err(DENIED)
    assert p("del prefix, part denied", "del", "/", "--prefix", user=ALICE) == err(DENIED)
    assert p("del /app/k2", "del", "/app/k2", user=ALICE) == ok("1\n")
    assert p("del, no user", "del", "/app/k") == anon_data

    # Interactive txn: compares, success ops, failure ops on stdin.
    assert p("txn put", "txn", user=ALICE, input='value("/ro/k") = "ro-v"\n\nput /app/t1 a\n\n\n') \
        == ok("SUCCESS\n\nOK\n")
    assert p("txn failure branch", "txn", user=ALICE,
             input='value("/ro/k") = "other"\n\nput /app/t2 b\n\nget /app/t1\n\n') \
        == ok("FAILURE\n\n/app/t1\na\n")
    assert p("txn else-branch denied", "txn", user=ALICE,
             input='value("/ro/k") = "ro-v"\n\nput /app/t3 c\n\nput /secret x\n\n') == err(DENIED)
    assert p("txn compare denied", "txn", user=ALICE,
             input='value("/secret") = "s"\n\nput /app/t4 d\n\n\n') == err(DENIED)
    assert p("txn write read-only", "txn", user=ALICE, input='\nput /ro/k x\n\n\n') == err(DENIED)
    assert p("txn, no user", "txn", input="\nput /app/t5 e\n\n\n") == anon_data
    assert p("txn results", "get", "/app/t", "--prefix", "--keys-only", user=ALICE) == ok("/app/t1\n\n")

    # Watch: a live event for alice, a cancel for what she may not read.
    rev = revision_of(p.mvcckv)
    assert revision_of(p.etcd) == rev
    for ctl in (p.mvcckv, p.etcd):
        got = watch(ctl, "watch", "--rev", str(rev + 1), "/app/w", user=ALICE,
                    then=lambda c=ctl: c.ok("put", "/app/w", "live", user=ALICE), lines=3)
        assert got == Out(-9, "PUT\n/app/w\nlive\n", ()), ctl.server.name
    denied = {ctl.server.name: watch(ctl, "watch", "/secret", user=ALICE) for ctl in (p.mvcckv, p.etcd)}
    assert denied["etcd"] == Out(5, "", (
        "watch was canceled (rpc error: code = PermissionDenied desc = etcdserver: permission denied)",
        "Error: watch is canceled by the server"))
    assert denied["mvcckv"] == denied["etcd"]
    nobody = {ctl.server.name: watch(ctl, "watch", "/app/w") for ctl in (p.mvcckv, p.etcd)}
    if not p.tls:
        assert nobody["etcd"].errors[0] == (
            "watch was canceled (rpc error: code = InvalidArgument desc = etcdserver: user name is empty)")
    assert nobody["mvcckv"] == nobody["etcd"]

    # Leases (IDs differ between the servers: compared as <lease>).
    grant = p("lease grant as alice", "lease", "grant", "600", user=ALICE, normalize=ids)
    assert grant == ok("lease <lease> granted with TTL(600s)\n")
    assert p("lease grant without user", "lease", "grant", "600", normalize=ids) == (
        ok("lease <lease> granted with TTL(600s)\n") if p.tls else err(f"failed to grant lease ({EMPTY})"))
    leases = {}
    for ctl in (p.mvcckv, p.etcd):
        lease = _LEASE_ID.search(ctl.ok("lease", "grant", "600", user=ALICE)).group()
        ctl.ok("put", "/app/leased", "v", "--lease", lease, user=ALICE)
        leases[ctl.server.name] = lease

    def each_lease(label, *args, **kwargs) -> Out:
        outs = {}
        for ctl in (p.mvcckv, p.etcd):
            lease = leases[ctl.server.name]
            outs[ctl.server.name] = ids(ctl(*(lease if a == "<lease>" else a for a in args), **kwargs))
        assert outs["etcd"] == outs["mvcckv"], f"{label}: {outs}"
        p.steps += 1
        return outs["mvcckv"]

    remaining = re.compile(r"remaining\(\d+s\)")
    ttl = each_lease("timetolive --keys", "lease", "timetolive", "<lease>", "--keys", user=ALICE)
    assert remaining.sub("remaining(N)", ttl.stdout) == \
        "lease <lease> granted with TTL(600s), remaining(N), attached keys([/app/leased])\n"
    assert each_lease("keep-alive --once", "lease", "keep-alive", "--once", "<lease>", user=ALICE) \
        == ok("lease <lease> keepalived with TTL(600)\n")
    assert each_lease("revoke", "lease", "revoke", "<lease>", user=ALICE) == ok("lease <lease> revoked\n")
    assert each_lease("timetolive revoked", "lease", "timetolive", "<lease>", "--keys", user=ALICE) \
        == ok("lease <lease> already expired\n")
    assert p("leased key gone", "get", "/app/leased", user=ALICE) == ok("")
    assert p("revoke unknown", "lease", "revoke", "1234", user=ALICE) \
        == err("failed to revoke lease (etcdserver: requested lease not found)")
    # A lease holding a key alice cannot write: she may not renew or revoke it.
    for ctl in (p.mvcckv, p.etcd):
        lease = _LEASE_ID.search(ctl.ok("lease", "grant", "600", user=ROOT)).group()
        ctl.ok("put", "/secret", "leased", "--lease", lease, user=ROOT)
        leases[ctl.server.name] = lease
    assert each_lease("revoke root's lease", "lease", "revoke", "<lease>", user=ALICE) \
        == err(f"failed to revoke lease ({DENIED})")
    assert each_lease("revoke as root", "lease", "revoke", "<lease>", user=ROOT) == ok("lease <lease> revoked\n")

    # Compaction is an admin request.
    rev = revision_of(p.mvcckv)
    assert revision_of(p.etcd) == rev
    # Each at its own revision, so that a server letting one through does
    # not change the answer to the next.
    assert p("compaction as alice", "compaction", str(rev - 4), user=ALICE, normalize=compacted) == err(DENIED)
    assert p("compaction without user", "compaction", str(rev - 3), normalize=compacted) \
        == anonymous(p, "admin")
    out = p("compaction as root", "compaction", str(rev - 2), user=ROOT)
    assert out == ok(f"compacted revision {rev - 2}\n")
    assert p("get compacted", "get", "/app/k", "--rev", str(rev - 3), user=ROOT) \
        == err("etcdserver: mvcc: required revision has been compacted")

    # endpoint status needs some user; snapshots need root.
    assert p("endpoint status as alice", "endpoint", "status", user=ALICE, normalize=status_line) == STATUS_OK
    # Any identity will do: over TLS the stranger's certificate is one.
    assert p("endpoint status without user", "endpoint", "status", normalize=status_line) == (
        STATUS_OK if p.tls else Out(1, "", (f"Failed to get the status of endpoint <endpoint> ({EMPTY})",)))
    assert p("snapshot save as alice", "snapshot", "save", "snap.db", user=ALICE) \
        == err(DENIED, 5)
    assert p("snapshot save without user", "snapshot", "save", "snap.db") \
        == Out(5, "", anonymous(p, "admin").errors)
    assert p("snapshot save as root", "snapshot", "save", "snap.db", user=ROOT) \
        == ok("Snapshot saved at snap.db\n")
    for ctl in (p.mvcckv, p.etcd):
        assert (ctl.workdir / "snap.db").stat().st_size % 512 == 32
    assert p.steps >= 50


# --- client certificates -------------------------------------------------------------------


@pytest.fixture
def tls_pair(tmp_path, pki, etcd_binary):
    mvcckv, etcd = start_pair(tmp_path, pki)
    try:
        yield Pair(Ctl(mvcckv, pki), Ctl(etcd, pki))
    finally:
        etcd.stop()
        mvcckv.stop()


def test_client_certificate_common_name_is_the_user(tls_pair: Pair):
    """With --client-cert-auth, a request without a token is the user its
    certificate names: alice's certificate reads what alice may read, carol
    (a user without password) can only get in this way, root's certificate
    administers; a token, when given, wins over the certificate."""
    p = tls_pair
    setup_users(p)
    for args in (("user", "add", "carol", "--no-password"), ("user", "grant-role", "carol", "app")):
        assert p(f"setup {args}", *args, user=ROOT).code == 0

    assert p("alice's cert puts", "put", "/app/k", "v", cert="alice") == ok("OK\n")
    assert p("alice's cert gets", "get", "/app/k", cert="alice") == ok("/app/k\nv\n")
    assert p("alice's cert, secret", "get", "/secret", cert="alice") == err(DENIED)
    assert p("alice's cert, herself", "user", "get", "alice", cert="alice") == ok("User: alice\nRoles: app\n")
    assert p("alice's cert, user list", "user", "list", cert="alice") == err(DENIED)
    assert p("carol's cert", "get", "/app/k", cert="carol") == ok("/app/k\nv\n")
    assert p("carol's cert, password", "get", "/app/k", cert="carol", user="carol:pw") \
        == err(NO_PASSWORD_USER, 2)
    assert p("root's cert, user list", "user", "list", cert="root") == ok("alice\ncarol\nroot\n")
    assert p("root's cert, secret", "get", "/secret", cert="root") == ok("/secret\ns\n")
    assert p("unknown user's cert", "get", "/app/k", cert="nobody") == err(DENIED)
    assert p("unknown user's cert, admin", "user", "list", cert="nobody") == err(NOT_FOUND_USER)
    assert p("unknown user's cert, status", "endpoint", "status", cert="nobody",
             normalize=status_line) == STATUS_OK
    # A token beats the certificate, in both directions.
    assert p("alice's cert, root's token", "get", "/secret", cert="alice", user=ROOT) == ok("/secret\ns\n")
    assert p("root's cert, alice's token", "get", "/secret", cert="root", user=ALICE) == err(DENIED)
    assert p("root's cert, bad password", "get", "/secret", cert="root", user="root:nope") \
        == err(AUTH_FAILED, 2)

    # Over gRPC: a token once given is never ignored, even next to root's
    # certificate.
    outcomes = {}
    for ctl in (p.mvcckv, p.etcd):
        for cert, token in (("root", None), ("root", "garbage.1"), ("alice", None)):
            with grpc_channel(ctl.server.endpoint, credentials=ctl.pki.credentials(cert)) as ch:
                try:
                    resp = stub(ch).Range(pb.RangeRequest(key=b"/secret"), timeout=10,
                                          metadata=(("token", token),) if token else ())
                    got = ("OK", [kv.value for kv in resp.kvs])
                except grpc.RpcError as e:
                    got = (e.code().name, e.details())
            outcomes[ctl.server.name, cert, token] = got
    assert outcomes["mvcckv", "root", None] == ("OK", [b"s"])
    assert outcomes["mvcckv", "root", "garbage.1"] == ("UNAUTHENTICATED", "etcdserver: invalid auth token")
    assert outcomes["mvcckv", "alice", None] == ("PERMISSION_DENIED", DENIED)
    assert {k[1:]: v for k, v in outcomes.items() if k[0] == "etcd"} \
        == {k[1:]: v for k, v in outcomes.items() if k[0] == "mvcckv"}


def test_a_certificate_without_common_name_is_the_empty_user(tls_pair: Pair):
    """etcd takes the Common Name of any verified client certificate as the
    user, even an empty one: data requests then fail as for an unknown user
    (permission denied), admin requests with "user name is empty", and
    requests that need just some identity pass (etcd's isOpPermitted,
    IsAdminPermitted and requireAuthInfo)."""
    p = tls_pair
    setup_users(p)
    assert p("no CN, get", "get", "/app/k", cert="no-cn") == err(DENIED)
    assert p("no CN, user list", "user", "list", cert="no-cn") == err(EMPTY)
    assert p("no CN, status", "endpoint", "status", cert="no-cn", normalize=status_line) == STATUS_OK


# --- persistence -----------------------------------------------------------------------------


def auth_state(ctl: Ctl) -> dict:
    """Everything root can read about users, roles and the auth switch, and
    how logging in goes for each kind of user."""
    users = ctl.ok("user", "list", user=ROOT).split()
    roles = ctl.ok("role", "list", user=ROOT).split()
    return {
        "status": auth_status(ctl.server),
        "users": {u: ctl.ok("user", "get", u, "--detail", user=ROOT) for u in users},
        "roles": {r: ctl.ok("role", "get", r, user=ROOT) for r in roles},
        "anonymous": ctl("get", "/app/k"),
        "carol with a password": ctl("get", "/app/k", user="carol:pw"),
    }


def test_auth_survives_restart_kill_and_snapshot_restore(tmp_path):
    srv = MvcckvProcess(tmp_path / "data", log_path=tmp_path / "mvcckv.log", extra_args=BCRYPT)
    restored = MvcckvProcess(tmp_path / "restored", log_path=tmp_path / "restored.log", extra_args=BCRYPT)
    with srv:
        ctl = Ctl(srv, workdir=tmp_path)
        for args in (("user", "add", ROOT), ("role", "add", "root"), ("user", "grant-role", "root", "root"),
                     ("user", "add", ALICE), ("user", "add", "carol", "--no-password"),
                     ("role", "add", "app"), ("role", "add", "ops"),
                     ("role", "grant-permission", "app", "readwrite", "/app/", "--prefix"),
                     ("role", "grant-permission", "app", "read", "/cfg"),
                     ("role", "grant-permission", "app", "write", "~", "--from-key"),
                     ("role", "grant-permission", "ops", "readwrite", "/r/a", "/r/m"),
                     ("user", "grant-role", "alice", "app"), ("user", "grant-role", "carol", "ops"),
                     ("put", "/app/k", "v"), ("auth", "enable")):
            ctl.ok(*args)
        state = auth_state(ctl)
        assert state["status"][0] is True
        assert state["anonymous"] == err(EMPTY)
        assert state["carol with a password"] == err(NO_PASSWORD_USER, 2)
        assert ctl("get", "/app/k", user=ALICE) == ok("/app/k\nv\n")
        with srv.channel() as ch:
            token = token_metadata(ch, ALICE)

        srv.restart()
        assert auth_state(ctl) == state
        assert ctl("get", "/app/k", user=ALICE) == ok("/app/k\nv\n")
        # Simple tokens live in memory: a restart ends them, as in etcd.
        with srv.channel() as ch, pytest.raises(grpc.RpcError) as info:
            stub(ch).Range(pb.RangeRequest(key=b"/app/k"), timeout=10, metadata=token)
        assert (info.value.code(), info.value.details()) == (grpc.StatusCode.UNAUTHENTICATED,
                                                             "etcdserver: invalid auth token")

        # Changes made just before a crash come back from the WAL.
        for args in (("user", "add", "late:latepw"), ("user", "grant-role", "late", "ops"),
                     ("role", "grant-permission", "app", "read", "/late/", "--prefix"),
                     ("role", "revoke-permission", "app", "/cfg"), ("user", "revoke-role", "carol", "ops")):
            ctl.ok(*args, user=ROOT)
        ctl.ok("user", "passwd", "alice", "--interactive=false", user=ROOT, input="apw2\n")
        changed = auth_state(ctl)
        assert changed != state and changed["status"][1] == state["status"][1] + 6
        srv.restart(kill=True)
        assert auth_state(ctl) == changed
        assert ctl("get", "/app/k", user=ALICE) == err(AUTH_FAILED, 2)
        assert ctl("get", "/app/k", user="alice:apw2") == ok("/app/k\nv\n")
        assert ctl("get", "/r/a", user="late:latepw") == ok("")

        assert ctl("snapshot", "save", "snap.db", user="alice:apw2") == err(DENIED, 5)
        assert ctl.ok("snapshot", "save", "snap.db", user=ROOT) == "Snapshot saved at snap.db\n"

    proc = subprocess.run(
        [sys.executable, "-m", "mvcckv", "snapshot", "restore", str(tmp_path / "snap.db"),
         "--data-dir", str(tmp_path / "restored")],
        capture_output=True, timeout=60, cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert proc.returncode == 0, proc.stderr.decode()
    with restored:
        ctl = Ctl(restored)
        assert auth_state(ctl) == changed
        assert ctl("get", "/app/k", user="alice:apw2") == ok("/app/k\nv\n")
        assert ctl("get", "/app/k", user=ALICE) == err(AUTH_FAILED, 2)
        assert ctl("put", "/cfg", "x", user="alice:apw2") == err(DENIED)

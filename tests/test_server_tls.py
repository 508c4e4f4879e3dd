"""``mvcckv serve`` over TLS, and etcd's gRPC hardening flags.

Certificates are made per module with trustme: a CA whose server
certificate names 127.0.0.1 (an IP SAN, which gRPC checks) and localhost,
a client certificate with Common Name ``alice``, and a second CA that the
server does not trust, with a client certificate of its own.

Covered: etcdctl and gRPC clients over TLS, client certificate
authentication (and that refused clients do not disturb a good one),
``--auto-tls``, mixed http/https listeners, startup errors for bad TLS
files and flags, the flags' help and environment variables,
``--max-concurrent-streams``, server keepalive pings, and a flood of
abandoned connections.
"""

from __future__ import annotations

import argparse
import asyncio
import queue
import socket
import ssl
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import trustme
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness import EtcdctlError, MvcckvProcess, etcdctl, free_port, grpc_channel, stub
from mvcckv.pb import rpc_pb2 as pb
from mvcckv.server import config as config_mod
from mvcckv.server import tls
from mvcckv.server.app import grpc_options
from mvcckv.server.config import Config, ConfigError

C = grpc.StatusCode
FAIL_FAST = ("--dial-timeout=2s", "--command-timeout=4s")


@dataclass(frozen=True)
class Pki:
    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    stranger_key: Path

    def credentials(self, client: str | None = None) -> grpc.ChannelCredentials:
        """TLS client credentials trusting our CA; ``client`` "alice" or
        "stranger" adds that client certificate."""
        pair = {None: (None, None), "alice": (self.client_key, self.client_cert),
                "stranger": (self.stranger_key, self.stranger_cert)}[client]
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(),
            private_key=pair[0].read_bytes() if pair[0] else None,
            certificate_chain=pair[1].read_bytes() if pair[1] else None,
        )


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca, stranger_ca = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    alice = ca.issue_cert("alice.example", common_name="alice")
    stranger = stranger_ca.issue_cert("mallory.example", common_name="alice")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    server.private_key_pem.write_to_path(str(d / "server.key"))
    server.cert_chain_pems[0].write_to_path(str(d / "server.pem"))
    alice.private_key_pem.write_to_path(str(d / "alice.key"))
    alice.cert_chain_pems[0].write_to_path(str(d / "alice.pem"))
    stranger.private_key_pem.write_to_path(str(d / "stranger.key"))
    stranger.cert_chain_pems[0].write_to_path(str(d / "stranger.pem"))
    return Pki(ca=d / "ca.pem", cert=d / "server.pem", key=d / "server.key",
               client_cert=d / "alice.pem", client_key=d / "alice.key",
               stranger_cert=d / "stranger.pem", stranger_key=d / "stranger.key")


class Server(MvcckvProcess):
    """An mvcckv server of the test's own: data and log under tmp_path,
    ``extra_urls`` listened on (and advertised) after the main one."""

    def __init__(self, tmp_path, *, extra_urls=(), **kwargs):
        super().__init__(tmp_path / "data", log_path=tmp_path / "mvcckv.log", **kwargs)
        self.extra_urls = tuple(extra_urls)

    def _command(self):
        cmd = super()._command()
        if self.extra_urls:
            urls = ",".join((self.client_url, *self.extra_urls))
            cmd[cmd.index("--listen-client-urls") + 1] = urls
            cmd[cmd.index("--advertise-client-urls") + 1] = urls
        return cmd


def tls_args(pki: Pki, *more: str) -> list[str]:
    return ["--cert-file", str(pki.cert), "--key-file", str(pki.key), *more]


def client_auth_args(pki: Pki) -> list[str]:
    return tls_args(pki, "--client-cert-auth", "--trusted-ca-file", str(pki.ca))


def range_key(channel: grpc.Channel, key: bytes, timeout: float = 10) -> pb.RangeResponse:
    return stub(channel, "KV").Range(pb.RangeRequest(key=key), timeout=timeout)


def refused(channel: grpc.Channel) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        range_key(channel, b"k", timeout=5)
    return info.value


class GoodClient:
    """A client whose connection must stay up: a watch stream opened
    first, then checked to still deliver events (and the channel never to
    have left READY) after other clients were refused."""

    def __init__(self, server: MvcckvProcess):
        self.channel = server.channel()
        self.states: list[str] = []
        self.channel.subscribe(lambda state: self.states.append(state.name), try_to_connect=True)
        self.requests: queue.Queue = queue.Queue()
        self.requests.put(pb.WatchRequest(create_request=pb.WatchCreateRequest(key=b"good/k")))
        self.stream = stub(self.channel, "Watch").Watch(iter(self.requests.get, None), timeout=60)
        assert next(self.stream).created

    def check(self) -> None:
        stub(self.channel, "KV").Put(pb.PutRequest(key=b"good/k", value=b"still here"), timeout=10)
        event = next(self.stream).events[0]
        assert event.kv.value == b"still here"
        ready = self.states.index("READY")
        assert set(self.states[ready:]) == {"READY"}, self.states

    def close(self) -> None:
        self.requests.put(None)
        self.channel.close()


def ctl_tls(server: MvcckvProcess, pki: Pki, *args: str, client: str | None = None, **kwargs):
    certs = ["--cacert", str(pki.ca)]
    if client == "alice":
        certs += ["--cert", str(pki.client_cert), "--key", str(pki.client_key)]
    elif client == "stranger":
        certs += ["--cert", str(pki.stranger_cert), "--key", str(pki.stranger_key)]
    return server.etcdctl(*certs, *FAIL_FAST, *args, **kwargs)


# --- serving TLS ------------------------------------------------------------------


def test_etcdctl_and_grpc_over_tls_next_to_plaintext(tmp_path, pki):
    plain_port = free_port()
    plain_url = f"http://127.0.0.1:{plain_port}"
    srv = Server(tmp_path, extra_urls=[plain_url], channel_credentials=pki.credentials(),
                 extra_args=tls_args(pki))
    with srv:
        assert srv.client_url.startswith("https://")
        assert ctl_tls(srv, pki, "put", "tls/k", "v1", json=False).stdout == b"OK\n"
        got = ctl_tls(srv, pki, "get", "tls/k")
        assert got["kvs"][0]["value"] == "djE="  # base64 of v1
        (status,) = ctl_tls(srv, pki, "endpoint", "status")
        assert status["Status"]["version"] == "3.6.14"
        # The same store on the plaintext listener.
        with grpc_channel(plain_url) as ch:
            assert range_key(ch, b"tls/k").kvs[0].value == b"v1"
            members = stub(ch, "Cluster").MemberList(pb.MemberListRequest(), timeout=10).members
        assert list(members[0].clientURLs) == [srv.client_url, plain_url]
        with srv.channel() as ch:
            assert range_key(ch, b"tls/k").kvs[0].value == b"v1"
        # Plaintext to the TLS port and TLS to the plaintext port fail.
        with grpc_channel(srv.endpoint) as ch:
            assert refused(ch).code() == C.UNAVAILABLE
        with grpc_channel(f"127.0.0.1:{plain_port}", credentials=pki.credentials()) as ch:
            assert refused(ch).code() == C.UNAVAILABLE
        assert f"ready to serve client requests on {srv.client_url}, {plain_url}" in srv.log_text()


def test_etcdctl_refuses_a_server_it_cannot_verify(tmp_path, pki):
    with Server(tmp_path, channel_credentials=pki.credentials(), extra_args=tls_args(pki)) as srv:
        # No CA given: the system's CAs do not know ours.
        with pytest.raises(EtcdctlError):
            srv.etcdctl("--insecure-transport=false", *FAIL_FAST, "get", "k")
        assert srv.etcdctl("--insecure-transport=false", "--insecure-skip-tls-verify", "get", "k") \
            .get("count", 0) == 0


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls_1_1_is_refused_tls_1_2_accepted(tmp_path, pki):
    """etcd's minimum TLS version is 1.2."""
    with Server(tmp_path, channel_credentials=pki.credentials(), extra_args=tls_args(pki)) as srv:
        def handshake(version: ssl.TLSVersion) -> str:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.load_verify_locations(str(pki.ca))
            ctx.set_ciphers("ALL:@SECLEVEL=0")
            ctx.minimum_version = ctx.maximum_version = version
            ctx.set_alpn_protocols(["h2"])
            with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as raw:
                with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
                    return conn.version()

        assert handshake(ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
        assert handshake(ssl.TLSVersion.TLSv1_3) == "TLSv1.3"
        with pytest.raises(ssl.SSLError) as info:
            handshake(ssl.TLSVersion.TLSv1_1)
        # The client did offer TLS 1.1: the server hung up on it.
        assert "NO_PROTOCOLS_AVAILABLE" not in str(info.value)


# --- client certificates ----------------------------------------------------------


def test_client_cert_auth(tmp_path, pki):
    srv = Server(tmp_path, channel_credentials=pki.credentials("alice"), extra_args=client_auth_args(pki))
    with srv:
        good = GoodClient(srv)
        try:
            assert ctl_tls(srv, pki, "put", "cca/k", "v", client="alice", json=False).returncode == 0
            assert ctl_tls(srv, pki, "get", "cca/k", client="alice")["count"] == 1
            # No client certificate, one from a CA the server does not
            # trust (with the same Common Name), and plaintext: all refused.
            for creds in (pki.credentials(), pki.credentials("stranger"), None):
                with grpc_channel(srv.endpoint, credentials=creds) as ch:
                    assert refused(ch).code() == C.UNAVAILABLE
            for client in (None, "stranger"):
                with pytest.raises(EtcdctlError):
                    ctl_tls(srv, pki, "get", "cca/k", client=client)
            good.check()
        finally:
            good.close()


def test_a_trusted_ca_file_alone_requires_client_certificates(tmp_path, pki):
    """etcd asks for and verifies client certificates whenever a trusted
    CA file is given, even without --client-cert-auth."""
    args = tls_args(pki, "--trusted-ca-file", str(pki.ca))
    with Server(tmp_path, channel_credentials=pki.credentials("alice"), extra_args=args) as srv:
        with grpc_channel(srv.endpoint, credentials=pki.credentials()) as ch:
            assert refused(ch).code() == C.UNAVAILABLE
        with srv.channel() as ch:
            assert range_key(ch, b"k").header.revision == 1


def test_tls_flags_from_environment(tmp_path, pki, monkeypatch):
    monkeypatch.setenv("MVCCKV_CERT_FILE", str(pki.cert))
    monkeypatch.setenv("MVCCKV_KEY_FILE", str(pki.key))
    monkeypatch.setenv("MVCCKV_TRUSTED_CA_FILE", str(pki.ca))
    monkeypatch.setenv("MVCCKV_CLIENT_CERT_AUTH", "true")
    with Server(tmp_path, channel_credentials=pki.credentials("alice")) as srv:
        with grpc_channel(srv.endpoint, credentials=pki.credentials()) as ch:
            assert refused(ch).code() == C.UNAVAILABLE
        with srv.channel() as ch:
            range_key(ch, b"k")


async def _common_name_over(credentials: grpc.ServerCredentials | None,
                            client: grpc.ChannelCredentials | None,
                            metadata: tuple = ()) -> str | None:
    """Serve one method answering tls.common_name(context) and call it."""
    seen = []

    async def who(request, context):
        seen.append(tls.common_name(context))
        return b""

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "test.Who", {"Name": grpc.unary_unary_rpc_method_handler(who)}),))
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        async with (grpc.aio.secure_channel(f"127.0.0.1:{port}", client) if client
                    else grpc.aio.insecure_channel(f"127.0.0.1:{port}")) as ch:
            await ch.unary_unary("/test.Who/Name")(b"", timeout=10, metadata=metadata)
    finally:
        await server.stop(None)
    return seen[0]


def test_common_name_of_the_client_certificate(tmp_path, pki):
    https = (config_mod.parse_listen_url("https://127.0.0.1:1"),)
    verifying = tls.server_tls(Config(listeners=https, cert_file=str(pki.cert), key_file=str(pki.key),
                                      trusted_ca_file=str(pki.ca), client_cert_auth=True))
    plain_tls = tls.server_tls(Config(listeners=https, cert_file=str(pki.cert), key_file=str(pki.key)))
    assert verifying.require_client_cert and not plain_tls.require_client_cert

    async def cases():
        return [
            await _common_name_over(verifying.credentials(), pki.credentials("alice")),
            # etcd ignores the certificate of requests relayed by its gateway.
            await _common_name_over(verifying.credentials(), pki.credentials("alice"),
                                    metadata=(("grpcgateway-accept", "application/json"),)),
            await _common_name_over(plain_tls.credentials(), pki.credentials("alice")),
            await _common_name_over(None, None),
        ]

    assert asyncio.run(cases()) == ["alice", None, None, None]


# --- auto-tls ---------------------------------------------------------------------


def test_auto_tls(tmp_path):
    tls_port = free_port()
    tls_url = f"https://127.0.0.1:{tls_port}"
    srv = Server(tmp_path, extra_urls=[tls_url], extra_args=["--auto-tls"])
    with srv:
        # etcdctl 3.4 drops --insecure-skip-tls-verify unless told that
        # the transport is not insecure.
        got = etcdctl(tls_url, "--insecure-transport=false", "--insecure-skip-tls-verify", *FAIL_FAST,
                      "put", "a", "1", json=False)
        assert got.stdout == b"OK\n"
        fixtures = srv.data_dir / "fixtures" / "client"
        assert etcdctl(tls_url, "--cacert", str(fixtures / "cert.pem"), *FAIL_FAST, "get", "a")["count"] == 1
        cert_pem = (fixtures / "cert.pem").read_bytes()
        assert stat.S_IMODE((fixtures / "key.pem").stat().st_mode) == 0o600
        cert = x509.load_pem_x509_certificate(cert_pem)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
        # The certificate verifies as its own root, 127.0.0.1 included.
        creds = grpc.ssl_channel_credentials(root_certificates=cert_pem)
        with grpc_channel(f"127.0.0.1:{tls_port}", credentials=creds) as ch:
            assert range_key(ch, b"a").kvs[0].value == b"1"
        # A restart keeps the certificate clients may have pinned.
        srv.restart()
        assert (fixtures / "cert.pem").read_bytes() == cert_pem
        with grpc_channel(f"127.0.0.1:{tls_port}", credentials=creds) as ch:
            assert range_key(ch, b"a").kvs[0].value == b"1"


def test_auto_tls_remakes_a_certificate_that_no_longer_fits(tmp_path):
    d = str(tmp_path / "fixtures")
    cert, key = tls.self_cert(d, ["127.0.0.1"])
    first = Path(cert).read_bytes()
    assert tls.self_cert(d, ["127.0.0.1"]) == (cert, key) and Path(cert).read_bytes() == first
    # A new listen host is not in the old certificate.
    tls.self_cert(d, ["127.0.0.1", "localhost"])
    second = Path(cert).read_bytes()
    assert second != first
    names = x509.load_pem_x509_certificate(second).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    # A damaged key, or one that is not the certificate's, is replaced.
    Path(key).write_bytes(b"garbage")
    tls.self_cert(d, ["127.0.0.1"])
    assert Path(cert).read_bytes() != second
    tls.load_key_pair(cert, key)
    other_cert, other_key = tls.self_cert(str(tmp_path / "other"), ["127.0.0.1"])
    Path(key).write_bytes(Path(other_key).read_bytes())
    third = Path(cert).read_bytes()
    tls.self_cert(d, ["127.0.0.1"])
    assert Path(cert).read_bytes() != third
    tls.load_key_pair(cert, key)


def test_auto_tls_is_not_used_when_files_are_given(tmp_path, pki):
    args = tls_args(pki, "--auto-tls")
    with Server(tmp_path, channel_credentials=pki.credentials(), extra_args=args) as srv:
        with srv.channel() as ch:
            range_key(ch, b"k")
        assert not (srv.data_dir / "fixtures").exists()
        assert "--auto-tls is ignored" in srv.log_text()


# --- startup errors ---------------------------------------------------------------


def _serve(*args, timeout=30, env=None):
    return subprocess.run([sys.executable, "-m", "mvcckv", "serve", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, stdin=subprocess.DEVNULL)


HTTPS = ["--listen-client-urls", "https://127.0.0.1:0"]


@pytest.mark.parametrize("args, message", [
    (HTTPS, "TLS key/cert (--cert-file, --key-file) must be provided for client url "
            "https://127.0.0.1:0 with HTTPS scheme"),
    (HTTPS + ["--cert-file", "c.pem"], "--cert-file and --key-file must both be given"),
    (HTTPS + ["--key-file", "k.pem"], "--cert-file and --key-file must both be given"),
    (HTTPS + ["--auto-tls", "--client-cert-auth"], "--client-cert-auth needs --trusted-ca-file"),
    (["--listen-client-urls", "unix://x:1"], "only http:// and https:// are supported"),
    (["--auto-tls=maybe"], "--auto-tls: not a boolean: 'maybe'"),
    (["--max-concurrent-streams", "-1"], "--max-concurrent-streams: not a non-negative integer"),
    (["--max-concurrent-streams", "4294967296"], "out of range"),
    (["--grpc-keepalive-min-time", "5"], "--grpc-keepalive-min-time: not a duration"),
    (["--grpc-keepalive-interval", "soon"], "--grpc-keepalive-interval: not a duration"),
    (["--grpc-keepalive-timeout", "1x"], "--grpc-keepalive-timeout: not a duration"),
    (["--auth-token", "magic"], "--auth-token 'magic': auth: invalid auth options"),
    (["--auth-token-ttl", "5m"], "--auth-token-ttl: not a non-negative integer"),
    (["--bcrypt-cost", "-1"], "--bcrypt-cost: not a non-negative integer"),
])
def test_bad_flags_are_reported(tmp_path, args, message):
    proc = _serve("--data-dir", str(tmp_path / "d"), *args)
    assert (proc.returncode, message in proc.stderr) == (2, True), proc.stderr
    assert not (tmp_path / "d").exists()


def _bad_files(pki: Pki, tmp: Path) -> list[tuple[list[str], str]]:
    garbage = tmp / "garbage.pem"
    garbage.write_text("not a certificate\n")
    missing = tmp / "missing.pem"
    return [
        (["--cert-file", str(missing), "--key-file", str(pki.key)],
         f"--cert-file {missing}: No such file or directory"),
        (["--cert-file", str(pki.cert), "--key-file", str(missing)],
         f"--key-file {missing}: No such file or directory"),
        # A directory where a file belongs: unreadable, even for root.
        (["--cert-file", str(tmp), "--key-file", str(pki.key)], f"--cert-file {tmp}: Is a directory"),
        (["--cert-file", str(garbage), "--key-file", str(pki.key)],
         f"--cert-file {garbage}: no PEM certificate"),
        (["--cert-file", str(pki.cert), "--key-file", str(garbage)],
         f"--key-file {garbage}: no PEM private key"),
        (["--cert-file", str(pki.cert), "--key-file", str(pki.client_key)],
         f"--key-file {pki.client_key} does not match the certificate in --cert-file {pki.cert}"),
        (["--cert-file", str(pki.cert), "--key-file", str(pki.key), "--trusted-ca-file", str(missing)],
         f"--trusted-ca-file {missing}: No such file or directory"),
        (["--cert-file", str(pki.cert), "--key-file", str(pki.key), "--trusted-ca-file", str(garbage)],
         f"--trusted-ca-file {garbage}: no PEM certificate"),
    ]


def test_bad_tls_files_stop_the_server_before_it_opens_the_store(tmp_path, pki):
    for i, (args, message) in enumerate(_bad_files(pki, tmp_path)):
        data = tmp_path / f"d{i}"
        proc = _serve("--data-dir", str(data), *HTTPS, *args)
        assert (proc.returncode, message in proc.stderr) == (1, True), (args, proc.stderr)
        assert "cannot serve TLS: " in proc.stderr
        assert not data.exists()


def test_tls_files_are_not_read_without_an_https_listener(tmp_path):
    srv = Server(tmp_path, extra_args=["--cert-file", str(tmp_path / "none.pem"),
                                       "--key-file", str(tmp_path / "none.key")])
    with srv:
        with srv.channel() as ch:
            range_key(ch, b"k")
        assert "the TLS flags are not used" in srv.log_text()


# --- flags ------------------------------------------------------------------------


NEW_FLAGS = ["cert-file", "key-file", "trusted-ca-file", "client-cert-auth", "auto-tls",
             "max-concurrent-streams", "grpc-keepalive-min-time", "grpc-keepalive-interval",
             "grpc-keepalive-timeout", "auth-token", "auth-token-ttl", "bcrypt-cost"]


def test_help_documents_the_tls_grpc_and_auth_flags():
    out = _serve("--help").stdout
    for flag in NEW_FLAGS:
        assert f"--{flag}" in out
        assert "MVCCKV_" + flag.upper().replace("-", "_") in out


def parse(*argv: str) -> Config:
    """Config from command-line flags, with the environment as it is now."""
    parser = argparse.ArgumentParser()
    config_mod.add_serve_parser(parser.add_subparsers())
    return Config.from_args(parser.parse_args(["serve", *argv]))


def test_flag_defaults_are_etcds():
    c = parse()
    assert (c.cert_file, c.key_file, c.trusted_ca_file, c.client_cert_auth, c.auto_tls) == \
        (None, None, None, False, False)
    assert c.max_concurrent_streams == 2**32 - 1
    assert (c.grpc_keepalive_min_time, c.grpc_keepalive_interval, c.grpc_keepalive_timeout) == (5, 7200, 20)
    assert (c.auth_token, c.auth_token_ttl, c.bcrypt_cost, c.warnings) == ("simple", 300, 10, ())


@pytest.mark.parametrize("argv, field, value", [
    (["--grpc-keepalive-interval", "2h0m0s"], "grpc_keepalive_interval", 7200.0),
    (["--grpc-keepalive-interval", "1m30s"], "grpc_keepalive_interval", 90.0),
    (["--grpc-keepalive-timeout", "500ms"], "grpc_keepalive_timeout", 0.5),
    (["--grpc-keepalive-min-time", "0"], "grpc_keepalive_min_time", 0.0),
    (["--auto-tls"], "auto_tls", True),
    (["--auto-tls=T"], "auto_tls", True),
    (["--auto-tls=0"], "auto_tls", False),
    (["--client-cert-auth", "False"], "client_cert_auth", False),
    (["--max-concurrent-streams", "0"], "max_concurrent_streams", 0),
    (["--auth-token", "jwt,pub-key=a,priv-key=b,sign-method=RS256"], "auth_token",
     "jwt,pub-key=a,priv-key=b,sign-method=RS256"),
    (["--auth-token", ""], "auth_token", ""),
    (["--auth-token-ttl", "30"], "auth_token_ttl", 30),
    (["--bcrypt-cost", "4"], "bcrypt_cost", 4),
    (["--bcrypt-cost", "31"], "bcrypt_cost", 31),
])
def test_flag_values(argv, field, value):
    assert getattr(parse(*argv), field) == value


@pytest.mark.parametrize("cost", ["3", "32", "0"])
def test_a_bcrypt_cost_out_of_range_falls_back_to_the_default(cost):
    """etcd (3.4 and 3.6) logs a warning and hashes with cost 10."""
    c = parse("--bcrypt-cost", cost)
    assert c.bcrypt_cost == 10
    assert c.warnings == (f"--bcrypt-cost {cost} is outside 4..31: using the default, 10",)


def test_bcrypt_warning_is_logged_at_startup(tmp_path):
    with Server(tmp_path, extra_args=["--bcrypt-cost", "40"]) as srv:
        pass
    assert "WARNING mvcckv.server: --bcrypt-cost 40 is outside 4..31" in srv.log_text()


def test_flags_from_environment_and_the_command_line_wins(monkeypatch):
    monkeypatch.setenv("MVCCKV_GRPC_KEEPALIVE_MIN_TIME", "7s")
    monkeypatch.setenv("MVCCKV_AUTO_TLS", "true")
    monkeypatch.setenv("MVCCKV_BCRYPT_COST", "12")
    monkeypatch.setenv("MVCCKV_AUTH_TOKEN_TTL", "60")
    c = parse("--auth-token-ttl", "61")
    assert (c.grpc_keepalive_min_time, c.auto_tls, c.bcrypt_cost, c.auth_token_ttl) == (7.0, True, 12, 61)


def test_grpc_options_follow_the_flags():
    def options(**kw):
        return dict(grpc_options(Config(**kw)))

    default = options()
    assert "grpc.max_concurrent_streams" not in default  # 2^32-1: no limit
    assert (default["grpc.http2.min_ping_interval_without_data_ms"], default["grpc.keepalive_time_ms"],
            default["grpc.keepalive_timeout_ms"]) == (5000, 7_200_000, 20_000)
    # etcdctl-compatible ping tolerance is kept whatever the flags say.
    assert (default["grpc.keepalive_permit_without_calls"], default["grpc.http2.max_ping_strikes"]) == (1, 0)
    assert options(max_concurrent_streams=2)["grpc.max_concurrent_streams"] == 2
    assert "grpc.max_concurrent_streams" not in options(max_concurrent_streams=0)
    tuned = options(grpc_keepalive_min_time=1.5, grpc_keepalive_interval=30, grpc_keepalive_timeout=3)
    assert (tuned["grpc.http2.min_ping_interval_without_data_ms"], tuned["grpc.keepalive_time_ms"],
            tuned["grpc.keepalive_timeout_ms"]) == (1500, 30_000, 3000)
    # 0 means gRPC's defaults, as in etcd: 5 min; 2 h and 20 s together.
    zero = options(grpc_keepalive_min_time=0, grpc_keepalive_interval=0, grpc_keepalive_timeout=3)
    assert (zero["grpc.http2.min_ping_interval_without_data_ms"], zero["grpc.keepalive_time_ms"],
            zero["grpc.keepalive_timeout_ms"]) == (300_000, 7_200_000, 20_000)


def test_config_checks_need_no_files():
    with pytest.raises(ConfigError, match="must be provided for client url https://127.0.0.1:1"):
        parse("--listen-client-urls", "http://127.0.0.1:2,https://127.0.0.1:1")
    c = parse("--listen-client-urls", "https://127.0.0.1:1,http://127.0.0.1:2", "--auto-tls")
    assert [(lst.scheme, lst.secure) for lst in c.listeners] == [("https", True), ("http", False)]


# --- hardening --------------------------------------------------------------------


def _watch_health(channel: grpc.Channel):
    stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
    assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
    return stream


def test_max_concurrent_streams(tmp_path):
    with Server(tmp_path, extra_args=["--max-concurrent-streams", "2"]) as srv, srv.channel() as ch:
        range_key(ch, b"k")
        streams = [_watch_health(ch), _watch_health(ch)]
        try:
            # A third call on the same connection waits for a free stream...
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                range_key(ch, b"k", timeout=1.5)
            assert info.value.code() == C.DEADLINE_EXCEEDED
            assert time.monotonic() - start < 5
            # ...while another connection has streams of its own...
            with grpc_channel(srv.endpoint, options=[("grpc.use_local_subchannel_pool", 1)]) as other:
                range_key(other, b"k", timeout=5)
            waiting = stub(ch, "KV").Range.future(pb.RangeRequest(key=b"k"), timeout=10)
            time.sleep(0.3)
            assert not waiting.done()
            # ...and it goes ahead as soon as one ends.
            streams.pop().cancel()
            assert waiting.result(timeout=5).header.revision == 1
        finally:
            for stream in streams:
                stream.cancel()


def _server_pings(port: int, within: float) -> bool:
    """Whether the server pings an idle HTTP/2 connection within ``within`` s."""
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    with socket.create_connection(("127.0.0.1", port), timeout=within) as sock:
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        deadline = time.monotonic() + within
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                return False
            if not data:
                return False
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.PingReceived):
                    return True
            sock.sendall(conn.data_to_send())
    return False


def test_server_keepalive_pings_follow_the_flags(tmp_path):
    args = ["--grpc-keepalive-interval", "300ms", "--grpc-keepalive-timeout", "5s"]
    with Server(tmp_path / "a", extra_args=args) as srv:
        assert _server_pings(srv.port, within=5)
    with Server(tmp_path / "b") as srv:
        assert not _server_pings(srv.port, within=1.5)  # etcd's default: every 2 h


ABANDONED = 200


def test_abandoned_connections_do_not_starve_clients(tmp_path, pki):
    """Connections that stop in the middle of a TLS or HTTP/2 handshake, or
    never start one, hold no server resource that a real client needs."""
    plain_port = free_port()
    srv = Server(tmp_path, extra_urls=[f"http://127.0.0.1:{plain_port}"],
                 channel_credentials=pki.credentials(), extra_args=tls_args(pki))
    hello = _partial_client_hello()
    with srv:
        socks = []
        try:
            for i in range(ABANDONED):
                port = srv.port if i % 2 else plain_port
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                socks.append(sock)
                if i % 4 == 1:
                    sock.sendall(hello)
                elif i % 4 == 2:
                    sock.sendall(b"PRI * HTTP/2.0\r\n")
            for channel in (srv.channel(), grpc_channel(f"127.0.0.1:{plain_port}")):
                with channel:
                    start = time.monotonic()
                    range_key(channel, b"k", timeout=5)
                    assert time.monotonic() - start < 3
        finally:
            for sock in socks:
                sock.close()
        with srv.channel() as ch:
            range_key(ch, b"k", timeout=5)


def _partial_client_hello() -> bytes:
    """The first half of a real TLS ClientHello."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = ctx.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        conn.do_handshake()
    hello = outgoing.read()
    return hello[: len(hello) // 2]

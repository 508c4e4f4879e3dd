"""``mvcckv serve`` flags: etcd's names and defaults, each also an environment
variable (``--data-dir`` ⇔ ``MVCCKV_DATA_DIR``; a flag on the command line
wins over the variable, as with etcd's ``ETCD_*``).

Differences from etcd, on purpose:

* ``--advertise-client-urls`` defaults to the listen URLs, so that clients
  which sync their endpoint list from MemberList (``clientURLs``) reach a
  URL the server really listens on.
* Listen URLs are ``http://`` or ``https://`` (no unix sockets).
* The ``--listen-client-urls`` speak gRPC only; etcd's JSON gateway,
  ``/health``, ``/version`` and ``/metrics`` are served on
  ``--listen-client-http-urls`` (etcd 3.5's flag), because grpcio cannot
  share a listening socket with an HTTP/1.1 server the way etcd 3.4's cmux
  does.  An address given to two listeners is refused.
* ``--client-cert-auth`` needs ``--trusted-ca-file`` (etcd would fall back
  to the system's CAs), and it stays on with ``--auto-tls`` (etcd's
  generated certificate silently drops it).
* ``--grpc-keepalive-min-time`` is not enforced: clients pinging more often
  are tolerated instead of being sent GOAWAY "too_many_pings"
  (ETCD_SEMANTICS §1.3).

Kept from etcd although surprising: a ``--bcrypt-cost`` outside bcrypt's
4..31 is replaced by 10 with a warning, not refused; a keepalive interval or
timeout of 0 (or less) means gRPC's defaults, not "off";
``--max-concurrent-streams 0`` means no limit.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import sys
import urllib.parse
from dataclasses import dataclass

from mvcckv.server import compactor
from mvcckv.server.identity import check_urls, split_host_port

ENV_PREFIX = "MVCCKV_"

DEFAULT_MAX_REQUEST_BYTES = 1536 * 1024
DEFAULT_MAX_TXN_OPS = 128
EMULATED_VERSION = "3.6.14"
DEFAULT_WATCH_PROGRESS_NOTIFY_INTERVAL = 600.0
MIN_WATCH_PROGRESS_NOTIFY_INTERVAL = 0.1
LOG_LEVELS = ("debug", "info", "warn", "error")
EVENT_LOOPS = ("uvloop", "asyncio")
GRPC_SERVERS = ("auto", "threads", "aio")
MAX_UINT32 = 2**32 - 1
DEFAULT_MAX_CONCURRENT_STREAMS = MAX_UINT32
DEFAULT_GRPC_KEEPALIVE_MIN_TIME = 5.0
DEFAULT_GRPC_KEEPALIVE_INTERVAL = 2 * 60 * 60.0
DEFAULT_GRPC_KEEPALIVE_TIMEOUT = 20.0
DEFAULT_AUTH_TOKEN = "simple"
AUTH_TOKEN_TYPES = ("simple", "jwt")
DEFAULT_AUTH_TOKEN_TTL = 300
# bcrypt's limits and default, which etcd takes from golang.org/x/crypto/bcrypt.
MIN_BCRYPT_COST = 4
MAX_BCRYPT_COST = 31
DEFAULT_BCRYPT_COST = 10

# (flag, default, help).  The default None of --data-dir and
# --advertise-client-urls means "derived", as the help says.
_FLAGS: tuple[tuple[str, str | None, str], ...] = (
    ("name", "default", "Human-readable name of this member (MemberList)."),
    ("data-dir", None, "Path to the data directory (default: ./<name>.mvcckv, i.e. ./default.mvcckv)."),
    ("backend", None,
     "Where the data lives: empty for the LMDB store in --data-dir (the default), or a "
     "postgresql:// URL to keep it in PostgreSQL (mvcckv.pg; --data-dir is then unused)."),
    ("listen-client-urls", "http://127.0.0.1:2379",
     "Comma-separated http:// or https:// URLs to serve clients on (https:// needs --cert-file "
     "and --key-file, or --auto-tls); the host must be an IP address or localhost and only that "
     "address is bound."),
    ("listen-client-http-urls", None,
     "Comma-separated http:// or https:// URLs serving etcd's JSON gateway (POST /v3/...), "
     "/health, /version and /metrics over HTTP/1.1 (etcd 3.5's flag). The --listen-client-urls "
     "speak gRPC only: etcd 3.4 serves both on one port, mvcckv's gRPC server (grpcio) cannot "
     "share its sockets with an HTTP/1.1 server, so give the HTTP side a port of its own."),
    ("listen-metrics-urls", None,
     "Comma-separated http:// or https:// URLs serving only /metrics and /health (etcd's flag)."),
    ("advertise-client-urls", None,
     "Comma-separated client URLs to advertise in MemberList (default: the listen URLs)."),
    ("initial-advertise-peer-urls", "http://localhost:2380",
     "Comma-separated peer URLs; with the cluster token they derive the member and cluster IDs "
     "on first start, as etcd does (never listened on: mvcckv has no peers)."),
    ("initial-cluster-token", "etcd-cluster", "Cluster token, part of the member ID derivation."),
    ("quota-backend-bytes", "0",
     "Backend size at which writes fail with NOSPACE: 0 = 2 GiB (etcd's default), < 0 = no quota."),
    ("max-request-bytes", str(DEFAULT_MAX_REQUEST_BYTES),
     "Maximum client request size in bytes; gRPC refuses messages over this + 512 KiB."),
    ("max-txn-ops", str(DEFAULT_MAX_TXN_OPS), "Maximum operations per txn level."),
    ("auto-compaction-mode", compactor.MODE_PERIODIC,
     "'periodic' (retention is a duration; a bare number means hours) or 'revision' "
     "(retention is a number of revisions)."),
    ("auto-compaction-retention", "0",
     "Auto-compaction retention, e.g. '1' (hour), '30m', or '1000' in revision mode; "
     "0 disables auto-compaction."),
    ("experimental-watch-progress-notify-interval", "10m",
     "Interval of progress notifications to watchers that asked for them (a Go duration; "
     "raised to 100ms if smaller; 0 keeps 10m)."),
    ("log-level", "info", "Log level: " + ", ".join(LOG_LEVELS) + "."),
    ("grpc-server", "auto",
     "How gRPC calls are run: 'threads' (KV's Range, Put, DeleteRange and Txn and Lease's Grant "
     "and Revoke on a pool of server threads, the other methods and the streams on the event "
     "loop), 'aio' (every call on the event loop, grpc.aio's server), or 'auto' (the default: "
     "the front end that serves the engine best, now threads with either engine)."),
    ("event-loop", "uvloop",
     "The server's event loop: 'uvloop' (libuv's, the default: it runs grpc.aio's per-call "
     "callbacks in C) or 'asyncio' (the standard library's)."),
    ("emulated-version", EMULATED_VERSION,
     "etcd server version reported by Status (etcdctl endpoint status)."),
    ("cert-file", None, "Path to the client server TLS cert file (PEM, the chain may follow the certificate)."),
    ("key-file", None, "Path to the client server TLS key file (PEM, unencrypted)."),
    ("trusted-ca-file", None,
     "Path to the client server TLS trusted CA cert file; when given, https:// clients must "
     "present a certificate it signed."),
    ("client-cert-auth", "false",
     "Enable client cert authentication: https:// clients must present a certificate signed by "
     "--trusted-ca-file; its Common Name is the user of requests that carry no auth token."),
    ("auto-tls", "false",
     "Client TLS using a generated self-signed certificate (kept in <data-dir>/fixtures/client) "
     "when --cert-file and --key-file are not given."),
    ("max-concurrent-streams", str(DEFAULT_MAX_CONCURRENT_STREAMS),
     "Maximum concurrent streams that each client connection can open at a time; further calls "
     "wait for one to end. 0 means no limit."),
    ("grpc-keepalive-min-time", "5s",
     "Minimum duration interval that a client should wait before pinging server. Accepted, not "
     "enforced: mvcckv never closes a connection for pinging too often, so that etcdctl's pings "
     "between calls cost no reconnect."),
    ("grpc-keepalive-interval", "2h",
     "Frequency duration of server-to-client ping to check if a connection is alive (0 here or "
     "in --grpc-keepalive-timeout: gRPC's defaults, 2h and 20s)."),
    ("grpc-keepalive-timeout", "20s",
     "Additional duration of wait before closing a non-responsive connection (0 here or in "
     "--grpc-keepalive-interval: gRPC's defaults, 2h and 20s)."),
    ("auth-token", DEFAULT_AUTH_TOKEN,
     "Auth token type and options: 'simple', or 'jwt,pub-key=<path>,priv-key=<path>,"
     "sign-method=<alg>[,ttl=<duration>]'."),
    ("auth-token-ttl", str(DEFAULT_AUTH_TOKEN_TTL), "The lifetime in seconds of the auth token."),
    ("bcrypt-cost", str(DEFAULT_BCRYPT_COST),
     f"Cost of the bcrypt hashing of auth passwords, {MIN_BCRYPT_COST} to {MAX_BCRYPT_COST} (other "
     f"values fall back to {DEFAULT_BCRYPT_COST} with a warning, as in etcd)."),
)

# Go-style booleans: ``--auto-tls`` alone means true.
_BOOL_FLAGS = frozenset({"client-cert-auth", "auto-tls"})


def env_name(flag: str) -> str:
    return ENV_PREFIX + flag.upper().replace("-", "_")


class ConfigError(ValueError):
    """A flag value that cannot be served with."""


@dataclass(frozen=True)
class Listener:
    url: str
    host: str
    port: int
    scheme: str = "http"

    @property
    def secure(self) -> bool:
        return self.scheme == "https"

    @property
    def address(self) -> str:
        """What gRPC binds: ``host:port``, brackets around IPv6."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class Config:
    name: str = "default"
    data_dir: str = "default.mvcckv"
    backend: str = ""
    """A postgresql:// URL selecting the PostgreSQL engine; empty for LMDB."""
    listeners: tuple[Listener, ...] = ()
    """gRPC client listeners."""
    http_listeners: tuple[Listener, ...] = ()
    """JSON gateway, /health, /version and /metrics (--listen-client-http-urls)."""
    metrics_listeners: tuple[Listener, ...] = ()
    """/metrics and /health only (--listen-metrics-urls)."""
    advertise_client_urls: tuple[str, ...] = ()
    initial_advertise_peer_urls: tuple[str, ...] = ("http://localhost:2380",)
    initial_cluster_token: str = "etcd-cluster"
    quota_backend_bytes: int = 0
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_txn_ops: int = DEFAULT_MAX_TXN_OPS
    auto_compaction_mode: str = compactor.MODE_PERIODIC
    auto_compaction_retention: int = 0
    """Revisions (revision mode) or nanoseconds (periodic mode); 0 = off."""
    watch_progress_notify_interval: float = DEFAULT_WATCH_PROGRESS_NOTIFY_INTERVAL
    """Seconds between progress notifications (etcd adds 0-10 % jitter)."""
    log_level: str = "info"
    event_loop: str = "uvloop"
    grpc_server: str = "threads"
    """"threads" or "aio" ("auto" is resolved by from_args)."""
    emulated_version: str = EMULATED_VERSION
    cert_file: str | None = None
    key_file: str | None = None
    trusted_ca_file: str | None = None
    client_cert_auth: bool = False
    auto_tls: bool = False
    max_concurrent_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS
    """Per connection; 0 or 2^32-1 (the default) means no limit."""
    grpc_keepalive_min_time: float = DEFAULT_GRPC_KEEPALIVE_MIN_TIME
    """Seconds; 0 or less means gRPC's default (5 min)."""
    grpc_keepalive_interval: float = DEFAULT_GRPC_KEEPALIVE_INTERVAL
    """Seconds; with the timeout, 0 or less in either means gRPC's defaults."""
    grpc_keepalive_timeout: float = DEFAULT_GRPC_KEEPALIVE_TIMEOUT
    auth_token: str = DEFAULT_AUTH_TOKEN
    auth_token_ttl: int = DEFAULT_AUTH_TOKEN_TTL
    """Seconds."""
    bcrypt_cost: int = DEFAULT_BCRYPT_COST
    """The cost to hash with: always within bcrypt's limits."""
    warnings: tuple[str, ...] = ()
    """Flag values etcd accepts with a warning; logged at startup."""

    @property
    def all_listeners(self) -> tuple[Listener, ...]:
        """Every address the server listens on, gRPC and HTTP."""
        return self.listeners + self.http_listeners + self.metrics_listeners

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Config":
        """Check and convert parsed flags; raises ConfigError."""
        name = args.name
        listeners = tuple(parse_listen_url(u) for u in _split(args.listen_client_urls))
        if not listeners:
            raise ConfigError("--listen-client-urls is empty")
        http_listeners = tuple(parse_listen_url(u) for u in _split(args.listen_client_http_urls or ""))
        metrics_listeners = tuple(parse_listen_url(u) for u in _split(args.listen_metrics_urls or ""))
        _check_distinct(listeners, http_listeners, metrics_listeners)
        advertise = _split(args.advertise_client_urls) if args.advertise_client_urls else [
            lst.url for lst in listeners
        ]
        try:
            peers = check_urls(_split(args.initial_advertise_peer_urls))
            check_urls(advertise)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        mode = args.auto_compaction_mode
        try:
            retention = compactor.parse_retention(mode, args.auto_compaction_retention)
        except ValueError as err:
            raise ConfigError(f"--auto-compaction-retention/--auto-compaction-mode: {err}") from None
        level = args.log_level.lower()
        if level not in LOG_LEVELS:
            raise ConfigError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, not {args.log_level!r}")
        event_loop = args.event_loop.lower()
        if event_loop not in EVENT_LOOPS:
            raise ConfigError(f"--event-loop must be one of {', '.join(EVENT_LOOPS)}, not {args.event_loop!r}")
        grpc_server = args.grpc_server.lower()
        if grpc_server not in GRPC_SERVERS:
            raise ConfigError(f"--grpc-server must be one of {', '.join(GRPC_SERVERS)}, not {args.grpc_server!r}")
        version = args.emulated_version
        if not re.fullmatch(r"\d+\.\d+\.\d+", version):
            raise ConfigError(f"--emulated-version must look like 3.6.14, not {version!r}")
        progress = _progress_interval(args.experimental_watch_progress_notify_interval)
        backend = args.backend or ""
        if backend and urllib.parse.urlsplit(backend).scheme not in ("postgresql", "postgres"):
            raise ConfigError(f"--backend must be a postgresql:// URL (or empty for LMDB), not {backend!r}")
        if grpc_server == "auto":
            # Threads with either engine: on PostgreSQL too they answered
            # 2.1x the puts and 1.5x the gets of grpc.aio at c = 64 in
            # bench/compare.py (gets at c = 1: 0.88x).  An earlier run in
            # which its gets fell to 100/s was JIT compiling every read
            # (fixed in pg/view.py), not the front end.
            grpc_server = "threads"
        max_request = _int("max-request-bytes", args.max_request_bytes)
        max_ops = _int("max-txn-ops", args.max_txn_ops)
        if max_request <= 0 or max_ops <= 0:
            raise ConfigError("--max-request-bytes and --max-txn-ops must be positive")
        warnings: list[str] = []
        tls = _tls_flags(args, listeners + http_listeners + metrics_listeners)
        bcrypt_cost = _uint("bcrypt-cost", args.bcrypt_cost)
        if not MIN_BCRYPT_COST <= bcrypt_cost <= MAX_BCRYPT_COST:
            warnings.append(f"--bcrypt-cost {bcrypt_cost} is outside {MIN_BCRYPT_COST}..{MAX_BCRYPT_COST}: "
                            f"using the default, {DEFAULT_BCRYPT_COST}")
            bcrypt_cost = DEFAULT_BCRYPT_COST
        return cls(
            name=name,
            data_dir=args.data_dir or f"{name}.mvcckv",
            backend=backend,
            listeners=listeners,
            http_listeners=http_listeners,
            metrics_listeners=metrics_listeners,
            advertise_client_urls=tuple(advertise),
            initial_advertise_peer_urls=tuple(peers),
            initial_cluster_token=args.initial_cluster_token,
            quota_backend_bytes=_int("quota-backend-bytes", args.quota_backend_bytes),
            max_request_bytes=max_request,
            max_txn_ops=max_ops,
            auto_compaction_mode=mode,
            auto_compaction_retention=retention,
            watch_progress_notify_interval=progress,
            log_level=level,
            event_loop=event_loop,
            grpc_server=grpc_server,
            emulated_version=version,
            **tls,
            max_concurrent_streams=_uint("max-concurrent-streams", args.max_concurrent_streams, MAX_UINT32),
            grpc_keepalive_min_time=_seconds("grpc-keepalive-min-time", args.grpc_keepalive_min_time),
            grpc_keepalive_interval=_seconds("grpc-keepalive-interval", args.grpc_keepalive_interval),
            grpc_keepalive_timeout=_seconds("grpc-keepalive-timeout", args.grpc_keepalive_timeout),
            auth_token=_auth_token(args.auth_token),
            auth_token_ttl=_uint("auth-token-ttl", args.auth_token_ttl),
            bcrypt_cost=bcrypt_cost,
            warnings=tuple(warnings),
        )


def parse_listen_url(url: str) -> Listener:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"listen URL {url!r}: only http:// and https:// are supported")
    if parts.path not in ("", "/"):
        raise ConfigError(f"listen URL {url!r} must not contain a path")
    try:
        host, port = split_host_port(parts.netloc)
    except ValueError as err:
        raise ConfigError(f"listen URL {url!r}: {err}") from None
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            # etcd's rule: binding by name is ambiguous, so only IPs (and
            # localhost) are accepted.
            raise ConfigError(f"expected IP in URL for binding ({url})") from None
    return Listener(url=url, host=host, port=port, scheme=parts.scheme)


def _check_distinct(*groups: tuple[Listener, ...]) -> None:
    """One port, one protocol: gRPC, the HTTP gateway and the metrics
    listener cannot share an address."""
    seen: dict[tuple[str, int], str] = {}
    for group in groups:
        for listener in group:
            where = (listener.host, listener.port)
            if listener.port != 0 and where in seen:
                raise ConfigError(f"{listener.url} is given twice (also as {seen[where]}): mvcckv serves gRPC "
                                  "and HTTP/1.1 on separate ports")
            seen[where] = listener.url


def _split(value: str) -> list[str]:
    return [u.strip() for u in value.split(",") if u.strip()]


def _progress_interval(value: str) -> float:
    """etcd's reading of the progress interval: a Go duration; 0 or less
    keeps the default, anything under 100ms is raised to 100ms."""
    try:
        ns = compactor.parse_duration(value.strip())
    except ValueError:
        raise ConfigError(
            f"--experimental-watch-progress-notify-interval: not a duration: {value!r}") from None
    if ns <= 0:
        return DEFAULT_WATCH_PROGRESS_NOTIFY_INTERVAL
    return max(ns / compactor.SECOND, MIN_WATCH_PROGRESS_NOTIFY_INTERVAL)


def _int(flag: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"--{flag}: not an integer: {value!r}") from None


def _uint(flag: str, value: str, limit: int | None = None) -> int:
    """A Go ``uint`` (or ``uint32``) flag: a non-negative decimal integer."""
    if not re.fullmatch(r"[0-9]+", value.strip()):
        raise ConfigError(f"--{flag}: not a non-negative integer: {value!r}")
    number = int(value)
    if limit is not None and number > limit:
        raise ConfigError(f"--{flag}: {value} is out of range (at most {limit})")
    return number


def _bool(flag: str, value: str) -> bool:
    """Go's ``strconv.ParseBool``, which etcd's boolean flags use."""
    if value in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if value in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise ConfigError(f"--{flag}: not a boolean: {value!r}")


def _seconds(flag: str, value: str) -> float:
    try:
        ns = compactor.parse_duration(value.strip())
    except ValueError:
        raise ConfigError(f"--{flag}: not a duration (such as 5s or 2h0m0s): {value!r}") from None
    return ns / compactor.SECOND


def _auth_token(value: str) -> str:
    # Only the type is checked here; the options are the token provider's.
    # An empty value is etcd's no-token setting.
    kind = value.split(",", 1)[0]
    if kind and kind not in AUTH_TOKEN_TYPES:
        raise ConfigError(f"--auth-token {value!r}: auth: invalid auth options "
                          f"(the token type must be {' or '.join(AUTH_TOKEN_TYPES)})")
    return value


def _tls_flags(args: argparse.Namespace, listeners: tuple[Listener, ...]) -> dict:
    """The TLS fields, with etcd's checks of how they combine with the
    listen URLs (the files themselves are read at startup, by
    :mod:`mvcckv.server.tls`)."""
    cert, key = args.cert_file or None, args.key_file or None
    trusted = args.trusted_ca_file or None
    client_cert_auth = _bool("client-cert-auth", args.client_cert_auth)
    auto_tls = _bool("auto-tls", args.auto_tls)
    secure = [lst.url for lst in listeners if lst.secure]
    if secure:
        if not (cert or key or auto_tls):
            raise ConfigError(f"TLS key/cert (--cert-file, --key-file) must be provided for client url "
                              f"{secure[0]} with HTTPS scheme")
        if (cert is None) != (key is None):
            raise ConfigError(f"--cert-file and --key-file must both be given (cert: {cert or '<none>'}, "
                              f"key: {key or '<none>'})")
        if client_cert_auth and trusted is None:
            raise ConfigError("--client-cert-auth needs --trusted-ca-file: the CA that signs the client "
                              "certificates")
    return dict(cert_file=cert, key_file=key, trusted_ca_file=trusted,
                client_cert_auth=client_cert_auth, auto_tls=auto_tls)


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "serve",
        help="serve etcd's v3 gRPC API (KV, Watch, Lease, Maintenance, Cluster)",
        description=(
            "Serve etcd's v3 gRPC API on the listen URLs with data in --data-dir,\n"
            "so that etcdctl and etcd's clients work unchanged.\n\n"
            "SIGINT/SIGTERM stop gracefully (in-flight requests get 5 s);\n"
            "a second signal exits at once (nothing acknowledged is lost)."
        ),
        epilog=(
            "Every flag can also be set by the environment variable shown in brackets\n"
            f"({ENV_PREFIX}<FLAG>, e.g. {env_name('data-dir')}); the command line wins."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for flag, default, text in _FLAGS:
        env = env_name(flag)
        shown = "" if default is None else " (default: %(default)s)"
        kind = (dict(nargs="?", const="true", metavar="BOOL") if flag in _BOOL_FLAGS
                else dict(metavar=flag.split("-")[-1].upper()))
        parser.add_argument(
            f"--{flag}",
            default=os.environ.get(env, default),
            help=f"{text}{shown} [env {env}]",
            **kind,
        )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        config = Config.from_args(args)
    except ConfigError as err:
        print(f"mvcckv serve: error: {err}", file=sys.stderr)
        return 2
    # The server (grpc, the engines) is imported only once the flags parse.
    from mvcckv.server.app import main

    return main(config)

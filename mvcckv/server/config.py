"""``mvcckv serve`` flags: etcd's names and defaults, each also an environment
variable (``--data-dir`` ⇔ ``MVCCKV_DATA_DIR``; a flag on the command line
wins over the variable, as with etcd's ``ETCD_*``).

Differences from etcd, on purpose:

* ``--advertise-client-urls`` defaults to the listen URLs, so that clients
  which sync their endpoint list from MemberList (``clientURLs``) reach a
  URL the server really listens on.
* Only ``http://`` listen URLs: there is no TLS yet.
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

# (flag, default, help).  The default None of --data-dir and
# --advertise-client-urls means "derived", as the help says.
_FLAGS: tuple[tuple[str, str | None, str], ...] = (
    ("name", "default", "Human-readable name of this member (MemberList)."),
    ("data-dir", None, "Path to the data directory (default: ./<name>.mvcckv, i.e. ./default.mvcckv)."),
    ("backend", None,
     "Where the data lives: empty for the LMDB store in --data-dir (the default), or a "
     "postgresql:// URL to keep it in PostgreSQL (mvcckv.pg; --data-dir is then unused)."),
    ("listen-client-urls", "http://127.0.0.1:2379",
     "Comma-separated http:// URLs to serve clients on; the host must be an IP address or "
     "localhost and only that address is bound."),
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
    ("emulated-version", EMULATED_VERSION,
     "etcd server version reported by Status (etcdctl endpoint status)."),
)


def env_name(flag: str) -> str:
    return ENV_PREFIX + flag.upper().replace("-", "_")


class ConfigError(ValueError):
    """A flag value that cannot be served with."""


@dataclass(frozen=True)
class Listener:
    url: str
    host: str
    port: int

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
    emulated_version: str = EMULATED_VERSION

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Config":
        """Check and convert parsed flags; raises ConfigError."""
        name = args.name
        listeners = tuple(parse_listen_url(u) for u in _split(args.listen_client_urls))
        if not listeners:
            raise ConfigError("--listen-client-urls is empty")
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
        version = args.emulated_version
        if not re.fullmatch(r"\d+\.\d+\.\d+", version):
            raise ConfigError(f"--emulated-version must look like 3.6.14, not {version!r}")
        progress = _progress_interval(args.experimental_watch_progress_notify_interval)
        backend = args.backend or ""
        if backend and urllib.parse.urlsplit(backend).scheme not in ("postgresql", "postgres"):
            raise ConfigError(f"--backend must be a postgresql:// URL (or empty for LMDB), not {backend!r}")
        max_request = _int("max-request-bytes", args.max_request_bytes)
        max_ops = _int("max-txn-ops", args.max_txn_ops)
        if max_request <= 0 or max_ops <= 0:
            raise ConfigError("--max-request-bytes and --max-txn-ops must be positive")
        return cls(
            name=name,
            data_dir=args.data_dir or f"{name}.mvcckv",
            backend=backend,
            listeners=listeners,
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
            emulated_version=version,
        )


def parse_listen_url(url: str) -> Listener:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http":
        raise ConfigError(f"listen URL {url!r}: only http:// is supported (mvcckv has no TLS)")
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
    return Listener(url=url, host=host, port=port)


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
        parser.add_argument(
            f"--{flag}",
            default=os.environ.get(env, default),
            metavar=flag.split("-")[-1].upper(),
            help=f"{text}{shown} [env {env}]",
        )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        config = Config.from_args(args)
    except ConfigError as err:
        print(f"mvcckv serve: error: {err}", file=sys.stderr)
        return 2
    if config.backend:
        from mvcckv.pg.serve import main
    else:
        from mvcckv.server.app import main

    return main(config)

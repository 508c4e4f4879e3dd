#!/usr/bin/env python3
"""What auth and TLS cost ``mvcckv serve``: h2load-driven, built on grpc_load.py.

One invocation starts the same server several times on free loopback ports,
each with a fresh data directory, measures them in one run (grpc_load's
``benchmark``: warm-up on each, then run 1 on every server, run 2, ...),
stops them and deletes their data:

``mvcckv``       auth off, plaintext: the baseline of both comparisons
``mvcckv+auth``  auth on (simple tokens).  Every request carries the token
                 (``token: <t>`` header) of a non-root user whose one role
                 holds ``--permissions`` READWRITE prefix permissions:
                 ``bench/get`` and ``bench/put`` (the prefixes around the
                 workload keys) and ``bench/0/``, ``bench/1/``, ... as filler
``mvcckv+tls``   auth off, https with a self-signed certificate made at
                 start (h2load does not verify it; the gRPC checks do)

``--compare control`` adds ``mvcckv#2``, a second baseline: the ratio of two
identical servers in the same run, i.e. how far apart noise alone puts them.
``--etcd-reference`` adds the same variants of ``/usr/bin/etcd``.

Before any load, each workload's exact request is sent once with a Python
gRPC call, with the token where auth is on, and must succeed (h2load counts
an HTTP 200 carrying a ``grpc-status`` error as a success); on the auth
servers the same request without a token must be refused, so auth is known
to be on.  The figures are medians over ``--runs``; ratios compare one
server's medians with its baseline's: QPS, and requests per server
CPU-second (the inverse of CPU per request, the figure that a noisy machine
disturbs least).  Both read "fraction of the baseline kept": 1.00 is free.

Example (the default workloads and levels)::

    .venv/bin/python bench/bench_auth.py --runs 3 --duration 5 --retry-noisy 15
    .venv/bin/python bench/bench_auth.py --compare auth,control --etcd-reference --markdown /tmp/auth.md
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable, Iterator, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
if ROOT not in sys.path:
    sys.path.insert(1, ROOT)

import grpc_load as gl  # noqa: E402

DEFAULT_WORKLOADS = ("get-serializable", "put")
DEFAULT_LEVELS = (1, 64)
COMPARISONS = ("auth", "tls", "control")
DEFAULT_COMPARISONS = ("auth", "tls")
PERMISSION_FILLER = b"bench/%d/"
ROOT_PASSWORD = "bench-root"
USER, ROLE, USER_PASSWORD = "bench", "bench", "bench-user"
# Long enough that no token expires between two runs on the auth server,
# whatever else runs in between; the same flag for every server.
TOKEN_TTL_S = 3600
RPC_TIMEOUT_S = 30.0


# ---------------------------------------------------------------------------
# what the servers are


@dataclasses.dataclass(frozen=True)
class Variant:
    """One server configuration: which product, auth on or off, http or https.
    ``second`` is a second baseline (the A/A control: what two identical
    servers differ by in the same run)."""
    product: str    # "mvcckv" or "etcd"
    auth: bool = False
    tls: bool = False
    second: bool = False

    @property
    def name(self) -> str:
        return (self.product + ("+auth" if self.auth else "") + ("+tls" if self.tls else "")
                + ("#2" if self.second else ""))

    @property
    def is_baseline(self) -> bool:
        return not (self.auth or self.tls or self.second)


def variants(products: Sequence[str], compare: Sequence[str]) -> list[Variant]:
    """The baseline of each product, then one variant per comparison."""
    out = []
    for product in products:
        out.append(Variant(product))
        if "auth" in compare:
            out.append(Variant(product, auth=True))
        if "tls" in compare:
            out.append(Variant(product, tls=True))
        if "control" in compare:
            out.append(Variant(product, second=True))
    return out


def comparisons(vs: Sequence[Variant]) -> list[tuple[str, str, str]]:
    """(label, server, baseline server) for every non-baseline variant."""
    out = []
    for v in vs:
        if not v.is_baseline:
            what = ("auth on / off" if v.auth else "TLS / plaintext" if v.tls
                    else "A/A: 2nd baseline / baseline")
            out.append((f"{v.product} {what}", v.name, Variant(v.product).name))
    return out


def permission_prefixes(count: int, keys: Sequence[bytes]) -> list[bytes]:
    """``count`` prefixes: each workload key (as a prefix of itself, so the
    key lies inside it) and ``bench/<i>/`` filler.  No two of them touch,
    so the user's permissions stay ``count`` separate intervals."""
    keys = sorted(set(keys))
    if count < len(keys):
        raise ValueError(f"need at least {len(keys)} permissions, one per workload key")
    filler = [PERMISSION_FILLER % i for i in range(count - len(keys))]
    return keys + filler


def token_header(token: str) -> str:
    """The request header etcd's clients send the token in (gRPC metadata ``token``)."""
    if not token or any(c in token for c in "\r\n"):
        raise ValueError("empty token, or a line break in it")
    return f"token: {token}"


# ---------------------------------------------------------------------------
# starting servers


def self_signed_cert(host: str = "127.0.0.1") -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM): ECDSA P-256, its own CA, valid one day for
    ``host``, so a gRPC client can trust it by passing it as the root."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench_auth")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def server_argv(v: Variant, port: int, datadir: str, *, mvcckv: Sequence[str], etcd: str,
                bcrypt_cost: int, tls_files: tuple[str, str] | None) -> list[str]:
    """The command line of one server.  Auth is switched on later, over gRPC;
    every variant of a product gets the same flags but the URL scheme and
    the certificate."""
    scheme = "https" if v.tls else "http"
    url = f"{scheme}://127.0.0.1:{port}"
    if v.product == "mvcckv":
        argv = [*mvcckv, "serve", "--name", "bench", "--data-dir", datadir,
                "--listen-client-urls", url, "--advertise-client-urls", url]
    elif v.product == "etcd":
        argv = gl.reference_command("etcd", port, datadir, etcd)
        for flag in ("--listen-client-urls", "--advertise-client-urls"):
            argv[argv.index(flag) + 1] = url
    else:
        raise ValueError(f"unknown product {v.product!r}")
    argv += ["--bcrypt-cost", str(bcrypt_cost), "--auth-token-ttl", str(TOKEN_TTL_S)]
    if v.tls:
        if tls_files is None:
            raise ValueError("an https server needs a certificate")
        argv += ["--cert-file", tls_files[0], "--key-file", tls_files[1]]
    return argv


@contextlib.contextmanager
def started(name: str, argv_for: Callable[[str], list[str]], url: str, server_cpus: set[int] | None,
            tmp_root: str | None, credentials=None, ready_timeout: float = 60.0) -> Iterator[gl.Server]:
    """Runs ``argv_for(data dir)`` with a data dir in a fresh temporary
    directory until the block ends, pinned to ``server_cpus``; then stops
    it (SIGTERM, SIGKILL after 5 s) and deletes the directory."""
    workdir = tempfile.mkdtemp(prefix=f"bench-auth-{name.replace('+', '-')}-", dir=tmp_root)
    argv = argv_for(os.path.join(workdir, "data"))
    if server_cpus and shutil.which("taskset"):
        argv = ["taskset", "-c", ",".join(map(str, sorted(server_cpus)))] + argv
    log_path = os.path.join(workdir, "server.log")
    proc = None
    try:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True, cwd=workdir)
        server = gl.Server(name, url, proc.pid, proc, workdir, log_path)
        try:
            gl._wait_ready(gl.target_address(url), proc, ready_timeout, credentials)
        except Exception as e:
            raise RuntimeError(f"{name} did not start: {e}\n{server.log_tail()}") from None
        if server_cpus:
            gl.pin_process(proc.pid, server_cpus)
        yield server
    finally:
        if proc is not None:
            gl.stop_process(proc)
        shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------------------
# auth setup over gRPC (not on the measured path)


def enable_auth(address: str, prefixes: Sequence[bytes], credentials=None,
                timeout: float = RPC_TIMEOUT_S) -> str:
    """root (role root), role ``bench`` with READWRITE on each prefix, user
    ``bench`` with that role; auth on; the user's token."""
    from mvcckv.pb import auth_pb2, rpc_pb2, rpc_pb2_grpc

    with gl.open_channel(address, credentials) as ch:
        stub = rpc_pb2_grpc.AuthStub(ch)
        stub.UserAdd(rpc_pb2.AuthUserAddRequest(name="root", password=ROOT_PASSWORD), timeout=timeout)
        stub.UserGrantRole(rpc_pb2.AuthUserGrantRoleRequest(user="root", role="root"), timeout=timeout)
        stub.RoleAdd(rpc_pb2.AuthRoleAddRequest(name=ROLE), timeout=timeout)
        for prefix in prefixes:
            perm = auth_pb2.Permission(permType=auth_pb2.Permission.READWRITE, key=prefix,
                                       range_end=gl.prefix_end(prefix))
            stub.RoleGrantPermission(rpc_pb2.AuthRoleGrantPermissionRequest(name=ROLE, perm=perm),
                                     timeout=timeout)
        stub.UserAdd(rpc_pb2.AuthUserAddRequest(name=USER, password=USER_PASSWORD), timeout=timeout)
        stub.UserGrantRole(rpc_pb2.AuthUserGrantRoleRequest(user=USER, role=ROLE), timeout=timeout)
        perms = stub.RoleGet(rpc_pb2.AuthRoleGetRequest(role=ROLE), timeout=timeout)
        if len(perms.perm) != len(prefixes):
            raise RuntimeError(f"role {ROLE} has {len(perms.perm)} permissions, expected {len(prefixes)}")
        stub.AuthEnable(rpc_pb2.AuthEnableRequest(), timeout=timeout)
        resp = stub.Authenticate(rpc_pb2.AuthenticateRequest(name=USER, password=USER_PASSWORD),
                                 timeout=timeout)
    return resp.token


def refused_without_token(address: str, wl: gl.Workload, credentials=None) -> str | None:
    """The status name of the workload's request sent without a token; None
    if it succeeded (then auth is not on)."""
    import grpc

    try:
        gl.grpc_unary(address, wl.path, wl.message, credentials=credentials)
    except grpc.RpcError as e:
        return e.code().name
    return None


# ---------------------------------------------------------------------------
# tables


def _fmt(v: float | None, digits: int) -> str:
    return gl._fmt(v, digits)


def ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or not den:
        return None
    return num / den


def format_figures(results: dict[str, list[gl.Row]], order: Sequence[str]) -> str:
    """One row per server, workload and level: medians over the runs."""
    head = ["server", "workload", "conc", "c x m", "QPS", "p50 ms", "p99 ms", "srv CPU s/1k req",
            "srv CPU %", "other CPU %", "h2load CPU %", "failed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    rows = [(name, row) for name in order for row in results.get(name, ())]
    rows.sort(key=lambda nr: (nr[1].workload, nr[1].concurrency, order.index(nr[0])))
    for name, row in rows:
        qps = _fmt(row.rps, 0) + (" (!)" if row.notes else "")
        lines.append("| " + " | ".join([
            name, row.workload, str(row.concurrency), row.shape, qps, _fmt(row.p50_ms, 2),
            _fmt(row.p99_ms, 2), _fmt(row.cpu_per_kop, 3), _fmt(row.server_busy_pct, 0),
            _fmt(row.noise_pct, 0), _fmt(row.gen_cpu_pct, 0), str(row.failed)]) + " |")
        notes += [f"- {name} {row.workload} @ {row.concurrency}: {n}" for n in row.notes]
    return "\n".join(lines + ([""] + notes if notes else []))


def ratio_rows(results: dict[str, list[gl.Row]], comps: Sequence[tuple[str, str, str]]
               ) -> list[tuple[str, str, int, float | None, float | None]]:
    """(comparison, workload, level, QPS ratio, requests per CPU-second ratio),
    server over its baseline, for every row the baseline has."""
    out = []
    for label, name, base in comps:
        for b in results.get(base, ()):
            a = _find(results.get(name, ()), b.workload, b.concurrency)
            if a is None:
                out.append((label, b.workload, b.concurrency, None, None))
                continue
            # requests per CPU-second is the inverse of CPU per request
            out.append((label, b.workload, b.concurrency, ratio(a.rps, b.rps),
                        ratio(b.cpu_per_kop, a.cpu_per_kop)))
    return out


def _find(rows: Sequence[gl.Row], workload: str, level: int) -> gl.Row | None:
    for row in rows:
        if row.workload == workload and row.concurrency == level:
            return row
    return None


def format_ratios(results: dict[str, list[gl.Row]], comps: Sequence[tuple[str, str, str]]) -> str:
    """One row per comparison, workload and level: the QPS ratio and the
    requests-per-CPU-second ratio (server / its baseline)."""
    head = ["comparison", "workload", "conc", "QPS ratio", "req per CPU-s ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, workload, level, q, c in ratio_rows(results, comps):
        lines.append("| " + " | ".join([label, workload, str(level), _fmt(q, 2), _fmt(c, 2)]) + " |")
    return "\n".join(lines)


def command_line(argv: Sequence[str], python: str = sys.executable, script: str = __file__,
                 cwd: str | None = None) -> str:
    """The command as typed from ``cwd`` (paths inside it made relative)."""
    cwd = cwd or os.getcwd()

    def rel(path: str) -> str:
        path = os.path.abspath(path)
        return os.path.relpath(path, cwd) if path.startswith(cwd + os.sep) else path

    return shlex.join([rel(python), rel(script), *argv])


def _tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out.strip().splitlines()[0] if out.strip() else "?"


def machine_note(h2load: str, etcd: str | None) -> str:
    """CPU model and count, and the versions that the figures depend on."""
    model = "?"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    import grpc

    parts = [f"{os.cpu_count()} CPUs ({model})", f"Linux {platform.release()}",
             f"CPython {platform.python_version()}", f"grpcio {grpc.__version__}",
             _tool_version([h2load, "--version"])]
    if etcd:
        parts.append(_tool_version([etcd, "--version"]))
    return ", ".join(parts)


# ---------------------------------------------------------------------------


def _parse_levels(text: str) -> list[int]:
    levels = [int(x) for x in gl._parse_list(text)]
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("concurrency levels must be >= 1")
    return levels


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description="Auth and TLS overhead of mvcckv serve, measured "
                                            "with h2load (see bench/README.md)")
    p.add_argument("--workload", default=",".join(DEFAULT_WORKLOADS),
                   type=lambda s: gl._parse_list(s, gl.WORKLOAD_NAMES),
                   help=f"comma list of {', '.join(gl.WORKLOAD_NAMES)} "
                        f"(default {','.join(DEFAULT_WORKLOADS)})")
    p.add_argument("--concurrency", default=",".join(map(str, DEFAULT_LEVELS)), type=_parse_levels,
                   help="outstanding requests per level (default 1,64)")
    p.add_argument("--connections", type=int, default=4,
                   help="HTTP/2 connections per level, capped at the level (default 4)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per run (default 5)")
    p.add_argument("--runs", type=int, default=3, help="runs per row; tables show medians (default 3)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of unmeasured load before each row")
    p.add_argument("--retry-noisy", type=float, metavar="PCT",
                   help="repeat a run (up to 3 times) when other processes used more than PCT%% "
                        "of the server's core during it")
    p.add_argument("--compare", default=",".join(DEFAULT_COMPARISONS),
                   type=lambda s: gl._parse_list(s, COMPARISONS),
                   help="comma list of the variants started besides the baseline: auth, tls, control "
                        "(a second, identical baseline: the noise floor of a ratio); default auth,tls")
    p.add_argument("--permissions", type=int, default=100,
                   help="READWRITE prefix permissions of the benchmark user's role (default 100)")
    p.add_argument("--etcd-reference", dest="with_etcd", action="store_true",
                   help="also measure etcd the same way, for reference")
    p.add_argument("--etcd", default=shutil.which("etcd") or "/usr/bin/etcd")
    p.add_argument("--mvcckv", default=f"{shlex.quote(sys.executable)} -m mvcckv",
                   help="command that runs mvcckv (default: this Python, -m mvcckv)")
    p.add_argument("--bcrypt-cost", type=int, default=4,
                   help="bcrypt cost of the setup's passwords (default 4: not on the measured path)")
    p.add_argument("--h2load", default=shutil.which("h2load") or "h2load")
    p.add_argument("--no-pin", action="store_true", help="do not set CPU affinities")
    p.add_argument("--tmp-dir", help="parent of the temporary data dirs (default: system temp)")
    p.add_argument("--json", help="also write every run's numbers to this file")
    p.add_argument("--markdown", help="also write the report (command, machine, tables) to this file")
    args = p.parse_args(argv)
    if args.runs < 1 or args.duration <= 0:
        p.error("--runs must be >= 1 and --duration > 0")
    if not shutil.which(args.h2load):
        p.error(f"h2load not found ({args.h2load}); install the nghttp2-client package")
    if args.with_etcd and not os.path.exists(args.etcd):
        p.error(f"etcd not found ({args.etcd})")
    wls = gl.workloads()
    try:
        prefixes = permission_prefixes(args.permissions, [gl.PUT_KEY, gl.GET_KEY])
    except ValueError as e:
        p.error(str(e))

    def _interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    server_cpus, load_cpus = (None, None) if args.no_pin else gl.plan_cpus()
    if load_cpus:
        os.sched_setaffinity(0, load_cpus)   # h2load and this script on the load core
    pin_note = (f"servers on cpu {sorted(server_cpus)}, h2load on cpu {sorted(load_cpus)}"
                if server_cpus else "no CPU pinning")
    command = command_line(argv)
    started_at = time.monotonic()
    vs = variants(["mvcckv"] + (["etcd"] if args.with_etcd else []), args.compare)
    comps = comparisons(vs)

    with contextlib.ExitStack() as stack:
        workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-auth-", dir=args.tmp_dir))
        root_cert = tls_files = None
        if any(v.tls for v in vs):
            root_cert, key_pem = self_signed_cert()
            tls_files = (os.path.join(workdir, "cert.pem"), os.path.join(workdir, "key.pem"))
            with open(tls_files[0], "wb") as f:
                f.write(root_cert)
            with open(os.open(tls_files[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
                f.write(key_pem)
        endpoints: list[gl.Endpoint] = []
        for v in vs:
            port = gl.free_port()
            url = f"{'https' if v.tls else 'http'}://127.0.0.1:{port}"
            creds = gl.Endpoint(v.name, url, None, root_cert=root_cert).credentials()

            def argv_for(datadir: str, v=v, port=port) -> list[str]:
                return server_argv(v, port, datadir, mvcckv=shlex.split(args.mvcckv), etcd=args.etcd,
                                   bcrypt_cost=args.bcrypt_cost, tls_files=tls_files)
            srv = stack.enter_context(started(v.name, argv_for, url, server_cpus, args.tmp_dir, creds))
            log(f"# started {v.name} on {url} (pid {srv.pid})")
            headers: tuple[str, ...] = ()
            if v.auth:
                addr = gl.target_address(url)
                token = enable_auth(addr, prefixes, creds)
                headers = (token_header(token),)
                for name in args.workload:
                    code = refused_without_token(addr, wls[name], creds)
                    if code is None:
                        raise RuntimeError(f"{v.name}: {name} without a token succeeded: auth is not on")
                    log(f"# {v.name}: auth on, user {USER!r} with {len(prefixes)} prefix permissions; "
                        f"{name} without a token: {code}")
            endpoints.append(gl.Endpoint(v.name, url, srv.pid, headers, root_cert))
        results = gl.benchmark(endpoints, args.workload, args.concurrency,
                               connections=args.connections, duration=args.duration, requests=None,
                               runs=args.runs, warmup=args.warmup, workdir=workdir, h2load=args.h2load,
                               server_cpus=server_cpus, retry_noisy=args.retry_noisy, log=log)

    order = [v.name for v in vs]
    elapsed = time.monotonic() - started_at
    report = "\n".join([
        "## Auth and TLS overhead", "",
        f"Command (from {os.getcwd()}, {elapsed:.0f} s):", "",
        f"    {command}", "",
        f"Machine: {machine_note(args.h2load, args.etcd if args.with_etcd else None)}.", "",
        f"{args.duration:g} s x {args.runs} runs per row after {args.warmup:g} s of warm-up, medians; "
        f"runs interleaved across servers; {pin_note}; {args.connections} HTTP/2 connections per "
        f"level (capped at the level); auth user with {len(prefixes)} READWRITE prefix permissions, "
        f"simple token.", "",
        "### Figures", "",
        format_figures(results, order), "",
        "### Ratios (server / its baseline; 1.00 = no overhead)", "",
        format_ratios(results, comps), "",
    ])
    print(report)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({name: [dataclasses.asdict(r) for row in rows for r in row.runs]
                       for name, rows in results.items()}, f, indent=1)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)

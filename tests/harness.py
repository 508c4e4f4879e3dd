"""Test harness: real etcd and mvcckv as child processes, etcdctl, raw gRPC.

Interop tests drive a server with ``etcdctl``; differential tests send the
same requests to real etcd and to mvcckv and compare the answers after
:func:`normalize`.  Everything here works without mvcckv's generated
protobuf modules (requests can be built with :func:`pb_encode` and sent with
:func:`call`), and nothing imports ``mvcckv`` at import time.

    with EtcdProcess() as etcd:
        etcd.etcdctl("put", "foo", "bar")
        resp = etcd.etcdctl("get", "foo")          # parsed ``-w json`` output
        assert kvs(resp)[0]["value"] == b"bar"

        with grpc_channel(etcd.endpoint) as ch:
            reply = call(ch, "/etcdserverpb.KV/Range", pb_encode((1, b"foo")))
            header = pb_decode(pb_decode(reply.data)[1][0])

Servers listen on 127.0.0.1 only, on ports picked by :func:`free_port`.
Every wait is bounded in time and in iterations.  Processes still running
when the interpreter exits are stopped by an ``atexit`` hook, and on Linux
each child also gets SIGKILL if the thread that started it dies (``setpriv
--pdeathsig``), so a killed test run leaves no server behind.  Start servers
from the main thread (pytest fixtures do).
"""

from __future__ import annotations

import atexit
import base64
import json as _json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Self, Sequence

import grpc

REPO_ROOT = Path(__file__).resolve().parent.parent

STARTUP_TIMEOUT = 20.0
"""Seconds a server gets to answer gRPC before start() fails."""

STOP_TIMEOUT = 10.0
"""Seconds between SIGTERM and SIGKILL in stop()."""

FAST_ELECTION = ("--heartbeat-interval=10", "--election-timeout=100")
"""etcd flags that cut its startup from 0.1-1.0 s to under 0.15 s.

Not the default: the minimum lease TTL and the request timeout are derived
from the election timeout, so etcd started with these flags no longer has
etcd's default lease semantics (minimum TTL 1 s instead of 2 s).
"""

_LOG_TAIL_CHARS = 6000
_POLL_INTERVAL = 0.02


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago.

    Another process can take it before the server binds it; start() retries
    with fresh ports when a server reports "address already in use".
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_binary(name: str) -> str | None:
    """Path of ``name`` on PATH, else the Debian package's /usr/bin copy."""
    found = shutil.which(name)
    if found:
        return found
    fallback = Path("/usr/bin") / name
    return str(fallback) if os.access(fallback, os.X_OK) else None


def _target(endpoint: str) -> str:
    """``host:port`` from ``host:port`` or ``http://host:port/``."""
    return endpoint.removeprefix("http://").rstrip("/")


# --- server processes ------------------------------------------------------


class ServerStartError(AssertionError):
    """A server did not become ready; the message carries its log tail."""


_LIVE: set["ServerProcess"] = set()


@atexit.register
def stop_all() -> None:
    """Stop every server this process started and has not stopped yet."""
    for server in list(_LIVE):
        server.stop()


class ServerProcess:
    """A server speaking etcd's v3 gRPC API, run as a child process.

    Subclasses provide ``_command()``.  Life cycle: ``start()`` launches the
    process and waits until it answers gRPC; ``restart()`` stops it and
    starts it again on the same ports and data directory; ``stop()`` ends it
    and deletes the private work directory (logs, temporary data).  Also a
    context manager.

    Ready means: the client port accepts TCP and a ``KV/Range`` call on the
    key ``health`` (what ``etcdctl endpoint health`` sends) gets any answer
    other than UNAVAILABLE or DEADLINE_EXCEEDED.

    With ``channel_credentials`` (``grpc.ssl_channel_credentials(...)``) the
    client port is https:// and the readiness check and :meth:`channel` use
    them.
    """

    name = "server"
    _start_attempts = 3  # fresh ports after "address already in use"

    def __init__(
        self,
        *,
        extra_args: Sequence[str] = (),
        log_path: str | os.PathLike[str] | None = None,
        startup_timeout: float = STARTUP_TIMEOUT,
        stop_timeout: float = STOP_TIMEOUT,
        channel_credentials: grpc.ChannelCredentials | None = None,
    ):
        self.extra_args = tuple(extra_args)
        self.channel_credentials = channel_credentials
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.workdir: Path | None = None
        self._given_log_path = Path(log_path) if log_path is not None else None
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    # -- addresses --

    @property
    def endpoint(self) -> str:
        """``127.0.0.1:PORT``: what etcdctl --endpoints and gRPC take."""
        return f"127.0.0.1:{self.port}"

    @property
    def client_url(self) -> str:
        scheme = "https" if self.channel_credentials is not None else "http"
        return f"{scheme}://{self.endpoint}"

    @property
    def log_path(self) -> Path:
        if self._given_log_path is not None:
            return self._given_log_path
        assert self.workdir is not None, "server not started"
        return self.workdir / f"{self.name}.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except (OSError, AssertionError):
            return ""

    # -- life cycle --

    def start(self) -> Self:
        assert not self.alive(), f"{self.name} already running"
        if self.workdir is None or not self.workdir.exists():
            self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.name}-test-"))
        _LIVE.add(self)
        try:
            for attempt in range(1, self._start_attempts + 1):
                self._pick_ports()
                try:
                    self._launch()
                    return self
                except ServerStartError:
                    if "address already in use" not in self._log_tail() \
                            or attempt == self._start_attempts:
                        raise
                    self._terminate(kill=True)
        except BaseException:
            self.stop()
            raise
        raise AssertionError("unreachable")

    def restart(self, *, kill: bool = False) -> None:
        """Stop and start again on the same ports with the same data.

        ``kill=True`` sends SIGKILL instead of SIGTERM: a crash, for
        recovery tests.
        """
        self._terminate(kill=kill)
        try:
            self._launch()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Terminate (SIGTERM, SIGKILL after stop_timeout) and clean up.

        Idempotent.  Deletes the work directory, never a caller's data dir.
        """
        self._terminate(kill=False)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        _LIVE.discard(self)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- clients --

    def etcdctl(self, *args: str | bytes, **kwargs: Any) -> Any:
        """:func:`etcdctl` against this server."""
        return etcdctl(self.endpoint, *args, **kwargs)

    def channel(self) -> grpc.Channel:
        """A new :func:`grpc_channel` to this server; close it when done."""
        return grpc_channel(self.endpoint, credentials=self.channel_credentials)

    # -- internals --

    def _pick_ports(self) -> None:
        self.port = free_port()

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _env(self) -> dict[str, str]:
        return dict(os.environ)

    def _launch(self) -> None:
        command = self._command()
        prefix = _pdeathsig_prefix()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"=== {' '.join(command)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                prefix + command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=self._env(),
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout
        max_polls = int(self.startup_timeout / _POLL_INTERVAL) + 10
        channel: grpc.Channel | None = None
        try:
            for _ in range(max_polls):
                if self._proc.poll() is not None:
                    self._fail(f"exited with code {self._proc.returncode}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if not _accepts_tcp(self.port, timeout=min(0.2, remaining)):
                    time.sleep(_POLL_INTERVAL)
                    continue
                if channel is None:
                    channel = self.channel()
                reply = call(
                    channel,
                    "/etcdserverpb.KV/Range",
                    pb_encode((1, b"health")),
                    timeout=max(0.05, min(1.0, remaining)),
                    wait_for_ready=True,
                )
                if reply.code not in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ):
                    return
                time.sleep(_POLL_INTERVAL)
            self._fail(f"not ready after {self.startup_timeout:.0f} s")
        finally:
            if channel is not None:
                channel.close()

    def _fail(self, why: str) -> None:
        raise ServerStartError(
            f"{self.name} on {self.endpoint} {why}\n"
            f"command: {' '.join(self._command())}\n"
            f"log {self.log_path} (tail):\n{self._log_tail()}"
        )

    def _log_tail(self) -> str:
        return self.log_text()[-_LOG_TAIL_CHARS:]

    def _terminate(self, *, kill: bool) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=self.stop_timeout)


class EtcdProcess(ServerProcess):
    """Real etcd (single member named ``default``) with a temporary data dir.

    Startup takes 0.1-1.0 s (median 0.7 s) with etcd's default election
    timeout, spent waiting for the randomized first election; pass
    ``extra_args=FAST_ELECTION`` when lease timing does not matter.
    ``ETCD_*``/``ETCDCTL_*`` variables of the caller's environment are not
    passed on (etcd would read them as flags).
    """

    name = "etcd"

    def __init__(self, *, binary: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.binary = binary or find_binary("etcd")
        self.peer_port = 0

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def data_dir(self) -> Path:
        assert self.workdir is not None, "server not started"
        return self.workdir / "data"

    def start(self) -> Self:
        if self.binary is None:
            raise FileNotFoundError("etcd binary not found on PATH or in /usr/bin")
        return super().start()

    def _pick_ports(self) -> None:
        self.port = free_port()
        self.peer_port = free_port()
        while self.peer_port == self.port:
            self.peer_port = free_port()

    def _command(self) -> list[str]:
        assert self.binary is not None
        return [
            self.binary,
            "--name", "default",
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", f"default={self.peer_url}",
            *self.extra_args,
        ]

    def _env(self) -> dict[str, str]:
        return {
            k: v for k, v in os.environ.items()
            if not k.startswith(("ETCD_", "ETCDCTL_"))
        }


class MvcckvProcess(ServerProcess):
    """``python -m mvcckv serve`` on a data dir (given, or temporary).

    A given ``data_dir`` survives stop(); a temporary one is deleted with
    the work directory.  The child runs this checkout's ``mvcckv`` (the
    repository root is put first on its PYTHONPATH).
    """

    name = "mvcckv"

    def __init__(self, data_dir: str | os.PathLike[str] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self._given_data_dir = Path(data_dir) if data_dir is not None else None

    @property
    def data_dir(self) -> Path:
        if self._given_data_dir is not None:
            return self._given_data_dir
        assert self.workdir is not None, "server not started"
        return self.workdir / "data"

    def _command(self) -> list[str]:
        return [
            sys.executable, "-m", "mvcckv", "serve",
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            *self.extra_args,
        ]

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p
        )
        env["PYTHONUNBUFFERED"] = "1"
        return env


def _accepts_tcp(port: int, *, timeout: float) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def _pdeathsig_prefix() -> list[str]:
    setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []


# --- etcdctl ---------------------------------------------------------------


class EtcdctlError(Exception):
    """etcdctl exited non-zero (or printed no JSON when JSON was asked for).

    ``message`` is etcd's error text as etcdctl prints it after ``Error: ``,
    e.g. ``etcdserver: mvcc: required revision has been compacted``;
    ``stderr`` is everything, including etcdctl's JSON-formatted retry
    warnings.
    """

    def __init__(self, argv: Sequence[str], returncode: int, stdout: bytes, stderr: bytes,
                 problem: str = ""):
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr.decode(errors="replace")
        self.message = problem or _error_line(self.stderr)
        super().__init__(
            f"{' '.join(self.argv)} exited {returncode}: {self.message}\n"
            f"--- stderr ---\n{self.stderr}"
            + (f"--- stdout ---\n{stdout.decode(errors='replace')}" if problem else "")
        )


def _error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("Error: "):
            return line.removeprefix("Error: ")
    return lines[-1] if lines else ""


def etcdctl(
    endpoint: str,
    *args: str | bytes,
    json: bool = True,
    check: bool = True,
    input: bytes | str | None = None,
    timeout: float = 30.0,
) -> Any:
    """Run ``etcdctl --endpoints=ENDPOINT [-w json] ARGS`` with ETCDCTL_API=3.

    json=True, check=True: the parsed JSON output (raises EtcdctlError on a
    non-zero exit or non-JSON output).  json=False, or check=False: the
    ``CompletedProcess`` (bytes stdout/stderr), whatever the exit code.
    Some etcdctl 3.4 commands print text even under ``-w json``
    (``compaction``, ``version``); run those with json=False.
    """
    binary = find_binary("etcdctl")
    if binary is None:
        raise FileNotFoundError("etcdctl binary not found on PATH or in /usr/bin")
    argv = [binary, f"--endpoints={_target(endpoint)}"]
    if json:
        argv += ["-w", "json"]
    argv += args
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL_")}
    env["ETCDCTL_API"] = "3"
    data = input.encode() if isinstance(input, str) else input
    proc = subprocess.run(
        argv, input=data, capture_output=True, timeout=timeout, env=env,
        stdin=None if data is not None else subprocess.DEVNULL,
    )
    shown = [os.fsdecode(a) for a in argv]
    if check and proc.returncode != 0:
        raise EtcdctlError(shown, proc.returncode, proc.stdout, proc.stderr)
    if not (json and check):
        return proc
    try:
        return _json.loads(proc.stdout)
    except ValueError:
        raise EtcdctlError(shown, proc.returncode, proc.stdout, proc.stderr,
                           problem="stdout is not JSON (pass json=False)") from None


# --- decoding etcdctl JSON -------------------------------------------------

BYTES_FIELDS = frozenset({"key", "value", "range_end"})
"""Fields etcdctl prints as base64 (``[]byte`` in etcd's Go types)."""

BYTES_LIST_FIELDS = frozenset({"keys"})
"""Lists of base64 strings (``lease timetolive --keys``)."""

KV_DEFAULTS: dict[str, Any] = {
    "key": b"", "create_revision": 0, "mod_revision": 0,
    "version": 0, "value": b"", "lease": 0,
}
"""A KeyValue with every field; etcdctl omits zero and empty ones."""


def decode(obj: Any) -> Any:
    """Copy of etcdctl JSON with base64 key/value fields turned into bytes.

    Numbers are already ints (etcdctl 3.4 prints int64 and uint64 as JSON
    numbers, not the proto3-JSON strings of the HTTP gateway).
    """
    if isinstance(obj, list):
        return [decode(item) for item in obj]
    if not isinstance(obj, dict):
        return obj
    out = {}
    for name, value in obj.items():
        if name in BYTES_FIELDS and isinstance(value, str):
            out[name] = base64.b64decode(value)
        elif name in BYTES_LIST_FIELDS and isinstance(value, list):
            out[name] = [base64.b64decode(v) if isinstance(v, str) else v for v in value]
        else:
            out[name] = decode(value)
    return out


def kvs(response: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``kvs`` of a get (or ``prev_kvs`` of a delete) response, decoded,
    each with all six KeyValue fields."""
    items = response.get("kvs", response.get("prev_kvs", []))
    return [{**KV_DEFAULTS, **decode(kv)} for kv in items]


# --- raw gRPC --------------------------------------------------------------

CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    # Test servers are local; an http_proxy in the environment must not apply.
    ("grpc.enable_http_proxy", 0),
    # No client-side size caps, so the server's limits are what tests see.
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
    # Reconnect quickly after a server restart (grpc's default backoff is 1 s+).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


def grpc_channel(endpoint: str, options: Iterable[tuple[str, Any]] = (),
                 credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
    """A channel to ``host:port`` (or ``http://host:port``): insecure, or
    TLS with ``credentials``."""
    if credentials is not None:
        return grpc.secure_channel(_target(endpoint), credentials, options=[*CHANNEL_OPTIONS, *options])
    return grpc.insecure_channel(_target(endpoint), options=[*CHANNEL_OPTIONS, *options])


@dataclass(frozen=True)
class RpcReply:
    """Outcome of a unary call: response bytes, or gRPC status and details."""

    code: grpc.StatusCode
    details: str
    data: bytes | None

    @property
    def ok(self) -> bool:
        return self.code == grpc.StatusCode.OK


def _identity(data: bytes) -> bytes:
    return data


def call(
    channel: grpc.Channel,
    method: str,
    request: bytes = b"",
    *,
    timeout: float = 10.0,
    metadata: Sequence[tuple[str, str]] | None = None,
    wait_for_ready: bool | None = None,
) -> RpcReply:
    """Unary call of ``method`` (e.g. ``/etcdserverpb.KV/Range``) with raw
    request bytes; never raises grpc.RpcError."""
    stub = channel.unary_unary(
        method, request_serializer=_identity, response_deserializer=_identity
    )
    try:
        data = stub(request, timeout=timeout, metadata=metadata, wait_for_ready=wait_for_ready)
    except grpc.RpcError as err:
        return RpcReply(err.code(), err.details() or "", None)
    return RpcReply(grpc.StatusCode.OK, "", data)


def stub(channel: grpc.Channel, service: str = "KV") -> Any:
    """Typed stub from mvcckv's generated modules, e.g. ``stub(ch, "Lease")``.

    Raises ImportError until ``mvcckv/pb/rpc_pb2_grpc.py`` exists; tests can
    guard with ``pytest.importorskip("mvcckv.pb.rpc_pb2_grpc")``.
    """
    from mvcckv.pb import rpc_pb2_grpc

    return getattr(rpc_pb2_grpc, f"{service}Stub")(channel)


# --- protobuf wire format, by hand -----------------------------------------

_U64 = (1 << 64) - 1


def _varint(n: int) -> bytes:
    n &= _U64  # negative int64 is sent as its two's complement, 10 bytes
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def pb_encode(*fields: tuple[int, int | bool | bytes | str]) -> bytes:
    """Encode ``(field_number, value)`` pairs in the given order.

    ints and bools are varints; bytes and str are length-delimited (a nested
    message is the bytes of another pb_encode).  Repeat a number for a
    repeated field.  ``pb_encode((1, b"foo")) == b"\\n\\x03foo"``.
    """
    out = bytearray()
    for number, value in fields:
        if isinstance(value, (bool, int)):
            out += _varint(number << 3) + _varint(int(value))
        else:
            raw = value.encode() if isinstance(value, str) else bytes(value)
            out += _varint(number << 3 | 2) + _varint(len(raw)) + raw
    return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    for _ in range(10):
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
    raise ValueError("varint longer than 10 bytes")


def pb_decode(data: bytes) -> dict[int, list[int | bytes]]:
    """Field number -> values in wire order (varints as unsigned ints,
    length-delimited fields as bytes: decode nested messages again)."""
    fields: dict[int, list[int | bytes]] = {}
    pos = 0
    while pos < len(data):
        tag, pos = _read_varint(data, pos)
        number, wire_type = tag >> 3, tag & 7
        value: int | bytes
        if wire_type == 0:
            value, pos = _read_varint(data, pos)
        elif wire_type == 2:
            size, pos = _read_varint(data, pos)
            value, pos = data[pos:pos + size], pos + size
        elif wire_type in (1, 5):
            width = 8 if wire_type == 1 else 4
            value, pos = int.from_bytes(data[pos:pos + width], "little"), pos + width
        else:
            raise ValueError(f"unsupported wire type {wire_type} for field {number}")
        fields.setdefault(number, []).append(value)
    if pos != len(data):
        raise ValueError("truncated message")
    return fields


def as_int64(value: int) -> int:
    """A decoded varint read as int64 (negative numbers come back huge)."""
    return value - (1 << 64) if value >= 1 << 63 else value


# --- differential comparison -----------------------------------------------

_ALWAYS_VOLATILE = frozenset({
    "cluster_id", "member_id", "raft_term",  # ResponseHeader: identity and raft
    "memberID",                              # AlarmMember: a member ID
    "Endpoint", "endpoint", "took",          # etcdctl's endpoint wrappers
})
_STATUS_MARKERS = frozenset({
    "dbSize", "dbSizeInUse", "leader", "raftIndex", "raftTerm", "raftAppliedIndex",
})
_STATUS_VOLATILE = _STATUS_MARKERS | {
    "version", "storageVersion", "dbSizeQuota", "downgradeInfo",
}
_MEMBER_MARKERS = frozenset({"peerURLs", "clientURLs"})
_MEMBER_VOLATILE = frozenset({"ID", "peerURLs", "clientURLs"})
_HASH_FIELDS = frozenset({"hash"})
# Status.errors names alarms as "memberID:<id> alarm:NOSPACE ".
_MEMBER_ID_IN_TEXT = re.compile(r"memberID:\d+")


def normalize(obj: Any, *, keep: Iterable[str] = ()) -> Any:
    """A plain copy of ``obj`` without fields that differ legitimately
    between etcd and mvcckv (or between two etcds on different ports).

    ``obj`` is a protobuf message (converted to a dict of its set fields, by
    proto field name, bytes kept as bytes), etcdctl JSON, or lists of them.
    Removed: header ``cluster_id``/``member_id``/``raft_term``; in a
    StatusResponse the version, sizes, leader and raft fields; in a Member
    its ``ID`` and URLs; AlarmMember ``memberID`` (and the member ID inside
    Status ``errors`` texts); ``hash`` (HashResponse
    and HashKVResponse); etcdctl's ``Endpoint``/``took``.  ``keep`` names
    fields to leave in, e.g. ``keep={"hash"}`` for HashKV, which mvcckv is
    meant to reproduce exactly.

    Lease IDs are not touched: etcd picks them at random unless the request
    names one, so differential tests should grant leases with explicit IDs.
    """
    kept = frozenset(keep)
    return _strip(_plain(obj), kept)


def _plain(obj: Any) -> Any:
    if hasattr(obj, "ListFields") and hasattr(obj, "DESCRIPTOR"):
        return {field.name: _plain_field(field, value) for field, value in obj.ListFields()}
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _plain_field(field: Any, value: Any) -> Any:
    repeated = getattr(field, "is_repeated", None)
    if repeated is None:
        repeated = field.label == field.LABEL_REPEATED
    if repeated:
        return [_plain(v) for v in value]
    return _plain(value)


def _strip(obj: Any, kept: frozenset[str]) -> Any:
    if isinstance(obj, list):
        return [_strip(v, kept) for v in obj]
    if not isinstance(obj, dict):
        return obj
    drop = set(_ALWAYS_VOLATILE | _HASH_FIELDS)
    if _STATUS_MARKERS & obj.keys():
        drop |= _STATUS_VOLATILE
        if isinstance(obj.get("errors"), list):
            obj = {**obj, "errors": [
                _MEMBER_ID_IN_TEXT.sub("memberID:<id>", e) if isinstance(e, str) else e
                for e in obj["errors"]]}
    if _MEMBER_MARKERS & obj.keys():
        drop |= _MEMBER_VOLATILE
    drop -= kept
    return {k: _strip(v, kept) for k, v in obj.items() if k not in drop}

"""Low-CPU load generation for etcd's v3 gRPC API, driven by h2load.

The load comes from ``h2load`` (nghttp2, C), not from a Python client, so the
load generator costs a fraction of a core and never competes with the server
being measured.  This module:

* hand-encodes the protobuf request bodies (no generated code) and wraps them
  in gRPC length-prefixed frames, one data file per workload;
* runs h2load against ``/etcdserverpb.KV/<Method>`` with
  ``content-type: application/grpc`` and ``te: trailers``, pinned to one core
  while the server is pinned to the other;
* parses h2load's summary, and computes p50/p99 from its ``--log-file``
  (h2load prints no percentiles);
* reads the server's CPU time from ``/proc/<pid>/stat`` around each run;
* checks every workload once with a real gRPC call (h2load counts an HTTP
  200 as success even when ``grpc-status`` is not 0), and flags runs whose
  response bytes per request are too small to be real answers;
* optionally starts reference servers (the no-op gRPC server and a real
  etcd) on free loopback ports and reports each row's ratio against them.

Workloads (``--workload``):

* ``put``               PutRequest{key, 256-byte value}; the same key every time
                        (h2load sends one body), so every request makes a new
                        revision of one key
* ``get-serializable``  RangeRequest{key, serializable=true} of one existing key
* ``get-linearizable``  RangeRequest{key} of the same key (consensus read)
* ``range100``          RangeRequest{key=prefix, range_end=prefix+1} over 100 keys

Example::

    python bench/grpc_load.py --target http://127.0.0.1:2379 --server-pid 1234 \\
        --workload put,get-serializable --concurrency 1,16,64 --duration 5 --runs 3
    python bench/grpc_load.py --reference            # no-op servers + etcd only
    python bench/grpc_load.py --target http://127.0.0.1:2379 --reference noop-aio,etcd
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from typing import Iterable, Iterator, Sequence

VALUE_SIZE = 256
RANGE_KEYS = 100
PUT_KEY = b"bench/put"
GET_KEY = b"bench/get"
RANGE_PREFIX = b"bench/range/"
KV_SERVICE = "/etcdserverpb.KV/"
HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------
# protobuf wire format, by hand


def encode_varint(n: int) -> bytes:
    """Base-128 varint.  Negative numbers are encoded as 64-bit two's complement."""
    if n < 0:
        n &= (1 << 64) - 1
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def decode_varint(buf: bytes, pos: int = 0) -> tuple[int, int]:
    """Returns (value, position after the varint)."""
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def field_varint(number: int, value: int) -> bytes:
    """A varint field (wire type 0); proto3 omits zero, so do we."""
    if not value:
        return b""
    return encode_varint(number << 3) + encode_varint(value)


def field_bool(number: int, value: bool) -> bytes:
    return field_varint(number, 1 if value else 0)


def field_bytes(number: int, value: bytes) -> bytes:
    """A length-delimited field (wire type 2); empty is omitted, as proto3 does."""
    if not value:
        return b""
    return encode_varint((number << 3) | 2) + encode_varint(len(value)) + value


def iter_fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """Yields (field number, wire type, value) for varint and length-delimited fields."""
    pos = 0
    while pos < len(buf):
        tag, pos = decode_varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = decode_varint(buf, pos)
        elif wire == 2:
            length, pos = decode_varint(buf, pos)
            if pos + length > len(buf):
                raise ValueError("truncated length-delimited field")
            value, pos = bytes(buf[pos:pos + length]), pos + length
        elif wire == 1:
            value, pos = int.from_bytes(buf[pos:pos + 8], "little"), pos + 8
        elif wire == 5:
            value, pos = int.from_bytes(buf[pos:pos + 4], "little"), pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield number, wire, value


# etcdserverpb requests


def put_request(key: bytes, value: bytes) -> bytes:
    """PutRequest{1: key, 2: value}."""
    return field_bytes(1, key) + field_bytes(2, value)


def range_request(key: bytes, range_end: bytes = b"", serializable: bool = False) -> bytes:
    """RangeRequest{1: key, 2: range_end, 7: serializable}."""
    return field_bytes(1, key) + field_bytes(2, range_end) + field_bool(7, serializable)


def prefix_end(prefix: bytes) -> bytes:
    """etcd's GetPrefixRangeEnd: the prefix with its last non-0xff byte incremented."""
    end = bytearray(prefix)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[:i + 1])
    return b"\x00"  # all 0xff: to the end of the keyspace


def grpc_frame(message: bytes) -> bytes:
    """gRPC length-prefixed message: compressed flag 0, 4-byte big-endian length."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


# etcdserverpb / mvccpb responses (for the no-op server and for tests)


def response_header(cluster_id: int, member_id: int, revision: int, raft_term: int) -> bytes:
    """ResponseHeader{1 cluster_id, 2 member_id, 3 revision, 4 raft_term}."""
    return (field_varint(1, cluster_id) + field_varint(2, member_id)
            + field_varint(3, revision) + field_varint(4, raft_term))


def key_value(key: bytes, create_revision: int, mod_revision: int, version: int,
              value: bytes, lease: int = 0) -> bytes:
    """mvccpb.KeyValue{1 key, 2 create_revision, 3 mod_revision, 4 version, 5 value, 6 lease}."""
    return (field_bytes(1, key) + field_varint(2, create_revision) + field_varint(3, mod_revision)
            + field_varint(4, version) + field_bytes(5, value) + field_varint(6, lease))


def range_response(header: bytes, kvs: Sequence[bytes], count: int, more: bool = False) -> bytes:
    """RangeResponse{1 header, 2 kvs (repeated), 3 more, 4 count}."""
    out = bytearray(encode_varint((1 << 3) | 2) + encode_varint(len(header)) + header)
    for kv in kvs:
        out += encode_varint((2 << 3) | 2) + encode_varint(len(kv)) + kv
    out += field_bool(3, more) + field_varint(4, count)
    return bytes(out)


def put_response(header: bytes) -> bytes:
    """PutResponse{1 header}."""
    return encode_varint((1 << 3) | 2) + encode_varint(len(header)) + header


def summarize_response(method: str, body: bytes) -> dict:
    """The few fields the checks need: header revision, kv count, value sizes."""
    info: dict = {"bytes": len(body), "revision": 0}
    kvs = []
    for number, _, value in iter_fields(body):
        if number == 1:
            for hnum, _, hval in iter_fields(value):
                if hnum == 3:
                    info["revision"] = hval
        elif method == "Range" and number == 2:
            kvs.append(dict((n, v) for n, _, v in iter_fields(value)))
        elif method == "Range" and number == 4:
            info["count"] = value
    if method == "Range":
        info["kvs"] = len(kvs)
        info.setdefault("count", 0)
        info["value_sizes"] = sorted({len(kv.get(5, b"")) for kv in kvs})
    return info


# ---------------------------------------------------------------------------
# workloads


def make_value(size: int = VALUE_SIZE) -> bytes:
    return (b"0123456789abcdef" * (size // 16 + 1))[:size]


def range_keys(n: int = RANGE_KEYS) -> list[bytes]:
    return [RANGE_PREFIX + b"%03d" % i for i in range(n)]


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    method: str                       # "Put" or "Range"
    message: bytes                    # the protobuf request body
    setup: tuple[tuple[bytes, bytes], ...] = ()   # keys to put first
    expect_kvs: int | None = None     # kvs a real store returns

    @property
    def path(self) -> str:
        return KV_SERVICE + self.method

    @property
    def frame(self) -> bytes:
        return grpc_frame(self.message)


def workloads(value_size: int = VALUE_SIZE) -> dict[str, Workload]:
    value = make_value(value_size)
    rkeys = range_keys()
    get_setup = ((GET_KEY, value),)
    return {
        "put": Workload("put", "Put", put_request(PUT_KEY, value)),
        "get-serializable": Workload(
            "get-serializable", "Range", range_request(GET_KEY, serializable=True), get_setup, 1),
        "get-linearizable": Workload(
            "get-linearizable", "Range", range_request(GET_KEY), get_setup, 1),
        "range100": Workload(
            "range100", "Range", range_request(RANGE_PREFIX, prefix_end(RANGE_PREFIX)),
            tuple((k, value) for k in rkeys), len(rkeys)),
    }


WORKLOAD_NAMES = ("put", "get-serializable", "get-linearizable", "range100")


# ---------------------------------------------------------------------------
# h2load: command line, output, latency log

_UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
_SIZE = {"": 1, "B": 1, "KB": 1024, "MB": 1024 ** 2, "GB": 1024 ** 3}


def parse_duration(text: str) -> float:
    """h2load's durations ('295us', '2.72ms', '5.00s') in seconds."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*(us|ms|s)\s*", text)
    if not m:
        raise ValueError(f"not an h2load duration: {text!r}")
    return float(m.group(1)) * _UNIT[m.group(2)]


def split_concurrency(concurrency: int, connections: int) -> tuple[int, int]:
    """(clients, streams per client) with clients * streams == concurrency.

    ``connections`` is the wanted number of HTTP/2 connections; it is capped at
    the concurrency and lowered to the nearest divisor of it.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    c = max(1, min(connections, concurrency))
    while concurrency % c:
        c -= 1
    return c, concurrency // c


def h2load_argv(url: str, data_path: str, clients: int, streams: int, *,
                duration: float | None = None, requests: int | None = None,
                log_path: str | None = None, h2load: str = "h2load",
                headers: Sequence[str] = ()) -> list[str]:
    """The h2load command for one run: one thread, gRPC headers, POST of the frame.

    ``headers`` are extra ``name: value`` request headers (gRPC metadata such
    as ``token: <t>``), sent with every request.
    """
    argv = [h2load, "-t", "1", "-c", str(clients), "-m", str(streams),
            "-d", data_path,
            "-H", "content-type: application/grpc",
            "-H", "te: trailers"]
    for header in headers:
        argv += ["-H", header]
    if duration is not None:
        argv += ["-D", f"{max(1, round(duration * 1000))}ms"]
    else:
        argv += ["-n", str(requests or 1)]
    if log_path:
        argv += ["--log-file", log_path]
    return argv + [url]


def parse_h2load_output(text: str) -> dict:
    """Parses h2load's summary into numbers (times in seconds, sizes in bytes)."""
    out: dict = {}
    m = re.search(r"finished in ([0-9.]+(?:us|ms|s)), ([0-9.]+) req/s", text)
    if not m:
        raise ValueError("h2load output has no 'finished in' line:\n" + text[-2000:])
    out["elapsed_s"] = parse_duration(m.group(1))
    out["rps"] = float(m.group(2))
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                  r"(\d+) failed, (\d+) errored, (\d+) timeout", text)
    if not m:
        raise ValueError("h2load output has no 'requests:' line")
    for key, val in zip(("total", "started", "done", "succeeded", "failed", "errored", "timeout"),
                        m.groups()):
        out[key] = int(val)
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    if m:
        out["status_2xx"], out["status_3xx"], out["status_4xx"], out["status_5xx"] = map(int, m.groups())
    m = re.search(r"traffic: .*?\((\d+)\) total, .*?\((\d+)\) headers.*?, .*?\((\d+)\) data", text)
    if m:
        out["traffic_total"], out["traffic_headers"], out["traffic_data"] = map(int, m.groups())
    m = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", text)
    if m:
        lo, hi, mean, sd = (parse_duration(x) for x in m.groups())
        out.update(lat_min_s=lo, lat_max_s=hi, lat_mean_s=mean, lat_sd_s=sd)
    return out


def read_latency_log(path: str) -> tuple[list[int], int]:
    """h2load --log-file: (latencies in microseconds of answered requests, failed count).

    Columns: start time (us since epoch), HTTP status (-1 = failed stream),
    microseconds until the end of the response.
    """
    latencies: list[int] = []
    failed = 0
    with open(path, "rb") as f:
        for line in f:
            parts = line.split(b"\t")
            if len(parts) < 3:
                continue
            if int(parts[1]) < 0:
                failed += 1
            else:
                latencies.append(int(parts[2]))
    return latencies, failed


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (the smallest value with at least p% at or below it)."""
    if not sorted_values:
        return math.nan
    if p <= 0:
        return sorted_values[0]
    rank = math.ceil(p / 100.0 * len(sorted_values))
    return sorted_values[min(len(sorted_values), rank) - 1]


# ---------------------------------------------------------------------------
# processes: CPU time, pinning, ports, reference servers

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[bytes]:
    """/proc/<pid>/stat fields after the command name (field 3 onwards)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return stat[stat.rindex(b")") + 2:].split()


def process_tree(pid: int) -> list[int]:
    """The process and all its descendants (a server started behind `timeout`,
    a shell script or a supervisor is still measured)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(_stat_fields(int(entry))[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, ()))
    return tree


def cpu_seconds(pid: int, tree: bool = True) -> float:
    """utime + stime (all threads) from /proc/<pid>/stat, with descendants by default."""
    total = 0
    for p in process_tree(pid) if tree else [pid]:
        try:
            fields = _stat_fields(p)
        except OSError:
            if p == pid:
                raise
            continue
        total += int(fields[11]) + int(fields[12])   # fields 14 and 15: utime, stime
    return total / CLK_TCK


def pin_process(pid: int, cpus: Iterable[int]) -> None:
    """Sets the affinity of every thread of a process and its descendants
    (threads and processes created later inherit it)."""
    cpus = set(cpus)
    for p in process_tree(pid):
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{p}/task")]
        except FileNotFoundError:
            continue
        for tid in tids:
            with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
                os.sched_setaffinity(tid, cpus)


def core_busy_seconds(cpus: Iterable[int]) -> float:
    """Non-idle time of the given cores from /proc/stat (user, nice, system, irq,
    softirq, steal), in seconds.  Minus the server's own CPU time, what remains
    is other processes (and the hypervisor) on the server's core."""
    wanted = {f"cpu{c}".encode() for c in cpus}
    ticks = 0
    with open("/proc/stat", "rb") as f:
        for line in f:
            parts = line.split()
            if parts and parts[0] in wanted:
                user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, parts[1:9])
                ticks += user + nice + system + irq + softirq + steal
    return ticks / CLK_TCK


def plan_cpus(choice: tuple[int, int] | None = None) -> tuple[set[int] | None, set[int] | None]:
    """(server cpus, load cpus): first allowed core for the server, second for
    h2load, or the (server, load) cores of ``choice``."""
    if choice is not None:
        return {choice[0]}, {choice[1]}
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        return None, None
    return {allowed[0]}, {allowed[1]}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def target_address(url: str) -> str:
    """'http://127.0.0.1:2379' (or https://) -> '127.0.0.1:2379'."""
    u = urllib.parse.urlsplit(url if "//" in url else "http://" + url)
    if u.scheme not in ("http", "https", ""):
        raise ValueError("only http:// and https:// targets are supported")
    return f"{u.hostname}:{u.port or 2379}"


def is_tls(url: str) -> bool:
    return url.startswith("https://")


def header_metadata(headers: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """'name: value' request headers as gRPC metadata: (('name', 'value'), ...).

    gRPC metadata keys are lower case; so are HTTP/2 header names.
    """
    out = []
    for header in headers:
        name, sep, value = header.partition(":")
        if not sep or not name.strip():
            raise ValueError(f"not a 'name: value' header: {header!r}")
        out.append((name.strip().lower(), value.strip()))
    return tuple(out)


def open_channel(address: str, credentials=None):
    """A plaintext channel, or a TLS one with ``credentials``
    (``grpc.ssl_channel_credentials``)."""
    import grpc

    if credentials is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, credentials)


def _wait_ready(address: str, proc: subprocess.Popen | None, timeout: float,
                credentials=None) -> None:
    import grpc

    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode} before serving")
        with open_channel(address, credentials) as ch:
            try:
                grpc.channel_ready_future(ch).result(timeout=0.5)
                return
            except grpc.FutureTimeoutError:
                pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"server on {address} not ready after {timeout:.0f}s")


@dataclasses.dataclass
class Server:
    name: str
    url: str
    pid: int | None
    proc: subprocess.Popen | None = None
    workdir: str | None = None
    log_path: str | None = None

    def log_tail(self, n: int = 20) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, "rb") as f:
            return b"".join(f.readlines()[-n:]).decode(errors="replace")


REFERENCES = ("noop-aio", "noop-threads", "noop-durable", "etcd")


def parse_reference(kind: str) -> tuple[str, dict]:
    """'noop-threads/8/registered' -> ('noop-threads', {'workers': 8, 'handlers': 'registered'});
    'noop-aio/uvloop' -> ('noop-aio', {'loop': 'uvloop'})."""
    base, *opts = kind.split("/")
    if base not in REFERENCES:
        raise ValueError(f"unknown reference server {kind!r}")
    extra: dict = {}
    for opt in opts:
        if base == "etcd":
            raise ValueError("etcd takes no options")
        if opt.isdigit():
            extra["workers"] = int(opt)
        elif opt in ("generic", "registered"):
            extra["handlers"] = opt
        elif opt in ("asyncio", "uvloop") and base != "noop-threads":
            extra["loop"] = opt
        else:
            raise ValueError(f"unknown option {opt!r} in {kind!r}")
    return base, extra


def reference_command(kind: str, port: int, datadir: str, etcd: str = "etcd",
                      noop_workers: int = 16) -> list[str]:
    base, extra = parse_reference(kind)
    if base.startswith("noop-"):
        argv = [sys.executable, os.path.join(HERE, "noop_server.py"), "--port", str(port),
                "--mode", base.split("-")[1], "--workers", str(extra.get("workers", noop_workers)),
                "--handlers", extra.get("handlers", "generic")]
        if base == "noop-durable":
            argv += ["--log-dir", datadir]
        if "loop" in extra:
            argv += ["--loop", extra["loop"]]
        return argv
    if base == "etcd":
        peer = free_port()
        return [etcd, "--name", "bench", "--data-dir", datadir,
                "--listen-client-urls", f"http://127.0.0.1:{port}",
                "--advertise-client-urls", f"http://127.0.0.1:{port}",
                "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-cluster", f"bench=http://127.0.0.1:{peer}",
                "--logger", "zap", "--log-outputs", "stderr"]
    raise ValueError(f"unknown reference server {kind!r}")


@contextlib.contextmanager
def reference_server(kind: str, server_cpus: set[int] | None, tmp_root: str | None = None,
                     etcd: str = "etcd", noop_workers: int = 16,
                     ready_timeout: float = 30.0) -> Iterator[Server]:
    """Starts a reference server on a free loopback port; stops it and removes its data after."""
    workdir = tempfile.mkdtemp(prefix=f"bench-{kind.replace('/', '-')}-", dir=tmp_root)
    port = free_port()
    argv = reference_command(kind, port, os.path.join(workdir, "data"), etcd, noop_workers)
    if server_cpus and shutil.which("taskset"):
        argv = ["taskset", "-c", ",".join(map(str, sorted(server_cpus)))] + argv
    log_path = os.path.join(workdir, "server.log")
    proc = None
    try:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True)
        server = Server(kind, f"http://127.0.0.1:{port}", proc.pid, proc, workdir, log_path)
        try:
            _wait_ready(f"127.0.0.1:{port}", proc, ready_timeout)
        except Exception as e:
            raise RuntimeError(f"{kind} did not start: {e}\n{server.log_tail()}") from None
        if server_cpus:
            pin_process(proc.pid, server_cpus)
        yield server
    finally:
        if proc is not None:
            stop_process(proc)
        shutil.rmtree(workdir, ignore_errors=True)


def stop_process(proc: subprocess.Popen, grace: float = 5.0) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(grace)


# ---------------------------------------------------------------------------
# gRPC-level setup and check (Python client; not on the measured path)


def grpc_unary(address: str, path: str, message: bytes, timeout: float = 10.0, channel=None, *,
               metadata: Sequence[tuple[str, str]] = (), credentials=None) -> bytes:
    """One raw unary call: bytes in, bytes out; raises grpc.RpcError on a non-OK status.

    ``metadata`` is sent with the call (e.g. ``(("token", t),)``); ``credentials``
    makes the channel TLS when none is given.
    """
    if channel is None:
        with open_channel(address, credentials) as ch:
            return grpc_unary(address, path, message, timeout, ch, metadata=metadata)
    call = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
    return call(message, timeout=timeout, metadata=tuple(metadata) or None)


def setup_workload(address: str, wl: Workload, *, metadata: Sequence[tuple[str, str]] = (),
                   credentials=None) -> None:
    """Puts the keys a read workload needs."""
    if not wl.setup:
        return
    with open_channel(address, credentials) as ch:
        for key, value in wl.setup:
            grpc_unary(address, KV_SERVICE + "Put", put_request(key, value), channel=ch,
                       metadata=metadata)


def check_workload(address: str, wl: Workload, *, metadata: Sequence[tuple[str, str]] = (),
                   credentials=None) -> dict:
    """Sends the workload's exact message once; grpc-status must be 0.

    Returns the response summary plus ``frame_bytes`` (the size of one answer's
    gRPC DATA payload, used to spot answers without a body during the run) and
    ``content_ok`` (kv count as a real store would answer; None when not checked).
    """
    body = grpc_unary(address, wl.path, wl.message, metadata=metadata, credentials=credentials)
    info = summarize_response(wl.method, body)
    info["frame_bytes"] = len(body) + 5
    info["content_ok"] = None if wl.expect_kvs is None else info.get("kvs") == wl.expect_kvs
    return info


# ---------------------------------------------------------------------------
# one run, many runs


@dataclasses.dataclass
class RunResult:
    server: str
    workload: str
    concurrency: int
    clients: int
    streams: int
    rps: float
    succeeded: int
    failed: int
    errored: int
    lat_mean_ms: float
    lat_sd_ms: float
    lat_max_ms: float
    p50_ms: float
    p99_ms: float
    logged: int
    data_bytes: int
    server_cpu_s: float | None
    gen_cpu_s: float
    other_cpu_s: float | None   # other processes on the server's core during the run
    elapsed_s: float       # h2load's measured duration
    wall_s: float = math.nan   # the whole h2load process, connect to exit

    @property
    def cpu_per_kop(self) -> float | None:
        if self.server_cpu_s is None or not self.succeeded:
            return None
        return self.server_cpu_s / self.succeeded * 1000.0

    @property
    def gen_cpu_pct(self) -> float:
        return 100.0 * self.gen_cpu_s / self.wall_s if self.wall_s else math.nan

    @property
    def noise_pct(self) -> float | None:
        if self.other_cpu_s is None or not self.wall_s:
            return None
        return 100.0 * self.other_cpu_s / self.wall_s

    @property
    def server_busy_pct(self) -> float | None:
        if self.server_cpu_s is None or not self.wall_s:
            return None
        return 100.0 * self.server_cpu_s / self.wall_s


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_h2load(url: str, wl: Workload, concurrency: int, connections: int, workdir: str, *,
               duration: float | None, requests: int | None, server_pid: int | None,
               server_name: str = "target", h2load: str = "h2load",
               timeout: float | None = None, server_cpus: set[int] | None = None,
               headers: Sequence[str] = ()) -> RunResult:
    """One bounded h2load run; returns its numbers.  ``headers``: extra request
    headers (``name: value``), e.g. an auth token."""
    clients, streams = split_concurrency(concurrency, connections)
    data_path = os.path.join(workdir, f"{wl.name}.frame")
    if not os.path.exists(data_path):
        with open(data_path, "wb") as f:
            f.write(wl.frame)
    log_path = os.path.join(workdir, "latency.log")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(log_path)
    argv = h2load_argv(url.rstrip("/") + wl.path, data_path, clients, streams,
                       duration=duration, requests=requests, log_path=log_path, h2load=h2load,
                       headers=headers)
    if timeout is None:
        timeout = (duration + 30.0) if duration is not None else 120.0

    cpu0 = cpu_seconds(server_pid) if server_pid else None
    core0 = core_busy_seconds(server_cpus) if server_cpus else None
    gen0 = _children_cpu()
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except BaseException:
        stop_process(proc, grace=2.0)
        raise
    elapsed = time.monotonic() - t0
    cpu1 = cpu_seconds(server_pid) if server_pid else None
    core1 = core_busy_seconds(server_cpus) if server_cpus else None
    other = None
    if core0 is not None and cpu0 is not None:
        other = max(0.0, (core1 - core0) - (cpu1 - cpu0))
    gen_cpu = _children_cpu() - gen0
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"h2load exited with {proc.returncode}:\n{text[-2000:]}")
    s = parse_h2load_output(text)
    lat, _ = read_latency_log(log_path)
    lat.sort()
    os.unlink(log_path)
    return RunResult(
        server=server_name, workload=wl.name, concurrency=concurrency,
        clients=clients, streams=streams, rps=s["rps"],
        succeeded=s["succeeded"], failed=s["failed"], errored=s["errored"],
        lat_mean_ms=s.get("lat_mean_s", math.nan) * 1e3, lat_sd_ms=s.get("lat_sd_s", math.nan) * 1e3,
        lat_max_ms=s.get("lat_max_s", math.nan) * 1e3,
        p50_ms=percentile(lat, 50) / 1e3, p99_ms=percentile(lat, 99) / 1e3, logged=len(lat),
        data_bytes=s.get("traffic_data", 0),
        server_cpu_s=(cpu1 - cpu0) if cpu0 is not None else None,
        gen_cpu_s=gen_cpu, other_cpu_s=other, elapsed_s=s.get("elapsed_s") or elapsed, wall_s=elapsed,
    )


@dataclasses.dataclass
class Row:
    """Medians over runs of one (server, workload, concurrency)."""
    server: str
    workload: str
    concurrency: int
    shape: str
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_per_kop: float | None
    server_busy_pct: float | None
    noise_pct: float | None
    failed: int            # summed over runs: h2load failed + errored
    gen_cpu_pct: float
    runs: list[RunResult]
    notes: list[str] = dataclasses.field(default_factory=list)


def _median(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(vals) if vals else None


def summarize_runs(runs: list[RunResult], check: dict | None = None) -> Row:
    r0 = runs[0]
    row = Row(
        server=r0.server, workload=r0.workload, concurrency=r0.concurrency,
        shape=f"{r0.clients}x{r0.streams}",
        rps=_median([r.rps for r in runs]),
        p50_ms=_median([r.p50_ms for r in runs]),
        p99_ms=_median([r.p99_ms for r in runs]),
        cpu_per_kop=_median([r.cpu_per_kop for r in runs]),
        server_busy_pct=_median([r.server_busy_pct for r in runs]),
        noise_pct=_median([r.noise_pct for r in runs]),
        failed=sum(r.failed + r.errored for r in runs),
        gen_cpu_pct=_median([r.gen_cpu_pct for r in runs]),
        runs=runs,
    )
    if all(r.server_cpu_s == 0 for r in runs) and sum(r.succeeded for r in runs) > 1000:
        row.notes.append("server CPU did not move: is --server-pid the serving process?")
    if check is not None:
        want = check["frame_bytes"]
        for r in runs:
            if r.succeeded and r.data_bytes < 0.9 * want * r.succeeded:
                row.notes.append(
                    f"{r.data_bytes / r.succeeded:.0f} response bytes/request, a real answer is "
                    f"{want}: some HTTP 200s were probably gRPC errors")
                break
    return row


# ---------------------------------------------------------------------------
# tables


def _fmt(v: float | None, digits: int) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:,.{digits}f}"


def format_table(rows: list[Row], references: dict[str, list[Row]] | None = None) -> str:
    """Markdown table of medians; with references, QPS and CPU-per-request
    ratios against each one, and each one's CPU per request."""
    refs = references or {}
    head = ["workload", "conc", "c x m", "QPS", "p50 ms", "p99 ms", "srv CPU s/1k ops",
            "srv CPU %", "other CPU %", "failed", "h2load CPU %"]
    for name in refs:
        head += [f"QPS / {name}", f"CPU/op / {name}", f"{name} CPU s/1k"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        # a row with a note (gRPC errors suspected) gets its QPS marked
        qps = _fmt(row.rps, 0) + (" (!)" if row.notes else "")
        cells = [row.workload, str(row.concurrency), row.shape, qps,
                 _fmt(row.p50_ms, 2), _fmt(row.p99_ms, 2), _fmt(row.cpu_per_kop, 3),
                 _fmt(row.server_busy_pct, 0), _fmt(row.noise_pct, 0), str(row.failed), _fmt(row.gen_cpu_pct, 0)]
        for ref_rows in refs.values():
            match = [r for r in ref_rows
                     if r.workload == row.workload and r.concurrency == row.concurrency]
            ref = match[0] if match else None
            cells.append(f"{row.rps / ref.rps:.2f}" if ref and ref.rps else "-")
            cells.append(f"{row.cpu_per_kop / ref.cpu_per_kop:.2f}"
                         if ref and row.cpu_per_kop and ref.cpu_per_kop else "-")
            # The reference's own CPU per request, beside the target's.
            cells.append(_fmt(ref.cpu_per_kop, 3) if ref else "-")
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {row.workload} @ {row.concurrency}: {n}" for row in rows for n in row.notes]
    return "\n".join(lines + ([""] + notes if notes else []))


# ---------------------------------------------------------------------------
# the benchmark


@dataclasses.dataclass
class Endpoint:
    name: str
    url: str
    pid: int | None
    headers: tuple[str, ...] = ()       # extra request headers, "name: value" (gRPC metadata)
    root_cert: bytes | None = None      # PEM the Python checks trust for an https:// url

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return header_metadata(self.headers)

    def credentials(self):
        """TLS channel credentials for the Python checks (None for http://).
        h2load does not verify certificates; the checks do."""
        if not is_tls(self.url):
            return None
        import grpc

        return grpc.ssl_channel_credentials(root_certificates=self.root_cert)


def benchmark(endpoints: list[Endpoint], names: list[str], levels: list[int], *,
              connections: int, duration: float | None, requests: int | None, runs: int,
              warmup: float, workdir: str, h2load: str = "h2load", value_size: int = VALUE_SIZE,
              server_cpus: set[int] | None = None, retry_noisy: float | None = None,
              retries: int = 3, log=print) -> dict[str, list[Row]]:
    """Runs every (workload, concurrency) on every endpoint, runs interleaved across endpoints.

    With ``retry_noisy`` (a percentage) a run during which other processes used
    more than that share of the server's core is repeated, up to ``retries`` times.
    """
    import grpc

    wls = workloads(value_size)
    checks: dict[tuple[str, str], dict] = {}
    for ep in endpoints:
        addr = target_address(ep.url)
        creds = ep.credentials()
        for name in names:
            wl = wls[name]
            try:
                setup_workload(addr, wl, metadata=ep.metadata, credentials=creds)
                info = check_workload(addr, wl, metadata=ep.metadata, credentials=creds)
            except grpc.RpcError as e:
                raise RuntimeError(f"{ep.name} {name}: the request fails before any load: "
                                   f"{e.code().name}: {e.details()}") from None
            checks[ep.name, name] = info
            detail = f"{info['bytes']} B answer"
            if wl.method == "Range":
                detail += f", {info['kvs']} kvs, count {info['count']}, values {info['value_sizes']}"
            if info["content_ok"] is False and not ep.name.startswith("noop"):
                detail += f"  WARNING: expected {wl.expect_kvs} kvs"
            log(f"# check {ep.name} {name}: grpc-status 0, {detail}")

    results: dict[str, list[Row]] = {ep.name: [] for ep in endpoints}
    for name in names:
        wl = wls[name]
        for level in levels:
            if warmup > 0:
                for ep in endpoints:
                    run_h2load(ep.url, wl, level, connections, workdir, duration=warmup,
                               requests=None, server_pid=None, server_name=ep.name, h2load=h2load,
                               headers=ep.headers)
            per_ep: dict[str, list[RunResult]] = {ep.name: [] for ep in endpoints}
            for i in range(runs):
                for ep in endpoints:
                    for attempt in range(retries + 1):
                        r = run_h2load(ep.url, wl, level, connections, workdir, duration=duration,
                                       requests=requests, server_pid=ep.pid, server_name=ep.name,
                                       h2load=h2load, server_cpus=server_cpus, headers=ep.headers)
                        if (retry_noisy is None or r.noise_pct is None
                                or r.noise_pct <= retry_noisy or attempt == retries):
                            break
                        log(f"# {ep.name:>12} {name:<16} c={level:<3} run {i + 1}/{runs}: others used "
                            f"{r.noise_pct:.0f}% of the server core, repeating")
                        time.sleep(2.0 * 2 ** attempt)   # 2, 4, 8 s: let the neighbour finish
                    per_ep[ep.name].append(r)
                    cpu = ("" if r.cpu_per_kop is None else
                           f"  srv {r.cpu_per_kop:.3f} CPU s/1k ({r.server_busy_pct:.0f}% busy)")
                    if r.noise_pct is not None:
                        cpu += f", others {r.noise_pct:.0f}% of srv core"
                    log(f"# {ep.name:>12} {name:<16} c={level:<3} run {i + 1}/{runs}: "
                        f"{r.rps:9.0f} req/s  p50 {r.p50_ms:6.2f} ms  p99 {r.p99_ms:6.2f} ms  "
                        f"failed {r.failed + r.errored}{cpu}  h2load {r.gen_cpu_pct:.0f}% CPU")
            for ep in endpoints:
                results[ep.name].append(summarize_runs(per_ep[ep.name], checks[ep.name, name]))
        # The same request once more: a server that broke under the load shows it here.
        for ep in endpoints:
            try:
                check_workload(target_address(ep.url), wl, metadata=ep.metadata,
                               credentials=ep.credentials())
            except grpc.RpcError as e:
                msg = (f"after this workload's runs the request fails: "
                       f"{e.code().name}: {e.details()}")
                log(f"# {ep.name} {name}: {msg}")
                results[ep.name][-1].notes.append(msg)
    return results


def _parse_list(text: str, allowed: Sequence[str] | None = None) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if allowed is not None:
        if items == ["all"]:
            return list(allowed)
        bad = [x for x in items if x not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown: {', '.join(bad)} (choose from {', '.join(allowed)})")
    return items


def _parse_cpus(text: str) -> tuple[int, int]:
    try:
        server, load = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SERVER,LOAD core numbers, got {text!r}") from None
    allowed = os.sched_getaffinity(0)
    if server == load or server not in allowed or load not in allowed:
        raise argparse.ArgumentTypeError(f"need two different cores among {sorted(allowed)}")
    return server, load


def _parse_references(text: str) -> list[str]:
    kinds = _parse_list(text)
    for kind in kinds:
        try:
            parse_reference(kind)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    if len(set(kinds)) != len(kinds):
        raise argparse.ArgumentTypeError("a reference server is named twice")
    return kinds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="h2load-driven benchmark of etcd's KV gRPC API (see bench/README.md)")
    p.add_argument("--target", help="server under test, e.g. http://127.0.0.1:2379")
    p.add_argument("--server-pid", type=int, help="its pid: pin it to the server core, report CPU")
    p.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'",
                   help="extra request header sent to --target (gRPC metadata, e.g. 'token: <t>'); "
                        "repeatable")
    p.add_argument("--cacert", help="PEM certificate the gRPC checks trust for an https:// --target "
                                    "(h2load does not verify certificates)")
    p.add_argument("--workload", default="all",
                   type=lambda s: _parse_list(s, WORKLOAD_NAMES),
                   help=f"comma list of {', '.join(WORKLOAD_NAMES)}, or 'all' (the default)")
    p.add_argument("--concurrency", default="1,16,64",
                   type=lambda s: [int(x) for x in _parse_list(s)],
                   help="outstanding requests per level (default 1,16,64)")
    p.add_argument("--connections", type=int, default=4,
                   help="HTTP/2 connections per level, capped at the level; streams per "
                        "connection = level / connections (default 4: 1x1, 4x4, 4x16)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per run (default 5)")
    p.add_argument("--requests", type=int, help="requests per run instead of --duration")
    p.add_argument("--runs", type=int, default=3, help="runs per row; the table shows medians")
    p.add_argument("--warmup", type=float, default=1.0,
                   help="seconds of unmeasured load before each row (0: none)")
    p.add_argument("--reference", nargs="?", const=",".join(REFERENCES), type=_parse_references,
                   help="also start and measure reference servers: comma list of noop-aio, "
                        "noop-threads, noop-durable, etcd (default: all four); a no-op takes options after "
                        "slashes, e.g. noop-threads/8/registered (8 workers, registered handlers), "
                        "noop-aio/uvloop (on uvloop's event loop)")
    p.add_argument("--noop-workers", type=int, default=16, help="thread pool of noop-threads")
    p.add_argument("--value-size", type=int, default=VALUE_SIZE)
    p.add_argument("--no-pin", action="store_true", help="do not set CPU affinities")
    p.add_argument("--cpus", type=_parse_cpus, metavar="SERVER,LOAD",
                   help="cores for the servers and for h2load (default: the first two allowed), "
                        "e.g. 1,0 when other work crowds core 0")
    p.add_argument("--retry-noisy", type=float, metavar="PCT",
                   help="repeat a run (up to 3 times) when other processes used more than PCT%% "
                        "of the server's core during it (needs pinning)")
    p.add_argument("--h2load", default=shutil.which("h2load") or "h2load")
    p.add_argument("--etcd", default=shutil.which("etcd") or "/usr/bin/etcd")
    p.add_argument("--tmp-dir", help="parent of the temporary data dirs (default: system temp)")
    p.add_argument("--json", help="also write every run's numbers to this file")
    args = p.parse_args(argv)

    if not args.target and not args.reference:
        p.error("give --target, --reference, or both")
    if args.requests is not None:
        args.duration = None
    try:
        header_metadata(args.header)
    except ValueError as e:
        p.error(str(e))
    root_cert = None
    if args.cacert:
        with open(args.cacert, "rb") as f:
            root_cert = f.read()
    if not shutil.which(args.h2load):
        p.error(f"h2load not found ({args.h2load}); install the nghttp2-client package")

    # SIGTERM/SIGHUP unwind like Ctrl-C, so started servers are always stopped.
    def _interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)

    server_cpus, load_cpus = (None, None) if args.no_pin else plan_cpus(args.cpus)
    if load_cpus:
        # h2load and every thread created from here on inherit the load core.
        os.sched_setaffinity(0, load_cpus)
    if args.target and args.server_pid and server_cpus:
        pin_process(args.server_pid, server_cpus)
    pin_note = (f"server on cpu {sorted(server_cpus)}, h2load on cpu {sorted(load_cpus)}"
                if server_cpus else "no CPU pinning")
    how = f"{args.duration:g} s" if args.duration is not None else f"{args.requests} requests"
    print(f"# {how} x {args.runs} runs per row, medians; {pin_note}; "
          f"connections per level: {args.connections}", flush=True)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    with contextlib.ExitStack() as stack:
        workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-h2load-", dir=args.tmp_dir))
        endpoints: list[Endpoint] = []
        if args.target:
            endpoints.append(Endpoint("target", args.target, args.server_pid,
                                      tuple(args.header), root_cert))
        for kind in args.reference or ():
            srv = stack.enter_context(reference_server(
                kind, server_cpus, args.tmp_dir, args.etcd, args.noop_workers))
            log(f"# started {kind} on {srv.url} (pid {srv.pid})")
            endpoints.append(Endpoint(kind, srv.url, srv.pid))
        results = benchmark(endpoints, args.workload, args.concurrency,
                            connections=args.connections, duration=args.duration,
                            requests=args.requests, runs=args.runs, warmup=args.warmup,
                            workdir=workdir, h2load=args.h2load, value_size=args.value_size,
                            server_cpus=server_cpus, retry_noisy=args.retry_noisy, log=log)

    refs = {ep.name: results[ep.name] for ep in endpoints if ep.name != "target"}
    if args.target:
        print(f"\n## target {args.target}\n")
        print(format_table(results["target"], refs))
    for name, rows in refs.items():
        print(f"\n## {name}\n")
        print(format_table(rows))
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

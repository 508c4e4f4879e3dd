"""``bench/compare.py``: one workload against every engine within reach.

Engines (each skipped, with the reason, when it cannot be reached):

* ``lmdb``     mvcckv served on its LMDB store (``mvcckv serve --data-dir``)
* ``pg``       mvcckv served on PostgreSQL (``mvcckv serve --backend postgresql://``)
* ``article``  the raw SQL functions of the article "etcd vs PostgreSQL"
               (``mvcckv/pg/article.sql``: ``set(k, v)``, ``get1(k)``) called
               directly by ``pgbench`` custom scripts, no mvcckv in the path
* ``etcd``     real etcd, when its binary exists

Every engine gets the same requests: puts of a 256-byte value to the key
``/bench/put`` (a new revision of one key each time) and gets of the key
``/bench/get``, at the same numbers of outstanding requests (``--concurrency``,
default 1 and 64).  The gRPC engines are loaded by ``h2load`` through
``bench/grpc_load.py``; the article's functions by ``pgbench -M prepared``
with one connection per outstanding request.  The keys have two slashes
because the article's trigger takes its ``pg_notify`` channel from the first
path segment and fails on keys without one.

Measured per (workload, concurrency): QPS, p99 latency, and server CPU
seconds per 1,000 operations (``/proc`` of the server processes: mvcckv,
etcd, and every PostgreSQL process, exited backends included via the
postmaster's reaped-children time).  mvcckv on PostgreSQL counts both, and
the table also shows the two parts: the gRPC server process (mvcckv or
etcd) and the PostgreSQL processes.

Watch latency: one client watches ``/bench/watch``, then puts a 256-byte
value to it and times from sending the put to receiving the event, one put
at a time, ``--watch-samples`` times per run (p50 and p99).  The gRPC
engines are watched with the Watch RPC (a Python gRPC client); the
article's design with ``LISTEN bench`` on one connection and ``SELECT
set(...)`` on another (psycopg), the event being the trigger's
``pg_notify``.

WAL bytes per update: PostgreSQL's ``pg_current_wal_lsn()`` delta, the
growth of ``<data-dir>/wal`` (mvcckv LMDB) or of the used part of
``<data-dir>/member/wal`` (etcd preallocates its segments, so trailing
zero bytes are not counted), divided by the puts of the measured runs.
A second table divides mvcckv/PostgreSQL's put and get QPS by those of
mvcckv/LMDB and of the article's SQL in the same run, against the goals
the engine is held to (``GOALS``: at least 0.7x LMDB, 0.5x the article's
SQL with one client).
The last row is the CPU that other processes used on the server's core
during the runs (``/proc/stat`` minus the server's own time): on a shared
machine, QPS and latency of a row with a high share there are understated
(``--retry-noisy PCT`` repeats such a run, keeping the least disturbed).

Servers are pinned to the first allowed core, load generators to the second.
The throwaway PostgreSQL (``tests/pg_harness.py``) runs with fsync and full
page writes on, as a durable configuration comparable with etcd's.

Run it from a source checkout (``.venv/bin/python bench/compare.py --help``):
it imports ``bench/grpc_load.py``, ``tests/harness.py`` and
``tests/pg_harness.py`` by their path in the repository.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
ENGINES = ("lmdb", "pg", "article", "etcd")
TITLES = {
    "lmdb": "mvcckv / LMDB",
    "pg": "mvcckv / PostgreSQL",
    "article": "article SQL (pgbench)",
    "etcd": "etcd",
}
PUT_KEY = "/bench/put"
GET_KEY = "/bench/get"
WATCH_KEY = "/bench/watch"
# The article's trigger notifies on the key's first path segment.
WATCH_CHANNEL = "bench"
# Seconds a watch sample may take before the engine is reported as failed.
WATCH_TIMEOUT = 10.0

# The throwaway PostgreSQL: the test harness's settings, but durable.
PG_SETTINGS = (
    "listen_addresses=127.0.0.1",
    "fsync=on",
    "full_page_writes=on",
    "max_connections=300",
    "shared_buffers=128MB",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench/compare.py",
        description=__doc__.split("\n\n")[0] + " Runs from a source checkout "
        "(needs bench/ and tests/ next to mvcckv/), with h2load; pgbench and "
        "PostgreSQL server binaries or --pg-dsn for the PostgreSQL engines.",
    )
    p.add_argument("--engines", default=",".join(ENGINES),
                   help=f"comma list of {', '.join(ENGINES)} (default: all)")
    p.add_argument("--concurrency", default="1,64",
                   help="outstanding requests, comma list (default 1,64)")
    p.add_argument("--duration", type=int, default=3, help="seconds per run (default 3)")
    p.add_argument("--runs", type=int, default=1, help="runs per row; medians (default 1)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured seconds before each row (default 1)")
    p.add_argument("--connections", type=int, default=4,
                   help="HTTP/2 connections for the gRPC engines (default 4; capped at the concurrency)")
    p.add_argument("--get", choices=("serializable", "linearizable"), default="serializable",
                   help="gRPC get flavour (default serializable: a local read, like get1)")
    p.add_argument("--watch-samples", type=int, default=300,
                   help="put -> watch event round trips per run (default 300; 0: no watch rows)")
    p.add_argument("--pg-dsn", help="an existing PostgreSQL instead of a throwaway one "
                   "(its server CPU is then not measured)")
    p.add_argument("--chart", default="compare.png", help="PNG path ('' for none; needs matplotlib)")
    p.add_argument("--markdown", help="also write the table and the command to this file")
    p.add_argument("--no-pin", action="store_true", help="do not set CPU affinities")
    p.add_argument("--retry-noisy", type=float, metavar="PCT",
                   help="repeat a put/get run (up to 3 times in all, keeping the least disturbed) when "
                        "other processes used more than PCT%% of the server's core during it")
    return p


# ---------------------------------------------------------------------------
# measurements


@dataclass
class Cell:
    qps: float = math.nan
    p99_ms: float = math.nan
    ops: int = 0
    failed: int = 0
    cpu_s: float | None = None       # all the server side: cpu_own_s + cpu_pg_s
    wal_bytes: int | None = None
    noise_pct: float | None = None   # other processes' CPU on the server core, % of the run
    p50_ms: float = math.nan
    cpu_own_s: float | None = None   # the gRPC server process (mvcckv or etcd)
    cpu_pg_s: float | None = None    # the PostgreSQL cluster's processes

    def _per_kop(self, seconds: float | None) -> float | None:
        if seconds is None or not self.ops:
            return None
        return seconds / self.ops * 1000.0

    @property
    def cpu_per_kop(self) -> float | None:
        return self._per_kop(self.cpu_s)

    @property
    def own_cpu_per_kop(self) -> float | None:
        return self._per_kop(self.cpu_own_s)

    @property
    def pg_cpu_per_kop(self) -> float | None:
        return self._per_kop(self.cpu_pg_s)


@dataclass
class EngineResult:
    name: str
    cells: dict[tuple[str, int], Cell] = field(default_factory=dict)
    skipped: str | None = None
    notes: list[str] = field(default_factory=list)


def _median(values):
    vals = sorted(v for v in values if v is not None and not math.isnan(v))
    if not vals:
        return math.nan
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2


def merge_runs(runs: list[Cell]) -> Cell:
    """Median QPS, p50 and p99; summed operations, failures, CPU and WAL."""

    def total(attr: str):
        vals = [getattr(r, attr) for r in runs]
        return None if None in vals else sum(vals)

    return Cell(
        qps=_median([r.qps for r in runs]), p99_ms=_median([r.p99_ms for r in runs]),
        p50_ms=_median([r.p50_ms for r in runs]),
        ops=sum(r.ops for r in runs), failed=sum(r.failed for r in runs),
        cpu_s=total("cpu_s"), cpu_own_s=total("cpu_own_s"), cpu_pg_s=total("cpu_pg_s"),
        wal_bytes=total("wal_bytes"),
        noise_pct=_median([r.noise_pct for r in runs]),
    )


def pg_cpu_seconds(gl, postmaster_pid: int) -> float:
    """CPU of a PostgreSQL cluster: live processes plus the postmaster's reaped children."""
    fields = gl._stat_fields(postmaster_pid)
    reaped = (int(fields[13]) + int(fields[14])) / gl.CLK_TCK   # cutime, cstime
    return gl.cpu_seconds(postmaster_pid) + reaped


def dir_used_bytes(path: Path, strip_zeros: bool = False) -> int:
    """Total size of the files under path; with strip_zeros, without trailing zero bytes
    (the unused part of a preallocated segment)."""
    total = 0
    for p in sorted(path.rglob("*")):
        if not p.is_file():
            continue
        if strip_zeros:
            total += len(p.read_bytes().rstrip(b"\0"))
        else:
            total += p.stat().st_size
    return total


class Probe:
    """Server CPU and WAL position of one engine, read around each run.

    CPU comes in two parts: ``pids`` (the gRPC server process: mvcckv or
    etcd, with descendants) and the PostgreSQL cluster of ``postmaster``.
    """

    def __init__(self, gl, pids=(), postmaster: int | None = None, wal=None, cores=None):
        self.gl, self.pids, self.postmaster, self.wal = gl, list(pids), postmaster, wal
        self.cores = cores

    def start(self, measure_wal: bool) -> tuple:
        # The WAL position first and the CPU after it: reading pg_current_wal_lsn()
        # takes a backend of its own, whose CPU is not the engine's.
        wal = self.wal() if self.wal and measure_wal else None
        core = self.gl.core_busy_seconds(self.cores) if self.cores else None
        return (self.cpu_parts(), wal, core, time.monotonic())

    def stop(self, before: tuple) -> dict:
        (own0, pg0), wal0, core0, t0 = before
        own1, pg1 = self.cpu_parts()
        core1 = self.gl.core_busy_seconds(self.cores) if self.cores else None
        elapsed = time.monotonic() - t0
        wal1 = self.wal() if wal0 is not None else None
        own = None if own0 is None else own1 - own0
        pg = None if pg0 is None else pg1 - pg0
        cpu = None if own is None and pg is None else (own or 0.0) + (pg or 0.0)
        noise = None
        if core0 is not None and cpu is not None:
            noise = 100.0 * max(0.0, (core1 - core0) - cpu) / elapsed
        return dict(cpu_s=cpu, cpu_own_s=own, cpu_pg_s=pg,
                    wal_bytes=None if wal0 is None else wal1 - wal0, noise_pct=noise)

    def cpu_parts(self) -> tuple[float | None, float | None]:
        """(gRPC server process CPU, PostgreSQL CPU), None for a part not measured."""
        own = sum(self.gl.cpu_seconds(p) for p in self.pids) if self.pids else None
        pg = pg_cpu_seconds(self.gl, self.postmaster) if self.postmaster is not None else None
        return own, pg


# ---------------------------------------------------------------------------
# load generators


def grpc_workloads(gl, get_mode: str) -> dict:
    value = gl.make_value(gl.VALUE_SIZE)
    return {
        "put": gl.Workload("cmp-put", "Put", gl.put_request(PUT_KEY.encode(), value)),
        "get": gl.Workload("cmp-get", "Range",
                           gl.range_request(GET_KEY.encode(), serializable=get_mode == "serializable"),
                           ((GET_KEY.encode(), value),), 1),
    }


def run_grpc(gl, url: str, wl, level: int, args, workdir: str, probe: Probe | None,
             measure_wal: bool) -> Cell:
    before = probe.start(measure_wal) if probe else None
    r = gl.run_h2load(url, wl, level, args.connections, workdir, duration=float(args.duration),
                      requests=None, server_pid=None, server_name="x", h2load=args.h2load)
    server = probe.stop(before) if probe else {}
    return Cell(qps=r.rps, p99_ms=r.p99_ms, ops=r.succeeded, failed=r.failed + r.errored, **server)


def pgbench_script(workload: str, value: str) -> str:
    if workload == "put":
        return f"SELECT set('{PUT_KEY}', '{value}');\n"
    return f"SELECT * FROM get1('{GET_KEY}');\n"


def run_pgbench(gl, dsn: str, schema: str, workload: str, level: int, seconds: int,
                workdir: str, probe: Probe | None, measure_wal: bool, pgbench: str) -> Cell:
    script = os.path.join(workdir, f"article-{workload}.sql")
    with open(script, "w") as f:
        f.write(pgbench_script(workload, gl.make_value(gl.VALUE_SIZE).decode()))
    prefix = os.path.join(workdir, "pgbench-lat")
    for old in glob.glob(prefix + "*"):
        os.unlink(old)
    argv = [pgbench, "-n", "-M", "prepared", "-f", script, "-c", str(level), "-j", "1",
            "-T", str(max(1, seconds)), "-l", "--log-prefix", prefix, dsn]
    env = dict(os.environ, PGOPTIONS=f"-c search_path={schema}")
    before = probe.start(measure_wal) if probe else None
    proc = subprocess.run(argv, capture_output=True, env=env, timeout=seconds + 60,
                          stdin=subprocess.DEVNULL)
    time.sleep(0.2)   # exited backends reaped by the postmaster, so their CPU is counted
    server = probe.stop(before) if probe else {}
    out = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"pgbench exited with {proc.returncode}:\n{out[-2000:]}")
    m = re.search(r"tps = ([0-9.]+)", out)
    done = re.search(r"number of transactions actually processed: (\d+)", out)
    failed = re.search(r"number of failed transactions: (\d+)", out)
    lat: list[int] = []
    for path in glob.glob(prefix + "*"):
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2].isdigit():
                    lat.append(int(parts[2]))
        os.unlink(path)
    lat.sort()
    return Cell(qps=float(m.group(1)) if m else math.nan,
                p99_ms=gl.percentile(lat, 99) / 1e3 if lat else math.nan,
                ops=int(done.group(1)) if done else len(lat),
                failed=int(failed.group(1)) if failed else 0, **server)


# ---------------------------------------------------------------------------
# watch latency: put -> event, one put at a time


def _latency_cell(latencies: list[float], server: dict) -> Cell:
    lat = sorted(latencies)
    return Cell(p50_ms=_percentile(lat, 50), p99_ms=_percentile(lat, 99), ops=len(lat), **server)


def _percentile(sorted_ms: list[float], p: float) -> float:
    """Nearest rank, as grpc_load.percentile (no import needed for the tests)."""
    if not sorted_ms:
        return math.nan
    rank = max(1, math.ceil(p / 100.0 * len(sorted_ms)))
    return sorted_ms[min(len(sorted_ms), rank) - 1]


def watch_grpc(address: str, value: bytes, samples: int, warmup: int, probe: Probe | None) -> Cell:
    """Watch ``WATCH_KEY`` over one Watch RPC, then time put -> event ``samples`` times.

    A reader thread stamps each response as it arrives, so an event that
    comes before the put's own response is timed when it came.  Every put
    must be seen as an event with the put's revision within WATCH_TIMEOUT.
    """
    import queue
    import threading

    import grpc

    from mvcckv.pb import rpc_pb2 as pb
    from mvcckv.pb import rpc_pb2_grpc

    key = WATCH_KEY.encode()
    arrivals: queue.Queue = queue.Queue()
    done = threading.Event()

    def requests():
        yield pb.WatchRequest(create_request=pb.WatchCreateRequest(key=key))
        done.wait(WATCH_TIMEOUT * (samples + warmup + 1))

    with grpc.insecure_channel(address) as channel:
        kv = rpc_pb2_grpc.KVStub(channel)
        call = rpc_pb2_grpc.WatchStub(channel).Watch(requests(), timeout=WATCH_TIMEOUT * (samples + warmup + 1))

        def read() -> None:
            try:
                for resp in call:
                    arrivals.put((time.perf_counter(), resp))
            except grpc.RpcError as e:
                if not done.is_set():
                    arrivals.put((time.perf_counter(), e))

        reader = threading.Thread(target=read, name="bench-watch", daemon=True)
        reader.start()
        try:
            def next_response():
                try:
                    t, resp = arrivals.get(timeout=WATCH_TIMEOUT)
                except queue.Empty:
                    raise RuntimeError(f"no watch response within {WATCH_TIMEOUT:.0f} s") from None
                if isinstance(resp, Exception):
                    raise RuntimeError(f"the watch ended: {resp}")
                return t, resp

            _, first = next_response()
            if not first.created:
                raise RuntimeError(f"the watch was not created: {first}")
            latencies: list[float] = []
            before = None
            for i in range(warmup + samples):
                if i == warmup and probe:
                    before = probe.start(False)
                t0 = time.perf_counter()
                put = kv.Put.future(pb.PutRequest(key=key, value=value), timeout=WATCH_TIMEOUT)
                seen: list[tuple[float, int]] = []
                revision = None
                for _ in range(100):   # progress responses carry no events; skip them
                    t1, resp = next_response()
                    seen.extend((t1, e.kv.mod_revision) for e in resp.events)
                    if seen:
                        break
                revision = put.result().header.revision
                match = [t for t, rev in seen if rev == revision]
                if not match:
                    raise RuntimeError(f"watch event revisions {[r for _, r in seen]}, put revision {revision}")
                if i >= warmup:
                    latencies.append((match[0] - t0) * 1e3)
            server = probe.stop(before) if probe and before is not None else {}
        finally:
            done.set()
            call.cancel()
            reader.join(5)
    return _latency_cell(latencies, server)


def watch_article(dsn: str, schema: str, value: str, samples: int, warmup: int,
                  probe: Probe | None) -> Cell:
    """The article's watch: ``LISTEN`` on the key's channel, ``set()`` on
    another connection; time ``set()`` sent -> notification received."""
    import queue
    import threading

    import psycopg

    arrivals: queue.Queue = queue.Queue()
    stop = threading.Event()
    with psycopg.connect(dsn, autocommit=True) as listener, \
            psycopg.connect(dsn, autocommit=True, options=f"-c search_path={schema}") as writer:
        listener.execute(f"LISTEN {WATCH_CHANNEL}")

        def read() -> None:
            try:
                for _ in range(int(WATCH_TIMEOUT * (samples + warmup + 1) / 0.2) + 1):
                    if stop.is_set():
                        return
                    for n in listener.notifies(timeout=0.2):
                        arrivals.put((time.perf_counter(), n.payload))
            except psycopg.Error as e:
                arrivals.put((time.perf_counter(), e))

        reader = threading.Thread(target=read, name="bench-listen", daemon=True)
        reader.start()
        try:
            latencies: list[float] = []
            before = None
            for i in range(warmup + samples):
                if i == warmup and probe:
                    before = probe.start(False)
                t0 = time.perf_counter()
                revision = writer.execute("SELECT set(%s, %s)", (WATCH_KEY, value), prepare=True).fetchone()[0]
                for _ in range(100):
                    try:
                        t1, payload = arrivals.get(timeout=WATCH_TIMEOUT)
                    except queue.Empty:
                        raise RuntimeError(f"no notification within {WATCH_TIMEOUT:.0f} s") from None
                    if isinstance(payload, Exception):
                        raise RuntimeError(f"LISTEN failed: {payload}")
                    row = json.loads(payload)
                    if row.get("key") == WATCH_KEY and row.get("revision") == revision:
                        break
                else:
                    raise RuntimeError(f"no notification of revision {revision}")
                if i >= warmup:
                    latencies.append((t1 - t0) * 1e3)
            server = probe.stop(before) if probe and before is not None else {}
        finally:
            stop.set()
            reader.join(5)
    return _latency_cell(latencies, server)


# ---------------------------------------------------------------------------
# engines


def _with_schema(dsn: str, schema: str) -> str:
    """A postgresql:// URL whose search_path is the schema."""
    opt = urllib.parse.quote(f"-csearch_path={schema}")
    return dsn + ("&" if "?" in dsn else "?") + f"options={opt}"


def _wal_lsn(dsn: str):
    import psycopg

    def read() -> int:
        with psycopg.connect(dsn, autocommit=True) as conn:
            return int(conn.execute(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')").fetchone()[0])
    return read


def measure_engine(name: str, gl, url_or_dsn: str, args, workdir: str, levels: list[int],
                   probe: Probe | None, log, *, schema: str | None = None) -> EngineResult:
    result = EngineResult(name)
    wls = grpc_workloads(gl, args.get)
    if name != "article":
        addr = gl.target_address(url_or_dsn)
        for wl in wls.values():
            gl.setup_workload(addr, wl)
            info = gl.check_workload(addr, wl)
            if wl.expect_kvs is not None and not info["content_ok"]:
                result.notes.append(f"the get check returned {info.get('kvs')} kvs, not 1")
    for workload in ("put", "get"):
        for level in levels:
            def once(seconds: int, measured: bool) -> Cell:
                if name == "article":
                    return run_pgbench(gl, url_or_dsn, schema, workload, level, seconds, workdir,
                                       probe if measured else None, workload == "put", args.pgbench)
                a = argparse_copy(args, duration=seconds)
                return run_grpc(gl, url_or_dsn, wls[workload], level, a, workdir,
                                probe if measured else None, workload == "put")
            if args.warmup > 0:
                once(args.warmup, False)
            runs = [quietest(lambda: once(args.duration, True), args.retry_noisy, log)
                    for _ in range(args.runs)]
            cell = merge_runs(runs)
            result.cells[workload, level] = cell
            cpu = "-" if cell.cpu_per_kop is None else f"{cell.cpu_per_kop:.3f}"
            log(f"# {TITLES[name]:<22} {workload} c={level:<3} {cell.qps:9.0f} QPS  "
                f"p99 {cell.p99_ms:7.2f} ms  CPU s/1k {cpu}  failed {cell.failed}  "
                f"others {_fmt(cell.noise_pct, 0)}% of srv core")
    if args.watch_samples > 0:
        value = gl.make_value(gl.VALUE_SIZE)
        warmup = min(50, args.watch_samples) if args.warmup > 0 else 0
        runs = []
        try:
            for _ in range(args.runs):
                if name == "article":
                    runs.append(watch_article(url_or_dsn, schema, value.decode(), args.watch_samples,
                                              warmup, probe))
                else:
                    runs.append(watch_grpc(gl.target_address(url_or_dsn), value, args.watch_samples,
                                           warmup, probe))
        except Exception as e:   # the put and get figures stand without the watch
            log(f"# {name} watch: {type(e).__name__}: {e}")
            result.notes.append(f"watch not measured: {type(e).__name__}: {str(e)[:300]}")
            return result
        cell = merge_runs(runs)
        result.cells["watch", 1] = cell
        log(f"# {TITLES[name]:<22} watch put->event  p50 {cell.p50_ms:7.2f} ms  p99 {cell.p99_ms:7.2f} ms  "
            f"({cell.ops} samples)  others {_fmt(cell.noise_pct, 0)}% of srv core")
    return result


RETRIES = 3


def quietest(run, noisy_pct: float | None, log) -> Cell:
    """``run()``, repeated (up to RETRIES times in all) while other processes
    used more than ``noisy_pct`` % of the server's core during it; the run
    they disturbed least."""
    best = run()
    for _ in range(RETRIES - 1):
        if noisy_pct is None or best.noise_pct is None or best.noise_pct <= noisy_pct:
            break
        log(f"# others used {best.noise_pct:.0f}% of the server core; run again")
        again = run()
        if again.noise_pct is not None and again.noise_pct < best.noise_pct:
            best = again
    return best


def argparse_copy(args, **changes):
    
    ns = argparse.Namespace(**vars(args))
    for k, v in changes.items():
        setattr(ns, k, v)
    return ns


# ---------------------------------------------------------------------------
# output


def _fmt(v, digits: int) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:,.{digits}f}"


def wal_per_put(res: EngineResult, levels: list[int]) -> float | None:
    cells = [res.cells.get(("put", lv)) for lv in levels]
    if any(c is None or c.wal_bytes is None for c in cells):
        return None
    ops = sum(c.ops for c in cells)
    return sum(c.wal_bytes for c in cells) / ops if ops else None


def format_table(results: list[EngineResult], levels: list[int]) -> str:
    shown = [r for r in results if not r.skipped]
    head = ["metric"] + [TITLES[r.name] for r in shown]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * len(shown)]

    def row(label: str, values: list[str]) -> None:
        lines.append("| " + " | ".join([label] + values) + " |")

    for workload in ("put", "get"):
        for level in levels:
            cells = [r.cells.get((workload, level), Cell()) for r in shown]
            row(f"{workload} QPS @ c={level}", [_fmt(c.qps, 0) for c in cells])
            row(f"{workload} p99 ms @ c={level}", [_fmt(c.p99_ms, 2) for c in cells])
    if any(("watch", 1) in r.cells for r in shown):
        cells = [r.cells.get(("watch", 1), Cell()) for r in shown]
        row("watch p50 ms (put → event)", [_fmt(c.p50_ms, 2) for c in cells])
        row("watch p99 ms (put → event)", [_fmt(c.p99_ms, 2) for c in cells])
    row("WAL bytes / put", [_fmt(wal_per_put(r, levels), 0) for r in shown])
    for workload in ("put", "get"):
        for level in levels:
            cells = [r.cells.get((workload, level), Cell()) for r in shown]
            label = f"server CPU s / 1k {workload} @ c={level}"
            row(label, [_fmt(c.cpu_per_kop, 3) for c in cells])
            row(f"{label}: mvcckv or etcd process", [_fmt(c.own_cpu_per_kop, 3) for c in cells])
            row(f"{label}: PostgreSQL processes", [_fmt(c.pg_cpu_per_kop, 3) for c in cells])
    noise = []
    for r in shown:
        vals = [c.noise_pct for c in r.cells.values()
                if c.noise_pct is not None and not math.isnan(c.noise_pct)]
        noise.append(f"{_median(vals):.0f} / {max(vals):.0f}" if vals else "-")
    row("others' CPU on server core, % (median / max)", noise)
    fails = [f"{TITLES[r.name]} {w} @ c={lv}: {c.failed} failed requests"
             for r in shown for (w, lv), c in r.cells.items() if c.failed]
    notes = [f"- {TITLES[r.name]}: {n}" for r in shown for n in r.notes]
    notes += [f"- {f}" for f in fails]
    notes += [f"- {TITLES[r.name]}: not measured: {r.skipped}" for r in results if r.skipped]
    return "\n".join(lines + ([""] + notes if notes else []))


# Same-run QPS ratios the PostgreSQL engine is held to: (reference engine,
# the least ratio, the concurrency levels it applies at; None: every level).
GOALS = (("lmdb", 0.7, None), ("article", 0.5, (1,)))


def format_goals(results: list[EngineResult], levels: list[int]) -> str:
    """mvcckv/PostgreSQL's put and get QPS over each reference engine's in
    the same run, each against its goal; empty without the engines."""
    by_name = {r.name: r for r in results if not r.skipped}
    pg = by_name.get("pg")
    if pg is None:
        return ""
    lines = ["| mvcckv / PostgreSQL QPS over | goal | " + " | ".join(f"c={lv}" for lv in levels) + " |",
             "|---|---|" + "---:|" * len(levels)]
    for ref, least, at in GOALS:
        other = by_name.get(ref)
        if other is None:
            continue
        for workload in ("put", "get"):
            cells = []
            for lv in levels:
                mine, theirs = pg.cells.get((workload, lv), Cell()).qps, other.cells.get((workload, lv), Cell()).qps
                if math.isnan(mine) or math.isnan(theirs) or not theirs:
                    cells.append("-")
                    continue
                ratio = mine / theirs
                held = at is None or lv in at
                mark = "" if not held else (" (met)" if ratio >= least else " (short)")
                # Rounded down, so a ratio shown at the goal has met it.
                cells.append(f"{math.floor(ratio * 100) / 100:.2f}{mark}")
            where = "" if at is None else " at c=" + ",".join(str(a) for a in at)
            lines.append(f"| {TITLES[ref]}, {workload} | ≥ {least:g}{where} | " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def draw_chart(results: list[EngineResult], levels: list[int], path: str) -> str | None:
    """A PNG per engine: QPS, p99, watch latency and server CPU per operation
    (split into the gRPC server process and PostgreSQL); returns why not
    when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib); no chart"
    shown = [r for r in results if not r.skipped]
    groups = [(w, lv) for w in ("put", "get") for lv in levels]
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))

    def minor(v, _) -> str:
        # Only 2x and 5x between the powers of ten: all nine would overlap.
        return f"{v:g}" if v > 0 and round(v / 10 ** math.floor(math.log10(v))) in (2, 5) else ""

    def log_scale(ax) -> None:
        ax.set_yscale("log")
        # 0.5, 2, 10 rather than 5x10^-1, 2x10^0, 10^1
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(minor))

    width = 0.8 / max(1, len(shown))
    colors = {r.name: f"C{i}" for i, r in enumerate(shown)}

    def offset(i: int, j: int) -> float:
        return j + (i - (len(shown) - 1) / 2) * width

    def nan0(v) -> float:
        return 0.0 if v is None or math.isnan(v) else v

    for ax, attr, title in ((axes[0][0], "qps", "QPS (higher is better)"),
                            (axes[0][1], "p99_ms", "p99 latency, ms (log scale, lower is better)")):
        for i, r in enumerate(shown):
            vals = [getattr(r.cells.get(g, Cell()), attr) for g in groups]
            ax.bar([offset(i, j) for j in range(len(groups))], [nan0(v) for v in vals], width,
                   label=TITLES[r.name], color=colors[r.name])
        ax.set_xticks(range(len(groups)), [f"{w} c={lv}" for w, lv in groups])
        ax.set_title(title)
        if attr == "p99_ms":
            log_scale(ax)
    axes[0][0].legend(fontsize=8)

    ax = axes[1][0]
    for i, r in enumerate(shown):
        c = r.cells.get(("watch", 1), Cell())
        ax.bar([offset(i, 0), offset(i, 1)], [nan0(c.p50_ms), nan0(c.p99_ms)], width,
               label=TITLES[r.name], color=colors[r.name])
    ax.set_xticks([0, 1], ["p50", "p99"])
    ax.set_title("watch latency, put sent -> event received, ms (lower is better)")

    ax = axes[1][1]
    for i, r in enumerate(shown):
        cells = [r.cells.get(g, Cell()) for g in groups]
        xs = [offset(i, j) for j in range(len(groups))]
        own = [nan0(c.own_cpu_per_kop) for c in cells]
        pg = [nan0(c.pg_cpu_per_kop) for c in cells]
        ax.bar(xs, own, width, color=colors[r.name])
        ax.bar(xs, pg, width, bottom=own, color=colors[r.name], hatch="///", edgecolor="white")
    ax.set_xticks(range(len(groups)), [f"{w} c={lv}" for w, lv in groups])
    ax.set_title("server CPU s per 1k ops (hatched: PostgreSQL processes)")

    fig.suptitle("256-byte values, same keys and concurrency for every engine")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


# ---------------------------------------------------------------------------
# the command


def _import_tools():
    for sub in ("bench", "tests"):
        d = REPO_ROOT / sub
        if not d.is_dir():
            raise SystemExit(f"bench/compare.py runs from a source checkout: {d} is missing")
        if str(d) not in sys.path:
            sys.path.insert(0, str(d))
    import grpc_load
    import harness
    import pg_harness

    return grpc_load, harness, pg_harness


def run(args) -> int:
    gl, harness, pg_harness = _import_tools()
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    bad = [e for e in engines if e not in ENGINES]
    if bad:
        raise SystemExit(f"unknown engine(s): {', '.join(bad)} (choose from {', '.join(ENGINES)})")
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    args.h2load = shutil.which("h2load")
    args.pgbench = shutil.which("pgbench")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    server_cpus, load_cpus = (None, None) if args.no_pin else gl.plan_cpus()
    if load_cpus:
        os.sched_setaffinity(0, load_cpus)   # h2load and pgbench inherit the load core

    def pin(pid: int) -> None:
        if server_cpus:
            gl.pin_process(pid, server_cpus)

    results: dict[str, EngineResult] = {}
    t_start = time.monotonic()
    with contextlib.ExitStack() as stack:
        workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="mvcckv-compare-"))

        # PostgreSQL, shared by the pg and article engines.
        pg_dsn, postmaster, pg_why = args.pg_dsn, None, None
        if not pg_dsn and ({"pg", "article"} & set(engines)):
            if pg_harness.find_postgres() is None:
                pg_why = "no PostgreSQL server binaries (initdb, postgres) and no --pg-dsn"
            else:
                pg_harness._SETTINGS = PG_SETTINGS
                pg = stack.enter_context(pg_harness.PostgresServer())
                pg_dsn, postmaster = pg.dsn(), pg._proc.pid
                pin(postmaster)
                log(f"# started PostgreSQL on port {pg.port} (pid {postmaster})")
        tag = f"cmp{os.getpid()}"

        for name in engines:
            res = None
            try:
                if name == "lmdb":
                    srv = stack.enter_context(harness.MvcckvProcess())
                    pin(srv.pid)
                    probe = Probe(gl, [srv.pid], wal=lambda s=srv: dir_used_bytes(s.data_dir / "wal"),
                                  cores=server_cpus)
                    res = measure_engine(name, gl, srv.client_url, args, workdir, levels, probe, log)
                    srv.stop()
                elif name == "etcd":
                    if not os.path.exists("/usr/bin/etcd") and not shutil.which("etcd"):
                        results[name] = EngineResult(name, skipped="no etcd binary")
                        continue
                    srv = stack.enter_context(harness.EtcdProcess())
                    pin(srv.pid)
                    probe = Probe(gl, [srv.pid], wal=lambda s=srv: dir_used_bytes(
                        s.data_dir / "member" / "wal", strip_zeros=True), cores=server_cpus)
                    res = measure_engine(name, gl, srv.client_url, args, workdir, levels, probe, log)
                    srv.stop()
                elif pg_dsn is None:
                    results[name] = EngineResult(name, skipped=pg_why)
                    continue
                elif name == "pg":
                    schema = f"{tag}_mvcckv"
                    srv = stack.enter_context(harness.MvcckvProcess(
                        extra_args=["--backend", _with_schema(pg_dsn, schema)]))
                    pin(srv.pid)
                    probe = Probe(gl, [srv.pid], postmaster, _wal_lsn(pg_dsn), server_cpus)
                    res = measure_engine(name, gl, srv.client_url, args, workdir, levels, probe, log)
                    srv.stop()
                    if postmaster is None:
                        res.notes.append("server CPU is the mvcckv process only (PostgreSQL given by --pg-dsn)")
                    _drop_schema(pg_dsn, schema)
                elif name == "article":
                    if args.pgbench is None:
                        results[name] = EngineResult(name, skipped="no pgbench on PATH")
                        continue
                    import mvcckv.pg
                    import psycopg

                    schema = f"{tag}_article"
                    with psycopg.connect(pg_dsn, autocommit=True) as conn:
                        conn.execute(f"CREATE SCHEMA {schema}")
                        conn.execute(f"SET search_path TO {schema}")
                        conn.execute(mvcckv.pg.article_sql())
                        conn.execute("SELECT set(%s, %s)",
                                     (GET_KEY, gl.make_value(gl.VALUE_SIZE).decode()))
                    probe = Probe(gl, [], postmaster, _wal_lsn(pg_dsn), server_cpus)
                    res = measure_engine(name, gl, pg_dsn, args, workdir, levels, probe, log,
                                         schema=schema)
                    if postmaster is None:
                        for c in res.cells.values():
                            c.cpu_s = None
                    _drop_schema(pg_dsn, schema)
            except Exception as e:   # one engine failing does not lose the others
                log(f"# {name}: {type(e).__name__}: {e}")
                res = EngineResult(name, skipped=f"failed: {type(e).__name__}: {str(e)[:300]}")
            results[name] = res

    table = format_table([results[e] for e in engines], levels)
    goals = format_goals([results[e] for e in engines], levels)
    print(table)
    if goals:
        print("\n" + goals)
    chart_note = None
    if args.chart:
        chart_note = draw_chart([results[e] for e in engines], levels, args.chart)
        log(f"# {chart_note}" if chart_note else f"# chart: {args.chart}")
    if args.markdown:
        command = "python bench/compare.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        with open(args.markdown, "w") as f:
            f.write("# bench/compare.py\n\n")
            f.write(f"Command (from the repository root, {time.monotonic() - t_start:.0f} s):\n\n")
            f.write(f"    {command}\n\n")
            pin_note = (f"servers on cpu {sorted(server_cpus)}, load generators on cpu "
                        f"{sorted(load_cpus)}" if server_cpus else "no CPU pinning")
            f.write(f"{args.duration} s x {args.runs} run(s) per row after {args.warmup} s of "
                    f"warm-up; {pin_note}; gRPC gets are {args.get}; "
                    f"{args.connections} HTTP/2 connections (capped at the concurrency)")
            if args.watch_samples > 0:
                f.write(f"; watch: {args.watch_samples} put -> event samples per run, one at a time")
            f.write(".\n\n")
            f.write(table + "\n")
            if goals:
                f.write("\nSame-run ratios against the PostgreSQL engine's goals:\n\n" + goals + "\n")
            if args.chart and chart_note is None:
                f.write(f"\nChart: `{args.chart}`\n")
            elif chart_note:
                f.write(f"\n{chart_note}\n")
    return 0


def _drop_schema(dsn: str, schema: str) -> None:
    import psycopg

    with contextlib.suppress(Exception), psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


if __name__ == "__main__":
    sys.exit(run(build_parser().parse_args()))

"""Watch and lease benchmark of etcd's v3 gRPC API: mvcckv and real etcd in one run.

Measured per server (each started on a free loopback port, pinned to the first
core; this client pinned to the second):

* watch latency: time from sending a Put to receiving the watch event, with
  1 watcher, and with many watchers on the same key (STREAMS x PER_STREAM on
  a few watch streams) until *all* of them were notified;
* memory: the server's resident set per watcher (RSS before and after the
  many watchers are created) and per idle client connection (RSS before and
  after opening many connections that each made one call);
* lease churn: LeaseGrant + Put(lease) + LeaseRevoke cycles per second, one
  client thread and N client threads;
* keep-alive: many live leases refreshed over keep-alive streams (each lease
  every TTL/3, as clientv3 does) for a window: keep-alive responses/s and
  server CPU seconds over that window (utime + stime from /proc/<pid>/stat).

The client is Python.  With thousands of watchers, parsing every answer would
cost the client more CPU than the server spends sending them, so the many
watchers are held by several receiver processes (``--watch-clients``) that
take each answer as raw bytes and only count them (a stream's watchers all
watch the key, and every put sends each of them one answer), stamping the
time the last one arrived; ``time.perf_counter`` is the system-wide
monotonic clock, so stamps compare across processes.  The client's CPU (all
receivers) is printed next to each row.

    .venv/bin/python bench/bench_watch_lease.py --runs 3
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import queue
import statistics
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT, os.path.join(ROOT, "tests")]

import grpc  # noqa: E402

from grpc_load import (  # noqa: E402
    core_busy_seconds, cpu_seconds, percentile, pin_process, plan_cpus, process_tree)
from harness import EtcdProcess, MvcckvProcess, grpc_channel, stub  # noqa: E402
from mvcckv.pb import rpc_pb2  # noqa: E402

VALUE = b"v" * 64
SERVER_CPUS: set[int] | None = None   # the server's core, for the 'other CPU %' figure


def core_busy() -> float:
    return core_busy_seconds(SERVER_CPUS) if SERVER_CPUS else math.nan


def other_pct(core0: float, srv: float, wall: float) -> float:
    """Other processes' share of the server's core (busy time minus the server's own)."""
    return max(0.0, 100 * ((core_busy() - core0) - srv) / wall)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class RequestQueue:
    """A request iterator for a gRPC stream, fed from another thread."""

    _END = object()

    def __init__(self):
        self.q: queue.Queue = queue.Queue()

    def put(self, req) -> None:
        self.q.put(req)

    def close(self) -> None:
        self.q.put(self._END)

    def __iter__(self):
        while True:
            item = self.q.get()
            if item is self._END:
                return
            yield item


# ---------------------------------------------------------------------------
# watch


class WatchStream:
    """One Watch stream with ``n`` watchers on ``key``; a reader thread records,
    per revision, when the last of this stream's watchers got its event."""

    def __init__(self, channel, key: bytes, n: int):
        self.key, self.n = key, n
        self.reqs = RequestQueue()
        self.call = stub(channel, "Watch").Watch(iter(self.reqs))
        self.cond = threading.Condition()
        self.created = 0
        self.counts: dict[int, int] = {}
        self.done_at: dict[int, float] = {}
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        for _ in range(n):
            self.reqs.put(rpc_pb2.WatchRequest(
                create_request=rpc_pb2.WatchCreateRequest(key=key)))

    def _read(self) -> None:
        try:
            for resp in self.call:
                now = time.perf_counter()
                with self.cond:
                    if resp.created:
                        self.created += 1
                        if self.created == self.n:
                            self.cond.notify_all()
                    for ev in resp.events:
                        rev = ev.kv.mod_revision
                        c = self.counts.get(rev, 0) + 1
                        self.counts[rev] = c
                        if c == self.n:
                            self.done_at[rev] = now
                            del self.counts[rev]
                            self.cond.notify_all()
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                self.error = e
        finally:
            with self.cond:
                self.cond.notify_all()

    def wait_created(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.created < self.n:
                left = deadline - time.monotonic()
                if left <= 0 or self.error:
                    raise RuntimeError(f"only {self.created}/{self.n} watchers created: {self.error}")
                self.cond.wait(left)

    def wait_rev(self, rev: int, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        with self.cond:
            while rev not in self.done_at:
                left = deadline - time.monotonic()
                if left <= 0 or self.error:
                    raise RuntimeError(f"event for revision {rev} not received: {self.error}")
                self.cond.wait(left)
            return self.done_at.pop(rev)

    def close(self) -> None:
        self.reqs.close()
        self.call.cancel()
        self.thread.join(5)


def rss_bytes(pid: int) -> int:
    """Resident set of the process and its descendants."""
    total = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return total


def watch1_runs(endpoint: str, puts: int, runs: int, server_pid: int) -> list[dict]:
    """One watcher in this process: put → event latency."""
    key = b"bench/watch/1"
    ch, kv_ch = grpc_channel(endpoint), grpc_channel(endpoint)
    kv = stub(kv_ch, "KV")
    w = WatchStream(ch, key, 1)
    try:
        w.wait_created(30)
        kv.Put(rpc_pb2.PutRequest(key=key, value=VALUE))   # warm-up
        results = []
        for run in range(runs):
            lat: list[float] = []
            core0 = core_busy()
            cpu0, cl0, w0 = cpu_seconds(server_pid), time.process_time(), time.perf_counter()
            for _ in range(puts):
                t = time.perf_counter()
                rev = kv.Put(rpc_pb2.PutRequest(key=key, value=VALUE)).header.revision
                lat.append((w.wait_rev(rev, 30) - t) * 1e3)
            wall = time.perf_counter() - w0
            srv, cli = cpu_seconds(server_pid) - cpu0, time.process_time() - cl0
            results.append(_latency_row(run, runs, lat, srv, cli, puts, wall, core0))
        return results
    finally:
        w.close()
        ch.close()
        kv_ch.close()


def _latency_row(run: int, runs: int, lat: list[float], srv: float, cli: float, puts: int,
                 wall: float, core0: float) -> dict:
    lat.sort()
    r = dict(p50=percentile(lat, 50), p99=percentile(lat, 99), max=lat[-1],
             srv_ms_per_put=srv / puts * 1e3, cli_ms_per_put=cli / puts * 1e3,
             srv_pct=100 * srv / wall, cli_pct=100 * cli / wall,
             other_pct=other_pct(core0, srv, wall))
    log(f"#   run {run + 1}/{runs}: p50 {r['p50']:.2f} ms  p99 {r['p99']:.2f} ms  "
        f"max {r['max']:.2f} ms  server {r['srv_ms_per_put']:.2f} CPU ms/put, "
        f"client {r['cli_ms_per_put']:.2f} CPU ms/put, others {r['other_pct']:.0f}% of srv core")
    return r


def _receiver(endpoint: str, key: bytes, streams: int, per_stream: int, conn) -> None:
    """A receiver process: ``streams`` watch streams of ``per_stream``
    watchers of ``key``.  Sends ("created",) once every watcher is, then
    (n, t) when the n-th put (from 0) has reached every watcher here.

    grpc.aio with raw bytes: the cheapest Python receiver measured (the
    blocking client's iterator costs about twice as much CPU per answer)."""
    import asyncio

    async def main() -> None:
        seen: dict[int, int] = {}        # put number -> streams done
        latest: dict[int, float] = {}    # put number -> last stream's time
        target = endpoint.split("://")[-1]
        channels = [grpc.aio.insecure_channel(target) for _ in range(streams)]
        create = rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(key=key))
        stop = asyncio.Event()

        async def requests():
            for _ in range(per_stream):
                yield create
            await stop.wait()

        async def read(ch) -> None:
            call = ch.stream_stream("/etcdserverpb.Watch/Watch",
                                    request_serializer=rpc_pb2.WatchRequest.SerializeToString,
                                    response_deserializer=None)(requests())
            count = 0
            async for _ in call:     # raw bytes: no parsing, only counting
                count += 1
                if count < per_stream or count % per_stream:
                    continue
                now = time.perf_counter()
                n = count // per_stream - 2      # the first per_stream were "created"
                done = seen.get(n, 0) + 1
                seen[n] = done
                latest[n] = max(latest.get(n, 0.0), now)
                if done == streams:
                    conn.send(("created",) if n < 0 else (n, latest.pop(n)))
                    del seen[n]

        tasks = [asyncio.ensure_future(read(ch)) for ch in channels]
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)    # "stop"
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ch in channels:
            await ch.close()

    asyncio.run(main())


def watch_many_runs(endpoint: str, streams: int, per_stream: int, puts: int, runs: int,
                    server_pid: int, clients: int) -> tuple[list[dict], float]:
    """Many watchers held by ``clients`` receiver processes; also the
    server's RSS growth per watcher."""
    key = f"bench/watch/{streams}x{per_stream}".encode()
    clients = max(1, min(clients, streams))
    ctx = multiprocessing.get_context("spawn")
    kv_ch = grpc_channel(endpoint)
    kv = stub(kv_ch, "KV")
    kv.Put(rpc_pb2.PutRequest(key=b"bench/warm", value=VALUE))
    rss0 = rss_bytes(server_pid)
    procs, conns = [], []
    try:
        t0 = time.monotonic()
        for i in range(clients):
            mine = streams // clients + (1 if i < streams % clients else 0)
            here, there = ctx.Pipe()
            proc = ctx.Process(target=_receiver, args=(endpoint, key, mine, per_stream, there), daemon=True)
            proc.start()
            procs.append(proc)
            conns.append(here)
        for c in conns:
            if not c.poll(180):
                raise RuntimeError("watchers not created within 180 s")
            c.recv()
        time.sleep(0.5)              # let the server settle before sampling its RSS
        per_watcher = (rss_bytes(server_pid) - rss0) / (streams * per_stream)
        log(f"#   {streams * per_stream} watchers created by {clients} receiver processes in "
            f"{time.monotonic() - t0:.1f} s; server RSS +{per_watcher:.0f} B per watcher")

        def put_and_wait(n: int) -> float:
            t = time.perf_counter()
            kv.Put(rpc_pb2.PutRequest(key=key, value=VALUE))
            last = 0.0
            for c in conns:
                if not c.poll(60):
                    raise RuntimeError(f"put {n} not delivered within 60 s")
                got, at = c.recv()
                assert got == n, (got, n)
                last = max(last, at)
            return (last - t) * 1e3

        put_and_wait(0)              # warm-up
        sent = 1
        results = []
        for run in range(runs):
            lat: list[float] = []
            core0 = core_busy()
            cli0 = sum(cpu_seconds(p.pid) for p in procs)
            cpu0, w0 = cpu_seconds(server_pid), time.perf_counter()
            for _ in range(puts):
                lat.append(put_and_wait(sent))
                sent += 1
            wall = time.perf_counter() - w0
            srv = cpu_seconds(server_pid) - cpu0
            cli = sum(cpu_seconds(p.pid) for p in procs) - cli0
            results.append(_latency_row(run, runs, lat, srv, cli, puts, wall, core0))
        return results, per_watcher
    finally:
        for c in conns:
            try:
                c.send("stop")
            except OSError:
                pass
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        kv_ch.close()


def idle_connection_bytes(endpoint: str, n: int, server_pid: int) -> float:
    """The server's RSS growth per client connection that made one call and
    then stays idle."""
    rss0 = rss_bytes(server_pid)
    channels = [grpc_channel(endpoint) for _ in range(n)]
    try:
        for ch in channels:
            stub(ch, "Maintenance").Status(rpc_pb2.StatusRequest(), timeout=30)
        time.sleep(0.5)
        return (rss_bytes(server_pid) - rss0) / n
    finally:
        for ch in channels:
            ch.close()


# ---------------------------------------------------------------------------
# lease churn


def churn(endpoint: str, threads: int, duration: float, server_pid: int, tag: str) -> dict:
    channels = [grpc_channel(endpoint) for _ in range(min(threads, 4))]
    stop_at = time.monotonic() + duration
    counts = [0] * threads
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        ch = channels[i % len(channels)]
        lease, kv = stub(ch, "Lease"), stub(ch, "KV")
        key = f"bench/churn/{tag}/{i}".encode()
        try:
            while time.monotonic() < stop_at:
                lid = lease.LeaseGrant(rpc_pb2.LeaseGrantRequest(TTL=60), timeout=10).ID
                kv.Put(rpc_pb2.PutRequest(key=key, value=VALUE, lease=lid), timeout=10)
                lease.LeaseRevoke(rpc_pb2.LeaseRevokeRequest(ID=lid), timeout=10)
                counts[i] += 1
        except grpc.RpcError as e:
            errors.append(e)

    try:
        ts = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
        core0 = core_busy()
        cpu0, cl0, w0 = cpu_seconds(server_pid), time.process_time(), time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join(duration + 60)
        wall = time.perf_counter() - w0
        srv, cli = cpu_seconds(server_pid) - cpu0, time.process_time() - cl0
    finally:
        for ch in channels:
            ch.close()
    if errors:
        raise RuntimeError(f"lease churn: {errors[0]}")
    n = sum(counts)
    return dict(rate=n / wall, srv_ms=srv / n * 1e3 if n else math.nan,
                srv_pct=100 * srv / wall, cli_pct=100 * cli / wall,
                other_pct=other_pct(core0, srv, wall))


# ---------------------------------------------------------------------------
# keep-alive


def grant_many(endpoint: str, n: int, ttl: int, outstanding: int = 256) -> list[int]:
    """Grants n leases with up to ``outstanding`` concurrent requests."""
    with grpc_channel(endpoint) as ch:
        lease = stub(ch, "Lease")
        ids: list[int] = []
        pending: list = []
        for _ in range(n):
            pending.append(lease.LeaseGrant.future(rpc_pb2.LeaseGrantRequest(TTL=ttl), timeout=60))
            if len(pending) >= outstanding:
                ids.extend(f.result().ID for f in pending)
                pending = []
        ids.extend(f.result().ID for f in pending)
    return ids


def keepalive_window(endpoint: str, ids: list[int], streams: int, ttl: int, window: float,
                     server_pid: int) -> dict:
    """Refreshes every lease once per ttl/3 seconds (spread evenly) for ``window`` s."""
    period = ttl / 3.0
    shares = [ids[i::streams] for i in range(streams)]
    channels = [grpc_channel(endpoint) for _ in range(streams)]
    got = [0] * streams
    expired = [0] * streams
    errors: list[BaseException] = []
    sent = [0] * streams

    def reader(i: int, call) -> None:
        try:
            for resp in call:
                got[i] += 1
                if resp.TTL <= 0:
                    expired[i] += 1
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                errors.append(e)

    reqs = [RequestQueue() for _ in range(streams)]
    calls = [stub(ch, "Lease").LeaseKeepAlive(iter(q)) for ch, q in zip(channels, reqs)]
    readers = [threading.Thread(target=reader, args=(i, c), daemon=True) for i, c in enumerate(calls)]
    for t in readers:
        t.start()
    slots = 20                       # each stream sends its share in 20 slices per period
    try:
        core0 = core_busy()
        cpu0, cl0, w0 = cpu_seconds(server_pid), time.process_time(), time.perf_counter()
        got0 = sum(got)
        start = time.perf_counter()
        step = 0
        while True:
            at = start + step * period / slots
            if at - start >= window:
                break
            delay = at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            s = step % slots
            for i, share in enumerate(shares):
                chunk = share[s * len(share) // slots:(s + 1) * len(share) // slots]
                for lid in chunk:
                    reqs[i].put(rpc_pb2.LeaseKeepAliveRequest(ID=lid))
                sent[i] += len(chunk)
            step += 1
        # wait (bounded) for the answers to what was sent
        deadline = time.perf_counter() + 10
        while sum(got) - got0 < sum(sent) and time.perf_counter() < deadline and not errors:
            time.sleep(0.01)
        wall = time.perf_counter() - w0
        srv, cli = cpu_seconds(server_pid) - cpu0, time.process_time() - cl0
        answered = sum(got) - got0
        others = other_pct(core0, srv, wall)
    finally:
        for q in reqs:
            q.close()
        for c in calls:
            c.cancel()
        for t in readers:
            t.join(5)
        for ch in channels:
            ch.close()
    if errors:
        raise RuntimeError(f"keep-alive: {errors[0]}")
    return dict(sent=sum(sent), answered=answered, expired=sum(expired), wall=wall,
                rate=answered / wall, srv_cpu_s=srv, srv_pct=100 * srv / wall,
                srv_ms=srv / answered * 1e3 if answered else math.nan, cli_pct=100 * cli / wall,
                other_pct=others)


# ---------------------------------------------------------------------------


def med(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def bench_server(name: str, srv, server_cpus, args) -> dict:
    log(f"# {name}: pid {srv.pid} on {srv.endpoint}")
    if server_cpus:
        pin_process(srv.pid, server_cpus)
    out: dict = {}
    out["conn_bytes"] = idle_connection_bytes(srv.endpoint, args.idle_connections, srv.pid)
    log(f"# {name}: {args.idle_connections} idle connections: server RSS "
        f"+{out['conn_bytes']:.0f} B per connection")
    log(f"# {name}: watch, 1 watcher, {args.puts} puts x {args.runs} runs")
    out["watch1"] = watch1_runs(srv.endpoint, args.puts, args.runs, srv.pid)
    log(f"# {name}: watch, {args.watch_streams} x {args.watchers_per_stream} watchers, "
        f"{args.many_puts} puts x {args.runs} runs")
    out["watchN"], out["watcher_bytes"] = watch_many_runs(
        srv.endpoint, args.watch_streams, args.watchers_per_stream, args.many_puts, args.runs,
        srv.pid, args.watch_clients)
    for threads in (1, args.churn_threads):
        rows = []
        for run in range(args.runs):
            r = churn(srv.endpoint, threads, args.churn_duration, srv.pid, f"{threads}-{run}")
            log(f"# {name}: lease churn, {threads} threads, run {run + 1}/{args.runs}: "
                f"{r['rate']:.0f} cycles/s, server {r['srv_ms']:.3f} CPU ms/cycle "
                f"({r['srv_pct']:.0f}% busy), client {r['cli_pct']:.0f}% CPU, "
                f"others {r['other_pct']:.0f}% of srv core")
            rows.append(r)
        out[f"churn{threads}"] = rows
    t0 = time.monotonic()
    ids = grant_many(srv.endpoint, args.leases, args.lease_ttl)
    log(f"# {name}: {len(ids)} leases granted in {time.monotonic() - t0:.1f} s")
    rows = []
    for run in range(args.runs):
        r = keepalive_window(srv.endpoint, ids, args.keepalive_streams, args.lease_ttl,
                             args.keepalive_window, srv.pid)
        log(f"# {name}: keep-alive run {run + 1}/{args.runs}: {r['answered']}/{r['sent']} answered "
            f"({r['expired']} with TTL<=0), {r['rate']:.0f}/s, server {r['srv_cpu_s']:.2f} CPU s "
            f"over {r['wall']:.1f} s ({r['srv_pct']:.0f}%), client {r['cli_pct']:.0f}% CPU, "
            f"others {r['other_pct']:.0f}% of srv core")
        rows.append(r)
    out["keepalive"] = rows
    return out


def report(results: dict[str, dict], args, pin_note: str) -> str:
    names = list(results)
    n_watch = args.watch_streams * args.watchers_per_stream
    lines = [f"Medians over {args.runs} runs; {pin_note}.", ""]
    head = "| measurement | " + " | ".join(names) + " |"
    lines += [head, "|---|" + "---|" * len(names)]

    def row(label: str, cell) -> None:
        lines.append(f"| {label} | " + " | ".join(cell(results[n]) for n in names) + " |")

    for key, label in (("watch1", f"watch put→event, 1 watcher ({args.puts} puts/run)"),
                       ("watchN", f"watch put→all notified, {n_watch:,} watchers "
                                  f"({args.watch_streams}x{args.watchers_per_stream}, "
                                  f"{args.many_puts} puts/run)")):
        row(f"{label}: p50 / p99 ms",
            lambda r, k=key: f"{med(r[k], 'p50'):.2f} / {med(r[k], 'p99'):.2f}")
        row(f"{label}: server / client CPU ms per put",
            lambda r, k=key: f"{med(r[k], 'srv_ms_per_put'):.2f} / {med(r[k], 'cli_ms_per_put'):.2f}")
    row("server RSS per watcher / per idle connection, bytes",
        lambda r: f"{r['watcher_bytes']:,.0f} / {r['conn_bytes']:,.0f}")
    for threads in (1, args.churn_threads):
        k = f"churn{threads}"
        row(f"lease grant+put+revoke, {threads} thread{'s' if threads > 1 else ''}: cycles/s",
            lambda r, k=k: f"{med(r[k], 'rate'):,.0f}")
        row(f"lease grant+put+revoke, {threads} thread{'s' if threads > 1 else ''}: "
            f"server CPU ms/cycle (busy %)",
            lambda r, k=k: f"{med(r[k], 'srv_ms'):.3f} ({med(r[k], 'srv_pct'):.0f}%)")
    ka = (f"{args.leases:,} leases, keep-alive every {args.lease_ttl / 3:g} s on "
          f"{args.keepalive_streams} streams, {args.keepalive_window:g} s window")
    row(f"{ka}: responses/s (offered {args.leases * 3 / args.lease_ttl:,.0f}/s)",
        lambda r: f"{med(r['keepalive'], 'rate'):,.0f}")
    row(f"{ka}: server CPU s over the window (busy %)",
        lambda r: f"{med(r['keepalive'], 'srv_cpu_s'):.2f} ({med(r['keepalive'], 'srv_pct'):.0f}%)")
    row(f"{ka}: server CPU ms per keep-alive",
        lambda r: f"{med(r['keepalive'], 'srv_ms'):.3f}")
    row(f"{ka}: answers with TTL <= 0 (lease lost), all runs",
        lambda r: str(sum(x['expired'] for x in r['keepalive'])))
    row("other processes' CPU % of the server core: watch 1 / watch many / churn 1 / churn N / "
        "keep-alive",
        lambda r: " / ".join(f"{med(r[k], 'other_pct'):.0f}" for k in
                             ("watch1", "watchN", "churn1", f"churn{args.churn_threads}", "keepalive")))
    row("client CPU % during keep-alive / churn 1 / churn N",
        lambda r: f"{med(r['keepalive'], 'cli_pct'):.0f} / {med(r['churn1'], 'cli_pct'):.0f} / "
                  f"{med(r[f'churn{args.churn_threads}'], 'cli_pct'):.0f}")
    lines += ["", f"The {n_watch:,} watchers are held by {args.watch_clients} receiver processes "
              "on the client core that count raw answers without parsing them; the client CPU "
              "per put above is theirs, summed."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--servers", default="mvcckv,etcd",
                   help="comma list of mvcckv, etcd; mvcckv/aio is mvcckv serve --grpc-server aio")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--puts", type=int, default=300, help="puts per run, 1 watcher")
    p.add_argument("--many-puts", type=int, default=30, help="puts per run, many watchers")
    p.add_argument("--watch-streams", type=int, default=10)
    p.add_argument("--watchers-per-stream", type=int, default=1000)
    p.add_argument("--watch-clients", type=int, default=5,
                   help="receiver processes holding the many watchers' streams")
    p.add_argument("--idle-connections", type=int, default=500,
                   help="connections opened to measure the server's memory per connection")
    p.add_argument("--churn-threads", type=int, default=16)
    p.add_argument("--churn-duration", type=float, default=3.0)
    p.add_argument("--leases", type=int, default=10000)
    p.add_argument("--lease-ttl", type=int, default=6, help="keep-alive every TTL/3 s")
    p.add_argument("--keepalive-streams", type=int, default=10)
    p.add_argument("--keepalive-window", type=float, default=10.0)
    p.add_argument("--no-pin", action="store_true")
    args = p.parse_args(argv)

    global SERVER_CPUS
    server_cpus, load_cpus = (None, None) if args.no_pin else plan_cpus()
    SERVER_CPUS = server_cpus
    if load_cpus:
        os.sched_setaffinity(0, load_cpus)    # before any gRPC thread exists
    pin_note = (f"server pinned to cpu {sorted(server_cpus)}, client to cpu {sorted(load_cpus)}"
                if server_cpus else "no CPU pinning")
    results: dict[str, dict] = {}
    for name in [s.strip() for s in args.servers.split(",") if s.strip()]:
        # mvcckv/aio: mvcckv serve --grpc-server aio
        base, _, front = name.partition("/")
        cls = {"mvcckv": MvcckvProcess, "etcd": EtcdProcess}[base]
        label = "etcd 3.4.23" if name == "etcd" else name
        with (cls(extra_args=["--grpc-server", front]) if front else cls()) as srv:
            results[label] = bench_server(label, srv, server_cpus, args)
    print(report(results, args, pin_note))
    return 0


if __name__ == "__main__":
    sys.exit(main())

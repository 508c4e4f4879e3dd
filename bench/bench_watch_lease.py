"""Watch and lease benchmark of etcd's v3 gRPC API: mvcckv and real etcd in one run.

Measured per server (each started on a free loopback port, pinned to the first
core; this client pinned to the second):

* watch latency: time from sending a Put to receiving the watch event, with
  1 watcher, and with many watchers on the same key (STREAMS x PER_STREAM on
  a few watch streams) until *all* of them were notified;
* lease churn: LeaseGrant + Put(lease) + LeaseRevoke cycles per second, one
  client thread and N client threads;
* keep-alive: many live leases refreshed over keep-alive streams (each lease
  every TTL/3, as clientv3 does) for a window: keep-alive responses/s and
  server CPU seconds over that window (utime + stime from /proc/<pid>/stat).

The client is Python: with thousands of watchers it spends about as much CPU
receiving the events as the server spends sending them, so the many-watcher
figure is an upper bound on the server's own delivery time.  The client's CPU
is printed next to each row.

    .venv/bin/python bench/bench_watch_lease.py --runs 3
"""

from __future__ import annotations

import argparse
import math
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

from grpc_load import core_busy_seconds, cpu_seconds, percentile, pin_process, plan_cpus  # noqa: E402
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


def watch_runs(endpoint: str, streams: int, per_stream: int, puts: int, runs: int,
               server_pid: int) -> list[dict]:
    key = f"bench/watch/{streams}x{per_stream}".encode()
    # one channel (one HTTP/2 connection) per stream, as separate clients would have
    channels = [grpc_channel(endpoint) for _ in range(streams)]
    kv_ch = grpc_channel(endpoint)
    kv = stub(kv_ch, "KV")
    ws: list[WatchStream] = []
    try:
        t0 = time.monotonic()
        ws = [WatchStream(ch, key, per_stream) for ch in channels]
        for w in ws:
            w.wait_created(120)
        log(f"#   {streams * per_stream} watchers created in {time.monotonic() - t0:.1f} s")
        kv.Put(rpc_pb2.PutRequest(key=key, value=VALUE))   # warm-up
        results = []
        for run in range(runs):
            # the warm-up event (and earlier runs) must not count
            lat: list[float] = []
            core0 = core_busy()
            cpu0, cl0, w0 = cpu_seconds(server_pid), time.process_time(), time.perf_counter()
            for _ in range(puts):
                t = time.perf_counter()
                rev = kv.Put(rpc_pb2.PutRequest(key=key, value=VALUE)).header.revision
                last = max(w.wait_rev(rev, 30) for w in ws)
                lat.append((last - t) * 1e3)
            wall = time.perf_counter() - w0
            srv, cli = cpu_seconds(server_pid) - cpu0, time.process_time() - cl0
            lat.sort()
            r = dict(p50=percentile(lat, 50), p99=percentile(lat, 99), max=lat[-1],
                     srv_ms_per_put=srv / puts * 1e3, cli_ms_per_put=cli / puts * 1e3,
                     srv_pct=100 * srv / wall, cli_pct=100 * cli / wall,
                     other_pct=other_pct(core0, srv, wall))
            log(f"#   run {run + 1}/{runs}: p50 {r['p50']:.2f} ms  p99 {r['p99']:.2f} ms  "
                f"max {r['max']:.2f} ms  server {r['srv_ms_per_put']:.2f} CPU ms/put, "
                f"client {r['cli_ms_per_put']:.2f} CPU ms/put, others {r['other_pct']:.0f}% of srv core")
            results.append(r)
        return results
    finally:
        for w in ws:
            w.close()
        for ch in channels + [kv_ch]:
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
    log(f"# {name}: watch, 1 watcher, {args.puts} puts x {args.runs} runs")
    out["watch1"] = watch_runs(srv.endpoint, 1, 1, args.puts, args.runs, srv.pid)
    log(f"# {name}: watch, {args.watch_streams} x {args.watchers_per_stream} watchers, "
        f"{args.many_puts} puts x {args.runs} runs")
    out["watchN"] = watch_runs(srv.endpoint, args.watch_streams, args.watchers_per_stream,
                               args.many_puts, args.runs, srv.pid)
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
    lines += ["", f"The client is one Python process on its own core. With {n_watch:,} watchers "
              "it parses one WatchResponse per watcher per put, so the 'all notified' time "
              "includes the client's CPU per put shown above (a bound on, not a measure of, "
              "the server's delivery time)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--servers", default="mvcckv,etcd", help="comma list of mvcckv, etcd")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--puts", type=int, default=300, help="puts per run, 1 watcher")
    p.add_argument("--many-puts", type=int, default=30, help="puts per run, many watchers")
    p.add_argument("--watch-streams", type=int, default=10)
    p.add_argument("--watchers-per-stream", type=int, default=1000)
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
        cls = {"mvcckv": MvcckvProcess, "etcd": EtcdProcess}[name]
        label = "etcd 3.4.23" if name == "etcd" else name
        with cls() as srv:
            results[label] = bench_server(label, srv, server_cpus, args)
    print(report(results, args, pin_note))
    return 0


if __name__ == "__main__":
    sys.exit(main())

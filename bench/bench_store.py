"""Benchmark of the embedded store against raw py-lmdb doing the same primitive work.

A script, not a test::

    .venv/bin/python bench/bench_store.py                  # full size: 1M keys, 5 runs
    .venv/bin/python bench/bench_store.py --quick          # smoke run, well under a minute
    .venv/bin/python bench/bench_store.py --only get,range --keys 200000
    .venv/bin/python bench/bench_store.py --profile get    # cProfile of one hot path

Every figure is the median over ``--runs`` runs, and every store figure is
set against raw py-lmdb measured in the same run, right next to it, so the
noise of a shared machine hits both alike:

``get``      ``store.get`` and ``store.range_request`` of one existing key, in
             random key order, vs ``txn.get`` of the same keys in a raw LMDB
             environment keyed by the user key -- one read transaction per
             get (what an isolated point read costs) and, for reference, all
             gets in one transaction.
``put1``     one writer, WAL fsync on: put latency p50/p99 vs the latency of
             ``write`` + ``fdatasync`` of a WAL-sized record on the same disk,
             and vs raw LMDB put+commit with ``sync=True``.
``put64``    64 writer threads sharing group commit: puts/s vs raw LMDB
             committing (with sync) every 512 puts from one thread.
``range``    the 100 keys under one prefix (``store.range(prefix,
             prefix_end(prefix))``) vs a raw LMDB cursor reading 100 items.
``compact``  compaction of ``--compact-revisions`` revisions (10 per key) with
             ``--compact-writers`` threads putting (fsync on): their put p99
             while it runs vs the same writers' p99 just before it, and the
             compaction's duration.
``memory``   bytes traced by ``tracemalloc`` while ``mvcckv.open`` rebuilds
             the index of a store of ``--keys`` keys, per key.
``reopen``   wall time of ``mvcckv.open`` on that store.

Keys look like Kubernetes' (``/registry/pods/ns-00042/pod-00017``, 31
bytes, 100 per namespace prefix); values are 256 bytes.  The store of
``--keys`` keys is loaded once, through the store itself with group commit.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import platform
import pstats
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lmdb  # noqa: E402

import mvcckv  # noqa: E402
from mvcckv import prefix_end  # noqa: E402
from mvcckv.pb import rpc_pb2 as pb  # noqa: E402
from mvcckv.store import KIND_PUT  # noqa: E402

VALUE_SIZE = 256
RANGE_WIDTH = 100
FIGURES = ("get", "put1", "put64", "range", "compact", "memory", "reopen")
_LMDB_MAP = 8 << 30


def key_of(i: int) -> bytes:
    return b"/registry/pods/ns-%05d/pod-%05d" % (i // RANGE_WIDTH, i % RANGE_WIDTH)


def prefix_of(ns: int) -> bytes:
    return b"/registry/pods/ns-%05d/" % ns


def value_of(i: int) -> bytes:
    return (b"%08d" % i) * (VALUE_SIZE // 8)


def pct(sorted_values: list[float], p: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(p / 100 * len(sorted_values)))]


def load(store, items, window: int = 4096) -> None:
    """Put every (key, value), keeping ``window`` requests in flight so that
    the writer commits them in batches (group commit), as many clients would."""
    pending: deque = deque()
    propose = store.propose
    for k, v in items:
        pending.append(propose(KIND_PUT, pb.PutRequest(key=k, value=v)))
        if len(pending) >= window:
            pending.popleft().result()
    for f in pending:
        f.result()


def raw_env(path: Path, *, sync: bool) -> lmdb.Environment:
    path.mkdir(parents=True, exist_ok=True)
    return lmdb.open(str(path), map_size=_LMDB_MAP, sync=sync, metasync=sync, readahead=False)


# ----------------------------------------------------------------------------
# one measurement each; every function returns what one run measured


def store_gets(store, keys: list[bytes]) -> float:
    get = store.get
    t = time.perf_counter()
    for k in keys:
        get(k)
    return len(keys) / (time.perf_counter() - t)


def store_range_gets(store, keys: list[bytes]) -> float:
    reqs = [pb.RangeRequest(key=k) for k in keys]
    rr = store.range_request
    t = time.perf_counter()
    for r in reqs:
        rr(r)
    return len(keys) / (time.perf_counter() - t)


def raw_gets_txn_each(env, keys: list[bytes]) -> float:
    begin = env.begin
    t = time.perf_counter()
    for k in keys:
        with begin() as txn:
            txn.get(k)
    return len(keys) / (time.perf_counter() - t)


def raw_gets_one_txn(env, keys: list[bytes]) -> float:
    t = time.perf_counter()
    with env.begin() as txn:
        get = txn.get
        for k in keys:
            get(k)
    return len(keys) / (time.perf_counter() - t)


def store_ranges(store, prefixes: list[bytes]) -> float:
    rng = store.range
    ends = [prefix_end(p) for p in prefixes]
    t = time.perf_counter()
    for p, e in zip(prefixes, ends):
        r = rng(p, e)
    dt = time.perf_counter() - t
    assert len(r.kvs) == RANGE_WIDTH, len(r.kvs)
    return len(prefixes) / dt


def raw_ranges(env, prefixes: list[bytes]) -> float:
    begin = env.begin
    t = time.perf_counter()
    for p in prefixes:
        with begin() as txn:
            cur = txn.cursor()
            cur.set_range(p)
            out = []
            for item in cur.iternext():
                out.append(item)
                if len(out) == RANGE_WIDTH:
                    break
    dt = time.perf_counter() - t
    assert len(out) == RANGE_WIDTH and out[-1][0].startswith(prefixes[-1])
    return len(prefixes) / dt


def fsync_latencies(path: Path, n: int) -> list[float]:
    """write + fdatasync of one WAL-sized record (17-byte header + a put of
    a 256-byte value) appended to a file: the disk's floor for one durable put."""
    record = b"r" * (17 + 45 + VALUE_SIZE)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    lat = []
    try:
        for _ in range(n):
            t = time.perf_counter()
            os.write(fd, record)
            os.fdatasync(fd)
            lat.append(time.perf_counter() - t)
    finally:
        os.close(fd)
        os.unlink(path)
    return sorted(lat)


def store_put_latencies(store, n: int, tag: bytes) -> list[float]:
    put = store.put
    value = value_of(0)
    lat = []
    for i in range(n):
        k = b"%s/%07d" % (tag, i)
        t = time.perf_counter()
        put(k, value)
        lat.append(time.perf_counter() - t)
    return sorted(lat)


def raw_put_sync_latencies(env, n: int, tag: bytes) -> list[float]:
    value = value_of(0)
    lat = []
    for i in range(n):
        k = b"%s/%07d" % (tag, i)
        t = time.perf_counter()
        with env.begin(write=True) as txn:
            txn.put(k, value)
        lat.append(time.perf_counter() - t)
    return sorted(lat)


def store_puts_concurrent(store, threads: int, per_thread: int, tag: bytes) -> tuple[float, list[float]]:
    """(puts/s, sorted latencies) of ``threads`` writers doing ``per_thread`` puts each."""
    value = value_of(1)
    start = threading.Barrier(threads + 1)
    lats: list[list[float]] = [[] for _ in range(threads)]

    def writer(t: int) -> None:
        put = store.put
        mine = lats[t]
        start.wait()
        for i in range(per_thread):
            k = b"%s/%02d/%06d" % (tag, t, i)
            t0 = time.perf_counter()
            put(k, value)
            mine.append(time.perf_counter() - t0)

    ths = [threading.Thread(target=writer, args=(t,)) for t in range(threads)]
    for th in ths:
        th.start()
    start.wait()
    t0 = time.perf_counter()
    for th in ths:
        th.join()
    dt = time.perf_counter() - t0
    return threads * per_thread / dt, sorted(x for lat in lats for x in lat)


def raw_puts_batched(env, n: int, batch: int, tag: bytes) -> float:
    value = value_of(1)
    t = time.perf_counter()
    i = 0
    while i < n:
        with env.begin(write=True) as txn:
            for j in range(i, min(n, i + batch)):
                txn.put(b"%s/%07d" % (tag, j), value)
        i += batch
    return n / (time.perf_counter() - t)


class Writers:
    """Background writers (fsync on) recording each put's latency."""

    def __init__(self, store, threads: int, tag: bytes):
        self.store = store
        self.stop = threading.Event()
        self.lats: list[list[float]] = [[] for _ in range(threads)]
        self.threads = [threading.Thread(target=self._run, args=(t, tag)) for t in range(threads)]

    def _run(self, t: int, tag: bytes) -> None:
        put = self.store.put
        value = value_of(t)
        mine = self.lats[t]
        i = 0
        while not self.stop.is_set():
            i += 1
            t0 = time.perf_counter()
            put(b"%s/%d/%d" % (tag, t, i % 1000), value)
            mine.append((t0, time.perf_counter() - t0))

    def __enter__(self) -> "Writers":
        for th in self.threads:
            th.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for th in self.threads:
            th.join()

    def sorted_latencies(self, start: float = 0.0, end: float = float("inf")) -> list[float]:
        """Latencies of the puts that started in [start, end)."""
        return sorted(dt for lat in self.lats for t0, dt in lat if start <= t0 < end)


# ----------------------------------------------------------------------------
# the figures


class Bench:
    def __init__(self, args):
        self.args = args
        self.root = Path(tempfile.mkdtemp(prefix="bench_store.", dir=args.dir))
        self.rows: list[dict] = []
        self.rng = random.Random(args.seed)
        self._big: Path | None = None
        self._raw: lmdb.Environment | None = None

    def close(self) -> None:
        if self._raw is not None:
            self._raw.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def row(self, figure, values, target, unit, raw=None, raw_label="", ratio_of=None, meets=None):
        """One table row: the median of ``values``, the median of ``raw`` and
        their ratio (store / raw, or ``ratio_of`` if given); ``meets(median,
        ratio)`` says whether the target holds."""
        med = statistics.median(values)
        raw_med = statistics.median(raw) if raw else None
        if ratio_of is not None:
            ratio = statistics.median(ratio_of)
        elif raw_med:
            ratio = med / raw_med
        else:
            ratio = None
        self.rows.append(
            dict(figure=figure, median=med, unit=unit, target=target, raw=raw_med, raw_label=raw_label,
                 ratio=ratio, runs=len(values), meets=None if meets is None else meets(med, ratio))
        )
        spread = f" [runs {fmt(min(values), unit)} .. {fmt(max(values), unit)}]" if len(values) > 1 else ""
        print(f"  {figure}: {fmt(med, unit)}{spread}"
              + (f"  (raw {fmt(raw_med, unit)}, ratio {ratio:.2f})" if raw else ""), flush=True)

    # -- the store of --keys keys, shared by get, range, memory and reopen ----

    def big_store(self) -> Path:
        if self._big is None:
            n = self.args.keys
            path = self.root / "big"
            t = time.perf_counter()
            with mvcckv.open(str(path)) as store:
                load(store, ((key_of(i), value_of(i)) for i in range(n)))
            print(f"  loaded {n} keys through the store in {time.perf_counter() - t:.1f} s", flush=True)
            self._big = path
        return self._big

    def raw_big(self) -> lmdb.Environment:
        if self._raw is None:
            env = raw_env(self.root / "raw-big", sync=False)
            with env.begin(write=True) as txn:
                for i in range(self.args.keys):
                    txn.put(key_of(i), value_of(i), append=True)
            self._raw = env
        return self._raw

    def fig_get(self) -> None:
        n = min(self.args.gets, self.args.keys)
        s_get, s_rr, r_each, r_one = [], [], [], []
        env = self.raw_big()
        with mvcckv.open(str(self.big_store())) as store:
            for _ in range(self.args.runs):
                keys = [key_of(i) for i in self.rng.sample(range(self.args.keys), n)]
                s_get.append(store_gets(store, keys))
                r_each.append(raw_gets_txn_each(env, keys))
                s_rr.append(store_range_gets(store, keys))
                r_one.append(raw_gets_one_txn(env, keys))
        target = ">= 200k/s and >= 0.35x raw"
        meets = lambda med, ratio: med >= 200e3 and ratio >= 0.35  # noqa: E731
        self.row("point get: store.get", s_get, target, "op/s", r_each, "txn.get, one txn per get", meets=meets)
        self.row("point get: store.range_request (1 key)", s_rr, target, "op/s",
                 r_each, "txn.get, one txn per get", meets=meets)
        self.row("  (raw txn.get, all gets in one txn)", r_one, "", "op/s")
        self.rows[-1]["ratio"] = statistics.median(s_get) / statistics.median(r_one)
        self.rows[-1]["note"] = "ratio: store.get / this"

    def fig_range(self) -> None:
        n = self.args.ranges
        namespaces = self.args.keys // RANGE_WIDTH
        s, r = [], []
        env = self.raw_big()
        with mvcckv.open(str(self.big_store())) as store:
            for _ in range(self.args.runs):
                prefixes = [prefix_of(self.rng.randrange(namespaces)) for _ in range(n)]
                s.append(store_ranges(store, prefixes))
                r.append(raw_ranges(env, prefixes))
        self.row("range of 100 keys by prefix", s, "", "op/s", r, "cursor over 100 items, one txn per range")

    def fig_put1(self) -> None:
        n = self.args.puts
        fs50, fs99, p50, p99, r50, r99 = [], [], [], [], [], []
        env = raw_env(self.root / "raw-put1", sync=True)
        try:
            with mvcckv.open(str(self.root / "put1")) as store:
                for run in range(self.args.runs):
                    fs = fsync_latencies(self.root / "put1" / "fsync.probe", n)
                    lat = store_put_latencies(store, n, b"p1/%d" % run)
                    raw = raw_put_sync_latencies(env, n, b"p1/%d" % run)
                    fs50.append(pct(fs, 50))
                    fs99.append(pct(fs, 99))
                    p50.append(pct(lat, 50))
                    p99.append(pct(lat, 99))
                    r50.append(pct(raw, 50))
                    r99.append(pct(raw, 99))
        finally:
            env.close()
        within = lambda med, ratio: ratio <= 1.3  # noqa: E731
        self.row("put, 1 writer, fsync on: p50", p50, "<= 1.3x fsync p50", "s", fs50,
                 "write+fdatasync, same disk, same run", ratio_of=[a / b for a, b in zip(p50, fs50)], meets=within)
        self.row("put, 1 writer, fsync on: p99", p99, "<= 1.3x fsync p99", "s", fs99,
                 "write+fdatasync, same disk, same run", ratio_of=[a / b for a, b in zip(p99, fs99)], meets=within)
        self.row("  (raw lmdb put+commit, sync=True: p50)", r50, "", "s")
        self.rows[-1]["ratio"] = statistics.median(p50) / statistics.median(r50)
        self.rows[-1]["note"] = "ratio: store p50 / this"
        self.row("  (raw lmdb put+commit, sync=True: p99)", r99, "", "s")
        self.rows[-1]["ratio"] = statistics.median(p99) / statistics.median(r99)
        self.rows[-1]["note"] = "ratio: store p99 / this"

    def fig_put64(self) -> None:
        threads, per = 64, self.args.puts64 // 64
        rate, l50, l99, raw_batched, raw_each = [], [], [], [], []
        env = raw_env(self.root / "raw-put64", sync=True)
        try:
            with mvcckv.open(str(self.root / "put64")) as store:
                for run in range(self.args.runs):
                    r, lat = store_puts_concurrent(store, threads, per, b"p64/%d" % run)
                    rate.append(r)
                    l50.append(pct(lat, 50))
                    l99.append(pct(lat, 99))
                    raw_batched.append(raw_puts_batched(env, threads * per, 512, b"p64/%d" % run))
                    each = raw_put_sync_latencies(env, 200, b"p64e/%d" % run)
                    raw_each.append(len(each) / sum(each))
        finally:
            env.close()
        self.row("put, 64 writers, fsync on (group commit)", rate, ">= 20k/s", "op/s", raw_batched,
                 "one thread, commit+sync every 512 puts", meets=lambda med, ratio: med >= 20e3)
        self.row("  (raw lmdb, commit+sync every put)", raw_each, "", "op/s")
        self.rows[-1]["ratio"] = statistics.median(rate) / statistics.median(raw_each)
        self.rows[-1]["note"] = "ratio: store / this"
        self.row("  (64 writers: put latency p50)", l50, "", "s")
        self.row("  (64 writers: put latency p99)", l99, "", "s")

    def fig_compact(self) -> None:
        a = self.args
        per_key = 10
        keys = max(1, a.compact_revisions // per_key)
        base99, during99, durations, rates = [], [], [], []
        path = self.root / "compact"
        with mvcckv.open(str(path)) as store:
            for run in range(a.compact_runs):
                t = time.perf_counter()
                load(store, ((key_of(i % keys), value_of(i)) for i in range(keys * per_key)))
                print(f"  run {run}: wrote {keys * per_key} revisions in {time.perf_counter() - t:.1f} s",
                      flush=True)
                at = store.revision
                with Writers(store, a.compact_writers, b"cw/base") as w:
                    time.sleep(0.2)  # warm-up, not counted
                    t = time.perf_counter()
                    time.sleep(a.compact_baseline)
                base = w.sorted_latencies(t)
                with Writers(store, a.compact_writers, b"cw/during") as w:
                    time.sleep(0.2)
                    t = time.perf_counter()
                    store.compact(at, physical=True)
                    dt = time.perf_counter() - t
                during = w.sorted_latencies(t, t + dt)
                base99.append(pct(base, 99))
                during99.append(pct(during, 99))
                durations.append(dt)
                rates.append(keys * per_key / dt)
                print(f"  run {run}: compaction {dt:.1f} s; writers' p99 {pct(base, 99) * 1e3:.2f} ms before, "
                      f"{pct(during, 99) * 1e3:.2f} ms during ({len(during)} puts)", flush=True)
        n = keys * per_key
        self.row(f"compaction of {n} revisions: writers' put p99 during", during99, "<= 2x without", "s",
                 base99, f"the same {a.compact_writers} writers just before",
                 ratio_of=[d / b for d, b in zip(during99, base99)], meets=lambda med, ratio: ratio <= 2)
        self.row(f"compaction of {n} revisions: duration", durations, "", "s")
        self.row("  (compaction: revisions/s)", rates, "", "op/s")

    def fig_memory(self) -> None:
        path = self.big_store()
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        store = mvcckv.open(str(path))
        gc.collect()
        after, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        store.close()
        per_key = (after - before) / self.args.keys
        self.row(f"memory: bytes per key after open ({self.args.keys} keys)", [per_key], "<= 250 B/key", "B",
                 meets=lambda med, ratio: med <= 250)
        self.rows[-1]["note"] = f"tracemalloc, whole open; peak {(peak - before) / self.args.keys:.0f} B/key"

    def fig_reopen(self) -> None:
        path = self.big_store()
        times = []
        for _ in range(self.args.runs):
            gc.collect()
            t = time.perf_counter()
            store = mvcckv.open(str(path))
            times.append(time.perf_counter() - t)
            store.close()
        self.row(f"reopen a store of {self.args.keys} keys", times, "<= 3 s", "s", meets=lambda med, ratio: med <= 3)


# ----------------------------------------------------------------------------
# output


def fmt(v, unit: str) -> str:
    if v is None:
        return ""
    if unit == "op/s":
        return f"{v / 1e3:,.1f}k/s" if v >= 1e3 else f"{v:,.0f}/s"
    if unit == "s":
        return f"{v * 1e3:,.3f} ms" if v < 1 else f"{v:,.2f} s"
    return f"{v:,.0f} {unit}"


def table(rows: list[dict]) -> str:
    out = [
        "| figure | median | target | met | raw py-lmdb, same run (median) | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        raw = fmt(r["raw"], r["unit"]) + (f" ({r['raw_label']})" if r["raw_label"] else "")
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        if r.get("note"):
            ratio += f" ({r['note']})" if ratio else r["note"]
        met = {None: "", True: "yes", False: "**no**"}[r["meets"]]
        out.append(f"| {r['figure']} | {fmt(r['median'], r['unit'])} | {r['target']} | {met} | {raw} | {ratio} |")
    return "\n".join(out)


def profile(bench: Bench, what: str, top: int) -> None:
    """cProfile of one hot path; for puts, the caller thread and the writer
    thread are profiled separately (cProfile sees only the thread it runs in)."""
    a = bench.args

    def report(title: str, prof: cProfile.Profile) -> None:
        print(f"\n### {title}\n")
        pstats.Stats(prof).sort_stats("tottime").print_stats(top)

    if what == "get":
        keys = [key_of(i) for i in bench.rng.sample(range(a.keys), min(a.gets, a.keys))]
        with mvcckv.open(str(bench.big_store())) as store:
            prof = cProfile.Profile()
            prof.runcall(store_gets, store, keys)
            report(f"store.get x {len(keys)}", prof)
        return
    with mvcckv.open(str(bench.root / f"profile-{what}")) as store:
        writer_prof = cProfile.Profile()
        # run_on_writer runs the callable on the writer thread: enable()
        # there attaches the profiler to that thread.
        store.run_on_writer(writer_prof.enable).result()
        if what == "put1":
            caller = cProfile.Profile()
            caller.runcall(store_put_latencies, store, a.puts, b"prof")
        else:
            caller = None
            store_puts_concurrent(store, 64, a.puts64 // 64, b"prof")
        store.run_on_writer(writer_prof.disable).result()
    if caller is not None:
        report(f"{what}: the caller thread", caller)
    report(f"{what}: the writer thread", writer_prof)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", type=int, default=1_000_000, help="keys in the store for get/range/memory/reopen")
    p.add_argument("--runs", type=int, default=5, help="runs per figure; the table shows medians")
    p.add_argument("--gets", type=int, default=200_000, help="point gets per run")
    p.add_argument("--ranges", type=int, default=5_000, help="100-key ranges per run")
    p.add_argument("--puts", type=int, default=2_000, help="single-writer puts per run")
    p.add_argument("--puts64", type=int, default=32_000, help="puts per run over the 64 writers")
    p.add_argument("--compact-revisions", type=int, default=1_000_000)
    p.add_argument("--compact-runs", type=int, default=3)
    p.add_argument("--compact-writers", type=int, default=4)
    p.add_argument("--compact-baseline", type=float, default=3.0, help="seconds of writers before compacting")
    p.add_argument("--only", default=",".join(FIGURES), help=f"comma-separated subset of {','.join(FIGURES)}")
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    p.add_argument("--dir", default=None, help="where the data dirs go (default: the system temp dir)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--profile", choices=("get", "put1", "put64"), help="cProfile one hot path instead")
    p.add_argument("--top", type=int, default=25, help="functions listed per profile")
    args = p.parse_args(argv)
    if args.quick:
        args.keys, args.runs, args.gets, args.ranges = 20_000, 3, 20_000, 500
        args.puts, args.puts64 = 200, 64 * 30
        args.compact_revisions, args.compact_runs, args.compact_baseline = 20_000, 1, 1.0
    only = [f.strip() for f in args.only.split(",") if f.strip()]
    unknown = set(only) - set(FIGURES)
    if unknown:
        p.error(f"unknown figure(s): {', '.join(sorted(unknown))}")

    bench = Bench(args)
    try:
        if args.profile:
            profile(bench, args.profile, args.top)
            return 0
        print(f"# bench_store: {' '.join(sys.argv[1:]) or '(defaults)'}", flush=True)
        print(f"# {platform.python_implementation()} {platform.python_version()}, lmdb {lmdb.version()}, "
              f"py-lmdb {lmdb.__version__}, {os.cpu_count()} CPUs, data in {bench.root}", flush=True)
        print("# load average at start: %.2f %.2f %.2f" % os.getloadavg(), flush=True)
        for fig in FIGURES:
            if fig in only:
                print(f"- {fig}", flush=True)
                getattr(bench, f"fig_{fig}")()
        print("# load average at end: %.2f %.2f %.2f" % os.getloadavg())
        print()
        print(f"Medians over {args.runs} runs (compaction: {args.compact_runs}; memory: 1).\n")
        print(table(bench.rows))
    finally:
        bench.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What durability costs: embedded put throughput and fsyncs per put.

A script, not a test::

    .venv/bin/python bench/bench_durability.py                 # 3 runs of 3 s per cell
    .venv/bin/python bench/bench_durability.py --quick         # 1 run of 1 s per cell
    .venv/bin/python bench/bench_durability.py --before 65a150b --threads 1,16,64

Every cell is ``--threads`` writer threads calling ``store.put`` (100-byte
values over 10,000 keys) for ``--duration`` seconds in a fresh process and
data dir, with ``fsync_count.c`` preloaded to count every fsync, fdatasync
and msync the process makes (LMDB's own included, which a Python wrapper
would not see).  Configurations, all measured in the same run:

``raw``        the reference: the same threads hand 100-byte records to one
               committer thread that appends each batch to a file with one
               ``write`` and one ``fdatasync`` and then wakes them (group
               commit with nothing else: the floor any durable put pays).
``before``     mvcckv at ``--before`` (default: the commit this design
               replaced): LMDB committed with ``sync=False``, synced every
               5 s -- fast, but not safe against a power cut.
``lmdb-sync``  the same old code with LMDB syncing its data pages on every
               commit (``sync=True, metasync=False``): the candidate that is
               safe by LMDB's own rule, at one more fdatasync per batch.
``after``      this tree: unsynced commits, a pinned, synced checkpoint
               every 5 s (see docs/durability.md).

Figures are medians over ``--runs``; ``after / raw`` is the ratio that
matters (the served comparison against the durable no-op server of
``grpc_load.py`` is a separate run).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import queue
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COUNTER_SOURCE = Path(__file__).with_name("fsync_count.c")
CONFIGS = ("raw", "before", "lmdb-sync", "after")
VALUE = b"v" * 100
KEYS = [b"/registry/bench/key-%05d" % i for i in range(10000)]


# ---------------------------------------------------------------------------
# worker side: one cell, in its own process


def _fsyncs() -> int:
    lib = ctypes.CDLL(os.environ["LD_PRELOAD"])
    lib.fsync_count.restype = ctypes.c_ulong
    return lib.fsync_count()


def _drive(put, threads: int, duration: float) -> tuple[int, float, int]:
    """Run ``threads`` threads calling ``put(key)``; (puts, seconds, fsyncs)
    over the measured window, after a short warm-up."""
    stop = threading.Event()
    measuring = threading.Event()
    counts = [0] * threads

    def loop(t: int) -> None:
        rng = random.Random(t)
        n = 0
        while not stop.is_set():
            put(rng.choice(KEYS))
            if measuring.is_set():
                n += 1
        counts[t] = n

    workers = [threading.Thread(target=loop, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    time.sleep(min(0.5, duration / 4))
    f0 = _fsyncs()
    t0 = time.perf_counter()
    measuring.set()
    time.sleep(duration)
    measuring.clear()
    f1 = _fsyncs()
    t1 = time.perf_counter()
    stop.set()
    for w in workers:
        w.join()
    return sum(counts), t1 - t0, f1 - f0


def _raw_reference(path: str, threads: int, duration: float) -> tuple[int, float, int]:
    q: queue.SimpleQueue = queue.SimpleQueue()
    fd = os.open(os.path.join(path, "log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    done = threading.Event()

    def committer() -> None:
        while not done.is_set():
            try:
                first = q.get(timeout=0.1)
            except queue.Empty:
                continue
            batch = [first]
            while True:
                try:
                    batch.append(q.get_nowait())
                except queue.Empty:
                    break
            os.write(fd, b"".join(rec for rec, _ in batch))
            os.fdatasync(fd)
            for _, ev in batch:
                ev.set()

    c = threading.Thread(target=committer)
    c.start()

    def put(key: bytes) -> None:
        ev = threading.Event()
        q.put((key + VALUE, ev))
        ev.wait()

    try:
        return _drive(put, threads, duration)
    finally:
        done.set()
        c.join()
        os.close(fd)


def _mvcckv(path: str, threads: int, duration: float, force_sync: bool) -> tuple[int, float, int]:
    if force_sync:
        import lmdb

        real_open = lmdb.open

        def synced_open(*args, **kw):
            kw["sync"] = True
            kw["metasync"] = False
            return real_open(*args, **kw)

        lmdb.open = synced_open
    import mvcckv

    store = mvcckv.open(path)
    try:
        return _drive(lambda key: store.put(key, VALUE), threads, duration)
    finally:
        store.close()


def _worker(args: argparse.Namespace) -> None:
    path = tempfile.mkdtemp(prefix="bench-durability-", dir=args.dir)
    threads = int(args.threads)
    try:
        if args.worker == "raw":
            puts, secs, fsyncs = _raw_reference(path, threads, args.duration)
        else:
            puts, secs, fsyncs = _mvcckv(path, threads, args.duration, args.worker == "lmdb-sync")
    finally:
        shutil.rmtree(path, ignore_errors=True)
    print(json.dumps({"puts": puts, "seconds": secs, "fsyncs": fsyncs}))


# ---------------------------------------------------------------------------
# driver side


def _extract(ref: str, into: Path) -> Path:
    tree = into / "before"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "mvcckv"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return tree


def _cell(config: str, threads: int, duration: float, counter: Path, trees: dict, scratch: str) -> dict:
    env = dict(os.environ, LD_PRELOAD=str(counter), PYTHONPATH=str(trees.get(config, REPO)))
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--worker", config,
        "--threads", str(threads), "--duration", str(duration), "--dir", scratch,
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=duration * 10 + 120)
    if out.returncode != 0:
        raise RuntimeError(f"{config} c={threads} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=3.0, help="seconds measured per cell")
    ap.add_argument("--runs", type=int, default=3, help="runs per cell (median reported)")
    ap.add_argument("--threads", default="1,16,64", help="writer thread counts")
    ap.add_argument("--before", default="65a150b", help="git ref of the sync=False design")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--quick", action="store_true", help="one run of one second per cell")
    ap.add_argument("--dir", default=None, help="where data dirs go (default: the temp dir)")
    ap.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker(args)
        return
    if args.quick:
        args.duration, args.runs = 1.0, 1
    threads = [int(t) for t in args.threads.split(",")]
    configs = args.configs.split(",")
    with tempfile.TemporaryDirectory(prefix="bench-durability-") as tmp:
        tmp_path = Path(tmp)
        counter = tmp_path / "fsync_count.so"
        subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(counter), str(COUNTER_SOURCE), "-ldl"], check=True)
        trees = {}
        if "before" in configs or "lmdb-sync" in configs:
            before = _extract(args.before, tmp_path)
            trees = {"before": before, "lmdb-sync": before}
        scratch = args.dir or tmp
        results: dict[tuple[str, int], list[dict]] = {}
        for _ in range(args.runs):
            # Interleaved, so a noisy moment of a shared machine hits every
            # configuration alike.
            for c in threads:
                for config in configs:
                    results.setdefault((config, c), []).append(
                        _cell(config, c, args.duration, counter, trees, scratch)
                    )
    print(f"embedded puts/s (median of {args.runs} x {args.duration:g} s) and fsyncs per put; "
          f"before = {args.before}")
    head = f"{'config':<10}" + "".join(f"{'c=' + str(c):>22}" for c in threads)
    print(head)
    medians: dict[tuple[str, int], float] = {}
    for config in configs:
        row = f"{config:<10}"
        for c in threads:
            runs = results[(config, c)]
            qps = statistics.median(r["puts"] / r["seconds"] for r in runs)
            per = statistics.median(r["fsyncs"] / max(r["puts"], 1) for r in runs)
            medians[(config, c)] = qps
            row += f"{qps:>12,.0f} {per:>5.3f} f/p"
        print(row)
    for config in configs:
        if config == "raw" or "raw" not in configs:
            continue
        print(f"{config + ' / raw':<18}" + "".join(f"{medians[(config, c)] / medians[('raw', c)]:>10.2f}" for c in threads))
    if "before" in configs and "after" in configs:
        print(f"{'after / before':<18}" + "".join(f"{medians[('after', c)] / medians[('before', c)]:>10.2f}" for c in threads))


if __name__ == "__main__":
    main()

"""Benchmark of the in-memory index (mvcckv.index) at a million keys.

A script, not a test::

    .venv/bin/python bench/bench_index.py [--keys 1000000] [--runs 3]

Targets, for N keys of 23 bytes put once each: at most 250 bytes per key for
the whole index (SortedDict, KeyIndex objects, packed revisions and the key
bytes themselves, measured with tracemalloc) and TreeIndex.get around 1 us.

Each timed run builds a fresh index (keys inserted in random order, one put
per revision), then measures random gets, ranges of 100 consecutive keys,
and a compaction after 10% of the keys were updated and another 10%
deleted.  The figures printed are medians over the runs.  Times are the
process's CPU time, so that other work on a shared machine inflates them
less (on an idle machine they equal wall time).  Memory is measured in a
separate build, since tracemalloc slows every allocation down.
"""

from __future__ import annotations

import argparse
import gc
import platform
import random
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mvcckv.index import TreeIndex  # noqa: E402

KEY_FORMAT = b"/registry/pods/%08d"  # 23 bytes, a Kubernetes-like key
GETS = 200_000
RANGES = 2_000
RANGE_WIDTH = 100


def make_keys(n: int, seed: int) -> list[bytes]:
    keys = [KEY_FORMAT % i for i in range(n)]
    random.Random(seed).shuffle(keys)
    return keys


def build(keys: list[bytes]) -> tuple[TreeIndex, int]:
    """One put per key, each its own revision; returns the index and the
    current revision."""
    idx = TreeIndex()
    put = idx.put
    main = 1
    for key in keys:
        main += 1
        put(key, main, 0)
    return idx, main


def churn(idx: TreeIndex, keys: list[bytes], main: int, seed: int) -> int:
    """Update 10% of the keys and delete another 10%; returns the new revision."""
    picked = random.Random(seed).sample(keys, len(keys) // 5)
    half = len(picked) // 2
    for key in picked[:half]:
        main += 1
        idx.put(key, main, 0)
    for key in picked[half:]:
        main += 1
        idx.tombstone(key, main, 0)
    return main


def measure_memory(n: int) -> tuple[float, float]:
    """Bytes per key: after the initial load, then after every key was updated
    once and the index compacted (most keys' steady state)."""
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    keys = make_keys(n, seed=1)
    idx, main = build(keys)
    sample = keys[:]  # the key list itself is not part of the index
    del keys
    gc.collect()
    loaded = (tracemalloc.get_traced_memory()[0] - base - sys.getsizeof(sample)) / n
    for key in sample:
        main += 1
        idx.put(key, main, 0)
    idx.compact(main)
    gc.collect()
    compacted = (tracemalloc.get_traced_memory()[0] - base - sys.getsizeof(sample)) / n
    tracemalloc.stop()
    return loaded, compacted


def timed(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def one_run(n: int, seed: int) -> dict[str, float]:
    keys = make_keys(n, seed)
    out: dict[str, float] = {}
    box: dict = {}

    def do_build():
        box["idx"], box["main"] = build(keys)

    out["build puts/s"] = n / timed(do_build)
    idx, main = box["idx"], box["main"]

    rng = random.Random(seed)
    # Fresh key objects, as decoded from requests: the dict probe must
    # compare bytes, not just identities.
    lookups = [bytes(bytearray(keys[rng.randrange(n)])) for _ in range(GETS)]

    def do_gets():
        get = idx.get
        for key in lookups:
            get(key, main)

    out["get ops/s"] = GETS / timed(do_gets)

    ordered = sorted(keys)
    starts = [rng.randrange(n - RANGE_WIDTH) for _ in range(RANGES)]
    spans = [(ordered[i], ordered[i + RANGE_WIDTH]) for i in starts]

    def do_ranges():
        rng_ = idx.range
        for lo, hi in spans:
            rng_(lo, hi, main)

    def do_counts():
        count = idx.range_count
        for lo, hi in spans:
            count(lo, hi, main)

    out["range-100 ops/s"] = RANGES / timed(do_ranges)
    out["range-100 count ops/s"] = RANGES / timed(do_counts)

    main = churn(idx, keys, main, seed)
    box.clear()

    def do_compact():
        box["kept"] = idx.compact(main)

    out["compact s"] = timed(do_compact)
    out["kept revisions"] = len(box["kept"])
    out["keys after compact"] = len(idx)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    print(f"mvcckv index benchmark: {args.keys:,} keys of {len(KEY_FORMAT % 0)} bytes, "
          f"{args.runs} runs, Python {platform.python_version()} on {platform.machine()}")
    loaded, compacted = measure_memory(args.keys)
    print(f"  memory after load           {loaded:10.1f} bytes/key   (target <= 250)")
    print(f"  memory after update+compact {compacted:10.1f} bytes/key")

    runs = [one_run(args.keys, seed) for seed in range(args.runs)]
    for name in runs[0]:
        values = [r[name] for r in runs]
        med = statistics.median(values)
        spread = f"(runs: {', '.join(f'{v:,.3g}' for v in values)})"
        print(f"  {name:27} {med:12,.2f}   {spread}")
    get_us = 1e6 / statistics.median(r["get ops/s"] for r in runs)
    print(f"  get latency                 {get_us:10.2f} us       (target ~1)")


if __name__ == "__main__":
    main()

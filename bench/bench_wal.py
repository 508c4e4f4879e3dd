"""How close the WAL's commit path comes to the disk's own fdatasync.

Measures, on the filesystem holding ``--dir`` (default: the system temp
directory), the median over ``--runs`` runs of:

* raw: ``os.write`` of 4 KiB + ``os.fdatasync``, per call;
* one request: ``WAL.append`` of one 300-byte record (17-byte header and a
  283-byte msgpack put request) + ``WAL.sync``, per call;
* group commit: 64 such appends + one ``sync``, in records per second;
* append alone (no sync), per record: the CPU cost of framing.

and the ratio of each commit latency to raw fdatasync.  A ratio near 1
means the WAL adds nothing measurable to the disk's flush; the group-commit
line shows what one flush buys when requests are batched.

Usage::

    .venv/bin/python bench/bench_wal.py [--dir DIR] [--runs 7] [--ops 300]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgpack  # noqa: E402

from mvcckv.wal import HEADER_BYTES, WAL  # noqa: E402

RECORD_BYTES = 300
BATCH = 64
_fdatasync = getattr(os, "fdatasync", os.fsync)


def _put_request(record_bytes: int) -> dict:
    """A put request whose framed WAL record is exactly ``record_bytes``."""
    req = {"key": b"/registry/pods/default/web-0", "value": b"", "lease": 0, "prev_kv": False}
    while len(msgpack.packb(req, use_bin_type=True)) + HEADER_BYTES < record_bytes:
        req["value"] += b"v"
    assert len(msgpack.packb(req, use_bin_type=True)) + HEADER_BYTES == record_bytes
    return req


def raw_fdatasync(d: str, ops: int) -> float:
    """Median seconds of one 4 KiB append + fdatasync."""
    block = os.urandom(4096)
    fd = os.open(os.path.join(d, "raw"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        lat = []
        for _ in range(ops):
            t = time.perf_counter()
            os.write(fd, block)
            _fdatasync(fd)
            lat.append(time.perf_counter() - t)
    finally:
        os.close(fd)
    return statistics.median(lat)


def wal_append_sync(d: str, ops: int, req: dict) -> float:
    """Median seconds of one append + sync."""
    with WAL.open(os.path.join(d, "one")) as wal:
        wal.append(1, req)
        wal.sync()  # the first sync also makes the new segment's size durable
        lat = []
        for _ in range(ops):
            t = time.perf_counter()
            wal.append(1, req)
            wal.sync()
            lat.append(time.perf_counter() - t)
    return statistics.median(lat)


def wal_group_commit(d: str, ops: int, req: dict) -> tuple[float, float]:
    """(records per second, median seconds per 64-record sync)."""
    with WAL.open(os.path.join(d, "batch")) as wal:
        wal.append(1, req)
        wal.sync()
        lat = []
        start = time.perf_counter()
        for _ in range(ops):
            t = time.perf_counter()
            for _ in range(BATCH):
                wal.append(1, req)
            wal.sync()
            lat.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - start
    return ops * BATCH / elapsed, statistics.median(lat)


def append_only(d: str, ops: int, req: dict) -> float:
    """Seconds per append when nothing is synced (framing cost only)."""
    with WAL.open(os.path.join(d, "append")) as wal:
        n = ops * BATCH
        t = time.perf_counter()
        for _ in range(n):
            wal.append(1, req)
        return (time.perf_counter() - t) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=None, help="directory on the disk to measure (default: temp dir)")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--ops", type=int, default=300, help="commits per run")
    args = ap.parse_args()

    req = _put_request(RECORD_BYTES)
    results: dict[str, list[float]] = {"raw": [], "one": [], "rps": [], "batch": [], "append": []}
    for _ in range(args.runs):
        d = tempfile.mkdtemp(prefix="bench_wal.", dir=args.dir)
        try:
            results["raw"].append(raw_fdatasync(d, args.ops))
            results["one"].append(wal_append_sync(d, args.ops, req))
            rps, per_batch = wal_group_commit(d, args.ops, req)
            results["rps"].append(rps)
            results["batch"].append(per_batch)
            results["append"].append(append_only(d, args.ops, req))
        finally:
            shutil.rmtree(d)

    med = {k: statistics.median(v) for k, v in results.items()}
    where = args.dir or tempfile.gettempdir()
    print(f"WAL commit path on {where}: median of {args.runs} runs x {args.ops} commits")
    print(f"  raw write(4 KiB) + fdatasync          {med['raw'] * 1e6:9.1f} us   1.00x")
    print(
        f"  append(300 B) + sync                  {med['one'] * 1e6:9.1f} us   "
        f"{med['one'] / med['raw']:.2f}x raw"
    )
    print(
        f"  {BATCH} x append(300 B) + one sync          {med['batch'] * 1e6:9.1f} us   "
        f"{med['batch'] / med['raw']:.2f}x raw"
    )
    print(
        f"  group commit throughput               {med['rps']:9.0f} records/s "
        f"({med['rps'] * med['raw']:.0f}x one record per raw fdatasync)"
    )
    print(f"  append alone (no sync)                {med['append'] * 1e6:9.2f} us/record")
    spread = max(results["raw"]) / min(results["raw"])
    print(f"  (raw fdatasync medians vary {spread:.2f}x between runs)")


if __name__ == "__main__":
    main()

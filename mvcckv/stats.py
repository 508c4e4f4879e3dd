"""Counters the engine keeps for monitoring: plain integers and fixed-bucket
histograms, bumped where the work is done and read only when someone asks
(``mvcckv.server.metrics`` turns them into etcd's Prometheus metrics at
scrape time).  Nothing here locks: every counter is bumped under a lock the
store already holds (the writer's, or the read lock), and a reader that
sees a value a moment old is fine.

What is counted follows etcd's mvcc metrics (``mvcc/metrics_txn.go``): one
*operation* is a range, a put or a delete-range inside one store
transaction — a Range request is one range; a Txn counts every compare
(each reads its key) and every op of the branch it takes; a put or delete
with ``prev_kv`` reads first, one more range.  A transaction of two or
more operations also counts as one txn.
"""

from __future__ import annotations

from bisect import bisect_left

# etcd's buckets: WAL fsync 1 ms .. 8 s, backend commit 1 ms .. 8 s
# (prometheus.ExponentialBuckets(0.001, 2, 14)).
DISK_BUCKETS = tuple(0.001 * 2**i for i in range(14))


class Histogram:
    """Counts per bucket (upper bounds, inclusive) and the sum, as
    Prometheus' cumulative buckets need them."""

    __slots__ = ("bounds", "counts", "total", "count")

    def __init__(self, bounds: tuple[float, ...] = DISK_BUCKETS):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, count)`` pairs, +Inf last, for Prometheus."""
        out, running = [], 0
        for bound, n in zip(self.bounds + (float("inf"),), self.counts):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out


class EngineStats:
    """One store's counters (see the module docstring for what counts)."""

    __slots__ = ("ranges", "puts", "deletes", "txns", "put_bytes", "proposals_applied",
                 "wal_fsync", "backend_commit", "wal_bytes",
                 "leases_granted", "leases_revoked", "leases_renewed", "leases_expired")

    def __init__(self):
        self.ranges = 0
        self.puts = 0
        self.deletes = 0
        self.txns = 0
        self.put_bytes = 0
        self.proposals_applied = 0
        self.wal_fsync = Histogram()
        self.backend_commit = Histogram()
        self.wal_bytes = 0
        self.leases_granted = 0
        self.leases_revoked = 0
        self.leases_renewed = 0
        self.leases_expired = 0

    def ended(self, ranges: int, puts: int, deletes: int) -> None:
        """A store transaction ended after these operations."""
        if ranges + puts + deletes > 1:
            self.txns += 1
        self.ranges += ranges
        self.puts += puts
        self.deletes += deletes

"""The lessor: leases, their TTLs, and the keys attached to them (§9).

Two kinds of change, kept apart on purpose:

* **Logged** (applied on the store's writer thread, deterministic, replayed
  from the WAL): grant, revoke (which deletes the attached keys in one
  revision), checkpoint of a remaining TTL, and attach/detach as a side
  effect of puts and deletes.  These change the ``lease`` database.
* **Clock** (this process only, never logged): expiry times and renewals.
  Expiry is *detected* by the clock but *applied* as an ordinary logged
  revoke request, so a replay after a crash does exactly what the live
  store did.

As in etcd, a restart grants every lease a fresh expiry (its checkpointed
remaining TTL if one was recorded, else its full TTL, plus one second of
grace), so leases do not expire while the server is down.
"""

from __future__ import annotations

import heapq
import struct
import time
from typing import Callable

from mvcckv import errors
from mvcckv.pb import lease_pb2

MAX_LEASE_TTL = 9_000_000_000
DEFAULT_MIN_TTL = 2
# Grace given to every lease when the lessor becomes primary (etcd extends
# by its election timeout, 1 s by default).
PROMOTE_EXTEND = 1.0

_ID = struct.Struct(">q")


def lease_key(lease_id: int) -> bytes:
    """Backend key of a lease: its ID as 8 big-endian bytes (two's complement)."""
    return _ID.pack(lease_id)


class Lease:
    __slots__ = ("id", "ttl", "remaining_ttl", "expiry", "keys", "revoking_since")

    def __init__(self, lease_id: int, ttl: int, remaining_ttl: int = 0):
        self.id = lease_id
        self.ttl = ttl
        self.remaining_ttl = remaining_ttl
        self.expiry = float("inf")
        self.keys: set[bytes] = set()
        self.revoking_since = 0.0

    def encode(self) -> bytes:
        return lease_pb2.Lease(ID=self.id, TTL=self.ttl, RemainingTTL=self.remaining_ttl).SerializeToString()

    def refresh(self, now: float, extend: float = 0.0) -> None:
        self.expiry = now + extend + (self.remaining_ttl if self.remaining_ttl > 0 else self.ttl)


class Lessor:
    """Lease state; the store serializes every call under its index lock."""

    def __init__(self, min_ttl: int = DEFAULT_MIN_TTL, clock: Callable[[], float] = time.monotonic):
        self.min_ttl = min_ttl
        self.clock = clock
        self.leases: dict[int, Lease] = {}
        self.key_lease: dict[bytes, int] = {}
        # (expiry, id) entries; stale ones are skipped when popped.
        self._expiries: list[tuple[float, int]] = []

    # -- recovery -----------------------------------------------------------

    def recover(self, stored: list[bytes], key_lease: dict[bytes, int]) -> list[bytes]:
        """Load persisted leases and re-attach keys; returns keys whose lease
        is unknown (left unattached, as etcd does)."""
        for data in stored:
            lp = lease_pb2.Lease.FromString(data)
            self.leases[lp.ID] = Lease(lp.ID, max(lp.TTL, self.min_ttl), lp.RemainingTTL)
        orphans = []
        for key, lid in key_lease.items():
            lease = self.leases.get(lid)
            if lease is None:
                orphans.append(key)
                continue
            lease.keys.add(key)
            self.key_lease[key] = lid
        return orphans

    def promote(self) -> None:
        """Start every lease's clock (once, when the store opens)."""
        now = self.clock()
        for lease in self.leases.values():
            lease.refresh(now, PROMOTE_EXTEND)
            heapq.heappush(self._expiries, (lease.expiry, lease.id))

    # -- logged changes -----------------------------------------------------

    def grant(self, lease_id: int, ttl: int) -> Lease:
        if lease_id == 0:
            raise errors.LeaseNotFoundError()
        if ttl > MAX_LEASE_TTL:
            raise errors.LeaseTTLTooLargeError()
        if lease_id in self.leases:
            raise errors.LeaseExistsError()
        lease = Lease(lease_id, max(ttl, self.min_ttl))
        lease.refresh(self.clock())
        self.leases[lease_id] = lease
        heapq.heappush(self._expiries, (lease.expiry, lease_id))
        return lease

    def revoke(self, lease_id: int) -> list[bytes]:
        """Forget the lease; returns its keys sorted (the caller deletes them
        in that order so every replay produces the same sub revisions)."""
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            raise errors.LeaseNotFoundError()
        for key in lease.keys:
            self.key_lease.pop(key, None)
        return sorted(lease.keys)

    def checkpoint(self, lease_id: int, remaining_ttl: int) -> Lease | None:
        lease = self.leases.get(lease_id)
        if lease is not None:
            lease.remaining_ttl = remaining_ttl
        return lease

    def attach(self, lease_id: int, key: bytes) -> None:
        lease = self.leases.get(lease_id)
        if lease is None:
            raise errors.LeaseNotFoundError()
        lease.keys.add(key)
        self.key_lease[key] = lease_id

    def detach(self, key: bytes) -> None:
        lid = self.key_lease.pop(key, 0)
        if lid:
            lease = self.leases.get(lid)
            if lease is not None:
                lease.keys.discard(key)

    def lease_of(self, key: bytes) -> int:
        return self.key_lease.get(key, 0)

    # -- clock ------------------------------------------------------------------

    def lookup(self, lease_id: int) -> Lease | None:
        return self.leases.get(lease_id)

    def renew(self, lease_id: int) -> int:
        """Keep-alive: the granted TTL, or 0 if the lease is gone or expired."""
        lease = self.leases.get(lease_id)
        now = self.clock()
        if lease is None or lease.expiry <= now:
            return 0
        lease.remaining_ttl = 0
        lease.refresh(now)
        heapq.heappush(self._expiries, (lease.expiry, lease_id))
        return lease.ttl

    def remaining(self, lease_id: int) -> float:
        lease = self.leases.get(lease_id)
        if lease is None:
            return -1.0
        return max(0.0, lease.expiry - self.clock())

    def expired(self, limit: int, retry_after: float) -> list[int]:
        """Up to ``limit`` expired leases not already being revoked (a revoke
        still pending after ``retry_after`` seconds is asked for again)."""
        now = self.clock()
        out: list[int] = []
        heap = self._expiries
        requeue = []
        while heap and heap[0][0] <= now and len(out) < limit:
            exp, lid = heapq.heappop(heap)
            lease = self.leases.get(lid)
            if lease is None or lease.expiry != exp:
                continue  # revoked, or renewed since this entry was queued
            if lease.revoking_since and now - lease.revoking_since < retry_after:
                requeue.append((exp, lid))
                continue
            lease.revoking_since = now
            out.append(lid)
            requeue.append((exp, lid))
        for item in requeue:
            heapq.heappush(heap, item)
        return out

    def due_checkpoints(self, limit: int) -> list[tuple[int, int]]:
        """(id, remaining whole seconds) of leases that have aged since their
        last checkpoint, so a restart resumes their countdown."""
        now = self.clock()
        out = []
        for lease in self.leases.values():
            if lease.expiry <= now or lease.expiry == float("inf"):
                continue
            remaining = int(-(-(lease.expiry - now) // 1))  # ceil
            if remaining < lease.ttl and remaining != lease.remaining_ttl:
                out.append((lease.id, remaining))
                if len(out) >= limit:
                    break
        return out

    def by_expiry(self) -> list[Lease]:
        return sorted(self.leases.values(), key=lambda lease: lease.expiry)

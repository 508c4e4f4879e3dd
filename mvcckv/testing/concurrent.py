"""The concurrent checks against a server: clients, a watcher, leases.

``clients`` threads, each with a connection of its own, issue puts, gets,
deletes and compare-and-swap txns on a few shared keys (every put writes a
value nobody else writes), plus txns that put two keys at once, for
``duration`` seconds.  Each operation is timed with the process's
monotonic clock; one that times out is recorded with an unknown outcome.
Then:

* the history is checked for linearizability, key by key
  (:mod:`mvcckv.testing.linearizability`), and for what revisions
  promise across keys (:func:`~mvcckv.testing.linearizability.check_revisions`);
* the watch guarantees, as etcd's robustness tests state them, against a
  watcher that ran during the load (``prev_kv`` on, progress requested
  every 100 ms) and two watches opened afterwards: **ordered** (revisions
  never go back), **unique** (no event twice), **atomic** (a revision's
  events in one response), **reliable** (every acknowledged write has its
  event, and the live watch saw exactly what a watch opened afterwards
  replays), **resumable** (a watch from a revision in the middle replays
  exactly the events from there), **bookmarkable** (a progress
  notification's revision never goes back, and no later event is at or
  below it), **prev_kv** (each event's previous KeyValue is the key's last
  event before it), and no event writes a value no client wrote;
* leases, in a thread of their own meanwhile: a grant's TTL is at least
  the one asked for, a key attached to a lease is gone once the lease
  expires (and not before its TTL), a keep-alive restores the full TTL.

Everything lives under one key prefix; nothing is compacted.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from mvcckv import errors
from mvcckv.pb import kv_pb2
from mvcckv.pb import rpc_pb2 as pb
from mvcckv.testing import linearizability as lin
from mvcckv.testing.model import prefix_end
from mvcckv.testing.profiles import DEFAULT, Profile
from mvcckv.testing.targets import GrpcTarget, Indeterminate, RpcFailure

KEYS = 4  # shared keys: few, so that clients collide
PUT, DELETE = kv_pb2.Event.PUT, kv_pb2.Event.DELETE
LEASED = (b"lease/expiring", b"x")  # the key the lease checks attach (under the prefix), and its value


@dataclass
class ConcurrentResult:
    operations: int = 0
    timed_out: int = 0
    failed: int = 0  # refused with an error none of these operations may get
    linearizability: lin.Result | None = None
    revision_problems: list[str] = field(default_factory=list)
    watch_events: int = 0
    watch_problems: list[str] = field(default_factory=list)
    lease_checks: int = 0
    lease_problems: list[str] = field(default_factory=list)
    history: list[lin.Operation] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.linearizability is not None and self.linearizability.verdict == lin.OK
                and not self.revision_problems and not self.watch_problems and not self.lease_problems
                and not self.failed)


class _Client:
    def __init__(self, index: int, target: GrpcTarget, prefix: bytes, rng: random.Random, timeout: float):
        self.index = index
        self.target = target
        self.prefix = prefix
        self.rng = rng
        self.timeout = timeout
        self.history: list[lin.Operation] = []
        self.pairs: list[tuple[int, bytes, bytes]] = []  # two-key txns: (revision, value, keys prefix)
        self.written: list[tuple[bytes, bytes]] = []  # every (key, value) any put may have written
        self.failed: list[str] = []
        self.seq = 0
        self.last_read: dict[bytes, bytes | None] = {}

    def key(self) -> bytes:
        return self.prefix + b"lin/%d" % self.rng.randrange(KEYS)

    def value(self) -> bytes:
        self.seq += 1
        return b"c%d-%d" % (self.index, self.seq)

    def run(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            kind = self.rng.choices(("put", "get", "delete", "cas", "pair"), (30, 35, 10, 20, 5))[0]
            self.one(kind)

    def one(self, kind: str) -> None:
        key = self.key()
        arg = None
        if kind == "put":
            arg = self.value()
            request = lambda: self.target.put(pb.PutRequest(key=key, value=arg))  # noqa: E731
            self.written.append((key, arg))
        elif kind == "get":
            request = lambda: self.target.range(pb.RangeRequest(key=key))  # noqa: E731
        elif kind == "delete":
            request = lambda: self.target.delete_range(pb.DeleteRangeRequest(key=key))  # noqa: E731
        elif kind == "cas":
            arg = (self.last_read.get(key), self.value())
            self.written.append((key, arg[1]))
            request = lambda: self.target.txn(_cas(key, *arg))  # noqa: E731
        else:
            value = self.value()
            base = self.prefix + b"pair/"
            self.written += [(base + b"x", value), (base + b"y", value)]
            t = pb.TxnRequest(success=[pb.RequestOp(request_put=pb.PutRequest(key=base + k, value=value))
                                       for k in (b"x", b"y")])
            try:
                resp = self.target.txn(t)
                self.pairs.append((resp.header.revision, value, base))
            except (Indeterminate, errors.MvccError, RpcFailure):
                pass  # the watch check only needs the acknowledged ones
            return
        call = time.monotonic()
        try:
            resp = request()
        except Indeterminate:
            self.history.append(lin.Operation(self.index, key, kind, arg, call, None))
            return
        except (errors.MvccError, RpcFailure) as e:
            # None of these requests can be refused: an answer we cannot
            # place.  Recorded with an unknown outcome, and reported.
            self.failed.append(f"client {self.index} {kind} {key!r}: {type(e).__name__}: {e}")
            self.history.append(lin.Operation(self.index, key, kind, arg, call, None))
            return
        ret = time.monotonic()
        out, mod = None, 0
        if kind == "get":
            out = resp.kvs[0].value if resp.kvs else None
            mod = resp.kvs[0].mod_revision if resp.kvs else 0
            self.last_read[key] = out
        elif kind == "delete":
            out = resp.deleted
        elif kind == "cas":
            read = None
            if not resp.succeeded:
                kvs = resp.responses[0].response_range.kvs
                read = kvs[0].value if kvs else None
                self.last_read[key] = read
            out = (resp.succeeded, read)
        self.history.append(lin.Operation(self.index, key, kind, arg, call, ret, out, resp.header.revision, mod))


def _cas(key: bytes, expected: bytes | None, new: bytes) -> pb.TxnRequest:
    """put(new) if the key holds ``expected`` (absent: create revision 0), else read it."""
    if expected is None:
        cmp = pb.Compare(key=key, target=pb.Compare.CREATE, result=pb.Compare.EQUAL, create_revision=0)
    else:
        cmp = pb.Compare(key=key, target=pb.Compare.VALUE, result=pb.Compare.EQUAL, value=expected)
    return pb.TxnRequest(
        compare=[cmp],
        success=[pb.RequestOp(request_put=pb.PutRequest(key=key, value=new))],
        failure=[pb.RequestOp(request_range=pb.RangeRequest(key=key))],
    )


# --- watch ---------------------------------------------------------------------


class _Watcher:
    """A watch on the prefix during the load, with prev_kv and progress requests."""

    def __init__(self, target: GrpcTarget, prefix: bytes, start: int):
        self.target = target
        self.responses: list[pb.WatchResponse] = []
        create = pb.WatchRequest(create_request=pb.WatchCreateRequest(
            key=prefix, range_end=prefix_end(prefix), start_revision=start, prev_kv=True))
        self.stream = target.watch([create])
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        next_progress = time.monotonic() + 0.1
        while not self.stop.is_set():
            for resp in self.stream.responses(0.05):
                self.responses.append(resp)
            if time.monotonic() >= next_progress:
                self.stream.send(pb.WatchRequest(progress_request=pb.WatchProgressRequest()))
                next_progress = time.monotonic() + 0.1

    def until(self, revision: int, timeout: float) -> None:
        """Wait until an event at ``revision`` arrived (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(ev.kv.mod_revision >= revision for r in list(self.responses) for ev in r.events):
                break
            time.sleep(0.02)
        self.stop.set()
        self.thread.join(timeout=5)
        self.stream.close()


def _events(responses) -> list:
    return [ev for r in responses for ev in r.events]


def _replay(target: GrpcTarget, prefix: bytes, start: int, last: int, timeout: float) -> list:
    """Events of a watch opened now from ``start``, up to revision ``last``."""
    out = []
    create = pb.WatchRequest(create_request=pb.WatchCreateRequest(
        key=prefix, range_end=prefix_end(prefix), start_revision=start, prev_kv=True))
    with target.watch([create]) as stream:
        for resp in stream.responses(timeout):
            out.extend(resp.events)
            if out and out[-1].kv.mod_revision >= last:
                break
    return [ev for ev in out if ev.kv.mod_revision <= last]


def _ident(ev) -> tuple:
    return (ev.kv.mod_revision, ev.kv.key, ev.type, ev.kv.value)


def check_watch(responses: list[pb.WatchResponse], replayed: list, resumed: list, middle: int,
                acknowledged: list[tuple[int, bytes, int, bytes]], written: set[tuple[bytes, bytes]],
                last: int, ordered_progress: bool = True) -> list[str]:
    """The watch guarantees (see the module docstring); returns violations.

    ``acknowledged``: (revision, key, event type, value) of each write a
    client saw succeed; ``written``: every (key, value) a put may have
    written; ``last``: the sentinel's revision, the end of the run.
    """
    problems = []
    live = [ev for ev in _events(responses) if ev.kv.mod_revision <= last]
    revs = [ev.kv.mod_revision for ev in live]
    if any(b < a for a, b in zip(revs, revs[1:])):
        i = next(i for i, (a, b) in enumerate(zip(revs, revs[1:])) if b < a)
        problems.append(f"ordered: revision {revs[i + 1]} delivered after {revs[i]}")
    idents = [_ident(ev) for ev in live]
    if len(set(idents)) != len(idents):
        problems.append(f"unique: {len(idents) - len(set(idents))} event(s) delivered twice")
    where: dict[int, int] = {}
    for i, r in enumerate(responses):
        for ev in r.events:
            if where.setdefault(ev.kv.mod_revision, i) != i:
                problems.append(f"atomic: the events of revision {ev.kv.mod_revision} came in two responses")
                break
    have = set(idents)
    missing = [a for a in acknowledged if a not in have]
    if missing:
        problems.append(f"reliable: {len(missing)} acknowledged write(s) have no event, first: "
                        f"revision {missing[0][0]} key {missing[0][1]!r}")
    if [_ident(ev) for ev in replayed] != idents:
        problems.append(f"reliable: the live watch saw {len(idents)} events, a watch from the start "
                        f"replays {len(replayed)} (or other ones)")
    if [_ident(ev) for ev in resumed] != [i for i in idents if i[0] >= middle]:
        problems.append(f"resumable: a watch from revision {middle} does not replay the events from there")
    progress = [r.header.revision for r in responses
                if not r.events and not r.created and not r.canceled and r.header.revision]
    if any(b < a for a, b in zip(progress, progress[1:])):
        problems.append("bookmarkable: a progress notification went back in revision")
    mark = 0
    for r in responses:
        if ordered_progress and r.events and mark and r.events[0].kv.mod_revision <= mark:
            problems.append(f"bookmarkable: an event at revision {r.events[0].kv.mod_revision} came "
                            f"after a progress notification at {mark}")
            break
        if not r.events and not r.created and not r.canceled:
            mark = max(mark, r.header.revision)
    previous: dict[bytes, object] = {}
    for ev in live:
        before = previous.get(ev.kv.key)
        expected = before.kv if before is not None and before.type == PUT else None
        got = ev.prev_kv if ev.HasField("prev_kv") else None
        if got != expected:
            problems.append(f"prev_kv: the event at revision {ev.kv.mod_revision} on {ev.kv.key!r} carries "
                            f"{_kv(got)}, the key's previous event left {_kv(expected)}")
            break
        previous[ev.kv.key] = ev
    phantoms = [ev for ev in live if ev.type == PUT and (ev.kv.key, ev.kv.value) not in written]
    if phantoms:
        problems.append(f"an event writes {phantoms[0].kv.value!r} to {phantoms[0].kv.key!r}, which no client wrote")
    return problems


def _kv(kv) -> str:
    return "nothing" if kv is None else f"value {kv.value!r}@{kv.mod_revision}"


# --- leases ----------------------------------------------------------------------


def check_leases(target: GrpcTarget, prefix: bytes, ttl: int = 3) -> tuple[int, list[str]]:
    """(checks done, violations): TTL granted, expiry, keep-alive."""
    problems: list[str] = []
    checks = 0
    grant = target.lease_grant(pb.LeaseGrantRequest(TTL=ttl))
    granted_at = time.monotonic()
    checks += 1
    if grant.TTL < ttl:
        problems.append(f"lease grant: asked for a TTL of {ttl} s, granted {grant.TTL} s")
    key = prefix + LEASED[0]
    target.put(pb.PutRequest(key=key, value=LEASED[1], lease=grant.ID))
    kept = target.lease_grant(pb.LeaseGrantRequest(TTL=ttl + 3))
    try:
        time.sleep(1.5)
        reply = target.lease_keep_alive(kept.ID)
        checks += 1
        if reply.TTL != kept.TTL:
            problems.append(f"keep-alive: answered a TTL of {reply.TTL} s for a lease granted {kept.TTL} s")
        left = target.lease_time_to_live(pb.LeaseTimeToLiveRequest(ID=kept.ID)).TTL
        checks += 1
        if left < kept.TTL - 1:
            problems.append(f"keep-alive did not extend: {left} s left of {kept.TTL} s right after it")
        # The key must stay until the TTL has passed, and be gone soon after.
        deadline = granted_at + grant.TTL + 4
        gone_at = None
        while time.monotonic() < deadline:
            if not target.range(pb.RangeRequest(key=key)).kvs:
                gone_at = time.monotonic()
                break
            time.sleep(0.1)
        checks += 1
        if gone_at is None:
            problems.append(f"lease expiry: the key of a {grant.TTL} s lease is still there after "
                            f"{grant.TTL + 4} s")
        elif gone_at < granted_at + grant.TTL - 1:
            problems.append(f"lease expiry: the key of a {grant.TTL} s lease was gone after "
                            f"{gone_at - granted_at:.1f} s")
    finally:
        try:
            target.lease_revoke(pb.LeaseRevokeRequest(ID=kept.ID))
        except errors.MvccError:
            pass  # already gone: nothing to clean up
    return checks, problems


# --- the run ---------------------------------------------------------------------


def run_concurrent(factory: Callable[[], GrpcTarget], *, prefix: bytes, clients: int = 4, duration: float = 5.0,
                   seed: int | None = None, leases: bool = True, tick: Callable[[float], None] | None = None,
                   budget: int = lin.DEFAULT_BUDGET, profile: Profile = DEFAULT) -> ConcurrentResult:
    """Run the load, then every check; ``tick(seconds)`` reports progress."""
    result = ConcurrentResult()
    rng = random.Random(seed)
    main = factory()
    try:
        start = main.range(pb.RangeRequest(key=prefix, count_only=True)).header.revision + 1
        watcher = _Watcher(main, prefix, start)
        lease_out: list = []
        lease_thread = None
        if leases:
            def lease_job():
                lease_target = factory()
                try:
                    lease_out.append(check_leases(lease_target, prefix))
                except Exception as e:  # noqa: BLE001 - reported as a problem
                    lease_out.append((0, [f"lease checks failed: {type(e).__name__}: {e}"]))
                finally:
                    lease_target.close()

            lease_thread = threading.Thread(target=lease_job, daemon=True)
            lease_thread.start()
        workers = [_Client(i, factory(), prefix, random.Random(rng.getrandbits(64)), 2.0) for i in range(clients)]
        deadline = time.monotonic() + duration
        threads = [threading.Thread(target=w.run, args=(deadline,), daemon=True) for w in workers]
        for t in threads:
            t.start()
        began = time.monotonic()
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(timeout=0.5)
            if tick:
                tick(min(duration, time.monotonic() - began))
        if lease_thread is not None:
            lease_thread.join(timeout=30)
        for w in workers:
            w.target.close()
        history = [op for w in workers for op in w.history]
        result.history = history
        result.operations = len(history) + sum(len(w.pairs) for w in workers)
        result.timed_out = sum(op.ret is None for op in history)
        failures = [f for w in workers for f in w.failed]
        result.failed = len(failures)
        result.linearizability = lin.check(history, budget=budget)
        result.revision_problems = lin.check_revisions(history) + failures[:3]

        sentinel = main.put(pb.PutRequest(key=prefix + b"~end", value=b"end")).header.revision
        watcher.until(sentinel, timeout=10.0)
        acknowledged = []
        for op in history:
            if op.writes:
                if op.kind == "delete":
                    acknowledged.append((op.revision, op.key, DELETE, b""))
                else:
                    value = op.arg if op.kind == "put" else op.arg[1]
                    acknowledged.append((op.revision, op.key, PUT, value))
        for w in workers:
            for rev, value, base in w.pairs:
                acknowledged += [(rev, base + b"x", PUT, value), (rev, base + b"y", PUT, value)]
        acknowledged.append((sentinel, prefix + b"~end", PUT, b"end"))
        written = {kv for w in workers for kv in w.written} | {(prefix + b"~end", b"end"), (prefix + LEASED[0], LEASED[1])}
        middle = (start + sentinel) // 2
        replayed = _replay(main, prefix, start, sentinel, timeout=10.0)
        resumed = _replay(main, prefix, middle, sentinel, timeout=10.0)
        result.watch_events = len(_events(watcher.responses))
        result.watch_problems = check_watch(watcher.responses, replayed, resumed, middle, acknowledged,
                                            written, sentinel, profile.ordered_progress)
        if lease_out:
            result.lease_checks, result.lease_problems = lease_out[0]
        elif leases:
            result.lease_problems = ["lease checks did not finish in time"]
        main.delete_range(pb.DeleteRangeRequest(key=prefix, range_end=prefix_end(prefix)))
    finally:
        main.close()
    return result

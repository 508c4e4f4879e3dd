"""Auto-compaction (``--auto-compaction-mode/-retention``) on a fake clock.

The compactors are driven through simulated hours in milliseconds: the
fake clock moves only when the test advances it, and the test waits (in
real time, bounded) until the compactor is asleep again before checking.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools

import pytest

import mvcckv
from mvcckv import errors
from mvcckv.server import compactor
from mvcckv.server.app import start_compactor
from mvcckv.server.compactor import HOUR, MINUTE, SECOND, parse_duration, parse_retention
from mvcckv.server.config import Config
from mvcckv.server.node import Node


class FakeClock:
    """A clock that moves only on advance(); like Go's clockwork.FakeClock."""

    def __init__(self) -> None:
        self._now = 0
        self._seq = itertools.count()
        self._sleepers: list[tuple[int, int, asyncio.Future]] = []

    def now(self) -> int:
        return self._now

    async def sleep(self, ns: int) -> None:
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + ns, next(self._seq), fut))
        await fut

    async def block_until_sleeping(self, timeout: float = 10.0) -> None:
        """Wait until some task sleeps on this clock."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not any(not f.done() for _, _, f in self._sleepers):
            if loop.time() > deadline:
                raise TimeoutError("nothing went to sleep on the fake clock")
            await asyncio.sleep(0.001)

    async def advance(self, ns: int) -> None:
        """Move time forward, waking each sleeper in turn and letting it run
        until it sleeps again."""
        end = self._now + ns
        while self._sleepers and self._sleepers[0][0] <= end:
            when, _, fut = heapq.heappop(self._sleepers)
            self._now = max(self._now, when)
            if not fut.done():
                fut.set_result(None)
                await self.block_until_sleeping()
        self._now = end


class Recorder:
    """A fake store: a settable revision and a log of compactions."""

    def __init__(self, clock: FakeClock):
        self.clock = clock
        self.rev = 1
        self.calls: list[tuple[int, int]] = []  # (minute, revision)
        self.fail_with: list[errors.MvccError] = []

    async def compact(self, rev: int) -> None:
        self.calls.append((self.clock.now() // MINUTE, rev))
        if self.fail_with:
            raise self.fail_with.pop(0)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def _drive(comp, clock: FakeClock, minutes: int, step: int, on_tick=None) -> None:
    task = asyncio.create_task(comp.run())
    try:
        await clock.block_until_sleeping()
        for _ in range(minutes // step):
            await clock.advance(step * MINUTE)
            if on_tick:
                on_tick(clock.now() // MINUTE)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_periodic_one_hour_waits_an_hour_then_compacts_hourly():
    async def main():
        clock = FakeClock()
        rec = Recorder(clock)
        # One revision a minute.
        comp = compactor.PeriodicCompactor(HOUR, lambda: 1000 + clock.now() // MINUTE, rec.compact, clock)
        assert (comp.retry, comp.retentions, comp.interval) == (6 * MINUTE, 11, HOUR)
        await _drive(comp, clock, 150, 6)
        return rec.calls

    # First at 60 min with the revision sampled at start; then every hour with
    # the oldest of the 11 samples (taken 66 min before).
    assert run(main()) == [(60, 1000), (120, 1054)]


def test_periodic_retries_a_failure_at_the_next_sample():
    async def main():
        clock = FakeClock()
        rec = Recorder(clock)
        rec.fail_with = [errors.StoppedError()]
        comp = compactor.PeriodicCompactor(10 * MINUTE, lambda: 1 + clock.now() // MINUTE, rec.compact, clock)
        await _drive(comp, clock, 30, 1)
        return rec.calls

    # Samples every minute, 11 kept; the failure at 10 is retried at 11 with the
    # same oldest sample, then compaction follows every 10 minutes.
    assert run(main()) == [(10, 1), (11, 1), (21, 11)]


def test_periodic_skips_an_unchanged_revision_and_counts_compacted_as_success():
    async def main():
        clock = FakeClock()
        rec = Recorder(clock)
        rec.rev = 7
        rec.fail_with = [errors.CompactedError()]
        comp = compactor.PeriodicCompactor(5 * SECOND, lambda: rec.rev, rec.compact, clock)
        assert comp.retry == SECOND // 2
        task = asyncio.create_task(comp.run())
        await clock.block_until_sleeping()
        for _ in range(40):  # 20 s, nothing written
            await clock.advance(SECOND // 2)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return rec.calls

    # "compacted" at 5 s is a success: revision 7 is not tried again.
    assert run(main()) == [(0, 7)]


def test_revision_mode_compacts_every_five_minutes_keeping_n_revisions():
    async def main():
        clock = FakeClock()
        rec = Recorder(clock)
        comp = compactor.RevisionCompactor(10, lambda: rec.rev, rec.compact, clock)
        revs = {5: 100, 15: 150}

        def tick(minute):
            rec.rev = revs.get(minute, rec.rev)

        rec.rev = 5
        await _drive(comp, clock, 25, 5, tick)
        return rec.calls

    # A tick's revision is seen at the next wake-up.  5 min: 5 - 10 <= 0,
    # skipped; 10: 90; 15: target unchanged, skipped; 20: 140; 25: unchanged.
    assert run(main()) == [(10, 90), (20, 140)]


def test_auto_compaction_of_a_real_store(tmp_path):
    async def main():
        store = mvcckv.open(str(tmp_path / "data"))
        try:
            node = Node(store=store, name="default", member_id=1, cluster_id=2, peer_urls=(),
                        client_urls=(), version="3.6.14", quota_bytes=0)
            config = Config(auto_compaction_mode="revision", auto_compaction_retention=3)
            clock = FakeClock()
            task = start_compactor(node, config, clock)
            await clock.block_until_sleeping()
            for i in range(10):
                await asyncio.wrap_future(store.propose(mvcckv.store.KIND_PUT, _put(i)))
            assert store.revision == 11
            await clock.advance(5 * MINUTE)
            compacted = store.compact_revision
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            assert start_compactor(node, Config(auto_compaction_retention=0), clock) is None
            return compacted
        finally:
            store.close()

    assert run(main()) == 8


def _put(i):
    from mvcckv.pb import rpc_pb2 as pb

    return pb.PutRequest(key=b"k", value=str(i).encode())


@pytest.mark.parametrize("text, ns", [
    ("0", 0), ("5s", 5 * SECOND), ("1h30m", 90 * MINUTE), ("1.5h", 90 * MINUTE), ("300ms", 300_000_000),
    ("2us", 2000), ("2µs", 2000), ("7ns", 7), (".5m", 30 * SECOND), ("-1m", -MINUTE), ("+2s", 2 * SECOND),
])
def test_parse_duration(text, ns):
    assert parse_duration(text) == ns


@pytest.mark.parametrize("text", ["", "5", "5x", "m", "1h 30m", "--1s"])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize("mode, text, value", [
    ("periodic", "0", 0), ("periodic", "1", HOUR), ("periodic", "24", 24 * HOUR),
    ("periodic", "30m", 30 * MINUTE), ("revision", "0", 0), ("revision", "1000", 1000),
])
def test_parse_retention(mode, text, value):
    assert parse_retention(mode, text) == value


@pytest.mark.parametrize("mode, text", [
    ("revision", "5m"), ("periodic", "-5m"), ("periodic", "-1"), ("hourly", "1"),
])
def test_parse_retention_rejects(mode, text):
    with pytest.raises(ValueError):
        parse_retention(mode, text)


def test_docstring_examples():
    import doctest

    from mvcckv.server import identity

    for module in (compactor, identity):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__

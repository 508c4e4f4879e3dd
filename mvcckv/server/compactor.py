"""Auto-compaction: etcd's ``--auto-compaction-mode`` / ``-retention`` (§7.2).

Two policies, each an asyncio task that compacts through the ordinary
Compact path (a logged request), exactly as etcd's v3compactor does:

* **revision**, retention N: every 5 minutes compact at ``current - N``
  unless that is ≤ 0 or the same target as the last success.
* **periodic**, retention P: sample the current revision every
  ``min(P, 1h) / 10`` and keep ``P / sample interval + 1`` samples, so the
  oldest sample is the revision of about P ago.  Nothing happens during the
  first P; after that, whenever at least ``interval`` has passed since the
  last success (P for the first compaction, then ``min(P, 1h)``) and the
  oldest sample is not the last compacted revision, compact at the oldest
  sample.  A failure is retried at the next sample tick.

For both, "required revision has been compacted" counts as success
(someone else compacted further already).

Time comes from a :class:`Clock` in integer nanoseconds, as Go's durations
are, so that the sample arithmetic is exact and tests can drive the
compactor with a fake clock instead of waiting.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from fractions import Fraction
from typing import Awaitable, Callable, Protocol

from mvcckv import errors

log = logging.getLogger("mvcckv.compactor")

MODE_PERIODIC = "periodic"
MODE_REVISION = "revision"

SECOND = 1_000_000_000
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE

REVISION_INTERVAL = 5 * MINUTE
_RETRY_DIVISOR = 10


class Clock(Protocol):
    def now(self) -> int:
        """Monotonic time in nanoseconds."""

    async def sleep(self, ns: int) -> None:
        """Return after ``ns`` nanoseconds of this clock."""


class MonotonicClock:
    def now(self) -> int:
        return time.monotonic_ns()

    async def sleep(self, ns: int) -> None:
        await asyncio.sleep(ns / SECOND)


Compact = Callable[[int], Awaitable[None]]
"""Compacts at a revision; raises MvccError on failure."""


async def _try_compact(compact: Compact, rev: int, what: str) -> bool:
    log.info("starting auto %s compaction at revision %d", what, rev)
    try:
        await compact(rev)
    except errors.CompactedError:
        pass
    except errors.MvccError as err:
        log.warning("auto %s compaction at revision %d failed: %s", what, rev, err)
        return False
    log.info("completed auto %s compaction at revision %d", what, rev)
    return True


class PeriodicCompactor:
    def __init__(self, period_ns: int, revision: Callable[[], int], compact: Compact, clock: Clock):
        if period_ns <= 0:
            raise ValueError("the compaction period must be positive")
        self.period = period_ns
        self.interval = min(period_ns, HOUR)
        self.retry = self.interval // _RETRY_DIVISOR
        self.retentions = period_ns // self.retry + 1
        self._revision = revision
        self._compact = compact
        self._clock = clock

    async def run(self) -> None:
        clock = self._clock
        revs: list[int] = []
        last_rev = 0
        last_success = clock.now()
        base = self.period
        while True:
            revs.append(self._revision())
            if len(revs) > self.retentions:
                del revs[0]  # revs[0] is now the revision of one period ago
            await clock.sleep(self.retry)
            rev = revs[0]
            if clock.now() - last_success < base or rev == last_rev:
                continue
            # The first compaction waits a whole period; later ones follow
            # every interval.
            base = self.interval
            if await _try_compact(self._compact, rev, "periodic"):
                last_rev = rev
                last_success = clock.now()


class RevisionCompactor:
    def __init__(self, retention: int, revision: Callable[[], int], compact: Compact, clock: Clock):
        self.retention = retention
        self._revision = revision
        self._compact = compact
        self._clock = clock

    async def run(self) -> None:
        prev = 0
        while True:
            await self._clock.sleep(REVISION_INTERVAL)
            rev = self._revision() - self.retention
            if rev <= 0 or rev == prev:
                continue
            if await _try_compact(self._compact, rev, "revision"):
                prev = rev


def new_compactor(mode: str, retention: int, revision: Callable[[], int], compact: Compact,
                  clock: Clock | None = None) -> PeriodicCompactor | RevisionCompactor | None:
    """The compactor for a parsed retention (see :func:`parse_retention`);
    None when auto-compaction is off (retention 0)."""
    if retention == 0:
        return None
    clock = clock or MonotonicClock()
    if mode == MODE_PERIODIC:
        return PeriodicCompactor(retention, revision, compact, clock)
    if mode == MODE_REVISION:
        return RevisionCompactor(retention, revision, compact, clock)
    raise ValueError(f"unsupported compaction mode {mode}")


def parse_retention(mode: str, value: str) -> int:
    """etcd's reading of ``--auto-compaction-retention``.

    A non-negative integer is a number of revisions (revision mode) or of
    hours (periodic mode); otherwise periodic mode takes a Go duration such
    as ``"30m"`` or ``"1h30m"``.  Returns revisions, or nanoseconds.

    >>> parse_retention("periodic", "1") == HOUR, parse_retention("periodic", "5m") == 5 * MINUTE
    (True, True)
    >>> parse_retention("revision", "1000")
    1000
    """
    if mode not in (MODE_PERIODIC, MODE_REVISION):
        raise ValueError(f"unsupported compaction mode {mode}")
    text = value.strip()
    if text.isdigit():
        n = int(text)
        return n if mode == MODE_REVISION else n * HOUR
    if mode == MODE_REVISION:
        # etcd would read a duration as that many nanoseconds of revisions.
        raise ValueError(f"revision mode needs a whole number of revisions, not {value!r}")
    ns = parse_duration(text)
    if ns < 0:
        raise ValueError(f"negative retention {value!r}")
    return ns


_UNITS = {
    "ns": 1, "us": 1_000, "µs": 1_000, "μs": 1_000, "ms": 1_000_000,
    "s": SECOND, "m": MINUTE, "h": HOUR,
}
_TERM = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(text: str) -> int:
    """Go's ``time.ParseDuration``, in nanoseconds.

    >>> parse_duration("1h30m"), parse_duration("1.5s"), parse_duration("-2ms")
    (5400000000000, 1500000000, -2000000)
    """
    s = text
    sign = 1
    if s and s[0] in "+-":
        sign = -1 if s[0] == "-" else 1
        s = s[1:]
    if s == "0":
        return 0
    if not s:
        raise ValueError(f"invalid duration {text!r}")
    total = Fraction(0)
    pos = 0
    while pos < len(s):
        m = _TERM.match(s, pos)
        if m is None:
            raise ValueError(f"invalid duration {text!r}")
        total += Fraction(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    return sign * int(total)

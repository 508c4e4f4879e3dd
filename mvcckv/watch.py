"""Watch: etcd's change feed over the store (§8).

Every watcher is in exactly one of three groups:

* **synced** — caught up: the store's writer thread hands it each new
  revision's events right after the commit (``_on_commit``), one response
  per revision;
* **unsynced** — behind (it asked for history, or it fell behind): a sync
  pass every ``sync_interval`` reads the missing revisions from the backend,
  at most ``max_revisions_per_sync`` of them per pass so memory stays
  bounded, and moves the watcher to *synced* once it has reached the
  current revision;
* **victim** — its stream's buffer was full when a live response was ready:
  that one response is parked with the watcher (never more), the writer
  moves on, and the response is retried every ``victim_retry``; once it is
  delivered the watcher catches up from the backend like an unsynced one.

So a slow consumer never blocks writers or other watchers, and holds at
most one parked response plus its stream's buffer in memory.

No gap, no duplicate: each watcher has ``min_rev``, the next revision it
must receive.  Live delivery and the sync pass both run under ``_mu``;
the sync pass reads the backend up to the revision the store had
committed when it looked, and live delivery skips revisions below
``min_rev``.  A revision committed while a sync pass runs is either read by
that pass (and then skipped by ``_on_commit``) or delivered live after it.

The consumer side of a watcher is a ``WatchStream``: anything with a
non-blocking ``try_send(response) -> bool``.  ``BufferedStream`` is the one
used by the embedded API and the gRPC server: a bounded buffer that a
thread or an asyncio task drains.

Fan-out encodes each revision's events once.  A stream that says it takes
``encoded`` responses (the gRPC server's) gets, per watcher, an
:class:`EventBatch`: the watcher's ID and revision around the events'
shared wire bytes, which the server frames with a header and writes as is;
every other stream gets ``WatchResponse`` messages.  With 10,000 watchers
of one key that is one encoding of the event instead of 10,000 message
copies and serializations (bench_watch_lease, many watchers).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from typing import Iterable

from mvcckv import errors
from mvcckv.pb import kv_pb2
from mvcckv.pb import rpc_pb2 as pb
from mvcckv.wire import varint

log = logging.getLogger("mvcckv.watch")

# etcd's defaults (§0).
STREAM_BUFFER = 128
SYNC_INTERVAL = 0.1
VICTIM_RETRY = 0.01
MAX_WATCHERS_PER_SYNC = 512
MAX_REVISIONS_PER_SYNC = 1000
DEFAULT_PROGRESS_INTERVAL = 600.0

_PUT = kv_pb2.Event.PUT
_DELETE = kv_pb2.Event.DELETE
_INF = b""  # internal end marker: no upper bound

# WatchResponse.events is field 11, length-delimited: tag (11 << 3) | 2.
_EVENTS_TAG = b"\x5a"


class EventBatch:
    """One watcher's events of one revision, encoded once for every watcher
    that gets the same events (see the module docstring).

    ``events`` are the Event messages, ``encoded`` their bytes as the
    repeated ``events`` field of a WatchResponse; ``message()`` is the
    WatchResponse itself, for whoever needs one (a fragmenting watcher).
    """

    __slots__ = ("watch_id", "revision", "events", "encoded")

    def __init__(self, watch_id: int, revision: int, events: list, encoded: bytes):
        self.watch_id = watch_id
        self.revision = revision
        self.events = events
        self.encoded = encoded

    def message(self) -> pb.WatchResponse:
        resp = pb.WatchResponse(watch_id=self.watch_id)
        resp.events.extend(self.events)
        resp.header.revision = self.revision
        return resp


def encode_events(events: list) -> bytes:
    """Event messages as the ``events`` field of a WatchResponse."""
    parts = []
    for ev in events:
        data = ev.SerializeToString()
        parts += (_EVENTS_TAG, varint(len(data)), data)
    return b"".join(parts)


class Watcher:
    """One watch: a key range, a start revision, filters and a stream."""

    __slots__ = (
        "id", "key", "end", "start_rev", "min_rev", "noput", "nodelete", "prev_kv",
        "progress_notify", "fragment", "stream", "victim", "state", "sent_since_tick", "encoded",
    )

    def __init__(self, watch_id, key, end, start_rev, stream, *, prev_kv, filters, progress_notify, fragment):
        self.id = watch_id
        self.key = key
        # None: the single key; _INF: every key >= key; else [key, end).
        self.end = end
        self.start_rev = start_rev
        self.min_rev = 0
        self.noput = pb.WatchCreateRequest.NOPUT in filters
        self.nodelete = pb.WatchCreateRequest.NODELETE in filters
        self.prev_kv = prev_kv
        self.progress_notify = progress_notify
        self.fragment = fragment
        self.stream = stream
        self.victim: pb.WatchResponse | None = None
        self.state = "new"
        self.sent_since_tick = False
        # Whether its stream takes EventBatch responses.
        self.encoded = getattr(stream, "encoded", False)

    def matches(self, key: bytes) -> bool:
        if self.end is None:
            return key == self.key
        if key < self.key:
            return False
        return self.end == _INF or key < self.end


def normalize_range(key: bytes, range_end: bytes) -> bytes | None:
    """The watcher's end marker for etcd's (key, range_end) conventions.

    Raises ``WatchRangeError`` for an empty range (end <= key), which etcd
    answers with "mvcc: watcher range is empty".
    """
    if not range_end:
        return None
    if range_end == b"\0":
        return _INF
    if range_end <= key:
        raise WatchRangeError()
    return range_end


class WatchRangeError(errors.MvccError):
    message = "mvcc: watcher range is empty"


class WatchHub:
    """All watchers of one store (etcd's watchableStore)."""

    def __init__(
        self,
        store,
        *,
        sync_interval: float = SYNC_INTERVAL,
        victim_retry: float = VICTIM_RETRY,
        progress_interval: float = DEFAULT_PROGRESS_INTERVAL,
        max_revisions_per_sync: int = MAX_REVISIONS_PER_SYNC,
    ):
        self._store = store
        self._mu = threading.RLock()
        self._keyed: dict[bytes, set[Watcher]] = {}
        self._ranged: set[Watcher] = set()
        self._unsynced: dict[Watcher, None] = {}  # insertion-ordered set
        self._victims: set[Watcher] = set()
        self._sync_interval = sync_interval
        self._victim_retry = victim_retry
        self.progress_interval = progress_interval
        self._max_revs = max_revisions_per_sync
        self._notified_rev = store.revision
        # Events handed to watch streams (etcd_debugging_mvcc_events_total).
        self.events_sent = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        store.add_commit_listener(self._on_commit)

    # -- watchers ---------------------------------------------------------

    def watch(
        self,
        stream,
        key: bytes,
        range_end: bytes = b"",
        start_revision: int = 0,
        *,
        watch_id: int = 0,
        prev_kv: bool = False,
        filters: Iterable[int] = (),
        progress_notify: bool = False,
        fragment: bool = False,
    ) -> tuple[Watcher, int]:
        """Create a watcher; returns it and the revision for its created
        response.  Raises ``WatchRangeError`` for an empty range."""
        end = normalize_range(key, range_end)
        w = Watcher(
            watch_id, key, end, start_revision, stream, prev_kv=prev_kv,
            filters=frozenset(filters), progress_notify=progress_notify, fragment=fragment,
        )
        with self._mu:
            cur = self._store.revision
            if start_revision == 0 or start_revision > cur:
                w.min_rev = max(cur + 1, start_revision)
                self._add_synced(w)
            else:
                w.min_rev = start_revision
                w.state = "unsynced"
                self._unsynced[w] = None
            self._ensure_thread()
        return w, cur

    def cancel(self, w: Watcher) -> bool:
        """Stop a watcher; False if it was already gone."""
        with self._mu:
            return self._remove(w)

    def _remove(self, w: Watcher) -> bool:
        state, w.state = w.state, "canceled"
        if state == "synced":
            if w.end is None:
                ws = self._keyed.get(w.key)
                if ws is not None:
                    ws.discard(w)
                    if not ws:
                        del self._keyed[w.key]
            else:
                self._ranged.discard(w)
        elif state == "unsynced":
            self._unsynced.pop(w, None)
        elif state == "victim":
            self._victims.discard(w)
        else:
            return False
        return True

    def _add_synced(self, w: Watcher) -> None:
        w.state = "synced"
        if w.end is None:
            self._keyed.setdefault(w.key, set()).add(w)
        else:
            self._ranged.add(w)

    def request_progress(self, stream, watchers: Iterable[Watcher]) -> bool:
        """etcd's progress request: one response with watch_id -1 if every
        watcher of the stream is synced, else nothing (the client asks
        again).  Sent through the stream's buffer, after any event already
        queued, so it never overtakes an event."""
        with self._mu:
            ws = list(watchers)
            if not ws:
                return False
            rev = self._notified_rev
            for w in ws:
                if w.state != "synced" or rev < w.start_rev:
                    return False
            resp = pb.WatchResponse(watch_id=-1)
            resp.header.revision = rev
            return stream.try_send(resp)

    # -- live path (writer thread) --------------------------------------------

    def _on_commit(self, changes) -> None:
        with self._mu:
            for rev, events in changes:
                self._notified_rev = rev
                if not self._keyed and not self._ranged:
                    continue
                # Watchers of one key share one list of that key's events, so
                # the Event messages (and prev_kv lookups) are built once per
                # distinct (events, filters, prev_kv) and copied to each
                # watcher's response, not rebuilt per watcher.
                per: dict[Watcher, list] = {}
                if self._keyed:
                    by_key: dict[bytes, list] = {}
                    for ev in events:
                        by_key.setdefault(ev[1].key, []).append(ev)
                    for key, evs in by_key.items():
                        for w in self._keyed.get(key, ()):
                            per[w] = evs
                for w in self._ranged:
                    mine = [ev for ev in events if w.matches(ev[1].key)]
                    if mine:
                        per[w] = mine
                built: dict[tuple, list] = {}
                encoded: dict[tuple, bytes] = {}
                for w, evs in per.items():
                    if rev < w.min_rev:
                        continue
                    w.min_rev = rev + 1
                    shape = (id(evs), w.noput, w.nodelete, w.prev_kv)
                    out = built.get(shape)
                    if out is None:
                        out = built[shape] = self._events(w, evs)
                    if not out:
                        continue
                    if w.encoded:
                        data = encoded.get(shape)
                        if data is None:
                            data = encoded[shape] = encode_events(out)
                        resp = EventBatch(w.id, rev, out, data)
                    else:
                        resp = pb.WatchResponse(watch_id=w.id)
                        resp.events.extend(out)
                        resp.header.revision = rev
                    if w.stream.try_send(resp):
                        w.sent_since_tick = True
                        self.events_sent += len(out)
                    else:
                        self._remove(w)
                        w.victim = resp
                        w.state = "victim"
                        self._victims.add(w)

    def _events(self, w: Watcher, evs) -> list:
        """The Event messages ``w`` is sent for ``evs`` (after its filters)."""
        out = []
        for is_delete, kv in evs:
            if is_delete:
                if w.nodelete:
                    continue
                ev = kv_pb2.Event(type=_DELETE, kv=kv)
            else:
                if w.noput:
                    continue
                ev = kv_pb2.Event(type=_PUT, kv=kv)
            # A creation has no previous version to attach.
            if w.prev_kv and (is_delete or kv.create_revision != kv.mod_revision):
                prev = self._store.prev_kv(kv.key, kv.mod_revision - 1)
                if prev is not None:
                    ev.prev_kv.CopyFrom(prev)
            out.append(ev)
        return out

    def _response(self, w: Watcher, header_rev: int, evs) -> pb.WatchResponse | None:
        """The response carrying ``evs`` for ``w`` (None if filters drop all)."""
        out = self._events(w, evs)
        if not out:
            return None
        resp = pb.WatchResponse(watch_id=w.id)
        resp.events.extend(out)
        resp.header.revision = header_rev
        return resp

    # -- background: victims, catch-up, progress ----------------------------

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mvcckv-watch", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        next_sync = time.monotonic()
        # The first progress notification is due one interval after start,
        # not at once.
        next_progress = next_sync + self.progress_interval
        while not self._stop.wait(self._victim_retry):
            try:
                if self._victims:
                    self._retry_victims()
                now = time.monotonic()
                if now >= next_sync:
                    next_sync = now + self._sync_interval
                    if self._unsynced:
                        self.sync_once()
                if now >= next_progress:
                    self._progress_tick()
                    next_progress = now + self.progress_interval
            except (errors.StoppedError, ConnectionError) as err:
                # The store is closing (then _stop is set too) or its backend
                # is briefly unreachable: try again on the next pass.
                log.warning("watch sync pass skipped: %s", err)
            except Exception:  # noqa: BLE001 - keep watching; say why
                log.exception("watch sync pass failed")

    def _retry_victims(self) -> None:
        with self._mu:
            for w in list(self._victims):
                if w.stream.try_send(w.victim):
                    self.events_sent += len(w.victim.events)
                    w.victim = None
                    w.sent_since_tick = True
                    self._victims.discard(w)
                    w.state = "unsynced"
                    self._unsynced[w] = None

    def sync_once(self) -> None:
        """One catch-up pass over (up to 512) unsynced watchers."""
        with self._mu:
            ws = [w for w, _ in zip(self._unsynced, range(MAX_WATCHERS_PER_SYNC))]
            if not ws:
                return
            compact_rev = self._store.compact_revision
            live = []
            for w in ws:
                if w.min_rev < compact_rev:
                    resp = pb.WatchResponse(watch_id=w.id, canceled=True, compact_revision=compact_rev)
                    if w.stream.try_send(resp):
                        self._remove(w)
                else:
                    live.append(w)
            if not live:
                return
            low = min(w.min_rev for w in live)
            changes, cur, upto = self._store.read_changes(low, self._max_revs)
            if self._store.compact_revision != compact_rev:
                # A compaction landed while reading: some of what was read
                # may already be gone; the next pass cancels or delivers.
                return
            for w in live:
                evs_by_rev = [(rev, evs) for rev, evs in changes if rev >= w.min_rev]
                resp = pb.WatchResponse(watch_id=w.id)
                for rev, evs in evs_by_rev:
                    mine = [(d, kv) for d, kv in evs if w.matches(kv.key)]
                    if mine:
                        part = self._response(w, rev, mine)
                        if part is not None:
                            resp.events.extend(part.events)
                if resp.events:
                    # A catch-up response reports the revision the store was
                    # at when it was read, which may exceed its last event.
                    resp.header.revision = cur
                    if not w.stream.try_send(resp):
                        continue  # stream full: retry from the same place next pass
                    w.sent_since_tick = True
                    self.events_sent += len(resp.events)
                w.min_rev = max(w.min_rev, upto + 1)
                if w.min_rev > cur:
                    self._unsynced.pop(w, None)
                    self._add_synced(w)

    def _progress_tick(self) -> None:
        with self._mu:
            rev = self._notified_rev
            for group in (list(self._ranged), [w for ws in self._keyed.values() for w in ws]):
                for w in group:
                    if not w.progress_notify:
                        continue
                    if not w.sent_since_tick and rev >= w.start_rev:
                        resp = pb.WatchResponse(watch_id=w.id)
                        resp.header.revision = rev
                        w.stream.try_send(resp)
                    w.sent_since_tick = False

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self._store.remove_commit_listener(self._on_commit)
        except ValueError:
            pass

    def stats(self) -> dict[str, int]:
        with self._mu:
            return {
                "synced": sum(len(v) for v in self._keyed.values()) + len(self._ranged),
                "unsynced": len(self._unsynced),
                "victims": len(self._victims),
            }


class BufferedStream:
    """A bounded, thread-safe response buffer: ``try_send`` never blocks.

    Drained by a thread (``get``) or an asyncio task (``aget``); the
    asyncio wake-up is scheduled at most once per drain, so a burst of
    events costs one cross-thread call, not one per event.
    """

    def __init__(self, capacity: int = STREAM_BUFFER, loop: asyncio.AbstractEventLoop | None = None,
                 *, encoded: bool = False):
        self.capacity = capacity
        # Live events may come as EventBatch (see the module docstring).
        self.encoded = encoded
        self._buf: collections.deque = collections.deque()
        self._cond = threading.Condition(threading.Lock())
        self._loop = loop
        self._event = asyncio.Event() if loop is not None else None
        self._wake_pending = False
        self.closed = False

    def try_send(self, resp) -> bool:
        with self._cond:
            if self.closed:
                return True  # nobody listens any more; drop silently
            if len(self._buf) >= self.capacity:
                return False
            wake = self._append_locked(resp)
        if wake:
            self._loop.call_soon_threadsafe(self._event.set)
        return True

    def force_send(self, resp) -> None:
        """Queue a control response (created, canceled) regardless of the
        bound: there is one per client request, so they cannot pile up."""
        with self._cond:
            wake = self._append_locked(resp)
        if wake:
            self._loop.call_soon_threadsafe(self._event.set)

    def _append_locked(self, resp) -> bool:
        """Queue ``resp`` (lock held); True if the loop must be woken."""
        self._buf.append(resp)
        self._cond.notify()
        wake = self._loop is not None and not self._wake_pending
        self._wake_pending = self._wake_pending or wake
        return wake

    def get(self, timeout: float | None = None):
        """Next response, or None on timeout / close (blocking, for threads)."""
        with self._cond:
            end = None if timeout is None else time.monotonic() + timeout
            while not self._buf and not self.closed:
                remaining = None if end is None else end - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)
            return self._buf.popleft() if self._buf else None

    async def aget_all(self) -> list:
        """Every queued response (waits for at least one unless closed)."""
        while True:
            with self._cond:
                if self._buf or self.closed:
                    out = list(self._buf)
                    self._buf.clear()
                    return out
                self._wake_pending = False
                self._event.clear()
            await self._event.wait()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._event.set)
            except RuntimeError:
                pass  # the loop is already closed


class WatchIterator:
    """The embedded API's watch: iterate (or ``async for``) over responses.

    Created by :meth:`mvcckv.Store.watch`.  The first response etcd would
    send — ``created`` — is not yielded; every later one is (events,
    compaction cancel, progress).  ``close()`` (or leaving the ``with``
    block) cancels the watcher.
    """

    def __init__(self, hub: WatchHub, key: bytes, range_end: bytes, start_revision: int, **kw):
        if start_revision < 0:
            raise errors.CompactedError()
        self._hub = hub
        self._stream = BufferedStream()
        self.watcher, self.revision = hub.watch(self._stream, key, range_end, start_revision, **kw)

    def __iter__(self):
        return self

    def __next__(self) -> pb.WatchResponse:
        while True:
            resp = self._stream.get(timeout=0.5)
            if resp is not None:
                return resp
            if self._stream.closed:
                raise StopIteration

    def take(self, n_events: int, timeout: float = 5.0) -> list[pb.WatchResponse]:
        """Responses until ``n_events`` events arrived (or ``timeout``)."""
        out, got, end = [], 0, time.monotonic() + timeout
        while got < n_events:
            left = end - time.monotonic()
            if left <= 0:
                break
            resp = self._stream.get(timeout=left)
            if resp is None:
                break
            out.append(resp)
            got += len(resp.events)
        return out

    def __aiter__(self):
        return self

    async def __anext__(self) -> pb.WatchResponse:
        while True:
            resp = await asyncio.to_thread(self._stream.get, 0.5)
            if resp is not None:
                return resp
            if self._stream.closed:
                raise StopAsyncIteration

    def close(self) -> None:
        self._hub.cancel(self.watcher)
        self._stream.close()

    def __enter__(self) -> "WatchIterator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

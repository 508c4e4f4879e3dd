"""Defrag: a compacting copy that gives compaction's free pages back.

The store keeps reads going while the copy runs and holds writes until the
new file is in place (store.py, Backend.defrag).  To make "while it runs"
deterministic the tests wrap the LMDB environment so that the copy pauses
at its end, with the defrag still holding the writer lock, until the other
threads have shown what they can and cannot do.
"""

from __future__ import annotations

import threading
import time

import pytest

import mvcckv
from mvcckv import ops, prefix_end

N_KEYS = 4000
KEEP_EVERY = 10


class _PausingEnv:
    """An LMDB environment whose copy() and close() call hooks when done."""

    def __init__(self, env, after_copy=None, after_close=None):
        self._env = env
        self._after_copy = after_copy
        self._after_close = after_close

    def copy(self, *args, **kwargs):
        self._env.copy(*args, **kwargs)
        if self._after_copy:
            self._after_copy()

    def close(self):
        self._env.close()
        if self._after_close:
            self._after_close()

    def __getattr__(self, name):
        return getattr(self._env, name)


def _wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.005) + 1):
        if predicate() or time.monotonic() > deadline:
            break
        time.sleep(0.005)
    return predicate()


@pytest.fixture
def store(tmp_path):
    """A store whose file is mostly free pages: fill, delete 90%, compact."""
    with mvcckv.open(str(tmp_path / "data"), fsync=False) as s:
        for start in range(0, N_KEYS, 100):
            s.txn([], [ops.put(b"k/%05d" % i, b"%05d" % i * 200) for i in range(start, start + 100)])
        for start in range(0, N_KEYS, 100):
            s.txn([], [ops.delete(b"k/%05d" % i) for i in range(start, start + 100) if i % KEEP_EVERY])
        s.compact(s.revision, physical=True)
        yield s


def _state(s):
    return {
        "kvs": list(s.range(b"\0", b"\0").kvs),
        "revision": s.revision,
        "compact_revision": s.compact_revision,
        "hash_kv": s.hash_kv(0),
        "hash": s.hash(),
        "keys": s.status().keys,
    }


def test_defrag_frees_space_and_changes_nothing_else(store, tmp_path):
    before = _state(store)
    assert len(before["kvs"]) == N_KEYS // KEEP_EVERY
    size_before = store.status().db_size

    reported_before, reported_after = store.defrag()

    st = store.status()
    assert reported_before == size_before
    assert reported_after == st.db_size
    assert st.db_size < size_before / 4
    assert st.db_size == st.db_size_in_use  # as etcd: no free pages left
    assert _state(store) == before
    assert store.put(b"k/after", b"1").header.revision == before["revision"] + 1

    store.close()
    with mvcckv.open(str(tmp_path / "data"), fsync=False) as reopened:
        after = _state(reopened)
        assert after["kvs"][:-1] == before["kvs"]
        assert after["hash_kv"] == reopened.hash_kv(0)
        assert after["revision"] == before["revision"] + 1
        assert after["compact_revision"] == before["compact_revision"]


def test_defrag_twice_is_stable(store):
    store.defrag()
    _, size = store.defrag()
    before, after = store.defrag()
    assert before == after == size


def test_reads_are_served_and_writes_wait_during_defrag(store):
    expected = [(kv.key, kv.value, kv.mod_revision) for kv in store.range(b"k/", prefix_end(b"k/")).kvs]
    rev = store.revision
    stop = threading.Event()
    copy_done = threading.Event()
    errors: list[BaseException] = []
    reads = [0]
    write_done: list[int] = []

    def reader():
        try:
            for i in range(1_000_000):
                if stop.is_set():
                    return
                got = store.range(b"k/", prefix_end(b"k/"), revision=rev).kvs
                assert [(kv.key, kv.value, kv.mod_revision) for kv in got] == expected
                key, value, _ = expected[i % len(expected)]
                assert store.get(key).value == value
                reads[0] += 1
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def writer():
        copy_done.wait(10)
        try:
            write_done.append(store.put(b"during", b"defrag").header.revision)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    seen = {}

    def after_copy():
        # The copy is done, the swap not yet: defrag holds the writer lock.
        copy_done.set()
        start = reads[0]
        _wait_for(lambda: reads[0] >= start + 50)
        seen["reads"] = reads[0] - start
        time.sleep(0.2)
        seen["write_done_during_defrag"] = list(write_done)

    threads = [threading.Thread(target=reader) for _ in range(2)] + [threading.Thread(target=writer)]
    for t in threads:
        t.start()
    try:
        assert _wait_for(lambda: reads[0] > 10)
        store._backend.env = _PausingEnv(store._backend.env, after_copy=after_copy)
        before, after = store.defrag()
        assert _wait_for(lambda: bool(write_done) or bool(errors))
        done_at = reads[0]
        assert _wait_for(lambda: reads[0] > done_at + 20), "reads stopped after defrag"
    finally:
        stop.set()
        copy_done.set()
        for t in threads:
            t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert after < before
    assert seen["reads"] >= 50, "reads were not served while defrag ran"
    assert seen["write_done_during_defrag"] == [], "a write completed while defrag held the backend"
    assert write_done == [rev + 1]
    assert store.get(b"during").value == b"defrag"


def test_status_while_defrag_swaps_the_environment(store):
    probe_waiting = threading.Event()
    env_closed = threading.Event()
    result = {}

    def probe():
        try:
            result["status"] = store.status()
        except Exception as e:  # noqa: BLE001 - the assertion below reports it
            result["error"] = e

    prober = threading.Thread(target=probe)

    class _Env(_PausingEnv):
        def begin(self, *args, **kwargs):
            # status() reaches the environment here; hold the prober at that
            # point until defrag has closed it (or 2 s, if a lock stops defrag).
            if threading.current_thread() is prober:
                probe_waiting.set()
                env_closed.wait(2)
            return self._env.begin(*args, **kwargs)

    def after_close():
        env_closed.set()
        prober.join(10)

    store._backend.env = _Env(store._backend.env, after_close=after_close)
    prober.start()
    assert probe_waiting.wait(10)
    store.defrag()
    prober.join(10)
    assert "error" not in result, repr(result.get("error"))
    assert result["status"].revision == store.revision

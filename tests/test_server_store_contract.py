"""What the server's event loop relies on from the store.

The server calls ``Store.propose`` on its event loop and awaits the
returned future, so propose itself must never wait for the writer thread
(an fsync, a batch of applies): it validates, queues and returns.
"""

from __future__ import annotations

import threading
import time


import mvcckv
from mvcckv import errors
from mvcckv.pb import rpc_pb2 as pb
from mvcckv.store import KIND_PUT


def _propose_time(store, request) -> float:
    start = time.monotonic()
    try:
        store.propose(KIND_PUT, request)
    except errors.MvccError:
        pass
    return time.monotonic() - start


def _with_busy_writer(store, fn, busy: float = 2.0):
    """Run fn while the writer thread is held busy for ``busy`` seconds."""
    started, release = threading.Event(), threading.Event()

    def hold():
        started.set()
        release.wait(busy)

    store.run_on_writer(hold)
    assert started.wait(5)
    try:
        return fn()
    finally:
        release.set()


def test_propose_does_not_wait_for_a_busy_writer(tmp_path):
    with mvcckv.open(str(tmp_path)) as store:
        took = _with_busy_writer(store, lambda: _propose_time(store, pb.PutRequest(key=b"k", value=b"v")))
        assert took < 0.5


def test_propose_over_quota_does_not_wait_for_a_busy_writer(tmp_path):
    with mvcckv.open(str(tmp_path), quota_bytes=1) as store:
        took = _with_busy_writer(store, lambda: _propose_time(store, pb.PutRequest(key=b"k", value=b"v")))
        assert took < 0.5


def test_a_cancelled_proposal_does_not_stop_the_writer(tmp_path):
    # A gRPC client that goes away cancels the future of its write; the
    # write is applied all the same and the store keeps serving.
    with mvcckv.open(str(tmp_path)) as store:
        gate = threading.Event()
        store.run_on_writer(lambda: gate.wait(5))
        futs = [store.propose(KIND_PUT, pb.PutRequest(key=b"k%d" % i, value=b"v")) for i in range(5)]
        assert all(f.cancel() for f in futs)
        gate.set()
        resp = store.propose(KIND_PUT, pb.PutRequest(key=b"after", value=b"v")).result(timeout=10)
        assert resp.header.revision == 7
        assert store.range(b"k", b"l").count == 5

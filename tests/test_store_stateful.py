"""The engine against the executable model of etcd's semantics
(``mvcckv.testing.model``), driven by ``mvcckv.testing.machine``.

The conformance state machine sends the same requests to an empty store
per example and to the model, and checks that they agree: every response
(field for field, headers included) or error (type and text), the whole
keyspace after every step, the change log at the end of each example, and
HashKV against a second store that replays the writes both accepted (at
every revision where that is defined independently of compaction timing).
This file adds what only an embedded store allows: ``get``, the store's
own revision, compact revision, key count and change log after every step,
and closing and reopening the store at random steps (the model does not
notice, so everything must survive the restart).

Keys come from a small alphabet so that they collide, overlap ranges and
prefixes; txns are random, so many break the duplicate-key rule or the op
budget (``MAX_TXN_OPS`` is small on purpose) and both sides must refuse them
alike, leaving nothing changed.

The same machine runs on both engines: ``test_store_against_model`` on the
LMDB store in a temporary directory, ``test_pg_engine_against_model`` on
the PostgreSQL engine (mvcckv.pg) in a fresh schema per example of the
session's throwaway server (the ``postgres`` fixture, conftest.py), where
"close and reopen" closes the engine and opens a new one on the same
schema, and the replay check uses another schema.  Without PostgreSQL the
latter is skipped locally and fails under CI (``CI=true``).

``MVCCKV_STATEFUL_EXAMPLES`` (LMDB) and ``MVCCKV_PG_STATEFUL_EXAMPLES``
(PostgreSQL, fewer: every step is a few round trips) raise the number of
examples for a longer local run; the defaults keep the file well under a
minute.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid

from hypothesis import strategies as st
from hypothesis.stateful import invariant, rule

import mvcckv
import mvcckv.pg
from mvcckv.pb import rpc_pb2 as pb
from mvcckv.testing.machine import ConformanceMachine, Session, run_sequential
from mvcckv.testing.targets import EmbeddedTarget

MAX_TXN_OPS = 6
EXAMPLES = int(os.environ.get("MVCCKV_STATEFUL_EXAMPLES", "40"))
PG_EXAMPLES = int(os.environ.get("MVCCKV_PG_STATEFUL_EXAMPLES", "10"))


class StoreMachine(ConformanceMachine):
    """The conformance machine plus what needs the store object itself."""

    @rule()
    def reopen(self):
        self.target.store.close()
        self.target = self.session.factory(reopen=self.target)

    @rule(data=st.data())
    def get(self, data):
        from mvcckv.testing.strategies import revisions

        key = data.draw(self.space.keys(), label="key")
        rev = data.draw(revisions(self.model), label="revision")
        self.agree("get", pb.RangeRequest(key=key, revision=rev),
                   lambda: self.target.store.get(key, revision=rev), lambda: self.model.get(key, rev))

    @invariant()
    def same_store_state(self):
        store = self.target.store
        assert store.revision == self.model.revision
        assert store.compact_revision == self.model.compact_revision
        assert store.status().keys == len(self.model.live_keys_at(self.model.revision))
        # The change log above the compact revision (what watchers catch up
        # from): every change, in sub revision order.
        low = self.model.compact_revision + 1
        changes, _, _ = store.read_changes(low, 1 << 30)
        assert changes == self.model.changes_since(low)


class Stores:
    """Opens an empty store per example (and reopens one on its data)."""

    def __init__(self, open_at):
        self.open_at = open_at  # where -> a store
        self.root = tempfile.mkdtemp(prefix="mvcckv-stateful-")
        self.where = {}

    def __call__(self, reopen: EmbeddedTarget | None = None) -> EmbeddedTarget:
        where = self.where.pop(id(reopen)) if reopen is not None else os.path.join(self.root, uuid.uuid4().hex)
        target = EmbeddedTarget(self.open_at(where))
        self.where[id(target)] = where
        return target

    def cleanup(self):
        shutil.rmtree(self.root, ignore_errors=True)


def run(stores: Stores, examples: int, steps: int) -> None:
    session = Session(stores, prefix=b"", max_txn_ops=MAX_TXN_OPS, remote=False, replay=stores)
    try:
        result = run_sequential(session, examples=examples, steps=steps, machine=StoreMachine, quiet=False)
    finally:
        stores.cleanup()
    assert result.ok, result.error or f"{result.failure.message}\nsteps: {result.failure.steps}"
    assert result.examples >= examples and result.history_checks >= 1


def test_store_against_model():
    run(Stores(lambda path: mvcckv.open(path, fsync=False, max_txn_ops=MAX_TXN_OPS)), EXAMPLES, 40)


def test_pg_engine_against_model(postgres):
    dsn = postgres.dsn()
    # A schema per example: "reopen" closes the engine and opens a new one on it.
    stores = Stores(lambda where: mvcckv.pg.open(
        dsn, schema="st_" + os.path.basename(where)[:12], max_txn_ops=MAX_TXN_OPS, poll_interval=0.2))
    run(stores, PG_EXAMPLES, 30)

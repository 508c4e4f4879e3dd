"""The process that tests/test_crash.py kills: concurrent writers on one store.

Run as ``python crash_child.py DATA_DIR RUN SEED [WRITERS]``.  It opens the
store in ``DATA_DIR`` and keeps writing from ``WRITERS`` threads (puts,
single-key deletes, prefix deletes, txns) plus one compactor thread until it
is killed.  Everything it knows is written to stdout, one line per event,
each line (or group of lines) with a single ``write(2)`` to the pipe so that
a SIGKILL can never leave half of one behind::

    opening                                   before mvcckv.open
    ready REV                                 the store is open at revision REV
    intent OP KIND ARGS...                    about to propose request OP
    done OP REV OUTCOME                       OP was acknowledged
    ack OP KEY REV DIGEST                     one key OP changed (DIGEST of the
                                              new value, or "tombstone")
    maint JOB                                 starting a defrag, snapshot or
                                              checkpoint (CRASH_CHILD_MAINTENANCE=1)

``intent`` lines come before the request is proposed and ``done``/``ack``
lines right after the call returns, so every acknowledged write is printed
and every request that may be in the log has an ``intent``.  Requests are
rebuilt from their ``intent`` line by :func:`request` (the parent re-applies
them to a reference store), values by :func:`make_value`.

KIND and ARGS, and the OUTCOME of each::

    put KEY SIZE          created
    del KEY               created | noop (nothing to delete)
    delprefix PREFIX      created | noop
    txn KEY KEY2 SIZE     success (put KEY, delete KEY2) | failure (put KEY2)
                          -- the compare is "KEY exists"
    compact REV PHYSICAL  compacted | refused (REV already compacted); PHYSICAL 1
                          waits for the deletion to finish, 0 returns once
                          it is scheduled

The compactor only compacts at revisions every writer has already printed
an acknowledgement beyond (the smallest "last acknowledged revision" over
the writers), so a request that was in flight when the process died always
has a revision above every compaction: the parent can still find it in the
history and tell whether it was applied.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
import threading
import time

import mvcckv
from mvcckv import errors, ops, prefix_end

KEYS = [b"key/%02d" % i for i in range(24)]
PREFIXES = [b"key/0", b"key/1", b"key/2"]

# Small batches, a pause between them, tiny WAL segments and frequent
# checkpoints: compaction, segment rotation and segment release all happen
# many times a second, so a random kill often lands inside one of them.
STORE_OPTIONS = dict(
    compaction_batch_limit=40,
    compaction_sleep=0.004,
    wal_segment_bytes=48 * 1024,
    checkpoint_interval=0.05,
)


def make_value(op_id: str, size: int) -> bytes:
    """The value request ``op_id`` writes: unique to it, ``size`` bytes."""
    head = op_id.encode() + b"|"
    body = hashlib.sha256(head).hexdigest().encode()
    out = head + body * (size // len(body) + 1)
    return out[: max(size, len(head))]


def digest(value: bytes) -> str:
    return hashlib.blake2b(value, digest_size=8).hexdigest()


def request(op_id: str, kind: str, args: list[str]):
    """The (store method name, positional args, keyword args) of an intent."""
    if kind == "put":
        return "put", (args[0].encode(), make_value(op_id, int(args[1]))), {}
    if kind == "del":
        return "delete", (args[0].encode(),), {}
    if kind == "delprefix":
        p = args[0].encode()
        return "delete", (p, prefix_end(p)), {"prev_kv": True}
    if kind == "txn":
        key, key2, value = args[0].encode(), args[1].encode(), make_value(op_id, int(args[2]))
        return (
            "txn",
            ([ops.version(key) > 0], [ops.put(key, value), ops.delete(key2)], [ops.put(key2, value)]),
            {},
        )
    if kind == "compact":
        return "compact", (int(args[0]),), {"physical": args[1] == "1"}
    raise ValueError(f"unknown request kind {kind!r}")


def _emit(*lines: str) -> None:
    # One write(2) of less than PIPE_BUF bytes is atomic on a pipe.
    os.write(1, "".join(line + "\n" for line in lines).encode())


class _Writers:
    def __init__(self, store, run: int, seed: int, writers: int):
        self.store = store
        self.run = run
        self.seed = seed
        start = store.revision
        self.last_acked = [start] * writers
        self.stop = threading.Event()

    def writer(self, t: int) -> None:
        rng = random.Random(f"{self.seed}/{self.run}/{t}")
        store = self.store
        n = 0
        while not self.stop.is_set():
            n += 1
            op_id = f"{self.run}.{t}.{n}"
            roll = rng.random()
            # Mostly small values, some large enough to span many pages of
            # the WAL and of LMDB.
            size = rng.choice((24, 64, 200, 900)) if rng.random() < 0.93 else rng.randint(4000, 30000)
            key = rng.choice(KEYS)
            if roll < 0.55:
                kind, args = "put", [key.decode(), str(size)]
            elif roll < 0.72:
                kind, args = "del", [key.decode()]
            elif roll < 0.77:
                kind, args = "delprefix", [rng.choice(PREFIXES).decode()]
            else:
                key2 = rng.choice([k for k in KEYS if k != key])
                kind, args = "txn", [key.decode(), key2.decode(), str(size)]
            _emit(f"intent {op_id} {kind} {' '.join(args)}")
            method, a, kw = request(op_id, kind, args)
            resp = getattr(store, method)(*a, **kw)
            rev = resp.header.revision
            if kind == "put":
                _emit(f"done {op_id} {rev} created", f"ack {op_id} {args[0]} {rev} {digest(a[1])}")
            elif kind == "del":
                if resp.deleted:
                    _emit(f"done {op_id} {rev} created", f"ack {op_id} {args[0]} {rev} tombstone")
                else:
                    _emit(f"done {op_id} {rev} noop")
                    continue
            elif kind == "delprefix":
                if resp.deleted:
                    _emit(
                        f"done {op_id} {rev} created",
                        *(f"ack {op_id} {kv.key.decode()} {rev} tombstone" for kv in resp.prev_kvs),
                    )
                else:
                    _emit(f"done {op_id} {rev} noop")
                    continue
            else:
                value = make_value(op_id, size)
                if resp.succeeded:
                    lines = [f"done {op_id} {rev} success", f"ack {op_id} {args[0]} {rev} {digest(value)}"]
                    if resp.responses[1].response_delete_range.deleted:
                        lines.append(f"ack {op_id} {args[1]} {rev} tombstone")
                    _emit(*lines)
                else:
                    _emit(f"done {op_id} {rev} failure", f"ack {op_id} {args[1]} {rev} {digest(value)}")
            # Only after the acknowledgement is printed: see the module docstring.
            self.last_acked[t] = rev

    def maintainer(self) -> None:
        """Defrag, snapshot and checkpoint at random moments (with
        ``CRASH_CHILD_MAINTENANCE=1``), each announced by a ``maint JOB``
        line, so that a kill or power cut can land inside each of them."""
        rng = random.Random(f"{self.seed}/{self.run}/maintainer")
        store = self.store
        while not self.stop.wait(rng.uniform(0.02, 0.1)):
            job = rng.choice(("defrag", "snapshot", "checkpoint"))
            _emit(f"maint {job}")
            if job == "defrag":
                store.defrag()
            elif job == "snapshot":
                with open(os.devnull, "wb") as sink:
                    store.snapshot(sink)
            else:
                store.checkpoint()

    def compactor(self) -> None:
        rng = random.Random(f"{self.seed}/{self.run}/compactor")
        store = self.store
        done = store.compact_revision
        n = 0
        while not self.stop.wait(rng.uniform(0.02, 0.08)):
            target = min(self.last_acked)
            if target <= max(done, store.compact_revision):
                continue
            n += 1
            op_id = f"{self.run}.c.{n}"
            physical = rng.random() < 0.3
            _emit(f"intent {op_id} compact {target} {int(physical)}")
            try:
                resp = store.compact(target, physical=physical)
            except errors.CompactedError:
                _emit(f"done {op_id} - refused")
                continue
            done = target
            _emit(f"done {op_id} {resp.header.revision} compacted")


def main(argv: list[str]) -> None:
    path, run, seed = argv[0], int(argv[1]), int(argv[2])
    writers = int(argv[3]) if len(argv) > 3 else 6
    _emit("opening")
    store = mvcckv.open(path, **STORE_OPTIONS)
    _emit(f"ready {store.revision}")
    w = _Writers(store, run, seed, writers)
    threads = [threading.Thread(target=w.writer, args=(t,), daemon=True) for t in range(writers)]
    threads.append(threading.Thread(target=w.compactor, daemon=True))
    if os.environ.get("CRASH_CHILD_MAINTENANCE") == "1":
        threads.append(threading.Thread(target=w.maintainer, daemon=True))
    for th in threads:
        th.start()
    # Normally killed long before this; the bound keeps a lost child from
    # running forever.
    time.sleep(float(os.environ.get("CRASH_CHILD_MAX_SECONDS", "30")))
    w.stop.set()
    for th in threads:
        th.join()
    store.close()


if __name__ == "__main__":
    main(sys.argv[1:])

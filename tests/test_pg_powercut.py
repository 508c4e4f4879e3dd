"""The PostgreSQL engine under power cuts (docs/durability.md, "The PostgreSQL engine").

The engine acknowledges a write once PostgreSQL's ``COMMIT`` returns; with
``fsync``, ``full_page_writes`` and ``synchronous_commit`` on, that means
its WAL record was flushed.  Here PostgreSQL itself runs under the power-cut
simulator of ``powercut.py`` (every postgres process preloads the shim),
writers put through the engine, and at a random moment every postgres
process is frozen (SIGSTOP), the disk is cut (``torn``: a random subset of
the unsynced pages survives; ``drop``: none), and PostgreSQL is started on
what the disk holds.  Its crash recovery must bring back every
acknowledged write at its revision, with no revision lost or reused.

``CRASH_SEED`` reproduces a run.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

import mvcckv.pg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pg_harness import PostgresServer  # noqa: E402
from powercut import Disk, build_shim  # noqa: E402
from test_crash import _wait_stopped  # noqa: E402

DURABLE = ("fsync=on", "full_page_writes=on", "synchronous_commit=on")
SCHEMA = "powercut"


def _children(parent: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == parent:
                out.append(int(d))
    return out


def _chown_tree(path: Path, owner) -> None:
    if owner is None:
        return
    for dirpath, _, files in os.walk(path):
        os.chown(dirpath, *owner)
        for name in files:
            os.chown(os.path.join(dirpath, name), *owner)


def _cut(pg: PostgresServer, disk: Disk, mode: str, rng: random.Random, image: Path) -> dict:
    postmaster = pg.pid
    assert postmaster is not None
    # The postmaster first, so that it forks nothing more; then its children.
    os.kill(postmaster, signal.SIGSTOP)
    _wait_stopped(postmaster)
    children = _children(postmaster)
    for pid in children:
        os.kill(pid, signal.SIGSTOP)
    for pid in children:
        _wait_stopped(pid)
    stats = disk.cut(mode, rng, image)
    for pid in [postmaster, *children]:
        os.kill(pid, signal.SIGKILL)
    pg.stop_server("immediate")
    return stats


def test_pg_power_cut_loses_no_acknowledged_write(postgres_bindir):
    _pg_power_cuts(postgres_bindir, ("torn", "drop", "torn"))


@pytest.mark.slow
def test_pg_power_cut_loses_no_acknowledged_write_long(postgres_bindir):
    _pg_power_cuts(postgres_bindir, ("torn", "torn", "drop") * 8)


def _pg_power_cuts(postgres_bindir, modes: tuple[str, ...]) -> None:
    seed = int(os.environ.get("CRASH_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    acked: list[tuple[bytes, bytes, int]] = []
    top = 1
    with PostgresServer(postgres_bindir, settings=DURABLE) as pg:
        # Beside the cluster: the server's user must reach the shim too.
        work = pg.workdir / "powercut"
        work.mkdir()
        lib = build_shim(work)
        image = work / "image"
        mvcckv.pg.open(pg.dsn(), schema=SCHEMA).close()
        for n, mode in enumerate(modes):
            where = f"seed {seed}, cut {n} ({mode})"
            pg.stop_server("fast")
            disk = Disk(lib, pg.data_dir, work)
            _chown_tree(work, pg.owner)
            pg.env = disk.env()
            pg.start_server()
            engine = mvcckv.pg.open(pg.dsn(), schema=SCHEMA, poll_interval=0.2)
            stop = threading.Event()
            lock = threading.Lock()

            def writer(t: int, engine=engine, stop=stop, lock=lock, n=n) -> None:
                i = 0
                while not stop.is_set():
                    key, value = b"c%d/w%d/%d" % (n, t, i % 50), b"v%d.%d.%d" % (n, t, i)
                    try:
                        rev = engine.put(key, value).header.revision
                    except Exception:  # noqa: BLE001 - the cut; nothing after it counts
                        return
                    with lock:
                        acked.append((key, value, rev))
                    i += 1

            threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
            for t in threads:
                t.start()
            time.sleep(rng.uniform(0.5, 1.5))
            with lock:
                stats = _cut(pg, disk, mode, rng, image)
                before = len(acked)
            stop.set()
            for t in threads:
                t.join(30)
            engine.close()
            assert before > 0, f"{where}: no write was acknowledged before the cut"
            del acked[before:]  # answers that raced the freeze are not counted
            shutil.rmtree(pg.data_dir)
            image.rename(pg.data_dir)
            os.chmod(pg.data_dir, 0o700)
            _chown_tree(pg.data_dir, pg.owner)
            pg.env = {}
            pg.start_server()
            engine = mvcckv.pg.open(pg.dsn(), schema=SCHEMA)
            try:
                top = max([top] + [rev for _, _, rev in acked])
                assert engine.revision >= top, f"{where}: revision {engine.revision} below acknowledged {top}"
                revs = [rev for _, _, rev in acked]
                assert len(set(revs)) == len(revs), f"{where}: a revision was acknowledged twice"
                for key, value, rev in acked:
                    kv = engine.get(key, revision=rev)
                    assert kv is not None and (kv.value, kv.mod_revision) == (value, rev), (
                        f"{where}: acknowledged put of {key!r} at revision {rev} reads back as {kv}"
                    )
            finally:
                engine.close()
            print(f"{where}: {len(acked)} acknowledged, {stats}")

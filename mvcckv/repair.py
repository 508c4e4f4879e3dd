"""``mvcckv repair``: rebuild a damaged backend from the WAL, or a snapshot plus the WAL.

A store refuses to open a data dir whose backend is damaged
(:class:`~mvcckv.errors.BackendCorruptError`, naming what is wrong).  The
WAL holds requests, and applying them is deterministic, so the backend can
be rebuilt without losing anything the WAL still holds:

* from the WAL alone, when its oldest segment still starts at record 1
  (nothing was released yet);
* from a snapshot (``--from-snapshot``, etcd's framing, see
  ``snapshot.py``) whose ``consistent_index`` the WAL continues from:
  every WAL record after it must still be there.

Anything else would lose acknowledged writes, and is refused with the range
of records that is missing.  The damaged backend is never deleted: it is
moved aside to ``db.damaged-<UTC time>`` for inspection.  A damaged WAL
(:class:`~mvcckv.errors.WALCorruptError`) is not repaired: which records
it lost cannot be known.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import lmdb

from mvcckv.backend import META_CONSISTENT_INDEX, decode_u64
from mvcckv.errors import StorageError
from mvcckv.fsutil import fsync_dir
from mvcckv.wal import WAL


def repair(data_dir: str, snapshot: str | None = None) -> str:
    """Rebuild ``data_dir``'s backend; returns a one-line summary."""
    from mvcckv import snapshot as snapshots
    from mvcckv.store import Store

    data_dir = os.path.abspath(data_dir)
    db_dir = os.path.join(data_dir, "db")
    wal_dir = os.path.join(data_dir, "wal")
    if not os.path.isdir(wal_dir):
        raise StorageError(f"{data_dir} has no WAL ({wal_dir}); there is nothing to rebuild from")
    staging = None
    try:
        start = 0
        if snapshot is not None:
            staging = tempfile.mkdtemp(prefix=".repair-", dir=data_dir)
            restored = os.path.join(staging, "restored")
            snapshots.restore(snapshot, restored)
            start = _consistent_index(os.path.join(restored, "db"))
        with WAL.open(wal_dir) as wal:
            # Raises, naming the missing records, when the WAL does not
            # continue from ``start``; nothing has been changed yet.
            wal.replay(start)
            last = wal.last_index
        aside = None
        if os.path.exists(db_dir):
            aside = os.path.join(data_dir, time.strftime("db.damaged-%Y%m%dT%H%M%SZ", time.gmtime()))
            os.rename(db_dir, aside)
        if staging is not None:
            os.rename(os.path.join(staging, "restored", "db"), db_dir)
        fsync_dir(data_dir)
        with Store(data_dir) as store:
            revision = store.revision
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    source = f"snapshot {snapshot} (WAL index {start})" if snapshot else "the WAL alone"
    kept = f"; the damaged backend is in {aside}" if aside else ""
    return f"rebuilt {db_dir} from {source} plus WAL records {start + 1}..{last}: revision {revision}{kept}"


def _consistent_index(db_dir: str) -> int:
    env = lmdb.open(db_dir, readonly=True, lock=False, max_dbs=16)
    try:
        meta = env.open_db(b"meta", create=False)
        with env.begin() as txn:
            ci = txn.get(META_CONSISTENT_INDEX, db=meta)
    finally:
        env.close()
    return decode_u64(ci) if ci else 0



def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "repair",
        help="rebuild a damaged backend from the WAL (or a snapshot plus the WAL)",
        description=(
            "Rebuild the backend (db/) of a data dir that refuses to open, by replaying its WAL "
            "from the start or from a snapshot's consistent index. The damaged db/ is moved to "
            "db.damaged-<time>. Refuses when the WAL no longer holds every record needed."
        ),
    )
    parser.add_argument("--data-dir", required=True, help="the data dir to repair")
    parser.add_argument("--from-snapshot", metavar="FILE", help="a snapshot (etcdctl snapshot save) to start from")
    parser.set_defaults(func=_cmd_repair)


def _cmd_repair(args: argparse.Namespace) -> int:
    try:
        print(repair(args.data_dir, args.from_snapshot))
    except (StorageError, lmdb.Error, OSError) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    return 0

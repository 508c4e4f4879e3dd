"""Damaged data dirs: refused at open with what is wrong, and ``mvcckv repair``.

Every case damages a data dir the way a bad disk or a careless copy does,
checks that opening it is refused with a clear error (never a crash of the
process through SIGBUS, never a silently wrong answer), then repairs it
where the WAL still holds what is needed, and checks nothing was lost.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import mvcckv
from mvcckv import errors, metapage, snapshot
from mvcckv.repair import repair


def _fill(path: str, n: int, **options) -> tuple[int, object]:
    with mvcckv.open(path, **options) as store:
        for i in range(n):
            store.put(b"k%04d" % (i % 300), b"v%d" % i)
        return store.revision, store.hash_kv()[0]


def _data_file(path: str) -> str:
    return os.path.join(path, "db", "data.mdb")


def test_truncated_backend_is_refused_before_lmdb_maps_it(tmp_path):
    path = str(tmp_path / "data")
    _fill(path, 2000)
    size = os.path.getsize(_data_file(path))
    os.truncate(_data_file(path), size // 2)
    # In a child, so that a SIGBUS (what mapping the file would do) shows
    # as a signal exit rather than killing the test run.
    child = subprocess.run(
        [sys.executable, "-c", "import sys, mvcckv; mvcckv.open(sys.argv[1])", path],
        capture_output=True, text=True, timeout=60,
    )
    assert child.returncode == 1, child.stderr
    assert "BackendCorruptError" in child.stderr and "is truncated" in child.stderr
    assert "mvcckv repair --data-dir" in child.stderr


def test_damaged_pages_are_refused_with_a_repair_hint(tmp_path):
    path = str(tmp_path / "data")
    _fill(path, 2000)
    f = _data_file(path)
    psize = metapage.newest(metapage.read_metas(f)).psize
    with open(f, "r+b") as out:
        out.seek(2 * psize)
        out.write(b"\xa5" * (os.path.getsize(f) - 2 * psize))
    with pytest.raises(errors.BackendCorruptError, match="mvcckv repair --data-dir"):
        mvcckv.open(path)


def test_backend_older_than_its_synced_record_is_refused(tmp_path):
    """An operator copies an old data.mdb over a newer one: refused, not
    served with the newer WAL applied on top of an older state."""
    path = str(tmp_path / "data")
    _fill(path, 100)
    old = open(_data_file(path), "rb").read()
    _fill(path, 100)
    with open(_data_file(path), "wb") as out:
        out.write(old)
    with pytest.raises(errors.BackendCorruptError, match="has lost synced data"):
        mvcckv.open(path)


def test_repair_rebuilds_from_the_wal_alone(tmp_path):
    path = str(tmp_path / "data")
    rev, h = _fill(path, 3000)
    os.truncate(_data_file(path), 8192)
    with pytest.raises(errors.BackendCorruptError):
        mvcckv.open(path)
    summary = repair(path)
    assert "from the WAL alone" in summary and f"revision {rev}" in summary
    assert any(name.startswith("db.damaged-") for name in os.listdir(path))
    with mvcckv.open(path) as store:
        assert store.revision == rev
        assert store.hash_kv()[0] == h


def test_repair_refuses_when_the_wal_no_longer_holds_everything(tmp_path):
    path = str(tmp_path / "data")
    _fill(path, 3000, wal_segment_bytes=4096)
    os.truncate(_data_file(path), 8192)
    with pytest.raises(errors.WALCorruptError, match="are missing"):
        repair(path)
    # Nothing was changed: still refused the same way.
    assert not any(name.startswith("db.damaged-") for name in os.listdir(path))
    with pytest.raises(errors.BackendCorruptError):
        mvcckv.open(path)


_SNAPSHOT_THEN_DIE = """
import os, sys, mvcckv
from mvcckv import snapshot
store = mvcckv.open(sys.argv[1], wal_segment_bytes=4096, checkpoint_interval=3600)
# The first checkpoint after open comes at once, not an interval later:
# taken here, none follows while this runs.
store.checkpoint()
for i in range(1500):
    store.put(b"k%04d" % (i % 300), b"v%d" % i)
snapshot.save(store, sys.argv[2])
for i in range(1500, 1600):
    store.put(b"k%04d" % (i % 300), b"v%d" % i)
print(store.revision, store.hash_kv()[0].hash, flush=True)
os._exit(0)  # no close, no checkpoint: the WAL still holds what followed the snapshot
"""


def test_repair_from_a_snapshot_plus_the_wal(tmp_path):
    path = str(tmp_path / "data")
    snap = str(tmp_path / "backup.db")
    out = subprocess.run(
        [sys.executable, "-c", _SNAPSHOT_THEN_DIE, path, snap], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    rev, h = map(int, out.stdout.split())
    os.truncate(_data_file(path), 8192)
    summary = repair(path, snap)
    assert "snapshot" in summary
    with mvcckv.open(path) as store:
        assert store.revision == rev
        assert store.hash_kv()[0].hash == h


def test_repair_command_line(tmp_path):
    path = str(tmp_path / "data")
    _fill(path, 200)
    os.truncate(_data_file(path), 8192)
    mvcckv_cli = [sys.executable, "-m", "mvcckv", "repair", "--data-dir", path]
    done = subprocess.run(mvcckv_cli, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("rebuilt ")
    bad = subprocess.run(mvcckv_cli[:-1] + [str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "has no WAL" in bad.stderr


def test_kept_segments_let_an_old_snapshot_be_combined_with_the_wal(tmp_path):
    """With wal_kept_segments (etcd's --max-wals), a snapshot taken long
    before the last checkpoint still repairs; without, the same is refused."""
    for kept in (0, 10_000):
        path, snap = str(tmp_path / f"data{kept}"), str(tmp_path / f"backup{kept}.db")
        with mvcckv.open(path, wal_segment_bytes=4096, wal_kept_segments=kept) as store:
            for i in range(300):
                store.put(b"k%04d" % i, b"v%d" % i)
            snapshot.save(store, snap)
            for i in range(300, 1500):
                store.put(b"k%04d" % (i % 300), b"v%d" % i)
                if i % 200 == 0:
                    store.checkpoint()  # each releases what it covers, minus the kept
            rev, h = store.revision, store.hash_kv()[0]
        os.truncate(_data_file(path), 8192)
        if not kept:
            with pytest.raises(errors.WALCorruptError, match="are missing"):
                repair(path, snap)
            continue
        repair(path, snap)
        with mvcckv.open(path) as store:
            assert (store.revision, store.hash_kv()[0]) == (rev, h)


def test_a_second_opener_never_touches_a_data_dir_in_use(tmp_path):
    """The open-time check rewrites meta pages; on a file another process
    is using that would destroy it, so the backend is locked first."""
    path = str(tmp_path / "data")
    with mvcckv.open(path, checkpoint_interval=3600) as store:
        store.put(b"a", b"1")
        store.checkpoint()
        for i in range(300):
            store.put(b"k%d" % i, b"v")  # committed, not synced: newer meta pages
        before = open(_data_file(path), "rb").read(8192)
        child = subprocess.run(
            [sys.executable, "-c", "import sys, mvcckv; mvcckv.open(sys.argv[1])", path],
            capture_output=True, text=True, timeout=60,
        )
        assert child.returncode == 1 and "already open" in child.stderr, child.stderr
        assert open(_data_file(path), "rb").read(8192) == before
        store.put(b"b", b"2")
        rev = store.revision
    with mvcckv.open(path) as store:
        assert store.revision == rev and store.get(b"k299").value == b"v"

"""Disk faults: a full disk under the WAL, and fsyncs that fail (docs/durability.md).

Faults are injected where the engine meets the operating system: the WAL's
``_write_all`` / ``_fdatasync`` and the backend environment's ``sync``.

* ENOSPC while appending to the WAL: the batch is refused with etcd's
  NOSPACE error and alarm, nothing of it is left in the log, reads go on,
  and once there is space again disarming the alarm resumes writes.
* EIO on the WAL's fdatasync or the backend's fsync: the store stops
  (``StoppedError``) instead of acknowledging what it could not make
  durable; it never retries the fsync nor releases WAL segments after it,
  and reopening recovers every acknowledged write.
"""

from __future__ import annotations

import errno
import os

import lmdb
import pytest

import mvcckv
from mvcckv import errors, wal
from mvcckv.pb import rpc_pb2 as pb


class _FullDisk:
    """Replaces wal._write_all: while ``full``, writes a few bytes, then fails
    with ENOSPC (a real full disk can accept part of a write)."""

    def __init__(self, real):
        self.real = real
        self.full = False
        self.refused = 0

    def __call__(self, fd, buf):
        if self.full:
            self.refused += 1
            os.write(fd, bytes(buf[:7]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.real(fd, buf)


def test_full_disk_raises_nospace_reads_go_on_and_disarm_resumes(tmp_path, monkeypatch):
    disk = _FullDisk(wal._write_all)
    monkeypatch.setattr(wal, "_write_all", disk)
    path = str(tmp_path / "data")
    store = mvcckv.open(path)
    try:
        store.put(b"a", b"1")
        store.put(b"b", b"2")
        disk.full = True
        with pytest.raises(errors.NoSpaceError) as e:
            store.put(b"c", b"3")
        assert str(e.value) == "etcdserver: mvcc: database space exceeded"
        assert disk.refused == 1
        assert (store.options.member_id, pb.NOSPACE) in store.alarms()
        # Reads go on; writes are refused by the alarm without touching the log.
        assert store.get(b"a").value == b"1"
        assert [kv.key for kv in store.range(b"a", b"z").kvs] == [b"a", b"b"]
        with pytest.raises(errors.NoSpaceError):
            store.put(b"d", b"4")
        assert disk.refused == 1
        rev = store.revision
        disk.full = False
        # Space is back, but the alarm still refuses until disarmed.
        with pytest.raises(errors.NoSpaceError):
            store.put(b"d", b"4")
        store.alarm(pb.AlarmRequest.DEACTIVATE, pb.NOSPACE)
        assert store.alarms() == []
        assert store.put(b"e", b"5").header.revision == rev + 1
    finally:
        store.close()
    with mvcckv.open(path) as store:
        # The refused requests never come back on replay; the rest is there.
        assert store.get(b"c") is None and store.get(b"d") is None
        assert [kv.value for kv in store.range(b"a", b"z").kvs] == [b"1", b"2", b"5"]
        assert store.revision == rev + 1


def test_full_disk_in_the_middle_of_a_group_commit_refuses_the_whole_batch(tmp_path, monkeypatch):
    disk = _FullDisk(wal._write_all)
    monkeypatch.setattr(wal, "_write_all", disk)
    path = str(tmp_path / "data")
    store = mvcckv.open(path)
    try:
        store.put(b"a", b"1")
        disk.full = True
        futures = [store.propose(mvcckv.store.KIND_PUT, pb.PutRequest(key=b"k%d" % i, value=b"v")) for i in range(20)]
        for f in futures:
            with pytest.raises(errors.NoSpaceError):
                f.result(10)
        disk.full = False
        assert store.revision == 2
    finally:
        store.close()
    with mvcckv.open(path) as store:
        assert store.revision == 2
        assert store.range(b"k", b"l").count == 0


@pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC])
def test_failed_wal_fsync_stops_the_store_and_loses_nothing_acknowledged(tmp_path, monkeypatch, code):
    """EIO, or even ENOSPC, from fdatasync: unlike a failed write, a failed
    sync leaves the page cache unknowable, so the store stops."""
    path = str(tmp_path / "data")
    store = mvcckv.open(path)
    failing = {"on": False}
    real = wal._fdatasync

    def fdatasync(fd):
        if failing["on"]:
            raise OSError(code, os.strerror(code))
        real(fd)

    monkeypatch.setattr(wal, "_fdatasync", fdatasync)
    try:
        acked = [store.put(b"k%d" % i, b"v%d" % i).header.revision for i in range(50)]
        failing["on"] = True
        with pytest.raises(errors.StoppedError):
            store.put(b"lost", b"x")
        failing["on"] = False  # a retry would "succeed": it must not be tried
        with pytest.raises(errors.StoppedError):
            store.put(b"after", b"y")
    finally:
        store.close()
    with mvcckv.open(path) as store:
        assert store.revision >= acked[-1]
        assert store.get(b"k49").value == b"v49"
        assert store.get(b"after") is None


class _FailingSync:
    """An LMDB environment whose sync fails, as fsync does on a bad disk."""

    def __init__(self, env):
        self._env = env

    def sync(self, force=False):
        raise lmdb.Error("mdb_env_sync: Input/output error")

    def __getattr__(self, name):
        return getattr(self._env, name)


def test_eio_on_backend_fsync_stops_the_store_and_keeps_the_wal(tmp_path):
    path = str(tmp_path / "data")
    store = mvcckv.open(path, wal_segment_bytes=4096, checkpoint_interval=3600)
    try:
        for i in range(200):
            store.put(b"k%03d" % i, b"v" * 100)
        segments = sorted(os.listdir(os.path.join(path, "wal")))
        real_env = store._backend.env
        store._backend.env = _FailingSync(real_env)
        with pytest.raises(lmdb.Error):
            store.checkpoint()
        with pytest.raises(errors.StoppedError):
            store.put(b"after", b"x")
        store._backend.env = real_env
    finally:
        store.close()
    # Nothing was released after the failure: the WAL still covers every
    # write since the last good checkpoint.
    assert sorted(os.listdir(os.path.join(path, "wal")))[: len(segments)] == segments
    with mvcckv.open(path) as store:
        assert store.get(b"k199").value == b"v" * 100
        assert store.get(b"after") is None
        assert store.revision == 201

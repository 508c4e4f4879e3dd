"""Tests of the write-ahead log: framing, numbering, recovery, release, crashes."""

from __future__ import annotations

import doctest
import inspect
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mvcckv.wal
from mvcckv.errors import StorageError, WALCorruptError
from mvcckv.wal import HEADER_BYTES, WAL

REPO = Path(__file__).resolve().parent.parent


def _payload(i):
    return {"i": i, "key": f"key-{i}".encode(), "pad": b"p" * (i % 41)}


def _write(d, n, *, segment_bytes=64 * 1024 * 1024, batch=1, first_index=1):
    """A log of records first_index..first_index+n-1, synced every ``batch`` records."""
    wal = WAL.open(d, first_index=first_index, segment_bytes=segment_bytes)
    for k in range(n):
        i = first_index + k
        assert wal.append(i % 5, _payload(i)) == i
        if (k + 1) % batch == 0:
            wal.sync()
    wal.close()


def _segments(d):
    return sorted(p for p in Path(d).iterdir() if p.suffix == ".wal")


def _offsets(path):
    """Start offsets of the records of one segment file, plus its end."""
    return _offsets_of(Path(path).read_bytes())


def _offsets_of(data):
    offs = [0]
    while offs[-1] < len(data):
        offs.append(offs[-1] + HEADER_BYTES + int.from_bytes(data[offs[-1] : offs[-1] + 4], "little"))
    return offs


def _snapshot(d):
    return {p.name: p.read_bytes() for p in Path(d).iterdir()}


def _replayed(d, after=0, **kw):
    with WAL.open(d, **kw) as wal:
        return list(wal.replay(after)), wal.last_index


def _check(records, indexes):
    assert [i for i, _, _ in records] == list(indexes)
    for i, rtype, payload in records:
        assert (rtype, payload) == (i % 5, _payload(i))


# --- numbering and round trips -------------------------------------------


def test_round_trip_across_segment_rotation(tmp_path):
    shapes = [None, True, -7, 2**63, 1.5, "text", b"\x00bytes", [1, [2, b"3"]], {"k": {1: b"v"}}, b"x" * 5000]
    wal = WAL.open(tmp_path, segment_bytes=512)
    rng = random.Random(1)
    expected = []
    for i in range(1, 301):
        payload = shapes[i % len(shapes)]
        assert wal.append(i % 256, payload) == i
        expected.append((i, i % 256, payload))
        if rng.random() < 0.3:
            wal.sync()
    wal.close()
    segs = _segments(tmp_path)
    assert len(segs) > 10
    with WAL.open(tmp_path, segment_bytes=512) as wal:
        assert list(wal.replay(0)) == expected
    # Each file is named, in hex, by the index of its first record.
    assert [int(p.stem, 16) for p in segs] == [int.from_bytes(p.read_bytes()[8:16], "little") for p in segs]


def test_reopen_continues_numbering(tmp_path):
    _write(tmp_path, 5)
    with WAL.open(tmp_path, first_index=1) as wal:  # first_index only applies to a new log
        assert wal.last_index == 5
        assert wal.append(0, "six") == 6
    records, last = _replayed(tmp_path)
    assert last == 6 and [i for i, _, _ in records] == [1, 2, 3, 4, 5, 6]


def test_first_index_is_honoured_for_a_new_log(tmp_path):
    with WAL.open(tmp_path, first_index=1000) as wal:
        assert wal.last_index == 999
        assert list(wal.replay(999)) == []
    # Its segment file now holds the numbering, even without records, so a
    # caller that disagrees is caught by replay instead of reusing indexes.
    with WAL.open(tmp_path, first_index=5) as wal:
        assert wal.last_index == 999
        with pytest.raises(WALCorruptError, match=r"records 5\.\.999 are missing"):
            wal.replay(4)
        assert wal.append(1, "x") == 1000
    assert [p.name for p in _segments(tmp_path)] == ["00000000000003e8.wal"]
    with WAL.open(tmp_path) as wal:
        assert list(wal.replay(999)) == [(1000, 1, "x")]
        with pytest.raises(WALCorruptError, match=r"999\.\.999 are missing"):
            wal.replay(998)


@pytest.mark.parametrize(
    "after, expected",
    [(0, range(1, 41)), (1, range(2, 41)), (17, range(18, 41)), (39, [40]), (40, [])],
)
def test_replay_after_skips(tmp_path, after, expected):
    _write(tmp_path, 40, segment_bytes=300, batch=3)
    records, _ = _replayed(tmp_path, after)
    _check(records, expected)


def test_replay_after_beyond_the_end_raises(tmp_path):
    _write(tmp_path, 10)
    with WAL.open(tmp_path) as wal, pytest.raises(WALCorruptError, match=r"records 11\.\.12 are missing"):
        wal.replay(12)


def test_replay_includes_appended_but_unsynced_records(tmp_path):
    with WAL.open(tmp_path) as wal:
        wal.append(1, "a")
        assert list(wal.replay(0)) == [(1, 1, "a")]


def test_append_rejects_bad_input_without_consuming_an_index(tmp_path):
    with WAL.open(tmp_path) as wal:
        with pytest.raises(ValueError):
            wal.append(256, "x")
        with pytest.raises(TypeError):
            wal.append(1, object())
        assert wal.append(1, "ok") == 1
        # The encoder kept nothing of the rejected payload.
        assert list(wal.replay(0)) == [(1, 1, "ok")]


# --- group commit ----------------------------------------------------------


def test_one_fdatasync_per_sync_and_nothing_on_disk_before_it(tmp_path, monkeypatch):
    calls = []
    real = mvcckv.wal._fdatasync
    monkeypatch.setattr(mvcckv.wal, "_fdatasync", lambda fd: (calls.append(fd), real(fd)))
    with WAL.open(tmp_path) as wal:
        (seg,) = _segments(tmp_path)
        for i in range(64):
            wal.append(1, _payload(i))
        assert seg.stat().st_size == 0
        wal.sync()
        assert len(calls) == 1 and seg.stat().st_size > 0
        wal.sync()  # nothing new: no fdatasync
        assert len(calls) == 1


def test_a_huge_batch_is_handed_to_the_kernel_before_sync(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(mvcckv.wal, "_fdatasync", calls.append)
    with WAL.open(tmp_path) as wal:
        (seg,) = _segments(tmp_path)
        for _ in range(5):
            wal.append(1, b"m" * 1024 * 1024)
        assert seg.stat().st_size >= 4 * 1024 * 1024 and calls == []
    assert len(calls) == 1
    assert [i for i, _, _ in _replayed(tmp_path)[0]] == [1, 2, 3, 4, 5]


def test_without_fsync_sync_still_writes_and_rotates(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(mvcckv.wal, "_fdatasync", calls.append)
    with WAL.open(tmp_path, segment_bytes=200, fsync=False) as wal:
        for i in range(1, 31):
            wal.append(i % 5, _payload(i))
            wal.sync()
        # What a killed process leaves behind: everything synced is in the files.
        assert len(_segments(tmp_path)) > 3
        assert sum(len(_offsets(p)) - 1 for p in _segments(tmp_path)) == 30
    assert calls == []
    _check(_replayed(tmp_path)[0], range(1, 31))


def test_close_syncs_what_was_appended(tmp_path):
    wal = WAL.open(tmp_path)
    wal.append(2, b"tail")
    wal.close()
    wal.close()
    assert _replayed(tmp_path)[0] == [(1, 2, b"tail")]


def test_failed_fdatasync_makes_the_log_unusable(tmp_path, monkeypatch):
    wal = WAL.open(tmp_path)
    wal.append(1, "x")

    def fail(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(mvcckv.wal, "_fdatasync", fail)
    with pytest.raises(StorageError, match="Input/output error"):
        wal.sync()
    # A retried fsync can report success for pages the kernel already dropped.
    with pytest.raises(StorageError):
        wal.append(1, "y")
    with pytest.raises(StorageError):
        wal.sync()
    wal.close()


def test_second_writer_is_refused(tmp_path):
    with WAL.open(tmp_path):
        with pytest.raises(StorageError, match="already open"):
            WAL.open(tmp_path)
    WAL.open(tmp_path).close()


# --- recovery ----------------------------------------------------------------


def test_torn_tail_at_every_byte_of_the_last_record(tmp_path, caplog):
    _write(tmp_path, 5)
    (seg,) = _segments(tmp_path)
    original = seg.read_bytes()
    start = _offsets(seg)[-2]
    caplog.set_level(logging.WARNING, logger="mvcckv.wal")
    for size in range(start, len(original)):
        seg.write_bytes(original[:size])
        caplog.clear()
        with WAL.open(tmp_path) as wal:
            assert wal.last_index == 4
            _check(list(wal.replay(0)), range(1, 5))
            assert wal.append(0, _payload(5)) == 5
        if size > start:
            assert f"{seg}: torn tail at offset {start}" in caplog.text
        records, _ = _replayed(tmp_path)
        _check(records, range(1, 6))
        assert seg.read_bytes() == original


def test_flipped_byte_in_a_middle_record_is_corruption(tmp_path):
    _write(tmp_path, 5)
    (seg,) = _segments(tmp_path)
    original = seg.read_bytes()
    offs = _offsets(seg)
    for pos in range(offs[2], offs[3]):  # every byte of record 3
        damaged = bytearray(original)
        damaged[pos] ^= 0xFF
        seg.write_bytes(damaged)
        before = _snapshot(tmp_path)
        with pytest.raises(WALCorruptError) as err:
            WAL.open(tmp_path)
        assert f"{seg} is corrupt at offset {offs[2]}" in str(err.value)
        assert _snapshot(tmp_path) == before


def test_flipped_byte_in_the_final_record_is_a_torn_tail(tmp_path, caplog):
    _write(tmp_path, 5)
    (seg,) = _segments(tmp_path)
    original = seg.read_bytes()
    start = _offsets(seg)[-2]
    caplog.set_level(logging.WARNING, logger="mvcckv.wal")
    for pos in range(start, len(original)):
        damaged = bytearray(original)
        damaged[pos] ^= 0xFF
        seg.write_bytes(damaged)
        caplog.clear()
        with WAL.open(tmp_path) as wal:
            assert wal.last_index == 4
            assert wal.append(0, "again") == 5
        assert f"torn tail at offset {start}" in caplog.text
        assert _replayed(tmp_path)[0][-1] == (5, 0, "again")


def _zero_record(data, offs, k):
    return data[: offs[k]] + bytes(offs[k + 1] - offs[k]) + data[offs[k + 1] :]


def _set_length(data, offs, k, length):
    return data[: offs[k]] + length.to_bytes(4, "little") + data[offs[k] + 4 :]


# (name, damage(data, record offsets) -> data, records kept or None for WALCorruptError)
DAMAGE = [
    ("clean", lambda d, o: d, 5),
    ("zeros after the last record", lambda d, o: d + bytes(8192), 5),
    ("random bytes after the last record", lambda d, o: d + random.Random(3).randbytes(300), 5),
    ("half a record then zeros", lambda d, o: d[: o[4] + 9] + bytes(4096), 4),
    ("last record zeroed", lambda d, o: _zero_record(d, o, 4), 4),
    ("last record length absurd", lambda d, o: _set_length(d, o, 4, 0xFFFFFFFF), 4),
    ("last record length zero", lambda d, o: _set_length(d, o, 4, 0), 4),
    ("middle record length absurd", lambda d, o: _set_length(d, o, 2, 0xFFFFFFFF), None),
    ("middle record zeroed", lambda d, o: _zero_record(d, o, 2), None),
    ("middle record removed", lambda d, o: d[: o[2]] + d[o[3] :], None),
    ("last record duplicated", lambda d, o: d + d[o[4] :], None),
    ("zeros between valid records", lambda d, o: d[: o[3]] + bytes(512) + d[o[3] :], None),
    ("three stray bytes between valid records", lambda d, o: d[: o[3]] + b"\x07\x00\x00" + d[o[3] :], None),
]


@pytest.mark.parametrize("name, damage, kept", DAMAGE, ids=[c[0] for c in DAMAGE])
def test_damage_table(tmp_path, name, damage, kept):
    _write(tmp_path, 5)
    (seg,) = _segments(tmp_path)
    original = seg.read_bytes()
    offs = _offsets(seg)
    seg.write_bytes(damage(original, offs))
    if kept is None:
        before = _snapshot(tmp_path)
        with pytest.raises(WALCorruptError, match=f"{seg} is corrupt at offset"):
            WAL.open(tmp_path)
        assert _snapshot(tmp_path) == before
    else:
        records, _ = _replayed(tmp_path)
        _check(records, range(1, kept + 1))
        assert seg.read_bytes() == original[: offs[kept]]


@pytest.mark.parametrize("gap", [1, 3, 4, 17, 400])
@pytest.mark.parametrize("payload_bytes", [1, 254, 65533, 2**24 - 5])  # packed: 3, 2**8, 2**16, 2**24 bytes
def test_a_valid_record_after_zeros_is_found_whatever_its_length(tmp_path, gap, payload_bytes):
    """The search for a following record must see headers whose first bytes
    are zero.  (Every gap here ends before the first sector boundary, so it
    is not torn writeback: see the next tests.)"""
    with WAL.open(tmp_path) as wal:
        wal.append(1, b"a")
        wal.append(1, b"b")
        wal.append(1, b"x" * payload_bytes)
    (seg,) = _segments(tmp_path)
    data = seg.read_bytes()
    offs = _offsets_of(data)
    seg.write_bytes(data[: offs[1]] + bytes(gap) + data[offs[2] :])
    with pytest.raises(WALCorruptError, match=rf"offset {offs[1]}: .*, and a valid record follows at offset {offs[1] + gap}$"):
        WAL.open(tmp_path)


def test_a_page_lost_to_torn_writeback_is_a_torn_tail(tmp_path, caplog):
    """A power cut kept a later page of the unsynced tail but not an earlier
    one: the earlier page reads as zeros.  Nothing from it on was synced, so
    the log is cut before it (etcd's zero-sector rule), not refused."""
    with WAL.open(tmp_path) as wal:
        for i in range(200):
            wal.append(1, b"r%03d" % i + b"x" * 60)
    (seg,) = _segments(tmp_path)
    data = bytearray(seg.read_bytes())
    offs = _offsets_of(bytes(data))
    data[4096:8192] = bytes(4096)  # page 1 never written back; page 2 was
    seg.write_bytes(bytes(data))
    kept = sum(1 for end in offs[1:] if end <= 4096)  # records wholly before the lost page
    records, last = _replayed(tmp_path)
    assert last == kept
    assert [(i, p) for i, _, p in records] == [(i + 1, b"r%03d" % i + b"x" * 60) for i in range(kept)]
    assert "torn writeback" in caplog.text
    # Garbage instead of zeros is not what writeback leaves: refused.
    with WAL.open(tmp_path) as wal:
        for i in range(200):
            wal.append(1, b"s%03d" % i + b"y" * 60)
    (seg,) = _segments(tmp_path)
    data = bytearray(seg.read_bytes())
    data[4096:8192] = random.Random(1).randbytes(4096)
    seg.write_bytes(bytes(data))
    with pytest.raises(WALCorruptError, match="a valid record follows"):
        WAL.open(tmp_path)


@pytest.mark.parametrize("start_in_sector", [4, 300, 500])
def test_zeros_from_a_record_to_the_sector_boundary_are_torn_writeback(tmp_path, caplog, start_in_sector):
    """The page holding a record's start was written back before the record
    was appended (so it reads as zeros from there to its end), the next page
    after it.  The zeros run from the record's start to the sector boundary
    only, less than a whole sector: still a tear, cut with a warning."""
    with WAL.open(tmp_path) as wal:
        first = b"x" * (4096 + start_in_sector - HEADER_BYTES - 3)  # 3: msgpack's bin16 header
        wal.append(1, first)  # so record 2 starts at 4096 + start_in_sector
        wal.append(1, b"y" * 600)  # record 2 crosses the sector boundary at 4608
        wal.append(1, b"z" * 40)
    (seg,) = _segments(tmp_path)
    data = bytearray(seg.read_bytes())
    offs = _offsets_of(bytes(data))
    assert offs[1] == 4096 + start_in_sector
    data[offs[1] : 4608] = bytes(4608 - offs[1])
    seg.write_bytes(bytes(data))
    caplog.set_level(logging.WARNING, logger="mvcckv.wal")
    records, last = _replayed(tmp_path)
    assert last == 1 and [p for _, _, p in records] == [first]
    assert "torn writeback" in caplog.text
    assert seg.stat().st_size == offs[1]


def test_zeros_inside_a_record_that_stop_short_of_a_boundary_are_corruption(tmp_path):
    """Zeros that a valid record follows within the same sector are not
    what a lost sector leaves (it reads as zeros up to its end): refused."""
    with WAL.open(tmp_path) as wal:
        wal.append(1, b"a" * 20)
        wal.append(1, b"b" * 100)
        wal.append(1, b"c" * 20)
    (seg,) = _segments(tmp_path)
    data = bytearray(seg.read_bytes())
    offs = _offsets_of(bytes(data))
    data[offs[1] : offs[2]] = bytes(offs[2] - offs[1])
    seg.write_bytes(bytes(data))
    before = _snapshot(tmp_path)
    with pytest.raises(WALCorruptError, match=f"offset {offs[1]}: zero length, and a valid record follows at offset {offs[2]}"):
        WAL.open(tmp_path)
    assert _snapshot(tmp_path) == before


def test_zeros_before_the_expected_record_are_corruption_even_up_to_a_boundary(tmp_path):
    """Zeros up to a sector boundary followed by the very record expected at
    their start: bytes were inserted, not lost (an appending writer put that
    record where the zeros begin), so the log is refused."""
    with WAL.open(tmp_path) as wal:
        wal.append(1, b"a" * 20)
        wal.append(1, b"b" * 20)
    (seg,) = _segments(tmp_path)
    data = seg.read_bytes()
    offs = _offsets_of(data)
    seg.write_bytes(data[: offs[1]] + bytes(600) + data[offs[1] :])
    with pytest.raises(WALCorruptError, match="a valid record follows"):
        WAL.open(tmp_path)


def test_bad_record_in_a_non_last_segment_is_corruption(tmp_path):
    _write(tmp_path, 30, segment_bytes=200)
    first, second = _segments(tmp_path)[:2]
    original = first.read_bytes()
    for damaged in (original[:-1], original[:-1] + b"\x00", original + bytes(100)):
        first.write_bytes(damaged)
        with pytest.raises(WALCorruptError, match=f"{first} is corrupt at offset"):
            WAL.open(tmp_path)
    first.write_bytes(original)
    _check(_replayed(tmp_path)[0], range(1, 31))


def test_empty_segment_left_by_an_interrupted_rotation(tmp_path):
    _write(tmp_path, 10)
    Path(tmp_path, "000000000000000b.wal").touch()  # created, crash before its first record
    with WAL.open(tmp_path) as wal:
        assert wal.last_index == 10
        assert wal.append(11 % 5, _payload(11)) == 11
    _check(_replayed(tmp_path)[0], range(1, 12))
    assert len(_segments(tmp_path)) == 2
    # Only the last segment may be empty: we never rotate away from one.
    Path(tmp_path, "000000000000000b.wal").write_bytes(b"")
    Path(tmp_path, "000000000000000c.wal").touch()
    with pytest.raises(WALCorruptError, match="000000000000000b.wal is corrupt at offset 0: empty, but not the last"):
        WAL.open(tmp_path)


def test_missing_middle_segment_is_corruption(tmp_path):
    _write(tmp_path, 30, segment_bytes=200)
    segs = _segments(tmp_path)
    assert len(segs) >= 3
    segs[1].unlink()
    with pytest.raises(WALCorruptError, match=f"segment missing before {segs[2]}"):
        WAL.open(tmp_path)


def test_missing_first_segments_are_found_by_replay(tmp_path):
    _write(tmp_path, 30, segment_bytes=200)
    segs = _segments(tmp_path)
    segs[0].unlink()
    start = int(segs[1].stem, 16)
    with WAL.open(tmp_path) as wal:
        with pytest.raises(WALCorruptError, match=rf"records 1\.\.{start - 1} are missing"):
            wal.replay(0)
        _check(list(wal.replay(start - 1)), range(start, 31))


# --- release -----------------------------------------------------------------


def test_release_deletes_only_fully_covered_segments(tmp_path):
    _write(tmp_path, 60, segment_bytes=200, batch=2)
    segs = _segments(tmp_path)
    firsts = [int(p.stem, 16) for p in segs]
    assert len(segs) >= 5
    with WAL.open(tmp_path, segment_bytes=200) as wal:
        upto = firsts[3] - 2  # inside the third segment
        assert wal.release(upto) == 2
        assert _segments(tmp_path) == segs[2:]
        _check(list(wal.replay(upto)), range(upto + 1, 61))
        _check(list(wal.replay(firsts[2] - 1)), range(firsts[2], 61))
        with pytest.raises(WALCorruptError):
            wal.replay(firsts[2] - 2)
        assert wal.release(upto) == 0
        # The active segment stays, however far the checkpoint is.
        assert wal.release(10**9) == len(segs) - 3
        assert _segments(tmp_path) == segs[-1:]
        assert wal.append(0, "next") == 61
    records, last = _replayed(tmp_path, firsts[-1] - 1)
    assert last == 61 and records[-1] == (61, 0, "next")


def test_doctest_examples():
    assert doctest.testmod(mvcckv.wal).failed == 0


# --- arbitrary damage ----------------------------------------------------------


@pytest.fixture(scope="module")
def two_segments():
    with tempfile.TemporaryDirectory() as d:
        _write(d, 12, segment_bytes=250, batch=3)
        segs = _segments(d)
        assert len(segs) == 2
        yield [(p.name, p.read_bytes()) for p in segs]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damage_never_yields_wrong_records(two_segments, data):
    """Damage anywhere: the log opens with exactly the records before it, or refuses."""
    (name0, seg0), (name1, seg1) = two_segments
    files = {name0: bytearray(seg0), name1: bytearray(seg1)}
    name = data.draw(st.sampled_from([name0, name1]))
    offs = _offsets_of(bytes(files[name]))
    kind = data.draw(st.sampled_from(["flip", "truncate", "append"]))
    if kind == "flip":
        pos = data.draw(st.integers(0, len(files[name]) - 1))
        files[name][pos] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        pos = data.draw(st.integers(0, len(files[name]) - 1))
        del files[name][pos:]
    else:
        pos = len(files[name])
        files[name] += data.draw(st.binary(min_size=1, max_size=200))
    first1 = int(name1[:16], 16)
    # Records of the damaged segment wholly before the damage.
    kept = next((k for k in range(len(offs) - 1) if offs[k] <= pos < offs[k + 1]), len(offs) - 1)
    if name == name0:
        expected = None  # any damage to a non-last segment
    elif kind == "flip" and kept < len(offs) - 2:
        expected = None  # a valid record follows the damaged one
    else:
        expected = first1 - 1 + kept
    with tempfile.TemporaryDirectory() as d:
        for n, b in files.items():
            Path(d, n).write_bytes(b)
        if expected is None:
            with pytest.raises(WALCorruptError):
                WAL.open(d)
        else:
            records, last = _replayed(d)
            assert last == expected
            _check(records, range(1, expected + 1))


# --- crashes -----------------------------------------------------------------

_CHILD = (
    inspect.getsource(_payload)
    + """
import random, sys
from mvcckv.wal import WAL

d, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
wal = WAL.open(d, segment_bytes=2048)
while True:
    for _ in range(rng.randint(1, 20)):
        i = wal.last_index + 1
        assert wal.append(i % 5, _payload(i)) == i
    wal.sync()
    print("synced", wal.last_index, flush=True)
    if rng.random() < 0.05:
        # As the store does: the checkpoint is durable before the release.
        upto = wal.last_index - rng.randint(0, 100)
        print("releasing", upto, flush=True)
        wal.release(upto)
"""
)


def test_sigkill_loses_no_synced_record(tmp_path):
    rng = random.Random(20240601)
    d = tmp_path / "wal"
    acked = released = 0
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for round_ in range(10):
        out = tmp_path / f"out{round_}"
        with open(out, "w") as stdout, open(tmp_path / f"err{round_}", "w") as stderr:
            child = subprocess.Popen(
                [sys.executable, "-c", _CHILD, str(d), str(round_)], stdout=stdout, stderr=stderr, env=env
            )
            # Kill at a random moment after the child is writing: on a loaded
            # machine its start-up alone can outlast the whole random delay.
            deadline = time.monotonic() + 30
            while not out.stat().st_size and child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.5))
            child.send_signal(signal.SIGKILL)
            child.wait()
        assert child.returncode == -signal.SIGKILL, (tmp_path / f"err{round_}").read_text()
        for line in out.read_text().splitlines(keepends=True):
            if line.endswith("\n"):
                what, index = line.split()
                if what == "synced":
                    acked = max(acked, int(index))
                else:
                    released = max(released, int(index))
        if not d.exists():
            continue  # killed before it created anything
        with WAL.open(d, segment_bytes=2048) as wal:
            assert wal.last_index >= acked
            records = list(wal.replay(max(released, 0)))
            _check(records, range(max(released, 0) + 1, wal.last_index + 1))
    assert acked > 0


def test_release_keeps_the_newest_releasable_segments(tmp_path):
    with WAL.open(tmp_path / "w", segment_bytes=64) as wal:
        for i in range(40):
            wal.append(1, {"i": i, "pad": b"x" * 40})
            wal.sync()
        before = sorted(os.listdir(tmp_path / "w"))
        assert len(before) > 10
        assert wal.release(wal.last_index, keep=3) == len(before) - 1 - 3
        assert sorted(os.listdir(tmp_path / "w")) == before[-4:]
        assert wal.release(wal.last_index, keep=3) == 0
        with pytest.raises(ValueError):
            wal.release(wal.last_index, keep=-1)
        assert wal.release(wal.last_index) == 3
        assert sorted(os.listdir(tmp_path / "w")) == before[-1:]

r"""The write-ahead log: requests made durable before they are applied.

The MVCC store's single writer appends a batch of requests, calls
:meth:`WAL.sync` once (group commit: one ``fdatasync`` for the whole batch),
and only then applies them.  Every record carries an *index*, 1, 2, 3, ...
with no gaps.  The backend stores the index of the last request it applied
atomically with the data (the consistent index); on open the store replays
every record after it.  Records are requests, not results, so replaying
them reproduces the same revisions.

Record framing
==============

All integers are little-endian.  A record is a 17-byte header followed by
the payload::

    0        4        8                16   17                17+length
    +--------+--------+-----------------+----+--------------------+
    | length |  crc   |      index      |type|      payload       |
    |  u32   |  u32   |       u64       | u8 |  msgpack, length B |
    +--------+--------+-----------------+----+--------------------+
                      \________________ CRC-32C ________________/

``crc`` is CRC-32C over ``index``, ``type`` and ``payload`` (bytes 8 to the
end).  ``length`` is not covered directly, but a wrong length selects a
different byte range, which fails the CRC.  A payload is
``msgpack.packb(obj, use_bin_type=True)`` and comes back through
``msgpack.unpackb(raw=False)``: ``bytes`` and ``str`` stay distinct, tuples
come back as lists.  A valid payload is never empty (msgpack has no
zero-byte encoding), so ``length == 0`` marks the start of zero-filled
space, and a length over :data:`MAX_PAYLOAD_BYTES` (256 MiB) is corruption,
never an allocation.

Segments
========

The log is a directory of segment files, each named by the index of its
first record in 16 hex digits so that names sort in index order::

    0000000000000001.wal   records 1 .. 4180
    0000000000001055.wal   records 4181 .. 8372
    00000000000020b5.wal   records 8373 .. (active: appends go here)

The active segment is the last one.  A sync that leaves it at or above
``segment_bytes`` starts the next one (so a segment overshoots the limit by
at most one batch).  The next file is created only after the previous one
has been ``fdatasync``-ed, so a non-last segment is always complete on disk;
creating and deleting files is followed by an ``fsync`` of the directory.
:meth:`WAL.release` deletes segments whose records the backend has
checkpointed, oldest first, so a crash in the middle of a release leaves a
contiguous suffix, never a hole.

Recovery: torn tail versus corruption
=====================================

A crash can leave the end of the last segment short (a record cut anywhere
in its 17 + length bytes), garbled (bytes of a write that never completed),
or followed by zeros (space the filesystem allocated but never wrote).  All
of those are data that was never acknowledged: :meth:`WAL.sync` had not
returned for it.  So on open, the *first bad record of the last segment*
is cut off, together with everything after it, if and only if no valid
record follows it.  Worked example, with records 7, 8, 9 in the last
segment (``[n]`` valid record ``n``, ``##`` bad bytes, ``00`` zeros)::

    [7][8][9]            clean
    [7][8][9]##          torn tail: cut after 9, log a warning
    [7][8][9]000000      zero-filled tail: cut after 9, log a warning
    [7][8]##             record 9 torn or garbled: cut after 8
    [7]##[9]             record 8 bad, 9 valid after it: WALCorruptError;
                         the log cannot know that 9 was not
                         acknowledged, so it refuses rather than drop it
    [7]0000[9]           the same, unless the zeros run from where 8
                         starts, or from a sector boundary inside it, to
                         the next 512-byte sector boundary: then a sector
                         of 8 never reached the disk while a later one (9)
                         did -- torn writeback of data never synced, since
                         the sync that would have acknowledged 9 covers
                         8's sector too: cut after 7, log a warning

A valid record after a bad one is found by testing every byte offset after
the bad record (so a corrupted ``length`` field cannot hide its successors),
accepting only a header whose CRC matches and whose index lies in the range
the remaining bytes could hold.  A bad record anywhere in a non-last segment,
a segment whose first record does not match its name, or a gap in the index
sequence between segments is :class:`~mvcckv.errors.WALCorruptError`, whose
message names the file and the byte offset.  Corruption is never repaired
automatically: the files are left exactly as they were found.

A segment older than the checkpoint may have been released, so the first
segment may start later than 1.  Whether that loses anything depends on
where the caller resumes, so the check belongs to :meth:`WAL.replay`, which
raises when a record after ``after`` is missing.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import crc32c as _crc32c_mod
import msgpack

from mvcckv.errors import StorageError, WALCorruptError, WALNoSpaceError

__all__ = ["WAL", "HEADER_BYTES", "MAX_PAYLOAD_BYTES", "SEGMENT_SUFFIX"]

logger = logging.getLogger("mvcckv.wal")

HEADER_BYTES = 17
MAX_PAYLOAD_BYTES = 256 * 1024 * 1024
SEGMENT_SUFFIX = ".wal"

_HEADER = struct.Struct("<IIQB")
_LENGTH_CRC = struct.Struct("<II")
_INDEX_TYPE = struct.Struct("<QB")
_CRC_START = _LENGTH_CRC.size
assert _HEADER.size == HEADER_BYTES

_SECTOR = 512
_SEGMENT_NAME = re.compile(r"^([0-9a-f]{16})\.wal$")
_NON_ZERO = re.compile(rb"[^\x00]")

# Above this many buffered bytes, append() hands them to the kernel (no
# fsync) so that a caller who appends a huge batch does not hold it all in
# Python memory; durability is still decided by sync() alone.
_WRITE_THROUGH_BYTES = 4 * 1024 * 1024

_crc32c = _crc32c_mod.crc32c
# fdatasync is enough: it flushes the data and the file size that reading
# the data back depends on.  Platforms without it (macOS) fall back to fsync.
_fdatasync = getattr(os, "fdatasync", os.fsync)


def _segment_name(first_index: int) -> str:
    return f"{first_index:016x}{SEGMENT_SUFFIX}"


@dataclass(slots=True)
class _Segment:
    """One segment file as far as this process has written it."""

    path: str
    first: int  # the index in its name
    last: int  # index of its last record; first - 1 while empty
    size: int  # bytes of whole records in it


class _BadRecord(Exception):
    """Internal: the record at ``offset`` failed its checks for ``reason``."""

    def __init__(self, offset: int, reason: str):
        super().__init__(reason)
        self.offset = offset
        self.reason = reason


def _check_record(data: bytes, mv: memoryview, pos: int) -> tuple[int, int, int]:
    """Validate the record at ``pos``; return ``(end, index, rtype)``.

    Raises :class:`_BadRecord` when the record is incomplete, has an
    impossible length, or fails its CRC.
    """
    left = len(data) - pos
    if left < HEADER_BYTES:
        raise _BadRecord(pos, f"incomplete header ({left} of {HEADER_BYTES} bytes)")
    length, crc, index, rtype = _HEADER.unpack_from(data, pos)
    if length == 0:
        raise _BadRecord(pos, "zero length")
    if length > MAX_PAYLOAD_BYTES:
        raise _BadRecord(pos, f"length {length} exceeds {MAX_PAYLOAD_BYTES}")
    end = pos + HEADER_BYTES + length
    if end > len(data):
        raise _BadRecord(pos, f"incomplete record ({left} of {HEADER_BYTES + length} bytes)")
    if _crc32c(mv[pos + _CRC_START : end]) != crc:
        raise _BadRecord(pos, "CRC mismatch")
    return end, index, rtype


def _find_valid_record(data: bytes, mv: memoryview, start: int, last_good: int) -> int | None:
    """Offset of the first valid record at or after ``start``, or None.

    A record after ``last_good`` can only have an index in
    ``last_good + 1 .. last_good + k`` where ``k`` is how many of the
    smallest possible records fit in the remaining bytes; requiring that,
    a random or stale header practically never reaches the CRC test.  Runs
    of zeros are skipped in C: a header starts with a non-zero length, so a
    record begins at most three bytes before a non-zero byte.

    O(remaining bytes) Python steps in the worst case, which only a bad
    record in the last segment pays, once, on open.
    """
    n = len(data)
    highest = last_good + (n - start) // (HEADER_BYTES + 1) + 1
    pos = start
    while pos <= n - HEADER_BYTES - 1:
        m = _NON_ZERO.search(data, pos)
        if m is None:
            return None
        pos = max(pos, m.start() - 3)
        if pos > n - HEADER_BYTES - 1:
            return None
        length, crc, index, _ = _HEADER.unpack_from(data, pos)
        if (
            last_good < index <= highest
            and 0 < length <= MAX_PAYLOAD_BYTES
            and pos + HEADER_BYTES + length <= n
            and _crc32c(mv[pos + _CRC_START : pos + HEADER_BYTES + length]) == crc
        ):
            return pos
        pos += 1
    return None


def _scan_segment(path: str, first: int, is_last: bool) -> tuple[int, int, int]:
    """Check every record of one segment file.

    Returns ``(last_index, valid_bytes, file_bytes)``; ``valid_bytes <
    file_bytes`` only for a torn tail of the last segment, which the caller
    cuts.  Raises :class:`WALCorruptError` for anything else that is wrong.
    """
    with open(path, "rb") as f:
        data = f.read()
    mv = memoryview(data)
    pos = 0
    expect = first
    try:
        while pos < len(data):
            end, index, _ = _check_record(data, mv, pos)
            if index != expect:
                # A record that passes its CRC was written whole: a wrong
                # index is a bug or a misplaced file, never a torn write.
                raise WALCorruptError(
                    f"WAL segment {path} is corrupt at offset {pos}: "
                    f"record has index {index}, expected {expect}"
                )
            pos = end
            expect += 1
    except _BadRecord as bad:
        where = f"WAL segment {path} is corrupt at offset {bad.offset}: {bad.reason}"
        if not is_last:
            raise WALCorruptError(f"{where} (not the last segment, so not a torn tail)") from None
        following = _find_valid_record(data, mv, bad.offset + 1, expect - 1)
        if following is not None:
            later = _HEADER.unpack_from(data, following)[2] > expect
            if not _torn_writeback(data, bad.offset, following, later):
                raise WALCorruptError(
                    f"{where}, and a valid record follows at offset {following}"
                ) from None
            logger.warning(
                "%s: zeros up to a sector boundary before the valid record at offset %d: torn writeback "
                "of records never synced; cutting from offset %d", where, following, bad.offset,
            )
    return expect - 1, pos, len(data)


def _torn_writeback(data: bytes, start: int, end: int, later: bool) -> bool:
    """Whether the bad bytes ``data[start:end]`` before a valid record are
    what torn writeback leaves: a sector of unsynced data that never
    reached the disk while a later one did.

    A sector the disk never got holds what it held before: zeros past the
    old end of the file, up to the sector's end.  So the bad span is cut
    into pieces at sector boundaries, the first starting at the bad
    record (``start``), and the tear is recognised when a piece that ends
    on a boundary is all zeros -- etcd's ``isTornEntry`` rule, which splits
    a bad record the same way.  ``later`` must hold too: the valid record
    that follows has a later index than the one expected at ``start``,
    because a writer that appends in order put the expected record at
    ``start``; finding it further on means bytes were inserted, not lost.

    None of the records from ``start`` on was acknowledged: the fdatasync
    that would have acknowledged the later record covers the lost sector.
    """
    if not later:
        return False
    pos = start
    while True:
        boundary = (pos // _SECTOR + 1) * _SECTOR
        if boundary > end:
            return False
        if data.count(0, pos, boundary) == boundary - pos:
            return True
        pos = boundary


def _write_all(fd: int, buf: bytearray) -> None:
    with memoryview(buf) as view:
        written = 0
        while written < len(view):
            written += os.write(fd, view[written:])


class WAL:
    """A segmented, checksummed, group-committed write-ahead log.

    Not thread-safe: one writer thread owns it.  ``append`` only encodes
    into a buffer; ``sync`` writes the buffer with one ``write`` and makes
    it durable with one ``fdatasync``.  The directory is locked (``flock``)
    while open, so a second writer fails instead of interleaving records.

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> wal = WAL.open(d)
    >>> wal.append(1, {"key": b"a", "value": b"1"}), wal.append(1, {"key": b"b", "value": b"2"})
    (1, 2)
    >>> wal.sync()   # both records are durable from here on
    >>> wal.close()
    >>> wal = WAL.open(d)
    >>> list(wal.replay(after=1))
    [(2, 1, {'key': b'b', 'value': b'2'})]
    >>> wal.last_index
    2
    >>> wal.close()
    """

    def __init__(self, dirpath: str, dir_fd: int, segment_bytes: int, fsync: bool):
        # Use WAL.open(); the constructor only holds state.
        self._dirpath = dirpath
        self._dir_fd = dir_fd
        self._segment_bytes = segment_bytes
        self._fsync = fsync
        self._segments: list[_Segment] = []
        self._fd = -1  # the active (last) segment, opened for appending
        self._last_index = 0
        self._buf = bytearray()
        self._unsynced = False  # bytes written to _fd since the last fdatasync
        # (size, last index) of the active segment at its last sync (or its
        # creation): what an append refused for want of space goes back to.
        self._synced = (0, 0)
        self._unusable: str | None = None  # why appends are refused, once closed or failed
        self._pack = msgpack.Packer(use_bin_type=True).pack

    # --- opening ---------------------------------------------------------

    @classmethod
    def open(
        cls,
        dirpath: str | os.PathLike[str],
        *,
        first_index: int = 1,
        segment_bytes: int = 64 * 1024 * 1024,
        fsync: bool = True,
    ) -> WAL:
        """Open (creating if missing) the log in ``dirpath`` and check it.

        ``first_index`` is the index of the first record of a log that has
        no segment files yet; a log that has them continues its own
        numbering.  A torn tail of the last segment is cut (with a warning);
        any other damage raises :class:`WALCorruptError` and leaves the
        files as they were.  Raises :class:`StorageError` when another
        ``WAL`` has the directory open.

        ``fsync=False`` is etcd's ``--unsafe-no-fsync``, for tests and
        benchmarks: :meth:`sync` still writes (so records survive the
        process being killed) and rotates, but skips the fdatasync, so a
        power loss can lose or damage acknowledged records.

        Reads and checks every retained record: O(bytes in the log).
        """
        if first_index < 1:
            raise ValueError(f"first_index must be >= 1, not {first_index}")
        if segment_bytes < 1:
            raise ValueError(f"segment_bytes must be >= 1, not {segment_bytes}")
        dirpath = os.fspath(dirpath)
        try:
            dir_fd = cls._open_dir(dirpath)
        except OSError as e:
            raise StorageError(f"WAL directory {dirpath} cannot be opened: {e}") from e
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(dir_fd)
            raise StorageError(f"WAL directory {dirpath} is already open by another writer") from None
        wal = cls(dirpath, dir_fd, segment_bytes, fsync)
        try:
            wal._recover(first_index)
        except OSError as e:
            wal._release_handles()
            raise StorageError(f"WAL in {dirpath} cannot be opened: {e}") from e
        except BaseException:
            wal._release_handles()
            raise
        return wal

    @staticmethod
    def _open_dir(dirpath: str) -> int:
        if not os.path.isdir(dirpath):
            os.makedirs(dirpath, exist_ok=True)
            # The new directory's own entry must survive a crash too.
            parent_fd = os.open(os.path.dirname(os.path.abspath(dirpath)), os.O_RDONLY)
            try:
                os.fsync(parent_fd)
            finally:
                os.close(parent_fd)
        return os.open(dirpath, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def _recover(self, first_index: int) -> None:
        names = []
        for name in os.listdir(self._dirpath):
            m = _SEGMENT_NAME.match(name)
            if m is not None:
                names.append((int(m.group(1), 16), name))
            elif name.endswith(SEGMENT_SUFFIX):
                logger.warning("%s: ignoring file with a malformed segment name", os.path.join(self._dirpath, name))
        names.sort()

        cut = None  # (segment, file_bytes) when the last segment has a torn tail
        for i, (first, name) in enumerate(names):
            path = os.path.join(self._dirpath, name)
            if first < 1:
                raise WALCorruptError(f"WAL segment {path} is corrupt at offset 0: index 0 in its name")
            is_last = i == len(names) - 1
            if self._segments:
                prev = self._segments[-1]
                if first != prev.last + 1:
                    raise WALCorruptError(
                        f"WAL segment missing before {path} (offset 0): {prev.path} ends at "
                        f"index {prev.last}, but the next segment starts at {first}"
                    )
            last, valid, size = _scan_segment(path, first, is_last)
            if last < first and not is_last:
                # Segments are only started after the previous one holds a
                # record, so an empty one in the middle was not made by us.
                raise WALCorruptError(f"WAL segment {path} is corrupt at offset 0: empty, but not the last segment")
            seg = _Segment(path, first, last, valid)
            self._segments.append(seg)
            if valid < size:
                cut = (seg, size)

        if not self._segments:
            self._create_segment(first_index)
            self._last_index = first_index - 1
        else:
            active = self._segments[-1]
            self._fd = os.open(active.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            self._last_index = active.last
            self._synced = (active.size, active.last)
            if cut is not None:
                seg, size = cut
                logger.warning(
                    "%s: torn tail at offset %d (%d bytes after the last valid record, index %d); cutting it",
                    seg.path, seg.size, size - seg.size, seg.last,
                )
                os.ftruncate(self._fd, seg.size)
                os.fsync(self._fd)

    def _create_segment(self, first: int) -> None:
        """Start a new active segment whose first record will be ``first``."""
        path = os.path.join(self._dirpath, _segment_name(first))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            os.fsync(self._dir_fd)
        except BaseException:
            os.close(fd)
            raise
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        self._segments.append(_Segment(path, first, first - 1, 0))
        self._synced = (0, first - 1)

    # --- writing ---------------------------------------------------------

    @property
    def last_index(self) -> int:
        """Index of the last appended record, synced or not (``first_index - 1`` when empty)."""
        return self._last_index

    def append(self, rtype: int, payload: object) -> int:
        """Buffer one record and return its index.  O(len(payload)).

        Not durable until :meth:`sync` returns.  ``rtype`` is a byte
        (0..255) the caller uses to tell request kinds apart; ``payload`` is
        anything msgpack can encode.
        """
        if self._unusable is not None:
            raise StorageError(self._unusable)
        body = self._pack(payload)
        if len(body) > MAX_PAYLOAD_BYTES:
            raise ValueError(f"WAL payload of {len(body)} bytes exceeds {MAX_PAYLOAD_BYTES}")
        if not 0 <= rtype <= 255:
            raise ValueError(f"record type must be a byte, not {rtype}")
        index = self._last_index + 1
        head = _INDEX_TYPE.pack(index, rtype)
        buf = self._buf
        buf += _LENGTH_CRC.pack(len(body), _crc32c(body, _crc32c(head)))
        buf += head
        buf += body
        self._last_index = index
        if len(buf) >= _WRITE_THROUGH_BYTES:
            self._guarded(self._write_buffer)
        return index

    def sync(self) -> None:
        """Make every appended record durable: one write, one fdatasync.

        If writing or syncing fails the log refuses all further use
        (:class:`StorageError`): after a failed fsync the kernel may have
        dropped the dirty pages, and a retry that "succeeds" would lie.
        O(bytes appended since the last sync), plus one fdatasync if any.
        """
        if self._unusable is not None:
            raise StorageError(self._unusable)
        self._guarded(self._sync)

    def _sync(self) -> None:
        if self._buf:
            self._write_buffer()
        if self._unsynced and self._fsync:
            try:
                _fdatasync(self._fd)
            except OSError as e:
                # Whatever the error (ENOSPC included), never retried.
                self._unusable = f"WAL in {self._dirpath}: fdatasync failed ({e}); reopen it to recover"
                raise StorageError(self._unusable) from e
        self._unsynced = False
        seg = self._segments[-1]
        self._synced = (seg.size, seg.last)
        # Rotating only here, after the fdatasync, is what keeps every
        # non-last segment complete on disk.
        if seg.size >= self._segment_bytes:
            try:
                self._create_segment(self._last_index + 1)
            except OSError as e:
                # The records are durable; only the new file failed (a full
                # disk).  Keep appending here and rotate at a later sync.
                logger.warning("%s: cannot start the next segment (%s); continuing in this one", seg.path, e)

    def _write_buffer(self) -> None:
        _write_all(self._fd, self._buf)
        seg = self._segments[-1]
        seg.size += len(self._buf)
        seg.last = self._last_index
        self._buf.clear()
        self._unsynced = True

    def _guarded(self, step: Callable[[], None]) -> None:
        try:
            step()
        except OSError as e:
            if e.errno == errno.ENOSPC and self._forget_unsynced():
                raise WALNoSpaceError(
                    f"WAL in {self._dirpath}: no space left on device; the records appended since "
                    "the last sync were dropped"
                ) from e
            self._unusable = f"WAL in {self._dirpath} failed ({e}); reopen it to recover"
            raise StorageError(self._unusable) from e

    def _forget_unsynced(self) -> bool:
        """Cut the active segment back to its last synced record, so that a
        batch refused for want of space leaves nothing behind; False when
        that is impossible (the log is then unusable).

        Only writes are undone this way: an fsync that failed leaves the
        page cache in a state nobody can know, so it is never retried.
        """
        size, last = self._synced
        seg = self._segments[-1]
        try:
            os.ftruncate(self._fd, size)
        except OSError:
            return False
        seg.size, seg.last = size, last
        self._last_index = last
        self._buf.clear()
        self._unsynced = False
        return True

    # --- reading ---------------------------------------------------------

    def replay(self, after: int) -> Iterator[tuple[int, int, object]]:
        """Yield ``(index, rtype, payload)`` for every record with index > ``after``.

        Raises :class:`WALCorruptError` (here, before yielding anything)
        when records after ``after`` are missing: released or lost from the
        front, or ``after`` beyond the end of the log, which means the
        caller applied records this log does not have and new records would
        reuse their indexes.  Records appended but not yet synced are
        written out (not synced) first, so they are included.
        Reads only the segments that hold records after ``after``:
        O(their bytes).
        """
        if self._unusable is not None:
            raise StorageError(self._unusable)
        if after < 0:
            raise ValueError(f"after must be >= 0, not {after}")
        if self._buf:
            self._guarded(self._write_buffer)
        oldest = self._segments[0]
        if after + 1 < oldest.first:
            raise WALCorruptError(
                f"WAL records {after + 1}..{oldest.first - 1} are missing: the oldest segment "
                f"{oldest.path} (offset 0) starts at index {oldest.first}"
            )
        if after > self._last_index:
            raise WALCorruptError(
                f"WAL in {self._dirpath} ends at index {self._last_index}, but records up to "
                f"{after} were applied: records {self._last_index + 1}..{after} are missing"
            )
        wanted = [seg for seg in self._segments if seg.last > after]
        return self._replay(wanted, after)

    @staticmethod
    def _replay(segments: list[_Segment], after: int) -> Iterator[tuple[int, int, object]]:
        unpackb = msgpack.unpackb
        for seg in segments:
            with open(seg.path, "rb") as f:
                data = f.read(seg.size)
            mv = memoryview(data)
            pos = 0
            expect = seg.first
            while pos < seg.size:
                # Checked again because the file was read again: a change
                # since open must not turn into a silently wrong request.
                try:
                    end, index, rtype = _check_record(data, mv, pos)
                except _BadRecord as bad:
                    raise WALCorruptError(
                        f"WAL segment {seg.path} is corrupt at offset {bad.offset}: {bad.reason} "
                        "(changed since it was opened)"
                    ) from None
                if index != expect:
                    raise WALCorruptError(
                        f"WAL segment {seg.path} is corrupt at offset {pos}: record has index "
                        f"{index}, expected {expect} (changed since it was opened)"
                    )
                if index > after:
                    payload = unpackb(mv[pos + HEADER_BYTES : end], raw=False, strict_map_key=False)
                    yield index, rtype, payload
                pos = end
                expect += 1
            if expect - 1 != seg.last:
                raise WALCorruptError(
                    f"WAL segment {seg.path} is corrupt at offset {pos}: ends at index {expect - 1}, "
                    f"expected {seg.last} (changed since it was opened)"
                )

    # --- releasing and closing ------------------------------------------

    def release(self, upto: int, keep: int = 0) -> int:
        """Delete the segments all of whose records have index <= ``upto``,
        except the newest ``keep`` of those.

        Call it with the index the backend has durably applied (a
        checkpoint).  The active segment is never deleted.  Deletes oldest
        first, so an interrupted release leaves no gap.  Returns how many
        segments were deleted.  O(segments deleted), one directory fsync.
        """
        if self._unusable is not None:
            raise StorageError(self._unusable)
        if keep < 0:
            raise ValueError(f"keep must be >= 0, not {keep}")
        releasable = sum(1 for seg in self._segments[:-1] if seg.last <= upto)
        deleted = 0
        try:
            while deleted < releasable - keep:
                os.unlink(self._segments[0].path)
                del self._segments[0]
                deleted += 1
            if deleted:
                os.fsync(self._dir_fd)
        except OSError as e:
            raise StorageError(f"WAL in {self._dirpath}: releasing segments up to {upto} failed: {e}") from e
        return deleted

    def close(self) -> None:
        """Sync anything appended, then release the files and the lock.  Idempotent."""
        if self._dir_fd < 0:
            return
        try:
            if self._unusable is None:
                self.sync()
        finally:
            self._unusable = f"WAL in {self._dirpath} is closed"
            self._release_handles()

    def _release_handles(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._dir_fd >= 0:
            os.close(self._dir_fd)  # also drops the flock
            self._dir_fd = -1

    def __enter__(self) -> WAL:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<WAL {self._dirpath!r} segments={len(self._segments)} last_index={self._last_index}>"

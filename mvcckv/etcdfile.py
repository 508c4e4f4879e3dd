r"""etcd's backend file: its buckets and encodings, to and from the engine.

A snapshot that etcd's tools read is etcd's bbolt backend file (see
``bbolt.py`` for the format) followed by the SHA-256 of that file::

    0                                   N                N+32
    +-----------------------------------+-----------------+
    |  bbolt file, N a multiple of the  |  SHA-256(0..N)  |
    |  page size (so of 512)            |    32 bytes     |
    +-----------------------------------+-----------------+

etcd's buckets, in the order bbolt keeps them::

    alarm  auth  authRoles  authUsers  cluster  key  lease
    members  members_removed  meta

The engine's LMDB databases (``backend.py``) are the seven of them that
hold data and hold it in etcd's encodings byte for byte (revision keys and
``mvccpb.KeyValue`` values, ``leasepb.Lease``, ``authpb.User``/``Role``,
``AlarmMember``, the ``meta`` and ``auth`` keys), so the conversion copies
items and never re-encodes them: HashKV of one side equals HashKV of the
other.  Written files also get ``cluster``, ``members`` and
``members_removed``, empty, because membership belongs to whoever serves
the data: ``etcdctl snapshot restore`` and ``etcdutl`` write the new
cluster's members into them and mvcckv takes its identity from its flags.
The engine's own member identity keys in ``meta`` stay out of the file;
reading an etcd file skips those three buckets.

:func:`status` is etcdutl's ``snapshot status``: bbolt's consistency check,
then a CRC-32C over every bucket name, key and value in file order,
``revision`` the main revision of the last ``key`` entry, ``total_keys``
the number of entries in all buckets, ``total_size`` the high-water mark in
bytes and ``version`` meta's ``storageVersion`` (3.6 files; empty before).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import BinaryIO

import crc32c
import lmdb
from google.protobuf.message import DecodeError

from mvcckv.auth import REVISION_KEY
from mvcckv.backend import (
    ALARM,
    AUTH,
    AUTH_ROLES,
    AUTH_USERS,
    DATABASES,
    KEY,
    LEASE,
    META,
    META_CLUSTER_ID,
    META_CONSISTENT_INDEX,
    META_FINISHED_COMPACT,
    META_MEMBER_ID,
    META_SCHEDULED_COMPACT,
)
from mvcckv.bbolt import Reader, Writer
from mvcckv.errors import BoltError, SnapshotError
from mvcckv.fsutil import fsync_dir
from mvcckv.pb import auth_pb2, kv_pb2, lease_pb2, rpc_pb2
from mvcckv.revision import MARKED_REV_BYTES_LEN, REV_BYTES_LEN, TOMBSTONE_MARK

BUCKETS = (
    b"alarm", b"auth", b"authRoles", b"authUsers", b"cluster", b"key", b"lease",
    b"members", b"members_removed", b"meta",
)
"""Every bucket etcd creates, in byte order (bbolt's)."""

HASH_SIZE = 32
ALIGNMENT = 512
"""etcdctl finds the trailer only if the database part is a multiple of this."""

META_STORAGE_VERSION = b"storageVersion"
_ENGINE_ONLY = frozenset((META_CLUSTER_ID, META_MEMBER_ID))
_COPY_CHUNK = 1024 * 1024

Source = Mapping[bytes, Iterable[tuple[bytes, bytes]]]


@dataclass(frozen=True)
class FileStatus:
    """etcdutl's ``snapshot status`` fields of a bbolt file."""

    hash: int
    revision: int
    total_keys: int
    total_size: int
    version: str


# --- writing ---------------------------------------------------------------


def lmdb_source(txn, dbs: Mapping[bytes, object]) -> Source:
    """The engine databases of one LMDB read transaction, as bucket items."""
    return {name: txn.cursor(db=dbs[name]).iternext() for name in DATABASES if name in dbs}


def write_database(out: BinaryIO, source: Source) -> int:
    """Write etcd's bbolt file for ``source`` at ``out``'s position; its size."""
    w = Writer(out)
    for name in BUCKETS:
        items = source.get(name, ())
        if name == META:
            items = ((k, v) for k, v in items if k not in _ENGINE_ONLY)
        w.bucket(name, items)
    return w.finish()


def save(target: str | os.PathLike[str] | BinaryIO, source: Source, tmp_dir: str | None = None) -> int:
    """Write a snapshot (bbolt file, then its SHA-256) of ``source`` to
    ``target``, a path or a binary file; returns the bytes written.

    A path is written as ``path.part``, fsynced and renamed, so it is
    either absent or complete.  A file that can be both sought and read
    back (the hash covers meta pages written last) is written in place
    from its current position; anything else (a pipe, a socket, a file
    opened ``"wb"``) gets the file built in ``tmp_dir`` first, then copied.
    """
    if isinstance(target, (str, os.PathLike)):
        path = os.fspath(target)
        with atomic_file(path) as out:
            return _save_seekable(out, source)
    if not hasattr(target, "write"):
        raise TypeError(f"a snapshot goes to a path or a binary file, not {type(target).__name__}")
    if _seekable_and_readable(target):
        return _save_seekable(target, source)
    with tempfile.TemporaryFile(dir=tmp_dir, prefix=".snapshot-") as tmp:
        size = _save_seekable(tmp, source)
        tmp.seek(0)
        for chunk in read_chunks(tmp, size, "snapshot file shrank while being copied"):
            target.write(chunk)
    return size


def _seekable_and_readable(f) -> bool:
    try:
        return bool(f.seekable() and f.readable())
    except (AttributeError, OSError, ValueError):
        return False


def read_chunks(f: BinaryIO, length: int, shrank: str) -> Iterator[bytes]:
    """``length`` bytes from ``f``'s position, in chunks; a file that ends
    sooner raises SnapshotError starting with ``shrank``."""
    left = length
    while left:
        chunk = f.read(min(_COPY_CHUNK, left))
        if not chunk:
            raise SnapshotError(f"{shrank} ({length - left} of {length} bytes)")
        yield chunk
        left -= len(chunk)


def _save_seekable(out: BinaryIO, source: Source) -> int:
    base = out.tell()
    size = write_database(out, source)
    # The meta pages are written last, so hash the finished file once more.
    sha = hashlib.sha256()
    out.seek(base)
    for chunk in read_chunks(out, size, "snapshot file shrank while being hashed"):
        sha.update(chunk)
    out.seek(base + size)
    out.write(sha.digest())
    out.truncate()
    out.flush()
    return size + HASH_SIZE


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[BinaryIO]:
    """A file written as ``path.part`` and renamed to ``path`` once synced."""
    part = path + ".part"
    out = os.fdopen(os.open(part, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600), "w+b")
    try:
        yield out
        out.flush()
        os.fsync(out.fileno())
    except BaseException:
        out.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(part)
        raise
    out.close()
    os.replace(part, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))



# --- reading ---------------------------------------------------------------


def database_length(f: BinaryIO, name: str, *, require_hash: bool, check_hash: bool,
                    progress: Callable[[int], object] = lambda n: None) -> int:
    """The length of the database part of the snapshot in ``f``, after
    verifying its trailer when ``check_hash``.

    As etcdutl decides: a length of 32 more than a multiple of 512 means the
    last 32 bytes are the SHA-256 of the rest; any other length is a bare
    database (refused with ``require_hash``).
    """
    f.seek(0, os.SEEK_END)
    size = f.tell()
    has_hash = size % ALIGNMENT == HASH_SIZE
    if not has_hash and require_hash:
        raise SnapshotError(
            f"{name}: no sha256 checksum at the end ({size} bytes is not a multiple of "
            f"{ALIGNMENT} plus {HASH_SIZE}): the file is truncated or not a snapshot "
            "(restore a bare database copy with --skip-hash-check)"
        )
    data_len = size - HASH_SIZE if has_hash else size
    if has_hash and check_hash:
        f.seek(0)
        sha = hashlib.sha256()
        for chunk in read_chunks(f, data_len, f"{name}: the file shrank while being read"):
            sha.update(chunk)
            progress(len(chunk))
        trailer = f.read(HASH_SIZE)
        if trailer != sha.digest():
            raise SnapshotError(
                f"{name}: sha256 mismatch: the file is corrupt "
                f"(its checksum is {trailer.hex()}, its data hashes to {sha.hexdigest()})"
            )
    return data_len


def status(reader: Reader) -> FileStatus:
    """etcdutl's ``snapshot status`` of a bbolt file (see the module doc)."""
    problems = reader.check()
    if problems:
        raise BoltError(
            f"{reader.name}: snapshot file integrity check failed. {len(problems)} errors found.\n"
            + "\n".join(problems)
        )
    return scan(reader)


Batches = Iterator[list[tuple[bytes, bytes]]]
Sink = Callable[[bytes], Callable[[Batches], object] | None]


def scan(reader: Reader, sink: Sink | None = None,
         progress: Callable[[int], object] = lambda n: None) -> FileStatus:
    """One pass over every bucket in file order, computing etcdutl's status
    fields (without the consistency check); ``sink(name)`` may return a
    consumer that is handed the bucket's items, a list per leaf page, as
    they are read, which is how a restore loads a file in the same pass.
    With a sink, the file must have etcd's ``key`` and ``meta`` buckets.
    ``progress`` is called with the bytes of keys and values read, per page.
    """
    buckets = [name for name, _ in reader.buckets()]
    if sink is not None:
        for required in (KEY, META):
            if required not in buckets:
                raise SnapshotError(f"{reader.name}: not an etcd snapshot (no {required.decode()!r} bucket)")
    h = 0
    revision = 0
    total = 0
    version = b""

    def counted(name: bytes) -> Batches:
        nonlocal h, revision, total, version
        for batch in reader.batches(name):
            if not batch:
                continue
            # CRC-32C runs over the keys and values in order, so one call
            # over their concatenation is the same as one per item.
            data = b"".join([b for kv in batch for b in kv])
            h = crc32c.crc32c(data, h)
            total += len(batch)
            if name == KEY:
                revision = int.from_bytes(batch[-1][0][:8], "big")
            elif name == META:
                version = dict(batch).get(META_STORAGE_VERSION, version)
            progress(len(data))
            yield batch

    for name in buckets:
        h = crc32c.crc32c(name, h)
        batches = counted(name)
        consume = sink(name) if sink is not None else None
        if consume is not None:
            consume(batches)
        for _ in batches:  # what a consumer left unread still counts
            pass
    return FileStatus(h, revision, total, reader.tx_size, version.decode(errors="replace"))


def load_into_lmdb(reader: Reader, backend, batch: int = 20000,
                   progress: Callable[[int], object] = lambda n: None) -> FileStatus:
    """Copy the engine's buckets of an etcd file into a new, empty backend;
    the file's status (without the consistency check).

    Items arrive in key order, so LMDB appends them; a write transaction
    is committed every ``batch`` items or so, so none grows without bound.
    Every entry is checked to be one the engine can open.
    """

    def sink(name: bytes):
        if name not in backend.dbs:
            return None
        db = backend.dbs[name]

        def consume(batches: Batches) -> None:
            txn = backend.begin_write()
            try:
                n = 0
                for items in batches:
                    if name == KEY:
                        check_key_entries(reader.name, items)
                    else:
                        if name == META:
                            items = [(k, v) for k, v in items if k not in _ENGINE_ONLY]
                        for k, v in items:
                            _check_entry(reader.name, name, k, v)
                    consumed, added = txn.cursor(db=db).putmulti(items, append=True)
                    if added != len(items):
                        raise SnapshotError(f"{reader.name}: bucket {name.decode()!r}: keys out of order")
                    n += added
                    if n >= batch:
                        txn.commit()
                        txn = None
                        txn = backend.begin_write()
                        n = 0
                txn.commit()
                txn = None
            except lmdb.Error as e:
                raise SnapshotError(f"{reader.name}: bucket {name.decode()!r}: cannot be stored: {e}") from None
            finally:
                if txn is not None:
                    txn.abort()

        return consume

    return scan(reader, sink, progress)


_REVISION_KEY = re.compile(rb"[\x00-\x7f].{7}_\x00\x00\x00\x00.{4}t?", re.DOTALL)


def check_key_entries(name: str, items: list[tuple[bytes, bytes]]) -> None:
    """Refuse ``key`` entries the engine could not open: a revision key of
    17 bytes (18 with the tombstone mark) whose main revision is a
    non-negative int64 and whose sub revision fits the engine's 32 bits,
    and a ``KeyValue`` value with a key."""
    match = _REVISION_KEY.fullmatch
    parse = kv_pb2.KeyValue.FromString
    try:
        if all(match(k) and parse(v).key for k, v in items):
            return
    except DecodeError:
        pass
    for k, v in items:
        check_key_entry(name, k, v)


def check_key_entry(name: str, k: bytes, v: bytes) -> None:
    """Refuse a ``key`` entry the engine could not open: a revision key of
    17 bytes (18 with the tombstone mark) whose main revision is a
    non-negative int64 and whose sub revision fits the engine's 32 bits,
    and a ``KeyValue`` value with a key."""
    if not (
        (len(k) == REV_BYTES_LEN or (len(k) == MARKED_REV_BYTES_LEN and k[-1:] == TOMBSTONE_MARK))
        and k[8:9] == b"_" and k[0] < 0x80 and k[9:13] == b"\0\0\0\0"
    ):
        raise SnapshotError(f"{name}: bucket 'key': {k!r} is not a revision")
    try:
        kv = kv_pb2.KeyValue.FromString(v)
    except DecodeError:
        raise SnapshotError(f"{name}: bucket 'key': revision {k!r} holds no KeyValue") from None
    if not kv.key:
        raise SnapshotError(f"{name}: bucket 'key': revision {k!r} holds a KeyValue without a key")


def _check_entry(name: str, bucket: bytes, k: bytes, v: bytes) -> None:
    """Refuse an entry of the engine's other buckets that it could not open."""
    ok = True
    try:
        if bucket == META:
            if k == META_CONSISTENT_INDEX:
                ok = len(v) == 8
            elif k in (META_SCHEDULED_COMPACT, META_FINISHED_COMPACT):
                ok = len(v) == REV_BYTES_LEN and v[8:9] == b"_" and v[0] < 0x80
        elif bucket == LEASE:
            ok = len(k) == 8 and lease_pb2.Lease.FromString(v).ID != 0
        elif bucket == ALARM:
            rpc_pb2.AlarmMember.FromString(k)
        elif bucket == AUTH:
            ok = k != REVISION_KEY or len(v) == 8
        elif bucket in (AUTH_USERS, AUTH_ROLES):
            k.decode()
            (auth_pb2.User if bucket == AUTH_USERS else auth_pb2.Role).FromString(v)
    except (DecodeError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise SnapshotError(f"{name}: bucket {bucket.decode()!r}: entry {k!r} does not decode")

r"""Snapshots: etcd's backend file with a SHA-256, saved, restored, inspected.

A snapshot is what etcd's ``Maintenance/Snapshot`` streams and what
``etcdctl snapshot save`` writes: etcd's bbolt backend file, then the
SHA-256 of that file (``etcdfile.py`` has the layout and the buckets).
mvcckv writes exactly that, from either engine, so etcd's own tools
(``etcdctl snapshot status|restore``, ``etcdutl``) and a real etcd started
on the restored directory read it; and it restores files saved from etcd
3.4-3.6 into a new data dir or a PostgreSQL schema, every revision, lease,
user and role included.

Reading a file uses its length to find the trailer, as etcdutl does::

    len % 512 == 32   the last 32 bytes are the SHA-256 of the rest;
                      restore and status verify it (restore can skip that)
    anything else     no trailer: a truncated snapshot, or a bare database
                      copy, which restore accepts only with skip_hash_check

then the database's magic number says what it is: bbolt (etcd's format,
what mvcckv writes), or LMDB (snapshots of mvcckv releases that saved their
own backend copy; still restored, with their status as before).

Restoring builds everything in a sibling directory that is renamed into
place only when complete and synced, so a bad file (a clear
:class:`~mvcckv.errors.SnapshotError` naming the file and the page or
offset) never leaves a partial data dir.  The member identity is not
carried over: a restored member takes its identity from the flags it is
started with, as etcd derives it from ``--initial-cluster``.

>>> import os, tempfile, mvcckv
>>> work = tempfile.mkdtemp()
>>> with mvcckv.open(os.path.join(work, "src")) as store:
...     _ = store.put("greeting", "hello")
...     size = save(store, os.path.join(work, "snap.db"))
>>> size % 512
32
>>> st = status(os.path.join(work, "snap.db"))
>>> st.revision
2
>>> _ = restore(os.path.join(work, "snap.db"), os.path.join(work, "restored"))
>>> with mvcckv.open(os.path.join(work, "restored")) as store:
...     store.get("greeting").value, store.put("next", "1").header.revision
(b'hello', 3)
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import struct
import sys
import tempfile
from dataclasses import dataclass
from typing import BinaryIO, Iterator

import crc32c
import grpc
import lmdb
from google.protobuf.message import DecodeError
from tqdm import tqdm

from mvcckv import etcdfile
from mvcckv.backend import (
    DATABASES,
    KEY,
    META,
    META_CLUSTER_ID,
    META_CONSISTENT_INDEX,
    META_MEMBER_ID,
    Backend,
)
from mvcckv.bbolt import MAGIC as _BBOLT_MAGIC
from mvcckv.bbolt import Reader
from mvcckv.errors import SnapshotError, StorageError
from mvcckv.etcdfile import ALIGNMENT, HASH_SIZE, META_STORAGE_VERSION, atomic_file, read_chunks
from mvcckv.fsutil import fsync_dir
from mvcckv.pb import kv_pb2, rpc_pb2, rpc_pb2_grpc
from mvcckv.revision import from_bytes, is_tombstone
from mvcckv.store import Store

SNAPSHOT_CHUNK_SIZE = 32 * 1024
"""Bytes per streamed blob, as etcd sends them."""


# LMDB's on-disk meta page (64-bit build): a 16-byte page header, then
# MDB_meta.  Offsets checked against files written by LMDB 0.9.
_LMDB_MAGIC = 0xBEEFC0DE
_META_MAGIC = struct.Struct("<I")  # at 16, in bbolt's meta page too
_META_PSIZE = struct.Struct("<I")  # at 40: mm_dbs[FREE_DBI].md_pad holds the page size
_META_LAST = struct.Struct("<QQ")  # at 136: mm_last_pg, mm_txnid
_MIN_PAGE, _MAX_PAGE = 512, 65536


@dataclass(frozen=True)
class SnapshotStatus:
    """What ``mvcckv snapshot status`` prints (etcdutl's fields).

    For an etcd (bbolt) file, exactly what ``etcdctl snapshot status``
    prints: ``hash`` the CRC-32C over every bucket name, key and value,
    ``revision`` the main revision of the last ``key`` entry,
    ``total_keys`` the entries of all buckets, ``total_size`` the bytes up
    to bbolt's high-water page, ``version`` meta's storage version (empty
    before etcd 3.6).  For an older mvcckv (LMDB) snapshot: the CRC-32C
    that :meth:`mvcckv.store.Store.hash` computes, the largest main
    revision, the keys alive at it, the file size and the storage version.
    """

    hash: int
    revision: int
    total_keys: int
    total_size: int
    version: str


# --- saving --------------------------------------------------------------


def iter_snapshot(engine, chunk_size: int = SNAPSHOT_CHUNK_SIZE) -> Iterator[tuple[bytes, int]]:
    """Yield ``(blob, remaining_bytes)`` for a snapshot of ``engine``.

    First the bbolt file in blobs of ``chunk_size`` bytes, each with the
    number of database bytes still to come (0 with the last), then
    ``(sha256 of every blob, 0)``: the messages of etcd's Snapshot stream.

    The file is built when the first blob is asked for, into an unlinked
    file in the engine's directory: memory stays bounded whatever the size,
    at the cost of the database's size in disk space until the generator
    is closed.  Streaming straight from a read transaction would save that
    space, but an LMDB reader pins every page freed after it began, so a
    slow client would make the live file grow under writes (and hold off
    defrag) for as long as it takes to download.

    O(database size) time and disk, O(chunk_size) memory.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, not {chunk_size}")
    with tempfile.TemporaryFile(dir=engine.path, prefix=".snapshot-") as tmp:
        size = engine.snapshot(tmp) - HASH_SIZE
        tmp.seek(0)
        sent = 0
        for _ in range(-(-size // chunk_size)):
            blob = tmp.read(min(chunk_size, size - sent))
            if not blob:
                raise SnapshotError(f"snapshot copy shrank while being sent ({sent} of {size} bytes)")
            sent += len(blob)
            yield blob, size - sent
        # The file's trailer: the SHA-256 of exactly the bytes just sent.
        yield tmp.read(HASH_SIZE), 0


def save(engine, path: str | os.PathLike[str]) -> int:
    """Write a snapshot of ``engine`` (either engine) to ``path``; returns
    its size in bytes.  Written to ``path.part``, fsynced, then renamed, as
    etcdctl does, so ``path`` is either absent or complete."""
    return engine.snapshot(os.fspath(path))


def save_from_endpoint(
    endpoint_url: str,
    path: str | os.PathLike[str],
    progress: bool = False,
    timeout: float | None = None,
    dial_timeout: float = 5.0,
) -> int:
    """Save the snapshot streamed by a server's ``Maintenance/Snapshot``.

    ``endpoint_url`` is ``host:port`` or ``http://host:port`` (one server:
    a snapshot comes from one member).  ``timeout`` bounds the whole
    transfer (None: no limit, as etcdctl 3.5+), ``dial_timeout`` the
    connection.  The file is checked as etcdctl checks it (length is 32
    more than a multiple of 512) and its trailer against the data; returns
    its size.  Raises :class:`SnapshotError` on any failure, leaving no file.
    """
    target = _grpc_target(endpoint_url)
    path = os.fspath(path)
    options = [("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(target, options=options) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=dial_timeout)
        except grpc.FutureTimeoutError:
            raise SnapshotError(f"cannot connect to {endpoint_url} within {dial_timeout:g} s") from None
        stub = rpc_pb2_grpc.MaintenanceStub(channel)
        try:
            with atomic_file(path) as out, _progress(progress, "save") as bar:
                sha = hashlib.sha256()
                tail = b""  # the last 32 bytes seen: the trailer once the stream ends
                for resp in stub.Snapshot(rpc_pb2.SnapshotRequest(), timeout=timeout):
                    blob = resp.blob
                    if bar.total is None:
                        bar.total = len(blob) + resp.remaining_bytes + HASH_SIZE
                    out.write(blob)
                    bar.update(len(blob))
                    buf = tail + blob
                    sha.update(buf[:-HASH_SIZE])
                    tail = buf[-HASH_SIZE:]
                size = out.tell()
                if size % ALIGNMENT != HASH_SIZE:
                    raise SnapshotError(f"sha256 checksum not found [bytes: {size}]")
                if sha.digest() != tail:
                    raise SnapshotError(
                        f"sha256 mismatch: the snapshot streamed by {endpoint_url} does not match its checksum"
                    )
        except grpc.RpcError as e:
            raise SnapshotError(f"snapshot from {endpoint_url} failed: {e.code().name}: {e.details()}") from None
    return size


def _grpc_target(endpoint_url: str) -> str:
    endpoints = [e for e in endpoint_url.split(",") if e.strip()]
    if len(endpoints) != 1:
        raise SnapshotError(f"a snapshot must be requested from one endpoint, not {endpoint_url!r}")
    url = endpoints[0].strip()
    if url.startswith("https://"):
        raise SnapshotError(f"{url}: TLS endpoints are not supported")
    return url.removeprefix("http://").rstrip("/")


# --- reading a snapshot file ---------------------------------------------


def restore(
    snapshot: str | os.PathLike[str] | BinaryIO,
    data_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    skip_hash_check: bool = False,
    backend: str | None = None,
) -> SnapshotStatus:
    """Restore ``snapshot`` (a path or a seekable binary file) into the new
    data dir ``data_dir``, or with ``backend`` (a ``postgresql://`` URL)
    into that PostgreSQL schema, which must hold no data yet.

    ``data_dir`` must not exist or be empty (:class:`FileExistsError`
    otherwise).  The trailer is verified unless ``skip_hash_check``, which
    also admits a bare database without one.  A corrupt, truncated or
    foreign file raises :class:`SnapshotError` and leaves ``data_dir`` (or
    the schema) as it was.

    Returns the snapshot's status (see :class:`SnapshotStatus`; for an etcd
    file, without running bbolt's full consistency check, which the
    restore's own walk of every tree stands in for).
    """
    if (data_dir is None) == (backend is None):
        raise ValueError("restore needs exactly one of data_dir and backend")
    if data_dir is not None:
        data_dir = os.path.abspath(os.fspath(data_dir))
        if os.path.lexists(data_dir) and not (os.path.isdir(data_dir) and not os.listdir(data_dir)):
            raise FileExistsError(errno.EEXIST, "data dir exists and is not empty; restore needs a new one", data_dir)
    with _opened(snapshot) as (f, name), _progress(progress, "restore") as bar:
        data_len = etcdfile.database_length(
            f, name, require_hash=not skip_hash_check, check_hash=not skip_hash_check, progress=bar.update,
        )
        kind = _kind(f, name, data_len)
        if backend is not None:
            if kind != "bbolt":
                raise SnapshotError(f"{name}: only etcd (bbolt) snapshots restore into PostgreSQL")
            from mvcckv.pg import restore as pg_restore

            return _status(pg_restore.load(backend, Reader(f, name, data_len), progress=bar.update))
        parent = os.path.dirname(data_dir)
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(data_dir)}.restore-", dir=parent)
        try:
            db_dir = os.path.join(staging, "db")
            os.mkdir(db_dir)
            if kind == "bbolt":
                be = Backend(db_dir, quota_bytes=0)
                try:
                    restored = _status(etcdfile.load_into_lmdb(Reader(f, name, data_len), be, progress=bar.update))
                finally:
                    be.close()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(db_dir, "lock.mdb"))
            else:
                restored = _restore_lmdb(f, name, data_len, db_dir)
            fsync_dir(db_dir)
            fsync_dir(staging)
            if os.path.isdir(data_dir):
                os.rmdir(data_dir)  # empty (checked above); fails if that changed meanwhile
            os.rename(staging, data_dir)
            fsync_dir(parent)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return restored


def status(snapshot: str | os.PathLike[str] | BinaryIO) -> SnapshotStatus:
    """Hash, revision, total keys, size and storage version of a snapshot.

    A trailer, when present, is verified (a corrupt file raises
    :class:`SnapshotError`); a file without one is read as a bare
    database.  An etcd file must pass bbolt's consistency check first, as
    in etcdutl.  The file is only read.
    """
    with _opened(snapshot) as (f, name):
        data_len = etcdfile.database_length(f, name, require_hash=False, check_hash=True)
        if _kind(f, name, data_len) == "bbolt":
            return _status(etcdfile.status(Reader(f, name, data_len)))
        with tempfile.TemporaryDirectory(prefix="mvcckv-status-") as tmp:
            db_file = os.path.join(tmp, "data.mdb")
            with open(db_file, "xb") as out:
                _copy(f, out, data_len, name)
            _check_lmdb(db_file, name)
            try:
                env = lmdb.open(tmp, subdir=True, readonly=True, lock=False, max_dbs=len(DATABASES) + 2)
            except lmdb.Error as e:
                raise SnapshotError(f"{name}: not a readable mvcckv snapshot: {e}") from None
            try:
                h, revision, keys, version = _scan(env, name)
            finally:
                env.close()
            return SnapshotStatus(h, revision, keys, _size(f), version)


def _status(st: etcdfile.FileStatus) -> SnapshotStatus:
    return SnapshotStatus(st.hash, st.revision, st.total_keys, st.total_size, st.version)


@contextlib.contextmanager
def _opened(snapshot) -> Iterator[tuple[BinaryIO, str]]:
    if isinstance(snapshot, (str, os.PathLike)):
        path = os.fspath(snapshot)
        with open(path, "rb") as f:
            yield f, path
    elif hasattr(snapshot, "read") and hasattr(snapshot, "seek"):
        yield snapshot, getattr(snapshot, "name", None) or "<snapshot file>"
    else:
        raise TypeError(f"a snapshot is a path or a seekable binary file, not {type(snapshot).__name__}")


def _size(f: BinaryIO) -> int:
    f.seek(0, os.SEEK_END)
    return f.tell()


def _kind(f: BinaryIO, name: str, data_len: int) -> str:
    """``"bbolt"`` or ``"lmdb"``, from the magic number both keep at byte 16."""
    f.seek(0)
    head = f.read(min(data_len, 20))
    if len(head) < 20:
        raise SnapshotError(f"{name}: too short to be a database ({data_len} bytes)")
    (magic,) = _META_MAGIC.unpack_from(head, 16)
    if magic == _BBOLT_MAGIC:
        return "bbolt"
    if magic == _LMDB_MAGIC:
        return "lmdb"
    # bbolt keeps a second meta page; let the reader look for it.
    return "bbolt"


def _copy(f: BinaryIO, out: BinaryIO, length: int, name: str) -> None:
    f.seek(0)
    for chunk in read_chunks(f, length, f"{name}: the file shrank while being read"):
        out.write(chunk)


def _restore_lmdb(f: BinaryIO, name: str, data_len: int, db_dir: str) -> SnapshotStatus:
    """An older mvcckv snapshot (an LMDB copy) into ``db_dir``."""
    db_file = os.path.join(db_dir, "data.mdb")
    with open(db_file, "xb") as out:
        _copy(f, out, data_len, name)
        out.flush()
        os.fsync(out.fileno())
    _check_lmdb(db_file, name)
    return _forget_identity(db_file, name)


def _check_lmdb(db_file: str, path: str) -> None:
    """Refuse what is not a complete LMDB file before LMDB maps it.

    LMDB trusts its meta page: mapping a file shorter than the last page the
    meta names would fault on the first read past the end.
    """
    size = os.path.getsize(db_file)
    with open(db_file, "rb") as f:
        head = f.read(2 * _MAX_PAGE)
    if len(head) < 64:
        raise SnapshotError(f"{path}: too short to be a database ({size} bytes)")
    (psize,) = _META_PSIZE.unpack_from(head, 40)
    if not (_MIN_PAGE <= psize <= _MAX_PAGE and psize & (psize - 1) == 0):
        raise SnapshotError(f"{path}: corrupt database header (page size {psize})")
    if len(head) < 2 * psize:
        raise SnapshotError(f"{path}: truncated: {size} bytes hold no second meta page")
    # LMDB uses the meta page with the larger transaction ID (page 0 on a tie).
    metas = [_META_LAST.unpack_from(head, off + 136) for off in (0, psize)]
    last_pg, _ = metas[1] if metas[1][1] > metas[0][1] else metas[0]
    needed = (last_pg + 1) * psize
    if size < needed:
        raise SnapshotError(f"{path}: truncated: the database needs {needed} bytes, the file holds {size}")


def _forget_identity(db_file: str, path: str) -> SnapshotStatus:
    """Drop the member identity from ``meta``; the restored database's status."""
    size = os.path.getsize(db_file)
    try:
        env = lmdb.open(
            os.path.dirname(db_file),
            subdir=True,
            lock=False,
            max_dbs=len(DATABASES) + 2,
            # Room for the pages the deletes copy; a map size is an address
            # range, not an allocation.
            map_size=size + (64 << 20),
        )
    except lmdb.Error as e:
        raise SnapshotError(f"{path}: not a readable mvcckv snapshot: {e}") from None
    try:
        meta = _open_db(env, META, path)
        with env.begin(write=True) as txn:
            txn.delete(META_CLUSTER_ID, db=meta)
            txn.delete(META_MEMBER_ID, db=meta)
        h, revision, keys, version = _scan(env, path)
        env.sync(True)
    finally:
        env.close()
    return SnapshotStatus(h, revision, keys, os.path.getsize(db_file), version)


def _open_db(env: lmdb.Environment, name: bytes, path: str):
    try:
        return env.open_db(name, create=False)
    except lmdb.NotFoundError:
        raise SnapshotError(f"{path}: not an mvcckv snapshot (no {name.decode()!r} database)") from None


def _scan(env: lmdb.Environment, path: str) -> tuple[int, int, int, str]:
    """(hash, revision, live keys, storage version) of one consistent read.

    The hash is Store.hash()'s: CRC-32C over every database in name order
    (name, then each key and value), leaving out ``consistent_index``.  A
    database that is absent hashes as an empty one, which is what it is to
    a store that opens the file.
    """
    dbs = {KEY: _open_db(env, KEY, path), META: _open_db(env, META, path)}
    for name in DATABASES:
        if name not in dbs:
            with contextlib.suppress(lmdb.NotFoundError):
                dbs[name] = env.open_db(name, create=False)
    h = 0
    revision = 0
    live: set[bytes] = set()
    parse = kv_pb2.KeyValue.FromString
    try:
        with env.begin() as txn:
            for name in sorted(DATABASES):
                h = crc32c.crc32c(name, h)
                if name not in dbs:
                    continue
                for k, v in txn.cursor(db=dbs[name]):
                    if name == META and k == META_CONSISTENT_INDEX:
                        continue
                    h = crc32c.crc32c(v, crc32c.crc32c(k, h))
                    if name == KEY:
                        revision = max(revision, from_bytes(k).main)
                        key = parse(v).key
                        if is_tombstone(k):
                            live.discard(key)
                        else:
                            live.add(key)
            version = txn.get(META_STORAGE_VERSION, db=dbs[META]) or b""
    except (lmdb.Error, ValueError, DecodeError) as e:
        raise SnapshotError(f"{path}: corrupt database: {e}") from None
    return h, revision, len(live), version.decode(errors="replace")


# --- files ---------------------------------------------------------------


def _progress(enabled: bool, desc: str) -> tqdm:
    """A byte progress bar on stderr (a no-op unless ``enabled``); it shows
    only once the work has taken half a second, so quick work stays quiet."""
    return tqdm(
        desc=desc, total=None, unit="B", unit_scale=True, unit_divisor=1024,
        file=sys.stderr, disable=not enabled, leave=False, delay=0.5,
    )


# --- command line --------------------------------------------------------


_PROGRESS_HELP = "show a progress bar on stderr even if it is not a terminal"


def add_parser(subparsers) -> None:
    """``mvcckv snapshot save|restore|status``."""
    parser = subparsers.add_parser(
        "snapshot",
        help="save, restore and inspect snapshots",
        description="Snapshots in etcd's format: the database, then its SHA-256.",
    )
    sub = parser.add_subparsers(dest="snapshot_command", metavar="COMMAND")
    sub.required = True

    save_p = sub.add_parser(
        "save",
        help="save a snapshot of a server, a data dir or a PostgreSQL schema",
        description="Save a point-in-time snapshot to FILE in etcd's format (written as FILE.part, then renamed).",
    )
    save_p.add_argument("file", metavar="FILE")
    source = save_p.add_mutually_exclusive_group(required=True)
    source.add_argument("--endpoints", metavar="URL", help="the server to snapshot (host:port or http://host:port)")
    source.add_argument("--data-dir", metavar="DIR", help="a data dir no server is using")
    source.add_argument("--backend", metavar="URL", help="a PostgreSQL engine's database (postgresql://...)")
    save_p.add_argument("--dial-timeout", type=float, default=5.0, metavar="SECONDS",
                        help="connection timeout with --endpoints (default: %(default)s)")
    save_p.add_argument("--command-timeout", type=float, default=None, metavar="SECONDS",
                        help="limit on the whole transfer with --endpoints (default: none)")
    save_p.add_argument("--progress", action="store_true", help=_PROGRESS_HELP)
    save_p.set_defaults(func=_cmd_save)

    restore_p = sub.add_parser(
        "restore",
        help="restore a snapshot (etcd's or mvcckv's) into a new data dir or PostgreSQL schema",
        description="Restore FILE (saved by etcd 3.4-3.6 or mvcckv) into a new data dir or an empty PostgreSQL schema; the snapshot's membership is not carried over.",
    )
    restore_p.add_argument("file", metavar="FILE")
    target = restore_p.add_mutually_exclusive_group(required=True)
    target.add_argument("--data-dir", metavar="DIR", help="the new data dir (absent or empty)")
    target.add_argument("--backend", metavar="URL",
                        help="a PostgreSQL database (postgresql://...) whose schema holds no data yet")
    restore_p.add_argument("--skip-hash-check", action="store_true",
                           help="do not verify the sha256 trailer; also accepts a bare database copy")
    restore_p.add_argument("--progress", action="store_true", help=_PROGRESS_HELP)
    restore_p.set_defaults(func=_cmd_restore)

    status_p = sub.add_parser(
        "status",
        help="print a snapshot's hash, revision, total keys and size",
        description="Print hash, revision, total keys, total size and storage version of FILE.",
    )
    status_p.add_argument("file", metavar="FILE")
    status_p.add_argument("-w", "--write-out", choices=("table", "json"), default="table")
    status_p.set_defaults(func=_cmd_status)


def _show_progress(args: argparse.Namespace) -> bool:
    return args.progress or sys.stderr.isatty()


def _cmd_save(args: argparse.Namespace) -> int:
    def run() -> int:
        if args.endpoints is not None:
            return save_from_endpoint(
                args.endpoints, args.file, progress=_show_progress(args),
                timeout=args.command_timeout, dial_timeout=args.dial_timeout,
            )
        if args.backend is not None:
            import mvcckv.pg
            from mvcckv.pg.engine import schema_of

            with mvcckv.pg.open(args.backend, schema=schema_of(args.backend)) as engine:
                return save(engine, args.file)
        if not os.path.isfile(os.path.join(args.data_dir, "db", "data.mdb")):
            raise SnapshotError(f"{args.data_dir}: no mvcckv data dir here")
        with Store(args.data_dir) as store:
            return save(store, args.file)

    def report() -> None:
        size = run()
        print(f"Snapshot saved at {args.file} ({size} bytes)")

    return _run(report)


def _cmd_restore(args: argparse.Namespace) -> int:
    def run() -> None:
        st = restore(args.file, args.data_dir, progress=_show_progress(args),
                     skip_hash_check=args.skip_hash_check, backend=args.backend)
        where = args.data_dir
        if args.backend is not None:
            from mvcckv.pg.engine import describe_dsn

            where = describe_dsn(args.backend)
        print(f"Snapshot restored to {where} (revision {st.revision}, {st.total_keys} keys)")

    return _run(run)


def _cmd_status(args: argparse.Namespace) -> int:
    def run() -> None:
        st = status(args.file)
        if args.write_out == "json":
            print(json.dumps({
                "hash": st.hash, "revision": st.revision, "totalKey": st.total_keys,
                "totalSize": st.total_size, "version": st.version,
            }))
        else:
            print(_table(
                ["HASH", "REVISION", "TOTAL KEYS", "TOTAL SIZE", "VERSION"],
                [f"{st.hash:x}", str(st.revision), str(st.total_keys), _human_bytes(st.total_size), st.version],
            ))

    return _run(run)


def _run(fn) -> int:
    """Run a command; a failure is one ``Error: ...`` line and exit code 1."""
    try:
        fn()
    except (StorageError, lmdb.Error) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        print(f"Error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    return 0


def _table(header: list[str], row: list[str]) -> str:
    """One row the way etcdctl's tables look (centred header, right-aligned cells)."""
    widths = [max(len(h), len(c)) for h, c in zip(header, row)]
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def centre(text: str, width: int) -> str:
        left = (width - len(text)) // 2
        return " " * left + text + " " * (width - len(text) - left)

    head = "|" + "|".join(f" {centre(h, w)} " for h, w in zip(header, widths)) + "|"
    body = "|" + "|".join(f" {c.rjust(w)} " for c, w in zip(row, widths)) + "|"
    return "\n".join([rule, head, rule, body, rule])


def _human_bytes(n: int) -> str:
    """Sizes as etcdctl prints them (go-humanize's SI ``Bytes``).

    >>> _human_bytes(7), _human_bytes(20480), _human_bytes(2_834_432)
    ('7 B', '20 kB', '2.8 MB')
    """
    if n < 10:
        return f"{n} B"
    units = ("B", "kB", "MB", "GB", "TB", "PB", "EB")
    e = min(int(math.floor(math.log(n) / math.log(1000))), len(units) - 1)
    val = math.floor(n / 1000**e * 10 + 0.5) / 10
    return f"{val:.0f} {units[e]}" if val >= 10 else f"{val:.1f} {units[e]}"

r"""Snapshots: a point-in-time copy of the backend in etcd's framing.

A snapshot file is what etcd's ``Maintenance/Snapshot`` streams and what
``etcdctl snapshot save`` writes: the database, then the SHA-256 of the
database::

    0                                   N                N+32
    +-----------------------------------+-----------------+
    |  LMDB environment copy (data.mdb) |  SHA-256(0..N)  |
    |  N = a multiple of 512 bytes      |    32 bytes     |
    +-----------------------------------+-----------------+

The database part is a compacting LMDB copy made from one read transaction
(:meth:`mvcckv.store.Store.snapshot`), so it is one committed state of
every database, ``consistent_index`` included, while writes go on.  etcdctl
accepts a stream only if its length is 32 more than a multiple of 512; LMDB
files are whole pages (4 KiB), so the copy always is a multiple of 512, and
zero bytes would pad it if a page size ever were not (LMDB ignores bytes
past its last page).

Reading a file uses the length to find the trailer, as etcdutl does::

    len % 512 == 32   the last 32 bytes are the SHA-256 of the rest;
                      restore and status verify it (restore can skip that)
    anything else     no trailer: a truncated snapshot, or a bare database
                      copy, which restore accepts only with skip_hash_check

A file that passes the hash is then checked as an LMDB file: its meta page
must name a page size and a last page that the data actually holds, so a
truncated bare copy is refused instead of being mapped past its end.

Restoring writes ``<data-dir>/db/data.mdb`` and nothing else.  The member
identity (``cluster_id``, ``member_id``) is dropped, because a restored
member takes its identity from the flags it is started with, as etcd
derives it from ``--initial-cluster``; ``consistent_index`` is kept, so the
store opens its new WAL at the next index.

>>> import os, tempfile, mvcckv
>>> work = tempfile.mkdtemp()
>>> with mvcckv.open(os.path.join(work, "src")) as store:
...     _ = store.put("greeting", "hello")
...     size = save(store, os.path.join(work, "snap.db"))
>>> size % 512
32
>>> st = status(os.path.join(work, "snap.db"))
>>> st.revision, st.total_keys
(2, 1)
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

from mvcckv.backend import (
    DATABASES,
    KEY,
    META,
    META_CLUSTER_ID,
    META_CONSISTENT_INDEX,
    META_MEMBER_ID,
)
from mvcckv.errors import SnapshotError, StorageError
from mvcckv.pb import kv_pb2, rpc_pb2, rpc_pb2_grpc
from mvcckv.revision import from_bytes, is_tombstone
from mvcckv.store import Store

SNAPSHOT_CHUNK_SIZE = 32 * 1024
"""Bytes per streamed blob, as etcd sends them."""

HASH_SIZE = 32
ALIGNMENT = 512
"""etcdctl finds the trailer only if the database part is a multiple of this."""

META_STORAGE_VERSION = b"storageVersion"

_COPY_CHUNK = 1024 * 1024

# LMDB's on-disk meta page (64-bit build): a 16-byte page header, then
# MDB_meta.  Offsets checked against files written by LMDB 0.9.
_LMDB_MAGIC = 0xBEEFC0DE
_BBOLT_MAGIC = 0xED0CDAED  # at the same offset in a bbolt (etcd) file
_META_MAGIC = struct.Struct("<I")  # at 16
_META_PSIZE = struct.Struct("<I")  # at 40: mm_dbs[FREE_DBI].md_pad holds the page size
_META_LAST = struct.Struct("<QQ")  # at 136: mm_last_pg, mm_txnid
_MIN_PAGE, _MAX_PAGE = 512, 65536


@dataclass(frozen=True)
class SnapshotStatus:
    """What ``mvcckv snapshot status`` prints (etcdutl's fields).

    ``hash`` is the CRC-32C that :meth:`mvcckv.store.Store.hash` computes
    over the same data; ``revision`` the largest main revision in ``key``;
    ``total_keys`` the keys alive at that revision; ``total_size`` the file
    size in bytes; ``version`` the storage version recorded in ``meta``
    (empty when none is).
    """

    hash: int
    revision: int
    total_keys: int
    total_size: int
    version: str


# --- saving --------------------------------------------------------------


def iter_snapshot(store: Store, chunk_size: int = SNAPSHOT_CHUNK_SIZE) -> Iterator[tuple[bytes, int]]:
    """Yield ``(blob, remaining_bytes)`` for a snapshot of ``store``.

    First the database in blobs of ``chunk_size`` bytes, each with the
    number of database bytes still to come (0 with the last), then
    ``(sha256 of every blob, 0)``: the messages of etcd's Snapshot stream.

    The copy is taken when the first blob is asked for, into an unlinked
    file in the store's directory: memory stays at one chunk whatever the
    size, at the cost of the database's size in disk space until the
    generator is closed.  Streaming straight from a read transaction would
    save that space, but an LMDB reader pins every page freed after it
    began, so a slow client would make the live file grow under writes
    (and hold off defrag) for as long as it takes to download.

    O(database size) time and disk, O(chunk_size) memory.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, not {chunk_size}")
    with tempfile.TemporaryFile(dir=store.path, prefix=".snapshot-") as tmp:
        store.snapshot(tmp.fileno())
        size = os.fstat(tmp.fileno()).st_size
        pad = -size % ALIGNMENT
        if pad:
            os.pwrite(tmp.fileno(), bytes(pad), size)
            size += pad
        tmp.seek(0)
        sha = hashlib.sha256()
        sent = 0
        for _ in range(-(-size // chunk_size)):
            blob = tmp.read(min(chunk_size, size - sent))
            if not blob:
                raise SnapshotError(f"snapshot copy shrank while being sent ({sent} of {size} bytes)")
            sent += len(blob)
            sha.update(blob)
            yield blob, size - sent
        yield sha.digest(), 0


def save(store: Store, path: str | os.PathLike[str], progress: bool = False) -> int:
    """Write a snapshot of ``store`` to ``path``; returns its size in bytes.

    Written to ``path.part``, fsynced, then renamed, as etcdctl does, so
    ``path`` is either absent or complete.
    """
    path = os.fspath(path)
    with _atomic_file(path) as out, _progress(progress, "save") as bar:
        for blob, remaining in iter_snapshot(store):
            if bar.total is None:
                bar.total = len(blob) + remaining + HASH_SIZE
            out.write(blob)
            bar.update(len(blob))
        written = out.tell()
    return written


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
            with _atomic_file(path) as out, _progress(progress, "save") as bar:
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
    path: str | os.PathLike[str],
    data_dir: str | os.PathLike[str],
    progress: bool = False,
    skip_hash_check: bool = False,
) -> SnapshotStatus:
    """Restore the snapshot file ``path`` into the new data dir ``data_dir``.

    ``data_dir`` must not exist or be empty (:class:`FileExistsError`
    otherwise).  The trailer is verified unless ``skip_hash_check``, which
    also admits a bare database copy without one.  A corrupt, truncated or
    foreign file raises :class:`SnapshotError` and leaves ``data_dir`` as it
    was: everything is built in a sibling directory that is renamed into
    place only when complete and synced.

    Returns the status of the restored database: the same as
    :func:`status` of the file except that ``hash`` leaves out the member
    identity dropped by the restore (it is what ``Store.hash()`` of the
    restored store reports) and ``total_size`` is that of ``data.mdb``.
    """
    path = os.fspath(path)
    data_dir = os.path.abspath(os.fspath(data_dir))
    if os.path.lexists(data_dir) and not (os.path.isdir(data_dir) and not os.listdir(data_dir)):
        raise FileExistsError(errno.EEXIST, "data dir exists and is not empty; restore needs a new one", data_dir)
    parent = os.path.dirname(data_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(data_dir)}.restore-", dir=parent)
    try:
        db_dir = os.path.join(staging, "db")
        os.mkdir(db_dir)
        db_file = os.path.join(db_dir, "data.mdb")
        with open(db_file, "xb") as out, _progress(progress, "restore") as bar:
            _extract(path, out, bar, require_hash=not skip_hash_check, check_hash=not skip_hash_check)
            out.flush()
            os.fsync(out.fileno())
        _check_lmdb(db_file, path)
        restored = _forget_identity(db_file, path)
        _fsync_dir(db_dir)
        _fsync_dir(staging)
        if os.path.isdir(data_dir):
            os.rmdir(data_dir)  # empty (checked above); fails if that changed meanwhile
        os.rename(staging, data_dir)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return restored


def status(path: str | os.PathLike[str]) -> SnapshotStatus:
    """Hash, revision, live keys, size and storage version of a snapshot file.

    The database part is copied to a temporary directory and opened
    read-only there: the file itself is never opened for writing.  A
    trailer, when present, is verified (a corrupt file raises
    :class:`SnapshotError`); a file without one is read as a bare copy.
    """
    path = os.fspath(path)
    with tempfile.TemporaryDirectory(prefix="mvcckv-status-") as tmp:
        db_file = os.path.join(tmp, "data.mdb")
        with open(db_file, "xb") as out, _progress(False, "") as bar:
            _extract(path, out, bar, require_hash=False, check_hash=True)
        _check_lmdb(db_file, path)
        try:
            env = lmdb.open(tmp, subdir=True, readonly=True, lock=False, max_dbs=len(DATABASES) + 2)
        except lmdb.Error as e:
            raise SnapshotError(f"{path}: not a readable mvcckv snapshot: {e}") from None
        try:
            h, revision, keys, version = _scan(env, path)
        finally:
            env.close()
        return SnapshotStatus(h, revision, keys, os.path.getsize(path), version)


def _extract(path: str, out: BinaryIO, bar: tqdm, *, require_hash: bool, check_hash: bool) -> None:
    """Copy the database part of snapshot ``path`` to ``out``, checking its trailer."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        has_hash = size % ALIGNMENT == HASH_SIZE
        if not has_hash and require_hash:
            raise SnapshotError(
                f"{path}: no sha256 checksum at the end ({size} bytes is not a multiple of "
                f"{ALIGNMENT} plus {HASH_SIZE}): the file is truncated or not a snapshot "
                "(restore a bare database copy with --skip-hash-check)"
            )
        data_len = size - HASH_SIZE if has_hash else size
        bar.total = size
        sha = hashlib.sha256()
        left = data_len
        for _ in range(-(-data_len // _COPY_CHUNK)):
            chunk = f.read(min(_COPY_CHUNK, left))
            if not chunk:
                done = data_len - left
                raise SnapshotError(f"{path}: the file shrank while being read ({done} of {data_len} bytes)")
            sha.update(chunk)
            out.write(chunk)
            left -= len(chunk)
            bar.update(len(chunk))
        if has_hash:
            trailer = f.read(HASH_SIZE)
            bar.update(len(trailer))
            if check_hash and trailer != sha.digest():
                raise SnapshotError(
                    f"{path}: sha256 mismatch: the file is corrupt "
                    f"(its checksum is {trailer.hex()}, its data hashes to {sha.hexdigest()})"
                )


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
    (magic,) = _META_MAGIC.unpack_from(head, 16)
    if magic == _BBOLT_MAGIC:
        raise SnapshotError(f"{path}: an etcd (bbolt) database; mvcckv restores only its own (LMDB) snapshots")
    if magic != _LMDB_MAGIC:
        raise SnapshotError(f"{path}: not an mvcckv snapshot (no LMDB header)")
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


@contextlib.contextmanager
def _atomic_file(path: str) -> Iterator[BinaryIO]:
    """A file written as ``path.part`` and renamed to ``path`` once synced."""
    part = path + ".part"
    out = os.fdopen(os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb")
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
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        help="save a snapshot of a server or of a data dir",
        description="Save a point-in-time snapshot to FILE (written as FILE.part, then renamed).",
    )
    save_p.add_argument("file", metavar="FILE")
    source = save_p.add_mutually_exclusive_group(required=True)
    source.add_argument("--endpoints", metavar="URL", help="the server to snapshot (host:port or http://host:port)")
    source.add_argument("--data-dir", metavar="DIR", help="a data dir no server is using")
    save_p.add_argument("--dial-timeout", type=float, default=5.0, metavar="SECONDS",
                        help="connection timeout with --endpoints (default: %(default)s)")
    save_p.add_argument("--command-timeout", type=float, default=None, metavar="SECONDS",
                        help="limit on the whole transfer with --endpoints (default: none)")
    save_p.add_argument("--progress", action="store_true", help=_PROGRESS_HELP)
    save_p.set_defaults(func=_cmd_save)

    restore_p = sub.add_parser(
        "restore",
        help="restore a snapshot into a new data dir",
        description="Restore FILE into a new data dir (the snapshot's member identity is dropped).",
    )
    restore_p.add_argument("file", metavar="FILE")
    restore_p.add_argument("--data-dir", metavar="DIR", required=True, help="the new data dir (absent or empty)")
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
        if not os.path.isfile(os.path.join(args.data_dir, "db", "data.mdb")):
            raise SnapshotError(f"{args.data_dir}: no mvcckv data dir here")
        with Store(args.data_dir) as store:
            return save(store, args.file, progress=_show_progress(args))

    def report() -> None:
        size = run()
        print(f"Snapshot saved at {args.file} ({size} bytes)")

    return _run(report)


def _cmd_restore(args: argparse.Namespace) -> int:
    def run() -> None:
        st = restore(args.file, args.data_dir, progress=_show_progress(args), skip_hash_check=args.skip_hash_check)
        print(f"Snapshot restored to {args.data_dir} (revision {st.revision}, {st.total_keys} keys)")

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

r"""bbolt's file format: a streaming reader and a bulk-loading writer.

etcd keeps its backend in a bbolt file, and its snapshots are that file
(plus a SHA-256 trailer, see ``snapshot.py``).  This module knows pages,
meta pages and B+trees; which buckets etcd keeps and what their values mean
is ``etcdfile.py``'s business.

The file is an array of pages of one size (4096 bytes in practice).  Every
page starts with a 16-byte header, little-endian::

    id u64 | flags u16 (branch 0x01, leaf 0x02, meta 0x04, freelist 0x10)
           | count u16 | overflow u32

A page holding more than ``page_size`` bytes takes ``overflow`` more pages
right after it.  Pages 0 and 1 are meta pages; at byte 16 of each::

    magic 0xED0CDAED u32 | version 2 u32 | page size u32 | flags u32
    | root bucket {root pgid u64, sequence u64} | freelist pgid u64
    | high-water pgid u64 | txid u64 | FNV-1a-64 of the 56 bytes before

bbolt trusts the valid meta with the larger txid.  etcd runs with
``NoFreelistSync``: the freelist pgid is all ones and every page below the
high water that no tree reaches is free.

A leaf page holds ``count`` 16-byte elements (flags u32 — 1 marks a nested
bucket —, pos u32, ksize u32, vsize u32), then the keys and values; ``pos``
counts from the element's own first byte.  A branch element is pos u32,
ksize u32, child pgid u64, and its key is the first key of that child.  A
bucket's value in its parent is {root pgid u64, sequence u64}; root 0 means
an *inline* bucket whose leaf page follows in the value itself (bbolt
inlines a bucket without sub-buckets while its page would take at most a
quarter page).  The root bucket of the file holds one such value per
top-level bucket.

The reader holds one root-to-leaf path of pages (and the ids of the pages
it has visited), so a file of any size streams in bounded memory; it checks every page it follows
(inside the file and below the high water, of the expected type, visited
once, elements inside the page, keys in order within the bounds its parent
gives) and raises :class:`mvcckv.errors.BoltError` naming the file and the
page, so a corrupt file fails cleanly instead of hanging or reading past the
end.  :meth:`Reader.check` is bbolt's ``Tx.Check``, which ``etcdctl
snapshot status`` runs before it hashes.

The writer streams sorted items into full leaf pages, then builds the branch
levels above them (one element per child page kept in memory), so it too
runs in bounded memory; pages are allocated densely from 2 and nothing is
free, so the result passes ``Tx.Check``.

>>> import io
>>> buf = io.BytesIO()
>>> w = Writer(buf)
>>> w.bucket(b"fruit", [(b"apple", b"1"), (b"pear", b"2")])
>>> size = w.finish()
>>> r = Reader(buf, "mem")
>>> [name for name, _ in r.buckets()], list(r.items(b"fruit")), r.check()
([b'fruit'], [(b'apple', b'1'), (b'pear', b'2')], [])
"""

from __future__ import annotations

import itertools
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from mvcckv.errors import BoltError

MAGIC = 0xED0CDAED
VERSION = 2
PAGE_SIZE = 4096
NO_FREELIST = (1 << 64) - 1

BRANCH_PAGE = 0x01
LEAF_PAGE = 0x02
META_PAGE = 0x04
FREELIST_PAGE = 0x10
BUCKET_LEAF = 0x01

_HEADER = struct.Struct("<QHHI")
_HEADER_SIZE = _HEADER.size
_ELEMENT_SIZE = 16
_LEAF_ELEMENT = struct.Struct("<IIII")
_BRANCH_ELEMENT = struct.Struct("<IIQ")
_META = struct.Struct("<IIIIQQQQQ")
_CHECKSUMMED = _META.size  # 56 bytes, then the checksum
_U64 = struct.Struct("<Q")
_BUCKET = struct.Struct("<QQ")
_MIN_PAGE, _MAX_PAGE = 512, 65536
# bbolt's trees are a few levels deep; anything deeper is a corrupt file
# that would otherwise make the walk go on for as long as the file lasts.
_MAX_DEPTH = 32


def fnv1a64(data: bytes) -> int:
    """FNV-1a, 64 bits: bbolt's meta page checksum.

    >>> hex(fnv1a64(b""))
    '0xcbf29ce484222325'
    """
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


@dataclass(frozen=True)
class Meta:
    page_size: int
    flags: int
    root: int
    sequence: int
    freelist: int
    pgid: int
    """The high water: the first page id never allocated."""
    txid: int


def _parse_meta(page: bytes) -> Meta | str:
    """The meta in a meta page, or why it is not a valid one (bbolt's words)."""
    if len(page) < _HEADER_SIZE + _CHECKSUMMED + 8:
        return "invalid database"
    fields = _META.unpack_from(page, _HEADER_SIZE)
    magic, version, page_size, flags, root, sequence, freelist, pgid, txid = fields
    if magic != MAGIC:
        return "invalid database"
    if version != VERSION:
        return "version mismatch"
    (checksum,) = _U64.unpack_from(page, _HEADER_SIZE + _CHECKSUMMED)
    if checksum != fnv1a64(page[_HEADER_SIZE:_HEADER_SIZE + _CHECKSUMMED]):
        return "checksum error"
    return Meta(page_size, flags, root, sequence, freelist, pgid, txid)


class Reader:
    """A bbolt file opened for reading.

    ``f`` is a binary file open for reading; only its first ``size`` bytes
    (default: all of it) are the database, so a snapshot's trailer can stay
    where it is.  ``name`` is what errors call the file.  Pages are read
    with positioned reads when ``f`` has a descriptor, so several readers
    may share one file.
    """

    def __init__(self, f: BinaryIO, name: str, size: int | None = None):
        self._f = f
        self.name = name
        try:
            self._fd: int | None = f.fileno()
        except (AttributeError, OSError, ValueError):
            self._fd = None
        if size is None:
            f.seek(0, os.SEEK_END)
            size = f.tell()
        self.size = size
        self.meta = self._read_meta()
        self.page_size = self.meta.page_size

    # -- raw pages ----------------------------------------------------------

    def _pread(self, n: int, offset: int) -> bytes:
        n = max(0, min(n, self.size - offset))
        if self._fd is not None:
            data = os.pread(self._fd, n, offset)
        else:
            self._f.seek(offset)
            data = self._f.read(n)
        return data

    def _read_meta(self) -> Meta:
        if self.size < 2 * _MIN_PAGE:
            raise BoltError(f"{self.name}: invalid database: {self.size} bytes is too short for a bbolt file")
        first = self._pread(_MIN_PAGE, 0)
        found: list[Meta] = []
        why = _parse_meta(first)
        if isinstance(why, Meta):
            found.append(why)
            sizes = [why.page_size]
        else:
            # Page 0 is damaged: look for page 1 at every page size bbolt allows.
            sizes = [s for s in (4096, 512, 1024, 2048, 8192, 16384, 32768, 65536)]
        for psize in sizes:
            if not (_MIN_PAGE <= psize <= _MAX_PAGE and psize & (psize - 1) == 0):
                raise BoltError(f"{self.name}: invalid database: page 0 names a page size of {psize}")
            m = _parse_meta(self._pread(_MIN_PAGE, psize))
            if isinstance(m, Meta) and m.page_size == psize:
                found.append(m)
                break
        if not found:
            raise BoltError(f"{self.name}: {why} (no valid meta page at page 0 or 1)")
        meta = max(found, key=lambda m: m.txid)
        psize = meta.page_size
        if meta.pgid < 3 or meta.pgid * psize > self.size:
            raise BoltError(
                f"{self.name}: file size too small: the meta page (txid {meta.txid}) names "
                f"{meta.pgid} pages of {psize} bytes, the file holds {self.size} bytes"
            )
        if not 2 <= meta.root < meta.pgid:
            raise BoltError(f"{self.name}: invalid database: root page {meta.root} is outside pages 2..{meta.pgid - 1}")
        return meta

    def page(self, pgid: int, what: str = "page") -> tuple[int, int, int, bytes]:
        """``(flags, count, overflow, bytes)`` of page ``pgid`` with its overflow."""
        psize = self.page_size
        if pgid >= self.meta.pgid or pgid < 2:
            raise BoltError(f"{self.name}: {what} {pgid}: out of bounds (pages 2..{self.meta.pgid - 1})")
        head = self._pread(_HEADER_SIZE, pgid * psize)
        if len(head) < _HEADER_SIZE:
            raise BoltError(f"{self.name}: page {pgid}: past the end of the file")
        pid, flags, count, overflow = _HEADER.unpack(head)
        if pid != pgid:
            raise BoltError(f"{self.name}: page {pgid}: its header says page {pid}")
        if pgid + overflow >= self.meta.pgid:
            raise BoltError(
                f"{self.name}: page {pgid}: {overflow} overflow pages run past the high water {self.meta.pgid}"
            )
        data = self._pread((overflow + 1) * psize, pgid * psize)
        return flags, count, overflow, data

    # -- trees --------------------------------------------------------------

    def buckets(self) -> list[tuple[bytes, bytes]]:
        """The top-level buckets, as ``(name, bucket value)`` in name order."""
        out = []
        for items, flags in self._walk(self.meta.root, "root bucket", set()):
            for (name, value), f in zip(items, flags or (0,) * len(items)):
                if not f & BUCKET_LEAF:
                    raise BoltError(f"{self.name}: root bucket: {name!r} is a value, not a bucket")
                out.append((name, value))
        return out

    def bucket_value(self, name: bytes) -> bytes | None:
        for n, value in self.buckets():
            if n == name:
                return value
        return None

    def batches(self, name: bytes) -> Iterator[list[tuple[bytes, bytes]]]:
        """The ``(key, value)`` items of top-level bucket ``name`` in key
        order, one list per leaf page (nothing if the bucket is absent).  A
        nested bucket is an error: etcd's buckets hold none."""
        value = self.bucket_value(name)
        if value is None:
            return
        what = f"bucket {name.decode(errors='replace')!r}"
        for items, flags in self.bucket_pages(value, what, set()):
            if flags:
                for (k, _), f in zip(items, flags):
                    if f & BUCKET_LEAF:
                        raise BoltError(f"{self.name}: {what}: {k!r} is a nested bucket")
            yield items

    def items(self, name: bytes) -> Iterator[tuple[bytes, bytes]]:
        """:meth:`batches`, one item at a time."""
        for batch in self.batches(name):
            yield from batch

    def bucket_pages(self, value: bytes, what: str, seen: set[int]) -> Iterator[tuple[list, list | None]]:
        """Per leaf page, ``(items, flags)`` of the bucket whose value in its
        parent is ``value``; ``flags`` is None when no item is a nested bucket."""
        if len(value) < _BUCKET.size:
            raise BoltError(f"{self.name}: {what}: bucket header of {len(value)} bytes")
        root, _ = _BUCKET.unpack_from(value)
        if root:
            yield from self._walk(root, what, seen)
            return
        page = value[_BUCKET.size:]
        if len(page) < _HEADER_SIZE:
            raise BoltError(f"{self.name}: {what}: inline page of {len(page)} bytes")
        _, flags, count, _ = _HEADER.unpack_from(page)
        if flags != LEAF_PAGE:
            raise BoltError(f"{self.name}: {what}: inline page is not a leaf (flags {flags:#x})")
        items, item_flags = self._leaf_page(page, count, f"{what} (inline)")
        keys = [k for k, _ in items]
        if keys != sorted(set(keys)):
            raise BoltError(f"{self.name}: {what} (inline): keys out of order")
        yield items, item_flags

    def _leaf_page(self, data: bytes, count: int, where: str) -> tuple[list, list | None]:
        end = len(data)
        top = _HEADER_SIZE + count * _ELEMENT_SIZE
        if top > end:
            raise BoltError(f"{self.name}: {where}: {count} elements do not fit in the page")
        # (key start, value start, value end, flags) per element; pos counts
        # from the element's own first byte.
        spans = [
            (at + pos, at + pos + ksize, at + pos + ksize + vsize, flags)
            for at, (flags, pos, ksize, vsize) in zip(
                range(_HEADER_SIZE, top, _ELEMENT_SIZE), _LEAF_ELEMENT.iter_unpack(data[_HEADER_SIZE:top])
            )
        ]
        if spans and (max(s[2] for s in spans) > end or min(s[0] for s in spans) < top):
            for i, (k0, _, v1, _) in enumerate(spans):
                if v1 > end or k0 < top:
                    raise BoltError(f"{self.name}: {where}: element at byte {_HEADER_SIZE + i * _ELEMENT_SIZE} "
                                    "points past the page")
        items = [(data[k0:v0], data[v0:v1]) for k0, v0, v1, _ in spans]
        flags = [s[3] for s in spans]
        return items, (flags if any(flags) else None)

    def _branch_elements(self, data: bytes, count: int, where: str) -> list[tuple[bytes, int]]:
        end = len(data)
        if count == 0 or _HEADER_SIZE + count * _ELEMENT_SIZE > end:
            raise BoltError(f"{self.name}: {where}: a branch page with {count} elements")
        out = []
        off = _HEADER_SIZE
        for pos, ksize, child in _BRANCH_ELEMENT.iter_unpack(data[off:off + count * _ELEMENT_SIZE]):
            k0 = off + pos
            if pos < _ELEMENT_SIZE or k0 + ksize > end:
                raise BoltError(f"{self.name}: {where}: element at byte {off} points past the page")
            out.append((data[k0:k0 + ksize], child))
            off += _ELEMENT_SIZE
        return out

    def _walk(self, root: int, what: str, seen: set[int]) -> Iterator[tuple[list, list | None]]:
        """Depth-first over the tree at page ``root``: per leaf page in key
        order, its ``(items, flags)`` (see :meth:`bucket_pages`).

        ``seen`` collects every page visited (overflow pages included); a
        page met twice is a cycle or a shared page, either way corruption.
        Keys must be strictly ascending across the whole walk, and each
        child's lie in ``[its branch key, the next one)``.
        """
        # One iterator of (child, low, high) per branch page on the path.
        stack: list[Iterator[tuple[int, bytes | None, bytes | None]]] = [iter([(root, None, None)])]
        prev: bytes | None = None
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                stack.pop()
                continue
            pgid, low, high = nxt
            if pgid in seen:
                raise BoltError(f"{self.name}: {what}: page {pgid}: multiple references (a cycle or a shared page)")
            if len(stack) > _MAX_DEPTH:
                raise BoltError(f"{self.name}: {what}: page {pgid}: tree deeper than {_MAX_DEPTH} levels")
            flags, count, overflow, data = self.page(pgid, f"{what}: page")
            seen.update(range(pgid, pgid + overflow + 1))
            where = f"{what}: page {pgid}"
            if flags == BRANCH_PAGE:
                elems = self._branch_elements(data, count, where)
                if low is not None and elems[0][0] < low:
                    raise BoltError(f"{self.name}: {where}: first key {elems[0][0]!r} is below its parent's {low!r}")
                bounded = []
                for i, (key, child) in enumerate(elems):
                    nkey = elems[i + 1][0] if i + 1 < len(elems) else high
                    if nkey is not None and key >= nkey:
                        raise BoltError(f"{self.name}: {where}: keys out of order at {key!r}")
                    bounded.append((child, key, nkey))
                stack.append(iter(bounded))
            elif flags == LEAF_PAGE:
                items, item_flags = self._leaf_page(data, count, where)
                if not items:
                    continue
                keys = [k for k, _ in items]
                first, last = keys[0], keys[-1]
                if (
                    (prev is not None and first <= prev) or (low is not None and first < low)
                    or keys != sorted(set(keys))
                ):
                    raise BoltError(f"{self.name}: {where}: keys out of order")
                if high is not None and last >= high:
                    raise BoltError(f"{self.name}: {where}: key {last!r} is not below its parent's next key")
                prev = last
                yield items, item_flags
            else:
                raise BoltError(f"{self.name}: {where}: invalid type (flags {flags:#x}), expected a branch or leaf")

    # -- bbolt's Tx.Check ---------------------------------------------------

    def freed(self) -> set[int]:
        """Pages on the stored freelist (none when the file keeps none)."""
        if self.meta.freelist == NO_FREELIST:
            return set()
        flags, count, _, data = self.page(self.meta.freelist, "freelist page")
        if flags != FREELIST_PAGE:
            raise BoltError(f"{self.name}: freelist page {self.meta.freelist}: invalid type (flags {flags:#x})")
        start = _HEADER_SIZE
        if count == 0xFFFF:  # the real count is the first element
            (count,) = _U64.unpack_from(data, start)
            start += 8
        if start + count * 8 > len(data):
            raise BoltError(f"{self.name}: freelist page {self.meta.freelist}: {count} ids do not fit")
        return {i for (i,) in _U64.iter_unpack(data[start:start + count * 8])}

    def check(self, limit: int = 100) -> list[str]:
        """bbolt's consistency check: every page below the high water is
        reachable exactly once or free, every tree page is a branch or leaf,
        keys are in order.  Returns the problems found (at most ``limit``),
        empty for a sound file.  Errors that stop a tree walk are reported
        as one problem and the check goes on with the next bucket."""
        problems: list[str] = []
        try:
            freed = self.freed()
        except BoltError as e:
            return [str(e)]
        reachable: set[int] = {0, 1}
        if self.meta.freelist != NO_FREELIST:
            _, _, overflow, _ = self.page(self.meta.freelist, "freelist page")
            reachable.update(range(self.meta.freelist, self.meta.freelist + overflow + 1))
        stored_freelist = self.meta.freelist != NO_FREELIST

        def visit(root_value: bytes | None, root_pgid: int | None, what: str) -> None:
            seen: set[int] = set()
            nested = []
            try:
                if root_pgid is not None:
                    pages = self._walk(root_pgid, what, seen)
                else:
                    pages = self.bucket_pages(root_value, what, seen)
                for items, flags in pages:
                    if flags:
                        nested += [kv for kv, f in zip(items, flags) if f & BUCKET_LEAF]
            except BoltError as e:
                problems.append(str(e))
            for pgid in sorted(seen):
                if pgid in reachable:
                    problems.append(f"{self.name}: page {pgid}: multiple references")
                if pgid in freed:
                    problems.append(f"{self.name}: page {pgid}: reachable freed")
            reachable.update(seen)
            for k, v in nested:
                if len(problems) < limit:
                    visit(v, None, f"bucket {k.decode(errors='replace')!r}")

        visit(None, self.meta.root, "root bucket")
        if stored_freelist:
            for pgid in range(self.meta.pgid):
                if pgid not in reachable and pgid not in freed:
                    problems.append(f"{self.name}: page {pgid}: unreachable unfreed")
                    if len(problems) >= limit:
                        break
        return problems[:limit]

    @property
    def tx_size(self) -> int:
        """bbolt's ``Tx.Size``: high water times page size."""
        return self.meta.pgid * self.page_size


def _check_order(items: list[tuple[bytes, bytes]], name: bytes) -> None:
    prev = None
    for k, _ in items:
        if not k or (prev is not None and k <= prev):
            raise ValueError(f"bucket {name!r}: key {k!r} is empty or not after {prev!r}")
        prev = k


class Writer:
    """Writes a new bbolt file to ``out`` (binary, seekable) from its
    current position.

    Call :meth:`bucket` once per top-level bucket, names in ascending byte
    order, each with its items in ascending key order, then :meth:`finish`.
    The meta pages are written last, so a file cut short by a crash has
    none and no reader takes it for a database.

    Memory: one page being filled plus one branch element per page of the
    bucket being written.
    """

    def __init__(self, out: BinaryIO, page_size: int = PAGE_SIZE):
        self._out = out
        self.page_size = page_size
        self._base = out.tell()
        self._next = 2  # pages 0 and 1 are the meta pages
        self._root: list[tuple[bytes, bytes]] = []
        self._last_bucket: bytes | None = None
        out.seek(self._base + 2 * page_size)

    def bucket(self, name: bytes, items: Iterable[tuple[bytes, bytes]], sequence: int = 0) -> None:
        """Add bucket ``name`` holding ``items``; raises ValueError if
        names or keys are not strictly ascending or a key is empty."""
        if not name or (self._last_bucket is not None and name <= self._last_bucket):
            raise ValueError(f"bucket {name!r} is empty or not after {self._last_bucket!r}")
        self._last_bucket = name
        inline_limit = self.page_size // 4
        buffered: list[tuple[bytes, bytes]] = []
        size = _HEADER_SIZE
        it = iter(items)
        # Buffer until the bucket is known not to fit inline.
        for k, v in it:
            buffered.append((k, v))
            size += _ELEMENT_SIZE + len(k) + len(v)
            if size > inline_limit:
                root = self._tree(itertools.chain(buffered, it), 0, name)
                self._root.append((name, _BUCKET.pack(root, sequence)))
                return
        _check_order(buffered, name)
        page = self._leaf_bytes(0, buffered, [(len(k), len(v)) for k, v in buffered], 0)
        self._root.append((name, _BUCKET.pack(0, sequence) + page))

    def finish(self, txid: int = 2) -> int:
        """Write the root bucket and the meta pages; returns the file size.

        Page 0 gets ``txid`` and page 1 ``txid - 1``: both describe the same
        tree, and bbolt's next commit goes to page ``(txid + 1) % 2``.
        """
        root = self._tree(iter(self._root), BUCKET_LEAF, b"") if self._root else self._write_leaf([], [], 0)
        psize = self.page_size
        for pgid, tx in ((0, txid), (1, txid - 1)):
            page = bytearray(psize)
            _HEADER.pack_into(page, 0, pgid, META_PAGE, 0, 0)
            _META.pack_into(page, _HEADER_SIZE, MAGIC, VERSION, psize, 0, root, 0, NO_FREELIST, self._next, tx)
            _U64.pack_into(page, _HEADER_SIZE + _CHECKSUMMED,
                           fnv1a64(bytes(page[_HEADER_SIZE:_HEADER_SIZE + _CHECKSUMMED])))
            self._out.seek(self._base + pgid * psize)
            self._out.write(page)
        self._out.seek(self._base + self._next * psize)
        return self._next * psize

    # -- pages --------------------------------------------------------------

    def _tree(self, items: Iterator[tuple[bytes, bytes]], flags: int, name: bytes) -> int:
        """Write leaves for ``items`` (each element gets ``flags``) and the
        branches above them; the root pgid.  Keys must be non-empty and
        strictly ascending (ValueError naming bucket ``name`` otherwise)."""
        psize = self.page_size
        level: list[tuple[bytes, int]] = []
        page: list[tuple[bytes, bytes]] = []
        lens: list[tuple[int, int]] = []
        size = _HEADER_SIZE
        prev = None
        for k, v in items:
            lk, lv = len(k), len(v)
            if not lk or (prev is not None and k <= prev):
                raise ValueError(f"bucket {name!r}: key {k!r} is empty or not after {prev!r}")
            prev = k
            n = _ELEMENT_SIZE + lk + lv
            if page and size + n > psize:
                level.append((page[0][0], self._write_leaf(page, lens, flags)))
                page, lens, size = [], [], _HEADER_SIZE
            page.append((k, v))
            lens.append((lk, lv))
            size += n
        if page or not level:
            level.append((page[0][0] if page else b"", self._write_leaf(page, lens, flags)))
        while len(level) > 1:
            parents: list[tuple[bytes, int]] = []
            page_b: list[tuple[bytes, int]] = []
            size = _HEADER_SIZE
            for key, child in level:
                n = _ELEMENT_SIZE + len(key)
                # At least two children per branch page, so each level shrinks.
                if len(page_b) >= 2 and size + n > psize:
                    parents.append((page_b[0][0], self._write_branch(page_b)))
                    page_b, size = [], _HEADER_SIZE
                page_b.append((key, child))
                size += n
            parents.append((page_b[0][0], self._write_branch(page_b)))
            level = parents
        return level[0][1]

    def _leaf_bytes(self, pgid: int, items: list[tuple[bytes, bytes]], lens: list[tuple[int, int]],
                    flags: int) -> bytes:
        n = len(items)
        fields: list[int] = []
        pos = n * _ELEMENT_SIZE  # from element 0 to the first key
        for i, (lk, lv) in enumerate(lens):
            fields += (flags, pos - i * _ELEMENT_SIZE, lk, lv)
            pos += lk + lv
        return b"".join((
            _HEADER.pack(pgid, LEAF_PAGE, n, 0),
            struct.pack(f"<{4 * n}I", *fields),
            b"".join([b for kv in items for b in kv]),
        ))

    def _write_leaf(self, items: list[tuple[bytes, bytes]], lens: list[tuple[int, int]], flags: int) -> int:
        return self._write_page(self._leaf_bytes(self._next, items, lens, flags))

    def _write_branch(self, children: list[tuple[bytes, int]]) -> int:
        n = len(children)
        elems = []
        pos = n * _ELEMENT_SIZE
        for i, (key, child) in enumerate(children):
            elems.append(_BRANCH_ELEMENT.pack(pos - i * _ELEMENT_SIZE, len(key), child))
            pos += len(key)
        body = b"".join(elems) + b"".join(k for k, _ in children)
        return self._write_page(_HEADER.pack(self._next, BRANCH_PAGE, n, 0) + body)

    def _write_page(self, page: bytes) -> int:
        """Write ``page`` (header already holding its id) at the next free
        page, with overflow pages if it is bigger than one; its pgid."""
        psize = self.page_size
        pgid = self._next
        pages = -(-len(page) // psize)
        if pages > 1:
            page = page[:10] + struct.pack("<HI", _HEADER.unpack_from(page)[2], pages - 1) + page[16:]
        self._out.write(page)
        pad = pages * psize - len(page)
        if pad:
            self._out.write(bytes(pad))
        self._next += pages
        return pgid

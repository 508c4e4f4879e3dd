"""The in-memory index: for every key, the revisions that hold its versions.

The backend stores each change under its revision; this index is what turns
"key K as of revision R" into "read the backend entry at revision (m, s)".
It is etcd's ``treeIndex`` of ``keyIndex`` values: ``TreeIndex`` is an
ordered map from each key to its history, which ``KeyIndex`` wraps and
which is kept as a list of generations.

Generations
-----------

A **generation** is one life of a key, from the put that creates it to the
tombstone that deletes it: ``created`` (the creating revision), ``ver`` (how
many revisions were appended to it, tombstone included) and ``revs`` (its
revisions, ascending).  A tombstone is appended like a put (``ver`` grows
too) and then a new, empty generation is started.  Hence the invariant:

    every generation but the last is non-empty and ends with its tombstone;
    the last one is the key's current life and is empty iff the key is
    deleted now.

Worked example, key ``b"lock"`` (``m.s`` is revision ``(m, s)``, ``t`` a
tombstone)::

    put(3.0); put(5.1); tombstone(7.0); put(8.0); tombstone(11.0)

    generations:  {created 3.0, ver 3: 3.0  5.1  7.0t}
                  {created 8.0, ver 2: 8.0  11.0t}
                  {empty}

    get(2)    -> not found (not yet created)
    get(3..4) -> mod 3.0, created 3.0, version 1
    get(5..6) -> mod 5.1, created 3.0, version 2
    get(7)    -> not found (deleted at 7)
    get(8..10)-> mod 8.0, created 8.0, version 1
    get(11..) -> not found

``version`` is ``ver`` minus the revisions after the visible one, which is
why ``ver`` is never reduced by compaction: versions stay right after older
revisions are gone.

Compaction at ``at`` keeps, per key, the one revision with main <= ``at``
that is visible at ``at`` -- or the tombstone if the key was deleted exactly
at ``at`` (etcd 3.4.34 / 3.5.16+; older releases dropped it) -- and every
revision after ``at``.  Generations that ended before ``at`` are dropped;
a key left with a single empty generation leaves the index.  Each call
below starts again from the full history above:

    compact(4)  -> {3.0 5.1 7.0t} {8.0 11.0t} {}   kept {3.0}
    compact(6)  -> {5.1 7.0t} {8.0 11.0t} {}       kept {5.1}
    compact(7)  -> {7.0t} {8.0 11.0t} {}           kept {7.0}  (tombstone at 7)
    compact(9)  -> {8.0 11.0t} {}                  kept {8.0}
    compact(11) -> {11.0t} {}                      kept {11.0} (tombstone at 11)
    compact(12) -> {}                              kept {}     key removed

``keep(at)`` (HashKV's kept set) is compact's set without mutating and
without the tombstone-at-``at`` case: ``keep(7)`` and ``keep(11)`` are empty.

Deleted and re-created in one revision
--------------------------------------

One txn can delete a key and put it again -- a DeleteRange to ``"\\0"`` is
not checked against the txn's puts (spec 5.3) -- giving
``tombstone(m.0); put(m.1)``.  etcd's code, compacting at exactly ``m``,
stops at the generation whose tombstone is ``m.0``: it keeps that tombstone
and not ``m.1``, so the backend deletes the put the index still points to.
Here that generation is skipped when the next one already began at or
before ``at``, and ``m.1`` -- the revision visible at ``m`` -- is kept.  That
is the rule every other case follows: keep the newest revision with
main <= ``at`` if it is a put, or a tombstone exactly at ``at``.

Representation
--------------

An index of a million keys lives in one Python process, so the encoding
is chosen for memory first (figures in ``bench/bench_index.py``):

* A revision is stored as one int, ``main << 32 | sub``.  Packed ints order
  like ``(main, sub)`` pairs, take 32 bytes instead of a 64-byte tuple plus
  its ints, and "main <= at" is the single comparison
  ``p < (at + 1) << 32``.  ``Revision`` tuples are built only on the way out.
* A key's generations are held in one of three encodings:

  - ``int p``: ``[{created p, ver 1: p}]`` -- a key put once.  This is
    the shape of most keys of a freshly loaded store.
  - ``tuple (created, ver, p)``: ``[{created, ver: p}]`` -- a live key
    with a single revision left, the steady state of most keys after
    compaction or a restart.
  - ``list`` of ``_Generation``: anything else.  An empty list is a key
    never written.

  The first write that needs more than a compact encoding expands it to the
  list; compaction packs a key back when one live revision remains.
* The functions ``_put``, ``_get``, ``_compact``... below work on an
  encoding and return the (possibly new) encoding.  ``KeyIndex`` is such an
  encoding with its key attached; ``TreeIndex`` maps each key straight to
  its encoding, without a ``KeyIndex`` around it: that saves 48 bytes and a
  pointer hop per key, and keeps a million objects out of the cyclic
  garbage collector's full scans (bench_index, 1M keys: 139 instead of 187
  bytes per loaded key; a full ``gc.collect()`` 0.1 s instead of 0.4 s).

Nothing here locks: the store serialises writers and readers around every
call (``TreeIndex.compact_steps`` is built to let it release its lock
between steps).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from itertools import islice
from typing import NamedTuple

from sortedcontainers import SortedDict

from mvcckv.revision import Revision

__all__ = ["Generation", "KeyIndex", "RevisionNotFoundError", "TreeIndex"]

_SUB_BITS = 32
_SUB_MASK = (1 << _SUB_BITS) - 1
# What range_packed's revisions are made of, for its callers.
PACKED_SUB_BITS, PACKED_SUB_MASK = _SUB_BITS, _SUB_MASK

# tuple.__new__(Revision, pair) skips the NamedTuple's Python-level __new__:
# 165 ns instead of 270 ns per Revision built (timeit), paid on every get and
# on every key a range returns.
_new_tuple = tuple.__new__

# Range end that means "every key >= key" (etcd's "\0" range_end).
_TO_THE_END = b"\0"


class RevisionNotFoundError(Exception):
    """No revision of the key is visible at the requested revision.

    Internal to the engine (etcd's ``ErrRevisionNotFound``): the store turns
    it into "key absent", it never reaches a client.
    """

    def __init__(self, message: str = "mvcc: revision not found"):
        super().__init__(message)


class Generation(NamedTuple):
    """A read-only view of one generation, as ``KeyIndex.generations`` gives it."""

    created: Revision
    ver: int
    revs: tuple[Revision, ...]


def _pack(main: int, sub: int) -> int:
    if not 0 <= sub <= _SUB_MASK:
        # A wider sub would overflow into main and break the ordering; no
        # transaction the store can hold in memory has 2**32 changes.
        raise ValueError(f"sub revision {sub} out of range [0, 2**32)")
    return main << _SUB_BITS | sub


def _unpack(p: int) -> Revision:
    return _new_tuple(Revision, (p >> _SUB_BITS, p & _SUB_MASK))


def _bound(at_main: int) -> int:
    """The smallest packed revision whose main is greater than ``at_main``."""
    return (at_main + 1) << _SUB_BITS


class _Generation:
    """One life of a key (see the module docstring); revisions packed."""

    __slots__ = ("created", "ver", "revs")

    def __init__(self, created: int, ver: int, revs: list[int]):
        self.created = created
        self.ver = ver
        self.revs = revs


# A key's generations in one of the three encodings described above.
_Gens = int | tuple[int, int, int] | list[_Generation]


def _empty_generation() -> _Generation:
    return _Generation(0, 0, [])


def _single(created: int, ver: int, p: int) -> _Gens:
    """The compact encoding of one live generation holding only ``p``."""
    return p if (created == p and ver == 1) else (created, ver, p)


def _as_list(gens: _Gens) -> list[_Generation]:
    """The generations as a list, without changing ``gens``."""
    if type(gens) is int:
        return [_Generation(gens, 1, [gens])]
    if type(gens) is tuple:
        created, ver, p = gens
        return [_Generation(created, ver, [p])]
    return gens


def _is_empty(gens: _Gens) -> bool:
    return type(gens) is list and (not gens or (len(gens) == 1 and not gens[0].revs))


def _is_live(gens: _Gens) -> bool:
    return type(gens) is not list or (bool(gens) and bool(gens[-1].revs))


def _modified(gens: _Gens) -> int:
    """The last packed revision recorded, -1 if none."""
    if type(gens) is int:
        return gens
    if type(gens) is tuple:
        return gens[2]
    for gen in reversed(gens):
        if gen.revs:
            return gen.revs[-1]
    return -1


def _put(gens: _Gens, p: int, key: bytes) -> _Gens:
    if type(gens) is list and not gens:
        return p
    if p <= _modified(gens):
        raise ValueError(
            f"put of {_unpack(p)} on {key!r} is not after its last revision "
            f"{_unpack(_modified(gens))}"
        )
    gens = _as_list(gens)
    gen = gens[-1]
    if not gen.revs:
        gen.created = p
    gen.revs.append(p)
    gen.ver += 1
    return gens


def _tombstone(gens: _Gens, p: int, key: bytes) -> _Gens:
    if not _is_live(gens):
        raise RevisionNotFoundError()
    gens = _put(gens, p, key)
    gens.append(_empty_generation())
    return gens


def _find_visible(gens: list[_Generation], bound: int) -> tuple[_Generation, int] | None:
    """The generation and position of the revision visible below ``bound``.

    Walks from the newest generation: the first one whose first revision is
    below ``bound`` holds the answer, unless a tombstone below ``bound``
    ended it (the key was deleted at that point).
    """
    last = len(gens) - 1
    for i in range(last, -1, -1):
        gen = gens[i]
        revs = gen.revs
        if not revs:
            continue
        if i != last and revs[-1] < bound:
            return None
        if revs[0] < bound:
            return gen, bisect_left(revs, bound) - 1
    return None


def _get(gens: _Gens, at_main: int) -> tuple[Revision, Revision, int]:
    bound = (at_main + 1) << _SUB_BITS
    if type(gens) is int:
        if gens < bound:
            # Inlined _unpack: one call less on the hottest read path.
            rev = _new_tuple(Revision, (gens >> _SUB_BITS, gens & _SUB_MASK))
            return rev, rev, 1
    elif type(gens) is tuple:
        created, ver, p = gens
        if p < bound:
            return _unpack(p), _unpack(created), ver
    else:
        found = _find_visible(gens, bound)
        if found is not None:
            gen, n = found
            revs = gen.revs
            return _unpack(revs[n]), _unpack(gen.created), gen.ver - (len(revs) - 1 - n)
    raise RevisionNotFoundError()


def _visible(gens: _Gens, bound: int) -> int:
    """The packed revision visible below ``bound``, or -1; never raises."""
    if type(gens) is int:
        return gens if gens < bound else -1
    if type(gens) is tuple:
        p = gens[2]
        return p if p < bound else -1
    found = _find_visible(gens, bound)
    return -1 if found is None else found[0].revs[found[1]]


def _since(gens: _Gens, low: int) -> list[int]:
    if type(gens) is not list:
        p = gens if type(gens) is int else gens[2]
        return [p] if p >= low else []
    out: list[int] = []
    for gen in gens:
        revs = gen.revs
        if not revs or revs[-1] < low:
            continue
        for p in islice(revs, bisect_left(revs, low), None):
            # Changes of the key in one txn share a main; its readers see the last.
            if out and out[-1] >> _SUB_BITS == p >> _SUB_BITS:
                out[-1] = p
            else:
                out.append(p)
    return out


def _compaction_point(gens: list[_Generation], at_main: int) -> tuple[int, int]:
    """Where compaction at ``at_main`` cuts: (generation index, revision index).

    The generation is the first one that is the last, or whose tombstone has
    main >= ``at_main`` -- unless the next generation already started at or
    before ``at_main`` (see "Deleted and re-created in one revision"); the
    revision is its newest with main <= ``at_main`` (-1 if there is none).
    """
    tomb_floor = at_main << _SUB_BITS
    bound = _bound(at_main)
    i, last = 0, len(gens) - 1
    while i < last:
        if gens[i].revs[-1] >= tomb_floor:
            following = gens[i + 1].revs
            if not following or following[0] >= bound:
                break
        i += 1
    return i, bisect_left(gens[i].revs, bound) - 1


def _compact(gens: _Gens, at_main: int, available: set[Revision]) -> _Gens:
    if type(gens) is not list:
        p = gens if type(gens) is int else gens[2]
        if p < _bound(at_main):
            available.add(_unpack(p))
        return gens
    if not gens:
        return gens
    i, n = _compaction_point(gens, at_main)
    gen = gens[i]
    if n >= 0:
        available.add(_unpack(gen.revs[n]))
        del gen.revs[:n]
    del gens[:i]
    if len(gens) == 1 and len(gen.revs) == 1:
        return _single(gen.created, gen.ver, gen.revs[0])
    return gens


def _keep(gens: _Gens, at_main: int, available: set[Revision]) -> None:
    if type(gens) is not list:
        p = gens if type(gens) is int else gens[2]
        if p < _bound(at_main):
            available.add(_unpack(p))
        return
    if not gens:
        return
    i, n = _compaction_point(gens, at_main)
    revs = gens[i].revs
    if n < 0 or (n == len(revs) - 1 and i != len(gens) - 1):
        return
    available.add(_unpack(revs[n]))


def _generations(gens: _Gens) -> list[Generation]:
    return [
        Generation(_unpack(gen.created), gen.ver, tuple(_unpack(p) for p in gen.revs))
        for gen in _as_list(gens)
    ]


class KeyIndex:
    """One key's revisions, organised in generations (etcd's ``keyIndex``).

    Revisions given to ``put`` and ``tombstone`` must increase.  In the
    complexities below, ``g`` is the key's number of generations and ``r``
    the number of revisions in one generation; a key that has a single
    revision (most keys, most of the time) costs O(1) everywhere.

    >>> ki = KeyIndex(b"lock")
    >>> ki.put(3, 0); ki.put(5, 1); ki.tombstone(7, 0)
    >>> ki
    KeyIndex(b'lock', [{created 3.0, ver 3: 3.0 5.1 7.0t}, {}])
    >>> ki.get(6)
    (Revision(main=5, sub=1), Revision(main=3, sub=0), 2)
    >>> ki.get(7)
    Traceback (most recent call last):
    ...
    mvcckv.index.RevisionNotFoundError: mvcc: revision not found
    >>> kept = set(); ki.compact(6, kept); sorted(kept)
    [Revision(main=5, sub=1)]
    >>> ki.since(5)
    [Revision(main=5, sub=1), Revision(main=7, sub=0)]
    """

    __slots__ = ("key", "_gens")

    def __init__(self, key: bytes):
        self.key = key
        self._gens: _Gens = []

    # --- writes -------------------------------------------------------

    def put(self, main: int, sub: int) -> None:
        """Append revision ``(main, sub)`` to the current generation.

        Starts the generation (``created`` = this revision) if the key is not
        live.  Raises ``ValueError`` if the revision is not greater than the
        last one recorded (a caller bug; etcd panics).  O(1) amortized.
        """
        self._gens = _put(self._gens, _pack(main, sub), self.key)

    def tombstone(self, main: int, sub: int) -> None:
        """Record the key's deletion at ``(main, sub)`` and start a new generation.

        The tombstone is appended like a put (so ``ver`` counts it), then an
        empty generation follows.  Raises ``RevisionNotFoundError`` if the key
        is not live.  O(1) amortized.
        """
        self._gens = _tombstone(self._gens, _pack(main, sub), self.key)

    def restore(self, created_main: int, main: int, sub: int, ver: int) -> None:
        """Start a never-written index from a backend put (spec 3.9).

        The put at ``(main, sub)`` is the oldest revision the backend still
        has; ``created_main`` and ``ver`` are the ``create_revision`` and
        ``version`` it recorded, so versions survive compaction and restart.
        The creating revision's sub is not stored in the backend and comes
        back as 0, as in etcd.  O(1).
        """
        self._require_unwritten()
        self._gens = _single(created_main << _SUB_BITS, ver, _pack(main, sub))

    def restore_tombstone(self, main: int, sub: int) -> None:
        """Start a never-written index from a backend tombstone (spec 3.9).

        The key's earlier history was compacted away, so the generation
        records ``created`` 0 and ``ver`` 1; an empty generation follows.
        O(1).
        """
        self._require_unwritten()
        self._gens = [_Generation(0, 1, [_pack(main, sub)]), _empty_generation()]

    # --- reads --------------------------------------------------------

    def get(self, at_main: int) -> tuple[Revision, Revision, int]:
        """``(modified, created, version)`` of the key as visible at ``at_main``.

        Raises ``RevisionNotFoundError`` if the key did not exist at
        ``at_main`` (not yet created, deleted, or compacted away).
        O(1) for a single-revision key, else O(g + log r).
        """
        return _get(self._gens, at_main)

    def since(self, main: int) -> list[Revision]:
        """Revisions with main >= ``main``, ascending; of several revisions
        sharing a main, only the last (highest sub) -- the one a reader of
        that main revision sees.  O(g + log r + k) for k results.
        """
        return [_unpack(p) for p in _since(self._gens, main << _SUB_BITS)]

    def is_empty(self) -> bool:
        """True if the index holds no revision (never written, or compacted
        down to one empty generation); the tree drops such keys.  O(1).
        """
        return _is_empty(self._gens)

    def generations(self) -> list[Generation]:
        """The generations, oldest first, as read-only values.  O(total revisions)."""
        return _generations(self._gens)

    # --- compaction ---------------------------------------------------

    def compact(self, at_main: int, available: set[Revision]) -> None:
        """Drop what compaction at ``at_main`` removes; add what it keeps to ``available``.

        Keeps the revision visible at ``at_main`` (or the tombstone if the
        key was deleted exactly at ``at_main``) and everything after
        ``at_main``; drops older revisions and generations that ended before
        ``at_main``.  Afterwards ``is_empty()`` tells whether the key is gone.
        O(1) for a single-revision key, else O(g + r).
        """
        self._gens = _compact(self._gens, at_main, available)

    def keep(self, at_main: int, available: set[Revision]) -> None:
        """Add to ``available`` the revision compaction at ``at_main`` would
        keep, except a tombstone exactly at ``at_main`` (HashKV must hash the
        same set older etcd releases did).  Read-only.  O(1) for a
        single-revision key, else O(g + log r).
        """
        _keep(self._gens, at_main, available)

    # --- internals ----------------------------------------------------

    def _require_unwritten(self) -> None:
        if self._gens != []:
            raise ValueError(f"restore on {self.key!r}, which already has revisions")

    def __repr__(self) -> str:
        gens = self.generations()
        parts = []
        for i, gen in enumerate(gens):
            if not gen.revs:
                parts.append("{}")
                continue
            revs = [f"{r.main}.{r.sub}" for r in gen.revs]
            if i != len(gens) - 1:
                revs[-1] += "t"
            created = f"{gen.created.main}.{gen.created.sub}"
            parts.append(f"{{created {created}, ver {gen.ver}: {' '.join(revs)}}}")
        return f"KeyIndex({self.key!r}, [{', '.join(parts)}])"


class TreeIndex:
    """Every key's generations, ordered by key (etcd's ``treeIndex``).

    Each key maps to its generations in ``KeyIndex``'s encoding, without a
    ``KeyIndex`` object around them (see "Representation").  Key order is
    bytewise, as etcd's.  Ranges take ``end`` the way Range and Watch
    requests do: ``None`` or ``b""`` for the single key ``key``, ``b"\\0"``
    for every key >= ``key``, else ``[key, end)`` (empty if ``end <= key``).

    Complexities: ``n`` keys in the index, ``m`` keys in the range scanned,
    ``g``/``r`` as in ``KeyIndex``.  Lookups are a hash probe (SortedDict is a
    dict), ordered scans bisect sortedcontainers' sorted key list.

    >>> idx = TreeIndex()
    >>> idx.put(b"a", 2, 0); idx.put(b"b", 3, 0); idx.put(b"a", 4, 0)
    >>> idx.tombstone(b"b", 5, 0)
    >>> idx.get(b"a", 3)
    (Revision(main=2, sub=0), Revision(main=2, sub=0), 1)
    >>> idx.range(b"a", b"\\0", 4, limit=1)
    ([b'a'], [Revision(main=4, sub=0)], 2)
    >>> idx.range_count(b"a", b"c", 5)
    1
    >>> sorted(idx.compact(5)), len(idx)
    ([Revision(main=4, sub=0), Revision(main=5, sub=0)], 2)
    """

    __slots__ = ("_tree",)

    def __init__(self) -> None:
        self._tree: SortedDict = SortedDict()

    def __len__(self) -> int:
        """Number of keys in the index, live or awaiting compaction.  O(1)."""
        return len(self._tree)

    # --- writes -------------------------------------------------------

    def put(self, key: bytes, main: int, sub: int) -> None:
        """Record a put of ``key`` at ``(main, sub)``.

        O(1) amortized for a known key; O(log n) amortized for a new one.
        """
        tree = self._tree
        gens = tree.get(key)
        if gens is None:
            tree[key] = _pack(main, sub)
            return
        new = _put(gens, _pack(main, sub), key)
        if new is not gens:
            tree[key] = new

    def tombstone(self, key: bytes, main: int, sub: int) -> None:
        """Record the deletion of ``key`` at ``(main, sub)``.

        Raises ``RevisionNotFoundError`` if the key is not live.  O(1) amortized.
        """
        tree = self._tree
        gens = tree.get(key)
        if gens is None:
            raise RevisionNotFoundError()
        new = _tombstone(gens, _pack(main, sub), key)
        if new is not gens:
            tree[key] = new

    def restore(
        self, key: bytes, main: int, sub: int, tombstone: bool, create_revision: int, version: int
    ) -> None:
        """Rebuild from one backend entry; call for every entry in revision order.

        The first entry seen for a key starts its index from the entry's own
        ``create_revision`` and ``version`` (or, for a tombstone, a closed
        generation ``{created 0, ver 1}``); later entries are replayed as
        puts and tombstones (spec 3.9).  A tombstone of a key that is not
        live raises ``RevisionNotFoundError``: the backend is inconsistent
        (etcd logs it and goes on).  Costs as ``put``.
        """
        if key in self._tree:
            (self.tombstone if tombstone else self.put)(key, main, sub)
            return
        ki = KeyIndex(key)
        if tombstone:
            ki.restore_tombstone(main, sub)
        else:
            ki.restore(create_revision, main, sub, version)
        self._tree[key] = ki._gens

    @contextmanager
    def bulk_restore(self) -> Iterator[Callable[..., None]]:
        """Restore many entries at once: yields ``restore``.

        While loading, keys live in a plain dict and are sorted once at the
        end (one ``sorted`` in C instead of a bisect-insert per new key),
        which roughly halves the index rebuild of a large store's reopen.
        Nothing else may use the index until the block exits.
        """
        self._tree = dict(self._tree)  # type: ignore[assignment]
        try:
            yield self.restore
        finally:
            self._tree = SortedDict(self._tree)

    # --- reads --------------------------------------------------------

    def get(self, key: bytes, at_main: int) -> tuple[Revision, Revision, int]:
        """``(modified, created, version)`` of ``key`` at ``at_main``.

        Raises ``RevisionNotFoundError`` if the key is not visible there.
        O(1) expected for a single-revision key, else O(g + log r).
        """
        gens = self._tree.get(key)
        if gens is None:
            raise RevisionNotFoundError()
        return _get(gens, at_main)

    def range(
        self, key: bytes, end: bytes | None, at_main: int, limit: int = 0
    ) -> tuple[list[bytes], list[Revision], int]:
        """Keys visible at ``at_main`` in the range and their revisions.

        Returns ``(keys, revs, total)``: keys ascending with the revision
        each shows, at most ``limit`` of them if ``limit > 0``; ``total``
        counts every visible key of the range regardless of ``limit``, as
        Range's ``count`` needs.  O(log n + m (g + log r)) -- the whole range
        is scanned even when ``limit`` is reached, as etcd does.
        """
        bound = _bound(at_main)
        tree = self._tree
        keys: list[bytes] = []
        revs: list[Revision] = []
        total = 0
        for k in self._span(key, end):
            p = _visible(tree[k], bound)
            if p < 0:
                continue
            total += 1
            if limit <= 0 or total <= limit:
                keys.append(k)
                revs.append(_new_tuple(Revision, (p >> _SUB_BITS, p & _SUB_MASK)))
        return keys, revs, total

    def range_packed(self, key: bytes, end: bytes | None, at_main: int, limit: int = 0) -> tuple[list[int], int]:
        """``range`` for a caller that needs only the revisions, each packed
        as ``main << 32 | sub`` (the stored KeyValue holds its key): no key
        list and no Revision per key, which is most of a long range's cost
        in ``range``.  Returns ``(revisions, total)``.
        """
        bound = _bound(at_main)
        found: list[int] = []
        append = found.append
        # SortedDict's item lookup is dict's: map runs it in C.
        for gens in map(self._tree.__getitem__, self._span(key, end)):
            if type(gens) is int:
                if gens < bound:
                    append(gens)
            else:
                p = _visible(gens, bound)
                if p >= 0:
                    append(p)
        total = len(found)
        if 0 < limit < total:
            del found[limit:]
        return found, total

    def range_count(self, key: bytes, end: bytes | None, at_main: int) -> int:
        """Number of keys visible at ``at_main`` in the range (Range with
        ``count_only``): ``range``'s ``total`` without building results.
        O(log n + m (g + log r)).
        """
        bound = _bound(at_main)
        tree = self._tree
        total = 0
        for k in self._span(key, end):
            if _visible(tree[k], bound) >= 0:
                total += 1
        return total

    def range_since(self, key: bytes, end: bytes | None, main: int) -> list[Revision]:
        """Every revision with main >= ``main`` of the keys in the range,
        ascending (watch catch-up).  Per key and main, only the last sub is
        given (``KeyIndex.since``).  O(log n + m (g + log r) + k log k) for
        k results.
        """
        low = main << _SUB_BITS
        tree = self._tree
        found: list[int] = []
        for k in self._span(key, end):
            found.extend(_since(tree[k], low))
        found.sort()
        return [_unpack(p) for p in found]

    # --- compaction ---------------------------------------------------

    def compact(self, at_main: int) -> set[Revision]:
        """Compact every key at ``at_main``; return the kept ("available") set.

        Keys left without revisions are removed.  The backend then deletes
        every entry with main <= ``at_main`` not in the returned set.
        O(n (g + r)) -- see ``compact_steps`` to do it in slices.
        """
        available: set[Revision] = set()
        for _ in self.compact_steps(at_main, available):
            pass
        return available

    def compact_steps(
        self, at_main: int, available: set[Revision], chunk: int = 10000
    ) -> Iterator[int]:
        """``compact`` in slices: each ``next()`` compacts the next ``chunk``
        keys in key order, adds their kept revisions to ``available`` and
        yields how many keys it visited; exhausted when all keys are done.

        The caller may release its lock between steps and let writes in:
        each step resumes strictly after the last key it visited, so keys
        created meanwhile are visited if they sort later and need no
        compaction if they sort earlier (all their revisions are newer than
        ``at_main``).  O(log n + chunk (g + r)) per step.
        """
        if chunk < 1:
            raise ValueError(f"chunk must be positive, got {chunk}")
        tree = self._tree
        batch = list(islice(tree.irange(), chunk))
        while batch:
            for k in batch:
                gens = tree[k]
                new = _compact(gens, at_main, available)
                if new is not gens:
                    tree[k] = new
                elif _is_empty(new):
                    del tree[k]
            yield len(batch)
            batch = list(islice(tree.irange(batch[-1], inclusive=(False, True)), chunk))

    def keep(self, at_main: int) -> set[Revision]:
        """The set ``compact(at_main)`` would keep, minus tombstones exactly at
        ``at_main``; changes nothing (HashKV).  O(n (g + log r)).
        """
        available: set[Revision] = set()
        # Hash order is fine for a set and skips the sorted-key walk.
        for gens in dict.values(self._tree):
            _keep(gens, at_main, available)
        return available

    # --- internals ----------------------------------------------------

    def _span(self, key: bytes, end: bytes | None) -> Iterable[bytes]:
        """The keys of the index inside the range, ascending."""
        if not end:
            return (key,) if key in self._tree else ()
        if end == _TO_THE_END:
            return self._tree.irange(key)
        if end <= key:
            return ()
        return self._tree.irange(key, end, inclusive=(True, False))

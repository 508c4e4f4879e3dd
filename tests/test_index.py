"""Tests for mvcckv.index: tables of etcd's keyIndex/treeIndex cases, then
property tests against a plain list-of-events model of a key's history."""

from __future__ import annotations

import doctest
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import mvcckv.index
from mvcckv.index import PACKED_SUB_BITS, Generation, KeyIndex, RevisionNotFoundError, TreeIndex
from mvcckv.revision import Revision as R

NF = None  # "not found" in the tables below


def build(key: bytes, ops: str) -> KeyIndex:
    """A KeyIndex from a compact history such as "p2 p4 t6 p15.1"."""
    ki = KeyIndex(key)
    for op in ops.split():
        main, _, sub = op[1:].partition(".")
        (ki.put if op[0] == "p" else ki.tombstone)(int(main), int(sub or 0))
    return ki


def get_or_none(ki, at):
    try:
        return ki.get(at)
    except RevisionNotFoundError:
        return NF


def tree_generations(idx: TreeIndex, key: bytes) -> list[Generation]:
    """A tree entry's generations (the tree holds them without a KeyIndex)."""
    return mvcckv.index._generations(idx._tree[key])


def snapshot(idx: TreeIndex) -> dict:
    return {k: tree_generations(idx, k) for k in idx._tree}


def gens(ki: KeyIndex) -> list[tuple]:
    """Generations as (created main, ver, [revs]) for compact tables."""
    return [(g.created.main, g.ver, list(g.revs)) for g in ki.generations()]


def test_docstring_examples_run():
    assert doctest.testmod(mvcckv.index).failed == 0


# --- etcd's reference key -----------------------------------------------
#
# The history key_index_test.go uses throughout:
#   {2, 4, 6t}  {8, 10, 12t}  {14, 15.1, 16t}  {}
ETCD_KEY = "p2 p4 t6 p8 p10 t12 p14 p15.1 t16"

GET_TABLE = [
    # at, (mod, created, version) or NF
    (0, NF),
    (1, NF),
    (2, (R(2), R(2), 1)),
    (3, (R(2), R(2), 1)),
    (4, (R(4), R(2), 2)),
    (5, (R(4), R(2), 2)),
    (6, NF),
    (7, NF),
    (8, (R(8), R(8), 1)),
    (9, (R(8), R(8), 1)),
    (10, (R(10), R(8), 2)),
    (11, (R(10), R(8), 2)),
    (12, NF),
    (13, NF),
    (14, (R(14), R(14), 1)),
    (15, (R(15, 1), R(14), 2)),
    (16, NF),
    (17, NF),
]


@pytest.mark.parametrize("at, want", GET_TABLE)
def test_get_at_every_revision(at, want):
    assert get_or_none(build(b"foo", ETCD_KEY), at) == want


@pytest.mark.parametrize("at, want", GET_TABLE)
def test_get_after_compact_4(at, want):
    ki = build(b"foo", ETCD_KEY)
    ki.compact(4, set())
    # Below the compaction revision only the revision visible at 4 is left.
    assert get_or_none(ki, at) == (NF if at < 4 else want)


ALL_REVS = [R(4), R(6), R(8), R(10), R(12), R(14), R(15, 1), R(16)]


@pytest.mark.parametrize(
    "since, want",
    [(17, []), (16, ALL_REVS[7:]), (15, ALL_REVS[6:]), (14, ALL_REVS[5:]), (13, ALL_REVS[5:]),
     (12, ALL_REVS[4:]), (11, ALL_REVS[4:]), (10, ALL_REVS[3:]), (9, ALL_REVS[3:]),
     (8, ALL_REVS[2:]), (7, ALL_REVS[2:]), (6, ALL_REVS[1:]), (5, ALL_REVS[1:]),
     (4, ALL_REVS), (3, ALL_REVS), (0, ALL_REVS)],
)
def test_since_after_compact_4(since, want):
    ki = build(b"foo", ETCD_KEY)
    ki.compact(4, set())
    assert ki.since(since) == want


def test_since_keeps_only_the_last_sub_of_a_main():
    ki = build(b"k", "p3 p5 t7.0 p7.1 p7.2 p9")
    assert ki.since(0) == [R(3), R(5), R(7, 2), R(9)]
    assert ki.since(7) == [R(7, 2), R(9)]
    assert ki.since(10) == []


G1 = (2, 3, [R(2), R(4), R(6)])
G2 = (8, 3, [R(8), R(10), R(12)])
G3 = (14, 3, [R(14), R(15, 1), R(16)])
EMPTY = (0, 0, [])

# at, generations after compact(at), kept set.  Tombstones at 6, 12, 16.
COMPACT_TABLE = [
    (1, [G1, G2, G3, EMPTY], set()),
    (2, [G1, G2, G3, EMPTY], {R(2)}),
    (3, [G1, G2, G3, EMPTY], {R(2)}),
    (4, [(2, 3, [R(4), R(6)]), G2, G3, EMPTY], {R(4)}),
    (5, [(2, 3, [R(4), R(6)]), G2, G3, EMPTY], {R(4)}),
    (6, [(2, 3, [R(6)]), G2, G3, EMPTY], {R(6)}),
    (7, [G2, G3, EMPTY], set()),
    (8, [G2, G3, EMPTY], {R(8)}),
    (9, [G2, G3, EMPTY], {R(8)}),
    (10, [(8, 3, [R(10), R(12)]), G3, EMPTY], {R(10)}),
    (11, [(8, 3, [R(10), R(12)]), G3, EMPTY], {R(10)}),
    (12, [(8, 3, [R(12)]), G3, EMPTY], {R(12)}),
    (13, [G3, EMPTY], set()),
    (14, [G3, EMPTY], {R(14)}),
    (15, [(14, 3, [R(15, 1), R(16)]), EMPTY], {R(15, 1)}),
    (16, [(14, 3, [R(16)]), EMPTY], {R(16)}),
    (17, [EMPTY], set()),
]
TOMBSTONES = {6, 12, 16}


def keep_of(ki, at):
    kept = set()
    before = repr(ki)
    ki.keep(at, kept)
    assert repr(ki) == before, "keep must not change the index"
    return kept


def test_compact_and_keep_continuously():
    ki = build(b"foo", ETCD_KEY)
    for at, want_gens, want_kept in COMPACT_TABLE:
        assert keep_of(ki, at) == (set() if at in TOMBSTONES else want_kept), at
        kept = set()
        ki.compact(at, kept)
        assert gens(ki) == want_gens, at
        assert kept == want_kept, at
    assert ki.is_empty()


@pytest.mark.parametrize("at, want_gens, want_kept", COMPACT_TABLE)
def test_compact_and_keep_once(at, want_gens, want_kept):
    ki = build(b"foo", ETCD_KEY)
    assert keep_of(ki, at) == (set() if at in TOMBSTONES else want_kept)
    kept = set()
    ki.compact(at, kept)
    assert gens(ki) == want_gens
    assert kept == want_kept
    assert ki.is_empty() == (at == 17)


def test_compact_jumping_over_revisions():
    ki = build(b"foo", ETCD_KEY)
    for at, want_gens, want_kept in COMPACT_TABLE[::3]:
        kept = set()
        ki.compact(at, kept)
        assert (gens(ki), kept) == (want_gens, want_kept), at


# --- the spec's worked example (3.6) -----------------------------------------

SPEC_FOO = "p1 p2 t3 p4 t5"


@pytest.mark.parametrize(
    "at, want_gens, want_kept, want_keep",
    [
        (1, [(1, 3, [R(1), R(2), R(3)]), (4, 2, [R(4), R(5)]), EMPTY], {R(1)}, {R(1)}),
        (2, [(1, 3, [R(2), R(3)]), (4, 2, [R(4), R(5)]), EMPTY], {R(2)}, {R(2)}),
        (3, [(1, 3, [R(3)]), (4, 2, [R(4), R(5)]), EMPTY], {R(3)}, set()),
        (4, [(4, 2, [R(4), R(5)]), EMPTY], {R(4)}, {R(4)}),
        (5, [(4, 2, [R(5)]), EMPTY], {R(5)}, set()),
        (6, [EMPTY], set(), set()),
    ],
)
def test_spec_example_compact_and_keep(at, want_gens, want_kept, want_keep):
    ki = build(b"foo", SPEC_FOO)
    assert keep_of(ki, at) == want_keep
    kept = set()
    ki.compact(at, kept)
    assert (gens(ki), kept) == (want_gens, want_kept)
    assert ki.is_empty() == (at == 6)

    idx = TreeIndex()
    for main, tomb in ((1, False), (2, False), (3, True), (4, False), (5, True)):
        (idx.tombstone if tomb else idx.put)(b"foo", main, 0)
    assert idx.keep(at) == want_keep
    assert idx.compact(at) == want_kept
    assert len(idx) == (0 if at == 6 else 1)


# --- the module docstring's example ---------------------------------------

LOCK = "p3 p5.1 t7 p8 t11"


@pytest.mark.parametrize(
    "at, want",
    [(2, NF), (3, (R(3), R(3), 1)), (4, (R(3), R(3), 1)), (5, (R(5, 1), R(3), 2)),
     (6, (R(5, 1), R(3), 2)), (7, NF), (8, (R(8), R(8), 1)), (10, (R(8), R(8), 1)),
     (11, NF), (12, NF)],
)
def test_docstring_example_get(at, want):
    assert get_or_none(build(b"lock", LOCK), at) == want


@pytest.mark.parametrize(
    "at, want_gens, want_kept, want_keep",
    [
        (4, [(3, 3, [R(3), R(5, 1), R(7)]), (8, 2, [R(8), R(11)]), EMPTY], {R(3)}, {R(3)}),
        (6, [(3, 3, [R(5, 1), R(7)]), (8, 2, [R(8), R(11)]), EMPTY], {R(5, 1)}, {R(5, 1)}),
        (7, [(3, 3, [R(7)]), (8, 2, [R(8), R(11)]), EMPTY], {R(7)}, set()),
        (9, [(8, 2, [R(8), R(11)]), EMPTY], {R(8)}, {R(8)}),
        (11, [(8, 2, [R(11)]), EMPTY], {R(11)}, set()),
        (12, [EMPTY], set(), set()),
    ],
)
def test_docstring_example_compact(at, want_gens, want_kept, want_keep):
    ki = build(b"lock", LOCK)
    assert keep_of(ki, at) == want_keep
    kept = set()
    ki.compact(at, kept)
    assert (gens(ki), kept) == (want_gens, want_kept)


# --- put, tombstone, errors -----------------------------------------------

def test_put_and_tombstone_build_generations():
    ki = build(b"foo", "p5")
    assert gens(ki) == [(5, 1, [R(5)])]
    ki.put(7, 0)
    assert gens(ki) == [(5, 2, [R(5), R(7)])]
    ki.tombstone(9, 0)
    assert gens(ki) == [(5, 3, [R(5), R(7), R(9)]), EMPTY]
    ki.put(10, 2)
    ki.put(11, 0)
    ki.tombstone(15, 0)
    assert gens(ki) == [(5, 3, [R(5), R(7), R(9)]), (10, 3, [R(10, 2), R(11), R(15)]), EMPTY]
    assert ki.generations()[1].created == R(10, 2)


def test_tombstone_of_a_key_that_is_not_live():
    with pytest.raises(RevisionNotFoundError):
        KeyIndex(b"never").tombstone(3, 0)
    ki = build(b"foo", "p2 t3")
    with pytest.raises(RevisionNotFoundError):
        ki.tombstone(4, 0)
    assert gens(ki) == [(2, 2, [R(2), R(3)]), EMPTY]
    idx = TreeIndex()
    with pytest.raises(RevisionNotFoundError):
        idx.tombstone(b"missing", 2, 0)
    idx.put(b"a", 2, 0)
    idx.tombstone(b"a", 3, 0)
    with pytest.raises(RevisionNotFoundError):
        idx.tombstone(b"a", 4, 0)


def test_get_of_a_missing_revision():
    with pytest.raises(RevisionNotFoundError):
        KeyIndex(b"never").get(10)
    idx = TreeIndex()
    idx.put(b"a", 5, 0)
    with pytest.raises(RevisionNotFoundError):
        idx.get(b"b", 5)
    with pytest.raises(RevisionNotFoundError):
        idx.get(b"a", 4)
    assert idx.get(b"a", 5) == (R(5), R(5), 1)


@pytest.mark.parametrize("ops, main, sub", [("p5", 5, 0), ("p5.3", 5, 2), ("p5 p6", 5, 9), ("p5 t6", 6, 0)])
def test_put_must_move_forward(ops, main, sub):
    ki = build(b"k", ops)
    with pytest.raises(ValueError):
        ki.put(main, sub)


def test_sub_revision_range_is_checked():
    with pytest.raises(ValueError):
        KeyIndex(b"k").put(2, 1 << 32)
    with pytest.raises(ValueError):
        KeyIndex(b"k").put(2, -1)
    ki = build(b"k", "p2")
    ki.put(2, (1 << 32) - 1)
    assert ki.get(2)[0] == R(2, (1 << 32) - 1)


def test_restore_needs_a_never_written_index():
    ki = build(b"k", "p2")
    with pytest.raises(ValueError):
        ki.restore(2, 3, 0, 2)
    with pytest.raises(ValueError):
        ki.restore_tombstone(3, 0)


def test_delete_and_reput_in_one_revision():
    # tombstone(7.0); put(7.1): the put is what a reader at 7 sees.
    ki = build(b"k", "p3 t7.0 p7.1")
    assert ki.get(7) == (R(7, 1), R(7, 1), 1)
    assert ki.get(6) == (R(3), R(3), 1)
    assert ki.since(7) == [R(7, 1)]
    assert keep_of(ki, 7) == {R(7, 1)}
    kept = set()
    ki.compact(7, kept)
    # The kept set must name the put the index still points to.
    assert kept == {R(7, 1)}
    assert gens(ki) == [(7, 1, [R(7, 1)])]
    assert ki.get(7) == (R(7, 1), R(7, 1), 1)


def test_put_and_delete_in_one_revision():
    ki = build(b"k", "p3 p7.0 t7.1")
    assert get_or_none(ki, 7) is NF
    assert keep_of(ki, 7) == set()
    kept = set()
    ki.compact(7, kept)
    assert kept == {R(7, 1)}
    assert gens(ki) == [(3, 3, [R(7, 1)]), EMPTY]


def test_compaction_packs_single_revision_keys():
    # White-box: the memory budget relies on these encodings.
    fresh = build(b"k", "p2")
    assert type(fresh._gens) is int
    updated = build(b"k", "p2 p5")
    assert type(updated._gens) is list
    updated.compact(6, set())
    assert type(updated._gens) is tuple
    assert updated.get(6) == (R(5), R(2), 2)
    assert gens(updated) == [(2, 2, [R(5)])]
    recreated = build(b"k", "p2 t3 p4")
    recreated.compact(4, set())
    assert type(recreated._gens) is int
    assert recreated.get(9) == (R(4), R(4), 1)
    # ... and expand again on the next write.
    updated.put(7, 0)
    assert updated.get(7) == (R(7), R(2), 3)
    updated.tombstone(8, 0)
    assert gens(updated) == [(2, 4, [R(5), R(7), R(8)]), EMPTY]


def test_tree_entries_are_packed_again_by_compaction():
    idx = TreeIndex()
    idx.put(b"a", 2, 0)
    idx.put(b"b", 3, 0)
    idx.put(b"a", 4, 0)
    idx.put(b"c", 5, 0)
    idx.tombstone(b"c", 6, 0)
    idx.put(b"c", 7, 0)
    assert [type(idx._tree[k]) for k in (b"a", b"b", b"c")] == [list, int, list]
    idx.compact(7)
    assert [type(idx._tree[k]) for k in (b"a", b"b", b"c")] == [tuple, int, int]
    assert idx.get(b"a", 7) == (R(4), R(2), 2)
    assert idx.get(b"c", 7) == (R(7), R(7), 1)


# --- restore (rebuild from the backend) ------------------------------------

def test_restore_tombstone_as_first_entry():
    ki = KeyIndex(b"foo")
    ki.restore_tombstone(16, 0)
    for at in range(16, 21):
        assert get_or_none(ki, at) is NF
    assert keep_of(ki, 16) == set()
    compacted = KeyIndex(b"foo")
    compacted.restore_tombstone(16, 0)
    kept = set()
    compacted.compact(16, kept)
    assert kept == {R(16)}  # the tombstone at the compaction revision stays
    ki.put(17, 0)
    ki.put(18, 0)
    assert ki.since(16) == [R(16), R(17), R(18)]
    assert ki.get(18) == (R(18), R(17), 2)
    ki.compact(17, set())
    assert gens(ki) == [(17, 2, [R(17), R(18)])]


def test_restore_put_keeps_version_and_create_revision():
    ki = KeyIndex(b"foo")
    ki.restore(5, 7, 0, 2)
    assert gens(ki) == [(5, 2, [R(7)])]
    assert ki.get(7) == (R(7), R(5), 2)
    assert get_or_none(ki, 6) is NF
    ki.put(9, 0)
    assert ki.get(9) == (R(9), R(5), 3)


def random_history(rng: random.Random, nkeys: int, ntxns: int):
    """Backend entries (main, sub, key, tombstone, create_revision, version) of
    a random workload, txns of one to three changes on distinct keys."""
    keys = [b"k%02d" % i for i in range(nkeys)]
    live: dict[bytes, tuple[int, int]] = {}  # key -> (create_revision, version)
    entries = []
    for main in range(2, ntxns + 2):
        for sub, key in enumerate(rng.sample(keys, rng.randint(1, 3))):
            if key in live and rng.random() < 0.3:
                entries.append((main, sub, key, True, 0, 0))
                del live[key]
            else:
                created, ver = live.get(key, (main, 0))
                live[key] = (created, ver + 1)
                entries.append((main, sub, key, False, created, ver + 1))
    return entries


def replay_live(entries) -> TreeIndex:
    idx = TreeIndex()
    for main, sub, key, tomb, _, _ in entries:
        (idx.tombstone if tomb else idx.put)(key, main, sub)
    return idx


def observable(idx: TreeIndex, key: bytes, since_main: int, last_main: int):
    """What the store can read of ``key`` from ``since_main`` on."""
    out = []
    for at in range(since_main, last_main + 2):
        try:
            mod, created, ver = idx.get(key, at)
            out.append((mod, created.main, ver))
        except RevisionNotFoundError:
            out.append(NF)
    return out


@pytest.mark.parametrize("seed", range(8))
def test_restore_from_backend_replay_equals_live_index(seed):
    rng = random.Random(seed)
    entries = random_history(rng, nkeys=6, ntxns=60)
    last = entries[-1][0]
    for compact_at in (None, rng.randint(2, last), last):
        live = replay_live(entries)
        backend = entries
        if compact_at is not None:
            kept = live.compact(compact_at)
            backend = [e for e in entries if e[0] > compact_at or R(e[0], e[1]) in kept]
        rebuilt = TreeIndex()
        for main, sub, key, tomb, created, ver in backend:
            rebuilt.restore(key, main, sub, tomb, created, ver)
        floor = compact_at or 0
        keys = {e[2] for e in entries}
        for key in keys:
            assert observable(rebuilt, key, floor, last) == observable(live, key, floor, last), key
            assert rebuilt.range_since(key, None, floor + 1) == live.range_since(key, None, floor + 1)
        assert sorted(live.keep(last + 1)) == sorted(rebuilt.keep(last + 1))
        # Same keys, same revisions in the same generations.  (created/ver of
        # a generation closed at the compaction revision are not recoverable,
        # spec 3.9, and no read can see them.)
        assert list(rebuilt._tree) == list(live._tree)
        for key in rebuilt._tree:
            want = [g.revs for g in tree_generations(live, key)]
            assert [g.revs for g in tree_generations(rebuilt, key)] == want


def test_restore_replays_later_entries_as_puts_and_tombstones():
    idx = TreeIndex()
    idx.restore(b"a", 10, 0, False, 4, 3)
    idx.restore(b"b", 11, 0, True, 0, 0)
    idx.restore(b"a", 12, 0, True, 0, 0)
    idx.restore(b"b", 13, 0, False, 13, 1)
    idx.restore(b"a", 14, 1, False, 14, 1)
    assert idx.get(b"a", 10) == (R(10), R(4), 3)
    with pytest.raises(RevisionNotFoundError):
        idx.get(b"a", 12)
    assert idx.get(b"a", 14) == (R(14, 1), R(14, 1), 1)
    with pytest.raises(RevisionNotFoundError):
        idx.get(b"b", 12)
    assert idx.get(b"b", 13) == (R(13), R(13), 1)
    idx.restore(b"b", 15, 0, True, 0, 0)
    # A second tombstone in a row means the backend is inconsistent.
    with pytest.raises(RevisionNotFoundError):
        idx.restore(b"b", 16, 0, True, 0, 0)


# --- TreeIndex ranges --------------------------------------------------------

def sample_tree() -> TreeIndex:
    """a..f with history; at 9: a, b, d, f visible; c deleted at 8; e from 10."""
    idx = TreeIndex()
    idx.put(b"a", 2, 0)
    idx.put(b"b", 2, 1)
    idx.put(b"c", 3, 0)
    idx.put(b"d", 4, 0)
    idx.put(b"a", 5, 0)
    idx.put(b"f", 6, 0)
    idx.tombstone(b"c", 8, 0)
    idx.put(b"e", 10, 0)
    idx.put(b"b", 10, 1)
    return idx


RANGE_TABLE = [
    # key, end, at, limit, keys, mains of revs, total
    (b"a", None, 9, 0, [b"a"], [5], 1),
    (b"a", b"", 4, 0, [b"a"], [2], 1),
    (b"c", None, 9, 0, [], [], 0),          # deleted
    (b"zz", None, 9, 0, [], [], 0),         # never existed
    (b"a", b"\0", 9, 0, [b"a", b"b", b"d", b"f"], [5, 2, 4, 6], 4),
    (b"c", b"\0", 10, 0, [b"d", b"e", b"f"], [4, 10, 6], 3),
    (b"\0", b"\0", 3, 0, [b"a", b"b", b"c"], [2, 2, 3], 3),
    (b"a", b"\0", 9, 2, [b"a", b"b"], [5, 2], 4),
    (b"b", b"e", 10, 0, [b"b", b"d"], [10, 4], 2),
    (b"b", b"e", 7, 0, [b"b", b"c", b"d"], [2, 3, 4], 3),
    (b"b", b"e", 7, 1, [b"b"], [2], 3),
    (b"a", b"b", 9, 0, [b"a"], [5], 1),     # end is exclusive
    (b"bb", b"cc", 9, 0, [], [], 0),        # c deleted, no other key inside
    (b"d", b"d", 9, 0, [], [], 0),          # end == key
    (b"d", b"a", 9, 0, [], [], 0),          # end < key
    (b"a", b"\0", 1, 0, [], [], 0),         # before anything
    (b"a", b"\0", 10, 3, [b"a", b"b", b"d"], [5, 10, 4], 5),
    (b"a", b"\0", 10, 100, [b"a", b"b", b"d", b"e", b"f"], [5, 10, 4, 10, 6], 5),
]


@pytest.mark.parametrize("key, end, at, limit, want_keys, want_mains, want_total", RANGE_TABLE)
def test_range(key, end, at, limit, want_keys, want_mains, want_total):
    idx = sample_tree()
    keys, revs, total = idx.range(key, end, at, limit)
    assert keys == want_keys
    assert [r.main for r in revs] == want_mains
    assert total == want_total
    assert idx.range_count(key, end, at) == want_total
    for k, r in zip(keys, revs):
        assert idx.get(k, at)[0] == r
    packed, packed_total = idx.range_packed(key, end, at, limit)
    assert packed == [r.main << PACKED_SUB_BITS | r.sub for r in revs] and packed_total == want_total


def test_range_revisions_carry_subs():
    keys, revs, total = sample_tree().range(b"b", None, 10)
    assert revs == [R(10, 1)]


@pytest.mark.parametrize(
    "key, end, since, want",
    [
        (b"a", None, 0, [R(2), R(5)]),
        (b"a", None, 5, [R(5)]),
        (b"c", b"", 0, [R(3), R(8)]),
        (b"a", b"\0", 0, [R(2), R(2, 1), R(3), R(4), R(5), R(6), R(8), R(10), R(10, 1)]),
        (b"a", b"\0", 6, [R(6), R(8), R(10), R(10, 1)]),
        (b"b", b"e", 3, [R(3), R(4), R(8), R(10, 1)]),
        (b"e", b"b", 0, []),
        (b"zz", None, 0, []),
        (b"a", b"\0", 11, []),
    ],
)
def test_range_since(key, end, since, want):
    assert sample_tree().range_since(key, end, since) == want


# --- TreeIndex compaction ------------------------------------------------------

def test_compaction_removes_deleted_keys_and_keeps_tombstone_at_compact_rev():
    idx = sample_tree()
    assert len(idx) == 6
    kept = idx.compact(8)
    # c deleted exactly at 8: its tombstone stays (3.4.34 / 3.5.16 rule).
    assert kept == {R(5), R(2, 1), R(8), R(4), R(6)}
    assert len(idx) == 6
    assert idx.keep(8) == {R(5), R(2, 1), R(4), R(6)}
    assert idx.compact(9) == {R(5), R(2, 1), R(4), R(6)}
    assert len(idx) == 5  # c is gone
    assert idx.range_since(b"c", None, 0) == []
    idx.put(b"c", 11, 0)  # a new life for c
    assert idx.get(b"c", 11) == (R(11), R(11), 1)
    assert idx.compact(11) == {R(5), R(10, 1), R(11), R(4), R(10), R(6)}


def test_keep_does_not_change_the_tree():
    idx = sample_tree()
    before = snapshot(idx)
    assert idx.keep(8) == {R(5), R(2, 1), R(4), R(6)}
    assert snapshot(idx) == before



def mutate(idx: TreeIndex, rng: random.Random, main: int, live: set, known: list) -> None:
    """One random write transaction at ``main``: puts of old and new keys, deletes."""
    for sub in range(rng.randint(1, 3)):
        roll = rng.random()
        if roll < 0.3 and live:
            key = rng.choice(sorted(live))
            idx.tombstone(key, main, sub)
            live.discard(key)
        else:
            key = rng.choice(known) if roll < 0.7 else b"n%05d" % rng.randrange(100000)
            if key not in known:
                known.append(key)
            idx.put(key, main, sub)
            live.add(key)


def live_keys(idx: TreeIndex, at: int) -> set:
    return set(idx.range(b"\0", b"\0", at)[0])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("chunk", [1, 3, 50])
def test_compact_steps_interleaved_with_writes_equals_compact(seed, chunk):
    def history():
        rng = random.Random(seed)
        idx = TreeIndex()
        known = [b"k%03d" % i for i in range(40)]
        live: set = set()
        for main in range(2, 120):
            mutate(idx, rng, main, live, known)
        return idx, live, known

    at = 100
    whole, live_w, known_w = history()
    stepped, live_s, known_s = history()
    kept_whole = whole.compact(at)

    kept_stepped: set = set()
    rng_w, rng_s = random.Random(seed + 1000), random.Random(seed + 1000)
    main = 120
    for _ in stepped.compact_steps(at, kept_stepped, chunk=chunk):
        # Writes land between steps, the same ones on both sides.
        mutate(stepped, rng_s, main, live_s, known_s)
        mutate(whole, rng_w, main, live_w, known_w)
        main += 1
    assert kept_stepped == kept_whole
    assert snapshot(stepped) == snapshot(whole)
    for at_read in range(at, main + 1):
        assert stepped.range(b"\0", b"\0", at_read) == whole.range(b"\0", b"\0", at_read)


def test_compact_steps_yields_per_chunk_and_removes_emptied_keys():
    idx = TreeIndex()
    for i in range(10):
        idx.put(b"k%d" % i, 2 + i, 0)
    for i in range(0, 10, 2):
        idx.tombstone(b"k%d" % i, 20 + i, 0)
    kept: set = set()
    assert list(idx.compact_steps(40, kept, chunk=4)) == [4, 4, 2]
    assert len(idx) == 5
    assert kept == {R(2 + i) for i in range(1, 10, 2)}
    with pytest.raises(ValueError):
        next(idx.compact_steps(40, set(), chunk=0))


def test_compact_steps_sees_keys_created_after_its_cursor():
    idx = TreeIndex()
    idx.put(b"a", 2, 0)
    idx.put(b"c", 3, 0)
    idx.put(b"e", 4, 0)
    idx.tombstone(b"e", 5, 0)
    steps = idx.compact_steps(10, set(), chunk=1)
    assert next(steps) == 1  # a
    idx.put(b"d", 11, 0)  # after the cursor: visited, nothing to drop
    idx.put(b"0", 12, 0)  # before the cursor: never visited, needs nothing
    idx.put(b"e", 13, 0)  # e re-created before its turn: stays, old life dropped
    assert sum(steps) == 3  # c, d, e
    assert idx.range(b"\0", b"\0", 20)[0] == [b"0", b"a", b"c", b"d", b"e"]
    assert tree_generations(idx, b"e") == [Generation(R(13), 1, (R(13),))]


# --- property tests against a list-of-events model ------------------------------

class Model:
    """One key's full history as (main, sub, is_tombstone) events.

    The index may forget revisions at or below the last compaction, but
    everything it still answers for later revisions must match this model.
    """

    def __init__(self):
        self.events: list[tuple[int, int, bool]] = []

    def get(self, at):
        """(mod, created, version) visible at ``at``, or NF."""
        upto = [e for e in self.events if e[0] <= at]
        if not upto or upto[-1][2]:
            return NF
        life = []
        for e in upto:
            life = [] if e[2] else life + [e]
        return R(*life[-1][:2]), R(*life[0][:2]), len(life)

    def since(self, main):
        out = []
        for m, s, _ in self.events:
            if m >= main:
                if out and out[-1].main == m:
                    out[-1] = R(m, s)
                else:
                    out.append(R(m, s))
        return out

    def kept(self, at, for_hash=False):
        upto = [e for e in self.events if e[0] <= at]
        if not upto:
            return set()
        m, s, tomb = upto[-1]
        if not tomb or (m == at and not for_hash):
            return {R(m, s)}
        return set()

    def live(self):
        return bool(self.events) and not self.events[-1][2]


ops = st.lists(
    st.tuples(st.sampled_from(["put", "put", "del", "compact"]), st.booleans(), st.integers(0, 3)),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_key_index_matches_event_model(steps):
    ki, model = KeyIndex(b"k"), Model()
    main, sub, floor = 1, 0, 0
    for op, same_txn, back in steps:
        if op == "compact":
            at = max(floor, main - back)
            kept_keep = set()
            ki.keep(at, kept_keep)
            assert kept_keep == model.kept(at, for_hash=True)
            kept = set()
            ki.compact(at, kept)
            assert kept == model.kept(at)
            floor = at
            deleted_before = bool(model.events) and model.events[-1][2] and model.events[-1][0] < at
            assert ki.is_empty() == (deleted_before or not model.events)
            if ki.is_empty():  # the tree would drop it; start a new key
                ki, model = KeyIndex(b"k"), Model()
            continue
        if same_txn and main > max(floor, 1):  # a compacted txn is over
            sub += 1
        else:
            main, sub = main + 1, 0
        if op == "put":
            ki.put(main, sub)
            model.events.append((main, sub, False))
        elif model.live():
            ki.tombstone(main, sub)
            model.events.append((main, sub, True))
        else:
            with pytest.raises(RevisionNotFoundError):
                ki.tombstone(main, sub)
        for at in range(floor, main + 2):
            assert get_or_none(ki, at) == model.get(at), at
        assert ki.since(floor) == model.since(floor)
        assert ki.since(main) == model.since(main)
        # The index points at nothing at or below the compaction revision
        # but what compaction kept (the backend deleted everything else).
        held = {r for g in ki.generations() for r in g.revs if r.main <= floor}
        assert held <= model.kept(floor)


class TreeIndexMachine(RuleBasedStateMachine):
    """TreeIndex against a dict of per-key event lists, including compaction in steps."""

    KEYS = [b"a", b"b", b"c", b"d", b"e"]

    def __init__(self):
        super().__init__()
        self.idx = TreeIndex()
        self.models: dict[bytes, Model] = {}
        self.main = 1
        self.floor = 0
        self.steps = None  # a compaction in progress: (at, generator, kept set)

    def _txn(self, changes):
        self.main += 1
        for sub, (key, tomb) in enumerate(changes):
            model = self.models.setdefault(key, Model())
            if tomb:
                self.idx.tombstone(key, self.main, sub)
            else:
                self.idx.put(key, self.main, sub)
            model.events.append((self.main, sub, tomb))

    @rule(keys=st.lists(st.sampled_from(KEYS), min_size=1, max_size=3, unique=True))
    def put(self, keys):
        self._txn([(k, False) for k in keys])

    @rule(key=st.sampled_from(KEYS), end=st.sampled_from([None, b"c", b"\0"]))
    def delete_range(self, key, end):
        def inside(k):
            if end is None:
                return k == key
            return k >= key and (end == b"\0" or k < end)

        victims = sorted(k for k, m in self.models.items() if m.live() and inside(k))
        if victims:
            self._txn([(k, True) for k in victims])

    @rule(key=st.sampled_from(KEYS))
    def delete_then_put_in_one_txn(self, key):
        if self.models.get(key) and self.models[key].live():
            self._txn([(key, True), (key, False)])

    @precondition(lambda self: self.steps is None)
    @rule(back=st.integers(0, 3), chunk=st.integers(1, 3))
    def start_compaction(self, back, chunk):
        at = max(self.floor, self.main - back)
        kept: set = set()
        self.steps = (at, self.idx.compact_steps(at, kept, chunk), kept)
        # The store refuses reads below a compaction as soon as it is scheduled.
        self.floor = at

    @precondition(lambda self: self.steps is not None)
    @rule()
    def compaction_step(self):
        at, steps, kept = self.steps
        if next(steps, None) is None:
            want = set().union(*(m.kept(at) for m in self.models.values()))
            assert kept == want
            self.steps = None
            # Keys deleted before `at` and not re-created are gone from the tree.
            for key, model in list(self.models.items()):
                gone = model.events[-1][2] and model.events[-1][0] < at
                assert (key not in self.idx._tree) == gone
                if gone:
                    del self.models[key]

    @invariant()
    def reads_match_model(self):
        for at in range(self.floor, self.main + 2):
            want = {k: m.get(at) for k, m in self.models.items() if m.get(at) is not NF}
            keys, revs, total = self.idx.range(b"\0", b"\0", at)
            assert keys == sorted(want)
            assert revs == [want[k][0] for k in keys]
            assert total == self.idx.range_count(b"a", b"\0", at) == len(want)
            for k, v in want.items():
                assert self.idx.get(k, at) == v
        since = self.floor + 1
        want_since = sorted(r for m in self.models.values() for r in m.since(since))
        assert self.idx.range_since(b"\0", b"\0", since) == want_since


TestTreeIndexMachine = TreeIndexMachine.TestCase
TestTreeIndexMachine.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)

"""The linearizability checker on hand-written histories.

Times are in arbitrary units; ``None`` as a return time is an operation
whose outcome is unknown (it timed out).  Every case says why it is or is
not linearizable.
"""

from __future__ import annotations

import pytest

from mvcckv.testing.linearizability import (
    ILLEGAL, OK, UNKNOWN, Operation, check, check_key, check_revisions, describe, outcomes,
)


def op(client, kind, arg, call, ret, out=None, key=b"k", revision=0, mod_revision=0):
    return Operation(client, key, kind, arg, call, ret, out, revision, mod_revision)


def put(c, v, call, ret, **kw):
    return op(c, "put", v, call, ret, **kw)


def get(c, out, call, ret, **kw):
    return op(c, "get", None, call, ret, out, **kw)


def delete(c, out, call, ret, **kw):
    return op(c, "delete", None, call, ret, out, **kw)


def cas(c, expected, new, out, call, ret, **kw):
    return op(c, "cas", (expected, new), call, ret, out, **kw)


CASES = {
    # -- linearizable ------------------------------------------------------
    "sequential put then get": (OK, [put(0, b"1", 0, 1), get(1, b"1", 2, 3)]),
    "get before any put sees nothing": (OK, [get(0, None, 0, 1), put(1, b"1", 2, 3)]),
    "concurrent get may see old or new (old)": (OK, [put(0, b"1", 0, 10), get(1, None, 1, 2)]),
    "concurrent get may see old or new (new)": (OK, [put(0, b"1", 0, 10), get(1, b"1", 1, 2)]),
    "two overlapping puts, reads agree on the last": (
        OK, [put(0, b"1", 0, 5), put(1, b"2", 1, 6), get(2, b"1", 7, 8), get(3, b"1", 9, 10)]),
    "delete counts what it removed": (OK, [put(0, b"1", 0, 1), delete(1, 1, 2, 3), delete(1, 0, 4, 5)]),
    "cas succeeds on the expected value": (
        OK, [put(0, b"1", 0, 1), cas(1, b"1", b"2", (True, None), 2, 3), get(2, b"2", 4, 5)]),
    "cas fails and reads the current value": (
        OK, [put(0, b"1", 0, 1), cas(1, b"9", b"2", (False, b"1"), 2, 3)]),
    "cas on absent": (OK, [cas(0, None, b"1", (True, None), 0, 1), get(1, b"1", 2, 3)]),
    "timed-out put that took effect": (OK, [put(0, b"1", 0, None), get(1, b"1", 5, 6)]),
    "timed-out put that never took effect": (OK, [put(0, b"1", 0, None), get(1, None, 5, 6)]),
    "timed-out put taking effect late": (
        OK, [put(0, b"1", 0, None), get(1, None, 5, 6), get(1, b"1", 7, 8)]),
    "timed-out cas must fit the state it ran in": (
        OK, [put(0, b"1", 0, 1), cas(1, b"1", b"2", None, 2, None), get(2, b"2", 5, 6)]),
    # -- not linearizable -------------------------------------------------------
    "stale read after an acknowledged put": (ILLEGAL, [put(0, b"1", 0, 1), get(1, None, 2, 3)]),
    "read of a value never written": (ILLEGAL, [put(0, b"1", 0, 1), get(1, b"2", 2, 3)]),
    "reads see two puts in opposite orders": (
        ILLEGAL, [put(0, b"1", 0, 5), put(1, b"2", 0, 5), get(2, b"1", 6, 7), get(3, b"2", 8, 9),
                  get(2, b"1", 10, 11)]),
    "delete of an absent key reporting one": (ILLEGAL, [delete(0, 1, 0, 1)]),
    "cas succeeding on the wrong value": (
        ILLEGAL, [put(0, b"1", 0, 1), cas(1, b"9", b"2", (True, None), 2, 3)]),
    "lost update: two successful cas from the same value": (
        ILLEGAL, [put(0, b"1", 0, 1), cas(1, b"1", b"2", (True, None), 2, 5),
                  cas(2, b"1", b"3", (True, None), 2, 5)]),
    "a timed-out put cannot undo a later read": (
        ILLEGAL, [put(0, b"1", 0, None), get(1, b"1", 5, 6), get(1, None, 7, 8)]),
    "timed-out cas from a value the key never had": (
        ILLEGAL, [put(0, b"1", 0, 1), cas(1, b"7", b"2", None, 2, None), get(2, b"2", 5, 6)]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_hand_written_histories(name):
    expected, history = CASES[name]
    verdict, _ = check_key(history)
    assert verdict == expected, f"{name}\n{describe(history)}"


def test_keys_are_checked_apart_and_the_worst_verdict_wins():
    fine = [put(0, b"1", 0, 1, key=b"a"), get(1, b"1", 2, 3, key=b"a")]
    stale = [put(0, b"1", 0, 1, key=b"b"), get(1, None, 2, 3, key=b"b")]
    result = check(fine + stale)
    assert result.verdict == ILLEGAL
    assert [k.verdict for k in result.keys] == [OK, ILLEGAL]
    assert result.illegal_history == stale
    assert result.operations == 4
    assert check(fine).verdict == OK


def test_a_search_out_of_budget_says_unknown_not_ok():
    # 12 concurrent puts then a read of the first: the search has to try
    # many orders; with a budget of 10 steps it cannot finish.
    history = [put(i, b"%d" % i, 0, 100) for i in range(12)] + [get(99, b"0", 101, 102)]
    assert check(history, budget=10).verdict == UNKNOWN
    assert check(history, budget=10).unknown_keys == [b"k"]
    assert check(history).verdict == OK


def test_outcomes_of_a_timed_out_operation():
    assert outcomes(None, put(0, b"1", 0, None)) == [None, b"1"]
    assert outcomes(b"1", delete(0, None, 0, None)) == [b"1", None]
    assert outcomes(b"1", get(0, b"x", 0, None)) == [b"1"]
    with pytest.raises(ValueError, match="unknown operation kind 'inc'"):
        outcomes(None, op(0, "inc", 1, 0, 1))


def test_revision_checks():
    clean = [put(0, b"1", 0, 1, revision=5), get(1, b"1", 2, 3, revision=5, mod_revision=5),
             put(1, b"2", 4, 5, revision=6)]
    assert check_revisions(clean) == []
    reused = [put(0, b"1", 0, 1, revision=5), put(1, b"2", 2, 3, key=b"j", revision=5)]
    problems = check_revisions(reused)
    assert any("revision 5 given to two writes" in p for p in problems)
    assert any("answered revision 5 after" in p for p in problems)
    backwards = [put(0, b"1", 0, 1, revision=7), get(1, b"1", 2, 3, revision=6, mod_revision=7)]
    assert any("answered revision 6" in p for p in check_revisions(backwards))
    wrong_mod = [put(0, b"1", 0, 1, revision=7), get(1, b"1", 2, 3, revision=7, mod_revision=4)]
    assert check_revisions(wrong_mod) == [
        "client 1 get(b'k') -> b'1'@7 read mod_revision 4, but the put of that value got revision 7"]
    # Overlapping operations may answer in any order.
    overlapping = [put(0, b"1", 0, 10, revision=8), get(1, None, 1, 2, revision=7)]
    assert check_revisions(overlapping) == []

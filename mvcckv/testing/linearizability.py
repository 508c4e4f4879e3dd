"""A linearizability checker for histories of single-key operations.

A history is a list of :class:`Operation`: who called what on which key,
when it was called and when it returned (process-local monotonic time),
and what it answered.  An operation whose outcome is unknown (it timed
out, the connection broke) has ``ret=None``: it may have taken effect at
any instant after its call, or never.

Each key is a register (a value, or absent), and every operation touches
one key, so the history is linearizable iff the history of each key is
(linearizability is local, Herlihy & Wing 1990): the search runs per key.
For one key it is Wing & Gong's search with Lowe's memo, as Porcupine
implements it: walk the call/return events in time order; at a call, try
to linearize that operation now (its effect must fit the state); at a
return whose operation is not linearized yet, undo the last choice and try
the next.  ``(linearized set, state)`` pairs already explored are not
explored again.  An unknown operation can be linearized with its effect or
with none, and it never forces a backtrack (its return is at infinity).

The search is exponential in the worst case.  It stops after ``budget``
steps per key and answers ``unknown`` for that key — never a pass it did
not prove.

Worked example, key ``k``, two clients::

    A: put(k, 1) |-------|
    B:                      get(k) -> None |----|

B starts after A returned, so B must see 1: not linearizable.  Had B's
call started before A's return, ``get -> None`` linearized before the put
would be fine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

OK = "ok"
ILLEGAL = "illegal"
UNKNOWN = "unknown"

DEFAULT_BUDGET = 2_000_000


@dataclass(frozen=True)
class Operation:
    """One operation on one key.

    ``kind`` and its ``arg`` / ``out``:

    ``put``     arg: the value                 out: None
    ``get``     arg: None                      out: the value read, None if absent
    ``delete``  arg: None                      out: how many keys were deleted (0 or 1)
    ``cas``     arg: (expected, new value)     out: (succeeded, value read when it failed)

    ``expected`` None means "absent".  ``revision`` is the header revision
    of the answer and ``mod_revision`` the read key's (for ``get``); 0 when
    unknown.  ``ret`` None: the outcome is unknown (``out`` is ignored).
    """

    client: int
    key: bytes
    kind: str
    arg: Any
    call: float
    ret: float | None
    out: Any = None
    revision: int = 0
    mod_revision: int = 0

    @property
    def writes(self) -> bool:
        """Whether the operation is known to have changed the key."""
        if self.ret is None:
            return False
        if self.kind == "put":
            return True
        if self.kind == "delete":
            return self.out > 0
        if self.kind == "cas":
            return bool(self.out[0])
        return False


def outcomes(state: Any, op: Operation) -> list[Any]:
    """The states after ``op`` linearized in ``state``; empty if it cannot be."""
    kind = op.kind
    if kind not in ("put", "get", "delete", "cas"):
        raise ValueError(f"unknown operation kind {kind!r}")
    if op.ret is None:
        after = [state]  # no effect
        if kind == "put":
            after.append(op.arg)
        elif kind == "delete":
            after.append(None)
        elif kind == "cas" and state == op.arg[0]:
            after.append(op.arg[1])
        return list(dict.fromkeys(after))
    if kind == "put":
        return [op.arg]
    if kind == "get":
        return [state] if op.out == state else []
    if kind == "delete":
        return [None] if op.out == (0 if state is None else 1) else []
    succeeded, read = op.out
    if state == op.arg[0]:
        return [op.arg[1]] if succeeded else []
    return [state] if not succeeded and read == state else []


class _Node:
    __slots__ = ("op", "is_call", "match", "prev", "next")

    def __init__(self, op: int, is_call: bool):
        self.op = op
        self.is_call = is_call
        self.match: _Node | None = None
        self.prev: _Node | None = None
        self.next: _Node | None = None


def _event_list(ops: list[Operation]) -> _Node:
    """A doubly linked list of call and return events in time order; at
    equal times calls come first (the operations then overlap)."""
    events = []
    for i, op in enumerate(ops):
        call, ret = _Node(i, True), _Node(i, False)
        call.match = ret
        events.append((op.call, 0, call))
        events.append((float("inf") if op.ret is None else op.ret, 1, ret))
    events.sort(key=lambda e: (e[0], e[1]))
    head = _Node(-1, False)
    prev = head
    for _, _, node in events:
        prev.next, node.prev = node, prev
        prev = node
    return head


def _lift(node: _Node) -> None:
    for n in (node, node.match):
        n.prev.next = n.next
        if n.next is not None:
            n.next.prev = n.prev


def _unlift(node: _Node) -> None:
    for n in (node.match, node):
        n.prev.next = n
        if n.next is not None:
            n.next.prev = n


@dataclass
class KeyResult:
    key: bytes
    verdict: str
    operations: int
    steps: int


def check_key(ops: list[Operation], initial: Any = None, budget: int = DEFAULT_BUDGET) -> tuple[str, int]:
    """(verdict, search steps) for one key's history."""
    if not ops:
        return OK, 0
    head = _event_list(ops)
    entry = head.next
    state, linearized = initial, 0
    stack: list[tuple[_Node, Any, int]] = []
    seen: set[tuple[int, Any]] = set()
    first_alternative = 0
    steps = 0
    while head.next is not None:
        steps += 1
        if steps > budget:
            return UNKNOWN, steps
        if entry.is_call:
            after = outcomes(state, ops[entry.op])
            bit = 1 << entry.op
            for k in range(first_alternative, len(after)):
                memo = (linearized | bit, after[k])
                if memo in seen:
                    continue
                seen.add(memo)
                stack.append((entry, state, k))
                state, linearized = after[k], linearized | bit
                _lift(entry)
                entry = head.next
                break
            else:
                entry = entry.next
            first_alternative = 0
        else:
            # A return whose call is not linearized yet: undo the last choice.
            if not stack:
                return ILLEGAL, steps
            entry, state, k = stack.pop()
            linearized &= ~(1 << entry.op)
            _unlift(entry)
            first_alternative = k + 1
    return OK, steps


@dataclass
class Result:
    """The verdict of a whole history: ``illegal`` if any key's is,
    else ``unknown`` if any key's search ran out of budget, else ``ok``."""

    verdict: str
    keys: list[KeyResult] = field(default_factory=list)
    operations: int = 0
    illegal_history: list[Operation] = field(default_factory=list)

    @property
    def unknown_keys(self) -> list[bytes]:
        return [k.key for k in self.keys if k.verdict == UNKNOWN]


def check(history: Iterable[Operation], budget: int = DEFAULT_BUDGET) -> Result:
    """Check a history, one key at a time (every key starts absent)."""
    by_key: dict[bytes, list[Operation]] = {}
    for op in history:
        by_key.setdefault(op.key, []).append(op)
    result = Result(OK, operations=sum(len(v) for v in by_key.values()))
    for key in sorted(by_key):
        ops = by_key[key]
        verdict, steps = check_key(ops, budget=budget)
        result.keys.append(KeyResult(key, verdict, len(ops), steps))
        if verdict == ILLEGAL and result.verdict != ILLEGAL:
            result.verdict = ILLEGAL
            result.illegal_history = sorted(ops, key=lambda o: o.call)
        elif verdict == UNKNOWN and result.verdict == OK:
            result.verdict = UNKNOWN
    return result


def check_revisions(history: Iterable[Operation]) -> list[str]:
    """What etcd's revisions promise across keys, beyond each key's register:

    * no two writes get the same revision;
    * real-time order: an operation that starts after another returned
      answers a revision at least as high, and strictly higher if it writes;
    * a get reading a value that an acknowledged put wrote reports that
      put's revision as the key's ``mod_revision``.

    Returns the violations found (empty when none).
    """
    ops = [op for op in history if op.ret is not None and op.revision > 0]
    problems: list[str] = []
    writers: dict[int, Operation] = {}
    put_revision: dict[tuple[bytes, Any], int] = {}
    for op in ops:
        if op.writes:
            other = writers.get(op.revision)
            if other is not None:
                problems.append(f"revision {op.revision} given to two writes: {_show(other)} and {_show(op)}")
            writers[op.revision] = op
        if op.kind == "put":
            put_revision[(op.key, op.arg)] = op.revision
    # Sweep in time order: the highest revision answered by any operation
    # returned before each call.
    events = sorted([(op.call, 1, op) for op in ops] + [(op.ret, 0, op) for op in ops], key=lambda e: (e[0], e[1]))
    highest, by = 0, None
    for _, is_call, op in events:
        if not is_call:
            if op.revision > highest:
                highest, by = op.revision, op
            continue
        if op.revision < highest or (op.writes and op.revision == highest):
            problems.append(f"{_show(op)} answered revision {op.revision} after {_show(by)} "
                            f"had returned revision {highest}")
    for op in ops:
        if op.kind == "get" and op.out is not None:
            written = put_revision.get((op.key, op.out))
            if written is not None and op.mod_revision != written:
                problems.append(f"{_show(op)} read mod_revision {op.mod_revision}, "
                                f"but the put of that value got revision {written}")
    return problems


def _show(op: Operation | None) -> str:
    if op is None:
        return "?"
    arg = "" if op.arg is None else f"{op.arg!r}"
    out = "" if op.kind == "put" else f" -> {op.out!r}"
    return f"client {op.client} {op.kind}({op.key!r}{', ' + arg if arg else ''}){out}@{op.revision}"


def describe(ops: list[Operation], t0: float | None = None) -> str:
    """One line per operation, times relative to the first call."""
    if not ops:
        return ""
    t0 = min(op.call for op in ops) if t0 is None else t0
    lines = []
    for op in sorted(ops, key=lambda o: o.call):
        ret = "timed out" if op.ret is None else f"{(op.ret - t0) * 1e3:9.3f} ms"
        lines.append(f"  [{(op.call - t0) * 1e3:9.3f} ms .. {ret}] {_show(op)}")
    return "\n".join(lines)

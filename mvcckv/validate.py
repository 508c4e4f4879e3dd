"""Static request checks, run before a request is logged.

A request that fails here is rejected whole and never reaches the WAL, so a
bad request cannot leave anything behind.  The order of the checks is
etcd's (its v3rpc ``key.go``), because when a request is wrong in two ways
the client sees the first error etcd would report.
"""

from __future__ import annotations

from mvcckv import errors
from mvcckv.pb import rpc_pb2 as pb

_SORT_ORDERS = frozenset(pb.RangeRequest.SortOrder.values())
_SORT_TARGETS = frozenset(pb.RangeRequest.SortTarget.values())


def check_range(r: pb.RangeRequest) -> None:
    if not r.key:
        raise errors.EmptyKeyError()
    # etcd 3.6 rejects enum values it does not know; proto3 keeps them as ints.
    if r.sort_order not in _SORT_ORDERS or r.sort_target not in _SORT_TARGETS:
        raise errors.InvalidSortOptionError()


def check_put(r: pb.PutRequest) -> None:
    if not r.key:
        raise errors.EmptyKeyError()
    if r.ignore_value and r.value:
        raise errors.ValueProvidedError()
    if r.ignore_lease and r.lease != 0:
        raise errors.LeaseProvidedError()


def check_delete(r: pb.DeleteRangeRequest) -> None:
    if not r.key:
        raise errors.EmptyKeyError()


def check_txn(r: pb.TxnRequest, max_txn_ops: int) -> None:
    """All of etcd's static txn checks: op budget, keys, ops, duplicates."""
    _check_txn_shape(r, max_txn_ops)
    _check_intervals(r.success)
    _check_intervals(r.failure)


def _check_txn_shape(r: pb.TxnRequest, max_txn_ops: int) -> None:
    opc = max(len(r.compare), len(r.success), len(r.failure))
    if opc > max_txn_ops:
        raise errors.TooManyOpsError()
    for c in r.compare:
        if not c.key:
            raise errors.EmptyKeyError()
    # A nested txn spends its parent's budget: it may only use what the
    # parent level left over.
    budget = max_txn_ops - opc
    for op in r.success:
        _check_op(op, budget)
    for op in r.failure:
        _check_op(op, budget)


def _check_op(op: pb.RequestOp, max_txn_ops: int) -> None:
    which = op.WhichOneof("request")
    if which == "request_range":
        check_range(op.request_range)
    elif which == "request_put":
        check_put(op.request_put)
    elif which == "request_delete_range":
        check_delete(op.request_delete_range)
    elif which == "request_txn":
        _check_txn_shape(op.request_txn, max_txn_ops)
    else:
        # etcd's answer to an empty RequestOp (a quirk kept for fidelity).
        raise errors.KeyNotFoundError()


class _Intervals:
    """Half-open key intervals deleted at one txn level (and below).

    etcd treats a DeleteRange's ``range_end`` as a plain string here, so an
    end of ``b"\\0"`` (meaning "to the end of the keyspace" everywhere else)
    makes an inverted, empty interval that overlaps nothing; that quirk is
    reproduced on purpose.  An empty end is the single point ``[key, key]``.
    """

    __slots__ = ("_ivs",)

    def __init__(self) -> None:
        self._ivs: list[tuple[bytes, bytes | None]] = []

    def add(self, key: bytes, end: bytes) -> None:
        self._ivs.append((key, end if end else None))

    def extend(self, other: "_Intervals") -> None:
        self._ivs.extend(other._ivs)

    def contains(self, k: bytes) -> bool:
        for start, end in self._ivs:
            if end is None:
                if k == start:
                    return True
            elif start <= k < end:
                return True
        return False


def _check_intervals(ops) -> tuple[set[bytes], _Intervals]:
    """etcd's duplicate-key rule; returns (puts, deletes) for the parent."""
    dels = _Intervals()
    for op in ops:
        if op.WhichOneof("request") == "request_delete_range":
            d = op.request_delete_range
            dels.add(d.key, d.range_end)

    puts: set[bytes] = set()
    for op in ops:
        if op.WhichOneof("request") != "request_txn":
            continue
        puts_then, dels_then = _check_intervals(op.request_txn.success)
        puts_else, dels_else = _check_intervals(op.request_txn.failure)
        for k in puts_then:
            if k in puts or dels.contains(k):
                raise errors.DuplicateKeyError()
            puts.add(k)
        for k in puts_else:
            # The same key in a nested txn's success and failure is fine:
            # only one of the two branches runs.
            if (k in puts and k not in puts_then) or dels.contains(k):
                raise errors.DuplicateKeyError()
            puts.add(k)
        dels.extend(dels_then)
        dels.extend(dels_else)

    for op in ops:
        if op.WhichOneof("request") != "request_put":
            continue
        k = op.request_put.key
        if k in puts or dels.contains(k):
            raise errors.DuplicateKeyError()
        puts.add(k)
    return puts, dels


def txn_put_cost(r: pb.TxnRequest) -> int:
    """Quota cost of a txn: the larger of its two branches, nested included."""
    return max(_ops_cost(r.success), _ops_cost(r.failure))


def _ops_cost(ops) -> int:
    cost = 0
    for op in ops:
        which = op.WhichOneof("request")
        if which == "request_put":
            p = op.request_put
            cost += put_cost(p)
        elif which == "request_txn":
            cost += txn_put_cost(op.request_txn)
    return cost


# etcd charges every put a fixed overhead on top of its key and value.
PUT_OVERHEAD = 256


def put_cost(p: pb.PutRequest) -> int:
    return PUT_OVERHEAD + len(p.key) + len(p.value)


def txn_is_read_only(r: pb.TxnRequest) -> bool:
    for op in r.success:
        if op.WhichOneof("request") != "request_range":
            return False
    for op in r.failure:
        if op.WhichOneof("request") != "request_range":
            return False
    return True

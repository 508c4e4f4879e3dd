"""Building Txn compares and ops for the embedded API.

Compares read like the condition they state::

    ops.version(b"k") == 0          # key absent
    ops.mod_revision(b"k") < 10
    ops.value(b"k") != b"old"

and ops mirror etcd's requests: ``ops.put``, ``ops.get``, ``ops.delete``,
``ops.txn``.  Every builder returns the protobuf message etcd uses, so the
same objects can be sent over gRPC.
"""

from __future__ import annotations

from mvcckv.pb import rpc_pb2 as pb


def _b(v: bytes | str) -> bytes:
    return v.encode() if isinstance(v, str) else v


class _Target:
    """One side of a compare: a field of the key(s) in [key, range_end)."""

    __slots__ = ("_key", "_end", "_target", "_field")

    def __init__(self, key, range_end, target: int, field: str):
        self._key = _b(key)
        self._end = _b(range_end)
        self._target = target
        self._field = field

    def _cmp(self, result: int, operand) -> pb.Compare:
        c = pb.Compare(key=self._key, range_end=self._end, target=self._target, result=result)
        setattr(c, self._field, _b(operand) if self._field == "value" else operand)
        return c

    def __eq__(self, other):  # type: ignore[override]
        return self._cmp(pb.Compare.EQUAL, other)

    def __ne__(self, other):  # type: ignore[override]
        return self._cmp(pb.Compare.NOT_EQUAL, other)

    def __gt__(self, other):
        return self._cmp(pb.Compare.GREATER, other)

    def __lt__(self, other):
        return self._cmp(pb.Compare.LESS, other)

    __hash__ = None  # type: ignore[assignment]


def version(key, range_end=b"") -> _Target:
    return _Target(key, range_end, pb.Compare.VERSION, "version")


def create_revision(key, range_end=b"") -> _Target:
    return _Target(key, range_end, pb.Compare.CREATE, "create_revision")


def mod_revision(key, range_end=b"") -> _Target:
    return _Target(key, range_end, pb.Compare.MOD, "mod_revision")


def value(key, range_end=b"") -> _Target:
    return _Target(key, range_end, pb.Compare.VALUE, "value")


def lease(key, range_end=b"") -> _Target:
    return _Target(key, range_end, pb.Compare.LEASE, "lease")


def put(key, value=b"", **kw) -> pb.RequestOp:
    return pb.RequestOp(request_put=pb.PutRequest(key=_b(key), value=_b(value), **kw))


def get(key, range_end=b"", **kw) -> pb.RequestOp:
    return pb.RequestOp(request_range=pb.RangeRequest(key=_b(key), range_end=_b(range_end), **kw))


def delete(key, range_end=b"", **kw) -> pb.RequestOp:
    return pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=_b(key), range_end=_b(range_end), **kw))


def txn(compare=(), success=(), failure=()) -> pb.RequestOp:
    return pb.RequestOp(
        request_txn=pb.TxnRequest(compare=list(compare), success=list(success), failure=list(failure))
    )

"""Hypothesis strategies for etcd's requests.

Every request the conformance machine sends comes from here: puts,
ranges, deletes, txns, lease grants and revokes, compactions.  Keys come
from a small alphabet under an optional prefix, so that they
collide and ranges and prefixes overlap; txns draw every compare target
and result, operands from the wrong union member, nested txns and both
branches, so many break the duplicate-key rule and both sides must refuse
them alike.  Revisions are drawn around every boundary the model knows
(negative, 0, compacted, exact, future).

A :class:`Keyspace` says where the keys live.  Without a prefix, "to the
end" is etcd's one zero byte (§4.1) and its quirks are drawn too; with one,
every range stays inside the prefix, so a run can share a server with other
data (revisions are shared all the same: see :mod:`mvcckv.testing.machine`).
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st

from mvcckv.pb import rpc_pb2 as pb
from mvcckv.testing.model import TO_THE_END, Model, prefix_end

NAMES = (b"a", b"ab", b"b", b"ba", b"c", b"\xff")


@dataclass(frozen=True)
class Keyspace:
    """Where a run's keys live: ``prefix + name`` for each name."""

    prefix: bytes = b""
    names: tuple[bytes, ...] = NAMES

    @property
    def end(self) -> bytes:
        """The range_end of "to the end of this keyspace"."""
        return prefix_end(self.prefix) if self.prefix else TO_THE_END

    @property
    def everything(self) -> tuple[bytes, bytes]:
        return (self.prefix, self.end) if self.prefix else (TO_THE_END, TO_THE_END)

    def keys(self):
        return st.sampled_from([self.prefix + n for n in self.names])


@dataclass(frozen=True)
class Leases:
    """Lease IDs a run uses: ``granted`` may be granted, ``unknown`` never is."""

    granted: tuple[int, ...] = (1, 2)
    unknown: int = 3

    def ids(self):
        """Mostly no lease; sometimes a granted one or the unknown one."""
        return st.sampled_from((0, 0, 0, 0, 0, *self.granted, self.unknown))


values = st.one_of(st.sampled_from((b"", b"x", b"y", b"xy")), st.binary(max_size=3))
rarely = st.sampled_from((False, False, False, False, True))
seldom = st.sampled_from((False,) * 9 + (True,))

# How often each shape of §4.1 is drawn: reads favour wide ranges (more to
# sort, filter and limit), deletes favour single keys (or little would be left).
READ_SHAPES = ("key", "prefix", "from", "interval", "all", "all")
DELETE_SHAPES = ("key", "key", "key", "key", "prefix", "from", "interval", "all")


@st.composite
def key_ranges(draw, space: Keyspace, shapes=READ_SHAPES) -> tuple[bytes, bytes]:
    """A key and range_end of every shape in §4.1."""
    key = draw(space.keys())
    shape = draw(st.sampled_from(shapes))
    if shape == "key":
        return key, b""
    if shape == "prefix":
        return key, prefix_end(key)
    if shape == "from":
        return key, space.end
    if shape == "interval":
        return key, draw(space.keys())  # an end <= key selects nothing
    return space.everything


def between(low: int, high: int):
    """An integer in ``low..high`` (``low`` if the range is empty), drawn
    so that the shape of the draw does not depend on the bounds.

    The bounds come from the state of the run, which is not the same from
    one run of an example to the next against a shared server (it starts
    at another revision, after other compactions); hypothesis requires the
    same choices to make the same kind of draws, so the choice is a fixed
    range folded onto the wanted one.  Shrinking goes towards ``low``.
    """
    width = max(high - low, 0) + 1
    return st.integers(0, 1 << 16).map(lambda i: low + i % width)


def revisions(model: Model, low: int = -2):
    """Read revisions around every boundary: negative, 0, compacted, exact,
    future; none below ``low``."""
    cur, crev, start = model.revision, model.compact_revision, model.start_revision
    return st.one_of(
        st.just(0),
        between(low, 2),
        between(max(low, start - 2), cur + 2),
        st.sampled_from(tuple(max(low, r) for r in (crev - 1, crev, crev + 1, cur, cur + 1))),
    )


def _revision_operands(model: Model):
    return st.one_of(between(0, 2), between(max(0, model.start_revision - 1), model.revision + 1))


@st.composite
def range_requests(draw, model: Model, space: Keyspace) -> pb.RangeRequest:
    key, end = draw(key_ranges(space))

    def revision_filter() -> int:
        return draw(_revision_operands(model)) if draw(seldom) else 0

    # Mostly current reads: on a shared server most revisions below the
    # run's start show an empty keyspace.
    return pb.RangeRequest(
        key=key,
        range_end=end,
        revision=draw(revisions(model)) if draw(rarely) else 0,
        limit=draw(st.sampled_from((0, 1, 1, 2, 3, -1))),
        sort_order=draw(st.sampled_from(pb.RangeRequest.SortOrder.values())),
        sort_target=draw(st.sampled_from(pb.RangeRequest.SortTarget.values())),
        keys_only=draw(st.booleans()),
        count_only=draw(rarely),
        min_mod_revision=revision_filter(),
        max_mod_revision=revision_filter(),
        min_create_revision=revision_filter(),
        max_create_revision=revision_filter(),
    )


@st.composite
def put_requests(draw, space: Keyspace, leases: Leases, flags=rarely) -> pb.PutRequest:
    """Puts; ``flags`` is how often ignore_value / ignore_lease are set."""
    ignore_value = draw(flags)
    value = draw(values)
    if ignore_value and draw(st.booleans()):
        value = b""  # mostly valid; otherwise "value is provided"
    return pb.PutRequest(
        key=draw(space.keys()),
        value=value,
        lease=draw(leases.ids()),
        prev_kv=draw(st.booleans()),
        ignore_value=ignore_value,
        ignore_lease=draw(flags),
    )


@st.composite
def delete_requests(draw, space: Keyspace) -> pb.DeleteRangeRequest:
    key, end = draw(key_ranges(space, DELETE_SHAPES))
    return pb.DeleteRangeRequest(key=key, range_end=end, prev_kv=draw(st.booleans()))


_OPERAND_FIELDS = {
    pb.Compare.VERSION: "version",
    pb.Compare.CREATE: "create_revision",
    pb.Compare.MOD: "mod_revision",
    pb.Compare.VALUE: "value",
    pb.Compare.LEASE: "lease",
}


@st.composite
def compares(draw, model: Model, space: Keyspace, leases: Leases) -> pb.Compare:
    key = draw(space.keys())
    target = draw(st.sampled_from(sorted(_OPERAND_FIELDS)))
    c = pb.Compare(
        key=key,
        range_end=draw(st.sampled_from((b"", b"", b"", space.end, prefix_end(key)))),
        target=target,
        result=draw(st.sampled_from(pb.Compare.CompareResult.values())),
    )
    operand = _OPERAND_FIELDS[target]
    if draw(rarely):
        # Another union member, or none: the operand then reads as zero.
        operand = draw(st.sampled_from((None, *_OPERAND_FIELDS.values())))
    if operand == "value":
        c.value = draw(values)
    elif operand == "lease":
        c.lease = draw(leases.ids())
    elif operand == "version":
        c.version = draw(st.integers(0, 3))
    elif operand is not None:
        setattr(c, operand, draw(_revision_operands(model)))
    return c


@st.composite
def txn_range_requests(draw, model: Model, space: Keyspace) -> pb.RangeRequest:
    """Ranges inside txns: fewer options (standalone ranges try them all),
    and mostly at the current revision, so that most txns can run."""
    key, end = draw(key_ranges(space))
    return pb.RangeRequest(
        key=key,
        range_end=end,
        revision=draw(st.one_of(st.just(0), st.just(0), revisions(model))),
        limit=draw(st.sampled_from((0, 0, 1, 2))),
        sort_order=draw(st.sampled_from(pb.RangeRequest.SortOrder.values())),
        sort_target=draw(st.sampled_from(pb.RangeRequest.SortTarget.values())),
        keys_only=draw(rarely),
        count_only=draw(rarely),
    )


def request_ops(model: Model, space: Keyspace, leases: Leases, depth: int):
    choices = [
        # Any bad op in either branch refuses the whole txn: keep them seldom.
        put_requests(space, leases, flags=seldom).map(lambda p: pb.RequestOp(request_put=p)),
        delete_requests(space).map(lambda d: pb.RequestOp(request_delete_range=d)),
        txn_range_requests(model, space).map(lambda r: pb.RequestOp(request_range=r)),
    ]
    if depth > 0:
        choices.append(txn_requests(model, space, leases, depth - 1).map(lambda t: pb.RequestOp(request_txn=t)))
    return st.one_of(choices)


def _ops_of(t: pb.TxnRequest):
    for op in list(t.success) + list(t.failure):
        yield op
        if op.WhichOneof("request") == "request_txn":
            yield from _ops_of(op.request_txn)


def crashes_etcd(t: pb.TxnRequest) -> bool:
    """Whether ``t`` may take etcd down: a delete to the end of the keyspace
    and a put with ignore_value/ignore_lease in one txn.  etcd then panics
    applying the put (the model refuses such a txn, see ``_check_taken``);
    a run against a real server must not send it."""
    ops = list(_ops_of(t))
    to_end = any(op.WhichOneof("request") == "request_delete_range"
                 and op.request_delete_range.range_end == TO_THE_END for op in ops)
    ignoring = any(op.WhichOneof("request") == "request_put"
                   and (op.request_put.ignore_value or op.request_put.ignore_lease) for op in ops)
    return to_end and ignoring


def txn_requests(model: Model, space: Keyspace, leases: Leases, depth: int = 2):
    """Txns nested up to ``depth`` levels; with a small ``max_txn_ops`` the
    deepest level sometimes exceeds what its parents left of the op budget."""
    size = 3 if depth == 2 else 2
    ops = st.lists(request_ops(model, space, leases, depth), max_size=size)
    return st.builds(
        lambda c, s, f: pb.TxnRequest(compare=c, success=s, failure=f),
        st.lists(compares(model, space, leases), max_size=size),
        ops,
        ops,
    )


def lease_grant_requests(leases: Leases, ttl: int):
    """Grants of the grantable IDs (granting one twice is refused)."""
    return st.sampled_from(leases.granted).map(lambda i: pb.LeaseGrantRequest(TTL=ttl, ID=i))


def lease_revoke_requests(leases: Leases):
    """Revokes of the grantable IDs and of the one never granted."""
    return st.sampled_from((*leases.granted, leases.unknown)).map(lambda i: pb.LeaseRevokeRequest(ID=i))


@st.composite
def compaction_requests(draw, model: Model) -> pb.CompactionRequest:
    """Mostly valid compactions (above the compact revision, at most the
    current one), else anything around the boundaries; physical or not."""
    cur, crev = model.revision, model.compact_revision
    valid = between(min(max(crev + 1, model.start_revision), cur), cur)
    anything = st.one_of(between(-1, 1), between(max(-1, crev - 1), cur + 1), st.just(cur + 1))
    return pb.CompactionRequest(revision=draw(st.one_of(valid, valid, anything)), physical=draw(st.booleans()))


@st.composite
def guarded_put_requests(draw, model: Model, space: Keyspace, leases: Leases) -> pb.TxnRequest:
    """The txn clients send most: one compare, a put if it holds, a read
    if not (a lock, a compare-and-swap, a leader election)."""
    key = draw(space.keys())
    c = draw(compares(model, space, leases))
    c.key, c.range_end = key, b""
    put = draw(put_requests(space, leases, flags=st.just(False)))
    put.key = key
    return pb.TxnRequest(compare=[c], success=[pb.RequestOp(request_put=put)],
                         failure=[pb.RequestOp(request_range=pb.RangeRequest(key=key))])


@st.composite
def page_requests(draw, space: Keyspace) -> pb.RangeRequest:
    """A page of a list, as Kubernetes reads: from a key to the end of the
    keyspace, a small limit, sometimes keys only or a count."""
    key = draw(st.one_of(st.just(space.everything[0]), space.keys()))
    return pb.RangeRequest(key=key, range_end=space.end, limit=draw(st.integers(1, 3)),
                           keys_only=draw(rarely), count_only=draw(seldom))

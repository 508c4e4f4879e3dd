"""Executing KV requests against a store view: Range, Put, DeleteRange, Txn.

These functions hold etcd's request-level rules (ETCD_SEMANTICS §4, §5) and
nothing else; the revision bookkeeping lives in the views they are given:

``ReadView`` (``rev``, ``first_rev``, ``range_keys``) — a consistent read of
the store at one revision; ``WriteView`` adds ``put``, ``delete_range`` and
``lease_exists``, and its ``rev`` moves to ``begin + 1`` as soon as it has
recorded a change, so reads inside a txn see the txn's own earlier writes.

Txn evaluation follows etcd's order: every compare of the whole tree is
evaluated first against the state before the txn (the *path*), then the
taken path's ops are checked (ranges' revisions, leases, ``ignore_*``), and
only then executed — so a failing check rejects the txn with nothing
applied.
"""

from __future__ import annotations

import operator

from mvcckv import errors
from mvcckv.pb import kv_pb2
from mvcckv.pb import rpc_pb2 as pb

_RR = pb.RangeRequest
_SORT_KEYS = {
    _RR.KEY: operator.attrgetter("key"),
    _RR.VERSION: operator.attrgetter("version"),
    _RR.CREATE: operator.attrgetter("create_revision"),
    _RR.MOD: operator.attrgetter("mod_revision"),
    _RR.VALUE: operator.attrgetter("value"),
}


# -- Range ------------------------------------------------------------------


def read_revision(current: int, at_rev: int, first_rev: int) -> int:
    """The revision a read asked for at ``at_rev`` is answered at (§4.2).

    ``<= 0`` means ``current``; beyond ``current`` is a future revision;
    below the compact revision ``first_rev`` is compacted (the compact
    revision itself is still readable).  Both engines' views use this.
    """
    if at_rev > current:
        raise errors.FutureRevisionError()
    rev = current if at_rev <= 0 else at_rev
    if rev < first_rev:
        raise errors.CompactedError()
    return rev



def execute_range(view, r: pb.RangeRequest) -> pb.RangeResponse:
    """etcd's range algorithm (§4.3): fetch, count, filter, sort, limit."""
    kvs, count, rev = view.range_keys(r.key, r.range_end, r.revision, range_fetch_limit(r), r.count_only)
    return range_response(r, kvs, count, rev)


def _filtered(r: pb.RangeRequest) -> bool:
    return bool(r.min_mod_revision or r.max_mod_revision or r.min_create_revision or r.max_create_revision)


def range_fetch_limit(r: pb.RangeRequest) -> int:
    """How many keys a Range fetches (0: all): the fetch half of
    :func:`execute_range`, for an engine that fetches without a view."""
    if r.sort_order != _RR.NONE or _filtered(r):
        return 0  # sort and filter need every key; truncate afterwards
    if r.limit > 0:
        return r.limit + 1  # one extra tells whether there is more
    return 0


def range_response(r: pb.RangeRequest, kvs: list, count: int, rev: int) -> pb.RangeResponse:
    """The answer half of :func:`execute_range`: ``kvs`` (in key order, up
    to :func:`range_fetch_limit`) and ``count`` as fetched at ``rev``."""
    if _filtered(r):
        if r.max_mod_revision:
            kvs = [kv for kv in kvs if kv.mod_revision <= r.max_mod_revision]
        if r.min_mod_revision:
            kvs = [kv for kv in kvs if kv.mod_revision >= r.min_mod_revision]
        if r.max_create_revision:
            kvs = [kv for kv in kvs if kv.create_revision <= r.max_create_revision]
        if r.min_create_revision:
            kvs = [kv for kv in kvs if kv.create_revision >= r.min_create_revision]

    order = r.sort_order
    if r.sort_target != _RR.KEY and order == _RR.NONE:
        order = _RR.ASCEND
    elif r.sort_target == _RR.KEY and order == _RR.ASCEND:
        order = _RR.NONE  # already in key order
    if order != _RR.NONE and len(kvs) > 1:
        keyf = _SORT_KEYS[r.sort_target]
        # Python's sort is stable even with reverse=True, and the input is in
        # key order, so ties stay in ascending key order either way.
        kvs = sorted(kvs, key=keyf, reverse=(order == _RR.DESCEND))

    resp = pb.RangeResponse(count=count)
    resp.header.revision = rev
    if r.limit > 0 and len(kvs) > r.limit:
        kvs = kvs[: r.limit]
        resp.more = True
    if r.keys_only:
        for kv in kvs:
            kv.ClearField("value")
    resp.kvs.extend(kvs)
    return resp


# -- Put / DeleteRange -----------------------------------------------------


def _check_put(view, p: pb.PutRequest, cleared: list[bytes]) -> None:
    if p.ignore_value or p.ignore_lease:
        kvs, _, _ = view.range_keys(p.key, b"", 0, 0, False)
        if not kvs:
            raise errors.KeyNotFoundError()
        # An earlier DeleteRange to the end of the keyspace (range_end b"\0")
        # on the taken path removes the key before this put runs; the
        # duplicate-key check lets that pair through (§5.3 quirk).  etcd
        # panics when the put then finds no key; refusing the txn here keeps
        # it all or nothing, since nothing can fail once execution starts.
        if any(p.key >= start for start in cleared):
            raise errors.KeyNotFoundError()
    if p.lease != 0 and not view.lease_exists(p.lease):
        raise errors.LeaseNotFoundError()


def execute_put(view, p: pb.PutRequest) -> pb.PutResponse:
    resp = pb.PutResponse()
    prev = None
    if p.ignore_value or p.ignore_lease or p.prev_kv:
        kvs, _, _ = view.range_keys(p.key, b"", 0, 0, False)
        prev = kvs[0] if kvs else None
    if (p.ignore_value or p.ignore_lease) and prev is None:
        raise errors.KeyNotFoundError()
    value = prev.value if p.ignore_value else p.value
    lease = prev.lease if p.ignore_lease else p.lease
    if p.prev_kv and prev is not None:
        resp.prev_kv.CopyFrom(prev)
    resp.header.revision = view.put(p.key, value, lease)
    return resp


def execute_delete(view, d: pb.DeleteRangeRequest) -> pb.DeleteRangeResponse:
    resp = pb.DeleteRangeResponse()
    if d.prev_kv:
        kvs, _, _ = view.range_keys(d.key, d.range_end, 0, 0, False)
        resp.prev_kvs.extend(kvs)
    resp.deleted, resp.header.revision = view.delete_range(d.key, d.range_end)
    return resp


def apply_put(view, p: pb.PutRequest) -> pb.PutResponse:
    """A standalone Put: its dynamic checks, then the write."""
    if p.lease != 0 and not view.lease_exists(p.lease):
        raise errors.LeaseNotFoundError()
    return execute_put(view, p)


# -- Txn -----------------------------------------------------------------------


def apply_txn(view, t: pb.TxnRequest) -> pb.TxnResponse:
    path = _compare_to_path(view, t)
    # Two passes over the taken path, as etcd does: every put first, then
    # every range.  A txn that fails both ways reports the put's error
    # (e.g. "key not found" before a range's "future revision").
    _check_txn(t, path, 0, _PutChecks(view))
    _check_txn(t, path, 0, _RangeChecks(view))
    resp = pb.TxnResponse()
    _execute_txn(view, t, path, 0, resp)
    resp.header.revision = view.rev
    return resp


def _compare_to_path(view, t: pb.TxnRequest) -> list[bool]:
    """Outcome of every compare in the tree, in pre-order of the taken path."""
    ok = all(_apply_compare(view, c) for c in t.compare)
    path = [ok]
    for op in t.success if ok else t.failure:
        if op.WhichOneof("request") == "request_txn":
            path.extend(_compare_to_path(view, op.request_txn))
    return path


def _check_txn(t: pb.TxnRequest, path: list[bool], pos: int, check) -> int:
    """Run ``check`` on every op of the taken path, in execution order;
    returns the path position after this txn."""
    ops = t.success if path[pos] else t.failure
    pos += 1
    for op in ops:
        if op.WhichOneof("request") == "request_txn":
            pos = _check_txn(op.request_txn, path, pos, check)
        else:
            check(op)
    return pos


class _PutChecks:
    """Leases and ``ignore_*`` of the taken path's puts.

    ``cleared`` collects, in execution order, the start keys of the taken
    path's deletes with range_end b"\0" (see ``_check_put``).
    """

    def __init__(self, view):
        self._view = view
        self._cleared: list[bytes] = []

    def __call__(self, op: pb.RequestOp) -> None:
        which = op.WhichOneof("request")
        if which == "request_put":
            _check_put(self._view, op.request_put, self._cleared)
        elif which == "request_delete_range" and op.request_delete_range.range_end == b"\0":
            self._cleared.append(op.request_delete_range.key)


class _RangeChecks:
    """Revisions of the taken path's ranges."""

    def __init__(self, view):
        self._view = view

    def __call__(self, op: pb.RequestOp) -> None:
        if op.WhichOneof("request") == "request_range":
            _check_txn_range(self._view, op.request_range)


def _check_txn_range(view, r: pb.RangeRequest) -> None:
    # etcd's pre-check inside a txn differs from a standalone Range: only 0
    # means "current", so a negative revision can fail as compacted.
    if r.revision == 0:
        return
    if r.revision > view.rev:
        raise errors.FutureRevisionError()
    if r.revision < view.first_rev:
        raise errors.CompactedError()


def _execute_txn(view, t: pb.TxnRequest, path: list[bool], pos: int, resp: pb.TxnResponse) -> int:
    ok = path[pos]
    resp.succeeded = ok
    pos += 1
    for op in t.success if ok else t.failure:
        which = op.WhichOneof("request")
        out = resp.responses.add()
        if which == "request_range":
            # Inner headers carry only the revision, as etcd's do.
            out.response_range.CopyFrom(execute_range(view, op.request_range))
        elif which == "request_put":
            out.response_put.CopyFrom(execute_put(view, op.request_put))
        elif which == "request_delete_range":
            out.response_delete_range.CopyFrom(execute_delete(view, op.request_delete_range))
        elif which == "request_txn":
            # A nested TxnResponse carries an all-zero header, as etcd's does.
            out.response_txn.header.SetInParent()
            pos = _execute_txn(view, op.request_txn, path, pos, out.response_txn)
    return pos


def _apply_compare(view, c: pb.Compare) -> bool:
    try:
        kvs, _, _ = view.range_keys(c.key, c.range_end, 0, 0, False)
    except errors.MvccError:
        return False
    if not kvs:
        if c.target == pb.Compare.VALUE:
            # A missing key has no value to compare, not an empty one.
            return False
        return _compare_kv(c, _ZERO_KV)
    return all(_compare_kv(c, kv) for kv in kvs)


_ZERO_KV = kv_pb2.KeyValue()

_TARGET_FIELDS = {
    pb.Compare.VERSION: ("version", "version"),
    pb.Compare.CREATE: ("create_revision", "create_revision"),
    pb.Compare.MOD: ("mod_revision", "mod_revision"),
    pb.Compare.VALUE: ("value", "value"),
    pb.Compare.LEASE: ("lease", "lease"),
}


def _compare_kv(c: pb.Compare, kv) -> bool:
    fields = _TARGET_FIELDS.get(c.target)
    if fields is None:
        actual, operand = 0, 0
    else:
        kv_field, union_field = fields
        actual = getattr(kv, kv_field)
        # The operand counts only if the union member matching the target is
        # the one set; otherwise etcd compares against zero / empty.
        if c.WhichOneof("target_union") == union_field:
            operand = getattr(c, union_field)
        else:
            operand = b"" if c.target == pb.Compare.VALUE else 0
    res = c.result
    if res == pb.Compare.EQUAL:
        return actual == operand
    if res == pb.Compare.NOT_EQUAL:
        return actual != operand
    if res == pb.Compare.GREATER:
        return actual > operand
    if res == pb.Compare.LESS:
        return actual < operand
    return True  # etcd treats an unknown result as true

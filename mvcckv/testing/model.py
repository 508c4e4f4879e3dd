"""An executable model of etcd's revision semantics.

Written from the specification (docs ETCD_SEMANTICS.md, cited as §n), not
from the engine: it shares with mvcckv only etcd's protobuf messages (so
requests and responses are the very objects the engine takes and returns)
and the error types (so "both refuse with ``CompactedError``" is one
comparison).  Nothing here is fast; everything here should be obviously
right.  ``test_store_stateful.py`` drives the engine and this model with the
same requests and checks that they agree after every step; so does
:class:`mvcckv.testing.machine.ConformanceMachine` for any target.

A model can start from a store that already has history (a shared
server): ``Model(revision=R, compact_revision=C)`` knows nothing of what
happened before ``R`` and is right only for keys nobody but the run
touches (the checker gives every run a key prefix of its own).  Where
etcd releases differ, ``profile`` (:mod:`mvcckv.testing.profiles`) picks
the answer.

State
-----

``revision``          the current revision: 1 for an empty store, one more
                      per write transaction that changed something (§2.2)
``compact_revision``  the last compaction's revision, -1 before any (§7.1)
``history``           the write transactions, oldest first, one
                      ``Revision(main, changes)`` each; a change's position in
                      ``changes`` is its sub revision (§2.1)
``keys``              key -> its generations, oldest first (§3.1).  A
                      generation is one life of the key: the ``KeyValue`` of
                      every put in it and the main revision of the tombstone
                      that ended it (``None`` while the key is live)

Worked example, key ``foo``: put@2, put@3, delete@4, put@5::

    keys[b"foo"] == [Generation(puts=[foo@2, foo@3], deleted_at=4),
                     Generation(puts=[foo@5], deleted_at=None)]

    at revision 1      absent (not yet created)
    at revision 2      mod 2, create 2, version 1
    at revision 3      mod 3, create 2, version 2
    at revision 4      absent (deleted at 4)
    at revision 5...   mod 5, create 5, version 1 (a new life, §3.5)

Compaction removes nothing here.  It only moves the line below which reads
fail (§4.2): etcd's compaction keeps exactly the revisions that reads at or
above the compact revision need (§3.6), so their answers do not change.

Leases are modelled without time: ``leases`` is the set of granted lease
IDs.  A key is attached to the lease its current ``KeyValue`` names, so
revoking a lease deletes exactly the live keys whose ``lease`` is its ID
(§2.2).  Expiry, TTLs and keep-alives are not modelled.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from mvcckv import errors
from mvcckv.testing.profiles import DEFAULT, Profile
from mvcckv.pb import kv_pb2
from mvcckv.pb import rpc_pb2 as pb

KeyValue = kv_pb2.KeyValue
RangeRequest = pb.RangeRequest
Compare = pb.Compare

# §4.1: a range_end of one zero byte means "every key >= key".
TO_THE_END = b"\0"

DEFAULT_MAX_TXN_OPS = 128  # §0, --max-txn-ops


def in_range(k: bytes, key: bytes, range_end: bytes) -> bool:
    """Whether ``k`` is selected by ``key`` / ``range_end`` (§4.1)."""
    if not range_end:
        return k == key
    if range_end == TO_THE_END:
        return k >= key
    return key <= k < range_end  # an end <= key selects nothing, no error


def prefix_end(prefix: bytes) -> bytes:
    """The range_end of "every key starting with prefix" (§4.1)."""
    p = bytearray(prefix)
    while p and p[-1] == 0xFF:
        p.pop()
    if not p:
        return TO_THE_END
    p[-1] += 1
    return bytes(p)


# -- state ---------------------------------------------------------------------


@dataclass
class Change:
    """One change of a write transaction (§2.1): a put, or a deleted key."""

    key: bytes
    kv: KeyValue | None  # the KeyValue written; None for a tombstone


@dataclass
class Revision:
    """A write transaction that changed something; sub revision = list position."""

    main: int
    changes: list[Change]


@dataclass
class Generation:
    """One life of a key (§3.1), from the put creating it to its tombstone."""

    puts: list[KeyValue]
    deleted_at: int | None = None

    def visible_at(self, rev: int) -> KeyValue | None:
        """The key as of ``rev`` if this life covers ``rev`` (§3.4)."""
        if self.puts[0].mod_revision > rev:
            return None  # not yet created
        if self.deleted_at is not None and self.deleted_at <= rev:
            return None  # already deleted
        return [kv for kv in self.puts if kv.mod_revision <= rev][-1]


@dataclass
class _Decision:
    """Which branch a txn takes, and the decisions of the txns nested in it."""

    succeeded: bool
    nested: list["_Decision"] = field(default_factory=list)


class _Write:
    """A write transaction in progress: every change gets main ``begin + 1``."""

    def __init__(self, model: "Model"):
        self.model = model
        self.begin = model.revision
        self.changes: list[Change] = []

    @property
    def rev(self) -> int:
        """What reads inside the txn see (§5.4 step 3): its own earlier writes too."""
        return self.begin + 1 if self.changes else self.begin

    def put(self, key: bytes, value: bytes, lease: int) -> int:
        rev = self.begin + 1
        prev = self.model.kv_at(key, rev)  # sees this txn's earlier changes (§3.5)
        kv = KeyValue(
            key=key,
            value=value,
            lease=lease,
            mod_revision=rev,
            # §3.5: a live key keeps its create revision and counts up its
            # version; an absent one starts a new life at version 1.
            create_revision=prev.create_revision if prev else rev,
            version=prev.version + 1 if prev else 1,
        )
        generations = self.model.keys.setdefault(key, [])
        if prev is None:
            generations.append(Generation([kv]))
        else:
            generations[-1].puts.append(kv)
        self.changes.append(Change(key, kv))
        return rev

    def delete(self, key: bytes) -> None:
        self.model.keys[key][-1].deleted_at = self.begin + 1  # §3.3
        self.changes.append(Change(key, None))

    def commit(self) -> None:
        # §2.2: the revision moves iff something changed.
        if self.changes:
            self.model.history.append(Revision(self.begin + 1, self.changes))
            self.model.revision = self.begin + 1


# -- static request checks (§4.3 step 1, §5.1 steps 2-4, §5.2, §5.3) ----------


def check_range_request(r: pb.RangeRequest) -> None:
    if not r.key:
        raise errors.EmptyKeyError()
    if r.sort_order not in RangeRequest.SortOrder.values():
        raise errors.InvalidSortOptionError()
    if r.sort_target not in RangeRequest.SortTarget.values():
        raise errors.InvalidSortOptionError()


def check_put_request(p: pb.PutRequest) -> None:
    if not p.key:
        raise errors.EmptyKeyError()
    if p.ignore_value and p.value:
        raise errors.ValueProvidedError()
    if p.ignore_lease and p.lease != 0:
        raise errors.LeaseProvidedError()


def check_delete_request(d: pb.DeleteRangeRequest) -> None:
    if not d.key:
        raise errors.EmptyKeyError()


def check_txn_request(t: pb.TxnRequest, max_txn_ops: int) -> None:
    """§5.3 rules 2-4: op budget per level, compare keys, every op of both branches."""
    n = max(len(t.compare), len(t.success), len(t.failure))
    if n > max_txn_ops:
        raise errors.TooManyOpsError()
    for c in t.compare:
        if not c.key:
            raise errors.EmptyKeyError()
    for op in list(t.success) + list(t.failure):
        kind = op.WhichOneof("request")
        if kind == "request_range":
            check_range_request(op.request_range)
        elif kind == "request_put":
            check_put_request(op.request_put)
        elif kind == "request_delete_range":
            check_delete_request(op.request_delete_range)
        elif kind == "request_txn":
            # A nested txn may only use what its parent level left over.
            check_txn_request(op.request_txn, max_txn_ops - n)
        else:
            raise errors.KeyNotFoundError()  # an empty RequestOp (quirk)


def _interval_holds(interval: tuple[bytes, bytes], k: bytes) -> bool:
    start, end = interval
    if not end:
        return k == start  # a point
    # A plain byte comparison, as etcd's check does: an end of b"\0" makes
    # an empty interval here although it means "to the end" when the delete
    # runs (§5.3 rule 5, quirk).
    return start <= k < end


def check_duplicate_keys(ops) -> tuple[set[bytes], list[tuple[bytes, bytes]]]:
    """§5.3 rule 5 for one branch list; returns its (puts, deleted intervals).

    Followed step by step as etcd does it, because the order is visible:
    first this level's deletes are collected; then each nested txn in turn
    adds its puts (checked against the puts so far and the deletes so far)
    and then its deletes; last, this level's puts are checked against all
    of it.  So a put in a nested txn followed by a delete of the same key in
    a later nested txn passes, while the reverse order is refused.
    """
    deleted = [
        (op.request_delete_range.key, op.request_delete_range.range_end)
        for op in ops
        if op.WhichOneof("request") == "request_delete_range"
    ]

    def is_deleted(k: bytes) -> bool:
        return any(_interval_holds(iv, k) for iv in deleted)

    puts: set[bytes] = set()
    for op in ops:
        if op.WhichOneof("request") != "request_txn":
            continue
        puts_then, deleted_then = check_duplicate_keys(op.request_txn.success)
        puts_else, deleted_else = check_duplicate_keys(op.request_txn.failure)
        for k in puts_then:
            if k in puts or is_deleted(k):
                raise errors.DuplicateKeyError()
            puts.add(k)
        for k in puts_else:
            # The same key in a nested success and its failure is fine:
            # only one of them runs.
            if (k in puts and k not in puts_then) or is_deleted(k):
                raise errors.DuplicateKeyError()
            puts.add(k)
        deleted += deleted_then + deleted_else

    for op in ops:
        if op.WhichOneof("request") != "request_put":
            continue
        k = op.request_put.key
        if k in puts or is_deleted(k):
            raise errors.DuplicateKeyError()
        puts.add(k)
    return puts, deleted


# -- the model -------------------------------------------------------------------


class Model:
    """etcd's KV semantics over a history of revisions (see the module docstring)."""

    def __init__(self, max_txn_ops: int = DEFAULT_MAX_TXN_OPS, *, profile: Profile = DEFAULT,
                 revision: int = 1, compact_revision: int = -1):
        self.max_txn_ops = max_txn_ops
        self.profile = profile
        self.revision = revision  # §2.2: an empty store is at revision 1
        self.start_revision = revision
        self.compact_revision = compact_revision
        self.history: list[Revision] = []
        self.keys: dict[bytes, list[Generation]] = {}
        self.leases: set[int] = set()

    # -- reading -------------------------------------------------------------

    def kv_at(self, key: bytes, rev: int) -> KeyValue | None:
        """The key as of revision ``rev``, or None if it was absent then (§3.4)."""
        for generation in self.keys.get(key, []):
            kv = generation.visible_at(rev)
            if kv is not None:
                return copy.deepcopy(kv)
        return None

    def kvs_at(self, key: bytes, range_end: bytes, rev: int) -> list[KeyValue]:
        """Every key selected by key/range_end as of ``rev``, in key order (§3.8)."""
        found = (self.kv_at(k, rev) for k in sorted(self.keys) if in_range(k, key, range_end))
        return [kv for kv in found if kv is not None]

    def read_revision(self, revision: int, current: int | None = None) -> int:
        """The revision a read of ``revision`` sees, or its error (§4.2)."""
        current = self.revision if current is None else current
        if revision > current:
            raise errors.FutureRevisionError()
        rev = current if revision <= 0 else revision
        # Reading exactly at the compact revision is allowed: compaction
        # kept the state at that revision.
        if rev < self.compact_revision:
            raise errors.CompactedError()
        return rev

    def get(self, key: bytes, revision: int = 0) -> KeyValue | None:
        return self.kv_at(key, self.read_revision(revision))

    def range(self, r: pb.RangeRequest) -> pb.RangeResponse:
        check_range_request(r)
        return self._range(r, self.revision)

    def _range(self, r: pb.RangeRequest, current: int) -> pb.RangeResponse:
        """§4.3, in order: fetch, count, filter, sort, limit, keys_only/count_only."""
        rev = self.read_revision(r.revision, current)
        kvs = self.kvs_at(r.key, r.range_end, rev)
        resp = pb.RangeResponse(count=len(kvs))  # before limit and filters
        resp.header.revision = current  # even for a historical read
        if r.count_only:
            return resp

        filtered = r.min_mod_revision or r.max_mod_revision or r.min_create_revision or r.max_create_revision
        if r.sort_order == RangeRequest.NONE and not filtered and r.limit > 0:
            # Step 2: without an order or a filter only limit + 1 keys are
            # fetched, in key order.  So a sort target without an order
            # (sorted ascending below) sorts just those, not the whole range
            # (quirk).
            kvs = kvs[: r.limit + 1]

        if r.max_mod_revision:
            kvs = [kv for kv in kvs if kv.mod_revision <= r.max_mod_revision]
        if r.min_mod_revision:
            kvs = [kv for kv in kvs if kv.mod_revision >= r.min_mod_revision]
        if r.max_create_revision:
            kvs = [kv for kv in kvs if kv.create_revision <= r.max_create_revision]
        if r.min_create_revision:
            kvs = [kv for kv in kvs if kv.create_revision >= r.min_create_revision]

        order = r.sort_order
        if order == RangeRequest.NONE and r.sort_target != RangeRequest.KEY:
            order = RangeRequest.ASCEND  # a target without an order sorts ascending
        target = {
            RangeRequest.KEY: lambda kv: kv.key,
            RangeRequest.VERSION: lambda kv: kv.version,
            RangeRequest.CREATE: lambda kv: kv.create_revision,
            RangeRequest.MOD: lambda kv: kv.mod_revision,
            RangeRequest.VALUE: lambda kv: kv.value,
        }[r.sort_target]
        # mvcckv decision (§4.3 step 5): ties stay in ascending key order in
        # both directions.  The input is in key order and Python's sort is
        # stable, also with reverse=True.
        if order == RangeRequest.ASCEND:
            kvs = sorted(kvs, key=target)
        elif order == RangeRequest.DESCEND:
            kvs = sorted(kvs, key=target, reverse=True)

        if r.limit > 0 and len(kvs) > r.limit:  # a negative limit is no limit
            kvs = kvs[: r.limit]
            resp.more = True  # more keys passed the filters
        if r.keys_only:
            for kv in kvs:
                kv.ClearField("value")
        resp.kvs.extend(kvs)
        return resp

    # -- writing -------------------------------------------------------------

    def put(self, p: pb.PutRequest) -> pb.PutResponse:
        """§5.1 (the quota and alarm steps are not modelled)."""
        check_put_request(p)
        if p.lease != 0 and p.lease not in self.leases:
            raise errors.LeaseNotFoundError()
        if (p.ignore_value or p.ignore_lease) and self.kv_at(p.key, self.revision) is None:
            raise errors.KeyNotFoundError()
        write = _Write(self)
        resp = self._put(write, p)
        write.commit()
        return resp

    def delete_range(self, d: pb.DeleteRangeRequest) -> pb.DeleteRangeResponse:
        """§5.2: deleting nothing is no error and makes no revision."""
        check_delete_request(d)
        write = _Write(self)
        resp = self._delete_range(write, d)
        write.commit()
        return resp

    def _put(self, write: _Write, p: pb.PutRequest) -> pb.PutResponse:
        resp = pb.PutResponse()
        prev = self.kv_at(p.key, write.rev)
        assert prev is not None or not (p.ignore_value or p.ignore_lease), "checked before writing"
        value = prev.value if p.ignore_value else p.value
        lease = prev.lease if p.ignore_lease else p.lease
        if p.prev_kv and prev is not None:
            resp.prev_kv.CopyFrom(prev)  # the full previous KeyValue, value included
        resp.header.revision = write.put(p.key, value, lease)
        return resp

    def _delete_range(self, write: _Write, d: pb.DeleteRangeRequest) -> pb.DeleteRangeResponse:
        resp = pb.DeleteRangeResponse()
        doomed = self.kvs_at(d.key, d.range_end, write.rev)
        for kv in doomed:  # in key order: one sub revision each (§2.1)
            write.delete(kv.key)
        resp.deleted = len(doomed)
        if d.prev_kv:
            resp.prev_kvs.extend(doomed)
        # §5.5: the txn's new revision once anything in it changed.
        resp.header.revision = write.rev
        return resp

    def txn(self, t: pb.TxnRequest) -> pb.TxnResponse:
        """§5.3-§5.5: static checks, all compares up front, checks of the
        taken path, then the ops in order as one write transaction."""
        check_txn_request(t, self.max_txn_ops)
        check_duplicate_keys(t.success)
        check_duplicate_keys(t.failure)
        decision = self._decide(t)
        self._check_taken(t, decision)

        # Nothing can fail from here on: a txn is all or nothing.
        write = _Write(self)
        resp = pb.TxnResponse()
        self._execute(write, t, decision, resp)
        write.commit()
        resp.header.revision = self.revision
        return resp

    def _decide(self, t: pb.TxnRequest) -> _Decision:
        """§5.4 step 1: every compare of the tree against the state before the txn."""
        decision = _Decision(all(self._compare(c) for c in t.compare))
        for op in t.success if decision.succeeded else t.failure:
            if op.WhichOneof("request") == "request_txn":
                decision.nested.append(self._decide(op.request_txn))
        return decision

    def _compare(self, c: pb.Compare) -> bool:
        """§5.4 compare semantics: true iff it holds for every key in the range."""
        kvs = self.kvs_at(c.key, c.range_end, self.revision)
        if not kvs:
            if c.target == Compare.VALUE:
                return False  # a missing key has no value, not an empty one
            kvs = [KeyValue()]  # version, create, mod and lease are 0
        return all(self._compare_kv(c, kv) for kv in kvs)

    @staticmethod
    def _compare_kv(c: pb.Compare, kv: KeyValue) -> bool:
        field_name = {
            Compare.VERSION: "version",
            Compare.CREATE: "create_revision",
            Compare.MOD: "mod_revision",
            Compare.VALUE: "value",
            Compare.LEASE: "lease",
        }[c.target]
        actual = getattr(kv, field_name)
        # The operand counts only when the union member matching the target
        # is the one set; otherwise it is zero / empty (quirk).
        if c.WhichOneof("target_union") == field_name:
            operand = getattr(c, field_name)
        else:
            operand = b"" if c.target == Compare.VALUE else 0
        if c.result == Compare.EQUAL:
            return actual == operand
        if c.result == Compare.NOT_EQUAL:
            return actual != operand
        if c.result == Compare.GREATER:
            return actual > operand
        if c.result == Compare.LESS:
            return actual < operand
        return True  # an unknown result is true (quirk)

    def _taken_ops(self, t: pb.TxnRequest, decision: _Decision):
        """The ops of the taken path in execution order, nested txns flattened."""
        nested = iter(decision.nested)
        for op in t.success if decision.succeeded else t.failure:
            if op.WhichOneof("request") == "request_txn":
                yield from self._taken_ops(op.request_txn, next(nested))
            else:
                yield op

    def _check_taken(self, t: pb.TxnRequest, decision: _Decision) -> None:
        """§5.4 step 2: checks of the taken path against the state before the txn.

        etcd 3.4 and 3.5 check every put of the path first, then every
        range (3.6 checks op by op); mvcckv does as 3.4/3.5 do, so when a
        txn breaks both kinds of check the put's error is the one reported.
        """
        taken = list(self._taken_ops(t, decision))
        cleared: list[bytes] = []  # starts of earlier deletes to the end
        for op in taken:
            kind = op.WhichOneof("request")
            if kind == "request_delete_range" and op.request_delete_range.range_end == TO_THE_END:
                cleared.append(op.request_delete_range.key)
            elif kind == "request_put":
                p = op.request_put
                if p.ignore_value or p.ignore_lease:
                    if self.kv_at(p.key, self.revision) is None:
                        raise errors.KeyNotFoundError()
                    # An earlier delete to the end of the keyspace removes
                    # the key before the put runs (the duplicate check lets
                    # that through, §5.3).  etcd panics when the put then
                    # finds nothing; mvcckv refuses the txn up front.
                    if any(p.key >= start for start in cleared):
                        raise errors.KeyNotFoundError()
                if p.lease != 0 and p.lease not in self.leases:
                    raise errors.LeaseNotFoundError()
        for op in taken:
            if op.WhichOneof("request") == "request_range":
                r = op.request_range
                # Not the standalone rule: only 0 means "current" here, so a
                # negative revision below the compact revision is "compacted"
                # (§4.2 quirk).
                if r.revision == 0:
                    continue
                if r.revision > self.revision:
                    raise errors.FutureRevisionError()
                if r.revision < self.compact_revision:
                    raise errors.CompactedError()

    def _execute(self, write: _Write, t: pb.TxnRequest, decision: _Decision, resp: pb.TxnResponse) -> None:
        """§5.4 step 3 and §5.5: responses of the taken branch, in order."""
        resp.succeeded = decision.succeeded
        nested = iter(decision.nested)
        for op in t.success if decision.succeeded else t.failure:
            kind = op.WhichOneof("request")
            out = resp.responses.add()
            # Inner headers carry only a revision (§5.5, quirk).
            if kind == "request_range":
                out.response_range.CopyFrom(self._range(op.request_range, write.rev))
            elif kind == "request_put":
                out.response_put.CopyFrom(self._put(write, op.request_put))
            elif kind == "request_delete_range":
                out.response_delete_range.CopyFrom(self._delete_range(write, op.request_delete_range))
            else:
                out.response_txn.header.SetInParent()  # present, all zero (quirk)
                self._execute(write, op.request_txn, next(nested), out.response_txn)

    # -- leases (§9, without time) ---------------------------------------------

    def lease_grant(self, lease_id: int) -> None:
        """A grant makes no revision (§2.2)."""
        if lease_id in self.leases:
            raise errors.LeaseExistsError()
        self.leases.add(lease_id)

    def lease_revoke(self, lease_id: int) -> pb.LeaseRevokeResponse:
        """Deletes the lease's keys in one write transaction, in key order (§2.2)."""
        if lease_id not in self.leases:
            raise errors.LeaseNotFoundError()
        self.leases.remove(lease_id)
        write = _Write(self)
        for kv in self.kvs_at(TO_THE_END, TO_THE_END, self.revision):
            if kv.lease == lease_id:
                write.delete(kv.key)
        write.commit()
        resp = pb.LeaseRevokeResponse()
        resp.header.revision = self.revision  # unchanged if it had no keys
        return resp

    # -- compaction and hashes (§7.1, §10.3) ----------------------------------

    def compact(self, revision: int) -> pb.CompactionResponse:
        if revision <= self.compact_revision:
            raise errors.CompactedError()  # also: the same revision twice
        if revision > self.revision:
            raise errors.FutureRevisionError()
        self.compact_revision = revision
        resp = pb.CompactionResponse()
        resp.header.revision = self.revision  # compaction makes no revision
        return resp

    def hash_revision(self, revision: int) -> int:
        """The revision HashKV(revision) hashes at, or its error (§10.3 step 1)."""
        if 0 < revision < self.compact_revision:
            raise errors.CompactedError()
        if revision == self.compact_revision > 0 and not self.profile.hashkv_at_compact_revision:
            raise errors.CompactedError()
        if revision > self.revision:
            raise errors.FutureRevisionError()
        # Only 0 means "current": a negative revision is hashed as asked,
        # which covers no entry at all (quirk, as etcd does).
        return self.revision if revision == 0 else revision

    def changes_since(self, low: int) -> list[tuple[int, list[tuple[bool, KeyValue]]]]:
        """The write transactions with main >= ``low``: (main, [(is_delete, kv)]),
        changes in sub revision order.  A deletion shows the key and the
        revision that deleted it, as a DELETE event does (§8.3)."""
        return [
            (r.main, [
                (c.kv is None, copy.deepcopy(c.kv) if c.kv else KeyValue(key=c.key, mod_revision=r.main))
                for c in r.changes
            ])
            for r in self.history
            if r.main >= low
        ]

    def live_keys_at(self, rev: int) -> list[bytes]:
        return [kv.key for kv in self.kvs_at(TO_THE_END, TO_THE_END, rev)]

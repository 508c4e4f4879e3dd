"""Admission: what a proposed write must pass before it is logged.

Both engines admit writes the same way, in etcd's order: the space quota
first (a request over it is refused before it is even validated), then the
request's static checks, then the CORRUPT alarm, then the size limit.  A
request that fails here is never logged, so it leaves nothing behind.

A refusal for space raises the NOSPACE alarm through the log like any
other change; the refused caller gets a future that fails once the alarm is
applied, so a client that was refused sees the alarm, and nobody — an
event loop included — blocks on it.
"""

from __future__ import annotations

from concurrent.futures import Future

from mvcckv import errors, validate
from mvcckv.kv import (
    KIND_ALARM,
    KIND_COMPACT,
    KIND_DELETE_RANGE,
    KIND_LEASE_GRANT,
    KIND_LEASE_REVOKE,
    KIND_PUT,
    KIND_TXN,
    fail,
)
from mvcckv.pb import rpc_pb2 as pb

# What a logged request costs on top of its own bytes (record header);
# compared with max_request_bytes as etcd compares its raft entry.
REQUEST_OVERHEAD = 64
DEFAULT_MAX_REQUEST_BYTES = 1536 * 1024
DEFAULT_MAX_TXN_OPS = 128

# etcd charges a lease grant this much against the space quota.
LEASE_GRANT_COST = 64

# What a CORRUPT alarm stops (§10.6); reads check it separately.
CORRUPT_REFUSED = frozenset(
    (KIND_PUT, KIND_DELETE_RANGE, KIND_TXN, KIND_COMPACT, KIND_LEASE_GRANT, KIND_LEASE_REVOKE)
)


class Admission:
    """Mixin of the engines' admission checks.

    The engine provides ``options`` (``quota_bytes``, ``max_txn_ops``,
    ``max_request_bytes``, ``member_id``), ``_db_size`` (the backend size,
    sampled per commit or tick), ``_alarms`` (a set of (member ID, alarm)
    pairs) and ``propose``.
    """

    def _admit(self, kind: int, req) -> Future | None:
        """Raise the request's static error, return a refusal future when it
        is over the quota, or None when it may be logged."""
        cost = 0
        if kind == KIND_PUT:
            cost = validate.put_cost(req)
        elif kind == KIND_TXN:
            cost = validate.txn_put_cost(req)
        elif kind == KIND_LEASE_GRANT:
            cost = LEASE_GRANT_COST
        if cost and self._over_quota(cost):
            return self._refuse_nospace()
        if kind == KIND_PUT:
            validate.check_put(req)
        elif kind == KIND_DELETE_RANGE:
            validate.check_delete(req)
        elif kind == KIND_TXN:
            validate.check_txn(req, self.options.max_txn_ops)
        if kind in CORRUPT_REFUSED:
            self._check_corrupt()
        return None

    def _check_size(self, data_len: int) -> None:
        if data_len + REQUEST_OVERHEAD > self.options.max_request_bytes:
            raise errors.RequestTooLargeError()

    def _over_quota(self, cost: int) -> bool:
        # The size is sampled per commit (or tick) rather than stat'ed per
        # request: the quota is approximate by a batch either way.
        quota = self.options.quota_bytes
        return quota > 0 and self._db_size + cost >= quota

    def _refuse_nospace(self) -> Future:
        refused: Future = Future()
        if (self.options.member_id, pb.NOSPACE) in self._alarms:
            fail(refused, errors.NoSpaceError())
            return refused
        alarm = pb.AlarmRequest(action=pb.AlarmRequest.ACTIVATE, memberID=self.options.member_id, alarm=pb.NOSPACE)
        self.propose(KIND_ALARM, alarm).add_done_callback(lambda _: fail(refused, errors.NoSpaceError()))
        return refused

    def _check_corrupt(self) -> None:
        if any(a == pb.CORRUPT for _, a in self._alarms):
            raise errors.CorruptError()

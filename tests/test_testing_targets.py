"""Targets: errors read back from gRPC statuses, and a user's own adapter."""

from __future__ import annotations

import itertools

import grpc
import pytest

import mvcckv
from mvcckv import errors
from mvcckv.testing import EmbeddedTarget, Indeterminate, RpcFailure, Session, run_sequential
from mvcckv.testing.targets import error_from_status

C = grpc.StatusCode


@pytest.mark.parametrize("code, details, expected", [
    (C.OUT_OF_RANGE, "etcdserver: mvcc: required revision has been compacted", errors.CompactedError),
    (C.NOT_FOUND, "etcdserver: requested lease not found", errors.LeaseNotFoundError),
    (C.INVALID_ARGUMENT, "etcdserver: duplicate key given in txn request", errors.DuplicateKeyError),
    # etcd's text under another code is no etcd answer.
    (C.UNKNOWN, "etcdserver: mvcc: required revision has been compacted", RpcFailure),
    (C.INTERNAL, "something broke", RpcFailure),
    (C.DEADLINE_EXCEEDED, "Deadline Exceeded", Indeterminate),
    (C.UNAVAILABLE, "connection refused", Indeterminate),
])
def test_error_from_status(code, details, expected):
    err = error_from_status(code, details)
    assert type(err) is expected
    if expected is RpcFailure:
        assert (err.code, err.details) == (code, details)
        assert str(err) == f"{code.name}: {details}"


class MyStore:
    """A user's adapter: etcd requests in, etcd responses out, no change log."""

    def __init__(self, path):
        self.inner = EmbeddedTarget(mvcckv.open(path, fsync=False))

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def changes(self, low, key, range_end, last, timeout):
        raise NotImplementedError


def test_a_users_adapter_without_a_change_log(tmp_path):
    n = itertools.count()
    session = Session(lambda: MyStore(str(tmp_path / f"s{next(n)}")), prefix=b"", remote=False)
    result = run_sequential(session, examples=5, steps=10)
    assert result.ok, result.error or result.failure.message
    assert result.history_checks == 0
    assert result.notes == ["history check skipped: the target does not list its changes"]

"""Property tests of etcd's semantics for any etcd-compatible system.

* :class:`Model` — the executable model of etcd's revision semantics
  (:mod:`mvcckv.testing.model`), written from the specification; it
  shares nothing with mvcckv's engine but protobuf messages and errors.
* :mod:`~mvcckv.testing.strategies` — hypothesis strategies for etcd's
  requests.
* :func:`run_sequential` with a :class:`Session` — the state machine that
  drives a target against the model (:mod:`mvcckv.testing.machine`).
  Targets: :class:`EmbeddedTarget`, :class:`GrpcTarget`, or any object with
  the methods of :class:`Target`.
* :mod:`~mvcckv.testing.linearizability` — a per-key linearizability
  checker with a bounded search and an "unknown" verdict.
* :func:`run_concurrent` (:mod:`~mvcckv.testing.concurrent`) — concurrent
  clients, watch and lease checks against a gRPC endpoint.
* :data:`PROFILES` — where etcd 3.4, 3.5 and 3.6 answer differently.

``mvcckv check`` (:mod:`mvcckv.testing.cli`) runs all of it against a
server.  The API of this package follows the project's version: additions
in minor releases, no incompatible change before the next major one.
"""

from mvcckv.testing.concurrent import ConcurrentResult, run_concurrent
from mvcckv.testing.machine import ConformanceMachine, Session, SequentialResult, run_sequential
from mvcckv.testing.model import Model
from mvcckv.testing.profiles import PROFILES, Profile, profile_for
from mvcckv.testing.targets import Connection, EmbeddedTarget, GrpcTarget, Indeterminate, RpcFailure, Target

__all__ = [
    "ConcurrentResult", "run_concurrent", "ConformanceMachine", "Session", "SequentialResult", "run_sequential", "Model",
    "PROFILES", "Profile", "profile_for",
    "Connection", "EmbeddedTarget", "GrpcTarget", "Indeterminate", "RpcFailure", "Target",
]

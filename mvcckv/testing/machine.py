"""The sequential check: a hypothesis state machine that sends the same
requests to a target and to the model and checks that they agree.

Every answer is compared field for field (the top-level header by revision
only; inner txn headers whole), every error by type and text (and, over
gRPC, by code: see :mod:`mvcckv.testing.targets`).  After every step the
whole keyspace must be equal; at the end of each example a sentinel put
makes a last revision and the target's change log (for a server: a watch
from the example's first revision) must equal the model's history.  When
the session has a ``replay`` factory (the embedded store), a second target
fed the writes both accepted must hash alike (HashKV) wherever the hash
does not depend on compaction timing.

Each example runs in a key prefix of its own (``<session prefix><n>/``),
and the model starts at the target's current revision, so one server
serves every example; revisions are global, so nothing else may write to
the server during a run.  Compactions are global too: the session carries
the compact revision from one example to the next (and finds the one the
server already had by bisecting reads, see :meth:`Session.discover`).

A divergence is shrunk by hypothesis; the last failing run is the minimal
one, and its steps are kept in ``Session.failure`` to be printed as
etcdctl commands and Python (:mod:`mvcckv.testing.repro`).
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass, field
from typing import Callable

from google.protobuf.message import Message
from hypothesis import HealthCheck, Verbosity, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis.internal.conjecture import engine as hypothesis_engine
from hypothesis.stateful import RuleBasedStateMachine, get_state_machine_test, initialize, invariant, precondition, rule

from mvcckv import errors
from mvcckv.pb import rpc_pb2 as pb
from mvcckv.testing import strategies as s
from mvcckv.testing.model import DEFAULT_MAX_TXN_OPS, Model, prefix_end
from mvcckv.testing.profiles import DEFAULT, Profile
from mvcckv.testing.targets import RpcFailure, Target

LEASE_TTL = 3600  # nothing expires during a run
SENTINEL = b"~sentinel"  # after every name of the keyspace: ends each example
HISTORY = "history"  # how a divergence found by the history check begins


@dataclass
class Step:
    """One request sent to the target (``kind`` is the Target method)."""

    kind: str
    request: Message | None


@dataclass
class Failure:
    """A divergence: the steps of the run that showed it, the last one
    diverging (or followed by the state check that did)."""

    steps: list[Step]
    message: str
    start_revision: int
    prefix: bytes
    leases: tuple[int, ...] = ()  # the example's lease IDs: granted ones, then the unknown one


class Divergence(AssertionError):
    """The target answered otherwise than the model."""


@dataclass
class Session:
    """What the examples of one run share (see the module docstring).

    ``factory`` opens a target (called once per example; the example
    closes it).  ``prefix`` None picks a fresh random prefix for the run;
    ``b""`` uses the whole keyspace, for a factory that gives an empty
    store each time (the quirks of "to the end" are then drawn too).
    """

    factory: Callable[[], Target]
    profile: Profile = DEFAULT
    prefix: bytes | None = None
    max_txn_ops: int = DEFAULT_MAX_TXN_OPS
    compact: bool = True
    remote: bool = True  # never send what crashes etcd (strategies.crashes_etcd)
    replay: Callable[[], Target] | None = None
    on_example: Callable[[], None] | None = None
    compact_revision: int | None = None  # None: not known yet
    examples: int = 0
    steps: int = 0
    found_after: tuple[int, int] | None = None  # (examples, steps) when first seen
    failure: Failure | None = None
    history_checks: int = 0
    history_skipped: str = ""
    granted: set[int] = field(default_factory=set)  # lease IDs the examples left granted
    lease_base: int = field(default_factory=lambda: random.randrange(1 << 20, 1 << 40) << 8)

    def __post_init__(self):
        if self.prefix is None:
            self.prefix = b"mvcckv-check/%08x/" % random.getrandbits(32)

    def cleanup(self, target: Target) -> None:
        """Leave a shared server as found, but for the revisions used: the
        run's keys deleted, its leases revoked.  Once per run, not per
        example: shrinking runs hundreds of examples."""
        if not self.prefix:
            return
        for lease_id in sorted(self.granted):
            try:
                target.lease_revoke(pb.LeaseRevokeRequest(ID=lease_id))
            except errors.LeaseNotFoundError:
                pass  # revoked by the example itself
        target.delete_range(pb.DeleteRangeRequest(key=self.prefix, range_end=prefix_end(self.prefix)))

    def discover(self, target: Target, current: int) -> int:
        """The compact revision the target already has: the lowest revision a
        Range can still read is the compact revision, when above 1.

        Found once per run on a shared server (then carried along); for
        every example when each has a store of its own (no prefix).
        """
        if self.compact_revision is None or not self.prefix:
            low, high = 1, current  # reads at ``high`` work
            while low < high:
                mid = (low + high) // 2
                try:
                    target.range(pb.RangeRequest(key=self.prefix or b"\0", revision=mid, count_only=True))
                    high = mid
                except errors.CompactedError:
                    low = mid + 1
            self.compact_revision = low if low > 1 else -1
        return self.compact_revision


def strip_header(resp: Message) -> Message:
    """A copy whose top-level header keeps only the revision."""
    if "header" not in resp.DESCRIPTOR.fields_by_name:
        return resp
    out = type(resp)()
    out.CopyFrom(resp)
    if out.HasField("header"):
        rev = out.header.revision
        out.ClearField("header")
        out.header.revision = rev
    return out


class ConformanceMachine(RuleBasedStateMachine):
    """Drives ``session.factory()`` and the model; see the module docstring."""

    session: Session  # set on a subclass by run_sequential

    def __init__(self):
        super().__init__()
        sess = self.session
        sess.examples += 1
        n = sess.examples
        self.space = s.Keyspace(prefix=sess.prefix + b"%d/" % n if sess.prefix else b"")
        self.leases = s.Leases(granted=(sess.lease_base + 4 * n, sess.lease_base + 4 * n + 1),
                               unknown=sess.lease_base + 4 * n + 2)
        self.target = sess.factory()
        self.failed = False
        self.steps: list[Step] = []
        self.accepted: list[Step] = []
        self.compactions: set[int] = set()
        current = self.target.range(pb.RangeRequest(key=self.space.everything[0], count_only=True)).header.revision
        self.model = Model(max_txn_ops=sess.max_txn_ops, profile=sess.profile, revision=current,
                           compact_revision=sess.discover(self.target, current))
        if sess.on_example:
            sess.on_example()

    # -- comparing ------------------------------------------------------------

    def agree(self, kind: str, request: Message | None, on_target, on_model, *, record: bool = True) -> bool:
        """Run both; equal answers or the same error.  Returns whether accepted."""
        step = Step(kind, request)
        if record:
            self.steps.append(step)
            self.session.steps += 1
        try:
            expected, expected_error = on_model(), None
        except errors.MvccError as e:
            expected, expected_error = None, e
        try:
            got, got_error = on_target(), None
        except (errors.MvccError, RpcFailure) as e:
            got, got_error = None, e
        if expected_error is None and got_error is None:
            if isinstance(got, Message):
                got = strip_header(got)
            if got != expected:
                self.fail(f"{kind}: the answers differ\n--- target:\n{got}\n--- model (expected):\n{expected}")
            if kind in ("put", "delete_range", "txn", "compact", "lease_grant", "lease_revoke"):
                self.accepted.append(step)
            return True
        if (type(got_error), str(got_error)) != (type(expected_error), str(expected_error)):
            self.fail(f"{kind}: the outcomes differ\n--- target: "
                      f"{_show_error(got_error) if got_error else 'accepted'}\n{got if got is not None else ''}"
                      f"\n--- model (expected): {_show_error(expected_error) if expected_error else 'accepted'}"
                      f"\n{expected if expected is not None else ''}")
        return False

    def fail(self, message: str):
        sess = self.session
        if sess.found_after is None:
            sess.found_after = (sess.examples, sess.steps)
        self.failed = True
        sess.failure = Failure(list(self.steps), message, self.model.start_revision, self.space.prefix,
                               (*self.leases.granted, self.leases.unknown))
        raise Divergence(message)

    # -- writes ---------------------------------------------------------------

    def send(self, kind: str, request: Message) -> bool:
        """Send one request of ``kind`` (a Target method) to both sides."""
        if kind == "lease_grant":
            def on_model():
                self.model.lease_grant(request.ID)
                resp = pb.LeaseGrantResponse(ID=request.ID, TTL=request.TTL)
                resp.header.revision = self.model.revision  # a grant makes no revision
                return resp
        elif kind == "lease_revoke":
            def on_model():
                return self.model.lease_revoke(request.ID)
        elif kind == "compact":
            def on_model():
                return self.model.compact(request.revision)
        elif kind == "hash_kv":
            return self._hash_kv(request)
        else:  # put, delete_range, txn, range: the model's methods of the same names
            def on_model():
                return getattr(self.model, kind)(request)
        accepted = self.agree(kind, request, lambda: getattr(self.target, kind)(request), on_model)
        if kind == "compact" and accepted:
            self.compactions.add(request.revision)
            self.session.compact_revision = request.revision
        return accepted

    def _hash_kv(self, h: pb.HashKVRequest) -> bool:
        hash_revision_field = self.session.profile.hash_revision_field

        def on_target():
            resp = self.target.hash_kv(h)
            return resp.hash_revision, resp.header.revision

        def on_model():
            at = self.model.hash_revision(h.revision)
            return (at if hash_revision_field else 0), self.model.revision

        return self.agree("hash_kv", h, on_target, on_model)

    # -- writes ---------------------------------------------------------------

    @initialize(data=st.data())
    def populate(self, data):
        for key, value in data.draw(st.lists(st.tuples(self.space.keys(), s.values), max_size=6), label="puts"):
            self.send("put", pb.PutRequest(key=key, value=value))

    @rule(data=st.data())
    def put(self, data):
        self.send("put", data.draw(s.put_requests(self.space, self.leases), label="put"))

    @rule(data=st.data())
    def delete(self, data):
        self.send("delete_range", data.draw(s.delete_requests(self.space), label="delete"))

    @rule(data=st.data())
    def txn(self, data):
        txns = s.txn_requests(self.model, self.space, self.leases)
        if self.session.remote:
            txns = txns.filter(lambda t: not s.crashes_etcd(t))
        # A refused txn must change nothing: the state check after it shows it.
        self.send("txn", data.draw(txns, label="txn"))

    @rule(data=st.data())
    def guarded_put(self, data):
        self.send("txn", data.draw(s.guarded_put_requests(self.model, self.space, self.leases), label="txn"))

    @rule(data=st.data())
    def lease_grant(self, data):
        self.send("lease_grant", data.draw(s.lease_grant_requests(self.leases, LEASE_TTL), label="grant"))

    @rule(data=st.data())
    def lease_revoke(self, data):
        self.send("lease_revoke", data.draw(s.lease_revoke_requests(self.leases), label="revoke"))

    @precondition(lambda self: self.session.compact)
    @rule(data=st.data())
    def compact(self, data):
        self.send("compact", data.draw(s.compaction_requests(self.model), label="compact"))

    # -- reads ------------------------------------------------------------------

    @rule(data=st.data())
    def read_range(self, data):
        self.send("range", data.draw(s.range_requests(self.model, self.space), label="range"))

    @rule(data=st.data())
    def list_page(self, data):
        self.send("range", data.draw(s.page_requests(self.space), label="page"))

    @rule(data=st.data())
    def hash_kv(self, data):
        # Below -1 the answer depends on how a backend hashes nothing.
        self.send("hash_kv", pb.HashKVRequest(revision=data.draw(s.revisions(self.model, low=-1), label="revision")))

    # -- after every step -----------------------------------------------------------

    @invariant()
    def same_keyspace(self):
        key, end = self.space.everything
        everything = pb.RangeRequest(key=key, range_end=end)
        self.agree("range", everything, lambda: self.target.range(everything),
                   lambda: self.model.range(everything), record=False)

    # -- at the end of each example ---------------------------------------------------

    def teardown(self):
        try:
            if not self.failed:
                self.finish()
        finally:
            self.cleanup()

    def finish(self):
        self.send("put", pb.PutRequest(key=self.space.prefix + SENTINEL))
        failure = self.session.failure
        # While a divergence the history check did not find is shrunk,
        # the check (a watch per example) only slows the search down.
        if failure is None or failure.message.startswith(HISTORY):
            self.check_history()
        if self.session.replay is not None:
            self.check_replay_hashes()

    def check_history(self):
        """The change log from the example's first revision equals the model's."""
        low = max(self.model.start_revision + 1, self.model.compact_revision + 1)
        key, end = self.space.everything
        try:
            got = self.target.changes(low, key, end, self.model.revision, timeout=10.0)
        except NotImplementedError:
            self.session.history_skipped = "the target does not list its changes"
            return
        expected = self.model.changes_since(low)
        if got != expected:
            self.fail(f"{HISTORY} from revision {low}: the change logs differ\n--- target:\n{got}"
                      f"\n--- model (expected):\n{expected}")
        self.session.history_checks += 1

    def check_replay_hashes(self):
        """A second target fed the accepted writes hashes alike (§10.3).

        Compared at every revision from the compact revision on where the
        hash does not depend on how far a background compaction has got:
        not at a compaction's own revision (that hash may have been
        recorded by the compaction, or not) and not where no key is live
        (etcd then hashes whatever compacted entries are left).  The
        sentinel put makes sure the current revision qualifies.
        """
        replay = self.session.replay()
        try:
            for step in self.accepted:
                getattr(replay, step.kind)(step.request)
            key, end = self.space.everything
            everything = pb.RangeRequest(key=key, range_end=end)
            if strip_header(replay.range(everything)) != strip_header(self.target.range(everything)):
                self.fail("the replayed store holds other keys than the target")
            for rev in range(max(self.model.compact_revision, 1), self.model.revision + 1):
                if rev in self.compactions or not self.model.live_keys_at(rev):
                    continue
                h = pb.HashKVRequest(revision=rev)
                if self.target.hash_kv(h).hash != replay.hash_kv(h).hash:
                    self.fail(f"HashKV at {rev} differs from a replay of the same writes")
        finally:
            replay.close()

    def cleanup(self):
        self.session.granted.update(self.model.leases)
        self.target.close()


def _show_error(err: Exception) -> str:
    return f"{type(err).__name__}({str(err)!r})"


# -- after hypothesis: dropping steps ------------------------------------------------

_REVISION_FIELDS = frozenset({"revision", "min_mod_revision", "max_mod_revision", "min_create_revision",
                              "max_create_revision", "mod_revision", "create_revision"})


def relocate(msg: Message, failure: Failure, prefix: bytes, start: int, leases: tuple[int, ...]) -> Message:
    """``msg`` as the failing example's request would read in another example
    (key prefix, starting revision, lease IDs): revisions from two below the
    failing example's start on move with it, smaller ones (0, -1, 1, 2) stay."""
    out = type(msg)()
    out.CopyFrom(msg)
    old_end, new_end = prefix_end(failure.prefix), prefix_end(prefix)
    lease_map = dict(zip(failure.leases, leases))
    shift = start - failure.start_revision

    def walk(m: Message) -> None:
        for f, value in m.ListFields():
            if f.message_type is not None:
                for sub in (value if _repeated(f) else [value]):
                    walk(sub)
            elif f.name in ("key", "range_end"):
                if value.startswith(failure.prefix):
                    setattr(m, f.name, prefix + value[len(failure.prefix):])
                elif value == old_end:
                    setattr(m, f.name, new_end)
            elif f.name in _REVISION_FIELDS and value >= failure.start_revision - 2:
                setattr(m, f.name, value + shift)
            elif f.name in ("lease", "ID") and value in lease_map:
                setattr(m, f.name, lease_map[value])

    walk(out)
    return out


def _repeated(f) -> bool:
    repeated = getattr(f, "is_repeated", None)
    return f.label == f.LABEL_REPEATED if repeated is None else repeated


def _same_divergence(a: str, b: str) -> bool:
    return a.split("\n", 1)[0] == b.split("\n", 1)[0]


def _replay(cls: type[ConformanceMachine], session: Session, failure: Failure, steps: list[Step]) -> bool:
    """Whether ``steps`` of ``failure``, run as a new example, diverge alike
    (``session.failure`` is then the new, relocated failure)."""
    m = cls()
    try:
        for step in steps:
            m.send(step.kind, relocate(step.request, failure, m.space.prefix, m.model.start_revision,
                                       (*m.leases.granted, m.leases.unknown)))
            m.same_keyspace()
        if failure.message.startswith(HISTORY):
            m.finish()
    except Divergence:
        return _same_divergence(session.failure.message, failure.message)
    finally:
        m.cleanup()
    return False


def reduce_failure(cls: type[ConformanceMachine], session: Session, seconds: float) -> None:
    """Drop the steps of ``session.failure`` that are not needed to diverge,
    one at a time from the last, replaying each candidate as a new example;
    for at most ``seconds``.  Hypothesis's shrinking must run whole
    examples many times over and, on a server, runs out of time first."""
    best = session.failure
    if best is None or any(step.kind not in _KINDS for step in best.steps):
        return
    deadline = time.monotonic() + seconds
    i = len(best.steps) - 1
    while i >= 0 and time.monotonic() < deadline:
        candidate = best.steps[:i] + best.steps[i + 1:]
        if _replay(cls, session, best, candidate):
            best = session.failure
            i = min(i, len(best.steps)) - 1
        else:
            i -= 1
    session.failure = best


_KINDS = frozenset({"put", "delete_range", "txn", "range", "compact", "lease_grant", "lease_revoke", "hash_kv"})


@dataclass
class SequentialResult:
    """What a sequential run saw; ``failure`` is None when clean."""

    examples: int
    steps: int
    history_checks: int
    found_after: tuple[int, int] | None
    failure: Failure | None
    error: str = ""  # the run could not complete (e.g. target unreachable)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failure is None and not self.error


@contextlib.contextmanager
def _shrinking_for(seconds: float | None):
    """Cap the time hypothesis spends shrinking a failure.

    Against a server every example costs round trips, and hypothesis's own
    cap is five minutes; it has no setting for it, only the engine's
    module constant, which is set for the run and put back after.
    """
    if seconds is None:
        yield
        return
    saved = hypothesis_engine.MAX_SHRINKING_SECONDS
    hypothesis_engine.MAX_SHRINKING_SECONDS = seconds
    try:
        yield
    finally:
        hypothesis_engine.MAX_SHRINKING_SECONDS = saved


def run_sequential(session: Session, *, examples: int = 50, steps: int = 30, seed: int | None = None,
                   quiet: bool = True, machine: type[ConformanceMachine] = ConformanceMachine,
                   shrink_seconds: float | None = 20.0) -> SequentialResult:
    """Run ``examples`` examples of at most ``steps`` steps each.

    A divergence is shrunk by hypothesis, then by :func:`reduce_failure`,
    each for half of ``shrink_seconds`` (None: hypothesis's own limit,
    then a minute).
    """
    cls = type(machine.__name__, (machine,), {"session": session})
    test = get_state_machine_test(cls, settings=settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        database=None,
        report_multiple_bugs=False,
        derandomize=False,
        verbosity=Verbosity.quiet if quiet else Verbosity.normal,
        suppress_health_check=list(HealthCheck),
    ))
    if seed is not None:
        test = hypothesis_seed(seed)(test)
    error = ""
    half = None if shrink_seconds is None else shrink_seconds / 2
    try:
        with _shrinking_for(half):
            test()
    except Exception as e:  # noqa: BLE001 - a divergence, or reported as the run's error
        if session.failure is None:
            error = f"{type(e).__name__}: {e}"
    if session.failure is not None:
        reduce_failure(cls, session, 60.0 if half is None else half)
    notes = [f"history check skipped: {session.history_skipped}"] if session.history_skipped else []
    return SequentialResult(session.examples, session.steps, session.history_checks, session.found_after,
                            session.failure, error, notes)

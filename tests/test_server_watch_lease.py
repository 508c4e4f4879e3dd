"""``mvcckv serve``: Watch and Lease through etcdctl 3.4 and raw gRPC.

etcdctl's one-shot commands run through the harness; its long-running
ones (``watch``, ``lease keep-alive``, ``lock``, ``elect``) run as
:class:`Ctl` children whose output a thread reads line by line, so every
wait is bounded.  Raw gRPC tests drive a Watch RPC with
:class:`WatchStream`: requests go in through a queue, responses come out
through a thread, and every response is checked for a full header.

Every server test runs on both engines (ids ``[lmdb]`` and ``[pg]``: the
``engine`` fixture of conftest.py).  On PostgreSQL the watchers are fed by
its change feed (mvcckv/pg/feed.py: the writer's own commits merged with
LISTEN/NOTIFY), and leases expire through the lease table, so the same
event order, once-only delivery, progress and expiry rules are checked on
that path too.  One server per engine is shared by the module, started
with a 300 ms progress-notify interval (tests use keys of their own); tests
that compact, fill the quota or need a fresh watch hub start their own.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest

from harness import decode, find_binary, kvs, stub
from mvcckv import ops
from mvcckv.pb import rpc_pb2 as pb
from mvcckv.store import prefix_end

MEMBER_ID = 0x8E9E05C52164694D
CLUSTER_ID = 0xCDF818194E3A8C32
RAFT_TERM = 2

C = grpc.StatusCode
NOPUT = pb.WatchCreateRequest.NOPUT
NODELETE = pb.WatchCreateRequest.NODELETE
PUT, DELETE = 0, 1
COMPACTED = "etcdserver: mvcc: required revision has been compacted"
EMPTY_RANGE = "mvcc: watcher range is empty"
DUPLICATE = "mvcc: duplicate watch ID provided on the WatchStream"
LEASE_NOT_FOUND = "etcdserver: requested lease not found"
LEASE_EXISTS = "etcdserver: lease already exists"
TTL_TOO_LARGE = "etcdserver: too large lease TTL"
NOSPACE = "etcdserver: mvcc: database space exceeded"

PROGRESS_INTERVAL = 0.3
FRAGMENT_BYTES = 1536 * 1024 + 512 * 1024  # max-request-bytes + gRPC overhead


@pytest.fixture(scope="module")
def srv(engine, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"mvcckv-{engine.name}")
    extra = ["--experimental-watch-progress-notify-interval", f"{int(PROGRESS_INTERVAL * 1000)}ms"]
    with engine.process(root / "data", log_path=root / "mvcckv.log", extra_args=extra) as server:
        yield server


@pytest.fixture(scope="module")
def channel(srv):
    ch = srv.channel()
    yield ch
    ch.close()


@pytest.fixture(scope="module")
def kv(channel):
    return stub(channel, "KV")


@pytest.fixture(scope="module")
def lease(channel):
    return stub(channel, "Lease")


@pytest.fixture
def own(engine, tmp_path):
    """A server of the test's own, started with extra flags by the test."""
    servers = []

    def start(*args):
        server = engine.process(tmp_path / f"data{len(servers)}", log_path=tmp_path / "mvcckv.log",
                                extra_args=args)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


# --- helpers ------------------------------------------------------------------


def assert_header(header, revision=None):
    assert (header.cluster_id, header.member_id, header.raft_term) == (CLUSTER_ID, MEMBER_ID, RAFT_TERM)
    if revision is not None:
        assert header.revision == revision


def put(kv, key, value=b"", **kw) -> int:
    return kv.Put(pb.PutRequest(key=key, value=value, **kw), timeout=10).header.revision


def delete(kv, key, range_end=b"") -> int:
    return kv.DeleteRange(pb.DeleteRangeRequest(key=key, range_end=range_end), timeout=10).header.revision


def current(kv) -> int:
    return kv.Range(pb.RangeRequest(key=b"\0", count_only=True), timeout=10).header.revision


def rpc_error(fn, request) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn(request, timeout=10)
    return info.value.code(), info.value.details()


def is_progress(resp) -> bool:
    """What clients take for a progress notification (§8.5)."""
    return (not resp.events and not resp.created and not resp.canceled
            and resp.compact_revision == 0 and resp.header.revision != 0)


def event_tuples(events):
    return [(e.type, e.kv.key, e.kv.value, e.kv.mod_revision) for e in events]


class WatchStream:
    """One Watch RPC: ``create``/``cancel``/``progress`` send requests,
    ``next`` returns the next response (or fails after ``timeout``).

    Every response is checked for etcd's header (cluster, member, term).
    Also used by test_diff_watch_lease.py against real etcd.
    """

    _END = object()

    def __init__(self, channel: grpc.Channel, timeout: float = 120.0,
                 identity: tuple[int, int] | None = (CLUSTER_ID, MEMBER_ID)):
        """``identity``: the (cluster, member) IDs every header must carry;
        None accepts any non-zero pair (another server's)."""
        self._identity = identity
        self._requests: queue.Queue = queue.Queue()
        self._responses: queue.Queue = queue.Queue()
        self._call = stub(channel, "Watch").Watch(self._iter_requests(), timeout=timeout)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _iter_requests(self):
        while True:
            req = self._requests.get()
            if req is None:
                return
            yield req

    def _read(self):
        try:
            for resp in self._call:
                self._responses.put(resp)
        except grpc.RpcError as err:
            self._responses.put(err)
        finally:
            self._responses.put(self._END)

    def create(self, key: bytes, range_end: bytes = b"", **kw) -> None:
        self._requests.put(pb.WatchRequest(create_request=pb.WatchCreateRequest(key=key, range_end=range_end, **kw)))

    def cancel(self, watch_id: int) -> None:
        self._requests.put(pb.WatchRequest(cancel_request=pb.WatchCancelRequest(watch_id=watch_id)))

    def progress(self) -> None:
        self._requests.put(pb.WatchRequest(progress_request=pb.WatchProgressRequest()))

    def close_send(self) -> None:
        """End the client's sending side (the RPC goes on)."""
        self._requests.put(None)

    def next(self, timeout: float = 10.0) -> pb.WatchResponse:
        resp = self._poll(timeout)
        if resp is None:
            raise AssertionError(f"no watch response within {timeout} s")
        return resp

    def _poll(self, timeout: float) -> pb.WatchResponse | None:
        """The next response, None after ``timeout``; fails if the stream ended."""
        try:
            item = self._responses.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is self._END or isinstance(item, grpc.RpcError):
            raise AssertionError(f"watch stream ended: {item!r}")
        assert item.HasField("header")
        h = item.header
        if self._identity is None:
            assert h.cluster_id and h.member_id and h.raft_term, item
        else:
            assert_header(h)
        return item

    def created(self, key: bytes, range_end: bytes = b"", **kw) -> pb.WatchResponse:
        """Create a watcher and return its created response."""
        self.create(key, range_end, **kw)
        resp = self.next()
        assert resp.created and not resp.canceled, resp
        return resp

    def quiet(self, seconds: float) -> None:
        """Nothing arrives for ``seconds``."""
        try:
            item = self._responses.get(timeout=seconds)
        except queue.Empty:
            return
        raise AssertionError(f"unexpected response: {item}")

    def events(self, n: int, timeout: float = 10.0) -> list:
        """The next ``n`` events (progress responses are skipped)."""
        out: list = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            resp = self.next(max(0.01, deadline - time.monotonic()))
            assert not resp.canceled, resp
            out.extend(resp.events)
        assert len(out) == n, out
        return out

    def sync(self, revision: int, timeout: float = 10.0) -> list[pb.WatchResponse]:
        """Everything until a progress response at ``revision`` or later:
        it travels behind every event already queued (§8.5).  Asks again
        while a watcher is still catching up (etcd then answers nothing)."""
        out: list[pb.WatchResponse] = []
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.2) + 1):
            self.progress()
            for _ in range(100_000):
                resp = self._poll(0.2)
                if resp is None:
                    break  # no answer: ask again
                if resp.watch_id == -1 and is_progress(resp):
                    if resp.header.revision >= revision:
                        return out
                    continue
                out.append(resp)
                if time.monotonic() > deadline:
                    break
            if time.monotonic() > deadline:
                break
        raise AssertionError(f"no progress at revision {revision} within {timeout} s")

    def close(self) -> None:
        self._call.cancel()
        self._requests.put(None)
        self._reader.join(10)

    def __enter__(self) -> "WatchStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Ctl:
    """A long-running etcdctl (``watch``, ``lease keep-alive``, ``lock``,
    ``elect``); its stdout is read line by line on a thread."""

    def __init__(self, endpoint: str, *args: str, env: dict[str, str] | None = None):
        binary = find_binary("etcdctl")
        if binary is None:
            if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
                pytest.fail("etcdctl not found; CI must run the interop tests", pytrace=False)
            pytest.skip("etcdctl not found (install Debian's etcd-client: bash tools/setup.sh)")
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL_")}
        full_env["ETCDCTL_API"] = "3"
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [binary, f"--endpoints={endpoint}", *args], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env,
        )
        self._lines: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self._lines.put(line.rstrip(b"\n"))
        self._lines.put(None)

    def line(self, timeout: float = 10.0) -> bytes | None:
        """The next line; None if none came within ``timeout`` or output ended."""
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            return None

    def lines(self, n: int, timeout: float = 10.0) -> list[bytes]:
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            line = self.line(max(0.01, deadline - time.monotonic()))
            assert line is not None, f"got {out}, wanted {n} lines; stderr: {self.stderr_text()}"
            out.append(line)
        return out

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout=timeout)

    def stderr_text(self) -> str:
        if self.proc.poll() is None:
            return "(running)"
        return self.proc.stderr.read().decode(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._reader.join(5)
        self.proc.stdout.close()
        self.proc.stderr.close()

    def __enter__(self) -> "Ctl":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def json_lines(ctl: Ctl, n_events: int, timeout: float = 10.0) -> list[dict]:
    """Events of ``etcdctl -w json watch`` until ``n_events`` have come."""
    events: list[dict] = []
    deadline = time.monotonic() + timeout
    while len(events) < n_events:
        line = ctl.line(max(0.01, deadline - time.monotonic()))
        assert line is not None, f"got {events}; stderr: {ctl.stderr_text()}"
        resp = decode(json.loads(line))
        assert (resp["Header"]["cluster_id"], resp["Header"]["member_id"]) == (CLUSTER_ID, MEMBER_ID)
        events.extend(resp["Events"])
    return events


def wait_until(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 2):
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            break
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout} s")


# --- etcdctl watch ------------------------------------------------------------------


def test_etcdctl_watch_prefix_sees_live_changes(srv, kv):
    with Ctl(srv.endpoint, "-w", "json", "watch", "--prefix", "ew/") as ctl:
        # The watch is in place once a write under the prefix shows up.
        for _ in range(50):
            put(kv, b"ew/ready")
            if ctl.line(0.2) is not None:
                break
        else:
            raise AssertionError(f"etcdctl watch never started: {ctl.stderr_text()}")
        for _ in range(50):  # the rest of the ready events
            if ctl.line(0.3) is None:
                break
        r1 = put(kv, b"ew/a", b"1")
        put(kv, b"ex/outside", b"no")
        r2 = put(kv, b"ew/b", b"2")
        r3 = delete(kv, b"ew/a")
        events = json_lines(ctl, 3)
    assert [(e.get("type", 0), e["kv"]["key"], e["kv"].get("value", b""), e["kv"]["mod_revision"]) for e in events] == [
        (PUT, b"ew/a", b"1", r1), (PUT, b"ew/b", b"2", r2), (DELETE, b"ew/a", b"", r3)]
    assert events[0]["kv"]["create_revision"] == r1 and events[0]["kv"]["version"] == 1


def test_etcdctl_watch_rev_replays_history_with_prev_kv(srv, kv):
    r1 = put(kv, b"eh/k", b"v1")
    r2 = put(kv, b"eh/k", b"v2")
    r3 = delete(kv, b"eh/k")
    with Ctl(srv.endpoint, "-w", "json", "watch", "--rev", str(r1), "--prev-kv", "eh/k") as ctl:
        events = json_lines(ctl, 3)
    assert [(e.get("type", 0), e["kv"]["mod_revision"]) for e in events] == [(PUT, r1), (PUT, r2), (DELETE, r3)]
    assert "prev_kv" not in events[0]  # a creation has no previous version
    assert events[1]["prev_kv"]["value"] == b"v1" and events[1]["prev_kv"]["mod_revision"] == r1
    assert events[2]["prev_kv"]["value"] == b"v2" and events[2]["prev_kv"]["mod_revision"] == r2
    assert events[2]["kv"] == {"key": b"eh/k", "mod_revision": r3}


def test_etcdctl_watch_simple_output(srv, kv):
    r1 = put(kv, b"es/k", b"one")
    delete(kv, b"es/k")
    with Ctl(srv.endpoint, "watch", "--rev", str(r1), "--prev-kv", "es/k") as ctl:
        lines = ctl.lines(7)
    assert lines == [b"PUT", b"es/k", b"one", b"DELETE", b"es/k", b"one", b"es/k"]


# --- etcdctl lease ------------------------------------------------------------------


def test_etcdctl_lease_grant_keepalive_timetolive_list_revoke(srv, kv):
    grant = srv.etcdctl("lease", "grant", "60")
    lid, hexid = grant["ID"], f"{grant['ID']:016x}"
    assert grant["TTL"] == 60 and grant["Error"] == "" and lid > 0
    assert (grant["cluster_id"], grant["member_id"]) == (CLUSTER_ID, MEMBER_ID)
    srv.etcdctl("put", "--lease", hexid, "el/b", "2")
    srv.etcdctl("put", "--lease", hexid, "el/a", "1")
    assert [kv_["lease"] for kv_ in kvs(srv.etcdctl("get", "--prefix", "el/"))] == [lid, lid]

    once = srv.etcdctl("lease", "keep-alive", "--once", hexid)
    assert (once["ID"], once["TTL"]) == (lid, 60)
    text = srv.etcdctl("lease", "keep-alive", "--once", hexid, json=False).stdout
    assert text == f"lease {hexid} keepalived with TTL(60)\n".encode()

    ttl = decode(srv.etcdctl("lease", "timetolive", "--keys", hexid))
    assert (ttl["id"], ttl["granted-ttl"], ttl["keys"]) == (lid, 60, [b"el/a", b"el/b"])
    assert 58 <= ttl["ttl"] <= 60
    assert {"id": lid} in srv.etcdctl("lease", "list")["leases"]

    before = current(kv)
    assert srv.etcdctl("lease", "revoke", hexid, json=False).stdout == f"lease {hexid} revoked\n".encode()
    assert "kvs" not in srv.etcdctl("get", "--prefix", "el/")
    assert current(kv) == before + 1  # both keys deleted in one revision
    assert srv.etcdctl("lease", "timetolive", hexid, json=False).stdout == \
        f"lease {hexid} already expired\n".encode()
    assert {"id": lid} not in srv.etcdctl("lease", "list").get("leases", [])
    gone = srv.etcdctl("lease", "keep-alive", "--once", hexid, json=False, check=False)
    assert gone.returncode != 0 and LEASE_NOT_FOUND.encode() in gone.stderr


@pytest.mark.parametrize("args, message", [
    (["lease", "revoke", "7fffffff00000001"], f"failed to revoke lease ({LEASE_NOT_FOUND})"),
    (["lease", "grant", "9000000001"], f"failed to grant lease ({TTL_TOO_LARGE})"),
    (["put", "--lease", "7fffffff00000002", "el/x", "v"], LEASE_NOT_FOUND),
])
def test_etcdctl_lease_errors(srv, args, message):
    proc = srv.etcdctl(*args, json=False, check=False)
    assert proc.returncode != 0
    assert proc.stderr.decode().splitlines()[-1] == f"Error: {message}"


def test_keys_stay_while_kept_alive_and_go_when_the_lease_expires(srv, channel, kv, lease):
    """etcd's minimum TTL (2 s) is kept: the test waits for real expiry."""
    kept = lease.LeaseGrant(pb.LeaseGrantRequest(TTL=2), timeout=10).ID
    with Ctl(srv.endpoint, "lease", "keep-alive", f"{kept:x}") as keeper, WatchStream(channel) as ws:
        left = lease.LeaseGrant(pb.LeaseGrantRequest(TTL=1), timeout=10).ID
        granted = time.monotonic()
        assert keeper.line() == f"lease {kept:016x} keepalived with TTL(2)".encode()
        assert srv.etcdctl("lease", "timetolive", f"{left:x}")["granted-ttl"] == 2  # raised to the minimum
        ws.created(b"lx/", prefix_end(b"lx/"))
        put(kv, b"lx/kept", b"k", lease=kept)
        put(kv, b"lx/left2", b"l", lease=left)
        put(kv, b"lx/left1", b"l", lease=left)
        events = ws.events(5, timeout=8)[3:]
        # The expired lease's keys go in one revision, in key order.
        assert [(e.type, e.kv.key) for e in events] == [(DELETE, b"lx/left1"), (DELETE, b"lx/left2")]
        assert events[0].kv.mod_revision == events[1].kv.mod_revision
        assert time.monotonic() - granted >= 1.5
        assert lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=left), timeout=10).TTL == -1
        time.sleep(max(0.0, granted + 3.0 - time.monotonic()))
        assert [k["key"] for k in kvs(srv.etcdctl("get", "--prefix", "lx/"))] == [b"lx/kept"]
        keeper.stop()
        (event,) = ws.events(1, timeout=8)
        assert (event.type, event.kv.key) == (DELETE, b"lx/kept")
    assert "kvs" not in srv.etcdctl("get", "--prefix", "lx/")


# --- etcdctl lock and elect -------------------------------------------------------


def test_etcdctl_lock_second_holder_waits_for_release_or_expiry(srv, kv):
    a = Ctl(srv.endpoint, "lock", "--ttl=2", "lk/mutex")
    b = c = None
    try:
        a_key = a.line()
        assert a_key is not None and a_key.startswith(b"lk/mutex/"), a.stderr_text()
        b = Ctl(srv.endpoint, "lock", "--ttl=2", "lk/mutex")
        assert b.line(1.0) is None  # B waits while A holds the lock
        a.signal(signal.SIGINT)  # A unlocks and exits
        assert a.wait() == 0
        b_key = b.line()
        assert b_key is not None and b_key.startswith(b"lk/mutex/") and b_key != a_key
        # B dies without unlocking: C gets in once B's session lease expires.
        b.signal(signal.SIGKILL)
        b.wait()
        killed = time.monotonic()
        c = Ctl(srv.endpoint, "lock", "--ttl=2", "lk/mutex")
        assert c.line(0.5) is None
        assert kvs(srv.etcdctl("get", b_key))  # B's key is still held
        c_key = c.line(8.0)
        assert c_key is not None and c_key.startswith(b"lk/mutex/"), c.stderr_text()
        assert time.monotonic() - killed >= 0.5
        assert "kvs" not in srv.etcdctl("get", b_key)
    finally:
        for ctl in (a, b, c):
            if ctl is not None:
                ctl.stop()


def test_etcdctl_lock_runs_commands_one_at_a_time(srv, tmp_path):
    log = tmp_path / "order"
    script = 'echo "$0 in" >> "$1"; sleep 0.4; echo "$0 out" >> "$1"'
    ctls = [Ctl(srv.endpoint, "lock", "lk/cmd", "--", "sh", "-c", script, name, str(log)) for name in ("p", "q")]
    try:
        for ctl in ctls:
            assert ctl.wait(15) == 0, ctl.stderr_text()
    finally:
        for ctl in ctls:
            ctl.stop()
    lines = log.read_text().split()
    first, second = lines[0], lines[4]
    assert lines == [first, "in", first, "out", second, "in", second, "out"] and {first, second} == {"p", "q"}


def test_etcdctl_elect_leader_changes_when_the_first_resigns(srv):
    observer = Ctl(srv.endpoint, "elect", "--listen", "ev/vote")
    a = Ctl(srv.endpoint, "elect", "ev/vote", "alpha")
    b = None
    try:
        a_key, a_value = a.lines(2)
        assert a_key.startswith(b"ev/vote/") and a_value == b"alpha"
        assert observer.lines(2) == [a_key, b"alpha"]
        b = Ctl(srv.endpoint, "elect", "ev/vote", "beta")
        assert b.line(1.0) is None  # not elected while alpha leads
        a.signal(signal.SIGINT)  # alpha resigns
        assert a.wait() == 0
        b_key, b_value = b.lines(2)
        assert b_key.startswith(b"ev/vote/") and b_key != a_key and b_value == b"beta"
        assert observer.lines(2) == [b_key, b"beta"]
        b.signal(signal.SIGINT)
        assert b.wait() == 0
    finally:
        for ctl in (a, b, observer):
            if ctl is not None:
                ctl.stop()


# --- Watch over raw gRPC: creating ------------------------------------------------


def test_created_responses_in_request_order_with_ids_from_zero(channel, kv):
    rev = put(kv, b"wo/k", b"v")
    with WatchStream(channel) as ws:
        ws.create(b"wo/k", watch_id=1)  # client-chosen: used as given
        for _ in range(3):
            ws.create(b"wo/k")  # server-chosen: from 0, skipping 1 (in use)
        ws.create(b"wo/k", watch_id=100)
        ws.create(b"wo/k")
        resps = [ws.next() for _ in range(6)]
        assert [(r.watch_id, r.created, r.canceled) for r in resps] == [
            (1, True, False), (0, True, False), (2, True, False), (3, True, False),
            (100, True, False), (4, True, False)]
        for r in resps:
            assert_header(r.header, rev)
            assert not r.events and not r.cancel_reason
        # Every watcher gets the next write, each in a response of its own.
        rev2 = put(kv, b"wo/k", b"w")
        got = sorted(ws.next().watch_id for _ in range(6))
        assert got == [0, 1, 2, 3, 4, 100]
    with WatchStream(channel) as other:
        # IDs are per stream: a new stream starts at 0 again.
        assert other.created(b"wo/k").watch_id == 0
        assert other.created(b"wo/k", start_revision=rev2).header.revision == rev2


def test_no_event_before_its_watchers_created_response(channel, kv):
    """Watchers are created while another thread writes the watched key:
    each one's created response comes first, then every later write once."""
    stop = threading.Event()
    revisions: list[int] = []

    def writer():
        for i in range(2000):
            if stop.is_set():
                return
            revisions.append(put(kv, b"wr/k", str(i).encode()))

    thread = threading.Thread(target=writer)
    with WatchStream(channel) as ws:
        thread.start()
        try:
            wait_until(lambda: len(revisions) >= 5, 10, "writes started")
            for _ in range(40):
                ws.create(b"wr/k")
                time.sleep(0.002)
        finally:
            stop.set()
            thread.join(30)
        resps = ws.sync(revisions[-1])
    created: dict[int, int] = {}
    seen: dict[int, list[int]] = {}
    for r in resps:
        if r.created:
            assert r.watch_id not in created
            created[r.watch_id] = r.header.revision
            seen[r.watch_id] = []
        elif r.events:
            assert r.watch_id in created, f"event for watcher {r.watch_id} before its created response"
            seen[r.watch_id].extend(e.kv.mod_revision for e in r.events)
    assert sorted(created) == list(range(40))
    for wid, rev in created.items():
        assert seen[wid] == [r for r in revisions if r > rev], wid


@pytest.mark.parametrize("create, reason", [
    (dict(key=b"wx/k", start_revision=-1), COMPACTED),
    (dict(key=b"wx/b", range_end=b"wx/a"), EMPTY_RANGE),
    (dict(key=b"wx/a", range_end=b"wx/a"), EMPTY_RANGE),
])
def test_refused_creates_are_created_and_canceled(channel, kv, create, reason):
    rev = current(kv)
    with WatchStream(channel) as ws:
        ws.create(**create)
        resp = ws.next()
        assert (resp.watch_id, resp.created, resp.canceled, resp.cancel_reason) == (-1, True, True, reason)
        assert_header(resp.header, rev)
        # The stream goes on, and IDs start at 0 still.
        assert ws.created(b"wx/k").watch_id == 0


def test_duplicate_watch_id_is_refused_and_the_first_watcher_lives_on(channel, kv):
    with WatchStream(channel) as ws:
        assert ws.created(b"wd/a", watch_id=7).watch_id == 7
        ws.create(b"wd/b", watch_id=7)
        resp = ws.next()
        assert (resp.watch_id, resp.created, resp.canceled, resp.cancel_reason) == (-1, True, True, DUPLICATE)
        rev = put(kv, b"wd/a", b"1")
        put(kv, b"wd/b", b"2")
        resp = ws.next()
        assert resp.watch_id == 7 and event_tuples(resp.events) == [(PUT, b"wd/a", b"1", rev)]
        ws.quiet(0.3)


def test_empty_key_means_the_smallest_key(channel, kv):
    with WatchStream(channel) as ws:
        ws.created(b"", b"\0")  # every key
        ws.created(b"")  # the key "\0" alone
        rev = put(kv, b"we/any", b"v")
        resp = ws.next()
        assert resp.watch_id == 0 and event_tuples(resp.events) == [(PUT, b"we/any", b"v", rev)]
        rev = put(kv, b"\0", b"nul")
        got = sorted((ws.next().watch_id, rev) for _ in range(2))
        assert got == [(0, rev), (1, rev)]


# --- Watch: cancel, progress, compaction ------------------------------------------


def test_cancel_answers_once_and_unknown_ids_get_nothing(channel, kv):
    with WatchStream(channel) as ws:
        ws.created(b"wc/k")
        ws.created(b"wc/other")
        ws.cancel(0)
        resp = ws.next()
        assert (resp.watch_id, resp.canceled, resp.created, resp.cancel_reason, resp.compact_revision) == \
            (0, True, False, "", 0)
        assert_header(resp.header, current(kv))
        ws.cancel(0)  # already gone
        ws.cancel(42)  # never existed
        ws.create(b"wc/k")  # answered next: nothing came for the cancels
        assert ws.next().watch_id == 2
        put(kv, b"wc/k", b"v")
        assert ws.next().watch_id == 2  # only the new watcher hears it
        ws.quiet(0.2)


def test_a_client_that_stops_sending_still_gets_events(channel, kv):
    with WatchStream(channel) as ws:
        ws.created(b"wh/k")
        ws.close_send()
        rev = put(kv, b"wh/k", b"v")
        assert event_tuples(ws.next().events) == [(PUT, b"wh/k", b"v", rev)]


def test_progress_request(channel, kv):
    rev = put(kv, b"wp/k", b"v")
    with WatchStream(channel) as ws:
        ws.progress()  # no watchers: no answer
        ws.created(b"wp/k")
        ws.created(b"wp/", prefix_end(b"wp/"))
        ws.progress()
        resp = ws.next()
        assert is_progress(resp) and resp.watch_id == -1
        assert_header(resp.header, rev)
        # A watcher waiting for a future revision is not synced yet: no answer.
        ws.created(b"wp/k", start_revision=rev + 100)
        ws.progress()
        ws.create(b"wp/k")
        assert ws.next().created


def test_progress_notify_reaches_idle_watchers_that_asked(channel, kv):
    with WatchStream(channel) as ws, WatchStream(channel) as plain:
        plain.created(b"wn/k")
        assert ws.created(b"wn/k", progress_notify=True).watch_id == 0
        rev = current(kv)
        resp = ws.next(timeout=10 * PROGRESS_INTERVAL)
        assert is_progress(resp) and resp.watch_id == 0 and resp.header.revision >= rev
        plain.quiet(3 * PROGRESS_INTERVAL)


def test_watch_from_a_compacted_revision_is_created_then_canceled(own):
    server = own()
    with server.channel() as ch, WatchStream(ch) as ws:
        kv = stub(ch, "KV")
        first = put(kv, b"k", b"1")
        put(kv, b"k", b"2")
        last = put(kv, b"k", b"3")
        kv.Compact(pb.CompactionRequest(revision=last), timeout=10)
        resp = ws.created(b"k", start_revision=first)
        assert_header(resp.header, last)
        resp = ws.next()
        assert (resp.watch_id, resp.canceled, resp.compact_revision, resp.cancel_reason) == (0, True, last, "")
        assert resp.header.revision == 0 and not resp.events  # etcd leaves it 0
        # Its ID stays taken until the client cancels it (as in etcd), and
        # the stream gets no progress while it is there.
        assert ws.created(b"k").watch_id == 1
        ws.progress()
        ws.cancel(0)
        resp = ws.next()
        assert (resp.watch_id, resp.canceled) == (0, True)
        # At the compaction revision itself, history is still there.
        assert ws.created(b"k", start_revision=last).watch_id == 2
        assert event_tuples(ws.next().events) == [(PUT, b"k", b"3", last)]


# --- Watch: what the events carry ------------------------------------------------


def test_filters_and_prev_kv(channel, kv):
    with WatchStream(channel) as ws:
        ws.created(b"wf/", prefix_end(b"wf/"), filters=[NOPUT])
        ws.created(b"wf/", prefix_end(b"wf/"), filters=[NODELETE], prev_kv=True)
        ws.created(b"wf/", prefix_end(b"wf/"), filters=[NOPUT, NODELETE])
        r1 = put(kv, b"wf/a", b"1")
        r2 = put(kv, b"wf/a", b"2")
        r3 = delete(kv, b"wf/a")
        resps = ws.sync(r3)
        by_id: dict[int, list] = {0: [], 1: [], 2: []}
        for r in resps:
            assert r.events, "a response emptied by filters is not sent"
            by_id[r.watch_id].extend(r.events)
    assert event_tuples(by_id[0]) == [(DELETE, b"wf/a", b"", r3)]
    assert event_tuples(by_id[1]) == [(PUT, b"wf/a", b"1", r1), (PUT, b"wf/a", b"2", r2)]
    assert not by_id[1][0].HasField("prev_kv")
    assert (by_id[1][1].prev_kv.value, by_id[1][1].prev_kv.mod_revision) == (b"1", r1)
    assert by_id[2] == []
    assert not by_id[0][0].HasField("prev_kv")  # prev_kv was not asked for


def test_one_txn_is_one_response_in_change_order(channel, kv):
    with WatchStream(channel) as ws:
        ws.created(b"wt/", prefix_end(b"wt/"))
        resp = kv.Txn(pb.TxnRequest(success=[ops.put(b"wt/b", b"1"), ops.put(b"wt/a", b"2")]), timeout=10)
        rev = resp.header.revision
        got = ws.next()
        assert event_tuples(got.events) == [(PUT, b"wt/b", b"1", rev), (PUT, b"wt/a", b"2", rev)]
        assert_header(got.header, rev)


def test_large_responses_are_fragmented_only_for_watchers_that_ask(channel, kv):
    value = b"x" * 12 * 1024
    keys = [b"wg/%03d" % i for i in range(100)]
    revs = [kv.Txn(pb.TxnRequest(success=[ops.put(k, value + bytes([n])) for k in keys]), timeout=30).header.revision
            for n in range(2)]
    with WatchStream(channel) as ws:
        # History replay: 200 events of 12 KiB in one catch-up response.
        ws.created(b"wg/", prefix_end(b"wg/"), start_revision=revs[0], fragment=True)
        ws.created(b"wg/", prefix_end(b"wg/"), start_revision=revs[0])
        resps = ws.sync(revs[1], timeout=20)
    whole = [r for r in resps if r.watch_id == 1]
    parts = [r for r in resps if r.watch_id == 0]
    assert len(whole) == 1 and not whole[0].fragment and whole[0].ByteSize() >= FRAGMENT_BYTES
    assert len(parts) >= 2
    assert [p.fragment for p in parts] == [True] * (len(parts) - 1) + [False]
    for p in parts:
        assert p.ByteSize() < FRAGMENT_BYTES and p.header.revision == whole[0].header.revision
    assert [e for p in parts for e in p.events] == list(whole[0].events)
    # Live: prev_kv doubles one txn's response past the threshold.
    with WatchStream(channel) as ws:
        ws.created(b"wg/", prefix_end(b"wg/"), prev_kv=True, fragment=True)
        rev = kv.Txn(pb.TxnRequest(success=[ops.put(k, value) for k in keys]), timeout=30).header.revision
        parts = ws.sync(rev, timeout=20)
    assert len(parts) >= 2 and [p.fragment for p in parts][-1] is False
    events = [e for p in parts for e in p.events]
    assert [(e.kv.key, e.kv.mod_revision, e.prev_kv.mod_revision) for e in events] == \
        [(k, rev, revs[1]) for k in keys]


def test_a_reader_that_falls_behind_gets_every_event_once_in_order(channel, kv):
    """Writes outrun a client that does not read: the stream's buffer
    fills, the hub parks and later replays from the backend, and the client
    still gets each revision once, in order."""
    requests: queue.Queue = queue.Queue()

    def feed():
        for _ in range(10):
            req = requests.get(timeout=60)
            if req is None:
                return
            yield req

    call = stub(channel, "Watch").Watch(feed(), timeout=60)
    try:
        requests.put(pb.WatchRequest(create_request=pb.WatchCreateRequest(key=b"wb/", range_end=b"wb0")))
        assert next(call).created
        value = b"x" * 4096
        revs = [kv.Txn(pb.TxnRequest(success=[ops.put(b"wb/%d" % j, value) for j in range(10)]),
                       timeout=10).header.revision
                for _ in range(300)]
        got: list[int] = []
        for resp in call:  # reading starts only now
            assert resp.HasField("header") and not resp.canceled
            got.extend(e.kv.mod_revision for e in resp.events)
            if len(got) >= 3000:
                break
        assert got == [r for r in revs for _ in range(10)]
    finally:
        call.cancel()
        requests.put(None)


def test_lease_revoke_deletes_in_one_revision_in_key_order(channel, kv, lease):
    lid = lease.LeaseGrant(pb.LeaseGrantRequest(TTL=60), timeout=10).ID
    for key in (b"wl/c", b"wl/a", b"wl/b"):
        put(kv, key, b"v", lease=lid)
    with WatchStream(channel) as ws:
        ws.created(b"wl/", prefix_end(b"wl/"), prev_kv=True)
        resp = lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=lid), timeout=10)
        rev = resp.header.revision
        assert_header(resp.header)
        got = ws.next()
        assert event_tuples(got.events) == [(DELETE, k, b"", rev) for k in (b"wl/a", b"wl/b", b"wl/c")]
        assert [e.prev_kv.lease for e in got.events] == [lid] * 3
        assert current(kv) == rev


def _etcd_fragments(resp, limit):
    """etcd's sendFragments, step by step with real encoded sizes."""
    if resp.ByteSize() < limit or len(resp.events) < 2:
        return [resp]
    out, idx = [], 0
    while True:
        cur = pb.WatchResponse()
        cur.CopyFrom(resp)
        del cur.events[:]
        cur.fragment = True
        for ev in resp.events[idx:]:
            cur.events.append(ev)
            if len(cur.events) > 1 and cur.ByteSize() >= limit:
                del cur.events[-1]
                break
            idx += 1
        if idx == len(resp.events):
            cur.fragment = False
        out.append(cur)
        if not cur.fragment:
            return out


@pytest.mark.parametrize("sizes, limit", [
    ([10, 10], 1000),                 # small: whole
    ([5000], 100),                    # one event: whole, however large
    ([100] * 30, 1000),
    ([120, 121, 122, 123, 124, 125, 126, 127, 128, 129] * 5, 700),  # length varints of 1 and 2 bytes
    ([16370 + i for i in range(30)], 50000),                      # 2- and 3-byte length varints
    ([300, 5000, 10, 10, 4000, 1], 4500),  # an event alone over the limit
])
def test_fragments_split_like_etcd(sizes, limit):
    from mvcckv.pb import kv_pb2
    from mvcckv.server.watch import fragments

    resp = pb.WatchResponse(watch_id=3, compact_revision=0)
    resp.header.revision = 99
    resp.header.cluster_id = CLUSTER_ID
    for i, n in enumerate(sizes):
        resp.events.add(kv=kv_pb2.KeyValue(key=b"k%d" % i, value=b"v" * n, mod_revision=99))
    got = list(fragments(resp, limit))
    assert got == _etcd_fragments(resp, limit)
    assert [e for f in got for e in f.events] == list(resp.events)


def test_watch_module_examples():
    import doctest

    from mvcckv.server import watch

    result = doctest.testmod(watch)
    assert result.attempted > 0 and result.failed == 0


# --- Lease over raw gRPC ------------------------------------------------------------


def test_lease_grant_picks_ids_and_raises_small_ttls(lease, kv):
    picked = lease.LeaseGrant(pb.LeaseGrantRequest(TTL=30), timeout=10)
    assert picked.ID > 0 and picked.TTL == 30 and picked.error == ""
    assert_header(picked.header, current(kv))
    for ttl in (0, 1, -5):
        resp = lease.LeaseGrant(pb.LeaseGrantRequest(TTL=ttl), timeout=10)
        assert resp.TTL == 2  # etcd's minimum TTL
    negative = lease.LeaseGrant(pb.LeaseGrantRequest(TTL=30, ID=-77), timeout=10)
    assert negative.ID == -77  # any ID but 0 is used as given
    assert {picked.ID, -77} <= {s.ID for s in lease.LeaseLeases(pb.LeaseLeasesRequest(), timeout=10).leases}
    for lid in (picked.ID, -77):
        lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=lid), timeout=10)


def test_lease_errors_have_etcds_codes_and_messages(lease, kv):
    lease.LeaseGrant(pb.LeaseGrantRequest(TTL=30, ID=0x1E5E), timeout=10)
    try:
        assert rpc_error(lease.LeaseGrant, pb.LeaseGrantRequest(TTL=30, ID=0x1E5E)) == \
            (C.FAILED_PRECONDITION, LEASE_EXISTS)
    finally:
        lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=0x1E5E), timeout=10)
    assert rpc_error(lease.LeaseGrant, pb.LeaseGrantRequest(TTL=9_000_000_001)) == (C.OUT_OF_RANGE, TTL_TOO_LARGE)
    assert lease.LeaseGrant(pb.LeaseGrantRequest(TTL=9_000_000_000, ID=0x1E5F), timeout=10).TTL == 9_000_000_000
    lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=0x1E5F), timeout=10)
    assert rpc_error(lease.LeaseRevoke, pb.LeaseRevokeRequest(ID=0x1E5E)) == (C.NOT_FOUND, LEASE_NOT_FOUND)
    assert rpc_error(kv.Put, pb.PutRequest(key=b"lz/k", lease=0x1E5E)) == (C.NOT_FOUND, LEASE_NOT_FOUND)
    # TimeToLive of an unknown lease is not an error.
    ttl = lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=0x1E5E, keys=True), timeout=10)
    assert (ttl.ID, ttl.TTL, ttl.grantedTTL, list(ttl.keys)) == (0x1E5E, -1, 0, [])
    assert_header(ttl.header, current(kv))


def test_time_to_live_reports_keys_and_remaining_ttl(lease, kv):
    lid = lease.LeaseGrant(pb.LeaseGrantRequest(TTL=100), timeout=10).ID
    try:
        for key in (b"lt/b", b"lt/a"):
            put(kv, key, lease=lid)
        put(kv, b"lt/b", lease=0)  # moved off the lease
        with_keys = lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=lid, keys=True), timeout=10)
        assert (with_keys.ID, with_keys.grantedTTL, list(with_keys.keys)) == (lid, 100, [b"lt/a"])
        assert 98 <= with_keys.TTL <= 100
        assert_header(with_keys.header, current(kv))
        assert list(lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=lid), timeout=10).keys) == []
    finally:
        lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=lid), timeout=10)


def test_keepalive_stream_answers_every_request_in_order(lease, kv):
    lid = lease.LeaseGrant(pb.LeaseGrantRequest(TTL=40), timeout=10).ID
    ids = [lid, 0x5EED, lid, -3, lid] * 20
    rev = current(kv)
    try:
        resps = list(lease.LeaseKeepAlive(iter(pb.LeaseKeepAliveRequest(ID=i) for i in ids), timeout=20))
    finally:
        lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=lid), timeout=10)
    assert [(r.ID, r.TTL) for r in resps] == [(i, 40 if i == lid else 0) for i in ids]
    for r in resps:
        assert_header(r.header, rev)


def test_keepalive_resets_the_countdown(lease):
    lid = lease.LeaseGrant(pb.LeaseGrantRequest(TTL=3), timeout=10).ID
    try:
        time.sleep(1.1)
        assert lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=lid), timeout=10).TTL <= 1
        (resp,) = lease.LeaseKeepAlive(iter([pb.LeaseKeepAliveRequest(ID=lid)]), timeout=10)
        assert resp.TTL == 3
        assert lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=lid), timeout=10).TTL == 2
    finally:
        lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=lid), timeout=10)


def test_lease_grant_respects_the_quota(own):
    server = own("--quota-backend-bytes", "1")
    with server.channel() as ch:
        assert rpc_error(stub(ch, "Lease").LeaseGrant, pb.LeaseGrantRequest(TTL=10)) == \
            (C.RESOURCE_EXHAUSTED, NOSPACE)


# --- the stream's life cycle, seen from inside ---------------------------------------


@pytest.fixture
def inproc(engine, tmp_path):
    """``mvcckv serve`` in this process (its own event loop thread), so a
    test can look at the store's watch hub."""
    from mvcckv.server import app, engines
    from mvcckv.server.config import Config

    config = Config(data_dir=str(tmp_path / "inproc"), backend=engine.new_backend())
    node = engines.for_config(config).open_node(config)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start():
        server, _ = app.build_server(node, config)
        port = server.add_insecure_port("127.0.0.1:0")
        await app.start_server(server)
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield node, f"127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(app.stop_server(server, 0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        node.store.close()


def test_ending_the_rpc_cancels_its_watchers(inproc):
    from harness import grpc_channel

    node, endpoint = inproc
    hub = node.store.watch_hub
    with grpc_channel(endpoint) as ch:
        kv = stub(ch, "KV")
        put(kv, b"k", b"v")
        ws = WatchStream(ch)
        try:
            ws.created(b"k")
            ws.created(b"a", b"z")
            ws.created(b"k", start_revision=1)
            ws.sync(current(kv))
            assert hub.stats()["synced"] == 3
        finally:
            ws.close()
        wait_until(lambda: hub.stats() == {"synced": 0, "unsynced": 0, "victims": 0}, 5, "watchers canceled")
        put(kv, b"k", b"w")  # nobody to deliver to, nothing breaks


# --- the progress-notify interval flag ------------------------------------------------


@pytest.mark.parametrize("value, seconds", [
    ("10m", 600.0), ("250ms", 0.25), ("50ms", 0.1), ("0", 600.0), ("1m30s", 90.0)])
def test_progress_notify_interval_flag(value, seconds):
    from mvcckv.cli import build_parser
    from mvcckv.server.config import Config

    args = build_parser().parse_args(["serve", "--experimental-watch-progress-notify-interval", value])
    assert Config.from_args(args).watch_progress_notify_interval == seconds


def test_progress_notify_interval_from_the_environment_and_help(tmp_path, monkeypatch):
    from mvcckv.cli import build_parser
    from mvcckv.server.config import Config, ConfigError

    monkeypatch.setenv("MVCCKV_EXPERIMENTAL_WATCH_PROGRESS_NOTIFY_INTERVAL", "2s")
    assert Config.from_args(build_parser().parse_args(["serve"])).watch_progress_notify_interval == 2.0
    with pytest.raises(ConfigError, match="not a duration"):
        Config.from_args(build_parser().parse_args(
            ["serve", "--experimental-watch-progress-notify-interval", "soon"]))
    help_text = subprocess.run([sys.executable, "-m", "mvcckv", "serve", "--help"],
                               capture_output=True, text=True, timeout=30).stdout
    assert "--experimental-watch-progress-notify-interval" in help_text
    assert "MVCCKV_EXPERIMENTAL_WATCH_PROGRESS_NOTIFY_INTERVAL" in help_text


def test_first_progress_notification_waits_for_the_interval(own):
    server = own("--experimental-watch-progress-notify-interval", "3s")
    with server.channel() as ch, WatchStream(ch) as ws:
        ws.created(b"k", progress_notify=True)
        ws.quiet(1.0)

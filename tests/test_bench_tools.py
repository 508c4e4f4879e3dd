"""Checks of the benchmark tools: bench/ (encoders, h2load parsing) and
``bench/compare.py`` (its table, chart, and one short run of every engine)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)

import grpc_load as gl  # noqa: E402
import noop_server  # noqa: E402


# ---------------------------------------------------------------------------
# encoders


def test_varint():
    assert gl.encode_varint(0) == b"\x00"
    assert gl.encode_varint(1) == b"\x01"
    assert gl.encode_varint(127) == b"\x7f"
    assert gl.encode_varint(128) == b"\x80\x01"
    assert gl.encode_varint(300) == b"\xac\x02"
    assert gl.encode_varint(-1) == b"\xff" * 9 + b"\x01"
    for n in (0, 1, 127, 128, 300, 2 ** 32, 2 ** 63 - 1):
        assert gl.decode_varint(gl.encode_varint(n)) == (n, len(gl.encode_varint(n)))


def test_range_request_known_bytes():
    assert gl.range_request(b"foo").hex() == "0a03666f6f"
    assert gl.range_request(b"foo", serializable=True).hex() == "0a03666f6f3801"
    assert gl.range_request(b"foo", b"fop").hex() == "0a03666f6f1203666f70"
    assert gl.range_request(b"a", b"b", serializable=True).hex() == "0a0161120162" + "3801"


def test_put_request_known_bytes():
    assert gl.put_request(b"foo", b"bar").hex() == "0a03666f6f1203626172"
    big = gl.put_request(b"k", b"v" * 256)
    assert big[:5] == b"\x0a\x01k\x12\x80" and big[5] == 0x02 and len(big) == 3 + 3 + 256


def test_prefix_end():
    assert gl.prefix_end(b"foo") == b"fop"
    assert gl.prefix_end(b"a\xff") == b"b"
    assert gl.prefix_end(b"\xff\xff") == b"\x00"
    assert gl.prefix_end(gl.RANGE_PREFIX) == b"bench/range0"


def test_grpc_frame():
    assert gl.grpc_frame(b"\x0a\x03foo").hex() == "00000000050a03666f6f"
    assert gl.grpc_frame(b"") == b"\x00\x00\x00\x00\x00"
    body = b"x" * 70000
    frame = gl.grpc_frame(body)
    assert frame[:5] == b"\x00\x00\x01\x11\x70" and frame[5:] == body


def test_workloads():
    w = gl.workloads()
    assert set(w) == set(gl.WORKLOAD_NAMES)
    assert w["put"].path == "/etcdserverpb.KV/Put"
    assert w["put"].message == gl.put_request(gl.PUT_KEY, gl.make_value(256))
    assert w["get-serializable"].message.endswith(b"\x38\x01")
    assert not w["get-linearizable"].message.endswith(b"\x38\x01")
    r = w["range100"]
    assert r.path == "/etcdserverpb.KV/Range" and len(r.setup) == 100 and r.expect_kvs == 100
    assert all(k.startswith(gl.RANGE_PREFIX) for k, _ in r.setup)
    assert r.frame == gl.grpc_frame(r.message)


def _etcd_message_classes():
    """RangeRequest/PutRequest/RangeResponse built from a descriptor, as protoc would."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="bench_test_kv.proto", package="benchtest",
                                             syntax="proto3")

    def msg(name, fields):
        m = fdp.message_type.add(name=name)
        for number, fname, ftype, label, type_name in fields:
            f = m.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                f.type_name = type_name

    opt, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    msg("ResponseHeader", [(1, "cluster_id", F.TYPE_UINT64, opt, None),
                           (2, "member_id", F.TYPE_UINT64, opt, None),
                           (3, "revision", F.TYPE_INT64, opt, None),
                           (4, "raft_term", F.TYPE_UINT64, opt, None)])
    msg("KeyValue", [(1, "key", F.TYPE_BYTES, opt, None),
                     (2, "create_revision", F.TYPE_INT64, opt, None),
                     (3, "mod_revision", F.TYPE_INT64, opt, None),
                     (4, "version", F.TYPE_INT64, opt, None),
                     (5, "value", F.TYPE_BYTES, opt, None),
                     (6, "lease", F.TYPE_INT64, opt, None)])
    msg("RangeRequest", [(1, "key", F.TYPE_BYTES, opt, None),
                         (2, "range_end", F.TYPE_BYTES, opt, None),
                         (3, "limit", F.TYPE_INT64, opt, None),
                         (7, "serializable", F.TYPE_BOOL, opt, None)])
    msg("RangeResponse", [(1, "header", F.TYPE_MESSAGE, opt, ".benchtest.ResponseHeader"),
                          (2, "kvs", F.TYPE_MESSAGE, rep, ".benchtest.KeyValue"),
                          (3, "more", F.TYPE_BOOL, opt, None),
                          (4, "count", F.TYPE_INT64, opt, None)])
    msg("PutRequest", [(1, "key", F.TYPE_BYTES, opt, None), (2, "value", F.TYPE_BYTES, opt, None)])
    msg("PutResponse", [(1, "header", F.TYPE_MESSAGE, opt, ".benchtest.ResponseHeader")])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName("benchtest." + name))
            for name in ("RangeRequest", "RangeResponse", "PutRequest", "PutResponse")}


def test_encoders_match_protobuf():
    pytest.importorskip("google.protobuf")
    c = _etcd_message_classes()
    for name, wl in gl.workloads().items():
        cls = c["PutRequest"] if wl.method == "Put" else c["RangeRequest"]
        parsed = cls.FromString(wl.message)
        assert parsed.SerializeToString(deterministic=True) == wl.message, name
    rr = c["RangeRequest"].FromString(gl.workloads()["get-serializable"].message)
    assert rr.key == gl.GET_KEY and rr.serializable and not rr.range_end

    canned = noop_server.precomputed_responses()
    resp = c["RangeResponse"].FromString(canned["range100"])
    assert resp.count == 100 and len(resp.kvs) == 100 and resp.header.revision == 1000
    assert all(len(kv.value) == gl.VALUE_SIZE for kv in resp.kvs)
    assert resp.SerializeToString(deterministic=True) == canned["range100"]
    one = c["RangeResponse"].FromString(canned["range1"])
    assert [kv.key for kv in one.kvs] == [gl.GET_KEY]
    put = c["PutResponse"].FromString(canned["put"])
    assert put.header.raft_term == 2


def test_summarize_response_and_range_end_detection():
    canned = noop_server.precomputed_responses(value_size=10)
    info = gl.summarize_response("Range", canned["range100"])
    assert (info["kvs"], info["count"], info["revision"], info["value_sizes"]) == (100, 100, 1000, [10])
    assert gl.summarize_response("Put", canned["put"])["revision"] == 1000
    w = gl.workloads()
    assert noop_server.has_range_end(w["range100"].message)
    assert not noop_server.has_range_end(w["get-serializable"].message)
    assert not noop_server.has_range_end(w["get-linearizable"].message)
    assert noop_server.has_range_end(gl.range_request(b"k" * 300, b"l"))
    assert not noop_server.has_range_end(b"")


# ---------------------------------------------------------------------------
# h2load: command line, output parser, latency log


def test_split_concurrency():
    assert gl.split_concurrency(1, 4) == (1, 1)
    assert gl.split_concurrency(16, 4) == (4, 4)
    assert gl.split_concurrency(64, 4) == (4, 16)
    assert gl.split_concurrency(64, 64) == (64, 1)
    assert gl.split_concurrency(64, 1) == (1, 64)
    assert gl.split_concurrency(12, 5) == (4, 3)
    with pytest.raises(ValueError):
        gl.split_concurrency(0, 1)


def test_h2load_argv():
    argv = gl.h2load_argv("http://127.0.0.1:2379/etcdserverpb.KV/Put", "/tmp/f", 4, 16,
                          duration=5, log_path="/tmp/log")
    assert argv[0] == "h2load" and argv[-1] == "http://127.0.0.1:2379/etcdserverpb.KV/Put"
    s = " ".join(argv)
    assert "-t 1 -c 4 -m 16" in s and "-d /tmp/f" in s and "-D 5000ms" in s
    assert "--log-file /tmp/log" in s
    assert argv[argv.index("content-type: application/grpc") - 1] == "-H"
    assert argv[argv.index("te: trailers") - 1] == "-H"
    assert "-n 1000" in " ".join(gl.h2load_argv("u", "d", 1, 1, requests=1000))


SAMPLE = """\
starting benchmark...
spawning thread #0: 1 total client(s). Timing-based test with 0s of warm-up time and 2s of main duration for measurements.
Warm-up started for thread #0.
progress: 100% of clients started
Warm-up phase is over for thread #0.
Main benchmark duration is started for thread #0.
Application protocol: h2c
Main benchmark duration is over for thread #0. Stopping all clients.
Stopped all clients for thread #0

finished in 2.00s, 2372.50 req/s, 836.52KB/s
requests: 4745 total, 4746 started, 4745 done, 4745 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 4745 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 1.63MB (1713191) total, 13.97KB (14310) headers (space savings 96.28%), 1.37MB (1432990) data
                     min         max         mean         sd        +/- sd
time for request:      116us      1.74ms       412us        85us    80.59%
time for connect:      106us       106us       106us         0us   100.00%
time to 1st byte:      887us       887us       887us         0us   100.00%
req/s           :    2372.09     2372.09     2372.09        0.00   100.00%
"""


def test_parse_h2load_output():
    s = gl.parse_h2load_output(SAMPLE)
    assert s["rps"] == 2372.50 and s["elapsed_s"] == 2.0
    assert (s["total"], s["started"], s["done"], s["succeeded"]) == (4745, 4746, 4745, 4745)
    assert (s["failed"], s["errored"], s["timeout"]) == (0, 0, 0)
    assert s["status_2xx"] == 4745 and s["status_5xx"] == 0
    assert (s["traffic_total"], s["traffic_headers"], s["traffic_data"]) == (1713191, 14310, 1432990)
    assert s["lat_min_s"] == pytest.approx(116e-6)
    assert s["lat_max_s"] == pytest.approx(1.74e-3)
    assert s["lat_mean_s"] == pytest.approx(412e-6)
    assert s["lat_sd_s"] == pytest.approx(85e-6)
    slow = SAMPLE.replace("1.74ms", "1.20s").replace("finished in 2.00s", "finished in 950.12ms")
    s = gl.parse_h2load_output(slow)
    assert s["lat_max_s"] == pytest.approx(1.2) and s["elapsed_s"] == pytest.approx(0.95012)
    with pytest.raises(ValueError):
        gl.parse_h2load_output("connect: Connection refused\n")


def test_latency_log_and_percentiles(tmp_path):
    log = tmp_path / "lat.log"
    rows = [f"17956134781{i:05d}\t200\t{lat}\n" for i, lat in enumerate(range(1000, 0, -1))]
    rows.insert(10, "1795613478142080\t-1\t5000\n")
    log.write_text("".join(rows))
    lat, failed = gl.read_latency_log(str(log))
    assert failed == 1 and len(lat) == 1000
    lat.sort()
    assert gl.percentile(lat, 50) == 500
    assert gl.percentile(lat, 99) == 990
    assert gl.percentile(lat, 100) == 1000
    assert gl.percentile(lat, 0) == 1
    assert gl.percentile([7], 99) == 7
    assert gl.percentile([1, 2], 50) == 1 and gl.percentile([1, 2], 51) == 2
    import math
    assert math.isnan(gl.percentile([], 50))


def test_summarize_runs_flags_bodyless_answers():
    def run(data_per_req, rps):
        return gl.RunResult("s", "put", 16, 4, 4, rps, 1000, 0, 0, 1, 0, 2, 1, 2, 1000,
                            data_per_req * 1000, 0.5, 0.1, 0.0, 1.0, 1.0)
    row = gl.summarize_runs([run(21, 100), run(21, 300), run(21, 200)], {"frame_bytes": 21})
    assert row.rps == 200 and row.shape == "4x4" and row.cpu_per_kop == 0.5 and not row.notes
    row = gl.summarize_runs([run(0, 100)], {"frame_bytes": 21})
    assert row.notes and "gRPC errors" in row.notes[0]
    assert "| 100 (!) |" in gl.format_table([row])
    table = gl.format_table([row], {"ref": [row]})
    assert table.splitlines()[0].startswith("| workload | conc |") and "QPS / ref" in table
    # Each reference's own CPU per request sits beside the ratios.
    head, _, first = table.splitlines()[:3]
    def split(line):
        return [c.strip() for c in line.strip().strip("|").split("|")]

    cells = dict(zip(split(head), split(first)))
    assert cells["ref CPU s/1k"] == "0.500" and cells["CPU/op / ref"] == "1.00"


def test_cpu_seconds_of_self():
    assert gl.cpu_seconds(os.getpid()) >= 0
    assert gl.target_address("http://127.0.0.1:2379") == "127.0.0.1:2379"
    assert gl.target_address("127.0.0.1:23790") == "127.0.0.1:23790"


# ---------------------------------------------------------------------------
# end to end against the no-op server (about a second)


def _require_h2load() -> None:
    """Skips without h2load locally; under CI (CI=true) fails, like the etcd tests."""
    if shutil.which("h2load") is not None:
        return
    reason = "h2load not found (Debian package nghttp2-client)"
    if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason}; CI must run the load-generator test", pytrace=False)
    pytest.skip(reason)


@pytest.mark.parametrize("kind", ["noop-aio", "noop-aio/uvloop"])
def test_h2load_against_noop_server(tmp_path, kind):
    _require_h2load()
    pytest.importorskip("grpc")
    with gl.reference_server(kind, None, str(tmp_path)) as srv:
        with open(srv.log_path) as log:
            assert ("uvloop loop" if kind.endswith("uvloop") else "asyncio loop") in log.read()
        addr = gl.target_address(srv.url)
        w = gl.workloads()
        info = gl.check_workload(addr, w["range100"])
        assert info["kvs"] == 100 and info["content_ok"]
        r = gl.run_h2load(srv.url, w["get-serializable"], 4, 2, str(tmp_path), duration=None,
                          requests=200, server_pid=srv.pid, timeout=20)
        assert (r.succeeded, r.failed, r.logged, r.clients, r.streams) == (200, 0, 200, 2, 2)
        assert r.data_bytes == 200 * gl.check_workload(addr, w["get-serializable"])["frame_bytes"]
        assert r.p50_ms > 0 and r.p99_ms >= r.p50_ms and r.server_cpu_s is not None
        pid = srv.pid
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def test_cpus_option_picks_server_and_load_cores():
    import argparse

    assert gl.plan_cpus((1, 0)) == ({1}, {0})
    for bad in ("0,0", "a,b", "1", "0,1,2"):
        with pytest.raises(argparse.ArgumentTypeError):
            gl._parse_cpus(bad)
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) >= 2:
        assert gl._parse_cpus(f"{allowed[1]},{allowed[0]}") == (allowed[1], allowed[0])


def test_durable_noop_logs_every_put_before_answering(tmp_path):
    pytest.importorskip("grpc")
    put = gl.put_request(b"k", b"v" * 10)
    with gl.reference_server("noop-durable", None, str(tmp_path)) as srv:
        addr = gl.target_address(srv.url)
        logs = [os.path.join(d, f) for d, _, fs in os.walk(srv.workdir) for f in fs if f == "puts.log"]
        assert len(logs) == 1
        for i in range(3):
            answer = gl.grpc_unary(addr, "/etcdserverpb.KV/Put", put)
            assert gl.summarize_response("Put", answer)["revision"] == 1000
            # Answered only once the record was written (and fdatasynced).
            assert os.path.getsize(logs[0]) == (i + 1) * (4 + len(put))
        # Ranges are answered from the canned bytes, like noop-aio.
        assert gl.check_workload(addr, gl.workloads()["range100"])["kvs"] == 100


def test_durable_noop_needs_a_log_dir():
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "noop_server.py"), "--mode", "durable"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "--mode durable needs --log-dir" in proc.stderr


# ---------------------------------------------------------------------------
# bench/compare.py: the table's rows, and one short run of every engine


def _compare():
    import compare

    return compare


def _table_rows(table: str) -> dict[str, list[str]]:
    rows = {}
    for line in table.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_compare_merges_runs_and_splits_server_cpu():
    bc = _compare()
    runs = [bc.Cell(p50_ms=p50, p99_ms=p50 * 3, ops=1000, cpu_s=own + pg, cpu_own_s=own, cpu_pg_s=pg)
            for p50, own, pg in ((1.0, 0.5, 0.25), (3.0, 0.7, 0.35), (2.0, 0.6, 0.3))]
    cell = bc.merge_runs(runs)
    assert (cell.p50_ms, cell.p99_ms, cell.ops) == (2.0, 6.0, 3000)
    assert cell.cpu_per_kop == pytest.approx(0.9)
    assert (cell.own_cpu_per_kop, cell.pg_cpu_per_kop) == (pytest.approx(0.6), pytest.approx(0.3))
    # A part that one run did not measure is not measured for the row.
    assert bc.merge_runs([bc.Cell(ops=10, cpu_s=1.0, cpu_own_s=1.0), bc.Cell(ops=10)]).cpu_s is None
    assert bc._percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert bc._percentile(list(range(1, 101)), 99) == 99


def test_compare_table_has_watch_and_cpu_split_rows():
    bc = _compare()
    cell = lambda **kw: bc.Cell(ops=1000, qps=1000.0, p99_ms=2.0, **kw)  # noqa: E731
    results = [
        bc.EngineResult("lmdb", {("put", 1): cell(cpu_s=0.5, cpu_own_s=0.5),
                                 ("watch", 1): bc.Cell(p50_ms=1.0, p99_ms=4.0, ops=300)}),
        bc.EngineResult("pg", {("put", 1): cell(cpu_s=1.2, cpu_own_s=0.8, cpu_pg_s=0.4),
                               ("watch", 1): bc.Cell(p50_ms=2.0, p99_ms=8.0, ops=300)}),
        bc.EngineResult("article", {("put", 1): cell(cpu_s=0.1, cpu_pg_s=0.1)}),
        bc.EngineResult("etcd", skipped="no etcd binary"),
    ]
    table = bc.format_table(results, [1])
    rows = _table_rows(table)
    assert rows["metric"] == ["mvcckv / LMDB", "mvcckv / PostgreSQL", "article SQL (pgbench)"]
    assert rows["put QPS @ c=1"] == ["1,000"] * 3  # the rows that were there before stay
    assert rows["watch p50 ms (put → event)"] == ["1.00", "2.00", "-"]
    assert rows["watch p99 ms (put → event)"] == ["4.00", "8.00", "-"]
    assert rows["server CPU s / 1k put @ c=1"] == ["0.500", "1.200", "0.100"]
    assert rows["server CPU s / 1k put @ c=1: mvcckv or etcd process"] == ["0.500", "0.800", "-"]
    assert rows["server CPU s / 1k put @ c=1: PostgreSQL processes"] == ["-", "0.400", "0.100"]
    assert rows["others' CPU on server core, % (median / max)"] == ["-", "-", "-"]
    assert "- etcd: not measured: no etcd binary" in table
    # Without watch figures (--watch-samples 0) the watch rows are left out.
    results[0].cells.pop(("watch", 1))
    results[1].cells.pop(("watch", 1))
    assert "watch p50" not in bc.format_table(results, [1])


def test_compare_goal_ratios():
    bc = _compare()
    qps = {"lmdb": (1000.0, 4000.0), "pg": (800.0, 2000.0), "article": (2000.0, 8000.0)}
    results = [bc.EngineResult(name, {(w, lv): bc.Cell(qps=q * (2 if lv == 64 else 1), ops=10)
                                      for w, q in zip(("put", "get"), pair) for lv in (1, 64)})
               for name, pair in qps.items()]
    rows = _table_rows(bc.format_goals(results, [1, 64]))
    assert rows["mvcckv / LMDB, put"] == ["≥ 0.7", "0.80 (met)", "0.80 (met)"]
    assert rows["mvcckv / LMDB, get"] == ["≥ 0.7", "0.50 (short)", "0.50 (short)"]
    # The article's goal holds at c=1 only; other levels are shown unjudged.
    assert rows["article SQL (pgbench), put"] == ["≥ 0.5 at c=1", "0.40 (short)", "0.40"]
    assert rows["article SQL (pgbench), get"] == ["≥ 0.5 at c=1", "0.25 (short)", "0.25"]
    # Rounded down: just short of a goal never shows as the goal.
    results[1].cells["put", 1].qps = 699.9
    assert _table_rows(bc.format_goals(results, [1]))["mvcckv / LMDB, put"] == ["≥ 0.7", "0.69 (short)"]
    # Without the PostgreSQL engine, or without any reference, there is no table.
    assert bc.format_goals(results[:1], [1]) == ""
    assert bc.format_goals([results[1]], [1]) == ""


def test_compare_repeats_a_disturbed_run():
    bc = _compare()
    noise = iter([80.0, 40.0, 60.0, 5.0])
    runs = []

    def run():
        runs.append(bc.Cell(qps=len(runs), noise_pct=next(noise)))
        return runs[-1]

    # Three tries at most, the least disturbed kept.
    assert bc.quietest(run, 20.0, lambda msg: None).noise_pct == 40.0 and len(runs) == 3
    # Quiet enough at once, or no threshold: one run.
    assert bc.quietest(lambda: bc.Cell(noise_pct=5.0), 20.0, print).noise_pct == 5.0
    runs.clear()
    noise = iter([80.0])
    assert bc.quietest(run, None, print).noise_pct == 80.0 and len(runs) == 1


def test_compare_chart(tmp_path):
    bc = _compare()
    results = [bc.EngineResult("pg", {("put", 1): bc.Cell(qps=10.0, p99_ms=1.0, ops=10, cpu_s=0.3,
                                                           cpu_own_s=0.2, cpu_pg_s=0.1),
                                      ("watch", 1): bc.Cell(p50_ms=1.0, p99_ms=2.0, ops=5)})]
    path = tmp_path / "chart.png"
    why = bc.draw_chart(results, [1], str(path))
    # matplotlib is optional (the bench extra): without it the command says so.
    if importlib.util.find_spec("matplotlib") is None:
        assert why is not None and "matplotlib" in why and not path.exists()
    else:
        assert why is None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _require(tool: str, found: bool, package: str) -> None:
    if found:
        return
    reason = f"{tool} not found (Debian package {package}: bash tools/setup.sh)"
    if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason}; CI must run the compare smoke test", pytrace=False)
    pytest.skip(reason)


def test_compare_smoke_run_of_every_engine(tmp_path):
    """A short real run (about 15 s): every engine measured, every new row filled."""
    from pg_harness import find_postgres

    _require_h2load()
    _require("pgbench", shutil.which("pgbench") is not None, "postgresql-client")
    _require("PostgreSQL server binaries", find_postgres() is not None, "postgresql")
    _require("etcd", os.path.exists("/usr/bin/etcd") or shutil.which("etcd") is not None, "etcd-server")
    markdown = tmp_path / "compare.md"
    repo = os.path.dirname(BENCH)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCH, "compare.py"), "--duration", "1", "--runs", "1",
         "--warmup", "0", "--concurrency", "1", "--watch-samples", "20", "--no-pin", "--chart", "",
         "--markdown", str(markdown)],
        capture_output=True, text=True, timeout=240, cwd=repo, env=env, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _table_rows(proc.stdout)
    assert rows["metric"] == ["mvcckv / LMDB", "mvcckv / PostgreSQL", "article SQL (pgbench)", "etcd"], \
        proc.stdout + proc.stderr[-3000:]
    p50 = [float(v) for v in rows["watch p50 ms (put → event)"]]
    p99 = [float(v) for v in rows["watch p99 ms (put → event)"]]
    assert all(0 < a <= b < 1000 for a, b in zip(p50, p99)), (p50, p99)
    for workload in ("put", "get"):
        label = f"server CPU s / 1k {workload} @ c=1"
        total, own, pg = rows[label], rows[f"{label}: mvcckv or etcd process"], rows[f"{label}: PostgreSQL processes"]
        assert own[2] == "-" and pg[0] == "-" and pg[3] == "-", (own, pg)
        assert float(own[0]) == float(total[0]) and float(own[3]) == float(total[3])
        assert float(pg[2]) == float(total[2]) > 0
        # mvcckv on PostgreSQL: both parts measured, adding up to the total (rounding aside).
        assert float(own[1]) > 0 and float(pg[1]) > 0
        assert float(own[1]) + float(pg[1]) == pytest.approx(float(total[1]), abs=0.0015)
    assert "failed" not in proc.stdout  # neither failed requests nor failed engines
    text = markdown.read_text()
    assert "watch: 20 put -> event samples per run" in text and "watch p99 ms (put → event)" in text

"""Checks of bench/bench_auth.py's pure parts (no server, no h2load) and of
the request headers and https targets it added to grpc_load.py."""

from __future__ import annotations

import math
import os
import shlex
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)

import bench_auth as ba  # noqa: E402
import grpc_load as gl  # noqa: E402


# ---------------------------------------------------------------------------
# headers and https targets (grpc_load)


def test_h2load_argv_extra_headers():
    argv = gl.h2load_argv("https://127.0.0.1:1/etcdserverpb.KV/Range", "/tmp/f", 4, 16, duration=1,
                          headers=("token: abc.1",))
    pairs = [argv[i + 1] for i, a in enumerate(argv) if a == "-H"]
    assert pairs == ["content-type: application/grpc", "te: trailers", "token: abc.1"]
    assert argv[-1] == "https://127.0.0.1:1/etcdserverpb.KV/Range"
    # without headers, the command is what it always was
    assert gl.h2load_argv("u", "d", 1, 1, requests=5) == gl.h2load_argv("u", "d", 1, 1, requests=5, headers=())
    assert sum(a == "-H" for a in gl.h2load_argv("u", "d", 1, 1, requests=5)) == 2


def test_header_metadata():
    assert gl.header_metadata(["token: abc.1", "Authorization:Bearer x"]) == (
        ("token", "abc.1"), ("authorization", "Bearer x"))
    assert gl.header_metadata([]) == ()
    for bad in ("no-colon", ": value"):
        with pytest.raises(ValueError):
            gl.header_metadata([bad])


def test_https_targets_and_endpoints():
    assert gl.target_address("https://127.0.0.1:2379") == "127.0.0.1:2379"
    assert gl.target_address("http://127.0.0.1:23790") == "127.0.0.1:23790"
    with pytest.raises(ValueError):
        gl.target_address("unix://x")
    assert gl.is_tls("https://h:1") and not gl.is_tls("http://h:1")
    plain = gl.Endpoint("a", "http://127.0.0.1:1", None)
    assert plain.headers == () and plain.metadata == () and plain.credentials() is None
    ep = gl.Endpoint("b", "https://127.0.0.1:1", None, (ba.token_header("t.1"),), b"PEM")
    assert ep.metadata == (("token", "t.1"),)


# ---------------------------------------------------------------------------
# bench_auth: setup data


def test_token_header():
    assert ba.token_header("kXlTZcmFhpgNvOyA.7") == "token: kXlTZcmFhpgNvOyA.7"
    assert gl.header_metadata([ba.token_header("a.1")]) == (("token", "a.1"),)
    for bad in ("", "a\r\nx: y"):
        with pytest.raises(ValueError):
            ba.token_header(bad)


def test_permission_prefixes_cover_the_workload_keys_and_stay_apart():
    keys = [gl.PUT_KEY, gl.GET_KEY]
    prefixes = ba.permission_prefixes(100, keys)
    assert len(prefixes) == len(set(prefixes)) == 100
    intervals = sorted((p, gl.prefix_end(p)) for p in prefixes)
    for key in keys:
        assert sum(lo <= key < hi for lo, hi in intervals) == 1
    # no interval touches or overlaps the next: 100 separate intervals
    assert all(hi < nlo for (_, hi), (nlo, _) in zip(intervals, intervals[1:]))
    # every key a workload sends lies in one of them
    for wl in gl.workloads().values():
        if wl.name in ba.DEFAULT_WORKLOADS:
            key = wl.setup[0][0] if wl.setup else gl.PUT_KEY
            assert any(lo <= key < hi for lo, hi in intervals)
    assert ba.permission_prefixes(2, keys) == sorted(keys)
    with pytest.raises(ValueError):
        ba.permission_prefixes(1, keys)


def test_variants_and_comparisons():
    vs = ba.variants(["mvcckv", "etcd"], ["auth", "tls", "control"])
    assert [v.name for v in vs] == ["mvcckv", "mvcckv+auth", "mvcckv+tls", "mvcckv#2",
                                    "etcd", "etcd+auth", "etcd+tls", "etcd#2"]
    comps = ba.comparisons(vs)
    assert [(c[1], c[2]) for c in comps] == [
        ("mvcckv+auth", "mvcckv"), ("mvcckv+tls", "mvcckv"), ("mvcckv#2", "mvcckv"),
        ("etcd+auth", "etcd"), ("etcd+tls", "etcd"), ("etcd#2", "etcd")]
    assert comps[0][0] == "mvcckv auth on / off" and comps[1][0] == "mvcckv TLS / plaintext"
    assert [v.name for v in ba.variants(["mvcckv"], ["tls"])] == ["mvcckv", "mvcckv+tls"]


def test_server_argv():
    tls = ("/c/cert.pem", "/c/key.pem")
    kw = dict(mvcckv=["py", "-m", "mvcckv"], etcd="/usr/bin/etcd", bcrypt_cost=4, tls_files=tls)
    plain = ba.server_argv(ba.Variant("mvcckv"), 5000, "/d", **kw)
    auth = ba.server_argv(ba.Variant("mvcckv", auth=True), 5000, "/d", **kw)
    secure = ba.server_argv(ba.Variant("mvcckv", tls=True), 5000, "/d", **kw)
    assert plain[:4] == ["py", "-m", "mvcckv", "serve"]
    assert plain == auth   # auth is switched on over gRPC, after the start
    assert plain[plain.index("--listen-client-urls") + 1] == "http://127.0.0.1:5000"
    assert secure[secure.index("--listen-client-urls") + 1] == "https://127.0.0.1:5000"
    assert secure[secure.index("--cert-file") + 1] == tls[0] and "--cert-file" not in plain
    assert plain[plain.index("--bcrypt-cost") + 1] == "4"
    etcd = ba.server_argv(ba.Variant("etcd", tls=True), 5000, "/d", **kw)
    assert etcd[0] == "/usr/bin/etcd"
    assert etcd[etcd.index("--advertise-client-urls") + 1] == "https://127.0.0.1:5000"
    assert etcd[etcd.index("--data-dir") + 1] == "/d" and etcd[etcd.index("--key-file") + 1] == tls[1]
    with pytest.raises(ValueError):
        ba.server_argv(ba.Variant("mvcckv", tls=True), 1, "/d", **{**kw, "tls_files": None})


def test_self_signed_cert():
    from cryptography import x509

    cert_pem, key_pem = ba.self_signed_cert("127.0.0.1")
    cert = x509.load_pem_x509_certificate(cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert b"PRIVATE KEY" in key_pem


# ---------------------------------------------------------------------------
# bench_auth: tables


def _row(workload: str, level: int, rps: float, cpu: float | None, notes=()) -> gl.Row:
    return gl.Row(server="x", workload=workload, concurrency=level, shape="1x1", rps=rps,
                  p50_ms=0.25, p99_ms=1.5, cpu_per_kop=cpu, server_busy_pct=97.0, noise_pct=3.0,
                  failed=0, gen_cpu_pct=11.0, runs=[], notes=list(notes))


def test_tables():
    results = {
        "mvcckv": [_row("get-serializable", 1, 4000.0, 0.250), _row("put", 1, 1000.0, 0.500)],
        "mvcckv+auth": [_row("get-serializable", 1, 3600.0, 0.260),
                        _row("put", 1, 950.0, None, ["some HTTP 200s were probably gRPC errors"])],
    }
    comps = ba.comparisons(ba.variants(["mvcckv"], ["auth"]))
    rows = ba.ratio_rows(results, comps)
    assert [(r[1], r[2]) for r in rows] == [("get-serializable", 1), ("put", 1)]
    assert math.isclose(rows[0][3], 0.9) and math.isclose(rows[0][4], 0.25 / 0.26)
    assert math.isclose(rows[1][3], 0.95) and rows[1][4] is None

    ratios = ba.format_ratios(results, comps).splitlines()
    assert ratios[0] == "| comparison | workload | conc | QPS ratio | req per CPU-s ratio |"
    assert ratios[2] == "| mvcckv auth on / off | get-serializable | 1 | 0.90 | 0.96 |"
    assert ratios[3] == "| mvcckv auth on / off | put | 1 | 0.95 | - |"

    figures = ba.format_figures(results, ["mvcckv", "mvcckv+auth"]).splitlines()
    assert figures[0].startswith("| server | workload | conc | c x m | QPS | p50 ms | p99 ms |")
    assert len({line.count("|") for line in figures[:6]}) == 1
    # grouped by workload and level, baseline first
    assert [line.split(" | ")[0] for line in figures[2:6]] == ["| mvcckv", "| mvcckv+auth"] * 2
    assert "| 4,000 |" in figures[2] and "| 0.250 |" in figures[2]
    assert "| 950 (!) |" in figures[5] and "| - |" in figures[5]
    assert figures[-1] == "- mvcckv+auth put @ 1: some HTTP 200s were probably gRPC errors"


def test_command_line():
    cmd = ba.command_line(["--runs", "3", "--compare", "auth,tls"], python="/repo/.venv/bin/python",
                          script="/repo/bench/bench_auth.py", cwd="/repo")
    assert cmd == ".venv/bin/python bench/bench_auth.py --runs 3 --compare auth,tls"
    cmd = ba.command_line(["--tmp-dir", "/tmp/a b"], python="/usr/bin/python3",
                          script="/repo/bench/bench_auth.py", cwd="/elsewhere")
    assert shlex.split(cmd) == ["/usr/bin/python3", "/repo/bench/bench_auth.py", "--tmp-dir", "/tmp/a b"]

"""``mvcckv check`` against real servers: clean where it must be, and
finding every deliberately broken server (tests/mutants.py).

Each run is small (a few examples, a few seconds of load) to keep the file
at about a minute and a half; ``MVCCKV_CHECK_EXAMPLES`` raises the number
of sequential examples for a longer local run.  The figures of each run
(examples and steps until a divergence was found, the reproduction's
length, operations checked) are printed; ``pytest -s`` shows them.
"""

from __future__ import annotations

import json
import os

import grpc
import pytest
import trustme

from harness import EtcdProcess, MvcckvProcess
from mutants import MUTANTS, Mutant
from mvcckv.cli import main

EXAMPLES = int(os.environ.get("MVCCKV_CHECK_EXAMPLES", "15"))
SEQUENTIAL = ("reused_revision", "half_txn", "limit_ignored", "stale_reads")


def check(capsys, endpoint: str, *args: str) -> tuple[int, dict]:
    code = main(["check", "--endpoints", endpoint, "--json", "--seed", "7", *args])
    out = capsys.readouterr().out
    report = json.loads(out)
    print(json.dumps({k: v for k, v in report.items()}, indent=1)[:3000])
    return code, report


def assert_clean(code: int, report: dict) -> None:
    assert (code, report["ok"]) == (0, True), json.dumps(report, indent=1)
    seq, con = report["sequential"], report["concurrent"]
    assert seq["examples"] >= EXAMPLES and seq["steps"] > EXAMPLES and seq["histories_checked"] >= EXAMPLES
    assert con["linearizability"] == "ok" and con["operations"] > 100 and con["watch_events"] > 50
    assert con["lease_checks"] == 4


def test_clean_against_etcd_3_4_with_its_profile(etcd_binary, capsys):
    with EtcdProcess(binary=etcd_binary) as etcd:
        code, report = check(capsys, etcd.endpoint, "--etcd-version", "3.4", "--examples", str(EXAMPLES),
                             "--duration", "3")
    assert report["server_version"].startswith("3.4.")
    assert report["profile"] == "3.4"
    assert_clean(code, report)


def test_clean_against_mvcckv_serve(engine_server_module, capsys):
    code, report = check(capsys, engine_server_module.endpoint, "--examples", str(EXAMPLES), "--duration", "3")
    assert report["profile"] == "3.6"
    assert_clean(code, report)


@pytest.fixture(scope="module")
def upstream(mvcckv_server_module):
    return mvcckv_server_module.endpoint


@pytest.mark.parametrize("kind", SEQUENTIAL)
def test_sequential_check_finds_the_mutant_with_a_short_reproduction(upstream, kind, capsys):
    with Mutant(upstream, kind) as mutant:
        code, report = check(capsys, mutant.endpoint, "--examples", "200", "--steps", "10", "--clients", "0",
                             "--shrink-seconds", "6")
    seq = report["sequential"]
    assert code == 1 and not report["ok"], json.dumps(report, indent=1)
    divergence = seq["divergence"]
    assert 1 <= divergence["steps"] <= 5, divergence
    assert divergence["etcdctl"].startswith("etcdctl --endpoints=") or divergence["etcdctl"].startswith("#")
    assert "kv." in divergence["python"] or "lease." in divergence["python"]
    print(f"{kind}: found after {seq['found_after']['examples']} examples ({seq['found_after']['steps']} steps), "
          f"reproduction {divergence['steps']} steps")


def test_the_reproduction_runs_and_shows_the_divergence(upstream, capsys):
    """The printed Python program, run against the same mutant, prints the
    answer the model would not give (limit ignored: more keys than asked)."""
    with Mutant(upstream, "limit_ignored") as mutant:
        code, report = check(capsys, mutant.endpoint, "--examples", "200", "--steps", "10", "--clients", "0",
                             "--shrink-seconds", "6")
        program = report["sequential"]["divergence"]["python"]
        exec(compile(program, "reproduction", "exec"), {"__name__": "reproduction"})
    printed = capsys.readouterr().out
    assert code == 1
    assert printed.count("kvs {") >= 2, printed


def test_concurrent_checks_find_a_watch_that_skips_events(upstream, capsys):
    with Mutant(upstream, "watch_skips") as mutant:
        code, report = check(capsys, mutant.endpoint, "--examples", "0", "--duration", "3", "--no-leases")
    con = report["concurrent"]
    assert code == 1, json.dumps(report, indent=1)
    assert con["linearizability"] == "ok"  # the KV answers are right; only the watch is not
    assert any(p.startswith("reliable:") for p in con["watch_problems"]), con["watch_problems"]
    print(f"watch_skips: found in {con['operations']} operations, {con['watch_events']} events")


def test_concurrent_checks_find_stale_reads(upstream, capsys):
    with Mutant(upstream, "stale_reads") as mutant:
        code, report = check(capsys, mutant.endpoint, "--examples", "0", "--duration", "3", "--no-leases")
    con = report["concurrent"]
    assert code == 1, json.dumps(report, indent=1)
    assert con["linearizability"] == "illegal" or con["revision_problems"], con
    print(f"stale_reads: linearizability {con['linearizability']} after {con['operations']} operations")


def test_every_mutant_is_covered():
    assert set(MUTANTS) == set(SEQUENTIAL) | {"watch_skips"}
    with pytest.raises(ValueError, match="unknown mutant 'nope'"):
        Mutant("127.0.0.1:1", "nope")


def test_unreachable_endpoint_is_an_error_not_a_pass(capsys):
    code = main(["check", "--endpoints", "127.0.0.1:1", "--command-timeout", "0.5", "--no-progress"])
    assert code == 2
    assert "cannot use 127.0.0.1:1" in capsys.readouterr().err


def test_bad_flags_are_refused(capsys):
    assert main(["check", "--endpoints", "", "--no-progress"]) == 2
    assert "at least one endpoint" in capsys.readouterr().err
    assert main(["check", "--etcd-version", "2.3", "--no-progress"]) == 2
    assert "--etcd-version: etcd 2.3 is older than 3.4, the oldest profile" in capsys.readouterr().err
    assert main(["check", "--etcd-version", "latest", "--no-progress"]) == 2
    assert "not an etcd version: 'latest'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["check", "--examples", "many"])


def test_auth_flags_as_etcdctl(mvcckv_server, capsys):
    mvcckv_server.etcdctl("user", "add", "root:secret", json=False)
    mvcckv_server.etcdctl("auth", "enable", json=False)
    code, report = check(capsys, mvcckv_server.endpoint, "--user", "root:secret", "--examples", "3",
                         "--duration", "1", "--no-leases")
    assert (code, report["ok"]) == (0, True), report
    assert report["sequential"]["examples"] >= 3 and report["concurrent"]["operations"] > 0
    # etcdctl's --password overrides a password in --user.
    code = main(["check", "--endpoints", mvcckv_server.endpoint, "--user", "root:wrong", "--password", "secret",
                 "--examples", "1", "--clients", "0", "--no-progress"])
    assert code == 0
    capsys.readouterr()
    code = main(["check", "--endpoints", mvcckv_server.endpoint, "--user", "root:wrong", "--no-progress"])
    assert code == 2
    assert "AuthFailedError: etcdserver: authentication failed, invalid user ID or password" in capsys.readouterr().err


def test_tls_flags_as_etcdctl(tmp_path, capsys):
    """Client certificate auth: --cacert, --cert and --key, as etcdctl's."""
    ca = trustme.CA()
    server, client = ca.issue_cert("127.0.0.1"), ca.issue_cert("client.example", common_name="root")
    paths = {name: tmp_path / f"{name}.pem" for name in ("ca", "server", "server-key", "client", "client-key")}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    server.cert_chain_pems[0].write_to_path(str(paths["server"]))
    server.private_key_pem.write_to_path(str(paths["server-key"]))
    client.cert_chain_pems[0].write_to_path(str(paths["client"]))
    client.private_key_pem.write_to_path(str(paths["client-key"]))
    credentials = grpc.ssl_channel_credentials(paths["ca"].read_bytes(), paths["client-key"].read_bytes(),
                                               paths["client"].read_bytes())
    args = ["--cert-file", str(paths["server"]), "--key-file", str(paths["server-key"]),
            "--client-cert-auth", "--trusted-ca-file", str(paths["ca"])]
    with MvcckvProcess(tmp_path / "data", log_path=tmp_path / "mvcckv.log", channel_credentials=credentials,
                       extra_args=args) as srv:
        code, report = check(capsys, srv.client_url, "--cacert", str(paths["ca"]), "--cert", str(paths["client"]),
                             "--key", str(paths["client-key"]), "--examples", "3", "--duration", "1", "--no-leases")
        assert (code, report["ok"]) == (0, True), report
        # Without the client certificate the server refuses the handshake.
        code = main(["check", "--endpoints", srv.client_url, "--cacert", str(paths["ca"]),
                     "--command-timeout", "2", "--no-progress"])
        assert code == 2
        assert "cannot use" in capsys.readouterr().err

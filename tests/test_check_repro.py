"""Reproductions as printed by ``mvcckv check``: the etcdctl script runs
in bash against a real server and does what the steps did; the Python
program sends the same requests."""

from __future__ import annotations

import os
import subprocess

from harness import find_binary
from mvcckv.pb import rpc_pb2 as pb
from mvcckv.testing import repro
from mvcckv.testing.machine import Failure, Step

P = b"r/"


def failure(*steps: Step) -> Failure:
    return Failure(list(steps), "range: the answers differ", 1, P, (10, 11, 12))


STEPS = (
    Step("put", pb.PutRequest(key=P + b"a", value=b"1")),
    Step("put", pb.PutRequest(key=P + b"\xff", value=b"x y", prev_kv=True)),
    Step("put", pb.PutRequest(key=P + b"a", ignore_value=True)),
    Step("range", pb.RangeRequest(key=P, range_end=b"r0", limit=1, sort_order=pb.RangeRequest.DESCEND,
                                  sort_target=pb.RangeRequest.MOD, keys_only=True)),
    Step("txn", pb.TxnRequest(
        compare=[pb.Compare(key=P + b"a", target=pb.Compare.VALUE, result=pb.Compare.EQUAL, value=b"1")],
        success=[pb.RequestOp(request_put=pb.PutRequest(key=P + b"b", value=b"2"))],
        failure=[pb.RequestOp(request_range=pb.RangeRequest(key=P + b"a"))])),
    Step("delete_range", pb.DeleteRangeRequest(key=P + b"a", range_end=b"r0", prev_kv=True)),
    Step("compact", pb.CompactionRequest(revision=3, physical=True)),
    Step("hash_kv", pb.HashKVRequest(revision=0)),
    Step("lease_revoke", pb.LeaseRevokeRequest(ID=0x1234)),
)


def test_etcdctl_lines():
    lines = [repro.etcdctl_line(s) for s in STEPS]
    assert lines[:4] == [
        "put r/a 1",
        "put $'\\x72\\x2f\\xff' 'x y' --prev-kv",
        "put r/a --ignore-value",
        "get r/ --prefix --limit=1 --order=DESCEND --sort-by=MODIFY --keys-only",
    ]
    # etcdctl 3.5 and later only: --count-only and the revision filters.
    r = pb.RangeRequest(key=b"a", range_end=b"c", count_only=True, min_mod_revision=2, max_create_revision=9)
    assert repro.etcdctl_line(Step("range", r)) == "get a c --count-only --min-mod-rev=2 --max-create-rev=9"
    assert lines[4] == "txn <<'EOF'\nval(\"r/a\") = \"1\"\n\nput r/b 2\n\nget r/a\n\nEOF"
    assert lines[5:] == ["del r/a r0 --prev-kv", "compaction 3 --physical", "endpoint hashkv --rev=0",
                         "lease revoke 1234"]
    nested = pb.TxnRequest(success=[pb.RequestOp(request_txn=pb.TxnRequest())])
    assert repro.etcdctl_line(Step("txn", nested)).startswith("# txn: not expressible")
    assert repro.etcdctl_line(Step("lease_grant", pb.LeaseGrantRequest(ID=16, TTL=5))).startswith(
        "# lease grant with ID 10")


def test_the_etcdctl_script_runs_and_does_what_the_steps_did(mvcckv_server):
    # The lease revoke of a lease that does not exist fails, as it should:
    # leave it out of the script that must succeed.
    script = repro.etcdctl_script(failure(*STEPS[:-1]), mvcckv_server.endpoint)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL_")}
    env["ETCDCTL_API"] = "3"
    env["PATH"] = os.path.dirname(find_binary("etcdctl")) + os.pathsep + env.get("PATH", "")
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, env=env, timeout=60)
    out = done.stdout.decode(errors="replace")
    assert done.returncode == 0, done.stderr.decode(errors="replace") + out
    assert out.count("OK") == 4 and "compacted revision 3" in out
    # put, put, put, txn (success), delete of r/a, r/b and r/\xff: the state is empty at revision 6.
    kvs = mvcckv_server.etcdctl("get", "r/", "--prefix")
    assert kvs.get("kvs") is None and kvs["header"]["revision"] == 6


def test_the_python_program_runs(mvcckv_server, capsys):
    program = repro.python_program(failure(*STEPS), mvcckv_server.endpoint)
    exec(compile(program, "reproduction", "exec"), {"__name__": "reproduction"})
    out = capsys.readouterr().out
    assert out.count("header {") >= 8
    assert "StatusCode.NOT_FOUND etcdserver: requested lease not found" in out

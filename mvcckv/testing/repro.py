"""A divergence's steps, printed to be run again: as ``etcdctl`` commands
(where etcdctl can say it) and as a Python program with mvcckv's protobuf
stubs (always).

Revisions are printed as they were sent: a reproduction meant for another
server of the same history starts from the revision the run started at
(said in the header); one meant for a fresh server works as printed when
the run started at revision 1.
"""

from __future__ import annotations

import shlex

from google.protobuf import text_format

from mvcckv.pb import rpc_pb2 as pb
from mvcckv.testing.machine import Failure, Step
from mvcckv.testing.model import TO_THE_END, prefix_end

_SERVICES = {
    "range": ("kv", "Range"), "put": ("kv", "Put"), "delete_range": ("kv", "DeleteRange"),
    "txn": ("kv", "Txn"), "compact": ("kv", "Compact"), "lease_grant": ("lease", "LeaseGrant"),
    "lease_revoke": ("lease", "LeaseRevoke"), "hash_kv": ("maintenance", "HashKV"),
}


def _arg(b: bytes) -> str:
    """A shell word for bytes: plain when printable, else bash's $'…'."""
    try:
        text = b.decode("ascii")
        if text.isprintable() and text:
            return shlex.quote(text)
    except UnicodeDecodeError:
        pass
    return "$'" + "".join(f"\\x{c:02x}" for c in b) + "'"


def _range_args(key: bytes, end: bytes) -> list[str]:
    if not end:
        return [_arg(key)]
    if end == TO_THE_END:
        return [_arg(key), "--from-key"]
    if end == prefix_end(key):
        return [_arg(key), "--prefix"]
    return [_arg(key), _arg(end)]


_ORDERS = {pb.RangeRequest.ASCEND: "ASCEND", pb.RangeRequest.DESCEND: "DESCEND"}
_TARGETS = {pb.RangeRequest.KEY: "KEY", pb.RangeRequest.VERSION: "VERSION", pb.RangeRequest.CREATE: "CREATE",
            pb.RangeRequest.MOD: "MODIFY", pb.RangeRequest.VALUE: "VALUE"}


def _get(r: pb.RangeRequest) -> str:
    words = ["get", *_range_args(r.key, r.range_end)]
    if r.revision:
        words.append(f"--rev={r.revision}")
    if r.limit:
        words.append(f"--limit={r.limit}")
    if r.sort_order:
        words.append(f"--order={_ORDERS[r.sort_order]}")
    if r.sort_target:
        words.append(f"--sort-by={_TARGETS[r.sort_target]}")
    for flag, on in (("--keys-only", r.keys_only), ("--count-only", r.count_only)):
        if on:
            words.append(flag)
    for name in ("min_mod_revision", "max_mod_revision", "min_create_revision", "max_create_revision"):
        if getattr(r, name):
            words.append(f"--{name.replace('_revision', '-rev').replace('_', '-')}={getattr(r, name)}")
    return " ".join(words)


def _put(p: pb.PutRequest) -> str:
    words = ["put", _arg(p.key)]
    if not p.ignore_value:
        words.append(_arg(p.value) if p.value else "''")
    if p.lease:
        words.append(f"--lease={p.lease:x}")
    for flag, on in (("--prev-kv", p.prev_kv), ("--ignore-value", p.ignore_value), ("--ignore-lease", p.ignore_lease)):
        if on:
            words.append(flag)
    return " ".join(words)


def _del(d: pb.DeleteRangeRequest) -> str:
    return " ".join(["del", *_range_args(d.key, d.range_end), *(["--prev-kv"] if d.prev_kv else [])])


_CMP_TARGETS = {pb.Compare.VERSION: "ver", pb.Compare.CREATE: "c", pb.Compare.MOD: "m",
                pb.Compare.VALUE: "val", pb.Compare.LEASE: "lease"}
_CMP_RESULTS = {pb.Compare.EQUAL: "=", pb.Compare.NOT_EQUAL: "!=", pb.Compare.GREATER: ">", pb.Compare.LESS: "<"}
_OPERANDS = {pb.Compare.VERSION: "version", pb.Compare.CREATE: "create_revision", pb.Compare.MOD: "mod_revision",
             pb.Compare.VALUE: "value", pb.Compare.LEASE: "lease"}


def _txn(t: pb.TxnRequest) -> str | None:
    """``etcdctl txn`` with its stdin, or None when etcdctl cannot say it
    (nested txns, compares over ranges, operands in another union member)."""
    lines = []
    for c in t.compare:
        if c.range_end or c.WhichOneof("target_union") != _OPERANDS[c.target]:
            return None
        operand = getattr(c, _OPERANDS[c.target])
        if c.target == pb.Compare.VALUE:
            try:
                operand = operand.decode("ascii")
            except UnicodeDecodeError:
                return None
        elif c.target == pb.Compare.LEASE:
            operand = f"{operand:x}"
        lines.append(f'{_CMP_TARGETS[c.target]}("{c.key.decode("latin-1")}") {_CMP_RESULTS[c.result]} "{operand}"')
    for branch in (t.success, t.failure):
        lines.append("")
        for op in branch:
            kind = op.WhichOneof("request")
            if kind == "request_txn":
                return None
            lines.append({"request_range": lambda: _get(op.request_range),
                          "request_put": lambda: _put(op.request_put),
                          "request_delete_range": lambda: _del(op.request_delete_range)}[kind]())
    body = "\n".join(lines)
    if any(not ch.isprintable() for ch in body.replace("\n", "")):
        return None
    return "txn <<'EOF'\n" + body + "\n\nEOF"


def etcdctl_line(step: Step) -> str:
    """One etcdctl command (without ``etcdctl --endpoints=…``), or a comment."""
    r = step.request
    if step.kind == "range":
        return _get(r)
    if step.kind == "put":
        return _put(r)
    if step.kind == "delete_range":
        return _del(r)
    if step.kind == "txn":
        return _txn(r) or "# txn: not expressible with etcdctl, see the Python program"
    if step.kind == "compact":
        return f"compaction {r.revision}" + (" --physical" if r.physical else "")
    if step.kind == "lease_grant":
        return f"# lease grant with ID {r.ID:x} (etcdctl cannot choose the ID): see the Python program"
    if step.kind == "lease_revoke":
        return f"lease revoke {r.ID:x}"
    if step.kind == "hash_kv":
        return f"endpoint hashkv --rev={r.revision}"
    return f"# {step.kind}"


def etcdctl_script(failure: Failure, endpoint: str) -> str:
    """One etcdctl command per step (``--count-only`` and the revision
    filters of ``get`` need etcdctl 3.5 or later)."""
    head = f"etcdctl --endpoints={endpoint}"
    return "\n".join(f"{head} {etcdctl_line(s)}" if not etcdctl_line(s).startswith("#") else etcdctl_line(s)
                     for s in failure.steps)


def python_program(failure: Failure, endpoint: str) -> str:
    """A program sending the same requests and printing each answer."""
    lines = [
        "import grpc",
        "from google.protobuf import text_format",
        "from mvcckv.pb import rpc_pb2 as pb, rpc_pb2_grpc",
        "",
        f"channel = grpc.insecure_channel({endpoint!r})",
        "kv = rpc_pb2_grpc.KVStub(channel)",
        "lease = rpc_pb2_grpc.LeaseStub(channel)",
        "maintenance = rpc_pb2_grpc.MaintenanceStub(channel)",
        "",
        "def send(method, request):",
        "    try:",
        "        print(method(request))",
        "    except grpc.RpcError as err:",
        "        print(err.code(), err.details())",
        "",
    ]
    for step in failure.steps:
        if step.kind not in _SERVICES:
            lines.append(f"# {step.kind}")
            continue
        stub, method = _SERVICES[step.kind]
        text = text_format.MessageToString(step.request, as_one_line=True)
        lines.append(f"send({stub}.{method}, text_format.Parse({text!r}, pb.{type(step.request).__name__}()))")
    return "\n".join(lines)

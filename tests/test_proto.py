"""Wire-level facts about mvcckv's copies of etcd's v3 protos.

etcd clients only see field numbers, field names, package-qualified message
names and gRPC method paths, so those are pinned here case by case, with the
values of etcd 3.6 (see docs ETCD_SEMANTICS.md section 1).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pool

from mvcckv.pb import auth_pb2, kv_pb2, lease_pb2, rpc_pb2, rpc_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
POOL = descriptor_pool.Default()


def _message(full_name):
    return POOL.FindMessageTypeByName(full_name)


def test_generated_code_is_current():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_proto.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr


def test_importable_from_any_directory(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from mvcckv.pb import rpc_pb2, rpc_pb2_grpc, kv_pb2, auth_pb2, lease_pb2",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr


# (message, field, number).  Odd casing and odd numbers are the point.
WIRE_FIELDS = [
    ("mvccpb.KeyValue", "key", 1),
    ("mvccpb.KeyValue", "create_revision", 2),
    ("mvccpb.KeyValue", "mod_revision", 3),
    ("mvccpb.KeyValue", "version", 4),
    ("mvccpb.KeyValue", "value", 5),
    ("mvccpb.KeyValue", "lease", 6),
    ("mvccpb.Event", "type", 1),
    ("mvccpb.Event", "kv", 2),
    ("mvccpb.Event", "prev_kv", 3),
    ("authpb.UserAddOptions", "no_password", 1),
    ("authpb.User", "password", 2),
    ("authpb.User", "options", 4),
    ("authpb.Permission", "permType", 1),
    ("authpb.Permission", "range_end", 3),
    ("authpb.Role", "keyPermission", 2),
    ("leasepb.Lease", "ID", 1),
    ("leasepb.Lease", "TTL", 2),
    ("leasepb.Lease", "RemainingTTL", 3),
    ("leasepb.LeaseInternalRequest", "LeaseTimeToLiveRequest", 1),
    ("leasepb.LeaseInternalResponse", "LeaseTimeToLiveResponse", 1),
    ("etcdserverpb.ResponseHeader", "cluster_id", 1),
    ("etcdserverpb.ResponseHeader", "member_id", 2),
    ("etcdserverpb.ResponseHeader", "revision", 3),
    ("etcdserverpb.ResponseHeader", "raft_term", 4),
    ("etcdserverpb.RangeRequest", "range_end", 2),
    ("etcdserverpb.RangeRequest", "sort_target", 6),
    ("etcdserverpb.RangeRequest", "count_only", 9),
    ("etcdserverpb.RangeRequest", "min_mod_revision", 10),
    ("etcdserverpb.RangeRequest", "max_create_revision", 13),
    ("etcdserverpb.RangeResponse", "kvs", 2),
    ("etcdserverpb.RangeResponse", "count", 4),
    ("etcdserverpb.PutRequest", "prev_kv", 4),
    ("etcdserverpb.PutRequest", "ignore_value", 5),
    ("etcdserverpb.PutRequest", "ignore_lease", 6),
    ("etcdserverpb.DeleteRangeResponse", "prev_kvs", 3),
    ("etcdserverpb.RequestOp", "request_delete_range", 3),
    ("etcdserverpb.RequestOp", "request_txn", 4),
    ("etcdserverpb.ResponseOp", "response_txn", 4),
    ("etcdserverpb.Compare", "result", 1),
    ("etcdserverpb.Compare", "target", 2),
    ("etcdserverpb.Compare", "key", 3),
    ("etcdserverpb.Compare", "value", 7),
    ("etcdserverpb.Compare", "lease", 8),
    ("etcdserverpb.Compare", "range_end", 64),
    ("etcdserverpb.TxnRequest", "failure", 3),
    ("etcdserverpb.TxnResponse", "responses", 3),
    ("etcdserverpb.CompactionRequest", "physical", 2),
    ("etcdserverpb.HashKVResponse", "compact_revision", 3),
    ("etcdserverpb.HashKVResponse", "hash_revision", 4),
    ("etcdserverpb.SnapshotResponse", "remaining_bytes", 2),
    ("etcdserverpb.SnapshotResponse", "blob", 3),
    ("etcdserverpb.SnapshotResponse", "version", 4),
    ("etcdserverpb.WatchRequest", "progress_request", 3),
    ("etcdserverpb.WatchCreateRequest", "start_revision", 3),
    ("etcdserverpb.WatchCreateRequest", "filters", 5),
    ("etcdserverpb.WatchCreateRequest", "watch_id", 7),
    ("etcdserverpb.WatchCreateRequest", "fragment", 8),
    ("etcdserverpb.WatchCancelRequest", "watch_id", 1),
    ("etcdserverpb.WatchResponse", "compact_revision", 5),
    ("etcdserverpb.WatchResponse", "cancel_reason", 6),
    ("etcdserverpb.WatchResponse", "fragment", 7),
    ("etcdserverpb.WatchResponse", "events", 11),
    ("etcdserverpb.LeaseGrantRequest", "TTL", 1),
    ("etcdserverpb.LeaseGrantRequest", "ID", 2),
    ("etcdserverpb.LeaseGrantResponse", "ID", 2),
    ("etcdserverpb.LeaseGrantResponse", "error", 4),
    ("etcdserverpb.LeaseCheckpoint", "remaining_TTL", 2),
    ("etcdserverpb.LeaseCheckpointRequest", "checkpoints", 1),
    ("etcdserverpb.LeaseKeepAliveResponse", "TTL", 3),
    ("etcdserverpb.LeaseTimeToLiveResponse", "TTL", 3),
    ("etcdserverpb.LeaseTimeToLiveResponse", "grantedTTL", 4),
    ("etcdserverpb.LeaseTimeToLiveResponse", "keys", 5),
    ("etcdserverpb.LeaseLeasesResponse", "leases", 2),
    ("etcdserverpb.Member", "peerURLs", 3),
    ("etcdserverpb.Member", "clientURLs", 4),
    ("etcdserverpb.Member", "isLearner", 5),
    ("etcdserverpb.MemberAddRequest", "isLearner", 2),
    ("etcdserverpb.MemberAddResponse", "members", 3),
    ("etcdserverpb.MemberListRequest", "linearizable", 1),
    ("etcdserverpb.MoveLeaderRequest", "targetID", 1),
    ("etcdserverpb.AlarmRequest", "memberID", 2),
    ("etcdserverpb.AlarmRequest", "alarm", 3),
    ("etcdserverpb.AlarmMember", "alarm", 2),
    ("etcdserverpb.DowngradeRequest", "version", 2),
    ("etcdserverpb.DowngradeVersionTestRequest", "ver", 1),
    ("etcdserverpb.StatusResponse", "dbSize", 3),
    ("etcdserverpb.StatusResponse", "raftIndex", 5),
    ("etcdserverpb.StatusResponse", "raftAppliedIndex", 7),
    ("etcdserverpb.StatusResponse", "errors", 8),
    ("etcdserverpb.StatusResponse", "dbSizeInUse", 9),
    ("etcdserverpb.StatusResponse", "isLearner", 10),
    ("etcdserverpb.StatusResponse", "storageVersion", 11),
    ("etcdserverpb.StatusResponse", "dbSizeQuota", 12),
    ("etcdserverpb.StatusResponse", "downgradeInfo", 13),
    ("etcdserverpb.DowngradeInfo", "targetVersion", 2),
    ("etcdserverpb.AuthUserAddRequest", "options", 3),
    ("etcdserverpb.AuthUserAddRequest", "hashedPassword", 4),
    ("etcdserverpb.AuthUserChangePasswordRequest", "hashedPassword", 3),
    ("etcdserverpb.AuthUserGrantRoleRequest", "user", 1),
    ("etcdserverpb.AuthUserRevokeRoleRequest", "name", 1),
    ("etcdserverpb.AuthRoleGrantPermissionRequest", "perm", 2),
    ("etcdserverpb.AuthRoleRevokePermissionRequest", "range_end", 3),
    ("etcdserverpb.AuthStatusResponse", "authRevision", 3),
    ("etcdserverpb.AuthenticateResponse", "token", 2),
    ("etcdserverpb.AuthRoleGetResponse", "perm", 2),
    ("etcdserverpb.AuthUserListResponse", "users", 2),
]


@pytest.mark.parametrize(("message", "field", "number"), WIRE_FIELDS)
def test_field_number(message, field, number):
    fields = _message(message).fields_by_name
    assert field in fields, f"{message} has no field {field!r}"
    assert fields[field].number == number


# (message, oneof, members)
ONEOFS = [
    ("etcdserverpb.RequestOp", "request",
     ["request_range", "request_put", "request_delete_range", "request_txn"]),
    ("etcdserverpb.ResponseOp", "response",
     ["response_range", "response_put", "response_delete_range", "response_txn"]),
    ("etcdserverpb.Compare", "target_union",
     ["version", "create_revision", "mod_revision", "value", "lease"]),
    ("etcdserverpb.WatchRequest", "request_union",
     ["create_request", "cancel_request", "progress_request"]),
]


@pytest.mark.parametrize(("message", "oneof", "members"), ONEOFS)
def test_oneof(message, oneof, members):
    desc = _message(message)
    assert [o.name for o in desc.oneofs] == [oneof]
    assert [f.name for f in desc.oneofs_by_name[oneof].fields] == members


# (enum, {value name: number})
ENUMS = [
    ("mvccpb.Event.EventType", {"PUT": 0, "DELETE": 1}),
    ("authpb.Permission.Type", {"READ": 0, "WRITE": 1, "READWRITE": 2}),
    ("etcdserverpb.RangeRequest.SortOrder", {"NONE": 0, "ASCEND": 1, "DESCEND": 2}),
    ("etcdserverpb.RangeRequest.SortTarget",
     {"KEY": 0, "VERSION": 1, "CREATE": 2, "MOD": 3, "VALUE": 4}),
    ("etcdserverpb.Compare.CompareResult",
     {"EQUAL": 0, "GREATER": 1, "LESS": 2, "NOT_EQUAL": 3}),
    ("etcdserverpb.Compare.CompareTarget",
     {"VERSION": 0, "CREATE": 1, "MOD": 2, "VALUE": 3, "LEASE": 4}),
    ("etcdserverpb.WatchCreateRequest.FilterType", {"NOPUT": 0, "NODELETE": 1}),
    ("etcdserverpb.AlarmType", {"NONE": 0, "NOSPACE": 1, "CORRUPT": 2}),
    ("etcdserverpb.AlarmRequest.AlarmAction", {"GET": 0, "ACTIVATE": 1, "DEACTIVATE": 2}),
    ("etcdserverpb.DowngradeRequest.DowngradeAction",
     {"VALIDATE": 0, "ENABLE": 1, "CANCEL": 2}),
]


@pytest.mark.parametrize(("enum", "values"), ENUMS)
def test_enum(enum, values):
    desc = POOL.FindEnumTypeByName(enum)
    assert {v.name: v.number for v in desc.values} == values


UNARY, SERVER_STREAM, BIDI_STREAM = "unary", "server-stream", "bidi-stream"

# (service, method, request, response, kind): etcd 3.6's full set, no more.
METHODS = [
    ("KV", "Range", "RangeRequest", "RangeResponse", UNARY),
    ("KV", "Put", "PutRequest", "PutResponse", UNARY),
    ("KV", "DeleteRange", "DeleteRangeRequest", "DeleteRangeResponse", UNARY),
    ("KV", "Txn", "TxnRequest", "TxnResponse", UNARY),
    ("KV", "Compact", "CompactionRequest", "CompactionResponse", UNARY),
    ("Watch", "Watch", "WatchRequest", "WatchResponse", BIDI_STREAM),
    ("Lease", "LeaseGrant", "LeaseGrantRequest", "LeaseGrantResponse", UNARY),
    ("Lease", "LeaseRevoke", "LeaseRevokeRequest", "LeaseRevokeResponse", UNARY),
    ("Lease", "LeaseKeepAlive", "LeaseKeepAliveRequest", "LeaseKeepAliveResponse", BIDI_STREAM),
    ("Lease", "LeaseTimeToLive", "LeaseTimeToLiveRequest", "LeaseTimeToLiveResponse", UNARY),
    ("Lease", "LeaseLeases", "LeaseLeasesRequest", "LeaseLeasesResponse", UNARY),
    ("Cluster", "MemberAdd", "MemberAddRequest", "MemberAddResponse", UNARY),
    ("Cluster", "MemberRemove", "MemberRemoveRequest", "MemberRemoveResponse", UNARY),
    ("Cluster", "MemberUpdate", "MemberUpdateRequest", "MemberUpdateResponse", UNARY),
    ("Cluster", "MemberList", "MemberListRequest", "MemberListResponse", UNARY),
    ("Cluster", "MemberPromote", "MemberPromoteRequest", "MemberPromoteResponse", UNARY),
    ("Maintenance", "Alarm", "AlarmRequest", "AlarmResponse", UNARY),
    ("Maintenance", "Status", "StatusRequest", "StatusResponse", UNARY),
    ("Maintenance", "Defragment", "DefragmentRequest", "DefragmentResponse", UNARY),
    ("Maintenance", "Hash", "HashRequest", "HashResponse", UNARY),
    ("Maintenance", "HashKV", "HashKVRequest", "HashKVResponse", UNARY),
    ("Maintenance", "Snapshot", "SnapshotRequest", "SnapshotResponse", SERVER_STREAM),
    ("Maintenance", "MoveLeader", "MoveLeaderRequest", "MoveLeaderResponse", UNARY),
    ("Maintenance", "Downgrade", "DowngradeRequest", "DowngradeResponse", UNARY),
    ("Auth", "AuthEnable", "AuthEnableRequest", "AuthEnableResponse", UNARY),
    ("Auth", "AuthDisable", "AuthDisableRequest", "AuthDisableResponse", UNARY),
    ("Auth", "AuthStatus", "AuthStatusRequest", "AuthStatusResponse", UNARY),
    ("Auth", "Authenticate", "AuthenticateRequest", "AuthenticateResponse", UNARY),
    ("Auth", "UserAdd", "AuthUserAddRequest", "AuthUserAddResponse", UNARY),
    ("Auth", "UserGet", "AuthUserGetRequest", "AuthUserGetResponse", UNARY),
    ("Auth", "UserList", "AuthUserListRequest", "AuthUserListResponse", UNARY),
    ("Auth", "UserDelete", "AuthUserDeleteRequest", "AuthUserDeleteResponse", UNARY),
    ("Auth", "UserChangePassword", "AuthUserChangePasswordRequest",
     "AuthUserChangePasswordResponse", UNARY),
    ("Auth", "UserGrantRole", "AuthUserGrantRoleRequest", "AuthUserGrantRoleResponse", UNARY),
    ("Auth", "UserRevokeRole", "AuthUserRevokeRoleRequest", "AuthUserRevokeRoleResponse", UNARY),
    ("Auth", "RoleAdd", "AuthRoleAddRequest", "AuthRoleAddResponse", UNARY),
    ("Auth", "RoleGet", "AuthRoleGetRequest", "AuthRoleGetResponse", UNARY),
    ("Auth", "RoleList", "AuthRoleListRequest", "AuthRoleListResponse", UNARY),
    ("Auth", "RoleDelete", "AuthRoleDeleteRequest", "AuthRoleDeleteResponse", UNARY),
    ("Auth", "RoleGrantPermission", "AuthRoleGrantPermissionRequest",
     "AuthRoleGrantPermissionResponse", UNARY),
    ("Auth", "RoleRevokePermission", "AuthRoleRevokePermissionRequest",
     "AuthRoleRevokePermissionResponse", UNARY),
]


def _kind(method):
    if method.client_streaming and method.server_streaming:
        return BIDI_STREAM
    if method.server_streaming:
        return SERVER_STREAM
    assert not method.client_streaming, "etcd has no client-stream-only RPC"
    return UNARY


def test_services_have_exactly_etcds_methods():
    expected = {}
    for service, method, *_ in METHODS:
        expected.setdefault(service, []).append(method)
    actual = {
        name: [m.name for m in svc.methods]
        for name, svc in rpc_pb2.DESCRIPTOR.services_by_name.items()
    }
    assert actual == expected


@pytest.mark.parametrize(("service", "method", "request_type", "response_type", "kind"), METHODS)
def test_method_descriptor(service, method, request_type, response_type, kind):
    desc = rpc_pb2.DESCRIPTOR.services_by_name[service].methods_by_name[method]
    full_method = f"/{desc.containing_service.full_name}/{desc.name}"
    assert full_method == f"/etcdserverpb.{service}/{method}"
    assert desc.input_type.full_name == f"etcdserverpb.{request_type}"
    assert desc.output_type.full_name == f"etcdserverpb.{response_type}"
    assert _kind(desc) == kind


class _RecordingChannel:
    """Stands in for grpc.Channel; records what each stub method was bound to."""

    def __init__(self):
        self.bound = {}

    def _binder(kind):
        def bind(self, path, request_serializer=None, response_deserializer=None, **_):
            self.bound[path] = kind
            return path

        return bind

    unary_unary = _binder(UNARY)
    unary_stream = _binder(SERVER_STREAM)
    stream_stream = _binder(BIDI_STREAM)
    stream_unary = _binder("client-stream")
    del _binder


def test_generated_stubs_use_etcd_method_paths():
    channel = _RecordingChannel()
    for service in ("KV", "Watch", "Lease", "Cluster", "Maintenance", "Auth"):
        getattr(rpc_pb2_grpc, f"{service}Stub")(channel)
    expected = {f"/etcdserverpb.{s}/{m}": kind for s, m, _, _, kind in METHODS}
    assert channel.bound == expected


def test_keyvalue_bytes_match_etcd():
    kv = kv_pb2.KeyValue(key=b"foo", create_revision=2, mod_revision=2, version=1, value=b"bar")
    assert kv.SerializeToString().hex() == "0a03666f6f1002180220012a03626172"


def test_messages_live_in_etcds_proto_packages():
    assert kv_pb2.DESCRIPTOR.package == "mvccpb"
    assert auth_pb2.DESCRIPTOR.package == "authpb"
    assert lease_pb2.DESCRIPTOR.package == "leasepb"
    assert rpc_pb2.DESCRIPTOR.package == "etcdserverpb"
    assert rpc_pb2.WatchResponse.DESCRIPTOR.full_name == "etcdserverpb.WatchResponse"

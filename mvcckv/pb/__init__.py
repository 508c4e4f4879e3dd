"""Protobuf and gRPC modules for etcd's v3 wire API, generated from proto/.

``kv_pb2`` (package ``mvccpb``), ``auth_pb2`` (``authpb``), ``lease_pb2``
(``leasepb``), ``rpc_pb2`` and ``rpc_pb2_grpc`` (``etcdserverpb``) are produced
by ``python tools/gen_proto.py`` with the grpcio-tools release pinned in
pyproject.toml; never edit them by hand. After changing a .proto file, run
that command and commit the result; ``python tools/gen_proto.py --check``
(also run by the test suite) fails while any of them is stale. Import them
as ``from mvcckv.pb import rpc_pb2, rpc_pb2_grpc, kv_pb2``.
"""

"""Answers spliced from stored bytes, without building protobuf messages.

The backend stores every key's value as the encoded ``mvccpb.KeyValue``
etcd itself stores, and a ``RangeResponse`` is, on the wire, nothing but
its header followed by those bytes, each as a length-delimited field 2::

    RangeResponse   0a <len> ResponseHeader
                    12 <len> KeyValue        (once per key, in order)
                    18 01                    more (only when true)
                    20 <varint>              count (only when not 0)

    ResponseHeader  08 <varint> cluster_id   10 <varint> member_id
                    18 <varint> revision     20 <varint> raft_term

    WatchResponse   0a <len> ResponseHeader
                    10 <varint> watch_id     (only when not 0)
                    5a <len> Event           (once per event; encoded once
                                              for every watcher, see watch.py)

Fields are written in field-number order and zero values are left out,
exactly as protobuf's own serializer writes them, so a spliced answer is
byte-for-byte the one ``RangeResponse.SerializeToString`` would give
(``tests/test_server_wire.py`` checks this).  Building the message instead
parses every KeyValue and encodes it again: for a 100-key range that is
most of the server's CPU per request (grpc_load range100).
"""

from __future__ import annotations

# Tags: (field number << 3) | wire type (0 varint, 2 length-delimited).
_HEADER_FIELD = b"\x0a"
_KV_FIELD = b"\x12"
_MORE_TRUE = b"\x18\x01"
_COUNT_FIELD = b"\x20"


def varint(n: int) -> bytes:
    """Base-128 varint of a non-negative int (a negative int64 would take
    ten bytes; no field spliced here is ever negative)."""
    if n < 0x80:
        return _ONE_BYTE[n]
    if n < 0x4000:
        # Two bytes: every stored KeyValue of a small value (range100).
        return bytes(((n & 0x7F) | 0x80, n >> 7))
    if n < 0x200000:
        # Three bytes: the revision in most headers.
        return bytes(((n & 0x7F) | 0x80, ((n >> 7) & 0x7F) | 0x80, n >> 14))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_ONE_BYTE = [bytes((i,)) for i in range(0x80)]


def header_prefix(cluster_id: int, member_id: int) -> bytes:
    """The fields of a ResponseHeader that come before its revision."""
    out = b""
    if cluster_id:
        out += b"\x08" + varint(cluster_id)
    if member_id:
        out += b"\x10" + varint(member_id)
    return out


def header_suffix(raft_term: int) -> bytes:
    """The fields of a ResponseHeader that come after its revision."""
    return b"\x20" + varint(raft_term) if raft_term else b""


def response_header(prefix: bytes, revision: int, suffix: bytes) -> bytes:
    """An encoded ResponseHeader (see :func:`header_prefix`)."""
    if revision:
        return prefix + b"\x18" + varint(revision) + suffix
    return prefix + suffix


def range_response(header: bytes, kvs: list[bytes], more: bool, count: int) -> bytes:
    """An encoded RangeResponse around already-encoded KeyValues."""
    parts = [_HEADER_FIELD, varint(len(header)), header]
    append = parts.append
    prefixes = _KV_PREFIXES
    for kv in kvs:
        n = len(kv)
        append(prefixes[n] if n < _KV_PREFIXED else _KV_FIELD + varint(n))
        append(kv)
    if more:
        append(_MORE_TRUE)
    if count:
        append(_COUNT_FIELD)
        append(varint(count))
    return b"".join(parts)


# Tag and length of a KeyValue field, precomputed for the sizes most values
# have: half the cost of splicing 100 keys (grpc_load range100).
_KV_PREFIXED = 2048
_KV_PREFIXES = [_KV_FIELD + varint(n) for n in range(_KV_PREFIXED)]


def watch_response(header: bytes, watch_id: int, encoded_events: bytes) -> bytes:
    """An encoded WatchResponse carrying only events (``EventBatch``)."""
    if watch_id:
        return b"".join((_HEADER_FIELD, varint(len(header)), header, b"\x10", varint(watch_id), encoded_events))
    return b"".join((_HEADER_FIELD, varint(len(header)), header, encoded_events))

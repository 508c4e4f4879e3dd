"""Revisions and their backend key encoding.

A revision is the pair ``(main, sub)``: ``main`` is the store-wide logical
clock (one step per write transaction that changed something) and ``sub``
numbers the changes inside that transaction (0, 1, 2, ... in execution
order).  Clients only ever see ``main``.

In the backend's ``key`` database a revision is the key of the change it
names, encoded in 17 bytes so that byte order equals revision order::

    main (8 bytes, big-endian) | b"_" | sub (8 bytes, big-endian)

A deletion is stored under the same 17 bytes followed by ``b"t"`` (18 bytes),
the tombstone mark.  A given ``(main, sub)`` is either a put or a tombstone,
never both, so the mark never changes the ordering.

>>> to_bytes(Revision(2, 0)).hex()
'00000000000000025f0000000000000000'
>>> from_bytes(to_bytes(Revision(7, 3), tombstone=True))
Revision(main=7, sub=3)
>>> is_tombstone(to_bytes(Revision(7, 3), tombstone=True))
True
"""

from __future__ import annotations

import struct
from typing import NamedTuple

REV_BYTES_LEN = 17
MARKED_REV_BYTES_LEN = 18
TOMBSTONE_MARK = b"t"

_REV = struct.Struct(">Q")
_PACK = struct.Struct(">QcQ")


class Revision(NamedTuple):
    """A (main, sub) revision; tuples order exactly like etcd's revisions."""

    main: int
    sub: int = 0


def to_bytes(rev: Revision | tuple[int, int], tombstone: bool = False) -> bytes:
    """Encode ``rev`` as the backend key (18 bytes if ``tombstone``)."""
    main, sub = rev
    if main < 0 or sub < 0:
        raise ValueError(f"negative revision {rev!r}")
    b = _PACK.pack(main, b"_", sub)
    return b + TOMBSTONE_MARK if tombstone else b


def from_bytes(b: bytes) -> Revision:
    """Decode a 17- or 18-byte backend key back into its revision."""
    if len(b) not in (REV_BYTES_LEN, MARKED_REV_BYTES_LEN) or b[8:9] != b"_":
        raise ValueError(f"not a revision key: {bytes(b)!r}")
    main, _, sub = _PACK.unpack_from(b)
    return Revision(main, sub)


def is_tombstone(b: bytes) -> bool:
    """True for an 18-byte key carrying the tombstone mark."""
    return len(b) == MARKED_REV_BYTES_LEN and b[17:18] == TOMBSTONE_MARK


def main_prefix(main: int) -> bytes:
    """The first 8 bytes of every key of main revision ``main``.

    Used as a cursor bound: every backend key with main revision ``m`` sorts
    at or after ``main_prefix(m)`` and before ``main_prefix(m + 1)``.
    """
    return _REV.pack(main)

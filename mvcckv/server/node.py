"""What every service knows about this server: the store and its identity.

etcd is a raft member; mvcckv is one process playing a one-member cluster
that has always been its own leader.  The raft-shaped answers follow from
that: the leader is this member, the term never changes (a fresh etcd
reports term 2 after its first election, so we report 2), and the raft
indices are the WAL's.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from functools import cached_property

from mvcckv import wire
from mvcckv.pb import rpc_pb2 as pb
from mvcckv.store import Store

RAFT_TERM = 2


@dataclass(frozen=True)
class Node:
    store: Store
    name: str
    member_id: int
    cluster_id: int
    peer_urls: tuple[str, ...]
    client_urls: tuple[str, ...]
    version: str
    """The etcd server version we answer as (``--emulated-version``)."""
    quota_bytes: int
    """``--quota-backend-bytes`` as given (0 = etcd's default, < 0 = off)."""

    @property
    def storage_version(self) -> str:
        """etcd's storage version for our server version: ``major.minor.0``."""
        major, minor = self.version.split(".")[:2]
        return f"{major}.{minor}.0"

    @property
    def cluster_version(self) -> str:
        major, minor = self.version.split(".")[:2]
        return f"{major}.{minor}"

    def fill(self, header: pb.ResponseHeader) -> None:
        """etcd's header fill: identity and term; revision only if unset."""
        header.cluster_id = self.cluster_id
        header.member_id = self.member_id
        header.raft_term = RAFT_TERM
        if header.revision == 0:
            header.revision = self.store.revision

    def header_bytes(self, revision: int) -> bytes:
        """``fill``'s header at ``revision``, encoded (``mvcckv/wire.py``)."""
        prefix, suffix = self._header_parts
        return wire.response_header(prefix, revision, suffix)

    @cached_property
    def _header_parts(self) -> tuple[bytes, bytes]:
        return wire.header_prefix(self.cluster_id, self.member_id), wire.header_suffix(RAFT_TERM)

    async def write(self, kind: int, request, auth_revision: int = 0, data: bytes | None = None):
        """Propose a logged request, await its answer without holding the
        event loop, and fill the answer's header.

        ``data``: the request's bytes as they arrived, for an engine that
        can log them as they are.
        """
        on_loop = self._propose_on_loop
        if on_loop is not None:
            resp = await on_loop(kind, request, auth_revision, data)
        else:
            resp = await asyncio.wrap_future(self.store.propose(kind, request, auth_revision=auth_revision))
        self.fill(resp.header)
        return resp

    def write_blocking(self, kind: int, request, auth_revision: int = 0, data: bytes | None = None):
        """``write`` for a caller on a server thread: blocks that thread
        (never the event loop) until the answer is durable."""
        if data is not None and self._logs_raw:
            fut = self.store.propose(kind, request, auth_revision, data)
        else:
            fut = self.store.propose(kind, request, auth_revision=auth_revision)
        resp = fut.result()
        self.fill(resp.header)
        return resp

    @property
    def _logs_raw(self) -> bool:
        # An engine that logs a request's bytes as they arrived says so by
        # taking them on the loop too (Store.propose_on_loop).
        return self._propose_on_loop is not None

    @property
    def _propose_on_loop(self):
        # An engine that answers asyncio futures itself, a batch per loop
        # wake-up (Store.propose_on_loop); others get wrap_future.
        return getattr(self.store, "propose_on_loop", None)

    def member(self) -> pb.Member:
        return pb.Member(
            ID=self.member_id,
            name=self.name,
            peerURLs=list(self.peer_urls),
            clientURLs=list(self.client_urls),
        )

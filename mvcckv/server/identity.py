"""Member and cluster IDs, derived as etcd derives them (ETCD_SEMANTICS §12).

etcd names a member by hashing where its peers reach it::

    member ID  = first 8 bytes (big-endian) of SHA-1(sorted peer URLs joined
                 with nothing, then the cluster token)
    cluster ID = first 8 bytes of SHA-1(the member IDs, sorted, each as
                 8 big-endian bytes)

so an mvcckv started with etcd's defaults (``http://localhost:2380``,
``etcd-cluster``) reports the IDs a default etcd reports:
member 0x8e9e05c52164694d, cluster 0xcdf818194e3a8c32.

>>> hex(member_id(["http://localhost:2380"], "etcd-cluster"))
'0x8e9e05c52164694d'
>>> hex(cluster_id([member_id(["http://localhost:2380"], "etcd-cluster")]))
'0xcdf818194e3a8c32'

The IDs are recorded in the data directory on first start
(``Store.identity``), so, as with etcd, changing the peer URLs or the token
later does not rename an existing member.
"""

from __future__ import annotations

import hashlib
import ipaddress
import urllib.parse
from typing import Iterable


def member_id(peer_urls: Iterable[str], token: str) -> int:
    joined = "".join(sorted(peer_urls))
    digest = hashlib.sha1((joined + token).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def cluster_id(member_ids: Iterable[int]) -> int:
    data = b"".join(m.to_bytes(8, "big") for m in sorted(member_ids))
    return int.from_bytes(hashlib.sha1(data).digest()[:8], "big")


def check_urls(urls: Iterable[str]) -> list[str]:
    """etcd's rules for member URLs; returns them trimmed and sorted.

    http and https URLs need ``host:port`` and no path; unix and unixs URLs
    are taken as they are.  Raises ValueError naming the first bad URL.
    """
    out = []
    for raw in urls:
        url = raw.strip()
        parts = urllib.parse.urlsplit(url)
        if parts.scheme in ("http", "https"):
            if not _has_host_port(parts.netloc):
                raise ValueError(f'URL address does not have the form "host:port": {url}')
            if parts.path:
                raise ValueError(f"URL must not contain a path: {url}")
        elif parts.scheme not in ("unix", "unixs"):
            raise ValueError(f"URL scheme must be http, https, unix, or unixs: {url}")
        out.append(url)
    if not out:
        raise ValueError("no valid URLs given")
    return sorted(out)


def _has_host_port(netloc: str) -> bool:
    host = netloc.rpartition("@")[2]
    if host.startswith("["):
        end = host.find("]")
        return end > 0 and host[end + 1 : end + 2] == ":"
    return host.count(":") == 1


def split_host_port(netloc: str) -> tuple[str, int]:
    """(host, port) of ``host:port`` or ``[v6]:port``; ValueError if malformed."""
    if netloc.startswith("["):
        host, sep, port = netloc[1:].partition("]:")
        if not sep:
            raise ValueError(f"missing port in address {netloc!r}")
        ipaddress.IPv6Address(host)
    else:
        host, sep, port = netloc.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"missing port in address {netloc!r}")
    if not port.isdigit() or int(port) > 65535:
        raise ValueError(f"invalid port in address {netloc!r}")
    return host, int(port)

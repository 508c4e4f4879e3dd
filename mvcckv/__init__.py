"""mvcckv: etcd's v3 storage semantics in pure Python.

Embedded use::

    import mvcckv
    with mvcckv.open("data.mvcckv") as store:
        store.put(b"k", b"v")
        store.get(b"k").value            # b"v"

The same engine is served over etcd's gRPC API by ``mvcckv serve``.
"""

from __future__ import annotations

from mvcckv.store import Options, Store, StoreStatus, prefix_end

__version__ = "0.1.0"
__all__ = ["open", "restore", "Store", "Options", "StoreStatus", "prefix_end"]


def open(path: str, **options) -> Store:  # noqa: A001 - mirrors lmdb.open / io.open
    """Open (creating if needed) the store in directory ``path``.

    Keyword options are the fields of :class:`mvcckv.Options`, e.g.
    ``quota_bytes``, ``max_txn_ops``, ``max_request_bytes``.  The store is a
    context manager; closing it flushes and releases everything.
    """
    return Store(path, Options(**options))


def restore(snapshot, data_dir: str, *, skip_hash_check: bool = False):
    """Restore a snapshot (a path or a seekable binary file: one saved by
    etcd 3.4-3.6, ``etcdctl snapshot save``, or :meth:`Store.snapshot`)
    into the new data dir ``data_dir``; returns its
    :class:`mvcckv.snapshot.SnapshotStatus`.  Then ``mvcckv.open(data_dir)``."""
    from mvcckv.snapshot import restore as _restore

    return _restore(snapshot, data_dir, skip_hash_check=skip_hash_check)

"""Which engine ``mvcckv serve`` runs on, and how it is opened.

The server sits above two engines that implement one contract
(``mvcckv.kv``): the LMDB store in a data directory (``mvcckv.store``) and
the PostgreSQL engine (``mvcckv.pg``).  Neither engine knows about the
server; this module is the one place that picks one by ``--backend``
(empty: LMDB in ``--data-dir``; ``postgresql://…``: PostgreSQL) and opens it
under the member identity the flags give.

Opening differs only in these ways:

* LMDB: the data dir is created if missing; the WAL is replayed.
* PostgreSQL: the server being down (or refusing us) at start is one clear
  error line; ``--data-dir`` is not used; the URL may pick the schema (one
  schema is one etcd keyspace):
  ``postgresql://host/db?options=-csearch_path%3Detcd1``.  Several servers
  may share one schema and behave as one etcd with several client URLs.

Either way the member identity is recorded with the data on first start
and kept afterwards, as an etcd member keeps the ID it was born with.
"""

from __future__ import annotations

import gc
import logging
import os
from dataclasses import dataclass
from typing import Callable

import lmdb

import mvcckv
from mvcckv import errors
from mvcckv.server import identity
from mvcckv.server.config import Config
from mvcckv.server.node import Node
from mvcckv.store import DEFAULT_QUOTA

log = logging.getLogger("mvcckv.server")


@dataclass(frozen=True)
class Engine:
    """How ``serve`` opens one kind of engine."""

    open_node: Callable[[Config], Node]
    # Errors that mean "cannot open": logged as one line, exit code 1.
    open_errors: tuple[type[BaseException], ...]
    # What failed to open, for the error line ("cannot open the <it>: <error>").
    what: Callable[[Config], str]
    # Where the data lives, for the ready line.
    where: Callable[[Config], str]


def quota_bytes(config: Config) -> int:
    """The engine's quota: etcd reads 0 as its 2 GiB default."""
    return DEFAULT_QUOTA if config.quota_backend_bytes == 0 else config.quota_backend_bytes


def settle_node(config: Config, open_engine: Callable[[int], object], where: str) -> Node:
    """Open an engine under the member ID the flags give, settle the
    identity recorded with the data, and build the Node (blocking).

    A data dir (or schema) created with other peer URLs or another token
    keeps the member ID it was born with, as etcd's member does; the engine
    is then reopened under it (it raises its NOSPACE alarm under that ID).
    """
    mid = identity.member_id(config.initial_advertise_peer_urls, config.initial_cluster_token)
    cid = identity.cluster_id([mid])
    engine = open_engine(mid)
    try:
        stored_cid, stored_mid = engine.identity(cid, mid)
        if stored_mid != mid:
            log.info("member ID %x recorded in %s is kept (flags would give %x)", stored_mid, where, mid)
            engine.close()
            engine = open_engine(stored_mid)
    except BaseException:
        engine.close()
        raise
    return Node(
        store=engine,
        name=config.name,
        member_id=stored_mid,
        cluster_id=stored_cid,
        peer_urls=config.initial_advertise_peer_urls,
        client_urls=config.advertise_client_urls,
        version=config.emulated_version,
        quota_bytes=config.quota_backend_bytes,
    )


def open_lmdb_node(config: Config) -> Node:
    """Open the LMDB store and settle the member identity (blocking: run in a thread)."""

    def open_store(member: int):
        return mvcckv.open(
            config.data_dir,
            quota_bytes=quota_bytes(config),
            max_txn_ops=config.max_txn_ops,
            max_request_bytes=config.max_request_bytes,
            member_id=member,
            bcrypt_cost=config.bcrypt_cost,
        )

    node = settle_node(config, open_store, config.data_dir)
    # The index just built lives as long as the server: moving it out of the
    # collector's generations keeps full collections, which would walk every
    # key's objects, from pausing requests.
    gc.freeze()
    return node


def open_pg_node(config: Config) -> Node:
    """Open the PostgreSQL engine and settle the member identity (blocking).

    The schema is the first entry of a ``search_path`` given in the URL's
    ``options`` (``?options=-csearch_path%3Detcd1``), else ``mvcckv``.
    """
    from mvcckv.pg.engine import PgEngine, PgOptions, schema_of

    schema = schema_of(config.backend)

    def open_engine(member: int) -> PgEngine:
        return PgEngine(config.backend, PgOptions(
            schema=schema, quota_bytes=quota_bytes(config), max_txn_ops=config.max_txn_ops,
            max_request_bytes=config.max_request_bytes, member_id=member,
            bcrypt_cost=config.bcrypt_cost,
        ))

    return settle_node(config, open_engine, f"schema {schema}")


LMDB = Engine(
    open_node=open_lmdb_node,
    open_errors=(errors.StorageError, OSError, lmdb.Error),
    what=lambda config: f"data dir {config.data_dir}",
    where=lambda config: f"data dir {os.path.abspath(config.data_dir)}",
)


def _pg_engine() -> Engine:
    # psycopg is imported only when a PostgreSQL URL is given.
    from mvcckv.pg.engine import describe_dsn
    from mvcckv.pg.errors import ConnectError

    return Engine(
        open_node=open_pg_node,
        open_errors=(ConnectError, errors.StorageError, errors.MvccError, ValueError),
        # A connection error already says where it tried to connect.
        what=lambda config: "PostgreSQL backend",
        where=lambda config: f"backend {describe_dsn(config.backend)}",
    )


def for_config(config: Config) -> Engine:
    """The engine ``--backend`` names: PostgreSQL for a URL, else LMDB."""
    return _pg_engine() if config.backend else LMDB

"""``mvcckv serve --backend postgresql://...``: the gRPC server on PgEngine.

The services, gRPC options, auto-compaction and shutdown are the LMDB
server's (``mvcckv.server.app``); only opening the engine differs:

* PostgreSQL down (or refusing us) at start: one clear error line, exit 1;
* the member identity is recorded in the schema on first start, as the
  LMDB server records it in its data dir;
* ``--data-dir`` is not used; the URL may pick the schema (one schema is
  one etcd keyspace): ``postgresql://host/db?options=-csearch_path%3Detcd1``.

Several servers may share one schema: they behave as one etcd with several
client URLs (one revision sequence, every write visible everywhere).
"""

from __future__ import annotations

import logging

from mvcckv import errors
from mvcckv.pg.engine import PgEngine, PgOptions, describe_dsn, schema_of
from mvcckv.pg.errors import ConnectError
from mvcckv.server import app
from mvcckv.server.config import Config
from mvcckv.server.node import Node

log = logging.getLogger("mvcckv.server")


def open_node(config: Config) -> Node:
    """Open the engine and settle the member identity (blocking).

    The schema is the first entry of a ``search_path`` given in the URL's
    ``options`` (``?options=-csearch_path%3Detcd1``), else ``mvcckv``.
    """
    schema = schema_of(config.backend)

    def open_engine(member: int) -> PgEngine:
        return PgEngine(config.backend, PgOptions(
            schema=schema, quota_bytes=app.quota_bytes(config), max_txn_ops=config.max_txn_ops,
            max_request_bytes=config.max_request_bytes, member_id=member,
            bcrypt_cost=config.bcrypt_cost,
        ))

    return app.settle_node(config, open_engine, f"schema {schema}")


PG_BACKEND = app.Backend(
    open_node=open_node,
    open_errors=(ConnectError, errors.StorageError, errors.MvccError, ValueError),
    # A connection error already says where it tried to connect.
    what=lambda config: "PostgreSQL backend",
    where=lambda config: f"backend {describe_dsn(config.backend)}",
)


def main(config: Config) -> int:
    return app.main(config, PG_BACKEND)

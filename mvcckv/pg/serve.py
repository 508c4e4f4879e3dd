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

import asyncio
import logging
import os
import signal

from grpc_health.v1 import health_pb2

from mvcckv import errors
from mvcckv.backend import DEFAULT_QUOTA
from mvcckv.pg.engine import PgEngine, PgOptions, describe_dsn, schema_of
from mvcckv.server import app, identity
from mvcckv.server.config import Config
from mvcckv.server.node import Node

log = logging.getLogger("mvcckv.server")


def open_node(config: Config) -> Node:
    """Open the engine and settle the member identity (blocking).

    The schema is the first entry of a ``search_path`` given in the URL's
    ``options`` (``?options=-csearch_path%3Detcd1``), else ``mvcckv``.
    """
    schema = schema_of(config.backend)
    mid = identity.member_id(config.initial_advertise_peer_urls, config.initial_cluster_token)
    cid = identity.cluster_id([mid])
    quota = DEFAULT_QUOTA if config.quota_backend_bytes == 0 else config.quota_backend_bytes

    def open_engine(member: int) -> PgEngine:
        return PgEngine(config.backend, PgOptions(
            schema=schema, quota_bytes=quota, max_txn_ops=config.max_txn_ops,
            max_request_bytes=config.max_request_bytes, member_id=member,
        ))

    engine = open_engine(mid)
    try:
        stored_cid, stored_mid = engine.identity(cid, mid)
        if stored_mid != mid:
            # Like the LMDB server: the member keeps the ID it was born with.
            log.info("member ID %x recorded in the database is kept (flags would give %x)", stored_mid, mid)
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


async def serve(config: Config) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals: list[str] = []

    def on_signal(sig: signal.Signals) -> None:
        if signals:
            log.warning("second signal (%s): exiting now; PostgreSQL holds every acknowledged write", sig.name)
            logging.shutdown()
            os._exit(1)
        signals.append(sig.name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)

    where = describe_dsn(config.backend)
    try:
        node = await asyncio.to_thread(open_node, config)
    except (errors.StorageError, errors.MvccError, ValueError) as err:
        log.error("cannot open the PostgreSQL backend (%s): %s", where, err)
        return 1
    if stop.is_set():
        await asyncio.to_thread(node.store.close)
        return 0

    server = None
    comp_task = None
    try:
        server, health_servicer = app.build_server(node, config)
        urls = []
        for listener in config.listeners:
            port = app._bind(server, listener)
            urls.append(listener.url if port == listener.port else
                        f"http://{listener.address.rpartition(':')[0]}:{port}")
        await server.start()
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        comp_task = app.start_compactor(node, config)
        log.info(
            "ready to serve client requests on %s (name %s, member %x, cluster %x, backend PostgreSQL %s, etcd %s)",
            ", ".join(urls), node.name, node.member_id, node.cluster_id, where, node.version,
        )
        await stop.wait()
        log.info("received %s: stopping (in-flight requests get %.0f s)", signals[0], app.GRACE_SECONDS)
        await health_servicer.enter_graceful_shutdown()
        return 0
    except app.BindError as err:
        log.error("%s", err)
        return 1
    finally:
        if comp_task is not None:
            comp_task.cancel()
            await asyncio.gather(comp_task, return_exceptions=True)
        if server is not None:
            await server.stop(app.GRACE_SECONDS)
        await asyncio.to_thread(node.store.close)
        log.info("stopped")


def main(config: Config) -> int:
    app.configure_logging(config.log_level)
    return asyncio.run(serve(config))

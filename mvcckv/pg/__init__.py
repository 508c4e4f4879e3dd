"""mvcckv on PostgreSQL: etcd's v3 semantics over one PostgreSQL schema.

The same engine contract as the LMDB store (``mvcckv.kv.Engine``), so the
embedded API and ``mvcckv serve --backend postgresql://...`` work alike on
either.  The tables follow the design of the article "etcd vs PostgreSQL"
(Jinhua Luo, 2023) — a ``config`` table of revisioned rows with tombstones,
an AFTER INSERT trigger with ``pg_notify`` for watch, a lease table with the
last keep-alive — extended until etcd's rules hold exactly (schema.py).

Embedded use::

    import mvcckv.pg
    with mvcckv.pg.open("postgresql://user@localhost/db") as store:
        store.put(b"k", b"v")
        store.get(b"k").value            # b"v"

Several processes (``mvcckv serve`` or embedded) on one schema behave as
one etcd: one revision sequence, a write on any one visible to the reads
and watches of all.

Modules: ``schema`` (versioned DDL), ``view`` (txn.py's views in SQL),
``engine`` (writes, reads, leases, maintenance), ``feed`` (LISTEN/NOTIFY
into watchers), ``compaction`` (compaction and HashKV), ``serve`` (the
server on this engine), ``errors``; ``article.sql`` is the article's
design as written, for the comparison benchmark.
"""

from __future__ import annotations

from importlib import resources

from mvcckv.pg.engine import PgEngine, PgOptions
from mvcckv.pg.errors import ConnectError, UnavailableError

__all__ = ["open", "article_sql", "PgEngine", "PgOptions", "ConnectError", "UnavailableError"]


def open(dsn: str, **options) -> PgEngine:  # noqa: A001 - mirrors mvcckv.open
    """Open (creating or migrating the schema if needed) the engine on ``dsn``.

    ``dsn`` is a libpq connection string or ``postgresql://`` URL.  Keyword
    options are the fields of :class:`PgOptions`, e.g. ``schema`` (default
    ``"mvcckv"``), ``quota_bytes``, ``max_txn_ops``.  Raises
    :class:`ConnectError` when the database cannot be reached or used.
    """
    return PgEngine(dsn, PgOptions(**options))


def article_sql() -> str:
    """The article's own design as SQL (``article.sql``): the table, set /
    del / get1 / get_all, the notify trigger, the lease table.  Execute it
    with ``search_path`` set to an empty schema; it is idempotent."""
    return resources.files(__package__).joinpath("article.sql").read_text()

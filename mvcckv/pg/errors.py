"""Errors of the PostgreSQL engine.

Two kinds, kept apart because a client must react differently:

* :class:`UnavailableError` — PostgreSQL could not be reached, or the
  connection broke during a request.  A subclass of ``StoppedError``, so the
  server answers gRPC UNAVAILABLE, which etcd clients treat as "retry"
  (etcd answers the same code while it has no leader).  A write that fails
  this way before its COMMIT was sent is not applied; one whose COMMIT was
  cut off may or may not be, exactly like an etcd write that timed out.
* :class:`ConnectError` — the engine cannot start: the database is down,
  refuses the credentials, or holds a newer schema.  A ``StorageError``:
  ``mvcckv serve`` prints it and exits.
"""

from __future__ import annotations

import psycopg

from mvcckv import errors

# A broken connection; anything else from psycopg is a bug or bad data.
CONNECTION_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError)


class UnavailableError(errors.StoppedError):
    """PostgreSQL is unreachable or dropped the connection; retry later."""

    message = "mvcckv: postgresql unavailable"

    def __init__(self, detail: str = ""):
        detail = " ".join(detail.split())  # libpq messages span lines
        super().__init__(f"{self.message}: {detail}" if detail else self.message)


class ConnectError(errors.StorageError):
    """The engine could not open its database."""


class SchemaError(ConnectError):
    """The database holds a schema this version of mvcckv cannot use."""

"""PostgreSQL: a connection's liveness checked at checkout in one round trip.

A pooled connection may be dead (the server restarted, a network blip): checking it before
each unit of work is what lets the first message after a restart find a live one instead of
failing. SQLAlchemy's own pre-ping on asyncpg runs ``BEGIN``, ``;``, ``ROLLBACK`` (three
round trips per unit of work, 4 units a message). Here the check is one simple-protocol
``SELECT 1`` (one round trip, its own implicit transaction), so a pooler in transaction mode
(PgBouncer) is fine with it too. A dead connection raises ``DisconnectionError``: the pool
discards it and checks out another (SQLAlchemy's pessimistic disconnect handling).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, event, exc
from sqlalchemy.util import await_


def ping_on_checkout(sync_engine: Engine) -> None:
    """Check every connection ``sync_engine``'s pool hands out (in place of pre-ping)."""
    event.listen(sync_engine.pool, "checkout", ping)


def ping(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """The checkout hook: one query on the driver's own connection (SQLAlchemy's adapter
    keeps asyncpg's as ``_connection``; an adapter without it gets its own ping)."""
    driver = getattr(dbapi_connection, "_connection", None)
    try:
        if driver is None:
            dbapi_connection.ping()
        else:
            await_(driver.execute("SELECT 1"))
    except Exception as error:  # any failure means: not this connection
        raise exc.DisconnectionError(f"the pooled connection is gone: {error}") from error

"""Alembic environment. Runs on a connection handed in by ``memory.migrate`` (the app's way),
or opens its own async engine for the ``alembic`` command line (``-x url=...`` or
``VTUBER_DATABASE_URL``)."""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from memory.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    return (
        context.get_x_argument(as_dictionary=True).get("url")
        or os.environ.get("VTUBER_DATABASE_URL")
        or config.get_main_option("sqlalchemy.url")
        or ""
    )


# Lexical-index objects made by raw SQL in 0002 (FTS5 and its shadow tables, the pg_trgm
# index): not in the ORM metadata, so autogenerate must not propose dropping them.
_RAW_SQL_OBJECTS = ("memories_fts", "ix_memories_text_trgm")


def _include_object(obj: object, name: str | None, type_: str, reflected: bool,
                    compare_to: object) -> bool:
    return not (reflected and name is not None and name.startswith(_RAW_SQL_OBJECTS))


def _configure(**kwargs: object) -> None:
    context.configure(target_metadata=target_metadata, compare_type=True,
                      include_object=_include_object, **kwargs)


def run_on_connection(connection: Connection) -> None:
    _configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


async def run_with_own_engine() -> None:
    engine = create_async_engine(_url(), poolclass=NullPool)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(run_on_connection)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    _configure(url=_url(), literal_binds=True, render_as_batch=_url().startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()
elif (shared := config.attributes.get("connection")) is not None:
    run_on_connection(shared)
else:
    asyncio.run(run_with_own_engine())

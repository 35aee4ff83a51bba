"""Opening the database: file checks, migration, SQLite tuning, and the two kinds of unit of
work. Reads are deferred transactions; writes on SQLite are ``BEGIN IMMEDIATE``, because the
driver's default deferred transactions silently lose read-modify-write updates under
concurrency. PostgreSQL uses row locks (``SELECT ... FOR UPDATE``) where it matters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, make_url, select
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from memory.errors import IntegrityViolation, StoreError
from memory.migrate import upgrade_to_head
from memory.models import User
from memory.store.checkpoint import Checkpointer
from memory.store.pg_ping import ping_on_checkout
from memory.store.write_rounds import Outcome, WriteRounds
from memory.urls import mask_url

SQLITE_MAGIC = b"SQLite format 3\x00"
WAL_SIZE_LIMIT = 8 * 1024 * 1024
_READ_ONLY = "vtuber_read_only"
T = TypeVar("T")
log = logging.getLogger(__name__)
Work = Callable[[Connection], T]


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


def first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


@contextmanager
def store_errors() -> Iterator[None]:
    """The store's edge: whatever the driver raises (SQLAlchemy, aiosqlite, asyncpg, the OS)
    leaves as a one-line ``StoreError``."""
    try:
        yield
    except (IntegrityError, sqlite3.IntegrityError) as exc:
        raise IntegrityViolation(f"store: {first_line(exc)}") from exc
    # sqlite3's own errors come from statements sent to the driver directly (``_on_begin``).
    except (SQLAlchemyError, sqlite3.Error, OSError) as exc:
        raise StoreError(f"store: {first_line(exc)}") from exc


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK)


def check_sqlite_file(path: Path) -> None:
    """Refuse, before touching it, a file that is not SQLite or cannot be written."""
    if path.is_dir():
        raise StoreError(f"store: {path} is a directory, expected a SQLite file")
    if path.exists():
        with path.open("rb") as handle:
            header = handle.read(len(SQLITE_MAGIC))
        if header and header != SQLITE_MAGIC:
            raise StoreError(f"store: {path} is not a SQLite database; refusing to touch it")
        if not path.stat().st_size == 0 and not _writable(path):
            raise StoreError(f"store: {path} is read-only; the store needs write access")
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    if not _writable(parent):
        raise StoreError(f"store: directory {parent} is not writable")


def _tune_sqlite(sql_engine: Engine, busy_timeout_ms: int, transactions: bool = True) -> None:
    @event.listens_for(sql_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let us issue BEGIN ourselves (the driver's implicit BEGIN is DEFERRED).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in (
            "PRAGMA journal_mode=WAL",
            "PRAGMA synchronous=NORMAL",
            "PRAGMA foreign_keys=ON",
            # The WAL is copied back into the database by the store's checkpoint thread
            # (``Checkpointer``), not by whichever writer commits when it grows: done there,
            # it added several ms to one commit in every few hundred (the pipeline's p99).
            "PRAGMA wal_autocheckpoint=0",
            f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}",
            f"PRAGMA busy_timeout={int(busy_timeout_ms)}",
        ):
            cursor.execute(pragma)
        cursor.close()

    if not transactions:  # each statement reads a snapshot of its own
        return

    @event.listens_for(sql_engine, "begin")
    def _on_begin(connection: Any) -> None:
        read_only = connection.get_execution_options().get(_READ_ONLY, False)
        # Straight to the driver: through SQLAlchemy's execution machinery this statement,
        # issued for every unit of work, cost several times what SQLite spends on it.
        cursor = connection.connection.dbapi_connection.cursor()
        try:
            cursor.execute("BEGIN" if read_only else "BEGIN IMMEDIATE")
        finally:
            cursor.close()


class Database:
    """SQLAlchemy's engine (``sql_engine``, not to be confused with the LLM engine) and its two
    session factories: ``read()`` and ``write()`` units of work."""

    def __init__(self, sql_engine: AsyncEngine, url: str,
                 threads: _SqliteThreads | None = None) -> None:
        self.sql_engine = sql_engine
        self.url = url
        self._writes = async_sessionmaker(sql_engine, expire_on_commit=False)
        self._read_engine = sql_engine.execution_options(**{_READ_ONLY: True})
        self._reads = async_sessionmaker(self._read_engine, expire_on_commit=False)
        self._sqlite_writer = asyncio.Lock() if self.dialect == "sqlite" else None
        self._threads = threads
        self._rounds = (WriteRounds(threads.run_round, self._sqlite_writer)
                        if threads is not None and self._sqlite_writer is not None else None)

    @property
    def dialect(self) -> str:
        return self.sql_engine.dialect.name

    @property
    def groups_writes(self) -> bool:
        """Whether concurrent ``write_unit`` calls share transactions, in the order they were
        made (SQLite's ``WriteRounds``): a caller need not batch or serialise them itself."""
        return self._rounds is not None

    @property
    def sync_engines(self) -> list[Engine]:
        """Every engine that talks to the database (for event listeners, such as tests');
        on SQLite the store threads' writer last."""
        threads = self._threads.engines if self._threads is not None else []
        return [self.sql_engine.sync_engine, *threads]

    @classmethod
    async def open(cls, url: str, *, auto_migrate: bool, busy_timeout_ms: int,
                   pool_size: int = 15, pool_timeout_s: float = 30.0) -> Database:
        """The database at ``url``; on PostgreSQL a pool of ``pool_size`` connections, a unit
        of work waiting at most ``pool_timeout_s`` for one (then a ``StoreError``)."""
        if url.startswith("sqlite"):
            path = url.split(":///", 1)[1] if ":///" in url else ""
            if path and path != ":memory:":
                check_sqlite_file(Path(path))
        try:
            if auto_migrate:
                await upgrade_to_head(url, busy_timeout_ms)
            pooled = ({} if url.startswith("sqlite") else
                      {"pool_size": pool_size, "max_overflow": 0, "pool_timeout": pool_timeout_s})
            sql_engine = create_async_engine(url, **pooled)
            if sql_engine.dialect.name == "postgresql":
                ping_on_checkout(sql_engine.sync_engine)
            threads = None
            if sql_engine.dialect.name == "sqlite":
                _tune_sqlite(sql_engine.sync_engine, busy_timeout_ms)
                threads = _SqliteThreads.open(url, busy_timeout_ms)
            database = cls(sql_engine, url, threads)
            async with database.read() as session:
                await session.execute(select(User.id).limit(1))
        except (OperationalError, DBAPIError, OSError) as exc:
            raise StoreError(f"store: cannot open {mask_url(url)}: {first_line(exc)}") from exc
        return database

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """A deferred transaction: readers never wait for the write lock."""
        with store_errors():
            async with self._reads() as session, session.begin():
                yield session

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncSession]:
        """A write transaction (``BEGIN IMMEDIATE`` on SQLite); commits on success.

        SQLite takes one writer at a time; writers of this process queue here, in order,
        instead of in SQLite's busy handler (which sleeps and retries: slow and unfair)."""
        async with self._sqlite_writer or contextlib.nullcontext():
            with store_errors():
                async with self._writes() as session, session.begin():
                    yield session

    async def read_unit(self, work: Work[T]) -> T:
        """``work`` (a blocking function of a sync ``Connection``) as one read transaction."""
        if self._threads is not None:
            with store_errors():
                return await self._threads.run(self._threads.reads, work)
        with store_errors():
            async with self._read_engine.begin() as connection:
                return await connection.run_sync(work)

    async def read_on_event_loop(self, work: Work[T]) -> T:
        """``work``'s reads (indexed ones only), on SQLite on the event loop's own thread, each
        statement a snapshot of its own: in WAL mode a reader never waits for the writer, and
        a trip to a store thread and back cost 1-2 ms of GIL waits under a busy chat
        (docs/PERFORMANCE.md). Where SQLite would wait for a lock, or anything fails: a read
        unit."""
        if self._threads is not None:
            try:
                return self._threads.read_here(work)
            except SQLAlchemyError as exc:
                log.debug("store: read on the event loop failed, reading again: %s", exc)
        return await self.read_unit(work)

    async def write_unit(self, work: Work[T]) -> T:
        """``work`` as one write transaction, committed when it returns.

        The hot paths (intake, completing an exchange) are written this way: on SQLite the
        whole transaction runs in a store thread, one hop from the event loop instead of about
        four per statement through aiosqlite, and units that queue meanwhile share the next
        transaction (``WriteRounds``); on PostgreSQL it runs through ``run_sync`` over
        asyncpg, the same code."""
        if self._rounds is None:
            with store_errors():
                async with self.sql_engine.begin() as connection:
                    return await connection.run_sync(work)
        with store_errors():
            return await self._rounds.run(work)

    async def close(self) -> None:
        if self._rounds is not None:
            await self._rounds.wait_idle()
        if self._threads is not None:
            self._threads.close()
        await self.sql_engine.dispose()


class _SqliteThreads:
    """Synchronous engines on the same SQLite file: one used from two store threads (a writer
    and a reader at once, as WAL allows; same pragmas, same ``BEGIN IMMEDIATE`` writes), one
    for the event loop's own reads (``read_here``)."""

    def __init__(self, sql_engine: Engine, reads_here: Engine) -> None:
        self.sql_engine = sql_engine
        self.writes = sql_engine
        self.reads = sql_engine.execution_options(**{_READ_ONLY: True})
        self._reads_here = reads_here
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="store")
        # Each store thread keeps its own connections: checking one out of the pool and back
        # for every unit was about a third of the store thread's profile samples.
        self._local = threading.local()
        self._connections: list[Connection] = []
        self._connections_lock = threading.Lock()
        assert sql_engine.url.database is not None
        self._checkpointer = Checkpointer(sql_engine.url.database)

    @classmethod
    def open(cls, url: str, busy_timeout_ms: int) -> _SqliteThreads | None:
        parsed = make_url(url)
        if parsed.database in (None, "", ":memory:"):
            return None  # each connection would see its own empty database
        # Every unit ends in COMMIT or ROLLBACK itself: no reset needed when a connection
        # goes back to the pool.
        engines = [create_engine(parsed.set(drivername="sqlite+pysqlite"),
                                 connect_args={"check_same_thread": False},
                                 pool_reset_on_return=None) for _ in range(2)]
        _tune_sqlite(engines[0], busy_timeout_ms)
        # Reads on the event loop never wait for a lock, nor BEGIN and COMMIT (each trip into
        # SQLite may hand the GIL to a store thread and wait to get it back).
        _tune_sqlite(engines[1], 0, transactions=False)
        return cls(*engines)

    async def run(self, sql_engine: Engine, work: Work[T]) -> T:
        def unit() -> T:
            connection = self._connection(sql_engine)
            try:
                with connection.begin():
                    return work(connection)
            except DBAPIError as exc:
                if exc.connection_invalidated or connection.invalidated:
                    self._forget(sql_engine, connection)
                raise

        future = asyncio.get_running_loop().run_in_executor(self._executor, unit)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            # The transaction cannot be interrupted in its thread: let it end before the
            # caller (which may hold the writer lock) moves on.
            await asyncio.wait([future])
            raise

    @property
    def engines(self) -> list[Engine]:  # the writer's last
        return [self._reads_here, self.sql_engine]

    def read_here(self, work: Work[T]) -> T:
        """``work``'s reads on the calling thread (see ``Database.read_on_event_loop``), each
        statement a snapshot of its own; raises at once where SQLite would wait for a lock."""
        connection = self._connection(self._reads_here)
        try:
            with connection.begin():
                return work(connection)
        except Exception as exc:
            self._forget_if_invalid(connection, exc, self._reads_here)
            raise

    async def run_round(self, works: list[Work[Any]]) -> list[Outcome]:
        """``works`` in one write transaction (see ``WriteRounds``): each one's outcome."""
        future = asyncio.get_running_loop().run_in_executor(self._executor, self._round, works)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            await asyncio.wait([future])  # the transaction ends in its thread first
            raise

    def _round(self, works: list[Work[Any]]) -> list[Outcome]:
        if len(works) > 1:
            connection = self._connection(self.writes)
            try:
                with connection.begin():
                    return [(True, work(connection)) for work in works]
            except Exception as exc:  # noqa: BLE001 - rolled back; each unit alone says why
                self._forget_if_invalid(connection, exc, self.writes)
                log.debug("store: a round of %d units failed (%s); each runs alone",
                          len(works), exc)
        return [self._alone(work) for work in works]

    def _alone(self, work: Work[Any]) -> Outcome:
        connection = self._connection(self.writes)
        try:
            with connection.begin():
                return True, work(connection)
        except Exception as exc:  # noqa: BLE001 - the outcome carries it to the unit's caller
            self._forget_if_invalid(connection, exc, self.writes)
            return False, exc

    def _forget_if_invalid(self, connection: Connection, exc: Exception,
                           sql_engine: Engine) -> None:
        if isinstance(exc, DBAPIError) and (exc.connection_invalidated
                                            or connection.invalidated):
            self._forget(sql_engine, connection)

    def _connection(self, sql_engine: Engine) -> Connection:
        """This thread's connection for ``sql_engine`` (reads or writes), opened once."""
        kept: dict[int, Connection] = self._local.__dict__.setdefault("connections", {})
        connection = kept.get(id(sql_engine))
        if connection is None:
            connection = kept[id(sql_engine)] = sql_engine.connect()
            with self._connections_lock:
                self._connections.append(connection)
        return connection

    def _forget(self, sql_engine: Engine, connection: Connection) -> None:
        self._local.connections.pop(id(sql_engine), None)
        with self._connections_lock:
            self._connections.remove(connection)
        with contextlib.suppress(SQLAlchemyError):
            connection.close()

    def close(self) -> None:
        self._checkpointer.close()
        self._executor.shutdown(wait=True)
        with self._connections_lock:
            for connection in self._connections:
                with contextlib.suppress(SQLAlchemyError):
                    connection.close()
            self._connections.clear()
        self.sql_engine.dispose()
        self._reads_here.dispose()

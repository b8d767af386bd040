"""The database connection: engine, sessions and migrations for SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sqlite3
import time
import zlib
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, event, text
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, StatementError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection, PoolResetState
from sqlalchemy.schema import CreateSchema
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"

P = ParamSpec("P")
T = TypeVar("T")

# Store operations whose caller was cancelled, kept alive until they end.
_finishing: set[asyncio.Task[Any]] = set()


def runs_to_completion(
    operation: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[P, Coroutine[Any, Any, T]]:
    """Let a store operation finish even when the task awaiting it is cancelled.

    A transaction cut off mid-way cannot be rolled back in order: SQLAlchemy reports
    "Exception during reset" and throws the connection away, and whether the cut-off
    write landed is left to chance. Cancellation is ordinary here (a stopped turn, a
    closed connection, a shutdown), so the operation runs in its own task and the
    cancelled caller merely stops waiting for it: the write lands whole or not at all.
    """

    @functools.wraps(operation)
    async def run(*args: P.args, **kwargs: P.kwargs) -> T:
        task = asyncio.ensure_future(operation(*args, **kwargs))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                _finishing.add(task)
                task.add_done_callback(_finished)
            raise

    return run


def _finished(task: asyncio.Task[Any]) -> None:
    _finishing.discard(task)
    if not task.cancelled() and (error := task.exception()) is not None:
        log.error("a store operation failed after its caller gave up", exc_info=error)


@dataclass(frozen=True)
class _Prepared:
    """A statement compiled for a driver that takes positional parameters, with the bind
    processor of each parameter's type (what SQLAlchemy applies before the driver sees it)."""

    compiled: SQLCompiler
    sql: str
    binds: tuple[tuple[str, Callable[[Any], Any] | None], ...]

    @classmethod
    def of(cls, statement: ClauseElement, dialect: Dialect) -> _Prepared:
        compiled = statement.compile(dialect=dialect)
        assert isinstance(compiled, SQLCompiler)
        assert compiled.positiontup is not None
        if compiled.insert_prefetch or compiled.update_prefetch:
            # Column defaults computed in Python are SQLAlchemy's execution's to fill in.
            raise ValueError(f"give every column a value to run this on the driver: {statement}")
        binds = tuple(
            (name, compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect))
            for name in compiled.positiontup
        )
        return cls(compiled, compiled.string, binds)

    def arguments(self, params: Mapping[str, Any]) -> list[Any]:
        """The driver's parameters, in order ("anonymous" ones, such as a literal compared
        with, take their own values)."""
        values = self.compiled.construct_params(params)
        return [
            values[name] if process is None else process(values[name])
            for name, process in self.binds
        ]


def alembic_config() -> Config:
    """Alembic configuration pointing at the migrations shipped inside the package."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


class Database:
    """An async engine and its session factory."""

    def __init__(
        self,
        url: str,
        *,
        schema: str | None = None,
        idle_transaction_seconds: float | None = None,
        ping_after_idle: float = 5.0,
    ) -> None:
        """On PostgreSQL, a connection idle in the pool for longer than `ping_after_idle`
        seconds is pinged before it is used (a restarted server, a cut idle connection);
        one in steady use is not."""
        self.url = make_url(url)
        self.schema = schema
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        connect_args: dict[str, Any] = {}
        engine_args: dict[str, Any] = {}
        if self.is_sqlite:
            database = self.url.database
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            # Writers wait for each other instead of failing with "database is locked".
            connect_args["timeout"] = 30
            # A connection is rolled back on its return only if it is still in a
            # transaction (`_sqlite_reset`): after a commit, the pool's rollback would be
            # one more trip to aiosqlite's thread for nothing.
            engine_args["pool_reset_on_return"] = None
        else:
            # Pinged on checkout only after a while idle (`_ping_if_idle`): pinging every
            # checkout is three round trips (BEGIN, the ping, ROLLBACK) before each
            # transaction, on the way to every message's first token.
            engine_args.update(pool_size=10, max_overflow=20)
            server_settings: dict[str, str] = {}
            if schema:
                # A private schema per test run keeps parallel tests apart.
                server_settings["search_path"] = schema
            if idle_transaction_seconds:
                # With several instances: a paused instance (a long GC pause, a frozen VM)
                # must not hold row locks its chats' new owner waits for; the server ends
                # its transaction, and the late commit fails.
                timeout_ms = round(idle_transaction_seconds * 1000)
                server_settings["idle_in_transaction_session_timeout"] = str(timeout_ms)
            if server_settings:
                connect_args["server_settings"] = server_settings
        self.engine: AsyncEngine = create_async_engine(
            self.url, connect_args=connect_args, **engine_args
        )
        if self.is_sqlite:
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
            event.listen(self.engine.sync_engine, "reset", _sqlite_reset)
        else:
            event.listen(self.engine.sync_engine, "checkin", _returned)

            def ping_if_idle(
                dbapi_connection: Any, record: ConnectionPoolEntry, _: PoolProxiedConnection
            ) -> None:
                _ping_if_idle(dbapi_connection, record, ping_after_idle)

            event.listen(self.engine.sync_engine, "checkout", ping_if_idle)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self._serial = asyncio.Lock() if self.is_sqlite else None
        # The statements `rows_on_driver` ran, compiled for SQLite.
        self._prepared: dict[ClauseElement, _Prepared] = {}

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """A session whose transaction commits on success and rolls back on error.

        On SQLite one transaction runs at a time: SQLite allows a single writer, and
        writers that wait on its busy timeout poll with growing sleeps, so under load the
        unlucky ones time out ("database is locked") while the lock holder is itself
        waiting for the event loop. Queuing here is first come, first served, and waits
        as long as it takes. PostgreSQL sessions run side by side.
        """
        serial = self._serial or contextlib.nullcontext()
        async with serial, self.sessions() as session, session.begin():
            yield session

    async def rows_on_driver(
        self, connection: AsyncConnection, statement: ClauseElement, params: Mapping[str, Any]
    ) -> list[Any]:
        """On SQLite, run a statement (an insert or update RETURNING rows) in `connection`'s
        transaction on the driver itself, in one trip to aiosqlite's thread, and return its
        rows. SQLAlchemy's own execution takes three trips (cursor, execute, close) and more
        event-loop CPU than SQLite takes to run a small statement: the statements of a
        message's way to its first token run this way. Each is compiled once, and its
        parameters processed by their SQLAlchemy types, as SQLAlchemy would."""
        assert self.is_sqlite
        prepared = self._prepared.get(statement)
        if prepared is None:
            prepared = self._prepared[statement] = _Prepared.of(statement, connection.dialect)
        try:
            args = prepared.arguments(params)
        except Exception as exc:
            # A value its type refuses: as SQLAlchemy reports it.
            raise StatementError(str(exc), prepared.sql, params, exc) from exc
        raw = await connection.get_raw_connection()
        driver = raw.driver_connection
        assert driver is not None
        try:
            return list(await driver.execute_fetchall(prepared.sql, args))
        except sqlite3.Error as exc:
            # As SQLAlchemy raises it, so that callers tell the errors apart the same way.
            raise DBAPIError.instance(prepared.sql, args, exc, sqlite3.Error) from exc

    async def run_prepared(
        self, connection: AsyncConnection, statement: ClauseElement, params: Mapping[str, Any]
    ) -> list[Any]:
        """Run a statement built once, in `connection`'s transaction: on SQLite on the driver
        (`rows_on_driver`), elsewhere through SQLAlchemy. Its rows, if it returns any."""
        if self.is_sqlite:
            return await self.rows_on_driver(connection, statement, params)
        result = await connection.execute(statement, params)  # type: ignore[call-overload]
        return list(result.all()) if result.returns_rows else []

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        """A connection in a transaction, as `session` (committed on success, one at a time
        on SQLite), without an ORM session: for the statements built once and run often,
        where the session's own work would cost more than the statements."""
        serial = self._serial or contextlib.nullcontext()
        async with serial, self.engine.begin() as connection:
            yield connection

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[AsyncConnection]:
        """A connection outside any transaction, for reads of statements built once
        (`run_prepared`): each sees what was committed when it ran. On PostgreSQL it is in
        autocommit, without the BEGIN and COMMIT round trips a transaction takes; on SQLite,
        where a read begins no transaction, without the commit's trip to the driver's
        thread, nor waiting for the writer under way (WAL: readers never wait for it)."""
        async with self.engine.connect() as connection:
            if not self.is_sqlite:
                await connection.execution_options(isolation_level="AUTOCOMMIT")
            yield connection

    async def migrate(self) -> None:
        """Bring the schema up to the newest migration.

        On PostgreSQL, instances that start together migrate one after the other: each
        takes a transaction-scoped advisory lock (one per schema) before it looks, so the
        first creates the tables and the others find them at the newest revision. Side by
        side, two `CREATE TABLE`s of one name collide in the catalogue
        (`pg_type_typname_nsp_index`) and the second instance fails to start.
        """
        async with self.engine.begin() as connection:
            if not self.is_sqlite:
                key = zlib.crc32(f"blogchat migrations {self.schema or ''}".encode())
                await connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
                if self.schema:
                    await connection.run_sync(_ensure_schema, self.schema)
            await connection.run_sync(_upgrade)

    async def dispose(self, *, drain: float = 10.0) -> None:
        """Close every pooled connection, once the writes that must complete have (those
        whose callers were cancelled: see `runs_to_completion`), for `drain` seconds."""
        if _finishing:
            _, late = await asyncio.wait(list(_finishing), timeout=drain)
            if late:
                log.error("%d store operation(s) did not finish before shutdown", len(late))
        await self.engine.dispose()


def _ensure_schema(connection: Connection, schema: str) -> None:
    # Look before creating: CREATE SCHEMA IF NOT EXISTS still needs the CREATE privilege on
    # the database, which a role that was handed an existing schema may lack.
    found = connection.scalar(
        text("SELECT 1 FROM pg_namespace WHERE nspname = :schema"), {"schema": schema}
    )
    if found is None:
        connection.execute(CreateSchema(schema, if_not_exists=True))


def _upgrade(connection: Connection) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


def _sqlite_reset(
    dbapi_connection: Any, _record: ConnectionPoolEntry, state: PoolResetState
) -> None:
    """A connection back in the pool: rolled back if a transaction is still open on it
    (one that failed half-way), as the pool's own reset would, and left alone otherwise."""
    if state.asyncio_safe and dbapi_connection.driver_connection.in_transaction:
        dbapi_connection.rollback()


def _returned(_dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
    record.info["returned_at"] = time.monotonic()


def _ping_if_idle(dbapi_connection: Any, record: ConnectionPoolEntry, after: float) -> None:
    """Ping a connection taken from the pool after `after` seconds idle there; one that
    fails the ping is replaced (the pool reconnects on DisconnectionError). A new
    connection, and one in steady use, go without."""
    returned = record.info.get("returned_at")
    if returned is None or time.monotonic() - returned < after:
        return
    try:
        dbapi_connection.ping()
    except Exception as exc:
        raise DisconnectionError(f"the idle connection failed its ping: {exc}") from exc


def _sqlite_pragmas(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers proceed while a turn writes; foreign keys make deletes cascade.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()

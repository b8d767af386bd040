"""Migrations: empty database to head, idempotent, identical to the ORM, reversible."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect, text

from blogchat.settings import Settings
from blogchat.store import Database
from blogchat.store.database import alembic_config
from blogchat.store.tables import User, metadata
from tests.support.server import Database as Backend
from tests.support.server import settings_for

TABLES = {table.name for table in metadata.sorted_tables}
HEAD = ScriptDirectory.from_config(alembic_config()).get_current_head()


@pytest.fixture
async def db(settings: Settings) -> AsyncIterator[Database]:
    """A connection to this test's empty database, nothing migrated yet."""
    database = Database(settings.database, schema=settings.database_schema)
    try:
        yield database
    finally:
        await database.dispose()


def _alembic(connection: Connection, action: str, revision: str) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    getattr(command, action)(config, revision)


async def alembic(db: Database, action: str, revision: str) -> None:
    """Run `alembic upgrade|downgrade <revision>` on the database."""
    async with db.engine.begin() as connection:
        await connection.run_sync(_alembic, action, revision)


def _state(connection: Connection) -> tuple[set[str], str | None]:
    tables = set(inspect(connection).get_table_names())
    return tables, MigrationContext.configure(connection).get_current_revision()


async def state(db: Database) -> tuple[set[str], str | None]:
    """The tables that exist and the revision alembic records."""
    async with db.engine.connect() as connection:
        return await connection.run_sync(_state)


def _differences(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, metadata))


async def differences(db: Database) -> list[Any]:
    """What autogenerate would change to make the schema match the ORM metadata."""
    async with db.engine.connect() as connection:
        return await connection.run_sync(_differences)


async def test_migrations_take_an_empty_database_to_head(db: Database) -> None:
    assert await state(db) == (set(), None)
    await db.migrate()
    assert HEAD is not None
    assert await state(db) == (TABLES | {"alembic_version"}, HEAD)


async def test_migrating_twice_changes_nothing_and_keeps_the_data(db: Database) -> None:
    await db.migrate()
    async with db.session() as session:
        session.add(User(id="u1"))
    await db.migrate()
    assert await state(db) == (TABLES | {"alembic_version"}, HEAD)
    assert await differences(db) == []
    async with db.session() as session:
        assert (await session.execute(text("SELECT id FROM users"))).scalars().all() == ["u1"]


async def test_the_migrated_schema_is_exactly_the_orm_metadata(db: Database) -> None:
    await db.migrate()
    assert await differences(db) == []


async def test_downgrade_to_base_and_upgrade_again(db: Database) -> None:
    await db.migrate()
    await alembic(db, "downgrade", "base")
    tables, revision = await state(db)
    assert revision is None
    assert not tables & TABLES, f"tables left after downgrade: {tables & TABLES}"
    await alembic(db, "upgrade", "head")
    assert await state(db) == (TABLES | {"alembic_version"}, HEAD)
    assert await differences(db) == []


async def test_an_empty_database_differs_from_the_metadata(db: Database) -> None:
    # Guards the comparison itself: on an unmigrated database it must see every table.
    missing = {diff[1].name for diff in await differences(db) if diff[0] == "add_table"}
    assert missing == TABLES


async def test_a_postgresql_schema_that_does_not_exist_yet_is_created(
    postgres_database: Backend, tmp_path: Path
) -> None:
    schema = f"t_{uuid.uuid4().hex[:16]}"
    db = Database(settings_for(postgres_database, tmp_path).database, schema=schema)
    try:
        await db.migrate()
        assert await state(db) == (TABLES | {"alembic_version"}, HEAD)
        async with db.engine.connect() as connection:
            placed = await connection.scalars(
                text("SELECT tablename FROM pg_tables WHERE schemaname = :schema"),
                {"schema": schema},
            )
            assert set(placed) == TABLES | {"alembic_version"}
        await db.migrate()  # and once it exists, it is simply used
    finally:
        async with db.engine.begin() as connection:
            await connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await db.dispose()


async def test_instances_starting_together_on_an_empty_database_all_start(
    postgres_database: Backend, tmp_path: Path
) -> None:
    # Several instances deployed at once each migrate at start-up: they must not collide.
    schema = f"t_{uuid.uuid4().hex[:16]}"
    url = settings_for(postgres_database, tmp_path).database
    instances = [Database(url, schema=schema) for _ in range(4)]
    try:
        await asyncio.gather(*(db.migrate() for db in instances))
        assert await state(instances[0]) == (TABLES | {"alembic_version"}, HEAD)
        assert await differences(instances[0]) == []
    finally:
        async with instances[0].engine.begin() as connection:
            await connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        for db in instances:
            await db.dispose()

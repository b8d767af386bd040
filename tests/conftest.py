"""Shared fixtures: a database per test (SQLite and PostgreSQL), a live server, readers."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import time_machine

from blogchat.settings import Settings
from tests.support.client import Reader
from tests.support.server import Database, LiveServer, settings_for
from tests.support.services import unavailable

# Fixture modules shared by several test files.
pytest_plugins = ["tests.support.browser", "tests.support.claude"]

POSTGRES_URL = os.environ.get(
    "BLOGCHAT_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


async def _postgres(statement: str) -> None:
    connection = await asyncpg.connect(POSTGRES_URL, timeout=5)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


def _postgres_available() -> str | None:
    try:
        asyncio.run(_postgres("SELECT 1"))
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        return f"PostgreSQL at {POSTGRES_URL} is not reachable ({exc})"
    return None


_POSTGRES_PROBLEM: str | bool | None = False


def _postgres_problem() -> str | None:
    global _POSTGRES_PROBLEM
    if _POSTGRES_PROBLEM is False:
        _POSTGRES_PROBLEM = _postgres_available()
    assert _POSTGRES_PROBLEM is not True
    return _POSTGRES_PROBLEM


@contextmanager
def _private_postgres_schema() -> Iterator[Database]:
    problem = _postgres_problem()
    if problem:
        unavailable(problem, ci_must="run every test on PostgreSQL too")
    schema = f"t_{uuid.uuid4().hex[:16]}"
    asyncio.run(_postgres(f"CREATE SCHEMA {schema}"))
    try:
        yield Database("postgresql", POSTGRES_URL, schema)
    finally:
        asyncio.run(_postgres(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A fresh, empty database for one test, on each backend in turn."""
    if request.param == "sqlite":
        yield Database("sqlite", f"sqlite+aiosqlite:///{tmp_path / 'blogchat.db'}")
        return
    with _private_postgres_schema() as database:
        yield database


@pytest.fixture
def postgres_database() -> Iterator[Database]:
    """A private PostgreSQL schema, for the tests of PostgreSQL-only behaviour."""
    with _private_postgres_schema() as database:
        yield database


@pytest.fixture
def make_settings(database: Database, tmp_path: Path) -> Callable[..., Settings]:
    """Settings for a server on this test's database; keyword arguments override."""

    def make(**overrides: Any) -> Settings:
        return settings_for(database, tmp_path / "data", **overrides)

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    """Default test settings (offline engine, streaming as fast as it can)."""
    return make_settings()


@pytest.fixture
def server(settings: Settings) -> Iterator[LiveServer]:
    """A live blogchat server on a free port, with this test's database."""
    live = LiveServer(settings).start()
    try:
        yield live
    finally:
        live.stop()


@pytest.fixture
async def reader(server: LiveServer) -> AsyncIterator[Reader]:
    """An anonymous visitor of the live server."""
    async with Reader(server.url) as visitor:
        yield visitor


@pytest.fixture
async def other_reader(server: LiveServer) -> AsyncIterator[Reader]:
    """A second, unrelated visitor."""
    async with Reader(server.url) as visitor:
        yield visitor


@pytest.fixture
def clock() -> Iterator[time_machine.Traveller]:
    """The wall clock, stopped now for the test and its in-process servers (not the event
    loops' monotonic clock); `clock.shift(seconds)` moves it. Rate limit windows, cookies
    and stored timestamps all read this clock (see `blogchat.ratelimit`)."""
    with time_machine.travel(time.time(), tick=False) as traveller:
        yield traveller

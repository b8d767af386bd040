"""Fixtures for tests of the Claude engine: the Anthropic test server and a blogchat server
whose chats run on the real SDK and its bundled CLI against it.

tests/conftest.py loads these fixtures for every test module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest

from blogchat.engines.claude import ClaudeEngine
from blogchat.engines.claude.process import AgentProcess
from blogchat.settings import Settings
from blogchat.tools import BlogTool
from tests.support.anthropic_server import AnthropicTestServer
from tests.support.client import Reader
from tests.support.server import LiveServer, ServerProcess

# Opus gets an id of its own, one the agent CLI would map onto a newer model unless told
# not to, so a test can tell it reached the provider exactly as configured.
OPUS_ID = "claude-opus-4-1"

# Fast failure handling: tests must not wait out real backoffs or watchdogs.
TEST_OVERRIDES: dict[str, Any] = {
    "provider_retries": 2,
    "provider_retry_delay": 0.05,
    "stall_seconds": 3.0,
    "thinking_budget": 2048,
    "max_turns": 6,
    "max_live_clients": 4,
    # No process started ahead, so that tests count exactly the processes their chats
    # need; the spares have tests of their own (test_claude_engine.py).
    "spare_processes": 0,
    "model_opus": OPUS_ID,
}


def claude_engine() -> str:
    """The Claude engine the live-server tests run on: `BLOGCHAT_ENGINE`, else agent-sdk
    (docs/engines.md, "Running the tests on either engine")."""
    return os.environ.get("BLOGCHAT_ENGINE") or "agent-sdk"


def claude_overrides(api: AnthropicTestServer, **overrides: Any) -> dict[str, Any]:
    """Settings that select a Claude engine, talking to this test server."""
    return {
        "anthropic_api_key": "test-key",
        "anthropic_base_url": api.base_url,
        "engine": claude_engine(),
        **TEST_OVERRIDES,
        **overrides,
    }


def cli_processes() -> list[psutil.Process]:
    """The agent CLI processes started by this test process."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.name() == "claude" and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def claude_process_env(api: AnthropicTestServer, agent_dir: Path) -> dict[str, str]:
    """The environment of a server process (`tests/support/server.py`'s `ServerProcess`) on
    the Agent SDK engine, talking to this test server. Servers that share `agent_dir` (as
    instances of one blog do) resume each other's stored transcripts."""
    overrides = {f"BLOGCHAT_{name.upper()}": str(value) for name, value in TEST_OVERRIDES.items()}
    return {
        **overrides,
        "ANTHROPIC_API_KEY": "test-key",
        "ANTHROPIC_BASE_URL": api.base_url,
        "BLOGCHAT_ENGINE": "agent-sdk",
        "BLOGCHAT_AGENT_DIR": str(agent_dir),
    }


def agent_processes(server: ServerProcess) -> list[psutil.Process]:
    """The agent CLI processes a server process started."""
    assert server.process is not None
    found = []
    for child in psutil.Process(server.process.pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if child.name() == "claude" and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
    return found


def gone(process: psutil.Process) -> bool:
    """Whether a process has exited."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_until(condition: Callable[[], bool], timeout: float = 15.0) -> bool:
    """Poll until `condition()` holds; False if it never did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def engine_of(server: LiveServer) -> ClaudeEngine:
    """The running server's Claude engine."""
    engine = server.state.engine
    assert isinstance(engine, ClaudeEngine)
    return engine


def ready_spare(server: LiveServer) -> AgentProcess:
    """The server's spare agent process, once it has started."""
    pool = engine_of(server).pool

    def ready() -> AgentProcess | None:
        return next(
            (p for p in pool.processes() if p.spare and p.state.value == "idle" and p.pid), None
        )

    assert wait_until(lambda: ready() is not None, timeout=60), "no spare process started"
    spare = ready()
    assert spare is not None
    return spare


@contextmanager
def claude_server_for(settings: Settings) -> Iterator[LiveServer]:
    """A live server on the Claude engine that leaves no CLI process behind when it stops."""
    server = LiveServer(settings).start()
    try:
        yield server
    finally:
        server.stop()
        # Shutdown closes every agent process; none may outlive the server.
        assert wait_until(lambda: not cli_processes(), 10), cli_processes()


def slow_down_tool(server: LiveServer, name: str, seconds: float) -> None:
    """Make one of the running server's blog tools take `seconds` longer (test only)."""
    tools = server.state.tools
    original: BlogTool = tools.all[name]

    def slow(arguments: Any) -> object:
        time.sleep(seconds)
        return original.run(arguments)

    tools.all[name] = dataclasses.replace(original, run=slow)


async def reader_with_cookie(server: LiveServer, cookie: str) -> Reader:
    """The same visitor (by its cookie) on another server, e.g. after a restart."""
    return await Reader(server.url, cookie=cookie).__aenter__()


@pytest.fixture
def api() -> Iterator[AnthropicTestServer]:
    """A Messages API test server of this test's own."""
    with AnthropicTestServer() as server:
        yield server


@pytest.fixture
def make_claude_settings(
    make_settings: Callable[..., Settings], api: AnthropicTestServer
) -> Callable[..., Settings]:
    """Settings for a Claude-engine server on this test's database; keywords override."""

    def make(**overrides: Any) -> Settings:
        return make_settings(**claude_overrides(api, **overrides))

    return make


@pytest.fixture
def claude_server(make_claude_settings: Callable[..., Settings]) -> Iterator[LiveServer]:
    """A live blogchat server whose chats run on Claude (the test server)."""
    with claude_server_for(make_claude_settings()) as server:
        yield server


@pytest.fixture
async def claude_reader(claude_server: LiveServer) -> AsyncIterator[Reader]:
    """An anonymous visitor of the Claude-engine server."""
    async with Reader(claude_server.url) as visitor:
        yield visitor

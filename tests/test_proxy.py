"""blogchat behind Debian's haproxy, configured as docs/deployment.md shows: the WebSocket
upgrade, the client address, health checks, and a backend that dies.

Each instance here has a database of its own (several instances sharing one database and
one chat are the cluster tests' business); what is tested is the proxy's part.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from tests.support.browser import record_measurement
from tests.support.client import Reader
from tests.support.haproxy import Backend, Haproxy, haproxy_problem
from tests.support.load import process_env
from tests.support.server import Database, ServerProcess

IN_CI = bool(os.environ.get("CI"))


@pytest.fixture
def proxied(tmp_path: Path) -> Iterator[tuple[Haproxy, list[ServerProcess]]]:
    """Two instances, each on its own SQLite database, behind one haproxy."""
    problem = haproxy_problem()
    if problem:
        if IN_CI:
            pytest.fail(f"{problem}; CI installs it (.ci/run)")
        pytest.skip(problem)
    with ExitStack() as stack:
        servers = []
        for name in ("a", "b"):
            database = Database("sqlite", f"sqlite+aiosqlite:///{tmp_path / name}.db")
            env = process_env(database, tmp_path / name, tokens_per_second=0)
            server = ServerProcess(env).start(tmp_path / f"{name}.log")
            stack.callback(server.stop)
            servers.append(server)
        proxy = stack.enter_context(
            Haproxy([Backend(n, s.port) for n, s in zip("ab", servers, strict=True)], tmp_path)
        )
        yield proxy, servers


async def test_a_chat_streams_through_the_proxy_and_requests_take_turns(
    proxied: tuple[Haproxy, list[ServerProcess]],
) -> None:
    proxy, _ = proxied
    before = proxy.sessions()
    async with Reader(proxy.url) as reader:
        me = await reader.me()
        assert me["anonymous"] is True
        ws = await reader.connect()
        await ws.chat("How warm should a sourdough starter be kept?")
        await ws.expect("chat_created")
        events = await ws.until("done")
        assert events[-1]["reason"] == "complete"
        assert any(e["type"] == "token" for e in events)
        await ws.close()
    after = proxy.sessions()
    # Round robin: both instances took part of the work.
    assert all(after[name] > before[name] for name in ("a", "b")), (before, after)


async def test_a_killed_instance_is_taken_out_and_every_new_reader_is_served(
    proxied: tuple[Haproxy, list[ServerProcess]],
) -> None:
    proxy, servers = proxied
    killed = time.monotonic()
    servers[0].kill()
    # Live traffic to the dead instance marks it down at once (observe layer4); without
    # traffic the health checks do within two intervals. Measured, never asserted.
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        for _ in range(4):
            assert (await client.get("/healthz")).status_code == 200
    proxy.wait_for("a", "DOWN", timeout=10)
    took = time.monotonic() - killed
    record_measurement("proxy: killed backend marked down with traffic", seconds=round(took, 3))
    assert proxy.states() == {"a": "DOWN", "b": "UP"}
    for _ in range(3):
        async with Reader(proxy.url) as reader:
            ws = await reader.connect()
            await ws.chat("sourdough")
            events = await ws.until("done")
            assert events[-1]["reason"] == "complete"
            await ws.close()


def test_a_dead_instance_is_marked_down_by_the_health_checks_alone(
    proxied: tuple[Haproxy, list[ServerProcess]],
) -> None:
    proxy, servers = proxied
    killed = time.monotonic()
    servers[1].kill()
    proxy.wait_for("b", "DOWN", timeout=10)
    took = time.monotonic() - killed
    record_measurement("proxy: health checks mark a killed backend down", seconds=round(took, 3))
    assert proxy.states()["a"] == "UP"

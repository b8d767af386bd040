"""Helpers for reliability tests: sizes that scale, flaky and stalled clients, server envs."""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import uuid
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import connect

from tests.support.client import COOKIE, ChatSocket, Event, Reader
from tests.support.server import REPO, Database, LiveServer, unlimited_env

# Multiplies the size of every reliability test: `BLOGCHAT_RELIABILITY_SCALE=10` turns the
# CI-sized runs into the full campaign (docs/performance.md).
SCALE = float(os.environ.get("BLOGCHAT_RELIABILITY_SCALE", "1"))


def scaled(size: int) -> int:
    """A CI-sized count, multiplied by the reliability scale."""
    return max(1, round(size * SCALE))


def seeded(name: str) -> tuple[random.Random, int]:
    """A random generator for a test, and its seed (set BLOGCHAT_RELIABILITY_SEED to replay)."""
    seed = int(
        os.environ.get("BLOGCHAT_RELIABILITY_SEED") or random.SystemRandom().randrange(2**32)
    )
    return random.Random(f"{name}-{seed}"), seed


def process_env(
    database: Database, data_dir: Path, *, tokens_per_second: float, **extra: str
) -> dict[str, str]:
    """Environment for `python -m blogchat serve` on a test's database (tests/test_crash.py)."""
    return {
        **database.env(),
        "BLOGCHAT_DATA_DIR": str(data_dir),
        "BLOGCHAT_CONTENT_DIR": str(REPO / "content"),
        "BLOGCHAT_PERSONAS_FILE": str(REPO / "config" / "personas.yaml"),
        "BLOGCHAT_SECRET_KEY": "reliability-test-secret-key-0123456789abcdef",
        "BLOGCHAT_OFFLINE_TOKENS_PER_SECOND": f"{tokens_per_second:g}",
        "BLOGCHAT_LOG_LEVEL": "WARNING",
        "ANTHROPIC_API_KEY": "",
        "BRAINTRUST_API_KEY": "",
        # As in settings_for: no title requests unless a test turns them on.
        "BLOGCHAT_CHAT_TITLES": "false",
        **unlimited_env(),
        **extra,
    }


def drop_connection(ws: ChatSocket) -> None:
    """Drop a connection the way a network does: no close frame, the socket just goes."""
    transport = ws.connection.transport
    transport.abort()


async def stalled_socket(reader: Reader, *, receive_buffer: int = 4096) -> ChatSocket:
    """A connection whose reader can stop reading: small kernel buffers, no compression,
    and a client queue that stops pulling from the socket after one unread frame."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    host = reader.base_url.split("://", 1)[1]
    address, port = host.rsplit(":", 1)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (address, int(port)))
    connection = await connect(
        reader.base_url.replace("http://", "ws://") + "/ws",
        sock=sock,
        origin=reader.base_url,  # type: ignore[arg-type]
        additional_headers={"Cookie": f"{COOKIE}={reader.cookie}"},
        compression=None,
        max_size=None,
        max_queue=1,
        open_timeout=10,
    )
    stalled = ChatSocket(connection)
    reader.sockets.append(stalled)
    return stalled


def seq_events(events: list[Event]) -> list[Event]:
    """The transcript events among some messages."""
    return [event for event in events if "seq" in event]


def client_message_id() -> str:
    """A fresh clientMessageId."""
    return str(uuid.uuid4())


def frame(**message: Any) -> str:
    """A client frame."""
    return json.dumps(message)


def squeeze_server_send_buffer(server: LiveServer, ws: ChatSocket, size: int = 4096) -> None:
    """Shrink the server's kernel send buffer for one client connection.

    On loopback Linux grows that buffer to megabytes (tcp_wmem), so a stalled reader would
    take tens of thousands of frames to reach blogchat's own limit; a small buffer stands
    for a slow network path.
    """
    local = ws.connection.transport.get_extra_info("sockname")
    for protocol in server.server.server_state.connections:
        transport = getattr(protocol, "transport", None)
        if transport is None or transport.get_extra_info("peername") != local:
            continue
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
        return
    raise AssertionError("no server-side connection for this client")


async def rest_get(reader: Reader, path: str) -> httpx.Response:
    """GET with the visitor's cookie, retried once if the server closed the kept-alive
    connection just as it was reused (uvicorn drops idle ones after 5 s; browsers retry)."""
    try:
        return await reader.http.get(path)
    except httpx.RemoteProtocolError:
        return await reader.http.get(path)

"""Slow clients on a live server, over raw sockets: request headers must arrive in time."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator

import httpx
import pytest

from blogchat.cli import uvicorn_config
from blogchat.settings import Settings
from blogchat.web.connections import HeaderDeadlineProtocol
from tests.support.client import Reader
from tests.support.server import LiveServer, running

HEADER_TIMEOUT = 0.5


@pytest.fixture
def impatient_server(make_settings: Callable[..., Settings]) -> Iterator[LiveServer]:
    """A server that waits only half a second for a request's headers."""
    with running(make_settings(header_timeout=HEADER_TIMEOUT)) as live:
        yield live


def connect(server: LiveServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=30)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (or 30 s pass)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def read_response(sock: socket.socket) -> bytes:
    """One whole response (headers, then as many body bytes as Content-Length says): a
    single recv may return only part of it."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_a_client_that_sends_half_a_header_line_is_answered_408_and_disconnected(
    impatient_server: LiveServer,
) -> None:
    with connect(impatient_server) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Ag")
        reply = read_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert reply.endswith(b"\r\n\r\nRequest headers took too long.")


def test_a_connection_that_sends_nothing_is_closed(impatient_server: LiveServer) -> None:
    with connect(impatient_server) as sock:
        assert read_until_closed(sock).startswith(b"HTTP/1.1 408 ")


def test_a_kept_alive_connection_gets_the_deadline_again_for_its_next_request(
    impatient_server: LiveServer,
) -> None:
    with connect(impatient_server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        first = read_response(sock)
        assert first.startswith(b"HTTP/1.1 200 ")
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHo")
        assert read_until_closed(sock).startswith(b"HTTP/1.1 408 ")


def test_many_slow_clients_are_all_dropped_and_others_are_served_meanwhile(
    impatient_server: LiveServer,
) -> None:
    slow = [connect(impatient_server) for _ in range(200)]
    try:
        for sock in slow:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        assert httpx.get(f"{impatient_server.url}/healthz", timeout=30).status_code == 200
        for sock in slow:
            assert read_until_closed(sock).startswith(b"HTTP/1.1 408 ")
    finally:
        for sock in slow:
            sock.close()


async def test_a_websocket_outlives_the_header_deadline(impatient_server: LiveServer) -> None:
    async with Reader(impatient_server.url) as reader:
        ws = await reader.connect()
        # A slow client's disconnection marks the moment the deadline has passed.
        with connect(impatient_server) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\n")
            assert read_until_closed(sock).startswith(b"HTTP/1.1 408 ")
        await ws.chat("How do I dial in espresso at home?")
        await ws.expect("chat_created")
        assert (await ws.until("done"))[-1]["reason"] == "complete"


def test_serve_waits_10_seconds_for_headers_by_default(settings: Settings) -> None:
    config = uvicorn_config(None, settings, host="127.0.0.1", port=0)  # type: ignore[arg-type]
    assert isinstance(config.http, type)
    assert issubclass(config.http, HeaderDeadlineProtocol)
    assert config.http.header_timeout == 10
    assert config.forwarded_allow_ips == ["127.0.0.1", "::1"]

"""Request bodies on a live server, over raw sockets: capped in size and in time, on any route."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable

import httpx
import pytest

from blogchat.settings import Settings
from tests.support.server import LiveServer, running

MIB = 1024 * 1024
CHUNK = 64 * 1024


def raw_connection(server: LiveServer) -> socket.socket:
    """A plain TCP connection to the server, with a generous timeout for every read."""
    return socket.create_connection(("127.0.0.1", server.port), timeout=30)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes, bool]:
    """Status, headers, body, and whether the server then closed the connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {
        name.strip().lower(): value.strip()
        for name, value in (line.split(":", 1) for line in lines)
    }
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed in the middle of the response body"
        body += chunk
    try:
        closed = sock.recv(65536) == b""
    except ConnectionResetError:
        closed = True  # closed with some of what we sent still unread: the kernel resets
    return int(status_line.split()[1]), headers, body, closed


def post_head(path: str, *headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", *headers, "", ""]
    return "\r\n".join(lines).encode()


@pytest.mark.parametrize(
    "path", ["/api/auth/login", "/login", "/api/chats/x", "/", "/static/css/site.css", "/ws"]
)
def test_a_declared_body_over_the_cap_is_refused_before_it_is_read(
    server: LiveServer, path: str
) -> None:
    with raw_connection(server) as sock:
        # 200 MB announced, not one byte of it sent: the answer cannot have waited for it.
        sock.sendall(
            post_head(path, f"Content-Length: {200 * MIB}", "Content-Type: application/json")
        )
        status, headers, body, closed = read_response(sock)
    assert status == 413
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {
        "detail": "The request body is larger than 1 MiB.",
        "code": "too_large",
    }
    assert closed, "the connection is closed rather than the rest of the body read"


def test_a_streamed_body_is_refused_as_it_passes_the_cap(server: LiveServer) -> None:
    with raw_connection(server) as sock:
        sock.sendall(
            post_head(
                "/api/auth/login", "Transfer-Encoding: chunked", "Content-Type: application/json"
            )
        )
        # Just over 1 MiB of a body that would go on: the server answers without the rest.
        for _ in range(MIB // CHUNK + 1):
            sock.sendall(b"%x\r\n%s\r\n" % (CHUNK, b" " * CHUNK))
        status, _, body, closed = read_response(sock)
    assert status == 413
    assert json.loads(body)["code"] == "too_large"
    assert closed


def test_a_body_at_the_cap_is_read_and_answered_by_the_route(server: LiveServer) -> None:
    body = json.dumps({"email": "a@example.com", "password": "x"}).encode()
    body = body[:-1] + b" " * (MIB - len(body)) + b"}"
    assert len(body) == MIB
    response = httpx.post(
        f"{server.url}/api/auth/login",
        content=body,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 401, response.text


def test_the_cap_is_a_setting(make_settings: Callable[..., Settings]) -> None:
    with running(make_settings(max_body_bytes=4096)) as server:
        small = httpx.post(f"{server.url}/api/auth/login", content=b"x" * 4096, timeout=30)
        large = httpx.post(f"{server.url}/api/auth/login", content=b"x" * 4097, timeout=30)
    assert small.status_code == 422, "read by the route"
    assert large.status_code == 413
    assert large.json()["detail"] == "The request body is larger than 4 KiB."


@pytest.mark.parametrize("transfer", ["Content-Length: 100", "Transfer-Encoding: chunked"])
def test_a_body_that_trickles_in_too_slowly_gets_408_and_the_connection_closes(
    make_settings: Callable[..., Settings], transfer: str
) -> None:
    with running(make_settings(body_timeout=0.5)) as server, raw_connection(server) as sock:
        sock.sendall(post_head("/api/auth/login", transfer, "Content-Type: application/json"))
        sock.sendall(b'{"email"' if "Length" in transfer else b'8\r\n{"email"\r\n')
        # Then nothing more: the client only waits for the server to give up on it.
        status, _, body, closed = read_response(sock)
    assert status == 408
    assert json.loads(body) == {
        "detail": "The request body took too long to arrive.",
        "code": "timeout",
    }
    assert closed


def test_a_server_refusing_bodies_still_serves_everyone_else(server: LiveServer) -> None:
    for _ in range(20):
        with raw_connection(server) as sock:
            sock.sendall(post_head("/api/auth/login", f"Content-Length: {200 * MIB}"))
            assert read_response(sock)[0] == 413
    assert httpx.get(f"{server.url}/healthz", timeout=30).status_code == 200

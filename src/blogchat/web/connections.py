"""HTTP connections: a request's headers must arrive within a deadline (against slowloris).

uvicorn bounds how long a kept-alive connection may sit idle between requests
(`timeout_keep_alive`), but nothing bounds how long the headers of a request may take once
its first byte arrived, nor the first request of a new connection. A client that sends half
a header line and waits holds its connection (and a file descriptor) for as long as it
likes, and a few thousand such clients exhaust the server. This protocol, a small subclass
of uvicorn's httptools protocol (the one `uvicorn[standard]` picks), starts a timer when a
connection opens and whenever a new request begins, and stops it when the headers are
complete. When it fires, the client gets a 408 and the connection is closed.

The body is not covered here: the app reads it, under its own deadline (`web/bodies.py`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

_TIMEOUT_MESSAGE = b"Request headers took too long."
_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: %d\r\n"
    b"connection: close\r\n"
    b"\r\n"
    b"%s"
) % (len(_TIMEOUT_MESSAGE), _TIMEOUT_MESSAGE)


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol, closing connections whose request headers come too slowly."""

    # Set by `with_header_timeout`; a class attribute because uvicorn builds protocols itself.
    header_timeout: float = 10.0

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._header_deadline: asyncio.TimerHandle | None = None

    @classmethod
    def with_header_timeout(cls, seconds: float) -> type[HeaderDeadlineProtocol]:
        """This protocol with its own header deadline, for one server's config."""
        return type(cls.__name__, (cls,), {"header_timeout": seconds})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_header_deadline()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        # The first request's deadline runs from the connection's start, not its first byte;
        # a later request's from its first byte (the idle time before it is keep-alive's).
        if self._header_deadline is None:
            self._start_header_deadline()

    def on_headers_complete(self) -> None:
        self._stop_header_deadline()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_deadline()
        super().connection_lost(exc)

    def _start_header_deadline(self) -> None:
        self._stop_header_deadline()
        self._header_deadline = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _stop_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            self.transport.write(_TIMEOUT_RESPONSE)
            self.transport.close()

"""Request bodies: at most so many bytes, arriving within so many seconds, on every route.

Starlette and FastAPI read a body whole, as fast as the client sends it, into memory; uvicorn
only stops reading from the socket while the app is not asking for more. So the cap must sit
in front of the app: a declared `Content-Length` over the cap is refused before a byte of
the body is read, and a chunked body is counted as it streams and refused the moment it
passes the cap. Either way the connection is closed after the refusal, so the rest of the
body is never read.
"""

from __future__ import annotations

import asyncio

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_DISCONNECT: Message = {"type": "http.disconnect"}


class BodyLimit:
    """Refuses request bodies over `max_bytes` (413) or slower than `timeout` seconds (408)."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, timeout: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large()(scope, receive, send)
            return
        await _LimitedRequest(self, scope, receive, send).run()

    def _too_large(self) -> JSONResponse:
        return _refusal(
            413, f"The request body is larger than {_size(self.max_bytes)}.", "too_large"
        )


class _LimitedRequest:
    """One request whose body is counted and timed as the app reads it."""

    def __init__(self, limit: BodyLimit, scope: Scope, receive: Receive, send: Send) -> None:
        self.limit = limit
        self.scope = scope
        self._receive = receive
        self._send = send
        self.received = 0
        self.body_complete = False
        self.response_started = False
        self.refused = False
        self.deadline = asyncio.get_running_loop().time() + limit.timeout

    async def run(self) -> None:
        await self.limit.app(self.scope, self.receive, self.send)

    async def receive(self) -> Message:
        if self.refused:
            return _DISCONNECT
        if self.body_complete:
            # Past the body the app only waits for the client to go away: no deadline.
            return await self._receive()
        try:
            async with asyncio.timeout_at(self.deadline):
                message = await self._receive()
        except TimeoutError:
            await self._refuse(
                _refusal(408, "The request body took too long to arrive.", "timeout")
            )
            return _DISCONNECT
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit.max_bytes:
                await self._refuse(self.limit._too_large())
                return _DISCONNECT
            self.body_complete = not message.get("more_body", False)
        return message

    async def send(self, message: Message) -> None:
        if self.refused:
            return  # the app's own answer to a body it never got whole; ours went out
        if message["type"] == "http.response.start":
            self.response_started = True
        await self._send(message)

    async def _refuse(self, response: JSONResponse) -> None:
        self.refused = True
        if not self.response_started:
            await response(self.scope, self._refused_receive, self._send)

    async def _refused_receive(self) -> Message:
        return _DISCONNECT


def _refusal(status: int, detail: str, code: str) -> JSONResponse:
    # `Connection: close`: uvicorn then closes the socket after the answer instead of reading
    # (and discarding) the rest of the body to reach a next request.
    return JSONResponse(
        {"detail": detail, "code": code}, status_code=status, headers={"Connection": "close"}
    )


def _size(count: int) -> str:
    if count % (1024 * 1024) == 0:
        return f"{count // (1024 * 1024)} MiB"
    if count % 1024 == 0:
        return f"{count // 1024} KiB"
    return f"{count} bytes"

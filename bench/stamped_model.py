"""A Messages API stand-in whose every text delta is the moment it was sent.

Run as `python -m bench.stamped_model --tokens 200 --rate 50`: it prints its base URL on the
first line of stdout and serves until its stdin closes. Every `POST /v1/messages` gets a
streamed answer of N text deltas, each `<CLOCK_MONOTONIC seconds> ` taken as it is
written, paced `rate` a second on a fixed schedule (0: as fast as it can). The monotonic
clock is the machine's, so a reader in another process computes each token's delay from
the model to itself. In a process of its own, it competes with neither the benchmark's
clients nor blogchat for the GIL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


def _event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


def app_for(tokens: int, rate: float) -> Starlette:
    """The stand-in: every request streams `tokens` stamped deltas."""

    async def answer(model: str) -> AsyncIterator[bytes]:
        message: dict[str, Any] = {
            "id": f"msg_{uuid.uuid4().hex[:24]}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 20, "output_tokens": 1},
        }
        yield _event("message_start", {"type": "message_start", "message": message})
        block = {"type": "text", "text": ""}
        yield _event(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": block},
        )
        start = time.monotonic()
        for index in range(tokens):
            if rate > 0:
                wait = start + index / rate - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
            delta = {"type": "text_delta", "text": f"{time.monotonic():.6f} "}
            yield _event(
                "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}
            )
        yield _event("content_block_stop", {"type": "content_block_stop", "index": 0})
        yield _event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": tokens},
            },
        )
        yield _event("message_stop", {"type": "message_stop"})

    async def messages(request: Request) -> Response:
        body = await request.json()
        if not body.get("stream"):
            return JSONResponse({"type": "error", "error": {"type": "invalid_request_error"}}, 400)
        return StreamingResponse(
            answer(str(body.get("model") or "claude-test")), media_type="text/event-stream"
        )

    async def other(request: Request) -> Response:
        return JSONResponse({"type": "error", "error": {"type": "not_found_error"}}, 404)

    return Starlette(
        routes=[
            Route("/v1/messages", messages, methods=["POST"]),
            Route("/{path:path}", other, methods=["GET", "HEAD", "POST"]),
        ]
    )


def main() -> None:
    """Serve until stdin closes."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--rate", type=float, default=50)
    args = parser.parse_args()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app_for(args.tokens, args.rate), log_level="warning", backlog=2048, timeout_keep_alive=60
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    print(f"http://127.0.0.1:{port}", flush=True)
    sys.stdin.read()
    server.should_exit = True
    thread.join(timeout=10)


if __name__ == "__main__":
    main()

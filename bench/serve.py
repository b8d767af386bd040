"""A blogchat server for benchmarks: the real app, optionally on a scripted engine.

Run as `python -m bench.serve --port 8123 [--engine scripted] [--no-deflate]`, with the
usual environment variables (DATABASE_URL, BLOGCHAT_DATA_DIR, ...).

The scripted engine stands in for a model whose timing is known exactly: every token it
yields carries the monotonic clock (CLOCK_MONOTONIC, shared by every process of the
machine) at the moment it was produced, so a client can measure the delay between a token
leaving the engine and reaching it. A question sets the answer's shape with `key=value`
words: `tokens=5000 rate=0` streams 5,000 tokens as fast as it can, `rate=50` paces them
at 50 per second on an absolute schedule (a slow loop makes tokens late, never fewer).

The server also serves `/bench/blast`, a WebSocket with no blogchat logic at all: it sends
back, as fast as it can, the frames of a chat's event log. It is the floor that replay
times are compared with: the same frames through the same server and client, minus the hub.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import logging
import re
import signal
import sys
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from starlette.websockets import WebSocket, WebSocketDisconnect

import blogchat.app as app_module
from blogchat.cli import uvicorn_config
from blogchat.engines.base import (
    AgentEngine,
    EngineEvent,
    TextDelta,
    TurnEnded,
    TurnRequest,
)
from blogchat.settings import load_settings

MODEL = "scripted"
_OPTION = re.compile(r"\b(tokens|rate)=([0-9.]+)\b")


class ScriptedEngine(AgentEngine):
    """Streams `tokens` time-stamped tokens at `rate` per second (0: as fast as it can)."""

    name = "scripted"

    def __init__(self, *, tokens: int = 200, rate: float = 50.0) -> None:
        self.tokens = tokens
        self.rate = rate

    async def run_turn(
        self, request: TurnRequest, stop: asyncio.Event
    ) -> AsyncGenerator[EngineEvent, None]:
        """Yield the tokens the question asks for, then end the turn."""
        options = {key: float(value) for key, value in _OPTION.findall(request.text)}
        count = int(options.get("tokens", self.tokens))
        rate = options.get("rate", self.rate)
        interval_ns = int(1e9 / rate) if rate > 0 else 0
        start = time.monotonic_ns()
        for index in range(count):
            if stop.is_set():
                yield TurnEnded(reason="stopped", model=MODEL, output_tokens=index)
                return
            if interval_ns:
                due = start + index * interval_ns
                wait = due - time.monotonic_ns()
                if wait > 0:
                    # A stop ends the wait at once: a stop's latency is blogchat's own.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), wait / 1e9)
                    if stop.is_set():
                        yield TurnEnded(reason="stopped", model=MODEL, output_tokens=index)
                        return
            elif index % 256 == 255:
                # Even "as fast as it can" lets the loop breathe, as a network read would.
                await asyncio.sleep(0)
            yield TextDelta(f"t{time.monotonic_ns()} ")
        yield TurnEnded(reason="complete", model=MODEL, input_tokens=1, output_tokens=count)


def add_blast_route(app: FastAPI) -> None:
    """`/bench/blast`: given "<chatId> <afterSeq>", send the frames the chat's event log
    holds after that seq, then a pong; no hub, no session, no queue."""

    async def blast(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            while True:
                chat_id, after_seq = (await websocket.receive_text()).split()
                session = app.state.sessions.get(chat_id)
                frames = (session.log.since(int(after_seq)) or []) if session else []
                for frame in frames:
                    await websocket.send_text(frame)
                await websocket.send_text('{"type":"pong"}')
        except WebSocketDisconnect:
            return

    app.add_api_websocket_route("/bench/blast", blast)


def main() -> None:
    """Serve blogchat on the given port, with the engine the arguments choose."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--engine", choices=["default", "scripted"], default="default")
    parser.add_argument(
        "--no-deflate", action="store_true", help="refuse permessage-deflate (compression)"
    )
    parser.add_argument("--profile", type=Path, help="write cProfile statistics here at exit")
    args = parser.parse_args()
    settings = load_settings()
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    )
    if args.engine == "scripted":

        def scripted(*_: Any) -> AgentEngine:
            return ScriptedEngine()

        # The benchmark swaps the model for a clock; everything else is the real app.
        app_module.make_engine = scripted  # type: ignore[assignment]
    app = app_module.create_app(settings)
    add_blast_route(app)
    config = uvicorn_config(app, settings, host="127.0.0.1", port=args.port)
    if args.no_deflate:
        config.ws_per_message_deflate = False
    if args.profile is None:
        uvicorn.Server(config).run()
        return
    # uvicorn re-raises the SIGTERM it handled once it has shut down; exit through Python
    # then, so that the statistics get written.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        uvicorn.Server(config).run()
    finally:
        profiler.disable()
        profiler.dump_stats(args.profile)


if __name__ == "__main__":
    main()

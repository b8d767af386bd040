"""Relay overhead: what blogchat adds between the model's stream and a reader's WebSocket.

Run with `uv run python bench/bench_relay.py`. The Anthropic test server (in a process of
its own, `bench/anthropic_serve.py`) answers every request with N text deltas as fast as it
can. Round after round, in rotating order, three readers take the same answer:

- direct: an HTTP client reading the test server's SSE stream itself;
- engine: blogchat's Claude engine driven in this process (the Claude Agent SDK and its CLI,
  through `bench/bench_claude.py`'s harness), no hub, no session, no socket;
- blogchat: a WebSocket client of a blogchat server (its own process) on the Claude engine.

Every path is timed from sending the question to the first text token (TTFT), and by its
delivery rate (tokens per second from the first token to the last). Chats are warm (their
agent process is running); first turns are the Claude engine benchmark's business. The
differences are paired by round: blogchat - engine is the relay (hub, session, store,
socket), engine - direct is the agent CLI and SDK.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_claude import Bench, settings_for
from bench.support import (
    Row,
    anthropic_api,
    chat_frame,
    goal_row,
    info_row,
    new_visitor,
    open_socket,
    print_rows,
    server,
    summarize,
)
from blogchat.engines.base import TextDelta, TurnEnded, TurnRequest

BENCH = "1. relay"
GOAL_TTFT_P50_MS = 5.0
GOAL_TTFT_P99_MS = 20.0
GOAL_RATE = 0.90
# Every request of the agent loop carries this identity; the test server answers requests
# without it as side requests (a short "OK").
IDENTITY = "You are a Claude agent, built on Anthropic's Claude Agent SDK."
QUESTION = "Tell me everything."


@dataclass(frozen=True)
class Take:
    """One reader's view of one answer."""

    ttft: float
    # Tokens per second from the first token to the last (how fast the stream flows)...
    rate: float
    # ...and over the whole answer, from the question on (what a reader waits for).
    whole: float
    tokens: int


def take(started: float, stamps: list[float]) -> Take:
    """TTFT and delivery rates from the token arrival times."""
    assert stamps, "no token arrived"
    span = stamps[-1] - stamps[0]
    rate = (len(stamps) - 1) / span if span > 0 else float("inf")
    return Take(stamps[0] - started, rate, len(stamps) / (stamps[-1] - started), len(stamps))


def direct_client(base_url: str) -> httpx.AsyncClient:
    """The plain HTTP client of the baseline: a new connection for every request.

    On a kept-alive connection, a request that follows a pause (the other paths' turn in
    the round) gets the test server's first bytes about 40 ms late, every time (measured:
    45 ms p50 with a 30 ms pause, 3 ms on new connections). That is the local server's
    artifact, and it would make the baseline the slowest path of all.
    """
    limits = httpx.Limits(max_keepalive_connections=0)
    return httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits)


async def direct(http: httpx.AsyncClient) -> Take:
    """Read the test server's stream with a plain HTTP client (see `direct_client`)."""
    body = {
        "model": "claude-haiku-4-5",
        "max_tokens": 4096,
        "stream": True,
        "system": [{"type": "text", "text": IDENTITY}],
        "messages": [{"role": "user", "content": QUESTION}],
    }
    headers = {"x-api-key": "bench-key", "anthropic-version": "2023-06-01"}
    stamps: list[float] = []
    started = time.perf_counter()
    async with http.stream("POST", "/v1/messages", json=body, headers=headers) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: ") and '"text_delta"' in line:
                stamps.append(time.perf_counter())
    return take(started, stamps)


async def engine(bench: Bench, chat_id: str) -> Take:
    """Drive the Claude engine directly, as a chat session would."""
    assert bench.engine is not None
    request = TurnRequest(
        chat_id=chat_id,
        text=QUESTION,
        persona=bench.content.personas.default,
        model_alias="haiku",
        model_id=bench.settings.model_haiku,
    )
    stamps: list[float] = []
    started = time.perf_counter()
    async for event in bench.engine.run_turn(request, asyncio.Event()):
        if isinstance(event, TextDelta):
            stamps.append(time.perf_counter())
        elif isinstance(event, TurnEnded) and event.reason != "complete":
            raise RuntimeError(f"engine turn ended {event.reason}")
    return take(started, stamps)


async def through_blogchat(ws: Any, chat_id: str) -> Take:
    """Ask over a blogchat WebSocket and read to `done`."""
    stamps: list[float] = []
    started = time.perf_counter()
    await ws.send(chat_frame(QUESTION, chat_id))
    while True:
        frame = await ws.recv()
        if '"type":"token"' in frame:
            stamps.append(time.perf_counter())
            continue
        event = json.loads(frame)
        if event["type"] == "done":
            if event["reason"] != "complete":
                raise RuntimeError(f"blogchat turn ended {event['reason']}")
            return take(started, stamps)
        if event["type"] == "error":
            raise RuntimeError(f"blogchat error: {event}")


async def measure_against(
    base_url: str, rounds: int, tokens: int, **server_options: Any
) -> dict[str, list[Take]]:
    """The three paths against one test server."""
    claude_env = {
        "ANTHROPIC_API_KEY": "bench-key",
        "ANTHROPIC_BASE_URL": base_url,
        "BLOGCHAT_PROVIDER_RETRIES": "0",
        "BLOGCHAT_THINKING_BUDGET": "0",
    }
    samples: dict[str, list[Take]] = {"direct": [], "engine": [], "blogchat": []}
    with (
        server(engine="default", env=claude_env, **server_options) as blogchat,
        tempfile.TemporaryDirectory(prefix="bench-relay-") as tmp,
    ):
        api = SimpleNamespace(base_url=base_url)
        settings = settings_for(api, Path(tmp), thinking_budget=0)  # type: ignore[arg-type]
        async with (
            Bench(settings) as bench,
            direct_client(base_url) as http,
        ):
            async with httpx.AsyncClient(base_url=blogchat.url) as visitor:
                cookie = await new_visitor(visitor)
            ws = await open_socket(blogchat.url, cookie)
            await ws.send(chat_frame(QUESTION))
            chat_id = ""
            while True:  # the first turn starts the chat's agent process: not measured
                event = json.loads(await ws.recv())
                chat_id = event.get("chatId", chat_id)
                if event["type"] == "done":
                    break
            engine_chat = str(uuid.uuid4())
            await engine(bench, engine_chat)
            await direct(http)

            paths = {
                "direct": lambda: direct(http),
                "engine": lambda: engine(bench, engine_chat),
                "blogchat": lambda: through_blogchat(ws, chat_id),
            }
            names = list(paths)
            for index in range(rounds):
                shift = index % len(names)
                for name in names[shift:] + names[:shift]:
                    samples[name].append(await paths[name]())
            await ws.close()
    return samples


def rows_for(
    samples: dict[str, list[Take]], tokens: int, paced: dict[str, list[Take]], rate: float
) -> list[Row]:
    """Turn the takes into table rows."""
    ttft = {name: summarize([t.ttft for t in takes]) for name, takes in samples.items()}
    speed = {name: summarize([t.rate for t in takes]) for name, takes in samples.items()}
    pairs = list(zip(samples["blogchat"], samples["engine"], samples["direct"], strict=True))
    relay = summarize([b.ttft - e.ttft for b, e, _ in pairs])
    cli = summarize([e.ttft - d.ttft for _, e, d in pairs])
    share = summarize([b.rate / d.rate for b, _, d in pairs])
    of_engine = summarize([b.rate / e.rate for b, e, _ in pairs])
    rows = [
        goal_row(
            BENCH,
            "TTFT added by blogchat over the engine, p50",
            measured=relay.p50 * 1000,
            goal=GOAL_TTFT_P50_MS,
            unit="ms",
            shown=f"{relay.p50 * 1000:.1f} ms (n={relay.n})",
        ),
        goal_row(
            BENCH,
            "TTFT added by blogchat over the engine, p99",
            measured=relay.p99 * 1000,
            goal=GOAL_TTFT_P99_MS,
            unit="ms",
            shown=f"{relay.p99 * 1000:.1f} ms (n={relay.n})",
        ),
        goal_row(
            BENCH,
            "delivery rate through blogchat / direct",
            measured=share.p50,
            goal=GOAL_RATE,
            unit="",
            shown=f"{share.p50:.2f} p50 (of engine: {of_engine.p50:.2f})",
            higher_is_better=True,
        ),
        info_row(
            BENCH,
            "TTFT added by the agent CLI + SDK over direct",
            f"{cli.p50 * 1000:.1f} / {cli.p99 * 1000:.1f} ms p50 / p99",
        ),
    ]
    for name in samples:
        rows.append(
            info_row(
                BENCH,
                f"{name}: TTFT; delivery rate ({tokens} tokens)",
                f"{ttft[name].ms()}; {speed[name].p50:,.0f} tokens/s p50",
            )
        )
    if paced:
        # Paced, tokens may come through in bunches, which makes a first-to-last rate look
        # faster than the source: compare whole answers instead.
        kept = summarize(
            [b.whole / d.whole for b, d in zip(paced["blogchat"], paced["direct"], strict=True)]
        )
        rows.append(
            goal_row(
                BENCH,
                f"whole-answer rate through blogchat / direct, model paced at {rate:g} tokens/s",
                measured=kept.p50,
                goal=GOAL_RATE,
                unit="",
                shown=f"{kept.p50:.2f} p50 (n={kept.n})",
                higher_is_better=True,
            )
        )
    return rows


def main(argv: list[str] | None = None) -> list[Row]:
    """Parse arguments, run, print; returns the rows for the runner."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--tokens", type=int, default=500, help="text deltas per answer")
    parser.add_argument(
        "--paced-rate", type=float, default=1000, help="second pass: the model's pace"
    )
    parser.add_argument("--paced-rounds", type=int, default=5)
    parser.add_argument("--profile", type=Path, help="profile the blogchat server into this file")
    parser.add_argument(
        "--no-deflate", action="store_true", help="readers do not negotiate compression"
    )
    args = parser.parse_args(argv)
    options: dict[str, Any] = {"profile": args.profile}
    if args.no_deflate:
        options["deflate"] = False
    with anthropic_api(args.tokens) as base_url:
        unpaced = asyncio.run(measure_against(base_url, args.rounds, args.tokens, **options))
    with anthropic_api(args.tokens, args.paced_rate) as base_url:
        paced = asyncio.run(measure_against(base_url, args.paced_rounds, args.tokens, **options))
    rows = rows_for(unpaced, args.tokens, paced, args.paced_rate)
    print_rows(f"Relay ({args.rounds} rounds of {args.tokens} tokens)", rows)
    return rows


if __name__ == "__main__":
    main()

"""Resume: how long re-subscribing takes to replay a long turn (goal: 5,000 events < 100 ms).

Run with `uv run python bench/bench_resume.py`. One chat streams a 5,000-token answer (the
scripted engine, as fast as it can); then, round after round, fresh connections measure
side by side, in rotating order:

- replay: `subscribe` with the `afterSeq` of the turn's user message, until its `done`
  (5,001 events: the tokens and the `done`);
- floor: the same 5,001 frames sent by a bare WebSocket route of the same server process
  (`/bench/blast`: no hub, no session, no queue), read by the same client code. What
  separates replay from floor is what blogchat adds;
- nothing to replay: `subscribe` with the last seq, until `subscribed`;
- history: `subscribe` without `afterSeq`, until `subscribed` with the whole transcript.

Each figure is from sending the request to having read the last frame, on the client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.support import (
    Row,
    goal_row,
    info_row,
    new_visitor,
    open_socket,
    print_rows,
    run_turn,
    server,
    summarize,
)

BENCH = "4. resume"
GOAL_MS = 100.0


async def measure(events: int, rounds: int, database: str) -> list[Row]:
    """Run the rounds; return the result rows."""
    with server(engine="scripted", database=database) as bench:
        async with httpx.AsyncClient(base_url=bench.url, timeout=30) as http:
            cookie = await new_visitor(http)
        ws = await open_socket(bench.url, cookie)
        turn = await run_turn(ws, f"tokens={events} rate=0")
        await ws.close()
        created = next(event for event in turn if event["type"] == "chat_created")
        chat_id = created["chatId"]
        user_seq = next(event["seq"] for event in turn if event["type"] == "user_message")
        last_seq = turn[-1]["seq"]
        expected = last_seq - user_seq

        async def replay() -> float:
            sock = await open_socket(bench.url, cookie)
            request = json.dumps({"type": "subscribe", "chatId": chat_id, "afterSeq": user_seq})
            started = time.perf_counter()
            await sock.send(request)
            # `subscribed` first, then the replayed events.
            frames = [await sock.recv() for _ in range(expected + 1)]
            elapsed = time.perf_counter() - started
            await sock.close()
            assert json.loads(frames[0])["type"] == "subscribed"
            check(frames[1:], user_seq, last_seq)
            return elapsed

        async def floor() -> float:
            sock = await open_socket(bench.url, cookie, path="/bench/blast")
            started = time.perf_counter()
            await sock.send(f"{chat_id} {user_seq}")
            frames = [await sock.recv() for _ in range(expected)]
            elapsed = time.perf_counter() - started
            assert json.loads(await sock.recv())["type"] == "pong"
            await sock.close()
            check(frames, user_seq, last_seq)
            return elapsed

        async def nothing() -> float:
            sock = await open_socket(bench.url, cookie)
            request = json.dumps({"type": "subscribe", "chatId": chat_id, "afterSeq": last_seq})
            started = time.perf_counter()
            await sock.send(request)
            answer = json.loads(await sock.recv())
            elapsed = time.perf_counter() - started
            await sock.close()
            assert answer["type"] == "subscribed", answer
            assert "messages" not in answer, answer
            return elapsed

        async def history() -> float:
            sock = await open_socket(bench.url, cookie)
            request = json.dumps({"type": "subscribe", "chatId": chat_id})
            started = time.perf_counter()
            await sock.send(request)
            answer = json.loads(await sock.recv())
            elapsed = time.perf_counter() - started
            await sock.close()
            assert answer["type"] == "subscribed", answer
            assert len(answer["messages"]) == 2, answer
            return elapsed

        kinds: list[tuple[str, Callable[[], Awaitable[float]]]] = [
            ("replay", replay),
            ("floor", floor),
            ("nothing", nothing),
            ("history", history),
        ]
        samples: dict[str, list[float]] = {name: [] for name, _ in kinds}
        for _, run in kinds:  # warm-up: first connections, imports, caches
            await run()
        for index in range(rounds):
            shift = index % len(kinds)
            for name, run in kinds[shift:] + kinds[:shift]:
                samples[name].append(await run())

    replayed = summarize(samples["replay"])
    floored = summarize(samples["floor"])
    ratios = [r / f for r, f in zip(samples["replay"], samples["floor"], strict=True)]
    overhead = summarize(ratios)
    per_event_us = (replayed.p50 - floored.p50) / expected * 1e6
    return [
        goal_row(
            BENCH,
            f"replay {expected:,} events, p99",
            measured=replayed.p99 * 1000,
            goal=GOAL_MS,
            unit="ms",
            shown=f"{replayed.p99 * 1000:.1f} ms (p50 {replayed.p50 * 1000:.1f}, n={replayed.n})",
        ),
        info_row(
            BENCH,
            "floor: same frames, bare WebSocket",
            floored.ms(),
            note="the transport and the client's own cost; blogchat's replay cannot beat it",
        ),
        info_row(
            BENCH,
            "replay / floor (paired)",
            f"{overhead.p50:.2f}× p50, {overhead.p99:.2f}× p99",
            note=f"blogchat adds about {per_event_us:.1f} µs per replayed event at p50",
        ),
        info_row(BENCH, "subscribe, nothing to replay", summarize(samples["nothing"]).ms()),
        info_row(
            BENCH,
            f"subscribe with history ({expected - 1:,}-token answer)",
            summarize(samples["history"]).ms(),
        ),
    ]


def check(frames: list[str | bytes], user_seq: int, last_seq: int) -> None:
    """The replay is exactly the turn: every seq once, in order, ending with `done`."""
    events = [json.loads(frame) for frame in frames]
    seqs = [event["seq"] for event in events]
    assert seqs == list(range(user_seq + 1, last_seq + 1)), "replay lost or repeated events"
    assert events[-1]["type"] == "done"


def main(argv: list[str] | None = None) -> list[Row]:
    """Parse arguments, run, print; returns the rows for the runner."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--events", type=int, default=5000, help="tokens in the long turn")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    args = parser.parse_args(argv)
    rows = asyncio.run(measure(args.events, args.rounds, args.database))
    print_rows(f"Resume ({args.rounds} rounds, {args.database})", rows)
    return rows


if __name__ == "__main__":
    main()

"""Several instances: what the shared log on Redis costs, and what a reader of a chat owned
by another instance waits, against the same thing on one instance.

Run with `uv run python bench/bench_cluster.py` (needs the Redis at 127.0.0.1:6379 and the
PostgreSQL at 127.0.0.1:5432). Two parts, in one run:

1. the bus (`cluster/bus.py`), on a key prefix of its own: taking and giving up a lease,
   renewing it, appending one event (one script: fence and seq checks, XADD, PUBLISH), the
   time from an append to its arrival at a pub/sub subscriber, and reading a log of 5,001
   events (a cold follower's first read), with the parsing of those frames; and the wait
   of the owner's own readers for each event, which reaches them only once the shared log
   has it (`FencedLog`): one event alone (what the owner adds to a first token) and each
   event of a burst of 256;
2. real servers (`bench/serve.py`, scripted engine): two instances in cluster mode on one
   PostgreSQL schema and one Redis prefix, and one instance without Redis on PostgreSQL.
   Side by side, interleaved sample by sample:
   - replay: a chat owned by instance a holds 5,001 events; a reader subscribes with
     `afterSeq` 0 on instance b, where no session of the chat is open yet (cold: b reads the
     shared log), again on b (warm: b follows the chat already), and on a (local), each
     timed from sending `subscribe` to receiving the last replayed frame;
   - stop: a running answer owned by a is stopped through a (local) or through b, timed
     from sending `stop` to that reader receiving `done(stopped)`;
   - time to first token of a message in a running chat: on cluster instance a, on the
     instance without Redis, and through b (forwarded to a), sent to first token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import redis.asyncio
from websockets.asyncio.client import ClientConnection

from bench.bench_concurrency import chat_of, first_token
from bench.support import (
    REDIS_URL,
    BenchServer,
    Row,
    chat_frame,
    cluster,
    cpu_seconds,
    goal_row,
    info_row,
    new_visitor,
    open_socket,
    percentile,
    print_rows,
    server,
    summarize,
)
from blogchat import protocol as wire
from blogchat.cluster.bus import Bus, Lease
from blogchat.cluster.sessions import FencedLog
from blogchat.eventlog import MemoryEventLog

BENCH = "8. several instances"
# The acceptance goals (issue 13): a replay of 5,001 events from a non-owner, p99; a stop
# through a non-owner, the extra time over a local one at p50 and p99 and the longest; the
# extra time to first token on a cluster instance at p50.
GOAL_REPLAY_P99_MS = 150.0
GOAL_STOP_EXTRA_P50_MS = 5.0
GOAL_STOP_EXTRA_P99_MS = 25.0
GOAL_STOP_MAX_S = 2.0
GOAL_FIRST_TOKEN_EXTRA_P50_MS = 2.0
# Tokens of the long answer: with its question and its `done`, a log of 5,001 events.
REPLAY_TOKENS = 4999
# Events the owner publishes at once in the burst case of its own readers' wait.
BURST = 256


def token_frame(chat_id: str, seq: int) -> str:
    """A token event as the owner publishes it (about 150 bytes)."""
    return wire.Token(chat_id=chat_id, seq=seq, message_id="m" * 36, text=" word").to_json()


async def measure_bus(samples: int, redis_url: str) -> list[Row]:
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    prefix = f"bench-{uuid.uuid4().hex}"
    bus = Bus(client, prefix, instance="bench", lease_seconds=5)
    rows: list[Row] = []
    try:
        leases = []
        for n in range(samples):
            started = time.perf_counter()
            lease = await bus.acquire(f"lease-{n}", floor=0)
            leases.append(time.perf_counter() - started)
            assert isinstance(lease, Lease)
            await bus.release(lease)
        rows.append(info_row(BENCH, "lease acquire (Lua)", _ms(leases)))

        lease = await bus.acquire("chat", floor=0)
        assert isinstance(lease, Lease)
        renewals = []
        for _ in range(samples):
            started = time.perf_counter()
            await bus.renew(lease)
            renewals.append(time.perf_counter() - started)
        rows.append(info_row(BENCH, "lease renew (Lua)", _ms(renewals)))

        pubsub = client.pubsub()
        await pubsub.subscribe(bus.channel("chat"))
        await pubsub.get_message(timeout=5)
        appends, arrivals = [], []
        for seq in range(1, samples + 1):
            frame = token_frame("chat", seq)
            started = time.perf_counter()
            await bus.append(lease, [(seq, frame)])
            appended = time.perf_counter()
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
            arrived = time.perf_counter()
            assert message is not None
            assert Bus.parse_live(message["data"]).seq == seq
            appends.append(appended - started)
            arrivals.append(arrived - started)
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        rows.append(info_row(BENCH, "append of one event (fenced, XADD, PUBLISH)", _ms(appends)))
        rows.append(info_row(BENCH, "append until a subscriber has it", _ms(arrivals)))

        rows += await measure_owner(bus, samples)

        big = await bus.acquire("long-chat", floor=0)
        assert isinstance(big, Lease)
        events = [(seq, token_frame("long-chat", seq)) for seq in range(1, 5002)]
        for start in range(0, len(events), 256):
            await bus.append(big, events[start : start + 256])
        reads, loads = [], []
        for _ in range(max(5, samples // 100)):
            started = time.perf_counter()
            read = await bus.read("long-chat")
            fetched = time.perf_counter()
            for _, frame in read.events:
                wire.parse_server_message(frame)
            parsed = time.perf_counter()
            assert len(read.events) == 5001
            reads.append(fetched - started)
            loads.append(parsed - started)
        rows.append(info_row(BENCH, "read of a 5,001-event log (one script)", _ms(reads)))
        rows.append(
            info_row(
                BENCH,
                "the same read, then parsing every frame",
                _ms(loads),
                note="what a follower pays for a running answer; a saved one is not parsed",
            )
        )
        size = sum(len(frame) for _, frame in events) / len(events)
        memory = await client.memory_usage(bus.key("long-chat", "ev"))
        rows.append(
            info_row(
                BENCH,
                "Redis memory per event",
                f"{(memory or 0) / len(events):.0f} B (frame {size:.0f} B)",
            )
        )
    finally:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()
    return rows


async def measure_owner(bus: Bus, samples: int) -> list[Row]:
    """How long an event the owner publishes takes to reach its own readers."""
    lease = await bus.acquire("owned", floor=0)
    assert isinstance(lease, Lease)
    published: dict[int, float] = {}
    waits: dict[int, float] = {}
    arrived = asyncio.Event()

    def deliver(seq: int, frame: str) -> None:
        waits[seq] = time.perf_counter() - published.pop(seq)
        if not published:
            arrived.set()

    def lost(chat_id: str) -> None:
        raise AssertionError(f"the bench's lease on {chat_id} was lost")

    shared = FencedLog(MemoryEventLog(0), bus, lease, lost, deliver)
    seq = 0
    try:
        for _ in range(samples):
            seq += 1
            arrived.clear()
            published[seq] = time.perf_counter()
            shared.append(seq, token_frame("owned", seq))
            await arrived.wait()
        alone = list(waits.values())
        waits.clear()
        for _ in range(max(5, samples // BURST)):
            arrived.clear()
            for _ in range(BURST):
                seq += 1
                published[seq] = time.perf_counter()
                shared.append(seq, token_frame("owned", seq))
            await arrived.wait()
        burst = list(waits.values())
    finally:
        await shared.aclose()
    first = summarize(alone)
    return [
        goal_row(
            BENCH,
            "owner: an event alone until its own reader has it, p50",
            measured=first.p50 * 1000,
            goal=GOAL_FIRST_TOKEN_EXTRA_P50_MS,
            unit="ms",
            shown=_ms(alone),
            note="added to the first token against one instance",
        ),
        info_row(BENCH, f"owner: each event of a burst of {BURST} until delivered", _ms(burst)),
    ]


# --- real servers ---------------------------------------------------------------------------


async def socket_to(bench: BenchServer, cookie: str) -> ClientConnection:
    """A reader's WebSocket to one instance."""
    return await open_socket(bench.url, cookie)


async def read_until(ws: ClientConnection, kind: str) -> list[dict[str, object]]:
    """Every frame up to the first of this type; a refusal raises."""
    events = []
    while True:
        event = json.loads(await ws.recv())
        if event["type"] == "error" and "seq" not in event:
            raise RuntimeError(f"refused: {event}")
        events.append(event)
        if event["type"] == kind:
            return events


@dataclass
class Replays:
    """Replays of one kind: their times, and the CPU the serving instance spent on each."""

    times: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    async def timed(self, bench: BenchServer, cookie: str, chat_id: str) -> None:
        """`subscribe` with afterSeq 0 on a new socket, timed to the last replayed frame."""
        ws = await socket_to(bench, cookie)
        try:
            process = bench.ps
            cpu = cpu_seconds(process)
            started = time.perf_counter()
            await ws.send(json.dumps({"type": "subscribe", "chatId": chat_id, "afterSeq": 0}))
            events = await read_until(ws, "done")
            self.times.append(time.perf_counter() - started)
            self.cpu.append(cpu_seconds(process) - cpu)
        finally:
            await ws.close()
        replayed = [event for event in events if "seq" in event]
        if events[0].get("messages") is not None or len(replayed) != REPLAY_TOKENS + 2:
            raise RuntimeError(f"not a replay of the whole log: {len(replayed)} events")


async def replays(
    owner: BenchServer, follower: BenchServer, cookie: str, samples: int
) -> list[Row]:
    """Replay of 5,001 events from a follower (cold and warm) and from the owner."""
    cold, warm, local = Replays(), Replays(), Replays()
    ws = await socket_to(owner, cookie)
    try:
        for index in range(samples):
            await ws.send(chat_frame(f"tokens={REPLAY_TOKENS} rate=0"))
            events = await read_until(ws, "done")
            chat_id = str(next(e["chatId"] for e in events if e["type"] == "chat_created"))
            await ws.send(json.dumps({"type": "unsubscribe", "chatId": chat_id}))
            # Each round in another order, so that no kind always runs first.
            if index % 2:
                await local.timed(owner, cookie, chat_id)
            await cold.timed(follower, cookie, chat_id)
            await warm.timed(follower, cookie, chat_id)
            if not index % 2:
                await local.timed(owner, cookie, chat_id)
    finally:
        await ws.close()
    done = summarize(cold.times)
    return [
        goal_row(
            BENCH,
            "replay of 5,001 events from a follower, cold (subscribe to last frame), p99",
            measured=done.p99 * 1000,
            goal=GOAL_REPLAY_P99_MS,
            unit="ms",
            shown=_ms(cold.times),
            note="the chat's first reader on that instance: it reads the shared log",
        ),
        info_row(BENCH, "the same, warm (the follower mirrors the chat already)", _ms(warm.times)),
        info_row(BENCH, "the same from the owner (local replay)", _ms(local.times)),
        info_row(
            BENCH,
            "replay: follower cold / warm / local, p50 and p99",
            f"{_ratio(cold.times, local.times, 0.5)} / {_ratio(warm.times, local.times, 0.5)}"
            f" / 1.00 p50, {_ratio(cold.times, local.times, 0.99)}"
            f" / {_ratio(warm.times, local.times, 0.99)} / 1.00 p99",
        ),
        info_row(
            BENCH,
            "server CPU per replay: follower cold / warm / local, p50",
            " / ".join(f"{summarize(kind.cpu).p50 * 1000:.0f} ms" for kind in (cold, warm, local)),
            note="CPU time is what the machine's load barely changes",
        ),
    ]


async def timed_stop(ws: ClientConnection, chat_id: str) -> tuple[float, str]:
    """Seconds from `stop` to `done` on this socket, and the done's reason."""
    started = time.perf_counter()
    await ws.send(json.dumps({"type": "stop", "chatId": chat_id}))
    done = (await read_until(ws, "done"))[-1]
    return time.perf_counter() - started, str(done["reason"])


async def stops(owner: BenchServer, follower: BenchServer, cookie: str, samples: int) -> list[Row]:
    """`stop` of a running answer owned by a, sent to a and to b in turn."""
    here = await socket_to(owner, cookie)
    there = await socket_to(follower, cookie)
    local: list[float] = []
    remote: list[float] = []
    reasons: set[str] = set()
    try:
        chat_id = await chat_of(here)
        await there.send(json.dumps({"type": "subscribe", "chatId": chat_id}))
        await read_until(there, "subscribed")
        for index in range(2 * samples):
            await here.send(chat_frame("tokens=100000 rate=50", chat_id))
            # Both readers are in the turn (b's follower has its events) before the stop.
            await read_until(here, "token")
            await read_until(there, "token")
            stopper, other = (here, there) if index % 2 else (there, here)
            took, reason = await timed_stop(stopper, chat_id)
            reasons.add(reason)
            (local if stopper is here else remote).append(took)
            await read_until(other, "done")
    finally:
        await here.close()
        await there.close()
    near, far = summarize(local), summarize(remote)
    longest = max(local + remote)
    return [
        info_row(BENCH, "stop to done(stopped), local (sent to the owner)", _ms(local)),
        info_row(BENCH, "stop to done(stopped), through a non-owner", _ms(remote)),
        goal_row(
            BENCH,
            "stop through a non-owner: extra over local, p50",
            measured=(far.p50 - near.p50) * 1000,
            goal=GOAL_STOP_EXTRA_P50_MS,
            unit="ms",
            shown=f"{(far.p50 - near.p50) * 1000:.2f} ms",
        ),
        goal_row(
            BENCH,
            "stop through a non-owner: extra over local, p99",
            measured=(far.p99 - near.p99) * 1000,
            goal=GOAL_STOP_EXTRA_P99_MS,
            unit="ms",
            shown=f"{(far.p99 - near.p99) * 1000:.2f} ms",
        ),
        goal_row(
            BENCH,
            "stop: the longest to done(stopped), either way",
            measured=longest,
            goal=GOAL_STOP_MAX_S,
            unit="s",
            shown=f"{longest * 1000:.1f} ms (every done: {', '.join(sorted(reasons))})",
        ),
    ]


async def first_tokens(
    owner: BenchServer, follower: BenchServer, alone: BenchServer, cookie: str, samples: int
) -> list[Row]:
    """Time to first token of a message in a running chat: cluster, alone, forwarded."""
    async with httpx.AsyncClient(base_url=alone.url, timeout=60) as http:
        alone_cookie = await new_visitor(http)
    here = await socket_to(owner, cookie)
    there = await socket_to(follower, cookie)
    single = await socket_to(alone, alone_cookie)
    clustered: list[float] = []
    single_times: list[float] = []
    forwarded: list[float] = []
    try:
        chat_id = await chat_of(here)
        single_chat = await chat_of(single)
        # Warm every path once (first message, first forward).
        await first_token(here, chat_id)
        await first_token(single, single_chat)
        await first_token(there, chat_id)
        await read_until(here, "done")
        for index in range(samples):
            order = [0, 1, 2] if index % 2 else [1, 0, 2]
            for kind in order:
                if kind == 0:
                    clustered.append(await first_token(here, chat_id))
                    await read_until(there, "done")
                elif kind == 1:
                    single_times.append(await first_token(single, single_chat))
                else:
                    forwarded.append(await first_token(there, chat_id))
                    await read_until(here, "done")
    finally:
        for ws in (here, there, single):
            await ws.close()
    on, off = summarize(clustered), summarize(single_times)
    return [
        info_row(BENCH, "time to first token, one instance without Redis", _ms(single_times)),
        info_row(BENCH, "time to first token, cluster instance owning the chat", _ms(clustered)),
        goal_row(
            BENCH,
            "time to first token: cluster instance - one instance, p50",
            measured=(on.p50 - off.p50) * 1000,
            goal=GOAL_FIRST_TOKEN_EXTRA_P50_MS,
            unit="ms",
            shown=f"{(on.p50 - off.p50) * 1000:.2f} ms ({_ratio(clustered, single_times, 0.5)}×)",
        ),
        info_row(
            BENCH,
            "time to first token through a non-owner (forwarded)",
            _ms(forwarded),
            note="the message goes to the owner over Redis, the tokens come back over Redis",
        ),
    ]


async def measure_servers(replay_samples: int, stop_samples: int, token_samples: int) -> list[Row]:
    """The servers' part (module docstring); the rows."""
    rows: list[Row] = []
    with (
        cluster(2, engine="scripted") as (owner, follower),
        server(engine="scripted", database="postgresql") as alone,
    ):
        async with httpx.AsyncClient(base_url=owner.url, timeout=60) as http:
            cookie = await new_visitor(http)
        if replay_samples:
            rows += await replays(owner, follower, cookie, replay_samples)
        if stop_samples:
            rows += await stops(owner, follower, cookie, stop_samples)
        if token_samples:
            rows += await first_tokens(owner, follower, alone, cookie, token_samples)
    return rows


def _ratio(values: list[float], baseline: list[float], fraction: float) -> str:
    return f"{percentile(values, fraction) / percentile(baseline, fraction):.2f}"


def _ms(samples: list[float]) -> str:
    done = summarize(samples)
    return f"p50 {done.p50 * 1000:.3f} ms, p99 {done.p99 * 1000:.3f} ms (n={done.n})"


def main(argv: list[str] | None = None) -> list[Row]:
    """Parse arguments, run, print; returns the rows for the runner."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000, help="bus operations timed")
    parser.add_argument("--redis", default=REDIS_URL)
    parser.add_argument("--replays", type=int, default=40, help="replays of each kind")
    parser.add_argument("--stops", type=int, default=100, help="stops of each kind")
    parser.add_argument("--first-tokens", type=int, default=100, help="messages of each kind")
    parser.add_argument("--skip-bus", action="store_true", help="only the servers' part")
    args = parser.parse_args(argv)
    rows = [] if args.skip_bus else asyncio.run(measure_bus(args.samples, args.redis))
    rows += asyncio.run(measure_servers(args.replays, args.stops, args.first_tokens))
    print_rows("Several instances: the shared log, and readers on other instances", rows)
    return rows


if __name__ == "__main__":
    main()

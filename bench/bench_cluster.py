"""Several instances: what the shared log on Redis costs per operation.

Run with `uv run python bench/bench_cluster.py` (needs the Redis at 127.0.0.1:6379). It
times the bus's scripts as the owner and the followers call them (`cluster/bus.py`), on a
key prefix of its own: taking and giving up a lease, renewing it, appending one event (one
script: fence and seq checks, XADD, PUBLISH), the time from an append to its arrival at a
pub/sub subscriber, and reading a log of 5,001 events (a cold follower's first read),
with the parsing of those frames that a follower's `load` adds. And the wait the owner's
own readers have for each event, which reaches them only once the shared log has it
(`FencedLog`): for one event alone (a first token: what the owner adds to the time to
first token against one instance), and for each event of a burst of 256.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis.asyncio

from bench.support import Row, goal_row, info_row, print_rows, summarize
from blogchat import protocol as wire
from blogchat.cluster.bus import Bus, Lease
from blogchat.cluster.sessions import FencedLog
from blogchat.eventlog import MemoryEventLog

BENCH = "7. several instances"
# The acceptance goal for a replay of 5,001 events from a non-owner (docs/cluster.md).
GOAL_REPLAY_P99_MS = 150.0
# The acceptance goal for the time to first token over one instance's, p50.
GOAL_FIRST_TOKEN_EXTRA_MS = 2.0
BURST = 256


def token_frame(chat_id: str, seq: int) -> str:
    """A token event as the owner publishes it (about 150 bytes)."""
    return wire.Token(chat_id=chat_id, seq=seq, message_id="m" * 36, text=" word").to_json()


async def measure(samples: int, redis_url: str) -> list[Row]:
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
        rows.append(info_row(BENCH, "read of a 5,001-event log (XRANGE)", _ms(reads)))
        done = summarize(loads)
        rows.append(
            goal_row(
                BENCH,
                "cold follower: read and parse 5,001 events, p99",
                measured=done.p99 * 1000,
                goal=GOAL_REPLAY_P99_MS,
                unit="ms",
                shown=_ms(loads),
                note="the server's own replay adds the socket writes",
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
            goal=GOAL_FIRST_TOKEN_EXTRA_MS,
            unit="ms",
            shown=_ms(alone),
            note="added to the first token against one instance",
        ),
        info_row(BENCH, f"owner: each event of a burst of {BURST} until delivered", _ms(burst)),
    ]


def _ms(samples: list[float]) -> str:
    done = summarize(samples)
    return f"p50 {done.p50 * 1000:.3f} ms, p99 {done.p99 * 1000:.3f} ms (n={done.n})"


def main(argv: list[str] | None = None) -> list[Row]:
    """Parse arguments, run, print; returns the rows for the runner."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args(argv)
    rows = asyncio.run(measure(args.samples, args.redis))
    print_rows("Several instances: the shared log", rows)
    return rows


if __name__ == "__main__":
    main()

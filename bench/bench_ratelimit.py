"""Rate limits: what one check costs (goal: p50 < 0.2 ms in memory), and on a real Redis.

Run with `uv run python bench/bench_ratelimit.py`. It times `RateLimiter.hit` (a moving
window of the `limits` library) for many keys, as a sign-in would call it, in memory and on
the Redis at 127.0.0.1:6379 (skipped if none answers), and a refused hit, which also works
out `retry_after`; then the whole limit check a chat message goes through
(`Quotas.admit`: the visitor's and the address's turn rates and token budgets, the budgets
read from usage already loaded), which has the same goal. Last, a running turn's place
(`Slots.take` and `give_back` under a visitor's and an address's caps), in memory and on
Redis, as several instances share it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.support import Row, goal_row, info_row, print_rows, summarize
from blogchat.quotas import MemorySlots, Quotas, Slots, Spending, Who
from blogchat.ratelimit import Rate, RateLimiter
from blogchat.settings import Settings

BENCH = "6. rate limits"
GOAL_P50_MS = 0.2
RATE = Rate("bench", 20, 3600)


async def time_hits(limiter: RateLimiter, hits: int, keys: int) -> tuple[list[float], list[float]]:
    """Seconds per allowed hit (spread over `keys` keys) and per refused hit."""
    allowed: list[float] = []
    refused: list[float] = []
    for n in range(hits):
        key = f"visitor-{n % keys}"
        started = time.perf_counter()
        decision = await limiter.hit(RATE, key)
        (allowed if decision.allowed else refused).append(time.perf_counter() - started)
    return allowed, refused


async def measure(hits: int, keys: int, redis_url: str) -> list[Row]:
    rows: list[Row] = []
    memory = RateLimiter()
    await time_hits(memory, 1000, 50)  # warm-up
    allowed, refused = await time_hits(memory, hits, keys)
    done = summarize(allowed)
    rows.append(
        goal_row(
            BENCH,
            f"hit in memory, p50 ({keys:,} keys)",
            measured=done.p50 * 1000,
            goal=GOAL_P50_MS,
            unit="ms",
            shown=f"{done.p50 * 1000:.3f} ms (p99 {done.p99 * 1000:.3f}, n={done.n})",
        )
    )
    if refused:
        rows.append(info_row(BENCH, "refused hit in memory (with retry_after)", _ms(refused)))
    admitted = summarize(await time_admits(hits, keys))
    rows.append(
        goal_row(
            BENCH,
            "limit check of a chat message, p50",
            measured=admitted.p50 * 1000,
            goal=GOAL_P50_MS,
            unit="ms",
            shown=f"{admitted.p50 * 1000:.3f} ms (p99 {admitted.p99 * 1000:.3f}, n={admitted.n})",
        )
    )
    redis = RateLimiter(redis_url, prefix=f"bench-{uuid.uuid4().hex}")
    try:
        await time_hits(redis, 200, 50)
        allowed, _ = await time_hits(redis, hits // 4, keys)
        rows.append(info_row(BENCH, "hit on Redis (loopback)", _ms(allowed)))
    except OSError as exc:
        rows.append(info_row(BENCH, "hit on Redis", f"not measured: {exc}"))
    finally:
        await redis.aclose()
    rows.append(
        info_row(
            BENCH,
            "turn place in memory (take, give back)",
            _ms(await time_places(MemorySlots(), hits, keys)),
        )
    )
    rows.append(await redis_places(redis_url, hits // 4, keys))
    return rows


async def time_places(slots: Slots, places: int, visitors: int) -> list[float]:
    """Seconds per running turn's place taken and given back (a visitor's and an address's
    caps), over `visitors` visitors at 50 addresses."""
    timings: list[float] = []
    for n in range(places):
        caps = [(f"visitor:visitor-{n % visitors}", 1), (f"address:198.51.100.{n % 50}", 2)]
        started = time.perf_counter()
        slot = await slots.take(caps)
        assert slot is not None
        await slots.give_back(slot)
        timings.append(time.perf_counter() - started)
    return timings


async def redis_places(redis_url: str, places: int, visitors: int) -> Row:
    """`time_places` on Redis, as the instances of a cluster count running turns."""
    # Imported here: the cluster's Redis client, as one instance never loads it.
    import redis.asyncio

    from blogchat.cluster.slots import RedisSlots

    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    prefix = f"bench-{uuid.uuid4().hex}"
    slots = RedisSlots(client, prefix, "turns", instance="bench", ttl_seconds=5, announce=True)
    try:
        await time_places(slots, 200, 50)
        measured = _ms(await time_places(slots, places, visitors))
        return info_row(BENCH, "turn place on Redis (take, give back)", measured)
    except (OSError, redis.RedisError) as exc:
        return info_row(BENCH, "turn place on Redis", f"not measured: {exc}")
    finally:
        async for key in client.scan_iter(match=f"{prefix}:*"):
            await client.delete(key)
        await client.aclose()


async def time_admits(messages: int, visitors: int) -> list[float]:
    """Seconds per `Quotas.admit` of an anonymous visitor's message (two rates, two
    budgets), over `visitors` visitors sharing a few addresses, each with some usage."""
    now = time.time()

    async def usage_since(kind: str, key: str, since: float) -> Spending:
        return [(now - 3600 * n, 1500) for n in range(5)]

    settings = Settings(
        _env_file=None,
        visitor_turns_per_hour=10**6,
        address_turns_per_hour=10**6,
    )
    quotas = Quotas(settings, RateLimiter(), usage_since)
    timings: list[float] = []
    for n in range(messages):
        who = Who(f"visitor-{n % visitors}", f"198.51.100.{n % 50}", anonymous=True)
        started = time.perf_counter()
        await quotas.admit(who)
        timings.append(time.perf_counter() - started)
    # Once each key's usage is loaded (what a busy server sees), not the first reads.
    return timings[visitors:]


def _ms(samples: list[float]) -> str:
    done = summarize(samples)
    return f"p50 {done.p50 * 1000:.3f} ms, p99 {done.p99 * 1000:.3f} ms (n={done.n})"


def main(argv: list[str] | None = None) -> list[Row]:
    """Parse arguments, run, print; returns the rows for the runner."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--hits", type=int, default=20000)
    parser.add_argument("--keys", type=int, default=2000)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args(argv)
    rows = asyncio.run(measure(args.hits, args.keys, args.redis))
    print_rows("Rate limits", rows)
    return rows


if __name__ == "__main__":
    main()

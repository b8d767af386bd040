"""Rate limits: the moving window, in memory and on a real Redis, with the clock moved."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio
import time_machine

from blogchat.ratelimit import Decision, Rate, RateLimiter
from tests.support.services import unavailable

REDIS_URL = os.environ.get("BLOGCHAT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
START = 1_800_000_000.0  # any fixed wall-clock time; the tests move it by hand

FIVE_A_MINUTE = Rate("test", 5, 60)


async def _redis_problem() -> str | None:
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        await client.ping()
    except (OSError, redis.RedisError) as exc:
        return f"Redis at {REDIS_URL} is not reachable ({exc})"
    finally:
        await client.aclose()
    return None


@pytest.fixture(params=["memory", "redis"])
async def storage(request: pytest.FixtureRequest) -> str:
    """The storage URI of each backend in turn."""
    if request.param == "memory":
        return "memory://"
    problem = await _redis_problem()
    if problem:
        unavailable(problem, ci_must="run the rate limits on Redis too")
    return REDIS_URL


@pytest.fixture
def prefix() -> str:
    """A key prefix no other test uses, so tests sharing one Redis never meet."""
    return f"test-{uuid.uuid4().hex}"


@pytest.fixture
async def limiter(storage: str, prefix: str) -> AsyncIterator[RateLimiter]:
    """A rate limiter on this backend, alone on its keys."""
    limiter = RateLimiter(storage, prefix=prefix)
    try:
        yield limiter
    finally:
        await limiter.aclose()


@pytest.fixture
def clock() -> Iterator[time_machine.Traveller]:
    """The wall clock, frozen at START; `clock.shift(seconds)` moves it."""
    with time_machine.travel(START, tick=False) as traveller:
        yield traveller


async def hits(limiter: RateLimiter, rate: Rate, count: int, *keys: str) -> list[bool]:
    return [(await limiter.hit(rate, *keys)).allowed for _ in range(count)]


async def test_a_rate_allows_its_amount_then_refuses_until_the_oldest_hit_leaves_the_window(
    limiter: RateLimiter, clock: time_machine.Traveller
) -> None:
    assert await hits(limiter, FIVE_A_MINUTE, 5, "reader") == [True] * 5
    refused = await limiter.hit(FIVE_A_MINUTE, "reader")
    assert refused == Decision(allowed=False, retry_after=60.0)
    assert refused.retry_after_header == "60"
    clock.shift(20)
    assert await limiter.hit(FIVE_A_MINUTE, "reader") == Decision(False, 40.0)


async def test_the_next_hit_is_allowed_once_the_window_moves(
    limiter: RateLimiter, clock: time_machine.Traveller
) -> None:
    # Two hits now and three 30 s later: a moving window frees the first two 60 s
    # after them, the other three 90 s after the start.
    assert await hits(limiter, FIVE_A_MINUTE, 2, "reader") == [True, True]
    clock.shift(30)
    assert await hits(limiter, FIVE_A_MINUTE, 4, "reader") == [True, True, True, False]
    clock.shift(29)
    assert await limiter.hit(FIVE_A_MINUTE, "reader") == Decision(False, 1.0)
    clock.shift(1.5)
    assert await hits(limiter, FIVE_A_MINUTE, 3, "reader") == [True, True, False]
    clock.shift(30)
    assert await hits(limiter, FIVE_A_MINUTE, 4, "reader") == [True, True, True, False]


async def test_a_refused_hit_is_not_counted(
    limiter: RateLimiter, clock: time_machine.Traveller
) -> None:
    await hits(limiter, FIVE_A_MINUTE, 5, "reader")
    for _ in range(20):
        clock.shift(1)
        assert not (await limiter.hit(FIVE_A_MINUTE, "reader")).allowed
    clock.shift(40.5)
    assert await hits(limiter, FIVE_A_MINUTE, 6, "reader") == [True] * 5 + [False]


async def test_a_test_counts_nothing(limiter: RateLimiter, clock: time_machine.Traveller) -> None:
    for _ in range(10):
        assert await limiter.test(FIVE_A_MINUTE, "reader") == Decision(allowed=True)
    assert await hits(limiter, FIVE_A_MINUTE, 5, "reader") == [True] * 5
    assert await limiter.test(FIVE_A_MINUTE, "reader") == Decision(False, 60.0)


async def test_keys_and_rates_are_counted_apart(
    limiter: RateLimiter, clock: time_machine.Traveller
) -> None:
    other_rate = Rate("other", 5, 60)
    assert await hits(limiter, FIVE_A_MINUTE, 6, "reader") == [True] * 5 + [False]
    assert await hits(limiter, FIVE_A_MINUTE, 5, "another reader") == [True] * 5
    assert await hits(limiter, FIVE_A_MINUTE, 5, "reader", "chat-1") == [True] * 5
    assert await hits(limiter, other_rate, 5, "reader") == [True] * 5


async def test_clear_forgets_a_keys_hits_and_no_other(
    limiter: RateLimiter, clock: time_machine.Traveller
) -> None:
    await hits(limiter, FIVE_A_MINUTE, 5, "reader")
    await hits(limiter, FIVE_A_MINUTE, 5, "another reader")
    await limiter.clear(FIVE_A_MINUTE, "reader")
    assert await hits(limiter, FIVE_A_MINUTE, 6, "reader") == [True] * 5 + [False]
    assert not (await limiter.hit(FIVE_A_MINUTE, "another reader")).allowed


async def test_a_cost_takes_that_many_places(
    limiter: RateLimiter, clock: time_machine.Traveller
) -> None:
    assert (await limiter.hit(FIVE_A_MINUTE, "reader", cost=4)).allowed
    assert not (await limiter.hit(FIVE_A_MINUTE, "reader", cost=2)).allowed
    assert (await limiter.hit(FIVE_A_MINUTE, "reader", cost=1)).allowed


async def test_instances_sharing_a_redis_and_a_prefix_share_their_counters(
    prefix: str, clock: time_machine.Traveller
) -> None:
    problem = await _redis_problem()
    if problem:
        unavailable(problem, ci_must="run the rate limits on Redis too")
    first = RateLimiter(REDIS_URL, prefix=prefix)
    second = RateLimiter(REDIS_URL, prefix=prefix)
    elsewhere = RateLimiter(REDIS_URL, prefix=prefix + "-other")
    try:
        assert await hits(first, FIVE_A_MINUTE, 3, "reader") == [True] * 3
        assert await hits(second, FIVE_A_MINUTE, 3, "reader") == [True, True, False]
        assert not (await first.hit(FIVE_A_MINUTE, "reader")).allowed
        assert await hits(elsewhere, FIVE_A_MINUTE, 5, "reader") == [True] * 5
    finally:
        for limiter in (first, second, elsewhere):
            await limiter.aclose()


def test_an_unknown_storage_is_refused() -> None:
    with pytest.raises(ValueError, match="memcached"):
        RateLimiter("memcached://127.0.0.1:11211")


def test_a_rate_needs_at_least_one_hit_and_one_second() -> None:
    for amount, seconds in ((0, 60), (5, 0)):
        with pytest.raises(ValueError, match="at least 1"):
            Rate("broken", amount, seconds)

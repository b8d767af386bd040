"""The test Redis: where it is, whether it is there, and a key prefix per test."""

from __future__ import annotations

import os
import uuid

import redis.asyncio

from tests.support.services import unavailable

REDIS_URL = os.environ.get("BLOGCHAT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


async def redis_problem() -> str | None:
    """Why the test Redis cannot be used, or None."""
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        await client.ping()
    except (OSError, redis.RedisError) as exc:
        return f"Redis at {REDIS_URL} is not reachable ({exc})"
    finally:
        await client.aclose()
    return None


async def require_redis() -> None:
    """Skip the test without Redis (fail in CI, which must run it)."""
    problem = await redis_problem()
    if problem:
        unavailable(problem, ci_must="run the cluster tests on Redis")


def unique_prefix() -> str:
    """A key prefix no other test uses, so tests sharing one Redis never meet."""
    return f"test-{uuid.uuid4().hex}"


async def forget_prefix(client: redis.asyncio.Redis, prefix: str) -> int:
    """Delete every key under a prefix (what a flush of one blog's data looks like)."""
    keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
    if keys:
        await client.delete(*keys)
    return len(keys)

"""Rate limits: how often something may happen per key, in a moving window, in memory or Redis.

The counting is the `limits` library's moving window: each hit is a timestamp, and a hit is
allowed while fewer than `amount` hits of the same key fall in the last `seconds`. The same
`RateLimiter` runs on memory (one instance) or on Redis (several instances sharing the
counters), chosen by the storage URI; nothing else changes.

Time and tests: `limits` has no clock to inject. Its memory storage and its Redis storage
both read the wall clock with `time.time()` when they stamp a hit and when they decide
which hits are still in the window (the Redis Lua scripts receive that timestamp from
Python), and this module works out `retry_after` from the same clock. A test therefore
moves the window by moving the process's wall clock with `time-machine`
(`time_machine.travel(..., tick=True)`), which patches `time.time()` and `datetime.now()`
but not the monotonic clock the event loop runs on. That keeps the library's own window
code (the in-memory event list, the Lua scripts) under test, rather than a copy of it in a
subclass whose only purpose would be to take a clock parameter, and it moves every
wall-clock reader in the server together (cookies, login expiry, the database's
timestamps), so a test cannot pass on clocks that disagree.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from limits import RateLimitItemPerSecond
from limits.aio.strategies import MovingWindowRateLimiter
from limits.storage import storage_from_string

if TYPE_CHECKING:
    import redis.asyncio

# On Redis: how long a command may wait for one of the pool's connections (then it fails as
# if Redis were out of reach), and how long connecting may take.
POOL_WAIT_SECONDS = 10.0
CONNECT_SECONDS = 5.0


def redis_pool(url: str, max_connections: int, **options: Any) -> redis.asyncio.ConnectionPool:
    """A bounded Redis pool whose commands wait for a free connection (up to
    POOL_WAIT_SECONDS, then they fail as if Redis were out of reach): redis-py's default pool
    raises once 100 commands are under way, which a burst of messages or of WebSockets
    opening at once reaches. `options` go to the connections (`decode_responses`, ...)."""
    # Imported only here: the client costs about 20 MB that one instance never needs.
    import redis.asyncio

    return redis.asyncio.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=POOL_WAIT_SECONDS,
        socket_connect_timeout=CONNECT_SECONDS,
        **options,
    )


@dataclass(frozen=True)
class Rate:
    """At most `amount` hits per `seconds`, counted separately for each key."""

    name: str
    amount: int
    seconds: int

    def __post_init__(self) -> None:
        if self.amount < 1 or self.seconds < 1:
            raise ValueError(f"rate {self.name}: amount and seconds must be at least 1")


@dataclass(frozen=True)
class Decision:
    """Whether a hit is allowed, and if not, how many seconds until it would be."""

    allowed: bool
    retry_after: float = 0.0

    @property
    def retry_after_header(self) -> str:
        """`retry_after` as an HTTP Retry-After value: whole seconds, rounded up."""
        return str(max(1, math.ceil(self.retry_after)))


class RateLimiter:
    """Counts hits of named rates per key: `memory://` or `redis://host:port/db` storage."""

    def __init__(
        self, storage_uri: str = "memory://", *, prefix: str = "blogchat", max_connections: int = 64
    ) -> None:
        scheme = urlsplit(storage_uri).scheme
        self._pool: redis.asyncio.ConnectionPool | None = None
        if scheme == "memory":
            storage = storage_from_string("async+memory://")
        elif scheme in ("redis", "rediss", "redis+unix"):
            # Our own pool, so that closing the limiter closes its connections.
            self._pool = redis_pool(storage_uri.replace("redis+unix", "unix"), max_connections)
            storage = storage_from_string(
                f"async+{storage_uri}",
                implementation="redispy",
                key_prefix=prefix,
                connection_pool=self._pool,  # type: ignore[arg-type]
            )
        else:
            raise ValueError(f"unsupported rate limit storage {storage_uri!r}")
        self._window = MovingWindowRateLimiter(storage)

    async def hit(self, rate: Rate, *keys: str, cost: int = 1) -> Decision:
        """Count a hit if the rate allows it; a refused hit is not counted."""
        item = _item(rate)
        if await self._window.hit(item, *keys, cost=cost):
            return Decision(allowed=True)
        return await self._refusal(item, keys)

    async def test(self, rate: Rate, *keys: str, cost: int = 1) -> Decision:
        """Whether a hit would be allowed now, without counting one."""
        item = _item(rate)
        if await self._window.test(item, *keys, cost=cost):
            return Decision(allowed=True)
        return await self._refusal(item, keys)

    @property
    def remote(self) -> bool:
        """Whether the counts live on Redis (each test or hit a round trip to it)."""
        return self._pool is not None

    async def clear(self, rate: Rate, *keys: str) -> None:
        """Forget every hit of this rate for this key."""
        await self._window.clear(_item(rate), *keys)

    async def aclose(self) -> None:
        """Close the storage's connections (Redis); memory needs nothing."""
        if self._pool is not None:
            await self._pool.aclose()

    async def _refusal(self, item: RateLimitItemPerSecond, keys: tuple[str, ...]) -> Decision:
        stats = await self._window.get_window_stats(item, *keys)
        # `reset_time` is when the oldest hit in the window leaves it, freeing one place.
        return Decision(allowed=False, retry_after=max(0.0, stats.reset_time - time.time()))


def _item(rate: Rate) -> RateLimitItemPerSecond:
    return RateLimitItemPerSecond(rate.amount, rate.seconds, namespace=rate.name)

"""Places counted under caps across instances, in Redis: a visitor's running turns and open
WebSockets count together on every instance (`quotas.Slots`, shared).

Each key (`visitor:<id>`, `address:<ip>`, `user:<id>`) is a sorted set under
`<prefix>:{slots}:<name>:`, one member per place taken (`<instance>:<slot id>`), scored with
the moment the place lapses unless its holder renews it. One script takes a place under
every key of a turn or connection at once, or under none: it first drops the lapsed
members, then counts. The holder renews all its places every third of the time to live, so
a dead or frozen instance's places free themselves within that time; giving a place back
removes it at once, and for running turns announces it on a channel, so that turns
waiting on other instances try again without polling. Times are Redis's own (`TIME`), so
the instances' clocks do not matter. `{slots}` is one Redis Cluster hash tag for every
key, since a place spans a visitor's key and an address's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import redis.asyncio
from redis.asyncio.client import PubSub

from blogchat.quotas import Caps, CountsUnreachable, Slot

log = logging.getLogger(__name__)

# How many keys one renewal script touches at most: a script holds Redis up for everyone
# while it runs (500 keys took 40 ms on a loaded machine, during which no chat's event was
# appended), so an instance's places are renewed in short scripts, one after another.
RENEW_BATCH = 100

_NOW_MS = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
"""

# KEYS: the counted keys. ARGV: member, time to live (ms), then each key's cap.
_TAKE = (
    _NOW_MS
    + """
local ttl = tonumber(ARGV[2])
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', ms)
  if redis.call('ZCARD', key) >= tonumber(ARGV[i + 2]) then
    return 0
  end
end
for _, key in ipairs(KEYS) do
  redis.call('ZADD', key, ms + ttl, ARGV[1])
  redis.call('PEXPIRE', key, ttl)
end
return 1
"""
)

# KEYS: the keys of one place. ARGV: member, then the channel to announce it on, or "".
_GIVE_BACK = """
for _, key in ipairs(KEYS) do
  redis.call('ZREM', key, ARGV[1])
end
if ARGV[2] ~= '' then
  redis.call('PUBLISH', ARGV[2], '')
end
return 1
"""

# KEYS: keys; ARGV: time to live (ms), then the member held under each key. A member that
# lapsed already (its holder was frozen past it) is not brought back: its key may be full.
_RENEW = (
    _NOW_MS
    + """
local ttl = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', ms + ttl, ARGV[i + 1])
  redis.call('PEXPIRE', key, ttl)
end
return 1
"""
)


class RedisSlots:
    """Slots counted in Redis, shared by the instances of one blog (module docstring)."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        prefix: str,
        name: str,
        *,
        instance: str,
        ttl_seconds: float,
        announce: bool,
    ) -> None:
        self.client = client
        self.instance = instance
        self.name = name
        self.ttl_ms = int(ttl_seconds * 1000)
        self._keys = f"{prefix}:{{slots}}:{name}:"
        self._channel = f"{prefix}:{{slots}}:{name}:freed" if announce else ""
        self._take = client.register_script(_TAKE)
        self._give_back = client.register_script(_GIVE_BACK)
        self._renew = client.register_script(_RENEW)
        self._held: dict[str, Slot] = {}
        self._listeners: list[Callable[[], None]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._pubsub: PubSub | None = None
        # How many times this instance renewed its places (tests wait on it).
        self.renewals = 0
        # Whether the last call reached Redis: an outage is logged once, not per call.
        self.reachable = True

    async def take(self, caps: Caps) -> Slot | None:
        """A place under every key's cap at once, or None (taking nothing) if one is full."""
        slot = Slot(tuple(key for key, _ in caps))
        keys = [self._keys + key for key in slot.keys]
        args: list[str | int] = [self._member(slot), self.ttl_ms, *(cap for _, cap in caps)]
        try:
            taken = int(await self._take(keys=keys, args=args))
        except (redis.RedisError, OSError) as exc:
            self._lost(exc)
            raise CountsUnreachable(str(exc)) from exc
        self._found()
        if not taken:
            return None
        self._held[slot.id] = slot
        return slot

    async def give_back(self, slot: Slot) -> None:
        """Free a place; if Redis cannot be reached, it frees itself within the time to
        live, since it is no longer renewed."""
        if self._held.pop(slot.id, None) is None:
            return
        keys = [self._keys + key for key in slot.keys]
        try:
            await self._give_back(keys=keys, args=[self._member(slot), self._channel])
        except (redis.RedisError, OSError) as exc:
            self._lost(exc)
        except Exception:
            log.exception("could not give back a place; it frees itself when it lapses")
        else:
            self._found()

    def on_freed(self, listener: Callable[[], None]) -> None:
        """Call `listener` when another instance gave a place back, and after each renewal
        (places of a dead instance may have lapsed meanwhile)."""
        self._listeners.append(listener)

    @property
    def held(self) -> int:
        """Places this instance holds now."""
        return len(self._held)

    async def start(self) -> None:
        """Renew this instance's places, and hear of places freed elsewhere."""
        self._tasks.append(asyncio.create_task(self._renew_forever(), name="slots-renewal"))
        if self._channel:
            self._pubsub = self.client.pubsub()
            await self._pubsub.subscribe(self._channel)
            self._tasks.append(asyncio.create_task(self._listen(self._pubsub), name="slots-freed"))

    async def aclose(self) -> None:
        """Stop renewing and listening (the places still held lapse on their own)."""
        # (redis-py may turn a cancellation mid-read into a connection error, which the
        # loops would otherwise take for a lost connection and go on.)
        self._closing = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()  # type: ignore[no-untyped-call]

    def closing(self) -> bool:
        """Whether `aclose` began."""
        return self._closing

    def _lost(self, exc: BaseException) -> None:
        if self.reachable:
            self.reachable = False
            log.warning(
                "Redis out of reach, %s places cannot be counted (%s): refused until it is"
                " back; places not given back lapse on their own",
                self.name,
                exc,
            )

    def _found(self) -> None:
        if not self.reachable:
            self.reachable = True
            log.warning("Redis reachable again: %s places counted", self.name)

    def _member(self, slot: Slot) -> str:
        return f"{self.instance}:{slot.id}"

    async def _renew_forever(self) -> None:
        while not self.closing():
            await asyncio.sleep(self.ttl_ms / 3000)
            try:
                await self._renew_all()
            except Exception as exc:
                if self.closing():
                    return
                if isinstance(exc, redis.RedisError | OSError):
                    self._lost(exc)
                else:
                    log.exception("could not renew this instance's places")
            else:
                self._found()
            self.renewals += 1
            self._freed()

    async def _renew_all(self) -> None:
        held = [
            (self._keys + key, self._member(slot))
            for slot in self._held.values()
            for key in slot.keys
        ]
        for start in range(0, len(held), RENEW_BATCH):
            batch = held[start : start + RENEW_BATCH]
            await self._renew(
                keys=[key for key, _ in batch], args=[self.ttl_ms, *(m for _, m in batch)]
            )

    async def _listen(self, pubsub: PubSub) -> None:
        while not self.closing():
            try:
                async for message in pubsub.listen():
                    if message["type"] == "message":
                        self._freed()
            except asyncio.CancelledError:
                raise
            except Exception:
                if self.closing():
                    return
                # redis-py subscribes again when it reconnects; meanwhile the renewals
                # still wake the waiters.
                log.exception("the freed places channel failed; listening again")
                await asyncio.sleep(0.5)

    def _freed(self) -> None:
        for listener in self._listeners:
            listener()

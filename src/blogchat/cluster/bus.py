"""What instances share about a chat in Redis: who may run its turns (a lease with a fencing
token), its event log (a stream whose entry ids are the seqs), and its live channel.

Keys, for chat `c` under prefix `p` (`{c}` is a Redis Cluster hash tag, so one script can
use every key of a chat):

- `p:{c}:meta`, a hash: `fence` (the last token handed out), `seq` (the last seq appended),
  `epoch` (which incarnation of the log this is);
- `p:{c}:lease`, a string `<instance>:<fence>` that expires unless renewed;
- `p:{c}:ev`, a stream: one entry per event, id `<seq>-0`, field `f` = the frame;
- `p:{c}:live`, a channel: `<epoch> <seq> <frame>` for each entry, published by the same
  script that appends it, so the log and the live feed never disagree; and `<epoch>
  ~<seq> <frame>` for a frame that is no part of the transcript (`status`, `chat_updated`,
  the chat's deletion), said by the holder after the entry `<seq>`, fenced the same way.

A token rises with every new holder within an epoch. An append names its token and epoch
and the seq it carries; the script refuses it unless the token is still the last one handed
out in the current epoch and the seq follows the last one exactly, so a stale holder
(paused, partitioned, presumed dead) can never write, and the seqs in the log have no holes
and no repeats.

One key is not per chat: `p:leases`, a sorted set with a member `<chat> <instance>` for
every lease an instance took or tried to take, scored by when it lapses unless renewed
(milliseconds of the instance's clock). Every instance looks there for lapsed leases (a
dead owner's chats) and takes those chats over; a lease given up leaves it.

The epoch changes when the meta hash is gone (Redis lost its data, or a flush): readers that
see another epoch know the log they mirrored is gone and fall back to the history.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import redis.asyncio

# How long a chat's meta hash and log outlive its last use.
META_TTL_SECONDS = 7 * 86400
LOG_TTL_SECONDS = 86400
# The most events a chat's log keeps (approximately: Redis trims whole nodes).
LOG_MAX_EVENTS = 50_000

_ACQUIRE = """
local holder = redis.call('GET', KEYS[2])
if holder then
  return {0, holder}
end
local fence = redis.call('HINCRBY', KEYS[1], 'fence', 1)
-- Above every token that ever saved to the database, even from a lost log's epoch.
if fence <= tonumber(ARGV[6]) then
  fence = tonumber(ARGV[6]) + 1
  redis.call('HSET', KEYS[1], 'fence', fence)
end
local epoch = redis.call('HGET', KEYS[1], 'epoch')
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '-1')
local floor = tonumber(ARGV[3])
-- The log continues right after its last seq: every event a reader was sent is in it.
-- A lost log starts again above every seq the database may hold.
if not epoch then
  epoch = ARGV[4]
  redis.call('HSET', KEYS[1], 'epoch', epoch)
  redis.call('DEL', KEYS[3])
  seq = floor
end
redis.call('HSET', KEYS[1], 'seq', seq)
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('SET', KEYS[2], ARGV[1] .. ':' .. fence, 'PX', ARGV[2])
return {1, fence, seq, epoch}
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""

# KEYS: meta, ev, live. ARGV: fence, epoch, max events, log ttl, then seq, frame, ...
# A token is only current within its epoch: after a lost log the tokens start again.
# Events the log has already, the same, are skipped: appends may overlap, each carrying
# every event not yet confirmed (cluster.sessions.FencedLog), and either may land first.
_APPEND = """
local meta = redis.call('HMGET', KEYS[1], 'fence', 'epoch', 'seq')
if meta[1] ~= ARGV[1] or meta[2] ~= ARGV[2] then
  return {-1, 0}
end
local epoch = meta[2]
local top = tonumber(meta[3])
local first = 5
while first <= #ARGV and tonumber(ARGV[first]) <= top do
  local id = ARGV[first] .. '-0'
  local found = redis.call('XRANGE', KEYS[2], id, id)
  if #found == 0 or found[1][2][2] ~= ARGV[first + 1] then
    return {-2, top}
  end
  first = first + 2
end
for i = first, #ARGV, 2 do
  if tonumber(ARGV[i]) ~= top + (i - first) / 2 + 1 then
    return {-2, top}
  end
end
if first > #ARGV then
  return {1, top}
end
for i = first, #ARGV, 2 do
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], ARGV[i] .. '-0', 'f', ARGV[i + 1])
  redis.call('PUBLISH', KEYS[3], epoch .. ' ' .. ARGV[i] .. ' ' .. ARGV[i + 1])
  top = tonumber(ARGV[i])
end
redis.call('HSET', KEYS[1], 'seq', top)
redis.call('EXPIRE', KEYS[2], ARGV[4])
return {1, top}
"""

# KEYS: the lease index. ARGV: a member, the time (ms) before which it counts as lapsed.
# Only if it did not come back meanwhile (its instance renewed it): a live lease stays found.
_FORGET = """
local deadline = redis.call('ZSCORE', KEYS[1], ARGV[1])
if deadline and tonumber(deadline) <= tonumber(ARGV[2]) then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 1
end
return 0
"""

_TRIM = """
local meta = redis.call('HMGET', KEYS[1], 'fence', 'epoch')
if meta[1] ~= ARGV[1] or meta[2] ~= ARGV[2] then
  return 0
end
redis.call('XTRIM', KEYS[2], 'MINID', ARGV[3] .. '-0')
return 1
"""


# KEYS: meta, live. ARGV: fence, epoch, the seq it follows, frame.
_SAY = """
local meta = redis.call('HMGET', KEYS[1], 'fence', 'epoch')
if meta[1] ~= ARGV[1] or meta[2] ~= ARGV[2] then
  return 0
end
redis.call('PUBLISH', KEYS[2], ARGV[2] .. ' ~' .. ARGV[3] .. ' ' .. ARGV[4])
return 1
"""


# KEYS: meta, ev. ARGV: the first seq wanted. The log's epoch and last seq, then each event
# after it up to that last seq as a flat `seq, frame, ...`: hiredis hands that back as one
# list, where an XRANGE reply costs redis-py a dict per entry to take apart (most of a cold
# follower's read, see docs/performance.md section 8).
_READ = """
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'seq')
local last = meta[2] and (meta[2] .. '-0') or '+'
local entries = redis.call('XRANGE', KEYS[2], ARGV[1] .. '-0', last)
local out = {meta[1], tonumber(meta[2] or '0')}
for i = 1, #entries do
  out[2 * i + 1] = tonumber(string.match(entries[i][1], '^%d+'))
  out[2 * i + 2] = entries[i][2][2]
end
return out
"""


class Fenced(Exception):
    """The write came from a holder whose lease was taken over (or whose log was lost)."""


class SeqGap(Exception):
    """The appended seq does not follow the log's last one exactly."""


@dataclass(frozen=True)
class Lease:
    """This instance's right to run a chat's turns and append to its log."""

    chat_id: str
    instance: str
    fence: int
    # The log's last seq when the lease was taken, and its epoch.
    seq: int
    epoch: str

    @property
    def value(self) -> str:
        """What the lease key holds while this lease is current."""
        return f"{self.instance}:{self.fence}"


@dataclass(frozen=True)
class Holder:
    """Who holds a chat's lease (another instance, or this one)."""

    instance: str
    fence: int


@dataclass(frozen=True)
class Listed:
    """An entry of the lease list: a chat whose lease an instance took or tried to take."""

    chat_id: str
    instance: str


@dataclass(frozen=True)
class LogRead:
    """Events of a chat's log after some seq, and the log's epoch and last seq."""

    epoch: str | None
    top: int
    events: list[tuple[int, str]]


@dataclass(frozen=True)
class LiveEvent:
    """One event as the live channel carries it; `said`: a frame without a seq, said after
    the event `seq`."""

    epoch: str
    seq: int
    frame: str
    said: bool = False


class Bus:
    """A chat's lease, log and live channel on Redis (see the module docstring)."""

    def __init__(
        self, client: redis.asyncio.Redis, prefix: str, *, instance: str, lease_seconds: float
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.instance = instance
        self.lease_ms = int(lease_seconds * 1000)
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._append = client.register_script(_APPEND)
        self._trim = client.register_script(_TRIM)
        self._say = client.register_script(_SAY)
        self._read = client.register_script(_READ)
        self._forget = client.register_script(_FORGET)

    # --- names ------------------------------------------------------------------------

    def key(self, chat_id: str, part: str) -> str:
        """The key of one part of a chat (`meta`, `lease`, `ev`, `live`)."""
        return f"{self.prefix}:{{{chat_id}}}:{part}"

    def channel(self, chat_id: str) -> str:
        """The chat's live channel."""
        return self.key(chat_id, "live")

    def inbox(self, instance: str) -> str:
        """The channel an instance takes forwarded commands on."""
        return f"{self.prefix}:inst:{instance}"

    def everyone(self) -> str:
        """The channel every instance listens to (chats moved to an account)."""
        return f"{self.prefix}:all"

    @property
    def leases(self) -> str:
        """The sorted set of leases by when they lapse (see the module docstring)."""
        return f"{self.prefix}:leases"

    # --- the lease --------------------------------------------------------------------

    async def acquire(self, chat_id: str, floor: int, fence_floor: int = 0) -> Lease | Holder:
        """Take the chat's lease if nobody holds it: a Lease with a new, higher token.
        `floor` is the last seq the database may have seen used: the log continues after
        it; `fence_floor` the last token the database saw: the new one is higher.
        Otherwise the current Holder."""
        # Listed before it is taken, so that an instance that dies right after taking it
        # still leaves its lease to be found.
        await self._touch(chat_id)
        keys = [self.key(chat_id, "meta"), self.key(chat_id, "lease"), self.key(chat_id, "ev")]
        args: list[str | int] = [
            self.instance,
            self.lease_ms,
            floor,
            secrets.token_hex(8),
            META_TTL_SECONDS,
            fence_floor,
        ]
        answer = await self._acquire(keys=keys, args=args)
        if int(answer[0]) == 0:
            return _holder(_text(answer[1]))
        return Lease(chat_id, self.instance, int(answer[1]), int(answer[2]), _text(answer[3]))

    async def renew(self, lease: Lease) -> bool:
        """Extend the lease; False if it lapsed (someone else may hold it now)."""
        args: list[str | int] = [lease.value, self.lease_ms]
        renewed = bool(await self._renew(keys=[self.key(lease.chat_id, "lease")], args=args))
        if renewed:
            await self._touch(lease.chat_id)
        return renewed

    async def renew_all(self, leases: Sequence[Lease]) -> list[bool]:
        """`renew` for many leases in one round trip (a pipeline, not a transaction: each
        script checks its own lease), then their list entries in one more; whether each
        was still held. An instance renews every chat it owns at once, so how long that
        takes does not grow with their number on a busy machine."""
        if not leases:
            return []
        async with self.client.pipeline(transaction=False) as pipe:
            for lease in leases:
                args: list[str | int] = [lease.value, self.lease_ms]
                await self._renew(keys=[self.key(lease.chat_id, "lease")], args=args, client=pipe)
            renewed = [bool(answer) for answer in await pipe.execute()]
        held = [lease.chat_id for lease, kept in zip(leases, renewed, strict=True) if kept]
        if held:
            deadline = _now_ms() + self.lease_ms
            entries = {_member(chat_id, self.instance): deadline for chat_id in held}
            await self.client.zadd(self.leases, entries, gt=True)
        return renewed

    async def holders_and_epochs(
        self, chat_ids: Sequence[str]
    ) -> list[tuple[Holder | None, str | None]]:
        """`holder` of each chat and the epoch of its log (None: no log), in one round trip."""
        if not chat_ids:
            return []
        async with self.client.pipeline(transaction=False) as pipe:
            for chat_id in chat_ids:
                pipe.get(self.key(chat_id, "lease"))
                pipe.hget(self.key(chat_id, "meta"), "epoch")
            values = await pipe.execute()
        return [
            (
                None if lease is None else _holder(_text(lease)),
                None if epoch is None else _text(epoch),
            )
            for lease, epoch in zip(values[::2], values[1::2], strict=True)
        ]

    async def release(self, lease: Lease) -> None:
        """Give the lease up, if it is still ours."""
        await self._release(keys=[self.key(lease.chat_id, "lease")], args=[lease.value])
        await self.client.zrem(self.leases, _member(lease.chat_id, self.instance))

    async def lapsed(self, limit: int) -> list[Listed]:
        """Up to `limit` leases listed past their time: their holders stopped renewing
        them (died, or hang), or tried to take them and did not get them."""
        members = await self.client.zrangebyscore(self.leases, "-inf", _now_ms(), 0, limit)
        return [Listed(*_text(cast(str, member)).split(" ", 1)) for member in members]

    async def forget(self, listed: Listed) -> None:
        """Take a lapsed lease off the list (not if its instance renewed it meanwhile)."""
        member = _member(listed.chat_id, listed.instance)
        await self._forget(keys=[self.leases], args=[member, _now_ms()])

    async def _touch(self, chat_id: str) -> None:
        # (Only ever raised: a late write from an earlier try never shortens it.)
        deadline = _now_ms() + self.lease_ms
        await self.client.zadd(self.leases, {_member(chat_id, self.instance): deadline}, gt=True)

    async def holder(self, chat_id: str) -> Holder | None:
        """Who holds the chat's lease now, if anyone."""
        value = await self.client.get(self.key(chat_id, "lease"))
        return None if value is None else _holder(_text(value))

    async def outlived(
        self, chat_id: str, holder: Holder | None, *, within: float, poll: float
    ) -> bool:
        """Wait, at most `within` seconds, until `holder` (found not listening) holds the
        chat's lease no more: it lapsed, or another instance took the chat over meanwhile
        (the chat has a live owner again). Whether it did."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            now = await self.holder(chat_id)
            if now is None or now != holder:
                return True
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(poll)

    # --- the log ----------------------------------------------------------------------

    async def append(self, lease: Lease, events: list[tuple[int, str]]) -> int:
        """Append events (seq, frame) and publish them, in one step; returns the last seq.
        Those the log has already, the same, are skipped (appends may overlap). Raises
        Fenced for a stale lease, SeqGap if the others do not follow the log, or one it
        has differs."""
        if not events:
            raise ValueError("nothing to append")
        chat_id = lease.chat_id
        keys = [self.key(chat_id, "meta"), self.key(chat_id, "ev"), self.key(chat_id, "live")]
        args: list[str | int] = [lease.fence, lease.epoch, LOG_MAX_EVENTS, LOG_TTL_SECONDS]
        for seq, frame in events:
            args += [seq, frame]
        status, top = (int(part) for part in await self._append(keys=keys, args=args))
        if status == -1:
            raise Fenced(f"chat {chat_id}: token {lease.fence} is no longer current")
        if status == -2:
            raise SeqGap(f"chat {chat_id}: seq {events[0][0]} does not follow {top}")
        return top

    async def trim(self, lease: Lease, before_seq: int) -> None:
        """Forget the log's events before `before_seq` (only the current holder may)."""
        keys = [self.key(lease.chat_id, "meta"), self.key(lease.chat_id, "ev")]
        await self._trim(keys=keys, args=[lease.fence, lease.epoch, before_seq])

    async def say(self, lease: Lease, after_seq: int, frame: str) -> None:
        """Publish a frame without a seq on the chat's live channel, placed after the event
        `after_seq`; raises Fenced for a stale lease, like an append."""
        keys = [self.key(lease.chat_id, "meta"), self.channel(lease.chat_id)]
        args: list[str | int] = [lease.fence, lease.epoch, after_seq, frame]
        if not int(await self._say(keys=keys, args=args)):
            raise Fenced(f"chat {lease.chat_id}: token {lease.fence} is no longer current")

    async def read(self, chat_id: str, after_seq: int = 0) -> LogRead:
        """The log's events after `after_seq`, with its epoch and last seq (one script, so
        the events are exactly those up to that seq)."""
        keys = [self.key(chat_id, "meta"), self.key(chat_id, "ev")]
        answer = await self._read(keys=keys, args=[after_seq + 1])
        epoch, top = answer[0], int(answer[1])
        events = list(zip(map(int, answer[2::2]), map(_text, answer[3::2]), strict=True))
        return LogRead(None if epoch is None else _text(epoch), top, events)

    @staticmethod
    def parse_live(message: str | bytes) -> LiveEvent:
        """A live channel message, taken apart."""
        epoch, seq, frame = _text(message).split(" ", 2)
        if seq.startswith("~"):
            return LiveEvent(epoch, int(seq[1:]), frame, said=True)
        return LiveEvent(epoch, int(seq), frame)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _member(chat_id: str, instance: str) -> str:
    return f"{chat_id} {instance}"


def _now_ms() -> int:
    return int(time.time() * 1000)


def _holder(value: str) -> Holder:
    instance, _, fence = value.rpartition(":")
    return Holder(instance, int(fence))

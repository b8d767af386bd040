"""What a stranger can spend: turns per hour or day, tokens per day, turns running at once
and open connections, per visitor and per client address (docs/deployment.md, "Limits").

A message is admitted (`Quotas.admit`) before anything is claimed or saved for it; a turn
runs only when `TurnGate` lets it (a fair share of the engine for each visitor and
address, waiting in line otherwise). Turn counts live in the rate limiter (memory, or Redis
shared by several instances); token budgets count the usage saved with each answer, so the
database is the truth and budgets hold across restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from blogchat.ratelimit import Rate, RateLimiter
from blogchat.settings import Settings

log = logging.getLogger(__name__)

DAY = 24 * 3600
HOUR = 3600
# How long token totals read from the database are trusted before they are read again (what
# other instances spent shows up within this long; this instance's own at once).
USAGE_FRESH_SECONDS = 10.0
# Refusals by the shared turn counts remembered at most (then the lapsed ones are dropped).
REFUSALS_KEPT = 10_000


@dataclass(frozen=True)
class Who:
    """Whose allowance a message counts against: the visitor, the client address it came
    from ("" when unknown, e.g. after a restart), and whether it is signed in."""

    visitor: str
    address: str
    anonymous: bool


class QuotaExceeded(Exception):
    """A message the visitor may not send now; the message says what to do."""

    def __init__(
        self, code: Literal["rate_limited", "budget_exceeded"], message: str, retry_after: float
    ) -> None:
        super().__init__(message)
        self.code: Literal["rate_limited", "budget_exceeded"] = code
        self.message = message
        self.retry_after = retry_after


@dataclass(frozen=True)
class Budget:
    """At most `tokens` input and output tokens per `seconds`, per key."""

    name: str
    tokens: int
    seconds: int


# (when, tokens) of each saved answer in a window, oldest first.
Spending = list[tuple[float, int]]
UsageSince = Callable[[Literal["visitor", "address"], str, float], Awaitable[Spending]]


@dataclass
class _Tally:
    read_at: float
    spending: Spending = field(default_factory=list)


class Quotas:
    """Admits messages within each visitor's and address's turn rates and token budgets."""

    def __init__(
        self,
        settings: Settings,
        limiter: RateLimiter,
        usage_since: UsageSince,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.limiter = limiter
        self._usage_since = usage_since
        self._clock = clock
        self.visitor_turns = Rate("turns-visitor", settings.visitor_turns_per_hour, HOUR)
        self.address_turns = Rate("turns-address", settings.address_turns_per_hour, HOUR)
        self.user_turns = Rate("turns-user", settings.user_turns_per_day, DAY)
        self.visitor_tokens = Budget("tokens-visitor", settings.visitor_tokens_per_day, DAY)
        self.address_tokens = Budget("tokens-address", settings.address_tokens_per_day, DAY)
        self.user_tokens = Budget("tokens-user", settings.user_tokens_per_day, DAY)
        self._tallies: dict[tuple[str, str], _Tally] = {}
        # (rate, key) -> until when a hit refused by the shared counts stays refused.
        self._refused: dict[tuple[str, str], float] = {}

    async def admit(self, who: Who) -> None:
        """Count one more turn for `who`, or raise QuotaExceeded (counting nothing)."""
        await self.check(who)
        await self.count(who)

    async def check(self, who: Who) -> None:
        """Raise QuotaExceeded if `who` may not start a turn now; count nothing.

        On Redis the turn rates are not asked here: each would be a round trip on the
        message's way to its first token, and `count` asks them anyway. A rate refused
        lately is refused here until its window frees a place, so a visitor who keeps
        sending past a limit costs no round trip and no transaction."""
        rates = self._rates(who)
        if self.limiter.remote:
            self._refused_lately(rates)
        else:
            for rate, key in rates:
                decision = await self.limiter.test(rate, key)
                if not decision.allowed:
                    raise _too_many_turns(rate, decision.retry_after)
        for budget, kind, key in self._budgets(who):
            wait = await self._over_budget(budget, kind, key)
            if wait is not None:
                raise QuotaExceeded("budget_exceeded", _out_of_tokens(budget, wait), wait)

    async def count(self, who: Who) -> None:
        """Count one more turn for `who` (after `check`), or raise QuotaExceeded if its turn
        rates allow none now. Uses no store: the message path counts a turn inside the
        transaction that saves its message.

        Each rate counts a hit only if it has room (one step on Redis). In memory, where
        `check` asked every rate just before, they go in turn and a refusal (only a race
        gets one) counts nothing. On Redis they go side by side, each a round trip on the
        message's way to its first token: when one refuses, the other's hit stays counted,
        one turn of the visitor's or of its address's, once per window on each instance
        (the refusal is remembered, see `check`)."""
        rates = self._rates(who)
        if self.limiter.remote:
            decisions = await asyncio.gather(*(self.limiter.hit(rate, key) for rate, key in rates))
        else:
            decisions = [await self.limiter.hit(rate, key) for rate, key in rates]
        for (rate, key), decision in zip(rates, decisions, strict=True):
            if not decision.allowed:
                if self.limiter.remote:
                    self._remember_refusal(rate, key, decision.retry_after)
                raise _too_many_turns(rate, decision.retry_after)

    def _remember_refusal(self, rate: Rate, key: str, retry_after: float) -> None:
        now = self._clock()
        if len(self._refused) >= REFUSALS_KEPT:
            self._refused = {k: until for k, until in self._refused.items() if until > now}
        self._refused[(rate.name, key)] = now + retry_after

    def _refused_lately(self, rates: list[tuple[Rate, str]]) -> None:
        """Raise QuotaExceeded for a rate that refused a hit whose window has not freed a
        place since (hits only leave a moving window, oldest first, so none can pass
        before then: the refusal is exact, never early)."""
        now = self._clock()
        for rate, key in rates:
            until = self._refused.get((rate.name, key))
            if until is None:
                continue
            if until <= now:
                del self._refused[(rate.name, key)]
                continue
            raise _too_many_turns(rate, until - now)

    def spent(self, who: Who, tokens: int) -> None:
        """A turn of `who` ended having used `tokens` (just saved with its answer)."""
        now = self._clock()
        for _, kind, key in self._budgets(who):
            tally = self._tallies.get((kind, key))
            if tally is not None:
                tally.spending.append((now, tokens))

    def _rates(self, who: Who) -> list[tuple[Rate, str]]:
        """The turn rates a message of `who` counts against."""
        if not who.anonymous:
            return [(self.user_turns, who.visitor)]
        rates = [(self.visitor_turns, who.visitor)]
        if who.address:
            rates.append((self.address_turns, who.address))
        return rates

    def _budgets(self, who: Who) -> list[tuple[Budget, Literal["visitor", "address"], str]]:
        if not who.anonymous:
            return [(self.user_tokens, "visitor", who.visitor)]
        budgets: list[tuple[Budget, Literal["visitor", "address"], str]] = [
            (self.visitor_tokens, "visitor", who.visitor)
        ]
        if who.address:
            budgets.append((self.address_tokens, "address", who.address))
        return budgets

    async def _over_budget(
        self, budget: Budget, kind: Literal["visitor", "address"], key: str
    ) -> float | None:
        """Seconds until the key is under its budget again; None when it is now."""
        now = self._clock()
        since = now - budget.seconds
        tally = self._tallies.get((kind, key))
        if tally is None or now - tally.read_at > USAGE_FRESH_SECONDS:
            tally = _Tally(now, await self._usage_since(kind, key, since))
            self._tallies[(kind, key)] = tally
        spending = [(at, tokens) for at, tokens in tally.spending if at >= since]
        tally.spending = spending
        total = sum(tokens for _, tokens in spending)
        if total < budget.tokens:
            return None
        # The oldest answers leave the window first: wait until enough of them have.
        for at, tokens in spending:
            total -= tokens
            if total < budget.tokens:
                return max(1.0, at + budget.seconds - now)
        return float(budget.seconds)  # pragma: no cover - the loop always returns


def _in(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} seconds"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} minutes"
    return f"{round(seconds / 3600)} hours"


def _too_many_turns(rate: Rate, retry_after: float) -> QuotaExceeded:
    """The refusal of a message by a turn rate with no room for `retry_after` seconds."""
    who = "Your network has" if rate.name == "turns-address" else "You have"
    window = "an hour" if rate.seconds == HOUR else "a day"
    message = (
        f"{who} sent the most messages allowed in {window} ({rate.amount}). "
        f"Try again in {_in(retry_after)}."
    )
    return QuotaExceeded("rate_limited", message, retry_after)


def _out_of_tokens(budget: Budget, wait: float) -> str:
    who = "Your network has" if budget.name == "tokens-address" else "You have"
    return f"{who} used up today's share of the assistant. It frees up again in {_in(wait)}."


@dataclass(frozen=True)
class Slot:
    """One place taken under the caps of some keys (a running turn, an open connection)."""

    keys: tuple[str, ...]
    id: str = field(default_factory=lambda: uuid.uuid4().hex)


# (key, cap): a place counts under each key, and each key has at most `cap` at once.
Caps = Sequence[tuple[str, int]]


class CountsUnreachable(Exception):
    """The shared counts (Redis, with several instances) cannot be reached now: nothing was
    taken, and whether there is room is unknown."""


class Slots(Protocol):
    """Places counted per key within caps: in this process (one instance), or in Redis
    shared by every instance (`cluster/slots.py`)."""

    async def take(self, caps: Caps) -> Slot | None:
        """A place under every key's cap at once, or None (taking nothing) if one is full;
        raises CountsUnreachable when the counts cannot be reached."""
        ...

    async def give_back(self, slot: Slot) -> None:
        """Free a place taken by `take`; never raises."""
        ...

    def on_freed(self, listener: Callable[[], None]) -> None:
        """Call `listener` whenever places may have freed up other than through this
        process's `give_back` (another instance's, or a dead instance's, expiring)."""
        ...


class MemorySlots:
    """Slots counted in this process."""

    def __init__(self) -> None:
        self._held: dict[str, int] = {}

    async def take(self, caps: Caps) -> Slot | None:
        """A place under every key's cap at once, or None (taking nothing) if one is full."""
        if any(self._held.get(key, 0) >= cap for key, cap in caps):
            return None
        for key, _ in caps:
            self._held[key] = self._held.get(key, 0) + 1
        return Slot(tuple(key for key, _ in caps))

    async def give_back(self, slot: Slot) -> None:
        """Free a place taken by `take`."""
        for key in slot.keys:
            self._held[key] -= 1
            if not self._held[key]:
                del self._held[key]

    def count(self, key: str) -> int:
        """Places held under a key now."""
        return self._held.get(key, 0)

    def on_freed(self, listener: Callable[[], None]) -> None:
        """Places here only free up through `give_back`: nothing to listen to."""


class GateTimeout(Exception):
    """A turn waited too long for its place."""


class TurnGate:
    """Lets turns run: at most a few at once per visitor and per address, and no more than
    the engine's capacity in all; the others wait in line, first come first served, and are
    told their place. A turn whose own caps are full does not hold up those behind it.

    The caps per visitor and address are counted by `slots`: in memory, or in Redis when
    several instances share them (a visitor's turns on every instance count together).
    The engine's capacity and the line are this instance's own."""

    def __init__(
        self, settings: Settings, capacity: int | None, slots: Slots | None = None
    ) -> None:
        self.capacity = capacity
        self._visitor_cap = settings.visitor_running_turns
        self._address_cap = settings.address_running_turns
        self._user_cap = settings.user_running_turns
        self._slots = slots or MemorySlots()
        self._slots.on_freed(self._wake)
        self._total = 0
        self._line: list[_Waiter] = []
        # One pass over the line at a time: a pass may wait on Redis between two waiters.
        self._admitting = asyncio.Lock()
        self._woken: asyncio.Task[None] | None = None
        self._again = False

    @property
    def running(self) -> int:
        """Turns running now."""
        return self._total

    @property
    def waiting(self) -> int:
        """Turns waiting for their place."""
        return len(self._line)

    async def take_now(self, who: Who) -> Slot | None:
        """A place for a turn of `who`, taken at once if nobody waits in line and there
        is room; None otherwise, or when the counts cannot be reached (the turn then waits
        in line as usual). Taken while the turn's message is being saved, it spares the
        turn a round trip to the shared counts once the message is; hand it to `turn`
        (`taken=`), or back to `leave`."""
        async with self._admitting:
            if self._line or (self.capacity is not None and self._total >= self.capacity):
                return None
            try:
                slot = await self._slots.take(self._keys(who))
            except CountsUnreachable:
                return None
            except Exception:
                log.exception("could not count a running turn")
                return None
            if slot is not None:
                self._total += 1
            return slot

    async def leave(self, slot: Slot) -> None:
        """Give back a place `take_now` took for a turn that will not run."""
        await self._leave(slot)

    @contextlib.asynccontextmanager
    async def turn(
        self,
        who: Who,
        *,
        wait: float,
        on_place: Callable[[int], None],
        taken: Slot | None = None,
    ) -> AsyncIterator[None]:
        """Run a turn once there is room for it (at once with a place `taken` for it
        already); `on_place` hears its place in line while it waits (1: next). Raises
        GateTimeout after `wait` seconds in line."""
        if taken is not None:
            try:
                yield
            finally:
                await self._leave(taken)
            return
        waiter = _Waiter(self._keys(who), asyncio.get_running_loop().create_future(), on_place)
        self._line.append(waiter)
        try:
            await self._admit()
            waiter.passed = True
            if not waiter.admitted.done():
                self._tell_places()
                await asyncio.wait_for(asyncio.shield(waiter.admitted), wait)
        except BaseException as exc:
            if waiter.admitted.done() and not waiter.admitted.cancelled():
                await self._leave(waiter.admitted.result())  # Let in just as it gave up.
            else:
                waiter.admitted.cancel()
                self._line.remove(waiter)
                self._wake()
            if isinstance(exc, TimeoutError):
                raise GateTimeout from None
            raise
        try:
            yield
        finally:
            await self._leave(waiter.admitted.result())

    def _keys(self, who: Who) -> list[tuple[str, int]]:
        if not who.anonymous:
            return [(f"user:{who.visitor}", self._user_cap)]
        keys = [(f"visitor:{who.visitor}", self._visitor_cap)]
        if who.address:
            keys.append((f"address:{who.address}", self._address_cap))
        return keys

    async def _leave(self, slot: Slot) -> None:
        self._total -= 1
        await self._slots.give_back(slot)
        self._wake()

    def _wake(self) -> None:
        """Room may have freed up: make a pass over the line (in a task of its own, so the
        turn that freed it does not wait for the pass)."""
        self._again = True
        if self._line and (self._woken is None or self._woken.done()):
            self._woken = asyncio.get_running_loop().create_task(self._admit_while_woken())

    async def _admit_while_woken(self) -> None:
        # Room that freed up during a pass may be for a waiter the pass already passed.
        while self._again and self._line:
            self._again = False
            await self._admit()

    async def _admit(self) -> None:
        """Let in, in order, every waiter there is room for."""
        async with self._admitting:
            admitted = False
            # Waiters with the same keys as one refused in this pass are refused too.
            full: set[tuple[tuple[str, int], ...]] = set()
            for waiter in list(self._line):
                if self.capacity is not None and self._total >= self.capacity:
                    break
                keys = tuple(waiter.keys)
                if waiter.admitted.done() or keys in full:
                    continue
                try:
                    slot = await self._slots.take(keys)
                except CountsUnreachable:
                    # The waiters wait (a later pass, or their wait's end, settles them); the
                    # slots logged the outage once.
                    break
                except Exception:
                    log.exception("could not count a running turn")
                    break
                if slot is None:
                    full.add(keys)
                elif waiter.admitted.done():
                    await self._slots.give_back(slot)  # It gave up during the take.
                else:
                    self._line.remove(waiter)
                    self._total += 1
                    waiter.admitted.set_result(slot)
                    admitted = True
            if admitted:
                self._tell_places()

    def _tell_places(self) -> None:
        for place, waiter in enumerate(self._line, start=1):
            # A waiter not through its own first pass yet is not told to wait: that pass
            # may well let it in (another pass held the line, waiting on shared counts).
            if waiter.passed and waiter.place != place:
                waiter.place = place
                waiter.on_place(place)


@dataclass
class _Waiter:
    keys: list[tuple[str, int]]
    admitted: asyncio.Future[Slot]
    on_place: Callable[[int], None]
    place: int = 0
    passed: bool = False


class Connections:
    """Open WebSockets per visitor and per client address, within their caps (counted by
    `slots`: in memory, or in Redis across instances)."""

    def __init__(self, settings: Settings, slots: Slots | None = None) -> None:
        self._visitor_cap = settings.visitor_connections
        self._address_cap = settings.address_connections
        self._slots = slots or MemorySlots()

    async def open(self, visitor: str, address: str) -> Slot | None:
        """Count a new connection, unless the visitor or the address has too many open;
        raises CountsUnreachable when the shared counts cannot be reached."""
        return await self._slots.take(
            [(f"visitor:{visitor}", self._visitor_cap), (f"address:{address}", self._address_cap)]
        )

    async def close(self, slot: Slot) -> None:
        """A connection counted by `open` closed."""
        await self._slots.give_back(slot)

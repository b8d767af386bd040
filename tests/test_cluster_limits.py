"""The abuse limits across instances: a visitor's turns per hour, running turns and open
WebSockets count the same whichever instance they reach, and a dead instance's places free
themselves.

In process: the Redis slots (`cluster/slots.py`) against the real Redis, a key prefix per
test, two `RedisSlots` standing for two instances. Then real server processes (the
`Fleet` of tests/test_cluster.py), with the limits under test set low.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import pytest
import redis.asyncio
from websockets.exceptions import InvalidStatus

from blogchat.cluster.slots import RedisSlots
from blogchat.quotas import Slot, TurnGate, Who
from blogchat.settings import Settings
from tests import test_cluster
from tests.support.client import ChatSocket, Event
from tests.support.redis import REDIS_URL, forget_prefix, require_redis, unique_prefix
from tests.support.relay import Relay
from tests.support.server import Database
from tests.test_cluster import QUESTION, Fleet, Visitor, sql

# (A fixture, used by its name: the explicit re-export keeps it.)
from tests.test_cluster import fleet_of as fleet_of

ALICE = Who("alice", "203.0.113.7", anonymous=True)
LONG_QUESTION = "Tell me about sourdough starters at length?"

redis_client = test_cluster.redis_client


# --- the Redis slots, in process -------------------------------------------------------------


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    await require_redis()
    prefix = unique_prefix()
    try:
        yield prefix
    finally:
        client = redis.asyncio.Redis.from_url(REDIS_URL)
        try:
            await forget_prefix(client, prefix)
        finally:
            await client.aclose()


@pytest.fixture
async def instances(
    prefix: str, redis_client: redis.asyncio.Redis
) -> AsyncIterator[dict[str, RedisSlots]]:
    """`a` and `b`: two instances' counts of running turns, under one prefix."""
    made: dict[str, RedisSlots] = {}
    for name in ("a", "b"):
        made[name] = RedisSlots(
            redis_client, prefix, "turns", instance=name, ttl_seconds=0.6, announce=True
        )
        await made[name].start()
    try:
        yield made
    finally:
        for slots in made.values():
            await slots.aclose()


VISITOR = [("visitor:alice", 2), ("address:203.0.113.7", 3)]
NEIGHBOUR = [("visitor:bob", 2), ("address:203.0.113.7", 3)]


async def test_a_visitors_places_count_together_on_every_instance(
    instances: dict[str, RedisSlots],
) -> None:
    a, b = instances["a"], instances["b"]
    first = await a.take(VISITOR)
    assert first is not None
    assert await b.take(VISITOR) is not None
    assert await b.take(VISITOR) is None, "the visitor's cap of 2 counts both instances"
    assert await a.take(NEIGHBOUR) is not None
    # The address is full (3): a refused take takes nothing, not even the visitor's place.
    assert await b.take([("visitor:carol", 2), ("address:203.0.113.7", 3)]) is None
    assert await b.take([("visitor:carol", 1)]) is not None
    await a.give_back(first)
    assert await b.take(VISITOR) is not None
    assert (a.held, b.held) == (1, 3)


async def test_places_taken_at_once_from_two_instances_never_pass_the_cap(
    instances: dict[str, RedisSlots],
) -> None:
    a, b = instances["a"], instances["b"]
    caps = [("visitor:alice", 4)]
    taken = await asyncio.gather(*(slots.take(caps) for slots in [a, b] * 15))
    assert sum(slot is not None for slot in taken) == 4


async def test_a_holders_places_outlive_their_ttl_and_a_dead_holders_lapse(
    instances: dict[str, RedisSlots],
) -> None:
    a, b = instances["a"], instances["b"]
    assert await a.take([("visitor:alice", 1)]) is not None
    # Four renewals, a third of the 0.6 s time to live apart: past the first expiry.
    await until(lambda: a.renewals >= 4)
    assert await b.take([("visitor:alice", 1)]) is None
    await a.aclose()  # a dies: nothing is given back, nothing renewed any more.
    taken: list[Slot | None] = [None]

    async def b_takes() -> bool:
        taken[0] = await b.take([("visitor:alice", 1)])
        return taken[0] is not None

    await until_async(b_takes)
    assert b.held == 1


async def test_a_turn_waiting_on_one_instance_starts_when_the_visitors_turn_ends_on_another(
    prefix: str, redis_client: redis.asyncio.Redis, tmp_path: Path
) -> None:
    settings = Settings(_env_file=None, data_dir=tmp_path)
    # A long time to live: only the announcement of the freed place can wake b's waiter.
    slots = {
        name: RedisSlots(
            redis_client, prefix, "turns", instance=name, ttl_seconds=60, announce=True
        )
        for name in ("a", "b")
    }
    for each in slots.values():
        await each.start()
    try:
        gate_a = TurnGate(settings, None, slots["a"])
        gate_b = TurnGate(settings, None, slots["b"])
        running, done = asyncio.Event(), asyncio.Event()

        async def on_a() -> None:
            async with gate_a.turn(ALICE, wait=30, on_place=lambda place: None):
                running.set()
                await done.wait()

        first = asyncio.create_task(on_a())
        await running.wait()
        places: list[int] = []
        started = asyncio.Event()

        async def on_b() -> None:
            async with gate_b.turn(ALICE, wait=30, on_place=places.append):
                started.set()

        second = asyncio.create_task(on_b())
        await until(lambda: places == [1])
        assert (gate_b.running, gate_b.waiting, started.is_set()) == (0, 1, False)
        done.set()
        await asyncio.gather(first, second)
        assert started.is_set()
        assert (gate_b.running, gate_b.waiting) == (0, 0)
        assert (slots["a"].held, slots["b"].held) == (0, 0)
    finally:
        for each in slots.values():
            await each.aclose()


async def until(condition: Any, timeout: float = 30) -> None:
    """Poll a condition until it holds; fail after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "the condition never held"
        await asyncio.sleep(0.02)


async def until_async(condition: Any, timeout: float = 30) -> None:
    """`until` for a condition that must be awaited."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await condition():
        assert loop.time() < deadline, "the condition never held"
        await asyncio.sleep(0.05)


# --- real instances --------------------------------------------------------------------------


@pytest.fixture
def limited_fleet(fleet_of: Any) -> Any:
    """Start instances (`a` and `b` unless named) with these limits (settings' names), as
    `tests/test_cluster.py`'s fleets."""

    def start(*names: str, speed: int = 0, **limits: Any) -> Fleet:
        env = {Settings.env_name(field): str(value) for field, value in limits.items()}
        fleet: Fleet = fleet_of(*(names or ("a", "b")), speed=speed, env=env)
        return fleet

    return start


async def ask(ws: ChatSocket, question: str, chat_id: str | None = None) -> list[Event]:
    """Send a message and read its turn to `done` (a refusal ends at its `error`)."""
    await ws.chat(question, chat_id)
    events: list[Event] = []
    while True:
        event = await ws.recv(timeout=60)
        events.append(event)
        if event["type"] == "done" or (event["type"] == "error" and "seq" not in event):
            return events


async def test_turns_per_hour_count_a_visitors_messages_on_every_instance(
    limited_fleet: Any, redis_client: redis.asyncio.Redis, postgres_database: Database
) -> None:
    fleet = limited_fleet(visitor_turns_per_hour=2)
    async with Visitor(fleet) as visitor:
        on_a, on_b = await visitor.connect("a"), await visitor.connect("b")
        assert (await ask(on_a, QUESTION))[-1]["reason"] == "complete"
        assert (await ask(on_b, "And espresso?"))[-1]["reason"] == "complete"
        for ws in (on_a, on_b):
            refused = (await ask(ws, "One more?"))[-1]
            assert (refused["type"], refused["code"]) == ("error", "rate_limited")
            assert "most messages allowed in an hour (2)" in refused["message"]
            assert 0 < refused["retryAfter"] <= 3600
    # Nothing was saved for the refused messages; the counters are in Redis.
    rows = await sql(postgres_database, "SELECT text FROM messages WHERE role = 'user'")
    assert sorted(row["text"] for row in rows) == sorted([QUESTION, "And espresso?"])
    keys = [key async for key in redis_client.scan_iter(match=f"{fleet.prefix}*")]
    assert any(b"turns-visitor" in key for key in keys)


async def test_a_visitor_running_a_turn_on_one_instance_waits_its_turn_on_another(
    limited_fleet: Any,
) -> None:
    fleet = limited_fleet(visitor_running_turns=1, speed=40)
    async with Visitor(fleet) as visitor:
        on_a = await visitor.connect("a")
        await on_a.chat(LONG_QUESTION)
        await on_a.until("token")
        # A new chat on b is b's to run; the visitor's one running turn is on a.
        on_b = await visitor.connect("b")
        await on_b.chat("And espresso?")
        created = (await on_b.expect("chat_created"))["chatId"]
        second = await on_b.until("done", chatId=created, timeout=60)
        kinds = [event["type"] for event in second]
        assert kinds[:2] == ["user_message", "status"]
        assert (second[1]["state"], second[1]["position"]) == ("waiting", 1)
        assert second[-1]["reason"] == "complete"
        first = await on_a.until("done", timeout=60)
        assert first[-1]["reason"] == "complete"


async def test_a_turn_waiting_too_long_for_a_visitors_turn_on_another_instance_ends_busy(
    limited_fleet: Any,
) -> None:
    fleet = limited_fleet(visitor_running_turns=1, turn_wait_seconds=0.3, speed=10)
    async with Visitor(fleet) as visitor:
        on_a = await visitor.connect("a")
        await on_a.chat(LONG_QUESTION)
        await on_a.until("token")
        on_b = await visitor.connect("b")
        await on_b.chat("And espresso?")
        events = await on_b.until("done", reason="error", timeout=60)
        (busy,) = [event for event in events if event["type"] == "error"]
        assert (busy["code"], busy["retryable"]) == ("busy", True)
        assert busy["seq"] == events[-1]["seq"] - 1
        await on_a.send(type="stop", chatId=events[0]["chatId"])


async def test_a_visitor_at_its_websockets_on_one_instance_opens_none_on_another(
    limited_fleet: Any,
) -> None:
    fleet = limited_fleet(visitor_connections=2)
    async with Visitor(fleet) as visitor:
        await visitor.connect("a")
        second = await visitor.connect("a")
        with pytest.raises(InvalidStatus) as refused:
            await visitor.connect("b")
        assert refused.value.response.status_code == 429
        await second.close()
        # a counts the closed one off once its reader loop ends.
        await connect_once_free(visitor, "b")
        with pytest.raises(InvalidStatus):
            await visitor.connect("a")


async def connect_once_free(visitor: Visitor, name: str, timeout: float = 30) -> ChatSocket:
    """A WebSocket to this instance, tried until the visitor's cap lets one in."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            return await visitor.connect(name)
        except InvalidStatus as refused:
            status = refused.response.status_code
            assert status == 429, f"refused with {status}"
            assert loop.time() < deadline, "the visitor's WebSockets never freed up"
        await asyncio.sleep(0.05)


async def test_a_killed_instances_running_turns_and_websockets_free_themselves(
    limited_fleet: Any, redis_client: redis.asyncio.Redis
) -> None:
    fleet = limited_fleet(visitor_running_turns=1, visitor_connections=2, speed=10)
    async with Visitor(fleet) as visitor:
        on_a = await visitor.connect("a")
        await visitor.connect("a")
        await on_a.chat(LONG_QUESTION)
        await on_a.until("token")
        with pytest.raises(InvalidStatus):
            await visitor.connect("b")
        seconds, micros = await redis_client.time()
        killed_ms = seconds * 1000 + micros // 1000
        fleet.servers["a"].kill()
        loop = asyncio.get_running_loop()
        killed = loop.time()
        on_b = await connect_once_free(visitor, "b")
        freed = loop.time() - killed
        events = await ask(on_b, "And espresso?")
        assert events[-1]["reason"] == "complete"
        assert not [event for event in events if event["type"] == "error"]
        # b holds its reader's WebSocket; a's places were never renewed after the kill, so
        # each lapses within one lease of it (a lapsed member stays in its sorted set,
        # scored with the moment it lapsed, until the next take on that key drops it).
        places: list[tuple[str, float]] = []
        async for key in redis_client.scan_iter(match=f"{fleet.prefix}:{{slots}}:*"):
            scored = await redis_client.zrange(key, 0, -1, withscores=True)
            for member, score in cast(list[tuple[bytes, float]], scored):
                places.append((member.decode(), score))
        assert any(member.startswith("b:") for member, _ in places), places
        lapse_ms = killed_ms + fleet.lease * 1000
        dead = [(member, score) for member, score in places if not member.startswith("b:")]
        assert all(member.startswith("a:") and score <= lapse_ms for member, score in dead), (
            killed_ms,
            places,
        )
    print(f"\nkilled instance's WebSockets free on another after {freed:.2f} s (lease 3 s)")


async def test_websockets_opening_at_once_beyond_the_redis_pool_wait_for_a_connection(
    limited_fleet: Any,
) -> None:
    # 4 connections, two of them the instance's pub/sub: 60 upgrades at once each count
    # themselves in Redis, and wait for one of the other two rather than fail.
    fleet = limited_fleet("a", redis_max_connections=4)
    async with Visitor(fleet) as visitor:
        sockets = await asyncio.gather(*(visitor.connect("a") for _ in range(60)))
        assert len(sockets) == 60
        assert (await ask(sockets[-1], QUESTION))[-1]["reason"] == "complete"
    log = fleet.servers["a"].log_path.read_text(errors="replace")
    assert "Traceback" not in log, log


@pytest.fixture
def redis_relay() -> Iterator[Relay]:
    """The test Redis through a relay a test can cut (set up before the fleet, so that the
    instances stop before it does)."""
    asyncio.run(require_redis())
    target = urlsplit(REDIS_URL)
    assert target.hostname is not None
    with Relay(target.hostname, target.port or 6379) as relay:
        yield relay


async def test_an_instance_that_cannot_reach_redis_refuses_websockets_with_503_logged_once(
    redis_relay: Relay, limited_fleet: Any
) -> None:
    target = urlsplit(REDIS_URL)
    through_relay = target._replace(netloc=f"127.0.0.1:{redis_relay.port}").geturl()
    fleet = limited_fleet("a", redis_url=through_relay)
    server = fleet.servers["a"]
    async with Visitor(fleet) as visitor:
        await visitor.connect("a")
        redis_relay.cut()
        for _ in range(3):
            with pytest.raises(InvalidStatus) as refused:
                await visitor.connect("a")
            response = refused.value.response
            assert response.status_code == 503
            assert response.headers["Retry-After"] == "5"
            assert b"try again shortly" in response.body
        redis_relay.restore()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while True:
            try:
                ws = await visitor.connect("a")
                break
            except InvalidStatus as still:
                status = still.response.status_code
                assert status == 503, f"refused with {status}"
                assert loop.time() < deadline, "Redis came back, WebSockets did not"
            await asyncio.sleep(0.05)
        # Taken again: the connection works end to end.
        events = await ask(ws, QUESTION)
        log = server.log_path.read_text(errors="replace")
        assert events[-1].get("reason") == "complete", (events, log)
    log = server.log_path.read_text(errors="replace")
    assert log.count("Redis out of reach, connections places cannot be counted") == 1, log
    assert log.count("Redis reachable again: connections places counted") == 1, log
    assert "Exception in ASGI application" not in log
    assert "a WebSocket upgrade failed" not in log
    assert "without completing handshake" not in log

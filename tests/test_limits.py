"""The limits a stranger runs into, through a live server and real WebSockets: each holds,
its refusal is exact (nothing saved, acknowledged or claimed), and the next message is
allowed once the window moves (a moved wall clock, not a sleep).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import pytest
import time_machine
from websockets.exceptions import InvalidStatus

from blogchat.hub import LARGE_ANSWER
from blogchat.settings import Settings
from tests.support.anthropic_server import AnthropicTestServer, reply, text, usage
from tests.support.claude import claude_server_for
from tests.support.client import ChatSocket, Event, Reader, answer_text
from tests.support.load import squeeze_server_send_buffer, stalled_socket
from tests.support.server import LiveServer, running

HOUR = 3600
DAY = 24 * 3600


async def ask(ws: ChatSocket, question: str, chat_id: str | None = None) -> list[Event]:
    """Send a message and read its turn to `done` (a refusal ends at its `error`)."""
    await ws.chat(question, chat_id)
    events: list[Event] = []
    while True:
        event = await ws.recv(timeout=60)
        events.append(event)
        if event["type"] == "done" or (event["type"] == "error" and "seq" not in event):
            return events


async def chat_count(reader: Reader) -> int:
    return len((await reader.http.get("/api/chats")).json())


async def messages_of(reader: Reader, chat_id: str) -> list[dict[str, Any]]:
    response = await reader.http.get(f"/api/chats/{chat_id}")
    messages: list[dict[str, Any]] = response.json()["messages"]
    return messages


@pytest.fixture
def limited(
    make_settings: Callable[..., Settings],
) -> Callable[..., AbstractContextManager[LiveServer]]:
    """A live server whose limits are the ones given (the others as the tests run them)."""

    def start(**limits: Any) -> AbstractContextManager[LiveServer]:
        return running(make_settings(**limits))

    return start


@pytest.fixture
def clock() -> Iterator[time_machine.Traveller]:
    """The wall clock, stopped for the test (servers in this process read it too)."""
    with time_machine.travel(1_900_000_000.0, tick=False) as traveller:
        yield traveller


async def test_a_visitors_messages_past_its_hourly_turns_are_refused_exactly(
    limited: Callable[..., Any], clock: time_machine.Traveller
) -> None:
    with limited(visitor_turns_per_hour=3) as server:
        async with Reader(server.url) as reader:
            ws = await reader.connect()
            events = await ask(ws, "First?")
            chat_id = events[0]["chatId"]
            for question in ("Second?", "Third?"):
                clock.shift(60)
                await ask(ws, question, chat_id)
            refused = (await ask(ws, "Fourth?", chat_id))[-1]
            new_chat = (await ask(ws, "A new chat?"))[-1]

            for error in (refused, new_chat):
                assert error["type"] == "error"
                assert (error["code"], error["retryable"]) == ("rate_limited", True)
                # The first message leaves the hour 2 minutes of stopped clock after it.
                assert error["retryAfter"] == HOUR - 120
                assert "most messages allowed in an hour (3)" in error["message"]
            assert refused["chatId"] == chat_id
            # Nothing was saved or acknowledged for them, and no chat was made.
            assert [
                m["text"] for m in await messages_of(reader, chat_id) if m["role"] == "user"
            ] == [
                "First?",
                "Second?",
                "Third?",
            ]
            assert await chat_count(reader) == 1
            clock.shift(HOUR - 120 + 1)
            allowed = await ask(ws, "Fourth, later?", chat_id)
            assert allowed[-1]["reason"] == "complete"


async def test_a_new_chat_with_an_unknown_post_or_persona_costs_no_turn(
    limited: Callable[..., Any],
) -> None:
    with limited(visitor_turns_per_hour=1) as server:
        async with Reader(server.url) as reader:
            ws = await reader.connect()
            unknown = [
                ("post", "no-such-post", "bad_request"),
                ("persona", "nobody", "persona_unknown"),
            ]
            for field, value, code in unknown:
                for _ in range(3):
                    await ws.chat("About that?", **{field: value})
                    refused = await ws.recv(timeout=60)
                    assert (refused["type"], refused["code"]) == ("error", code), refused
            assert await chat_count(reader) == 0
            # The hour's one turn is still there.
            assert (await ask(ws, "A real question?"))[-1]["reason"] == "complete"
            assert (await ask(ws, "And another?"))[-1]["code"] == "rate_limited"


async def test_all_anonymous_visitors_of_one_address_share_its_turns(
    limited: Callable[..., Any], clock: time_machine.Traveller
) -> None:
    with limited(address_turns_per_hour=2) as server:
        async with (
            Reader(server.url, address="203.0.113.5") as first,
            Reader(server.url, address="203.0.113.5") as second,
            Reader(server.url, address="198.51.100.9") as elsewhere,
        ):
            assert (await ask(await first.connect(), "One?"))[-1]["type"] == "done"
            assert (await ask(await second.connect(), "Two?"))[-1]["type"] == "done"
            refused = (await ask(await second.connect(), "Three?"))[-1]
            assert refused["code"] == "rate_limited"
            assert "Your network has sent" in refused["message"]
            # Another address is not held back by it.
            assert (await ask(await elsewhere.connect(), "Hello?"))[-1]["type"] == "done"


async def test_a_chat_takes_at_most_its_queue_behind_the_running_turn(
    limited: Callable[..., Any],
) -> None:
    # A slow answer: the first turn runs while the others queue.
    with limited(chat_queue_limit=2, offline_tokens_per_second=20) as server:
        async with Reader(server.url) as reader:
            ws = await reader.connect()
            await ws.chat("Tell me about sourdough starters at length?")
            chat_id = (await ws.expect("chat_created"))["chatId"]
            await ws.expect("user_message")
            for question in ("Waiting one?", "Waiting two?"):
                await ws.chat(question, chat_id)
                await ws.until("user_message", text=question)
            await ws.chat("One too many?", chat_id)
            refused = await ws.until("error")
            assert refused[-1]["code"] == "queue_full"
            assert refused[-1]["retryable"] is True
            assert "retryAfter" not in refused[-1]
            # Every turn still runs; the refused message is nowhere.
            dones = [e for e in await ws.until("done", timeout=60) if e["type"] == "done"]
            while len(dones) < 3:
                dones += [e for e in await ws.until("done", timeout=60) if e["type"] == "done"]
            asked = [m["text"] for m in await messages_of(reader, chat_id) if m["role"] == "user"]
            assert "One too many?" not in asked
            assert len(asked) == 3


async def test_each_visitor_runs_one_turn_at_a_time_and_the_next_is_told_its_place(
    limited: Callable[..., Any],
) -> None:
    with limited(visitor_running_turns=1, offline_tokens_per_second=40) as server:
        async with Reader(server.url) as reader, Reader(server.url) as other:
            ws = await reader.connect()
            await ws.chat("Tell me about sourdough starters at length?")
            await ws.until("token")
            await ws.chat("And espresso?")
            before = await ws.until("chat_created")
            created = before[-1]["chatId"]
            second = await ws.until("done", chatId=created, timeout=60)
            # The second chat's turn waited for the first: its place was first in line,
            # and it was told so before anything of its answer came.
            mine = [e for e in second if e.get("chatId") == created]
            kinds = [e["type"] for e in mine]
            assert kinds[:2] == ["user_message", "status"]
            assert (mine[1]["state"], mine[1]["position"]) == ("waiting", 1)
            first_done = next(e for e in before + second if e["type"] == "done")
            assert first_done["chatId"] != created
            # Another visitor is not held back meanwhile.
            other_ws = await other.connect()
            assert (await ask(other_ws, "Hi?"))[-1]["reason"] == "complete"


async def test_a_turn_that_waits_too_long_for_its_place_ends_with_a_retryable_busy_error(
    limited: Callable[..., Any],
) -> None:
    with limited(
        visitor_running_turns=1, turn_wait_seconds=0.3, offline_tokens_per_second=10
    ) as server:
        async with Reader(server.url) as reader:
            ws = await reader.connect()
            await ws.chat("Tell me about sourdough starters at length?")
            await ws.until("token")
            await ws.chat("And espresso?")
            events = await ws.until("done", reason="error", timeout=60)
            (busy,) = [e for e in events if e["type"] == "error"]
            assert (busy["code"], busy["retryable"]) == ("busy", True)
            assert busy["seq"] == events[-1]["seq"] - 1


async def test_a_chat_nobody_watches_drops_its_waiting_messages_and_says_so(
    limited: Callable[..., Any],
) -> None:
    with limited(unwatched_seconds=0.2, offline_tokens_per_second=20) as server:
        async with Reader(server.url) as reader:
            ws = await reader.connect()
            await ws.chat("Tell me about sourdough starters at length?")
            chat_id = (await ws.expect("chat_created"))["chatId"]
            for question in ("Later one?", "Later two?"):
                await ws.chat(question, chat_id)
                await ws.until("user_message", text=question)
            await ws.close()
            session = server.state.sessions.get(chat_id)
            assert session is not None
            assert await until(lambda: not session.busy, 60)
            messages = await messages_of(reader, chat_id)
            answers = [m for m in messages if m["role"] == "assistant"]
            # The running turn finished; the waiting ones were not answered, and say so.
            assert [a["status"] for a in answers] == ["complete", "not_answered", "not_answered"]
            assert all("nobody was watching" in a["error"] for a in answers[1:])


async def until(condition: Callable[[], bool], timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def test_a_visitor_and_an_address_hold_at_most_their_websockets(
    limited: Callable[..., Any],
) -> None:
    with limited(visitor_connections=2, address_connections=3) as server:
        async with (
            Reader(server.url) as reader,
            Reader(server.url) as neighbour,
            Reader(server.url, address="198.51.100.1") as elsewhere,
        ):
            await reader.connect()
            second = await reader.connect()
            with pytest.raises(InvalidStatus) as refused:
                await reader.connect()
            assert refused.value.response.status_code == 429
            await neighbour.connect()
            with pytest.raises(InvalidStatus):
                await neighbour.connect()  # the address is full
            await elsewhere.connect()
            # A closed connection gives its place back.
            await second.close()
            assert await until(lambda: len(server.state.hub.connections) == 3, 10)
            await reader.connect()


@pytest.mark.claude
async def test_a_token_budget_counts_saved_usage_holds_across_a_restart_and_frees_up_a_day_later(
    api: AnthropicTestServer,
    make_claude_settings: Callable[..., Settings],
    clock: time_machine.Traveller,
) -> None:
    api.set_default(lambda request: reply(text("Costly answer."), usage(6000, 100)))
    settings = make_claude_settings(visitor_tokens_per_day=12_000)
    with claude_server_for(settings) as server:
        async with Reader(server.url) as reader:
            ws = await reader.connect()
            first = await ask(ws, "One?")
            chat_id = first[0]["chatId"]
            clock.shift(600)
            await ask(ws, "Two?", chat_id)
            refused = (await ask(ws, "Three?", chat_id))[-1]
            cookie = reader.cookie
    assert (refused["code"], refused["retryable"]) == ("budget_exceeded", True)
    # The first answer leaves the day first; after it, 6,100 tokens remain: under budget.
    assert refused["retryAfter"] == DAY - 600
    assert "used up today's share" in refused["message"]
    requests = len(api.main_requests())

    # The database is the truth: a restarted server refuses the same.
    with claude_server_for(settings) as server:
        async with Reader(server.url, cookie=cookie) as reader:
            ws = await reader.connect()
            again = (await ask(ws, "Three, after a restart?", chat_id))[-1]
            assert again["code"] == "budget_exceeded"
            assert len(api.main_requests()) == requests  # no model call for a refusal
            clock.shift(DAY - 600 + 1)
            allowed = await ask(ws, "Three, a day later?", chat_id)
            assert answer_text(allowed) == "Costly answer."


@pytest.mark.claude
async def test_a_chat_whose_context_grew_past_the_limit_takes_no_more_messages(
    api: AnthropicTestServer, make_claude_settings: Callable[..., Settings]
) -> None:
    api.set_default(lambda request: reply(text("A long context."), usage(1000, 10)))
    api.when_user_says("huge", reply(text("Now it is huge."), usage(150_000, 10)))
    with claude_server_for(make_claude_settings(chat_context_limit=150_000)) as server:
        async with Reader(server.url) as reader:
            ws = await reader.connect()
            chat_id = (await ask(ws, "Small?"))[0]["chatId"]
            await ask(ws, "Make it huge?", chat_id)
            refused = (await ask(ws, "And now?", chat_id))[-1]
            assert (refused["code"], refused["retryable"]) == ("chat_too_long", False)
            assert "Start a new chat" in refused["message"]
            # A new chat is fine.
            assert (await ask(ws, "A fresh start?"))[-1]["reason"] == "complete"
            detail = await messages_of(reader, chat_id)
            assert detail[-1]["text"] == "Now it is huge."
    requests = len(api.main_requests())
    assert requests == 3


@pytest.mark.claude
@pytest.mark.agent_sdk
@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_invalid_text_claims_no_spare_agent_process(
    make_claude_settings: Callable[..., Settings],
) -> None:
    with claude_server_for(make_claude_settings(spare_processes=1)) as server:
        engine = server.state.engine
        assert await until(lambda: engine.pool.started == 1, 60)
        async with Reader(server.url) as reader:
            ws = await reader.connect()
            for n in range(20):
                frame = json.dumps({"type": "chat", "clientMessageId": f"m-{n}", "text": "X"})
                await ws.send_raw(frame.replace('"X"', '"hi \\ud800"'))
                refused = await ws.expect("error")
                assert refused["code"] == "bad_request"
            await ws.send(type="ping")
            await ws.expect("pong")
            assert (await reader.http.get("/api/chats")).json() == []
        # The one spare is still the only process ever started, unclaimed.
        assert (engine.pool.started, engine.pool.spare_count) == (1, 1)


async def test_a_large_history_asked_for_again_and_again_without_reading_is_queued_once(
    server: LiveServer,
) -> None:
    async with Reader(server.url) as reader:
        ws = await reader.connect()
        chat_id = None
        for n in range(9):
            await ws.chat(f"{n} " + "long question " * 570, chat_id)
            events = await ws.until("done", timeout=60)
            chat_id = chat_id or events[0]["chatId"]
        history = len((await reader.http.get(f"/api/chats/{chat_id}")).text)
        assert history > LARGE_ANSWER
        await ws.close()
        hub = server.state.hub
        assert await until(lambda: not hub.connections, 10)

        slow = await stalled_socket(reader)
        squeeze_server_send_buffer(server, slow)
        assert await until(lambda: len(hub.connections) == 1, 10)
        (connection,) = hub.connections.values()
        for _ in range(50):
            await slow.send(type="subscribe", chatId=chat_id)
        await slow.send(type="ping", requestId="end")
        answers = await slow.until("pong", timeout=60, requestId="end")

        kinds = [a["type"] for a in answers]
        assert kinds[0] == "subscribed"
        refused = [a for a in answers if a["type"] == "error"]
        assert refused
        assert all((a["code"], a["retryAfter"]) == ("rate_limited", 1) for a in refused)
        assert kinds.count("subscribed") + len(refused) == 50
        # Only the histories that got out before the next was asked for were ever queued:
        # far fewer than fifty.
        assert connection.delivered_size < (kinds.count("subscribed") + 1) * history
        assert kinds.count("subscribed") < 10

"""Exact resume: a client that drops and re-subscribes with its last seq misses nothing."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from blogchat.settings import Settings
from tests.support.client import ChatSocket, Event, Reader, answer_text, transcript
from tests.support.server import LiveServer

# Each example is two whole turns; raise it for a longer campaign.
EXAMPLES = int(os.environ.get("BLOGCHAT_RESUME_EXAMPLES", "15"))


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    """Fast enough to run many examples, slow enough that cuts land mid-answer."""
    return make_settings(offline_tokens_per_second=2000)


async def read_events(ws: ChatSocket, count: int, seen: list[Event]) -> bool:
    """Read up to `count` new seq'd events into `seen`, as a client does: a seq it already
    has is ignored. Stops early at `done`; returns whether the turn finished."""
    read = 0
    while read < count:
        event = await ws.recv()
        if "seq" not in event or (seen and event["seq"] <= seen[-1]["seq"]):
            continue
        seen.append(event)
        read += 1
        if event["type"] == "done":
            return True
    return False


@hypothesis_settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(cuts=st.lists(st.integers(min_value=0, max_value=120), min_size=1, max_size=6))
async def test_a_client_cut_off_anywhere_resumes_to_exactly_the_uninterrupted_transcript(
    server: LiveServer, cuts: list[int]
) -> None:
    async with Reader(server.url) as reader:
        setup = await reader.connect()
        await setup.chat("sourdough starter")
        chat_id = (await setup.expect("chat_created"))["chatId"]
        first_turn = await setup.until("done")
        base = first_turn[-1]["seq"]

        # The reference never disconnects.
        reference = await reader.connect()
        await reference.send(type="subscribe", chatId=chat_id, afterSeq=base)
        assert (await reference.expect("subscribed"))["lastSeq"] == base

        flaky = await reader.connect()
        question = {"text": "espresso dose and yield", "clientMessageId": f"q-{chat_id}"}
        await flaky.chat(chat_id=chat_id, **question)
        seen: list[Event] = []
        finished = False
        for cut in cuts:
            finished = await read_events(flaky, cut, seen)
            if finished:
                break
            await flaky.close()
            flaky = await reader.connect()
            last = seen[-1]["seq"] if seen else base
            await flaky.send(type="subscribe", chatId=chat_id, afterSeq=last)
            subscribed = await flaky.expect("subscribed")
            # The running and the last finished turn are always replayable exactly.
            assert "messages" not in subscribed
            if not any(event["type"] == "user_message" for event in seen):
                # The frame may have been lost with the connection: resend it, unchanged.
                await flaky.chat(chat_id=chat_id, **question)
        if not finished:
            await read_events(flaky, 10**9, seen)

        expected = transcript(await reference.until("done"))
        assert seen == expected
        assert [e["seq"] for e in seen] == list(range(base + 1, base + 1 + len(seen)))
        detail = (await reader.http.get(f"/api/chats/{chat_id}")).json()
        assert detail["messages"][-1]["text"] == answer_text(seen)


async def test_resume_covers_the_last_finished_turn_and_older_ones_fall_back_to_history(
    reader: Reader,
) -> None:
    ws = await reader.connect()
    await ws.chat("sourdough starter")
    chat_id = (await ws.expect("chat_created"))["chatId"]
    turns = [await ws.until("done")]
    for question in ("espresso", "hot sauce"):
        await ws.chat(question, chat_id)
        turns.append(await ws.until("done"))
    last_turn_start = turns[-1][0]["seq"]
    assert turns[-1][0]["type"] == "user_message"

    # From inside the last finished turn: an exact replay.
    late = await reader.connect()
    await late.send(type="subscribe", chatId=chat_id, afterSeq=last_turn_start)
    assert "messages" not in await late.expect("subscribed")
    assert transcript(await late.until("done")) == transcript(turns[-1])[1:]

    # From an older turn: the events are gone, so the whole history comes instead.
    old = await reader.connect()
    await old.send(type="subscribe", chatId=chat_id, afterSeq=2)
    subscribed = await old.expect("subscribed")
    assert subscribed["lastSeq"] == turns[-1][-1]["seq"]
    assert [m["role"] for m in subscribed["messages"]] == ["user", "assistant"] * 3
    assert subscribed["messages"][-1]["text"] == answer_text(turns[-1])
    assert await old.silent(0.3)


async def test_subscribing_with_the_current_last_seq_replays_nothing(reader: Reader) -> None:
    ws = await reader.connect()
    await ws.chat("sourdough starter")
    chat_id = (await ws.expect("chat_created"))["chatId"]
    done = (await ws.until("done"))[-1]
    again = await reader.connect()
    await again.send(type="subscribe", chatId=chat_id, afterSeq=done["seq"])
    subscribed: dict[str, Any] = await again.expect("subscribed")
    assert subscribed["lastSeq"] == done["seq"]
    assert "messages" not in subscribed
    assert await again.silent(0.3)


async def test_a_seq_from_the_future_falls_back_to_history(reader: Reader) -> None:
    ws = await reader.connect()
    await ws.chat("sourdough starter")
    chat_id = (await ws.expect("chat_created"))["chatId"]
    await ws.until("done")
    again = await reader.connect()
    await again.send(type="subscribe", chatId=chat_id, afterSeq=10**6)
    subscribed = await again.expect("subscribed")
    assert len(subscribed["messages"]) == 2

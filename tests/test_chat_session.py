"""ChatSession in process: a scripted engine, a real store (SQLite and PostgreSQL), no
server. The invariants the docs promise: seqs strictly increase and are never reused,
`done` only follows a saved answer, waiting messages run in order.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import text as sql

from blogchat.app import Content, load_content
from blogchat.drafts import draft_of, new_answer
from blogchat.engines.base import (
    STOPPED_TOOL,
    AgentEngine,
    EngineEvent,
    TextDelta,
    ThinkingDelta,
    ToolFinished,
    ToolStarted,
    TurnEnded,
    TurnFailed,
    TurnRequest,
)
from blogchat.protocol import parse_server_message
from blogchat.quotas import MemorySlots, TurnGate
from blogchat.seqs import BLOCK
from blogchat.session import NO_SEQS, NOT_SAVED, AlreadySent, ChatSession, SessionTimings
from blogchat.settings import Settings
from blogchat.store import ChatRecord, Store

Frame = dict[str, Any]


class Listener:
    """A subscriber that keeps every frame it gets, and wakes waiters on each."""

    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self._arrived = asyncio.Condition()

    def deliver(self, frame: str) -> None:
        parse_server_message(frame)
        self.frames.append(json.loads(frame))
        asyncio.get_running_loop().create_task(self._notify())

    def replay(self, frames: Sequence[str]) -> None:
        for frame in frames:
            self.deliver(frame)

    async def _notify(self) -> None:
        async with self._arrived:
            self._arrived.notify_all()

    async def until(self, kind: str, count: int = 1, timeout: float = 10) -> list[Frame]:
        """Every frame so far, once `count` frames of this type have arrived."""

        def enough() -> bool:
            return sum(1 for frame in self.frames if frame["type"] == kind) >= count

        async with asyncio.timeout(timeout), self._arrived:
            await self._arrived.wait_for(enough)
        return list(self.frames)

    def seqs(self) -> list[int]:
        return [frame["seq"] for frame in self.frames if "seq" in frame]


@dataclass
class Script:
    """What one turn of the scripted engine does: its events, optionally held at a gate."""

    events: list[EngineEvent]
    # Set before the events after `hold_at` are sent (None: no gate).
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    hold_at: int | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)


class ScriptedEngine(AgentEngine):
    """An engine that plays scripts, one per turn, in order; it records the requests."""

    name = "scripted"

    def __init__(self, *scripts: Script) -> None:
        self.scripts = list(scripts)
        self.played: list[Script] = []
        self.requests: list[TurnRequest] = []

    async def run_turn(
        self, request: TurnRequest, stop: asyncio.Event
    ) -> AsyncGenerator[EngineEvent, None]:
        self.requests.append(request)
        script = self.scripts.pop(0)
        self.played.append(script)
        script.started.set()
        for index, event in enumerate(script.events):
            if index == script.hold_at:
                await script.gate.wait()
            yield event


def answer_events(text: str) -> list[EngineEvent]:
    words = text.split(" ")
    deltas: list[EngineEvent] = [TextDelta(word + " ") for word in words[:-1]]
    return [*deltas, TextDelta(words[-1]), TurnEnded("complete", "scripted-model", 10, len(words))]


@pytest.fixture
def content() -> Content:
    from tests.support.server import REPO

    settings = Settings(
        _env_file=None,
        content_dir=REPO / "content",
        personas_file=REPO / "config" / "personas.yaml",
    )
    return load_content(settings)


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[Store]:
    opened = await Store.open(settings.database, schema=settings.database_schema)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
def open_session(store: Store, content: Content) -> Callable[..., Any]:
    async def open_(
        engine: AgentEngine, chat: ChatRecord | None = None, gate: TurnGate | None = None
    ) -> ChatSession:
        if chat is None:
            chat = await store.chats.create_chat(
                ChatRecord(
                    id=str(uuid.uuid4()),
                    owner_id=str(uuid.uuid4()),
                    title="A chat",
                    persona=content.personas.default.id,
                    model="haiku",
                )
            )
        fresh = await store.chats.get_chat(chat.id)
        assert fresh is not None
        return ChatSession(
            fresh,
            await store.chats.get_messages(chat.id),
            store=store,
            engine=engine,
            personas=content.personas,
            blog=content.blog,
            render=lambda text: f"<p>{text}</p>",
            timings=SessionTimings(save_interval=3600),
            gate=gate,
        )

    return open_


async def last_seq(store: Store, chat_id: str) -> int:
    """The chat's seq high-water mark in the database."""
    record = await store.chats.get_chat(chat_id)
    assert record is not None
    return record.last_seq


async def ask(session: ChatSession, text: str, client_message_id: str | None = None) -> None:
    await session.accept(
        client_message_id=client_message_id or str(uuid.uuid4()),
        text=text,
        model_alias="haiku",
        model_id="scripted-model",
        anonymous=True,
    )


async def refuse_writes(store: Store, table: str, *, on: str = "UPDATE") -> None:
    """Make the database itself refuse writes to a table (a trigger that raises)."""
    async with store.db.engine.begin() as connection:
        if store.db.is_sqlite:
            await connection.execute(
                sql(
                    f"CREATE TRIGGER refuse_{table}_{on.split()[0].lower()} BEFORE {on} ON {table} "
                    "BEGIN SELECT RAISE(ABORT, 'the database refuses'); END"
                )
            )
            return
        await connection.execute(
            sql(
                "CREATE OR REPLACE FUNCTION refuse_write() RETURNS trigger AS "
                "$$ BEGIN RAISE EXCEPTION 'the database refuses'; END $$ LANGUAGE plpgsql"
            )
        )
        await connection.execute(
            sql(
                f"CREATE TRIGGER refuse_{table}_{on.split()[0].lower()} BEFORE {on} ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION refuse_write()"
            )
        )


async def test_a_turn_numbers_its_events_one_by_one_and_saves_them_as_the_answer(
    store: Store, open_session: Callable[..., Any]
) -> None:
    engine = ScriptedEngine(
        Script(
            [
                ThinkingDelta("Let me see."),
                ToolStarted("t1", "searchBlogContent", {"query": "starter"}),
                ToolFinished("t1", '{"results": []}'),
                *answer_events("Keep it warm."),
            ]
        )
    )
    session = await open_session(engine)
    listener = Listener()
    session.subscribe(listener, after_seq=None, request_id=None)
    await ask(session, "How warm?")
    frames = await listener.until("done")

    kinds = [frame["type"] for frame in frames]
    assert kinds == [
        "subscribed",
        "user_message",
        "thinking",
        "tool_use",
        "tool_result",
        "token",
        "token",
        "token",
        "done",
    ]
    assert listener.seqs() == list(range(1, 9))
    question, saved = await store.chats.get_messages(session.chat.id)
    assert (question.text, question.seq_start) == ("How warm?", 1)
    assert (saved.text, saved.status, saved.thinking) == (
        "Keep it warm.",
        "complete",
        "Let me see.",
    )
    assert (saved.seq_start, saved.seq_end, saved.reply_to) == (2, 8, question.id)
    assert [(call.name, call.output) for call in saved.tool_calls] == [
        ("searchBlogContent", '{"results": []}')
    ]
    # The answer rebuilt from its published events alone is the answer that was saved.
    events = [parse_server_message(json.dumps(frame)) for frame in frames[2:]]
    start = new_answer(saved.id, saved.chat_id, question.id, "scripted-model")
    rebuilt = draft_of(start, events)  # type: ignore[arg-type]
    assert (rebuilt.text, rebuilt.thinking, rebuilt.status) == (
        saved.text,
        saved.thinking,
        saved.status,
    )
    assert [(c.tool_use_id, c.output) for c in rebuilt.tool_calls] == [("t1", '{"results": []}')]
    assert (rebuilt.seq_start, rebuilt.seq_end) == (saved.seq_start, saved.seq_end)


async def test_done_is_sent_only_for_a_saved_answer_and_a_failed_save_ends_in_error(
    store: Store, open_session: Callable[..., Any]
) -> None:
    script = Script(answer_events("All of it."), hold_at=1)
    session = await open_session(ScriptedEngine(script))
    listener = Listener()
    session.subscribe(listener, after_seq=None, request_id=None)
    await ask(session, "Save me?")
    await listener.until("token")
    # The database refuses every write of a message from now on.
    await refuse_writes(store, "messages")
    await refuse_writes(store, "messages", on="INSERT")
    script.gate.set()
    frames = await listener.until("done")

    error, done = frames[-2:]
    assert error["type"] == "error"
    assert (error["message"], error["retryable"], error["code"]) == (NOT_SAVED, True, "internal")
    assert (done["reason"], done["seq"]) == ("error", error["seq"] + 1)
    assert listener.seqs() == list(range(1, done["seq"] + 1))
    assert session.messages()[-1].status == "error"


async def test_a_user_message_the_store_refuses_uses_up_no_seq(
    store: Store, open_session: Callable[..., Any]
) -> None:
    session = await open_session(ScriptedEngine(Script(answer_events("Fine."))))
    listener = Listener()
    session.subscribe(listener, after_seq=None, request_id=None)
    await refuse_writes(store, "messages", on="INSERT")
    with pytest.raises(Exception, match="the database refuses"):
        await ask(session, "Lost?")
    drop = "DROP TRIGGER refuse_messages_insert"
    async with store.db.engine.begin() as connection:
        await connection.execute(sql(drop if store.db.is_sqlite else f"{drop} ON messages"))
    await ask(session, "Kept.")
    await listener.until("done")
    assert listener.seqs() == list(range(1, len(listener.seqs()) + 1))
    assert listener.frames[1]["text"] == "Kept."


async def test_a_message_sent_before_is_found_by_its_save_and_uses_no_seq(
    store: Store, open_session: Callable[..., Any]
) -> None:
    engine = ScriptedEngine(Script(answer_events("Once.")), Script(answer_events("Next.")))
    session = await open_session(engine)
    listener = Listener()
    session.subscribe(listener, after_seq=None, request_id=None)
    sent_id = str(uuid.uuid4())
    options: dict[str, Any] = {"model_alias": "haiku", "model_id": "m", "anonymous": True}
    await session.accept(client_message_id=sent_id, text="Once?", **options)
    await listener.until("done")
    # The first message's own save reserved the chat's seqs: no write of its own for that.
    assert await last_seq(store, session.chat.id) == BLOCK
    with pytest.raises(AlreadySent) as sent:
        await session.accept(client_message_id=sent_id, text="Twice?", **options)
    assert (sent.value.previous.text, sent.value.previous.seq_start) == ("Once?", 1)
    await ask(session, "Next?")
    await listener.until("done", 2)

    assert [request.text for request in engine.requests] == ["Once?", "Next?"]
    assert listener.seqs() == list(range(1, len(listener.seqs()) + 1))
    texts = [m.text for m in await store.chats.get_messages(session.chat.id)]
    assert texts == ["Once?", "Once.", "Next?", "Next."]


async def test_a_turn_that_cannot_reserve_seqs_ends_within_its_reservation(
    store: Store, open_session: Callable[..., Any]
) -> None:
    # Enough tokens to run past the first reservation, which the database then refuses.
    script = Script(answer_events(" ".join(f"w{n}" for n in range(BLOCK + 50))), hold_at=10)
    session = await open_session(ScriptedEngine(script))
    listener = Listener()
    session.subscribe(listener, after_seq=None, request_id=None)
    await ask(session, "A long one?")
    await listener.until("token")
    await refuse_writes(store, "chats", on="UPDATE OF last_seq")
    script.gate.set()
    frames = await listener.until("done")

    error, done = frames[-2:]
    assert (error["type"], error["message"], error["retryable"]) == ("error", NO_SEQS, True)
    assert (done["type"], done["reason"]) == ("done", "error")
    # Nothing was handed out beyond what the database holds as reserved.
    record = await store.chats.get_chat(session.chat.id)
    assert record is not None
    assert record.last_seq == BLOCK
    assert done["seq"] <= BLOCK
    assert listener.seqs() == list(range(1, done["seq"] + 1))
    saved = (await store.chats.get_messages(session.chat.id))[-1]
    assert (saved.status, saved.seq_end, saved.error) == ("error", done["seq"], NO_SEQS)


async def test_seqs_go_on_after_a_close_and_a_reopen_and_the_reservation_is_given_back(
    store: Store, open_session: Callable[..., Any]
) -> None:
    first = await open_session(ScriptedEngine(Script(answer_events("One."))))
    listener = Listener()
    first.subscribe(listener, after_seq=None, request_id=None)
    await ask(first, "First?")
    frames = await listener.until("done")
    last = frames[-1]["seq"]
    assert await last_seq(store, first.chat.id) == BLOCK
    await first.close()
    assert await last_seq(store, first.chat.id) == last
    settled = await store.chats.get_chat(first.chat.id)

    second = await open_session(ScriptedEngine(Script(answer_events("Two."))), settled)
    again = Listener()
    second.subscribe(again, after_seq=last, request_id=None)
    await ask(second, "Second?")
    await again.until("done")
    assert again.seqs() == list(range(last + 1, last + 1 + len(again.seqs())))


async def test_a_close_does_not_give_back_seqs_someone_reserved_since(
    store: Store, open_session: Callable[..., Any]
) -> None:
    session = await open_session(ScriptedEngine(Script(answer_events("One."))))
    listener = Listener()
    session.subscribe(listener, after_seq=None, request_id=None)
    await ask(session, "First?")
    await listener.until("done")
    # Another holder of the chat reserved further in the meantime.
    await store.chats.reserve_seq(session.chat.id, 5000)
    await session.close()
    assert await last_seq(store, session.chat.id) == 5000


async def test_queued_messages_are_answered_one_at_a_time_in_order(
    store: Store, open_session: Callable[..., Any]
) -> None:
    first = Script(answer_events("First answer."), hold_at=1)
    engine = ScriptedEngine(
        first, Script(answer_events("Second answer.")), Script(answer_events("Third answer."))
    )
    session = await open_session(engine)
    listener = Listener()
    session.subscribe(listener, after_seq=None, request_id=None)
    for question in ("One?", "Two?", "Three?"):
        await ask(session, question)
    await first.started.wait()
    assert session.busy
    first.gate.set()
    frames = await listener.until("done", 3)

    assert [request.text for request in engine.requests] == ["One?", "Two?", "Three?"]
    # Each turn saw the conversation before it, answers included.
    assert [(m.role, m.text) for m in engine.requests[2].history] == [
        ("user", "One?"),
        ("assistant", "First answer."),
        ("user", "Two?"),
        ("assistant", "Second answer."),
    ]
    dones = [frame for frame in frames if frame["type"] == "done"]
    assert len(dones) == 3
    assert listener.seqs() == sorted(set(listener.seqs()))
    texts = [m.text for m in await store.chats.get_messages(session.chat.id)]
    assert texts == [
        "One?",
        "First answer.",
        "Two?",
        "Second answer.",
        "Three?",
        "Third answer.",
    ]


async def test_a_failed_turn_sends_its_error_then_done_and_the_chat_goes_on(
    store: Store, open_session: Callable[..., Any]
) -> None:
    engine = ScriptedEngine(
        Script(
            [
                TextDelta("Half "),
                TurnFailed("Claude is overloaded right now.", retryable=True),
                TurnEnded("error", "scripted-model"),
            ]
        ),
        Script(answer_events("Recovered.")),
    )
    session = await open_session(engine)
    listener = Listener()
    session.subscribe(listener, after_seq=None, request_id=None)
    await ask(session, "Busy?")
    await listener.until("done")
    await ask(session, "Now?")
    frames = await listener.until("done", 2)

    kinds = [frame["type"] for frame in frames]
    assert kinds[:6] == ["subscribed", "user_message", "token", "error", "done", "user_message"]
    error = frames[3]
    assert (error["retryable"], error["seq"]) == (True, 3)
    saved = await store.chats.get_messages(session.chat.id)
    assert [(m.status, m.text, m.error) for m in saved if m.role == "assistant"] == [
        ("error", "Half ", "Claude is overloaded right now."),
        ("complete", "Recovered.", None),
    ]


async def test_a_turn_cut_after_its_stop_ran_out_of_time_ends_its_running_tool_as_stopped(
    store: Store, open_session: Callable[..., Any]
) -> None:
    # The engine ignores the stop while its tool runs: the session cuts the turn.
    stuck = Script(
        [
            TextDelta("Let me look. "),
            ToolStarted("t1", "searchBlogContent", {"query": "starter"}),
            ToolFinished("t1", "never reported", is_error=False),
            TurnEnded("complete", "scripted-model"),
        ],
        hold_at=2,
    )
    session = await open_session(ScriptedEngine(stuck))
    listener = Listener()
    session.subscribe(listener, after_seq=None, request_id=None)
    await ask(session, "Starter?")
    await listener.until("tool_use")
    session.stop()
    frames = await listener.until("done")

    (result,) = [frame for frame in frames if frame["type"] == "tool_result"]
    assert (result["toolUseId"], result["isError"], result["output"]) == (
        "t1",
        True,
        STOPPED_TOOL,
    )
    assert frames[-1]["reason"] == "stopped"
    assert result["seq"] < frames[-1]["seq"]
    saved = await store.chats.get_messages(session.chat.id)
    (answer,) = [m for m in saved if m.role == "assistant"]
    assert (answer.status, answer.text) == ("stopped", "Let me look. ")
    assert [(c.tool_use_id, c.output, c.is_error) for c in answer.tool_calls] == [
        ("t1", STOPPED_TOOL, True)
    ]
    stuck.gate.set()


async def test_a_message_to_an_idle_chat_has_its_place_taken_while_saved_and_never_kept(
    store: Store, open_session: Callable[..., Any], settings: Settings
) -> None:
    # (With several instances the place is a round trip to Redis: taken alongside the
    # message's save, it is off the way to the first token.)
    slots = MemorySlots()
    gate = TurnGate(settings, capacity=None, slots=slots)
    first = Script(answer_events("One."), hold_at=1)
    second = Script(answer_events("Two."))
    session = await open_session(ScriptedEngine(first, second), gate=gate)
    place = f"visitor:{session.chat.owner_id}"
    listener = Listener()
    session.subscribe(listener, after_seq=None, request_id=None)
    message_id = str(uuid.uuid4())
    await ask(session, "First?", message_id)
    await first.started.wait()
    assert (gate.running, slots.count(place)) == (1, 1)
    # Sent again while its turn runs: nothing is saved, no second place is taken.
    with pytest.raises(AlreadySent):
        await ask(session, "First?", message_id)
    assert (gate.running, slots.count(place)) == (1, 1)
    first.gate.set()
    await listener.until("done")
    await turns_over(session)
    assert (gate.running, slots.count(place)) == (0, 0)
    await ask(session, "Second?")
    await listener.until("done", count=2)
    await turns_over(session)
    assert (gate.running, slots.count(place)) == (0, 0)
    # A message the database refuses gives the place it took back before it fails.
    await refuse_writes(store, "messages", on="INSERT")
    with pytest.raises(Exception, match="the database refuses"):
        await ask(session, "Refused?")
    assert (gate.running, slots.count(place)) == (0, 0)


async def turns_over(session: ChatSession) -> None:
    """Wait until the session's turns ended (its runner with them)."""
    runner = session._runner
    if runner is not None:
        await runner

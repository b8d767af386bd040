"""Partial answers saved together (saves.py), on a real store (SQLite and PostgreSQL): one
statement per round for every running answer, and no partial save after a turn's last."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event

from blogchat import protocol as wire
from blogchat.drafts import Draft, new_answer
from blogchat.saves import PartialSaves
from blogchat.settings import Settings
from blogchat.store import ChatRecord, MessageRecord, Store


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[Store]:
    opened = await Store.open(settings.database, schema=settings.database_schema)
    try:
        yield opened
    finally:
        await opened.close()


async def running_answer(store: Store) -> Draft:
    """A chat with a question, and the answer to it as a turn starts writing it."""
    chat = await store.chats.create_chat(
        ChatRecord(
            id=str(uuid.uuid4()),
            owner_id=str(uuid.uuid4()),
            title="A chat",
            persona="guide",
            model="haiku",
        )
    )
    question = MessageRecord(
        id=str(uuid.uuid4()), chat_id=chat.id, role="user", seq_start=1, seq_end=1, text="Why?"
    )
    await store.chats.add_message(question)
    return Draft(new_answer(str(uuid.uuid4()), chat.id, question.id, "a-model"))


def say(draft: Draft, text: str) -> None:
    """The turn publishes one more token of the answer."""
    record = draft.record
    seq = (record.seq_end or 1) + 1
    draft.apply(wire.Token(chat_id=record.chat_id, seq=seq, message_id=record.id, text=text))


async def saved(store: Store, draft: Draft) -> MessageRecord:
    (_, answer) = await store.chats.get_messages(draft.record.chat_id)
    return answer


@contextmanager
def statements(store: Store) -> Iterator[list[str]]:
    """The SQL statements the store sends meanwhile (an executemany counts once)."""
    sent: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        sent.append(" ".join(statement.split()).upper())

    engine = store.db.engine.sync_engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(engine, "before_cursor_execute", record)


def writes(sent: list[str]) -> list[str]:
    return [s for s in sent if s.startswith(("INSERT", "UPDATE", "DELETE"))]


async def test_every_running_answer_is_saved_by_one_statement_a_round(store: Store) -> None:
    saves = PartialSaves(store.chats, interval=3600)
    drafts = [await running_answer(store) for _ in range(3)]
    for draft in drafts:
        saves.track(draft)
        say(draft, "The ")
    # The first save of an answer writes its whole row.
    await saves.save_now()
    for draft in drafts:
        say(draft, "answer ")
    say(drafts[0], "grows.")
    with statements(store) as sent:
        await saves.save_now()
    assert writes(sent) == [s for s in sent if s.startswith("UPDATE MESSAGES")]
    assert len(writes(sent)) == 1
    for draft in drafts:
        answer = await saved(store, draft)
        assert (answer.text, answer.status) == (draft.record.text, "streaming")
        assert answer.seq_end == draft.record.seq_end
    # Nothing changed: nothing is written.
    with statements(store) as sent:
        await saves.save_now()
    assert writes(sent) == []
    await saves.aclose()


async def test_an_answer_whose_tool_calls_changed_is_saved_whole(store: Store) -> None:
    saves = PartialSaves(store.chats, interval=3600)
    draft = await running_answer(store)
    saves.track(draft)
    say(draft, "Searching. ")
    await saves.save_now()
    record = draft.record
    base = {"chat_id": record.chat_id, "message_id": record.id}
    draft.apply(wire.ToolUse(tool_use_id="t1", name="searchBlogContent", input={}, seq=3, **base))
    draft.apply(wire.ToolResult(tool_use_id="t1", output="[]", is_error=False, seq=4, **base))
    await saves.save_now()
    answer = await saved(store, draft)
    assert [(call.tool_use_id, call.output) for call in answer.tool_calls] == [("t1", "[]")]
    assert answer.seq_end == 4
    await saves.aclose()


async def test_settling_waits_for_a_save_of_the_answer_under_way(store: Store) -> None:
    saves = PartialSaves(store.chats, interval=3600)
    draft = await running_answer(store)
    saves.track(draft)
    say(draft, "Half ")
    round_ = asyncio.create_task(saves.save_now())
    await asyncio.sleep(0)  # (one step: the round has taken its snapshots and started)
    assert not round_.done()
    await saves.settle(draft)
    # The partial save has landed: the final save that follows is the last one.
    assert round_.done()
    say(draft, "and whole.")
    draft.record.status = "complete"
    await store.chats.save_message(draft.snapshot())
    await saves.save_now()  # a later round no longer holds the settled answer
    answer = await saved(store, draft)
    assert (answer.text, answer.status) == ("Half and whole.", "complete")
    await saves.aclose()


async def test_the_saver_saves_on_its_own_every_interval_while_answers_run(store: Store) -> None:
    saves = PartialSaves(store.chats, interval=0.05)
    draft = await running_answer(store)
    saves.track(draft)
    say(draft, "On its own.")
    async with asyncio.timeout(30):
        while (await store.chats.get_messages(draft.record.chat_id))[-1].role != "assistant":
            await asyncio.sleep(0.05)
    saves.forget(draft)
    assert len(saves) == 0
    await saves.aclose()


async def test_an_answer_whose_chat_was_deleted_holds_up_none_of_the_others(
    store: Store,
) -> None:
    saves = PartialSaves(store.chats, interval=3600)
    gone, kept = await running_answer(store), await running_answer(store)
    for draft in (gone, kept):
        saves.track(draft)
        say(draft, "Before. ")
    await saves.save_now()
    await store.chats.delete_chat(gone.record.chat_id)
    for draft in (gone, kept):
        say(draft, "After.")
    await saves.save_now()
    assert (await saved(store, kept)).text == "Before. After."
    assert await store.chats.get_messages(gone.record.chat_id) == []
    await saves.aclose()


async def test_an_owners_answers_are_saved_only_until_a_higher_token_claims_the_chat(
    store: Store,
) -> None:
    saves = PartialSaves(store.chats, interval=3600)
    owned, other = await running_answer(store), await running_answer(store)
    saves.track(owned, fence=1)
    saves.track(other, fence=1)
    for draft in (owned, other):
        say(draft, "Before. ")
    await saves.save_now()  # whole rows, fenced
    for draft in (owned, other):
        say(draft, "Under token 1. ")
    await saves.save_now()  # one bulk update, fenced
    assert (await saved(store, owned)).text == "Before. Under token 1. "
    # Another instance takes `owned`'s chat over (token 2): the old owner's saves of it
    # land no more; the other chat's still do.
    await store.chats.claim(owned.record.chat_id, 2)
    for draft in (owned, other):
        say(draft, "After.")
    await saves.save_now()
    assert (await saved(store, owned)).text == "Before. Under token 1. "
    assert (await saved(store, other)).text == "Before. Under token 1. After."
    # So is a whole save (tool calls changed) of a taken-over answer.
    record = owned.record
    base = {"chat_id": record.chat_id, "message_id": record.id}
    owned.apply(wire.ToolUse(tool_use_id="t1", name="searchBlogContent", input={}, seq=9, **base))
    await saves.save_now()
    assert (await saved(store, owned)).tool_calls == []
    await saves.aclose()

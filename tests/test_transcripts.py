"""The agent transcript store: the SDK's SessionStore contract, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from claude_agent_sdk import SessionKey
from claude_agent_sdk.testing import run_session_store_conformance
from sqlalchemy import delete

from blogchat.settings import Settings
from blogchat.store import ChatRecord, Store
from blogchat.store.chats import StaleOwner
from blogchat.store.tables import AgentTranscriptEntry
from blogchat.store.transcripts import TranscriptStore

KEY: SessionKey = {
    "project_key": "-srv-blog-agent",
    "session_id": "7d1c2f9e-0000-4000-8000-000000000001",
}


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[Store]:
    """This test's migrated database."""
    opened = await Store.open(settings.database, schema=settings.database_schema)
    try:
        yield opened
    finally:
        await opened.close()


def entry(uuid: str | None, **fields: Any) -> Any:
    """A transcript line as the CLI writes it."""
    line: dict[str, Any] = {"type": "user", **fields}
    if uuid is not None:
        line["uuid"] = uuid
    return line


async def test_the_store_passes_the_sdk_conformance_suite(store: Store) -> None:
    async def fresh() -> TranscriptStore:
        # Every contract starts from an empty table.
        async with store.db.session() as session:
            await session.execute(delete(AgentTranscriptEntry))
        return TranscriptStore(store.db)

    await run_session_store_conformance(fresh)


def test_the_suite_exercises_every_optional_method() -> None:
    # The suite skips the contracts of methods a store does not override.
    for method in ("list_sessions", "list_session_summaries", "delete", "list_subkeys"):
        assert method in TranscriptStore.__dict__


async def test_a_batch_delivered_twice_is_stored_once(store: Store) -> None:
    transcripts = TranscriptStore(store.db)
    batch = [entry("u1", n=1), entry(None, n=2), entry("u3", n=3)]
    await transcripts.append(KEY, batch)
    await transcripts.append(KEY, [entry("u3", n=3), entry("u4", n=4)])
    loaded = await transcripts.load(KEY)
    assert loaded is not None
    # Entries without a uuid have no identity and are kept as they come.
    assert [dict(line).get("n") for line in loaded] == [1, 2, 3, 4]


async def test_entries_round_trip_unchanged(store: Store) -> None:
    transcripts = TranscriptStore(store.db)
    line = entry(
        "u1",
        message={
            "role": "assistant",
            "content": [{"type": "text", "text": "Café ☕ — “quoted” \u2028 and \\ backslash"}],
            "usage": {"input_tokens": 12, "output_tokens": 3},
        },
        nested=[1, 2.5, None, True, {"deep": ["x"]}],
    )
    await transcripts.append(KEY, [line])
    assert await transcripts.load(KEY) == [line]


async def test_has_session_sees_only_main_transcripts_of_that_project(store: Store) -> None:
    transcripts = TranscriptStore(store.db)
    assert not await transcripts.has_session(KEY["project_key"], KEY["session_id"])
    await transcripts.append({**KEY, "subpath": "subagents/agent-1"}, [entry("s1")])
    assert not await transcripts.has_session(KEY["project_key"], KEY["session_id"])
    await transcripts.append(KEY, [entry("m1")])
    assert await transcripts.has_session(KEY["project_key"], KEY["session_id"])
    assert not await transcripts.has_session("-other-project", KEY["session_id"])


async def test_deleting_a_chat_deletes_its_agent_transcript_and_only_its(store: Store) -> None:
    transcripts = TranscriptStore(store.db)
    kept = await store.chats.create_chat(
        ChatRecord(id=KEY["session_id"], owner_id="owner-1", title="t", persona="p", model="haiku")
    )
    gone_id = "7d1c2f9e-0000-4000-8000-000000000002"
    await store.chats.create_chat(
        ChatRecord(id=gone_id, owner_id="owner-1", title="t", persona="p", model="haiku")
    )
    gone: SessionKey = {**KEY, "session_id": gone_id}
    await transcripts.append(KEY, [entry("a"), entry("b")])
    await transcripts.append(gone, [entry("c")])
    await transcripts.append({**gone, "subpath": "subagents/agent-1"}, [entry("d")])

    await store.chats.delete_chat(gone_id)

    assert await transcripts.load(gone) is None
    assert await transcripts.list_subkeys(gone) == []
    loaded = await transcripts.load({**KEY, "session_id": kept.id})
    assert loaded is not None
    assert [line["uuid"] for line in loaded] == ["a", "b"]


async def test_a_fenced_transcript_takes_writes_only_from_the_chats_current_owner(
    store: Store,
) -> None:
    chat_id = KEY["session_id"]
    await store.chats.create_chat(
        ChatRecord(id=chat_id, owner_id="owner-1", title="t", persona="p", model="haiku")
    )
    # Instance a owns the chat with token 3.
    held_by_a: dict[str, int] = {chat_id: 3}
    on_a = TranscriptStore(store.db, held_by_a.get)
    await store.chats.claim(chat_id, 3)
    await on_a.append(KEY, [entry("a1"), entry("a2")])
    mark = await on_a.mark(KEY["project_key"], chat_id)

    # b takes the chat over (token 4) while a is paused; a still thinks it owns it.
    on_b = TranscriptStore(store.db, {chat_id: 4}.get)
    await store.chats.claim(chat_id, 4)
    with pytest.raises(StaleOwner):
        await on_a.append(KEY, [entry("late")])
    with pytest.raises(StaleOwner):
        await on_a.append({**KEY, "subpath": "subagents/agent-1"}, [entry("late-sub")])
    await on_b.append(KEY, [entry("b1")])
    with pytest.raises(StaleOwner):
        await on_a.truncate(KEY["project_key"], chat_id, after=mark)
    with pytest.raises(StaleOwner):
        await on_a.delete(KEY)
    # Once a gave the chat up it has no token for it at all.
    del held_by_a[chat_id]
    with pytest.raises(StaleOwner):
        await on_a.append(KEY, [entry("later")])

    loaded = await on_b.load(KEY)
    assert loaded is not None
    assert [dict(line)["uuid"] for line in loaded] == ["a1", "a2", "b1"]
    assert await on_b.list_subkeys(KEY) == []
    # The new owner's own writes go through: it cuts back its own entry.
    assert await on_b.truncate(KEY["project_key"], chat_id, after=mark) == 1
    # A chat this instance does not own takes nothing either.
    elsewhere: SessionKey = {**KEY, "session_id": "7d1c2f9e-0000-4000-8000-00000000000f"}
    with pytest.raises(StaleOwner):
        await on_b.append(elsewhere, [entry("x")])
    assert await on_b.load(elsewhere) is None

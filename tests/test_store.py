"""The store: every table round-trips on SQLite and PostgreSQL, and its rules hold."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.exc import IntegrityError, StatementError

from blogchat.settings import Settings
from blogchat.store import (
    STREAMING,
    ChatRecord,
    Database,
    DuplicateClientMessage,
    EmailTaken,
    MessageRecord,
    Store,
    ToolCallRecord,
)
from blogchat.store.chats import StaleOwner, conversation_order
from blogchat.store.tables import Chat, LoginSession, Message, ToolCall, User
from tests.support.server import Database as Backend
from tests.support.server import settings_for

# A fixed instant with microseconds, so that a lossy round-trip shows.
T0 = datetime(2026, 3, 14, 15, 9, 26, 535897, tzinfo=UTC)


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[Store]:
    """A migrated store on this test's database (SQLite file or private PostgreSQL schema)."""
    opened = await Store.open(settings.database, schema=settings.database_schema)
    try:
        yield opened
    finally:
        await opened.close()


def new_id() -> str:
    return str(uuid.uuid4())


async def make_chat(store: Store, owner_id: str | None = None, **fields: object) -> ChatRecord:
    values: dict[str, object] = {
        "id": new_id(),
        "owner_id": owner_id or new_id(),
        "title": "A chat",
        "persona": "blog-assistant",
        "model": "haiku",
    }
    values.update(fields)
    return await store.chats.create_chat(ChatRecord(**values))  # type: ignore[arg-type]


def user_message(
    chat: ChatRecord, seq: int, text: str = "hello", **fields: object
) -> MessageRecord:
    values: dict[str, object] = {
        "id": new_id(),
        "chat_id": chat.id,
        "role": "user",
        "seq_start": seq,
        "seq_end": seq,
        "text": text,
        "client_message_id": new_id(),
    }
    values.update(fields)
    return MessageRecord(**values)  # type: ignore[arg-type]


def answer(
    chat: ChatRecord, start: int, end: int, reply_to: str | None, **fields: object
) -> MessageRecord:
    values: dict[str, object] = {
        "id": new_id(),
        "chat_id": chat.id,
        "role": "assistant",
        "seq_start": start,
        "seq_end": end,
        "reply_to": reply_to,
        "text": "an answer",
    }
    values.update(fields)
    return MessageRecord(**values)  # type: ignore[arg-type]


def without_updated_at(message: MessageRecord) -> MessageRecord:
    # The store stamps updated_at itself on every write.
    return dataclasses.replace(message, updated_at=T0)


# --- users and logins -----------------------------------------------------------------


async def test_an_account_round_trips_and_its_email_is_unique(store: Store) -> None:
    account = await store.accounts.create_account(new_id(), "ada@example.com", "$argon2id$hash")
    found = await store.accounts.find_account("ada@example.com")
    assert found == account
    assert await store.accounts.find_account("nobody@example.com") is None
    with pytest.raises(EmailTaken):
        await store.accounts.create_account(new_id(), "ada@example.com", "$argon2id$other")
    await store.accounts.set_password_hash(account.id, "$argon2id$rehashed")
    rehashed = await store.accounts.find_account("ada@example.com")
    assert rehashed is not None
    assert rehashed.password_hash == "$argon2id$rehashed"


async def test_an_anonymous_owner_is_not_an_account(store: Store) -> None:
    chat = await make_chat(store)
    async with store.db.session() as session:
        user = await session.get(User, chat.owner_id)
    assert user is not None
    assert user.email is None
    assert user.password_hash is None


async def test_a_login_session_resolves_until_it_is_ended(store: Store) -> None:
    account = await store.accounts.create_account(new_id(), "bo@example.com", "$argon2id$h")
    token = await store.accounts.start_login(account.id, timedelta(days=1))
    assert await store.accounts.resolve_login(account.id, token) == account
    # The token only works together with the user it was issued to.
    assert await store.accounts.resolve_login(new_id(), token) is None
    assert await store.accounts.resolve_login(account.id, token + "x") is None
    async with store.db.session() as session:
        row = await session.scalar(select(LoginSession).where(LoginSession.user_id == account.id))
    assert row is not None
    assert token not in row.token_hash, "only a hash of the login token may be stored"
    assert row.expires_at.tzinfo is not None
    await store.accounts.end_login(token)
    assert await store.accounts.resolve_login(account.id, token) is None


async def test_an_expired_login_session_does_not_resolve(store: Store) -> None:
    account = await store.accounts.create_account(new_id(), "cy@example.com", "$argon2id$h")
    token = await store.accounts.start_login(account.id, timedelta(seconds=-1))
    assert await store.accounts.resolve_login(account.id, token) is None


# --- chats ------------------------------------------------------------------------------


async def test_a_chat_round_trips_with_every_column(store: Store) -> None:
    chat = await make_chat(
        store,
        title="Über Sauerteig 🍞",
        persona="reading-guide",
        model="sonnet",
        last_seq=7,
        created_by=new_id(),
        post_slug="dialing-in-espresso-at-home",
        created_at=T0,
        updated_at=T0 + timedelta(minutes=5),
    )
    assert await store.chats.get_chat(chat.id) == chat
    assert await store.chats.get_chat(new_id()) is None


async def test_update_chat_changes_only_the_given_columns(store: Store) -> None:
    chat = await make_chat(store, created_at=T0, updated_at=T0)
    await store.chats.update_chat(chat.id, title="Renamed", model="opus")
    assert await store.chats.get_chat(chat.id) == dataclasses.replace(
        chat, title="Renamed", model="opus"
    )


async def test_list_chats_is_the_owners_chats_most_recent_first(store: Store) -> None:
    owner = new_id()
    old = await make_chat(store, owner, updated_at=T0)
    new = await make_chat(store, owner, updated_at=T0 + timedelta(hours=1))
    middle = await make_chat(store, owner, updated_at=T0 + timedelta(minutes=1))
    await make_chat(store)  # someone else's
    listed = await store.chats.list_chats(owner)
    assert [chat.id for chat in listed] == [new.id, middle.id, old.id]
    assert await store.chats.list_chats(new_id()) == []


# --- messages and tool calls --------------------------------------------------------------


async def test_a_user_message_round_trips(store: Store) -> None:
    chat = await make_chat(store)
    message = user_message(chat, 1, 'Wie warm? ✓ «quotes» and "escapes"\n', created_at=T0)
    await store.chats.add_message(message)
    [stored] = await store.chats.get_messages(chat.id)
    assert without_updated_at(stored) == without_updated_at(message)
    assert stored.updated_at.tzinfo is UTC


async def test_an_answer_round_trips_with_thinking_usage_warning_error_and_tool_calls(
    store: Store,
) -> None:
    chat = await make_chat(store)
    question = user_message(chat, 1, created_at=T0)
    await store.chats.add_message(question)
    calls = [
        ToolCallRecord(
            tool_use_id="toolu_01",
            name="searchBlogContent",
            input={
                "query": "café crème ☕ 日本語",
                "limit": 5,
                "filters": {"tags": ["coffee", "équipement"], "after": None, "deep": {"x": [1.5]}},
                "exact": True,
            },
            output="## Résultats\n\n1. [Espresso](/posts/x) — «bien»",
            is_error=False,
            started_at=T0 + timedelta(seconds=1),
            finished_at=T0 + timedelta(seconds=2),
        ),
        ToolCallRecord(
            tool_use_id="toolu_02",
            name="getPost",
            input={"slug": "missing"},
            output="There is no post 'missing'.",
            is_error=True,
            started_at=T0 + timedelta(seconds=3),
            finished_at=T0 + timedelta(seconds=3, microseconds=1),
        ),
        ToolCallRecord(
            tool_use_id="toolu_03",
            name="getCurrentDateTime",
            input={},
            output=None,
            started_at=T0 + timedelta(seconds=4),
            finished_at=None,
        ),
    ]
    reply = answer(
        chat,
        2,
        40,
        question.id,
        text="Keep it at **24-26 °C**.",
        thinking="The reader wants a temperature…",
        status="max_turns",
        model="claude-haiku-4-5",
        input_tokens=1234,
        output_tokens=567,
        warning="The assistant stopped after 8 tool rounds.",
        error="provider said: overloaded",
        created_at=T0 + timedelta(milliseconds=10),
        tool_calls=calls,
    )
    await store.chats.save_message(reply)
    stored = await store.chats.get_messages(chat.id)
    assert [without_updated_at(m) for m in stored] == [
        without_updated_at(question),
        without_updated_at(reply),
    ]
    for call in stored[1].tool_calls:
        assert call.started_at.tzinfo is UTC


async def test_many_tool_calls_keep_their_call_order(store: Store) -> None:
    chat = await make_chat(store)
    question = user_message(chat, 1)
    await store.chats.add_message(question)
    # Names that sort differently from the call order, and started_at running backwards.
    calls = [
        ToolCallRecord(
            tool_use_id=f"toolu_{9 - n}",
            name=f"tool{(n * 7) % 12}",
            input={"n": n},
            started_at=T0 - timedelta(seconds=n),
        )
        for n in range(12)
    ]
    await store.chats.save_message(answer(chat, 2, 30, question.id, tool_calls=calls))
    stored = await store.chats.get_messages(chat.id)
    assert [call.input["n"] for call in stored[1].tool_calls] == list(range(12))


async def test_saving_an_answer_again_replaces_its_text_status_and_tool_calls(
    store: Store,
) -> None:
    chat = await make_chat(store)
    question = user_message(chat, 1)
    await store.chats.add_message(question)
    partial = answer(
        chat,
        2,
        5,
        question.id,
        text="So far",
        status=STREAMING,
        tool_calls=[ToolCallRecord("toolu_a", "searchBlogContent", {"query": "a"})],
    )
    await store.chats.save_message(partial)
    final = dataclasses.replace(
        partial,
        text="So far, and the rest.",
        status="complete",
        seq_end=9,
        tool_calls=[
            ToolCallRecord("toolu_a", "searchBlogContent", {"query": "a"}, "found", False),
            ToolCallRecord("toolu_b", "getPost", {"slug": "b"}, "post b", False),
        ],
    )
    await store.chats.save_message(final)
    stored = await store.chats.get_messages(chat.id)
    assert [without_updated_at(m) for m in stored] == [
        without_updated_at(question),
        without_updated_at(final),
    ]
    async with store.db.session() as session:
        count = await session.scalar(select(func.count()).select_from(ToolCall))
    assert count == 2, "a re-saved answer must not leave its earlier tool calls behind"


async def test_a_client_message_id_is_unique_within_a_chat(store: Store) -> None:
    chat = await make_chat(store)
    first = user_message(chat, 1)
    await store.chats.add_message(first)
    with pytest.raises(DuplicateClientMessage):
        await store.chats.add_message(
            user_message(chat, 2, client_message_id=first.client_message_id)
        )
    # The same id is fine in another chat.
    await store.chats.add_message(
        user_message(await make_chat(store), 1, client_message_id=first.client_message_id)
    )


async def test_find_client_message_looks_only_at_the_visitors_own_chats(store: Store) -> None:
    alice, bob = new_id(), new_id()
    shared_id = new_id()
    alice_chat = await make_chat(store, alice)
    bob_chat = await make_chat(store, bob)
    alice_message = user_message(alice_chat, 1, "alice", client_message_id=shared_id)
    bob_message = user_message(bob_chat, 1, "bob", client_message_id=shared_id)
    await store.chats.add_message(alice_message)
    await store.chats.add_message(bob_message)
    found_alice = await store.chats.find_client_message(alice, shared_id)
    found_bob = await store.chats.find_client_message(bob, shared_id)
    assert found_alice is not None
    assert found_bob is not None
    assert (found_alice.id, found_alice.text) == (alice_message.id, "alice")
    assert (found_bob.id, found_bob.text) == (bob_message.id, "bob")
    assert await store.chats.find_client_message(new_id(), shared_id) is None
    assert await store.chats.find_client_message(alice, new_id()) is None


async def test_find_client_message_ignores_answers(store: Store) -> None:
    owner = new_id()
    chat = await make_chat(store, owner)
    question = user_message(chat, 1)
    await store.chats.add_message(question)
    stray = new_id()
    await store.chats.save_message(answer(chat, 2, 3, question.id, client_message_id=stray))
    assert await store.chats.find_client_message(owner, stray) is None


async def test_a_readers_message_is_saved_with_its_chats_seqs_and_model_in_one_go(
    store: Store,
) -> None:
    chat = await make_chat(store)
    question = user_message(chat, 1, "first")
    admitted: list[str] = []

    async def admit() -> None:
        admitted.append(question.id)

    sent = await store.chats.add_user_message(
        question, owner_id=chat.owner_id, admit=admit, reserve=1000, model="sonnet"
    )
    assert sent is None
    assert admitted == [question.id]
    saved = await store.chats.get_chat(chat.id)
    assert saved is not None
    assert (saved.last_seq, saved.model) == (1000, "sonnet")
    assert saved.updated_at >= chat.updated_at
    assert [m.id for m in await store.chats.get_messages(chat.id)] == [question.id]
    # Without a reservation or a model, the chat keeps both (a reservation never goes back).
    await store.chats.reserve_seq(chat.id, 2000)
    assert await store.chats.add_user_message(user_message(chat, 2), owner_id=chat.owner_id) is None
    again = await store.chats.get_chat(chat.id)
    assert again is not None
    assert (again.last_seq, again.model) == (2000, "sonnet")
    await store.chats.add_user_message(user_message(chat, 3), owner_id=chat.owner_id, reserve=5)
    assert (await last_seq_of(store, chat.id)) == 2000


async def test_a_readers_message_row_is_stored_exactly_as_the_orm_stores_a_message(
    store: Store,
) -> None:
    # The message path writes its row with statements of its own (on SQLite, on the driver
    # itself): column for column, what lands must be what any other save writes, down to
    # how a timestamp is spelled (SQLite keeps text, and orders chats by it).
    chat = await make_chat(store)
    fast = user_message(chat, 1, client_address="203.0.113.9", created_at=T0, updated_at=T0)
    assert await store.chats.add_user_message(fast, owner_id=chat.owner_id) is None
    slow = dataclasses.replace(fast, id=new_id(), client_message_id=new_id(), seq_start=2)
    slow.seq_end = 2
    await store.chats.add_message(slow)
    async with store.db.engine.connect() as connection:
        rows = {
            row[0]: row[1:]
            for row in await connection.execute(
                select(Message.__table__).where(Message.chat_id == chat.id)
            )
        }
        raw = await connection.exec_driver_sql("SELECT id, created_at, content FROM messages")
        spelled = {row[0]: row[1:] for row in raw}
    columns = [column.name for column in Message.__table__.columns][1:]
    differ = [
        name
        for name, a, b in zip(columns, rows[fast.id], rows[slow.id], strict=True)
        if a != b and name not in {"client_message_id", "seq_start", "seq_end", "updated_at"}
    ]
    assert differ == []
    assert spelled[fast.id] == spelled[slow.id]


async def test_a_user_message_saved_with_a_stale_fence_is_refused_and_nothing_is_written(
    store: Store,
) -> None:
    chat = await make_chat(store)
    first = user_message(chat, 1, "from the owner")
    assert await store.chats.add_user_message(first, owner_id=chat.owner_id, fence=5) is None
    fenced = await store.chats.get_chat(chat.id)
    assert fenced is not None
    assert fenced.lease_fence == 5
    # An older owner (a lower token) saves nothing: neither the message nor the chat.
    late = user_message(chat, 2, "from an older owner")
    with pytest.raises(StaleOwner):
        await store.chats.add_user_message(
            late, owner_id=chat.owner_id, fence=4, reserve=1000, model="opus"
        )
    assert [m.id for m in await store.chats.get_messages(chat.id)] == [first.id]
    after = await store.chats.get_chat(chat.id)
    assert after is not None
    assert (after.lease_fence, after.last_seq, after.model) == (5, 0, "haiku")
    # The same token saves again.
    again = user_message(chat, 3, "from the owner again")
    assert await store.chats.add_user_message(again, owner_id=chat.owner_id, fence=5) is None
    assert [m.id for m in await store.chats.get_messages(chat.id)] == [first.id, again.id]


async def test_a_message_its_owner_sent_before_is_returned_and_nothing_is_written(
    store: Store,
) -> None:
    owner = new_id()
    first_chat, second_chat = await make_chat(store, owner), await make_chat(store, owner)
    question = user_message(first_chat, 1, "asked once")
    assert await store.chats.add_user_message(question, owner_id=owner) is None

    async def admit() -> None:
        raise AssertionError("a resend is never admitted (counted)")

    # Sent again, to another of the owner's chats: the first one is what comes back.
    again = user_message(
        second_chat, 1, "asked twice", client_message_id=question.client_message_id
    )
    previous = await store.chats.add_user_message(
        again, owner_id=owner, admit=admit, reserve=1000, model="opus"
    )
    assert previous is not None
    assert (previous.id, previous.chat_id, previous.text) == (
        question.id,
        first_chat.id,
        "asked once",
    )
    assert await store.chats.get_messages(second_chat.id) == []
    untouched = await store.chats.get_chat(second_chat.id)
    assert untouched is not None
    assert (untouched.last_seq, untouched.model) == (0, "haiku")
    # Another owner's message with the same id is none of this owner's business.
    stranger = await make_chat(store)
    mine = user_message(stranger, 1, client_message_id=question.client_message_id)
    assert await store.chats.add_user_message(mine, owner_id=stranger.owner_id) is None


async def test_a_message_admit_refuses_leaves_nothing_behind(store: Store) -> None:
    chat = await make_chat(store)

    class Refused(Exception):
        pass

    async def admit() -> None:
        raise Refused

    with pytest.raises(Refused):
        await store.chats.add_user_message(
            user_message(chat, 1), owner_id=chat.owner_id, admit=admit, reserve=1000
        )
    assert await store.chats.get_messages(chat.id) == []
    assert await last_seq_of(store, chat.id) == 0


async def test_only_the_idempotency_index_makes_a_readers_message_already_used(
    store: Store,
) -> None:
    chat = await make_chat(store)
    first = user_message(chat, 1)
    await store.chats.add_message(first)
    # The chat changed hands meanwhile (an anonymous reader signed in): the lookup by the
    # new owner misses it, and the unique index has the last word.
    with pytest.raises(DuplicateClientMessage):
        await store.chats.add_user_message(
            user_message(chat, 2, client_message_id=first.client_message_id), owner_id=new_id()
        )
    # A message to a chat that is gone breaks another rule: reported as itself.
    await store.chats.delete_chat(chat.id)
    with pytest.raises(IntegrityError):
        await store.chats.add_user_message(user_message(chat, 3), owner_id=chat.owner_id)


async def last_seq_of(store: Store, chat_id: str) -> int:
    chat = await store.chats.get_chat(chat_id)
    assert chat is not None
    return chat.last_seq


# --- ordering and seq ----------------------------------------------------------------------


async def test_each_answer_follows_the_message_it_answers_even_after_a_queued_message(
    store: Store,
) -> None:
    chat = await make_chat(store)
    # The second question was queued (and got its seq) before the first answer's first event.
    q1 = user_message(chat, 1, "first question")
    q2 = user_message(chat, 2, "second question")
    a1 = answer(chat, 3, 10, q1.id, text="first answer")
    q3 = user_message(chat, 11, "third question")
    a2 = answer(chat, 12, 20, q2.id, text="second answer")
    a3 = answer(chat, 21, 25, q3.id, text="third answer")
    for message in (q1, q2, q3):
        await store.chats.add_message(message)
    for message in (a3, a1, a2):
        await store.chats.save_message(message)
    stored = await store.chats.get_messages(chat.id)
    assert [m.text for m in stored] == [
        "first question",
        "first answer",
        "second question",
        "second answer",
        "third question",
        "third answer",
    ]


def test_conversation_order_keeps_an_answer_whose_question_is_missing() -> None:
    chat = ChatRecord(id="c", owner_id="o", title="t", persona="p", model="haiku")
    q1 = user_message(chat, 1, "q1")
    orphan = answer(chat, 2, 4, reply_to="gone", text="orphan")
    a1 = answer(chat, 5, 6, reply_to=q1.id, text="a1")
    legacy = answer(chat, 7, 8, reply_to=None, text="no reply_to")
    ordered = conversation_order([legacy, a1, orphan, q1])
    assert [m.text for m in ordered] == ["q1", "a1", "orphan", "no reply_to"]


async def test_reserve_seq_never_lowers_last_seq_and_settling_needs_the_reservation(
    store: Store,
) -> None:
    chat = await make_chat(store)

    async def last_seq() -> int:
        record = await store.chats.get_chat(chat.id)
        assert record is not None
        return record.last_seq

    await store.chats.reserve_seq(chat.id, 10)
    assert await last_seq() == 10
    await store.chats.reserve_seq(chat.id, 5)
    assert await last_seq() == 10
    await store.chats.add_message(user_message(chat, 3))
    assert await last_seq() == 10
    # Giving back the unused part of a reservation: only the reservation still in place.
    assert await store.chats.settle_seq(chat.id, 64, 3) is False
    assert await last_seq() == 10
    assert await store.chats.settle_seq(chat.id, 10, 3) is True
    assert await last_seq() == 3
    await store.chats.reserve_seq(chat.id, 64)
    assert await last_seq() == 64


async def test_a_transaction_that_reads_then_writes_waits_for_a_concurrent_writer(
    store: Store,
) -> None:
    # The shape of every save: read, then write. While one transaction is open, another
    # writer waits its turn (on SQLite, one transaction at a time) instead of failing.
    chat = await make_chat(store, title="before")
    other = await make_chat(store, title="before")
    async with store.db.session() as first:
        assert await first.scalar(select(func.count()).select_from(Message)) == 0
        writer = asyncio.create_task(store.chats.update_chat(other.id, title="second"))
        # Let the second writer run as far as it can while the first transaction is open.
        await asyncio.wait({writer}, timeout=0.5)
        await first.execute(
            update(Chat).where(Chat.id == chat.id).values(title="first")  # read, then write
        )
    await writer
    titles = {c.id: c.title for c in await store.chats.list_chats(chat.owner_id)}
    titles.update({c.id: c.title for c in await store.chats.list_chats(other.owner_id)})
    assert titles == {chat.id: "first", other.id: "second"}


async def test_a_sqlite_connection_returned_in_a_transaction_is_rolled_back(
    tmp_path: Path,
) -> None:
    # The pool leaves a committed connection alone; one that comes back with a write the
    # connection did not commit (run on the driver itself) is rolled back before reuse.
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'blogchat.db'}")
    try:
        chat = await make_chat(store, title="before")
        async with store.db.engine.connect() as connection:
            raw = await connection.get_raw_connection()
            driver = raw.driver_connection
            assert driver is not None
            await driver.execute("UPDATE chats SET title = 'uncommitted' WHERE id = ?", [chat.id])
            assert driver.in_transaction
        # (One connection in the pool: the next transaction gets the same one.)
        assert (await store.chats.get_chat(chat.id)).title == "before"  # type: ignore[union-attr]
        await store.chats.update_chat(chat.id, title="after")
        assert (await store.chats.get_chat(chat.id)).title == "after"  # type: ignore[union-attr]
    finally:
        await store.close()


async def test_a_postgresql_connection_idle_past_its_ping_time_is_replaced_if_dead(
    postgres_database: Backend, tmp_path: Path
) -> None:
    # Connections are pinged only after a while idle in the pool: one whose server end
    # went away meanwhile is replaced before a transaction uses it.
    settings = settings_for(postgres_database, tmp_path)
    db = Database(settings.database, schema=settings.database_schema, ping_after_idle=0)
    other = Database(settings.database, schema=settings.database_schema)
    try:
        async with db.transaction() as connection:
            first = await connection.scalar(text("SELECT pg_backend_pid()"))
        async with other.transaction() as connection:
            ended = await connection.scalar(
                text("SELECT pg_terminate_backend(:pid)"), {"pid": first}
            )
            assert ended
        async with db.transaction() as connection:
            second = await connection.scalar(text("SELECT pg_backend_pid()"))
        assert second != first
    finally:
        await db.dispose()
        await other.dispose()


async def test_a_write_whose_caller_is_cancelled_still_ends_and_blocks_no_other_writer(
    store: Store,
) -> None:
    # Turns cancel their saves (stop, shutdown). Cut at every point of its run, a write
    # either lands whole or not at all, and it never leaves the database locked.
    chat = await make_chat(store)
    question = user_message(chat, 1)
    await store.chats.add_message(question)
    for point in range(40):
        draft = answer(chat, 2, 2 + point, question.id, text=f"draft {point}")
        save = asyncio.create_task(store.chats.save_message(draft))
        await asyncio.sleep(point / 4000)  # Cut points spread over the write's run.
        save.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await save
        # Another writer goes ahead (a held lock would fail it with "database is locked").
        await store.chats.update_chat(chat.id, title=f"after {point}")
    assert (await store.chats.get_chat(chat.id)).title == "after 39"  # type: ignore[union-attr]
    saved = [m for m in await store.chats.get_messages(chat.id) if m.role == "assistant"]
    assert all(m.text.startswith("draft ") and m.tool_calls == [] for m in saved)


async def test_closing_the_database_waits_for_a_write_whose_caller_was_cancelled(
    store: Store,
) -> None:
    # A turn cut off at shutdown cancels its final save's caller; the save itself must
    # still land before the connections close.
    chat = await make_chat(store, title="before")
    async with store.db.session() as holder:
        # Hold the chat's row (on SQLite: the one transaction at a time), so that the write
        # below can start but not finish.
        await holder.execute(select(Chat).where(Chat.id == chat.id).with_for_update())
        caller = asyncio.create_task(store.chats.update_chat(chat.id, title="landed"))
        for _ in range(20):
            await asyncio.sleep(0)
        caller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await caller
        closing = asyncio.create_task(store.db.dispose())
        for _ in range(20):
            await asyncio.sleep(0)
        assert not closing.done(), "the database closed under a write that must complete"
    await closing
    assert (await store.chats.get_chat(chat.id)).title == "landed"  # type: ignore[union-attr]


# --- deletion, crash recovery, time ---------------------------------------------------------


async def test_deleting_a_chat_deletes_its_messages_and_tool_calls(store: Store) -> None:
    kept = await make_chat(store)
    doomed = await make_chat(store)
    for chat in (kept, doomed):
        question = user_message(chat, 1)
        await store.chats.add_message(question)
        calls = [ToolCallRecord(f"toolu_{n}", "getPost", {"slug": str(n)}) for n in range(3)]
        await store.chats.save_message(answer(chat, 2, 9, question.id, tool_calls=calls))
    await store.chats.delete_chat(doomed.id)
    assert await store.chats.get_chat(doomed.id) is None
    assert await store.chats.get_messages(doomed.id) == []
    async with store.db.session() as session:
        messages = await session.scalar(select(func.count()).select_from(Message))
        calls = await session.scalar(select(func.count()).select_from(ToolCall))
    assert (messages, calls) == (2, 3), "only the other chat's rows may remain"
    assert len(await store.chats.get_messages(kept.id)) == 2


async def test_mark_interrupted_turns_turns_streaming_answers_into_incomplete(
    store: Store,
) -> None:
    chat = await make_chat(store)
    question = user_message(chat, 1)
    await store.chats.add_message(question)
    cut_off = answer(chat, 2, 7, question.id, text="half an ans", status=STREAMING)
    await store.chats.save_message(cut_off)
    later = await make_chat(store)
    finished_q = user_message(later, 1)
    await store.chats.add_message(finished_q)
    await store.chats.save_message(answer(later, 2, 3, finished_q.id, status="stopped"))

    assert await store.chats.mark_interrupted_turns() == 1
    [_, stored] = await store.chats.get_messages(chat.id)
    assert (stored.status, stored.text) == ("incomplete", "half an ans")
    [_, untouched] = await store.chats.get_messages(later.id)
    assert untouched.status == "stopped"
    assert await store.chats.mark_interrupted_turns() == 0


async def test_timestamps_come_back_timezone_aware_in_utc(store: Store) -> None:
    tokyo = timezone(timedelta(hours=9))
    created = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=tokyo)
    chat = await make_chat(store, created_at=created, updated_at=created)
    message = user_message(chat, 1, created_at=created)
    await store.chats.add_message(message)
    record = await store.chats.get_chat(chat.id)
    assert record is not None
    [stored] = await store.chats.get_messages(chat.id)
    for value in (record.created_at, record.updated_at, stored.created_at, stored.updated_at):
        assert value.tzinfo is UTC
    assert record.created_at == created
    assert record.created_at.hour == 18  # 03:04 in Tokyo is 18:04 UTC the day before
    assert stored.created_at == created


async def test_a_naive_timestamp_is_refused(store: Store) -> None:
    with pytest.raises(StatementError, match="naive datetime"):
        await make_chat(store, created_at=datetime(2026, 1, 1, 12, 0))


# --- handing chats over ---------------------------------------------------------------------


async def test_transfer_chats_moves_an_anonymous_visitors_chats_to_an_account(
    store: Store,
) -> None:
    anonymous = new_id()
    first = await make_chat(store, anonymous)
    second = await make_chat(store, anonymous)
    bystander = await make_chat(store)
    account = await store.accounts.create_account(new_id(), "dee@example.com", "$argon2id$h")
    own = await make_chat(store, account.id)

    assert await store.accounts.transfer_chats(anonymous, account.id) == 2
    assert {c.id for c in await store.chats.list_chats(account.id)} == {
        first.id,
        second.id,
        own.id,
    }
    assert await store.chats.list_chats(anonymous) == []
    bystander_now = await store.chats.get_chat(bystander.id)
    assert bystander_now is not None
    assert bystander_now.owner_id == bystander.owner_id
    async with store.db.session() as session:
        assert await session.get(User, anonymous) is None
    assert await store.accounts.transfer_chats(anonymous, account.id) == 0


async def test_transfer_chats_never_moves_chats_away_from_an_account(store: Store) -> None:
    owner = await store.accounts.create_account(new_id(), "eve@example.com", "$argon2id$h")
    other = await store.accounts.create_account(new_id(), "fay@example.com", "$argon2id$h")
    chat = await make_chat(store, owner.id)
    assert await store.accounts.transfer_chats(owner.id, other.id) == 0
    assert await store.accounts.transfer_chats(owner.id, owner.id) == 0
    assert [c.id for c in await store.chats.list_chats(owner.id)] == [chat.id]
    assert await store.chats.list_chats(other.id) == []
    assert await store.accounts.find_account("eve@example.com") == owner

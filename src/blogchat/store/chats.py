"""Chats, their messages and the tool calls inside answers."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, cast

from sqlalchemy import (
    Integer,
    Select,
    Table,
    Update,
    bindparam,
    case,
    delete,
    exists,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased, selectinload

from blogchat.protocol import MessageStatus, ModelAlias
from blogchat.store.accounts import ensure_user, new_user_statement
from blogchat.store.database import Database, runs_to_completion
from blogchat.store.tables import AgentTranscriptEntry, Chat, Message, ToolCall, User, utcnow

# A running answer is kept as "streaming"; after a crash nothing is streaming any more, so
# start-up turns those rows into "incomplete" (see mark_interrupted_turns).
STREAMING: Literal["streaming"] = "streaming"

Role = Literal["user", "assistant"]
# How a message stands: what the protocol shows, or still streaming.
Status = MessageStatus | Literal["streaming"]


# The unique index that makes a clientMessageId usable once per chat.
DUPLICATE_CLIENT_MESSAGE = "uq_messages_chat_client_id"


class DuplicateClientMessage(Exception):
    """This chat already holds a message with that clientMessageId."""


class StaleOwner(Exception):
    """A save by an instance whose claim on the chat was taken over (a higher token saved)."""


def _violates(error: IntegrityError, constraint: str) -> bool:
    """Whether an integrity error is this constraint's (not, say, a foreign key's)."""
    cause = error.orig
    # asyncpg names the constraint; SQLite names the columns of a unique index.
    name = getattr(getattr(cause, "__cause__", None), "constraint_name", None) or getattr(
        cause, "constraint_name", None
    )
    if name is not None:
        return bool(name == constraint)
    return "UNIQUE constraint failed: messages.chat_id, messages.client_message_id" in str(cause)


@dataclass(frozen=True)
class ChatRecord:
    """A chat's row."""

    id: str
    owner_id: str
    title: str
    persona: str
    model: ModelAlias
    last_seq: int = 0
    created_by: str | None = None
    # The fencing token of the instance that last saved to the chat (several instances).
    lease_fence: int = 0
    post_slug: str | None = None
    created_at: datetime = field(default_factory=utcnow)
    updated_at: datetime = field(default_factory=utcnow)


@dataclass
class ToolCallRecord:
    """One tool call of an answer."""

    tool_use_id: str
    name: str
    input: dict[str, Any]
    output: str | None = None
    is_error: bool = False
    started_at: datetime = field(default_factory=utcnow)
    finished_at: datetime | None = None


@dataclass
class MessageRecord:
    """A user message or an assistant answer, as stored."""

    id: str
    chat_id: str
    role: Role
    seq_start: int
    seq_end: int
    text: str = ""
    status: Status = "complete"
    thinking: str | None = None
    model: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    # Of the input tokens, those read from and written to the prompt cache.
    cache_read_tokens: int | None = None
    cache_creation_tokens: int | None = None
    # The provider's reason for ending the answer (end_turn, max_tokens, refusal, ...).
    stop_reason: str | None = None
    # An answer's last request's input tokens: the size the chat's context has reached.
    context_tokens: int | None = None
    # The client address it came from (an answer: its question's), when known.
    client_address: str | None = None
    client_message_id: str | None = None
    reply_to: str | None = None
    warning: str | None = None
    error: str | None = None
    created_at: datetime = field(default_factory=utcnow)
    updated_at: datetime = field(default_factory=utcnow)
    tool_calls: list[ToolCallRecord] = field(default_factory=list)
    # On a user message that regenerated or edited the chat's last question: the ids of
    # the messages it replaced (they are kept, marked superseded by it).
    replaces: list[str] = field(default_factory=list)
    # An answer's messages in the API's shape, when its engine gave them (engines/base.py,
    # `Exchange`): what the provider saw, signatures included.
    content: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class Waiting:
    """A user message that has no answer yet, and whether its chat's owner is signed up."""

    message: MessageRecord
    registered: bool


def _chat_record(row: Chat) -> ChatRecord:
    return ChatRecord(
        id=row.id,
        owner_id=row.owner_id,
        title=row.title,
        persona=row.persona,
        # Written only from validated aliases.
        model=cast(ModelAlias, row.model),
        last_seq=row.last_seq,
        created_by=row.created_by,
        lease_fence=row.lease_fence,
        post_slug=row.post_slug,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _message_record(row: Message) -> MessageRecord:
    return MessageRecord(
        id=row.id,
        chat_id=row.chat_id,
        role=cast(Role, row.role),
        seq_start=row.seq_start,
        seq_end=row.seq_end,
        text=row.text,
        status=cast(Status, row.status),
        thinking=row.thinking,
        model=row.model,
        input_tokens=row.input_tokens,
        output_tokens=row.output_tokens,
        cache_read_tokens=row.cache_read_tokens,
        cache_creation_tokens=row.cache_creation_tokens,
        stop_reason=row.stop_reason,
        context_tokens=row.context_tokens,
        client_address=row.client_address,
        client_message_id=row.client_message_id,
        reply_to=row.reply_to,
        warning=row.warning,
        error=row.error,
        created_at=row.created_at,
        updated_at=row.updated_at,
        content=row.content,
        tool_calls=[
            ToolCallRecord(
                tool_use_id=call.tool_use_id,
                name=call.name,
                input=call.input,
                output=call.output,
                is_error=call.is_error,
                started_at=call.started_at,
                finished_at=call.finished_at,
            )
            for call in row.tool_calls
        ],
    )


def _columns(record: MessageRecord) -> dict[str, Any]:
    """The columns of a message row that a save sets (its tool calls aside)."""
    return {
        "text": record.text,
        "status": record.status,
        "thinking": record.thinking,
        "model": record.model,
        "input_tokens": record.input_tokens,
        "output_tokens": record.output_tokens,
        "cache_read_tokens": record.cache_read_tokens,
        "cache_creation_tokens": record.cache_creation_tokens,
        "stop_reason": record.stop_reason,
        "context_tokens": record.context_tokens,
        "client_address": record.client_address,
        "reply_to": record.reply_to,
        "seq_start": record.seq_start,
        "seq_end": record.seq_end,
        "warning": record.warning,
        "error": record.error,
        "content": record.content,
        "updated_at": utcnow(),
    }


def _new_row(record: MessageRecord) -> dict[str, Any]:
    """Every column of a new message row (its tool calls aside)."""
    return _columns(record) | {
        "id": record.id,
        "chat_id": record.chat_id,
        "role": record.role,
        "client_message_id": record.client_message_id,
        "created_at": record.created_at,
    }


def _sent_by(owner_id: Any, client_message_id: Any) -> Select[str]:
    """The ids of the user messages an owner sent with this clientMessageId (values or bound
    parameters)."""
    return (
        select(Message.id)
        .join(Chat, Chat.id == Message.chat_id)
        .where(
            Chat.owner_id == owner_id,
            Message.client_message_id == client_message_id,
            Message.role == "user",
        )
    )


# The statements of a message's way to its first token, built once: building one costs more
# CPU than the database takes to run it. Their values are bound parameters.
_MESSAGES = cast(Table, Message.__table__)
_CHATS = cast(Table, Chat.__table__)
_NEW_ROW_COLUMNS = list(
    _new_row(MessageRecord(id="", chat_id="", role="user", seq_start=0, seq_end=0))
)
# One statement is the idempotency lookup and the insert: it inserts nothing when the owner
# sent this clientMessageId before. Its parameters are the row's columns prefixed with "new_"
# and "sender" (no parameter may be named after a column of either table: in an UPDATE,
# SQLAlchemy takes such a parameter for one more column to set).
_INSERT_USER_MESSAGE = insert(_MESSAGES).from_select(
    _NEW_ROW_COLUMNS,
    select(
        *(bindparam(f"new_{name}", type_=_MESSAGES.c[name].type) for name in _NEW_ROW_COLUMNS)
    ).where(~exists(_sent_by(bindparam("sender"), bindparam("new_client_message_id")))),
)

_NEW_USER_MESSAGE = _INSERT_USER_MESSAGE.returning(_MESSAGES.c.id)
_FIND_SENT = _sent_by(bindparam("owner_id"), bindparam("client_message_id")).limit(1)
_CHAT_COLUMNS = (
    "id",
    "owner_id",
    "title",
    "persona",
    "model",
    "last_seq",
    "lease_fence",
    "created_by",
    "post_slug",
    "created_at",
    "updated_at",
)
_INSERT_CHAT = insert(_CHATS).values(
    {name: bindparam(f"new_{name}", type_=_CHATS.c[name].type) for name in _CHAT_COLUMNS}
)
# On PostgreSQL, the chat and its anonymous owner's row (unless it exists) are one statement:
# one round trip fewer on a new chat's way to its first token. (The chat's foreign key is
# checked at the statement's end, when the owner's row is there.)
_INSERT_CHAT_AND_OWNER = _INSERT_CHAT.add_cte(new_user_statement("postgresql").cte("new_user"))


@functools.cache
def _touch_chat(reserve: bool, model: bool, fence: bool, *, returning: bool = False) -> Update:
    """The update of a chat a user message's save makes: its activity time, and its seq
    reservation (`reserve`), model and fencing token (a `fence`: only if no higher token
    saved) when those are given, `returning` the chat's id if asked. Bound: chat_id, now,
    and reserve, chat_model, fence."""
    chat = _CHATS
    values: dict[str, Any] = {"updated_at": bindparam("now", type_=chat.c.updated_at.type)}
    statement = update(chat).where(chat.c.id == bindparam("chat_id"))
    if reserve:
        upto = bindparam("reserve", type_=Integer)
        values["last_seq"] = case((chat.c.last_seq < upto, upto), else_=chat.c.last_seq)
    if model:
        values["model"] = bindparam("chat_model", type_=chat.c.model.type)
    if fence:
        token = bindparam("fence", type_=Integer)
        statement = statement.where(chat.c.lease_fence <= token)
        values["lease_fence"] = token
    statement = statement.values(values)
    return statement.returning(chat.c.id) if returning else statement


@functools.cache
def _save_user_message(reserve: bool, model: bool, fence: bool) -> Select[Any]:
    """On PostgreSQL, the insert and the chat's update in one statement (one round trip to
    the database fewer): how many messages it inserted (0: sent before) and how many chats it
    updated (none when nothing was inserted, or when a higher token saved to the chat)."""
    inserted = _NEW_USER_MESSAGE.cte("inserted")
    touched = (
        _touch_chat(reserve, model, fence)
        .where(exists(select(inserted.c.id)))
        .returning(_CHATS.c.id)
        .cte("touched")
    )
    return select(
        select(func.count()).select_from(inserted).scalar_subquery(),
        select(func.count()).select_from(touched).scalar_subquery(),
    )


# A message's save (`ChatStore.save_message`: an answer, partial or final), built once: the
# ORM's load, flush and identity map cost several times the statements' own time at every
# turn's end. Its parameters are the row's columns prefixed with "new_", and "message_id".
_SAVED_COLUMNS = list(
    _columns(MessageRecord(id="", chat_id="", role="user", seq_start=0, seq_end=0))
)
_UPDATE_SAVED_MESSAGE = (
    update(_MESSAGES)
    .where(_MESSAGES.c.id == bindparam("message_id"))
    .values(
        {name: bindparam(f"new_{name}", type_=_MESSAGES.c[name].type) for name in _SAVED_COLUMNS}
    )
)
_INSERT_SAVED_MESSAGE = insert(_MESSAGES).values(
    {name: bindparam(f"new_{name}", type_=_MESSAGES.c[name].type) for name in _NEW_ROW_COLUMNS}
)
_TOOL_CALLS = cast(Table, ToolCall.__table__)
_DELETE_TOOL_CALLS = delete(_TOOL_CALLS).where(_TOOL_CALLS.c.message_id == bindparam("message_id"))
_TOUCH_CHAT = _touch_chat(reserve=False, model=False, fence=False)
_TOUCH_FENCED_CHAT = _touch_chat(reserve=False, model=False, fence=True)


async def advance_fence(session: Any, chat_id: str, fence: int, **values: Any) -> None:
    """Within a write's transaction: advance the chat's fencing token to `fence` (and set
    `values`), or raise StaleOwner if a higher token saved to the chat. The same statement
    checks the token and advances it: no extra round trip; refused, the whole write rolls
    back. Its row lock orders the write with a new owner's `claim`."""
    result = await session.execute(
        update(Chat)
        .where(Chat.id == chat_id, Chat.lease_fence <= fence)
        .values(lease_fence=fence, **values)
    )
    if not getattr(result, "rowcount", 0):
        raise StaleOwner(chat_id)


def _tool_call_columns(record: MessageRecord) -> list[dict[str, Any]]:
    """The rows of a message's tool calls, in call order."""
    return [
        {
            "position": position,
            "tool_use_id": call.tool_use_id,
            "name": call.name,
            "input": call.input,
            "output": call.output,
            "is_error": call.is_error,
            "started_at": call.started_at,
            "finished_at": call.finished_at,
        }
        for position, call in enumerate(record.tool_calls)
    ]


def like_escape(text: str) -> str:
    """Text for a LIKE pattern that matches it literally (`%`, `_` and `\\` escaped with
    `\\`)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def conversation_order(messages: list[MessageRecord]) -> list[MessageRecord]:
    """Order a transcript as a conversation: each answer right after the message it answers."""
    by_seq = sorted(messages, key=lambda message: message.seq_start)
    replies: dict[str, list[MessageRecord]] = {}
    for message in by_seq:
        if message.reply_to is not None:
            replies.setdefault(message.reply_to, []).append(message)
    known = {message.id for message in by_seq}
    ordered: list[MessageRecord] = []
    for message in by_seq:
        if message.reply_to is not None and message.reply_to in known:
            continue
        ordered.append(message)
        ordered.extend(replies.get(message.id, []))
    return ordered


class ChatStore:
    """Reads and writes chats and their transcripts."""

    def __init__(self, db: Database) -> None:
        self.db = db

    @runs_to_completion
    async def create_chat(self, chat: ChatRecord) -> ChatRecord:
        """Store a new chat (and its anonymous owner's row, the first time)."""
        values = {f"new_{name}": getattr(chat, name) for name in _CHAT_COLUMNS}
        async with self.db.transaction() as connection:
            if self.db.is_sqlite:
                await ensure_user(self.db, connection, chat.owner_id)
                await self.db.run_prepared(connection, _INSERT_CHAT, values)
            else:
                values |= {"user_id": chat.owner_id, "now": utcnow()}
                await connection.execute(_INSERT_CHAT_AND_OWNER, values)
        return chat

    @runs_to_completion
    async def get_chat(self, chat_id: str) -> ChatRecord | None:
        """A chat by id, whoever owns it."""
        async with self.db.session() as session:
            row = await session.get(Chat, chat_id)
            return None if row is None else _chat_record(row)

    @runs_to_completion
    async def list_chats(self, owner_id: str) -> list[ChatRecord]:
        """A visitor's chats, most recently active first."""
        async with self.db.session() as session:
            rows = await session.scalars(
                select(Chat)
                .where(Chat.owner_id == owner_id)
                .order_by(Chat.updated_at.desc(), Chat.id)
            )
            return [_chat_record(row) for row in rows]

    @runs_to_completion
    async def search_chats(
        self, owner_id: str, query: str, limit: int
    ) -> list[tuple[ChatRecord, str | None]]:
        """A visitor's chats whose title or a message (not a superseded one) contains
        `query`, ignoring case (ASCII case only on SQLite), most recently active first; each
        with the text of its first matching message, if a message matched."""
        pattern = f"%{like_escape(query)}%"
        found = Message.text.ilike(pattern, escape="\\")
        in_messages = (
            select(Message.id)
            .where(Message.chat_id == Chat.id, Message.superseded_by.is_(None), found)
            .exists()
        )
        async with self.db.session() as session:
            rows = list(
                await session.scalars(
                    select(Chat)
                    .where(
                        Chat.owner_id == owner_id,
                        Chat.title.ilike(pattern, escape="\\") | in_messages,
                    )
                    .order_by(Chat.updated_at.desc(), Chat.id)
                    .limit(limit)
                )
            )
            if not rows:
                return []
            texts: dict[str, str] = {}
            matches = await session.execute(
                select(Message.chat_id, Message.text)
                .where(
                    Message.chat_id.in_([row.id for row in rows]),
                    Message.superseded_by.is_(None),
                    found,
                )
                .order_by(Message.chat_id, Message.seq_start)
            )
            for chat_id, text in matches:
                texts.setdefault(chat_id, text)
            return [(_chat_record(row), texts.get(row.id)) for row in rows]

    @runs_to_completion
    async def delete_chat(self, chat_id: str) -> None:
        """Delete a chat with its whole transcript, the agent's copy included."""
        async with self.db.session() as session:
            # The agent's transcripts are keyed by session id, which is the chat id.
            await session.execute(
                delete(AgentTranscriptEntry).where(AgentTranscriptEntry.session_id == chat_id)
            )
            await session.execute(delete(Chat).where(Chat.id == chat_id))

    @runs_to_completion
    async def update_chat(self, chat_id: str, **values: Any) -> None:
        """Change some of a chat's columns (model, title, ...)."""
        async with self.db.session() as session:
            await session.execute(update(Chat).where(Chat.id == chat_id).values(**values))

    @runs_to_completion
    async def retitle(self, chat_id: str, old: str, new: str) -> bool:
        """Give a chat a new title if it still has `old` (a rename meanwhile wins); whether it
        did. The chat's activity time stays."""
        async with self.db.session() as session:
            result = await session.execute(
                update(Chat).where(Chat.id == chat_id, Chat.title == old).values(title=new)
            )
            return bool(getattr(result, "rowcount", 0))

    @runs_to_completion
    async def add_side_tokens(self, message_id: str, tokens: int) -> None:
        """Count tokens spent for an answer beside its turn (its chat's title)."""
        async with self.db.session() as session:
            await session.execute(
                update(Message)
                .where(Message.id == message_id)
                .values(side_tokens=func.coalesce(Message.side_tokens, 0) + tokens)
            )

    @runs_to_completion
    async def reserve_seq(self, chat_id: str, upto: int) -> None:
        """Record that seqs up to `upto` may be in use, so none is reused after a crash."""
        async with self.db.session() as session:
            await session.execute(
                update(Chat)
                .where(Chat.id == chat_id)
                .values(last_seq=case((Chat.last_seq < upto, upto), else_=Chat.last_seq))
            )

    @runs_to_completion
    async def settle_seq(self, chat_id: str, reserved: int, published: int) -> bool:
        """Give back a reservation's unused seqs: `last_seq` goes back to `published`, but
        only if it is still `reserved` (nobody reserved more since). Returns whether it did."""
        async with self.db.session() as session:
            result = await session.execute(
                update(Chat)
                .where(Chat.id == chat_id, Chat.last_seq == reserved)
                .values(last_seq=published)
            )
            return bool(getattr(result, "rowcount", 0))

    @runs_to_completion
    async def claim(self, chat_id: str, fence: int) -> None:
        """Advance the chat's token to `fence` (a new owner's, `cluster/`): from here on a
        save with a lower one is refused, so what the chat's rows hold now is all an older
        owner ever saves. StaleOwner if a higher token saved already. Its activity time
        stays: taking a chat over is not using it."""
        async with self.db.session() as session:
            await advance_fence(session, chat_id, fence)

    @runs_to_completion
    async def find_client_message(
        self, owner_id: str, client_message_id: str
    ) -> MessageRecord | None:
        """The user message a visitor sent with this clientMessageId, in any of its chats."""
        # Every new chat's message is looked up first, and almost never found: the lookup
        # is a statement built once, read outside a transaction (a read needs none, and on
        # PostgreSQL BEGIN and COMMIT are two round trips more); only a resend loads the
        # whole message.
        async with self.db.reading() as connection:
            params = {"owner_id": owner_id, "client_message_id": client_message_id}
            rows = await self.db.run_prepared(connection, _FIND_SENT, params)
        if not rows:
            return None
        found: str = rows[0][0]
        async with self.db.session() as session:
            return await self._sent_message(session, found)

    async def _sent_before(
        self, session: AsyncSession, owner_id: str, client_message_id: str
    ) -> MessageRecord | None:
        found = await session.scalar(_sent_by(owner_id, client_message_id).limit(1))
        return None if found is None else await self._sent_message(session, found)

    @staticmethod
    async def _sent_message(session: AsyncSession, message_id: str) -> MessageRecord | None:
        """A sent user message, with the ids of the messages it replaced."""
        row = await session.get(Message, message_id, options=[selectinload(Message.tool_calls)])
        if row is None:
            return None
        record = _message_record(row)
        replaced = await session.scalars(
            select(Message.id)
            .where(Message.chat_id == row.chat_id, Message.superseded_by == row.id)
            .order_by(Message.seq_start)
        )
        record.replaces = list(replaced)
        return record

    @runs_to_completion
    async def add_user_message(
        self,
        record: MessageRecord,
        *,
        owner_id: str,
        admit: Callable[[], Awaitable[None]] | None = None,
        reserve: int | None = None,
        model: ModelAlias | None = None,
        fence: int | None = None,
    ) -> MessageRecord | None:
        """A message a reader sent, in one transaction: the message its owner already sent
        with this clientMessageId, if any, is returned and nothing is written; otherwise
        the message is inserted, `admit` is awaited (what it raises rolls everything back:
        it must not use the store), the messages it replaces are marked superseded, and its
        chat is touched, with seqs reserved up to `reserve` and its model set to `model`
        when given; with a `fence`, only if no higher token saved to the chat
        (StaleOwner). Returns None when the message was saved.

        A message's way to its first token goes through here, so it is short: the lookup
        and the insert are one statement, the chat's update another (on PostgreSQL, both are
        one), then the commit.
        """
        assert record.client_message_id is not None
        flags = (reserve is not None, model is not None, fence is not None)
        params: dict[str, Any] = {f"new_{name}": value for name, value in _new_row(record).items()}
        params |= {"sender": owner_id, "chat_id": record.chat_id, "now": utcnow()}
        for name, value in (("reserve", reserve), ("chat_model", model), ("fence", fence)):
            if value is not None:
                params[name] = value
        try:
            async with self.db.transaction() as connection:
                if connection.dialect.name == "postgresql":
                    counts = (await connection.execute(_save_user_message(*flags), params)).one()
                    inserted, touched = counts[0], counts[1]
                else:
                    # (SQLite has no INSERT inside WITH; its statements run on the driver.)
                    rows = await self.db.rows_on_driver(connection, _NEW_USER_MESSAGE, params)
                    inserted, touched = len(rows), None
                if not inserted:
                    async with self.db.sessions(bind=connection) as session:
                        return await self._sent_before(session, owner_id, record.client_message_id)
                if admit is not None:
                    await admit()
                if record.replaces:
                    await connection.execute(
                        update(Message)
                        .where(Message.chat_id == record.chat_id, Message.id.in_(record.replaces))
                        .values(superseded_by=record.id)
                    )
                if touched is None:
                    touch = _touch_chat(*flags, returning=True)
                    touched = len(await self.db.rows_on_driver(connection, touch, params))
                if not touched:
                    # (Without a fence the chat always matches: the insert needs it.)
                    raise StaleOwner(record.chat_id)
        except IntegrityError as exc:
            if _violates(exc, DUPLICATE_CLIENT_MESSAGE):
                raise DuplicateClientMessage(record.client_message_id) from None
            raise
        return None

    @runs_to_completion
    async def add_message(self, record: MessageRecord, *, fence: int | None = None) -> None:
        """Insert a new message (a user message that replaces others marks them superseded
        in the same transaction); with a `fence`, only if no higher token saved to the chat
        (StaleOwner)."""
        try:
            async with self.db.session() as session:
                await session.execute(insert(Message).values(_new_row(record)))
                if record.replaces:
                    await session.execute(
                        update(Message)
                        .where(Message.chat_id == record.chat_id, Message.id.in_(record.replaces))
                        .values(superseded_by=record.id)
                    )
                if record.tool_calls:
                    await session.execute(
                        insert(ToolCall),
                        [{"message_id": record.id, **call} for call in _tool_call_columns(record)],
                    )
                await self._touch(session, record.chat_id, fence)
        except IntegrityError as exc:
            if _violates(exc, DUPLICATE_CLIENT_MESSAGE):
                raise DuplicateClientMessage(record.client_message_id) from None
            raise

    @runs_to_completion
    async def save_message(self, record: MessageRecord, *, fence: int | None = None) -> None:
        """Insert or update a message with its tool calls (partial or final answers); with
        a `fence`, only if no higher token saved to the chat (StaleOwner)."""
        params: dict[str, Any] = {f"new_{name}": value for name, value in _new_row(record).items()}
        params |= {"message_id": record.id, "chat_id": record.chat_id, "now": utcnow()}
        async with self.db.transaction() as connection:
            updated = await connection.execute(_UPDATE_SAVED_MESSAGE, params)
            if getattr(updated, "rowcount", 0):
                # Its tool calls are replaced, as the answer's text is.
                await connection.execute(_DELETE_TOOL_CALLS, params)
            else:
                await connection.execute(_INSERT_SAVED_MESSAGE, params)
            if record.tool_calls:
                await connection.execute(
                    insert(_TOOL_CALLS),
                    [{"message_id": record.id, **call} for call in _tool_call_columns(record)],
                )
            if fence is None:
                await connection.execute(_TOUCH_CHAT, params)
            else:
                touched = await connection.execute(_TOUCH_FENCED_CHAT, params | {"fence": fence})
                if not getattr(touched, "rowcount", 0):
                    raise StaleOwner(record.chat_id)

    @runs_to_completion
    async def save_partial_answers(
        self, records: Sequence[MessageRecord], fences: Mapping[str, int] | None = None
    ) -> None:
        """Update running answers already saved once, all in one statement (executemany):
        their text, thinking and seqs. Their rows and tool calls are `save_message`'s. An
        answer with a token in `fences` (its id: its owner's, with several instances) is
        updated only while no higher token saved to its chat; otherwise it is left as is."""
        if not records:
            return
        fences = fences or {}
        now = utcnow()
        plain: list[dict[str, Any]] = []
        fenced: list[dict[str, Any]] = []
        for record in records:
            row = {
                "answer_id": record.id,
                "text": record.text,
                "thinking": record.thinking,
                "seq_start": record.seq_start,
                "seq_end": record.seq_end,
                "updated_at": now,
            }
            fence = fences.get(record.id)
            if fence is None:
                plain.append(row)
            else:
                fenced.append({**row, "fence": fence})
        # One Core statement with a parameter set per answer (executemany). An answer whose
        # chat was deleted meanwhile, or (fenced) taken over, matches no row, and holds up
        # none of the others.
        messages = cast(Table, Message.__table__)
        chats = cast(Table, Chat.__table__)
        statement = (
            update(messages)
            .where(messages.c.id == bindparam("answer_id"))
            .values(
                text=bindparam("text"),
                thinking=bindparam("thinking"),
                seq_start=bindparam("seq_start"),
                seq_end=bindparam("seq_end"),
                updated_at=bindparam("updated_at"),
            )
        )
        owner_fence = (
            select(chats.c.lease_fence).where(chats.c.id == messages.c.chat_id).scalar_subquery()
        )
        async with self.db.session() as session:
            connection = await session.connection()
            if plain:
                await connection.execute(statement, plain)
            if fenced:
                await connection.execute(statement.where(owner_fence <= bindparam("fence")), fenced)

    @runs_to_completion
    async def get_messages(self, chat_id: str) -> list[MessageRecord]:
        """A chat's transcript in conversation order, without superseded messages (each
        message that replaced some lists them in `replaces`)."""
        async with self.db.session() as session:
            rows = await session.scalars(
                select(Message)
                .where(Message.chat_id == chat_id)
                .order_by(Message.seq_start)
                .options(selectinload(Message.tool_calls))
            )
            live: list[MessageRecord] = []
            replaced: dict[str, list[str]] = {}
            for row in rows:
                if row.superseded_by is None:
                    live.append(_message_record(row))
                else:
                    replaced.setdefault(row.superseded_by, []).append(row.id)
            for record in live:
                record.replaces = replaced.get(record.id, [])
            return conversation_order(live)

    @runs_to_completion
    async def mark_interrupted_turns(self) -> int:
        """At start-up: answers that were streaming when the server died become incomplete."""
        async with self.db.session() as session:
            result = await session.execute(
                update(Message)
                .where(Message.status == STREAMING)
                .values(status="incomplete", updated_at=utcnow())
            )
        return int(result.rowcount)  # type: ignore[attr-defined]

    @runs_to_completion
    async def streaming_answers(self) -> list[tuple[str, str]]:
        """The answers still marked streaming: (message id, chat id) pairs."""
        async with self.db.session() as session:
            rows = await session.execute(
                select(Message.id, Message.chat_id).where(Message.status == STREAMING)
            )
            return [(message_id, chat_id) for message_id, chat_id in rows]

    @runs_to_completion
    async def mark_incomplete(self, message_ids: list[str]) -> int:
        """These answers, if still streaming, were cut off: they become incomplete."""
        if not message_ids:
            return 0
        async with self.db.session() as session:
            result = await session.execute(
                update(Message)
                .where(Message.id.in_(message_ids), Message.status == STREAMING)
                .values(status="incomplete", updated_at=utcnow())
            )
        return int(result.rowcount)  # type: ignore[attr-defined]

    @runs_to_completion
    async def unanswered(self, chat_id: str | None = None) -> list[Waiting]:
        """User messages with no answer at all (not even a stopped or cut one): those that
        were waiting in a chat's queue when the server stopped. By chat, in order; only
        one chat's if `chat_id` is given."""
        answer = aliased(Message)
        query = (
            select(Message, User.email.is_not(None))
            .join(Chat, Chat.id == Message.chat_id)
            .join(User, User.id == Chat.owner_id)
            .where(
                Message.role == "user",
                Message.superseded_by.is_(None),
                ~exists().where(answer.reply_to == Message.id),
            )
        )
        if chat_id is not None:
            query = query.where(Message.chat_id == chat_id)
        async with self.db.session() as session:
            rows = await session.execute(
                query.order_by(Message.chat_id, Message.seq_start).options(
                    selectinload(Message.tool_calls)
                )
            )
            return [Waiting(_message_record(row), bool(registered)) for row, registered in rows]

    @staticmethod
    async def _touch(session: Any, chat_id: str, fence: int | None = None) -> None:
        if fence is None:
            await session.execute(
                update(Chat).where(Chat.id == chat_id).values(updated_at=utcnow())
            )
            return
        await advance_fence(session, chat_id, fence, updated_at=utcnow())

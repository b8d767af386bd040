"""The database schema, as SQLAlchemy ORM tables. Alembic migrations mirror it exactly."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend (SQLite forgets the zone otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    """The current time, timezone-aware."""
    return datetime.now(UTC)


# Stable constraint names keep migrations identical on SQLite and PostgreSQL.
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class Base(DeclarativeBase):
    """Declarative base bound to the shared metadata."""

    metadata = metadata


class User(Base):
    """A visitor that owns chats: anonymous (no email) or a registered account."""

    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    email: Mapped[str | None] = mapped_column(String(320), unique=True)
    password_hash: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class LoginSession(Base):
    """A signed-in browser. The cookie carries the token; only its hash is stored."""

    __tablename__ = "login_sessions"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Chat(Base):
    """A conversation between one visitor and the assistant."""

    __tablename__ = "chats"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    owner_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    title: Mapped[str] = mapped_column(String(200))
    persona: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(16))
    # The highest seq ever handed out for this chat (or reserved ahead of use), so that a
    # seq is never reused, even after a crash.
    last_seq: Mapped[int] = mapped_column(Integer, default=0)
    # With several instances: the fencing token of the last instance that saved to this
    # chat. A save with a lower token (an owner presumed dead) is refused.
    lease_fence: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The clientMessageId of the `chat` message that created this chat: a resend of it
    # gets the original `chat_created` again.
    created_by: Mapped[str | None] = mapped_column(String(64))
    # The post a chat was started from ("Ask about this post"), by slug.
    post_slug: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    messages: Mapped[list[Message]] = relationship(
        back_populates="chat",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="Message.seq_start",
    )

    __table_args__ = (
        Index("ix_chats_owner_updated", "owner_id", "updated_at"),
        # One clientMessageId creates one chat, even sent to two instances at once.
        Index("uq_chats_owner_created_by", "owner_id", "created_by", unique=True),
    )


class Message(Base):
    """One user message or one assistant answer (with its thinking and tool calls)."""

    __tablename__ = "messages"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    chat_id: Mapped[str] = mapped_column(ForeignKey("chats.id", ondelete="CASCADE"))
    role: Mapped[str] = mapped_column(String(16))
    text: Mapped[str] = mapped_column(Text, default="")
    thinking: Mapped[str | None] = mapped_column(Text)
    # complete | stopped | max_turns | error | incomplete (a turn cut off by a crash,
    # or still running).
    status: Mapped[str] = mapped_column(String(16), default="complete")
    model: Mapped[str | None] = mapped_column(String(100))
    # Input tokens include the cached ones, also counted apart.
    input_tokens: Mapped[int | None] = mapped_column(Integer)
    output_tokens: Mapped[int | None] = mapped_column(Integer)
    cache_read_tokens: Mapped[int | None] = mapped_column(Integer)
    cache_creation_tokens: Mapped[int | None] = mapped_column(Integer)
    # The provider's reason for ending the answer.
    stop_reason: Mapped[str | None] = mapped_column(String(32))
    # On an answer: the input tokens of its last model request (how long the chat's
    # context has grown).
    context_tokens: Mapped[int | None] = mapped_column(Integer)
    # The client address the message (or, on an answer, its question) came from: per-address
    # budgets and `blogchat usage` count it. (The visitor is the chat's owner.)
    client_address: Mapped[str | None] = mapped_column(String(64))
    client_message_id: Mapped[str | None] = mapped_column(String(64))
    # On an answer: the user message it answers. Queued user messages are accepted (and
    # get their seq) while an earlier answer still streams, so seq order alone does not
    # give the conversation's order.
    reply_to: Mapped[str | None] = mapped_column(String(36))
    # Set when a regenerated or edited question replaced this message: the user message
    # that did. Such a message stays (its tokens were spent) but leaves the conversation.
    superseded_by: Mapped[str | None] = mapped_column(String(36))
    # On an answer: tokens of requests made for it beside the turn (its chat's generated
    # title). They count in the visitor's usage, not in the answer's own.
    side_tokens: Mapped[int | None] = mapped_column(Integer)
    # The seq of the message's first and last transcript event.
    seq_start: Mapped[int] = mapped_column(Integer)
    seq_end: Mapped[int] = mapped_column(Integer)
    warning: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # On an answer the Messages engine wrote: the turn's messages exactly as the provider
    # saw them (thinking blocks with their signatures, tool calls and their results), in
    # the API's shape, so the next turn sends the conversation as it was.
    content: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)

    chat: Mapped[Chat] = relationship(back_populates="messages")
    tool_calls: Mapped[list[ToolCall]] = relationship(
        back_populates="message",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="ToolCall.position",
    )

    __table_args__ = (
        Index("ix_messages_chat_seq", "chat_id", "seq_start"),
        Index("ix_messages_client_message_id", "client_message_id"),
        Index("ix_messages_address_created", "client_address", "created_at"),
        Index("ix_messages_role_created", "role", "created_at"),
        UniqueConstraint("chat_id", "client_message_id", name="uq_messages_chat_client_id"),
    )


class ToolCall(Base):
    """A tool the agent called while writing an answer, in call order."""

    __tablename__ = "tool_calls"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    message_id: Mapped[str] = mapped_column(
        ForeignKey("messages.id", ondelete="CASCADE"), index=True
    )
    position: Mapped[int] = mapped_column(Integer)
    tool_use_id: Mapped[str] = mapped_column(String(128))
    name: Mapped[str] = mapped_column(String(128))
    input: Mapped[dict[str, Any]] = mapped_column(JSON)
    output: Mapped[str | None] = mapped_column(Text)
    is_error: Mapped[bool] = mapped_column(Boolean, default=False)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    message: Mapped[Message] = relationship(back_populates="tool_calls")


class AgentTranscriptEntry(Base):
    """One line of the agent SDK's session transcript, kept so a chat can resume its context.

    Keys follow the SDK's SessionStore: `project_key` (derived from the agent's working
    directory), `session_id` (the chat id) and `subpath` ("" for the main transcript).
    """

    __tablename__ = "agent_transcripts"

    # Append order: entries are loaded back in the order they were written.
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    project_key: Mapped[str] = mapped_column(String(255))
    session_id: Mapped[str] = mapped_column(String(255))
    subpath: Mapped[str] = mapped_column(String(255), default="")
    # The entry's own uuid, when it has one: a batch delivered twice is stored once.
    uuid: Mapped[str | None] = mapped_column(String(64))
    entry: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (
        Index("ix_agent_transcripts_key", "project_key", "session_id", "subpath", "id"),
        Index("ix_agent_transcripts_session_id", "session_id"),
        UniqueConstraint(
            "project_key", "session_id", "subpath", "uuid", name="uq_agent_transcripts_uuid"
        ),
    )

"""What the assistant's turns have cost: tokens per visitor and per client address, from the
usage saved with each answer. Budgets read it (quotas.py), and so does `blogchat usage`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import func, select

from blogchat.store.database import Database, runs_to_completion
from blogchat.store.tables import Chat, Message


@dataclass(frozen=True)
class Spent:
    """Turns and tokens (input and output) of one visitor, address or chat."""

    key: str
    turns: int
    tokens: int
    label: str = ""


@dataclass(frozen=True)
class UsageReport:
    """Who spent what since a moment, the most expensive first."""

    since: datetime
    total: Spent
    by_visitor: list[Spent]
    by_address: list[Spent]
    costliest_chats: list[Spent]


def _tokens() -> Any:
    return (
        func.coalesce(Message.input_tokens, 0)
        + func.coalesce(Message.output_tokens, 0)
        + func.coalesce(Message.side_tokens, 0)
    )


class UsageStore:
    """Token usage read from the saved answers."""

    def __init__(self, db: Database) -> None:
        self.db = db

    @runs_to_completion
    async def spending(
        self, kind: Literal["visitor", "address"], key: str, since: float
    ) -> list[tuple[float, int]]:
        """(when, tokens) of each answer of a visitor's chats, or of an address's questions,
        since `since` (epoch seconds), oldest first."""
        query = select(Message.created_at, _tokens()).where(
            Message.role == "assistant",
            Message.created_at >= datetime.fromtimestamp(since, UTC),
        )
        if kind == "visitor":
            query = query.join(Chat, Chat.id == Message.chat_id).where(Chat.owner_id == key)
        else:
            query = query.where(Message.client_address == key)
        async with self.db.session() as session:
            rows = await session.execute(query.order_by(Message.created_at))
            return [(at.timestamp(), int(tokens)) for at, tokens in rows]

    @runs_to_completion
    async def report(self, since: datetime, *, top: int = 10) -> UsageReport:
        """Turns and tokens since `since`: in all, by visitor, by address, by chat."""
        answers = (
            select(
                Message.chat_id,
                Chat.owner_id,
                Chat.title,
                Message.client_address,
                _tokens().label("tokens"),
            )
            .join(Chat, Chat.id == Message.chat_id)
            .where(Message.role == "assistant", Message.created_at >= since)
            .subquery()
        )

        def grouped(column: Any, *, label: Any = None) -> Any:
            columns = [column, func.count(), func.sum(answers.c.tokens)]
            if label is not None:
                columns.append(func.max(label))
            return (
                select(*columns)
                .group_by(column)
                .order_by(func.sum(answers.c.tokens).desc(), column)
                .limit(top)
            )

        async with self.db.session() as session:
            turns, tokens = (
                await session.execute(select(func.count(), func.sum(answers.c.tokens)))
            ).one()
            visitors = (await session.execute(grouped(answers.c.owner_id))).all()
            addresses = (await session.execute(grouped(answers.c.client_address))).all()
            chats = (await session.execute(grouped(answers.c.chat_id, label=answers.c.title))).all()
        return UsageReport(
            since=since,
            total=Spent("all", int(turns or 0), int(tokens or 0)),
            by_visitor=[Spent(str(key), int(n), int(t or 0)) for key, n, t in visitors],
            by_address=[
                Spent(str(key or "unknown"), int(n), int(t or 0)) for key, n, t in addresses
            ],
            costliest_chats=[
                Spent(str(key), int(n), int(t or 0), label=str(title)) for key, n, t, title in chats
            ],
        )

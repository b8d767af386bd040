"""The database: visitors, accounts, chats and transcripts."""

from __future__ import annotations

from blogchat.store.accounts import Account, AccountStore, EmailTaken
from blogchat.store.chats import (
    STREAMING,
    ChatRecord,
    ChatStore,
    DuplicateClientMessage,
    MessageRecord,
    ToolCallRecord,
)
from blogchat.store.database import Database
from blogchat.store.usage import UsageStore

__all__ = [
    "STREAMING",
    "Account",
    "AccountStore",
    "ChatRecord",
    "ChatStore",
    "Database",
    "DuplicateClientMessage",
    "EmailTaken",
    "MessageRecord",
    "Store",
    "ToolCallRecord",
    "UsageStore",
]


class Store:
    """Every table behind one object: `store.accounts` and `store.chats`."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.accounts = AccountStore(db)
        self.chats = ChatStore(db)
        self.usage = UsageStore(db)

    @classmethod
    async def open(
        cls, url: str, *, schema: str | None = None, idle_transaction_seconds: float | None = None
    ) -> Store:
        """Connect and apply any pending migrations."""
        db = Database(url, schema=schema, idle_transaction_seconds=idle_transaction_seconds)
        await db.migrate()
        return cls(db)

    async def close(self) -> None:
        """Release the connection pool."""
        await self.db.dispose()

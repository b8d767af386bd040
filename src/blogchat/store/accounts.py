"""Users and signed-in browsers."""

from __future__ import annotations

import functools
import hashlib
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Insert, bindparam, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from blogchat.store.database import Database, runs_to_completion
from blogchat.store.tables import Chat, LoginSession, User, UTCDateTime, utcnow


class EmailTaken(Exception):
    """An account with this email already exists."""


@dataclass(frozen=True)
class Account:
    """A registered user."""

    id: str
    email: str
    password_hash: str


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@functools.cache
def new_user_statement(dialect: str) -> Insert:
    """Insert an anonymous visitor's row unless it exists (bound: user_id, now)."""
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    values = {"id": bindparam("user_id"), "created_at": bindparam("now", type_=UTCDateTime)}
    return insert(User).values(values).on_conflict_do_nothing()


async def ensure_user(db: Database, connection: AsyncConnection, user_id: str) -> None:
    """Create the row of an anonymous visitor the first time it owns something."""
    statement = new_user_statement(connection.dialect.name)
    await db.run_prepared(connection, statement, {"user_id": user_id, "now": utcnow()})


class AccountStore:
    """Registration, login sessions and the hand-over of anonymous chats."""

    def __init__(self, db: Database) -> None:
        self.db = db

    @runs_to_completion
    async def create_account(self, user_id: str, email: str, password_hash: str) -> Account:
        """Register a new account; raise EmailTaken if the email is in use."""
        try:
            async with self.db.session() as session:
                session.add(User(id=user_id, email=email, password_hash=password_hash))
        except IntegrityError:
            raise EmailTaken(email) from None
        return Account(user_id, email, password_hash)

    @runs_to_completion
    async def find_account(self, email: str) -> Account | None:
        """The account registered with this email, if any."""
        async with self.db.session() as session:
            user = await session.scalar(select(User).where(User.email == email))
        if user is None or user.email is None or user.password_hash is None:
            return None
        return Account(user.id, user.email, user.password_hash)

    @runs_to_completion
    async def set_password_hash(self, user_id: str, password_hash: str) -> None:
        """Replace a stored hash (after argon2 asks for a rehash)."""
        async with self.db.session() as session:
            await session.execute(
                update(User).where(User.id == user_id).values(password_hash=password_hash)
            )

    @runs_to_completion
    async def start_login(self, user_id: str, ttl: timedelta) -> str:
        """Sign a browser in: returns the token its cookie will carry."""
        token = secrets.token_urlsafe(32)
        async with self.db.session() as session:
            session.add(
                LoginSession(
                    token_hash=_token_hash(token),
                    user_id=user_id,
                    expires_at=utcnow() + ttl,
                )
            )
        return token

    @runs_to_completion
    async def resolve_login(self, user_id: str, token: str) -> Account | None:
        """The account behind a live login token, or None if it expired or was revoked."""
        async with self.db.session() as session:
            row = await session.execute(
                select(User, LoginSession.expires_at)
                .join(LoginSession, LoginSession.user_id == User.id)
                .where(LoginSession.token_hash == _token_hash(token), User.id == user_id)
            )
            found = row.first()
        if found is None:
            return None
        user, expires_at = found
        if expires_at <= utcnow() or user.email is None or user.password_hash is None:
            return None
        return Account(user.id, user.email, user.password_hash)

    @runs_to_completion
    async def end_login(self, token: str) -> None:
        """Revoke a login token (logout)."""
        async with self.db.session() as session:
            await session.execute(
                delete(LoginSession).where(LoginSession.token_hash == _token_hash(token))
            )

    @runs_to_completion
    async def transfer_chats(self, from_user: str, to_user: str) -> int:
        """Give an anonymous visitor's chats to an account; returns how many moved."""
        if from_user == to_user:
            return 0
        async with self.db.session() as session:
            anonymous = await session.scalar(
                select(User.id).where(User.id == from_user, User.email.is_(None))
            )
            if anonymous is None:
                return 0
            result = await session.execute(
                update(Chat).where(Chat.owner_id == from_user).values(owner_id=to_user)
            )
            await session.execute(delete(User).where(User.id == from_user))
        return int(result.rowcount)  # type: ignore[attr-defined]

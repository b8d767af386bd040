"""Who a visitor is: the signed session cookie, anonymous visitors, and accounts."""

from __future__ import annotations

import logging
import re
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from itsdangerous import BadSignature, URLSafeTimedSerializer

from blogchat.store import Account, EmailTaken, Store

log = logging.getLogger(__name__)

COOKIE_NAME = "blogchat_session"
# Browsers cap cookie lifetimes at 400 days; an anonymous visitor keeps its chats that long.
COOKIE_MAX_AGE = 400 * 24 * 3600
LOGIN_TTL = timedelta(days=30)
MIN_PASSWORD_LENGTH = 10

_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]+\.[^@\s]+$")


@dataclass(frozen=True)
class Visitor:
    """The person behind a browser: anonymous, or signed in to an account."""

    id: str
    anonymous: bool
    email: str | None = None
    # The login token a registered visitor's cookie carries (needed to log out).
    login_token: str | None = None


class AuthError(Exception):
    """A registration or login that cannot go through; the message is for the visitor."""

    def __init__(self, message: str, *, status: int, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.field = field


class Visitors:
    """Issues and reads session cookies, and signs visitors up, in and out."""

    def __init__(
        self,
        store: Store,
        secret: str,
        *,
        on_chats_moved: Callable[[str, str], None] | None = None,
    ) -> None:
        self.store = store
        # Live chat sessions cache their chat's owner; they must hear when chats move.
        self._on_chats_moved = on_chats_moved
        self._serializer = URLSafeTimedSerializer(secret, salt="blogchat.visitor")
        self._hasher = PasswordHasher()
        self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(16))

    # --- cookies ---------------------------------------------------------------------

    def new_anonymous(self) -> Visitor:
        """A visitor never seen before."""
        return Visitor(id=str(uuid.uuid4()), anonymous=True)

    def cookie_value(self, visitor: Visitor) -> str:
        """The signed cookie that identifies this visitor."""
        payload: dict[str, Any] = {"u": visitor.id}
        if visitor.login_token is not None:
            payload["t"] = visitor.login_token
        return self._serializer.dumps(payload)

    async def from_cookie(self, value: str | None) -> Visitor | None:
        """The visitor a cookie names, or None if it is missing, forged, expired or revoked."""
        if not value:
            return None
        try:
            payload = self._serializer.loads(value, max_age=COOKIE_MAX_AGE)
        except BadSignature:
            return None
        if not isinstance(payload, dict) or not isinstance(payload.get("u"), str):
            return None
        user_id: str = payload["u"]
        token = payload.get("t")
        if token is None:
            return Visitor(id=user_id, anonymous=True)
        if not isinstance(token, str):
            return None
        account = await self.store.accounts.resolve_login(user_id, token)
        if account is None:
            return None
        return Visitor(id=account.id, anonymous=False, email=account.email, login_token=token)

    # --- accounts --------------------------------------------------------------------

    async def register(self, current: Visitor, email: str, password: str) -> Visitor:
        """Create an account, sign this browser in, and bring its anonymous chats along."""
        email = _check_email(email)
        _check_password(password, email)
        account_id = str(uuid.uuid4())
        try:
            await self.store.accounts.create_account(account_id, email, self._hasher.hash(password))
        except EmailTaken:
            raise AuthError(
                "An account with this email already exists. Sign in instead.",
                status=409,
                field="email",
            ) from None
        return await self._sign_in(current, account_id, email)

    async def login(self, current: Visitor, email: str, password: str) -> Visitor:
        """Check a password and sign this browser in, bringing its anonymous chats along."""
        email = email.strip().lower()
        account = await self.store.accounts.find_account(email)
        if account is None:
            # Spend the same time as a real check, so timing does not tell which emails
            # have accounts.
            self._verify(Account("", email, self._dummy_hash), password)
            raise AuthError("Wrong email or password.", status=401)
        if not self._verify(account, password):
            raise AuthError("Wrong email or password.", status=401)
        if self._hasher.check_needs_rehash(account.password_hash):
            await self.store.accounts.set_password_hash(account.id, self._hasher.hash(password))
        return await self._sign_in(current, account.id, account.email)

    async def logout(self, current: Visitor) -> Visitor:
        """Revoke this browser's login; it becomes a new anonymous visitor."""
        if current.login_token is not None:
            await self.store.accounts.end_login(current.login_token)
        return self.new_anonymous()

    async def _sign_in(self, current: Visitor, account_id: str, email: str) -> Visitor:
        if current.anonymous:
            moved = await self.store.accounts.transfer_chats(current.id, account_id)
            if moved:
                log.info("moved %d anonymous chat(s) to account %s", moved, account_id)
                if self._on_chats_moved is not None:
                    self._on_chats_moved(current.id, account_id)
        elif current.login_token is not None and current.id != account_id:
            await self.store.accounts.end_login(current.login_token)
        token = await self.store.accounts.start_login(account_id, LOGIN_TTL)
        return Visitor(id=account_id, anonymous=False, email=email, login_token=token)

    def _verify(self, account: Account, password: str) -> bool:
        try:
            return self._hasher.verify(account.password_hash, password)
        except (VerificationError, InvalidHashError):
            return False


def _check_email(email: str) -> str:
    email = email.strip().lower()
    if len(email) > 320 or not _EMAIL.match(email):
        raise AuthError("That does not look like an email address.", status=422, field="email")
    return email


def _check_password(password: str, email: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AuthError(
            f"Choose a password of at least {MIN_PASSWORD_LENGTH} characters.",
            status=422,
            field="password",
        )
    if len(password) > 1024:
        raise AuthError("That password is too long.", status=422, field="password")
    if len(set(password)) < 4 or password.lower() in email:
        raise AuthError(
            "That password is too easy to guess. Mix in more different characters.",
            status=422,
            field="password",
        )

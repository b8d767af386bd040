"""Who a visitor is: the signed session cookie, anonymous visitors, and accounts."""

from __future__ import annotations

import asyncio
import logging
import math
import re
import secrets
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from itsdangerous import BadSignature, URLSafeTimedSerializer
from zxcvbn import zxcvbn

from blogchat.ratelimit import Decision, Rate, RateLimiter
from blogchat.store import Account, EmailTaken, Store

log = logging.getLogger(__name__)
_T = TypeVar("_T")

COOKIE_NAME = "blogchat_session"
# Browsers cap cookie lifetimes at 400 days; an anonymous visitor keeps its chats that long.
COOKIE_MAX_AGE = 400 * 24 * 3600
LOGIN_TTL = timedelta(days=30)
MIN_PASSWORD_LENGTH = 10
MAX_PASSWORD_LENGTH = 1024
# zxcvbn's score: 3 is "safely unguessable" (about 10^10 guesses), enough against an
# offline attack on a slow hash. It reads at most this many characters (its cost grows
# fast with length); a longer password is judged on its beginning.
MIN_PASSWORD_SCORE = 3
ZXCVBN_MAX_LENGTH = 72

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

    def __init__(
        self,
        message: str,
        *,
        status: int,
        field: str | None = None,
        retry_after: Decision | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.field = field
        # Set on a 429: when the visitor may try again.
        self.retry_after = retry_after


@dataclass(frozen=True)
class AccountLimits:
    """How often an address or an account may fail to sign in, and an address sign up."""

    login_failures_per_account: Rate
    login_failures_per_address: Rate
    registrations_per_address: Rate

    @classmethod
    def of(
        cls, failures: int, failure_window: int, signups: int, signup_window: int
    ) -> AccountLimits:
        """The three rates from the settings' numbers."""
        return cls(
            Rate("login-failures-account", failures, failure_window),
            Rate("login-failures-address", failures, failure_window),
            Rate("registrations-address", signups, signup_window),
        )


class Visitors:
    """Issues and reads session cookies, and signs visitors up, in and out."""

    def __init__(
        self,
        store: Store,
        secret: str,
        *,
        limiter: RateLimiter,
        limits: AccountLimits,
        on_chats_moved: Callable[[str, str], None] | None = None,
    ) -> None:
        self.store = store
        self.limiter = limiter
        self.limits = limits
        # Live chat sessions cache their chat's owner; they must hear when chats move.
        self._on_chats_moved = on_chats_moved
        self._serializer = URLSafeTimedSerializer(secret, salt="blogchat.visitor")
        self._hasher = PasswordHasher()
        self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(16))
        # argon2 is tens of milliseconds of CPU on several threads of its own (its lanes),
        # with the GIL released. It runs off the event loop, in one thread, so a burst of
        # sign-ins queues there instead of taking every core from the loop.
        self._hashing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="argon2")

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

    async def register(
        self, current: Visitor, email: str, password: str, *, address: str
    ) -> Visitor:
        """Create an account, sign this browser in, and bring its anonymous chats along."""
        email = _check_email(email)
        _check_password(password, email)
        # Counted once the request is well-formed, and before the database answers, so the
        # limit also bounds how many emails an address can probe with "already exists".
        signup = await self.limiter.hit(self.limits.registrations_per_address, address)
        if not signup.allowed:
            raise AuthError(
                "Too many accounts were created from your network. "
                f"Try again {_in_time(signup.retry_after)}.",
                status=429,
                retry_after=signup,
            )
        account_id = str(uuid.uuid4())
        password_hash = await self._off_loop(self._hasher.hash, password)
        try:
            await self.store.accounts.create_account(account_id, email, password_hash)
        except EmailTaken:
            raise AuthError(
                "An account with this email already exists. Sign in instead.",
                status=409,
                field="email",
            ) from None
        return await self._sign_in(current, account_id, email)

    async def login(self, current: Visitor, email: str, password: str, *, address: str) -> Visitor:
        """Check a password and sign this browser in, bringing its anonymous chats along."""
        email = email.strip().lower()
        await self._claim_login_attempt(email, address)
        account = await self.store.accounts.find_account(email)
        if account is None:
            # Spend the same time as a real check, so timing does not tell which emails
            # have accounts.
            await self._verify(Account("", email, self._dummy_hash), password)
            raise AuthError("Wrong email or password.", status=401)
        if not await self._verify(account, password):
            raise AuthError("Wrong email or password.", status=401)
        # The owner proved the password: guesses before it no longer hold the account back.
        await self.limiter.clear(self.limits.login_failures_per_account, email)
        if self._hasher.check_needs_rehash(account.password_hash):
            password_hash = await self._off_loop(self._hasher.hash, password)
            await self.store.accounts.set_password_hash(account.id, password_hash)
        return await self._sign_in(current, account.id, account.email)

    async def _claim_login_attempt(self, email: str, address: str) -> None:
        # An attempt takes its place in both windows *before* the password is checked, so
        # that parallel guesses cannot all pass a check made before any of them failed, and
        # a throttled account cannot be signed into even with the right password. A
        # successful sign-in gives the account's places back (above); the address keeps
        # its place, so an address's limit counts its sign-in attempts.
        per_account = self.limits.login_failures_per_account
        per_address = self.limits.login_failures_per_address
        for decision in (
            await self.limiter.test(per_account, email),
            await self.limiter.test(per_address, address),
        ):
            if not decision.allowed:
                raise _too_many_sign_ins(decision)
        for rate, key in ((per_account, email), (per_address, address)):
            claimed = await self.limiter.hit(rate, key)
            if not claimed.allowed:
                raise _too_many_sign_ins(claimed)

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

    async def _verify(self, account: Account, password: str) -> bool:
        try:
            return await self._off_loop(self._hasher.verify, account.password_hash, password)
        except (VerificationError, InvalidHashError):
            return False

    async def _off_loop(self, function: Callable[..., _T], *args: str) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._hashing, function, *args)

    def close(self) -> None:
        """Stop the hashing thread (at shutdown)."""
        self._hashing.shutdown(wait=False, cancel_futures=True)


def _too_many_sign_ins(refusal: Decision) -> AuthError:
    return AuthError(
        f"Too many failed sign-ins. Try again {_in_time(refusal.retry_after)}.",
        status=429,
        retry_after=refusal,
    )


def _in_time(seconds: float) -> str:
    if seconds <= 60:
        return "in a minute"
    return f"in {math.ceil(seconds / 60)} minutes"


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
    if len(password) > MAX_PASSWORD_LENGTH:
        raise AuthError("That password is too long.", status=422, field="password")
    strength = zxcvbn(
        password[:ZXCVBN_MAX_LENGTH], user_inputs=[email, email.split("@")[0], "blogchat"]
    )
    if strength["score"] < MIN_PASSWORD_SCORE:
        feedback = strength["feedback"]
        advice = " ".join([feedback["warning"], *feedback["suggestions"]]).strip()
        raise AuthError(
            "That password is too easy to guess." + (f" {advice}" if advice else ""),
            status=422,
            field="password",
        )

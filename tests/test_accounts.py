"""Visitors and accounts on a live server: the session cookie, sign-up, sign-in, sign-out."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import time_machine
from argon2 import PasswordHasher
from itsdangerous import URLSafeTimedSerializer
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from blogchat.settings import Settings
from tests.support.client import COOKIE, ChatSocket, Reader
from tests.support.server import LiveServer, running

PASSWORD = "correct horse battery"


def fresh_email() -> str:
    return f"reader-{uuid.uuid4().hex[:12]}@example.com"


def session_cookie_header(response: httpx.Response) -> str | None:
    """The Set-Cookie header that sets the session cookie, if the response has one."""
    for header in response.headers.get_list("set-cookie"):
        if header.startswith(f"{COOKIE}="):
            return header
    return None


async def get_with_cookie(server: LiveServer, path: str, cookie: str) -> httpx.Response:
    """One request carrying exactly this session cookie, as a browser replaying it would."""
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        return await client.get(path, headers={"Cookie": f"{COOKIE}={cookie}"})


async def socket_with_cookie(server: LiveServer, cookie: str) -> ChatSocket:
    """A WebSocket from the server's own origin carrying exactly this session cookie."""
    connection = await connect(
        server.ws_url,
        origin=server.url,  # type: ignore[arg-type]
        additional_headers={"Cookie": f"{COOKIE}={cookie}"},
        open_timeout=10,
    )
    return ChatSocket(connection)


async def start_chat(reader: Reader, text: str) -> str:
    """Chat for real over the WebSocket until the answer is done; returns the chat id."""
    ws = await reader.connect()
    await ws.chat(text)
    created = await ws.expect("chat_created")
    await ws.until("done", chatId=created["chatId"])
    await ws.close()
    chat_id: str = created["chatId"]
    return chat_id


async def chat_ids(reader: Reader) -> list[str]:
    response = await reader.http.get("/api/chats")
    assert response.status_code == 200, response.text
    return [chat["id"] for chat in response.json()]


async def post(reader: Reader, path: str, body: Any, **headers: str) -> httpx.Response:
    content = body if isinstance(body, str) else json.dumps(body)
    return await reader.http.post(
        path, content=content, headers={"Content-Type": "application/json", **headers}
    )


# --- the session cookie ----------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/chat", "/posts/dialing-in-espresso-at-home", "/api/me"])
async def test_a_first_visit_gets_a_signed_httponly_lax_session_cookie(
    server: LiveServer, path: str
) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await client.get(path)
        assert response.status_code == 200
        header = session_cookie_header(response)
        assert header is not None, f"{path} set no session cookie"
        attributes = {part.strip().lower() for part in header.split(";")[1:]}
        assert "httponly" in attributes
        assert "samesite=lax" in attributes
        assert "path=/" in attributes
        assert "secure" not in attributes  # plain http here; a Secure cookie would be dropped
        # The cookie is signed: its value is more than the bare visitor id.
        me = (await client.get("/api/me")).json()
        assert me["anonymous"] is True
        value = header.split(";")[0].removeprefix(f"{COOKIE}=")
        assert value != me["id"]
        assert me["id"] in URLSafeTimedSerializer("x").loads_unsafe(value)[1].values()


@pytest.mark.parametrize("path", ["/static/css/site.css", "/healthz"])
async def test_static_files_and_health_checks_set_no_cookie(server: LiveServer, path: str) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await client.get(path)
    assert response.status_code == 200
    assert session_cookie_header(response) is None


async def test_a_known_visitor_keeps_its_cookie_and_identity(reader: Reader) -> None:
    first = await reader.http.get("/api/me")
    again = await reader.http.get("/")
    assert session_cookie_header(first) is None
    assert session_cookie_header(again) is None
    assert (await reader.me())["id"] == first.json()["id"]


async def test_a_tampered_cookie_is_a_new_visitor(
    server: LiveServer, reader: Reader, other_reader: Reader
) -> None:
    victim = await other_reader.me()
    await start_chat(other_reader, "How do I dial in espresso?")
    payload, timestamp, signature = reader.cookie.split(".")
    claimed = URLSafeTimedSerializer("x").dump_payload({"u": victim["id"]}).decode()
    forged = [
        f"{claimed}.{timestamp}.{signature}",  # someone else's id under my signature
        f"{payload}.{timestamp}.{signature[:5]}{'A' if signature[5] != 'A' else 'B'}"
        f"{signature[6:]}",
        f"{payload}.{timestamp}",
        "garbage",
    ]
    for cookie in forged:
        response = await get_with_cookie(server, "/api/me", cookie)
        assert response.status_code == 200
        me = response.json()
        assert me["anonymous"] is True
        assert me["id"] not in (victim["id"], (await reader.me())["id"])
        assert session_cookie_header(response) is not None, "a new visitor needs a new cookie"
        chats = await get_with_cookie(server, "/api/chats", cookie)
        assert chats.json() == []


async def test_a_cookie_signed_with_another_key_is_a_new_visitor(
    server: LiveServer, other_reader: Reader
) -> None:
    victim = await other_reader.me()
    await start_chat(other_reader, "How warm should a sourdough starter be?")
    foreign = URLSafeTimedSerializer("not the server's key", salt="blogchat.visitor")
    response = await get_with_cookie(server, "/api/me", foreign.dumps({"u": victim["id"]}))
    assert response.json()["id"] != victim["id"]
    chats = await get_with_cookie(server, "/api/chats", foreign.dumps({"u": victim["id"]}))
    assert chats.json() == []


async def test_the_websocket_refuses_a_forged_cookie(
    server: LiveServer, other_reader: Reader
) -> None:
    victim = await other_reader.me()
    foreign = URLSafeTimedSerializer("not the server's key", salt="blogchat.visitor")
    with pytest.raises(InvalidStatus) as refused:
        await socket_with_cookie(server, foreign.dumps({"u": victim["id"]}))
    assert refused.value.response.status_code == 401


# --- registering -----------------------------------------------------------------------------


async def test_register_creates_the_account_and_signs_the_browser_in(reader: Reader) -> None:
    anonymous = await reader.me()
    email = fresh_email()
    response = await post(reader, "/api/auth/register", {"email": email, "password": PASSWORD})
    assert response.status_code == 201, response.text
    assert session_cookie_header(response) is not None
    body = response.json()
    assert body == {"id": body["id"], "anonymous": False, "email": email}
    assert body["id"] != anonymous["id"]
    assert await reader.me() == body


async def test_register_normalizes_the_email(reader: Reader) -> None:
    email = fresh_email()
    response = await post(
        reader, "/api/auth/register", {"email": f"  {email.upper()} ", "password": PASSWORD}
    )
    assert response.status_code == 201, response.text
    assert (await reader.me())["email"] == email


async def test_register_with_a_taken_email_is_a_conflict(
    reader: Reader, other_reader: Reader
) -> None:
    email = fresh_email()
    await other_reader.register(email)
    for taken in (email, email.upper()):
        response = await post(reader, "/api/auth/register", {"email": taken, "password": PASSWORD})
        assert response.status_code == 409, response.text
        assert "already exists" in response.json()["detail"]
    assert (await reader.me())["anonymous"] is True


@pytest.mark.parametrize(
    ("password", "message"),
    [
        ("short", "at least 10 characters"),
        ("", "password"),
        ("aaaaaaaaaaaaaaa", "too easy to guess"),
        ("abababababab", "too easy to guess"),
        ("x" * 2000, "password"),
        ("password12", "This is a very common password."),
        ("qwertyuiop", "This is a top-100 common password."),
        ("Password2024!", "too easy to guess"),
        ("zxcvbnmasdf", "too easy to guess"),
    ],
)
async def test_register_refuses_a_weak_password_with_a_clear_message(
    reader: Reader, password: str, message: str
) -> None:
    response = await post(
        reader, "/api/auth/register", {"email": fresh_email(), "password": password}
    )
    assert response.status_code == 422, response.text
    assert message in response.json()["detail"]
    assert (await reader.me())["anonymous"] is True


async def test_register_refuses_a_password_that_is_the_email(reader: Reader) -> None:
    email = fresh_email()
    for password in (email, email.split("@")[0], email.split("@")[0] + "2026"):
        response = await post(reader, "/api/auth/register", {"email": email, "password": password})
        assert response.status_code == 422
        assert "too easy to guess" in response.json()["detail"]


async def test_a_weak_password_is_refused_with_advice_on_a_better_one(reader: Reader) -> None:
    response = await post(
        reader, "/api/auth/register", {"email": fresh_email(), "password": "password12"}
    )
    assert response.status_code == 422
    assert response.json()["detail"] == (
        "That password is too easy to guess. This is a very common password. "
        "Add another word or two. Uncommon words are better."
    )


@pytest.mark.parametrize(
    "password",
    [
        "correct horse battery",
        "plum tractor velvet",
        "k7#Rm2!qXv9$",
        "plum tractor velvet lantern " * 4,
    ],
)
async def test_register_accepts_a_strong_password(reader: Reader, password: str) -> None:
    response = await post(
        reader, "/api/auth/register", {"email": fresh_email(), "password": password}
    )
    assert response.status_code == 201, response.text


@pytest.mark.parametrize(
    "email", ["not-an-email", "reader@localhost", "two@@example.com", "sp ace@example.com", "@x.y"]
)
async def test_register_refuses_a_malformed_email(reader: Reader, email: str) -> None:
    response = await post(reader, "/api/auth/register", {"email": email, "password": PASSWORD})
    assert response.status_code == 422, response.text
    assert "email" in response.json()["detail"]
    assert (await reader.me())["anonymous"] is True


@pytest.mark.parametrize("path", ["/api/auth/register", "/api/auth/login"])
@pytest.mark.parametrize(
    "body", ['{"email": "a@example.com", "password": ', "not json", "{'a': 1}"]
)
async def test_a_body_that_is_not_json_is_a_bad_request(
    reader: Reader, path: str, body: str
) -> None:
    response = await post(reader, path, body)
    assert response.status_code == 400, response.text
    assert response.json()["detail"] == "The request body is not valid JSON."


@pytest.mark.parametrize("path", ["/api/auth/register", "/api/auth/login"])
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"email": "a@example.com"}, "password"),
        ({"password": PASSWORD}, "email"),
        ({"email": "a@example.com", "password": PASSWORD, "remember": True}, "remember"),
        ({"email": ["a@example.com"], "password": PASSWORD}, "email"),
        ({"email": "a@example.com", "password": 1234567890123}, "password"),
    ],
)
async def test_missing_extra_or_mistyped_fields_are_named_in_a_422(
    reader: Reader, path: str, body: dict[str, Any], field: str
) -> None:
    response = await post(reader, path, body)
    assert response.status_code == 422, response.text
    error = response.json()
    assert field in error["detail"]
    assert field in [problem["field"] for problem in error["errors"]]
    assert all(problem["message"] for problem in error["errors"])


async def test_a_body_that_is_not_an_object_is_a_422(reader: Reader) -> None:
    for body in ("[]", '"text"', "null", "42"):
        response = await post(reader, "/api/auth/login", body)
        assert response.status_code == 422, response.text
        assert response.json()["errors"]


# --- signing in and out ----------------------------------------------------------------------


async def test_login_with_a_wrong_password_says_the_same_as_an_unknown_email(
    reader: Reader, other_reader: Reader
) -> None:
    email = fresh_email()
    await other_reader.register(email)
    wrong = await post(reader, "/api/auth/login", {"email": email, "password": "wrong password"})
    unknown = await post(reader, "/api/auth/login", {"email": fresh_email(), "password": PASSWORD})
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json() == unknown.json()
    assert session_cookie_header(wrong) is None
    assert (await reader.me())["anonymous"] is True


async def test_login_with_the_right_password_signs_the_browser_in(
    reader: Reader, other_reader: Reader
) -> None:
    email = fresh_email()
    account = await other_reader.register(email)
    response = await post(reader, "/api/auth/login", {"email": email.upper(), "password": PASSWORD})
    assert response.status_code == 200, response.text
    assert response.json() == account
    assert await reader.me() == account
    # The other browser stays signed in: each browser has its own login.
    assert await other_reader.me() == account


async def test_logout_revokes_the_login_even_for_a_replayed_cookie(
    server: LiveServer, reader: Reader
) -> None:
    account = await reader.register()
    signed_in_cookie = reader.cookie
    response = await post(reader, "/api/auth/logout", {})
    assert response.status_code == 200
    after = await reader.me()
    assert after["anonymous"] is True
    assert after["id"] != account["id"]
    assert "email" not in after
    assert reader.cookie != signed_in_cookie

    replayed = await get_with_cookie(server, "/api/me", signed_in_cookie)
    assert replayed.json()["anonymous"] is True
    assert replayed.json()["id"] not in (account["id"], after["id"])
    assert session_cookie_header(replayed) is not None
    with pytest.raises(InvalidStatus) as refused:
        await socket_with_cookie(server, signed_in_cookie)
    assert refused.value.response.status_code == 401


async def test_after_logout_the_browser_can_sign_in_again(reader: Reader) -> None:
    email = fresh_email()
    account = await reader.register(email)
    await post(reader, "/api/auth/logout", {})
    response = await post(reader, "/api/auth/login", {"email": email, "password": PASSWORD})
    assert response.status_code == 200
    assert await reader.me() == account


async def test_logout_of_an_anonymous_visitor_starts_a_new_anonymous_visitor(
    reader: Reader,
) -> None:
    before = await reader.me()
    response = await post(reader, "/api/auth/logout", {})
    assert response.status_code == 200
    after = await reader.me()
    assert after["anonymous"] is True
    assert after["id"] != before["id"]


# --- password hashing ---------------------------------------------------------------------------


async def test_passwords_are_hashed_and_checked_off_the_event_loop(
    server: LiveServer, reader: Reader, monkeypatch: pytest.MonkeyPatch
) -> None:
    # argon2 is tens of milliseconds of CPU: on the event loop it would stall every other
    # request and stream. A spy on the library records which thread does the work.
    threads: list[tuple[str, str]] = []

    def spy(name: str) -> Any:
        original = getattr(PasswordHasher, name)

        def recorded(self: PasswordHasher, *args: Any, **kwargs: Any) -> Any:
            threads.append((name, threading.current_thread().name))
            return original(self, *args, **kwargs)

        return recorded

    for name in ("hash", "verify"):
        monkeypatch.setattr(PasswordHasher, name, spy(name))
    email = fresh_email()
    await reader.register(email)
    await post(reader, "/api/auth/logout", {})
    assert (await sign_in(reader, email, "wrong password")).status_code == 401
    assert (await sign_in(reader, fresh_email(), PASSWORD)).status_code == 401
    assert (await sign_in(reader, email, PASSWORD)).status_code == 200
    assert [name for name, _ in threads] == ["hash", "verify", "verify", "verify"]
    loop_thread = server._thread.name
    assert all(thread != loop_thread for _, thread in threads), threads


# --- throttling --------------------------------------------------------------------------------


def from_address(address: str) -> dict[str, str]:
    """Headers of a request relayed by a proxy on loopback (trusted by default) for `address`."""
    return {"X-Forwarded-For": address}


async def sign_in(
    reader: Reader, email: str, password: str, address: str = "203.0.113.1"
) -> httpx.Response:
    return await post(
        reader, "/api/auth/login", {"email": email, "password": password}, **from_address(address)
    )


def assert_throttled(response: httpx.Response, detail: str) -> None:
    """A 429 with Retry-After, in the API's error style."""
    assert response.status_code == 429, response.text
    body = response.json()
    assert body["code"] == "rate_limited"
    assert detail in body["detail"]
    assert body["retryAfter"] == int(response.headers["Retry-After"]) > 0
    assert session_cookie_header(response) is None


async def test_after_ten_failed_sign_ins_the_account_refuses_even_the_right_password(
    reader: Reader, other_reader: Reader, clock: time_machine.Traveller
) -> None:
    email = fresh_email()
    account = await other_reader.register(email)
    for attempt in range(10):
        # From ten addresses: the account's own limit is what holds.
        wrong = await sign_in(reader, email, "wrong password", f"203.0.113.{attempt + 1}")
        assert wrong.status_code == 401, (attempt, wrong.text)
    for address in ("203.0.113.1", "198.51.100.99"):
        refused = await sign_in(reader, email, PASSWORD, address)
        assert_throttled(refused, "Too many failed sign-ins. Try again in 15 minutes.")
        assert int(refused.headers["Retry-After"]) == 900
    assert (await reader.me())["anonymous"] is True
    # Another account is not held back.
    other = fresh_email()
    await Reader.register(other_reader, other)
    assert (await sign_in(reader, other, PASSWORD, "198.51.100.7")).status_code == 200
    assert (await other_reader.me())["id"] != account["id"]


async def test_a_throttled_account_signs_in_again_once_the_window_moves(
    reader: Reader, other_reader: Reader, clock: time_machine.Traveller
) -> None:
    email = fresh_email()
    await other_reader.register(email)
    for attempt in range(10):
        await sign_in(reader, email, "wrong password", f"203.0.113.{attempt + 1}")
    clock.shift(14 * 60)
    refused = await sign_in(reader, email, PASSWORD, "198.51.100.1")
    assert_throttled(refused, "Try again in a minute.")
    assert refused.headers["Retry-After"] == "60"
    clock.shift(61)
    accepted = await sign_in(reader, email, PASSWORD, "198.51.100.1")
    assert accepted.status_code == 200, accepted.text
    assert (await reader.me())["email"] == email


async def test_after_ten_failed_sign_ins_from_one_address_it_may_try_no_account(
    reader: Reader, other_reader: Reader
) -> None:
    email = fresh_email()
    await other_reader.register(email)
    for _ in range(10):
        wrong = await sign_in(reader, fresh_email(), PASSWORD, "203.0.113.50")
        assert wrong.status_code == 401
    assert_throttled(await sign_in(reader, email, PASSWORD, "203.0.113.50"), "Too many")
    # The same account from another address is fine: the address was throttled, not it.
    assert (await sign_in(reader, email, PASSWORD, "203.0.113.51")).status_code == 200


async def test_parallel_guesses_cannot_get_past_the_limit(
    reader: Reader, other_reader: Reader
) -> None:
    email = fresh_email()
    await other_reader.register(email)
    guesses = [
        sign_in(reader, email, f"wrong password {n}", f"203.0.113.{n + 1}") for n in range(40)
    ]
    statuses = sorted(response.status_code for response in await asyncio.gather(*guesses))
    assert statuses == [401] * 10 + [429] * 30
    assert (await sign_in(reader, email, PASSWORD, "198.51.100.1")).status_code == 429


async def test_a_successful_sign_in_gives_the_account_its_failures_back(
    reader: Reader, other_reader: Reader
) -> None:
    email = fresh_email()
    await other_reader.register(email)
    for attempt in range(9):
        await sign_in(reader, email, "wrong password", f"203.0.113.{attempt + 1}")
    assert (await sign_in(reader, email, PASSWORD, "198.51.100.1")).status_code == 200
    for attempt in range(10):
        wrong = await sign_in(reader, email, "wrong password", f"192.0.2.{attempt + 1}")
        assert wrong.status_code == 401, attempt
    assert (await sign_in(reader, email, PASSWORD, "198.51.100.2")).status_code == 429


async def test_x_forwarded_for_from_an_untrusted_peer_does_not_change_the_address(
    make_settings: Callable[..., Settings],
) -> None:
    # Only 192.0.2.1 is a trusted proxy here: the test client on 127.0.0.1 is not, so the
    # addresses it claims are ignored and every attempt counts against 127.0.0.1.
    with running(make_settings(forwarded_allow_ips="192.0.2.1")) as server:
        async with Reader(server.url) as reader:
            for n in range(10):
                wrong = await sign_in(reader, fresh_email(), PASSWORD, f"203.0.113.{n + 1}")
                assert wrong.status_code == 401
            assert_throttled(await sign_in(reader, fresh_email(), PASSWORD, "198.51.100.1"), "")


async def test_ten_registrations_per_address_per_hour_and_then_the_window_moves(
    reader: Reader, clock: time_machine.Traveller
) -> None:
    def register(address: str) -> Any:
        body = {"email": fresh_email(), "password": PASSWORD}
        return post(reader, "/api/auth/register", body, **from_address(address))

    for _ in range(10):
        assert (await register("203.0.113.9")).status_code == 201
    refused = await register("203.0.113.9")
    assert_throttled(refused, "Too many accounts were created from your network.")
    assert refused.headers["Retry-After"] == "3600"
    assert (await register("203.0.113.10")).status_code == 201
    clock.shift(3601)
    assert (await register("203.0.113.9")).status_code == 201


async def test_an_email_already_taken_counts_as_a_registration(reader: Reader) -> None:
    # Otherwise "already exists" would tell an address which emails have accounts, unbounded.
    email = fresh_email()
    await reader.register(email)
    for _ in range(9):
        body = {"email": email, "password": PASSWORD}
        taken = await post(reader, "/api/auth/register", body)
        assert taken.status_code == 409
    again = await post(reader, "/api/auth/register", {"email": email, "password": PASSWORD})
    assert again.status_code == 429


async def test_malformed_registrations_do_not_use_up_the_addresss_allowance(
    reader: Reader,
) -> None:
    for _ in range(20):
        weak = {"email": fresh_email(), "password": "password12"}
        assert (await post(reader, "/api/auth/register", weak)).status_code == 422
    await reader.register()


# --- anonymous chats move to the account ----------------------------------------------------


async def test_anonymous_chats_move_to_the_account_on_sign_up(
    reader: Reader, other_reader: Reader
) -> None:
    first = await start_chat(reader, "How warm should a sourdough starter be?")
    second = await start_chat(reader, "How do I dial in espresso at home?")
    before = await chat_ids(reader)
    assert set(before) == {first, second}
    theirs = await start_chat(other_reader, "Tell me about the paperclip.")

    await reader.register()
    assert await chat_ids(reader) == before
    detail = await reader.http.get(f"/api/chats/{first}")
    assert detail.status_code == 200
    assert [m["role"] for m in detail.json()["messages"]] == ["user", "assistant"]
    assert await chat_ids(other_reader) == [theirs]
    assert (await other_reader.http.get(f"/api/chats/{first}")).status_code == 404


async def test_anonymous_chats_move_to_the_account_on_login(
    server: LiveServer, reader: Reader, other_reader: Reader
) -> None:
    email = fresh_email()
    await other_reader.register(email)
    account_chat = await start_chat(other_reader, "What does the blog say about bikepacking?")

    anonymous_chat = await start_chat(reader, "How warm should a sourdough starter be?")
    assert await chat_ids(reader) == [anonymous_chat]
    response = await post(reader, "/api/auth/login", {"email": email, "password": PASSWORD})
    assert response.status_code == 200
    assert set(await chat_ids(reader)) == {anonymous_chat, account_chat}
    assert set(await chat_ids(other_reader)) == {anonymous_chat, account_chat}

    async with Reader(server.url) as stranger:
        assert await chat_ids(stranger) == []
        assert (await stranger.http.get(f"/api/chats/{anonymous_chat}")).status_code == 404


async def test_after_signing_in_the_account_continues_its_moved_chat_over_the_websocket(
    server: LiveServer, reader: Reader
) -> None:
    chat_id = await start_chat(reader, "How warm should a sourdough starter be?")
    anonymous_cookie = reader.cookie
    await reader.register()

    ws = await reader.connect()
    await ws.send(type="subscribe", chatId=chat_id)
    subscribed = await ws.expect("subscribed")
    assert subscribed["chatId"] == chat_id
    await ws.chat("And how often should I feed it?", chat_id)
    events = await ws.until("done", chatId=chat_id)
    assert events[-1]["reason"] == "complete"

    # The browser's old anonymous identity no longer reaches the chat.
    old = await socket_with_cookie(server, anonymous_cookie)
    try:
        await old.send(type="subscribe", chatId=chat_id)
        refused = await old.expect("error")
        assert refused["code"] in ("not_found", "forbidden")
    finally:
        await old.close()


async def test_signing_in_with_nothing_made_anonymously_moves_nothing(
    reader: Reader, other_reader: Reader
) -> None:
    email = fresh_email()
    await other_reader.register(email)
    await post(reader, "/api/auth/login", {"email": email, "password": PASSWORD})
    assert await chat_ids(reader) == []


# --- cross-site writes -----------------------------------------------------------------------


async def test_a_cross_site_login_is_refused(reader: Reader, other_reader: Reader) -> None:
    email = fresh_email()
    await other_reader.register(email)
    body = {"email": email, "password": PASSWORD}
    refused = await post(reader, "/api/auth/login", body, Origin="https://evil.example")
    assert refused.status_code == 403
    assert (await reader.me())["anonymous"] is True
    accepted = await post(reader, "/api/auth/login", body, Origin=reader.base_url)
    assert accepted.status_code == 200
    assert (await reader.me())["email"] == email


@pytest.mark.parametrize(
    "path", ["/api/auth/register", "/api/auth/logout", "/login", "/register", "/logout"]
)
async def test_every_cross_site_write_is_refused(reader: Reader, path: str) -> None:
    response = await reader.http.post(
        path,
        json={"email": fresh_email(), "password": PASSWORD},
        headers={"Origin": "https://evil.example"},
    )
    assert response.status_code == 403
    assert (await reader.me())["anonymous"] is True


async def test_a_cross_site_delete_is_refused(reader: Reader) -> None:
    chat_id = await start_chat(reader, "How warm should a sourdough starter be?")
    response = await reader.http.delete(
        f"/api/chats/{chat_id}", headers={"Origin": "https://evil.example"}
    )
    assert response.status_code == 403
    assert await chat_ids(reader) == [chat_id]


async def test_an_allowed_origin_may_write(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(allowed_origins="https://app.example")
    with running(settings) as server:
        async with Reader(server.url) as reader:
            body = {"email": fresh_email(), "password": PASSWORD}
            response = await post(reader, "/api/auth/register", body, Origin="https://app.example")
            assert response.status_code == 201, response.text
            other = await post(reader, "/api/auth/logout", {}, Origin="https://other.example")
            assert other.status_code == 403

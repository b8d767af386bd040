"""Reliability under stress: reconnect storms, crashes under load, slow clients, hostile input.

Sizes fit CI; `BLOGCHAT_RELIABILITY_SCALE=10` runs the full campaign (docs/performance.md).
Each test asserts correctness only: no event lost or repeated, clean close codes, no session
left busy, bounded buffers measured as counts, never as time.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.core.result import Err
from websockets.exceptions import ConnectionClosed

from blogchat.connection import CLOSE_SLOW_CONSUMER, Connection, ConnectionState
from blogchat.quotas import MemorySlots
from blogchat.settings import Settings
from blogchat.visitors import Visitor
from tests.support.anthropic_server import (
    AnthropicTestServer,
    Gate,
    cut,
    error,
    gate,
    reply,
    text,
)
from tests.support.claude import claude_server_for
from tests.support.client import (
    COOKIE,
    ChatSocket,
    Event,
    Reader,
    answer_text,
    eventually,
    transcript,
)
from tests.support.load import (
    drop_connection,
    process_env,
    rest_get,
    scaled,
    seeded,
    squeeze_server_send_buffer,
    stalled_socket,
)
from tests.support.server import Database, LiveServer, ServerProcess, running

# --- reconnect storm ----------------------------------------------------------------------

STORM_CLIENTS = scaled(20)
STORM_CUTS = 5
# Events a client reads between two cuts, at most: five cuts stay well inside an answer
# (offline answers run to 400 events and more), whatever the machine's speed.
STORM_MAX_READ = 30
STORM_QUESTIONS = [
    "How warm should a sourdough starter be kept?",
    "espresso dose and yield",
    "bikepacking water",
    "What are the latest posts about coffee?",
]


@pytest.fixture
def storm_server(make_settings: Callable[..., Settings]) -> Iterator[LiveServer]:
    """A server whose offline answers stream about 3,000 tokens a second in all."""
    rate = max(20.0, 3000 / STORM_CLIENTS)
    with running(make_settings(offline_tokens_per_second=rate)) as live:
        yield live


async def flaky_client(server: LiveServer, rng: random.Random, question: str) -> str:
    """Ask a question over a connection that is cut STORM_CUTS times mid-answer, then check
    the whole transcript against a reader that never disconnected; returns the chat's id."""
    async with Reader(server.url) as reader:
        client_message_id = str(uuid.uuid4())
        ws = await reader.connect()
        await ws.chat(question, clientMessageId=client_message_id)
        chat_id: str | None = None
        seen: list[Event] = []
        for _ in range(STORM_CUTS):
            for _ in range(rng.randint(0, STORM_MAX_READ)):
                event = await ws.recv(timeout=60)
                if event["type"] == "chat_created":
                    chat_id = event["chatId"]
                elif "seq" in event:
                    seen.append(event)
            drop_connection(ws)
            await asyncio.sleep(rng.uniform(0, 0.05))
            ws = await reader.connect()
            if chat_id is None:
                # The chat's id never arrived: resend the message; the server recognizes it.
                await ws.chat(question, clientMessageId=client_message_id)
                created = await ws.expect("chat_created", timeout=60)
                chat_id = created["chatId"]
            else:
                last = seen[-1]["seq"] if seen else 0
                await ws.send(type="subscribe", chatId=chat_id, afterSeq=last)
                subscribed = await ws.expect("subscribed", timeout=60)
                assert "messages" not in subscribed, "a resume inside the turn fell back"
        seen += transcript(await ws.until("done", timeout=120))

        reference = await reader.connect()
        await reference.send(type="subscribe", chatId=chat_id, afterSeq=0)
        await reference.expect("subscribed")
        expected = transcript(await reference.until("done", timeout=120))

        # Every event exactly once, in order, and the same as the uninterrupted reader's.
        assert [e["seq"] for e in seen] == list(range(1, len(seen) + 1))
        assert seen == expected
        assert seen[0]["type"] == "user_message"
        assert seen[0]["clientMessageId"] == client_message_id
        assert seen[-1]["reason"] == "complete"
        detail = (await rest_get(reader, f"/api/chats/{chat_id}")).json()
        assert detail["busy"] is False
        assert [m["role"] for m in detail["messages"]] == ["user", "assistant"]
        assert detail["messages"][1]["text"] == answer_text(seen)
        assert chat_id is not None
        return chat_id


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_a_reconnect_storm_loses_and_repeats_no_event_in_any_transcript(
    storm_server: LiveServer,
) -> None:
    # On SQLite only: resume is served from the in-memory event log; the database only
    # stores each chat once (resume against both databases: tests/test_resume.py).
    rng, seed = seeded("storm")
    rngs = [random.Random(rng.random()) for _ in range(STORM_CLIENTS)]
    outcomes = await asyncio.gather(
        *(
            flaky_client(storm_server, rngs[i], STORM_QUESTIONS[i % len(STORM_QUESTIONS)])
            for i in range(STORM_CLIENTS)
        ),
        return_exceptions=True,
    )
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    if failures:
        raise AssertionError(
            f"{len(failures)} of {STORM_CLIENTS} clients failed (BLOGCHAT_RELIABILITY_SEED={seed})"
        ) from failures[0]
    # Nothing is left behind: no connection, no subscriber, no busy session.
    assert await eventually(lambda: not storm_server.state.hub.connections)
    sessions = storm_server.state.sessions
    for chat_id in outcomes:
        session = sessions.get(chat_id)
        assert session is None or (not session.busy and not len(session.fanout))


# --- crash under load ---------------------------------------------------------------------

CRASH_CHATS = scaled(4)


@dataclass
class CrashClient:
    """One reader of the crash test: what it sent, and everything it was told."""

    reader: Reader
    questions: tuple[str, str]
    events: list[Event] = field(default_factory=list)
    chat_id: str | None = None

    def acknowledged(self) -> list[Event]:
        """The user messages the server confirmed (`user_message`)."""
        return [e for e in self.events if e["type"] == "user_message"]

    def streamed(self) -> str:
        """The answer text received before the crash."""
        return answer_text(self.events)

    async def ask_and_listen(self, ws: ChatSocket) -> None:
        """Ask, queue a follow-up behind the answer, then read until the server dies."""
        await ws.chat(self.questions[0])
        self.chat_id = (await ws.expect("chat_created", timeout=60))["chatId"]
        await ws.chat(self.questions[1], self.chat_id)
        with contextlib.suppress(ConnectionClosed):
            while True:
                self.events.append(await ws.recv(timeout=120))


async def test_a_crash_under_load_loses_nothing_acknowledged_and_marks_every_partial_answer(
    database: Database, tmp_path: Path
) -> None:
    env = process_env(database, tmp_path / "data", tokens_per_second=40)
    async with contextlib.AsyncExitStack() as stack:
        server = ServerProcess(env).start(tmp_path / "server.log")
        stack.callback(server.stop)
        clients = []
        for index in range(CRASH_CHATS):
            reader = await stack.enter_async_context(Reader(server.url))
            question = STORM_QUESTIONS[index % len(STORM_QUESTIONS)]
            clients.append(CrashClient(reader, (question, f"And more on {question.lower()}")))
        listeners = [
            asyncio.ensure_future(client.ask_and_listen(await client.reader.connect()))
            for client in clients
        ]
        try:
            # Every follow-up is acknowledged and every answer is streaming...
            assert await eventually(
                lambda: all(len(c.acknowledged()) == 2 and c.streamed() for c in clients),
                timeout=60,
            )
            # ...and the periodic save (every second) has stored part of every answer.
            assert await saved_partially(database, [c.chat_id for c in clients], timeout=60)
            server.kill()
            await asyncio.wait_for(asyncio.gather(*listeners), 30)
        finally:
            for listener in listeners:
                listener.cancel()

        fast = {**env, "BLOGCHAT_OFFLINE_TOKENS_PER_SECOND": "0"}
        restarted = ServerProcess(fast, port=server.port).start(tmp_path / "server.log")
        stack.callback(restarted.stop)
        for client in clients:
            await check_after_crash(restarted, client)


async def saved_partially(database: Database, chat_ids: list[str | None], timeout: float) -> bool:
    """Wait until the database holds some text of a running answer in each of these chats;
    whether it ever did (a bounded wait on what the server saved, not a timing)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        rows = await database.rows(
            "SELECT DISTINCT chat_id FROM messages"
            " WHERE role = 'assistant' AND status = 'streaming' AND text != ''"
        )
        if set(chat_ids) <= {row.chat_id for row in rows}:
            return True
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.1)


async def check_after_crash(server: ServerProcess, client: CrashClient) -> None:
    """One chat after the restart: consistent, nothing acknowledged lost, answer marked."""
    seen = transcript(client.events)
    seqs = [e["seq"] for e in seen]
    assert seqs == list(range(1, len(seqs) + 1)), "the stream before the crash had gaps"
    assert seen[-1]["type"] == "token", "an answer finished before the crash"
    last_seen = seqs[-1]
    async with Reader(server.url, cookie=client.reader.cookie) as reader:
        # The follow-up was acknowledged and waiting when the server died: it is answered
        # after the restart (the queue is the database's unanswered messages).
        ws = await reader.connect()
        await ws.send(type="subscribe", chatId=client.chat_id, afterSeq=last_seen)
        subscribed = await ws.expect("subscribed")
        # The log of a restarted server reaches no further back: the history comes instead.
        assert subscribed["messages"] is not None
        if subscribed["busy"]:
            await ws.until("done", timeout=60)
        detail = (await rest_get(reader, f"/api/chats/{client.chat_id}")).json()
        assert detail["busy"] is False
        assert detail["lastSeq"] >= last_seen
        first, answer, follow_up, follow_up_answer = detail["messages"]
        # Both acknowledged messages are there, with the ids and seqs the server announced.
        asked = client.acknowledged()
        for saved, announced in zip((first, follow_up), asked, strict=True):
            assert saved["role"] == "user"
            assert (saved["id"], saved["text"]) == (announced["messageId"], announced["text"])
            assert saved["seqStart"] == announced["seq"]
        # The answer cut off by the crash keeps what was saved of it, and says so.
        assert answer["role"] == "assistant"
        assert answer["status"] == "incomplete"
        assert answer["text"], "nothing of the partial answer was saved"
        assert client.streamed().startswith(answer["text"])
        assert answer["seqEnd"] <= last_seen
        # The follow-up got its answer, after everything seen before the crash.
        assert follow_up_answer["role"] == "assistant"
        assert follow_up_answer["status"] == "complete"
        assert follow_up_answer["text"]
        assert follow_up_answer["seqStart"] > last_seen

        # The chat goes on with fresh seqs.
        await ws.chat("One more question about espresso", client.chat_id)
        after = transcript(await ws.until("done", timeout=60))
        assert after[-1]["reason"] == "complete"
        assert [e["seq"] for e in after] == list(
            range(after[0]["seq"], after[0]["seq"] + len(after))
        )
        assert after[0]["seq"] > last_seen


# --- slow clients -------------------------------------------------------------------------

SLOW_QUEUE_LIMIT = 64


@pytest.fixture
def small_queue_server(make_settings: Callable[..., Settings]) -> Iterator[LiveServer]:
    """A server that lets a connection fall only 64 frames behind."""
    settings = make_settings(send_queue_limit=SLOW_QUEUE_LIMIT, offline_tokens_per_second=2000)
    with running(settings) as live:
        yield live


async def largest_backlog(server: LiveServer) -> tuple[int, list[ConnectionState]]:
    """The longest send queue of any connection right now, and every connection's state."""

    async def look() -> tuple[int, list[ConnectionState]]:
        connections = list(server.state.hub.connections.values())
        return (
            max((c.backlog for c in connections), default=0),
            [c.state for c in connections],
        )

    future = asyncio.run_coroutine_threadsafe(look(), server.loop)  # type: ignore[arg-type]
    result: tuple[int, list[ConnectionState]] = await asyncio.wrap_future(future)
    return result


async def read_until_closed(ws: ChatSocket) -> tuple[list[Event], int | None]:
    """Every message until the server closes the connection, and the close code."""
    events: list[Event] = []
    try:
        while True:
            events.append(await ws.recv(timeout=30))
    except ConnectionClosed as closed:
        return events, closed.rcvd.code if closed.rcvd else None


async def test_a_reader_that_stops_reading_is_closed_with_4008_holding_up_nobody_and_resumes(
    small_queue_server: LiveServer,
) -> None:
    server = small_queue_server
    async with Reader(server.url) as reader:
        fast = await reader.connect()
        await fast.chat("How warm should a sourdough starter be kept?")
        chat_id = (await fast.expect("chat_created"))["chatId"]
        first_done = (await fast.until("done"))[-1]

        slow = await stalled_socket(reader)
        squeeze_server_send_buffer(server, slow)
        await slow.send(type="subscribe", chatId=chat_id, afterSeq=first_done["seq"])
        # From here on the slow reader reads nothing while two answers stream.
        questions = ["espresso dose and yield", "bikepacking water"]
        for question in questions:
            await fast.chat(question, chat_id)
        backlogs: list[int] = []
        fast_events: list[Event] = []
        for _ in questions:
            reading = asyncio.ensure_future(fast.until("done", timeout=60))
            while not reading.done():
                backlog, _ = await largest_backlog(server)
                backlogs.append(backlog)
                await asyncio.sleep(0.01)
            fast_events += await reading

        # The fast reader got every event, in order, while the slow one read nothing.
        live = transcript(fast_events)
        assert [e["seq"] for e in live] == list(range(first_done["seq"] + 1, live[-1]["seq"] + 1))
        assert [e["reason"] for e in live if e["type"] == "done"] == ["complete"] * 2
        # No connection ever buffered more than its limit, and the slow one was cut off.
        assert max(backlogs) <= SLOW_QUEUE_LIMIT
        backlog, states = await largest_backlog(server)
        assert backlog <= SLOW_QUEUE_LIMIT
        assert ConnectionState.OPEN in states
        assert any(state is not ConnectionState.OPEN for state in states), states

        # Reading again, the slow reader gets what was in flight, then the close code.
        received, code = await read_until_closed(slow)
        assert code == CLOSE_SLOW_CONSUMER
        assert received[0]["type"] == "subscribed"
        got = transcript(received)
        assert got == live[: len(got)], "the frames before the close are not the transcript"
        assert len(got) < len(live)

        # It resumes from the last seq it saw and ends up with exactly the fast reader's view.
        again = await reader.connect()
        last_seen = got[-1]["seq"] if got else first_done["seq"]
        await again.send(type="subscribe", chatId=chat_id, afterSeq=last_seen)
        subscribed = await again.expect("subscribed")
        assert subscribed["lastSeq"] == live[-1]["seq"]
        # The log still holds both turns: an exact replay, longer than the send queue limit.
        assert "messages" not in subscribed
        rest = transcript(await again.until("done", timeout=30, seq=live[-1]["seq"]))
        assert got + rest == live
        assert not (await rest_get(reader, f"/api/chats/{chat_id}")).json()["busy"]


async def test_a_resume_replay_longer_than_the_send_queue_limit_arrives_whole(
    small_queue_server: LiveServer,
) -> None:
    async with Reader(small_queue_server.url) as reader:
        ws = await reader.connect()
        await ws.chat("How warm should a sourdough starter be kept?")
        chat_id = (await ws.expect("chat_created"))["chatId"]
        turn = transcript(await ws.until("done"))
        assert len(turn) > 4 * SLOW_QUEUE_LIMIT

        again = await reader.connect()
        await again.send(type="subscribe", chatId=chat_id, afterSeq=0)
        assert "messages" not in await again.expect("subscribed")
        assert transcript(await again.until("done")) == turn
        await again.send(type="ping")
        await again.expect("pong")


frame_orders = st.lists(
    st.one_of(st.just(0), st.integers(min_value=1, max_value=5), st.just(-1)), max_size=60
)


@hypothesis_settings(max_examples=300, deadline=None)
@given(orders=frame_orders)
def test_replayed_frames_never_count_towards_the_slow_consumer_limit(orders: list[int]) -> None:
    # 0: a live frame is delivered; n > 0: a resume replays n frames; -1: one frame is sent.
    connection = Connection(None, Visitor("v", anonymous=True), queue_limit=10**9)  # type: ignore[arg-type]
    queued: list[str] = []
    for order in orders:
        if order == 0:
            connection.deliver("live")
            queued.append("live")
        elif order > 0:
            connection.replay(["replayed"] * order)
            queued += ["replayed"] * order
        elif queued:
            assert connection._next_frame() == queued.pop(0)
        assert connection.backlog == queued.count("live")


# --- hostile input -------------------------------------------------------------------------
#
# tests/test_hub.py fuzzes the shape of frames (not JSON, wrong types, unknown types, binary,
# oversize). Here well-formed messages come in hostile sequences (other visitors' chats,
# repeated clientMessageIds, forbidden models, unknown personas and posts, odd seqs), and
# schemathesis fuzzes every REST endpoint from the OpenAPI document.

WS_FUZZ_EXAMPLES = scaled(40)
# Per REST operation (about 25 of them, pages included).
REST_FUZZ_EXAMPLES = scaled(8)
REFUSALS = {
    "bad_request",
    "too_large",
    "not_found",
    "forbidden",
    "model_not_allowed",
    "persona_unknown",
    "persona_locked",
}


@dataclass
class Battlefield:
    """A fuzzed visitor with a chat of its own, and a bystander with a chat of theirs."""

    attacker: Reader
    ws: ChatSocket
    own_chat: str
    bystander: Reader
    their_chat: str


@pytest.fixture
async def battlefield(server: LiveServer) -> Any:
    """Two visitors, each with a finished chat; the attacker's socket is the one fuzzed."""
    async with Reader(server.url) as attacker, Reader(server.url) as bystander:
        chats = []
        for visitor in (attacker, bystander):
            ws = await visitor.connect()
            await ws.chat("sourdough starter temperature")
            chats.append((await ws.expect("chat_created"))["chatId"])
            await ws.until("done")
            await ws.close()
        yield Battlefield(attacker, await attacker.connect(), chats[0], bystander, chats[1])


chat_ids = st.sampled_from(["own", "theirs", "unknown", "x" * 64, "00000000-0000-0000-0000"])
# A few fixed ids, so that repeats (idempotent resends, reuse across chats) come up often.
client_message_ids = st.sampled_from(["m-1", "m-2", "m-3"]) | st.uuids().map(str)
hostile_messages = st.one_of(
    st.fixed_dictionaries(
        {"type": st.just("subscribe"), "chatId": chat_ids},
        optional={"afterSeq": st.sampled_from([0, 1, 2, 5, 10**6, 2**53])},
    ),
    st.fixed_dictionaries({"type": st.just("unsubscribe"), "chatId": chat_ids}),
    st.fixed_dictionaries({"type": st.just("stop"), "chatId": chat_ids}),
    st.fixed_dictionaries(
        {
            "type": st.just("chat"),
            "clientMessageId": client_message_ids,
            "text": st.sampled_from(["espresso", "   ", "<script>alert(1)</script>", "é" * 9000]),
        },
        optional={
            "chatId": chat_ids | st.none(),
            "model": st.sampled_from(["haiku", "sonnet", "opus"]),
            "persona": st.sampled_from(["blog-assistant", "explainer", "root", "../etc"]),
            "post": st.sampled_from(["dialing-in-espresso-at-home", "../../secret", ""]),
        },
    ),
    st.just({"type": "ping"}),
)


def resolve(message: dict[str, Any], field: Battlefield, theirs: str) -> dict[str, Any]:
    """Put real chat ids where the strategy named them ("theirs" becomes `theirs`)."""
    names = {"own": field.own_chat, "theirs": theirs, "unknown": str(uuid.uuid4())}
    resolved = dict(message)
    if isinstance(resolved.get("chatId"), str):
        resolved["chatId"] = names.get(resolved["chatId"], resolved["chatId"])
    return resolved


@hypothesis_settings(
    max_examples=WS_FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=st.lists(hostile_messages, min_size=1, max_size=6))
async def test_hostile_message_sequences_never_fail_internally_or_reveal_another_visitors_chat(
    battlefield: Battlefield, batch: list[dict[str, Any]]
) -> None:
    field = battlefield
    for index, message in enumerate(batch):
        await field.ws.send(**resolve(message, field, field.their_chat), requestId=f"r{index}")
        if message.get("chatId") == "theirs":
            # The same message about a chat that does not exist: it must get the same answer.
            twin = resolve(message, field, str(uuid.uuid4()))
            await field.ws.send(**twin, requestId=f"twin{index}")
    await field.ws.send(type="ping", requestId="end")
    answers = await field.ws.until("pong", timeout=60, requestId="end")
    by_request = {a["requestId"]: a for a in answers if a.get("requestId")}
    for answer in answers:
        # Every answer is a valid protocol message (recv checks) and never an internal failure.
        if answer["type"] == "error" and "seq" not in answer:
            assert answer["code"] in REFUSALS, answer
        # Nothing of the bystander's chat ever comes back but a refusal...
        if answer.get("chatId") == field.their_chat:
            assert answer["type"] == "error", answer
            # ...the very refusal a chat that does not exist gets.
            twin = by_request[answer["requestId"].replace("r", "twin", 1)]
            assert (twin["code"], twin["message"]) == (answer["code"], answer["message"])
    # Whatever was started ends: no chat of the attacker is left busy, none left Haiku.
    for chat in (await rest_get(field.attacker, "/api/chats")).json():
        assert chat["id"] != field.their_chat
        assert await settled(field.attacker, chat["id"]), f"chat {chat['id']} stuck busy"
        assert chat["model"] == "haiku"
    their = (await rest_get(field.bystander, f"/api/chats/{field.their_chat}")).json()
    assert [m["role"] for m in their["messages"]] == ["user", "assistant"]


async def settled(reader: Reader, chat_id: str) -> bool:
    """Wait (bounded) until a chat has no running or queued turn."""
    for _ in range(600):
        detail = await rest_get(reader, f"/api/chats/{chat_id}")
        if detail.status_code == 404 or not detail.json()["busy"]:
            return True
        await asyncio.sleep(0.05)
    return False


# Schemathesis's own strategies draw from `random` on some paths, which Hypothesis flags.
@pytest.mark.filterwarnings(
    "ignore:Do not use the `random` module inside strategies"
    ":hypothesis.errors.HypothesisDeprecationWarning"
)
async def test_fuzzed_rest_requests_never_get_a_server_error(
    server: LiveServer, reader: Reader
) -> None:
    ws = await reader.connect()
    await ws.chat("sourdough starter temperature")
    chat_id = (await ws.expect("chat_created"))["chatId"]
    await ws.until("done")
    problems = await asyncio.to_thread(fuzz_every_operation, server, reader.cookie, chat_id)
    assert not problems, "\n".join(problems[:10])
    assert (await rest_get(reader, "/healthz")).status_code == 200


def fuzz_every_operation(server: LiveServer, cookie: str, chat_id: str) -> list[str]:
    """Valid and invalid requests for every operation of the OpenAPI document (some aimed
    at a real chat of the visitor's); returns the ones that got a 5xx."""
    session = requests.Session()
    session.cookies.set(COOKIE, cookie)
    document = session.get(f"{server.url}/api/openapi.json").json()
    schema = schemathesis.openapi.from_dict(document)
    problems: list[str] = []
    for result in schema.get_all_operations():
        if isinstance(result, Err):
            raise result.err()
        operation = result.ok()
        strategies = [
            operation.as_strategy(GenerationMode.POSITIVE),
            operation.as_strategy(GenerationMode.NEGATIVE),
        ]
        if "{chat_id}" in operation.path:
            strategies.append(
                operation.as_strategy(GenerationMode.POSITIVE, path_parameters={"chat_id": chat_id})
            )

        @hypothesis_settings(
            max_examples=REST_FUZZ_EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        @given(case=st.one_of(strategies))
        def fuzz(case: Any) -> None:
            response = case.call(base_url=server.url, session=session, timeout=30)
            if response.status_code >= 500:
                problems.append(f"{response.status_code}: {case.as_curl_command()}")

        fuzz()
    return problems


async def test_a_nul_character_anywhere_a_visitor_types_is_refused_never_a_server_error(
    server: LiveServer, reader: Reader
) -> None:
    # PostgreSQL cannot store U+0000; the fuzz campaign found every one of these failing.
    nul = "a\x00b"
    requests_: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/api/auth/login", {"json": {"email": f"{nul}@b.co", "password": "x"}}),
        ("POST", "/api/auth/register", {"json": {"email": f"{nul}@b.co", "password": "x" * 12}}),
        ("POST", "/login", {"data": {"email": f"{nul}@b.co", "password": "x"}}),
        ("POST", "/register", {"data": {"email": f"{nul}@b.co", "password": "x" * 12}}),
        ("GET", "/api/chats/a%00b", {}),
        ("PATCH", "/api/chats/a%00b", {"json": {"title": "x"}}),
        ("DELETE", "/api/chats/a%00b", {}),
        ("GET", "/chat/a%00b", {}),
    ]
    for method, path, body in requests_:
        response = await reader.http.request(method, path, **body)
        assert response.status_code == 422, (method, path, response.status_code)

    ws = await reader.connect()
    await ws.chat("sourdough")
    chat_id = (await ws.expect("chat_created"))["chatId"]
    await ws.until("done")
    rename = await reader.http.patch(f"/api/chats/{chat_id}", json={"title": nul})
    assert rename.status_code == 422
    for message in [
        {"type": "subscribe", "chatId": nul},
        {"type": "unsubscribe", "chatId": nul},
        {"type": "stop", "chatId": nul},
        {"type": "chat", "clientMessageId": nul, "text": "hello"},
        {"type": "chat", "clientMessageId": "fine", "text": nul},
        {"type": "chat", "chatId": chat_id, "clientMessageId": "fine", "text": nul},
    ]:
        await ws.send(**message)
        error = await ws.expect("error")
        assert error["code"] == "bad_request", (message, error)
    detail = (await rest_get(reader, f"/api/chats/{chat_id}")).json()
    assert [m["role"] for m in detail["messages"]] == ["user", "assistant"]


# --- the database refusing a write ---------------------------------------------------------

REFUSE_BOOM = {
    "sqlite": [
        "CREATE TRIGGER refuse_boom BEFORE INSERT ON messages WHEN NEW.text = 'boom' "
        "BEGIN SELECT RAISE(ABORT, 'refused by test'); END"
    ],
    "postgresql": [
        "CREATE FUNCTION refuse_boom() RETURNS trigger AS $$ BEGIN "
        "IF NEW.text = 'boom' THEN RAISE EXCEPTION 'refused by test'; END IF; "
        "RETURN NEW; END $$ LANGUAGE plpgsql",
        "CREATE TRIGGER refuse_boom BEFORE INSERT ON messages "
        "FOR EACH ROW EXECUTE FUNCTION refuse_boom()",
    ],
}


async def refuse_messages_saying_boom(server: LiveServer, database: Database) -> None:
    """Make the real database refuse to store any message whose text is "boom"."""
    await server.run_sql(*REFUSE_BOOM[database.kind])


async def test_a_message_the_database_refuses_is_not_acknowledged_and_starts_no_turn(
    server: LiveServer, reader: Reader, database: Database
) -> None:
    await refuse_messages_saying_boom(server, database)
    ws = await reader.connect()
    await ws.chat("sourdough starter temperature")
    chat_id = (await ws.expect("chat_created"))["chatId"]
    first = transcript(await ws.until("done"))

    await ws.chat("boom", chat_id)
    refused = await ws.expect("error")
    # SQLite reports the trigger's refusal as a constraint violation: only the idempotency
    # index means "already used", so this is reported as what it is, a failure of ours.
    assert refused["code"] == "internal"
    assert "already used" not in refused["message"]
    assert "seq" not in refused
    # Nothing of a turn follows: not a token, not a `done`.
    assert await ws.silent(0.5)
    detail = (await rest_get(reader, f"/api/chats/{chat_id}")).json()
    assert detail["busy"] is False
    assert [m["role"] for m in detail["messages"]] == ["user", "assistant"]

    # The chat goes on, with no gap in its seqs.
    await ws.chat("espresso", chat_id)
    after = transcript(await ws.until("done"))
    assert after[0]["seq"] == first[-1]["seq"] + 1
    assert after[-1]["reason"] == "complete"


# --- provider faults under load ------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """The replies to the requests whose prompt holds a needle, and how its turns may end."""

    replies: Any
    reasons: frozenset[str]
    # Opened once the reader saw the first token, so that the break comes after it.
    first_part_seen: Gate | None = None


def faults() -> dict[str, Fault]:
    """The faults by needle, with gates of their own (a gate once opened stays open)."""
    breaks, errors = gate(), gate()
    either = frozenset({"error", "complete"})
    return {
        "overloaded-once": Fault([error(529), text("Recovered.")], frozenset({"complete"})),
        "overloaded-always": Fault(error(529), frozenset({"error"})),
        "refused-key": Fault(error(401), frozenset({"error"})),
        # A break or stall after the first token ends the turn with an error; should the
        # break reach the engine before any token did (a second chat of the needle, whose
        # gate is already open), a retry is right, and gets the second reply.
        "breaks-mid-answer": Fault(
            [reply(text("The first part. ", delay=0.05), breaks, cut()), text("Again.")],
            either,
            breaks,
        ),
        "errors-mid-answer": Fault(
            [reply(text("The first part. ", delay=0.05), errors, error(529)), text("Again.")],
            either,
            errors,
        ),
        # Stalls that never end (gates never opened). The watchdog also fires, now and
        # then, on a busy machine slow to send a request; that attempt is retried and meets
        # the next reply, so every outcome here is still one the needle allows.
        "stalls-first": Fault(
            [reply(gate(), text("Too late.")), text("On time.")], frozenset({"complete"})
        ),
        "stalls-mid-answer": Fault(
            [reply(text("Half an answer. ", chunk=100), gate(), text("The rest.")), text("Again.")],
            either,
        ),
        "no-fault": Fault(text("A plain answer."), frozenset({"complete"})),
    }


FAULT_CHATS = scaled(len(faults()))


@pytest.mark.claude
@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_provider_faults_under_load_end_every_turn_clearly_and_leave_no_chat_busy(
    api: AnthropicTestServer, make_claude_settings: Callable[..., Settings]
) -> None:
    # On SQLite only: the database plays no part in provider faults, and every chat costs
    # an agent process; the store's behaviour on failures is covered on both databases.
    script = faults()
    needles = list(script)
    for needle, fault in script.items():
        repeat = not isinstance(fault.replies, list)
        api.when_user_says(needle, fault.replies, repeat_last=repeat)
    # The suite's 3 s watchdog: many agent processes start at once here.
    settings = make_claude_settings(max_live_clients=min(FAULT_CHATS, 8))
    with claude_server_for(settings) as server:
        async with contextlib.AsyncExitStack() as stack:
            readers = [
                await stack.enter_async_context(Reader(server.url)) for _ in range(FAULT_CHATS)
            ]
            outcomes = await asyncio.gather(
                *(
                    ask_through_a_fault(reader, needles[i % len(needles)], script)
                    for i, reader in enumerate(readers)
                )
            )
            for needle, reader, chat_id, events in outcomes:
                done = events[-1]
                assert done["reason"] in script[needle].reasons, (needle, done)
                failures = [e for e in transcript(events) if e["type"] == "error"]
                if done["reason"] == "error":
                    # A clear error, in the transcript, right before `done`.
                    (failure,) = failures
                    assert failure["code"] == "model_error", (needle, failure)
                    assert failure["seq"] == done["seq"] - 1
                    assert "API Error" not in failure["message"]
                else:
                    assert failures == [], (needle, failures)
                detail = (await rest_get(reader, f"/api/chats/{chat_id}")).json()
                assert detail["busy"] is False, needle
                assert detail["messages"][-1]["status"] == done["reason"]
            # Every chat goes on: its next question gets an answer.
            for needle, reader, chat_id, _ in outcomes:
                ws = await reader.connect()
                await ws.chat("And now?", chat_id)
                after = await ws.until("done", timeout=120)
                assert after[-1]["reason"] == "complete", (needle, after)


async def ask_through_a_fault(
    reader: Reader, needle: str, script: dict[str, Fault]
) -> tuple[str, Reader, str, list[Event]]:
    """Ask a question that runs into the fault `needle` names; read to `done`, opening the
    fault's gate once the first token arrived."""
    ws = await reader.connect()
    await ws.chat(f"Question {needle}?")
    chat_id = (await ws.expect("chat_created", timeout=60))["chatId"]
    events: list[Event] = []
    first_part_seen = script[needle].first_part_seen
    if first_part_seen is not None:
        while not events or events[-1]["type"] not in ("token", "done"):
            events.append(await ws.recv(timeout=120))
        first_part_seen.open()
    if not events or events[-1]["type"] != "done":
        events += await ws.until("done", timeout=120)
    return needle, reader, chat_id, events


# --- an attack on the budget ---------------------------------------------------------------

ATTACK_COOKIES = scaled(8)
ATTACK_MESSAGES = 4  # per cookie, each to a chat of its own
ATTACKER = "203.0.113.66"
# The address's turns per hour, scaled down from the default 60 to keep CI short.
ATTACK_TURNS = 12


@pytest.mark.claude
@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_an_attacker_with_many_cookies_at_one_address_stays_within_its_caps(
    api: AnthropicTestServer, make_claude_settings: Callable[..., Settings]
) -> None:
    # The public limits (turns per address scaled down), not the suite's generous ones.
    settings = make_claude_settings(
        visitor_turns_per_hour=20,
        address_turns_per_hour=ATTACK_TURNS,
        visitor_running_turns=1,
        address_running_turns=2,
        chat_queue_limit=3,
        max_live_clients=4,
    )
    api.set_rate(200)
    with claude_server_for(settings) as server:
        running: list[int] = []
        sampling = True

        async def sample() -> None:
            slots = server.state.sessions.gate._slots
            assert isinstance(slots, MemorySlots)
            while sampling:
                running.append(slots.count(f"address:{ATTACKER}"))
                await asyncio.sleep(0.01)

        sampler = asyncio.ensure_future(sample())
        async with contextlib.AsyncExitStack() as stack:
            attackers = [
                await stack.enter_async_context(Reader(server.url, address=ATTACKER))
                for _ in range(ATTACK_COOKIES)
            ]
            honest = await stack.enter_async_context(Reader(server.url, address="198.51.100.7"))
            floods, honest_events = await asyncio.gather(
                asyncio.gather(
                    *(flood(attacker, index) for index, attacker in enumerate(attackers))
                ),
                ask_honestly(honest),
            )
        sampling = False
        await sampler

    refusals = [code for flooded in floods for code in flooded]
    accepted = sum(code == "accepted" for code in refusals)
    # The address got its turns and no more; the rest were refused, and said why.
    assert accepted == ATTACK_TURNS
    assert set(refusals) <= {"accepted", "rate_limited"}
    attack_requests = [r for r in api.main_requests() if "attack" in r.prompt]
    assert len(attack_requests) == ATTACK_TURNS
    # At no moment did the address run more than its two turns.
    assert max(running) <= 2
    # The reader at another address was answered as if nothing happened.
    assert honest_events[-1]["reason"] == "complete"
    assert answer_text(honest_events) == "Echo: An honest question about sourdough?"


async def flood(attacker: Reader, index: int) -> list[str]:
    """Send ATTACK_MESSAGES messages, each starting a chat; what became of each ("accepted"
    or the refusal's code). Every accepted turn is read to its end."""
    ws = await attacker.connect()
    codes: list[str] = []
    for n in range(ATTACK_MESSAGES):
        await ws.chat(f"attack {index}-{n}: tell me everything")
        while True:
            event = await ws.recv(timeout=60)
            if event["type"] == "chat_created":
                codes.append("accepted")
                break
            if event["type"] == "error" and "seq" not in event:
                codes.append(event["code"])
                break
    dones = sum(1 for event in ws.received if event["type"] == "done")
    while dones < codes.count("accepted"):
        if (await ws.recv(timeout=120))["type"] == "done":
            dones += 1
    return codes


async def ask_honestly(reader: Reader) -> list[Event]:
    ws = await reader.connect()
    await ws.chat("An honest question about sourdough?")
    return await ws.until("done", timeout=120)

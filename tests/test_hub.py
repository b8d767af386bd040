"""The realtime hub: who may connect, and how every kind of bad frame is answered."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from blogchat.settings import Settings
from tests.support.client import COOKIE, ChatSocket, Reader, answer_text, eventually
from tests.support.server import LiveServer


async def refused_status(url: str, **kwargs: Any) -> int:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(url, open_timeout=10, **kwargs):
            pass
    status: int = refused.value.response.status_code
    return status


async def test_an_upgrade_without_a_session_cookie_is_refused(server: LiveServer) -> None:
    assert await refused_status(server.ws_url, origin=server.url) == 401


async def test_an_upgrade_with_a_forged_cookie_is_refused(
    server: LiveServer, reader: Reader
) -> None:
    forged = reader.cookie[:-4] + ("AAAA" if not reader.cookie.endswith("AAAA") else "BBBB")
    headers = {"Cookie": f"{COOKIE}={forged}"}
    assert await refused_status(server.ws_url, origin=server.url, additional_headers=headers) == 401


@pytest.mark.parametrize(
    "origin", ["https://evil.example", "http://127.0.0.1:1", "null", "http://localhost"]
)
async def test_a_cross_site_upgrade_is_refused(
    server: LiveServer, reader: Reader, origin: str
) -> None:
    headers = {"Cookie": f"{COOKIE}={reader.cookie}"}
    status = await refused_status(server.ws_url, origin=origin, additional_headers=headers)
    assert status == 403


async def test_an_upgrade_without_an_origin_is_refused(server: LiveServer, reader: Reader) -> None:
    headers = {"Cookie": f"{COOKIE}={reader.cookie}"}
    assert await refused_status(server.ws_url, additional_headers=headers) == 403


async def test_an_origin_listed_in_allowed_origins_may_connect(make_settings: Any) -> None:
    settings: Settings = make_settings(allowed_origins="https://blog.example")
    with LiveServer(settings) as server:
        async with Reader(server.url) as reader:
            ws = await reader.connect(origin="https://blog.example")
            await ws.send(type="ping", requestId="hello")
            assert (await ws.expect("pong"))["requestId"] == "hello"


BAD_FRAMES: list[tuple[str | bytes, str]] = [
    ("not json", "bad_request"),
    ("", "bad_request"),
    ("[1, 2, 3]", "bad_request"),
    ('"subscribe"', "bad_request"),
    ("{}", "bad_request"),
    ('{"type": 7}', "bad_request"),
    ('{"type": "launch_missiles"}', "unknown_type"),
    ('{"type": "subscribe"}', "bad_request"),
    ('{"type": "subscribe", "chatId": 12}', "bad_request"),
    ('{"type": "subscribe", "chatId": "x", "afterSeq": -1}', "bad_request"),
    ('{"type": "subscribe", "chatId": "x", "afterSeq": "3"}', "bad_request"),
    ('{"type": "chat", "text": "hi"}', "bad_request"),
    ('{"type": "chat", "clientMessageId": "a", "text": 5}', "bad_request"),
    ('{"type": "chat", "clientMessageId": "a", "text": "hi", "model": "gpt"}', "bad_request"),
    ('{"type": "chat", "clientMessageId": "a", "text": "hi", "chatID": "typo"}', "bad_request"),
    ('{"type": "stop"}', "bad_request"),
    (b"\x00\x01binary", "bad_request"),
    ("[" * 100_000 + "]" * 100_000, "too_large"),
]


async def test_every_kind_of_bad_frame_gets_an_error_and_the_connection_stays_usable(
    reader: Reader,
) -> None:
    ws = await reader.connect()
    for frame, code in BAD_FRAMES:
        await ws.send_raw(frame)
        error = await ws.expect("error")
        assert error["code"] == code, (frame[:60], error)
        assert error["retryable"] is False
        assert "seq" not in error
    await ws.send(type="ping")
    await ws.expect("pong")


async def test_errors_carry_the_request_id_of_the_message_that_caused_them(
    reader: Reader,
) -> None:
    ws = await reader.connect()
    await ws.send_raw(json.dumps({"type": "nope", "requestId": "r-1"}))
    assert (await ws.expect("error"))["requestId"] == "r-1"
    await ws.send_raw(json.dumps({"type": "subscribe", "requestId": "r-2"}))
    error = await ws.expect("error")
    assert error["requestId"] == "r-2"
    assert "chatId" in error["message"]


async def test_a_frame_over_the_limit_gets_too_large_and_a_huge_one_closes_with_1009(
    reader: Reader, settings: Settings
) -> None:
    ws = await reader.connect()
    text = "x" * settings.max_frame_bytes
    await ws.send(type="chat", clientMessageId="big", text=text)
    assert (await ws.expect("error"))["code"] == "too_large"
    # Multi-byte characters count in bytes, not characters.
    await ws.send_raw(json.dumps({"type": "ping", "pad": "é" * (settings.max_frame_bytes // 2)}))
    assert (await ws.expect("error"))["code"] == "too_large"
    await ws.send(type="ping")
    await ws.expect("pong")
    assert (await reader.http.get("/api/chats")).json() == []

    huge = await reader.connect()
    await huge.send_raw("x" * (8 * 1024 * 1024))
    with pytest.raises(ConnectionClosed) as closed:
        await huge.recv(timeout=10)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1009


# Each example sends one to four frames: about 2,000 frames per backend by default.
FUZZ_EXAMPLES = int(os.environ.get("BLOGCHAT_FUZZ_EXAMPLES", "800"))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
field_names = st.sampled_from(
    ["chatId", "afterSeq", "clientMessageId", "text", "model", "persona", "requestId", "post"]
)
messages = st.fixed_dictionaries(
    {"type": st.sampled_from(["subscribe", "unsubscribe", "chat", "stop", "ping", "pong", "Chat"])},
    optional={"chatId": json_values, "afterSeq": json_values},
).flatmap(
    lambda base: st.dictionaries(field_names, json_values, max_size=4).map(
        lambda extra: {**extra, **base}
    )
)
frames = st.one_of(
    messages.map(json.dumps),
    json_values.map(json.dumps),
    st.text(max_size=200),
    st.binary(max_size=64),
)


@hypothesis_settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=st.lists(frames, min_size=1, max_size=4))
async def test_fuzzed_frames_never_crash_the_server_or_disturb_another_connection(
    fuzz_target: tuple[ChatSocket, ChatSocket], batch: list[str | bytes]
) -> None:
    fuzzed, _ = fuzz_target
    for frame in batch:
        await fuzzed.send_raw(frame)
        answer = await fuzzed.recv(timeout=10)
        # Every answer is a valid protocol message (recv checks); errors carry no seq.
        if answer["type"] == "error":
            assert "seq" not in answer
            assert answer["code"] in {
                "bad_request",
                "unknown_type",
                "too_large",
                "not_found",
                "persona_unknown",
                "model_not_allowed",
            }
        else:
            assert answer["type"] in {"pong", "subscribed", "chat_created"}
            if answer["type"] == "chat_created":
                # A fuzzed but valid `chat` really started a chat: drain its answer.
                await fuzzed.until("done")


@pytest.fixture
def fuzz_server(make_settings: Any) -> Iterator[LiveServer]:
    """The fuzzed server, with no WebSocket pings while hypothesis runs: a ping's payload
    comes from the `random` module, and hypothesis fails a test whose global random state
    changes while it draws an example (the server runs in a thread of the test process)."""
    with LiveServer(make_settings(ws_ping_interval=3600.0)) as live:
        yield live


@pytest.fixture
async def fuzz_target(
    fuzz_server: LiveServer,
) -> Any:
    """A connection to fuzz, and a bystander streaming an answer the whole time."""
    server = fuzz_server
    async with Reader(server.url) as attacker, Reader(server.url) as bystander:
        fuzzed = await attacker.connect()
        watcher = await bystander.connect()
        await watcher.chat("sourdough starter temperature")
        created = await watcher.expect("chat_created")
        yield fuzzed, watcher
        events = await watcher.until("done", timeout=60)
        assert events[-1]["reason"] == "complete"
        assert "24-26" in answer_text(events)
        detail = (await bystander.http.get(f"/api/chats/{created['chatId']}")).json()
        assert detail["messages"][1]["status"] == "complete"
        # The fuzzed connection is still alive after everything.
        await fuzzed.send(type="ping")
        await asyncio.wait_for(fuzzed.until("pong"), 10)


async def test_a_peer_that_stops_answering_pings_is_dropped_and_the_live_one_stays(
    make_settings: Any,
) -> None:
    # A second between pings, and as long for the answer: short enough for a test, long
    # enough that a busy machine still answers in time on the live connection.
    settings: Settings = make_settings(ws_ping_interval=1.0)
    with LiveServer(settings) as server:
        async with Reader(server.url) as reader:
            live = await reader.connect()  # a healthy connection, which answers pings
            hub = server.state.hub
            assert await eventually(lambda: len(hub.connections) == 1)
            (live_id,) = hub.connections
            # A raw client: it completes the upgrade, then never reads or answers again.
            stream_reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            try:
                writer.write(
                    (
                        "GET /ws HTTP/1.1\r\n"
                        f"Host: 127.0.0.1:{server.port}\r\n"
                        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                        "Sec-WebSocket-Version: 13\r\n"
                        f"Origin: {server.url}\r\n"
                        f"Cookie: {COOKIE}={reader.cookie}\r\n\r\n"
                    ).encode()
                )
                await writer.drain()
                assert b"101" in await stream_reader.readline()
                assert await eventually(lambda: len(hub.connections) == 2)
                (dead_id,) = set(hub.connections) - {live_id}
                # Without pong answers the server gives up on the dead one: it leaves the
                # hub and its socket is closed (the raw client reads to the end of it)...
                assert await eventually(lambda: dead_id not in hub.connections)
                await asyncio.wait_for(stream_reader.read(), 30)
                assert stream_reader.at_eof()
            finally:
                writer.close()
            # ...while the live one, which answered every ping, stays and still works.
            assert list(hub.connections) == [live_id]
            await live.send(type="ping", requestId="still-there")
            pong = await live.expect("pong")
            assert pong.get("requestId") == "still-there"


# Values no client may send, each in place of a field of an otherwise valid message: a lone
# surrogate (a JSON "\ud800" decodes to a string UTF-8 cannot encode), integers past what a
# JavaScript client can hold or Python converts (5,000 digits), over-long ids, wrong types.
POISONS = [
    '"\\ud800"',
    '"text with a lone \\udfff inside"',
    "9" * 5000,
    str(2**53),
    "-1",
    '"' + "x" * 300 + '"',
    '{"nested": ["\\ud83d"]}',
]
VALID: dict[str, dict[str, Any]] = {
    "subscribe": {"chatId": "c-1", "afterSeq": 0, "requestId": "r"},
    "unsubscribe": {"chatId": "c-1", "requestId": "r"},
    "chat": {"clientMessageId": "m-1", "text": "hello", "post": "p", "requestId": "r"},
    "stop": {"chatId": "c-1", "requestId": "r"},
    "ping": {"requestId": "r"},
}
poisoned_frames = st.sampled_from(sorted(VALID)).flatmap(
    lambda kind: st.tuples(
        st.just(kind), st.sampled_from(sorted(VALID[kind])), st.sampled_from(POISONS)
    )
)


def poisoned(kind: str, field: str, value: str) -> str:
    """The valid message of this type with one field's JSON value replaced by `value`."""
    fields = {**VALID[kind], field: "POISON"}
    return json.dumps({"type": kind, **fields}).replace('"POISON"', value)


@hypothesis_settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=st.lists(poisoned_frames, min_size=1, max_size=5))
async def test_an_invalid_value_in_any_client_message_is_a_bad_request_and_claims_nothing(
    reader: Reader, batch: list[tuple[str, str, str]]
) -> None:
    ws = await reader.connect()
    for kind, field, value in batch:
        frame = poisoned(kind, field, value)
        await ws.send_raw(frame)
        answer = await ws.recv(timeout=10)
        # Refused for what it is, before anything was looked up, claimed or saved. (A long
        # `text` is fine, and then the message is refused for its unknown post.)
        assert (answer["type"], answer["code"]) == ("error", "bad_request"), (frame[:120], answer)
    # Nothing was created or saved for any of them.
    assert (await reader.http.get("/api/chats")).json() == []
    await ws.close()

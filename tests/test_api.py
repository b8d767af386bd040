"""The REST companions on a live server: models, personas, chats, protocol schema, health."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
import yaml
from jsonschema import Draft202012Validator

from blogchat.web.api import HIGHLIGHTS
from tests.support.client import Reader
from tests.support.server import REPO, LiveServer

# The message tables of PROTOCOL.md: type -> its fields, with `?` marking optional ones.
CLIENT_MESSAGES = {
    "subscribe": ["chatId", "afterSeq?"],
    "unsubscribe": ["chatId"],
    "chat": ["chatId?", "clientMessageId", "text", "model?", "persona?"],
    "stop": ["chatId"],
}
SERVER_MESSAGES = {
    "subscribed": ["chatId", "lastSeq", "busy", "chat", "messages?"],
    "chat_created": ["chatId", "clientMessageId", "model", "persona"],
    "user_message": ["chatId", "seq", "messageId", "clientMessageId", "text"],
    "thinking": ["chatId", "seq", "messageId", "text"],
    "token": ["chatId", "seq", "messageId", "text"],
    "tool_use": ["chatId", "seq", "messageId", "toolUseId", "name", "input"],
    "tool_result": ["chatId", "seq", "messageId", "toolUseId", "output", "isError"],
    "done": ["chatId", "seq", "messageId", "reason", "model", "usage", "warning?"],
    "error": ["code", "message", "chatId?", "seq?", "retryable"],
}


async def start_chat(reader: Reader, text: str) -> tuple[str, list[dict[str, Any]]]:
    """Chat for real over the WebSocket until the answer is done: the chat id and events."""
    ws = await reader.connect()
    await ws.chat(text)
    created = await ws.expect("chat_created")
    events = await ws.until("done", chatId=created["chatId"])
    await ws.close()
    return created["chatId"], [created, *events]


async def continue_chat(reader: Reader, chat_id: str, text: str) -> None:
    ws = await reader.connect()
    await ws.send(type="subscribe", chatId=chat_id)
    await ws.expect("subscribed")
    client_message_id = await ws.chat(text, chat_id)
    await ws.until("user_message", clientMessageId=client_message_id)
    await ws.until("done", chatId=chat_id)
    await ws.close()


async def listed(reader: Reader) -> list[dict[str, Any]]:
    response = await reader.http.get("/api/chats")
    assert response.status_code == 200
    chats: list[dict[str, Any]] = response.json()
    return chats


@pytest.fixture
async def schema(reader: Reader) -> dict[str, Any]:
    response = await reader.http.get("/api/protocol.json")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    document: dict[str, Any] = response.json()
    return document


def validator(schema: dict[str, Any], direction: str) -> Draft202012Validator:
    """A validator for one direction's messages, resolving refs inside the document."""
    return Draft202012Validator({**schema, "$ref": f"#/properties/{direction}"})


# --- models and personas ---------------------------------------------------------------------


async def test_anonymous_visitors_may_use_haiku_only(reader: Reader) -> None:
    response = await reader.http.get("/api/models")
    assert response.status_code == 200
    models = response.json()
    assert [
        {key: value for key, value in model.items() if key != "description"} for model in models
    ] == [
        {"id": "haiku", "label": "Haiku", "allowed": True, "engine": "offline"},
        {"id": "sonnet", "label": "Sonnet", "allowed": False, "engine": "offline"},
        {"id": "opus", "label": "Opus", "allowed": False, "engine": "offline"},
    ]
    # Each model says in a line what it is for, whether or not this visitor may pick it.
    descriptions = [model["description"] for model in models]
    assert all(descriptions)
    assert len(set(descriptions)) == 3


async def test_registered_users_may_use_every_model(reader: Reader) -> None:
    await reader.register()
    models = (await reader.http.get("/api/models")).json()
    assert [(m["id"], m["allowed"], m["engine"]) for m in models] == [
        ("haiku", True, "offline"),
        ("sonnet", True, "offline"),
        ("opus", True, "offline"),
    ]


async def test_highlight_returns_pygments_pieces_that_join_back_to_the_code(
    reader: Reader,
) -> None:
    code = "def f(x):\n    return x < 1  # why\n"
    response = await reader.http.post("/api/highlight", json={"code": code, "language": "python"})
    assert response.status_code == 200
    pieces = response.json()["pieces"]
    assert "".join(text for _, text in pieces) == code
    assert ["k", "def"] in pieces
    assert ["c1", "# why"] in pieces

    plain = await reader.http.post("/api/highlight", json={"code": "a < b", "language": "nope"})
    assert plain.json() == {"pieces": [["", "a < b"]]}
    too_long = await reader.http.post(
        "/api/highlight", json={"code": "x" * 20_001, "language": "python"}
    )
    assert too_long.status_code == 422


async def test_highlighting_is_limited_per_address_and_allowed_again_once_the_window_moves(
    clock: Any, server: LiveServer
) -> None:
    body = {"code": "x = 1", "language": "python"}
    # Several visitors (cookies) at one address share its allowance.
    async with Reader(server.url) as first, Reader(server.url) as second:
        for visitor in [first, second] * (HIGHLIGHTS.amount // 2):
            assert (await visitor.http.post("/api/highlight", json=body)).status_code == 200
        refused = await first.http.post("/api/highlight", json=body)
        assert refused.status_code == 429
        wait = int(refused.headers["retry-after"])
        assert 0 < wait <= HIGHLIGHTS.seconds
        assert refused.json() == {
            "detail": "Too many code blocks to highlight. Try again shortly.",
            "code": "rate_limited",
            "retryAfter": wait,
        }
        clock.shift(HIGHLIGHTS.seconds + 1)
        assert (await second.http.post("/api/highlight", json=body)).status_code == 200


async def test_personas_are_those_of_the_personas_file_with_the_first_as_default(
    reader: Reader,
) -> None:
    document = yaml.safe_load((REPO / "config" / "personas.yaml").read_text())
    expected = [
        {
            "id": persona["id"],
            "name": persona["name"],
            "description": persona["description"],
            "default": index == 0,
        }
        for index, persona in enumerate(document["personas"])
    ]
    assert len(expected) >= 2, "the test needs a default and a non-default persona"
    response = await reader.http.get("/api/personas")
    assert response.status_code == 200
    assert response.json() == expected


# --- chats -------------------------------------------------------------------------------------


async def test_chats_are_listed_most_recently_active_first(reader: Reader) -> None:
    assert await listed(reader) == []
    first, _ = await start_chat(reader, "How warm should a sourdough starter be?")
    second, _ = await start_chat(reader, "How do I dial in espresso at home?")
    chats = await listed(reader)
    assert [chat["id"] for chat in chats] == [second, first]
    assert chats[1]["title"].startswith("How warm should a sourdough starter be")
    assert {"id", "title", "model", "persona", "createdAt"} <= set(chats[0])
    await continue_chat(reader, first, "And how often should I feed it?")
    assert [chat["id"] for chat in await listed(reader)] == [first, second]


async def test_a_chat_reads_back_with_the_ids_the_websocket_announced(reader: Reader) -> None:
    chat_id, events = await start_chat(reader, "How warm should a sourdough starter be?")
    response = await reader.http.get(f"/api/chats/{chat_id}")
    assert response.status_code == 200
    detail = response.json()
    assert detail["chat"]["id"] == chat_id
    assert detail["lastSeq"] == max(event.get("seq", 0) for event in events)
    question, reply = detail["messages"]
    user_event = next(e for e in events if e["type"] == "user_message")
    done = events[-1]
    assert (question["id"], question["role"]) == (user_event["messageId"], "user")
    assert question["text"] == "How warm should a sourdough starter be?"
    assert (reply["id"], reply["role"], reply["status"]) == (
        done["messageId"],
        "assistant",
        "complete",
    )
    tool_uses = [e for e in events if e["type"] == "tool_use"]
    assert [call["toolUseId"] for call in reply["toolCalls"]] == [e["toolUseId"] for e in tool_uses]
    for message in detail["messages"]:
        assert {"id", "role", "text", "toolCalls", "status", "createdAt"} <= set(message)


async def test_another_visitors_chat_is_not_found_and_reveals_nothing(
    reader: Reader, other_reader: Reader
) -> None:
    question = "What did the blog say about lacto-fermented hot sauce?"
    chat_id, _ = await start_chat(reader, question)
    theirs = await other_reader.http.get(f"/api/chats/{chat_id}")
    nobodys = await other_reader.http.get(f"/api/chats/{uuid.uuid4()}")
    assert theirs.status_code == nobodys.status_code == 404
    assert theirs.json() == nobodys.json()
    for leak in (chat_id, "hot sauce", "blog-assistant"):
        assert leak not in theirs.text
    assert await listed(other_reader) == []


async def test_delete_removes_the_chat_and_its_transcript(reader: Reader) -> None:
    kept, _ = await start_chat(reader, "How do I dial in espresso at home?")
    doomed, _ = await start_chat(reader, "How warm should a sourdough starter be?")
    response = await reader.http.delete(f"/api/chats/{doomed}")
    assert response.status_code == 204
    assert response.content == b""
    assert (await reader.http.get(f"/api/chats/{doomed}")).status_code == 404
    assert [chat["id"] for chat in await listed(reader)] == [kept]
    assert (await reader.http.delete(f"/api/chats/{doomed}")).status_code == 404
    assert (await reader.http.get(f"/api/chats/{kept}")).status_code == 200


async def test_another_visitor_cannot_delete_a_chat(reader: Reader, other_reader: Reader) -> None:
    chat_id, _ = await start_chat(reader, "How warm should a sourdough starter be?")
    response = await other_reader.http.delete(f"/api/chats/{chat_id}")
    assert response.status_code == 404
    detail = await reader.http.get(f"/api/chats/{chat_id}")
    assert detail.status_code == 200
    assert len(detail.json()["messages"]) == 2


async def test_patch_renames_a_chat(reader: Reader) -> None:
    chat_id, _ = await start_chat(reader, "How warm should a sourdough starter be?")
    response = await reader.http.patch(f"/api/chats/{chat_id}", json={"title": "  Starter 🌡️  "})
    assert response.status_code == 200, response.text
    assert response.json()["title"] == "Starter 🌡️"
    assert (await listed(reader))[0]["title"] == "Starter 🌡️"
    detail = (await reader.http.get(f"/api/chats/{chat_id}")).json()
    assert detail["chat"]["title"] == "Starter 🌡️"


@pytest.mark.parametrize("body", [{"title": ""}, {"title": "   "}, {"title": "x" * 201}, {}])
async def test_patch_refuses_an_empty_or_overlong_title(
    reader: Reader, body: dict[str, Any]
) -> None:
    chat_id, _ = await start_chat(reader, "How warm should a sourdough starter be?")
    response = await reader.http.patch(f"/api/chats/{chat_id}", json=body)
    assert response.status_code == 422
    assert "title" in response.json()["detail"]
    assert (await listed(reader))[0]["title"].startswith("How warm")


async def test_another_visitor_cannot_rename_a_chat(reader: Reader, other_reader: Reader) -> None:
    chat_id, _ = await start_chat(reader, "How warm should a sourdough starter be?")
    response = await other_reader.http.patch(f"/api/chats/{chat_id}", json={"title": "Mine now"})
    assert response.status_code == 404
    assert (await listed(reader))[0]["title"].startswith("How warm")


# --- protocol schema ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("direction", "messages"),
    [("clientMessage", CLIENT_MESSAGES), ("serverMessage", SERVER_MESSAGES)],
)
def test_protocol_json_describes_every_message_of_the_protocol(
    schema: dict[str, Any], direction: str, messages: dict[str, list[str]]
) -> None:
    Draft202012Validator.check_schema(schema)
    union = schema["properties"][direction]
    mapping = union["discriminator"]["mapping"]
    assert set(messages) <= set(mapping)
    for kind, fields in messages.items():
        definition = schema["$defs"][mapping[kind].removeprefix("#/$defs/")]
        assert definition["properties"]["type"]["const"] == kind
        names = [field.rstrip("?") for field in fields]
        assert set(names) <= set(definition["properties"]), kind
        required = {field for field in fields if not field.endswith("?")}
        in_schema = set(definition.get("required", []))
        assert not in_schema & (set(names) - required), f"{kind}: an optional field is required"
        for field in required - in_schema:
            # A field the server always sends may be written as one with a default.
            default = definition["properties"][field].get("default")
            assert default is not None, f"{kind}.{field} is neither required nor defaulted"


async def test_protocol_json_accepts_the_frames_the_server_really_sends(
    reader: Reader, schema: dict[str, Any]
) -> None:
    server = validator(schema, "serverMessage")
    client = validator(schema, "clientMessage")
    ws = await reader.connect()
    await ws.chat("How warm should a sourdough starter be?")
    created = await ws.expect("chat_created")
    await ws.until("done")
    await ws.send(type="subscribe", chatId=created["chatId"])
    await ws.expect("subscribed")
    await ws.send(type="subscribe", chatId=str(uuid.uuid4()))
    await ws.expect("error")
    seen = {event["type"] for event in ws.received}
    assert {"chat_created", "user_message", "token", "done", "subscribed", "error"} <= seen
    for event in ws.received:
        errors = [error.message for error in server.iter_errors(event)]
        assert not errors, (event["type"], errors)
    assert not list(client.iter_errors({"type": "stop", "chatId": created["chatId"]}))
    assert list(client.iter_errors({"type": "stop"})), "a stop without chatId must not validate"
    done = next(e for e in ws.received if e["type"] == "done")
    assert list(server.iter_errors({**done, "reason": "bored"}))


# --- health ---------------------------------------------------------------------------------


async def test_healthz_is_ok_when_the_database_answers(server: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"
    assert response.json()["engine"] == "offline"

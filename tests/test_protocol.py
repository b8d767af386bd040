"""The protocol module is the contract: it parses strictly, and docs/protocol.md covers it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, get_args

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel
from pydantic_core import PydanticSerializationError

from blogchat import protocol as wire

DOC = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text()
# Every message of the protocol's unions: a new message is checked without being listed.
CLIENT: list[type[BaseModel]] = list(get_args(get_args(wire.ClientMessage)[0]))
SERVER: list[type[BaseModel]] = list(get_args(get_args(wire.ServerMessage)[0]))
SHAPES = [wire.ChatInfo, wire.MessageInfo, wire.ToolCallInfo, wire.Usage]


def wire_fields(model: type[BaseModel]) -> list[str]:
    return [field.alias or name for name, field in model.model_fields.items()]


def message_type(model: type[BaseModel]) -> str:
    annotation = model.model_fields["type"].annotation
    (value,) = get_args(annotation)
    return str(value)


def documented_row(kind: str) -> str:
    match = re.search(rf"^\| `{re.escape(kind)}` \|(.*)$", DOC, re.MULTILINE)
    assert match, f"message `{kind}` has no row in docs/protocol.md"
    return match.group(1)


@pytest.mark.parametrize("model", CLIENT + SERVER, ids=lambda m: m.__name__)
def test_every_message_and_each_of_its_fields_is_documented(model: type[BaseModel]) -> None:
    row = documented_row(message_type(model))
    for field in wire_fields(model):
        if field in ("type", "requestId") and model in CLIENT:
            continue  # every client message may carry requestId: documented once, above
        if field == "type":
            continue
        assert f"`{field}" in row, f"`{field}` of `{message_type(model)}` is not documented"


@pytest.mark.parametrize("model", SHAPES, ids=lambda m: m.__name__)
def test_every_field_of_the_shared_shapes_is_documented(model: type[BaseModel]) -> None:
    for field in wire_fields(model):
        assert re.search(rf"[`{{ ,.]{field}[?`,}}: ]", DOC), f"`{field}` of {model.__name__}"


def test_the_documented_message_types_are_exactly_the_modules() -> None:
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", DOC, re.MULTILINE))
    assert documented == {message_type(m) for m in CLIENT + SERVER}


def test_the_documented_error_codes_are_exactly_the_modules() -> None:
    section = DOC.split("Error codes:", 1)[1].split("Order and identity", 1)[0]
    documented = set(re.findall(r"`([a-z_]+)`", section))
    assert documented == set(get_args(wire.ErrorCode))


def test_the_documented_close_codes_and_settings_exist() -> None:
    for code in ("1001", "1009", "4008", "4401", "4403"):
        assert code in DOC
    from blogchat.connection import CLOSE_FORBIDDEN_ORIGIN, CLOSE_SLOW_CONSUMER, CLOSE_UNAUTHORIZED

    assert {CLOSE_UNAUTHORIZED, CLOSE_FORBIDDEN_ORIGIN, CLOSE_SLOW_CONSUMER} == {4401, 4403, 4008}


def test_server_messages_are_camel_case_and_leave_out_absent_optional_fields() -> None:
    done = wire.Done(
        chat_id="c",
        seq=3,
        message_id="m",
        reason="complete",
        model="offline",
        usage=wire.Usage(input_tokens=1, output_tokens=2),
    )
    assert done.to_json() == (
        '{"type":"done","chatId":"c","seq":3,"messageId":"m","reason":"complete",'
        '"model":"offline","usage":{"inputTokens":1,"outputTokens":2}}'
    )
    error = wire.Error(code="not_found", message="gone")
    assert '"retryable":false' in error.to_json()
    assert "seq" not in error.to_json()


@given(
    kind=st.sampled_from([wire.Token, wire.Thinking]),
    text=st.text(),
    ids=st.text(min_size=1),
    seq=st.integers(min_value=0, max_value=2**63),
)
def test_text_frames_are_the_bytes_of_the_generic_encoding(
    kind: type[wire.Token] | type[wire.Thinking], text: str, ids: str, seq: int
) -> None:
    # Token and Thinking write their frames directly: byte for byte what every other
    # message's encoding gives, whatever the text (quotes, control characters, any script).
    event = kind(chat_id=ids, seq=seq, message_id=ids[::-1], text=text)
    assert event.to_json() == event.model_dump_json(by_alias=True, exclude_none=True)


@pytest.mark.parametrize("text", ['say "hi"\\n\t\x00\x1f\x7f', "\u2028 été 漢字 🙂", ""])
def test_text_frames_escape_as_the_generic_encoding(text: str) -> None:
    token = wire.Token(chat_id="c1", seq=7, message_id="m1", text=text)
    assert token.to_json() == token.model_dump_json(by_alias=True, exclude_none=True)
    assert json.loads(token.to_json()) == {
        "type": "token",
        "chatId": "c1",
        "seq": 7,
        "messageId": "m1",
        "text": text,
    }


def test_a_text_frame_with_a_lone_surrogate_fails_as_the_generic_encoding() -> None:
    token = wire.Token(chat_id="c1", seq=7, message_id="m1", text="\ud800")
    with pytest.raises(PydanticSerializationError, match="surrogates not allowed"):
        token.model_dump_json(by_alias=True, exclude_none=True)
    with pytest.raises(PydanticSerializationError, match="surrogates not allowed"):
        token.to_json()


def test_a_tool_call_without_output_yet_keeps_its_output_key() -> None:
    info = wire.ToolCallInfo(tool_use_id="t", name="getPost", input={}, output=None, is_error=False)
    message = wire.MessageInfo(
        id="m",
        role="assistant",
        text="",
        tool_calls=[info],
        status="incomplete",
        created_at="2026-01-01T00:00:00Z",
    )
    (call,) = json.loads(message.to_json())["toolCalls"]
    assert call == {
        "toolUseId": "t",
        "name": "getPost",
        "input": {},
        "output": None,
        "isError": False,
    }


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ('{"type": "subscribe", "chatId": "c", "afterSeq": "3"}', "bad_request"),
        ('{"type": "subscribe", "chatId": "c", "afterSeq": 3.0}', "bad_request"),
        ('{"type": "subscribe", "chatId": "c", "afterSeq": true}', "bad_request"),
        ('{"type": "chat", "clientMessageId": "a", "text": "x", "extra": 1}', "bad_request"),
        ('{"type": "chat", "clientMessageId": "", "text": "x"}', "bad_request"),
        ('{"type": "stop", "chatId": "' + "c" * 65 + '"}', "bad_request"),
        ('{"type": "Subscribe", "chatId": "c"}', "unknown_type"),
    ],
)
def test_client_messages_are_parsed_strictly(frame: str, code: str) -> None:
    with pytest.raises(wire.ProtocolError) as refused:
        wire.parse_client_message(frame)
    assert refused.value.code == code


def test_a_valid_chat_message_parses_with_its_request_id() -> None:
    message = wire.parse_client_message(
        '{"type": "chat", "chatId": null, "clientMessageId": "u", "text": "hi",'
        ' "model": "opus", "persona": "blog-assistant", "requestId": "r"}'
    )
    assert isinstance(message, wire.Chat)
    assert (message.chat_id, message.model, message.request_id) == (None, "opus", "r")


@given(st.text(max_size=300))
def test_any_text_frame_parses_or_raises_a_protocol_error(frame: str) -> None:
    try:
        wire.parse_client_message(frame)
    except wire.ProtocolError as exc:
        code = exc.code
    else:
        code = "bad_request"  # the rare valid message is fine too
    assert code in ("bad_request", "unknown_type")


def test_the_json_schema_requires_what_the_server_always_sends() -> None:
    schema: dict[str, Any] = wire.json_schema()
    error = schema["$defs"]["Error"]
    assert {"type", "code", "message", "retryable"} <= set(error["required"])
    assert "seq" not in error["required"]
    tool_call = schema["$defs"]["ToolCallInfo"]
    assert set(tool_call["required"]) == {"toolUseId", "name", "input", "output", "isError"}

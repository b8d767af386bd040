"""The WebSocket protocol, version 1: one Pydantic model per message (see docs/protocol.md).

Every frame in either direction goes through these models. Field names on the wire are
camelCase; in Python they are snake_case.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    model_serializer,
)
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticUndefined, to_json

PROTOCOL_VERSION = 1

ModelAlias = Literal["haiku", "sonnet", "opus"]
DoneReason = Literal["complete", "stopped", "max_turns", "error"]
# (`not_answered`: a message dropped from the queue of a chat nobody watched any more.)
MessageStatus = Literal["complete", "stopped", "max_turns", "error", "incomplete", "not_answered"]
ErrorCode = Literal[
    "bad_request",
    "unknown_type",
    "too_large",
    "not_found",
    "forbidden",
    "model_not_allowed",
    "persona_unknown",
    "persona_locked",
    "model_error",
    "internal",
    "rate_limited",
    "queue_full",
    "budget_exceeded",
    "chat_too_long",
    "busy",
    "not_answered",
]
# The largest integer a JavaScript client can hold exactly.
MAX_SAFE_INTEGER = 2**53 - 1


def no_nul(value: str) -> str:
    """Refuse U+0000 in what a client sends: PostgreSQL cannot store it, no reader types it."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def valid_text(value: str) -> str:
    """Refuse what no reader types and no store keeps: NUL, and lone surrogates (a JSON
    `"\\ud800"` decodes to a string UTF-8 cannot encode)."""
    no_nul(value)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (no lone surrogates)") from None
    return value


Text = Annotated[str, AfterValidator(valid_text)]
Id = Annotated[str, StringConstraints(min_length=1, max_length=64), AfterValidator(valid_text)]
RequestId = Annotated[str, StringConstraints(max_length=128), AfterValidator(valid_text)]


def _require_always_sent(schema: dict[str, Any], model: type[BaseModel]) -> None:
    """Mark fields with a non-null default (`type`, `retryable`, ...) as required: frames
    leave out only null fields, so these are always on the wire."""
    required: list[str] = schema.setdefault("required", [])
    for name, field in model.model_fields.items():
        alias = field.alias or name
        always = field.default_factory is not None or field.default not in (None, PydanticUndefined)
        if always and alias not in required:
            required.append(alias)


class WireModel(BaseModel):
    """Base of every protocol model: camelCase on the wire, unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        json_schema_extra=_require_always_sent,
    )

    def to_json(self) -> str:
        """The frame for this message, without absent optional fields."""
        return self.model_dump_json(by_alias=True, exclude_none=True)


# --- client -> server ---------------------------------------------------------------------


class ClientModel(WireModel):
    """Base of client messages: strict types, so "3" is not taken for 3."""

    model_config = ConfigDict(strict=True)


class Subscribe(ClientModel):
    """Receive a chat's events: its history first, or a replay after `afterSeq`."""

    type: Literal["subscribe"]
    chat_id: Id
    after_seq: Annotated[int, Field(ge=0, le=MAX_SAFE_INTEGER)] | None = None
    request_id: RequestId | None = None


class Unsubscribe(ClientModel):
    """Stop receiving a chat's events."""

    type: Literal["unsubscribe"]
    chat_id: Id
    request_id: RequestId | None = None


class Chat(ClientModel):
    """Send a user message, to an existing chat or (no chatId) to a new one."""

    type: Literal["chat"]
    chat_id: Id | None = None
    client_message_id: Id
    text: Text
    model: ModelAlias | None = None
    persona: Id | None = None
    # Extension: the slug of the post the chat is about ("Ask about this post"); only
    # when creating a chat.
    post: Annotated[str, StringConstraints(max_length=200), AfterValidator(valid_text)] | None = (
        None
    )
    # Extension: ask the chat's last question again in place of this answer (the chat's
    # last message); `text` is not used. Or: replace the reader's last message (this user
    # message) and its answer with `text`. The replaced messages leave the conversation.
    regenerate: Id | None = None
    edit: Id | None = None
    request_id: RequestId | None = None


class Stop(ClientModel):
    """Stop the chat's running turn gracefully."""

    type: Literal["stop"]
    chat_id: Id
    request_id: RequestId | None = None


class Ping(ClientModel):
    """Extension: ask for a `pong`, so a client can tell a live connection from a dead one."""

    type: Literal["ping"]
    request_id: RequestId | None = None


ClientMessage = Annotated[Subscribe | Unsubscribe | Chat | Stop | Ping, Field(discriminator="type")]
CLIENT_TYPES = frozenset({"subscribe", "unsubscribe", "chat", "stop", "ping"})
_client_adapter: TypeAdapter[ClientMessage] = TypeAdapter(ClientMessage)


# --- shared shapes -------------------------------------------------------------------------


class Usage(WireModel):
    """Tokens a turn consumed. Input tokens include the cached ones."""

    input_tokens: int
    output_tokens: int
    # Extension: of the input tokens, those read from and written to the prompt cache.
    cache_read_tokens: int | None = None
    cache_creation_tokens: int | None = None


class ChatInfo(WireModel):
    """A chat's summary, as in `subscribed.chat` and `GET /api/chats`."""

    id: str
    title: str
    model: ModelAlias
    persona: str
    created_at: datetime
    updated_at: datetime | None = None
    # Extension: the post the chat was started from.
    post: str | None = None
    # Extension, in search results only: the words around the first match in its messages.
    snippet: str | None = None


class ToolCallInfo(WireModel):
    """A tool call inside a stored answer."""

    tool_use_id: str
    name: str
    input: dict[str, Any]
    output: str | None
    is_error: bool

    @model_serializer(mode="wrap")
    def _keep_output(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # A tool still running has no output yet; say so with null rather than leave
        # the field out (frames are written with exclude_none).
        data: dict[str, Any] = handler(self)
        data.setdefault("output", None)
        return data


class MessageInfo(WireModel):
    """A message of a chat's history, as in `subscribed.messages` and `GET /api/chats/{id}`."""

    id: str
    role: Literal["user", "assistant"]
    text: str
    thinking: str | None = None
    tool_calls: list[ToolCallInfo] = Field(default_factory=list)
    status: MessageStatus
    model: str | None = None
    usage: Usage | None = None
    created_at: datetime
    # Extensions: the client's id of a user message; the rendered, sanitized HTML of a
    # finished answer; the max-turns warning and the error of an answer; its seq range.
    client_message_id: str | None = None
    html: str | None = None
    warning: str | None = None
    error: str | None = None
    seq_start: int | None = None
    seq_end: int | None = None
    # Extension: the provider's reason for ending the answer (as in `done.stopReason`).
    stop_reason: str | None = None


# --- server -> client ----------------------------------------------------------------------


class Subscribed(WireModel):
    """Answer to `subscribe`."""

    type: Literal["subscribed"] = "subscribed"
    chat_id: str
    last_seq: int
    busy: bool
    chat: ChatInfo
    messages: list[MessageInfo] | None = None
    request_id: str | None = None


class ChatCreated(WireModel):
    """Answer to a `chat` with no chatId; the sender is now subscribed to the new chat."""

    type: Literal["chat_created"] = "chat_created"
    chat_id: str
    client_message_id: str
    model: ModelAlias
    persona: str
    request_id: str | None = None


class UserMessage(WireModel):
    """A user message was accepted (it runs now or waits in the queue)."""

    type: Literal["user_message"] = "user_message"
    chat_id: str
    seq: int
    message_id: str
    client_message_id: str
    text: str
    # Extension: when it was accepted.
    created_at: datetime | None = None
    # Extension: the messages this one replaces (a regenerated or edited question and
    # the answers it had), which leave the transcript.
    replaces: list[str] | None = None


def _text_frame(kind: str, chat_id: str, seq: int, message_id: str, text: str) -> str:
    """The frame of a piece of text (`token`, `thinking`), written directly: the same bytes
    as `WireModel.to_json` (the same string encoder, fields in declaration order), for a
    third of its cost, paid on every piece of every answer."""
    return (
        f'{{"type":"{kind}","chatId":{_string(chat_id)},"seq":{seq:d},'
        f'"messageId":{_string(message_id)},"text":{_string(text)}}}'
    )


def _string(value: str) -> str:
    return to_json(value).decode()


class Thinking(WireModel):
    """A piece of extended-thinking text."""

    type: Literal["thinking"] = "thinking"
    chat_id: str
    seq: int
    message_id: str
    text: str

    def to_json(self) -> str:
        """The frame (see `_text_frame`)."""
        return _text_frame(self.type, self.chat_id, self.seq, self.message_id, self.text)


class Token(WireModel):
    """A piece of answer text."""

    type: Literal["token"] = "token"
    chat_id: str
    seq: int
    message_id: str
    text: str

    def to_json(self) -> str:
        """The frame (see `_text_frame`)."""
        return _text_frame(self.type, self.chat_id, self.seq, self.message_id, self.text)


class ToolUse(WireModel):
    """The agent called a tool."""

    type: Literal["tool_use"] = "tool_use"
    chat_id: str
    seq: int
    message_id: str
    tool_use_id: str
    name: str
    input: dict[str, Any]


class ToolResult(WireModel):
    """A tool finished."""

    type: Literal["tool_result"] = "tool_result"
    chat_id: str
    seq: int
    message_id: str
    tool_use_id: str
    output: str
    is_error: bool


class Done(WireModel):
    """The turn ended."""

    type: Literal["done"] = "done"
    chat_id: str
    seq: int
    message_id: str
    reason: DoneReason
    model: str
    usage: Usage
    warning: str | None = None
    # Extension: the finished answer rendered to sanitized HTML.
    html: str | None = None
    # Extension: the provider's reason for ending the last response of the turn
    # (end_turn, tool_use, max_tokens, refusal, ...), when there was one.
    stop_reason: str | None = None


class Error(WireModel):
    """Something failed. It carries a seq only when it is part of a transcript."""

    type: Literal["error"] = "error"
    code: ErrorCode
    message: str
    chat_id: str | None = None
    seq: int | None = None
    retryable: bool = False
    request_id: str | None = None
    # Extension: after how many seconds trying again may succeed (a limit's window).
    retry_after: int | None = None


StatusState = Literal["retrying", "waiting"]


class Status(WireModel):
    """Extension: what a turn is waiting for. Transient: it has no `seq`, is not logged
    and is not replayed; any later event of the chat supersedes it."""

    type: Literal["status"] = "status"
    chat_id: str
    state: StatusState
    # The answer the turn is writing.
    message_id: str | None = None
    # retrying: the attempt about to start (2 for the first retry), of how many at most,
    # and in how long.
    attempt: int | None = None
    max_attempts: int | None = None
    retry_in_ms: int | None = None
    # waiting: the place in line (1: next).
    position: int | None = None


class ChatUpdated(WireModel):
    """Extension: a chat's summary changed (a generated title, a rename, a new model).
    Transient: no `seq`, not logged, not replayed (`subscribed.chat` has the chat as it is)."""

    type: Literal["chat_updated"] = "chat_updated"
    chat_id: str
    chat: ChatInfo


class Pong(WireModel):
    """Extension: answer to `ping`."""

    type: Literal["pong"] = "pong"
    request_id: str | None = None


TranscriptEvent = UserMessage | Thinking | Token | ToolUse | ToolResult | Done | Error
ServerMessage = Annotated[
    Subscribed
    | ChatCreated
    | UserMessage
    | Thinking
    | Token
    | ToolUse
    | ToolResult
    | Done
    | Error
    | Status
    | ChatUpdated
    | Pong,
    Field(discriminator="type"),
]
_server_adapter: TypeAdapter[ServerMessage] = TypeAdapter(ServerMessage)


# --- parsing -------------------------------------------------------------------------------


class ProtocolError(Exception):
    """A client frame that is not a valid message; becomes an `error` frame."""

    def __init__(self, code: ErrorCode, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message
        self.request_id = request_id

    def to_error(self) -> Error:
        """The `error` message that answers the bad frame."""
        return Error(code=self.code, message=self.message, request_id=self.request_id)


def parse_client_message(frame: str) -> ClientMessage:
    """Validate one client frame, or raise ProtocolError with the right error code."""
    try:
        raw = json.loads(frame)
    except (ValueError, RecursionError):
        # (ValueError: not JSON, or an integer of more digits than Python converts.)
        raise ProtocolError("bad_request", "the frame is not valid JSON") from None
    if not isinstance(raw, dict):
        raise ProtocolError("bad_request", "a message must be a JSON object")
    request_id = raw.get("requestId")
    if not isinstance(request_id, str) or len(request_id) > 128:
        request_id = None
    else:
        try:
            valid_text(request_id)
        except ValueError:
            request_id = None
    kind = raw.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("bad_request", "the message has no string `type`", request_id)
    if kind not in CLIENT_TYPES:
        shown = kind if len(kind) <= 40 else kind[:40] + "..."
        shown = shown.encode("utf-8", "replace").decode()
        raise ProtocolError("unknown_type", f"unknown message type {shown!r}", request_id)
    try:
        return _client_adapter.validate_python(raw)
    except ValidationError as exc:
        raise ProtocolError("bad_request", _describe(exc), request_id) from None


def parse_server_message(frame: str | bytes) -> ServerMessage:
    """Validate one server frame (used by tests and clients written in Python)."""
    return _server_adapter.validate_json(frame)


def _describe(exc: ValidationError) -> str:
    error = exc.errors(include_url=False, include_input=False)[0]
    # Drop the union tag ("chat") from the location so it reads as the field path.
    path = [str(part) for part in error["loc"][1:]] or [str(p) for p in error["loc"]]
    where = ".".join(path) or "message"
    return f"invalid field `{where}`: {error['msg']}"


def json_schema() -> dict[str, Any]:
    """JSON Schema for every client and server message (served at /api/protocol.json)."""
    client = _client_adapter.json_schema(by_alias=True, ref_template="#/$defs/{model}")
    server = _server_adapter.json_schema(
        by_alias=True, ref_template="#/$defs/{model}", mode="serialization"
    )
    defs = {**client.pop("$defs", {}), **server.pop("$defs", {})}
    # Its wrap serializer hides the shape from the serialization schema; it is the same.
    defs["ToolCallInfo"] = ToolCallInfo.model_json_schema(by_alias=True)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "blogchat WebSocket protocol",
        "version": PROTOCOL_VERSION,
        "$defs": defs,
        "properties": {"clientMessage": client, "serverMessage": server},
    }

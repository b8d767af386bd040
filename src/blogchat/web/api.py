"""The REST companions of the WebSocket protocol (JSON, same cookie)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Request, Response, status
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints
from pydantic.alias_generators import to_camel

from blogchat import policy
from blogchat import protocol as wire
from blogchat.rendering import MAX_HIGHLIGHT_CHARS, highlight
from blogchat.session import chat_info, message_info
from blogchat.store import ChatRecord
from blogchat.visitors import AuthError, Visitor
from blogchat.web.deps import (
    ChatIdPath,
    CurrentVisitor,
    HubDep,
    PersonasDep,
    SessionsDep,
    SettingsDep,
    StoreDep,
    VisitorsDep,
)
from blogchat.web.identity import set_visitor_cookie

router = APIRouter(prefix="/api")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)


class Credentials(_Body):
    """Email and password, for registering and signing in."""

    email: Annotated[
        str, StringConstraints(min_length=1, max_length=320), AfterValidator(wire.no_nul)
    ]
    password: Annotated[str, StringConstraints(min_length=1, max_length=1024)]


class ChatPatch(_Body):
    """Rename a chat."""

    title: Annotated[
        str,
        StringConstraints(min_length=1, max_length=200, strip_whitespace=True),
        AfterValidator(wire.no_nul),
    ]


class Me(_Body):
    """The current visitor."""

    id: str
    anonymous: bool
    email: str | None = None


class ModelOut(_Body):
    """A model a visitor may (or may not) choose."""

    id: wire.ModelAlias
    label: str
    allowed: bool
    engine: policy.Engine = Field(description="Extension: which engine answers.")
    description: str = Field(description="Extension: what the model is good for, in a line.")


class CodeIn(_Body):
    """A finished block of code from an answer, to highlight."""

    code: Annotated[str, StringConstraints(max_length=MAX_HIGHLIGHT_CHARS)]
    language: Annotated[str, StringConstraints(max_length=40)]


class HighlightedCode(_Body):
    """Code as (CSS class, text) pieces; "" is plain text. The pieces join back to the code."""

    pieces: list[tuple[str, str]]


class PersonaOut(_Body):
    """A persona a new chat may use."""

    id: str
    name: str
    description: str
    default: bool = Field(default=False, description="Extension: the default persona.")


class ChatDetail(_Body):
    """A chat with its whole transcript."""

    chat: wire.ChatInfo
    last_seq: int
    busy: bool = Field(default=False, description="Extension: a turn is running.")
    messages: list[wire.MessageInfo]


def _me(visitor: Visitor) -> Me:
    return Me(id=visitor.id, anonymous=visitor.anonymous, email=visitor.email)


def _signed_in(request: Request, visitors: Any, visitor: Visitor, code: int) -> JSONResponse:
    response = JSONResponse(
        _me(visitor).model_dump(by_alias=True, exclude_none=True), status_code=code
    )
    set_visitor_cookie(response, request, visitors, visitor)
    return response


@router.get("/me", response_model=Me, response_model_exclude_none=True)
async def me(visitor: CurrentVisitor) -> Me:
    """Who this browser is."""
    return _me(visitor)


@router.post(
    "/auth/register",
    status_code=status.HTTP_201_CREATED,
    response_model=Me,
    responses={409: {"description": "Email taken"}, 422: {"description": "Weak password"}},
)
async def register(
    body: Credentials, request: Request, visitor: CurrentVisitor, visitors: VisitorsDep
) -> JSONResponse:
    """Create an account and sign this browser in; its anonymous chats come along."""
    try:
        account = await visitors.register(visitor, body.email, body.password)
    except AuthError as exc:
        raise HTTPException(exc.status, exc.message) from None
    return _signed_in(request, visitors, account, status.HTTP_201_CREATED)


@router.post(
    "/auth/login", response_model=Me, responses={401: {"description": "Wrong email or password"}}
)
async def login(
    body: Credentials, request: Request, visitor: CurrentVisitor, visitors: VisitorsDep
) -> JSONResponse:
    """Sign this browser in; its anonymous chats move to the account."""
    try:
        account = await visitors.login(visitor, body.email, body.password)
    except AuthError as exc:
        raise HTTPException(exc.status, exc.message) from None
    return _signed_in(request, visitors, account, status.HTTP_200_OK)


@router.post("/auth/logout", response_model=Me)
async def logout(request: Request, visitor: CurrentVisitor, visitors: VisitorsDep) -> JSONResponse:
    """Sign out; the browser continues as a new anonymous visitor."""
    anonymous = await visitors.logout(visitor)
    return _signed_in(request, visitors, anonymous, status.HTTP_200_OK)


@router.get("/models", response_model=list[ModelOut])
async def models(visitor: CurrentVisitor, settings: SettingsDep) -> list[ModelOut]:
    """The model aliases, with whether this visitor may use each."""
    engine: policy.Engine = "claude" if settings.claude_enabled else "offline"
    return [
        ModelOut(
            id=choice.id,
            label=choice.label,
            allowed=choice.allowed,
            engine=engine,
            description=choice.description,
        )
        for choice in policy.choices(settings, anonymous=visitor.anonymous)
    ]


@router.post("/highlight", response_model=HighlightedCode)
async def highlight_code(body: CodeIn) -> HighlightedCode:
    """Extension: syntax highlighting for a code block that finished streaming.

    The chat renders an answer while it streams; once one of its code blocks is complete, it
    asks here for the same Pygments reading that the answer's final HTML will carry.
    """
    return HighlightedCode(pieces=highlight(body.code, body.language))


@router.get("/personas", response_model=list[PersonaOut])
async def personas(all_personas: PersonasDep) -> list[PersonaOut]:
    """The personas a new chat can use; the first is the default."""
    return [
        PersonaOut(
            id=persona.id,
            name=persona.name,
            description=persona.description,
            default=persona is all_personas.default,
        )
        for persona in all_personas.values()
    ]


async def _own_chat(store: StoreDep, visitor: Visitor, chat_id: str) -> ChatRecord:
    chat = await store.chats.get_chat(chat_id)
    if chat is None or chat.owner_id != visitor.id:
        # The same answer whether the chat exists or belongs to someone else.
        raise HTTPException(status.HTTP_404_NOT_FOUND, "There is no such chat.")
    return chat


@router.get("/chats", response_model=list[wire.ChatInfo], response_model_by_alias=True)
async def chats(visitor: CurrentVisitor, store: StoreDep) -> list[wire.ChatInfo]:
    """This visitor's chats, most recently active first."""
    return [chat_info(chat) for chat in await store.chats.list_chats(visitor.id)]


@router.get("/chats/{chat_id}", response_model=ChatDetail, response_model_exclude_none=True)
async def chat(
    chat_id: ChatIdPath, visitor: CurrentVisitor, store: StoreDep, sessions: SessionsDep
) -> ChatDetail:
    """A chat and its transcript, including a running answer so far."""
    record = await _own_chat(store, visitor, chat_id)
    session = sessions.get(chat_id)
    if session is not None:
        return ChatDetail(
            chat=chat_info(session.chat),
            last_seq=session.last_seq,
            busy=session.busy,
            messages=session.message_infos(),
        )
    messages = await store.chats.get_messages(chat_id)
    return ChatDetail(
        chat=chat_info(record),
        last_seq=record.last_seq,
        messages=[message_info(message, sessions.render) for message in messages],
    )


@router.patch("/chats/{chat_id}", response_model=wire.ChatInfo)
async def rename_chat(
    chat_id: ChatIdPath,
    body: ChatPatch,
    visitor: CurrentVisitor,
    store: StoreDep,
    sessions: SessionsDep,
) -> wire.ChatInfo:
    """Extension: rename a chat."""
    await _own_chat(store, visitor, chat_id)
    await store.chats.update_chat(chat_id, title=body.title)
    updated = await store.chats.get_chat(chat_id)
    assert updated is not None
    session = sessions.get(chat_id)
    if session is not None:
        session.set_chat(updated)
    return chat_info(updated)


@router.delete("/chats/{chat_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_chat(
    chat_id: ChatIdPath,
    visitor: CurrentVisitor,
    store: StoreDep,
    sessions: SessionsDep,
    hub: HubDep,
) -> Response:
    """Delete a chat and its transcript (a running turn is stopped first)."""
    await _own_chat(store, visitor, chat_id)
    await sessions.close(chat_id)
    await store.chats.delete_chat(chat_id)
    hub.chat_deleted(chat_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/protocol.json")
async def protocol_schema() -> dict[str, Any]:
    """JSON Schema of every WebSocket message."""
    return wire.json_schema()

"""The REST companions of the WebSocket protocol (JSON, same cookie)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints
from pydantic.alias_generators import to_camel

from blogchat import policy
from blogchat import protocol as wire
from blogchat.addresses import client_address
from blogchat.chats import MAX_SEARCH_CHARS, ChatError
from blogchat.ratelimit import Decision, Rate
from blogchat.rendering import MAX_HIGHLIGHT_CHARS, highlight
from blogchat.visitors import AuthError, Visitor
from blogchat.web.deps import (
    ChatIdPath,
    ChatsDep,
    CurrentVisitor,
    LimiterDep,
    PersonasDep,
    SettingsDep,
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


def _refused(exc: AuthError) -> JSONResponse:
    if exc.retry_after is not None:
        return _too_many(exc.message, exc.retry_after, status_code=exc.status)
    return JSONResponse({"detail": exc.message}, status_code=exc.status)


def _too_many(message: str, decision: Decision, *, status_code: int = 429) -> JSONResponse:
    """A rate limit's refusal: 429 with `Retry-After`, and the same in the body."""
    wait = decision.retry_after_header
    body = {"detail": message, "code": "rate_limited", "retryAfter": int(wait)}
    return JSONResponse(body, status_code=status_code, headers={"Retry-After": wait})


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
    responses={
        409: {"description": "Email taken"},
        422: {"description": "Weak password"},
        429: {"description": "Too many registrations from this address (Retry-After)"},
    },
)
async def register(
    body: Credentials, request: Request, visitor: CurrentVisitor, visitors: VisitorsDep
) -> JSONResponse:
    """Create an account and sign this browser in; its anonymous chats come along."""
    try:
        account = await visitors.register(
            visitor, body.email, body.password, address=client_address(request.scope)
        )
    except AuthError as exc:
        return _refused(exc)
    return _signed_in(request, visitors, account, status.HTTP_201_CREATED)


@router.post(
    "/auth/login",
    response_model=Me,
    responses={
        401: {"description": "Wrong email or password"},
        429: {"description": "Too many failed sign-ins (Retry-After)"},
    },
)
async def login(
    body: Credentials, request: Request, visitor: CurrentVisitor, visitors: VisitorsDep
) -> JSONResponse:
    """Sign this browser in; its anonymous chats move to the account."""
    try:
        account = await visitors.login(
            visitor, body.email, body.password, address=client_address(request.scope)
        )
    except AuthError as exc:
        return _refused(exc)
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


# Highlighting is pure Python (up to about 60 ms for the longest block): a client address
# gets this many per minute, far more than the code blocks a reader is shown.
HIGHLIGHTS = Rate("highlights-address", 60, 60)


@router.post(
    "/highlight",
    response_model=HighlightedCode,
    responses={429: {"description": "Too many highlights from this address (Retry-After)"}},
)
async def highlight_code(
    body: CodeIn, request: Request, limiter: LimiterDep
) -> HighlightedCode | JSONResponse:
    """Extension: syntax highlighting for a code block that finished streaming.

    The chat renders an answer while it streams; once one of its code blocks is complete, it
    asks here for the same Pygments reading that the answer's final HTML will carry.
    """
    decision = await limiter.hit(HIGHLIGHTS, client_address(request.scope))
    if not decision.allowed:
        return _too_many("Too many code blocks to highlight. Try again shortly.", decision)
    # Off the event loop, so streaming answers do not wait for it.
    pieces = await asyncio.to_thread(highlight, body.code, body.language)
    return HighlightedCode(pieces=pieces)


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


def _no_nul(value: str | None) -> str | None:
    return None if value is None else wire.valid_text(value)


def _not_found(exc: ChatError) -> HTTPException:
    # Another visitor's chat is answered exactly like one that does not exist.
    return HTTPException(status.HTTP_404_NOT_FOUND, exc.message)


def _refused_change(exc: ChatError) -> HTTPException:
    # With several instances, the chat's owner may not answer for a moment: not a 404.
    if exc.code == "not_found":
        return _not_found(exc)
    return HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, exc.message)


@router.get(
    "/chats",
    response_model=list[wire.ChatInfo],
    response_model_by_alias=True,
)
async def chats(
    visitor: CurrentVisitor,
    service: ChatsDep,
    q: Annotated[str | None, Query(max_length=MAX_SEARCH_CHARS), AfterValidator(_no_nul)] = None,
) -> Sequence[wire.ChatInfo]:
    """This visitor's chats, most recently active first; with `q`, only those whose title or
    messages contain it (extension: search)."""
    if q is not None and q.strip():
        return await service.search(visitor, q)
    return await service.list(visitor)


@router.get("/chats/{chat_id}", response_model=ChatDetail, response_model_exclude_none=True)
async def chat(chat_id: ChatIdPath, visitor: CurrentVisitor, service: ChatsDep) -> ChatDetail:
    """A chat and its transcript, including a running answer so far."""
    try:
        detail = await service.detail(visitor, chat_id)
    except ChatError as exc:
        raise _not_found(exc) from None
    return ChatDetail(
        chat=detail.chat, last_seq=detail.last_seq, busy=detail.busy, messages=detail.messages
    )


@router.patch("/chats/{chat_id}", response_model=wire.ChatInfo)
async def rename_chat(
    chat_id: ChatIdPath, body: ChatPatch, visitor: CurrentVisitor, service: ChatsDep
) -> wire.ChatInfo:
    """Extension: rename a chat."""
    try:
        return await service.rename(visitor, chat_id, body.title)
    except ChatError as exc:
        raise _not_found(exc) from None


@router.delete("/chats/{chat_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_chat(chat_id: ChatIdPath, visitor: CurrentVisitor, service: ChatsDep) -> Response:
    """Delete a chat and its transcript (a running turn is stopped first)."""
    try:
        await service.delete(visitor, chat_id)
    except ChatError as exc:
        raise _refused_change(exc) from None
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/protocol.json")
async def protocol_schema() -> dict[str, Any]:
    """JSON Schema of every WebSocket message."""
    return wire.json_schema()

"""Request-scoped dependencies as typed aliases, so routes read like their contract."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Request
from pydantic import AfterValidator

from blogchat.chats import Chats
from blogchat.content import Blog
from blogchat.hub import Hub
from blogchat.personas import Personas
from blogchat.protocol import no_nul
from blogchat.ratelimit import RateLimiter
from blogchat.search import SearchIndex
from blogchat.session import ChatSessions
from blogchat.settings import Settings
from blogchat.store import Store
from blogchat.visitors import Visitor, Visitors


def _visitor(request: Request) -> Visitor:
    visitor: Visitor = request.state.visitor
    return visitor


def _state(name: str) -> object:
    def get(request: Request) -> object:
        return getattr(request.app.state, name)

    get.__name__ = f"get_{name}"
    return get


CurrentVisitor = Annotated[Visitor, Depends(_visitor)]
SettingsDep = Annotated[Settings, Depends(_state("settings"))]
StoreDep = Annotated[Store, Depends(_state("store"))]
BlogDep = Annotated[Blog, Depends(_state("blog"))]
SearchDep = Annotated[SearchIndex, Depends(_state("search"))]
PersonasDep = Annotated[Personas, Depends(_state("personas"))]
SessionsDep = Annotated[ChatSessions, Depends(_state("sessions"))]
VisitorsDep = Annotated[Visitors, Depends(_state("visitors"))]
HubDep = Annotated[Hub, Depends(_state("hub"))]
ChatsDep = Annotated[Chats, Depends(_state("chats"))]
LimiterDep = Annotated[RateLimiter, Depends(_state("limiter"))]
# A chat id in a URL: any string (unknown ones are simply not found) but NUL.
ChatIdPath = Annotated[str, Path(), AfterValidator(no_nul)]

"""The application: wires content, store, engine, sessions and hub into a FastAPI app."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from blogchat.chats import Chats
from blogchat.content import Blog
from blogchat.engines.base import AgentEngine
from blogchat.engines.offline import OfflineEngine
from blogchat.hub import Hub
from blogchat.origins import origin_allowed
from blogchat.personas import Personas, load_personas
from blogchat.quotas import Connections, Quotas, TurnGate
from blogchat.ratelimit import RateLimiter
from blogchat.rendering import render_answer
from blogchat.search import SearchIndex
from blogchat.session import ChatSessions, SessionLimits, SessionTimings
from blogchat.settings import Settings, load_settings
from blogchat.store import Store
from blogchat.telemetry import telemetry_for
from blogchat.titles import Titles
from blogchat.tools import BlogTools
from blogchat.visitors import AccountLimits, Visitors
from blogchat.web import api, pages, realtime
from blogchat.web.bodies import BodyLimit
from blogchat.web.headers import SecurityHeaders
from blogchat.web.identity import VisitorMiddleware

if TYPE_CHECKING:
    from blogchat.cluster.node import ClusterNode

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "web" / "static"


@dataclass(frozen=True)
class Content:
    """What the blog serves and the assistant knows, loaded and validated at start."""

    blog: Blog
    index: SearchIndex
    tools: BlogTools
    personas: Personas


def load_content(settings: Settings) -> Content:
    """Load posts, authors and personas; raises ContentError or PersonaError when broken."""
    blog = Blog.load(settings.content_dir)
    index = SearchIndex.build(blog)
    tools = BlogTools(blog, index)
    personas = load_personas(settings.personas_file, tools.names)
    return Content(blog, index, tools, personas)


def make_engine(
    settings: Settings, content: Content, store: Store, cluster: ClusterNode | None = None
) -> AgentEngine:
    """Claude when credentials are configured (on the engine `BLOGCHAT_ENGINE` names),
    otherwise the offline engine. With several instances the agent processes' transcripts
    are saved only for the chats this instance owns, fenced by their tokens."""
    if settings.claude_enabled and settings.engine == "messages":
        from blogchat.engines.messages import MessagesEngine

        return MessagesEngine(settings, content.tools)
    if settings.claude_enabled:
        from blogchat.engines.claude import ClaudeEngine
        from blogchat.store.transcripts import TranscriptStore

        return ClaudeEngine(
            settings,
            content.tools,
            TranscriptStore(store.db, cluster.fence_of if cluster is not None else None),
            spare_persona=content.personas.default,
        )
    return OfflineEngine(content.tools, tokens_per_second=settings.offline_tokens_per_second)


async def _mark_interrupted_elsewhere(store: Store, cluster: ClusterNode) -> int:
    """At start-up with several instances: answers left streaming become incomplete, but
    only in chats no live instance holds (the others are still being written)."""
    streaming = await store.chats.streaming_answers()
    held = await cluster.held({chat_id for _, chat_id in streaming})
    return await store.chats.mark_incomplete(
        [message_id for message_id, chat_id in streaming if chat_id not in held]
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; everything that needs I/O happens in its lifespan."""
    settings = settings or load_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        content = load_content(settings)
        store = await Store.open(
            settings.database,
            schema=settings.database_schema,
            # An instance paused past its leases must not hold locks their new owners need.
            idle_transaction_seconds=settings.chat_lease_seconds if settings.clustered else None,
        )
        cluster = None
        if settings.clustered:
            # Imported only here: one instance never needs the Redis client.
            from blogchat.cluster.node import ClusterNode

            cluster = ClusterNode(settings, store)
        if cluster is None:
            interrupted = await store.chats.mark_interrupted_turns()
        else:
            interrupted = await _mark_interrupted_elsewhere(store, cluster)
        if interrupted:
            log.warning("marked %d answer(s) cut off by a crash as incomplete", interrupted)
        engine = make_engine(settings, content, store, cluster)
        log.info(
            "engine: %s%s",
            engine.name,
            "" if settings.claude_enabled else " (no ANTHROPIC_API_KEY: answers come from search)",
        )
        telemetry = telemetry_for(settings)
        # Counters in memory for one instance; several instances share them on Redis.
        limiter = RateLimiter(
            settings.rate_limit_storage,
            prefix=settings.redis_prefix,
            max_connections=settings.redis_max_connections,
        )
        quotas = Quotas(settings, limiter, store.usage.spending)
        titles = Titles(settings, store, quotas)
        sessions = ChatSessions(
            store,
            engine,
            content.personas,
            content.blog,
            # Histories render every finished answer each time they are sent.
            functools.lru_cache(maxsize=1024)(render_answer),
            idle_seconds=settings.session_idle_seconds,
            timings=SessionTimings(batched_saves=settings.batched_saves),
            telemetry=telemetry,
            limits=SessionLimits(
                queue=settings.chat_queue_limit,
                context=settings.chat_context_limit,
                turn_wait=settings.turn_wait_seconds,
                unwatched=settings.unwatched_seconds,
            ),
            gate=TurnGate(
                settings, engine.capacity, cluster.running_turns if cluster is not None else None
            ),
            quotas=quotas,
            after_turn=titles.after_turn if settings.chat_titles else None,
            placement=cluster,
        )

        def chats_moved(from_owner: str, to_owner: str) -> None:
            sessions.chats_moved(from_owner, to_owner)
            if cluster is not None:
                # The other instances' sessions of these chats hear it too.
                cluster.chats_moved(from_owner, to_owner)

        visitors = Visitors(
            store,
            settings.signing_key(),
            limiter=limiter,
            limits=AccountLimits.of(
                settings.login_failure_limit,
                settings.login_failure_window,
                settings.registration_limit,
                settings.registration_window,
            ),
            on_chats_moved=chats_moved,
        )
        chats = Chats(
            settings=settings,
            store=store,
            sessions=sessions,
            engine=engine,
            personas=content.personas,
            blog=content.blog,
            quotas=quotas,
            cluster=cluster,
        )
        hub = Hub(
            settings=settings,
            visitors=visitors,
            chats=chats,
            sessions=sessions,
            caps=Connections(settings, cluster.open_connections if cluster is not None else None),
        )
        state = app.state
        state.settings = settings
        state.blog = content.blog
        state.search = content.index
        state.tools = content.tools
        state.personas = content.personas
        state.store = store
        state.limiter = limiter
        state.engine = engine
        state.telemetry = telemetry
        state.sessions = sessions
        state.visitors = visitors
        state.chats = chats
        state.titles = titles

        async def drain() -> None:
            # Called by the server (cli.Server) on SIGTERM, before it closes connections.
            await sessions.interrupt_all()
            await hub.drain()

        state.drain = drain
        state.hub = hub
        state.cluster = cluster
        if cluster is not None:
            await cluster.start(sessions, chats)
        sessions.start()
        engine.start()
        waiting = await chats.answer_waiting()
        if waiting:
            log.warning("answering %d message(s) left waiting when the server stopped", waiting)
        try:
            yield
        finally:
            await hub.close_all()
            await sessions.aclose()
            await titles.aclose()
            if cluster is not None:
                await cluster.aclose()
            await engine.aclose()
            # After the sessions, so that the spans of turns cut short are sent too.
            await telemetry.aclose()
            visitors.close()
            await limiter.aclose()
            await store.close()

    app = FastAPI(
        title="blogchat",
        summary="A blog with an assistant readers can chat with.",
        lifespan=lifespan,
        # FastAPI's own docs pages load Swagger UI from a CDN with an inline script; ours
        # (below) serve it from a pinned package, and only when turned on.
        docs_url=None,
        redoc_url=None,
        openapi_url="/api/openapi.json",
    )
    app.state.settings = settings
    app.add_middleware(OriginGuard, settings=settings)
    app.add_middleware(VisitorMiddleware)
    # Outermost: an oversize body is refused before anything else runs, and every
    # response, refusals included, carries the security headers.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, timeout=settings.body_timeout)
    app.add_middleware(SecurityHeaders)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    if settings.api_docs:
        app.mount(
            "/api/docs/assets",
            StaticFiles(packages=[("fastapi_offline", "static")]),
            name="api-docs-assets",
        )
        app.add_api_route("/api/docs", _api_docs, include_in_schema=False)
    app.include_router(api.router)
    app.include_router(realtime.router)
    app.include_router(pages.router)
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    return app


class OriginGuard:
    """Refuses cross-site form and API writes (a browser always sends Origin with them)."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH", "DELETE"):
            request = Request(scope)
            origin = request.headers.get("origin")
            if origin is not None and not origin_allowed(
                origin,
                scheme=request.url.scheme,
                host=request.headers.get("host"),
                allowed=self.settings.allowed_origins,
            ):
                response = JSONResponse(
                    {"detail": "Cross-site requests are not allowed.", "code": "forbidden"},
                    status_code=403,
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _api_docs(request: Request) -> Response:
    return pages.TEMPLATES.TemplateResponse(
        request,
        "api_docs.html",
        {
            "site_title": request.app.state.settings.site_title,
            "openapi_url": request.app.openapi_url,
        },
    )


def _wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/")


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    if _wants_json(request) or not hasattr(request.state, "visitor"):
        return JSONResponse(
            {"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers
        )
    return pages.render(
        request,
        "error.html",
        status_code=exc.status_code,
        status=exc.status_code,
        message=exc.detail,
    )


async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    errors = exc.errors()
    if any(error.get("type") == "json_invalid" for error in errors):
        return JSONResponse(
            {"detail": "The request body is not valid JSON.", "code": "bad_request"},
            status_code=400,
        )
    problems = []
    for error in errors:
        location = [str(part) for part in error.get("loc", ()) if part != "body"]
        field = ".".join(location) or "body"
        problems.append({"field": field, "message": error.get("msg", "invalid")})
    summary = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
    return JSONResponse(
        {"detail": f"Invalid request: {summary}", "code": "bad_request", "errors": problems},
        status_code=422,
    )

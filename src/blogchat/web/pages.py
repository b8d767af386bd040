"""The blog's HTML pages: index, posts, authors, tags, search, chat, sign-in and sign-up."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Form, HTTPException, Query, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy import text

from blogchat.visitors import AuthError
from blogchat.web.deps import BlogDep, CurrentVisitor, SearchDep, SettingsDep, VisitorsDep
from blogchat.web.identity import set_visitor_cookie

PAGE_SIZE = 6
TEMPLATES = Jinja2Templates(directory=Path(__file__).parent / "templates")

router = APIRouter(default_response_class=HTMLResponse)


def render(request: Request, template: str, status_code: int = 200, **context: Any) -> Response:
    """Render a page with the context every page shares."""
    settings = request.app.state.settings
    return TEMPLATES.TemplateResponse(
        request,
        template,
        {
            "site_title": settings.site_title,
            "visitor": request.state.visitor,
            "offline": not settings.claude_enabled,
            **context,
        },
        status_code=status_code,
    )


def _safe_next(target: str | None) -> str:
    # Only local paths, so the sign-in form cannot bounce a visitor to another site.
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/chat"


@router.get("/")
async def index(
    request: Request, blog: BlogDep, page: Annotated[int, Query(ge=1, le=10_000)] = 1
) -> Response:
    """The newest posts, a page at a time."""
    pages = max(1, math.ceil(len(blog.posts) / PAGE_SIZE))
    if page > pages:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "There is no such page.")
    posts = blog.posts[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]
    return render(
        request,
        "index.html",
        posts=posts,
        page=page,
        pages=pages,
        tags=list(blog.tag_counts.items())[:12],
        authors=list(blog.authors.values()),
    )


@router.get("/posts/{slug}")
async def post(request: Request, slug: str, blog: BlogDep) -> Response:
    """One post."""
    found = blog.post(slug)
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "There is no such post.")
    index = blog.posts.index(found)
    newer = blog.posts[index - 1] if index > 0 else None
    older = blog.posts[index + 1] if index + 1 < len(blog.posts) else None
    return render(request, "post.html", post=found, newer=newer, older=older)


@router.get("/authors/{author_id}")
async def author(request: Request, author_id: str, blog: BlogDep) -> Response:
    """An author's profile and posts."""
    found = blog.author(author_id)
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "There is no such author.")
    return render(request, "author.html", author=found, posts=blog.posts_by(author_id))


@router.get("/tags/{tag}")
async def tag(request: Request, tag: str, blog: BlogDep) -> Response:
    """Posts with a tag."""
    posts = blog.posts_tagged(tag)
    if not posts:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "No post has this tag.")
    return render(request, "tag.html", tag=tag, posts=posts)


@router.get("/search")
async def search(
    request: Request,
    index: SearchDep,
    q: Annotated[str, Query(max_length=300)] = "",
) -> Response:
    """Full-text search over the posts."""
    hits = index.search(q, limit=10) if q.strip() else []
    return render(request, "search.html", query=q, hits=hits)


@router.get("/chat")
async def chat_page(request: Request) -> Response:
    """The chat with the assistant."""
    return render(request, "chat.html", chat_id=None)


@router.get("/chat/{chat_id}")
async def chat_page_for(request: Request, chat_id: str) -> Response:
    """The chat page, opened on one chat."""
    return render(request, "chat.html", chat_id=chat_id)


@router.get("/login")
async def login_page(request: Request, next: str | None = None) -> Response:
    """The sign-in form."""
    return render(request, "auth.html", mode="login", next=_safe_next(next), error=None, email="")


@router.get("/register")
async def register_page(request: Request, next: str | None = None) -> Response:
    """The sign-up form."""
    return render(
        request, "auth.html", mode="register", next=_safe_next(next), error=None, email=""
    )


@router.post("/login")
async def login_form(
    request: Request,
    visitor: CurrentVisitor,
    visitors: VisitorsDep,
    email: Annotated[str, Form(max_length=320)] = "",
    password: Annotated[str, Form(max_length=1024)] = "",
    next: Annotated[str, Form(max_length=2000)] = "/chat",
) -> Response:
    """Sign in from the form; on success go back where the visitor came from."""
    return await _auth_form(request, visitor, visitors, "login", email, password, next)


@router.post("/register")
async def register_form(
    request: Request,
    visitor: CurrentVisitor,
    visitors: VisitorsDep,
    email: Annotated[str, Form(max_length=320)] = "",
    password: Annotated[str, Form(max_length=1024)] = "",
    next: Annotated[str, Form(max_length=2000)] = "/chat",
) -> Response:
    """Sign up from the form."""
    return await _auth_form(request, visitor, visitors, "register", email, password, next)


async def _auth_form(
    request: Request,
    visitor: Any,
    visitors: Any,
    mode: str,
    email: str,
    password: str,
    next_url: str,
) -> Response:
    target = _safe_next(next_url)
    try:
        if not email.strip() or not password:
            raise AuthError("Enter your email and a password.", status=422)
        if mode == "login":
            account = await visitors.login(visitor, email, password)
        else:
            account = await visitors.register(visitor, email, password)
    except AuthError as exc:
        return render(
            request,
            "auth.html",
            status_code=exc.status,
            mode=mode,
            next=target,
            error=exc.message,
            email=email,
        )
    response = RedirectResponse(target, status_code=status.HTTP_303_SEE_OTHER)
    set_visitor_cookie(response, request, visitors, account)
    return response


@router.post("/logout")
async def logout_form(request: Request, visitor: CurrentVisitor, visitors: VisitorsDep) -> Response:
    """Sign out from the header's button."""
    anonymous = await visitors.logout(visitor)
    response = RedirectResponse("/", status_code=status.HTTP_303_SEE_OTHER)
    set_visitor_cookie(response, request, visitors, anonymous)
    return response


@router.get("/healthz", include_in_schema=False)
async def healthz(request: Request, settings: SettingsDep) -> Response:
    """For load balancers: the app is up and its database answers."""
    store = request.app.state.store
    try:
        async with store.db.session() as session:
            await session.execute(text("SELECT 1"))
    except Exception:
        return Response('{"status":"unavailable"}', 503, media_type="application/json")
    engine = "claude" if settings.claude_enabled else "offline"
    return Response(f'{{"status":"ok","engine":"{engine}"}}', 200, media_type="application/json")

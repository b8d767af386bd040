"""The blog's HTML pages: index, posts, authors, tags, search, chat, sign-in and sign-up."""

from __future__ import annotations

import datetime as dt
import math
import re
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, Final

from fastapi import APIRouter, Form, HTTPException, Query, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from markupsafe import Markup
from pydantic import AfterValidator
from sqlalchemy import text

from blogchat.addresses import client_address
from blogchat.chats import ChatError
from blogchat.content import Blog, Post
from blogchat.protocol import no_nul
from blogchat.rendering import render_markdown
from blogchat.store import ChatRecord
from blogchat.visitors import MIN_PASSWORD_LENGTH, AuthError
from blogchat.web.deps import (
    BlogDep,
    ChatIdPath,
    ChatsDep,
    CurrentVisitor,
    SearchDep,
    SettingsDep,
    VisitorsDep,
)
from blogchat.web.identity import set_visitor_cookie

PAGE_SIZE = 6
TAG_CLOUD_SIZE = 30
RELATED_POSTS = 3
TEMPLATES = Jinja2Templates(directory=Path(__file__).parent / "templates")

router = APIRouter(default_response_class=HTMLResponse)

# --- rendering helpers for the templates ---------------------------------------------

# Headings as the sanitizer writes them: `##`/`###` carry an id, nothing else.
_HEADING: Final = re.compile(r'<(h[23]) id="([^"<>]+)">(.*?)</\1>', re.DOTALL)
# Tags and character references are left alone when query words are marked in a snippet.
_MARKUP: Final = re.compile(r"(<[^>]*>|&#?\w+;)")
_QUERY_WORD: Final = re.compile(r"\w{3,}")
_SUFFIX: Final = re.compile(r"(?:ing|ed|es|s|ly)$")
# Words that match nearly every snippet; the search index ignores them too.
_STOP_WORDS: Final = frozenset(
    {"and", "are", "but", "for", "into", "not", "such", "that", "the", "their", "then"}
    | {"there", "these", "they", "this", "was", "will", "with"}
)


def prose(html: str) -> Markup:
    """A post's sanitized HTML with headings that link to themselves and scrollable tables."""

    def self_link(match: re.Match[str]) -> str:
        tag, anchor, inner = match.groups()
        if "<a " in inner:  # a link cannot hold another link
            return match.group(0)
        return f'<{tag} id="{anchor}"><a class="anchor" href="#{anchor}">{inner}</a></{tag}>'

    html = _HEADING.sub(self_link, html)
    # A wide table scrolls inside its own box rather than widening the page on a phone.
    html = html.replace("<table>", '<div class="table-scroll"><table>')
    html = html.replace("</table>", "</table></div>")
    return Markup(html)  # noqa: S704 - the input is already sanitized and only gains our markup


def snippet(markdown: str, query: str = "") -> Markup:
    """A search hit's Markdown as sanitized HTML, with the query's words marked."""
    html = render_markdown(markdown)
    stems = {
        word if len(word) < 6 else _SUFFIX.sub("", word)
        for word in (found.lower() for found in _QUERY_WORD.findall(query))
        if word not in _STOP_WORDS
    }
    if not stems:
        return Markup(html)  # noqa: S704 - sanitized by render_markdown
    # Word prefixes, so that "ferment" marks "fermentation" the way the stemming search finds it.
    word = re.compile(
        r"\b(?:" + "|".join(map(re.escape, sorted(stems, key=len, reverse=True))) + r")\w*",
        re.IGNORECASE,
    )
    parts = _MARKUP.split(html)
    for index in range(0, len(parts), 2):
        parts[index] = word.sub(lambda found: f"<mark>{found.group(0)}</mark>", parts[index])
    return Markup("".join(parts))  # noqa: S704 - sanitized text gains only <mark>


def long_date(day: dt.date) -> str:
    """A date as readers write it: 19 May 2026."""
    return f"{day.day} {day:%B %Y}"


TEMPLATES.env.filters["prose"] = prose
TEMPLATES.env.filters["snippet"] = snippet
TEMPLATES.env.filters["long_date"] = long_date
TEMPLATES.env.globals["min_password_length"] = MIN_PASSWORD_LENGTH


def related_posts(blog: Blog, post: Post, limit: int = RELATED_POSTS) -> list[Post]:
    """Other posts sharing the most tags with this one; newer first among equals."""
    tags = set(post.tags)
    shared = [(len(tags.intersection(other.tags)), other) for other in blog.posts]
    # sorted() is stable, so posts sharing as many tags stay newest first.
    ranked = sorted(
        ((count, other) for count, other in shared if count and other is not post),
        key=lambda pair: -pair[0],
    )
    return [other for _, other in ranked[:limit]]


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
        tags=sorted(list(blog.tag_counts.items())[:TAG_CLOUD_SIZE]),
        authors=sorted(blog.authors.values(), key=lambda author: author.name),
        author_posts=Counter(post.author.id for post in blog.posts),
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
    return render(
        request,
        "post.html",
        post=found,
        newer=newer,
        older=older,
        related=related_posts(blog, found),
    )


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
    blog: BlogDep,
    q: Annotated[str, Query(max_length=300)] = "",
) -> Response:
    """Full-text search over the posts."""
    hits = index.search(q, limit=10) if q.strip() else []
    # With nothing found (or nothing asked), the topics are the next best way in.
    return render(request, "search.html", query=q, hits=hits, tags=sorted(blog.tag_counts))


@router.get("/chat")
async def chat_page(
    request: Request,
    blog: BlogDep,
    settings: SettingsDep,
    post: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    """The chat with the assistant; `?post=<slug>` starts a chat about that post."""
    about = blog.post(post) if post else None
    return render(
        request,
        "chat.html",
        chat_id=None,
        chat_title=None,
        chat_model=None,
        post=about,
        max_message_chars=settings.max_message_chars,
    )


@router.get("/chat/{chat_id}")
async def chat_page_for(
    request: Request,
    chat_id: ChatIdPath,
    blog: BlogDep,
    chats: ChatsDep,
    settings: SettingsDep,
    visitor: CurrentVisitor,
) -> Response:
    """The chat page, opened on one chat (its title and post, if it is this visitor's)."""
    try:
        chat: ChatRecord | None = await chats.own(visitor, chat_id)
    except ChatError:
        chat = None  # someone else's chat reveals nothing; the socket says "not found"
    return render(
        request,
        "chat.html",
        chat_id=chat_id,
        chat_title=chat.title if chat else None,
        chat_model=chat.model if chat else None,
        post=blog.post(chat.post_slug) if chat and chat.post_slug else None,
        max_message_chars=settings.max_message_chars,
    )


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
    email: Annotated[str, Form(max_length=320), AfterValidator(no_nul)] = "",
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
    email: Annotated[str, Form(max_length=320), AfterValidator(no_nul)] = "",
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
    address = client_address(request.scope)
    try:
        if not email.strip() or not password:
            raise AuthError("Enter your email and a password.", status=422)
        if mode == "login":
            account = await visitors.login(visitor, email, password, address=address)
        else:
            account = await visitors.register(visitor, email, password, address=address)
    except AuthError as exc:
        page = render(
            request,
            "auth.html",
            status_code=exc.status,
            mode=mode,
            next=target,
            error=exc.message,
            error_field=exc.field,
            email=email,
        )
        if exc.retry_after is not None:
            page.headers["Retry-After"] = exc.retry_after.retry_after_header
        return page
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

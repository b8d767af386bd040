"""The blog's HTML pages, fetched from a live server and read with the standard HTML parser."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
import time_machine

from blogchat.content import Blog
from blogchat.rendering import render_markdown
from blogchat.search import SearchIndex
from blogchat.settings import Settings
from blogchat.web.pages import PAGE_SIZE
from tests.support.client import COOKIE, Reader
from tests.support.server import LiveServer, running

# --- a small DOM over html.parser ---------------------------------------------------------

_VOID = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source"}
    | {"track", "wbr"}
)


@dataclass
class Element:
    """An element of a parsed page: its tag, attributes and children (elements and text)."""

    tag: str
    attrs: dict[str, str]
    children: list[Element | str] = field(default_factory=list)

    @property
    def text(self) -> str:
        """All text inside, with whitespace collapsed."""
        parts: list[str] = []

        def walk(node: Element) -> None:
            for child in node.children:
                if isinstance(child, str):
                    parts.append(child)
                else:
                    walk(child)

        walk(self)
        return " ".join("".join(parts).split())

    def iter(self) -> Iterator[Element]:
        """This element and every element below it, in document order."""
        yield self
        for child in self.children:
            if isinstance(child, Element):
                yield from child.iter()

    def find_all(self, tag: str | None = None, **attrs: str) -> list[Element]:
        """Elements with this tag whose attributes hold these values (class_ matches a class)."""
        found = []
        for element in self.iter():
            if tag is not None and element.tag != tag:
                continue
            if all(_attr_matches(element, name, value) for name, value in attrs.items()):
                found.append(element)
        return found

    def find(self, tag: str | None = None, **attrs: str) -> Element:
        """The one element that matches."""
        found = self.find_all(tag, **attrs)
        assert len(found) == 1, f"expected one <{tag} {attrs}>, found {len(found)}"
        return found[0]


def _attr_matches(element: Element, name: str, value: str) -> bool:
    if name == "class_":
        return value in element.attrs.get("class", "").split()
    # for_ stands for `for`, aria_label for `aria-label`.
    return element.attrs.get(name.rstrip("_").replace("_", "-")) == value


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, {name: value or "" for name, value in attrs})
        self.stack[-1].children.append(element)
        if tag not in _VOID:
            self.stack.append(element)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Element(tag, {name: value or "" for name, value in attrs}))

    def handle_endtag(self, tag: str) -> None:
        for depth in range(len(self.stack) - 1, 0, -1):
            if self.stack[depth].tag == tag:
                del self.stack[depth:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse(html: str) -> Element:
    """The page as a tree of elements."""
    builder = _TreeBuilder()
    builder.feed(html)
    builder.close()
    return builder.root


async def get_page(client: httpx.AsyncClient, path: str, status: int = 200) -> Element:
    """GET an HTML page, check its status and type, and parse it."""
    response = await client.get(path)
    assert response.status_code == status, (path, response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("text/html")
    return parse(response.text)


def cards(page: Element) -> list[str]:
    """The post URLs a list page links from its post cards, in order."""
    return [
        card.find_all("a")[0].attrs["href"]
        for card in page.find_all("article", class_="post-card")
        if not _inside_related(page, card)
    ]


def _inside_related(page: Element, card: Element) -> bool:
    related = page.find_all("section", class_="related")
    return any(card is element for section in related for element in section.iter())


def squash(text: str) -> str:
    """Text with all whitespace runs made single spaces."""
    return " ".join(text.split())


# --- the blog's content, as the server loads it ----------------------------------------------


@pytest.fixture
def blog(settings: Settings) -> Blog:
    """The posts and authors the test server serves."""
    return Blog.load(settings.content_dir)


def post_files(settings: Settings) -> list[Path]:
    """The Markdown files of the posts, read straight from disk."""
    return sorted((settings.content_dir / "posts").glob("*.md"))


# --- index and pagination -------------------------------------------------------------


async def test_index_lists_every_post_newest_first_across_its_pages(
    reader: Reader, settings: Settings
) -> None:
    slugs = {path.stem for path in post_files(settings)}
    pages = -(-len(slugs) // PAGE_SIZE)
    assert pages >= 2, "the test content must fill more than one page"
    seen: list[str] = []
    dates: list[str] = []
    for number in range(1, pages + 1):
        page = await get_page(reader.http, "/" if number == 1 else f"/?page={number}")
        links = cards(page)
        assert 0 < len(links) <= PAGE_SIZE
        seen.extend(links)
        dates.extend(
            card.find("time").attrs["datetime"]
            for card in page.find_all("article", class_="post-card")
        )
    assert all(link.startswith("/posts/") for link in seen)
    assert sorted(seen_slugs(seen)) == sorted(slugs), "every post appears exactly once"
    assert dates == sorted(dates, reverse=True), "newest first, page after page"


def seen_slugs(links: list[str]) -> list[str]:
    """The slugs of /posts/<slug> links."""
    return [link.removeprefix("/posts/") for link in links]


async def test_pages_link_to_each_other_with_rel_prev_and_next(
    reader: Reader, settings: Settings
) -> None:
    pages = -(-len(post_files(settings)) // PAGE_SIZE)
    first = await get_page(reader.http, "/")
    assert first.find("a", rel="next").attrs["href"] == "/?page=2"
    assert not first.find_all("a", rel="prev")
    assert first.find("link", rel="next").attrs["href"] == "/?page=2"
    assert first.find("link", rel="canonical").attrs["href"] == "/"

    second = await get_page(reader.http, "/?page=2")
    assert second.find("a", rel="prev").attrs["href"] == "/", "page 1 has one address"
    assert second.find("link", rel="canonical").attrs["href"] == "/?page=2"

    last = await get_page(reader.http, f"/?page={pages}")
    assert not last.find_all("a", rel="next")


async def test_a_page_past_the_end_is_a_404_page(reader: Reader, settings: Settings) -> None:
    pages = -(-len(post_files(settings)) // PAGE_SIZE)
    page = await get_page(reader.http, f"/?page={pages + 1}", status=404)
    assert page.find("h1").text == "Page not found"
    assert not cards(page)


async def test_the_index_offers_search_topics_and_authors(reader: Reader, blog: Blog) -> None:
    page = await get_page(reader.http, "/")
    sidebar = page.find("aside")
    search = sidebar.find("form", role="search")
    assert search.attrs["action"] == "/search"
    field_id = search.find("input", name="q").attrs["id"]
    assert search.find("label", for_=field_id)
    topics = {a.attrs["href"] for a in sidebar.find_all("a", class_="tag")}
    assert topics, "a tag cloud"
    assert topics <= {f"/tags/{tag}" for tag in blog.tag_counts}
    authors = {a.attrs["href"] for a in sidebar.find("ul", class_="author-list").find_all("a")}
    assert authors == {author.url for author in blog.authors.values()}


# --- posts ------------------------------------------------------------------------------------


async def test_every_post_page_shows_title_author_date_sections_and_ask_link(
    reader: Reader, blog: Blog
) -> None:
    for post in blog.posts:
        page = await get_page(reader.http, post.url)
        article = page.find("article", class_="post")
        assert [h1.text for h1 in page.find_all("h1")] == [post.title]
        assert post.title in page.find("title").text
        assert page.find("meta", name="description").attrs["content"] == squash(post.summary)
        assert article.find("time").attrs["datetime"] == post.date.isoformat()
        assert post.author.name in [a.text for a in article.find_all("a", href=post.author.url)]
        prose = article.find("div", class_="prose")
        for section in post.sections:
            if section.heading is None:
                continue
            heading = prose.find(f"h{section.level}", id=section.anchor)
            assert heading.text == squash(section.heading)
            assert heading.find("a", class_="anchor").attrs["href"] == f"#{section.anchor}"
        ask = [a for a in page.find_all("a") if a.text == "Ask about this post"]
        assert ask, post.slug
        assert {a.attrs["href"] for a in ask} == {f"/chat?post={post.slug}"}
        assert not page.find_all("script"), "a post page runs no script"


async def test_unknown_post_author_and_tag_give_a_404_page(reader: Reader) -> None:
    for path, message in [
        ("/posts/no-such-post", "There is no such post."),
        ("/authors/nobody-here", "There is no such author."),
        ("/tags/no-such-tag", "No post has this tag."),
        ("/no/such/page", "There is nothing at this address."),
    ]:
        page = await get_page(reader.http, path, status=404)
        assert page.find("h1").text == "Page not found", path
        assert message in page.find("p", class_="error-page__message").text, path
        assert page.find("form", role="search").attrs["action"] == "/search"
        assert page.find("meta", name="robots").attrs["content"] == "noindex"


async def test_author_pages_list_exactly_that_authors_posts(reader: Reader, blog: Blog) -> None:
    for author in blog.authors.values():
        page = await get_page(reader.http, author.url)
        assert page.find("h1").text == author.name
        expected = [post.url for post in blog.posts if post.author.id == author.id]
        assert cards(page) == expected, author.id


async def test_tag_pages_list_exactly_the_tagged_posts(reader: Reader, blog: Blog) -> None:
    for tag in blog.tag_counts:
        page = await get_page(reader.http, f"/tags/{tag}")
        assert tag in page.find("h1").text
        assert cards(page) == [post.url for post in blog.posts if tag in post.tags], tag


# --- search -------------------------------------------------------------------------------


DISTINCTIVE_PHRASE = "ticket fastener"


async def test_search_shows_ranked_hits_with_their_full_snippets(
    reader: Reader, blog: Blog, settings: Settings
) -> None:
    holders = [p.stem for p in post_files(settings) if DISTINCTIVE_PHRASE in p.read_text()]
    assert len(holders) == 1, "the phrase must be distinctive"
    expected = SearchIndex.build(blog).search(DISTINCTIVE_PHRASE, limit=10)

    page = await get_page(reader.http, f"/search?q={DISTINCTIVE_PHRASE.replace(' ', '+')}")
    hits = page.find("ol", class_="search-results__list").find_all("li", class_="search-hit")
    links = [hit.find("h3").find("a").attrs["href"] for hit in hits]
    assert links == [hit.url for hit in expected], "the index's ranking, in order"
    assert links[0].startswith(f"/posts/{holders[0]}")
    for shown, hit in zip(hits, expected, strict=True):
        snippet = shown.find("div", class_="search-hit__snippet")
        assert snippet.text == parse(render_markdown(hit.snippet)).text, "the whole snippet"
        assert hit.author_name in shown.text
        assert shown.find("time").attrs["datetime"] == hit.date.isoformat()
    first = hits[0].find("div", class_="search-hit__snippet")
    assert {mark.text.lower() for mark in first.find_all("mark")} >= {"ticket", "fastener"}


async def test_search_with_no_hits_says_so_and_offers_topics(reader: Reader) -> None:
    page = await get_page(reader.http, "/search?q=qwxzvk")
    assert "No results" in page.find("h2", id="results-title").text
    assert page.find("section", class_="browse").find_all("a", class_="tag")
    empty = await get_page(reader.http, "/search")
    assert empty.find("input", name="q").attrs["value"] == ""
    assert not empty.find_all("ol", class_="search-results__list")


# --- sign-in and sign-up -------------------------------------------------------------------


def assert_labelled_fields(form: Element) -> None:
    for name in ("email", "password"):
        field_id = form.find("input", name=name).attrs["id"]
        assert form.find("label", for_=field_id), name


async def test_sign_in_and_sign_up_pages_render_their_forms(reader: Reader) -> None:
    for path, heading in [("/login", "Sign in"), ("/register", "Create an account")]:
        page = await get_page(reader.http, f"{path}?next=/posts/x")
        assert page.find("h1").text == heading
        form = page.find("form", class_="auth-form")
        assert (form.attrs["method"], form.attrs["action"]) == ("post", path)
        assert_labelled_fields(form)
        assert form.find("input", name="next").attrs["value"] == "/posts/x"
        assert not page.find_all(role="alert")


async def test_a_wrong_password_re_renders_the_form_with_an_error_and_the_email(
    server: LiveServer,
) -> None:
    email = f"reader-{uuid.uuid4().hex[:10]}@example.com"
    async with Reader(server.url) as owner:
        await owner.register(email)
    async with Reader(server.url) as stranger:
        before = stranger.cookie
        response = await stranger.http.post(
            "/login", data={"email": email, "password": "not the password", "next": "/"}
        )
        assert response.status_code == 401
        page = parse(response.text)
        assert page.find(role="alert").text == "Wrong email or password."
        form = page.find("form", class_="auth-form")
        assert form.find("input", name="email").attrs["value"] == email
        assert form.find("input", name="password").attrs["aria-invalid"] == "true"
        assert_labelled_fields(form)
        assert stranger.cookie == before, "a failed sign-in changes nothing"
        assert (await stranger.me())["anonymous"] is True


async def test_a_throttled_sign_in_form_says_when_to_try_again(
    server: LiveServer, clock: time_machine.Traveller
) -> None:
    email = f"reader-{uuid.uuid4().hex[:10]}@example.com"
    async with Reader(server.url) as owner:
        await owner.register(email)
    async with Reader(server.url) as stranger:
        form = {"email": email, "password": "not the password", "next": "/"}
        for _ in range(10):
            assert (await stranger.http.post("/login", data=form)).status_code == 401
        form["password"] = "correct horse battery"
        response = await stranger.http.post("/login", data=form)
        assert response.status_code == 429
        assert response.headers["Retry-After"] == "900"
        page = parse(response.text)
        alert = page.find(role="alert")
        assert alert.text == "Too many failed sign-ins. Try again in 15 minutes."
        assert page.find("input", name="email").attrs["value"] == email
        assert (await stranger.me())["anonymous"] is True


async def test_a_form_error_about_one_field_sits_by_that_field(reader: Reader) -> None:
    response = await reader.http.post(
        "/register", data={"email": "new@example.com", "password": "short", "next": "/"}
    )
    assert response.status_code == 422
    page = parse(response.text)
    error = page.find(role="alert")
    assert error.attrs["id"] == "password-error"
    password = page.find("input", name="password")
    assert "password-error" in password.attrs["aria-describedby"].split()
    assert page.find("input", name="email").attrs["value"] == "new@example.com"


@pytest.mark.parametrize(
    ("next_url", "location"),
    [
        ("/posts/sqlite-in-production#backups", "/posts/sqlite-in-production#backups"),
        ("//evil.example", "/chat"),
        ("https://evil.example/", "/chat"),
        ("/\\evil.example", "/chat"),
    ],
)
async def test_sign_up_by_form_sets_a_cookie_and_goes_only_to_a_local_next(
    reader: Reader, next_url: str, location: str
) -> None:
    email = f"reader-{uuid.uuid4().hex[:10]}@example.com"
    before = reader.cookie
    response = await reader.http.post(
        "/register",
        data={"email": email, "password": "correct horse battery", "next": next_url},
    )
    assert response.status_code == 303
    assert response.headers["location"] == location
    assert COOKIE in response.cookies
    assert reader.cookie != before
    assert (await reader.me())["email"] == email


async def test_the_header_shows_who_is_signed_in_and_signs_out_by_post(reader: Reader) -> None:
    anonymous = await get_page(reader.http, "/")
    nav = anonymous.find("nav", aria_label="Main")
    assert [a.attrs["href"] for a in nav.find_all("a")][:3] == ["/", "/search", "/chat"]
    assert nav.find("a", href="/login?next=/").text == "Sign in"
    assert not nav.find_all("form")

    account = await reader.register()
    signed_in = (await get_page(reader.http, "/")).find("nav", aria_label="Main")
    sign_out = signed_in.find("form")
    assert (sign_out.attrs["method"], sign_out.attrs["action"]) == ("post", "/logout")
    assert account["email"] in sign_out.text
    assert not signed_in.find_all("a", href="/login?next=/")

    response = await reader.http.post("/logout")
    assert (response.status_code, response.headers["location"]) == (303, "/")
    assert (await reader.me())["anonymous"] is True


# --- safety and structure ------------------------------------------------------------------


AUTHORS_YAML = """\
eve:
  name: Eve Example
  bio: Tries things.
"""

HOSTILE_POST = """\
---
title: "Raw <b>HTML</b> in a post"
slug: raw-html
date: 2026-01-01
author: eve
tags: [testing]
summary: "A post whose Markdown holds raw HTML."
---

Before <script>alert("inline")</script> after.

<script>alert("block")</script>

<img src="x" onerror="alert('img')">

[a bad link](javascript:alert('link'))

## A heading <em>with</em> a tag
"""


async def test_raw_html_in_a_post_is_shown_as_text_never_run(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    content = tmp_path / "content"
    (content / "posts").mkdir(parents=True)
    (content / "authors.yaml").write_text(AUTHORS_YAML)
    (content / "posts" / "raw-html.md").write_text(HOSTILE_POST)
    with running(make_settings(content_dir=content)) as server:
        async with httpx.AsyncClient(base_url=server.url) as client:
            response = await client.get("/posts/raw-html")
    assert response.status_code == 200
    assert "<script" not in response.text.lower()
    page = parse(response.text)
    assert not page.find_all("script")
    assert not page.find_all("img")
    assert not [e for e in page.iter() if any(a.startswith("on") for a in e.attrs)]
    assert not [a for a in page.find_all("a") if "javascript" in a.attrs.get("href", "")]
    prose = page.find("div", class_="prose")
    assert 'Before <script>alert("inline")</script> after.' in prose.text
    assert "<img src=" in prose.text
    assert page.find("h1").text == "Raw <b>HTML</b> in a post"


async def test_pages_set_an_http_only_same_site_session_cookie(server: LiveServer) -> None:
    for path in ("/", "/posts/sqlite-in-production", "/search?q=wal", "/login"):
        async with httpx.AsyncClient(base_url=server.url) as client:
            response = await client.get(path)
        assert response.status_code == 200
        cookie = next(
            header
            for header in response.headers.get_list("set-cookie")
            if header.startswith(f"{COOKIE}=")
        )
        attributes = {part.strip().lower() for part in cookie.split(";")[1:]}
        assert "httponly" in attributes, path
        assert "samesite=lax" in attributes, path
        assert "path=/" in attributes, path


PAGE_KINDS = (
    "/",
    "/?page=2",
    "/posts/sqlite-in-production",
    "/authors/mara-lindqvist",
    "/tags/reliability",
    "/search",
    "/search?q=backup",
    "/login",
    "/register",
    "/posts/missing",
)


async def test_every_page_has_one_h1_landmarks_a_skip_link_and_a_description(
    reader: Reader,
) -> None:
    for path in PAGE_KINDS:
        response = await reader.http.get(path)
        assert_well_formed(parse(response.text))


def assert_well_formed(page: Element) -> None:
    """The structure every page shares: language, one h1, landmarks, labels, dates."""
    assert page.find("html").attrs["lang"] == "en"
    assert len(page.find_all("h1")) == 1
    assert page.find("title").text
    assert page.find("meta", name="description").attrs["content"].strip()
    assert page.find("meta", name="viewport")
    main = page.find("main")
    assert main.attrs["id"] == "main"
    first_link = page.find("body").find_all("a")[0]
    assert first_link.attrs["href"] == "#main", "a skip link comes first"
    assert page.find("header", class_="site-header").find("nav", aria_label="Main")
    assert page.find("footer", class_="site-footer")
    for time in page.find_all("time"):
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", time.attrs["datetime"])
    for field_ in page.find_all("input"):
        if field_.attrs.get("type") != "hidden":
            assert page.find("label", for_=field_.attrs["id"]), field_.attrs


async def test_pages_load_nothing_from_other_sites(reader: Reader) -> None:
    for path in ("/", "/posts/what-a-websocket-reconnect-needs", "/search?q=sourdough"):
        page = parse((await reader.http.get(path)).text)
        for element in page.find_all("link") + page.find_all("script") + page.find_all("img"):
            address = element.attrs.get("href") or element.attrs.get("src") or ""
            assert address.startswith("/"), address
            assert not address.startswith("//"), address


async def test_the_stylesheet_has_a_dark_mode(reader: Reader) -> None:
    page = parse((await reader.http.get("/")).text)
    href = page.find("link", rel="stylesheet").attrs["href"]
    response = await reader.http.get(href)
    assert response.status_code == 200
    css = response.text
    dark = re.search(r"@media\s*\(prefers-color-scheme:\s*dark\)\s*\{(.*?)\n\}", css, re.DOTALL)
    assert dark, "a prefers-color-scheme: dark block"
    assert re.search(r"--bg:\s*#", dark.group(1)), "which redefines the colours"
    assert "@import" not in css, "no stylesheet from elsewhere"
    assert "url(http" not in css, "no image or font from elsewhere"

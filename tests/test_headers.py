"""Security headers on every response, a CSP the pages really run under, and the API docs."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.async_api import Page

from blogchat.settings import Settings
from tests.support.server import REPO, LiveServer, running

WEB = REPO / "src" / "blogchat" / "web"
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
PAGES = ["/", "/posts/dialing-in-espresso-at-home", "/chat", "/login", "/register", "/search"]


def assert_security_headers(response: httpx.Response, *, https: bool = False) -> None:
    headers = response.headers
    assert headers["content-security-policy"] == CSP
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "strict-origin-when-cross-origin"
    assert headers["x-frame-options"] == "DENY"
    if https:
        assert headers["strict-transport-security"] == "max-age=63072000"
    else:
        assert "strict-transport-security" not in headers


@pytest.mark.parametrize("path", [*PAGES, "/no-such-page", "/posts/no-such-post"])
async def test_every_html_page_carries_the_security_headers(server: LiveServer, path: str) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await client.get(path)
    assert response.headers["content-type"].startswith("text/html")
    assert_security_headers(response)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/me"),
        ("GET", "/static/js/chat-page.js"),
        ("GET", "/healthz"),
        ("POST", "/api/auth/login"),
        ("GET", "/api/openapi.json"),
    ],
)
async def test_other_responses_carry_them_too(server: LiveServer, method: str, path: str) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await client.request(method, path)
    assert_security_headers(response)


async def test_hsts_is_sent_only_when_the_request_came_over_https(server: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        # The TLS-terminating proxy on loopback says so; uvicorn trusts it by default.
        over_https = await client.get("/", headers={"X-Forwarded-Proto": "https"})
        over_http = await client.get("/", headers={"X-Forwarded-Proto": "http"})
    assert_security_headers(over_https, https=True)
    assert_security_headers(over_http)


async def test_an_untrusted_peer_cannot_claim_https(
    make_settings: Callable[..., Settings],
) -> None:
    with running(make_settings(forwarded_allow_ips="192.0.2.1")) as server:
        async with httpx.AsyncClient(base_url=server.url) as client:
            response = await client.get("/", headers={"X-Forwarded-Proto": "https"})
    assert_security_headers(response)


# --- nothing inline: what the CSP would block ------------------------------------------------

INLINE = {
    "a <script> without src": re.compile(r"<script(?![^>]*\bsrc=)[^>]*>", re.IGNORECASE),
    "an inline event handler": re.compile(r"<[a-z][^>]*\son[a-z]+\s*=", re.IGNORECASE),
    "a style attribute": re.compile(r"<[a-z][^>]*\sstyle\s*=", re.IGNORECASE),
    "a <style> element": re.compile(r"<style\b", re.IGNORECASE),
    "a javascript: URL": re.compile(r"javascript:", re.IGNORECASE),
}


def page_sources() -> Iterator[Path]:
    yield from sorted((WEB / "templates").glob("*.html"))
    # The favicon is an image: a page's CSP does not apply inside it, so its <style> stays.
    yield from sorted(p for p in (WEB / "static").rglob("*.html"))


@pytest.mark.parametrize("source", list(page_sources()), ids=lambda p: p.name)
def test_no_template_has_inline_script_handlers_or_styles(source: Path) -> None:
    text = source.read_text(encoding="utf-8")
    found = {what: pattern.findall(text) for what, pattern in INLINE.items()}
    assert not {what: hits for what, hits in found.items() if hits}, source


@pytest.mark.parametrize(
    "source", sorted((WEB / "static" / "js").glob("*.js")), ids=lambda p: p.name
)
def test_no_script_builds_inline_handlers_styles_or_code_from_strings(source: Path) -> None:
    text = source.read_text(encoding="utf-8")
    for forbidden in (
        r"\beval\(",
        r"new Function\(",
        r"setAttribute\(\s*[\"']style",
        r"setAttribute\(\s*[\"']on",
        r"setTimeout\(\s*[\"'`]",
        r"\.cssText\b",
    ):
        assert not re.search(forbidden, text), (source.name, forbidden)


# --- in a browser: the pages work under the CSP ------------------------------------------------


async def watch_csp(page: Page) -> list[str]:
    """Collect every CSP violation the page reports (and every console complaint about one)."""
    violations: list[str] = []
    page.on(
        "console",
        lambda message: (
            violations.append(message.text) if "Content Security Policy" in message.text else None
        ),
    )
    await page.add_init_script(
        "document.addEventListener('securitypolicyviolation', (e) =>"
        " console.error('Content Security Policy violation: ' + e.violatedDirective"
        " + ' ' + e.blockedURI));"
    )
    return violations


@pytest.mark.browser
@pytest.mark.asyncio(loop_scope="session")
async def test_the_pages_and_the_chat_run_under_the_csp_with_no_violation(
    server: LiveServer, page: Page, chat_page: Any
) -> None:
    violations = await watch_csp(page)
    for path in PAGES:
        response = await page.goto(server.url + path)
        assert response is not None, path
        assert response.ok, path
        assert response.headers["content-security-policy"] == CSP
    chat = await chat_page(page, server.url).open()
    await chat.ask("How do I dial in espresso at home?")
    answer = await chat.wait_for_answer("complete")
    assert "espresso" in (await answer.text_content() or "").lower()
    assert violations == []


@pytest.mark.browser
@pytest.mark.asyncio(loop_scope="session")
async def test_no_other_site_can_frame_a_page(server: LiveServer, page: Page) -> None:
    # A page of another origin tries to frame the blog; the load event waits for the frame.
    await page.goto(f"data:text/html,<iframe src='{server.url}/'></iframe>", wait_until="load")
    [framed] = page.main_frame.child_frames
    assert framed.url == "chrome-error://chromewebdata/", "the browser refused to show it"


# --- the API docs --------------------------------------------------------------------------


async def test_the_api_docs_are_off_by_default_and_the_openapi_document_stays(
    server: LiveServer,
) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        assert (await client.get("/api/docs")).status_code == 404
        assert (await client.get("/api/docs/assets/swagger-ui-bundle.js")).status_code == 404
        assert (await client.get("/api/openapi.json")).json()["info"]["title"] == "blogchat"


@pytest.fixture
def docs_server(make_settings: Callable[..., Settings]) -> Iterator[LiveServer]:
    """A server with BLOGCHAT_API_DOCS turned on."""
    with running(make_settings(api_docs=True)) as live:
        yield live


async def test_the_api_docs_when_turned_on_load_only_from_the_site(docs_server: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=docs_server.url) as client:
        docs = await client.get("/api/docs")
        assert docs.status_code == 200
        assert_security_headers(docs)
        sources = re.findall(r'(?:src|href)="([^"]+)"', docs.text)
        assert sources
        assert all(source.startswith("/") for source in sources), sources
        for source in sources:
            assert (await client.get(source)).status_code == 200, source


@pytest.mark.browser
@pytest.mark.asyncio(loop_scope="session")
async def test_the_api_docs_render_in_a_browser_from_the_site_alone(
    docs_server: LiveServer, page: Page
) -> None:
    violations = await watch_csp(page)
    origins: set[str] = set()
    page.on("request", lambda request: origins.add(urlsplit(request.url).netloc))
    await page.goto(docs_server.url + "/api/docs")
    await page.locator(".swagger-ui .info .title").filter(has_text="blogchat").wait_for()
    await page.locator(".opblock-summary-path", has_text="/api/auth/login").first.wait_for()
    assert origins == {urlsplit(docs_server.url).netloc}
    assert violations == []

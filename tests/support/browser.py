"""Chromium through Playwright: one browser per session, a fresh context per test.

The browser is the one BLOGCHAT_TEST_CHROMIUM names, else Debian's /usr/bin/chromium, else
Playwright's own if one is installed (never downloaded). With none, the browser tests skip
with the reason, or fail in CI (tests/support/services.py).

Every test that uses a browser context leaves a screenshot of each of its pages in
test-artifacts/screenshots/<test name>.png, whether it passed or failed, and fails if a
page threw an uncaught JavaScript error.

tests/conftest.py loads these fixtures for every test module.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect

from tests.support.services import unavailable

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "test-artifacts" / "screenshots"
MEASUREMENTS = REPO / "test-artifacts" / "measurements.jsonl"
CHROMIUM_VARIABLE = "BLOGCHAT_TEST_CHROMIUM"
DEBIAN_CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

DESKTOP: dict[str, Any] = {"viewport": {"width": 1280, "height": 800}}
PHONE: dict[str, Any] = {
    "viewport": {"width": 390, "height": 844},
    "device_scale_factor": 2,
    "is_mobile": True,
    "has_touch": True,
}
DARK: dict[str, Any] = {"color_scheme": "dark"}
# How long a UI expectation may take before the test fails (ms); generous for slow machines.
TIMEOUT_MS = 30_000
expect.set_options(timeout=TIMEOUT_MS)


class NoChromium(Exception):
    """No Chromium to run the browser tests with; the message says what was looked for."""


def _runnable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def chromium_path(playwright_own: str) -> str:
    """The Chromium to launch: the one BLOGCHAT_TEST_CHROMIUM names, else Debian's, else
    Playwright's own (`playwright_own`, its `chromium.executable_path`) if installed."""
    named = os.environ.get(CHROMIUM_VARIABLE)
    if named:
        if _runnable(named):
            return named
        raise NoChromium(f"{CHROMIUM_VARIABLE}={named} is not an executable file")
    for candidate in (DEBIAN_CHROMIUM, playwright_own):
        if _runnable(candidate):
            return candidate
    raise NoChromium(
        f"no Chromium for the browser tests: neither Debian's {DEBIAN_CHROMIUM}"
        f" (apt-get install chromium) nor Playwright's own ({playwright_own}) is installed;"
        f" {CHROMIUM_VARIABLE} names another"
    )


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def chromium() -> AsyncIterator[Browser]:
    """Chromium, launched once for the whole session."""
    async with async_playwright() as playwright:
        try:
            executable = chromium_path(playwright.chromium.executable_path)
        except NoChromium as missing:
            unavailable(str(missing), ci_must="run the browser tests")
        browser = await playwright.chromium.launch(
            executable_path=executable, args=CHROMIUM_ARGS, timeout=60_000
        )
        try:
            yield browser
        finally:
            await browser.close()


LOOKS: dict[str, dict[str, Any]] = {
    "desktop": DESKTOP,
    "desktop-dark": DESKTOP | DARK,
    "phone": PHONE,
    "phone-dark": PHONE | DARK,
}


async def snap(page: Page, name: str) -> Path:
    """Save a screenshot of the page as it is now: test-artifacts/screenshots/<name>.png."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^\w.\[\]-]+", "_", name)
    path = SCREENSHOTS / f"{safe}.png"
    await page.screenshot(path=path)
    return path


def record_measurement(name: str, **figures: Any) -> None:
    """Keep a timing a browser test took (reported, never asserted) in
    test-artifacts/measurements.jsonl, one JSON object a line."""
    MEASUREMENTS.parent.mkdir(parents=True, exist_ok=True)
    with MEASUREMENTS.open("a", encoding="utf-8") as file:
        file.write(json.dumps({"measurement": name, **figures}) + "\n")


@pytest.fixture
def context_options(request: pytest.FixtureRequest) -> dict[str, Any]:
    """How a test's browser context looks: a desktop in light mode, unless the test asks
    for one of LOOKS with `@pytest.mark.parametrize("context_options", ["phone-dark"],
    indirect=True)`."""
    return LOOKS[getattr(request, "param", "desktop")]


def _screenshot_name(nodeid: str, index: int) -> str:
    name = re.sub(r"[^\w.\[\]-]+", "_", nodeid.split("::")[-1])
    return f"{name}.png" if index == 0 else f"{name}-{index + 1}.png"


@pytest_asyncio.fixture(loop_scope="session")
async def browser_context(
    chromium: Browser, context_options: dict[str, Any], request: pytest.FixtureRequest
) -> AsyncIterator[BrowserContext]:
    """A fresh browser context (its own cookies and storage) for one test."""
    context = await chromium.new_context(**context_options)
    context.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []

    def watch(page: Page) -> None:
        page.on("pageerror", lambda error: errors.append(f"{page.url}: {error}"))

    context.on("page", watch)
    try:
        yield context
    finally:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for index, page in enumerate(context.pages):
            try:
                await page.screenshot(
                    path=SCREENSHOTS / _screenshot_name(request.node.nodeid, index), timeout=10_000
                )
            except Exception as exc:  # a crashed page must not hide the test's own failure
                errors.append(f"screenshot failed: {exc}")
        await context.close()
    assert not errors, f"JavaScript errors in the page: {errors}"


@pytest_asyncio.fixture(loop_scope="session")
async def page(browser_context: BrowserContext) -> Page:
    """A tab in this test's browser context."""
    return await browser_context.new_page()


@pytest.fixture
def chat_page() -> Callable[[Page, str], ChatPage]:
    """Wraps a tab in a ChatPage for a server: `chat_page(page, server.url)`."""
    return ChatPage


class ChatPage:
    """The chat page of a live server, driven the way a reader uses it."""

    def __init__(self, page: Page, base_url: str) -> None:
        self.page = page
        self.base_url = base_url

    async def open(self, path: str = "/chat") -> ChatPage:
        """Load a page of the chat and wait until it is connected."""
        await self.page.goto(self.base_url + path)
        await self.wait_connected()
        return self

    async def wait_connected(self) -> None:
        """Wait for the connection indicator to say the chat is live."""
        await self.page.locator("#connection[data-state=open]").wait_for()

    async def ask(self, text: str) -> None:
        """Type a message and press Enter."""
        await self.page.locator("#message").fill(text)
        await self.page.locator("#message").press("Enter")

    def answers(self, status: str | None = None) -> Any:
        """The assistant's answers (with this status)."""
        selector = ".msg--assistant[data-id]"
        if status is not None:
            selector += f'[data-status="{status}"]'
        return self.page.locator(selector)

    async def wait_for_answer(
        self, status: str = "complete", count: int = 1, timeout: float = TIMEOUT_MS
    ) -> Any:
        """Wait until `count` answers have this status; returns the last of them."""
        answers = self.answers(status)
        await answers.nth(count - 1).wait_for(timeout=timeout)
        return answers.nth(count - 1)

    async def wait_for_streamed_text(self, characters: int = 40) -> str:
        """Wait until the running answer shows some text; returns its Markdown so far."""
        handle = await self.page.wait_for_function(
            """(n) => {
                const el = document.querySelector('.msg--streaming .answer__stream');
                if (!el || el.textContent.length < n) return null;
                const id = el.closest('.msg').dataset.id;
                const state = document.getElementById('chat-app').chatClient.state;
                return state.messages.find((m) => m.id === id)?.text ?? null;
            }""",
            arg=characters,
        )
        text: str = await handle.json_value()
        return text

    async def chat_id(self) -> str:
        """The open chat's id, once the server has created it."""
        await self.page.wait_for_url("**/chat/*")
        return self.page.url.rsplit("/", 1)[-1]

    async def client_state(self) -> dict[str, Any]:
        """The ChatClient's transcript state."""
        state: dict[str, Any] = await self.page.evaluate(
            "() => document.getElementById('chat-app').chatClient.state"
        )
        return state

    async def api(self, path: str) -> Any:
        """GET a REST endpoint with this browser's cookie."""
        response = await self.page.request.get(self.base_url + path)
        assert response.ok, f"{path}: {response.status}"
        return await response.json()

    async def text_of(self, html: str) -> str:
        """What a reader sees of some HTML (its text content)."""
        text: str = await self.page.evaluate(
            "(html) => { const d = document.createElement('div'); d.innerHTML = html;"
            " return d.textContent; }",
            html,
        )
        return text

    async def record_connection_states(self) -> None:
        """Start recording every state the connection indicator shows."""
        await self.page.evaluate(
            """() => {
                const el = document.getElementById('connection');
                window.__connectionStates = [el.dataset.state];
                new MutationObserver(() => window.__connectionStates.push(el.dataset.state))
                    .observe(el, { attributes: true, attributeFilter: ['data-state'] });
            }"""
        )

    async def connection_states(self) -> list[str]:
        """The states recorded since record_connection_states()."""
        states: list[str] = await self.page.evaluate("() => window.__connectionStates")
        return states

"""Accessibility of the chat in every state, checked by axe-core in a real browser.

axe-core comes bundled with axe-playwright-python (nothing is downloaded when the tests
run). Each state is checked in light and dark, against WCAG 2.2 A/AA and axe's best
practices; a serious or critical violation fails the test. The database plays no part in
how a page reads, so these run on SQLite only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
from axe_playwright_python.async_playwright import Axe
from playwright.async_api import BrowserContext, Page, expect

from blogchat.settings import Settings
from tests.support.anthropic_server import AnthropicTestServer, error, reply, text, tool_use
from tests.support.browser import snap
from tests.support.claude import claude_server_for
from tests.support.server import LiveServer, running

if TYPE_CHECKING:
    from tests.support.browser import ChatPage

    MakeChatPage = Callable[[Page, str], ChatPage]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.asyncio(loop_scope="session"),
    pytest.mark.parametrize("database", ["sqlite"], indirect=True),
]

AXE = Axe()
RULES = {
    "runOnly": {
        "type": "tag",
        "values": ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "wcag22aa", "best-practice"],
    },
    "resultTypes": ["violations"],
}
QUESTION = "How warm should a sourdough starter be kept?"


async def serious_violations(page: Page) -> list[dict[str, Any]]:
    """axe's serious and critical violations on the page as it is now."""
    results = await AXE.run(page, options=RULES)
    return [
        {
            "rule": violation["id"],
            "impact": violation["impact"],
            "help": violation["help"],
            "nodes": [node["target"] for node in violation["nodes"]][:5],
        }
        for violation in results.response["violations"]
        if violation["impact"] in ("serious", "critical")
    ]


async def check_both_schemes(page: Page, state: str) -> None:
    """Run axe on the page in light and in dark, saving a screenshot of each."""
    found = {}
    width = (page.viewport_size or {"width": 0})["width"]
    for scheme in ("light", "dark"):
        await page.emulate_media(color_scheme=scheme)
        found[scheme] = await serious_violations(page)
        await snap(page, f"a11y-{state}-{width}-{scheme}")
    assert found == {"light": [], "dark": []}


# The states that look different on a phone are checked there too.
DESKTOP_AND_PHONE = pytest.mark.parametrize("context_options", ["desktop", "phone"], indirect=True)


@pytest.fixture
def slow_server(make_settings: Callable[..., Settings]) -> Any:
    """A live server whose offline answers stream slowly enough to look at mid-answer."""
    with running(make_settings(offline_tokens_per_second=30)) as live:
        yield live


@DESKTOP_AND_PHONE
async def test_the_empty_chat_and_the_model_menu(
    server: LiveServer, page: Page, chat_page: MakeChatPage
) -> None:
    await chat_page(page, server.url).open()
    await check_both_schemes(page, "empty")
    await page.locator("#model-button").click()
    await expect(page.locator("#model-menu")).to_be_visible()
    await check_both_schemes(page, "model-menu")


@DESKTOP_AND_PHONE
async def test_a_streaming_answer(
    slow_server: LiveServer, page: Page, chat_page: MakeChatPage
) -> None:
    chat = await chat_page(page, slow_server.url).open()
    await chat.ask(QUESTION)
    await chat.wait_for_streamed_text(80)
    await check_both_schemes(page, "streaming")


@DESKTOP_AND_PHONE
async def test_an_answer_with_its_tool_cards_open(
    server: LiveServer, page: Page, chat_page: MakeChatPage
) -> None:
    chat = await chat_page(page, server.url).open()
    await chat.ask(f"{QUESTION} idempotency key code")
    done = await chat.wait_for_answer("complete")
    for summary in await done.locator(".tool summary").all():
        await summary.click()
    await expect(done.locator("pre.tool-raw").first).to_be_visible()
    # The raw result scrolls: the keyboard reaches it (it takes focus).
    raw = done.locator("pre.tool-raw").first
    await raw.focus()
    await expect(raw).to_be_focused()
    await check_both_schemes(page, "tool-cards-open")


async def test_a_failed_answer(
    api: AnthropicTestServer, claude_server: LiveServer, page: Page, chat_page: MakeChatPage
) -> None:
    api.when_user_says("overloaded-probe", [error(status=529)], repeat_last=True)
    chat = await chat_page(page, claude_server.url).open()
    await chat.ask("overloaded-probe: what is new?")
    await chat.wait_for_answer("error")
    await check_both_schemes(page, "error")


@DESKTOP_AND_PHONE
async def test_an_answer_at_the_step_limit(
    api: AnthropicTestServer,
    make_claude_settings: Callable[..., Settings],
    page: Page,
    chat_page: MakeChatPage,
) -> None:
    api.when_user_says(
        "everything",
        [
            reply(text("Let me look. "), tool_use("searchBlogContent", {"query": "sourdough"})),
            reply(tool_use("searchBlogContent", {"query": "starter"})),
            text("This is never asked for."),
        ],
    )
    with claude_server_for(make_claude_settings(max_turns=2)) as server:
        chat = await chat_page(page, server.url).open()
        await chat.ask("Tell me everything")
        answer = await chat.wait_for_answer("max_turns")
        await answer.locator(".tool-group > details > summary").click()
        await check_both_schemes(page, "step-limit")


@DESKTOP_AND_PHONE
async def test_an_answer_paused_offline(
    slow_server: LiveServer, browser_context: BrowserContext, page: Page, chat_page: MakeChatPage
) -> None:
    chat = await chat_page(page, slow_server.url).open()
    await chat.ask(QUESTION)
    await chat.wait_for_streamed_text(60)
    await browser_context.set_offline(True)
    await expect(page.locator(".note--paused")).to_be_visible()
    await check_both_schemes(page, "offline")
    await browser_context.set_offline(False)
    await chat.wait_for_answer("complete")


@pytest.mark.parametrize("context_options", ["phone"], indirect=True)
async def test_the_chat_list_on_a_phone(
    server: LiveServer, page: Page, chat_page: MakeChatPage
) -> None:
    chat = await chat_page(page, server.url).open()
    await chat.ask(QUESTION)
    await chat.wait_for_answer("complete")
    await check_both_schemes(page, "phone-chat")
    await page.locator("#sidebar-toggle").click()
    await expect(page.locator("#chat-sidebar")).to_have_attribute("data-open", "true")
    await expect(page.locator(".chat-item")).to_have_count(1)
    await check_both_schemes(page, "phone-sidebar")


async def test_the_composer_shows_a_two_pixel_focus(
    server: LiveServer, page: Page, chat_page: MakeChatPage
) -> None:
    await chat_page(page, server.url).open()
    # The border eases into its focus colour; without motion it is there at once, so the
    # colours compare as they end, not halfway through the transition.
    await page.emulate_media(reduced_motion="reduce")
    await page.locator("#message").focus()
    outline = await page.locator("#composer").evaluate(
        "(el) => { const s = getComputedStyle(el);"
        " return [s.outlineStyle, s.outlineWidth, s.outlineColor, s.borderTopColor]; }"
    )
    style, width, color, border = outline
    assert style == "solid"
    assert width == "2px"
    assert color == border, "the ring is the accent colour the border turns to"
    await snap(page, "composer-focus")

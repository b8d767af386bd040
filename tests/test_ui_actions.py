"""Regenerate, edit-and-resend and "Ask again" in a real browser against a real server
(SQLite and PostgreSQL): each reached with the keyboard, each replacing the last turn in
place."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from playwright.async_api import Page, expect

from tests.support.anthropic_server import AnthropicTestServer, error
from tests.support.browser import snap
from tests.support.server import LiveServer

if TYPE_CHECKING:
    from collections.abc import Callable

    from tests.support.browser import ChatPage

    MakeChatPage = Callable[[Page, str], ChatPage]

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]

QUESTION = "How warm should a sourdough starter be kept?"


async def reach(page: Page, name: str) -> None:
    """Focus a button by its accessible name with the keyboard alone (Shift+Tab back from
    the composer)."""
    await page.locator("#message").focus()
    for _ in range(80):
        await page.keyboard.press("Shift+Tab")
        label = await page.evaluate("() => document.activeElement.getAttribute('aria-label')")
        if label == name:
            return
    raise AssertionError(f"no keyboard path to “{name}”")


async def saved_messages(chat: ChatPage) -> list[dict[str, Any]]:
    detail = await chat.api(f"/api/chats/{await chat.chat_id()}")
    messages: list[dict[str, Any]] = detail["messages"]
    return messages


async def test_regenerate_by_keyboard_replaces_the_answer_in_place(
    server: LiveServer, page: Page, chat_page: MakeChatPage
) -> None:
    chat = await chat_page(page, server.url).open()
    await chat.ask(QUESTION)
    first = await chat.wait_for_answer("complete")
    first_id = await first.get_attribute("data-id")
    await snap(page, "before-regenerate")
    # Only the last answer offers it.
    await expect(first.get_by_role("button", name="Write this answer again")).to_be_visible()

    await reach(page, "Write this answer again")
    await page.keyboard.press("Enter")

    await expect(page.locator(f'.msg--assistant[data-id="{first_id}"]')).to_have_count(0)
    second = await chat.wait_for_answer("complete")
    assert await second.get_attribute("data-id") != first_id
    await expect(page.locator(".msg--user")).to_have_count(1)
    await expect(page.locator(".msg--user .msg__bubble")).to_have_text(QUESTION)
    await expect(page.locator(".msg--assistant")).to_have_count(1)
    saved = await saved_messages(chat)
    assert (saved[0]["role"], saved[0]["text"]) == ("user", QUESTION)
    assert saved[1]["id"] == await second.get_attribute("data-id")
    await snap(page, "regenerated")


@pytest.mark.parametrize("context_options", ["desktop", "phone-dark"], indirect=True)
async def test_edit_by_keyboard_sends_the_changed_question_in_place_of_the_old_one(
    server: LiveServer, page: Page, chat_page: MakeChatPage, context_options: dict[str, Any]
) -> None:
    chat = await chat_page(page, server.url).open()
    await chat.ask("How do I keep a starter?")
    await chat.wait_for_answer("complete")
    await chat.ask("Is rye flour fine?")
    await chat.wait_for_answer("complete", count=2)
    # Only the last message can be edited.
    edits = page.locator('.msg--user [aria-label="Edit your message and send it again"]')
    await expect(edits.nth(0)).to_be_hidden()
    await expect(edits.nth(1)).to_be_visible()
    regenerates = page.locator('.msg--assistant [aria-label="Write this answer again"]')
    await expect(regenerates.nth(0)).to_be_hidden()
    await expect(regenerates.nth(1)).to_be_visible()

    await reach(page, "Edit your message and send it again")
    await page.keyboard.press("Enter")
    composer = page.locator("#message")
    await expect(composer).to_be_focused()
    await expect(composer).to_have_value("Is rye flour fine?")
    await expect(page.locator(".editing")).to_contain_text("Editing your message")
    await snap(page, f"editing-{context_options['viewport']['width']}")
    await composer.fill("Is whole wheat flour fine?")
    await composer.press("Enter")

    await expect(page.locator(".msg--user .msg__bubble")).to_have_text(
        ["How do I keep a starter?", "Is whole wheat flour fine?"]
    )
    await chat.wait_for_answer("complete", count=2)
    await expect(page.locator(".msg--assistant")).to_have_count(2)
    await expect(page.locator(".editing")).to_be_hidden()
    await snap(page, f"edited-{context_options['viewport']['width']}")
    saved = await saved_messages(chat)
    assert [m["text"] for m in saved if m["role"] == "user"] == [
        "How do I keep a starter?",
        "Is whole wheat flour fine?",
    ]


async def test_escape_cancels_an_edit_and_gives_the_composer_back(
    server: LiveServer, page: Page, chat_page: MakeChatPage
) -> None:
    chat = await chat_page(page, server.url).open()
    await chat.ask(QUESTION)
    await chat.wait_for_answer("complete")
    await page.locator("#message").fill("a draft")
    await page.get_by_role("button", name="Edit your message and send it again").click()
    await expect(page.locator("#message")).to_have_value(QUESTION)
    await page.keyboard.press("Escape")
    await expect(page.locator("#message")).to_have_value("a draft")
    await expect(page.locator(".editing")).to_be_hidden()
    await expect(page.locator(".msg--user")).to_have_count(1)


async def test_ask_again_after_a_failure_retries_in_place(
    api: AnthropicTestServer,
    claude_server: LiveServer,
    page: Page,
    chat_page: MakeChatPage,
) -> None:
    # The first try and both retries fail; the provider is back for "Ask again".
    api.when_user_says("overloaded-probe", [error(status=529)] * 3)
    chat = await chat_page(page, claude_server.url).open()
    await chat.ask("overloaded-probe: what is new?")
    failed = await chat.wait_for_answer("error")
    await snap(page, "failed-before-ask-again")

    await failed.get_by_role("button", name="Ask again").click()

    await chat.wait_for_answer("complete")
    await expect(page.locator(".msg--user")).to_have_count(1)
    await expect(page.locator(".msg--assistant")).to_have_count(1)
    saved = await saved_messages(chat)
    assert [m["role"] for m in saved] == ["user", "assistant"]
    assert saved[1]["status"] == "complete"


@pytest.mark.parametrize("context_options", ["desktop", "phone"], indirect=True)
async def test_the_chat_list_searches_titles_and_text_and_shows_where_it_matched(
    server: LiveServer, page: Page, chat_page: MakeChatPage, context_options: dict[str, Any]
) -> None:
    chat = await chat_page(page, server.url).open()
    await chat.ask(QUESTION)
    await chat.wait_for_answer("complete")
    await chat.open("/chat")
    await chat.ask("How fine should espresso be ground?")
    await chat.wait_for_answer("complete")
    items = page.locator("#chat-list .chat-item")
    await expect(items).to_have_count(2)

    phone = context_options["viewport"]["width"] < 600
    if phone:
        await page.locator("#sidebar-toggle").click()
    search = page.get_by_role("searchbox", name="Search your chats")
    await search.fill("sourdough")
    await expect(items).to_have_count(1)
    await expect(items.first.locator(".chat-item__title")).to_have_text(QUESTION)
    await expect(page.locator("#chat-list .chat-group__title")).to_have_text("1 chat found")
    await snap(page, f"chat-search-{context_options['viewport']['width']}")

    await search.fill("zzz-nothing-like-it")
    await expect(items).to_have_count(0)
    await expect(page.locator("#chat-list-empty")).to_have_text(
        "No chat mentions “zzz-nothing-like-it”."
    )
    await search.fill("")
    await expect(items).to_have_count(2)


@pytest.mark.parametrize("context_options", ["desktop", "phone"], indirect=True)
async def test_a_restart_mid_answer_shows_it_ended_with_the_text_intact(
    database: Any,
    tmp_path: Any,
    page: Page,
    chat_page: MakeChatPage,
    context_options: dict[str, Any],
) -> None:
    import signal

    from tests.support.load import process_env
    from tests.support.server import ServerProcess

    env = process_env(database, tmp_path / "data", tokens_per_second=40)
    server = ServerProcess(env).start(tmp_path / "server.log")
    try:
        chat = await chat_page(page, server.url).open()
        await chat.ask(QUESTION)
        await chat.wait_for_streamed_text(120)
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)
        stopped = await chat.wait_for_answer("stopped")
        await expect(stopped.locator(".note--warning")).to_contain_text("server restarted")
        shown = await chat.client_state()
        server.process.wait(timeout=30)
        await snap(page, f"interrupted-{context_options['viewport']['width']}")
    finally:
        server.stop()
    answer = next(m for m in shown["messages"] if m["kind"] == "assistant")
    restarted = ServerProcess(env, port=server.port).start(tmp_path / "server.log")
    try:
        await chat.wait_connected()
        saved = await chat.api(f"/api/chats/{await chat.chat_id()}")
        assert saved["messages"][1]["text"] == answer["text"]
        await expect(chat.answers("stopped")).to_have_count(1)
    finally:
        restarted.stop()

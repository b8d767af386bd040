"""The chat in a real browser against a real server (SQLite and PostgreSQL).

The offline engine answers (no model configured): one `thinking` event, tool calls, then the
answer's tokens. `slow_server` streams 30 tokens a second, so that a test can act mid-answer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest
from playwright.async_api import BrowserContext, Page, expect

from blogchat.connection import CLOSE_GOING_AWAY
from blogchat.settings import Settings
from tests.support.anthropic_server import AnthropicTestServer, error, reply, text
from tests.support.server import LiveServer, running

if TYPE_CHECKING:
    # Only for types: tests/conftest.py loads the module as a plugin (assertion rewriting).
    from tests.support.browser import ChatPage

    MakeChatPage = Callable[[Page, str], ChatPage]

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]

POST_SLUG = "dialing-in-espresso-at-home"
QUESTION = "How warm should a sourdough starter be kept?"


@pytest.fixture
def slow_server(make_settings: Callable[..., Settings]) -> Iterator[LiveServer]:
    """A live server whose offline answers stream slowly enough to interrupt."""
    with running(make_settings(offline_tokens_per_second=30)) as live:
        yield live


async def _drop_every_connection(server: LiveServer) -> int:
    hub = server.state.hub
    connections = list(hub.connections.values())
    for connection in connections:
        connection.close(CLOSE_GOING_AWAY)
    return len(connections)


async def _saved_answer(chat: ChatPage, chat_id: str, index: int = 0) -> dict[str, Any]:
    detail = await chat.api(f"/api/chats/{chat_id}")
    answers = [m for m in detail["messages"] if m["role"] == "assistant"]
    answer: dict[str, Any] = answers[index]
    return answer


async def _client_answer_text(chat: ChatPage, index: int = 0) -> str:
    state = await chat.client_state()
    answers = [m for m in state["messages"] if m["kind"] == "assistant"]
    text: str = answers[index]["text"]
    return text


async def test_a_question_shows_thinking_a_tool_card_the_streamed_text_then_rendered_html(
    slow_server: LiveServer, page: Page, chat_page: MakeChatPage
) -> None:
    chat = await chat_page(page, slow_server.url).open()
    await chat.ask(QUESTION)

    streamed = await chat.wait_for_streamed_text(60)
    # While it streams, the answer is text: its Markdown shows as typed, uninterpreted.
    assert streamed.startswith("*Offline mode")
    answer = chat.answers().first
    thinking = answer.locator("details.thinking")
    await expect(thinking).to_contain_text("Offline mode, no model")
    await expect(thinking).not_to_have_attribute("open", "")  # folded once the answer started
    card = answer.locator('.tool[data-tool="searchBlogContent"]')
    await expect(card).to_have_attribute("data-state", "ok")
    await expect(card.locator(".tool__summary")).to_have_text(
        f"Searched the blog for “{QUESTION}” · 3 results"
    )

    done = await chat.wait_for_answer("complete")
    await expect(page.locator("#message")).to_be_focused()
    html = done.locator(".answer__html")
    await expect(html.locator("em").first).to_contain_text("Offline mode")
    await expect(html.locator('a[href^="/posts/"]').first).to_be_visible()
    await expect(done.locator(".answer__stream")).to_have_count(0)

    # The card opens to the raw input and result.
    await card.locator("summary").click()
    await expect(card.locator(".tool-raw").first).to_contain_text('"query"')
    await expect(card.locator(".tool-raw").nth(1)).to_contain_text('"results"')

    saved = await _saved_answer(chat, await chat.chat_id())
    assert await html.text_content() == await chat.text_of(saved["html"])
    assert await _client_answer_text(chat) == saved["text"]


async def test_stop_ends_the_answer_as_stopped_and_the_partial_text_survives_a_reload(
    slow_server: LiveServer, page: Page, chat_page: MakeChatPage
) -> None:
    chat = await chat_page(page, slow_server.url).open()
    await chat.ask(QUESTION)
    await chat.wait_for_streamed_text(40)
    await page.locator("#stop").click()

    stopped = await chat.wait_for_answer("stopped")
    await expect(stopped.locator(".badge")).to_have_text("Stopped")
    await expect(page.locator("#stop")).to_be_hidden()
    await expect(page.locator("#message")).to_be_focused()
    chat_id = await chat.chat_id()
    saved = await _saved_answer(chat, chat_id)
    assert saved["status"] == "stopped"
    assert saved["text"].strip()

    await page.reload()
    await chat.wait_connected()
    kept = await chat.wait_for_answer("stopped")
    assert await kept.locator(".answer__html").text_content() == await chat.text_of(saved["html"])
    assert await _client_answer_text(chat) == saved["text"]


async def test_escape_stops_the_running_answer(
    slow_server: LiveServer, page: Page, chat_page: MakeChatPage
) -> None:
    chat = await chat_page(page, slow_server.url).open()
    await chat.ask(QUESTION)
    await chat.wait_for_streamed_text(20)
    await page.keyboard.press("Escape")
    await chat.wait_for_answer("stopped")
    assert (await _saved_answer(chat, await chat.chat_id()))["status"] == "stopped"


async def test_a_dropped_socket_reconnects_and_the_answer_completes_with_no_word_lost_or_repeated(
    slow_server: LiveServer, page: Page, chat_page: MakeChatPage
) -> None:
    chat = await chat_page(page, slow_server.url).open()
    await chat.ask(QUESTION)
    await chat.wait_for_streamed_text(40)
    await chat.record_connection_states()

    assert slow_server.call(_drop_every_connection(slow_server)) == 1

    await chat.wait_for_answer("complete")
    await chat.wait_connected()
    states = await chat.connection_states()
    assert "reconnecting" in states, states
    assert states[-1] == "open"
    saved = await _saved_answer(chat, await chat.chat_id())
    # Every token exactly once: the client's text is the saved answer, word for word.
    assert await _client_answer_text(chat) == saved["text"]
    shown = await chat.answers("complete").first.locator(".answer__html").text_content()
    assert shown == await chat.text_of(saved["html"])


async def test_reloading_mid_answer_continues_the_answer_to_its_end(
    slow_server: LiveServer, page: Page, chat_page: MakeChatPage
) -> None:
    chat = await chat_page(page, slow_server.url).open()
    await chat.ask(QUESTION)
    before = await chat.wait_for_streamed_text(40)
    chat_id = await chat.chat_id()

    await page.reload()
    await chat.wait_connected()
    done = await chat.wait_for_answer("complete")

    saved = await _saved_answer(chat, chat_id)
    assert saved["text"].startswith(before)
    assert await _client_answer_text(chat) == saved["text"]
    assert await done.locator(".answer__html").text_content() == await chat.text_of(saved["html"])
    await expect(page.locator(".msg--user")).to_have_count(1)


@pytest.mark.parametrize("context_options", ["desktop-dark"], indirect=True)
async def test_two_tabs_on_the_same_chat_show_the_same_final_answer(
    slow_server: LiveServer, browser_context: BrowserContext, chat_page: MakeChatPage
) -> None:
    first = await chat_page(await browser_context.new_page(), slow_server.url).open()
    await first.ask(QUESTION)
    await first.wait_for_streamed_text(20)
    chat_id = await first.chat_id()
    second = await chat_page(await browser_context.new_page(), slow_server.url).open(
        f"/chat/{chat_id}"
    )

    answers = [await tab.wait_for_answer("complete") for tab in (first, second)]
    saved = await _saved_answer(first, chat_id)
    for tab, answer in zip((first, second), answers, strict=True):
        assert await _client_answer_text(tab) == saved["text"]
        assert await answer.locator(".answer__html").text_content() == await tab.text_of(
            saved["html"]
        )


async def test_anonymous_readers_cannot_pick_opus_and_a_reader_who_signs_up_can_and_keeps_it(
    server: LiveServer, page: Page, chat_page: MakeChatPage
) -> None:
    chat = await chat_page(page, server.url).open()
    model = page.locator("#model")
    await expect(model).to_be_disabled()
    await expect(model).to_have_value("haiku")
    hint = page.get_by_role("link", name="Sign in to choose a model")
    await expect(hint).to_have_attribute("href", "/login?next=/chat")

    await hint.click()
    await page.get_by_role("link", name="Create an account").click()
    await page.locator("#email").fill("reader@example.com")
    await page.locator("#password").fill("correct horse battery staple")
    await page.locator("form.auth-form button[type=submit]").click()
    await page.wait_for_url("**/chat")
    await chat.wait_connected()

    await expect(model).to_be_enabled()
    await expect(page.locator("#model-hint")).to_be_hidden()
    await model.select_option("opus")
    await chat.ask("What's new on the blog?")
    await chat.wait_for_answer("complete")
    chat_id = await chat.chat_id()
    assert (await chat.api(f"/api/chats/{chat_id}"))["chat"]["model"] == "opus"

    await page.reload()
    await chat.wait_connected()
    await expect(model).to_have_value("opus")
    await expect(model).to_be_enabled()


async def test_the_persona_is_chosen_for_a_new_chat_and_locked_after_the_first_message(
    server: LiveServer, page: Page, chat_page: MakeChatPage
) -> None:
    chat = await chat_page(page, server.url).open()
    persona = page.locator("#persona")
    await expect(persona.locator("option")).to_have_count(len(await chat.api("/api/personas")))
    await expect(persona).to_be_enabled()
    await persona.select_option("reading-guide")
    await expect(page.locator("#persona-description")).to_contain_text("what you're into")

    await chat.ask("I like long bike rides. What should I read?")
    chat_id = await chat.chat_id()
    await expect(persona).to_be_disabled()
    await expect(persona).to_have_value("reading-guide")
    await expect(page.locator(".chip--persona")).to_have_attribute("data-locked", "true")
    await expect(page.locator("#persona-chip")).to_have_text("Reading guide")
    await chat.wait_for_answer("complete")
    assert (await chat.api(f"/api/chats/{chat_id}"))["chat"]["persona"] == "reading-guide"

    await page.reload()
    await chat.wait_connected()
    await expect(persona).to_be_disabled()
    await expect(persona).to_have_value("reading-guide")


@pytest.mark.parametrize("context_options", ["phone-dark"], indirect=True)
async def test_the_offline_notice_shows_when_no_model_is_configured(
    server: LiveServer, page: Page, chat_page: MakeChatPage
) -> None:
    chat = await chat_page(page, server.url).open()
    assert all(m["engine"] == "offline" for m in await chat.api("/api/models"))
    notice = page.locator("#offline-notice")
    await expect(notice).to_be_visible()
    await expect(notice).to_contain_text("Offline mode")
    await page.get_by_role("button", name="Which post should I read first?").click()
    await chat.wait_for_answer("complete")
    await expect(page.locator(".msg--user")).to_have_text(["Which post should I read first?"])


@pytest.mark.parametrize("context_options", ["phone"], indirect=True)
async def test_asking_from_a_post_page_starts_a_chat_about_that_post(
    server: LiveServer, page: Page, chat_page: MakeChatPage
) -> None:
    await page.goto(f"{server.url}/posts/{POST_SLUG}")
    title = await page.locator("h1").first.text_content()
    assert title
    await page.get_by_role("link", name="Ask about this post").first.click()
    await page.wait_for_url(f"**/chat?post={POST_SLUG}")
    chat = chat_page(page, server.url)
    await chat.wait_connected()
    await expect(page.locator("#post-context")).to_contain_text(title.strip())

    await chat.ask("What grind size does it recommend?")
    answer = await chat.wait_for_answer("complete")
    card = answer.locator('.tool[data-tool="getPost"]')
    await expect(card.locator(".tool__summary")).to_have_text(f"Read “{title.strip()}”")

    chat_id = await chat.chat_id()
    detail = await chat.api(f"/api/chats/{chat_id}")
    assert detail["chat"]["post"] == POST_SLUG
    first_answer = next(m for m in detail["messages"] if m["role"] == "assistant")
    assert {"name": "getPost", "slug": POST_SLUG} in [
        {"name": call["name"], "slug": call["input"].get("slug")}
        for call in first_answer["toolCalls"]
    ]
    # The chat keeps its post when it is opened again.
    await page.reload()
    await chat.wait_connected()
    await expect(page.locator("#post-context")).to_contain_text(title.strip())


async def test_a_message_sent_during_an_answer_is_queued_below_it_then_answered_in_turn(
    slow_server: LiveServer, page: Page, chat_page: MakeChatPage
) -> None:
    chat = await chat_page(page, slow_server.url).open()
    await chat.ask(QUESTION)
    await chat.wait_for_streamed_text(20)
    await chat.ask("And how often should I feed it?")

    queued = page.locator('.msg--user[data-phase="queued"]')
    await expect(queued.locator(".msg__bubble")).to_have_text("And how often should I feed it?")
    await expect(queued.locator(".msg__status")).to_contain_text("Queued")
    # Below the answer that is still being written.
    order = await page.locator("#transcript > li").evaluate_all(
        "items => items.map(li => li.classList.contains('msg--user') ? 'user' : li.dataset.status)"
    )
    assert order == ["user", "streaming", "user"]

    # Two answers of about 400 tokens each at 30 a second: allow for a slow machine.
    await chat.wait_for_answer("complete", count=2, timeout=120_000)
    order = await page.locator("#transcript > li").evaluate_all(
        "items => items.map(li => li.classList.contains('msg--user') ? 'user' : li.dataset.status)"
    )
    assert order == ["user", "complete", "user", "complete"]


async def test_the_chat_list_opens_renames_and_deletes_chats_after_confirmation(
    server: LiveServer, page: Page, chat_page: MakeChatPage
) -> None:
    chat = await chat_page(page, server.url).open()
    await chat.ask(QUESTION)
    await chat.wait_for_answer("complete")
    chat_id = await chat.chat_id()
    item = page.locator(f'.chat-item[data-id="{chat_id}"]')
    await expect(item.locator(".chat-item__title")).to_have_text(QUESTION)
    await expect(item).to_have_class("chat-item chat-item--current")

    await item.get_by_role("button", name=f"Rename “{QUESTION}”").click()
    title = item.get_by_role("textbox", name="Chat title")
    await title.fill("Starter temperature")
    await title.press("Enter")
    await expect(item.locator(".chat-item__title")).to_have_text("Starter temperature")
    await expect(page.locator("#chat-title")).to_have_text("Starter temperature")
    assert (await chat.api(f"/api/chats/{chat_id}"))["chat"]["title"] == "Starter temperature"

    await item.get_by_role("button", name="Delete “Starter temperature”").click()
    await item.get_by_role("button", name="Cancel").click()
    await expect(item.locator(".chat-item__title")).to_have_text("Starter temperature")
    await item.get_by_role("button", name="Delete “Starter temperature”").click()
    await item.get_by_role("button", name="Delete", exact=True).click()

    await page.wait_for_url(f"{server.url}/chat")
    await chat.wait_connected()
    await expect(page.locator(".chat-item")).to_have_count(0)
    response = await page.request.get(f"{server.url}/api/chats/{chat_id}")
    assert response.status == 404


async def test_streaming_patches_the_answer_in_place_and_never_redraws_the_transcript(
    server: LiveServer, page: Page, chat_page: MakeChatPage
) -> None:
    chat = await chat_page(page, server.url).open()
    await chat.ask(QUESTION)
    await chat.wait_for_answer("complete")
    # Mark the drawn messages, then count what the next answer changes in the list.
    await page.evaluate(
        """() => {
            for (const li of document.querySelectorAll('#transcript > li')) li.dataset.drawn = '1';
            window.__changes = { items: 0, inAnswers: 0 };
            const list = document.getElementById('transcript');
            new MutationObserver((records) => {
                for (const r of records) {
                    if (r.type !== 'childList') continue;
                    if (r.target === list) window.__changes.items += r.addedNodes.length;
                    else if (r.target.closest('.answer')) window.__changes.inAnswers += 1;
                }
            }).observe(list, { childList: true, subtree: true });
        }"""
    )
    await chat.ask("And how often should I feed it?")
    await chat.wait_for_answer("complete", count=2)

    state = await chat.client_state()
    tokens = len(state["messages"][-1]["text"].split())
    assert tokens > 100, "a long answer, streamed token by token"
    changes = await page.evaluate("() => window.__changes")
    # The new question, the answer's placeholder and the answer; nothing else is redrawn.
    assert changes["items"] <= 3, changes
    # The streamed text went into one text node; it was swapped for HTML once, at the end.
    assert changes["inAnswers"] <= 3, changes
    await expect(page.locator('#transcript > li[data-drawn="1"]')).to_have_count(2)


# --- on the Claude engine (the Anthropic test server stands in for the provider) ---------


async def test_a_provider_failure_shows_the_error_and_whether_asking_again_helps(
    api: AnthropicTestServer,
    claude_server: LiveServer,
    page: Page,
    chat_page: MakeChatPage,
) -> None:
    api.when_user_says("overloaded-probe", [error(status=529)], repeat_last=True)
    chat = await chat_page(page, claude_server.url).open()
    await chat.ask("overloaded-probe: what is new?")

    failed = await chat.wait_for_answer("error")
    note = failed.locator(".note--error")
    await expect(note).to_contain_text("The answer failed.")
    await expect(note).to_contain_text("overloaded")
    await expect(note).to_contain_text("asking again should work")
    await expect(note.get_by_role("button", name="Ask again")).to_be_visible()
    await expect(failed.locator(".badge--error")).to_have_text("Failed")
    saved = await _saved_answer(chat, await chat.chat_id())
    assert saved["status"] == "error"
    assert "overloaded" in saved["error"]


XSS = (
    'Sure. <script>window.__pwned = "script"</script> and '
    "<img src=x onerror=\"window.__pwned = 'img'\"> and [a link](javascript:alert(1)). Done."
)


async def test_model_output_with_script_and_img_onerror_stays_inert(
    api: AnthropicTestServer,
    claude_server: LiveServer,
    page: Page,
    chat_page: MakeChatPage,
) -> None:
    api.when_user_says("xss-probe", [reply(text(XSS))])
    chat = await chat_page(page, claude_server.url).open()
    await chat.ask("xss-probe")

    done = await chat.wait_for_answer("complete")
    html = done.locator(".answer__html")
    # The tags show as text; nothing of them became markup.
    await expect(html).to_contain_text("<script>")
    await expect(html).to_contain_text("onerror=")
    assert await html.locator("script").count() == 0
    assert await html.locator("img").count() == 0
    assert await page.locator("[onerror]").count() == 0
    assert await html.locator('a[href^="javascript:"]').count() == 0
    assert await page.evaluate("() => window.__pwned") is None

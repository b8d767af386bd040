"""The chat in a real browser against a real server (SQLite and PostgreSQL).

The offline engine answers (no model configured): one `thinking` event, tool calls, then the
answer's tokens. `slow_server` streams 30 tokens a second, so that a test can act mid-answer.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pytest
from playwright.async_api import BrowserContext, Page, expect

from blogchat.connection import CLOSE_GOING_AWAY
from blogchat.settings import Settings
from blogchat.store.tables import utcnow
from tests.support.anthropic_server import (
    AnthropicTestServer,
    error,
    reply,
    text,
    thinking,
    tool_use,
)
from tests.support.browser import record_measurement, snap
from tests.support.claude import claude_server_for
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
    assert streamed.startswith("*Offline mode")
    answer = chat.answers().first
    # While it streams, its Markdown is already rendered: emphasis, not asterisks.
    live = answer.locator(".answer__stream")
    await expect(live.locator("em").first).to_contain_text("Offline mode")
    assert not (await live.text_content() or "").lstrip().startswith("*")
    thinking_block = answer.locator("details.thinking")
    await expect(thinking_block).to_contain_text("Offline mode, no model")
    await expect(thinking_block).not_to_have_attribute("open", "")  # folded once answering
    await expect(thinking_block.locator(".thinking__label")).to_have_text(
        re.compile(r"^Thought for (<1|\d+) s$")
    )
    card = answer.locator('.tool[data-tool="searchBlogContent"]')
    await expect(card).to_have_attribute("data-state", "ok")
    # Three results, two of them the same post (with and without a section): two posts.
    await expect(card.locator(".tool__summary")).to_have_text(
        f"Searched the blog for “{QUESTION}” · 2 results"
    )

    done = await chat.wait_for_answer("complete")
    await expect(page.locator("#message")).to_be_focused()
    html = done.locator(".answer__html")
    await expect(html.locator("em").first).to_contain_text("Offline mode")
    await expect(html.locator('a[href^="/posts/"]').first).to_be_visible()
    await expect(done.locator(".answer__stream")).to_have_count(0)

    # The card opens to the posts it found (each once) and the raw input and result.
    await card.locator("summary").click()
    findings = card.locator(".tool-findings a")
    await expect(findings).to_have_count(2)
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


async def test_every_model_shows_locked_ones_say_why_and_signing_up_unlocks_them(
    server: LiveServer, page: Page, chat_page: MakeChatPage
) -> None:
    chat = await chat_page(page, server.url).open()
    button = page.locator("#model-button")
    menu = page.locator("#model-menu")
    await expect(button).to_have_text("Model: Haiku")
    await button.click()
    await expect(menu).to_be_visible()
    await expect(menu.locator(".model-option__name")).to_have_text(["Haiku", "Sonnet", "Opus"])
    await expect(menu.get_by_role("radio", name="Haiku")).to_be_focused()
    await expect(menu.get_by_role("radio", name="Haiku")).to_be_checked()
    for locked in ("Sonnet", "Opus"):
        radio = menu.get_by_role("radio", name=locked)
        await expect(radio).to_be_disabled()
        await expect(radio).to_have_accessible_description(
            f"Sign in to use {locked}: anonymous chats use Haiku."
        )
    sign_in = menu.get_by_role("link", name="Sign in")
    await expect(sign_in).to_have_attribute("href", "/login?next=/chat")
    await snap(page, "model-picker-anonymous")
    # Escape closes the menu (and stops nothing); focus goes back to the button.
    await page.keyboard.press("Escape")
    await expect(menu).to_be_hidden()
    await expect(button).to_be_focused()

    await button.click()
    await sign_in.click()
    await page.get_by_role("link", name="Create an account").click()
    await page.locator("#email").fill("reader@example.com")
    await page.locator("#password").fill("correct horse battery staple")
    await page.locator("form.auth-form button[type=submit]").click()
    await page.wait_for_url("**/chat")
    await chat.wait_connected()

    await expect(page.locator("#model-hint")).to_be_hidden()
    await button.click()
    for name in ("Haiku", "Sonnet", "Opus"):
        await expect(menu.get_by_role("radio", name=name)).to_be_enabled()
    descriptions = menu.locator(".model-option__description")
    await expect(descriptions).to_have_count(3)
    for index in range(3):
        await expect(descriptions.nth(index)).not_to_be_empty()
    await expect(menu.get_by_role("radio", name="Opus")).to_have_accessible_description(
        re.compile(r"^Most capable")
    )
    await snap(page, "model-picker-signed-in")
    # Arrow keys move the choice, as in any radio group; the menu closes on Enter.
    await page.keyboard.press("ArrowDown")
    await page.keyboard.press("ArrowDown")
    await page.keyboard.press("Enter")
    await expect(menu).to_be_hidden()
    await expect(button).to_have_text("Model: Opus")
    await expect(page.locator("#message")).to_be_focused()
    await chat.ask("What's new on the blog?")
    await chat.wait_for_answer("complete")
    chat_id = await chat.chat_id()
    assert (await chat.api(f"/api/chats/{chat_id}"))["chat"]["model"] == "opus"

    await page.reload()
    await chat.wait_connected()
    await expect(button).to_have_text("Model: Opus")


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
    await expect(page.locator(".msg--user .msg__bubble")).to_have_text(
        ["Which post should I read first?"]
    )


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
    await expect(page.locator(".chat-group__title")).to_have_text(["Today"])

    await item.get_by_role("button", name=f"Rename “{QUESTION}”").click()
    title = item.get_by_role("textbox", name="Chat title")
    await expect(title).to_be_focused()
    # The title gets the list's whole width, the buttons a line of their own. (Measured in
    # one step in the page: the list may be redrawn meanwhile, the answer having ended.)
    widths = await page.evaluate(
        """() => [document.querySelector('.chat-item__input'), document.getElementById('chat-list')]
            .map((element) => element.getBoundingClientRect().width)"""
    )
    assert widths[0] >= widths[1] - 40, widths
    # A redraw of the list (here: the chat renamed the same, elsewhere) keeps what the
    # reader typed, and the focus.
    await title.fill("Starter")
    # (A redrawn box is a new element: the mark is gone with the old one.)
    await title.evaluate("(input) => { input.dataset.before = 'redraw'; }")
    response = await page.request.patch(
        f"{server.url}/api/chats/{chat_id}", data={"title": QUESTION}
    )
    assert response.ok
    await expect(page.locator(".chat-item__input[data-before]")).to_have_count(0)
    await expect(title).to_have_value("Starter")
    await expect(title).to_be_focused()
    await title.fill(QUESTION)
    await expect(item.get_by_role("button", name="Save")).to_be_visible()
    await snap(page, "chat-list-rename")
    await item.get_by_role("button", name="Cancel").click()
    await expect(item.locator(".chat-item__title")).to_have_text(QUESTION)
    await expect(item.locator(".chat-item__link")).to_be_focused()

    await item.get_by_role("button", name=f"Rename “{QUESTION}”").click()
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


async def test_streaming_redraws_only_the_growing_block_and_never_the_transcript(
    paced_server: LiveServer, page: Page, chat_page: MakeChatPage
) -> None:
    chat = await chat_page(page, paced_server.url).open()
    await chat.ask(QUESTION)
    await chat.wait_for_answer("complete")
    # Mark the drawn messages; then, while the next answer streams, seal every block of it
    # that has a block after it, and count what the list and the answer redraw.
    await page.evaluate(
        """() => {
            for (const li of document.querySelectorAll('#transcript > li')) li.dataset.drawn = '1';
            window.__changes = { items: 0, blocksDrawn: 0, sealedRedrawn: 0 };
            const list = document.getElementById('transcript');
            new MutationObserver((records) => {
                for (const r of records) {
                    if (r.target === list) window.__changes.items += r.addedNodes.length;
                    if (!r.target.classList?.contains('answer__stream')) continue;
                    for (const n of r.removedNodes) {
                        if (n.dataset?.sealed) window.__changes.sealedRedrawn += 1;
                    }
                    for (const n of r.addedNodes) {
                        if (n.nodeType === Node.ELEMENT_NODE) window.__changes.blocksDrawn += 1;
                    }
                }
                for (const stream of list.querySelectorAll('.answer__stream')) {
                    const blocks = [...stream.children];
                    for (const block of blocks.slice(0, -1)) block.dataset.sealed = '1';
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
    # A block with text after it is finished: it is never drawn again.
    assert changes["sealedRedrawn"] == 0, changes
    assert changes["blocksDrawn"] > 5, changes
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


# --- live Markdown, code blocks, message actions ----------------------------------------

# The tree of an element's children as text, attributes sorted, code reduced to its text:
# highlighting arrives on its own (POST /api/highlight) and is checked apart.
CANON_JS = """() => {
window.__canon = (root) => {
  const canon = (node) => {
    if (node.nodeType === Node.TEXT_NODE) return JSON.stringify(node.data);
    if (node.nodeType !== Node.ELEMENT_NODE) return '';
    const attrs = [...node.attributes].map((a) => `${a.name}=${JSON.stringify(a.value)}`).sort();
    const inner = node.localName === 'code' && node.parentElement?.localName === 'pre'
      ? JSON.stringify(node.textContent) : [...node.childNodes].map(canon).join('');
    return `<${[node.localName, ...attrs].join(' ')}>${inner}</${node.localName}>`;
  };
  return [...root.childNodes].map(canon).join('');
};
}"""

CODE_QUESTION = "idempotency key code"


@pytest.fixture
def paced_server(make_settings: Callable[..., Settings]) -> Iterator[LiveServer]:
    """A live server streaming offline answers at 150 tokens a second: a few seconds each."""
    with running(make_settings(offline_tokens_per_second=150)) as live:
        yield live


async def test_the_last_live_rendering_is_the_final_html_node_for_node(
    paced_server: LiveServer, page: Page, chat_page: MakeChatPage
) -> None:
    chat = await chat_page(page, paced_server.url).open()
    await page.evaluate(CANON_JS)
    # Keep the live rendering as it is taken off the page, at `done`.
    await page.evaluate(
        """() => {
            window.__lastLive = null;
            new MutationObserver((records) => {
                for (const r of records) for (const n of r.removedNodes) {
                    if (n.classList?.contains('answer__stream')) window.__lastLive = __canon(n);
                }
            }).observe(document.getElementById('transcript'), { childList: true, subtree: true });
        }"""
    )
    await chat.ask(CODE_QUESTION)
    streaming = page.locator(".msg--streaming .answer__stream")
    # Live: links, a quote, a framed code block, all while the answer is still streaming.
    await expect(streaming.locator('a[href^="/posts/"]').first).to_be_visible()
    await expect(streaming.locator("blockquote").first).to_be_visible()
    await expect(streaming.locator(".code-block").first).to_be_visible()
    await snap(page, "live-markdown-streaming")

    done = await chat.wait_for_answer("complete")
    final = await done.locator(".answer__html").evaluate("(el) => __canon(el)")
    last_live = await page.evaluate("() => window.__lastLive")
    assert last_live is not None, "the answer was rendered live before it was done"
    assert last_live == final
    assert "<pre tabindex=" in final
    assert "<blockquote>" in final


async def test_code_quoted_from_a_post_is_not_italic_and_is_highlighted(
    server: LiveServer, page: Page, chat_page: MakeChatPage
) -> None:
    chat = await chat_page(page, server.url).open()
    await chat.ask(CODE_QUESTION)
    done = await chat.wait_for_answer("complete")
    quoted = done.locator("blockquote .code-block").first
    await expect(quoted.locator(".code-block__lang")).to_have_text("sql")
    await expect(quoted.locator("code span.k").first).to_have_text("CREATE")
    assert await quoted.locator("code").evaluate("(el) => getComputedStyle(el).fontStyle") == (
        "normal"
    )
    # The quote around it stays italic: only the code is not.
    quote = done.locator("blockquote > p").first
    assert await quote.evaluate("(el) => getComputedStyle(el).fontStyle") == "italic"
    await quoted.evaluate("(el) => el.scrollIntoView({ block: 'center' })")
    await snap(page, "code-block-in-a-quote")


CODE_ANSWER = (
    "Here is the function:\n\n```python\ndef double(x):\n    return x * 2  # twice\n```\n\n"
    + "It multiplies its argument by two, and that is all it does. " * 12
)


@pytest.mark.parametrize("context_options", ["desktop-dark"], indirect=True)
async def test_code_blocks_have_a_label_a_copy_button_and_highlighting_live_and_final(
    api: AnthropicTestServer,
    claude_server: LiveServer,
    browser_context: BrowserContext,
    page: Page,
    chat_page: MakeChatPage,
) -> None:
    await browser_context.grant_permissions(["clipboard-read", "clipboard-write"])
    api.when_user_says("code-probe", [reply(text(CODE_ANSWER, delay=0.04))])
    chat = await chat_page(page, claude_server.url).open()
    await chat.ask("code-probe: show me")

    # As soon as its closing fence arrives, the block is highlighted, mid-answer.
    live = page.locator(".msg--streaming .answer__stream .code-block")
    await expect(live.locator("code span.k").first).to_have_text("def")
    await expect(live.locator(".code-block__lang")).to_have_text("python")
    await expect(page.locator(".msg--streaming")).to_have_count(1)
    await snap(page, "code-block-live-dark")

    done = await chat.wait_for_answer("complete")
    block = done.locator(".answer__html .code-block")
    await expect(block.locator("code span.nf")).to_have_text("double")
    await expect(block.locator("code span.c1")).to_have_text("# twice")
    assert await block.locator("code [style]").count() == 0, "classes, never inline styles"
    copy = block.get_by_role("button", name="Copy the python code")
    await copy.focus()
    await page.keyboard.press("Enter")
    await expect(copy).to_have_attribute("data-copied", "true")
    clipboard = await page.evaluate("() => navigator.clipboard.readText()")
    assert clipboard == "def double(x):\n    return x * 2  # twice\n"


async def test_an_answer_copies_as_markdown_and_your_message_copies_by_keyboard(
    server: LiveServer, browser_context: BrowserContext, page: Page, chat_page: MakeChatPage
) -> None:
    await browser_context.grant_permissions(["clipboard-read", "clipboard-write"])
    chat = await chat_page(page, server.url).open()
    await chat.ask(QUESTION)
    done = await chat.wait_for_answer("complete")
    saved = await _saved_answer(chat, await chat.chat_id())

    # Every action is reached with the keyboard alone: Shift+Tab back from the composer.
    async def reach(name: str) -> None:
        await page.locator("#message").focus()
        for _ in range(80):
            await page.keyboard.press("Shift+Tab")
            label = await page.evaluate("() => document.activeElement.getAttribute('aria-label')")
            if label == name:
                return
        raise AssertionError(f"no keyboard path to “{name}”")

    await reach("Copy the answer as Markdown")
    await page.keyboard.press("Enter")
    await expect(done.get_by_role("button", name="Copy the answer as Markdown")).to_have_attribute(
        "data-copied", "true"
    )
    assert await page.evaluate("() => navigator.clipboard.readText()") == saved["text"]
    assert saved["text"].startswith("*Offline mode"), "Markdown, not the rendered text"

    await reach("Copy your message")
    await page.keyboard.press("Space")
    await expect(
        page.locator('.msg--user .msg__action[aria-label="Copy your message"]')
    ).to_have_attribute("data-copied", "true")
    assert await page.evaluate("() => navigator.clipboard.readText()") == QUESTION
    await snap(page, "message-actions")


# --- stop, waits and states ---------------------------------------------------------------


async def _watch_stop(page: Page) -> None:
    """Record, in the page, the answer's text at the stop click and the click → done time."""
    await page.evaluate(
        """() => {
            const client = document.getElementById('chat-app').chatClient;
            window.__stop = { doneAt: null };
            const stop = document.getElementById('stop');
            stop.addEventListener('click', () => {
                window.__stop.clickedAt = performance.now();
            }, { capture: true });
            // After the page's own click handler: the first frame drawn after the click.
            stop.addEventListener('click', () => {
                window.__stop.stoppingAtClick = client.state.stopping;
                requestAnimationFrame(() => {
                    window.__stop.firstFrame = {
                        label: stop.textContent.trim(),
                        disabled: stop.disabled,
                        doneBefore: window.__stop.doneAt !== null,
                    };
                });
            }, { once: true });
            client.on('state', (state, event) => {
                if (event.type === 'done' && window.__stop.doneAt === null) {
                    window.__stop.doneAt = performance.now();
                }
            });
        }"""
    )


async def _stopped_answer(page: Page) -> dict[str, Any]:
    result: dict[str, Any] = await page.evaluate(
        """async () => {
            const { visibleText } = await import('/static/js/chat-client.js');
            const client = document.getElementById('chat-app').chatClient;
            const answer = client.state.messages.findLast((m) => m.kind === 'assistant');
            return { ...window.__stop, stopAt: answer.stopAt, text: answer.text,
                     visible: visibleText(answer), status: answer.status };
        }"""
    )
    return result


SENTENCE_END = re.compile(r"[.!?…:][\"'”’)\]*_]*\s|\n")


def _assert_frozen(stopped: dict[str, Any], saved_text: str) -> None:
    """Nothing past what was shown at the click, except the end of that sentence."""
    shown = stopped["text"][: stopped["stopAt"]]
    visible: str = stopped["visible"]
    assert visible.startswith(shown)
    tail = visible[len(shown) :]
    ends = [m.end() for m in SENTENCE_END.finditer(shown[-12:] + tail)]
    assert len([end for end in ends if end > len(shown[-12:])]) <= 1, tail
    assert saved_text.startswith(visible.rstrip()), "the server kept what the reader saw"


def _words_after_click(stopped: dict[str, Any], saved_text: str) -> tuple[int, int]:
    """Words that arrived after the click, and words of them the reader was shown."""
    at = stopped["stopAt"]
    return len(saved_text[at:].split()), len(stopped["visible"][at:].split())


async def test_stop_freezes_the_text_at_the_click_and_done_follows(
    slow_server: LiveServer, page: Page, chat_page: MakeChatPage
) -> None:
    chat = await chat_page(page, slow_server.url).open()
    timings: list[float] = []
    words: list[tuple[int, int]] = []
    for round_ in range(3):
        await _watch_stop(page)
        await chat.ask(f"{QUESTION} ({round_ + 1})")
        await chat.wait_for_streamed_text(120)
        await page.locator("#stop").click()
        await chat.wait_for_answer("stopped", count=round_ + 1)
        stopped = await _stopped_answer(page)
        # Until `done`, the button says the stop is under way and takes no second click
        # (an answer that stopped before the next frame never shows it).
        assert stopped["stoppingAtClick"] is True
        first = await (await page.wait_for_function("() => window.__stop.firstFrame")).json_value()
        assert first["doneBefore"] or (first["label"], first["disabled"]) == ("Stopping…", True)
        saved = await _saved_answer(chat, await chat.chat_id(), index=round_)
        _assert_frozen(stopped, saved["text"])
        timings.append(stopped["doneAt"] - stopped["clickedAt"])
        words.append(_words_after_click(stopped, saved["text"]))
    await snap(page, "stop-frozen")
    record_measurement(
        "stop click to done, offline engine (30 tokens/s)",
        samples_ms=[round(t) for t in timings],
        p50_ms=round(statistics.median(timings)),
        words_arriving_after_click=[arrived for arrived, _ in words],
        words_shown_after_click=[shown for _, shown in words],
    )


async def test_stop_on_the_claude_engine_freezes_the_text_and_done_follows(
    api: AnthropicTestServer, claude_server: LiveServer, page: Page, chat_page: MakeChatPage
) -> None:
    long_answer = "This answer goes on for a while, one clause after another. " * 40
    api.when_user_says("stop-probe", [reply(text(long_answer, delay=0.03))], repeat_last=True)
    chat = await chat_page(page, claude_server.url).open()
    timings: list[float] = []
    words: list[tuple[int, int]] = []
    for round_ in range(3):
        await _watch_stop(page)
        await chat.ask(f"stop-probe {round_}")
        await chat.wait_for_streamed_text(150)
        await page.locator("#stop").click()
        await chat.wait_for_answer("stopped", count=round_ + 1)
        stopped = await _stopped_answer(page)
        saved = await _saved_answer(chat, await chat.chat_id(), index=round_)
        _assert_frozen(stopped, saved["text"])
        timings.append(stopped["doneAt"] - stopped["clickedAt"])
        words.append(_words_after_click(stopped, saved["text"]))
    await snap(page, "stop-frozen-claude")
    record_measurement(
        "stop click to done, Claude engine (test server, ~33 words/s)",
        samples_ms=[round(t) for t in timings],
        p50_ms=round(statistics.median(timings)),
        words_arriving_after_click=[arrived for arrived, _ in words],
        words_shown_after_click=[shown for _, shown in words],
    )


async def test_a_streaming_answer_pauses_with_a_note_offline_and_continues_when_back(
    slow_server: LiveServer, browser_context: BrowserContext, page: Page, chat_page: MakeChatPage
) -> None:
    chat = await chat_page(page, slow_server.url).open()
    await chat.ask(QUESTION)
    await chat.wait_for_streamed_text(60)
    await browser_context.set_offline(True)
    answer = page.locator(".msg--streaming")
    note = answer.locator(".note--paused")
    await expect(note).to_have_text(re.compile(r"^Paused: the connection dropped"))
    await expect(answer).to_have_class(re.compile(r"\bmsg--paused\b"))
    # No caret blinks on as if words were coming.
    caret = await answer.locator(".answer__stream > :last-child").evaluate(
        "(el) => getComputedStyle(el, '::after').content"
    )
    assert caret == "none"
    await snap(page, "answer-paused-offline")

    await browser_context.set_offline(False)
    done = await chat.wait_for_answer("complete")
    await expect(done.locator(".note--paused")).to_have_count(0)
    saved = await _saved_answer(chat, await chat.chat_id())
    assert await _client_answer_text(chat) == saved["text"]


async def test_the_thinking_block_says_how_long_the_answer_thought(
    api: AnthropicTestServer, claude_server: LiveServer, page: Page, chat_page: MakeChatPage
) -> None:
    api.when_user_says(
        "think-probe",
        [reply(thinking("Let me weigh this carefully before I answer.", delay=0.3), text("Yes."))],
    )
    chat = await chat_page(page, claude_server.url).open()
    await chat.ask("think-probe: well?")
    done = await chat.wait_for_answer("complete")
    label = done.locator(".thinking__label")
    await expect(label).to_have_text(re.compile(r"^Thought for \d+ s$"))
    seconds = int(re.findall(r"\d+", await label.text_content() or "")[0])
    assert seconds >= 1, "nine thinking pieces 0.3 s apart take more than a second"


@pytest.mark.parametrize("context_options", ["phone"], indirect=True)
async def test_on_a_phone_the_connection_says_its_state_in_words(
    server: LiveServer, page: Page, chat_page: MakeChatPage
) -> None:
    await chat_page(page, server.url).open()
    label = page.locator("#connection-label")
    await expect(label).to_have_text("Connected")
    box = await label.bounding_box()
    assert box is not None
    assert box["width"] > 20, "the words are on screen, not only the dot"
    await snap(page, "phone-connection-words")


async def test_consecutive_tool_calls_fold_into_one_row_at_the_step_limit(
    api: AnthropicTestServer,
    make_claude_settings: Callable[..., Settings],
    page: Page,
    chat_page: MakeChatPage,
) -> None:
    queries = ["sourdough starter", "starter temperature", "feeding a starter"]
    api.when_user_says(
        "everything",
        [
            reply(text("Let me look. "), tool_use("searchBlogContent", {"query": queries[0]})),
            reply(tool_use("searchBlogContent", {"query": queries[1]})),
            reply(tool_use("searchBlogContent", {"query": queries[2]})),
            text("This is never asked for."),
        ],
    )
    with claude_server_for(make_claude_settings(max_turns=3)) as server:
        chat = await chat_page(page, server.url).open()
        await chat.ask("Tell me everything about sourdough")
        answer = await chat.wait_for_answer("max_turns")
        group = answer.locator(".tool-group")
        await expect(group).to_have_count(1)
        await expect(answer.locator(".msg__body > .tools > li")).to_have_count(1)
        summary = group.locator("> details > summary .tool__summary")
        await expect(summary).to_have_text(re.compile(r"^Searched the blog 3 times · \d+ results$"))
        await expect(answer.locator(".badge--warning")).to_have_text("Step limit reached")
        await expect(answer.locator(".note--warning")).to_contain_text("limit of 3 steps")

        await group.locator("summary").first.click()
        await expect(group.locator(".tools--grouped > .tool")).to_have_count(3)
        hrefs = await group.locator(".tool-group__found a").evaluate_all(
            "(links) => links.map((a) => a.getAttribute('href'))"
        )
        posts = [href.split("#")[0] for href in hrefs]
        assert posts
        assert len(posts) == len(set(posts)), "each post once"
        count = int(re.findall(r"(\d+) results", await summary.text_content() or "")[0])
        assert count == len(posts)
        await snap(page, "tool-group-step-limit")


async def test_chats_are_grouped_today_yesterday_previous_7_days_and_older(
    server: LiveServer, page: Page, chat_page: MakeChatPage
) -> None:
    chat = await chat_page(page, server.url).open()
    ids = []
    for question in ("First question", "Second question", "Third question", "Fourth question"):
        await page.goto(f"{server.url}/chat")
        await chat.wait_connected()
        await chat.ask(question)
        await chat.wait_for_answer("complete")
        ids.append(await chat.chat_id())
    now = utcnow()
    ages = (timedelta(days=40), timedelta(days=4), timedelta(days=1))
    for chat_id, age in zip(ids[:3], ages, strict=True):
        server.call(server.state.store.chats.update_chat(chat_id, updated_at=now - age))
    await page.reload()
    await chat.wait_connected()
    groups = page.locator(".chat-group")
    await expect(groups.locator(".chat-group__title")).to_have_text(
        ["Today", "Yesterday", "Previous 7 days", "Older"]
    )
    titles = [
        await group.locator(".chat-item__title").all_text_contents() for group in await groups.all()
    ]
    assert titles == [
        ["Fourth question"],
        ["Third question"],
        ["Second question"],
        ["First question"],
    ]
    await snap(page, "chat-list-date-groups")

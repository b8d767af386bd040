"""How soon a reader sees the first words of an answer, in the browser, on the Claude engine
against the test server (which answers at once): a new chat's first message against a
later message of the same chat. Reported in test-artifacts/measurements.jsonl and
docs/ui.md, never asserted as a time.
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest
from playwright.async_api import Page

from blogchat.settings import Settings
from tests.support.browser import record_measurement
from tests.support.claude import claude_server_for, ready_spare
from tests.support.server import LiveServer

if TYPE_CHECKING:
    from tests.support.browser import ChatPage

    MakeChatPage = Callable[[Page, str], ChatPage]

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]

ROUNDS = 3

# From the Enter that sends to the first character of the new answer on the page.
WATCH_FIRST_WORDS = """() => {
    window.__firstWords = null;
    let sentAt = null;
    const before = document.querySelectorAll('.msg--assistant').length;
    document.addEventListener('keydown', (event) => {
        if (event.key === 'Enter') sentAt = performance.now();
    }, { capture: true, once: true });
    const observer = new MutationObserver(() => {
        const answers = document.querySelectorAll('.msg--assistant');
        if (sentAt === null || answers.length <= before) return;
        const answer = answers[answers.length - 1];
        const text = answer.querySelector('.answer__stream, .answer__body, .answer');
        if (text && text.textContent.trim().length > 0) {
            window.__firstWords = performance.now() - sentAt;
            observer.disconnect();
        }
    });
    observer.observe(document.body, { childList: true, subtree: true, characterData: true });
}"""


async def _first_words(page: Page, chat: ChatPage, text: str, count: int) -> float:
    await page.evaluate(WATCH_FIRST_WORDS)
    await chat.ask(text)
    await chat.wait_for_answer("complete", count=count)
    waited: Any = await page.wait_for_function("() => window.__firstWords")
    return float(await waited.json_value())


@pytest.fixture
def claude_with_spare(make_claude_settings: Callable[..., Settings]) -> Iterator[LiveServer]:
    """A Claude-engine server as deployed: one agent process kept started ahead."""
    with claude_server_for(make_claude_settings(spare_processes=1)) as server:
        yield server


async def test_a_new_chats_first_words_against_a_later_messages(
    claude_with_spare: LiveServer, page: Page, chat_page: MakeChatPage
) -> None:
    claude_server = claude_with_spare
    first: list[float] = []
    later: list[float] = []
    for round_ in range(ROUNDS):
        chat = await chat_page(page, claude_server.url).open()
        # A new chat as a reader usually meets it: the spare started after the last one
        # has had time to start.
        await asyncio.to_thread(ready_spare, claude_server)
        first.append(await _first_words(page, chat, f"A first question, round {round_}", 1))
        later.append(await _first_words(page, chat, f"A follow-up, round {round_}", 2))
        texts = await chat.answers("complete").all_inner_texts()
        assert f"A first question, round {round_}" in texts[0]
        assert f"A follow-up, round {round_}" in texts[1]
    record_measurement(
        "send to first words, Claude engine (test server answering at once)",
        first_message_ms=[round(t) for t in first],
        later_message_ms=[round(t) for t in later],
        first_p50_ms=round(statistics.median(first)),
        later_p50_ms=round(statistics.median(later)),
    )

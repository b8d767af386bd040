"""The transcript view on its own, in Chromium: states from the real reducer, drawn by the
real TranscriptView into a lab page (no server).

Used for what no server sends yet (the `status` messages the lead adds to the protocol) and
for exact wording; tests/test_ui.py covers the same view against a live server.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_asyncio
from playwright.async_api import Page

from tests.support.lab import open_lab, run

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]

LAB_SCRIPT = r"""
import * as chat from "/static/js/chat-client.js";
import { TranscriptView, statusText, thoughtFor } from "/static/js/transcript-view.js";

const ev = {
  subscribed: () => ({
    type: "subscribed", chatId: "c1", lastSeq: 0, busy: false, messages: [],
    chat: { id: "c1", title: "t", model: "haiku", persona: "p", createdAt: "" },
  }),
  user: (seq, id) => ({ type: "user_message", chatId: "c1", seq, messageId: id,
                        clientMessageId: `k${seq}`, text: "question" }),
  token: (seq, id, text) => ({ type: "token", chatId: "c1", seq, messageId: id, text }),
  toolUse: (seq, toolUseId, name, input) => ({ type: "tool_use", chatId: "c1", seq,
                                              messageId: "a1", toolUseId, name, input }),
  toolResult: (seq, toolUseId, output) => ({ type: "tool_result", chatId: "c1", seq,
                                             messageId: "a1", toolUseId, output, isError: false }),
};

/** A view on a fresh list, and a function that applies events and draws. */
function mount() {
  const list = document.createElement("ol");
  document.body.replaceChildren(list);
  const said = [];
  const view = new TranscriptView({ list, announce: (t) => said.push(t), actions: {} });
  let state = chat.reduce(chat.initialState("c1"), ev.subscribed());
  const apply = (...events) => {
    for (const event of events) state = chat.reduce(state, event);
    view.render(state, { connection: "open" });
    return list;
  };
  return { list, view, apply, said };
}

window.lab = { chat, ev, mount, statusText, thoughtFor, ready: true };
"""


@pytest_asyncio.fixture(loop_scope="session")
async def lab(page: Page) -> Page:
    """A page with the transcript view, the reducer and event builders on `window.lab`."""
    return await open_lab(page, LAB_SCRIPT)


async def test_status_messages_say_why_nothing_streams_and_give_way_to_the_answer(
    lab: Page,
) -> None:
    result: dict[str, Any] = await run(
        lab,
        """
        const { ev, mount } = lab;
        const { list, apply } = mount();
        const pending = () => list.querySelector(".msg--pending .answer__status");
        apply(ev.user(1, "u1"), { type: "status", chatId: "c1", state: "waiting", position: 2 });
        const waiting = [pending().textContent, pending().hidden];
        apply({ type: "status", chatId: "c1", state: "waiting", position: 1 });
        const next = pending().textContent;
        apply(ev.token(2, "a1", ""), { type: "status", chatId: "c1", messageId: "a1",
          state: "retrying", attempt: 2, maxAttempts: 3, retryInMs: 1500 });
        const answerStatus = list.querySelector('[data-id="a1"] .answer__status');
        const retrying = [answerStatus.textContent, answerStatus.hidden,
                          answerStatus.getAttribute("role")];
        const dots = list.querySelector('[data-id="a1"] .typing').hidden;
        apply(ev.token(3, "a1", "Here it is."));
        return { waiting, next, retrying, dots,
                 after: [answerStatus.hidden, answerStatus.textContent,
                         list.querySelector('[data-id="a1"] .answer').textContent] };
        """,
    )
    assert result["waiting"] == ["Waiting for a free assistant · 2nd in line", False]
    assert result["next"] == "Waiting for a free assistant · next in line"
    assert result["retrying"] == ["Claude is busy, retrying (2/3)…", False, "status"]
    assert result["dots"], "the typing dots give way to the status"
    assert result["after"][:2] == [True, ""]
    assert "Here it is." in result["after"][2]


async def test_the_thinking_label_and_status_wording(lab: Page) -> None:
    result = await run(
        lab,
        """
        return [lab.thoughtFor(null), lab.thoughtFor(420), lab.thoughtFor(1499),
                lab.thoughtFor(12600),
                lab.statusText({ state: "waiting", position: 3 }),
                lab.statusText({ state: "waiting", position: 11 }),
                lab.statusText({ state: "waiting", position: 22 }),
                lab.statusText({ state: "retrying" })];
        """,
    )
    assert result == [
        "Thinking",
        "Thought for <1 s",
        "Thought for 1 s",
        "Thought for 13 s",
        "Waiting for a free assistant · 3rd in line",
        "Waiting for a free assistant · 11th in line",
        "Waiting for a free assistant · 22nd in line",
        "Claude is busy, retrying…",
    ]


def _search(query: str, *urls: str) -> str:
    return json.dumps(
        {
            "query": query,
            "results": [
                {"title": url.split("#")[0].rsplit("/", 1)[-1], "url": url, "section": section}
                for url, section in ((u, u.split("#")[1] if "#" in u else None) for u in urls)
            ],
        }
    )


async def test_consecutive_calls_of_one_tool_fold_into_one_row_listing_each_post_once(
    lab: Page,
) -> None:
    outputs = [
        _search("a", "/posts/sourdough", "/posts/sourdough#what-you-need", "/posts/layering#mid"),
        _search("b", "/posts/layering", "/posts/espresso#grind"),
        _search("c", "/posts/espresso#grind", "/posts/budget"),
    ]
    result: dict[str, Any] = await run(
        lab,
        """
        const { ev, mount } = lab;
        const { list, apply } = mount();
        apply(ev.user(1, "u1"));
        let seq = 2;
        const [o1, o2, o3] = arg;
        apply(ev.toolUse(seq++, "t1", "searchBlogContent", { query: "a" }),
              ev.toolResult(seq++, "t1", o1));
        const single = [...list.querySelectorAll(".tools > li")].map((li) => li.className);
        apply(ev.toolUse(seq++, "t2", "searchBlogContent", { query: "b" }));
        const running = list.querySelector(".tool-group .tool__summary").textContent;
        apply(ev.toolResult(seq++, "t2", o2),
              ev.toolUse(seq++, "t3", "searchBlogContent", { query: "c" }),
              ev.toolResult(seq++, "t3", o3),
              ev.toolUse(seq++, "t4", "getPost", { slug: "budget" }));
        const rows = [...list.querySelectorAll(".msg__body > .tools > li")];
        const group = rows[0];
        group.querySelector("details").open = true;
        group.querySelector("details").dispatchEvent(new Event("toggle"));
        const links = [...group.querySelectorAll(".tool-group__found a")].map((a) => [
          a.getAttribute("href"), a.parentElement.textContent]);
        const inner = group.querySelectorAll(".tools--grouped > .tool").length;
        const firstCard = list.querySelector('.tools--grouped .tool[data-tool] .tool__summary');
        return { single, running, rows: rows.map((li) => li.className), inner, links,
                 summary: group.querySelector(".tool__summary").textContent,
                 count: group.dataset.count, card: firstCard.textContent,
                 last: rows[1].querySelector(".tool__summary").textContent };
        """,
        outputs,
    )
    assert result["single"] == ["tool"], "one call is a card of its own"
    assert result["running"] == "Searching the blog · 2 searches · 2 results…"
    assert result["rows"] == ["tool tool-group", "tool"]
    assert result["summary"] == "Searched the blog 3 times · 4 results"
    assert result["count"] == "3"
    assert result["inner"] == 3
    # Each post once, at its first rank, with the sections it was found for.
    assert [href for href, _ in result["links"]] == [
        "/posts/sourdough",
        "/posts/layering#mid",
        "/posts/espresso#grind",
        "/posts/budget",
    ]
    assert result["links"][0][1] == "sourdough · what-you-need"
    assert result["card"] == "Searched the blog for “a” · 2 results"
    assert result["last"].startswith("Reading “budget”")

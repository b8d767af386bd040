"""Live Markdown: what rendering an answer while it streams costs, for the two designs.

Run with `uv run python bench/bench_live_markdown.py`. Real answers are streamed piece by
piece (the offline engine's answers to a few questions, split as it streams them):

(a) server-rendered blocks: each time a top-level block is complete, the server renders it
    with markdown-it-py + nh3 + Pygments (rendering.render_answer) and sends its HTML with
    the token. Measured: the server's CPU per answer and per token, and the bytes it adds.
(b) the browser renders the whole streaming answer (static/js/markdown.js, LiveMarkdown):
    measured in Chromium, the time of each update (one per token, the worst case: the page
    draws at most once per frame) and per answer. The server does nothing more per token.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from playwright.async_api import async_playwright
from tests.support.browser import CHROMIUM_ARGS, chromium_path
from tests.support.lab import open_lab, run

from bench.support import REPO, info_row, machine, print_rows, summarize
from blogchat.content import Blog
from blogchat.engines.offline import compose, plan
from blogchat.rendering import render_answer
from blogchat.search import SearchIndex
from blogchat.tools import BlogTools

BENCH = "live markdown"
QUESTIONS = [
    "idempotency key code",
    "How warm should a sourdough starter be kept?",
    "flame graph perf record",
    "What are the latest posts?",
    "Who writes this blog? Mara",
    "SQLite in production WAL mode",
]
PIECE = re.compile(r"\S+\s*|\s+")  # as the offline engine streams (engines/offline.py)


def answers() -> list[str]:
    """The offline engine's answers to QUESTIONS, as it would stream them."""
    blog = Blog.load(REPO / "content")
    tools = BlogTools(blog, SearchIndex.build(blog))
    composed = []
    for question in QUESTIONS:
        calls = plan(question, blog, tools.names)
        results = [(call, tools.call(call.name, call.arguments, tools.names)) for call in calls]
        composed.append(compose(question, results))
    return composed


def completed_blocks(text: str) -> list[str]:
    """The source of each top-level block that has a block after it (so cannot change)."""
    from markdown_it import MarkdownIt

    tokens = MarkdownIt("commonmark").enable(["table", "strikethrough"]).parse(text)
    lines = text.splitlines(keepends=True)
    starts = [t.map for t in tokens if t.level == 0 and t.nesting != -1 and t.map]
    return ["".join(lines[a:b]) for a, b in starts[:-1]]


def server_side(texts: list[str]) -> tuple[list[float], list[float], float, int, int]:
    """Design (a): CPU seconds per answer and per token, the part of it spent rendering
    (the rest finds which blocks are complete), and bytes (HTML, text) sent."""
    per_answer, per_token = [], []
    rendering = 0.0
    html_bytes = text_bytes = 0
    for text in texts:
        pieces = PIECE.findall(text)
        sent: set[int] = set()
        shown = ""
        total = 0.0
        for piece in pieces:
            shown += piece
            started = time.process_time()
            # The server must find which blocks are complete (a parse of the text so far),
            # then render each newly completed block once.
            for index, block in enumerate(completed_blocks(shown)):
                if index not in sent:
                    render_started = time.process_time()
                    html_bytes += len(render_answer(block).encode())
                    rendering += time.process_time() - render_started
                    sent.add(index)
            spent = time.process_time() - started
            per_token.append(spent)
            total += spent
            text_bytes += len(piece.encode())
        per_answer.append(total)
    return per_answer, per_token, rendering, html_bytes, text_bytes


LAB = """
import { LiveMarkdown } from "/static/js/markdown.js";
window.lab = {
  stream(text, pieces) {
    const box = document.createElement("div");
    document.body.append(box);
    const live = new LiveMarkdown(box);
    const times = [];
    let shown = "";
    for (const piece of pieces) {
      shown += piece;
      const started = performance.now();
      live.update(shown);
      times.push(performance.now() - started);
    }
    const started = performance.now();
    live.update(text, { growing: false });
    times.push(performance.now() - started);
    box.remove();
    return times;
  },
  ready: true,
};
"""


async def browser_side(texts: list[str]) -> tuple[list[float], list[float]]:
    """Design (b): ms per update (one per token) and per answer, in Chromium."""
    per_update: list[float] = []
    per_answer: list[float] = []
    async with async_playwright() as playwright:
        executable = chromium_path(playwright.chromium.executable_path)
        browser = await playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        page = await browser.new_page()
        await open_lab(page, LAB)
        for text in texts:
            pieces = PIECE.findall(text)
            await run(page, "return lab.stream(arg[0], arg[1]).length;", [text, pieces])  # warm
            times: list[float] = await run(
                page, "return lab.stream(arg[0], arg[1]);", [text, pieces]
            )
            per_update.extend(times)
            per_answer.append(sum(times))
        await browser.close()
    return per_update, per_answer


def main() -> None:
    texts = answers()
    chars = sum(len(t) for t in texts)
    tokens = sum(len(PIECE.findall(t)) for t in texts)
    a_answer, a_token, rendering, html_bytes, text_bytes = server_side(texts)
    b_update, b_answer = asyncio.run(browser_side(texts))
    a_tok, a_ans = summarize(a_token), summarize(a_answer)
    b_upd, b_ans = summarize(b_update), summarize(b_answer)
    rows = [
        info_row(BENCH, "answers streamed", f"{len(texts)} ({chars:,} chars, {tokens:,} tokens)"),
        info_row(
            BENCH,
            "(a) server CPU per token (find and render completed blocks)",
            f"{a_tok.mean * 1e6:.0f} µs mean, p99 {a_tok.p99 * 1e6:.0f} µs",
        ),
        info_row(BENCH, "(a) server CPU per answer", f"{a_ans.mean * 1e3:.1f} ms mean ({a_ans.n})"),
        info_row(
            BENCH,
            "(a) of which rendering the blocks (markdown-it-py + nh3 + Pygments), per token",
            f"{rendering / tokens * 1e6:.0f} µs mean",
            "the rest is finding which blocks are complete; an incremental parser would "
            "save most of it",
        ),
        info_row(
            BENCH,
            "(a) bytes sent: text + block HTML / text alone",
            f"{(text_bytes + html_bytes) / text_bytes:.1f}×",
        ),
        info_row(
            BENCH,
            "(b) browser time per update (one per token)",
            f"{b_upd.mean:.2f} ms mean, p50 {b_upd.p50:.2f}, p99 {b_upd.p99:.2f} ms",
        ),
        info_row(BENCH, "(b) browser time per answer", f"{b_ans.mean:.0f} ms mean ({b_ans.n})"),
        info_row(BENCH, "(b) server CPU per token, added", "0 (nothing changes on the server)"),
    ]
    print(json.dumps(machine()))
    print_rows("Live Markdown while streaming: server blocks (a) or browser renderer (b)", rows)


if __name__ == "__main__":
    main()

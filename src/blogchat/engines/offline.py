"""The offline engine: answers from the blog's own search results, with no language model.

It runs when no Anthropic credentials are configured, so a fresh checkout works. It calls
the real blog tools, streams an answer assembled from what they return, and says plainly
that it is in offline mode. It never pretends to be Claude.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Collection
from dataclasses import dataclass
from typing import Any

from blogchat.content import Blog, Post
from blogchat.engines.base import (
    AgentEngine,
    EngineEvent,
    TextDelta,
    ThinkingDelta,
    ToolFinished,
    ToolStarted,
    TurnEnded,
    TurnRequest,
)
from blogchat.engines.text import sentence_end
from blogchat.tools import BlogTools, ToolResult

MODEL = "offline"
NOTICE = (
    "*Offline mode: no language model is connected to this blog, so this reply is put "
    "together from the blog's search results rather than written by an assistant.*"
)

_PIECE = re.compile(r"\S+\s*|\s+")
_DATE_WORDS = re.compile(
    r"\b(today|todays|date|time|weekday|what day|which day|current(ly)?|now|this year)\b", re.I
)
_LIST_WORDS = re.compile(
    r"\b(latest|newest|recent|new|list|all (the )?posts|what posts|which posts|how many posts)\b",
    re.I,
)


@dataclass(frozen=True)
class _Call:
    name: str
    arguments: dict[str, Any]


class OfflineEngine(AgentEngine):
    """Search-backed answers for when no model is configured."""

    name = "offline"

    def __init__(self, tools: BlogTools, *, tokens_per_second: float = 200.0) -> None:
        self.tools = tools
        self.delay = 1.0 / tokens_per_second if tokens_per_second > 0 else 0.0

    async def run_turn(
        self, request: TurnRequest, stop: asyncio.Event
    ) -> AsyncGenerator[EngineEvent, None]:
        """Plan tool calls from the question, run them, then stream an assembled answer."""
        allowed = request.persona.allowed_tools
        calls = plan(request.text, self.tools.blog, allowed, post=request.post)
        yield ThinkingDelta(_describe_plan(calls))
        results: list[tuple[_Call, ToolResult]] = []
        for call in calls:
            if stop.is_set():
                break
            tool_use_id = f"offline_{uuid.uuid4().hex[:20]}"
            yield ToolStarted(tool_use_id, call.name, call.arguments)
            # Tools are quick and CPU-bound; a thread keeps a big search off the event loop.
            result = await asyncio.to_thread(self.tools.call, call.name, call.arguments, allowed)
            results.append((call, result))
            yield ToolFinished(tool_use_id, result.output, result.is_error)
        stopped = stop.is_set()
        if not stopped:
            async for piece in self._stream(compose(request.text, results), stop):
                yield TextDelta(piece)
            stopped = stop.is_set()
        yield TurnEnded(reason="stopped" if stopped else "complete", model=MODEL)

    async def _stream(self, answer: str, stop: asyncio.Event) -> AsyncIterator[str]:
        for match in _PIECE.finditer(answer):
            piece = match.group()
            if self.delay:
                await asyncio.sleep(self.delay)
            # After a stop, finish the sentence being written, then end.
            if stop.is_set() and (cut := sentence_end(piece)) is not None:
                yield piece[:cut]
                return
            yield piece


def plan(
    question: str, blog: Blog, allowed: Collection[str], *, post: Post | None = None
) -> list[_Call]:
    """Which tools a question calls for, among those the persona allows."""
    calls: list[_Call] = []
    lowered = question.lower()
    if post is not None and "getPost" in allowed:
        # The reader asks from a post's page: that post is the context.
        calls.append(_Call("getPost", {"slug": post.slug}))
    if "getCurrentDateTime" in allowed and _DATE_WORDS.search(question):
        calls.append(_Call("getCurrentDateTime", {}))
    if "getAuthorInfo" in allowed:
        for author in blog.authors.values():
            names = {author.id, author.name.lower(), author.name.split()[0].lower()}
            if any(re.search(rf"\b{re.escape(name)}\b", lowered) for name in names):
                calls.append(_Call("getAuthorInfo", {"author": author.id}))
    if "getPost" in allowed and post is None:
        for candidate in blog.posts:
            if candidate.title.lower() in lowered or f"/posts/{candidate.slug}" in lowered:
                calls.append(_Call("getPost", {"slug": candidate.slug}))
                break
    if "listPosts" in allowed and _LIST_WORDS.search(question):
        arguments: dict[str, Any] = {"limit": 5}
        for tag in blog.tag_counts:
            if re.search(rf"\b{re.escape(tag)}\b", lowered):
                arguments["tag"] = tag
                break
        calls.append(_Call("listPosts", arguments))
    if "searchBlogContent" in allowed:
        calls.append(_Call("searchBlogContent", {"query": question[:300], "limit": 3}))
    return calls


def _describe_plan(calls: list[_Call]) -> str:
    if not calls:
        return "This persona has no blog tools, so there is nothing to look up."
    steps = {
        "searchBlogContent": "search the blog for the question",
        "getCurrentDateTime": "check today's date",
        "getAuthorInfo": "look up the author who is mentioned",
        "getPost": "open the post that is named",
        "listPosts": "list the latest posts",
    }
    wanted = list(dict.fromkeys(steps[call.name] for call in calls))
    return "Offline mode, no model. Plan: " + "; then ".join(wanted) + "."


def compose(question: str, results: list[tuple[_Call, ToolResult]]) -> str:
    """The Markdown answer built from tool results."""
    parts = [NOTICE]
    for call, result in results:
        if result.is_error:
            continue
        data = json.loads(result.output)
        if call.name == "getCurrentDateTime":
            parts.append(f"Today is {data['weekday']}, {data['date']} ({data['timezone']}).")
        elif call.name == "getAuthorInfo":
            posts = ", ".join(f"[{p['title']}]({p['url']})" for p in data["posts"][:5])
            parts.append(
                f"**[{data['name']}]({data['url']})**: {data['bio']}"
                + (f"\n\nTheir posts: {posts}." if posts else "")
            )
        elif call.name == "getPost":
            parts.append(
                f"**[{data['title']}]({data['url']})** by {data['author']} "
                f"({data['date']}): {data['summary']}"
            )
        elif call.name == "listPosts":
            lines = [
                f"- [{p['title']}]({p['url']}) by {p['author']}, {p['date']}" for p in data["posts"]
            ]
            if lines:
                parts.append("The latest posts:\n\n" + "\n".join(lines))
        elif call.name == "searchBlogContent":
            parts.append(_search_section(question, data["results"]))
    return "\n\n".join(parts) + "\n"


def _search_section(question: str, hits: list[dict[str, Any]]) -> str:
    shown = " ".join(question.split())
    if len(shown) > 80:
        shown = shown[:80].rsplit(" ", 1)[0] + "…"
    if not hits:
        return (
            f"I found nothing on the blog about “{shown}”. Try other words, or browse "
            "[the latest posts](/)."
        )
    blocks = [f"Here is what the blog says about “{shown}”:"]
    for hit in hits:
        where = f", in “{hit['section']}”" if hit["section"] else ""
        quoted = "\n".join(f"> {line}".rstrip() for line in hit["snippet"].splitlines())
        blocks.append(
            f"**[{hit['title']}]({hit['url']})** by {hit['author']}, {hit['date']}{where}:"
            f"\n\n{quoted}"
        )
    return "\n\n".join(blocks)

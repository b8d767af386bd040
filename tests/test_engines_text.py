"""Where a graceful stop ends an answer (engines/text.py): one rule for both engines."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from blogchat.content import Blog
from blogchat.engines.base import TextDelta, TurnEnded, TurnRequest
from blogchat.engines.offline import NOTICE, OfflineEngine
from blogchat.engines.text import sentence_end
from blogchat.personas import load_personas
from blogchat.search import SearchIndex
from blogchat.tools import BlogTools

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ("It works. Then", "It works."),
        ("Really? Yes", "Really?"),
        ("Wow! Next", "Wow!"),
        ("And so… on", "And so…"),
        ("the end.", "the end."),
        ("He said “stop.” Then", "He said “stop.”"),
        ("(as shown.) Next", "(as shown.)"),
        ("It is **done.** Then", "It is **done.**"),
        ("one line\nanother", "one line\n"),
        ("Here is the list:\n- one", "Here is the list:\n"),
    ],
)
def test_a_sentence_ends_at_its_closing_mark_and_what_closes_around_it(
    text: str, kept: str
) -> None:
    assert text[: sentence_end(text)] == kept


@pytest.mark.parametrize(
    "text", ["Version 3.5 is", "see example.com for", "Three things: ", "no end "]
)
def test_no_sentence_ends_inside_a_number_or_a_name_nor_at_a_colon(text: str) -> None:
    assert sentence_end(text) is None


async def test_the_offline_engine_stops_at_the_same_sentence_end_as_claude() -> None:
    blog = Blog.load(REPO / "content")
    tools = BlogTools(blog, SearchIndex.build(blog))
    persona = load_personas(REPO / "config" / "personas.yaml", tools.names).default
    engine = OfflineEngine(tools, tokens_per_second=0)
    request = TurnRequest("chat-1", "How warm should a starter be?", persona, "haiku", "offline")
    stop = asyncio.Event()
    text = ""
    ended: TurnEnded | None = None
    async for event in engine.run_turn(request, stop):
        if isinstance(event, TextDelta):
            text += event.text
            stop.set()  # Right after the first word.
        elif isinstance(event, TurnEnded):
            ended = event

    assert ended is not None
    assert ended.reason == "stopped"
    # The notice's first sentence, whole: "*Offline mode:" does not end it.
    assert NOTICE.startswith("*Offline mode:")
    assert text == NOTICE[: sentence_end(NOTICE)]
    assert text.endswith("assistant.*")

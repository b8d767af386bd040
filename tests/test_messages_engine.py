"""The Messages engine in process, against the Anthropic test server: what a turn reports
beyond what readers see (its cost, from engines/messages/prices.py). What readers see is
tested on both engines through a live server in test_engines.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest

from blogchat.app import load_content
from blogchat.engines.base import EngineEvent, TurnEnded, TurnRequest
from blogchat.engines.messages import MessagesEngine
from blogchat.engines.messages.prices import PRICES
from blogchat.personas import Persona
from blogchat.settings import Settings
from tests.support.anthropic_server import (
    AnthropicTestServer,
    reply,
    text,
    tool_use,
    usage,
)
from tests.support.server import REPO

MILLION = Decimal(1_000_000)


@pytest.fixture
async def engine(
    api: AnthropicTestServer, tmp_path: Path
) -> AsyncIterator[tuple[MessagesEngine, Persona]]:
    """A Messages engine talking to this test's Anthropic test server, and the default
    persona."""
    settings = Settings(
        _env_file=None,
        data_dir=tmp_path,
        content_dir=REPO / "content",
        personas_file=REPO / "config" / "personas.yaml",
        anthropic_api_key="test-key",
        anthropic_base_url=api.base_url,
        engine="messages",
        thinking_budget=0,
        provider_retries=0,
    )
    content = load_content(settings)
    running = MessagesEngine(settings, content.tools)
    try:
        yield running, content.personas.default
    finally:
        await running.aclose()


async def turn(engine: tuple[MessagesEngine, Persona], question: str) -> list[EngineEvent]:
    """Run one turn of a new chat of the default persona; every event."""
    running, persona = engine
    settings = running.settings
    request = TurnRequest(
        chat_id="chat-1",
        text=question,
        persona=persona,
        model_alias="haiku",
        model_id=settings.model_haiku,
    )
    return [event async for event in running.run_turn(request, asyncio.Event())]


async def test_the_cost_is_the_price_table_applied_to_the_usage_of_each_request(
    api: AnthropicTestServer, engine: tuple[MessagesEngine, Persona]
) -> None:
    api.when_user_says(
        "priced",
        [
            reply(
                tool_use("getCurrentDateTime", {}),
                usage(100, 10, cache_read=2000, cache_creation=300),
                model="claude-haiku-4-5-20251001",
            ),
            reply(
                text("It is noon."),
                usage(50, 20, cache_read=2300, cache_creation=0),
                model="claude-sonnet-4-5-20250929",
            ),
        ],
    )
    events = await turn(engine, "What time is it? priced")

    ended = events[-1]
    assert isinstance(ended, TurnEnded)
    assert ended.reason == "complete"
    # Each request at the price of the model that answered it (message_start), its
    # uncached input, output, cache writes and cache reads each at their own rate.
    haiku, sonnet = PRICES["claude-haiku-4-5"], PRICES["claude-sonnet-4-5"]
    expected = (
        100 * haiku.input + 10 * haiku.output + 300 * haiku.cache_write + 2000 * haiku.cache_read
    ) / MILLION + (
        50 * sonnet.input + 20 * sonnet.output + 0 * sonnet.cache_write + 2300 * sonnet.cache_read
    ) / MILLION
    assert ended.metadata["cost_usd"] == pytest.approx(float(expected), rel=1e-12)
    # Haiku 4.5 at $1 / $5 per million, writes $1.25, reads $0.10; Sonnet 4.5 at $3 / $15,
    # reads $0.30: 0.0001 + 0.00005 + 0.000375 + 0.0002 + 0.00015 + 0.0003 + 0.00069.
    assert ended.metadata["cost_usd"] == pytest.approx(0.001865, rel=1e-12)
    assert (ended.input_tokens, ended.output_tokens) == (100 + 2000 + 300 + 50 + 2300, 30)


async def test_a_model_with_no_price_reports_its_tokens_and_no_cost(
    api: AnthropicTestServer, engine: tuple[MessagesEngine, Persona]
) -> None:
    api.when_user_says("unpriced", reply(text("Hello."), usage(40, 5), model="claude-unpriced-1"))
    events = await turn(engine, "Hi there, unpriced")

    ended = events[-1]
    assert isinstance(ended, TurnEnded)
    assert ended.reason == "complete"
    assert ended.model == "claude-unpriced-1"
    assert (ended.input_tokens, ended.output_tokens) == (40, 5)
    assert "cost_usd" not in ended.metadata

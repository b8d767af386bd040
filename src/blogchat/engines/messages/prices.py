"""What a turn of the Messages engine cost, in US dollars: the API reports tokens, not
prices, so the engine applies this table (the Agent SDK engine reports the cost its CLI
computed). Prices are Anthropic's list prices per million tokens, from the pricing page
(platform.claude.com/docs/en/about-claude/pricing) as of 2026-12: base input, output, a
5-minute cache write (the engine's `cache_control` is `ephemeral`, whose lifetime is five
minutes) and a cache read. A model not listed here has no cost reported (its tokens still
are); add its row when the settings name a new one. docs/engines.md says how the cost is
reported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal


@dataclass(frozen=True)
class Price:
    """Dollars per million tokens of one model."""

    input: Decimal
    output: Decimal
    cache_write: Decimal
    cache_read: Decimal


def _price(input: str, output: str, cache_write: str, cache_read: str) -> Price:
    return Price(Decimal(input), Decimal(output), Decimal(cache_write), Decimal(cache_read))


# By model id without its snapshot date (claude-haiku-4-5-20251001 is claude-haiku-4-5).
PRICES: dict[str, Price] = {
    "claude-opus-5": _price("5", "25", "6.25", "0.50"),
    "claude-opus-4-8": _price("5", "25", "6.25", "0.50"),
    "claude-opus-4-7": _price("5", "25", "6.25", "0.50"),
    "claude-opus-4-6": _price("5", "25", "6.25", "0.50"),
    "claude-opus-4-5": _price("5", "25", "6.25", "0.50"),
    "claude-opus-4-1": _price("15", "75", "18.75", "1.50"),
    "claude-opus-4-0": _price("15", "75", "18.75", "1.50"),
    "claude-opus-4": _price("15", "75", "18.75", "1.50"),
    "claude-sonnet-5": _price("2", "10", "2.50", "0.20"),
    "claude-sonnet-4-6": _price("3", "15", "3.75", "0.30"),
    "claude-sonnet-4-5": _price("3", "15", "3.75", "0.30"),
    "claude-sonnet-4-0": _price("3", "15", "3.75", "0.30"),
    "claude-sonnet-4": _price("3", "15", "3.75", "0.30"),
    "claude-haiku-4-5": _price("1", "5", "1.25", "0.10"),
    "claude-3-5-haiku": _price("0.80", "4", "1", "0.08"),
    "claude-3-haiku": _price("0.25", "1.25", "0.30", "0.03"),
}

_SNAPSHOT = re.compile(r"-\d{8}$")
_MILLION = Decimal(1_000_000)


def price_of(model: str) -> Price | None:
    """The price of a model id as the API names it (with or without its date), if known."""
    return PRICES.get(_SNAPSHOT.sub("", model))


def request_cost(
    price: Price, *, uncached_input: int, output: int, cache_read: int, cache_write: int
) -> Decimal:
    """What one request cost: each kind of token at its own price."""
    return (
        uncached_input * price.input
        + output * price.output
        + cache_write * price.cache_write
        + cache_read * price.cache_read
    ) / _MILLION

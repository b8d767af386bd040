"""The commands an instance forwards to the owner of a chat, and how they are refused.

Kept apart from the Redis side (`node.py`) so that one instance, without Redis, never loads
the Redis client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from blogchat import protocol as wire

if TYPE_CHECKING:
    from blogchat.cluster.bus import Holder


class Commands(Protocol):
    """What the owner of a chat does with the commands forwarded to it (the chat service)."""

    async def take_forwarded(
        self, visitor_id: str, anonymous: bool, message: wire.Chat, address: str
    ) -> None:
        """Carry out a `chat` that reached another instance; raises ChatError."""


@dataclass
class ForwardRefused(Exception):
    """The owner refused a forwarded command, or could not be reached."""

    code: wire.ErrorCode
    message: str
    retryable: bool = False
    retry_after: float | None = None


def unreachable() -> ForwardRefused:
    """The owner of the chat could not be reached."""
    return ForwardRefused(
        "busy", "The instance running this chat did not answer. Try again in a moment.", True
    )


class OwnerGone(Exception):
    """Nobody listens at the owner's inbox: it died (its lease lapses soon) or just left.
    `holder` is who held the chat's lease then (None: nobody else did)."""

    def __init__(self, chat_id: str, holder: Holder | None = None) -> None:
        super().__init__(chat_id)
        self.holder = holder

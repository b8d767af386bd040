"""The Messages engine: chats run on Claude through the Messages API (see engine.py)."""

from __future__ import annotations

from blogchat.engines.messages.engine import MessagesEngine

__all__ = ["MessagesEngine"]

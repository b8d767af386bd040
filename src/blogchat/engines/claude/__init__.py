"""The Claude engine: chats run on Claude through the Claude Agent SDK (see engine.py)."""

from __future__ import annotations

from blogchat.engines.claude.engine import ClaudeEngine

__all__ = ["ClaudeEngine"]

"""Agent engines: the Claude Agent SDK engine and the offline engine."""

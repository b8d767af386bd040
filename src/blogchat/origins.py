"""Which origins may act on a visitor's behalf (WebSocket upgrades and form posts)."""

from __future__ import annotations

from collections.abc import Collection


def origin_allowed(
    origin: str | None, *, scheme: str, host: str | None, allowed: Collection[str]
) -> bool:
    """True for the server's own origin (scheme + Host) and the configured extra origins."""
    if not origin:
        return False
    origin = origin.rstrip("/")
    http_scheme = "https" if scheme in ("https", "wss") else "http"
    if host and origin == f"{http_scheme}://{host}":
        return True
    return origin in allowed

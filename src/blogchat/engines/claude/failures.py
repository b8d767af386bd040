"""Provider failures, told in words a reader understands (each a `TurnFailed`)."""

from __future__ import annotations

from blogchat.engines.base import TurnFailed

OVERLOADED = TurnFailed("Claude is overloaded right now. Try again in a moment.", True)
RATE_LIMITED = TurnFailed(
    "Claude is getting too many requests right now. Try again in a minute.", True
)
SERVER_ERROR = TurnFailed("Claude ran into a problem on its side. Try again in a moment.", True)
CONNECTION_LOST = TurnFailed("The connection to Claude was lost. Try again in a moment.", True)
CUT_OFF = TurnFailed(
    "The connection to Claude broke off in the middle of the answer. What arrived is kept; "
    "try again to get the rest.",
    True,
)
STALLED = TurnFailed("Claude stopped responding. Try again in a moment.", True, engine_retries=True)
NOT_CONFIGURED = TurnFailed(
    "The assistant is not set up correctly: the Anthropic API key was refused. "
    "The site's owner needs to fix this.",
    False,
)
BILLING = TurnFailed(
    "The assistant is unavailable: the site's Anthropic account cannot be billed. "
    "The site's owner needs to fix this.",
    False,
)
MODEL_UNAVAILABLE = TurnFailed(
    "The model chosen for this chat is not available. Try another model.", False
)
TOO_LONG = TurnFailed(
    "This conversation has grown too long for Claude. Start a new chat to go on.", False
)
BAD_REQUEST = TurnFailed("Claude could not process this request.", False)
CRASHED = TurnFailed(
    "The assistant stopped unexpectedly. Try again.", True, "internal", engine_retries=True
)
NOT_STARTED = TurnFailed(
    "The assistant could not be started. Try again in a moment.",
    True,
    "internal",
    engine_retries=True,
)

_BY_STATUS = {
    400: BAD_REQUEST,
    401: NOT_CONFIGURED,
    402: BILLING,
    403: NOT_CONFIGURED,
    404: MODEL_UNAVAILABLE,
    413: TOO_LONG,
    429: RATE_LIMITED,
    529: OVERLOADED,
}

# AssistantMessage.error values of the SDK.
_BY_KIND = {
    "authentication_failed": NOT_CONFIGURED,
    "billing_error": BILLING,
    "rate_limit": RATE_LIMITED,
    "invalid_request": BAD_REQUEST,
    "server_error": SERVER_ERROR,
}


def classify(status: int | None, kind: str | None = None, text: str = "") -> TurnFailed:
    """The failure behind an HTTP status, the SDK's error kind, or the CLI's error text."""
    lowered = text.lower()
    if "prompt is too long" in lowered or "context window" in lowered:
        failure = TOO_LONG
    elif status in _BY_STATUS:
        failure = _BY_STATUS[status]
    elif status is not None and status >= 500:
        failure = OVERLOADED if "overloaded" in lowered else SERVER_ERROR
    elif "overloaded" in lowered:
        failure = OVERLOADED
    elif kind in _BY_KIND:
        failure = _BY_KIND[kind]
    elif "connection" in lowered or "timed out" in lowered or "timeout" in lowered:
        failure = CONNECTION_LOST
    else:
        failure = SERVER_ERROR
    return failure.because(f"status={status} kind={kind} text={text[:300]!r}")

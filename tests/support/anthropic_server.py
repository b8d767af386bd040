"""A scripted stand-in for the Anthropic Messages API, for tests that drive the real agent CLI.

The server runs uvicorn in a background thread on a free 127.0.0.1 port and answers
``POST /v1/messages`` (streaming SSE or plain JSON) from scripts that tests compose out of
steps::

    with AnthropicTestServer() as api:
        api.when_user_says("hello", [
            tool_use("searchBlogContent", {"query": "python"}),      # request 1
            reply(thinking("The search found it."), text("Here.")),  # request 2
        ])
        options = ClaudeAgentOptions(env=api.cli_env(config_dir=tmp), ...)
        ...
        assert api.last_request().tool_names == ["mcp__blog__searchBlogContent"]

Every element of a script answers one Messages request. An element is a ``Reply`` built with
``reply(...)``, a tuple of steps (one reply with those steps), or a single step.

Messages requests are answered in this order of precedence:

1. side requests (calls the CLI makes outside the agent loop, see ``is_side_request``) get a
   short harmless reply and never consume a script;
2. the first rule (``when_user_says``/``when``) that matches and still has replies left;
3. the FIFO queue (``enqueue``);
4. the default responder (``EchoResponder`` unless replaced).

Every request is recorded as a ``RecordedRequest`` whose ``kind`` is "main", "side",
"count_tokens", "probe" (the CLI's ``HEAD /api/hello``) or "unknown" (answered with a 404
error), and whose ``outcome`` says how the answer ended ("completed", "cut",
"client_disconnected", "error 529", ...).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import json
import logging
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, TypeAlias, cast

import uvicorn
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, Router
from starlette.types import Message, Receive, Scope, Send

__all__ = [
    "AnthropicTestServer",
    "ApiError",
    "Cut",
    "EchoResponder",
    "Gate",
    "RecordedRequest",
    "Reply",
    "Responder",
    "ResponseSpec",
    "Rule",
    "Stall",
    "Step",
    "Text",
    "Thinking",
    "ToolUse",
    "Usage",
    "as_reply",
    "cut",
    "error",
    "gate",
    "is_side_request",
    "refusal_of",
    "reply",
    "stall",
    "text",
    "thinking",
    "tool_use",
    "usage",
]

Chunking: TypeAlias = "int | Literal['word']"

# ---------------------------------------------------------------------------------------------
# Script steps
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Thinking:
    """A thinking block: ``thinking_delta`` events, then a ``signature_delta``.

    The signature is derived from the text when None; an empty string sends none.
    """

    text: str
    signature: str | None = None
    chunk: Chunking = "word"
    delay: float | None = None


@dataclass(frozen=True)
class Text:
    """A text block, streamed as ``text_delta`` events."""

    text: str
    chunk: Chunking = "word"
    delay: float | None = None


@dataclass(frozen=True)
class ToolUse:
    """A ``tool_use`` block calling a tool by its plain name (mapped onto the offered name)."""

    name: str
    input: Mapping[str, Any] = field(default_factory=dict)
    id: str | None = None
    chunk: int = 24


@dataclass(frozen=True)
class ApiError:
    """An HTTP error when nothing was streamed before it, else an SSE ``error`` event."""

    status: int = 529
    body: Mapping[str, Any] | str | None = None
    headers: Mapping[str, str] | None = None


@dataclass(frozen=True)
class Cut:
    """Close the connection without finishing the response.

    Without ``after`` the cut happens where the step stands; with ``after`` it happens once
    that many SSE events of the reply (``message_start`` and ``ping`` included) have been sent,
    wherever the step stands. Headers and status are always sent before a cut.
    """

    after: int | None = None


@dataclass(frozen=True)
class Stall:
    """Send nothing for ``seconds``; before any content it delays the response headers too."""

    seconds: float


class Gate:
    """Send nothing until the test opens the gate, from any thread: a pause that ends on an
    event the test saw (say, the reader got the first part), not after some time. A gate
    never opened is a stall that lasts until the client gives up or the server stops.

    Once open it stays open: every reply that reaches it afterwards goes straight on.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open = False
        self._watchers: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self.reached = threading.Event()

    def open(self) -> None:
        """Let every reply waiting at this gate, and every later one, go on."""
        with self._lock:
            self._open = True
            watchers, self._watchers = self._watchers, []
        for loop, opened in watchers:
            if not loop.is_closed():
                loop.call_soon_threadsafe(opened.set)

    @property
    def is_open(self) -> bool:
        """Whether the gate was opened."""
        with self._lock:
            return self._open

    def _watch(self) -> asyncio.Event:
        """An event of the running loop, set when the gate opens (at once if it is open)."""
        opened = asyncio.Event()
        with self._lock:
            if self._open:
                opened.set()
            else:
                self._watchers.append((asyncio.get_running_loop(), opened))
        self.reached.set()
        return opened


@dataclass(frozen=True)
class Usage:
    """Token usage reported in ``message_start`` (input) and ``message_delta`` (output).

    As in the API, ``input_tokens`` counts only the uncached input; the tokens read from the
    prompt cache and written to it are reported apart.
    """

    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0


Step: TypeAlias = Thinking | Text | ToolUse | ApiError | Cut | Stall | Gate | Usage
_STEP_TYPES = (Thinking, Text, ToolUse, ApiError, Cut, Stall, Gate, Usage)


@dataclass(frozen=True)
class Reply:
    """The answer to one Messages request: an ordered sequence of steps."""

    steps: tuple[Step, ...]
    stop_reason: str | None = None
    # The model named in the response (default: the request's model).
    model: str | None = None


ResponseSpec: TypeAlias = Reply | Step | tuple[Step, ...]


def thinking(
    text: str, *, signature: str | None = None, chunk: Chunking = "word", delay: float | None = None
) -> Thinking:
    """Build a thinking step (signature generated when not given)."""
    return Thinking(text, signature=signature, chunk=chunk, delay=delay)


def text(text: str, *, chunk: Chunking = "word", delay: float | None = None) -> Text:
    """Build a text step; ``chunk`` is "word" or a size in characters, ``delay`` per delta."""
    return Text(text, chunk=chunk, delay=delay)


def tool_use(
    name: str, input: Mapping[str, Any] | None = None, *, id: str | None = None
) -> ToolUse:
    """Build a tool call by plain tool name, e.g. ``tool_use("searchBlogContent", {...})``."""
    return ToolUse(name, dict(input or {}), id=id)


def error(
    status: int = 529,
    body: Mapping[str, Any] | str | None = None,
    *,
    headers: Mapping[str, str] | None = None,
) -> ApiError:
    """Build an API error step; the body defaults to the API's error shape for ``status``."""
    return ApiError(status, body, headers)


def cut(after: int | None = None) -> Cut:
    """Build a connection cut, at its position or after ``after`` SSE events."""
    return Cut(after)


def stall(seconds: float) -> Stall:
    """Build a pause in which nothing is sent."""
    return Stall(seconds)


def gate() -> Gate:
    """Build a pause that lasts until the test calls the gate's `open()`."""
    return Gate()


def usage(
    input_tokens: int | None = None,
    output_tokens: int | None = None,
    *,
    cache_read: int = 0,
    cache_creation: int = 0,
) -> Usage:
    """Build a usage override for the reply, with cache reads and writes if given."""
    return Usage(input_tokens, output_tokens, cache_read, cache_creation)


def reply(*steps: Step, stop_reason: str | None = None, model: str | None = None) -> Reply:
    """Build one reply; ``stop_reason`` defaults to tool_use/end_turn from the steps, and
    ``model`` (what ``message_start`` names) to the request's model."""
    return Reply(tuple(steps), stop_reason, model)


def as_reply(spec: ResponseSpec) -> Reply:
    """Normalise a step, a tuple of steps or a reply into a reply."""
    if isinstance(spec, Reply):
        return spec
    if isinstance(spec, tuple):
        return Reply(spec)
    return Reply((spec,))


def _as_replies(responses: ResponseSpec | Sequence[ResponseSpec]) -> list[Reply]:
    if isinstance(responses, (Reply, tuple, *_STEP_TYPES)):
        return [as_reply(cast(ResponseSpec, responses))]
    return [as_reply(spec) for spec in responses]


# ---------------------------------------------------------------------------------------------
# Recorded requests
# ---------------------------------------------------------------------------------------------

RequestKind: TypeAlias = Literal["main", "side", "count_tokens", "probe", "unknown"]
_SYSTEM_REMINDER = "<system-reminder>"
# The blocks of context the Claude engine puts before the reader's words in a prompt
# (engines/claude/engine.py: `post_context`, `_prompt`, `interrupted_exchange`).
_APP_CONTEXT = re.compile(
    r"\A(?:<(post_context|earlier_conversation|interrupted_exchange)>\n.*?\n</\1>\n\n)+",
    re.DOTALL,
)


def _texts_of(content: object) -> list[str]:
    """Plain text blocks of a message, without the CLI's injected system reminders."""
    if isinstance(content, str):
        return [] if content.lstrip().startswith(_SYSTEM_REMINDER) else [content]
    texts: list[str] = []
    if isinstance(content, list):
        for block in content:
            if isinstance(block, dict) and block.get("type") == "text":
                value = block.get("text")
                if isinstance(value, str) and not value.lstrip().startswith(_SYSTEM_REMINDER):
                    texts.append(value)
    return texts


@dataclass
class RecordedRequest:
    """One HTTP request the server received, with helpers over the Messages API body."""

    index: int
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: Any
    raw_body: bytes
    received_at: float
    kind: RequestKind = "main"
    answered_by: str = ""
    outcome: str = "pending"

    @property
    def json(self) -> dict[str, Any]:
        """The JSON body as a dict (empty when the body was not a JSON object)."""
        return cast(dict[str, Any], self.body) if isinstance(self.body, dict) else {}

    @property
    def model(self) -> str | None:
        """The ``model`` field."""
        value = self.json.get("model")
        return value if isinstance(value, str) else None

    @property
    def stream(self) -> bool:
        """Whether the request asked for SSE streaming."""
        return bool(self.json.get("stream"))

    @property
    def max_tokens(self) -> int | None:
        """The ``max_tokens`` field."""
        value = self.json.get("max_tokens")
        return value if isinstance(value, int) else None

    @property
    def thinking(self) -> dict[str, Any] | None:
        """The ``thinking`` config, e.g. ``{"type": "adaptive", "display": "summarized"}``."""
        value = self.json.get("thinking")
        return cast(dict[str, Any], value) if isinstance(value, dict) else None

    @property
    def system_blocks(self) -> list[str]:
        """Texts of the ``system`` blocks, in order."""
        system = self.json.get("system")
        if isinstance(system, str):
            return [system]
        return _texts_of(system)

    @property
    def system(self) -> str:
        """All system text joined by newlines."""
        return "\n".join(self.system_blocks)

    @property
    def tools(self) -> list[dict[str, Any]]:
        """The tool definitions offered to the model."""
        tools = self.json.get("tools")
        return [t for t in tools if isinstance(t, dict)] if isinstance(tools, list) else []

    @property
    def tool_names(self) -> list[str]:
        """Names of the offered tools, in request order."""
        return [str(t.get("name")) for t in self.tools]

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The ``messages`` array."""
        messages = self.json.get("messages")
        return [m for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []

    @property
    def user_prompts(self) -> list[str]:
        """Every user text block in order, without tool results and system reminders.

        Blocks, not messages: after a failed turn the CLI folds the next prompt into the same
        user message, so one message can carry several prompts.
        """
        prompts: list[str] = []
        for message in self.messages:
            if message.get("role") == "user":
                prompts.extend(_texts_of(message.get("content")))
        return prompts

    @property
    def prompt(self) -> str:
        """The latest user prompt: the text that started the current agent turn."""
        prompts = self.user_prompts
        return prompts[-1] if prompts else ""

    @property
    def question(self) -> str:
        """The latest prompt without the context the app puts before the reader's words
        (the post, the earlier conversation, an interrupted exchange): what the reader
        asked. A rule matches on it, so a question asked again in a chat whose earlier
        turn failed meets the rule for the new question, not the old one."""
        return _APP_CONTEXT.sub("", self.prompt)

    @property
    def first_prompt(self) -> str:
        """The first user prompt of the conversation."""
        prompts = self.user_prompts
        return prompts[0] if prompts else ""

    def blocks(self, block_type: str, role: str | None = None) -> list[dict[str, Any]]:
        """All content blocks of a type across the messages, optionally for one role."""
        found: list[dict[str, Any]] = []
        for message in self.messages:
            content = message.get("content")
            if (role is None or message.get("role") == role) and isinstance(content, list):
                found.extend(
                    b for b in content if isinstance(b, dict) and b.get("type") == block_type
                )
        return found

    @property
    def tool_results(self) -> list[dict[str, Any]]:
        """``tool_result`` blocks of the last message (the results being sent back)."""
        if not self.messages:
            return []
        content = self.messages[-1].get("content")
        if not isinstance(content, list):
            return []
        return [b for b in content if isinstance(b, dict) and b.get("type") == "tool_result"]

    @property
    def session_id(self) -> str | None:
        """The CLI's session id from the ``x-claude-code-session-id`` header."""
        return self.headers.get("x-claude-code-session-id")

    def header(self, name: str) -> str | None:
        """A request header by case-insensitive name."""
        return self.headers.get(name.lower())


def is_side_request(request: RecordedRequest) -> bool:
    """Whether a Messages request is outside the agent loop (must not consume a script).

    The Messages engine's requests are the anthropic SDK tool runner's, which names itself
    in the ``x-stainless-helper`` header: all of them belong to the agent loop.

    Every request of the agent loop carries the SDK's identity block in ``system``, also with
    a custom system prompt, without tools, and in the non-streaming fallback the CLI uses
    after failed streams. Requests without it were made for another purpose. Session-title
    requests (sent when ``CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC`` is unset) do carry it, but
    they constrain the answer with ``output_config.format`` and wrap the prompt in
    ``<session>`` tags, which the agent loop never does.
    """
    if _TOOL_RUNNER in (request.header("x-stainless-helper") or ""):
        return False  # The Messages engine's loop: the anthropic SDK's tool runner.
    if not any(block.startswith(_IDENTITY_PREFIXES) for block in request.system_blocks):
        return True
    if _output_schema(request) is not None:
        return True
    messages = request.messages
    return len(messages) == 1 and any(
        text.lstrip().startswith("<session>") for text in _texts_of(messages[0].get("content"))
    )


_IDENTITY_PREFIXES = ("You are a Claude agent", "You are Claude Code")
_TOOL_RUNNER = "BetaToolRunner"


def _output_schema(request: RecordedRequest) -> dict[str, Any] | None:
    """The JSON schema a request constrains its answer to, if any."""
    config = request.json.get("output_config")
    fmt = config.get("format") if isinstance(config, dict) else None
    schema = fmt.get("schema") if isinstance(fmt, dict) else None
    return cast(dict[str, Any], schema) if isinstance(schema, dict) else None


def _side_reply(request: RecordedRequest) -> Reply:
    """A harmless answer for a side request: valid JSON when a schema is asked for."""
    schema = _output_schema(request)
    if schema is None:
        return Reply((Text("OK"),))
    properties = schema.get("properties")
    names = list(properties) if isinstance(properties, dict) else []
    return Reply((Text(json.dumps(dict.fromkeys(names, "Test chat"))),))


# ---------------------------------------------------------------------------------------------
# What the real API refuses
# ---------------------------------------------------------------------------------------------

# Model ids the API serves, as far as these tests are concerned; a test may add its own
# (``AnthropicTestServer(models=...)``, ``add_model``).
KNOWN_MODELS = frozenset(
    {
        "claude-haiku-4-5",
        "claude-haiku-4-5-20251001",
        "claude-sonnet-4-5",
        "claude-sonnet-4-5-20250929",
        "claude-sonnet-4-6",
        "claude-opus-4-1",
        "claude-opus-4-1-20250805",
        "claude-opus-4-5",
        "claude-opus-4-6",
        "claude-opus-5-5",
    }
)
MIN_THINKING_BUDGET = 1024


def refusal_of(body: Any, models: frozenset[str] | set[str]) -> ApiError | None:
    """The error the real Messages API answers this request body with, for the mistakes a
    client of ours could make; None when it would be served.

    Checked: an unknown model (404); ``max_tokens`` not above the thinking budget, or a
    budget under the minimum; a thinking block in the history without its signature; a
    ``tool_result`` whose ``tool_use`` is not in the message just before it (400).
    """
    if not isinstance(body, dict):
        return _invalid("The request body is not a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return _invalid("model: Field required")
    if model not in models:
        return ApiError(404, _error_payload(404, f"model: {model}"))
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or max_tokens < 1:
        return _invalid("max_tokens: Field required")
    config = body.get("thinking")
    if isinstance(config, dict) and config.get("type") == "enabled":
        budget = config.get("budget_tokens")
        if not isinstance(budget, int) or budget < MIN_THINKING_BUDGET:
            return _invalid(
                f"thinking.enabled.budget_tokens: must be at least {MIN_THINKING_BUDGET}"
            )
        if max_tokens <= budget:
            return _invalid("`max_tokens` must be greater than `thinking.budget_tokens`.")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return _invalid("messages: at least one message is required")
    previous_tool_uses: set[str] = set()
    for index, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        blocks = [b for b in content if isinstance(b, dict)] if isinstance(content, list) else []
        role = message.get("role") if isinstance(message, dict) else None
        for number, block in enumerate(blocks):
            where = f"messages.{index}.content.{number}"
            kind = block.get("type")
            if role == "assistant" and kind == "thinking":
                signature = block.get("signature")
                if not isinstance(signature, str) or not signature:
                    return _invalid(f"{where}.thinking.signature: Field required")
            if kind == "tool_result" and block.get("tool_use_id") not in previous_tool_uses:
                return _invalid(
                    f"{where}: unexpected `tool_use_id` found in `tool_result` blocks: "
                    f"{block.get('tool_use_id')}. Each `tool_result` block must have a "
                    "corresponding `tool_use` block in the previous message."
                )
        previous_tool_uses = {
            str(b.get("id")) for b in blocks if role == "assistant" and b.get("type") == "tool_use"
        }
    return None


def _invalid(message: str) -> ApiError:
    return ApiError(400, _error_payload(400, message))


# ---------------------------------------------------------------------------------------------
# Responders and rules
# ---------------------------------------------------------------------------------------------

Responder: TypeAlias = Callable[[RecordedRequest], ResponseSpec]


@dataclass
class EchoResponder:
    """Deterministic default: answers "Echo: <prompt>" in word-sized deltas."""

    prefix: str = "Echo: "
    think: bool = False
    chunk: Chunking = "word"
    delay: float | None = None

    def __call__(self, request: RecordedRequest) -> ResponseSpec:
        """Answer the request's latest prompt."""
        prompt = request.prompt.strip()
        steps: list[Step] = []
        if self.think:
            steps.append(Thinking(f"The reader said: {prompt}", chunk=self.chunk))
        steps.append(Text(f"{self.prefix}{prompt}", chunk=self.chunk, delay=self.delay))
        return Reply(tuple(steps))


class Rule:
    """Replies served to the requests a predicate selects, in order."""

    def __init__(
        self,
        label: str,
        predicate: Callable[[RecordedRequest], bool],
        replies: list[Reply],
        *,
        repeat_last: bool,
    ) -> None:
        """Create a rule; use ``AnthropicTestServer.when``/``when_user_says`` instead."""
        self.label = label
        self.predicate = predicate
        self.repeat_last = repeat_last
        self._replies: collections.deque[Reply] = collections.deque(replies)
        self.served: list[RecordedRequest] = []

    @property
    def remaining(self) -> int:
        """How many scripted replies are still unused."""
        return len(self._replies)

    def _take(self, request: RecordedRequest) -> Reply | None:
        if not self._replies or not self.predicate(request):
            return None
        self.served.append(request)
        if self.repeat_last and len(self._replies) == 1:
            return self._replies[0]
        return self._replies.popleft()


# ---------------------------------------------------------------------------------------------
# Rendering a reply into SSE events
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Event:
    name: str
    data: dict[str, Any]


@dataclass(frozen=True)
class _Sleep:
    seconds: float


@dataclass(frozen=True)
class _CutHere:
    pass


_Action: TypeAlias = _Event | _Sleep | _CutHere | Gate

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
_ERROR_MESSAGES = {529: "Overloaded", 500: "Internal server error", 429: "Rate limited"}


def _error_payload(status: int, message: str | None = None) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(status, "api_error")
    return {
        "type": "error",
        "error": {"type": kind, "message": message or _ERROR_MESSAGES.get(status, kind)},
    }


def _split(value: str, chunk: Chunking) -> list[str]:
    if not value:
        return []
    if chunk == "word":
        # Each piece is a word with its trailing whitespace, like model tokens.
        return re.findall(r"\S+\s*|\s+", value)
    size = max(1, int(chunk))
    return [value[i : i + size] for i in range(0, len(value), size)]


def _new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def _signature_for(thought: str) -> str:
    digest = hashlib.sha256(thought.encode()).digest()
    return base64.b64encode(b"test-signature:" + digest).decode()


@dataclass
class _Plan:
    error: ApiError | None
    actions: list[_Action]
    message: dict[str, Any]
    cut: bool
    stall_seconds: float = 0.0


def _resolve_tool_name(name: str, offered: Sequence[str]) -> str | None:
    if name in offered:
        return name
    matches = [n for n in offered if n.endswith(f"__{name}")]
    return matches[0] if len(matches) == 1 else None


def _estimate_tokens(raw: bytes) -> int:
    return max(1, len(raw) // 4)


def _plan(
    spec: Reply, request: RecordedRequest, delta_delay: float | None, problems: list[str]
) -> _Plan:
    """Turn a reply into the SSE actions and the equivalent complete message."""
    steps = list(spec.steps)
    stall_seconds = sum(s.seconds for s in steps if isinstance(s, Stall))
    first = next((s for s in steps if not isinstance(s, (Stall, Gate, Usage, Cut))), None)
    if isinstance(first, ApiError):
        # Nothing streamed before it, so the error is the HTTP response itself.
        leading = steps[: steps.index(first)]
        if any(isinstance(s, Gate) for s in leading):
            problems.append(f"request #{request.index}: a gate before an HTTP error is not served")
        delay = sum(s.seconds for s in leading if isinstance(s, Stall))
        return _Plan(first, [], {}, cut=False, stall_seconds=delay)
    input_tokens = _estimate_tokens(request.raw_body)
    output_tokens: int | None = None
    cache_read = cache_creation = 0
    for step in steps:
        if isinstance(step, Usage):
            input_tokens = step.input_tokens if step.input_tokens is not None else input_tokens
            output_tokens = step.output_tokens if step.output_tokens is not None else output_tokens
            cache_read = step.cache_read_input_tokens
            cache_creation = step.cache_creation_input_tokens
    offered = request.tool_names
    content: list[dict[str, Any]] = []
    actions: list[_Action] = []
    emitted = 0
    cut_after: int | None = next(
        (s.after for s in steps if isinstance(s, Cut) and s.after is not None), None
    )
    counted_output = 0
    started = False
    message_id = _new_id("msg_test_")
    model = spec.model or request.model or "claude-test"

    def emit(name: str, data: dict[str, Any]) -> None:
        nonlocal emitted
        actions.append(_Event(name, data))
        emitted += 1
        if cut_after is not None and emitted == cut_after:
            actions.append(_CutHere())

    def start() -> None:
        nonlocal started
        if started:
            return
        started = True
        emit(
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": message_id,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {
                        "input_tokens": input_tokens,
                        "cache_creation_input_tokens": cache_creation,
                        "cache_read_input_tokens": cache_read,
                        "output_tokens": 1,
                    },
                },
            },
        )
        emit("ping", {"type": "ping"})

    def deltas(index: int, kind: str, key: str, pieces: list[str], delay: float | None) -> None:
        nonlocal counted_output
        pause = delay if delay is not None else delta_delay
        for i, piece in enumerate(pieces):
            if pause and i:
                actions.append(_Sleep(pause))
            delta = {"type": kind, key: piece}
            emit(
                "content_block_delta",
                {"type": "content_block_delta", "index": index, "delta": delta},
            )
            counted_output += 1

    for step in steps:
        if isinstance(step, Stall):
            actions.append(_Sleep(step.seconds))
            continue
        if isinstance(step, Gate):
            actions.append(step)
            continue
        if isinstance(step, Usage):
            continue
        if isinstance(step, Cut):
            if step.after is None:
                actions.append(_CutHere())
            continue
        start()
        index = len(content)
        if isinstance(step, ApiError):
            body = step.body if isinstance(step.body, Mapping) else _error_payload(step.status)
            emit("error", dict(body))
            return _Plan(None, actions, {}, cut=False, stall_seconds=stall_seconds)
        if isinstance(step, Thinking):
            signature = _signature_for(step.text) if step.signature is None else step.signature
            block = {"type": "thinking", "thinking": "", "signature": ""}
            emit(
                "content_block_start",
                {"type": "content_block_start", "index": index, "content_block": block},
            )
            deltas(index, "thinking_delta", "thinking", _split(step.text, step.chunk), step.delay)
            if signature:
                emit(
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": index,
                        "delta": {"type": "signature_delta", "signature": signature},
                    },
                )
            content.append({"type": "thinking", "thinking": step.text, "signature": signature})
        elif isinstance(step, Text):
            emit(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": index,
                    "content_block": {"type": "text", "text": ""},
                },
            )
            deltas(index, "text_delta", "text", _split(step.text, step.chunk), step.delay)
            content.append({"type": "text", "text": step.text})
        else:
            name = _resolve_tool_name(step.name, offered)
            if name is None:
                problems.append(
                    f"request #{request.index}: tool {step.name!r} not offered; offered: {offered}"
                )
                name = step.name
            tool_id = step.id or _new_id("toolu_test_")
            emit(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": index,
                    "content_block": {"type": "tool_use", "id": tool_id, "name": name, "input": {}},
                },
            )
            raw_input = json.dumps(dict(step.input))
            # The API opens every tool input with an empty partial_json delta.
            pieces = ["", *_split(raw_input, step.chunk)]
            deltas(index, "input_json_delta", "partial_json", pieces, 0)
            content.append(
                {"type": "tool_use", "id": tool_id, "name": name, "input": dict(step.input)}
            )
        emit("content_block_stop", {"type": "content_block_stop", "index": index})
    start()
    stop_reason = spec.stop_reason or (
        "tool_use" if any(b["type"] == "tool_use" for b in content) else "end_turn"
    )
    final_usage = {
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": cache_creation,
        "cache_read_input_tokens": cache_read,
        "output_tokens": output_tokens if output_tokens is not None else max(1, counted_output),
    }
    emit(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
            "usage": final_usage,
        },
    )
    emit("message_stop", {"type": "message_stop"})
    message = {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": final_usage,
    }
    has_cut = any(isinstance(a, _CutHere) for a in actions)
    return _Plan(None, actions, message, cut=has_cut, stall_seconds=stall_seconds)


# ---------------------------------------------------------------------------------------------
# HTTP plumbing
# ---------------------------------------------------------------------------------------------


class _ConnectionCut(Exception):
    """Raised inside a response to make uvicorn drop the connection mid-body."""


class _DropDeliberateCuts(logging.Filter):
    """Keeps uvicorn from logging a traceback for every cut a test asked for."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, _ConnectionCut)


_uvicorn_error_logger = logging.getLogger("uvicorn.error")
if not any(isinstance(f, _DropDeliberateCuts) for f in _uvicorn_error_logger.filters):
    _uvicorn_error_logger.addFilter(_DropDeliberateCuts())


def _sse(event: _Event) -> bytes:
    return f"event: {event.name}\ndata: {json.dumps(event.data)}\n\n".encode()


class _ScriptedStream(Response):
    """Plays a plan as an SSE stream, honouring stalls, cuts and client disconnects."""

    def __init__(self, plan: _Plan, record: RecordedRequest, closing: asyncio.Event) -> None:
        super().__init__(media_type="text/event-stream")
        self._plan = plan
        self._record = record
        self._closing = closing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        disconnected = asyncio.Event()

        async def watch() -> None:
            while True:
                message: Message = await receive()
                if message["type"] == "http.disconnect":
                    disconnected.set()
                    return

        watcher = asyncio.create_task(watch())
        started = False
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"request-id", _new_id("req_test_").encode()),
        ]

        async def begin() -> None:
            nonlocal started
            if not started:
                started = True
                await send({"type": "http.response.start", "status": 200, "headers": headers})

        try:
            for action in self._plan.actions:
                if disconnected.is_set():
                    self._record.outcome = "client_disconnected"
                    return
                if isinstance(action, Gate):
                    opened = action._watch()
                    await _sleep_unless(None, opened, disconnected, self._closing)
                    if not opened.is_set():
                        if self._closing.is_set():
                            self._record.outcome = "server_closed"
                            await begin()
                            raise _ConnectionCut
                        self._record.outcome = "client_disconnected"
                        return
                elif isinstance(action, _Sleep):
                    if await _sleep_unless(action.seconds, disconnected, self._closing):
                        if self._closing.is_set():
                            self._record.outcome = "server_closed"
                            await begin()
                            raise _ConnectionCut
                        self._record.outcome = "client_disconnected"
                        return
                elif isinstance(action, _CutHere):
                    await begin()
                    self._record.outcome = "cut"
                    raise _ConnectionCut
                else:
                    await begin()
                    chunk = _sse(action)
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await begin()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            if self._record.outcome == "pending":
                self._record.outcome = "completed"
        finally:
            watcher.cancel()


async def _sleep_unless(seconds: float | None, *events: asyncio.Event) -> bool:
    """Sleep (None: until an event fires), returning True early if any event fires."""
    waiters = [asyncio.create_task(e.wait()) for e in events]
    try:
        done, _ = await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        return bool(done)
    finally:
        for w in waiters:
            w.cancel()


class _CutJSON(Response):
    """Sends half of a JSON body and then drops the connection."""

    def __init__(self, payload: bytes) -> None:
        super().__init__()
        self._payload = payload

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(self._payload)).encode()),
                ],
            }
        )
        half = self._payload[: len(self._payload) // 2]
        await send({"type": "http.response.body", "body": half, "more_body": True})
        raise _ConnectionCut


# ---------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------


class AnthropicTestServer:
    """A local Messages API server with scripted replies and full request recording."""

    def __init__(
        self,
        *,
        tokens_per_second: float | None = None,
        default: Responder | None = None,
        side_request_filter: Callable[[RecordedRequest], bool] = is_side_request,
        models: Sequence[str] = (),
    ) -> None:
        """Create a stopped server; ``tokens_per_second`` paces deltas without a ``delay``.

        Requests the real API would refuse (``refusal_of``) get its error instead of a
        script; ``models`` adds model ids to the ones it serves.
        """
        self.models = set(KNOWN_MODELS) | set(models)
        self._lock = threading.Condition()
        self._requests: list[RecordedRequest] = []
        self._rules: list[Rule] = []
        self._queue: collections.deque[Reply] = collections.deque()
        self._default: Responder = default or EchoResponder()
        self._side_filter = side_request_filter
        self._delta_delay: float | None = None
        self.set_rate(tokens_per_second)
        self.problems: list[str] = []
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing: asyncio.Event | None = None
        self._stop: asyncio.Event | None = None
        self._port = 0
        self._router = Router(
            routes=[
                Route("/v1/messages", self._messages, methods=["POST"]),
                Route("/v1/messages/count_tokens", self._count_tokens, methods=["POST"]),
                Route("/api/hello", self._hello, methods=["GET", "HEAD"]),
                Route(
                    "/{path:path}",
                    self._unknown,
                    methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"],
                ),
            ]
        )

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> AnthropicTestServer:
        """Start serving on a free port; returns once the socket accepts connections."""
        if self._thread is not None:
            return self
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self._port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._router,
            log_config=None,
            access_log=False,
            lifespan="off",
            loop="asyncio",
            timeout_graceful_shutdown=1,
        )
        server = uvicorn.Server(config)
        ready = threading.Event()
        failure: list[BaseException] = []

        async def serve() -> None:
            self._loop = asyncio.get_running_loop()
            self._closing = asyncio.Event()
            self._stop = asyncio.Event()
            config.load()
            server.lifespan = config.lifespan_class(config)
            try:
                await server.startup(sockets=[sock])
            finally:
                ready.set()
            await self._stop.wait()
            # Streams in flight were told to end by `_closing`; don't wait on idle keep-alives.
            server.force_exit = True
            await server.shutdown(sockets=[sock])

        def run() -> None:
            try:
                asyncio.run(serve())
            except BaseException as exc:  # surfaced to the thread that called start()
                failure.append(exc)
                ready.set()

        self._thread = threading.Thread(target=run, name="anthropic-test-server", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            self._thread.join()
            self._thread = None
            raise RuntimeError("test Messages API server failed to start") from failure[0]
        return self

    def stop(self) -> None:
        """Stop serving: end streams in flight, close connections and join the thread."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        closing, stop = self._closing, self._stop
        assert closing is not None
        assert stop is not None
        loop.call_soon_threadsafe(closing.set)
        loop.call_soon_threadsafe(stop.set)
        thread.join(5)
        self._thread = None
        self._loop = None

    def __enter__(self) -> AnthropicTestServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The port the server listens on (0 before start)."""
        return self._port

    @property
    def base_url(self) -> str:
        """Value for ``ANTHROPIC_BASE_URL``."""
        return f"http://127.0.0.1:{self._port}"

    def cli_env(self, *, config_dir: str | None = None, **extra: str) -> dict[str, str]:
        """Environment for the agent CLI so that it talks to this server and nothing else."""
        env = {
            "ANTHROPIC_BASE_URL": self.base_url,
            "ANTHROPIC_API_KEY": "test-key",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        }
        if config_dir is not None:
            env["CLAUDE_CONFIG_DIR"] = config_dir
        env.update(extra)
        return env

    # -- scripting ----------------------------------------------------------------------------

    def when(
        self,
        predicate: Callable[[RecordedRequest], bool],
        responses: ResponseSpec | Sequence[ResponseSpec],
        *,
        label: str = "rule",
        repeat_last: bool = False,
    ) -> Rule:
        """Serve ``responses`` in order to main requests for which ``predicate`` holds."""
        rule = Rule(label, predicate, _as_replies(responses), repeat_last=repeat_last)
        with self._lock:
            self._rules.append(rule)
        return rule

    def when_user_says(
        self,
        needle: str,
        responses: ResponseSpec | Sequence[ResponseSpec],
        *,
        where: Literal["prompt", "first", "any"] = "prompt",
        repeat_last: bool = False,
    ) -> Rule:
        """Serve ``responses`` to requests whose user text contains ``needle``.

        ``where="prompt"`` looks at the latest user prompt without the app's context
        (`RecordedRequest.question`: the reader's words that started the current agent
        turn, so tool-result round-trips of that turn match too), ``"first"`` at the
        conversation's first prompt and ``"any"`` at every prompt.
        """

        def predicate(request: RecordedRequest) -> bool:
            if where == "prompt":
                return needle in request.question
            if where == "first":
                return needle in request.first_prompt
            return any(needle in p for p in request.user_prompts)

        return self.when(
            predicate, responses, label=f"user says {needle!r}", repeat_last=repeat_last
        )

    def enqueue(self, *responses: ResponseSpec) -> None:
        """Append replies to the FIFO used by requests no rule matches."""
        with self._lock:
            self._queue.extend(as_reply(r) for r in responses)

    def set_default(self, responder: Responder) -> None:
        """Replace the responder used when no rule matches and the queue is empty."""
        with self._lock:
            self._default = responder

    def set_rate(self, tokens_per_second: float | None) -> None:
        """Pace every delta without its own ``delay`` (None streams as fast as possible)."""
        self._delta_delay = 1.0 / tokens_per_second if tokens_per_second else None

    # -- recording ----------------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    def main_requests(self) -> list[RecordedRequest]:
        """Messages requests of the agent loop (the ones scripts answer)."""
        return [r for r in self.requests if r.kind == "main"]

    def side_requests(self) -> list[RecordedRequest]:
        """Messages requests outside the agent loop."""
        return [r for r in self.requests if r.kind == "side"]

    def unknown_requests(self) -> list[RecordedRequest]:
        """Requests to paths this server does not implement."""
        return [r for r in self.requests if r.kind == "unknown"]

    def requests_for_session(self, session_id: str) -> list[RecordedRequest]:
        """Main requests sent by the CLI session with this id."""
        return [r for r in self.main_requests() if r.session_id == session_id]

    def last_request(self) -> RecordedRequest:
        """The most recent main request; raises if there is none."""
        main = self.main_requests()
        if not main:
            raise AssertionError("no Messages request of the agent loop was received")
        return main[-1]

    def wait_for_requests(
        self, count: int, *, kind: RequestKind = "main", timeout: float = 10.0
    ) -> list[RecordedRequest]:
        """Block until ``count`` requests of ``kind`` arrived; raises on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                found = [r for r in self._requests if r.kind == kind]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(found)} of {count} {kind} requests after {timeout}s")
                self._lock.wait(left)

    def clear(self) -> None:
        """Forget recorded requests, rules, queued replies and problems."""
        with self._lock:
            self._requests.clear()
            self._rules.clear()
            self._queue.clear()
            self.problems.clear()

    # -- handlers -----------------------------------------------------------------------------

    async def _record(self, request: Request, kind: RequestKind) -> RecordedRequest:
        raw = await request.body()
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
        with self._lock:
            record = RecordedRequest(
                index=len(self._requests),
                method=request.method,
                path=request.url.path,
                query=request.url.query,
                headers={k.lower(): v for k, v in request.headers.items()},
                body=body,
                raw_body=raw,
                received_at=time.monotonic(),
                kind=kind,
            )
            if kind == "main" and self._side_filter(record):
                record.kind = "side"
            self._requests.append(record)
            self._lock.notify_all()
        return record

    def _choose(self, record: RecordedRequest) -> Reply:
        with self._lock:
            if record.kind == "side":
                record.answered_by = "side"
                return _side_reply(record)
            for rule in self._rules:
                chosen = rule._take(record)
                if chosen is not None:
                    record.answered_by = rule.label
                    return chosen
            if self._queue:
                record.answered_by = "queue"
                return self._queue.popleft()
            record.answered_by = "default"
            responder = self._default
        return as_reply(responder(record))

    def add_model(self, model: str) -> None:
        """Serve one more model id."""
        with self._lock:
            self.models.add(model)

    async def _messages(self, request: Request) -> Response:
        record = await self._record(request, "main")
        with self._lock:
            refused = refusal_of(record.body, self.models)
        if refused is not None:
            record.answered_by = "refused"
            return self._error_response(record, refused)
        spec = self._choose(record)
        plan = _plan(spec, record, self._delta_delay, self.problems)
        closing = self._closing
        assert closing is not None
        if plan.error is not None:
            if plan.stall_seconds:
                await _sleep_unless(plan.stall_seconds, closing)
            return self._error_response(record, plan.error)
        if record.stream:
            return _ScriptedStream(plan, record, closing)
        # Without a stream there is nothing to pace, so only stalls delay the answer.
        if plan.stall_seconds:
            await _sleep_unless(plan.stall_seconds, closing)
        payload = json.dumps(plan.message).encode()
        if plan.cut:
            record.outcome = "cut"
            return _CutJSON(payload)
        record.outcome = "completed"
        return Response(payload, media_type="application/json")

    def _error_response(self, record: RecordedRequest, err: ApiError) -> Response:
        record.outcome = f"error {err.status}"
        headers = {"request-id": _new_id("req_test_"), **(err.headers or {})}
        if isinstance(err.body, str):
            return Response(err.body, status_code=err.status, headers=headers)
        body = dict(err.body) if err.body is not None else _error_payload(err.status)
        return JSONResponse(body, status_code=err.status, headers=headers)

    async def _count_tokens(self, request: Request) -> Response:
        record = await self._record(request, "count_tokens")
        record.answered_by = "count_tokens"
        record.outcome = "completed"
        return JSONResponse({"input_tokens": _estimate_tokens(record.raw_body)})

    async def _hello(self, request: Request) -> Response:
        # The CLI's connectivity check when non-essential traffic is allowed.
        record = await self._record(request, "probe")
        record.answered_by = "probe"
        record.outcome = "completed"
        return JSONResponse({"message": "hello"})

    async def _unknown(self, request: Request) -> Response:
        record = await self._record(request, "unknown")
        record.outcome = "error 404"
        return JSONResponse(
            _error_payload(404, f"Not found: {request.method} {request.url.path}"),
            status_code=404,
        )

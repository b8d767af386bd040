"""Chat titles written after the first exchange: from the question's key words offline, or by
a small Haiku request with Claude. Until then (and whenever writing one fails) a chat keeps
the title its first message gave it."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import httpx

from blogchat.chats import title_for
from blogchat.quotas import Quotas
from blogchat.settings import Settings
from blogchat.store import MessageRecord, Store

if TYPE_CHECKING:
    from blogchat.session import ChatSession, PendingTurn

log = logging.getLogger(__name__)

ANTHROPIC_API = "https://api.anthropic.com"
# A title is a few words: the request asks for little, and waits for it briefly.
MAX_TITLE_TOKENS = 30
REQUEST_TIMEOUT = 10.0
# What the model reads of the exchange.
QUESTION_CHARS = 1000
ANSWER_CHARS = 1500
MAX_TITLE_CHARS = 60

SYSTEM = (
    "You name conversations for a list of chats. Reply with a title of 2 to 6 words that "
    "says what the reader asked about, in the reader's language, without quotes or a final "
    "full stop."
)
TITLE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"title": {"type": "string"}},
    "required": ["title"],
    "additionalProperties": False,
}

# Words that say nothing of what a question is about.
_STOPWORDS = """a about above after again all am an and any are as at be been being below between
both but by can could did do does doing down during each few for from further had has have
having he her here hers how i if in into is it its itself just me more most my no nor not now of
off on once only or other our out over own same she should so some such than that the their
them then there these they this those through to too under until up very was we were what when
where which while who whom why will with would you your yours please tell explain know want
need get got keep kept make think really much many also"""
STOPWORDS = frozenset(_STOPWORDS.split())
WORD = re.compile(r"[\w'’-]+", re.UNICODE)


@dataclass(frozen=True)
class Written:
    """A title, and the tokens writing it cost (0 offline)."""

    title: str
    tokens: int = 0


def keyword_title(question: str, words: int = 5) -> str | None:
    """A title from a question's key words (no stopwords, in their order, each once)."""
    found: list[str] = []
    seen: set[str] = set()
    for match in WORD.finditer(question):
        word = match.group().strip("'’-")
        key = word.lower()
        if len(word) < 2 or key in STOPWORDS or key in seen:
            continue
        seen.add(key)
        found.append(word)
        if len(found) == words:
            break
    if not found:
        return None
    title = " ".join(found)
    return clean_title(title[0].upper() + title[1:])


def clean_title(text: str) -> str | None:
    """A model's title as the list shows it: one line, no quotes, no final stop, not long."""
    line = " ".join(text.split()).strip().strip("\"'“”‘’`*#").strip()
    line = line.removeprefix("Title:").strip().rstrip(".")
    if not line:
        return None
    if len(line) > MAX_TITLE_CHARS:
        line = line[:MAX_TITLE_CHARS].rsplit(" ", 1)[0].rstrip(",.;:") + "…"
    return line


class Titles:
    """Writes a chat's title once its first exchange has ended well."""

    def __init__(self, settings: Settings, store: Store, quotas: Quotas | None = None) -> None:
        self.settings = settings
        self.store = store
        self.quotas = quotas
        self._client: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def after_turn(self, session: ChatSession, pending: PendingTurn, answer: MessageRecord) -> None:
        """A turn ended and its answer is saved: title the chat in the background if this
        was its first exchange and the chat still has its first message's title."""
        if answer.status != "complete" or not answer.text.strip():
            return
        questions = [m for m in session.history if m.role == "user"]
        if len(questions) != 1 or questions[0].id != pending.user.id:
            return
        task = asyncio.create_task(
            self._title(session, pending, answer), name=f"title-{session.chat.id}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def write(self, question: str, answer: str) -> Written | None:
        """A title for this exchange, or None when none could be written."""
        if not self.settings.claude_enabled:
            title = keyword_title(question)
            return None if title is None else Written(title)
        return await self._ask_claude(question, answer)

    @property
    def writing(self) -> int:
        """Titles being written now."""
        return len(self._tasks)

    async def aclose(self) -> None:
        """Wait for titles being written (briefly), then close the HTTP client."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=REQUEST_TIMEOUT)
        if self._client is not None:
            await self._client.aclose()

    async def _title(
        self, session: ChatSession, pending: PendingTurn, answer: MessageRecord
    ) -> None:
        first = session.chat.title
        if first != title_for(pending.user.text):
            return  # the reader renamed it already
        try:
            written = await self.write(pending.user.text, answer.text)
        except Exception:
            log.exception("chat %s: the title could not be written", session.chat.id)
            return
        if written is None:
            return
        if written.tokens:
            await self.store.chats.add_side_tokens(answer.id, written.tokens)
            if self.quotas is not None:
                self.quotas.spent(pending.who(session.chat.owner_id), written.tokens)
        # Only over the first message's title: a rename meanwhile wins.
        if (
            written.title
            and written.title != first
            and await self.store.chats.retitle(session.chat.id, first, written.title)
        ):
            session.update_chat(replace(session.chat, title=written.title))

    async def _ask_claude(self, question: str, answer: str) -> Written | None:
        settings = self.settings
        assert settings.anthropic_api_key is not None
        if self._client is None:
            self._client = httpx.AsyncClient(
                base_url=(settings.anthropic_base_url or ANTHROPIC_API).rstrip("/"),
                timeout=REQUEST_TIMEOUT,
            )
        exchange = (
            f"<question>\n{question[:QUESTION_CHARS]}\n</question>\n"
            f"<answer>\n{answer[:ANSWER_CHARS]}\n</answer>\n\nThe title:"
        )
        try:
            response = await self._client.post(
                "/v1/messages",
                headers={
                    "x-api-key": settings.anthropic_api_key.get_secret_value(),
                    "anthropic-version": "2023-06-01",
                },
                json={
                    "model": settings.title_model or settings.model_haiku,
                    "max_tokens": MAX_TITLE_TOKENS,
                    "system": SYSTEM,
                    "messages": [{"role": "user", "content": exchange}],
                    "output_config": {"format": {"type": "json_schema", "schema": TITLE_SCHEMA}},
                },
            )
            response.raise_for_status()
            body = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("a chat title could not be written: %s", exc)
            return None
        usage = body.get("usage") or {}
        tokens = sum(
            int(usage.get(key) or 0)
            for key in (
                "input_tokens",
                "output_tokens",
                "cache_read_input_tokens",
                "cache_creation_input_tokens",
            )
        )
        text = "".join(
            block.get("text", "")
            for block in body.get("content") or []
            if isinstance(block, dict) and block.get("type") == "text"
        )
        try:
            parsed = json.loads(text)
            text = str(parsed.get("title", "")) if isinstance(parsed, dict) else text
        except ValueError:
            pass  # a plain-text title
        title = clean_title(text)
        if title is None:
            # The tokens were spent all the same.
            return Written("", tokens) if tokens else None
        return Written(title, tokens)

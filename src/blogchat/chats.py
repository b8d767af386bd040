"""The chat rules, for every transport: who owns which chat, how a message creates a chat
or joins one, idempotent sends, the model policy, personas, titles, rename and delete.

The WebSocket hub and the REST API both ask this service; neither touches the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from blogchat import policy
from blogchat import protocol as wire
from blogchat.cluster.commands import ForwardRefused, OwnerGone, unreachable
from blogchat.content import Blog
from blogchat.engines.base import AgentEngine
from blogchat.eventlog import Subscriber
from blogchat.personas import Persona, Personas
from blogchat.quotas import QuotaExceeded, Quotas, Who
from blogchat.session import (
    AlreadySent,
    ChatSession,
    ChatSessions,
    PendingTurn,
    RewriteRefused,
    SessionClosed,
)
from blogchat.settings import Settings
from blogchat.store import ChatRecord, DuplicateClientMessage, MessageRecord, Store
from blogchat.store.chats import Waiting
from blogchat.views import chat_info, message_info, user_message_event
from blogchat.visitors import Visitor

if TYPE_CHECKING:
    from blogchat.cluster.node import ClusterNode

NO_SUCH_CHAT = "There is no such chat."


class ChatError(Exception):
    """A request about a chat that cannot be carried out; the message is for the reader."""

    def __init__(
        self,
        code: wire.ErrorCode,
        message: str,
        chat_id: str | None = None,
        *,
        retryable: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code: wire.ErrorCode = code
        self.message = message
        self.chat_id = chat_id
        self.retryable = retryable
        self.retry_after = retry_after


# Search: the longest query taken, and the most chats one search returns.
MAX_SEARCH_CHARS = 100
SEARCH_RESULTS = 50
QUEUE_FULL = "This chat already has messages waiting. Wait for its answers, then ask again."
CHAT_TOO_LONG = "This conversation has grown too long for the assistant. Start a new chat to go on."


@dataclass(frozen=True)
class ChatDetail:
    """A chat with its whole transcript, a running answer included."""

    chat: wire.ChatInfo
    last_seq: int
    busy: bool
    messages: list[wire.MessageInfo]


class Chats:
    """The application's chat service."""

    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        sessions: ChatSessions,
        engine: AgentEngine,
        personas: Personas,
        blog: Blog,
        quotas: Quotas | None = None,
        cluster: ClusterNode | None = None,
    ) -> None:
        self.settings = settings
        self.quotas = quotas
        # Several instances: chats owned elsewhere are followed here, their messages
        # forwarded to their owner (cluster/).
        self.cluster = cluster
        self.store = store
        self.sessions = sessions
        self.engine = engine
        self.personas = personas
        self.blog = blog
        # One lock per visitor serializes the idempotency check of its messages, so a
        # message resent on two connections at once still starts only one turn.
        self._visitor_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )

    # --- reading ----------------------------------------------------------------------

    async def own(self, visitor: Visitor, chat_id: str) -> ChatRecord:
        """The chat, if this visitor owns it; otherwise not_found, revealing nothing."""
        session = self.sessions.get(chat_id)
        chat = session.chat if session is not None else await self.store.chats.get_chat(chat_id)
        if self.cluster is not None and session is not None and session.chat.owner_id != visitor.id:
            # A sign-in on another instance may have moved the chat to this account before
            # this instance heard of it: the database says.
            chat = await self.store.chats.get_chat(chat_id)
            if chat is not None and chat.owner_id == visitor.id:
                self.sessions.chats_moved(session.chat.owner_id, visitor.id)
        if chat is None or chat.owner_id != visitor.id:
            raise ChatError("not_found", NO_SUCH_CHAT, chat_id)
        return chat

    async def list(self, visitor: Visitor) -> list[wire.ChatInfo]:
        """The visitor's chats, most recently active first."""
        return [chat_info(chat) for chat in await self.store.chats.list_chats(visitor.id)]

    async def search(self, visitor: Visitor, query: str) -> Sequence[wire.ChatInfo]:
        """The visitor's chats whose title or messages contain `query` (at most
        SEARCH_RESULTS, most recently active first), each with a snippet of its first
        matching message."""
        query = " ".join(query.split())[:MAX_SEARCH_CHARS]
        if not query:
            return await self.list(visitor)
        found = await self.store.chats.search_chats(visitor.id, query, SEARCH_RESULTS)
        results = []
        for chat, text in found:
            snippet = None if text is None else snippet_of(text, query)
            # (The first message, when it is still the title, says nothing more.)
            results.append(
                chat_info(chat).model_copy(
                    update={"snippet": None if snippet == chat.title else snippet}
                )
            )
        return results

    async def detail(self, visitor: Visitor, chat_id: str) -> ChatDetail:
        """A chat and its transcript, including a running answer so far."""
        chat = await self.own(visitor, chat_id)
        session = self.sessions.get(chat_id)
        if session is not None:
            return ChatDetail(
                chat=chat_info(session.chat),
                last_seq=session.last_seq,
                busy=session.busy,
                messages=session.message_infos(),
            )
        messages = await self.store.chats.get_messages(chat_id)
        return ChatDetail(
            chat=chat_info(chat),
            last_seq=chat.last_seq,
            busy=False,
            messages=[message_info(message, self.sessions.render) for message in messages],
        )

    # --- watching ---------------------------------------------------------------------

    async def subscribe(
        self,
        visitor: Visitor,
        chat_id: str,
        subscriber: Subscriber,
        *,
        after_seq: int | None,
        request_id: str | None,
    ) -> None:
        """Send the chat's history (or a replay) to a subscriber, then its live events."""
        session = await self._session(visitor, chat_id)
        if self.cluster is not None:
            await self.cluster.catch_up(session, after_seq)
        try:
            session.subscribe(subscriber, after_seq=after_seq, request_id=request_id)
        except SessionClosed:
            raise ChatError("not_found", "This chat no longer exists.", chat_id) from None
        # The reader may ask next: the engine gets ready, if that costs no one.
        model = self.model_for(session.chat, visitor)
        session.prepare(policy.model_id(self.settings, model))

    async def unsubscribe(self, visitor: Visitor, chat_id: str, subscriber: Subscriber) -> None:
        """Stop sending the chat's events to a subscriber."""
        await self.own(visitor, chat_id)
        session = self.sessions.get(chat_id)
        if session is not None:
            session.unsubscribe(subscriber)

    async def stop(self, visitor: Visitor, chat_id: str) -> None:
        """Stop the chat's running turn gracefully (nothing when none runs)."""
        await self.own(visitor, chat_id)
        session = self.sessions.get(chat_id)
        if session is not None:
            session.stop()

    # --- sending ----------------------------------------------------------------------

    async def send(
        self, visitor: Visitor, message: wire.Chat, sender: Subscriber, *, address: str = ""
    ) -> str | None:
        """Carry out a `chat` message: create the chat or join it, save the user message and
        queue its turn; a repeated clientMessageId re-sends the original answers instead.

        The sender hears about its message: it is subscribed to the chat (the id returned)
        before the message is announced. A message past a limit (the chat's queue or length,
        the visitor's or the address's turns and tokens) is refused before anything is
        claimed or saved for it.
        """
        text = message.text.strip()
        rewriting = message.regenerate is not None or message.edit is not None
        if rewriting and message.chat_id is None:
            raise ChatError("bad_request", "`regenerate` and `edit` need the chat's `chatId`.")
        if message.regenerate is not None and message.edit is not None:
            raise ChatError(
                "bad_request", "Send `regenerate` or `edit`, not both.", message.chat_id
            )
        if not text and message.regenerate is None:
            raise ChatError("bad_request", "The message is empty.", message.chat_id)
        if len(text) > self.settings.max_message_chars:
            raise ChatError(
                "too_large",
                f"Messages are limited to {self.settings.max_message_chars} characters.",
                message.chat_id,
            )
        if message.model is not None and not policy.allowed(
            message.model, anonymous=visitor.anonymous
        ):
            raise ChatError(
                "model_not_allowed",
                f"Sign in to use {policy.LABELS[message.model]}. Anonymous chats use Haiku.",
                message.chat_id,
            )
        lock = self._visitor_locks.setdefault(visitor.id, asyncio.Lock())
        async with lock, self._everywhere(visitor):
            # A new chat's message is looked up first: a resend must create nothing (and
            # one forwarded to another instance's chat is, in `_forwarded`: a resend is
            # never forwarded). Otherwise the lookup is part of the transaction that saves
            # the message (ChatSession.accept).
            looked = message.chat_id is None
            if looked:
                previous = await self.store.chats.find_client_message(
                    visitor.id, message.client_message_id
                )
                if previous is not None:
                    return await self._resend(message, previous, sender)
            try:
                return await self._carry_out(visitor, message, text, sender, address)
            except AlreadySent as sent:
                return await self._resend(message, sent.previous, sender)
            except ChatError:
                if looked:
                    raise
                # Refused before its lookup (a full queue, a limit, a rewrite that no
                # longer applies): a resend of a message accepted earlier is re-sent
                # instead, as if it had been looked up first.
                previous = await self.store.chats.find_client_message(
                    visitor.id, message.client_message_id
                )
                if previous is None:
                    raise
                return await self._resend(message, previous, sender)

    async def _carry_out(
        self, visitor: Visitor, message: wire.Chat, text: str, sender: Subscriber, address: str
    ) -> str:
        who = Who(visitor.id, address, visitor.anonymous)
        counted = False
        if message.chat_id is None:
            # Checked before anything is counted: an unknown persona or post costs no turn.
            persona = self._new_chat_persona(message)
            # Counted before the chat exists: a refused message creates no chat (it was
            # looked up first, so it is no resend).
            await self._admissible(who, None)
            await self._count(who, None)
            counted = True
            session = await self._new_chat(visitor, message, persona, text, sender)
            replaces: Sequence[MessageRecord] = ()
        elif await self._forwarded(visitor, message, sender, address):
            return message.chat_id
        else:
            session, replaces = await self._join(visitor, message, who)
        if message.regenerate is not None:
            # The question is asked again as it was.
            text = replaces[0].text
        record = await self._accept(session, message, text, visitor, who, replaces, counted=counted)
        if not session.watched_by(sender):
            # The sender always hears about its own message, from it on.
            session.subscribe(
                sender, after_seq=record.seq_start - 1, request_id=None, announce=False
            )
        return session.chat.id

    def _everywhere(self, visitor: Visitor) -> contextlib.AbstractAsyncContextManager[None]:
        """With several instances, the visitor's lock is held across all of them."""
        if self.cluster is None:
            return contextlib.nullcontext()
        return self.cluster.visitor_lock(visitor.id)

    async def _forwarded(
        self, visitor: Visitor, message: wire.Chat, sender: Subscriber, address: str
    ) -> bool:
        """A message to a chat another instance owns goes to that owner, which admits,
        saves and runs it; the sender hears about it here. False: it is this instance's."""
        assert message.chat_id is not None
        if self.cluster is None:
            return False
        session = await self._session(visitor, message.chat_id)
        # Twice at most: an owner that does not answer (it died) has its lease lapse soon,
        # and then this instance, or whichever took the chat over, runs the message.
        for attempt in range(2):
            session = await self.cluster.claim(session, self.sessions)
            if not self.cluster.follows(session):
                return False
            _check_same_chat(session.chat, message)
            if attempt == 0:
                previous = await self.store.chats.find_client_message(
                    visitor.id, message.client_message_id
                )
                if previous is not None:
                    raise AlreadySent(previous)
            if not session.watched_by(sender):
                session.subscribe(
                    sender, after_seq=session.last_seq, request_id=None, announce=False
                )
            try:
                await self.cluster.forward_chat(
                    session.chat.id, visitor.id, visitor.anonymous, message, address
                )
                return True
            except OwnerGone as gone:
                if attempt == 0:
                    # While the dead owner's lease runs out, this instance's agent process
                    # for the chat starts (resuming its transcript): it is likely to run
                    # the message. (Used only if the chat does not run elsewhere first.)
                    session.engine.prepare(
                        session.chat.id,
                        session.persona,
                        policy.model_id(self.settings, self.model_for(session.chat, visitor)),
                    )
                if attempt == 0 and await self.cluster.lapsed(session.chat.id, gone.holder):
                    session = await self._session(visitor, message.chat_id)
                    continue
                exc = unreachable()
            except ForwardRefused as refused:
                exc = refused
            raise ChatError(
                exc.code,
                exc.message,
                session.chat.id,
                retryable=exc.retryable,
                retry_after=exc.retry_after,
            )
        raise AssertionError("unreachable")  # pragma: no cover

    async def take_forwarded(
        self, visitor_id: str, anonymous: bool, message: wire.Chat, address: str
    ) -> None:
        """Carry out a `chat` that reached another instance, for a chat this one owns (its
        sender holds the visitor's lock there)."""
        assert message.chat_id is not None
        visitor = Visitor(id=visitor_id, anonymous=anonymous)
        who = Who(visitor_id, address, anonymous)
        session, replaces = await self._join(visitor, message, who)
        if self.cluster is not None and self.cluster.follows(session):
            raise ChatError(
                "busy", "This chat just moved to another instance. Try again.", retryable=True
            )
        # A regenerate asks the question again as it was.
        text = replaces[0].text if message.regenerate is not None else message.text.strip()
        try:
            await self._accept(session, message, text, visitor, who, replaces)
        except AlreadySent:
            # (Its sender looked it up first, under the visitor's lock on every instance.)
            raise ChatError(
                "bad_request", "This clientMessageId was already used.", session.chat.id
            ) from None

    def _new_chat_persona(self, message: wire.Chat) -> Persona:
        """The persona a new chat's message asks for, once it and its post are known."""
        persona = self._persona(message.persona)
        if message.post is not None and self.blog.post(message.post) is None:
            raise ChatError("bad_request", f"There is no post {message.post!r}.")
        return persona

    async def _new_chat(
        self,
        visitor: Visitor,
        message: wire.Chat,
        persona: Persona,
        text: str,
        sender: Subscriber,
    ) -> ChatSession:
        model = message.model or policy.default_for(persona, anonymous=visitor.anonymous)
        # The engine may have an agent process started ahead for such a chat: its id.
        chat_id = self.engine.new_chat_id(persona, policy.model_id(self.settings, model))
        try:
            chat = await self.store.chats.create_chat(
                ChatRecord(
                    id=chat_id,
                    owner_id=visitor.id,
                    title=title_for(text),
                    persona=persona.id,
                    model=model,
                    created_by=message.client_message_id,
                    post_slug=message.post,
                )
            )
        except BaseException:
            # The chat does not exist: nothing the engine prepared for it may linger.
            await self.engine.release(chat_id)
            raise
        session = await self.sessions.open(chat, created=True)
        sender.deliver(
            wire.ChatCreated(
                chat_id=chat.id,
                client_message_id=message.client_message_id,
                model=model,
                persona=persona.id,
                request_id=message.request_id,
            ).to_json()
        )
        session.subscribe(sender, after_seq=session.last_seq, request_id=None, announce=False)
        return session

    async def _join(
        self, visitor: Visitor, message: wire.Chat, who: Who
    ) -> tuple[ChatSession, Sequence[MessageRecord]]:
        """The chat's session for a message to it, and the messages it replaces (a
        regenerate or an edit: checked before the message is counted against any limit)."""
        assert message.chat_id is not None
        session = await self._session(visitor, message.chat_id)
        chat = session.chat
        _check_same_chat(chat, message)
        replaces: list[MessageRecord] = []
        if message.regenerate is not None or message.edit is not None:
            try:
                replaces = session.rewrite(regenerate=message.regenerate, edit=message.edit)
            except ValueError as exc:
                raise ChatError("bad_request", str(exc), chat.id) from None
        await self._admissible(who, session)
        return session, replaces

    async def _admissible(self, who: Who, session: ChatSession | None) -> None:
        """Refuse a message the chat or the visitor may not take now (counting nothing: a
        message is counted when it is saved, see `_accept`)."""
        chat_id = session.chat.id if session is not None else None
        refusal = session.admits() if session is not None else None
        if refusal == "queue_full":
            raise ChatError("queue_full", QUEUE_FULL, chat_id, retryable=True)
        if refusal == "chat_too_long":
            raise ChatError("chat_too_long", CHAT_TOO_LONG, chat_id)
        if self.quotas is None:
            return
        try:
            await self.quotas.check(who)
        except QuotaExceeded as exc:
            raise _refusal(exc, chat_id) from None

    async def _count(self, who: Who, chat_id: str | None) -> None:
        """Count a message's turn against the rates (refused if they allow none now)."""
        if self.quotas is None:
            return
        try:
            await self.quotas.count(who)
        except QuotaExceeded as exc:
            raise _refusal(exc, chat_id) from None

    async def _accept(
        self,
        session: ChatSession,
        message: wire.Chat,
        text: str,
        visitor: Visitor,
        who: Who,
        replaces: Sequence[MessageRecord] = (),
        *,
        counted: bool = False,
    ) -> MessageRecord:
        """Save the message and queue its turn (AlreadySent: it was sent before). Unless
        it was `counted` already, its turn is counted against the visitor's and address's
        rates in the same transaction, once the message is known to be new: a resend is
        never counted."""
        chat_id = session.chat.id

        async def count() -> None:
            await self._count(who, chat_id)

        model = message.model or self.model_for(session.chat, visitor)
        try:
            return await session.accept(
                client_message_id=message.client_message_id,
                text=text,
                model_alias=model,
                model_id=policy.model_id(self.settings, model),
                anonymous=visitor.anonymous,
                address=who.address,
                replaces=replaces,
                admit=None if self.quotas is None or counted else count,
            )
        except RewriteRefused as exc:
            raise ChatError("bad_request", str(exc), chat_id) from None
        except DuplicateClientMessage:
            raise ChatError(
                "bad_request", "This clientMessageId was already used.", chat_id
            ) from None
        except SessionClosed:
            raise ChatError("not_found", "This chat no longer exists.", chat_id) from None

    async def _resend(
        self, message: wire.Chat, previous: MessageRecord, sender: Subscriber
    ) -> str | None:
        """A repeated clientMessageId: re-send the original answers, start nothing."""
        chat = await self.store.chats.get_chat(previous.chat_id)
        if chat is None:
            raise ChatError("not_found", "This chat no longer exists.", previous.chat_id)
        if message.chat_id is not None and message.chat_id != chat.id:
            raise ChatError(
                "bad_request",
                "This clientMessageId was already used in another chat.",
                message.chat_id,
            )
        if chat.created_by == message.client_message_id:
            sender.deliver(
                wire.ChatCreated(
                    chat_id=chat.id,
                    client_message_id=message.client_message_id,
                    model=chat.model,
                    persona=chat.persona,
                    request_id=message.request_id,
                ).to_json()
            )
            session = await self.sessions.open(chat)
            if not session.watched_by(sender):
                # Replayed from the user message on: the sender missed everything since.
                session.subscribe(
                    sender, after_seq=previous.seq_start - 1, request_id=None, announce=False
                )
                return chat.id
        sender.deliver(user_message_event(previous).to_json())
        return None

    async def answer_waiting(self) -> int:
        """At start-up: the messages that were acknowledged but still waiting for their turn
        when the server stopped (a crash, a restart) are answered now, in order. Returns how
        many."""
        waiting = await self.store.chats.unanswered()
        by_chat: dict[str, list[Waiting]] = {}
        for item in waiting:
            by_chat.setdefault(item.message.chat_id, []).append(item)
        for chat_id, items in by_chat.items():
            chat = await self.store.chats.get_chat(chat_id)
            if chat is None:
                continue
            session = await self.sessions.open(chat)
            if self.cluster is not None and self.cluster.follows(session):
                continue  # Its owner, another live instance, has them.
            model = chat.model
            session.enqueue(
                *(
                    PendingTurn(
                        item.message,
                        model,
                        policy.model_id(self.settings, model),
                        anonymous=not item.registered,
                    )
                    for item in items
                )
            )
        return len(waiting)

    # --- changing ---------------------------------------------------------------------

    async def rename(self, visitor: Visitor, chat_id: str, title: str) -> wire.ChatInfo:
        """Give a chat a new title."""
        await self.own(visitor, chat_id)
        await self.store.chats.update_chat(chat_id, title=title)
        updated = await self.store.chats.get_chat(chat_id)
        if updated is None:
            raise ChatError("not_found", NO_SUCH_CHAT, chat_id)
        # With several instances, the chat's owner tells every reader.
        if self.cluster is None or not await self.cluster.changed_elsewhere(chat_id):
            session = self.sessions.get(chat_id)
            if session is not None:
                session.update_chat(updated)
        return chat_info(updated)

    async def delete(self, visitor: Visitor, chat_id: str) -> None:
        """Delete a chat and its transcript; a running turn is stopped first, and the
        chat's subscribers are told."""
        chat = await self.own(visitor, chat_id)
        if self.cluster is not None:
            # Wherever the chat runs: its owner deletes it and tells every instance.
            try:
                await self.cluster.delete(chat)
            except SessionClosed:
                return  # deleted meanwhile
            except ForwardRefused as exc:
                raise ChatError(exc.code, exc.message, chat_id, retryable=exc.retryable) from None
            return
        session = self.sessions.get(chat_id)
        await self.sessions.close(chat_id)
        await self.store.chats.delete_chat(chat_id)
        if session is not None:
            session.deleted()

    # --- rules ------------------------------------------------------------------------

    def model_for(self, chat: ChatRecord, visitor: Visitor) -> wire.ModelAlias:
        """The chat's model, if its visitor may use it (a chat that was on another model
        while its owner was signed in goes on with the default)."""
        if not policy.allowed(chat.model, anonymous=visitor.anonymous):
            return policy.DEFAULT_MODEL
        return chat.model

    def _persona(self, persona_id: str | None) -> Persona:
        if persona_id is None:
            return self.personas.default
        if persona_id not in self.personas:
            raise ChatError("persona_unknown", f"There is no persona {persona_id!r}.")
        return self.personas[persona_id]

    async def _session(self, visitor: Visitor, chat_id: str) -> ChatSession:
        chat = await self.own(visitor, chat_id)
        try:
            return await self.sessions.open(chat)
        except SessionClosed:
            # Deleted on another instance while this one opened it.
            raise ChatError("not_found", NO_SUCH_CHAT, chat_id) from None


def _refusal(exc: QuotaExceeded, chat_id: str | None) -> ChatError:
    return ChatError(exc.code, exc.message, chat_id, retryable=True, retry_after=exc.retry_after)


def _check_same_chat(chat: ChatRecord, message: wire.Chat) -> None:
    """A message to an existing chat may not change its persona or its post."""
    if message.persona is not None and message.persona != chat.persona:
        raise ChatError(
            "persona_locked",
            "A chat keeps the persona it started with. Start a new chat to switch.",
            chat.id,
        )
    if message.post is not None and message.post != chat.post_slug:
        raise ChatError("bad_request", "A chat's post is set when the chat is created.", chat.id)


def title_for(text: str, limit: int = 60) -> str:
    """A chat title from its first message: the first line, cut at a word."""
    line = " ".join(text.split())
    if len(line) <= limit:
        return line
    cut = line[:limit].rsplit(" ", 1)[0] or line[:limit]
    return cut.rstrip(",.;:!?") + "…"


def snippet_of(text: str, query: str, width: int = 120) -> str:
    """About `width` characters of `text` around the first place it contains `query`
    (ignoring case), cut at words, with an ellipsis where it was cut."""
    line = " ".join(text.split())
    at = line.lower().find(query.lower())
    if at < 0 or len(line) <= width:
        return line[:width] + ("…" if len(line) > width else "")
    start = max(0, at - (width - len(query)) // 2)
    end = min(len(line), start + width)
    start = max(0, end - width)
    if start > 0:
        start = line.find(" ", start, at) + 1 or start
    if end < len(line):
        end = line.rfind(" ", at + len(query), end) if " " in line[at + len(query) : end] else end
    return ("…" if start > 0 else "") + line[start:end].strip() + ("…" if end < len(line) else "")

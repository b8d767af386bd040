"""This instance among several: the chats it owns (their leases kept alive), the chats it
follows (their live channels), and its inbox, where other instances forward the commands
(`chat`, `stop`, a rename, a deletion) for the chats it owns.

One pub/sub connection carries every channel this instance listens to; a follower waits for
its channel's subscription to be confirmed before it reads the log, so no event can fall
between the read and the live feed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Collection
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio
from redis.asyncio.client import PubSub
from redis.asyncio.lock import Lock
from redis.exceptions import LockError

from blogchat import policy
from blogchat import protocol as wire
from blogchat.cluster.bus import Bus, Holder, Lease, Listed
from blogchat.cluster.commands import Commands, ForwardRefused, OwnerGone, unreachable
from blogchat.cluster.sessions import (
    FollowerSession,
    OwnedSession,
    cut_answers,
    starting_record,
)
from blogchat.cluster.slots import RedisSlots
from blogchat.eventlog import MemoryEventLog
from blogchat.ratelimit import redis_pool
from blogchat.session import ChatSession, ChatSessions, PendingTurn, SessionClosed
from blogchat.settings import Settings
from blogchat.store import STREAMING, ChatRecord, Store

log = logging.getLogger(__name__)

# How long a forwarded `chat` may take to be acknowledged by the owner.
FORWARD_TIMEOUT = 10.0
# How often a sender whose owner died looks whether its lease lapsed.
LAPSE_POLL_SECONDS = 0.1
# How long a resume on a follower may wait for the events its reader saw on the owner.
CATCH_UP_SECONDS = 1.0
# How long a reader's message may wait for the same reader's previous one, on any instance.
VISITOR_LOCK_SECONDS = 30.0
MOVED = "This chat just moved to another instance. Try again."
# The most lapsed leases one sweep looks at.
SWEEP_BATCH = 100


class ClusterNode:
    """This instance's part in a cluster of instances sharing Redis and PostgreSQL."""

    def __init__(self, settings: Settings, store: Store) -> None:
        assert settings.redis_url is not None
        self.settings = settings
        self.instance = settings.instance_id
        self.lease_seconds = settings.chat_lease_seconds
        # Named, so that an operator (or a test) can tell its connections apart.
        name = "".join(c if c.isalnum() or c in "-_.:" else "_" for c in self.instance)
        # (400 WebSockets opening at once on one instance, each counting itself under the
        # shared caps, emptied redis-py's default pool.)
        pool = redis_pool(
            settings.redis_url,
            settings.redis_max_connections,
            decode_responses=True,
            client_name=f"blogchat:{settings.redis_prefix}:{name}",
        )
        self.client = redis.asyncio.Redis.from_pool(pool)
        self.bus = Bus(
            self.client,
            settings.redis_prefix,
            instance=self.instance,
            lease_seconds=settings.chat_lease_seconds,
        )
        # A visitor's running turns and open WebSockets, counted across instances; a dead
        # instance's lapse as its chats' leases do.
        self.running_turns = RedisSlots(
            self.client,
            settings.redis_prefix,
            "turns",
            instance=self.instance,
            ttl_seconds=settings.chat_lease_seconds,
            announce=True,
        )
        self.open_connections = RedisSlots(
            self.client,
            settings.redis_prefix,
            "connections",
            instance=self.instance,
            ttl_seconds=settings.chat_lease_seconds,
            announce=False,
        )
        self.store = store
        self.owned: dict[str, OwnedSession] = {}
        self.followed: dict[str, FollowerSession] = {}
        self._sessions: ChatSessions | None = None
        self._commands: Commands | None = None
        self._pubsub: PubSub = self.client.pubsub()
        self._confirmations: dict[str, list[asyncio.Future[None]]] = {}
        self._replies: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._listener: asyncio.Task[None] | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._taking_over: set[str] = set()
        self._giving_up: set[str] = set()
        # Chats being deleted here: their leases are kept until they are gone everywhere.
        self._deleting: set[str] = set()
        # Followed channels to read back once subscribed again (after a lost connection).
        self._stale: set[str] = set()
        # Leases the sweeper took, for the session it opens with each.
        self._claimed: dict[str, Lease] = {}
        # Leases taken whose sessions are still opening (reading the database, which on a
        # loaded machine can take longer than a lease lasts): renewed with the owned ones.
        self._opening: dict[str, Lease] = {}

    # --- life -------------------------------------------------------------------------

    async def start(self, sessions: ChatSessions, commands: Commands) -> None:
        """Listen to this instance's inbox and keep the leases of its chats alive."""
        self._sessions = sessions
        self._commands = commands
        await self._pubsub.subscribe(self.bus.inbox(self.instance), self.bus.everyone())
        self._listener = asyncio.create_task(self._listen(), name="cluster-listener")
        self._renewer = asyncio.create_task(self._renew_forever(), name="cluster-leases")
        await self.running_turns.start()
        await self.open_connections.start()

    async def aclose(self) -> None:
        """Stop listening and close the connections (after the sessions closed)."""
        for task in (self._listener, self._renewer, *self._tasks):
            if task is not None:
                task.cancel()
        for task in (self._listener, self._renewer, *self._tasks):
            if task is not None:
                with contextlib.suppress(BaseException):
                    await task
        with contextlib.suppress(Exception):
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]
        await self.running_turns.aclose()
        await self.open_connections.aclose()
        await self.client.aclose()

    # --- placing a chat's session (session.Placement) ---------------------------------

    async def open(self, chat: ChatRecord, sessions: ChatSessions) -> ChatSession:
        """The chat's session here: the owner's if nobody holds its lease, else a
        follower of the instance that does."""
        fresh = await self.store.chats.get_chat(chat.id) or chat
        claim = self._claimed.pop(chat.id, None) or await self.bus.acquire(
            chat.id, floor=fresh.last_seq, fence_floor=fresh.lease_fence
        )
        if isinstance(claim, Lease):
            self._opening[chat.id] = claim
            try:
                # Read again under the lease: a chat's last owner deletes it before it lets
                # the lease go, so a chat still here now is not being deleted.
                if await self.store.chats.get_chat(chat.id) is None:
                    raise SessionClosed(chat.id)
                return await self._own(fresh, claim, sessions)
            except BaseException:
                await self.bus.release(claim)
                raise
            finally:
                if self._opening.get(chat.id) is claim:
                    del self._opening[chat.id]
        return await self._follow(fresh, sessions)

    def fence_of(self, chat_id: str) -> int | None:
        """The token this instance holds for a chat it owns; None for any other chat."""
        session = self.owned.get(chat_id)
        return None if session is None else session.lease.fence

    def follows(self, session: ChatSession) -> bool:
        """Whether the session mirrors a chat another instance owns."""
        return isinstance(session, FollowerSession)

    async def catch_up(self, session: ChatSession, after_seq: int | None) -> None:
        """Before a follower answers a resume from `after_seq`: let it receive the events up
        to there first, if they are on their way (briefly: a made-up seq costs little)."""
        if (
            after_seq is not None
            and isinstance(session, FollowerSession)
            and after_seq > session.last_seq
        ):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CATCH_UP_SECONDS):
                    await session.catch_up(after_seq)

    async def claim(self, session: ChatSession, sessions: ChatSessions) -> ChatSession:
        """A follower whose chat nobody owns any more becomes the owner, its readers kept;
        one this instance took over meanwhile (its owner died) is that owner's session."""
        if not self.follows(session):
            return session
        holder = await self.bus.holder(session.chat.id)
        if holder is None:
            return await sessions.reopen(session.chat.id) or session
        if holder.instance == self.instance:
            return await sessions.open(session.chat)
        return session

    async def _own(self, chat: ChatRecord, lease: Lease, sessions: ChatSessions) -> ChatSession:
        # First the database's token: from here on an earlier owner (paused, not dead)
        # saves nothing more, so the rows read below are all it left.
        await self.store.chats.claim(chat.id, lease.fence)
        # The log so far is kept here too, so a reader moving to this instance resumes
        # exactly from it. It ends at the last event any reader was sent: the session
        # continues right after it.
        read = await self.bus.read(chat.id)
        top = lease.seq
        memory = MemoryEventLog(read.events[0][0] - 1 if read.events else top)
        for seq, frame in read.events:
            memory.append(seq, frame)
        history = await self.store.chats.get_messages(chat.id)
        cuts = cut_answers(read.events, history, chat.id, top)
        cut_ids = {cut.id for cut, _ in cuts}
        # Answers left streaming by an owner that died long before (their events trimmed
        # from the log, or lost with it).
        stale = [m for m in history if m.status == STREAMING and m.id not in cut_ids]
        if stale:
            await self.store.chats.mark_incomplete([m.id for m in stale])
            for message in stale:
                message.status = "incomplete"
        session = OwnedSession(
            starting_record(chat, top),
            history,
            lease=lease,
            bus=self.bus,
            memory=memory,
            on_lost=self._lost,
            on_closed=self._released,
            **sessions.session_options(),
        )
        self.owned[chat.id] = session
        try:
            # A message saved and acknowledged to nobody yet: the dead owner's last act.
            unpublished = [m for m in history if m.role == "user" and m.seq_start > top]
            if unpublished:
                await session.republish(unpublished)
            for cut, streamed in cuts:
                log.warning("chat %s: taken over from a dead owner mid-answer", chat.id)
                await session.end_cut_answer(cut, streamed)
        except BaseException:
            await session.close()
            raise
        # Messages acknowledged but not answered yet (their owner died, or stopped with
        # them waiting) are answered here, in order.
        waiting = await self.store.chats.unanswered(chat.id)
        if waiting:
            session.enqueue(
                *(
                    PendingTurn(
                        item.message,
                        chat.model,
                        policy.model_id(self.settings, chat.model),
                        anonymous=not item.registered,
                    )
                    for item in waiting
                )
            )
        return session

    async def _follow(self, chat: ChatRecord, sessions: ChatSessions) -> ChatSession:
        follower = FollowerSession(
            chat,
            [],
            bus=self.bus,
            fill=self._fill,
            on_stop=self._stop_elsewhere,
            on_closed=self._unfollow,
            on_deleted=self._deleted_elsewhere,
            on_new_epoch=self._rebuild,
            **sessions.session_options(),
        )
        channel = self.bus.channel(chat.id)
        self.followed[channel] = follower
        try:
            await self._subscribe(channel)
            read = await self.bus.read(chat.id)
            # Read after the log's top: every message published by then is saved.
            rows = await self.store.chats.get_messages(chat.id)
            top = read.top if read.epoch is not None else chat.last_seq
            follower.load(read.epoch, top, read.events, rows)
        except BaseException:
            await self._unfollow(follower)
            raise
        return follower

    async def _released(self, session: OwnedSession) -> None:
        if session.chat.id in self._deleting:
            return  # (given up once the chat is gone: `_delete_owned`)
        if self.owned.get(session.chat.id) is session:
            del self.owned[session.chat.id]
        try:
            await self.bus.release(session.lease)
        except Exception:
            log.exception("chat %s: could not release its lease", session.chat.id)

    async def _unfollow(self, follower: FollowerSession) -> None:
        channel = self.bus.channel(follower.chat.id)
        if self.followed.get(channel) is follower:
            del self.followed[channel]
            with contextlib.suppress(Exception):
                await self._pubsub.unsubscribe(channel)

    def _deleted_elsewhere(self, follower: FollowerSession) -> None:
        """The chat's owner deleted it (its readers here were told): the follower goes."""

        async def close() -> None:
            sessions = self._sessions
            if sessions is not None and sessions.get(follower.chat.id) is follower:
                await sessions.close(follower.chat.id)  # (closed already: only forgotten)
            await self._unfollow(follower)

        self._spawn(close())

    def _rebuild(self, follower: FollowerSession) -> None:
        """The chat's log was lost and started again (a new epoch): what the follower
        mirrored may have ended otherwise (a running answer cut off and saved by its owner
        as it gave the chat up). Its session is reopened, as an owner's is when it loses
        its lease: rebuilt from the new log and the saved messages, its readers given the
        history."""
        sessions = self._sessions

        async def rebuild() -> None:
            if sessions is not None and sessions.get(follower.chat.id) is follower:
                await sessions.reopen(follower.chat.id)
                log.warning("chat %s: rebuilt here after its log was lost", follower.chat.id)

        self._spawn(rebuild())

    def _lost(self, chat_id: str) -> None:
        """Another instance holds the chat now: this one must stop speaking for it."""
        session = self.owned.get(chat_id)
        if session is None or self._sessions is None or chat_id in self._giving_up:
            return
        log.error("chat %s: lease lost; reopening its session here", chat_id)
        self._giving_up.add(chat_id)
        self._spawn(self._give_up(chat_id, self._sessions))

    async def _give_up(self, chat_id: str, sessions: ChatSessions) -> None:
        # Reopened: its readers here go on with whichever session the chat gets now (a
        # follower of the new owner, or the owner again if nobody holds it).
        try:
            await sessions.reopen(chat_id)
        finally:
            self._giving_up.discard(chat_id)
        log.warning("chat %s: given up here after losing its lease", chat_id)

    def _fill(self, follower: FollowerSession) -> None:
        async def fill() -> None:
            read = await self.bus.read(follower.chat.id, follower.last_seq)
            follower.filled(read.epoch, read.events)

        self._spawn(fill())

    # --- leases -----------------------------------------------------------------------

    async def _renew_forever(self) -> None:
        """Every third of the lease: renew what this instance owns first (all of it in one
        round trip, so a busy machine does not let leases lapse one after another while
        it works down a list), then look after the chats it follows and the lapsed ones.
        The ticks keep their rhythm: the time a round takes comes off the next wait."""
        loop = asyncio.get_running_loop()
        period = self.lease_seconds / 3
        due = loop.time()
        while True:
            due = max(due + period, loop.time())
            await asyncio.sleep(due - loop.time())
            await self._renew_owned()
            await self._check_followed()
            try:
                await self._sweep()
            except Exception:
                log.exception("the sweep of lapsed leases failed")

    async def _renew_owned(self) -> None:
        owned = list(self.owned.items())
        opening = [(c, lease) for c, lease in self._opening.items() if c not in self.owned]
        if not owned and not opening:
            return
        leases = [session.lease for _, session in owned] + [lease for _, lease in opening]
        try:
            renewed = await self.bus.renew_all(leases)
        except Exception:
            log.exception("could not renew the leases of %d chats", len(leases))
            return
        for (chat_id, session), kept in zip(owned, renewed[: len(owned)], strict=True):
            # (A session given up meanwhile is no longer this instance's to lose.)
            if not kept and self.owned.get(chat_id) is session:
                self._lost(chat_id)
        for (chat_id, _), kept in zip(opening, renewed[len(owned) :], strict=True):
            if not kept:
                # Its session, once open, finds its writes refused and gives the chat up.
                log.warning("chat %s: lease lapsed while its session was opening", chat_id)

    async def _check_followed(self) -> None:
        """A chat followed here whose lease lapsed (its owner died or hangs) is taken
        over: its readers here must not wait forever. One whose log has a new epoch (Redis
        lost it, and an owner took the chat again) is rebuilt, even if the new owner
        publishes nothing: its readers here may be waiting for an answer that ended."""
        # (The epoch each had before the round trip, if it was loaded: one loaded meanwhile
        # is newer than the answer.)
        followers = [
            (follower, None if follower.filling else follower.epoch)
            for follower in list(self.followed.values())
        ]
        chat_ids = [follower.chat.id for follower, _ in followers]
        try:
            found = await self.bus.holders_and_epochs(chat_ids)
        except Exception:
            log.exception("could not check the leases of %d followed chats", len(chat_ids))
            return
        for (follower, epoch), (holder, current) in zip(followers, found, strict=True):
            chat_id = follower.chat.id
            if holder is None:
                if chat_id not in self._taking_over:
                    self._spawn(self._take_over(chat_id))
            elif (
                epoch is not None
                and current != epoch
                and follower.epoch == epoch
                and not follower.filling
            ):
                follower.new_epoch()

    async def _sweep(self) -> None:
        """Chats whose owner died with nobody reading them here: the first instance to find
        one's lease lapsed takes it over (the lease's token decides which), so its cut
        answer ends and its waiting messages are answered, whoever watches."""
        for listed in await self.bus.lapsed(SWEEP_BATCH):
            holder = await self.bus.holder(listed.chat_id)
            if holder is not None and holder.instance == listed.instance:
                continue  # Late to renew (or paused): its lease decides.
            # (A chat followed here is taken over by `_check_followed`.)
            sessions = self._sessions
            if holder is None and sessions is not None and sessions.get(listed.chat_id) is None:
                if listed.chat_id not in self._taking_over:
                    # Off the renewals' way: a takeover reads and writes the database.
                    self._taking_over.add(listed.chat_id)
                    self._spawn(self._adopt(listed, sessions))
                continue
            await self.bus.forget(listed)

    async def _adopt(self, listed: Listed, sessions: ChatSessions) -> None:
        chat_id = listed.chat_id
        try:
            chat = await self.store.chats.get_chat(chat_id)
            claim = None
            if chat is not None:  # (Not deleted meanwhile.)
                claim = await self.bus.acquire(
                    chat_id, floor=chat.last_seq, fence_floor=chat.lease_fence
                )
            if chat is not None and isinstance(claim, Lease):
                log.warning("chat %s: its owner's lease lapsed; taking it over", chat_id)
                self._claimed[chat_id] = claim
                try:
                    await sessions.open(chat)
                finally:
                    unused = self._claimed.pop(chat_id, None)
                    if unused is not None:
                        # The chat was opened here meanwhile, with a lease of its own.
                        await self.bus.release(unused)
            # Taken over, here or by another instance first: off the list. (A failure
            # leaves it there, for the next sweep.)
            await self.bus.forget(listed)
        finally:
            self._taking_over.discard(chat_id)

    async def _take_over(self, chat_id: str) -> None:
        if self._sessions is None:
            return
        self._taking_over.add(chat_id)
        try:
            session = self._sessions.get(chat_id)
            if isinstance(session, FollowerSession):
                await self._sessions.reopen(chat_id)
        finally:
            self._taking_over.discard(chat_id)

    async def lapsed(self, chat_id: str, holder: Holder | None) -> bool:
        """Wait, at most a lease's length, for the chat's lease to lapse (`holder` is not
        listening: it died) or for the chat to be taken over meanwhile, by this instance
        or another; whether either happened."""
        if holder is not None and holder.instance == self.instance:
            return True
        return await self.bus.outlived(
            chat_id, holder, within=self.lease_seconds + 1, poll=LAPSE_POLL_SECONDS
        )

    async def held(self, chat_ids: Collection[str]) -> set[str]:
        """Which of these chats some live instance holds now."""
        held = set()
        for chat_id in chat_ids:
            if await self.bus.holder(chat_id) is not None:
                held.add(chat_id)
        return held

    # --- readers, across instances ----------------------------------------------------

    @asynccontextmanager
    async def visitor_lock(self, visitor_id: str) -> AsyncIterator[None]:
        """Held while one reader's message is checked and saved, on whichever instance.

        It is given back in a task of its own, queued behind what the saved message set
        going (its turn taking a place, its event on the way to the shared log): those are
        on the way to the first token, and a reader's next message is seldom that quick
        (it would wait a few milliseconds)."""
        lock = self.client.lock(
            f"{self.bus.prefix}:vlock:{visitor_id}",
            timeout=VISITOR_LOCK_SECONDS,
            sleep=0.005,
            blocking_timeout=VISITOR_LOCK_SECONDS,
        )
        # (What `async with lock` does, but for the release.)
        if not await lock.acquire():
            raise LockError("Unable to acquire lock within the time specified")
        try:
            yield
        finally:
            self._spawn(self._unlock(lock))

    @staticmethod
    async def _unlock(lock: Lock) -> None:
        try:
            await lock.release()
        except LockError:
            log.warning("a reader's lock was no longer held when given back")

    # --- forwarded commands -----------------------------------------------------------

    async def forward_chat(
        self, chat_id: str, visitor_id: str, anonymous: bool, message: wire.Chat, address: str
    ) -> None:
        """Have the chat's owner carry out a `chat`; returns once it saved the message."""
        command = {
            "op": "chat",
            "visitor": visitor_id,
            "anonymous": anonymous,
            "address": address,
            "message": message.model_dump(mode="json", by_alias=True),
        }
        await self._request(chat_id, command)

    async def changed_elsewhere(self, chat_id: str) -> bool:
        """The chat's row changed (a rename). If another instance owns the chat, it tells
        every reader (`chat_updated`, in its place among the chat's events): True. False:
        this instance owns the chat, or nobody does, and tells its own readers."""
        try:
            await self._request(chat_id, {"op": "updated", "chat": chat_id})
        except OwnerGone:
            return False
        except ForwardRefused as refused:
            log.warning("chat %s: its owner did not announce a change: %s", chat_id, refused)
            return False
        return True

    async def delete(self, chat: ChatRecord) -> None:
        """Delete a chat wherever it runs: its owner ends the running turn, deletes the
        chat while it still holds the lease, and tells every reader on every instance."""
        assert self._sessions is not None
        sessions = self._sessions
        for _ in range(2):
            here = sessions.get(chat.id)
            if here is None or self.follows(here):
                try:
                    await self._request(chat.id, {"op": "delete", "chat": chat.id})
                    return
                except OwnerGone as gone:
                    # Nobody holds the chat, or its owner died: this instance takes it
                    # (once the dead owner's lease lapsed) and deletes it itself, or
                    # asks whichever took it over meanwhile.
                    if not await self.lapsed(chat.id, gone.holder):
                        raise unreachable() from None
            session = await self.claim(await sessions.open(chat), sessions)
            if not self.follows(session):
                await self._delete_owned(chat.id)
                return
        raise unreachable()

    async def _delete_owned(self, chat_id: str) -> None:
        assert self._sessions is not None
        session = self._sessions.get(chat_id)
        if not isinstance(session, OwnedSession):
            raise ForwardRefused("busy", MOVED, True)
        lease = session.lease
        self._deleting.add(chat_id)
        try:
            # The running turn ends (`done`), and the shared log has it before the notice.
            await self._sessions.close(chat_id)
            await self.store.chats.delete_chat(chat_id)
            notice = session.deleted()
            await self.bus.say(lease, session.last_seq, notice)
            # What the chat's events said leaves Redis too.
            await self.bus.trim(lease, session.last_seq + 1)
        finally:
            self._deleting.discard(chat_id)
            if self.owned.get(chat_id) is session:
                del self.owned[chat_id]
            await self.bus.release(lease)

    def chats_moved(self, from_owner: str, to_owner: str) -> None:
        """An anonymous visitor's chats now belong to an account: the sessions of every
        instance hear it (they keep their chat's owner)."""
        command = {"op": "moved", "from": from_owner, "to": to_owner}
        self._spawn(self.client.publish(self.bus.everyone(), json.dumps(command)))

    async def _request(self, chat_id: str, command: dict[str, Any]) -> None:
        """Send a command to the chat's owner and wait for its answer. Raises OwnerGone
        (nobody else holds the chat, or nobody listens where it is held) or
        ForwardRefused (refused, or no answer)."""
        holder = await self.bus.holder(chat_id)
        if holder is None or holder.instance == self.instance:
            raise OwnerGone(chat_id, holder)
        request = str(uuid.uuid4())
        reply: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[request] = reply
        command = {**command, "id": request, "from": self.instance}
        try:
            if not await self.client.publish(self.bus.inbox(holder.instance), json.dumps(command)):
                raise OwnerGone(chat_id, holder)
            try:
                answer = await asyncio.wait_for(reply, FORWARD_TIMEOUT)
            except TimeoutError:
                raise unreachable() from None
        finally:
            self._replies.pop(request, None)
        refusal = answer.get("error")
        if refusal is not None:
            raise ForwardRefused(
                refusal["code"], refusal["message"], refusal["retryable"], refusal["retryAfter"]
            )

    def _stop_elsewhere(self, chat_id: str) -> None:
        async def stop() -> None:
            holder = await self.bus.holder(chat_id)
            if holder is not None and holder.instance != self.instance:
                command = {"op": "stop", "chat": chat_id}
                await self.client.publish(self.bus.inbox(holder.instance), json.dumps(command))

        self._spawn(stop())

    async def _take(self, command: dict[str, Any]) -> None:
        match command.get("op"):
            case "stop":
                session = self.owned.get(str(command.get("chat")))
                if session is not None:
                    session.stop()
            case "chat":
                await self._answer(command, self._take_chat(command))
            case "delete":
                await self._answer(command, self._delete_owned(str(command.get("chat"))))
            case "updated":
                await self._answer(command, self._updated(str(command.get("chat"))))
            case "reply":
                reply = self._replies.get(str(command.get("id")))
                if reply is not None and not reply.done():
                    reply.set_result(command)
            case other:
                log.warning("unknown forwarded command %r", other)

    async def _take_chat(self, command: dict[str, Any]) -> None:
        assert self._commands is not None
        message = wire.parse_client_message(json.dumps(command["message"]))
        assert isinstance(message, wire.Chat)
        await self._commands.take_forwarded(
            command["visitor"], bool(command["anonymous"]), message, command["address"]
        )

    async def _updated(self, chat_id: str) -> None:
        """Another instance changed the row of a chat owned here: tell every reader."""
        session = self.owned.get(chat_id)
        chat = await self.store.chats.get_chat(chat_id)
        if session is not None and chat is not None:
            session.update_chat(chat)

    async def _answer(self, command: dict[str, Any], work: Awaitable[None]) -> None:
        """Carry out a forwarded command, and answer its sender: done, or why not."""
        error: dict[str, Any] | None = None
        try:
            await work
        except Exception as exc:
            code = getattr(exc, "code", None)
            if not isinstance(code, str):
                log.exception("a forwarded %s failed", command.get("op"))
                code, text = "internal", "Something went wrong on our side. Try again."
            else:
                text = getattr(exc, "message", str(exc))
            error = {
                "code": code,
                "message": text,
                "retryable": bool(getattr(exc, "retryable", code == "internal")),
                "retryAfter": getattr(exc, "retry_after", None),
            }
        reply = {"op": "reply", "id": command["id"], "error": error}
        await self.client.publish(self.bus.inbox(str(command["from"])), json.dumps(reply))

    # --- the pub/sub connection -------------------------------------------------------

    async def _subscribe(self, channel: str) -> None:
        confirmed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._confirmations.setdefault(channel, []).append(confirmed)
        await self._pubsub.subscribe(channel)
        await asyncio.wait_for(confirmed, 10)

    async def _listen(self) -> None:
        inbox = self.bus.inbox(self.instance)
        while True:
            try:
                async for message in self._pubsub.listen():
                    self._dispatch(inbox, message)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("the cluster's pub/sub connection failed; listening again")
                await asyncio.sleep(0.5)

    def _dispatch(self, inbox: str, message: dict[str, Any]) -> None:
        kind, channel, data = message["type"], message["channel"], message["data"]
        if kind == "subscribe":
            confirmations = self._confirmations.pop(channel, [])
            for confirmed in confirmations:
                if not confirmed.done():
                    confirmed.set_result(None)
            follower = self.followed.get(channel)
            if not confirmations and follower is not None:
                # Subscribed again, unasked: the connection was lost, and redis-py
                # reconnected. What was published meanwhile is read from the log.
                log.warning(
                    "chat %s: its live channel is back; reading what it missed", follower.chat.id
                )
                follower.resync()
        elif kind != "message":
            return
        elif channel == inbox:
            try:
                command = json.loads(data)
            except ValueError:
                log.warning("unreadable forwarded command")
                return
            self._spawn(self._take(command))
        elif channel == self.bus.everyone():
            self._hear_everyone(data)
        else:
            follower = self.followed.get(channel)
            if follower is not None:
                follower.receive(Bus.parse_live(data))

    def _hear_everyone(self, data: str) -> None:
        try:
            command = json.loads(data)
        except ValueError:
            log.warning("unreadable message to every instance")
            return
        if not isinstance(command, dict) or command.get("op") != "moved":
            return
        from_owner, to_owner = command.get("from"), command.get("to")
        sessions = self._sessions
        if isinstance(from_owner, str) and isinstance(to_owner, str) and sessions is not None:
            sessions.chats_moved(from_owner, to_owner)

    def _spawn(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("cluster task failed", exc_info=task.exception())

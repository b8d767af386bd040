"""The live agent processes, one per active chat, within a cap.

Each chat keeps its CLI process between turns, so later turns cost tens of milliseconds
instead of a process start. A process is about 200 MB, so at most `cap` of them are alive
(starting and closing ones included). When a chat needs a process and the cap is reached,
the least recently used idle process is closed first; when every process is running a
turn, the chat waits for one to finish. Processes idle for `idle_seconds` are closed.
A closed chat's context is not lost: its next process resumes the transcript from the store.

Spares are processes started ahead, under a fresh id, for chats that do not exist yet: a
new chat that fits one takes the spare's id as its own (`claim_spare`), and its first
answer does not wait for a process start. Spares only use room under the cap that nobody
is waiting for, are the first to go when a chat needs room, and are never reclaimed for
being idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar

from blogchat.engines.claude.process import AgentSpec, ProcessState

log = logging.getLogger(__name__)

# How long a process that is being closed may take before it is killed.
CLOSE_GRACE = 2.0
# How long a start may take (the SDK's own handshake timeout is 60 s).
START_TIMEOUT = 60.0
# After a spare failed to start, how long before another is tried.
SPARE_BACKOFF = 30.0
# After a new chat takes a spare, the spare's replacement waits until that chat's first
# turn is over, or this long at most: starting a CLI costs a few hundred ms of CPU, and a
# start racing the first turn delayed its first token by 100-400 ms on two cores
# (tests/test_first_answer.py).
SPARE_HOLD = 5.0


class StartFailed(Exception):
    """The CLI process could not be started."""


class Member(Protocol):
    """What the pool needs of a process (an `AgentProcess`, or a test's stand-in)."""

    spec: AgentSpec
    state: ProcessState
    retire: bool
    spare: bool
    last_used: float
    start_error: BaseException | None

    @property
    def alive(self) -> bool: ...

    @property
    def pid(self) -> int | None: ...

    async def start(self) -> None: ...

    async def settle(self, within: float) -> bool: ...

    async def close(self, *, grace: float) -> None: ...

    def kill(self) -> None: ...


P = TypeVar("P", bound=Member)
SpareSpec = Callable[[], AgentSpec]


class ProcessPool(Generic[P]):
    """Agent processes by chat id, least recently used first."""

    def __init__(
        self,
        launch: Callable[[AgentSpec], P],
        *,
        cap: int,
        idle_seconds: float,
        parallel_starts: int,
        spares: int = 0,
        spare_spec: SpareSpec | None = None,
        spare_hold: float = SPARE_HOLD,
    ) -> None:
        self._launch = launch
        self.cap = cap
        self.idle_seconds = idle_seconds
        self.spares = spares if spare_spec is not None else 0
        self._spare_spec = spare_spec
        self._spares_paused_until = 0.0
        self.spare_hold = spare_hold
        # Chats that took a spare and whose first turn may still run: until when each
        # holds off the spare's replacement.
        self._holds: dict[str, float] = {}
        # Chats waiting for room under the cap: while any waits, no spare is started.
        self._waiting = 0
        self._by_chat: dict[str, P] = {}
        self._closing: set[P] = set()
        self._changed = asyncio.Condition()
        # Starting a CLI is CPU-bound: starting many at once only makes each one slower.
        self._starts = asyncio.Semaphore(parallel_starts)
        self._tasks: set[asyncio.Task[object]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False
        self.peak = 0
        self.started = 0

    # --- accounting ---------------------------------------------------------------------

    @property
    def live(self) -> int:
        """Processes that exist now: starting, idle, busy or closing."""
        return len(self._by_chat) + len(self._closing)

    def processes(self) -> list[P]:
        """Every process of the pool, the closing ones included."""
        return [*self._by_chat.values(), *self._closing]

    def get(self, chat_id: str) -> P | None:
        """The chat's process, if it has one."""
        return self._by_chat.get(chat_id)

    @property
    def spare_count(self) -> int:
        """Spares that exist now, starting or ready."""
        return sum(1 for process in self._by_chat.values() if process.spare)

    # --- spares -------------------------------------------------------------------------

    def start_spares(self) -> None:
        """Start the spares (in the background) and keep them topped up from now on."""
        if self.spares:
            self._start_sweeper()
            self._top_up()

    def prestart(self, spec: AgentSpec) -> bool:
        """Start a chat's process ahead of its next turn, only in room nobody waits for."""
        if (
            not self._free_room()
            or spec.chat_id in self._by_chat
            or self._closing_for(spec.chat_id)
        ):
            return False
        self._start_sweeper()
        self._launch_in_background(spec)
        return True

    def claim_spare(self, fits: Callable[[AgentSpec], bool]) -> str | None:
        """Hand a spare that `fits` to a new chat: returns the chat id it was started under."""
        for process in list(self._by_chat.values()):
            if not process.spare or process.retire or not fits(process.spec):
                continue
            if process.state is ProcessState.IDLE and not process.alive:
                continue  # Died while waiting; the sweep closes it.
            if process.state not in (ProcessState.STARTING, ProcessState.IDLE):
                continue
            process.spare = False
            process.last_used = time.monotonic()
            chat_id = process.spec.chat_id
            self._by_chat[chat_id] = self._by_chat.pop(chat_id)
            # The replacement starts when this chat's first turn is over (`give_back`), or
            # once the hold runs out.
            self._holds[chat_id] = time.monotonic() + self.spare_hold
            asyncio.get_running_loop().call_later(self.spare_hold, self._top_up)
            return chat_id
        return None

    # --- taking and giving back ---------------------------------------------------------

    async def acquire(self, spec: AgentSpec) -> P:
        """The chat's process, ready and marked busy; started (or resumed) if need be."""
        if self._closed:
            raise StartFailed("the engine is shut down")
        self._start_sweeper()
        launched: P | None = None
        async with self._changed:
            while True:
                if self._closed:
                    raise StartFailed("the engine is shut down")
                if launched is not None and launched.start_error is not None:
                    raise StartFailed(str(launched.start_error)) from launched.start_error
                process = self._by_chat.get(spec.chat_id)
                if process is not None and process.state is ProcessState.IDLE:
                    if process.spec == spec and process.alive:
                        process.state = ProcessState.BUSY
                        # Most recently used goes last.
                        self._by_chat[spec.chat_id] = self._by_chat.pop(spec.chat_id)
                        return process
                    # A new model (or persona text): a new process resumes the transcript.
                    self._retire(process)
                    continue
                if process is None and not self._closing_for(spec.chat_id):
                    # (A closing process of this chat may still be flushing its transcript,
                    # which the new one resumes from.)
                    if self.live < self.cap:
                        launched = self._launch_in_background(spec)
                    elif (victim := self._least_recently_used_idle()) is not None:
                        log.info(
                            "reclaiming the idle agent process of chat %s", victim.spec.chat_id
                        )
                        self._retire(victim)
                        # Wait until it is gone, so the cap holds.
                needs_room = process is None
                self._waiting += needs_room
                try:
                    await self._changed.wait()
                finally:
                    self._waiting -= needs_room

    async def give_back(self, process: P) -> None:
        """A turn finished cleanly: the process is ready for the chat's next turn."""
        if process.retire or self._closed or not process.alive:
            await self.discard(process)
            return
        async with self._changed:
            process.state = ProcessState.IDLE
            process.last_used = time.monotonic()
            if self._holds.pop(process.spec.chat_id, None) is not None:
                self._top_up()
            self._changed.notify_all()

    async def discard(self, process: P) -> None:
        """Close a process (broken, or no longer wanted) in the background."""
        async with self._changed:
            self._retire(process)

    def recover(
        self,
        process: P,
        within: float,
        on_lost: Callable[[P], None] | None = None,
    ) -> None:
        """A turn was cut off: get the process back to idle in the background, or close it
        (calling `on_lost` first)."""
        self._spawn(
            self._recover(process, within, on_lost), f"agent-recover-{process.spec.chat_id}"
        )

    async def _recover(
        self,
        process: P,
        within: float,
        on_lost: Callable[[P], None] | None,
    ) -> None:
        settled = False
        with contextlib.suppress(Exception):
            settled = await process.settle(within)
        if settled:
            await self.give_back(process)
        else:
            if on_lost is not None:
                on_lost(process)
            await self.discard(process)

    async def gone(self, chat_id: str) -> None:
        """Wait until the chat has no process at all, not even one still closing."""
        async with self._changed:
            await self._changed.wait_for(
                lambda: chat_id not in self._by_chat and not self._closing_for(chat_id)
            )

    async def forget(self, chat_id: str) -> None:
        """The chat's session closed: close its process (after its turn, if one runs)."""
        async with self._changed:
            process = self._by_chat.get(chat_id)
            if process is None:
                return
            process.retire = True
            if process.state is ProcessState.IDLE:
                self._retire(process)

    # --- idle reclaim -------------------------------------------------------------------

    async def sweep(self) -> int:
        """Close processes idle for longer than `idle_seconds`; returns how many."""
        now = time.monotonic()
        async with self._changed:
            idle = [
                process
                for process in self._by_chat.values()
                if process.state is ProcessState.IDLE
                and (
                    (process.spare and not process.alive)
                    or (not process.spare and now - process.last_used >= self.idle_seconds)
                )
            ]
            for process in idle:
                self._retire(process)
            self._top_up()
        return len(idle)

    def _start_sweeper(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_forever(), name="agent-sweeper")

    async def _sweep_forever(self) -> None:
        interval = max(0.5, min(30.0, self.idle_seconds / 4))
        while True:
            try:
                if await self.sweep():
                    log.debug("closed idle agent processes; %d live", self.live)
            except Exception:
                log.exception("agent process sweep failed")
            await asyncio.sleep(interval)

    # --- shutdown -----------------------------------------------------------------------

    async def aclose(self, grace: float = 8.0) -> None:
        """Close every process; those that do not exit in time are killed."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        async with self._changed:
            for process in list(self._by_chat.values()):
                self._retire(process)
        # Starts and closes under way, and the closes they lead to (a process that was
        # still starting is closed once its start is over).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self._tasks and (left := deadline - loop.time()) > 0:
            await asyncio.wait(list(self._tasks), timeout=left)
        if self._tasks:
            for process in self.processes():
                process.kill()
            await asyncio.wait(list(self._tasks), timeout=2)
        for process in self.processes():
            if process.alive:
                log.error("agent process %s survived shutdown", process.pid)

    # --- internals (called with the condition's lock held) ------------------------------

    def _closing_for(self, chat_id: str) -> bool:
        return any(process.spec.chat_id == chat_id for process in self._closing)

    def _least_recently_used_idle(self) -> P | None:
        # A spare goes first (even one still starting), then the least recently used.
        for process in self._by_chat.values():
            if process.spare and not process.retire:
                return process
        for process in self._by_chat.values():
            if process.state is ProcessState.IDLE:
                return process
        return None

    def _free_room(self) -> bool:
        """Whether a process may start that no chat asked for: room under the cap that no
        chat is waiting for."""
        return not self._closed and not self._waiting and self.live < self.cap

    def _top_up(self) -> None:
        """Start spares while there are too few and free room."""
        now = time.monotonic()
        if self._spare_spec is None or now < self._spares_paused_until:
            return
        self._holds = {
            chat_id: until
            for chat_id, until in self._holds.items()
            if until > now and chat_id in self._by_chat
        }
        if self._holds:
            return  # a first turn runs on a spare just taken: its replacement waits
        while self.spare_count < self.spares and self._free_room():
            process = self._launch_in_background(self._spare_spec())
            process.spare = True

    def _launch_in_background(self, spec: AgentSpec) -> P:
        process = self._launch(spec)
        self._by_chat[spec.chat_id] = process
        self.peak = max(self.peak, self.live)
        # The start runs in a task of its own: a turn that stops waiting for it leaves no
        # half-started CLI behind, and the process is ready for the chat's next turn.
        self._spawn(self._start(process), f"agent-start-{spec.chat_id}")
        return process

    async def _start(self, process: P) -> None:
        try:
            async with self._starts:
                await asyncio.wait_for(process.start(), START_TIMEOUT)
        except Exception as exc:
            log.exception("chat %s: the agent process did not start", process.spec.chat_id)
            async with self._changed:
                if process.spare:
                    self._spares_paused_until = time.monotonic() + SPARE_BACKOFF
                process.start_error = exc
                process.state = ProcessState.IDLE
                self._retire(process)
                self._changed.notify_all()
            return
        async with self._changed:
            self.started += 1
            if process.state is ProcessState.STARTING:
                process.state = ProcessState.IDLE
                process.last_used = time.monotonic()
                if self._closed or process.retire:
                    self._retire(process)
            self._changed.notify_all()

    def _retire(self, process: P) -> None:
        if process.state is ProcessState.STARTING:
            # Closed as soon as its start is over.
            process.retire = True
            return
        if self._by_chat.get(process.spec.chat_id) is process:
            del self._by_chat[process.spec.chat_id]
        if process.state in (ProcessState.CLOSING, ProcessState.CLOSED):
            return
        process.state = ProcessState.CLOSING
        self._closing.add(process)
        self._spawn(self._close(process), f"agent-close-{process.spec.chat_id}")

    async def _close(self, process: P) -> None:
        try:
            await process.close(grace=CLOSE_GRACE)
        finally:
            async with self._changed:
                self._closing.discard(process)
                self._top_up()
                self._changed.notify_all()

    def _spawn(self, coro: Awaitable[object], name: str) -> None:
        task: asyncio.Task[object] = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

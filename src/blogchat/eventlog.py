"""A chat's event log (for exact resume) and fan-out (to its subscribers).

Both sit behind small interfaces so that the in-memory versions here can be swapped for
shared ones (e.g. a Redis Stream and pub/sub) when several instances serve one blog.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator, Sequence
from typing import Protocol

# The most events a chat's log keeps (and so the longest replay a resume can ask for).
MAX_LOG_EVENTS = 50_000


class EventLog(Protocol):
    """The serialized transcript events of one chat, by seq."""

    def append(self, seq: int, frame: str) -> None:
        """Add the next event (seqs arrive in increasing order)."""

    def since(self, after_seq: int) -> list[str] | None:
        """Every event with seq > after_seq, or None if some of them are no longer kept."""

    def trim(self, before_seq: int) -> None:
        """Forget the events with seq < before_seq."""


class Subscriber(Protocol):
    """Something that receives a chat's frames, e.g. a WebSocket connection."""

    def deliver(self, frame: str) -> None:
        """Queue a frame for sending; must not block."""

    def replay(self, frames: Sequence[str]) -> None:
        """Queue frames replayed from the log on resume; must not block."""


class Fanout(Protocol):
    """The subscribers of one chat."""

    def add(self, subscriber: Subscriber) -> None:
        """Start delivering to a subscriber."""

    def discard(self, subscriber: Subscriber) -> None:
        """Stop delivering to a subscriber (no error if it was not there)."""

    def publish(self, frame: str) -> None:
        """Deliver a frame to every subscriber."""

    def clear(self) -> None:
        """Stop delivering to anyone."""

    def __contains__(self, subscriber: object) -> bool:
        """Whether a subscriber gets the frames."""

    def __len__(self) -> int:
        """How many subscribers there are."""

    def __iter__(self) -> Iterator[Subscriber]:
        """The subscribers, in the order they subscribed."""


class MemoryEventLog:
    """An EventLog in this process's memory, bounded in size."""

    def __init__(self, last_seq: int, *, max_events: int = MAX_LOG_EVENTS) -> None:
        # Events up to last_seq happened before this log existed: they cannot be replayed.
        self._floor = last_seq + 1
        self._seqs: list[int] = []
        self._frames: list[str] = []
        self._max_events = max_events

    def append(self, seq: int, frame: str) -> None:
        """Add the next event."""
        if self._seqs and seq <= self._seqs[-1]:
            raise ValueError(f"seq {seq} is not after {self._seqs[-1]}")
        if not self._seqs and seq < self._floor:
            raise ValueError(f"seq {seq} is before the log's start {self._floor}")
        self._seqs.append(seq)
        self._frames.append(frame)
        if len(self._seqs) > self._max_events:
            self.trim(self._seqs[len(self._seqs) - self._max_events])

    def since(self, after_seq: int) -> list[str] | None:
        """Every event after `after_seq`, or None if the log no longer reaches back that far."""
        last = self._seqs[-1] if self._seqs else self._floor - 1
        if after_seq >= last:
            return [] if after_seq == last else None
        if after_seq + 1 < self._floor:
            return None
        return self._frames[bisect_right(self._seqs, after_seq) :]

    def trim(self, before_seq: int) -> None:
        """Forget events before `before_seq`."""
        cut = bisect_right(self._seqs, before_seq - 1)
        if cut:
            del self._seqs[:cut]
            del self._frames[:cut]
        self._floor = max(self._floor, before_seq)

    def __len__(self) -> int:
        return len(self._seqs)


class MemoryFanout:
    """A Fanout to subscribers in this process, in the order they subscribed."""

    def __init__(self) -> None:
        self._subscribers: dict[Subscriber, None] = {}

    def add(self, subscriber: Subscriber) -> None:
        """Start delivering to a subscriber."""
        self._subscribers[subscriber] = None

    def discard(self, subscriber: Subscriber) -> None:
        """Stop delivering to a subscriber."""
        self._subscribers.pop(subscriber, None)

    def publish(self, frame: str) -> None:
        """Deliver to everyone; a subscriber may unsubscribe while we iterate."""
        for subscriber in list(self._subscribers):
            subscriber.deliver(frame)

    def clear(self) -> None:
        """Stop delivering to anyone."""
        self._subscribers.clear()

    def __contains__(self, subscriber: object) -> bool:
        return subscriber in self._subscribers

    def __len__(self) -> int:
        return len(self._subscribers)

    def __iter__(self) -> Iterator[Subscriber]:
        return iter(list(self._subscribers))

"""The in-memory event log and fan-out, in process."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from blogchat.eventlog import MemoryEventLog, MemoryFanout


def test_since_replays_exactly_the_events_after_a_seq() -> None:
    log = MemoryEventLog(last_seq=10)
    for seq in range(11, 16):
        log.append(seq, f"e{seq}")
    assert log.since(12) == ["e13", "e14", "e15"]
    assert log.since(15) == []
    assert log.since(10) == ["e11", "e12", "e13", "e14", "e15"]
    # Before the log began, or beyond its end: it cannot say, the caller sends history.
    assert log.since(9) is None
    assert log.since(16) is None


def test_seqs_must_increase_and_not_start_before_the_log() -> None:
    log = MemoryEventLog(last_seq=3)
    with pytest.raises(ValueError, match="before the log's start"):
        log.append(3, "old")
    log.append(4, "e4")
    with pytest.raises(ValueError, match="not after"):
        log.append(4, "again")


def test_trim_and_the_size_cap_forget_the_oldest_events() -> None:
    log = MemoryEventLog(last_seq=0, max_events=5)
    for seq in range(1, 9):
        log.append(seq, f"e{seq}")
    assert len(log) == 5
    assert log.since(3) == ["e4", "e5", "e6", "e7", "e8"]
    assert log.since(2) is None
    log.trim(7)
    assert log.since(6) == ["e7", "e8"]
    assert log.since(5) is None


class Collector:
    def __init__(self, fanout: MemoryFanout | None = None) -> None:
        self.frames: list[str] = []
        self.fanout = fanout

    def deliver(self, frame: str) -> None:
        self.frames.append(frame)
        if self.fanout is not None:
            self.fanout.discard(self)

    def replay(self, frames: Sequence[str]) -> None:
        self.frames.extend(frames)


def test_the_fanout_delivers_to_each_subscriber_once_even_if_one_leaves_meanwhile() -> None:
    fanout = MemoryFanout()
    staying, leaving = Collector(), Collector(fanout)
    fanout.add(staying)
    fanout.add(leaving)
    fanout.add(staying)
    fanout.publish("a")
    fanout.publish("b")
    assert staying.frames == ["a", "b"]
    assert leaving.frames == ["a"]
    assert staying in fanout
    assert leaving not in fanout
    fanout.clear()
    assert len(fanout) == 0

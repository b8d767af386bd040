"""Claude engine cost against its goals: memory per live agent process, first- and later-turn
overhead, and the process cap's bound on memory with many chats.

Run with `uv run python bench/bench_claude_cost.py`. It drives the real Claude engine through
`bench/bench_claude.py`'s harness (which prints the engine's cost figures on their own)
against the Anthropic test server in a process of its own, which answers at once: a turn's
time to the first token, minus that of a plain HTTP client reading the same server in the
same round (the baseline), is the engine's overhead.

- first turn: a new chat whose agent process was started ahead (a spare, the default);
  and, for comparison, a cold one whose process starts (spawn, SDK handshake) first;
- later turn: the next question on a chat whose process is running;
- memory: RSS and USS of each live CLI process;
- many chats: more chats than the process cap, at once, twice each; the peak total RSS of the
  CLI processes must stay within the cap times the largest process; after the idle time, idle
  reclaim must leave no process alive.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_claude import Bench, no_live_processes, settings_for
from bench.bench_relay import direct, direct_client
from bench.support import (
    MB,
    Row,
    anthropic_api,
    goal_row,
    info_row,
    print_rows,
    summarize,
)

BENCH = "3. claude engine"
GOAL_FIRST_MS = 100.0
GOAL_LATER_MS = 30.0


def engine_settings(base_url: str, data: Path, **overrides: Any) -> Any:
    """Engine settings against the test server at `base_url`."""
    api = SimpleNamespace(base_url=base_url)
    return settings_for(api, data, thinking_budget=0, **overrides)  # type: ignore[arg-type]


async def latencies(base_url: str, chats: int, turns: int) -> list[Row]:
    """First and later turns, each paired with a direct request of the same round."""
    first: list[float] = []
    later: list[float] = []
    starts: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-claude-cost-") as tmp:
        settings = engine_settings(base_url, Path(tmp), max_live_clients=chats)
        async with (
            Bench(settings) as bench,
            direct_client(base_url) as http,
        ):
            assert bench.engine is not None
            await direct(http)
            await bench.turn(str(uuid.uuid4()), "warm-up")  # imports, first process ever
            ids = [str(uuid.uuid4()) for _ in range(chats)]
            for chat_id in ids:  # one at a time: no start competes with another
                baseline = (await direct(http)).ttft
                ttft, _ = await bench.turn(chat_id, "first question")
                first.append(ttft - baseline)
                process = bench.engine.pool.get(chat_id)
                assert process is not None
                starts.append(process.start_seconds)
            for _ in range(turns):
                for chat_id in ids:
                    baseline = (await direct(http)).ttft
                    ttft, _ = await bench.turn(chat_id, "a later question")
                    later.append(ttft - baseline)
            memory = bench.cli_memory()
    warm = await first_turns_with_spares(base_url, chats)
    firsts, laters, started = summarize(first), summarize(later), summarize(starts)
    warms = summarize(warm)
    rss = summarize([float(size) for size, _ in memory])
    uss = summarize([float(size) for _, size in memory])
    return [
        goal_row(
            BENCH,
            "first turn overhead (new chat, spare process), p50",
            measured=warms.p50 * 1000,
            goal=GOAL_FIRST_MS,
            unit="ms",
            shown=f"{warms.p50 * 1000:.1f} ms (p99 {warms.p99 * 1000:.1f}, n={warms.n})",
        ),
        info_row(
            BENCH,
            "first turn overhead, cold (no spare: process start first)",
            f"{firsts.p50 * 1000:.0f} ms (p99 {firsts.p99 * 1000:.0f}, n={firsts.n})",
        ),
        info_row(BENCH, "of which the process start (spawn + handshake)", started.ms()),
        goal_row(
            BENCH,
            "later turn overhead (warm process), p50",
            measured=laters.p50 * 1000,
            goal=GOAL_LATER_MS,
            unit="ms",
            shown=f"{laters.p50 * 1000:.1f} ms (p99 {laters.p99 * 1000:.1f}, n={laters.n})",
        ),
        info_row(
            BENCH,
            "memory per live agent process, RSS / USS",
            f"{rss.p50 / MB:.0f} MB / {uss.p50 / MB:.0f} MB (max RSS {rss.max / MB:.0f} MB, "
            f"n={rss.n})",
        ),
    ]


async def first_turns_with_spares(base_url: str, chats: int) -> list[float]:
    """First turns of new chats that each find a spare ready, paired with direct requests."""
    overheads: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-claude-spare-") as tmp:
        settings = engine_settings(
            base_url, Path(tmp), max_live_clients=chats + 2, spare_processes=1
        )
        async with (
            Bench(settings) as bench,
            direct_client(base_url) as http,
        ):
            await direct(http)
            await bench.spare_ready()
            await bench.turn(bench.new_chat_id(), "warm-up")  # imports, first turn ever
            for _ in range(chats):
                # A reader arriving while a spare is ready (a new one starts after each).
                await bench.spare_ready()
                baseline = (await direct(http)).ttft
                chat_id = bench.new_chat_id()
                ttft, _ = await bench.turn(chat_id, "first question")
                overheads.append(ttft - baseline)
    return overheads


class PeakMemory(threading.Thread):
    """Samples the live CLI processes' RSS: the peak of their total and of any one of them."""

    def __init__(self, bench: Bench) -> None:
        super().__init__(daemon=True)
        self.bench = bench
        self.total = 0
        self.single = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.05):
            sizes = [rss for rss, _ in self.bench.cli_memory()]
            self.total = max(self.total, sum(sizes))
            self.single = max([self.single, *sizes])

    def stop(self) -> None:
        """Stop sampling."""
        self._done.set()
        self.join()


async def many_chats(base_url: str, chats: int, cap: int, idle: float) -> list[Row]:
    """Peak CLI memory for `chats` chats at once, with no cap and with `cap`."""
    peaks: dict[str, float] = {}
    largest = 0.0
    reclaimed = True
    reclaim_seconds = 0.0
    for label, limit in (("none", chats), ("cap", cap)):
        with tempfile.TemporaryDirectory(prefix="bench-claude-cap-") as tmp:
            settings = engine_settings(
                base_url, Path(tmp), max_live_clients=limit, client_idle_seconds=idle
            )
            async with Bench(settings) as bench:
                assert bench.engine is not None
                sampler = PeakMemory(bench)
                sampler.start()
                try:
                    ids = [str(uuid.uuid4()) for _ in range(chats)]
                    for question in ("a question", "a follow-up"):
                        await asyncio.gather(*(bench.turn(chat_id, question) for chat_id in ids))
                    started = time.monotonic()
                    try:
                        await no_live_processes(bench.engine, within=idle + 30)
                    except RuntimeError:
                        reclaimed = False
                    reclaim_seconds = time.monotonic() - started
                finally:
                    sampler.stop()
                peaks[label] = sampler.total
                largest = max(largest, sampler.single)
    bound = cap * largest
    return [
        goal_row(
            BENCH,
            f"{chats} chats, 2 turns each, cap {cap}: peak CLI RSS / (cap × largest process)",
            measured=peaks["cap"] / bound if bound else float("inf"),
            goal=1.0,
            unit="",
            shown=f"{peaks['cap'] / MB:.0f} MB / {bound / MB:.0f} MB "
            f"(no cap: {peaks['none'] / MB:.0f} MB)",
            note="the cap counts processes starting and closing too, so it is a hard bound",
        ),
        Row(
            bench=BENCH,
            metric=f"idle reclaim: live processes {idle:g} s after the last turn",
            goal="0",
            measured="0" if reclaimed else "some",
            passed=reclaimed,
            note=f"all gone {reclaim_seconds:.1f} s after the last turn ended",
        ),
    ]


async def measure(
    base_url: str, chats: int, turns: int, many: int, cap: int, idle: float
) -> list[Row]:
    """Both parts, against the test server at `base_url`."""
    rows = await latencies(base_url, chats, turns)
    rows += await many_chats(base_url, many, cap, idle)
    return rows


def main(argv: list[str] | None = None) -> list[Row]:
    """Parse arguments, run, print; returns the rows for the runner."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--chats", type=int, default=6, help="chats for the latency figures")
    parser.add_argument("--turns", type=int, default=5, help="later turns per chat")
    parser.add_argument("--many", type=int, default=12, help="chats for the memory bound")
    parser.add_argument("--cap", type=int, default=4, help="process cap for the memory bound")
    parser.add_argument("--idle", type=float, default=3.0, help="idle reclaim, in seconds")
    parser.add_argument("--quick", action="store_true", help="fewer chats and turns")
    args = parser.parse_args(argv)
    if args.quick:
        args.chats, args.turns, args.many = 3, 3, 8
    with anthropic_api(tokens=20) as base_url:
        rows = asyncio.run(
            measure(base_url, args.chats, args.turns, args.many, args.cap, args.idle)
        )
    print_rows("Claude engine cost", rows)
    return rows


if __name__ == "__main__":
    main()

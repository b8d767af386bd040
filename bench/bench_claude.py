"""What one live agent process costs: memory, start time, and time to the first token.

Run with `uv run python bench/bench_claude.py`. It drives the real Claude engine (the SDK and
its bundled CLI) against the local Anthropic test server, which answers at once, so the
latencies are the engine's and the CLI's own overhead, not a model's.

Measured:
- per process: RSS and USS of the CLI, and the time to start it (spawn + SDK handshake);
- first turn of a new chat: from run_turn() to the first token, process start included;
- later turns on a live process: the same, without the start;
- a resumed chat (its process was reclaimed): the start loads the transcript from the store;
- many chats: total CLI memory with and without the process cap and idle reclaim.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.anthropic_server import AnthropicTestServer, EchoResponder  # noqa: E402

from blogchat.app import load_content  # noqa: E402
from blogchat.engines.base import TextDelta, TurnEnded, TurnRequest  # noqa: E402
from blogchat.engines.claude import ClaudeEngine  # noqa: E402
from blogchat.settings import Settings  # noqa: E402
from blogchat.store import Store  # noqa: E402
from blogchat.store.transcripts import TranscriptStore  # noqa: E402

MB = 1024 * 1024


def settings_for(api: AnthropicTestServer, data: Path, **overrides: Any) -> Settings:
    """Engine settings pointing at the test server, with a SQLite store in `data`."""
    values: dict[str, Any] = {
        "data_dir": data,
        "content_dir": REPO / "content",
        "personas_file": REPO / "config" / "personas.yaml",
        "anthropic_api_key": "bench-key",
        "anthropic_base_url": api.base_url,
        "provider_retries": 0,
        "log_level": "WARNING",
        # Chats are started by id here; bench_claude_cost.py measures the spares.
        "spare_processes": 0,
        **overrides,
    }
    return Settings(_env_file=None, **values)


@contextmanager
def engine_running(api: AnthropicTestServer, **overrides: Any) -> Iterator[Any]:
    """A fresh engine, store and content on a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="bench-claude-") as tmp:
        settings = settings_for(api, Path(tmp), **overrides)
        yield settings


class Bench:
    """An engine with helpers to run timed turns."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.content = load_content(settings)
        self.store: Store | None = None
        self.engine: ClaudeEngine | None = None

    async def __aenter__(self) -> Bench:
        self.store = await Store.open(self.settings.database)
        self.engine = ClaudeEngine(
            self.settings,
            self.content.tools,
            TranscriptStore(self.store.db),
            spare_persona=self.content.personas.default,
        )
        self.engine.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.engine is not None
        assert self.store is not None
        await self.engine.aclose()
        await self.store.close()

    async def spare_ready(self, within: float = 60.0) -> None:
        """Wait until a spare process has started."""
        assert self.engine is not None
        pool = self.engine.pool
        for _ in range(int(within / 0.01)):
            if any(p.spare and p.state.value == "idle" for p in pool.processes()):
                return
            await asyncio.sleep(0.01)
        raise RuntimeError("no spare process started")

    def new_chat_id(self) -> str:
        """The id the engine gives a new chat of the default persona (a spare's, if ready)."""
        assert self.engine is not None
        persona = self.content.personas.default
        return self.engine.new_chat_id(persona, self.settings.model_haiku)

    async def turn(self, chat_id: str, text: str) -> tuple[float, float]:
        """Seconds to the first token and to the end of one turn."""
        assert self.engine is not None
        request = TurnRequest(
            chat_id=chat_id,
            text=text,
            persona=self.content.personas.default,
            model_alias="haiku",
            model_id=self.settings.model_haiku,
        )
        started = time.perf_counter()
        first: float | None = None
        async for event in self.engine.run_turn(request, asyncio.Event()):
            if isinstance(event, TextDelta) and first is None:
                first = time.perf_counter() - started
            if isinstance(event, TurnEnded) and event.reason != "complete":
                raise RuntimeError(f"turn ended {event.reason}")
        assert first is not None
        return first, time.perf_counter() - started

    def cli_memory(self) -> list[tuple[int, int]]:
        """RSS and USS (bytes) of every live CLI process."""
        assert self.engine is not None
        sizes = []
        for process in self.engine.pool.processes():
            if process.pid is None or not process.alive:
                continue
            try:
                info = psutil.Process(process.pid).memory_full_info()
            except psutil.NoSuchProcess:
                continue
            sizes.append((info.rss, info.uss))
        return sizes


class MemorySampler(threading.Thread):
    """Samples the total RSS of the live CLI processes, keeping the peak."""

    def __init__(self, bench: Bench) -> None:
        super().__init__(daemon=True)
        self.bench = bench
        self.peak = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.05):
            self.peak = max(self.peak, sum(rss for rss, _ in self.bench.cli_memory()))

    def stop(self) -> None:
        """Stop sampling."""
        self._done.set()
        self.join()


async def no_live_processes(engine: ClaudeEngine, within: float) -> None:
    """Wait until the engine has closed every process."""
    for _ in range(int(within / 0.02)):
        if not engine.pool.live:
            return
        await asyncio.sleep(0.02)
    raise RuntimeError("processes still alive")


def ms(values: list[float]) -> str:
    """Median and max in milliseconds."""
    if not values:
        return "-"
    return f"{statistics.median(values) * 1000:7.0f} ms (max {max(values) * 1000:.0f})"


async def per_process(api: AnthropicTestServer, chats: int, turns: int) -> list[tuple[str, str]]:
    """Costs of single processes: start, first and later turns, resume, memory."""
    rows: list[tuple[str, str]] = []
    with engine_running(api, max_live_clients=chats) as settings:
        async with Bench(settings) as bench:
            assert bench.engine is not None
            ids = [str(uuid.uuid4()) for _ in range(chats)]
            first_turns, starts, later = [], [], []
            for chat_id in ids:  # One at a time: no start competes with another.
                first, _ = await bench.turn(chat_id, "first question")
                first_turns.append(first)
                process = bench.engine.pool.get(chat_id)
                assert process is not None
                starts.append(process.start_seconds)
            for _ in range(turns):
                for chat_id in ids:
                    first, _ = await bench.turn(chat_id, "a later question")
                    later.append(first)
            memory = bench.cli_memory()
            for chat_id in ids:
                await bench.engine.release(chat_id)
            await no_live_processes(bench.engine, within=15)
            resumed = []
            for chat_id in ids:
                first, _ = await bench.turn(chat_id, "after a reclaim")
                resumed.append(first)
    rss = [size for size, _ in memory]
    uss = [size for _, size in memory]
    rows += [
        ("CLI processes measured", f"{len(memory)}"),
        ("RSS per process", f"{statistics.median(rss) / MB:7.0f} MB (max {max(rss) / MB:.0f})"),
        ("USS per process", f"{statistics.median(uss) / MB:7.0f} MB (max {max(uss) / MB:.0f})"),
        ("process start (spawn + handshake)", ms(starts)),
        ("first turn: run_turn → first token", ms(first_turns)),
        ("later turn: run_turn → first token", ms(later)),
        ("resumed chat: run_turn → first token", ms(resumed)),
    ]
    return rows


async def many_chats(api: AnthropicTestServer, chats: int, cap: int) -> list[tuple[str, str]]:
    """Total CLI memory for many chats at once, without and with the cap and idle reclaim."""
    rows: list[tuple[str, str]] = []
    for label, limit in (("no cap", chats), (f"cap {cap}", cap)):
        # Idle long enough not to be reclaimed between a chat's two turns.
        with engine_running(api, max_live_clients=limit, client_idle_seconds=5.0) as settings:
            async with Bench(settings) as bench:
                assert bench.engine is not None
                sampler = MemorySampler(bench)
                sampler.start()
                started = time.perf_counter()
                try:
                    ids = [str(uuid.uuid4()) for _ in range(chats)]
                    await asyncio.gather(*(bench.turn(chat_id, "question") for chat_id in ids))
                    await asyncio.gather(*(bench.turn(chat_id, "follow-up") for chat_id in ids))
                    elapsed = time.perf_counter() - started
                    live_after = bench.engine.pool.live
                    # Idle reclaim: everything goes after client_idle_seconds.
                    await no_live_processes(bench.engine, within=15)
                    reclaimed_in = time.perf_counter() - started - elapsed
                finally:
                    sampler.stop()
                rows.append(
                    (
                        f"{chats} chats × 2 turns, {label}",
                        f"peak CLI RSS {sampler.peak / MB:6.0f} MB, {elapsed:5.1f} s, "
                        f"{bench.engine.pool.started} starts, {live_after} live after, "
                        f"0 live {reclaimed_in:.1f} s later",
                    )
                )
    return rows


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chats", type=int, default=4, help="chats for per-process figures")
    parser.add_argument("--turns", type=int, default=5, help="later turns per chat")
    parser.add_argument("--many", type=int, default=12, help="chats for the memory test")
    parser.add_argument("--cap", type=int, default=4, help="process cap for the memory test")
    args = parser.parse_args()
    with AnthropicTestServer(default=EchoResponder()) as api:
        rows = await per_process(api, args.chats, args.turns)
        rows += await many_chats(api, args.many, args.cap)
    cpus = psutil.cpu_count()
    print(f"\nClaude engine against the local test server ({cpus} CPUs)\n")
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


if __name__ == "__main__":
    asyncio.run(main())

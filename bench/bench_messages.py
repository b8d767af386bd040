"""The Messages engine beside the Agent SDK engine and the direct API, in one run.

Run with `uv run python bench/bench_messages.py` (options: `--help`). Every figure is paired
with its baseline, measured side by side under the same machine noise:

1. latency, in this process: the Anthropic test server (a process of its own) answers with
   500 text deltas at once; round after round, in rotating order, a plain HTTP client
   reading the stream (direct), the Messages engine and the Agent SDK engine (a warm
   chat: its CLI process is running) each take the answer. The time to the first token
   each engine adds over direct is paired by round. A second pass paces the model at 1000
   tokens/s and compares whole answers (tokens over the time from question to last token).
2. CPU per delivered token: a blogchat server in a process of its own, on each engine in
   turn, streams 20 chats at once from a model paced at 50 tokens/s
   (`bench/stamped_model.py`); the server's CPU time (its child processes' included: the
   agent CLIs) over the tokens its readers received. Each chat has had one turn before,
   so the Agent SDK engine's processes are running.
3. 200 chats at once on the Messages engine, 10 text deltas/s each (the API sends a few
   tokens a delta; 200 chats at 50 deltas/s would need more CPU than two cores have at
   the engine's cost per delta, see docs/performance.md): every token carries the
   moment the model stand-in sent it, so each reader computes the token's delay from the
   model to itself; p99 over all tokens, and every error. A direct reader of the same
   model, in the same client process, takes its own stream at the same time: its delays
   are the baseline. The server's RSS before and at its peak gives the memory each running
   chat costs.
4. the engine's HTTP transport, in this process: the Messages engine alone (no server,
   session or socket) streams 20 stamped answers at once at 50 deltas/s, round after
   round, in rotating order, on the SDK's default httpx transport and on the aiohttp one
   the engine uses: CPU per delta of this process, and each delta's delay.
5. where the engine's CPU per delta goes, in this process on uvloop (as the server runs):
   the same 20 stamped answers at once at 50 deltas/s, round after round, in rotating
   order, read five ways, each adding one layer to the one before: aiohttp reading the
   SSE lines (the floor), the SDK's raw events (`create(stream=True)`), its typed stream
   (`messages.stream()`: the message snapshot and a derived event per delta), its
   streaming tool runner, and the Messages engine.

`--compare-source CHECKOUT` measures instead figure 2 on two servers side by side, one
serving this tree and one a checkout of another revision (`git archive REV | tar -x -C
DIR`): `--compare-rounds` pairs of rounds, each on fresh servers, each tree first every other
round so that a pair shares the machine's drift. It prints each tree's median CPU per
delivered token and their paired ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import httpx
import uvloop
from anthropic import AsyncAnthropic
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_claude import Bench, settings_for
from bench.bench_concurrency import PeakMemory, open_many, visitors
from bench.bench_relay import QUESTION, Take, direct, direct_client, take
from bench.bench_relay import engine as agent_sdk_turn
from bench.support import (
    MB,
    REPO,
    Row,
    anthropic_api,
    chat_frame,
    cpu_seconds,
    goal_row,
    info_row,
    print_rows,
    process_memory,
    raise_file_limit,
    server,
    summarize,
)
from blogchat.app import load_content
from blogchat.engines.base import TextDelta, TurnEnded, TurnRequest
from blogchat.engines.messages import MessagesEngine
from blogchat.engines.messages.engine import http_client

BENCH = "7. messages engine"
GOAL_TTFT_P50_MS = 5.0
GOAL_WHOLE = 0.97
GOAL_CPU_US = 260.0
GOAL_MEMORY_MB = 1.0
GOAL_P99_MS = 50.0


# --- 1. latency ----------------------------------------------------------------------------


class MessagesBench:
    """The Messages engine in this process, as a chat session drives it."""

    def __init__(self, base_url: str, data: Path, client: AsyncAnthropic | None = None) -> None:
        api = SimpleNamespace(base_url=base_url)
        self.settings = settings_for(api, data, thinking_budget=0, engine="messages")  # type: ignore[arg-type]
        self.content = load_content(self.settings)
        self.engine = MessagesEngine(self.settings, self.content.tools, client=client)

    def request(self) -> TurnRequest:
        """A new chat's question."""
        return TurnRequest(
            chat_id=str(uuid.uuid4()),
            text=QUESTION,
            persona=self.content.personas.default,
            model_alias="haiku",
            model_id=self.settings.model_haiku,
        )

    async def turn(self) -> Take:
        """One answer, from run_turn() to its last token."""
        stamps: list[float] = []
        started = time.perf_counter()
        async for event in self.engine.run_turn(self.request(), asyncio.Event()):
            if isinstance(event, TextDelta):
                stamps.append(time.perf_counter())
            elif isinstance(event, TurnEnded) and event.reason != "complete":
                raise RuntimeError(f"messages engine turn ended {event.reason}")
        return take(started, stamps)


async def latency_rounds(base_url: str, rounds: int) -> dict[str, list[Take]]:
    """Direct, Messages engine and Agent SDK engine, in rotating order each round."""
    samples: dict[str, list[Take]] = {"direct": [], "messages": [], "agent-sdk": []}
    with tempfile.TemporaryDirectory(prefix="bench-messages-") as tmp:
        api = SimpleNamespace(base_url=base_url)
        agent_settings = settings_for(api, Path(tmp) / "agent", thinking_budget=0)  # type: ignore[arg-type]
        messages = MessagesBench(base_url, Path(tmp) / "messages")
        async with Bench(agent_settings) as agent, direct_client(base_url) as http:
            agent_chat = str(uuid.uuid4())
            # Warm up: the agent chat's process starts, every client connects once.
            await agent_sdk_turn(agent, agent_chat)
            await messages.turn()
            await direct(http)
            paths: dict[str, Callable[[], Awaitable[Take]]] = {
                "direct": lambda: direct(http),
                "messages": messages.turn,
                "agent-sdk": lambda: agent_sdk_turn(agent, agent_chat),
            }
            names = list(paths)
            for index in range(rounds):
                shift = index % len(names)
                for name in names[shift:] + names[:shift]:
                    samples[name].append(await paths[name]())
        await messages.engine.aclose()
    return samples


def latency_rows(
    unpaced: dict[str, list[Take]], paced: dict[str, list[Take]], rate: float
) -> list[Row]:
    """TTFT over direct, and whole answers paced at `rate`, for both engines."""
    rows: list[Row] = []
    for name in ("messages", "agent-sdk"):
        added = summarize(
            [e.ttft - d.ttft for e, d in zip(unpaced[name], unpaced["direct"], strict=True)]
        )
        whole = summarize(
            [e.whole / d.whole for e, d in zip(paced[name], paced["direct"], strict=True)]
        )
        if name == "messages":
            rows.append(
                goal_row(
                    BENCH,
                    "TTFT added over direct, Messages engine, p50",
                    measured=added.p50 * 1000,
                    goal=GOAL_TTFT_P50_MS,
                    unit="ms",
                    shown=f"{added.p50 * 1000:.1f} ms (p99 {added.p99 * 1000:.1f}, n={added.n})",
                )
            )
            rows.append(
                goal_row(
                    BENCH,
                    f"whole answer at {rate:g} tokens/s / direct, Messages engine",
                    measured=whole.p50,
                    goal=GOAL_WHOLE,
                    unit="",
                    shown=f"{whole.p50:.3f} p50 (n={whole.n})",
                    higher_is_better=True,
                )
            )
        else:
            rows.append(
                info_row(
                    BENCH,
                    "TTFT added over direct, Agent SDK engine (warm chat)",
                    f"{added.p50 * 1000:.1f} / {added.p99 * 1000:.1f} ms p50 / p99",
                )
            )
            rows.append(
                info_row(
                    BENCH,
                    f"whole answer at {rate:g} tokens/s / direct, Agent SDK engine",
                    f"{whole.p50:.3f} p50",
                )
            )
    for name, takes in unpaced.items():
        ttft = summarize([t.ttft for t in takes])
        rows.append(info_row(BENCH, f"{name}: TTFT, 500 tokens unpaced", ttft.ms()))
    return rows


# --- 4. the engine's HTTP transport ---------------------------------------------------------


def httpx_client(base_url: str) -> AsyncAnthropic:
    """A client on the SDK's default transport (httpx), otherwise as the engine makes its."""
    return AsyncAnthropic(api_key="bench-key", base_url=base_url, max_retries=0, timeout=120)


async def stamped_turn(bench: MessagesBench) -> list[float]:
    """One stamped answer through the engine: each delta's delay from the model."""
    delays: list[float] = []
    async for event in bench.engine.run_turn(bench.request(), asyncio.Event()):
        if isinstance(event, TextDelta):
            received = time.monotonic()
            delays += [received - float(stamp) for stamp in event.text.split()]
        elif isinstance(event, TurnEnded) and event.reason != "complete":
            raise RuntimeError(f"messages engine turn ended {event.reason}")
    return delays


async def layer_rounds(base_url: str, chats: int, rounds: int) -> dict[str, float]:
    """CPU per text delta of each layer of the engine's stream (figure 5), in rotating
    order each round."""
    body: dict[str, Any] = {
        "model": "claude-haiku-4-5",
        "max_tokens": 4096,
        "messages": [{"role": "user", "content": QUESTION}],
    }
    client = AsyncAnthropic(
        api_key="bench-key", base_url=base_url, max_retries=0, http_client=http_client()
    )

    async def deltas(events: AsyncIterator[Any]) -> int:
        return sum([event.type == "content_block_delta" async for event in events])

    with tempfile.TemporaryDirectory(prefix="bench-messages-") as tmp:
        bench = MessagesBench(base_url, Path(tmp))
        async with aiohttp.ClientSession() as session:

            async def lines() -> int:
                async with session.post(
                    f"{base_url}/v1/messages", json={**body, "stream": True}
                ) as response:
                    return sum(
                        [
                            line.startswith(b"data: ") and b"text_delta" in line
                            async for line in response.content
                        ]
                    )

            async def raw() -> int:
                return await deltas(await client.beta.messages.create(**body, stream=True))

            async def typed() -> int:
                async with client.beta.messages.stream(**body) as stream:
                    return await deltas(stream)

            async def runner() -> int:
                total = 0
                requests = client.beta.messages.tool_runner(
                    **body, tools=[], stream=True, thread=False
                )
                async for stream in requests:
                    total += await deltas(stream)
                return total

            async def engine() -> int:
                return len(await stamped_turn(bench))

            ways: dict[str, Callable[[], Awaitable[int]]] = {
                "aiohttp reading the SSE lines": lines,
                "the SDK's raw events, create(stream=True)": raw,
                "the SDK's typed stream, messages.stream()": typed,
                "the SDK's tool runner, tool_runner(stream=True)": runner,
                "the Messages engine": engine,
            }
            cpu = dict.fromkeys(ways, 0.0)
            count = dict.fromkeys(ways, 0)
            for way in ways.values():  # Warm up: connect, import, fill the caches.
                await asyncio.gather(*(way() for _ in range(chats)))
            names = list(ways)
            for index in range(rounds):
                for name in names if index % 2 == 0 else names[::-1]:
                    started = time.process_time()
                    answers = await asyncio.gather(*(ways[name]() for _ in range(chats)))
                    cpu[name] += time.process_time() - started
                    count[name] += sum(answers)
        await bench.engine.aclose()
    await client.close()
    return {name: cpu[name] / max(1, count[name]) * 1e6 for name in names}


def layer_rows(per_delta: dict[str, float], chats: int, rate: float) -> list[Row]:
    """Each layer's CPU per delta, and what it adds to the one before."""
    rows: list[Row] = []
    before: float | None = None
    for name, value in per_delta.items():
        added = "" if before is None else f" (+{value - before:.0f})"
        rows.append(
            info_row(
                BENCH,
                f"{chats} answers at once x {rate:g} deltas/s, CPU per delta: {name}",
                f"{value:.0f} µs{added}",
            )
        )
        before = value
    return rows


@dataclass
class Transport:
    """One transport's rounds: CPU seconds, deltas and delays."""

    cpu: float = 0.0
    deltas: int = 0
    delays: list[float] = field(default_factory=list)


async def transport_rounds(base_url: str, chats: int, rounds: int) -> dict[str, Transport]:
    """The engine alone on each transport, `chats` answers at once a round, rotating."""
    with tempfile.TemporaryDirectory(prefix="bench-messages-") as tmp:
        benches = {
            "httpx (the SDK's default)": MessagesBench(
                base_url, Path(tmp) / "httpx", httpx_client(base_url)
            ),
            "aiohttp (the engine's)": MessagesBench(base_url, Path(tmp) / "aiohttp"),
        }
        results = {name: Transport() for name in benches}
        names = list(benches)
        for bench in benches.values():  # Warm up: connect, import, fill the caches.
            await asyncio.gather(*(stamped_turn(bench) for _ in range(chats)))
        for index in range(rounds):
            for name in names if index % 2 == 0 else names[::-1]:
                started = time.process_time()
                answers = await asyncio.gather(*(stamped_turn(benches[name]) for _ in range(chats)))
                result = results[name]
                result.cpu += time.process_time() - started
                for delays in answers:
                    result.deltas += len(delays)
                    result.delays += delays
        for bench in benches.values():
            await bench.engine.aclose()
    return results


def transport_rows(results: dict[str, Transport], chats: int, rate: float) -> list[Row]:
    """CPU per delta and delays of each transport, and their ratio."""
    rows: list[Row] = []
    per_delta: list[float] = []
    for name, result in results.items():
        per_delta.append(result.cpu / max(1, result.deltas) * 1e6)
        delays = summarize(result.delays)
        rows.append(
            info_row(
                BENCH,
                f"engine alone, {chats} answers at once x {rate:g} deltas/s, {name}",
                f"{per_delta[-1]:,.0f} µs CPU per delta; delay {delays.p50 * 1000:.1f} / "
                f"{delays.p99 * 1000:.1f} ms p50 / p99 (n={delays.n})",
            )
        )
    rows.append(
        info_row(
            BENCH,
            "engine alone, CPU per delta, aiohttp / httpx",
            f"{per_delta[1] / per_delta[0]:.2f}",
        )
    )
    return rows


# --- 2 and 3. a server under load ------------------------------------------------------------


@contextlib.contextmanager
def stamped_model(tokens: int, rate: float) -> Iterator[str]:
    """bench/stamped_model.py in a process of its own; yields its base URL."""
    command = [sys.executable, "-m", "bench.stamped_model", "--tokens", str(tokens)]
    model = subprocess.Popen(
        [*command, "--rate", str(rate)], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert model.stdout is not None
        base_url = model.stdout.readline().decode().strip()
        if not base_url.startswith("http"):
            raise RuntimeError(f"the stamped model did not start: {base_url!r}")
        yield base_url
    finally:
        assert model.stdin is not None
        model.stdin.close()
        model.wait(timeout=15)


@dataclass
class Seen:
    """What one reader saw of one answer."""

    delays: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: list[str] = field(default_factory=list)


async def read_answer(
    ws: ClientConnection, text: str, chat_id: str | None, delay: float = 0.0
) -> tuple[str, Seen]:
    """Ask after `delay` seconds, and read to `done`, timing every stamped token."""
    seen = Seen()
    await asyncio.sleep(delay)
    await ws.send(chat_frame(text, chat_id))
    try:
        while True:
            frame = await ws.recv()
            received = time.monotonic()
            event = json.loads(frame)
            kind = event["type"]
            chat_id = event.get("chatId", chat_id)
            if kind == "token":
                for stamp in event["text"].split():
                    seen.delays.append(received - float(stamp))
                    seen.tokens += 1
            elif kind == "done":
                if event["reason"] != "complete":
                    seen.errors.append(f"done with reason {event['reason']}")
                break
            elif kind == "error":
                seen.errors.append(f"error {event.get('code')}: {event.get('message')}")
    except ConnectionClosed as exc:
        seen.errors.append(f"connection closed: {exc}")
    assert chat_id is not None
    return chat_id, seen


async def direct_stamped(base_url: str) -> Seen:
    """A plain HTTP client reading the stamped model's stream: the baseline's delays."""
    seen = Seen()
    body = {
        "model": "claude-haiku-4-5",
        "max_tokens": 4096,
        "stream": True,
        "messages": [{"role": "user", "content": QUESTION}],
    }
    async with (
        httpx.AsyncClient(base_url=base_url, timeout=120) as http,
        http.stream("POST", "/v1/messages", json=body) as response,
    ):
        async for line in response.aiter_lines():
            if line.startswith("data: ") and '"text_delta"' in line:
                received = time.monotonic()
                stamp = json.loads(line[6:])["delta"]["text"]
                seen.delays.append(received - float(stamp))
                seen.tokens += 1
    return seen


def engine_env(engine: str, base_url: str, chats: int) -> dict[str, str]:
    """A bench server's environment for this engine and model."""
    return {
        "ANTHROPIC_API_KEY": "bench-key",
        "ANTHROPIC_BASE_URL": base_url,
        "BLOGCHAT_ENGINE": engine,
        "BLOGCHAT_PROVIDER_RETRIES": "0",
        "BLOGCHAT_THINKING_BUDGET": "0",
        "BLOGCHAT_MAX_LIVE_CLIENTS": str(max(chats, 8)),
        "BLOGCHAT_SPARE_PROCESSES": "0",
        "BLOGCHAT_STALL_SECONDS": "120",
    }


@dataclass
class Load:
    """A server's figures for one measured round of chats."""

    seen: list[Seen]
    cpu: float
    rss_before: int
    rss_peak: int
    seconds: float
    baseline: Seen | None = None

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.seen)

    @property
    def errors(self) -> list[str]:
        return [e for s in self.seen for e in s.errors]


async def under_load(
    engine: str,
    chats: int,
    tokens: int,
    rate: float,
    *,
    with_baseline: bool = False,
    spread: float | None = None,
    source: Path = REPO,
) -> Load:
    """`chats` chats at once on a server of this engine: one warm-up turn each, then one
    measured turn each, with the server's CPU (children included) and memory."""
    with (
        stamped_model(tokens, rate) as base_url,
        server(engine="default", env=engine_env(engine, base_url, chats), source=source) as bench,
    ):
        cookies = await visitors(bench, chats)
        sockets = await open_many(bench, cookies)
        warm = await asyncio.gather(*(read_answer(ws, QUESTION, None) for ws in sockets))
        chat_ids = [chat_id for chat_id, _ in warm]
        await asyncio.sleep(1)
        process = bench.ps
        rss_before, _ = process_memory(process)
        cpu_before = cpu_seconds(process) + sum(cpu_seconds(c) for c in process.children(True))
        started = time.monotonic()
        with PeakMemory(process) as peak:
            # The chats start spread over `spread` seconds: by default one token's interval,
            # as in bench_concurrency.py.
            if spread is None:
                spread = 1 / rate if rate else 0.0
            turns = [
                read_answer(ws, QUESTION, chat_id, index / chats * spread)
                for index, (ws, chat_id) in enumerate(zip(sockets, chat_ids, strict=True))
            ]
            answers = asyncio.gather(*turns)
            baseline: Seen | None = None
            if with_baseline:
                baseline = await direct_stamped(base_url)
            results = await answers
        seconds = time.monotonic() - started
        cpu_after = cpu_seconds(process) + sum(cpu_seconds(c) for c in process.children(True))
        await asyncio.gather(*(ws.close() for ws in sockets))
    seen = [s for _, s in results]
    for s in seen:
        if s.tokens != tokens:
            s.errors.append(f"{s.tokens} tokens of {tokens}")
    peak_rss = max(peak.peak, rss_before)
    return Load(seen, cpu_after - cpu_before, rss_before, peak_rss, seconds, baseline)


def cpu_row(name: str, load: Load, chats: int, rate: float) -> Row:
    """Server CPU per delivered token on one engine."""
    per_token = load.cpu / max(1, load.tokens) * 1e6
    metric = f"server CPU per delivered token, {chats} chats x {rate:g} tokens/s"
    shown = f"{per_token:,.0f} µs ({load.tokens} tokens, {len(load.errors)} errors)"
    if name != "messages":
        return info_row(BENCH, f"{metric}, Agent SDK engine (CLIs included)", shown)
    return goal_row(
        BENCH,
        f"{metric}, Messages engine",
        measured=per_token,
        goal=GOAL_CPU_US,
        unit="µs",
        shown=shown,
    )


def compare_cpu(baseline: Path, rounds: int, chats: int, tokens: int, rate: float) -> list[Row]:
    """Figure 2 on the Messages engine, on this tree and on `baseline`, in pairs of rounds."""
    sources = {"baseline": baseline, "this tree": REPO}
    per_token: dict[str, list[float]] = {way: [] for way in sources}
    for index in range(rounds):
        order = list(sources) if index % 2 == 0 else list(reversed(sources))
        for way in order:
            load = asyncio.run(under_load("messages", chats, tokens, rate, source=sources[way]))
            if load.errors:
                raise RuntimeError(f"{way}: {len(load.errors)} errors, first {load.errors[0]}")
            per_token[way].append(load.cpu / max(1, load.tokens) * 1e6)
    metric = f"server CPU per delivered token, {chats} chats x {rate:g} tokens/s"
    rows = [
        info_row(
            BENCH,
            f"{metric}, {way}",
            f"{statistics.median(values):,.0f} µs median of {len(values)} "
            f"({', '.join(f'{value:.0f}' for value in values)})",
        )
        for way, values in per_token.items()
    ]
    paired = [
        after / before
        for before, after in zip(per_token["baseline"], per_token["this tree"], strict=True)
    ]
    rows.append(
        info_row(
            BENCH,
            f"{metric}: this tree / baseline, paired by round",
            f"{statistics.median(paired):.2f} median ({min(paired):.2f}-{max(paired):.2f})",
        )
    )
    return rows


def crowd_rows(crowd: Load, crowd_chats: int, crowd_rate: float) -> list[Row]:
    """The figures of many chats at once on the Messages engine."""
    rows: list[Row] = []
    per_chat = (crowd.rss_peak - crowd.rss_before) / crowd_chats / MB
    rows.append(
        goal_row(
            BENCH,
            f"memory per running chat ({crowd_chats} at once), Messages engine",
            measured=per_chat,
            goal=GOAL_MEMORY_MB,
            unit="MB",
            shown=(
                f"{per_chat:.2f} MB (RSS {crowd.rss_before / MB:.0f} -> "
                f"{crowd.rss_peak / MB:.0f} MB)"
            ),
        )
    )
    delays = summarize([d for s in crowd.seen for d in s.delays])
    rows.append(
        goal_row(
            BENCH,
            f"{crowd_chats} chats at once x {crowd_rate:g} deltas/s: token delay p99",
            measured=delays.p99 * 1000,
            goal=GOAL_P99_MS,
            unit="ms",
            shown=f"{delays.p99 * 1000:.1f} ms (p50 {delays.p50 * 1000:.1f}, n={delays.n})",
        )
    )
    errors = crowd.errors
    rows.append(
        Row(
            bench=BENCH,
            metric=f"{crowd_chats} chats at once: errors",
            goal="0",
            measured=f"{len(errors)}" + (f" (first: {errors[0]})" if errors else ""),
            passed=not errors,
        )
    )
    if crowd.baseline is not None:
        base = summarize(crowd.baseline.delays)
        rows.append(
            info_row(
                BENCH,
                "direct reader of the same model at the same time: token delay",
                f"{base.p50 * 1000:.1f} / {base.p99 * 1000:.1f} ms p50 / p99",
            )
        )
    rows.append(
        info_row(
            BENCH,
            f"server CPU, {crowd_chats} chats at once",
            f"{crowd.cpu / crowd.seconds:.0%} of one core over {crowd.seconds:.0f} s "
            f"({crowd.cpu / max(1, crowd.tokens) * 1e6:,.0f} µs per token)",
        )
    )
    return rows


def main(argv: list[str] | None = None) -> list[Row]:
    """Parse arguments, run, print; returns the rows for the runner."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--paced-rounds", type=int, default=10)
    parser.add_argument("--paced-rate", type=float, default=1000)
    parser.add_argument("--chats", type=int, default=20, help="chats for the CPU figure")
    parser.add_argument("--crowd", type=int, default=200, help="chats at once, Messages engine")
    parser.add_argument("--rate", type=float, default=50, help="the model's pace, CPU figure")
    parser.add_argument(
        "--crowd-rate",
        type=float,
        default=10,
        help="deltas per second of each of the crowd's chats (the API sends a few tokens a delta)",
    )
    parser.add_argument("--tokens", type=int, default=200, help="tokens per answer under load")
    parser.add_argument(
        "--skip-agent-sdk-load",
        action="store_true",
        help="leave out the Agent SDK engine's CPU figure (it starts one CLI per chat)",
    )
    parser.add_argument(
        "--crowd-spread",
        type=float,
        help="seconds over which the crowd's chats start (default: one delta's interval)",
    )
    parser.add_argument("--crowd-tokens", type=int, default=100, help="tokens per crowd answer")
    parser.add_argument(
        "--transport-rounds",
        type=int,
        default=6,
        help="rounds of each transport (and of each layer), engine alone",
    )
    parser.add_argument(
        "--only",
        default="latency,cpu,crowd,transport,layers",
        help="parts to run: latency, cpu, crowd, transport, layers",
    )
    parser.add_argument(
        "--compare-source",
        type=Path,
        help="measure figure 2 on this tree and on this checkout of another revision, only",
    )
    parser.add_argument(
        "--compare-rounds", type=int, default=6, help="pairs of rounds with --compare-source"
    )
    args = parser.parse_args(argv)
    parts = set(args.only.split(","))
    raise_file_limit()
    rows: list[Row] = []
    if args.compare_source is not None:
        rows = compare_cpu(
            args.compare_source, args.compare_rounds, args.chats, args.tokens, args.rate
        )
        print_rows(f"Messages engine, {args.compare_source} against this tree", rows)
        return rows
    if "latency" in parts:
        with anthropic_api(500) as base_url:
            unpaced = asyncio.run(latency_rounds(base_url, args.rounds))
        with anthropic_api(500, args.paced_rate) as base_url:
            paced = asyncio.run(latency_rounds(base_url, args.paced_rounds))
        rows += latency_rows(unpaced, paced, args.paced_rate)
    if "cpu" in parts:
        engines = ["messages"] if args.skip_agent_sdk_load else ["messages", "agent-sdk"]
        for name in engines:
            load = asyncio.run(under_load(name, args.chats, args.tokens, args.rate))
            rows.append(cpu_row(name, load, args.chats, args.rate))
    if "crowd" in parts:
        crowd = asyncio.run(
            under_load(
                "messages",
                args.crowd,
                args.crowd_tokens,
                args.crowd_rate,
                with_baseline=True,
                spread=args.crowd_spread,
            )
        )
        rows += crowd_rows(crowd, args.crowd, args.crowd_rate)
    if "transport" in parts:
        with stamped_model(args.tokens, args.rate) as base_url:
            transports = asyncio.run(transport_rounds(base_url, args.chats, args.transport_rounds))
        rows += transport_rows(transports, args.chats, args.rate)
    if "layers" in parts:
        with stamped_model(args.tokens, args.rate) as base_url:
            layers = uvloop.run(layer_rounds(base_url, args.chats, args.transport_rounds))
        rows += layer_rows(layers, args.chats, args.rate)
    print_rows("Messages engine beside the Agent SDK engine and direct", rows)
    return rows


if __name__ == "__main__":
    main()

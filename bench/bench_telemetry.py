"""What tracing to an unreachable Braintrust costs a reader: tokens/s and time to first token.

Run with `uv run python bench/bench_telemetry.py` (`--help` for options). It starts three
real servers side by side: one with telemetry off, a second one just like it (the control:
how far two identical servers differ on this machine), and one with `BRAINTRUST_API_KEY` set
and `BRAINTRUST_APP_URL` pointing at a closed port on 127.0.0.1, so that every send fails
and the SDK's background thread keeps retrying. It asks all three the same questions over
real WebSockets, taking turns in rotation so that machine noise hits them alike.

- offline engine, streaming as fast as it can: the per-event cost of tracing, unhidden;
- Claude engine (the real SDK and CLI) against the local Anthropic test server, which also
  streams as fast as it can: the same through the whole agent path, model calls included.

Printed: median time to first token and median tokens/s per turn for each server, and the
ratios to the first. An on/off ratio as close to 1.00 as the control's means telemetry costs
the reader nothing measurable.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack, ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.anthropic_server import AnthropicTestServer, EchoResponder  # noqa: E402
from tests.support.client import ChatSocket, Reader  # noqa: E402
from tests.support.server import Database, LiveServer, free_port, settings_for  # noqa: E402

OFFLINE_QUESTION = "What does the blog say about sourdough starters, bread and baking?"
# The test server echoes the prompt back word by word: a long prompt makes a long answer.
CLAUDE_PROMPT = " ".join(f"word{n}" for n in range(400))


@dataclass
class Turns:
    """Per-turn figures for one server."""

    first_token: list[float] = field(default_factory=list)
    tokens_per_second: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    errors: int = 0


class Conversation:
    """One reader's chat, asked the same question turn after turn (one live agent process)."""

    def __init__(self, reader: Reader) -> None:
        self.reader = reader
        self.ws: ChatSocket | None = None
        self.chat_id: str | None = None

    async def turn(self, question: str, into: Turns) -> None:
        """Ask; time the first token and the rate of the rest."""
        if self.ws is None:
            self.ws = await self.reader.connect()
        await one_turn(self, self.ws, question, into)


async def one_turn(chat: Conversation, ws: ChatSocket, question: str, into: Turns) -> None:
    """Send one message and read its turn to the end."""
    sent = time.perf_counter()
    await ws.chat(question, chat.chat_id)
    first = None
    count = 0
    while True:
        event = await ws.recv(timeout=120)
        if event["type"] == "chat_created":
            chat.chat_id = event["chatId"]
        elif event["type"] == "token":
            count += 1
            if first is None:
                first = time.perf_counter()
        elif event["type"] == "error":
            into.errors += 1
        elif event["type"] == "done":
            ended = time.perf_counter()
            if event["reason"] != "complete":
                into.errors += 1
            break
    assert first is not None, "no token arrived"
    into.first_token.append(first - sent)
    into.tokens.append(count)
    into.tokens_per_second.append(count / max(ended - first, 1e-9))


UNREACHABLE = "on, unreachable"
SERVERS = ("off", "off (control)", UNREACHABLE)


@contextmanager
def servers(engine: str, data: Path) -> Iterator[dict[str, LiveServer]]:
    """Servers on their own SQLite files: telemetry off (twice), and on with Braintrust away."""
    with ExitStack() as stack:
        extra: dict[str, Any] = {"log_level": "ERROR"}
        if engine == "claude":
            api = stack.enter_context(AnthropicTestServer())
            api.set_default(EchoResponder())
            extra.update(
                anthropic_api_key="bench-key",
                anthropic_base_url=api.base_url,
                provider_retries=0,
                thinking_budget=0,
            )
        unreachable = {
            "braintrust_api_key": "bench-key-for-an-unreachable-braintrust",
            "braintrust_app_url": f"http://127.0.0.1:{free_port()}",
            "telemetry_flush_seconds": 1.0,
        }
        built = {}
        for index, name in enumerate(SERVERS):
            telemetry = unreachable if name == UNREACHABLE else {}
            database = Database("sqlite", f"sqlite+aiosqlite:///{data / f'{engine}-{index}.db'}")
            settings = settings_for(database, data / f"{engine}-{index}", **extra, **telemetry)
            server = LiveServer(settings).start()
            stack.callback(server.stop)
            assert server.state.telemetry.enabled is (name == UNREACHABLE)
            built[name] = server
        yield built


async def compare(engine: str, turns: int, warmup: int, data: Path) -> dict[str, Turns]:
    """Take turns in rotation on every server; the figures by server."""
    question = CLAUDE_PROMPT if engine == "claude" else OFFLINE_QUESTION
    figures = {name: Turns() for name in SERVERS}
    with servers(engine, data) as running:
        async with AsyncExitStack() as stack:
            chats = {
                name: Conversation(await stack.enter_async_context(Reader(server.url)))
                for name, server in running.items()
            }
            for _ in range(warmup):
                for chat in chats.values():
                    await chat.turn(question, Turns())
            for index in range(turns):
                # Rotate who goes first, so that none always runs on a warmer machine.
                names = list(SERVERS[index % 3 :] + SERVERS[: index % 3])
                for name in names:
                    await chats[name].turn(question, figures[name])
    return figures


def report(engine: str, figures: dict[str, Turns]) -> None:
    """One block of the table."""
    base = figures["off"]
    count = len(base.first_token)
    print(f"\n{engine} engine: {count} turns per server, {base.tokens[0]} tokens per turn")
    print(f"  {'':20}{'time to first token':>22}{'tokens/s':>18}{'errors':>8}")
    ttft_base = statistics.median(base.first_token)
    rate_base = statistics.median(base.tokens_per_second)
    for name, turns in figures.items():
        ttft = statistics.median(turns.first_token)
        rate = statistics.median(turns.tokens_per_second)
        print(
            f"  {name:20}{ttft * 1000:>10.1f} ms  x{ttft / ttft_base:<5.2f}"
            f"{rate:>9.0f}  x{rate / rate_base:<5.2f}{turns.errors:>8}"
        )
    on = figures[UNREACHABLE]
    print(
        f"  ratio on/off: tokens/s {statistics.median(on.tokens_per_second) / rate_base:.2f}, "
        f"time to first token {statistics.median(on.first_token) / ttft_base:.2f}"
    )


def main() -> None:
    """Run the comparison and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=["offline", "claude", "both"], default="both")
    parser.add_argument("--turns", type=int, default=30, help="measured turns per server")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured turns per server")
    args = parser.parse_args()
    engines = ["offline", "claude"] if args.engine == "both" else [args.engine]
    print("Telemetry off vs on with Braintrust unreachable (closed port): medians per turn.")
    for engine in engines:
        with tempfile.TemporaryDirectory(prefix="bench-telemetry-") as tmp:
            figures = asyncio.run(compare(engine, args.turns, args.warmup, Path(tmp)))
        report(engine, figures)


if __name__ == "__main__":
    main()

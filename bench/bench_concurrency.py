"""Concurrency: 1,000 open WebSockets, 100 chats streaming 50 tokens/s each.

Run with `uv run python bench/bench_concurrency.py`. The server is the real app in a process
of its own, on the scripted engine (`bench/serve.py`): every token carries the monotonic
clock at the moment the engine produced it, so each client computes the delay between a
token being produced and being received. In one run:

1. memory: the server's RSS before and after opening every connection (they idle);
2. load: 100 of the connections each stream a chat at 50 tokens/s while the others idle;
   the delay of every token, the server's CPU, its peak RSS and every error are recorded.
   At the same time, a twin server with nothing else to do streams one chat to the same
   client: its delays are the baseline, taken side by side under the same machine noise;
3. afterwards, every idle connection must still answer a ping.

Idle memory is also measured on two fresh servers, one whose clients negotiate
permessage-deflate (as browsers do) and one whose clients do not, because compression keeps
a zlib context per connection.

`--instances 2` runs the same load over two instances in cluster mode (docs/cluster.md:
one PostgreSQL schema, one Redis prefix): the connections alternate between them, so each
instance owns half of the streaming chats and its events go to the shared log on Redis as
well; memory and CPU are the two processes' sums.

`--compare-saves` measures instead the two ways of saving running answers side by side: two
servers, one saving every running answer of the process in one statement a second
(`BLOGCHAT_BATCHED_SAVES=true`, the default) and one where each answer saves itself in a
transaction of its own (`false`, the former way), each under the same load on a server of
its own, in turn (`--rounds` pairs, each way first every other round, so that a pair shares
the machine's drift; at once, the one client process would be the bottleneck). It prints
the server CPU per delivered token of each, their paired ratio, and blogchat's own time to
the first token of a message in a running chat after each load (sent to received, on the
scripted engine, whose first token costs it nothing: all of that time is blogchat's).

`--compare-source CHECKOUT` measures that own time to first token (in a running chat and in
a new chat) and the server CPU per message on two idle servers side by side, one serving
this tree and one a checkout of another revision (`git archive REV | tar -x -C DIR`), the
samples alternating between them, with the floor under them: a `ping`'s round trip through
the same socket, reader loop and writer, with no chat work.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.support import (
    KB,
    MB,
    REPO,
    BenchServer,
    Row,
    Summary,
    chat_frame,
    cluster,
    cpu_seconds,
    goal_row,
    info_row,
    new_visitor,
    open_socket,
    print_rows,
    process_memory,
    raise_file_limit,
    server,
    summarize,
)

BENCH = "2. concurrency"
GOAL_P99_MS = 50.0
GOAL_IDLE_KB = 100.0


# How long after its last token is due a stream may go without its `done` before it counts
# as an error (never a hang: a turn that never ends, or a `done` that never arrives).
DONE_GRACE_SECONDS = 30.0


@dataclass
class Stream:
    """What one streaming client saw."""

    delays: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: list[str] = field(default_factory=list)
    done: bool = False
    # No `done` within the deadline.
    late: bool = False


async def visitors(bench: BenchServer, count: int) -> list[str]:
    """`count` fresh anonymous visitors' cookies."""
    limits = httpx.Limits(max_connections=50)
    async with httpx.AsyncClient(base_url=bench.url, timeout=60, limits=limits) as http:
        return list(await asyncio.gather(*(new_visitor(http) for _ in range(count))))


async def open_many(
    bench: BenchServer, cookies: list[str], compression: str | None = "deflate"
) -> list[ClientConnection]:
    """Open one connection per cookie, a hundred at a time."""
    sockets: list[ClientConnection] = []
    for start in range(0, len(cookies), 100):
        batch = cookies[start : start + 100]
        sockets += await asyncio.gather(
            *(open_socket(bench.url, cookie, compression=compression) for cookie in batch)
        )
    return sockets


async def stream(
    ws: ClientConnection,
    tokens: int,
    rate: float,
    delay: float,
    grace: float = DONE_GRACE_SECONDS,
) -> Stream:
    """Start a chat after `delay` seconds and read it to its end, timing every token; a
    `done` not there `grace` seconds after the last token was due is an error."""
    seen = Stream()
    await asyncio.sleep(delay)
    await ws.send(chat_frame(f"tokens={tokens} rate={rate:g}"))
    due = tokens / rate if rate > 0 else 0.0
    try:
        async with asyncio.timeout(due + grace):
            await _read_to_done(ws, seen)
    except TimeoutError:
        seen.late = True
        seen.errors.append(f"no done {due + grace:g} s after the message")
    except ConnectionClosed as exc:
        seen.errors.append(f"connection closed: {exc}")
    if seen.tokens != tokens:
        seen.errors.append(f"{seen.tokens} tokens of {tokens}")
    return seen


async def _read_to_done(ws: ClientConnection, seen: Stream) -> None:
    last_seq: int | None = None
    while True:
        frame = await ws.recv()
        received = time.monotonic_ns()
        event = json.loads(frame)
        kind = event["type"]
        if "seq" in event:
            if last_seq is not None and event["seq"] != last_seq + 1:
                seen.errors.append(f"seq {event['seq']} after {last_seq}")
            last_seq = event["seq"]
        if kind == "token":
            produced = int(event["text"][1:].split(" ", 1)[0])
            seen.delays.append((received - produced) / 1e9)
            seen.tokens += 1
        elif kind == "done":
            if event["reason"] != "complete":
                seen.errors.append(f"done with reason {event['reason']}")
            seen.done = True
            return
        elif kind == "error":
            seen.errors.append(f"error {event['code']}: {event['message']}")


async def open_spread(benches: list[BenchServer], cookies: list[str]) -> list[ClientConnection]:
    """One connection per cookie, the i-th to instance i modulo their number."""
    count = len(benches)
    groups = [await open_many(bench, cookies[i::count]) for i, bench in enumerate(benches)]
    return [groups[i % count][i // count] for i in range(len(cookies))]


class PeakMemory:
    """Samples processes' summed RSS in the background, keeping the peak."""

    def __init__(self, *processes: psutil.Process) -> None:
        self.processes = processes
        self.peak = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, sum(p.memory_info().rss for p in self.processes))
            await asyncio.sleep(0.25)

    def __enter__(self) -> PeakMemory:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def idle_memory(connections: int, compression: str | None, database: str) -> float:
    """Bytes of server RSS per idle connection, on a fresh server."""
    with server(engine="scripted", database=database) as bench:
        cookies = await visitors(bench, connections)
        await asyncio.sleep(1)
        before, _ = process_memory(bench.ps)
        sockets = await open_many(bench, cookies, compression)
        await asyncio.sleep(2)
        after, _ = process_memory(bench.ps)
        await asyncio.gather(*(ws.close() for ws in sockets))
    return (after - before) / connections


async def measure(
    connections: int,
    chats: int,
    rate: float,
    seconds: float,
    database: str,
    profile: Path | None = None,
    instances: int = 1,
) -> tuple[list[Row], Summary]:
    """Run the whole scenario; return the result rows and the token delays under load."""
    raise_file_limit()
    client = psutil.Process()
    rows: list[Row] = []
    tokens = int(rate * seconds)
    with contextlib.ExitStack() as stack:
        if instances > 1:
            benches = stack.enter_context(cluster(instances, engine="scripted", profile=profile))
        else:
            benches = [
                stack.enter_context(server(engine="scripted", database=database, profile=profile))
            ]
        twin = stack.enter_context(server(engine="scripted", database=database))
        processes = [bench.ps for bench in benches]
        cookies = await visitors(benches[0], connections)
        probe = await open_socket(twin.url, (await visitors(twin, 1))[0])
        # Warm them up (first chat, first save, first replay of every code path).
        await stream(probe, 20, 0, 0)
        for bench in benches:
            warm = await open_socket(bench.url, cookies[0])
            await stream(warm, 20, 0, 0)
            await warm.close()

        # 1. Memory of the idle connections.
        await asyncio.sleep(1)
        rss_before = sum(process_memory(process)[0] for process in processes)
        sockets = await open_spread(benches, cookies)
        await asyncio.sleep(2)
        rss_open = sum(process_memory(process)[0] for process in processes)

        # 2. Load: the first `chats` connections stream, the rest idle; the twin streams one.
        streaming, idle = sockets[:chats], sockets[chats:]
        server_cpu = sum(cpu_seconds(process) for process in processes)
        client_cpu = cpu_seconds(client)
        started = time.monotonic()
        with PeakMemory(*processes) as peak:
            baseline, *results = await asyncio.gather(
                stream(probe, tokens, rate, 0),
                *(
                    # Spread the starts over a token interval, as real chats would be.
                    stream(ws, tokens, rate, index / chats / rate)
                    for index, ws in enumerate(streaming)
                ),
            )
        elapsed = time.monotonic() - started
        server_cpu = sum(cpu_seconds(process) for process in processes) - server_cpu
        client_cpu = cpu_seconds(client) - client_cpu

        # 3. Every idle connection is still alive.
        dead = 0
        for outcome in await asyncio.gather(
            *(asyncio.wait_for(ws.ping(), 30) for ws in idle), return_exceptions=True
        ):
            if isinstance(outcome, BaseException):
                dead += 1
            else:
                try:
                    await asyncio.wait_for(outcome, 30)
                except (TimeoutError, ConnectionClosed):
                    dead += 1
        await asyncio.gather(*(ws.close() for ws in [*sockets, probe]))
        tracebacks = sum(bench.failures() for bench in benches)

    delays = [delay for result in results for delay in result.delays]
    loaded = summarize(delays)
    alone_summary = summarize(baseline.delays)
    errors = [error for result in results for error in result.errors] + baseline.errors
    errors += [f"{dead} idle connection(s) dead"] if dead else []
    late = sum(result.late for result in [*results, baseline])
    idle_per = (rss_open - rss_before) / connections
    delivered = sum(result.tokens for result in results)

    rows.append(
        goal_row(
            BENCH,
            f"token delay under load, p99 ({chats} chats × {rate:g} tok/s, {connections} open)",
            measured=loaded.p99 * 1000,
            goal=GOAL_P99_MS,
            unit="ms",
            shown=f"{loaded.p99 * 1000:.1f} ms (p50 {loaded.p50 * 1000:.1f}, n={loaded.n:,})",
        )
    )
    rows.append(
        info_row(
            BENCH,
            "token delay, one chat on an idle twin server, same time (baseline)",
            alone_summary.ms(),
        )
    )
    rows.append(
        info_row(
            BENCH,
            "token delay, loaded / baseline",
            f"{loaded.p50 / alone_summary.p50:.1f}× p50, {loaded.p99 / alone_summary.p99:.1f}× p99",
            note="what the load adds beyond the machine's own noise",
        )
    )
    rows.append(
        Row(
            bench=BENCH,
            metric="errors (refused, lost, repeated, closed, not complete)",
            goal="0",
            measured=str(len(errors)),
            ratio=None,
            passed=not errors,
            note="; ".join(errors[:5]),
        )
    )
    rows.append(
        info_row(
            BENCH,
            f"streams with no `done` {DONE_GRACE_SECONDS:g} s after their last token was due",
            f"{late} of {len(results) + 1}",
            note="each counted among the errors",
        )
    )
    rows.append(
        info_row(
            BENCH,
            "tracebacks in the servers' logs",
            str(tracebacks),
            note="BLOGCHAT_BENCH_LOG_DIR keeps the logs",
        )
    )
    rows.append(
        goal_row(
            BENCH,
            "server RSS per idle connection (deflate negotiated)",
            measured=idle_per / KB,
            goal=GOAL_IDLE_KB,
            unit="KB",
            shown=f"{idle_per / KB:.1f} KB",
        )
    )
    rows.append(
        info_row(
            BENCH,
            "server CPU under load",
            f"{server_cpu / elapsed:.0%} of one core "
            f"({server_cpu / max(delivered, 1) * 1e6:.0f} µs per token delivered)",
            note=f"the client process used {client_cpu / elapsed:.0%} of one core",
        )
    )
    rows.append(
        info_row(
            BENCH,
            "server RSS",
            f"{rss_before / MB:.0f} MB at rest, {rss_open / MB:.0f} MB with "
            f"{connections} open, {peak.peak / MB:.0f} MB peak under load",
        )
    )
    return rows, loaded


async def first_token(ws: ClientConnection, chat_id: str | None) -> float:
    """Seconds from sending a message in this chat (None: a new chat) to its first token;
    reads to `done`."""
    sent = time.monotonic_ns()
    await ws.send(chat_frame("tokens=2 rate=0", chat_id))
    received: int | None = None
    while True:
        event = json.loads(await ws.recv())
        if event["type"] == "token" and received is None:
            received = time.monotonic_ns()
        elif event["type"] == "done":
            break
        elif event["type"] == "error":
            raise RuntimeError(f"error {event['code']}: {event['message']}")
    assert received is not None, "no token"
    return (received - sent) / 1e9


async def round_trip(ws: ClientConnection) -> float:
    """Seconds from sending a `ping` to its `pong`: a frame's way through the socket, the
    reader loop and the writer with no chat work at all (the floor under the first token)."""
    sent = time.monotonic_ns()
    await ws.send(json.dumps({"type": "ping", "requestId": "floor"}))
    while json.loads(await ws.recv())["type"] != "pong":
        pass
    return (time.monotonic_ns() - sent) / 1e9


async def chat_of(ws: ClientConnection) -> str:
    """Start a chat on this connection (a short answer, read to its end); its id."""
    await ws.send(chat_frame("tokens=2 rate=0"))
    chat_id: str | None = None
    while True:
        event = json.loads(await ws.recv())
        if event["type"] == "chat_created":
            chat_id = event["chatId"]
        elif event["type"] == "done":
            assert chat_id is not None
            return chat_id


@dataclass
class SavesRun:
    """One way of saving, under load on a server of its own."""

    cpu_per_token: float
    share: float
    delays: list[float]
    errors: list[str]
    first_tokens: list[float]


async def saves_run(
    flag: str, chats: int, rate: float, seconds: float, database: str, samples: int
) -> SavesRun:
    """`chats` chats streaming on a server with BLOGCHAT_BATCHED_SAVES=`flag`, then blogchat's
    own time to first token of a message in a running chat, `samples` times."""
    tokens = int(rate * seconds)
    env = {"BLOGCHAT_BATCHED_SAVES": flag}
    with server(engine="scripted", database=database, env=env) as bench:
        sockets = await open_many(bench, await visitors(bench, chats + 1))
        probe = sockets.pop()
        chat_id = await chat_of(probe)
        await first_token(probe, chat_id)  # warm: a message in a running chat
        before = cpu_seconds(bench.ps)
        started = time.monotonic()
        results = await asyncio.gather(
            *(stream(ws, tokens, rate, index / chats / rate) for index, ws in enumerate(sockets))
        )
        elapsed = time.monotonic() - started
        cpu = cpu_seconds(bench.ps) - before
        first_tokens = [await first_token(probe, chat_id) for _ in range(samples)]
        await asyncio.gather(*(ws.close() for ws in [*sockets, probe]))
    delivered = sum(result.tokens for result in results)
    return SavesRun(
        cpu_per_token=cpu / max(delivered, 1),
        share=cpu / elapsed,
        delays=[delay for result in results for delay in result.delays],
        errors=[error for result in results for error in result.errors],
        first_tokens=first_tokens,
    )


async def compare_saves(
    chats: int, rate: float, seconds: float, database: str, samples: int, rounds: int
) -> list[Row]:
    """Batched against per-answer saves of running answers, in turn (module docstring)."""
    raise_file_limit()
    ways = {"batched": "true", "per answer": "false"}
    runs: dict[str, list[SavesRun]] = {way: [] for way in ways}
    for index in range(rounds):
        # In turn, each first every other round: the client serves one server at a time,
        # and pairs of runs share the machine's drift.
        order = list(ways) if index % 2 == 0 else list(reversed(ways))
        for way in order:
            runs[way].append(await saves_run(ways[way], chats, rate, seconds, database, samples))

    rows: list[Row] = []
    for way in ways:
        done = runs[way]
        per_token = statistics.median(run.cpu_per_token for run in done)
        delays = summarize([delay for run in done for delay in run.delays])
        errors = [error for run in done for error in run.errors]
        rows.append(
            info_row(
                BENCH,
                f"{way}: server CPU per delivered token ({chats} chats × {rate:g} tok/s)",
                f"{per_token * 1e6:.0f} µs median of {len(done)}"
                f" ({', '.join(f'{run.cpu_per_token * 1e6:.0f}' for run in done)};"
                f" {statistics.median(run.share for run in done):.0%} of one core;"
                f" token delay p50 {delays.p50 * 1000:.1f} ms, p99 {delays.p99 * 1000:.1f} ms)",
                note=f"{len(errors)} error(s)" + (f": {errors[0]}" if errors else ""),
            )
        )
    paired = [
        batched.cpu_per_token / each.cpu_per_token
        for batched, each in zip(runs["batched"], runs["per answer"], strict=True)
    ]
    saved = 1 - statistics.median(paired)
    rows.append(
        Row(
            bench=BENCH,
            metric="server CPU per delivered token: batched / per answer (paired rounds)",
            goal="≤ 0.70",
            measured=f"{1 - saved:.2f} ({', '.join(f'{ratio:.2f}' for ratio in paired)})",
            ratio=(1 - saved) / 0.70,
            passed=saved >= 0.30,
            note="the issue's goal: at least 30% less CPU per token at 100 streaming chats",
        )
    )
    for way in ways:
        own = summarize([value for run in runs[way] for value in run.first_tokens])
        rows.append(
            goal_row(
                BENCH,
                f"{way}: blogchat's own time to first token, p50 (a message in a running chat)",
                measured=own.p50 * 1000,
                goal=3.0,
                unit="ms",
                shown=f"{own.p50 * 1000:.2f} ms (p99 {own.p99 * 1000:.2f}, n={own.n})",
            )
        )
    return rows


async def compare_source(baseline: Path, database: str, samples: int) -> list[Row]:
    """Blogchat's own time to first token on an idle server of this tree and one of
    `baseline` (a checkout of another revision), side by side: each sample is taken on both,
    in alternating order, in a running chat and in a new chat."""
    sources = {"baseline": baseline, "this tree": REPO}
    kinds = ("a message in a running chat", "a new chat")
    taken: dict[tuple[str, str], list[float]] = {
        (way, kind): [] for way in sources for kind in kinds
    }
    floors: dict[str, list[float]] = {way: [] for way in sources}
    with contextlib.ExitStack() as stack:
        # Both started before any socket opens: starting one blocks this loop meanwhile.
        benches = {
            way: stack.enter_context(server(engine="scripted", database=database, source=source))
            for way, source in sources.items()
        }
        probes: dict[str, tuple[ClientConnection, str]] = {}
        for way, bench in benches.items():
            ws = (await open_many(bench, await visitors(bench, 1)))[0]
            chat_id = await chat_of(ws)
            for _ in range(5):  # warm: both paths once the server has served a few
                await first_token(ws, chat_id)
                await first_token(ws, None)
            probes[way] = (ws, chat_id)
        before = {way: cpu_seconds(bench.ps) for way, bench in benches.items()}
        for index in range(samples):
            order = list(sources) if index % 2 == 0 else list(reversed(sources))
            for way in order:
                ws, chat_id = probes[way]
                # First: after the other server's turns, so this one has finished what
                # follows its own last turn (a new chat's title) and the ping waits for none.
                floors[way].append(await round_trip(ws))
                taken[(way, kinds[0])].append(await first_token(ws, chat_id))
                taken[(way, kinds[1])].append(await first_token(ws, None))
        # Each sample is two messages (one in each kind of chat), each a whole short turn
        # (and a ping, next to nothing).
        cpu = {
            way: (cpu_seconds(bench.ps) - before[way]) / (2 * samples)
            for way, bench in benches.items()
        }
        await asyncio.gather(*(ws.close() for ws, _ in probes.values()))
    rows: list[Row] = [
        info_row(
            BENCH,
            "server CPU per message and its two-token turn: baseline / this tree",
            f"{cpu['baseline'] * 1e3:.2f} / {cpu['this tree'] * 1e3:.2f} ms"
            f" ({cpu['this tree'] / cpu['baseline']:.2f})",
        ),
        info_row(
            BENCH,
            "floor: a ping's round trip, p50, baseline / this tree",
            " / ".join(f"{summarize(floors[way]).p50 * 1000:.2f} ms" for way in sources),
            note="the socket, the reader loop and the writer, no chat work: part of each"
            " first token's time",
        ),
    ]
    for kind in kinds:
        for way in sources:
            own = summarize(taken[(way, kind)])
            rows.append(
                goal_row(
                    BENCH,
                    f"{way}: blogchat's own time to first token, p50 ({kind})",
                    measured=own.p50 * 1000,
                    goal=3.0,
                    unit="ms",
                    shown=f"{own.p50 * 1000:.2f} ms (p99 {own.p99 * 1000:.2f}, n={own.n})",
                )
            )
        paired = [
            after / before
            for before, after in zip(
                taken[("baseline", kind)], taken[("this tree", kind)], strict=True
            )
        ]
        rows.append(
            info_row(
                BENCH,
                f"this tree / baseline, paired samples ({kind})",
                f"{statistics.median(paired):.2f} median",
            )
        )
    return rows


async def idle_rows(connections: int, database: str) -> list[Row]:
    """Idle memory per connection with and without compression, on fresh servers."""
    with_deflate = await idle_memory(connections, "deflate", database)
    without = await idle_memory(connections, None, database)
    return [
        info_row(
            BENCH,
            "RSS per idle connection, fresh server: deflate / none",
            f"{with_deflate / KB:.1f} KB / {without / KB:.1f} KB",
            note="permessage-deflate keeps zlib state per connection",
        )
    ]


def await_alone(args: argparse.Namespace, clustered: Summary) -> list[Row]:
    """The same load on one instance without Redis, right after the cluster's (`--alone`):
    its rows, renamed, and the cluster's token delays over its."""
    rows, alone = asyncio.run(
        measure(args.connections, args.chats, args.rate, args.seconds, "postgresql")
    )
    renamed = [
        Row(
            bench=row.bench,
            metric=f"one instance without Redis: {row.metric}",
            goal="-",
            measured=row.measured,
            note=row.note,
        )
        for row in rows
        if row.metric.startswith(("token delay under load", "errors", "server CPU"))
    ]
    return [
        *renamed,
        info_row(
            BENCH,
            f"token delay, {args.instances} instances / one without Redis (next run)",
            f"{clustered.p50 / alone.p50:.1f}× p50, {clustered.p99 / alone.p99:.1f}× p99",
            note="the same load one after the other, so the machine's noise may differ",
        ),
    ]


def main(argv: list[str] | None = None) -> list[Row]:
    """Parse arguments, run, print; returns the rows for the runner."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--chats", type=int, default=100)
    parser.add_argument("--rate", type=float, default=50.0, help="tokens per second per chat")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each answer")
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--skip-idle", action="store_true", help="skip the deflate comparison")
    parser.add_argument(
        "--instances",
        type=int,
        default=1,
        help="servers in cluster mode sharing the load (2 or more: PostgreSQL and Redis)",
    )
    parser.add_argument(
        "--alone",
        action="store_true",
        help="with --instances: then the same load on one instance without Redis (PostgreSQL)",
    )
    parser.add_argument("--profile", type=Path, help="profile the loaded server into this file")
    parser.add_argument(
        "--compare-saves",
        action="store_true",
        help="batched against per-answer saves of running answers, side by side",
    )
    parser.add_argument("--samples", type=int, default=50, help="first-token samples a run")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each way, in turn")
    parser.add_argument(
        "--compare-source",
        type=Path,
        metavar="CHECKOUT",
        help="own time to first token of this tree against a checkout of another revision",
    )
    args = parser.parse_args(argv)
    if args.compare_source is not None:
        rows = asyncio.run(compare_source(args.compare_source, args.database, args.samples))
        print_rows(
            f"Own time to first token, {args.compare_source} against this tree"
            f" (idle servers, scripted engine, {args.database})",
            rows,
        )
        return rows
    if args.compare_saves:
        rows = asyncio.run(
            compare_saves(
                args.chats, args.rate, args.seconds, args.database, args.samples, args.rounds
            )
        )
        print_rows(
            f"Partial saves, batched and per answer ({args.chats} chats each at {args.rate:g}"
            f" tokens/s for {args.seconds:g} s, {args.database})",
            rows,
        )
        return rows
    database = "postgresql" if args.instances > 1 else args.database
    rows, loaded = asyncio.run(
        measure(
            args.connections,
            args.chats,
            args.rate,
            args.seconds,
            database,
            args.profile,
            args.instances,
        )
    )
    if args.alone and args.instances > 1:
        rows += await_alone(args, loaded)
    if not args.skip_idle:
        rows += asyncio.run(idle_rows(args.connections, database))
    where = f"{args.instances} instances in cluster mode, " if args.instances > 1 else ""
    print_rows(
        f"Concurrency ({args.connections} connections, {args.chats} chats at {args.rate:g}"
        f" tokens/s for {args.seconds:g} s, {where}{database})",
        rows,
    )
    return rows


if __name__ == "__main__":
    main()

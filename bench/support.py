"""Shared pieces of the benchmarks: the machine, a server process, clients, statistics, rows."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from tests.support.server import unlimited_env
from websockets.asyncio.client import ClientConnection, connect

REPO = Path(__file__).resolve().parents[1]
COOKIE = "blogchat_session"
MB = 1024 * 1024
KB = 1024
POSTGRES_URL = os.environ.get(
    "BLOGCHAT_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("BLOGCHAT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
# Where bench servers write their logs (stdout and stderr), kept after the run; unset: a
# temporary directory, removed with the server (a failure still prints the log's end).
LOG_DIR = os.environ.get("BLOGCHAT_BENCH_LOG_DIR")


# --- the machine --------------------------------------------------------------------------


def machine() -> dict[str, str]:
    """What the figures were measured on, for the results table."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg()
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": f"{os.cpu_count()} ({cpu})",
        "memory": f"{psutil.virtual_memory().total / 1024**3:.1f} GiB",
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "load": f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1/5/15 min, at the start)",
    }


def raise_file_limit(wanted: int = 65536) -> int:
    """Raise this process's open-file limit (children inherit it); returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


# --- statistics ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    """Percentiles of a sample, in the sample's own unit."""

    n: int
    p50: float
    p99: float
    max: float
    mean: float

    def ms(self) -> str:
        """'p50 / p99 ms (n)' for seconds-valued samples."""
        return f"{self.p50 * 1000:.1f} / {self.p99 * 1000:.1f} ms (n={self.n})"


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile (no interpolation: a value that really occurred)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(0, min(len(ordered) - 1, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[rank]


def summarize(values: Sequence[float]) -> Summary:
    """p50, p99, max and mean of a sample."""
    if not values:
        return Summary(0, float("nan"), float("nan"), float("nan"), float("nan"))
    return Summary(
        len(values),
        percentile(values, 0.50),
        percentile(values, 0.99),
        max(values),
        statistics.fmean(values),
    )


# --- result rows --------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the results table: a measured figure against its goal.

    `ratio` is written so that under 1.0 meets the goal: measured / goal when less is
    better, goal / measured when more is better.
    """

    bench: str
    metric: str
    goal: str
    measured: str
    ratio: float | None = None
    passed: bool | None = None
    note: str = ""

    def verdict(self) -> str:
        """PASS, FAIL or '-' (a figure reported without a goal)."""
        if self.passed is None:
            return "-"
        return "PASS" if self.passed else "FAIL"


def goal_row(
    bench: str,
    metric: str,
    *,
    measured: float,
    goal: float,
    unit: str,
    shown: str | None = None,
    higher_is_better: bool = False,
    note: str = "",
) -> Row:
    """A row whose ratio compares a measured value with its goal (≤ 1.0 meets it)."""
    if higher_is_better:
        ratio = goal / measured if measured else float("inf")
        goal_text = f"≥ {goal:g} {unit}".rstrip()
    else:
        ratio = measured / goal if goal else float("inf")
        goal_text = f"< {goal:g} {unit}".rstrip()
    return Row(
        bench=bench,
        metric=metric,
        goal=goal_text,
        measured=shown if shown is not None else f"{measured:.3g} {unit}".rstrip(),
        ratio=ratio,
        passed=ratio <= 1.0 if higher_is_better else ratio < 1.0,
        note=note,
    )


def info_row(bench: str, metric: str, measured: str, note: str = "") -> Row:
    """A figure reported for context, with no goal of its own."""
    return Row(bench=bench, metric=metric, goal="-", measured=measured, note=note)


def print_rows(title: str, rows: Sequence[Row]) -> None:
    """Print rows as an aligned plain-text table."""
    print(f"\n{title}\n")
    header = ("metric", "goal", "measured", "ratio", "")
    cells = [
        (
            row.metric,
            row.goal,
            row.measured,
            "-" if row.ratio is None else f"{row.ratio:.2f}",
            row.verdict(),
        )
        for row in rows
    ]
    widths = [max(len(str(line[i])) for line in [header, *cells]) for i in range(len(header))]
    for line in [header, *cells]:
        padded = (str(cell).ljust(width) for cell, width in zip(line, widths, strict=True))
        print("  " + "  ".join(padded))
    for row in rows:
        if row.note:
            print(f"  * {row.metric}: {row.note}")


def markdown_table(rows: Sequence[Row]) -> str:
    """Rows as a Markdown table (what docs/performance.md shows)."""
    lines = [
        "| benchmark | metric | goal | measured | ratio | result |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        ratio = "-" if row.ratio is None else f"{row.ratio:.2f}"
        lines.append(
            f"| {row.bench} | {row.metric} | {row.goal} | {row.measured} | {ratio} |"
            f" {row.verdict()} |"
        )
    return "\n".join(lines)


# --- a server process ---------------------------------------------------------------------


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class BenchServer:
    """`python -m bench.serve` in a subprocess of its own, so its CPU and memory are its own."""

    engine: str = "scripted"
    database: str = "sqlite"
    deflate: bool = True
    profile: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    # A PostgreSQL schema shared with other servers (`cluster`), which drops it; None: one
    # of this server's own.
    schema: str | None = None
    # The source tree to serve: this one, or a checkout of another revision to compare with
    # (run on this tree's environment).
    source: Path = REPO
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    _tmp: tempfile.TemporaryDirectory[str] | None = None
    _schema: str | None = None

    @property
    def url(self) -> str:
        """http://127.0.0.1:<port>"""
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        """ws://127.0.0.1:<port>/ws"""
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def ps(self) -> psutil.Process:
        """The server process, for CPU and memory figures."""
        assert self.process is not None
        return psutil.Process(self.process.pid)

    def start(self) -> BenchServer:
        """Start on a fresh database and wait until /healthz answers."""
        self._tmp = tempfile.TemporaryDirectory(prefix="blogchat-bench-")
        data = Path(self._tmp.name)
        env = {
            **os.environ,
            "BLOGCHAT_DATA_DIR": str(data),
            "BLOGCHAT_CONTENT_DIR": str(REPO / "content"),
            "BLOGCHAT_PERSONAS_FILE": str(REPO / "config" / "personas.yaml"),
            "BLOGCHAT_SECRET_KEY": "bench-secret-key-0123456789abcdef0123456789",
            "BLOGCHAT_LOG_LEVEL": "WARNING",
            "BLOGCHAT_OFFLINE_TOKENS_PER_SECOND": "0",
            "ANTHROPIC_API_KEY": "",
            "BRAINTRUST_API_KEY": "",
            "PYTHONUNBUFFERED": "1",
            # Every benchmark client is one address: the public limits would throttle them.
            **unlimited_env(),
            **self.env,
        }
        if self.source != REPO:
            env["PYTHONPATH"] = f"{self.source / 'src'}{os.pathsep}{self.source}"
        if self.database == "postgresql":
            if self.schema is None:
                self._schema = f"bench_{uuid.uuid4().hex[:12]}"
            env["DATABASE_URL"] = POSTGRES_URL
            env["BLOGCHAT_DATABASE_SCHEMA"] = self.schema or self._schema or ""
        else:
            env["DATABASE_URL"] = f"sqlite+aiosqlite:///{data / 'blogchat.db'}"
        command = [sys.executable, "-m", "bench.serve", "--port", str(self.port)]
        command += ["--engine", self.engine]
        if not self.deflate:
            command.append("--no-deflate")
        if self.profile is not None:
            command += ["--profile", str(self.profile)]
        log = self.log_path().open("ab")
        self.process = subprocess.Popen(
            command, cwd=self.source, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        # Generous: on the shared machine, under load, importing the app alone took 34 s.
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"bench server exited:\n{self.log()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            time.sleep(0.05)
        printed = self.log()[-3000:]
        # Nothing started may outlive the failure.
        self.stop()
        raise RuntimeError(f"bench server did not start:\n{printed}")

    def log_path(self) -> Path:
        """The file the server's output goes to (module's LOG_DIR, else its data dir)."""
        if LOG_DIR:
            name = self.env.get("BLOGCHAT_INSTANCE_ID", "server")
            Path(LOG_DIR).mkdir(parents=True, exist_ok=True)
            return Path(LOG_DIR) / f"{name}-{self.port}.log"
        assert self._tmp is not None
        return Path(self._tmp.name) / "server.log"

    def log(self) -> str:
        """What the server printed."""
        path = self.log_path()
        return path.read_text(errors="replace") if path.exists() else ""

    def failures(self) -> int:
        """How many tracebacks the server logged (an exception nobody handled, or logged)."""
        return self.log().count("Traceback (most recent call last)")

    def stop(self) -> None:
        """SIGTERM, wait, and clean up the data directory (and PostgreSQL schema)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self._tmp is not None:
            self._report_failures()
        if self._schema is not None:
            _drop_schema(self._schema)
            self._schema = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def _report_failures(self) -> None:
        # A benchmark's errors are the client's view; the server's own reasons are here.
        failures = self.failures()
        if not failures:
            return
        where = f" (whole log: {self.log_path()})" if LOG_DIR else ""
        text = self.log()
        first = text[text.find("Traceback (most recent call last)") :][:4000]
        print(
            f"\nbench server on port {self.port} logged {failures} traceback(s){where};"
            f" the first:\n{first}",
            file=sys.stderr,
        )

    def __enter__(self) -> BenchServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _drop_schema(schema: str) -> None:
    import asyncpg

    async def drop() -> None:
        connection = await asyncpg.connect(POSTGRES_URL, timeout=5)
        try:
            await connection.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        finally:
            await connection.close()

    # In a thread of its own: the caller may be running an event loop (a server started
    # and stopped from inside a benchmark's coroutine).
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, drop()).result()


@contextlib.contextmanager
def server(**kwargs: Any) -> Iterator[BenchServer]:
    """A started BenchServer for the duration of a with-block."""
    bench = BenchServer(**kwargs).start()
    try:
        yield bench
    finally:
        bench.stop()


@contextlib.contextmanager
def cluster(count: int, **kwargs: Any) -> Iterator[list[BenchServer]]:
    """`count` started BenchServers in cluster mode (docs/cluster.md): one PostgreSQL schema
    and one Redis key prefix, both dropped afterwards. A `profile` path profiles the first."""
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    prefix = f"bench-{uuid.uuid4().hex}"
    extra = kwargs.pop("env", {})
    profile = kwargs.pop("profile", None)
    servers: list[BenchServer] = []
    try:
        # One after the other: the first one migrates the database.
        for index in range(count):
            env = {
                "BLOGCHAT_REDIS_URL": REDIS_URL,
                "BLOGCHAT_REDIS_PREFIX": prefix,
                "BLOGCHAT_INSTANCE_ID": f"bench-{index}",
                **extra,
            }
            bench = BenchServer(
                database="postgresql",
                schema=schema,
                env=env,
                profile=profile if index == 0 else None,
                **kwargs,
            )
            servers.append(bench)
            bench.start()
        yield servers
    finally:
        for bench in servers:
            bench.stop()
        _drop_schema(schema)
        _forget_prefix(prefix)


def _forget_prefix(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def process_memory(process: psutil.Process) -> tuple[int, int]:
    """RSS and USS of a process, in bytes."""
    info = process.memory_full_info()
    return info.rss, info.uss


def cpu_seconds(process: psutil.Process) -> float:
    """User + system CPU time a process has used so far."""
    times = process.cpu_times()
    return times.user + times.system


# --- clients ------------------------------------------------------------------------------


async def new_visitor(http: httpx.AsyncClient) -> str:
    """A fresh anonymous visitor's signed cookie (what a first page view hands out)."""
    response = await http.get("/api/me", cookies={})
    response.raise_for_status()
    cookie = response.cookies.get(COOKIE)
    assert cookie, "the server set no session cookie"
    return cookie


async def open_socket(
    server_url: str, cookie: str, *, compression: str | None = "deflate", path: str = "/ws"
) -> ClientConnection:
    """A WebSocket to the server as a browser would open it (cookie, same-site Origin)."""
    return await connect(
        server_url.replace("http://", "ws://") + path,
        origin=server_url,  # type: ignore[arg-type]
        additional_headers={"Cookie": f"{COOKIE}={cookie}"},
        compression=compression,
        max_size=None,
        max_queue=None,
        open_timeout=60,
        ping_interval=None,
    )


def chat_frame(text: str, chat_id: str | None = None) -> str:
    """A `chat` message with a fresh clientMessageId."""
    message: dict[str, Any] = {"type": "chat", "clientMessageId": str(uuid.uuid4()), "text": text}
    if chat_id is not None:
        message["chatId"] = chat_id
    return json.dumps(message)


async def run_turn(
    ws: ClientConnection, text: str, chat_id: str | None = None
) -> list[dict[str, Any]]:
    """Send a question and read every event up to its `done`."""
    await ws.send(chat_frame(text, chat_id))
    events: list[dict[str, Any]] = []
    while True:
        event = json.loads(await ws.recv())
        events.append(event)
        if event["type"] == "error" and "seq" not in event:
            raise RuntimeError(f"refused: {event}")
        if event["type"] == "done":
            return events


@contextlib.contextmanager
def anthropic_api(tokens: int, rate: float = 0) -> Iterator[str]:
    """The Anthropic test server in a process of its own (bench/anthropic_serve.py); yields
    its base URL. Every answer is `tokens` text deltas, `rate` a second (0: no pause)."""
    command = [sys.executable, "-m", "bench.anthropic_serve", "--tokens", str(tokens)]
    api = subprocess.Popen(
        [*command, "--rate", str(rate)], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert api.stdout is not None
        base_url = api.stdout.readline().decode().strip()
        if not base_url.startswith("http"):
            raise RuntimeError(f"the Anthropic test server did not start: {base_url!r}")
        yield base_url
    finally:
        assert api.stdin is not None
        api.stdin.close()
        api.wait(timeout=15)

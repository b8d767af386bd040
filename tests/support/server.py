"""Real blogchat servers for tests: in a thread of the test process, or as a subprocess."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from sqlalchemy import Row
from sqlalchemy import text as sql_text

from blogchat.app import create_app
from blogchat.cli import uvicorn_config
from blogchat.settings import Settings
from blogchat.store.database import Database as StoreDatabase

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class Database:
    """Where a test's server keeps its data: a SQLite file, or a private PostgreSQL schema."""

    kind: str
    url: str
    schema: str | None = None

    def env(self) -> dict[str, str]:
        """The environment variables that select this database."""
        env = {"DATABASE_URL": self.url}
        if self.schema:
            env["BLOGCHAT_DATABASE_SCHEMA"] = self.schema
        return env

    async def rows(self, statement: str, **params: Any) -> list[Row[Any]]:
        """What a query reads from this database, on a connection of its own (from outside
        the server, which may be another process)."""
        url = Settings(_env_file=None, database_url=self.url).database
        database = StoreDatabase(url, schema=self.schema)
        try:
            async with database.engine.connect() as connection:
                return list((await connection.execute(sql_text(statement), params)).all())
        finally:
            await database.dispose()


# The per-visitor and per-address limits a public server runs with would throttle a test
# suite whose every client is one address (127.0.0.1): tests and benchmarks run with these
# instead, and the tests of the limits set the limits they test.
UNLIMITED: dict[str, Any] = {
    "visitor_turns_per_hour": 1_000_000,
    "visitor_tokens_per_day": 10**12,
    "visitor_running_turns": 10_000,
    "address_turns_per_hour": 1_000_000,
    "address_tokens_per_day": 10**12,
    "address_running_turns": 10_000,
    "user_turns_per_day": 1_000_000,
    "user_tokens_per_day": 10**12,
    "user_running_turns": 10_000,
    "chat_queue_limit": 10_000,
    "visitor_connections": 100_000,
    "address_connections": 100_000,
}


def unlimited_env() -> dict[str, str]:
    """UNLIMITED as environment variables, for servers in a process of their own."""
    return {Settings.env_name(field): str(value) for field, value in UNLIMITED.items()}


def settings_for(database: Database, data_dir: Path, **overrides: Any) -> Settings:
    """Settings for a test server: the repo's content and personas, this database."""
    values: dict[str, Any] = {
        "database_url": database.url,
        "database_schema": database.schema,
        "data_dir": data_dir,
        "content_dir": REPO / "content",
        "personas_file": REPO / "config" / "personas.yaml",
        "secret_key": "test-secret-key-that-is-long-enough-0123456789",
        "offline_tokens_per_second": 0,
        "log_level": "WARNING",
        # Tests must never reach a real provider or telemetry backend by accident.
        "anthropic_api_key": None,
        "braintrust_api_key": None,
        # A title request and its `chat_updated` after each first exchange would be one more
        # request and frame in every test; the tests of titles turn them on.
        "chat_titles": False,
        **UNLIMITED,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


class LiveServer:
    """A real uvicorn server running the app in a background thread, on a free port."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Bound here and handed to uvicorn: a port picked first and bound later could be
        # taken in between by another test process.
        self._socket = socket.socket()
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.port: int = self._socket.getsockname()[1]
        self.app = create_app(settings)
        config = uvicorn_config(self.app, settings, host="127.0.0.1", port=self.port)
        config.log_level = "warning"
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name=f"server-{self.port}", daemon=True)
        self._error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def url(self) -> str:
        """http://127.0.0.1:<port>"""
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        """ws://127.0.0.1:<port>/ws"""
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def state(self) -> Any:
        """The running app's state (store, sessions, hub, ...)."""
        return self.app.state

    def _run(self) -> None:
        loop = self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self.server.serve(sockets=[self._socket]))
        except BaseException as exc:  # surfaced by start()
            self._error = exc
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            asyncio.set_event_loop(None)
            loop.close()
            self._socket.close()

    def start(self) -> LiveServer:
        """Start and wait until the server accepts requests."""
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if self._error is not None or not self._thread.is_alive():
                raise RuntimeError(f"server failed to start: {self._error!r}")
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start within 30 s")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Shut down gracefully (lifespan shutdown runs) and wait for the thread."""
        self.server.should_exit = True
        self._thread.join(timeout=30)
        if self._thread.is_alive():
            raise RuntimeError("server did not stop within 30 s")

    def call(self, coro: Any, timeout: float = 30) -> Any:
        """Run a coroutine on the server's event loop (to inspect its state safely)."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def run_sql(self, *statements: str) -> None:
        """Run SQL on the server's own database, in one transaction, from a test's loop."""

        async def run() -> None:
            async with self.state.store.db.engine.begin() as connection:
                for statement in statements:
                    await connection.execute(sql_text(statement))

        assert self.loop is not None
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(run(), self.loop))

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# How long a server process may take to answer /healthz: on a loaded two-core machine the
# imports alone (the Agent SDK's included) took over 50 s.
START_SECONDS = 180.0


class ServerProcess:
    """`python -m blogchat serve` in a subprocess, which a test may kill outright."""

    def __init__(self, env: Mapping[str, str], port: int | None = None) -> None:
        self.port = port or free_port()
        self.env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None

    @property
    def url(self) -> str:
        """http://127.0.0.1:<port>"""
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        """ws://127.0.0.1:<port>/ws"""
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self, log_path: Path) -> ServerProcess:
        """Start and wait for /healthz; whatever goes wrong, no process is left running.

        A port picked free can be taken by another test process before the server binds
        it: then the server is started again on another port.
        """
        self.log_path = log_path
        for _ in range(5):
            if self._start_once(log_path):
                return self
            self.port = free_port()
        raise RuntimeError(f"no free port to start on: {log_path.read_text()[-3000:]}")

    def _start_once(self, log_path: Path) -> bool:
        offset = log_path.stat().st_size if log_path.exists() else 0
        with log_path.open("ab") as log:
            # The child keeps its own copy of the file descriptor.
            self.process = subprocess.Popen(
                [sys.executable, "-m", "blogchat", "serve", "--port", str(self.port)],
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.monotonic() + START_SECONDS
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    output = log_path.read_bytes()[offset:].decode(errors="replace")
                    if "address already in use" in output:
                        return False
                    raise RuntimeError(f"server exited: {output[-3000:]}")
                try:
                    if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                        return True
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
            raise RuntimeError(f"server did not start: {log_path.read_text()[-3000:]}")
        except BaseException:
            self.stop()
            raise

    def kill(self) -> None:
        """SIGKILL: no shutdown, no flush; exactly what a crash looks like."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM and wait."""
        end_process(self.process, grace=20)


def end_process(process: subprocess.Popen[bytes] | None, *, grace: float) -> None:
    """SIGTERM a test's child process and wait `grace` seconds; SIGKILL it if it lingers."""
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@contextmanager
def running(settings: Settings) -> Iterator[LiveServer]:
    """A LiveServer for the duration of a with-block."""
    server = LiveServer(settings).start()
    try:
        yield server
    finally:
        server.stop()

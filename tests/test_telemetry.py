"""Telemetry: every turn traced to Braintrust as a task span with llm and tool spans beneath,
through a real server, WebSocket and database (SQLite and PostgreSQL), the real SDK and CLI
against the Anthropic test server, and spans captured by the Braintrust SDK's test helpers.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from braintrust import logger as bt
from braintrust.env import BraintrustEnv
from braintrust.test_helpers import (
    init_test_logger,
    simulate_login,
    simulate_logout,
)
from braintrust.util import LazyValue

from blogchat.engines.messages.prices import PRICES
from blogchat.settings import Settings
from tests.support.anthropic_server import AnthropicTestServer, error, reply, text, tool_use, usage
from tests.support.claude import (
    claude_engine,
    claude_server_for,
    engine_of,
    slow_down_tool,
)
from tests.support.client import Event, Reader, answer_text
from tests.support.server import (
    REPO,
    Database,
    LiveServer,
    ServerProcess,
    free_port,
    running,
)

PROJECT = "blogchat-telemetry-test"
Row = dict[str, Any]
QUESTION = "How warm should a sourdough starter be kept?"
LONG_ANSWER = "Starters like warmth. " + " ".join(
    f"Sentence number {n} keeps going for a while." for n in range(200)
)


# --- capturing spans ----------------------------------------------------------------------


class Trace:
    """The spans the app logged, merged as Braintrust would store them."""

    def __init__(self, rows: list[Row]) -> None:
        self.rows = rows

    def of_type(self, kind: str) -> list[Row]:
        """The spans of one type (task, llm, tool), in the order they started."""
        found = [row for row in self.rows if row["span_attributes"]["type"] == kind]
        return sorted(found, key=lambda row: row["metrics"]["start"])

    def turns(self) -> list[Row]:
        """The task spans: one per turn."""
        return self.of_type("task")

    def children(self, parent: Row) -> list[Row]:
        """The spans directly beneath one, in the order they started."""
        found = [row for row in self.rows if row.get("span_parents") == [parent["span_id"]]]
        return sorted(found, key=lambda row: row["metrics"]["start"])

    def dump(self) -> str:
        """Everything, as text (to look for what must never be there)."""
        return json.dumps(self.rows, default=str)


class Spans:
    """The in-memory background logger of the Braintrust SDK's test helpers."""

    def __init__(self, memory: Any) -> None:
        self.memory = memory

    def take(self) -> Trace:
        """Every span logged since the last take."""
        return Trace(self.memory.pop())


@pytest.fixture
def memory_logger(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The SDK's in-memory background logger, for this thread and for every other one.

    The SDK's own override is per thread, and the server logs from its own thread, so the
    global background logger is replaced as well (as `braintrust.test_helpers` does).
    """
    # The SDK's test hooks carry no annotations.
    bt._state.reset_parent_state()  # type: ignore[no-untyped-call]
    with bt._internal_with_memory_background_logger() as memory:
        monkeypatch.setattr(
            bt._state, "_global_bg_logger", LazyValue(lambda: memory, use_mutex=False)
        )
        yield memory
    bt._state.reset_parent_state()  # type: ignore[no-untyped-call]


@pytest.fixture
def spans(memory_logger: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Spans]:
    """Spans captured in memory, and a Braintrust login and project that need no network."""
    # init_test_logger replaces the SDK's project lookup for good; have it put back.
    monkeypatch.setattr(bt, "_compute_logger_metadata", bt._compute_logger_metadata)
    simulate_login()
    init_test_logger(PROJECT)
    try:
        yield Spans(memory_logger)
    finally:
        simulate_logout()


def traced(**overrides: Any) -> dict[str, Any]:
    """Settings that turn telemetry on, logging to the in-memory test project."""
    return {"braintrust_api_key": bt.TEST_API_KEY, "braintrust_project": PROJECT, **overrides}


def of_type(events: list[Event], kind: str) -> list[Event]:
    """The protocol events of one type."""
    return [event for event in events if event["type"] == kind]


async def ask(
    server: LiveServer | ServerProcess, *questions: str, register: str | None = None
) -> list[Event]:
    """A reader asks questions in one chat; every event up to the last `done`."""
    async with Reader(server.url) as reader:
        if register:
            await reader.register(register)
        ws = await reader.connect()
        chat_id = None
        events: list[Event] = []
        for question in questions:
            await ws.chat(question, chat_id)
            turn = await ws.until("done", timeout=60)
            chat_id = chat_id or next(e["chatId"] for e in turn if e["type"] == "chat_created")
            events += turn
        return events


def assert_span_shape(span: Row) -> None:
    """A span that was started and ended, with its end no earlier than its start."""
    metrics = span["metrics"]
    assert metrics["start"] <= metrics["end"], span


# --- the Claude engine --------------------------------------------------------------------


@pytest.mark.claude
async def test_a_turn_is_a_task_span_with_an_llm_span_per_model_call_and_a_tool_span_per_tool(
    api: AnthropicTestServer, make_claude_settings: Callable[..., Settings], spans: Spans
) -> None:
    api.when_user_says(
        "starter",
        [
            reply(
                text("Let me look that up. "),
                tool_use("searchBlogContent", {"query": "sourdough starter temperature"}),
                usage(1000, 40),
            ),
            reply(text("Keep it warm, around 24-26 °C."), usage(1500, 60)),
        ],
    )
    settings = make_claude_settings(**traced())
    with claude_server_for(settings) as server:
        events = await ask(server, QUESTION)
    trace = spans.take()

    (turn,) = trace.turns()
    assert turn["span_attributes"]["name"] == "chat turn"
    assert turn["span_parents"] is None or turn["span_parents"] == []
    assert turn["input"] == QUESTION
    assert turn["output"] == answer_text(events)
    assert turn["output"] == "Let me look that up. Keep it warm, around 24-26 °C."
    first, tool, second = trace.children(turn)
    assert [span["span_attributes"]["type"] for span in (first, tool, second)] == [
        "llm",
        "tool",
        "llm",
    ]
    assert {span["root_span_id"] for span in trace.rows} == {turn["root_span_id"]}
    assert len(trace.rows) == 4
    for span in trace.rows:
        assert_span_shape(span)
        assert not span.get("error")

    # The turn: who, what, how long and how many tokens.
    (created,) = of_type(events, "chat_created")
    meta = turn["metadata"]
    assert meta["chat_id"] == created["chatId"]
    assert meta["visitor"] == "anonymous"
    assert meta["model"] == settings.model_haiku
    assert meta["model_alias"] == "haiku"
    assert meta["persona"] == server.state.personas.default.id
    assert meta["engine"] == {"agent-sdk": "claude", "messages": "messages"}[claude_engine()]
    assert meta["stop_reason"] == "complete"
    assert meta["tools"] == ["searchBlogContent"]
    assert meta["attempts"] == 1
    assert "warning" not in meta
    assert "error" not in meta
    metrics = turn["metrics"]
    assert (metrics["prompt_tokens"], metrics["completion_tokens"], metrics["tokens"]) == (
        2500,
        100,
        2600,
    )
    assert 0 < metrics["time_to_first_token"] <= metrics["end"] - metrics["start"]
    if claude_engine() == "agent-sdk":
        # The CLI reports what the turn cost, from its own prices.
        assert metrics["cost_usd"] >= 0
    else:
        # The Messages engine prices the tokens each request reported (prices.py).
        price = PRICES["claude-haiku-4-5"]
        spent = (2500 * price.input + 100 * price.output) / 1_000_000
        assert metrics["cost_usd"] == pytest.approx(float(spent), rel=1e-12)

    # The model calls: what each was given and answered, with its own tokens and timing.
    (call,) = of_type(events, "tool_use")
    assert first["input"] == [{"role": "user", "content": QUESTION}]
    assert first["output"]["content"] == [
        {"type": "text", "text": "Let me look that up. "},
        {
            "type": "tool_use",
            "id": call["toolUseId"],
            "name": "searchBlogContent",
            "input": {"query": "sourdough starter temperature"},
        },
    ]
    assert first["metadata"]["model"] == settings.model_haiku
    assert first["metadata"]["stop_reason"] == "tool_use"
    assert (first["metrics"]["prompt_tokens"], first["metrics"]["completion_tokens"]) == (1000, 40)
    assert first["metrics"]["tokens"] == 1040
    assert first["metrics"]["time_to_first_token"] >= 0
    (result,) = of_type(events, "tool_result")
    (sent,) = second["input"][0]["content"]
    assert sent["type"] == "tool_result"
    assert sent["tool_use_id"] == call["toolUseId"]
    assert json.loads(sent["content"]) == json.loads(result["output"])
    assert second["output"]["content"] == [
        {"type": "text", "text": "Keep it warm, around 24-26 °C."}
    ]
    assert second["metadata"]["stop_reason"] == "end_turn"
    assert (second["metrics"]["prompt_tokens"], second["metrics"]["completion_tokens"]) == (
        1500,
        60,
    )

    # The tool call: its input and output as the reader saw them.
    assert tool["span_attributes"]["name"] == "searchBlogContent"
    assert tool["input"] == {"query": "sourdough starter temperature"}
    assert tool["output"] == result["output"]
    assert tool["metadata"]["tool_use_id"] == call["toolUseId"]
    # Each happens in its turn: the tool runs after the first call, before the second.
    assert first["metrics"]["start"] <= tool["metrics"]["start"]
    assert tool["metrics"]["end"] <= second["metrics"]["start"]
    assert turn["metrics"]["start"] <= first["metrics"]["start"]
    assert second["metrics"]["end"] <= turn["metrics"]["end"]


@pytest.mark.claude
async def test_cache_tokens_and_the_answering_model_reach_the_spans(
    api: AnthropicTestServer, make_claude_settings: Callable[..., Settings], spans: Spans
) -> None:
    api.when_user_says(
        "cached",
        reply(
            text("From the cache."),
            usage(100, 20, cache_read=3000, cache_creation=500),
            model="claude-haiku-4-5-20251001",
        ),
    )
    with claude_server_for(make_claude_settings(**traced())) as server:
        events = await ask(server, "Anything cached?")
    trace = spans.take()

    (turn,) = trace.turns()
    (call,) = trace.children(turn)
    # prompt_tokens holds every input token; the cached ones are also counted apart.
    for span in (turn, call):
        metrics = span["metrics"]
        assert metrics["prompt_tokens"] == 100 + 3000 + 500
        assert metrics["prompt_cached_tokens"] == 3000
        assert metrics["prompt_cache_creation_tokens"] == 500
    # The model that answered, as the provider named it, everywhere.
    assert turn["metadata"]["model"] == "claude-haiku-4-5-20251001"
    assert call["metadata"]["model"] == "claude-haiku-4-5-20251001"
    assert of_type(events, "done")[0]["model"] == "claude-haiku-4-5-20251001"
    assert turn["metadata"]["provider_stop_reason"] == "end_turn"


@pytest.mark.claude
async def test_the_max_turns_limit_is_the_stop_reason_and_its_warning_is_on_the_turn_span(
    api: AnthropicTestServer, make_claude_settings: Callable[..., Settings], spans: Spans
) -> None:
    api.when_user_says(
        "everything",
        [
            reply(text("Searching once. "), tool_use("searchBlogContent", {"query": "bread"})),
            reply(text("Searching twice. "), tool_use("getAuthorInfo", {"author": "mara"})),
            text("This is never asked for."),
        ],
    )
    with claude_server_for(make_claude_settings(**traced(max_turns=2))) as server:
        events = await ask(server, "Tell me everything")
    trace = spans.take()

    (turn,) = trace.turns()
    done = events[-1]
    assert turn["metadata"]["stop_reason"] == "max_turns"
    assert turn["metadata"]["warning"] == done["warning"]
    assert "limit of 2 steps" in turn["metadata"]["warning"]
    assert turn["metadata"]["tools"] == ["searchBlogContent", "getAuthorInfo"]
    assert [s["span_attributes"]["type"] for s in trace.children(turn)] == [
        "llm",
        "tool",
        "llm",
        "tool",
    ]
    assert not turn.get("error")


@pytest.mark.claude
async def test_a_failing_tool_is_a_failed_tool_span_with_its_input_and_the_turn_goes_on(
    api: AnthropicTestServer, make_claude_settings: Callable[..., Settings], spans: Spans
) -> None:
    api.when_user_says(
        "missing post",
        [tool_use("getPost", {"slug": "no-such-post"}), text("That post does not exist.")],
    )
    with claude_server_for(make_claude_settings(**traced())) as server:
        events = await ask(server, "Tell me about the missing post")
    trace = spans.take()

    (turn,) = trace.turns()
    (tool,) = trace.of_type("tool")
    (result,) = of_type(events, "tool_result")
    assert result["isError"] is True
    assert tool["span_parents"] == [turn["span_id"]]
    assert tool["input"] == {"slug": "no-such-post"}
    assert "There is no post 'no-such-post'" in tool["error"]
    assert tool["output"] == result["output"]
    # The turn itself completed.
    assert events[-1]["reason"] == "complete"
    assert turn["metadata"]["stop_reason"] == "complete"
    assert turn["metadata"]["tool_errors"] == ["getPost"]
    assert not turn.get("error")
    assert turn["output"] == "That post does not exist."
    assert [not s.get("error") for s in trace.of_type("llm")] == [True, True]


@pytest.mark.claude
async def test_a_provider_failure_after_retries_fails_the_turn_span_with_the_providers_error(
    api: AnthropicTestServer, make_claude_settings: Callable[..., Settings], spans: Spans
) -> None:
    api.when_user_says("overloaded", error(529), repeat_last=True)
    api.when_user_says("busy", [error(529), text("Here after all.")])
    with claude_server_for(make_claude_settings(**traced())) as server:
        events = await ask(server, "Still overloaded?", "Are you busy now?")
    trace = spans.take()

    failed, recovered = trace.turns()
    (failure,) = of_type(events, "error")
    # What the reader sees is what it would see with telemetry off.
    assert failure["message"] == "Claude is overloaded right now. Try again in a moment."
    assert [e["reason"] for e in of_type(events, "done")] == ["error", "complete"]

    # The first turn: three tries of one model call (the agent CLI retries it), each a
    # failed model call carrying the provider's error.
    calls = trace.children(failed)
    assert [s["span_attributes"]["type"] for s in calls] == ["llm", "llm", "llm"]
    for call in calls:
        assert "529" in call["error"]
        assert call["input"] == [{"role": "user", "content": "Still overloaded?"}]
    assert failed["metadata"]["stop_reason"] == "error"
    assert failed["metadata"]["attempts"] == 1
    context = failed["metadata"]["error"]
    assert context["stage"] == "model_call"
    assert context["code"] == "model_error"
    assert context["retryable"] is True
    assert context["message"] == failure["message"]
    assert "529" in context["provider_error"]
    assert failure["message"] in failed["error"]
    assert "stage: model_call" in failed["error"]
    assert failed["output"] == ""

    # The second turn: one failed call, retried (by the CLI) unseen; the turn succeeded.
    first_try, second_try = trace.children(recovered)
    assert "529" in first_try["error"]
    assert not second_try.get("error")
    assert second_try["output"]["content"] == [{"type": "text", "text": "Here after all."}]
    assert not recovered.get("error")
    assert recovered["metadata"]["stop_reason"] == "complete"
    assert recovered["metadata"]["provider_stop_reason"] == "end_turn"
    assert recovered["metadata"]["attempts"] == 1


@pytest.mark.claude
@pytest.mark.agent_sdk
async def test_an_agent_crash_during_a_tool_names_the_stage_and_the_tool_with_its_input(
    api: AnthropicTestServer, make_claude_settings: Callable[..., Settings], spans: Spans
) -> None:
    api.when_user_says(
        "What day",
        [reply(text("Let me check. "), tool_use("getCurrentDateTime", {})), text("Fine.")],
    )
    with claude_server_for(make_claude_settings(**traced(provider_retries=0))) as server:
        slow_down_tool(server, "getCurrentDateTime", 5.0)
        async with Reader(server.url) as reader:
            ws = await reader.connect()
            await ws.chat("What day is it?")
            created = await ws.expect("chat_created")
            events = await ws.until("tool_use", timeout=60)
            process = engine_of(server).pool.get(created["chatId"])
            assert process is not None
            assert process.pid is not None
            psutil.Process(process.pid).kill()
            events += await ws.until("done", timeout=60)
    trace = spans.take()

    (failure,) = of_type(events, "error")
    (turn,) = trace.turns()
    context = turn["metadata"]["error"]
    assert context["stage"] == "tool_call"
    assert context["tool"]["name"] == "getCurrentDateTime"
    assert context["tool"]["input"] == {}
    assert context["message"] == failure["message"]
    assert "stage: tool_call" in turn["error"]
    (tool,) = trace.of_type("tool")
    assert tool["error"]
    assert turn["output"] == "Let me check. "


@pytest.mark.claude
async def test_a_stopped_turn_is_stopped_and_its_model_call_interrupted_not_failed(
    api: AnthropicTestServer, make_claude_settings: Callable[..., Settings], spans: Spans
) -> None:
    api.when_user_says("warmth", text(LONG_ANSWER, delay=0.02))
    with claude_server_for(make_claude_settings(**traced())) as server:
        async with Reader(server.url) as reader:
            ws = await reader.connect()
            await ws.chat("Do starters like warmth?")
            created = await ws.expect("chat_created")
            events = await ws.until("token", timeout=60)
            events += await ws.until("token")
            await ws.send(type="stop", chatId=created["chatId"])
            events += await ws.until("done")
    trace = spans.take()

    (turn,) = trace.turns()
    assert events[-1]["reason"] == "stopped"
    assert turn["metadata"]["stop_reason"] == "stopped"
    assert turn["output"] == answer_text(events)
    assert not turn.get("error")
    (call,) = trace.children(turn)
    assert call["span_attributes"]["type"] == "llm"
    assert not call.get("error")
    assert call["metadata"]["stop_reason"] == "interrupted"
    # What the model had said when it was interrupted: at least what the reader got.
    (said,) = call["output"]["content"]
    assert LONG_ANSWER.startswith(said["text"])
    assert said["text"].startswith(answer_text(events))


# --- both engines, the visitor, telemetry off ---------------------------------------------


async def test_the_offline_engine_is_traced_with_engine_offline_and_its_tool_spans(
    make_settings: Callable[..., Settings], spans: Spans
) -> None:
    with running(make_settings(**traced())) as server:
        events = await ask(server, "What does the blog say about espresso?")
    trace = spans.take()

    (turn,) = trace.turns()
    assert turn["metadata"]["engine"] == "offline"
    assert turn["metadata"]["model"] == "offline"
    assert turn["metadata"]["stop_reason"] == "complete"
    assert turn["output"] == answer_text(events)
    assert turn["metrics"]["time_to_first_token"] > 0
    tools = trace.children(turn)
    assert tools, "the offline engine searched the blog"
    assert [s["span_attributes"]["type"] for s in tools] == ["tool"] * len(tools)
    assert [s["span_attributes"]["name"] for s in tools] == turn["metadata"]["tools"]
    assert [s["output"] for s in tools] == [e["output"] for e in of_type(events, "tool_result")]
    assert trace.of_type("llm") == []


async def test_the_visitor_is_anonymous_or_registered_and_never_their_email(
    make_settings: Callable[..., Settings], spans: Spans
) -> None:
    email = "telemetry-reader@example.com"
    with running(make_settings(**traced())) as server:
        await ask(server, "Anything about rye?")
        await ask(server, "Anything about espresso?", register=email)
    trace = spans.take()

    anonymous, registered = trace.turns()
    assert anonymous["metadata"]["visitor"] == "anonymous"
    assert registered["metadata"]["visitor"] == "registered"
    assert email not in trace.dump()
    assert "telemetry-reader" not in trace.dump()


async def test_telemetry_off_logs_no_span_and_sets_up_no_braintrust_logger(
    make_settings: Callable[..., Settings], memory_logger: Any
) -> None:
    # The helper's stand-in for the SDK's global background logger: setting up any
    # Braintrust logger reaches for it.
    background = bt._state._global_bg_logger
    with running(make_settings()) as server:
        events = await ask(server, "What does the blog say about espresso?")
        assert server.state.telemetry.enabled is False
    assert events[-1]["reason"] == "complete"
    assert memory_logger.pop() == []
    assert not background.has_succeeded


async def test_the_braintrust_api_url_setting_reaches_the_sdk_through_the_environment(
    make_settings: Callable[..., Settings], spans: Spans, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The SDK has no argument for it; removed again after the test.
    monkeypatch.delenv("BRAINTRUST_API_URL", raising=False)
    api_url = f"http://127.0.0.1:{free_port()}/braintrust-api"
    with running(make_settings(**traced(braintrust_api_url=api_url))) as server:
        assert server.state.telemetry.enabled is True
        assert os.environ["BRAINTRUST_API_URL"] == api_url
        assert BraintrustEnv.API_URL.get(None) == api_url


def test_telemetry_off_never_loads_the_braintrust_sdk(database: Database, tmp_path: Path) -> None:
    script = f"""
import asyncio, json, sys
from pathlib import Path
from tests.support.client import Reader
from tests.support.server import Database, running, settings_for

async def main():
    database = Database({database.kind!r}, {database.url!r}, {database.schema!r})
    with running(settings_for(database, Path({str(tmp_path / "data")!r}))) as server:
        async with Reader(server.url) as reader:
            ws = await reader.connect()
            await ws.chat("What does the blog say about espresso?")
            events = await ws.until("done", timeout=60)
    loaded = sorted(name for name in sys.modules if name.split(".")[0] == "braintrust")
    print(json.dumps({{"reason": events[-1]["reason"], "loaded": loaded}}))

asyncio.run(main())
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome == {"reason": "complete", "loaded": []}


# --- Braintrust out of reach --------------------------------------------------------------
# These run a real `blogchat serve` process: the SDK's background logger and its exit hook
# are per process, and shutting down for real is what must stay bounded.


class SilentServer:
    """Accepts connections on 127.0.0.1 and never answers: a network that swallows requests."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.port: int = self.listener.getsockname()[1]
        self.connections: list[socket.socket] = []
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                connection, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.connections.append(connection)

    def close(self) -> None:
        """Stop listening and drop every connection (whoever waits on one fails at once)."""
        self._closing.set()
        self._thread.join()
        self.listener.close()
        for connection in self.connections:
            connection.close()


@pytest.fixture
def silent_server() -> Iterator[SilentServer]:
    """A server that never answers."""
    server = SilentServer()
    try:
        yield server
    finally:
        server.close()


def traced_process_env(database: Database, data_dir: Path, **settings: str) -> dict[str, str]:
    """Environment of a `blogchat serve` with telemetry on and debug logs."""
    return {
        **database.env(),
        "BLOGCHAT_DATA_DIR": str(data_dir),
        "BLOGCHAT_CONTENT_DIR": str(REPO / "content"),
        "BLOGCHAT_PERSONAS_FILE": str(REPO / "config" / "personas.yaml"),
        "BLOGCHAT_SECRET_KEY": "telemetry-test-secret-key-0123456789abcdef",
        "BLOGCHAT_OFFLINE_TOKENS_PER_SECOND": "0",
        "BLOGCHAT_LOG_LEVEL": "DEBUG",
        "ANTHROPIC_API_KEY": "",
        "BRAINTRUST_API_KEY": "key-for-an-unreachable-braintrust",
        "BRAINTRUST_API_URL": "",
        "BRAINTRUST_ORG_NAME": "",
        **settings,
    }


def telemetry_lines(log_path: Path, level: str) -> list[str]:
    """The server's log lines from the telemetry module at one level."""
    return [
        line
        for line in log_path.read_text(errors="replace").splitlines()
        if f" {level} " in line and " blogchat.telemetry: " in line
    ]


async def wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> bool:
    """Poll until `condition()` holds; False if it never did."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.1)
    return condition()


def exited_on_its_own(server: ServerProcess) -> bool:
    """After stop(): whether SIGTERM was enough (it is followed by SIGKILL after 20 s).

    After a graceful shutdown uvicorn re-raises the SIGTERM, so that is how it exits.
    """
    assert server.process is not None
    return server.process.returncode in (0, -signal.SIGTERM)


def interrupt(server: ServerProcess, within: float = 20.0) -> int | None:
    """Ctrl-C: SIGINT, and the exit status if the process ended within `within` seconds.

    Unlike SIGTERM, it lets the interpreter exit normally, running its exit hooks.
    """
    assert server.process is not None
    server.process.send_signal(signal.SIGINT)
    try:
        return server.process.wait(timeout=within)
    except subprocess.TimeoutExpired:
        return None


async def test_with_braintrust_refusing_connections_turns_finish_and_one_warning_is_logged(
    database: Database, tmp_path: Path
) -> None:
    log_path = tmp_path / "server.log"
    env = traced_process_env(
        database,
        tmp_path / "data",
        BRAINTRUST_APP_URL=f"http://127.0.0.1:{free_port()}",
        BLOGCHAT_TELEMETRY_FLUSH_SECONDS="1",
    )
    server = ServerProcess(env).start(log_path)
    try:
        events = await ask(server, "Anything about rye?", "And espresso?", "And coffee?")

        def complained_after_warning() -> bool:
            lines = [
                line
                for line in log_path.read_text(errors="replace").splitlines()
                if " blogchat.telemetry: " in line
            ]
            warned = [i for i, line in enumerate(lines) if "cannot be sent" in line]
            return bool(warned) and any(" DEBUG " in line for line in lines[warned[0] + 1 :])

        # The SDK's thread fails to send, says why, retries, fails again...
        assert await wait_for(complained_after_warning)
    finally:
        server.stop()

    # ...and that makes one warning, while no reader noticed anything.
    assert of_type(events, "error") == []
    assert [e["reason"] for e in of_type(events, "done")] == ["complete"] * 3
    for done in of_type(events, "done"):
        assert answer_text(events, done["messageId"]).startswith("*Offline mode")
    (warning,) = [line for line in telemetry_lines(log_path, "WARNING") if "cannot be sent" in line]
    assert "Connection refused" in warning
    # The SDK's own printing went to the log, not to stderr by itself.
    for line in log_path.read_text(errors="replace").splitlines():
        if "Encountered error when constructing records" in line:
            assert "telemetry: braintrust:" in line
    assert exited_on_its_own(server)


async def test_with_braintrust_never_answering_turns_finish_and_shutdown_gives_up_in_time(
    database: Database, tmp_path: Path, silent_server: SilentServer
) -> None:
    log_path = tmp_path / "server.log"
    env = traced_process_env(
        database,
        tmp_path / "data",
        BRAINTRUST_APP_URL=f"http://127.0.0.1:{silent_server.port}",
        BLOGCHAT_TELEMETRY_FLUSH_SECONDS="0.5",
    )
    server = ServerProcess(env).start(log_path)
    try:
        events = await ask(server, "Anything about rye?", "And espresso?")
        # The SDK's thread is stuck logging in; a flush would wait for it (30 s and more).
        assert await wait_for(lambda: bool(silent_server.connections))
        status = interrupt(server)
    finally:
        server.stop()

    assert of_type(events, "error") == []
    assert [e["reason"] for e in of_type(events, "done")] == ["complete", "complete"]
    gave_up = [
        line
        for line in telemetry_lines(log_path, "WARNING")
        if "could not be sent within 0.5 s" in line
    ]
    assert len(gave_up) == 1
    # Neither the final flush nor the SDK's exit hook kept the process from ending.
    assert status is not None, "the server did not exit within 20 s of Ctrl-C"

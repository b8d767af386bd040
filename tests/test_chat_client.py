"""The browser's ChatClient and its reducer on their own, in Chromium, with a fake WebSocket.

The page is served by Playwright from the repository's static files (no blogchat server):
a tiny lab page imports /static/js/chat-client.js and adds a scriptable WebSocket, fake
timers and builders for protocol events.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import pytest_asyncio
from playwright.async_api import Page, Route

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]

STATIC = Path(__file__).resolve().parents[1] / "src" / "blogchat" / "web" / "static"
ORIGIN = "http://blogchat.test"

LAB_PAGE = """<!doctype html><meta charset="utf-8"><title>ChatClient lab</title>
<script type="module" src="/lab.js"></script>"""

LAB_SCRIPT = r"""
import * as chat from "/static/js/chat-client.js";

class FakeSocket extends EventTarget {
  constructor(url) {
    super();
    this.url = url;
    this.sent = [];
    this.closed = null;
    lab.sockets.push(this);
  }
  send(data) {
    if (this.closed !== null) throw new Error("closed");
    this.sent.push(JSON.parse(data));
  }
  close(code = 1000) {
    if (this.closed !== null) return;
    this.closed = code;
    this.dispatchEvent(new CloseEvent("close", { code }));
  }
  // What the server does:
  open() { this.dispatchEvent(new Event("open")); }
  receive(...messages) {
    for (const m of messages) {
      this.dispatchEvent(new MessageEvent("message", { data: JSON.stringify(m) }));
    }
  }
  drop(code = 1006) {
    this.closed = code;
    this.dispatchEvent(new CloseEvent("close", { code }));
  }
  frames(type) { return this.sent.filter((f) => f.type === type); }
}

class FakeTimers {
  constructor() { this.pending = new Map(); this.next = 1; this.now = 0; this.history = []; }
  setTimeout = (fn, ms) => {
    const id = this.next++;
    this.pending.set(id, { fn, ms, at: this.now + ms });
    this.history.push(ms);
    return id;
  };
  clearTimeout = (id) => { this.pending.delete(id); };
  /** Run timers until `done()` holds; false if they ran out first. */
  runUntil(done) {
    while (!done()) if (this.runNext() === null) return false;
    return true;
  }
  /** Run the earliest timer; returns its delay, or null when none is pending. */
  runNext() {
    let best = null;
    for (const entry of this.pending) if (!best || entry[1].at < best[1].at) best = entry;
    if (!best) return null;
    this.pending.delete(best[0]);
    this.now = Math.max(this.now, best[1].at);
    best[1].fn();
    return best[1].ms;
  }
}

const CHAT = {
  id: "c1", title: "A chat", model: "haiku", persona: "blog-assistant",
  createdAt: "2025-01-01T00:00:00Z",
};
const ev = {
  subscribed: (lastSeq, messages = null, busy = false) => ({
    type: "subscribed", chatId: "c1", lastSeq, busy, chat: CHAT, ...(messages ? { messages } : {}),
  }),
  user: (seq, id, clientMessageId, text = `question ${seq}`) => ({
    type: "user_message", chatId: "c1", seq, messageId: id, clientMessageId, text,
  }),
  thinking: (seq, id, text) => ({ type: "thinking", chatId: "c1", seq, messageId: id, text }),
  token: (seq, id, text) => ({ type: "token", chatId: "c1", seq, messageId: id, text }),
  toolUse: (seq, id, toolUseId, name = "searchBlogContent", input = { query: "q" }) => ({
    type: "tool_use", chatId: "c1", seq, messageId: id, toolUseId, name, input,
  }),
  toolResult: (seq, id, toolUseId, output, isError = false) => ({
    type: "tool_result", chatId: "c1", seq, messageId: id, toolUseId, output, isError,
  }),
  done: (seq, id, reason = "complete", extra = {}) => ({
    type: "done", chatId: "c1", seq, messageId: id, reason, model: "offline",
    usage: { inputTokens: 3, outputTokens: 5 }, html: `<p>${id}</p>`, ...extra,
  }),
  error: (extra) => ({ type: "error", message: "It failed.", retryable: false, ...extra }),
};

function apply(state, ...events) {
  return events.reduce((s, e) => chat.reduce(s, e), state);
}

/** A client wired to fake sockets and timers; jitter is a fixed 0.5 unless given. */
function makeClient({ storage = chat.memoryStorage(), random = () => 0.5, ...options } = {}) {
  lab.sockets = [];
  const timers = new FakeTimers();
  let ids = 0;
  const client = new chat.ChatClient({
    url: "ws://blogchat.test/ws",
    createSocket: (url) => new FakeSocket(url),
    storage,
    timers,
    random,
    now: () => timers.now,
    newId: () => `cmid-${++ids}`,
    ...options,
  });
  const connections = [];
  client.on("connection", (state, detail) => connections.push({ state, ...detail }));
  /** Run timers until the client opens a new socket; returns the delay that led to it. */
  const reconnect = () => {
    const count = lab.sockets.length;
    let delay = null;
    while (lab.sockets.length === count) {
      delay = timers.runNext();
      if (delay === null) throw new Error("no reconnect was scheduled");
    }
    return delay;
  };
  return { client, timers, connections, storage, reconnect, socket: () => lab.sockets.at(-1) };
}

/** Summaries of a transcript that read well in a Python assertion. */
function summary(state) {
  return state.messages.map((m) =>
    m.kind === "user"
      ? { kind: "user", id: m.id, text: m.text, answerId: m.answerId, local: m.local }
      : { kind: "assistant", id: m.id, text: m.text, thinking: m.thinking, status: m.status,
          replyTo: m.replyTo, tools: m.tools.map((t) => [t.toolUseId, t.state, t.output]),
          warning: m.warning, error: m.error, html: m.html, usage: m.usage },
  );
}

window.lab = {
  ...chat, FakeSocket, FakeTimers, makeClient, ev, apply, summary, sockets: [], ready: true,
};
"""


async def _serve(route: Route) -> None:
    path = urlparse(route.request.url).path
    if path == "/lab.js":
        await route.fulfill(body=LAB_SCRIPT, content_type="text/javascript")
    elif path.startswith("/static/"):
        file = (STATIC / path.removeprefix("/static/")).resolve()
        if STATIC in file.parents and file.is_file():
            await route.fulfill(path=file, content_type="text/javascript")
        else:
            await route.fulfill(status=404, body="not found")
    else:
        await route.fulfill(body=LAB_PAGE, content_type="text/html")


@pytest_asyncio.fixture(loop_scope="session")
async def lab(page: Page) -> Page:
    """A page with the lab loaded: `window.lab` holds chat-client.js and the fakes."""
    await page.route(f"{ORIGIN}/**", _serve)
    await page.goto(f"{ORIGIN}/lab")
    await page.wait_for_function("window.lab && window.lab.ready")
    return page


async def run(lab: Page, script: str, arg: Any = None) -> Any:
    """Evaluate a function body with `lab` in scope and return its (JSON) result."""
    return await lab.evaluate(f"(arg) => {{ {script} }}", arg)


# --- the reducer -----------------------------------------------------------------------


async def test_duplicate_and_stale_events_are_ignored(lab: Page) -> None:
    result = await run(
        lab,
        """
        const { ev, apply, summary } = lab;
        const start = apply(lab.initialState("c1"), ev.subscribed(0, []));
        const events = [
          ev.user(1, "u1", "k1"),
          ev.thinking(2, "a1", "Let me look. "),
          ev.toolUse(3, "a1", "t1"),
          ev.toolResult(4, "a1", "t1", '{"results": []}'),
          ev.token(5, "a1", "Hello "),
          ev.token(6, "a1", "world"),
        ];
        const once = apply(start, ...events);
        // The same events again, then old ones out of order: none may count twice.
        const twice = apply(once, ...events, ev.token(5, "a1", "Hello "), ev.token(3, "a1", "X"),
                            ev.thinking(2, "a1", "again"), ev.user(1, "u1", "k1"));
        const after = apply(twice, ev.token(7, "a1", "!"), ev.token(7, "a1", "!"));
        return { once: summary(once), twice: summary(twice), after: summary(after),
                 lastSeq: after.lastSeq, same: once === twice };
        """,
    )
    assert result["same"], "replayed events must leave the state untouched"
    assert result["once"] == result["twice"]
    answer = result["after"][1]
    assert answer["text"] == "Hello world!"
    assert answer["thinking"] == "Let me look. "
    assert answer["tools"] == [["t1", "ok", '{"results": []}']]
    assert result["lastSeq"] == 7


async def test_a_subscribed_with_history_rebuilds_the_transcript(lab: Page) -> None:
    result = await run(
        lab,
        """
        const { ev, apply, summary } = lab;
        // A transcript that streamed for a while, plus a message not yet confirmed...
        let state = apply(lab.initialState("c1"), ev.subscribed(0, []), ev.user(1, "u1", "k1"),
                          ev.token(2, "a1", "partial"));
        state = lab.reduce(state, { type: "local/send", clientMessageId: "k9", text: "unsent" });
        // ...then the server cannot replay from seq 2 and sends the whole history instead.
        const history = [
          { id: "u1", role: "user", text: "question 1", status: "complete", toolCalls: [],
            createdAt: "2025-01-01T00:00:00Z", clientMessageId: "k1", seqStart: 1, seqEnd: 1 },
          { id: "a1", role: "assistant", text: "partial and the rest", status: "complete",
            toolCalls: [{ toolUseId: "t1", name: "getPost", input: { slug: "x" },
                          output: "{}", isError: false }],
            html: "<p>partial and the rest</p>", createdAt: "2025-01-01T00:00:01Z",
            seqStart: 2, seqEnd: 40 },
        ];
        const rebuilt = lab.reduce(state, ev.subscribed(40, history));
        // Live events continue from the history's lastSeq.
        const next = apply(rebuilt, ev.token(40, "a1", "stale"), ev.user(41, "u2", "k2"));
        return { rebuilt: summary(rebuilt), lastSeq: rebuilt.lastSeq, next: summary(next) };
        """,
    )
    rebuilt = result["rebuilt"]
    assert [m["id"] for m in rebuilt] == ["u1", "a1", "local:k9"]
    assert rebuilt[1]["text"] == "partial and the rest"
    assert rebuilt[1]["status"] == "complete"
    assert rebuilt[1]["html"] == "<p>partial and the rest</p>"
    assert rebuilt[1]["tools"] == [["t1", "ok", "{}"]]
    assert rebuilt[0]["answerId"] == "a1"
    assert result["lastSeq"] == 40
    assert [m["id"] for m in result["next"]] == ["u1", "a1", "u2", "local:k9"]
    assert result["next"][1]["text"] == "partial and the rest"


async def test_answers_go_to_the_earliest_unanswered_message_and_queued_ones_follow(
    lab: Page,
) -> None:
    result = await run(
        lab,
        """
        const { ev, apply, summary } = lab;
        const state = apply(lab.initialState("c1"), ev.subscribed(0, []),
          ev.user(1, "u1", "k1"), ev.token(2, "a1", "first"),
          ev.user(3, "u2", "k2"), ev.user(4, "u3", "k3"),
          ev.token(5, "a1", " answer"), ev.done(6, "a1"),
          ev.token(7, "a2", "second answer"));
        return { messages: summary(state), running: lab.isRunning(state) };
        """,
    )
    order = [(m["kind"], m["id"]) for m in result["messages"]]
    assert order == [
        ("user", "u1"),
        ("assistant", "a1"),
        ("user", "u2"),
        ("assistant", "a2"),
        ("user", "u3"),
    ]
    assert result["messages"][1]["replyTo"] == "u1"
    assert result["messages"][3]["replyTo"] == "u2"
    assert result["messages"][4]["answerId"] is None
    assert result["running"]


async def test_tool_calls_are_tracked_by_tool_use_id_through_running_ok_and_error(
    lab: Page,
) -> None:
    result = await run(
        lab,
        """
        const { ev, apply, summary } = lab;
        const base = apply(lab.initialState("c1"), ev.subscribed(0, []), ev.user(1, "u1", "k1"),
          ev.toolUse(2, "a1", "t1"), ev.toolUse(3, "a1", "t2", "getPost", { slug: "nope" }));
        const running = summary(base)[1].tools;
        const finished = apply(base, ev.toolResult(4, "a1", "t2", "There is no post", true),
                               ev.toolResult(5, "a1", "t1", '{"results": [1, 2]}'));
        const stopped = apply(base, ev.done(4, "a1", "stopped"));
        return { running, finished: summary(finished)[1].tools,
                 stopped: summary(stopped)[1].tools };
        """,
    )
    assert result["running"] == [["t1", "running", None], ["t2", "running", None]]
    assert result["finished"] == [
        ["t1", "ok", '{"results": [1, 2]}'],
        ["t2", "error", "There is no post"],
    ]
    assert result["stopped"] == [["t1", "cancelled", None], ["t2", "cancelled", None]]


async def test_done_records_status_html_usage_warning_and_the_turns_error(lab: Page) -> None:
    result = await run(
        lab,
        """
        const { ev, apply, summary } = lab;
        const start = apply(lab.initialState("c1"), ev.subscribed(0, []), ev.user(1, "u1", "k1"));
        const maxTurns = apply(start, ev.token(2, "a1", "part"),
          ev.done(3, "a1", "max_turns", { warning: "Stopped after 8 steps." }));
        const failed = apply(start,
          ev.error({ code: "model_error", chatId: "c1", seq: 2, retryable: true }),
          ev.done(3, "a1", "error"));
        return { maxTurns: summary(maxTurns)[1], failed: summary(failed)[1],
                 busy: [maxTurns.busy, failed.busy] };
        """,
    )
    assert result["maxTurns"]["status"] == "max_turns"
    assert result["maxTurns"]["warning"] == "Stopped after 8 steps."
    assert result["maxTurns"]["text"] == "part"
    assert result["maxTurns"]["html"] == "<p>a1</p>"
    assert result["maxTurns"]["usage"] == {"inputTokens": 3, "outputTokens": 5}
    assert result["failed"]["status"] == "error"
    assert result["failed"]["error"] == {
        "code": "model_error",
        "message": "It failed.",
        "retryable": True,
    }
    assert result["busy"] == [False, False]


# --- the client ------------------------------------------------------------------------


async def test_unacknowledged_sends_are_resent_with_the_same_client_message_id(
    lab: Page,
) -> None:
    result = await run(
        lab,
        """
        const { ev } = lab;
        const { client, reconnect, socket } = lab.makeClient();
        client.start("c1");
        socket().open();
        socket().receive(ev.subscribed(0, []));
        const id = client.send("Is anyone there?");
        const first = socket().frames("chat");
        socket().drop();             // gone before the server confirmed the message
        reconnect();
        socket().open();
        const second = socket().sent.map((f) => f.type);
        const resent = socket().frames("chat");
        socket().receive(ev.user(1, "m1", id, "Is anyone there?"));
        const outboxAfterAck = client.outbox.length;
        socket().drop();
        reconnect();
        socket().open();
        return { id, first, second, resent, outboxAfterAck,
                 afterAck: socket().frames("chat").length,
                 echoes: client.state.messages.filter((m) => m.local).length };
        """,
    )
    assert [f["clientMessageId"] for f in result["first"]] == [result["id"]]
    # Resubscribe first, then the resend, so the answer lands in a subscribed chat.
    assert result["second"] == ["subscribe", "chat"]
    assert [f["clientMessageId"] for f in result["resent"]] == [result["id"]]
    assert result["resent"][0]["text"] == "Is anyone there?"
    assert result["resent"][0]["chatId"] == "c1"
    assert result["outboxAfterAck"] == 0
    assert result["afterAck"] == 0
    assert result["echoes"] == 0


async def test_a_new_chats_first_message_is_resent_without_creating_a_second_chat(
    lab: Page,
) -> None:
    result = await run(
        lab,
        """
        const { client, reconnect, socket } = lab.makeClient();
        client.start(null);
        socket().open();
        const first = client.send("Hello", { persona: "reading-guide", post: "a-post" });
        const held = client.send("And another thing");
        const beforeCreated = socket().frames("chat").map((f) => f.clientMessageId);
        socket().drop();
        reconnect();
        socket().open();
        const resent = socket().frames("chat");
        socket().receive({ type: "chat_created", chatId: "c1", clientMessageId: first,
                           model: "haiku", persona: "reading-guide" });
        const afterCreated = socket().frames("chat");
        return { first, held, beforeCreated, resent, afterCreated, chatId: client.state.chatId };
        """,
    )
    # The second message waits for the chat the first one creates.
    assert result["beforeCreated"] == [result["first"]]
    assert [f["clientMessageId"] for f in result["resent"]] == [result["first"]]
    assert "chatId" not in result["resent"][0]
    assert result["resent"][0]["persona"] == "reading-guide"
    assert result["resent"][0]["post"] == "a-post"
    assert result["chatId"] == "c1"
    held = [f for f in result["afterCreated"] if f["clientMessageId"] == result["held"]]
    assert len(held) == 1
    assert held[0]["chatId"] == "c1"
    assert "persona" not in held[0]


async def test_resubscribing_asks_for_the_events_after_the_last_seq_seen(lab: Page) -> None:
    result = await run(
        lab,
        """
        const { ev } = lab;
        const { client, reconnect, socket } = lab.makeClient();
        client.start("c1");
        socket().open();
        const initial = socket().frames("subscribe");
        socket().receive(ev.subscribed(4, []), ev.user(5, "u1", "k1"), ev.token(6, "a1", "Hi"),
                         ev.token(7, "a1", " there"));
        socket().drop(1001);
        reconnect();
        socket().open();
        return { initial, again: socket().frames("subscribe") };
        """,
    )
    assert result["initial"] == [{"type": "subscribe", "chatId": "c1", "requestId": "subscribe"}]
    assert result["again"] == [
        {"type": "subscribe", "chatId": "c1", "requestId": "subscribe", "afterSeq": 7}
    ]


async def test_a_reloaded_page_restores_the_transcript_and_resumes_after_its_last_seq(
    lab: Page,
) -> None:
    result = await run(
        lab,
        """
        const { ev } = lab;
        const storage = lab.memoryStorage();
        const before = lab.makeClient({ storage });
        before.client.start("c1");
        before.socket().open();
        before.socket().receive(ev.subscribed(0, []), ev.user(1, "u1", "k1"),
                                ev.token(2, "a1", "Half an"));
        const unsent = before.client.send("queued while streaming");
        before.client.persist();     // what pagehide does
        const after = lab.makeClient({ storage });
        after.client.start("c1");
        after.socket().open();
        after.socket().receive(ev.token(3, "a1", " answer"), ev.done(4, "a1"));
        return { restored: lab.summary(after.client.state), unsent,
                 frames: after.socket().sent };
        """,
    )
    frames = result["frames"]
    assert frames[0] == {
        "type": "subscribe",
        "chatId": "c1",
        "requestId": "subscribe",
        "afterSeq": 2,
    }
    assert [f["clientMessageId"] for f in frames if f["type"] == "chat"] == [result["unsent"]]
    restored = result["restored"]
    assert restored[1]["text"] == "Half an answer"
    assert restored[1]["status"] == "complete"
    assert restored[2]["local"], "the unconfirmed message is still shown as sending"


async def test_backoff_grows_exponentially_with_full_jitter_and_caps(lab: Page) -> None:
    result = await run(
        lab,
        """
        const delaysWith = (random) =>
          Array.from({ length: 9 }, (_, n) => lab.backoffDelay(n, { random }));
        const top = delaysWith(() => 0.999999);
        const none = delaysWith(() => 0);
        // A server that never answers: every attempt fails before opening.
        const { client, connections, reconnect, socket } =
          lab.makeClient({ random: Math.random, maxFailures: 50 });
        client.start("c1");
        const delays = [];
        for (let i = 0; i < 30; i += 1) {
          socket().drop();
          delays.push(reconnect());
        }
        const ceilings = Array.from({ length: 30 }, (_, n) => Math.min(10000, 500 * 2 ** n));
        const states = [...new Set(connections.map((c) => c.state))];
        return { top, none, delays, ceilings, states };
        """,
    )
    assert result["top"] == [499, 999, 1999, 3999, 7999, 9999, 9999, 9999, 9999]
    assert result["none"] == [0] * 9
    delays, ceilings = result["delays"], result["ceilings"]
    assert all(0 <= d < c for d, c in zip(delays, ceilings, strict=True))
    assert len(set(delays)) > 5, "full jitter spreads the attempts out"
    assert max(delays) > 5000, "later attempts wait longer"
    assert result["states"] == ["connecting", "reconnecting"]


async def test_too_many_failures_or_a_lost_network_mean_offline(lab: Page) -> None:
    result = await run(
        lab,
        """
        let online = true;
        let notify = null;
        const network = {
          isOnline: () => online,
          subscribe: (f) => { notify = f; return () => {}; },
        };
        const { client, timers, reconnect, socket } = lab.makeClient({ network, maxFailures: 3 });
        client.start("c1");
        for (let i = 0; i < 3; i += 1) { socket().drop(); reconnect(); }
        const afterFailures = client.connection;
        socket().open();
        const afterOpen = client.connection;
        online = false;
        notify(false);
        const offline = [client.connection, client.connectionDetail.reason, timers.pending.size];
        online = true;
        notify(true);
        const back = client.connection;
        socket().open();
        return { afterFailures, afterOpen, offline, back, now: client.connection };
        """,
    )
    assert result["afterFailures"] == "offline"
    assert result["afterOpen"] == "open"
    assert result["offline"] == ["offline", "network", 0]
    assert result["back"] == "reconnecting"
    assert result["now"] == "open"


async def test_a_silent_connection_is_pinged_then_replaced(lab: Page) -> None:
    result = await run(
        lab,
        """
        const { ev } = lab;
        const { client, timers, socket } =
          lab.makeClient({ heartbeatMs: 1000, heartbeatTimeoutMs: 500 });
        client.start("c1");
        socket().open();
        socket().receive(ev.subscribed(0, []));
        const first = socket();
        const pings = () => first.frames("ping").length;
        timers.runUntil(() => pings() === 1);    // quiet for a heartbeat: ping
        const pinged = pings();
        first.receive({ type: "pong" });         // alive
        const stillOpen = client.connection;
        timers.runUntil(() => pings() === 2);    // quiet again: ping, and this time no answer
        const stateBeforeDeadline = client.connection;
        timers.runUntil(() => client.connection !== "open");
        return { pinged, stillOpen, pings: pings(), stateBeforeDeadline,
                 after: client.connection, closed: first.closed, sockets: lab.sockets.length };
        """,
    )
    assert result["pinged"] == 1
    assert result["stillOpen"] == "open"
    assert result["pings"] == 2
    assert result["stateBeforeDeadline"] == "open"
    assert result["after"] == "reconnecting"
    assert result["closed"] is not None, "the dead socket is closed, not left dangling"


async def test_a_message_the_server_refuses_is_marked_and_not_resent(lab: Page) -> None:
    result = await run(
        lab,
        """
        const { ev } = lab;
        const { client, reconnect, socket } = lab.makeClient();
        client.start("c1");
        socket().open();
        socket().receive(ev.subscribed(0, []));
        const id = client.send("Use Opus please", { model: "opus" });
        socket().receive(ev.error({ code: "model_not_allowed", requestId: id, chatId: "c1",
                                    message: "Sign in to use Opus." }));
        const echo = client.state.messages.find((m) => m.clientMessageId === id);
        socket().drop();
        reconnect();
        socket().open();
        return { delivery: echo.delivery, failure: echo.failure, outbox: client.outbox.length,
                 resent: socket().frames("chat").length, problem: client.state.problem };
        """,
    )
    assert result["delivery"] == "failed"
    assert result["failure"]["message"] == "Sign in to use Opus."
    assert result["outbox"] == 0
    assert result["resent"] == 0
    assert result["problem"] is None


async def test_a_gap_in_seqs_makes_the_client_fetch_the_whole_history(lab: Page) -> None:
    result = await run(
        lab,
        """
        const { ev } = lab;
        const { client, socket } = lab.makeClient();
        client.start("c1");
        socket().open();
        socket().receive(ev.subscribed(0, []), ev.user(1, "u1", "k1"), ev.token(5, "a1", "?"));
        return socket().frames("subscribe");
        """,
    )
    assert len(result) == 2
    assert "afterSeq" not in result[1], "a hole is repaired from the whole history"


# --- robustness, status messages, stop and thinking time --------------------------------


async def test_unknown_and_malformed_messages_leave_the_state_as_it_was(lab: Page) -> None:
    result = await run(
        lab,
        """
        const { ev, apply } = lab;
        const start = apply(lab.initialState("c1"), ev.subscribed(0, []), ev.user(1, "u1", "k1"),
                            ev.token(2, "a1", "Hello"));
        const odd = [
          { type: "reaction", chatId: "c1", seq: 3, emoji: "👍" },   // a type from the future
          { type: "token", chatId: "c1", seq: 3, messageId: "a1" },  // no text
          { type: "token", chatId: "c1", seq: "3", messageId: "a1", text: "!" },
          { type: "done", chatId: "c1", seq: 3 },
          { type: "status", chatId: "c1", state: "dancing" },
          { type: "subscribed", chatId: "c1", lastSeq: 0, messages: "nope" },
          { type: 42 }, null, "token", {},
        ];
        const same = odd.map((event) => lab.reduce(start, event) === start);
        const after = apply(start, ...odd, ev.token(3, "a1", " world"));
        return { same, text: lab.summary(after)[1].text, lastSeq: after.lastSeq };
        """,
    )
    assert all(result["same"]), result["same"]
    assert result["text"] == "Hello world"
    assert result["lastSeq"] == 3


async def test_a_status_message_shows_until_any_later_event_of_its_chat(lab: Page) -> None:
    result = await run(
        lab,
        """
        const { ev, apply } = lab;
        const start = apply(lab.initialState("c1"), ev.subscribed(0, []), ev.user(1, "u1", "k1"));
        const waiting = lab.reduce(start, { type: "status", chatId: "c1", state: "waiting",
                                            position: 2 });
        const retrying = lab.reduce(waiting, { type: "status", chatId: "c1", messageId: "a1",
          state: "retrying", attempt: 2, maxAttempts: 3, retryInMs: 1500 });
        const otherChat = lab.reduce(retrying, { type: "status", chatId: "c2", state: "waiting",
                                                 position: 9 });
        const ping = lab.reduce(retrying, { type: "pong" });
        const token = lab.reduce(retrying, ev.token(2, "a1", "Here"));
        return { waiting: waiting.status, retrying: retrying.status,
                 otherChat: otherChat === retrying, ping: ping.status !== null,
                 afterToken: token.status, text: lab.summary(token)[1].text };
        """,
    )
    assert result["waiting"]["state"] == "waiting"
    assert result["waiting"]["position"] == 2
    assert result["retrying"]["attempt"] == 2
    assert result["retrying"]["maxAttempts"] == 3
    assert result["retrying"]["messageId"] == "a1"
    assert result["otherChat"], "another chat's status is not this chat's"
    assert result["ping"], "a message about no chat leaves the status"
    assert result["afterToken"] is None
    assert result["text"] == "Here"


async def test_stop_freezes_an_answer_at_the_shown_text_and_the_end_of_its_sentence(
    lab: Page,
) -> None:
    result = await run(
        lab,
        """
        const { ev, apply } = lab;
        const running = apply(lab.initialState("c1"), ev.subscribed(0, []), ev.user(1, "u1", "k1"),
                              ev.token(2, "a1", "One sentence. Then the sec"));
        // The page had drawn "One sentence. Then the" when the reader pressed stop.
        const stopping = lab.reduce(running, { type: "local/stopping", shown: { a1: 22 } });
        const visible = [];
        let state = stopping;
        for (const [seq, text] of [[3, "ond one goes"], [4, " on. A third"], [5, " sentence."]]) {
          state = lab.reduce(state, ev.token(seq, "a1", text));
          visible.push(lab.visibleText(state.messages[1]));
        }
        const atBoundary = lab.visibleText({ text: "Done. More text. Even more.", stopAt: 6 });
        const nothingYet = lab.visibleText({ text: "Anything at all.", stopAt: 0 });
        return { stopAt: stopping.messages[1].stopAt, visible, atBoundary, nothingYet,
                 stopping: stopping.stopping };
        """,
    )
    assert result["stopAt"] == 22
    assert result["stopping"]
    # The sentence being written ends; nothing after it appears.
    assert result["visible"] == [
        "One sentence. Then the second one goes",
        "One sentence. Then the second one goes on. ",
        "One sentence. Then the second one goes on. ",
    ]
    assert result["atBoundary"] == "Done. "
    assert result["nothingYet"] == ""


async def test_thinking_time_runs_from_the_first_thinking_to_the_first_thing_done_after(
    lab: Page,
) -> None:
    result = await run(
        lab,
        """
        const { ev } = lab;
        let state = lab.apply(lab.initialState("c1"), ev.subscribed(0, []), ev.user(1, "u1", "k1"));
        state = lab.reduce(state, ev.thinking(2, "a1", "Let me"), { now: 1000 });
        state = lab.reduce(state, ev.thinking(3, "a1", " think."), { now: 2500 });
        state = lab.reduce(state, ev.toolUse(4, "a1", "t1"), { now: 3400 });
        state = lab.reduce(state, ev.token(5, "a1", "Answer"), { now: 9000 });
        const answer = state.messages[1];
        // Without a clock (a history), there is no duration to show.
        const history = lab.apply(lab.initialState("c1"), ev.subscribed(0, []),
          ev.user(1, "u1", "k1"), ev.thinking(2, "a1", "Hm"), ev.token(3, "a1", "Hi"));
        return { ms: answer.thinkingMs, none: history.messages[1].thinkingMs };
        """,
    )
    assert result["ms"] == 2400
    assert result["none"] is None


async def test_a_user_message_that_replaces_the_last_turn_takes_its_place(lab: Page) -> None:
    result = await run(
        lab,
        """
        const { ev, apply, summary } = lab;
        const answered = apply(lab.initialState("c1"), ev.subscribed(0, []),
          ev.user(1, "u1", "k1", "first"), ev.token(2, "a1", "One."), ev.done(3, "a1"),
          ev.user(4, "u2", "k2", "second"), ev.token(5, "a2", "Two."), ev.done(6, "a2"));
        // A regenerate on its way: the echo says what it will replace.
        const sending = lab.reduce(answered, { type: "local/send", clientMessageId: "k3",
          text: "second", replaces: ["u2", "a2"] });
        const replaced = apply(sending,
          { ...ev.user(7, "u3", "k3", "second"), replaces: ["u2", "a2"] },
          ev.token(8, "a3", "Two again."));
        const malformed = lab.reduce(answered,
          { ...ev.user(7, "u3", "k3", "x"), replaces: "u2" });
        const retitled = lab.reduce(answered, { type: "chat_updated", chatId: "c1",
          chat: { id: "c1", title: "A generated title" } });
        const elsewhere = lab.reduce(answered, { type: "chat_updated", chatId: "c2",
          chat: { id: "c2", title: "Not ours" } });
        return {
          echo: summary(sending).map((m) => m.id),
          replacesOfEcho: sending.messages.at(-1).replaces,
          after: summary(replaced).map((m) => [m.id, m.text]),
          lastSeq: replaced.lastSeq,
          malformed: malformed === answered,
          title: retitled.chat.title,
          elsewhere: elsewhere === answered,
        };
        """,
    )
    assert result["echo"] == ["u1", "a1", "u2", "a2", "local:k3"]
    assert result["replacesOfEcho"] == ["u2", "a2"]
    assert result["after"] == [
        ["u1", "first"],
        ["a1", "One."],
        ["u3", "second"],
        ["a3", "Two again."],
    ]
    assert result["lastSeq"] == 8
    assert result["malformed"], "a `replaces` that is not a list of ids is ignored"
    assert result["title"] == "A generated title"
    assert result["elsewhere"], "another chat's update leaves this one"

// The chat's connection and transcript, with no DOM: a ChatClient that keeps one chat in
// sync with the server over the WebSocket (docs/protocol.md), and the pure reducer that
// turns protocol events into that chat's transcript. See docs/ui.md.

/** Where the connection is in its life. */
export const Connection = Object.freeze({
  CONNECTING: "connecting",
  OPEN: "open",
  RECONNECTING: "reconnecting",
  OFFLINE: "offline",
  CLOSED: "closed",
});

/** How an answer can end; `streaming` is an answer still being written. */
export const FINAL_STATUSES = Object.freeze(["complete", "stopped", "max_turns", "error", "incomplete"]);

const STORAGE_PREFIX = "blogchat:v1:";
const OUTBOX_KEY = `${STORAGE_PREFIX}outbox`;

/**
 * The wait before reconnect attempt `attempt` (0-based): exponential with full jitter,
 * so that a server restart is not met by every reader at the same instant.
 */
export function backoffDelay(attempt, { baseMs = 500, capMs = 10_000, random = Math.random } = {}) {
  const ceiling = Math.min(capMs, baseMs * 2 ** Math.max(0, attempt));
  return Math.floor(random() * ceiling);
}

// --- the reducer ----------------------------------------------------------------------

/** The transcript of a chat before anything is known about it (chatId null: a new chat). */
export function initialState(chatId = null) {
  return {
    chatId,
    chat: null,
    lastSeq: 0,
    // Whether the transcript is known to hold every event up to lastSeq.
    synced: false,
    busy: false,
    // The server was idle at this seq: a user message at or before it that has no answer
    // by then never gets one (its turn was lost in a crash).
    settledSeq: 0,
    messages: [],
    // A turn's `error` that arrived before any other event of its answer.
    turnError: null,
    // The last error that is not part of the transcript (shown apart, dismissible).
    problem: null,
    // Why the chat cannot be shown any more (deleted, or never ours).
    gone: null,
    stopping: false,
    // A gap in the seqs was seen: the client must fetch the whole history again.
    resync: false,
    // The server's latest word on a wait that is not part of the transcript (a `status`
    // message: the provider is being retried, or the turn waits for a free assistant).
    // Any later event of the chat replaces it; it is never saved.
    status: null,
  };
}

const STATUS_STATES = new Set(["retrying", "waiting"]);

/** The end of a sentence, as the server's graceful stop finds it (engines/offline.py). */
const SENTENCE_END = /[.!?…:]["'”’)\]*_]*\s|\n/g;

/**
 * What an answer shows: all of its text, or, after the reader pressed stop at `stopAt`
 * characters, that much and the rest of the sentence it was in. The server finishes that
 * sentence and stops; whatever else still arrives is not shown.
 */
export function visibleText(answer) {
  const { text, stopAt } = answer;
  if (typeof stopAt !== "number" || stopAt >= text.length) return text;
  if (stopAt === 0) return "";
  SENTENCE_END.lastIndex = Math.max(0, stopAt - 12);
  for (let match = SENTENCE_END.exec(text); match; match = SENTENCE_END.exec(text)) {
    const end = match.index + match[0].length;
    if (end >= stopAt) return text.slice(0, end);
  }
  return text; // the sentence is still being written
}

/** Whether a turn is running or waiting in this chat. */
export function isRunning(state) {
  return state.messages.some(
    (m) =>
      (m.kind === "assistant" && m.status === "streaming") ||
      (m.kind === "user" && !m.local && !m.answerId && !isOrphan(state, m)),
  );
}

/** A user message whose turn was lost: it will never be answered. */
export function isOrphan(state, message) {
  return (
    message.kind === "user" &&
    !message.local &&
    !message.answerId &&
    message.seq <= state.settledSeq &&
    !state.busy
  );
}

/**
 * The state after one event: a protocol message from the server, or a `local/...` action.
 * `context.now` (ms, any clock) is when the event arrived, for the time an answer thought.
 * Unknown or malformed messages leave the state as it was.
 */
export function reduce(state, event, context = {}) {
  if (!event || typeof event.type !== "string" || !wellFormed(event)) return state;
  const next = apply(state, event, context.now ?? null);
  // Any later event of the chat replaces a status message.
  if (next.status && event.type !== "status" && event.type !== "chat_updated" && event.chatId && event.chatId === next.chatId) {
    return { ...next, status: null };
  }
  return next;
}

const isText = (value) => typeof value === "string";
const isSeq = (value) => Number.isInteger(value) && value >= 0;

/** Whether a server message has the fields the reducer reads, of the right types. */
function wellFormed(event) {
  switch (event.type) {
    case "subscribed":
      return isText(event.chatId) && isSeq(event.lastSeq) && (event.messages == null || Array.isArray(event.messages));
    case "chat_created":
      return isText(event.chatId) && isText(event.clientMessageId);
    case "user_message":
      return (
        isText(event.chatId) &&
        isSeq(event.seq) &&
        isText(event.messageId) &&
        isText(event.text) &&
        (event.replaces == null || (Array.isArray(event.replaces) && event.replaces.every(isText)))
      );
    case "thinking":
    case "token":
      return isText(event.chatId) && isSeq(event.seq) && isText(event.messageId) && isText(event.text);
    case "tool_use":
    case "tool_result":
      return isText(event.chatId) && isSeq(event.seq) && isText(event.messageId) && isText(event.toolUseId);
    case "done":
      return isText(event.chatId) && isSeq(event.seq) && isText(event.messageId) && isText(event.reason);
    case "error":
      return isText(event.message ?? "") && (event.seq == null || isSeq(event.seq));
    case "status":
      return isText(event.chatId) && STATUS_STATES.has(event.state);
    case "chat_updated":
      return isText(event.chatId) && event.chat !== null && typeof event.chat === "object" && isText(event.chat.title);
    default:
      return true;
  }
}

function apply(state, event, now) {
  switch (event.type) {
    case "subscribed":
      return onSubscribed(state, event);
    case "chat_created":
      return onChatCreated(state, event);
    case "user_message":
      return onUserMessage(state, event);
    case "thinking":
    case "token":
    case "tool_use":
    case "tool_result":
      return onAnswerEvent(state, event, now);
    case "done":
      return onDone(state, event, now);
    case "status":
      return onStatus(state, event, now);
    case "chat_updated":
      // A generated title, a rename or a new model: not part of the transcript (no seq).
      return belongs(state, event) ? { ...state, chat: { ...state.chat, ...event.chat } } : state;
    case "error":
      return onError(state, event);
    case "local/send":
      return withMessages(state, [...state.messages, localEcho(event)]);
    case "local/retry":
      return updateEcho(state, event.clientMessageId, { delivery: "sending", failure: null });
    case "local/failed":
      return updateEcho(state, event.clientMessageId, {
        delivery: "failed",
        failure: event.failure,
      });
    case "local/discard":
      return withMessages(
        state,
        state.messages.filter((m) => !(m.local && m.clientMessageId === event.clientMessageId)),
      );
    case "local/stopping":
      return onStopping(state, event);
    case "local/dismiss":
      return state.problem ? { ...state, problem: null } : state;
    case "local/resyncing":
      return { ...state, resync: false, synced: false };
    default:
      // pong, and message types a newer server may add.
      return state;
  }
}

function withMessages(state, messages) {
  return { ...state, messages };
}

function belongs(state, event) {
  return state.chatId !== null && event.chatId === state.chatId;
}

/** Advance lastSeq past a new event; a skipped seq means an event was missed. */
function advance(state, seq) {
  const gap = state.synced && seq > state.lastSeq + 1;
  return { ...state, lastSeq: seq, resync: state.resync || gap };
}

function onSubscribed(state, event) {
  if (!belongs(state, event)) return state;
  let next = {
    ...state,
    chat: event.chat,
    busy: event.busy,
    gone: null,
    resync: false,
    settledSeq: event.busy ? state.settledSeq : Math.max(state.settledSeq, event.lastSeq),
  };
  if (!event.messages) return next; // a replay from our lastSeq follows
  // The server could not replay exactly (too old, or it restarted): rebuild from history.
  const history = fromHistory(event.messages, event.busy);
  const confirmed = new Set(history.map((m) => m.clientMessageId).filter(Boolean));
  const echoes = state.messages.filter((m) => m.local && !confirmed.has(m.clientMessageId));
  next = {
    ...next,
    messages: [...history, ...echoes],
    lastSeq: event.lastSeq,
    synced: true,
    turnError: null,
    stopping: event.busy && state.stopping,
  };
  return next;
}

function onChatCreated(state, event) {
  if (state.chatId === null) {
    // Only the chat this view asked for: a resend from another page must not pull us away.
    const ours = state.messages.some(
      (m) => m.local && m.clientMessageId === event.clientMessageId,
    );
    if (!ours) return state;
  } else if (state.chatId !== event.chatId) {
    return state;
  }
  const first = state.messages.find((m) => m.kind === "user");
  return {
    ...state,
    chatId: event.chatId,
    chat: {
      title: first ? first.text.slice(0, 60) : "New chat",
      ...state.chat,
      id: event.chatId,
      model: event.model,
      persona: event.persona,
    },
    synced: true,
  };
}

function onUserMessage(state, event) {
  if (!belongs(state, event)) return state;
  // The local echo gives way to the confirmed message, however late the confirmation.
  let messages = state.messages.filter(
    (m) => !(m.local && m.clientMessageId === event.clientMessageId),
  );
  const known = messages.some((m) => m.id === event.messageId);
  // A user message is added once by its id, even if its seq is not new: a history sent
  // while the server was still saving it can count its seq without holding it yet.
  if (known) {
    return messages.length === state.messages.length ? state : withMessages(state, messages);
  }
  // A regenerated or edited question takes the place of the turn it replaces.
  if (event.replaces?.length) {
    const replaced = new Set(event.replaces);
    messages = messages.filter((m) => m.local || !replaced.has(m.id));
  }
  const next = event.seq > state.lastSeq ? advance(state, event.seq) : { ...state };
  const message = {
    kind: "user",
    id: event.messageId,
    clientMessageId: event.clientMessageId,
    text: event.text,
    seq: event.seq,
    createdAt: event.createdAt ?? null,
    answerId: null,
    local: false,
  };
  // Before the echoes of messages sent after it, which are still unconfirmed.
  const firstEcho = messages.findIndex((m) => m.local);
  messages =
    firstEcho < 0
      ? [...messages, message]
      : [...messages.slice(0, firstEcho), message, ...messages.slice(firstEcho)];
  return { ...next, messages, busy: true };
}

function onStatus(state, event, now) {
  if (!belongs(state, event)) return state;
  const status = {
    state: event.state,
    messageId: isText(event.messageId) ? event.messageId : null,
    attempt: Number.isInteger(event.attempt) ? event.attempt : null,
    maxAttempts: Number.isInteger(event.maxAttempts) ? event.maxAttempts : null,
    retryInMs: typeof event.retryInMs === "number" ? event.retryInMs : null,
    position: Number.isInteger(event.position) ? event.position : null,
    at: now,
  };
  return { ...state, status };
}

function onStopping(state, event) {
  // The text freezes where the reader pressed stop (see visibleText): at what the page had
  // drawn (`event.shown`, characters per answer id), else at what had arrived.
  const messages = state.messages.map((m) => {
    if (m.kind !== "assistant" || m.status !== "streaming" || typeof m.stopAt === "number") return m;
    const shown = event.shown?.[m.id];
    return { ...m, stopAt: typeof shown === "number" ? Math.min(shown, m.text.length) : m.text.length };
  });
  return { ...state, messages, stopping: true };
}

function onAnswerEvent(state, event, now) {
  if (!belongs(state, event) || event.seq <= state.lastSeq) return state;
  const next = ensureAnswer(advance(state, event.seq), event.messageId, event.seq);
  const messages = [...next.messages];
  const index = messages.findIndex((m) => m.id === event.messageId);
  const answer = { ...messages[index], seqEnd: event.seq };
  if (FINAL_STATUSES.includes(answer.status)) answer.status = "streaming";
  // How long it thought: from its first thinking to the first thing it did after.
  if (now !== null) {
    if (event.type === "thinking" && answer.thinkingStartedAt == null && !answer.thinking) {
      answer.thinkingStartedAt = now;
    } else if (event.type !== "thinking" && answer.thinkingStartedAt != null && answer.thinkingMs == null) {
      answer.thinkingMs = Math.max(0, now - answer.thinkingStartedAt);
    }
  }
  switch (event.type) {
    case "thinking":
      answer.thinking += event.text;
      break;
    case "token":
      answer.text += event.text;
      break;
    case "tool_use":
      answer.tools = [
        ...answer.tools,
        {
          toolUseId: event.toolUseId,
          name: event.name,
          input: event.input ?? {},
          output: null,
          isError: false,
          state: "running",
        },
      ];
      break;
    case "tool_result": {
      const finished = {
        output: event.output,
        isError: event.isError,
        state: event.isError ? "error" : "ok",
      };
      const found = answer.tools.some((t) => t.toolUseId === event.toolUseId);
      answer.tools = found
        ? answer.tools.map((t) => (t.toolUseId === event.toolUseId ? { ...t, ...finished } : t))
        : [...answer.tools, { toolUseId: event.toolUseId, name: "tool", input: {}, ...finished }];
      break;
    }
  }
  messages[index] = answer;
  return { ...next, messages, busy: true };
}

function onDone(state, event, now) {
  if (!belongs(state, event)) return state;
  const existing = state.messages.find((m) => m.id === event.messageId);
  // A `done` whose seq is not new still ends an answer we show as running: a history
  // taken while the server saved the final answer counts that seq without the ending.
  const stillRunning = existing && existing.status === "streaming";
  if (event.seq <= state.lastSeq && !stillRunning) return state;
  let next = event.seq > state.lastSeq ? advance(state, event.seq) : { ...state };
  next = ensureAnswer(next, event.messageId, event.seq);
  const messages = [...next.messages];
  const index = messages.findIndex((m) => m.id === event.messageId);
  const answer = {
    ...messages[index],
    status: event.reason,
    html: typeof event.html === "string" ? event.html : null,
    warning: event.warning ?? null,
    model: event.model ?? null,
    usage: event.usage ?? null,
    seqEnd: Math.max(messages[index].seqEnd ?? 0, event.seq),
    // A tool still running when the turn ended never reports back.
    tools: messages[index].tools.map((t) => (t.state === "running" ? { ...t, state: "cancelled" } : t)),
  };
  if (now !== null && answer.thinkingStartedAt != null && answer.thinkingMs == null) {
    answer.thinkingMs = Math.max(0, now - answer.thinkingStartedAt);
  }
  if (next.turnError && !answer.error) answer.error = next.turnError;
  messages[index] = answer;
  const waiting = messages.some(
    (m) => m.kind === "user" && !m.local && !m.answerId && m.seq > next.settledSeq,
  );
  return { ...next, messages, turnError: null, busy: waiting, stopping: false };
}

function onError(state, event) {
  const failure = {
    code: event.code,
    message: event.message,
    retryable: Boolean(event.retryable),
  };
  if (typeof event.seq === "number") {
    // Part of a transcript: a turn failed. Its `done` follows.
    if (!belongs(state, event) || event.seq <= state.lastSeq) return state;
    const next = advance(state, event.seq);
    const index = next.messages.findIndex(
      (m) => m.kind === "assistant" && m.status === "streaming",
    );
    if (index < 0) return { ...next, turnError: failure };
    const messages = [...next.messages];
    messages[index] = { ...messages[index], error: failure };
    return { ...next, messages };
  }
  const echo = state.messages.find((m) => m.local && m.clientMessageId === event.requestId);
  if (echo) {
    return updateEcho(state, echo.clientMessageId, { delivery: "failed", failure });
  }
  if (event.chatId && state.chatId !== null && event.chatId !== state.chatId) return state;
  if (event.code === "not_found" && event.chatId && event.chatId === state.chatId) {
    return { ...state, gone: failure.message, busy: false, stopping: false };
  }
  return { ...state, problem: failure };
}

/** The state with an assistant message for this id, placed after the message it answers. */
function ensureAnswer(state, messageId, seq) {
  if (state.messages.some((m) => m.id === messageId)) return state;
  // Only one turn runs at a time: an answer still shown as running was cut off.
  const messages = state.messages.map((m) =>
    m.kind === "assistant" && m.status === "streaming" ? { ...m, status: "incomplete" } : m,
  );
  // FIFO: an answer replies to the earliest user message that has none yet. Messages the
  // server had settled before this answer began will never be answered.
  const settledBefore = seq > state.settledSeq ? state.settledSeq : 0;
  const question = messages.findIndex(
    (m) =>
      m.kind === "user" && !m.local && !m.answerId && m.seq < seq && m.seq > settledBefore,
  );
  const answer = {
    ...emptyAnswer(messageId),
    replyTo: question >= 0 ? messages[question].id : null,
    seqStart: seq,
    error: state.turnError,
  };
  let at;
  if (question >= 0) {
    messages[question] = { ...messages[question], answerId: messageId };
    at = question + 1;
    // After earlier answers to the same message (none in practice) and before what follows.
    while (at < messages.length && messages[at].kind === "assistant") at += 1;
  } else {
    at = messages.findIndex((m) => m.local);
    if (at < 0) at = messages.length;
  }
  messages.splice(at, 0, answer);
  return { ...state, messages, turnError: null };
}

function emptyAnswer(id) {
  return {
    kind: "assistant",
    id,
    replyTo: null,
    text: "",
    thinking: "",
    tools: [],
    status: "streaming",
    html: null,
    warning: null,
    error: null,
    model: null,
    usage: null,
    seqStart: null,
    seqEnd: null,
    // Where the reader pressed stop (characters of text), if they did.
    stopAt: null,
    // When its thinking started (the client's clock), and how long it lasted.
    thinkingStartedAt: null,
    thinkingMs: null,
  };
}

function localEcho(event) {
  return {
    kind: "user",
    id: `local:${event.clientMessageId}`,
    clientMessageId: event.clientMessageId,
    text: event.text,
    seq: Infinity,
    createdAt: event.createdAt ?? null,
    answerId: null,
    local: true,
    delivery: "sending",
    failure: null,
    // A regenerate or an edit: the messages it will replace (hidden while it is on its way).
    replaces: Array.isArray(event.replaces) ? event.replaces : null,
  };
}

function updateEcho(state, clientMessageId, changes) {
  let changed = false;
  const messages = state.messages.map((m) => {
    if (m.local && m.clientMessageId === clientMessageId) {
      changed = true;
      return { ...m, ...changes };
    }
    return m;
  });
  return changed ? withMessages(state, messages) : state;
}

/** A chat's stored messages (`subscribed.messages`, `GET /api/chats/{id}`) as a transcript. */
export function fromHistory(history, busy) {
  const messages = [];
  let lastAssistant = -1;
  for (const item of history) {
    if (item.role === "user") {
      messages.push({
        kind: "user",
        id: item.id,
        clientMessageId: item.clientMessageId ?? null,
        text: item.text,
        seq: item.seqStart ?? 0,
        createdAt: item.createdAt ?? null,
        answerId: null,
        local: false,
      });
      continue;
    }
    let question = -1;
    for (let i = messages.length - 1; i >= 0; i -= 1) {
      if (messages[i].kind === "user" && !messages[i].answerId) question = i;
      if (messages[i].kind === "user" && messages[i].answerId) break;
    }
    if (question >= 0) messages[question] = { ...messages[question], answerId: item.id };
    const finished = item.status !== "incomplete";
    messages.push({
      ...emptyAnswer(item.id),
      replyTo: question >= 0 ? messages[question].id : null,
      text: item.text ?? "",
      thinking: item.thinking ?? "",
      tools: (item.toolCalls ?? []).map((call) => ({
        toolUseId: call.toolUseId,
        name: call.name,
        input: call.input ?? {},
        output: call.output ?? null,
        isError: Boolean(call.isError),
        state: call.isError ? "error" : call.output == null ? "running" : "ok",
      })),
      status: item.status,
      html: finished && typeof item.html === "string" ? item.html : null,
      warning: item.warning ?? null,
      error: item.error ? { code: null, message: item.error, retryable: null } : null,
      model: item.model ?? null,
      usage: item.usage ?? null,
      seqStart: item.seqStart ?? null,
      seqEnd: item.seqEnd ?? null,
    });
    lastAssistant = messages.length - 1;
  }
  // While a turn runs, the newest unfinished answer is the one being written.
  if (busy && lastAssistant >= 0 && messages[lastAssistant].status === "incomplete") {
    messages[lastAssistant] = { ...messages[lastAssistant], status: "streaming" };
  }
  for (let i = 0; i < messages.length; i += 1) {
    const m = messages[i];
    if (m.kind === "assistant" && m.status !== "streaming") {
      m.tools = m.tools.map((t) => (t.state === "running" ? { ...t, state: "cancelled" } : t));
    }
  }
  return messages;
}

// --- the client -----------------------------------------------------------------------

/** A Storage-like object kept in memory (when sessionStorage is unavailable). */
export function memoryStorage() {
  const items = new Map();
  return {
    getItem: (key) => (items.has(key) ? items.get(key) : null),
    setItem: (key, value) => void items.set(key, String(value)),
    removeItem: (key) => void items.delete(key),
  };
}

/** A fresh client message id; crypto.randomUUID needs a secure context, this does not. */
export function newClientMessageId() {
  if (globalThis.crypto?.randomUUID) return globalThis.crypto.randomUUID();
  const bytes = globalThis.crypto.getRandomValues(new Uint8Array(16));
  bytes[6] = (bytes[6] & 0x0f) | 0x40;
  bytes[8] = (bytes[8] & 0x3f) | 0x80;
  const hex = [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

/** The browser's view of the network, as the client needs it. */
export function browserNetwork(target = globalThis) {
  return {
    isOnline: () => target.navigator?.onLine !== false,
    subscribe(onChange) {
      const online = () => onChange(true);
      const offline = () => onChange(false);
      target.addEventListener("online", online);
      target.addEventListener("offline", offline);
      return () => {
        target.removeEventListener("online", online);
        target.removeEventListener("offline", offline);
      };
    },
  };
}

const DEFAULTS = {
  baseDelayMs: 500,
  maxDelayMs: 10_000,
  // Consecutive failed attempts before the client says it is offline (and slows down).
  maxFailures: 6,
  heartbeatMs: 20_000,
  heartbeatTimeoutMs: 10_000,
  saveDelayMs: 300,
};

/**
 * Keeps one chat in sync with the server: connects, resumes after drops, resends what the
 * server has not confirmed, and folds every event into a transcript through `reduce`.
 *
 * Listeners: "connection" (state, detail), "state" (chat state, event), "chat" (chatId:
 * the chat was created), "frame" (every server message).
 */
export class ChatClient {
  #listeners = new Map();
  #socket = null;
  #retryTimer = null;
  #heartbeatTimer = null;
  #deadlineTimer = null;
  #saveTimer = null;
  #attempt = 0;
  #failures = 0;
  #opened = false;
  #closed = false;
  #pendingStop = false;
  #unwatchNetwork = null;
  #lastHeard = 0;
  // Messages the server refused, kept so that "try again" sends them as they were.
  #refused = new Map();

  constructor(options = {}) {
    const o = { ...DEFAULTS, ...options };
    this.url = o.url;
    this.createSocket = o.createSocket ?? ((url) => new WebSocket(url));
    this.storage = o.storage ?? memoryStorage();
    this.timers = o.timers ?? {
      setTimeout: (fn, ms) => globalThis.setTimeout(fn, ms),
      clearTimeout: (id) => globalThis.clearTimeout(id),
    };
    this.random = o.random ?? Math.random;
    this.network = o.network ?? null;
    this.newId = o.newId ?? newClientMessageId;
    this.now = o.now ?? (() => globalThis.performance.now());
    this.options = o;
    this.connection = Connection.CONNECTING;
    this.connectionDetail = {};
    this.state = initialState(null);
    this.outbox = this.#loadOutbox();
  }

  // --- listening ---

  /** Call `listener` on `type` events; returns a function that stops it. */
  on(type, listener) {
    if (!this.#listeners.has(type)) this.#listeners.set(type, new Set());
    this.#listeners.get(type).add(listener);
    return () => this.#listeners.get(type).delete(listener);
  }

  #emit(type, ...args) {
    for (const listener of this.#listeners.get(type) ?? []) {
      try {
        listener(...args);
      } catch (error) {
        // A broken listener must not break the connection.
        globalThis.reportError?.(error);
      }
    }
  }

  // --- commands ---

  /** Show a chat (null: a new one) and connect. */
  start(chatId = null) {
    this.state = this.#restore(chatId);
    this.#emit("state", this.state, { type: "local/start" });
    this.#emit("connection", this.connection, this.connectionDetail);
    if (this.network) {
      this.#unwatchNetwork = this.network.subscribe((online) => this.#networkChanged(online));
    }
    this.#connect();
  }

  /** Send a user message; it is kept and resent until the server confirms it. */
  /**
   * Send a message. `regenerate` (the chat's last answer's id) asks its question again
   * in its place, `edit` (the reader's last message's id) replaces that message with
   * `text`; `replaces` lists the messages the page hides meanwhile.
   */
  send(text, { model = null, persona = null, post = null, regenerate = null, edit = null, replaces = null } = {}) {
    const clientMessageId = this.newId();
    const creating = this.state.chatId === null;
    const entry = {
      clientMessageId,
      chatId: this.state.chatId,
      text,
      model,
      // Only a new chat takes a persona and a post; later messages would be refused.
      persona: creating ? persona : null,
      post: creating ? post : null,
      // A second message to a chat not created yet waits for its chatId (else: two chats).
      creates: creating && !this.outbox.some((e) => e.chatId === null && e.creates),
      createdAt: new Date().toISOString(),
      regenerate: creating ? null : regenerate,
      edit: creating ? null : edit,
    };
    this.outbox.push(entry);
    this.#saveOutbox();
    this.#dispatch({ type: "local/send", clientMessageId, text, createdAt: entry.createdAt, replaces });
    this.#sendEntry(entry);
    return clientMessageId;
  }

  /** Send a message again that the server refused with a retryable error. */
  retry(clientMessageId) {
    const entry = this.#refused.get(clientMessageId);
    if (!entry) return;
    this.#refused.delete(clientMessageId);
    const creating = this.state.chatId === null;
    const again = {
      ...entry,
      chatId: this.state.chatId,
      persona: creating ? entry.persona : null,
      post: creating ? entry.post : null,
      creates: creating && !this.outbox.some((e) => e.chatId === null && e.creates),
    };
    this.outbox.push(again);
    this.#saveOutbox();
    this.#dispatch({ type: "local/retry", clientMessageId });
    this.#sendEntry(again);
  }

  /** Forget a message the server refused. */
  discard(clientMessageId) {
    this.#refused.delete(clientMessageId);
    this.#removeFromOutbox(clientMessageId);
    this.#dispatch({ type: "local/discard", clientMessageId });
  }

  /**
   * Stop the running turn (sent on the next connection if there is none now).
   * @param {object} [options]
   * @param {Object<string, number>} [options.shown] characters of each streaming answer the
   *   page shows: the text freezes there (and at the end of that sentence)
   */
  stop({ shown } = {}) {
    if (this.state.chatId === null || !isRunning(this.state)) return;
    this.#dispatch({ type: "local/stopping", shown });
    if (!this.#sendFrame({ type: "stop", chatId: this.state.chatId })) this.#pendingStop = true;
  }

  /** Forget the last non-transcript error. */
  dismissProblem() {
    this.#dispatch({ type: "local/dismiss" });
  }

  /** Try to connect now instead of waiting for the next attempt. */
  reconnectNow() {
    if (this.#closed || this.connection === Connection.OPEN) return;
    this.#failures = 0;
    this.#attempt = 0;
    this.#abandonSocket();
    this.#setConnection(this.#opened ? Connection.RECONNECTING : Connection.CONNECTING);
    this.#connect();
  }

  /** Write the transcript to storage now (call on pagehide). */
  persist() {
    if (this.#saveTimer !== null) {
      this.timers.clearTimeout(this.#saveTimer);
      this.#saveTimer = null;
    }
    this.#saveSnapshot();
  }

  /** Disconnect for good. */
  close() {
    this.persist();
    this.#closed = true;
    this.#unwatchNetwork?.();
    this.#clearTimer("retry");
    this.#stopHeartbeat();
    const socket = this.#socket;
    this.#socket = null;
    try {
      socket?.close(1000, "closed by the page");
    } catch {
      // Already closing.
    }
    this.#setConnection(Connection.CLOSED);
  }

  // --- the connection ---

  #setConnection(state, detail = {}) {
    const changed = state !== this.connection || detail.delayMs !== undefined;
    this.connection = state;
    this.connectionDetail = detail;
    if (changed) this.#emit("connection", state, detail);
  }

  #connect() {
    this.#clearTimer("retry");
    if (this.#closed) return;
    if (this.network && !this.network.isOnline()) {
      this.#setConnection(Connection.OFFLINE, { reason: "network" });
      return;
    }
    // While retrying, the state stays what the last failure made it (reconnecting, or
    // offline after too many failures); only a first attempt is "connecting".
    if (this.connection === Connection.CLOSED || (this.connection === Connection.CONNECTING && !this.#opened)) {
      this.#setConnection(Connection.CONNECTING);
    }
    let socket;
    try {
      socket = this.createSocket(this.url);
    } catch {
      this.#socketEnded(null, 1006);
      return;
    }
    this.#socket = socket;
    socket.addEventListener("open", () => this.#socketOpened(socket));
    socket.addEventListener("message", (event) => this.#socketMessage(socket, event.data));
    socket.addEventListener("close", (event) => this.#socketEnded(socket, event.code));
  }

  #socketOpened(socket) {
    if (socket !== this.#socket) return;
    this.#opened = true;
    this.#failures = 0;
    this.#attempt = 0;
    this.#setConnection(Connection.OPEN);
    // In this order: the server handles a connection's frames one after another, so the
    // subscription is in place before any resent message is answered.
    if (this.state.chatId !== null) this.#subscribe();
    for (const entry of this.outbox) this.#sendEntry(entry);
    if (this.#pendingStop && this.state.chatId !== null && isRunning(this.state)) {
      this.#sendFrame({ type: "stop", chatId: this.state.chatId });
    }
    this.#pendingStop = false;
    this.#startHeartbeat();
  }

  #subscribe() {
    const frame = { type: "subscribe", chatId: this.state.chatId, requestId: "subscribe" };
    if (this.state.synced) frame.afterSeq = this.state.lastSeq;
    this.#sendFrame(frame);
  }

  #socketEnded(socket, code) {
    if (socket !== this.#socket) return; // an old socket we already gave up on
    const wasOpen = this.connection === Connection.OPEN;
    this.#socket = null;
    this.#stopHeartbeat();
    if (this.#closed) return;
    if (code === 4401 || code === 4403) {
      // Retrying cannot help: the page must be loaded again (new cookie, right origin).
      this.#setConnection(Connection.OFFLINE, {
        reason: code === 4401 ? "unauthorized" : "forbidden",
        final: true,
      });
      return;
    }
    if (!wasOpen) this.#failures += 1;
    this.#scheduleReconnect();
  }

  #scheduleReconnect() {
    const online = !this.network || this.network.isOnline();
    const givingUp = !online || this.#failures >= this.options.maxFailures;
    if (!online) {
      // The network tells us when it is back; until then there is nothing to try.
      this.#setConnection(Connection.OFFLINE, { reason: "network" });
      return;
    }
    const delayMs = backoffDelay(givingUp ? Number.MAX_SAFE_INTEGER : this.#attempt, {
      baseMs: this.options.baseDelayMs,
      capMs: this.options.maxDelayMs,
      random: this.random,
    });
    const attempt = this.#attempt;
    this.#attempt += 1;
    this.#setConnection(givingUp ? Connection.OFFLINE : Connection.RECONNECTING, {
      reason: givingUp ? "unreachable" : "dropped",
      attempt,
      delayMs,
    });
    this.#retryTimer = this.timers.setTimeout(() => {
      this.#retryTimer = null;
      this.#connect();
    }, delayMs);
  }

  #networkChanged(online) {
    if (this.#closed) return;
    if (online) {
      if (this.connection !== Connection.OPEN) this.reconnectNow();
      return;
    }
    this.#clearTimer("retry");
    this.#abandonSocket();
    this.#setConnection(Connection.OFFLINE, { reason: "network" });
  }

  /** Stop listening to the current socket and close it without waiting for it. */
  #abandonSocket() {
    const socket = this.#socket;
    this.#socket = null;
    this.#stopHeartbeat();
    try {
      socket?.close(4000, "abandoned");
    } catch {
      // Closing a dead socket may throw; it is gone either way.
    }
  }

  #sendFrame(frame) {
    if (this.connection !== Connection.OPEN || !this.#socket) return false;
    try {
      this.#socket.send(JSON.stringify(frame));
      return true;
    } catch {
      return false;
    }
  }

  #sendEntry(entry) {
    if (entry.chatId === null && !entry.creates) return; // waits for its chat
    const frame = {
      type: "chat",
      clientMessageId: entry.clientMessageId,
      text: entry.text,
      // Errors carry it back, so a refusal can be matched to the message.
      requestId: entry.clientMessageId,
    };
    if (entry.chatId !== null) frame.chatId = entry.chatId;
    if (entry.model) frame.model = entry.model;
    if (entry.persona) frame.persona = entry.persona;
    if (entry.post) frame.post = entry.post;
    if (entry.regenerate) frame.regenerate = entry.regenerate;
    if (entry.edit) frame.edit = entry.edit;
    this.#sendFrame(frame);
  }

  // --- heartbeat: a connection that stopped answering is noticed and replaced ---

  #startHeartbeat() {
    this.#stopHeartbeat();
    this.#lastHeard = this.now();
    this.#scheduleBeat(this.options.heartbeatMs);
  }

  #scheduleBeat(delayMs) {
    this.#heartbeatTimer = this.timers.setTimeout(() => {
      this.#heartbeatTimer = null;
      const quiet = this.now() - this.#lastHeard;
      if (quiet < this.options.heartbeatMs) {
        // Heard from recently enough: no ping needed yet.
        this.#scheduleBeat(this.options.heartbeatMs - quiet);
        return;
      }
      if (this.#sendFrame({ type: "ping" }) && this.#deadlineTimer === null) {
        this.#deadlineTimer = this.timers.setTimeout(() => {
          this.#deadlineTimer = null;
          this.#connectionDied();
        }, this.options.heartbeatTimeoutMs);
      }
      this.#scheduleBeat(this.options.heartbeatMs);
    }, delayMs);
  }

  #stopHeartbeat() {
    this.#clearTimer("heartbeat");
    this.#clearTimer("deadline");
  }

  #connectionDied() {
    if (!this.#socket) return;
    this.#abandonSocket();
    this.#scheduleReconnect();
  }

  #clearTimer(name) {
    if (name === "retry" && this.#retryTimer !== null) {
      this.timers.clearTimeout(this.#retryTimer);
      this.#retryTimer = null;
    } else if (name === "heartbeat" && this.#heartbeatTimer !== null) {
      this.timers.clearTimeout(this.#heartbeatTimer);
      this.#heartbeatTimer = null;
    } else if (name === "deadline" && this.#deadlineTimer !== null) {
      this.timers.clearTimeout(this.#deadlineTimer);
      this.#deadlineTimer = null;
    }
  }

  // --- incoming ---

  #socketMessage(socket, data) {
    if (socket !== this.#socket) return;
    // Anything from the server proves the connection alive.
    this.#lastHeard = this.now();
    this.#clearTimer("deadline");
    let message;
    try {
      message = JSON.parse(data);
    } catch {
      return;
    }
    if (!message || typeof message.type !== "string") return;
    this.#emit("frame", message);
    this.#track(message);
    this.#dispatch(message);
  }

  /** Outbox bookkeeping, for every chat, whichever one is shown. */
  #track(message) {
    if (message.type === "user_message") {
      this.#removeFromOutbox(message.clientMessageId);
    } else if (message.type === "chat_created") {
      let changed = false;
      const creator = this.outbox.find((e) => e.clientMessageId === message.clientMessageId);
      for (const entry of this.outbox) {
        const waiting = entry.chatId === null && (entry === creator || (!entry.creates && creator));
        if (waiting) {
          entry.chatId = message.chatId;
          entry.creates = false;
          changed = true;
          if (entry !== creator) this.#sendEntry(entry);
        }
      }
      if (changed) this.#saveOutbox();
    } else if (message.type === "error" && message.requestId) {
      const entry = this.outbox.find((e) => e.clientMessageId === message.requestId);
      if (!entry) return;
      // Refused: resending the same message would be refused again.
      this.#refuse(entry);
      if (entry.creates) {
        // Messages waiting for the chat this one would have created cannot go either.
        for (const held of this.outbox.filter((e) => e.chatId === null && !e.creates)) {
          this.#refuse(held);
          this.#dispatch({
            type: "local/failed",
            clientMessageId: held.clientMessageId,
            failure: {
              code: message.code,
              message: "Not sent, because the message before it was refused.",
              retryable: true,
            },
          });
        }
      }
    }
  }

  #refuse(entry) {
    this.#refused.set(entry.clientMessageId, entry);
    this.#removeFromOutbox(entry.clientMessageId);
  }

  #dispatch(event) {
    const before = this.state;
    const after = reduce(before, event, { now: this.now() });
    if (after === before) return;
    this.state = after;
    if (before.chatId !== after.chatId && after.chatId !== null) this.#emit("chat", after.chatId);
    this.#emit("state", after, event);
    this.#scheduleSave();
    if (after.resync && this.connection === Connection.OPEN) {
      // A seq was skipped: start over from the whole history rather than show a hole.
      this.state = reduce(after, { type: "local/resyncing" });
      this.#subscribe();
    }
  }

  // --- storage: the transcript and the outbox survive a reload of the tab ---

  #restore(chatId) {
    let state = initialState(chatId);
    if (chatId !== null) {
      try {
        const saved = JSON.parse(this.storage.getItem(`${STORAGE_PREFIX}chat:${chatId}`));
        if (saved && saved.v === 1 && saved.state && saved.state.chatId === chatId) {
          state = { ...initialState(chatId), ...saved.state, problem: null, resync: false, status: null };
        }
      } catch {
        // A damaged snapshot: start from the server's history instead.
      }
    }
    // Echoes come from the outbox only: a sent message the outbox no longer holds was
    // confirmed, and its user_message will be replayed.
    const pending = new Set(this.outbox.map((e) => e.clientMessageId));
    const messages = state.messages
      .filter((m) => !m.local || pending.has(m.clientMessageId))
      .map((m) => (m.kind === "user" && m.local ? { ...m, seq: Infinity } : m));
    const shown = new Set(messages.filter((m) => m.local).map((m) => m.clientMessageId));
    for (const entry of this.outbox) {
      if (entry.chatId === chatId && !shown.has(entry.clientMessageId)) {
        messages.push(localEcho({ ...entry, type: "local/send" }));
      }
    }
    return { ...state, messages };
  }

  #scheduleSave() {
    if (this.#saveTimer !== null) return;
    this.#saveTimer = this.timers.setTimeout(() => {
      this.#saveTimer = null;
      this.#saveSnapshot();
    }, this.options.saveDelayMs);
  }

  #saveSnapshot() {
    const state = this.state;
    if (state.chatId === null) return;
    const key = `${STORAGE_PREFIX}chat:${state.chatId}`;
    if (state.gone) {
      this.#storageRemove(key);
      return;
    }
    const snapshot = { ...state, problem: null, resync: false, stopping: false, status: null };
    try {
      this.storage.setItem(key, JSON.stringify({ v: 1, state: snapshot }, (k, v) => (v === Infinity ? null : v)));
    } catch {
      // Full storage: without a snapshot the next load asks for the whole history.
      this.#storageRemove(key);
    }
  }

  #storageRemove(key) {
    try {
      this.storage.removeItem(key);
    } catch {
      // Nothing more to do.
    }
  }

  #loadOutbox() {
    try {
      const saved = JSON.parse(this.storage.getItem(OUTBOX_KEY));
      return Array.isArray(saved) ? saved.filter((e) => e && typeof e.clientMessageId === "string") : [];
    } catch {
      return [];
    }
  }

  #saveOutbox() {
    try {
      this.storage.setItem(OUTBOX_KEY, JSON.stringify(this.outbox));
    } catch {
      // The outbox is small; if even it does not fit, it lives in memory only.
    }
  }

  #removeFromOutbox(clientMessageId) {
    const before = this.outbox.length;
    this.outbox = this.outbox.filter((e) => e.clientMessageId !== clientMessageId);
    if (this.outbox.length !== before) this.#saveOutbox();
  }
}

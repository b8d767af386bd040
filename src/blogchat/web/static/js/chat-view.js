// The chat page: wires the ChatClient to the transcript, the chat list, the composer and
// the header. Rendering happens at most once per animation frame, whatever the token rate.

import { api } from "./api.js";
import { ChatClient, Connection, browserNetwork, isRunning } from "./chat-client.js";
import { ChatListView } from "./chat-list-view.js";
import { h, icon } from "./dom.js";
import { ModelPicker } from "./model-picker.js";
import { TranscriptView, rewritable } from "./transcript-view.js";

const CONNECTION_LABELS = {
  connecting: "Connecting…",
  open: "Connected",
  reconnecting: "Reconnecting…",
  closed: "Disconnected",
};

const OFFLINE_LABELS = {
  network: "You’re offline",
  unreachable: "Can’t reach the server",
  unauthorized: "Signed out: reload the page",
  forbidden: "Connection refused: reload the page",
};

const SUGGESTIONS = [
  "What are the latest posts?",
  "Who writes this blog?",
  "Which post should I read first?",
];

const POST_SUGGESTIONS = [
  "Summarize this post in a few bullet points",
  "What are the key takeaways?",
  "What should I read after this?",
];

// How close to the end (px) still counts as reading the latest message.
const STICK_DISTANCE = 48;

function sessionStore() {
  try {
    const storage = globalThis.sessionStorage;
    storage.setItem("blogchat:v1:probe", "1");
    storage.removeItem("blogchat:v1:probe");
    return storage;
  } catch {
    return undefined; // the client keeps things in memory then
  }
}

function byId(id) {
  return document.getElementById(id);
}

/** Change an element's text only when it differs (this runs every frame while streaming). */
function setText(el, text) {
  if (el.textContent !== text) el.textContent = text;
}

/** Start the chat page inside `root` (the element rendered by chat.html). */
export function mountChat(root) {
  const config = {
    chatId: root.dataset.chatId || null,
    anonymous: root.dataset.anonymous === "true",
    post: root.dataset.postSlug
      ? { slug: root.dataset.postSlug, title: root.dataset.postTitle, url: root.dataset.postUrl }
      : null,
  };
  const storage = sessionStore();
  const el = {
    sidebar: byId("chat-sidebar"),
    sidebarToggle: byId("sidebar-toggle"),
    sidebarClose: byId("sidebar-close"),
    backdrop: byId("sidebar-backdrop"),
    title: byId("chat-title"),
    personaChip: byId("persona-chip"),
    connection: byId("connection"),
    connectionLabel: byId("connection-label"),
    connectionRetry: byId("connection-retry"),
    offlineNotice: byId("offline-notice"),
    scroller: byId("chat-scroller"),
    empty: byId("empty-state"),
    personaDescription: byId("persona-description"),
    suggestions: byId("suggestions"),
    transcript: byId("transcript"),
    loading: byId("transcript-loading"),
    gone: byId("chat-gone"),
    goneText: byId("chat-gone-text"),
    jump: byId("jump-latest"),
    problem: byId("problem"),
    composer: byId("composer"),
    search: byId("chat-search-input"),
    input: byId("message"),
    persona: byId("persona"),
    personaLock: byId("persona-lock"),
    modelPicker: byId("model-picker"),
    modelHint: byId("model-hint"),
    composerHint: byId("composer-hint"),
    stop: byId("stop"),
    send: byId("send"),
    announcer: byId("announcer"),
  };

  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const client = new ChatClient({
    url: `${scheme}//${location.host}/ws`,
    storage,
    network: browserNetwork(window),
  });
  // For tests and for debugging from the console.
  root.chatClient = client;

  // The page's title ends with the site's name: "<chat> · <site>".
  const siteTitle = document.title.slice(document.title.lastIndexOf(" · ") + 3);
  let personas = [];
  let chats = [];
  let pinned = true;
  let frame = 0;
  let forceStick = true;

  const announce = (text) => {
    el.announcer.textContent = "";
    // A fresh node after a pause, so that the same words twice are still announced.
    setTimeout(() => {
      el.announcer.textContent = text;
    }, 60);
  };

  const transcript = new TranscriptView({
    list: el.transcript,
    announce,
    actions: {
      retry: (id) => client.retry(id),
      discard: (id) => client.discard(id),
      ask: (text) => send(text),
      regenerate: (answer) => regenerate(answer),
      edit: (message) => startEditing(message),
      askAgain: (answer) => {
        // A failed last answer is asked again in its place; an older one as a new message.
        if (rewritable(client.state).lastAnswer === answer.id) regenerate(answer);
        else {
          const question = client.state.messages.find((m) => m.id === answer.replyTo);
          if (question) send(question.text);
        }
      },
    },
  });

  const chatList = new ChatListView({
    list: byId("chat-list"),
    empty: byId("chat-list-empty"),
    rename: async (chatId, title) => {
      await api.rename(chatId, title);
      await refreshChats();
    },
    remove: async (chatId) => {
      await api.remove(chatId);
      if (chatId === client.state.chatId) {
        location.assign("/chat");
        return;
      }
      await refreshChats();
    },
  });

  // --- model choice, kept per chat for this tab ---

  const models = new ModelPicker(el.modelPicker, {
    onChange: (model) => writeModel(client.state.chatId, model),
    onDone: () => el.input.focus(),
  });

  const modelKey = (chatId) => `blogchat:v1:model:${chatId ?? "new"}`;
  const readModel = (chatId) => {
    try {
      return storage?.getItem(modelKey(chatId)) ?? null;
    } catch {
      return null;
    }
  };
  const writeModel = (chatId, model) => {
    try {
      storage?.setItem(modelKey(chatId), model);
    } catch {
      // Not kept across reloads then; the chat's own model still is.
    }
  };
  const chosenModel = () => {
    if (config.anonymous) return "haiku";
    return readModel(client.state.chatId) ?? client.state.chat?.model ?? "haiku";
  };

  // --- rendering, once per frame ---

  function schedule() {
    if (!frame) frame = requestAnimationFrame(flush);
  }

  function flush() {
    frame = 0;
    const state = client.state;
    const before = el.scroller.scrollHeight;
    transcript.render(state, { connection: client.connection });
    renderChrome(state);
    if (forceStick || pinned) {
      el.scroller.scrollTop = el.scroller.scrollHeight;
      forceStick = false;
      pinned = true;
    } else if (el.scroller.scrollHeight > before) {
      el.jump.hidden = false;
    }
  }

  function renderChrome(state) {
    const running = isRunning(state);
    const fresh = state.chatId === null;
    const empty = state.messages.length === 0;

    const listed = chats.find((c) => c.id === state.chatId);
    const title = fresh ? "New chat" : (listed?.title ?? state.chat?.title ?? "Chat");
    if (el.title.textContent !== title) {
      el.title.textContent = title;
      document.title = `${title} · ${siteTitle}`;
    }

    el.empty.hidden = !(fresh && empty);
    el.loading.hidden = !(!fresh && empty && !state.synced && !state.gone);
    el.transcript.setAttribute("aria-busy", String(running));
    el.gone.hidden = !state.gone;
    if (state.gone) el.goneText.textContent = state.gone;

    // The persona is chosen once, when the chat starts.
    const locked = !fresh || !empty;
    const personaId = state.chat?.persona ?? el.persona.value;
    if (locked && personaId && el.persona.value !== personaId && personas.some((p) => p.id === personaId)) {
      el.persona.value = personaId;
    }
    el.persona.disabled = locked || personas.length === 0;
    el.personaLock.toggleAttribute("hidden", !locked); // an SVG element: no .hidden property
    const persona = personas.find((p) => p.id === el.persona.value);
    el.persona.title = locked
      ? "A chat keeps the persona it started with. Start a new chat to switch."
      : (persona?.description ?? "");
    setText(el.personaChip, persona?.name ?? "");
    el.personaChip.parentElement.hidden = !persona;
    el.persona.closest(".picker").hidden = personas.length === 0;
    el.personaChip.parentElement.dataset.locked = String(locked);
    if (persona && el.personaDescription.textContent !== persona.description) {
      el.personaDescription.textContent = persona.description;
    }

    const model = chosenModel();
    if (models.value !== model && !models.isOpen) models.set(model);

    const placeholder = fresh && empty ? el.input.dataset.placeholder : "Ask a follow-up…";
    if (el.input.placeholder !== placeholder) el.input.placeholder = placeholder;

    el.stop.hidden = !running;
    el.stop.disabled = state.stopping;
    setText(el.stop.querySelector(".button__label"), state.stopping ? "Stopping…" : "Stop");
    el.send.disabled = Boolean(state.gone);
    el.input.disabled = Boolean(state.gone);

    const problem = state.problem;
    el.problem.hidden = !problem;
    if (problem && el.problem.dataset.code !== `${problem.code}:${problem.message}`) {
      el.problem.dataset.code = `${problem.code}:${problem.message}`;
      el.problem.replaceChildren(
        icon("alert"),
        h(
          "p",
          {},
          problem.message,
          " ",
          h("span", { class: "problem__advice" }, problem.retryable ? "Trying again should work." : "Trying again will not help."),
        ),
        h("button", { type: "button", class: "icon-button", "aria-label": "Dismiss", onclick: () => client.dismissProblem() }, icon("close")),
      );
    }
    if (!problem) delete el.problem.dataset.code;
  }

  function renderConnection(state, detail) {
    el.connection.dataset.state = state;
    el.connection.dataset.reason = detail.reason ?? "";
    const label = state === Connection.OFFLINE ? (OFFLINE_LABELS[detail.reason] ?? "Offline") : CONNECTION_LABELS[state];
    el.connectionLabel.textContent = label;
    const final = Boolean(detail.final);
    el.connectionRetry.hidden = !(state === Connection.OFFLINE || state === Connection.RECONNECTING);
    el.connectionRetry.textContent = final ? "Reload" : "Retry now";
    el.connectionRetry.onclick = final ? () => location.reload() : () => client.reconnectNow();
    el.composerHint.textContent =
      state === Connection.OPEN || state === Connection.CONNECTING
        ? ""
        : "You can keep writing: messages go out as soon as the connection is back.";
  }

  // --- the chat list ---

  async function refreshChats() {
    const query = el.search.value.trim();
    try {
      chats = query ? await api.searchChats(query) : await api.chats();
    } catch {
      return; // the list stays as it was; the chat itself goes on over the socket
    }
    // A newer search may have been typed meanwhile: only the latest one is shown.
    if (query !== el.search.value.trim()) return;
    chatList.show(chats, client.state.chatId, { query: query || null });
    schedule();
  }

  let refreshTimer = 0;
  function refreshChatsSoon() {
    clearTimeout(refreshTimer);
    refreshTimer = setTimeout(refreshChats, 250);
  }

  // --- sending ---

  function send(text) {
    const message = text.trim();
    if (!message || client.state.gone) return false;
    const fresh = client.state.chatId === null;
    client.send(message, {
      model: config.anonymous ? null : models.value,
      persona: fresh ? el.persona.value || null : null,
      post: fresh && config.post ? config.post.slug : null,
    });
    forceStick = true;
    schedule();
    return true;
  }

  /** The messages from `id` to the end: what a regenerate or an edit replaces. */
  function turnFrom(id) {
    const settled = client.state.messages.filter((m) => !m.local);
    const start = settled.findIndex((m) => m.id === id);
    return start < 0 ? [] : settled.slice(start).map((m) => m.id);
  }

  function regenerate(answer) {
    const question = client.state.messages.find((m) => m.id === answer.replyTo);
    if (!question || client.state.gone) return;
    stopEditing();
    client.send(question.text, {
      model: config.anonymous ? null : models.value,
      regenerate: answer.id,
      replaces: turnFrom(question.id),
    });
    forceStick = true;
    schedule();
    el.input.focus();
  }

  // --- editing the reader's last message: it goes back into the composer ---

  let editing = null;
  const editBar = h(
    "div",
    { class: "editing", hidden: true },
    h("span", { class: "editing__label", id: "editing-label" }, icon("pencil"), " Editing your message"),
    h("button", { type: "button", class: "text-button", onclick: () => stopEditing({ clear: true }) }, "Cancel"),
  );
  el.composer.before(editBar);

  function startEditing(message) {
    editing = { id: message.id, before: el.input.value };
    editBar.hidden = false;
    el.input.value = message.text;
    el.input.setAttribute("aria-describedby", "editing-label composer-hint");
    autosize();
    el.input.focus();
    el.input.setSelectionRange(el.input.value.length, el.input.value.length);
  }

  function stopEditing({ clear = false } = {}) {
    if (!editing) return;
    if (clear) el.input.value = editing.before;
    editing = null;
    editBar.hidden = true;
    el.input.setAttribute("aria-describedby", "composer-hint");
    autosize();
  }

  function submitComposer() {
    if (editing) {
      const text = el.input.value.trim();
      if (!text || client.state.gone) return;
      const { id } = editing;
      if (rewritable(client.state).lastQuestion !== id) {
        // Something ran meanwhile: the edit goes as a new message instead.
        stopEditing();
        if (send(text)) el.input.value = "";
      } else {
        client.send(text, { model: config.anonymous ? null : models.value, edit: id, replaces: turnFrom(id) });
        stopEditing();
        el.input.value = "";
        forceStick = true;
        schedule();
      }
      autosize();
      el.input.focus();
      return;
    }
    if (send(el.input.value)) {
      el.input.value = "";
      autosize();
    }
    el.input.focus();
  }

  function autosize() {
    el.input.style.height = "auto";
    el.input.style.height = `${Math.min(el.input.scrollHeight, 240)}px`;
  }

  // --- events ---

  client.on("state", (state, event) => {
    schedule();
    if (event.type === "done" || event.type === "chat_updated") refreshChatsSoon();
  });
  client.on("connection", (state, detail) => {
    renderConnection(state, detail);
    schedule(); // a streaming answer shows that it is paused
  });
  client.on("chat", (chatId) => {
    // The first message created the chat: it now has an address of its own, and signing
    // in from this page should come back to it.
    history.replaceState(null, "", `/chat/${encodeURIComponent(chatId)}`);
    for (const link of document.querySelectorAll('a[href^="/login?next="], a[href^="/register?next="]')) {
      const url = new URL(link.href);
      url.searchParams.set("next", location.pathname);
      link.href = url.pathname + url.search;
    }
    const model = readModel(null);
    if (model) writeModel(chatId, model);
    chatList.select(chatId);
    refreshChatsSoon();
  });

  el.search.form.addEventListener("submit", (event) => {
    event.preventDefault();
    refreshChats();
  });
  el.search.addEventListener("input", () => {
    clearTimeout(refreshTimer);
    refreshTimer = setTimeout(refreshChats, 200);
  });

  el.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    submitComposer();
  });
  el.input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.altKey && !event.isComposing) {
      event.preventDefault();
      submitComposer();
    }
  });
  el.input.addEventListener("input", autosize);
  el.stop.addEventListener("click", () => {
    client.stop({ shown: transcript.shownText() });
    el.input.focus();
  });
  el.persona.addEventListener("change", () => schedule());
  el.suggestions.addEventListener("click", (event) => {
    const button = event.target.closest("button[data-prompt]");
    if (button) {
      send(button.dataset.prompt);
      el.input.focus();
    }
  });
  el.jump.addEventListener("click", () => {
    el.scroller.scrollTo({ top: el.scroller.scrollHeight, behavior: "smooth" });
    el.input.focus();
  });
  el.scroller.addEventListener(
    "scroll",
    () => {
      const distance = el.scroller.scrollHeight - el.scroller.scrollTop - el.scroller.clientHeight;
      pinned = distance < STICK_DISTANCE;
      if (pinned) el.jump.hidden = true;
    },
    { passive: true },
  );
  // The composer growing, or the phone's keyboard opening, must not leave the end hidden.
  new ResizeObserver(() => {
    if (pinned) el.scroller.scrollTop = el.scroller.scrollHeight;
  }).observe(el.scroller);

  const setSidebar = (open) => {
    el.sidebar.dataset.open = String(open);
    el.backdrop.hidden = !open;
    el.sidebarToggle.setAttribute("aria-expanded", String(open));
    if (open) el.sidebar.querySelector("a, button")?.focus();
  };
  el.sidebarToggle.addEventListener("click", () => setSidebar(el.sidebar.dataset.open !== "true"));
  el.sidebarClose.addEventListener("click", () => {
    setSidebar(false);
    el.sidebarToggle.focus();
  });
  el.backdrop.addEventListener("click", () => setSidebar(false));

  document.addEventListener("keydown", (event) => {
    if (event.key !== "Escape" || event.defaultPrevented) return;
    if (el.sidebar.dataset.open === "true") {
      setSidebar(false);
      el.sidebarToggle.focus();
      return;
    }
    if (editing) {
      event.preventDefault();
      stopEditing({ clear: true });
      el.input.focus();
      return;
    }
    if (isRunning(client.state)) {
      event.preventDefault();
      client.stop({ shown: transcript.shownText() });
      el.input.focus();
    }
  });
  window.addEventListener("pagehide", () => client.persist());

  // --- start ---

  const suggestions = config.post ? POST_SUGGESTIONS : SUGGESTIONS;
  el.suggestions.replaceChildren(
    ...suggestions.map((prompt) => h("li", {}, h("button", { type: "button", class: "suggestion", dataset: { prompt } }, prompt))),
  );

  renderConnection(client.connection, {});
  client.start(config.chatId);
  schedule();
  if (matchMedia("(pointer: fine)").matches) el.input.focus();

  api
    .personas()
    .then((list) => {
      personas = list;
      el.persona.replaceChildren(...list.map((p) => h("option", { value: p.id }, p.name)));
      const fallback = list.find((p) => p.default) ?? list[0];
      if (fallback) el.persona.value = client.state.chat?.persona ?? fallback.id;
      schedule();
    })
    .catch(() => {});
  api
    .models()
    .then((list) => {
      models.describe(list);
      el.modelHint.hidden = !config.anonymous;
      if (el.offlineNotice) el.offlineNotice.hidden = !list.some((m) => m.engine === "offline");
      schedule();
    })
    .catch(() => {});
  refreshChats();
  return client;
}

// The transcript: one list item per message, patched in place. `render(state)` is called at
// most once per animation frame with the latest state; only messages whose object changed
// are touched, and streaming text is appended to a text node rather than re-rendered.

import { FINAL_STATUSES, isOrphan } from "./chat-client.js";
import { h, icon } from "./dom.js";
import { describeTool, toolDetail, toolStateLabel, toolStatusIcon } from "./tool-cards.js";

const MODEL_NAMES = { haiku: "Haiku", sonnet: "Sonnet", opus: "Opus", offline: "Offline mode" };

function modelName(model) {
  if (!model) return "";
  if (MODEL_NAMES[model]) return MODEL_NAMES[model];
  for (const [alias, name] of Object.entries(MODEL_NAMES)) {
    if (model.includes(alias)) return name;
  }
  return model;
}

function tokens(usage) {
  if (!usage) return "";
  const total = (usage.inputTokens ?? 0) + (usage.outputTokens ?? 0);
  return total ? `${total.toLocaleString()} tokens` : "";
}

/** Each user message's phase: sending, failed, waiting, queued, answered or unanswered. */
export function userPhases(state) {
  const phases = new Map();
  let ahead = state.messages.some((m) => m.kind === "assistant" && m.status === "streaming");
  for (const m of state.messages) {
    if (m.kind !== "user") continue;
    if (m.local) phases.set(m.id, m.delivery === "failed" ? "failed" : "sending");
    else if (m.answerId) phases.set(m.id, "answered");
    else if (isOrphan(state, m)) phases.set(m.id, "unanswered");
    else {
      phases.set(m.id, ahead ? "queued" : "waiting");
      ahead = true;
    }
  }
  return phases;
}

export class TranscriptView {
  #nodes = new Map();
  #placeholder = null;
  #announced = new Set();

  /**
   * @param {object} options
   * @param {HTMLOListElement} options.list where the messages go
   * @param {(text: string) => void} options.announce tells screen readers, politely
   * @param {object} options.actions retry(clientMessageId), discard(clientMessageId), ask(text)
   */
  constructor({ list, announce, actions }) {
    this.list = list;
    this.announce = announce;
    this.actions = actions;
  }

  /** Bring the list in line with the state. */
  render(state) {
    const phases = userPhases(state);
    const seen = new Set();
    let previous = null;
    const place = (el) => {
      const expected = previous ? previous.nextElementSibling : this.list.firstElementChild;
      if (expected !== el) this.list.insertBefore(el, expected);
      previous = el;
    };
    let waitingFor = null;
    for (const message of state.messages) {
      const key = keyOf(message);
      let node = this.#nodes.get(key);
      const phase = phases.get(message.id) ?? null;
      if (!node) {
        node = message.kind === "user" ? this.#createUser(message) : this.#createAnswer(message);
        this.#nodes.set(key, node);
        // Finished answers that arrive whole (history) are not news; live ones are.
        if (message.kind === "assistant" && message.status !== "streaming") {
          this.#announced.add(message.id);
        }
      }
      if (node.message !== message || node.phase !== phase) {
        if (message.kind === "user") this.#patchUser(node, message, phase);
        else this.#patchAnswer(node, message);
        node.message = message;
        node.phase = phase;
      }
      place(node.el);
      seen.add(key);
      if (phase === "waiting") {
        waitingFor = message.id;
        // The answer about to start: hold its place so nothing jumps when it arrives.
        place(this.#pendingAnswer());
      }
    }
    if (!waitingFor && this.#placeholder) {
      this.#placeholder.remove();
      this.#placeholder = null;
    }
    for (const [key, node] of this.#nodes) {
      if (!seen.has(key)) {
        node.el.remove();
        this.#nodes.delete(key);
      }
    }
  }

  /** Forget everything drawn (before showing another chat). */
  clear() {
    this.list.replaceChildren();
    this.#nodes.clear();
    this.#placeholder = null;
  }

  #pendingAnswer() {
    if (!this.#placeholder) {
      this.#placeholder = h(
        "li",
        { class: "msg msg--assistant msg--pending", "aria-label": "The assistant is about to answer" },
        h("div", { class: "msg__body" }, h("div", { class: "typing", "aria-hidden": "true" }, h("span"), h("span"), h("span"))),
      );
    }
    return this.#placeholder;
  }

  // --- user messages ---

  #createUser(message) {
    const text = h("div", { class: "msg__bubble" });
    const status = h("p", { class: "msg__status", hidden: true });
    const el = h("li", { class: "msg msg--user", dataset: { id: message.id } }, text, status);
    return { el, text, status, message: null, phase: undefined };
  }

  #patchUser(node, message, phase) {
    if (node.text.textContent !== message.text) node.text.textContent = message.text;
    node.el.dataset.id = message.id;
    node.el.dataset.phase = phase ?? "";
    node.el.dataset.clientMessageId = message.clientMessageId ?? "";
    const status = node.status;
    status.replaceChildren();
    status.hidden = false;
    status.className = "msg__status";
    switch (phase) {
      case "sending":
        status.classList.add("msg__status--sending");
        status.append("Sending…");
        break;
      case "queued":
        status.append(h("span", {}, icon("clock"), " Queued · answered after the current reply"));
        break;
      case "failed": {
        const failure = message.failure ?? {};
        status.classList.add("msg__status--error");
        status.append(h("span", {}, icon("alert"), ` Not sent: ${failure.message ?? "the server refused it."}`));
        if (failure.retryable) {
          status.append(
            h("button", { type: "button", class: "text-button", onclick: () => this.actions.retry(message.clientMessageId) }, "Try again"),
            " ",
          );
        }
        status.append(
          h("button", { type: "button", class: "text-button", onclick: () => this.actions.discard(message.clientMessageId) }, "Dismiss"),
        );
        break;
      }
      case "unanswered":
        status.append("No answer: the server restarted before replying.");
        break;
      default:
        status.hidden = true;
    }
  }

  // --- answers ---

  #createAnswer(message) {
    const thinkingText = h("div", { class: "thinking__text" });
    const thinkingLabel = h("span", { class: "thinking__label" }, "Thinking");
    const thinking = h(
      "details",
      { class: "thinking", hidden: true },
      h("summary", {}, icon("sparkle"), thinkingLabel),
      thinkingText,
    );
    const tools = h("ol", { class: "tools", hidden: true, "aria-label": "Tools used" });
    const answer = h("div", { class: "answer" });
    const typing = h("div", { class: "typing", "aria-hidden": "true", hidden: true }, h("span"), h("span"), h("span"));
    const notes = h("div", { class: "msg__notes" });
    const meta = h("p", { class: "msg__meta", hidden: true });
    const body = h("div", { class: "msg__body" }, thinking, tools, answer, typing, notes, meta);
    const el = h("li", { class: "msg msg--assistant", dataset: { id: message.id } }, body);
    const node = {
      el,
      thinking,
      thinkingText,
      thinkingLabel,
      tools,
      toolNodes: new Map(),
      answer,
      stream: null,
      streamed: "",
      html: null,
      typing,
      notes,
      meta,
      message: null,
      // Whether the thinking is open by our choice; a reader's own toggle wins.
      autoOpen: false,
      readerToggled: false,
    };
    thinking.addEventListener("toggle", () => {
      if (thinking.open !== node.autoOpen) node.readerToggled = true;
    });
    return node;
  }

  #patchAnswer(node, message) {
    const previous = node.message;
    const streaming = message.status === "streaming";
    node.el.dataset.status = message.status;
    node.el.classList.toggle("msg--streaming", streaming);
    node.el.setAttribute("aria-busy", String(streaming));

    // Thinking streams live while it is all there is, and folds away once the answer starts.
    if (message.thinking) {
      node.thinking.hidden = false;
      appendText(node, "thinkingText", "thinkingShown", message.thinking);
      const open = streaming && !message.text;
      const live = open && !message.tools.length;
      node.thinkingLabel.textContent = live ? "Thinking…" : "Thinking";
      node.thinking.classList.toggle("thinking--live", live);
      if (!node.readerToggled && node.thinking.open !== open) {
        node.autoOpen = open;
        node.thinking.open = open;
      }
    } else {
      node.thinking.hidden = true;
    }

    if (message.tools !== previous?.tools) this.#patchTools(node, message.tools);

    // The answer: text while it streams, the server's sanitized HTML once it is done.
    if (!streaming && typeof message.html === "string") {
      if (node.html !== message.html) {
        const prose = h("div", { class: "prose answer__html" });
        prose.innerHTML = message.html; // sanitized by the server (nh3); nothing else is HTML
        node.answer.replaceChildren(prose);
        node.html = message.html;
        node.stream = null;
        node.streamed = "";
      }
    } else {
      if (!node.stream || node.html !== null) {
        node.stream = document.createTextNode("");
        node.answer.replaceChildren(h("div", { class: "answer__stream" }, node.stream));
        node.html = null;
        node.streamed = "";
      }
      if (message.text.startsWith(node.streamed)) {
        node.stream.appendData(message.text.slice(node.streamed.length));
      } else {
        node.stream.data = message.text;
      }
      node.streamed = message.text;
    }
    node.answer.hidden = !message.text && !message.html;
    node.typing.hidden = !(streaming && !message.text);

    this.#patchNotes(node, message);
    this.#patchMeta(node, message);

    if (previous && previous.status === "streaming" && FINAL_STATUSES.includes(message.status)) {
      this.#announceFinished(message);
    }
  }

  #patchTools(node, tools) {
    node.tools.hidden = tools.length === 0;
    const seen = new Set();
    let previous = null;
    for (const tool of tools) {
      let card = node.toolNodes.get(tool.toolUseId);
      if (!card) {
        card = this.#createTool(tool);
        node.toolNodes.set(tool.toolUseId, card);
      }
      if (card.tool !== tool) this.#patchTool(card, tool);
      const expected = previous ? previous.nextElementSibling : node.tools.firstElementChild;
      if (expected !== card.el) node.tools.insertBefore(card.el, expected);
      previous = card.el;
      seen.add(tool.toolUseId);
    }
    for (const [id, card] of node.toolNodes) {
      if (!seen.has(id)) {
        card.el.remove();
        node.toolNodes.delete(id);
      }
    }
  }

  #createTool(tool) {
    const status = h("span", { class: "tool__icon" });
    const summary = h("span", { class: "tool__summary" });
    const state = h("span", { class: "visually-hidden" });
    const detail = h("div", { class: "tool__detail" });
    const details = h("details", {}, h("summary", {}, status, summary, state), detail);
    const el = h("li", { class: "tool", dataset: { tool: tool.name } }, details);
    const card = { el, details, status, summary, state, detail, tool: null, drawn: null };
    // The raw input and result can be long: build them only when the card is opened.
    details.addEventListener("toggle", () => {
      if (details.open && card.drawn !== card.tool) {
        detail.replaceChildren(...toolDetail(card.tool).filter(Boolean));
        card.drawn = card.tool;
      }
    });
    return card;
  }

  #patchTool(card, tool) {
    const previous = card.tool;
    card.tool = tool;
    card.el.dataset.state = tool.state;
    const text = describeTool(tool).text;
    if (card.summary.textContent !== text) card.summary.textContent = text;
    card.state.textContent = ` (${toolStateLabel(tool)})`;
    if (!previous || previous.state !== tool.state) card.status.replaceChildren(toolStatusIcon(tool));
    if (card.details.open) {
      card.detail.replaceChildren(...toolDetail(tool).filter(Boolean));
      card.drawn = tool;
    }
  }

  #patchNotes(node, message) {
    const notes = [];
    if (message.warning) {
      notes.push(h("p", { class: "note note--warning" }, icon("alert"), message.warning));
    }
    if (message.error) {
      const { message: text, retryable } = message.error;
      const advice =
        retryable === true
          ? "This is usually temporary, so asking again should work."
          : retryable === false
            ? "Asking again the same way will not help."
            : "";
      const question = this.#questionOf(message);
      notes.push(
        h(
          "div",
          { class: "note note--error", role: "alert" },
          icon("alert"),
          h(
            "div",
            {},
            h("p", {}, h("strong", {}, "The answer failed. "), text ?? "Something went wrong."),
            advice ? h("p", { class: "note__advice" }, advice) : null,
            retryable !== false && question
              ? h("button", { type: "button", class: "text-button", onclick: () => this.actions.ask(question) }, "Ask again")
              : null,
          ),
        ),
      );
    }
    if (message.status === "incomplete") {
      notes.push(h("p", { class: "note note--muted" }, icon("alert"), "This answer was cut off when the server restarted."));
    }
    node.notes.replaceChildren(...notes);
    node.notes.hidden = notes.length === 0;
  }

  #patchMeta(node, message) {
    const parts = [];
    if (message.status === "stopped") parts.push(h("span", { class: "badge" }, "Stopped"));
    if (message.status === "max_turns") parts.push(h("span", { class: "badge badge--warning" }, "Step limit reached"));
    if (message.status === "error") parts.push(h("span", { class: "badge badge--error" }, "Failed"));
    if (message.status !== "streaming") {
      const details = [modelName(message.model), tokens(message.usage)].filter(Boolean).join(" · ");
      if (details) parts.push(h("span", {}, details));
    }
    node.meta.replaceChildren(...parts);
    node.meta.hidden = parts.length === 0;
  }

  #questionOf(message) {
    if (!message.replyTo) return null;
    for (const node of this.#nodes.values()) {
      if (node.message?.id === message.replyTo) return node.message.text;
    }
    return null;
  }

  #announceFinished(message) {
    if (this.#announced.has(message.id)) return;
    this.#announced.add(message.id);
    const words = message.text.replace(/\s+/g, " ").trim();
    const status =
      message.status === "stopped"
        ? "The answer was stopped."
        : message.status === "error"
          ? "The answer failed."
          : "The assistant answered.";
    this.announce(words ? `${status} ${words.length > 400 ? `${words.slice(0, 400)}…` : words}` : status);
  }
}

/** A message's place in the list: a user message keeps its node from sending to confirmed. */
function keyOf(message) {
  return message.kind === "user" && message.clientMessageId
    ? `user:${message.clientMessageId}`
    : message.id;
}

/** Show a growing text: only the new part is added; anything else redraws it. */
function appendText(node, elementKey, shownKey, text) {
  const el = node[elementKey];
  const shown = node[shownKey] ?? "";
  if (text === shown) return;
  if (shown && text.startsWith(shown) && el.lastChild instanceof Text) {
    el.lastChild.appendData(text.slice(shown.length));
  } else {
    el.textContent = text;
  }
  node[shownKey] = text;
}

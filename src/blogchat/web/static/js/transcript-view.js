// The transcript: one list item per message, patched in place. `render(state, view)` is
// called at most once per animation frame with the latest state; only messages whose object
// changed are touched. A streaming answer is Markdown rendered live (markdown.js), redrawing
// only the block that grows; at `done` the server's HTML takes its place, node for node the
// same tree.

import { FINAL_STATUSES, isOrphan, isRunning, visibleText } from "./chat-client.js";
import { decorateCodeBlock, decorateCodeBlocks, highlightCode } from "./code-blocks.js";
import { copyText, h, icon, ordinal } from "./dom.js";
import { LiveMarkdown } from "./markdown.js";
import {
  describeRun,
  describeTool,
  findings,
  runState,
  toolDetail,
  toolRuns,
  toolStateLabel,
  toolStatusIcon,
} from "./tool-cards.js";

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

/** How long an answer thought, in the words of its thinking block's label. */
export function thoughtFor(ms) {
  if (typeof ms !== "number") return "Thinking";
  return ms < 1000 ? "Thought for <1 s" : `Thought for ${Math.round(ms / 1000)} s`;
}

/** A `status` message in words: why nothing is streaming yet. */
export function statusText(status) {
  if (!status) return "";
  if (status.state === "retrying") {
    const count = status.attempt && status.maxAttempts ? ` (${status.attempt}/${status.maxAttempts})` : "";
    return `Claude is busy, retrying${count}…`;
  }
  if (status.state === "waiting") {
    const place = status.position > 1 ? `${ordinal(status.position)} in line` : "next in line";
    return status.position ? `Waiting for a free assistant · ${place}` : "Waiting for a free assistant…";
  }
  return "";
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

/**
 * What a regenerate or an edit may act on: `lastAnswer` (the id of the chat's last answer)
 * and `lastQuestion` (the reader's last message), both null while a turn runs or a message
 * is on its way; and `hidden`, the messages a regenerate or edit on its way will replace.
 */
export function rewritable(state) {
  const hidden = new Set();
  let pending = false;
  for (const m of state.messages) {
    if (!m.local) continue;
    if (m.delivery !== "failed") pending = true;
    if (m.replaces && m.delivery !== "failed") for (const id of m.replaces) hidden.add(id);
  }
  const settled = state.messages.filter((m) => !m.local);
  if (pending || isRunning(state) || !settled.length) return { hidden, lastAnswer: null, lastQuestion: null };
  const last = settled[settled.length - 1];
  const questions = settled.filter((m) => m.kind === "user");
  return {
    hidden,
    lastAnswer: last.kind === "assistant" && last.status !== "streaming" ? last.id : null,
    lastQuestion: questions.length ? questions[questions.length - 1].id : null,
  };
}

export class TranscriptView {
  #nodes = new Map();
  #placeholder = null;
  #announced = new Set();

  /**
   * @param {object} options
   * @param {HTMLOListElement} options.list where the messages go
   * @param {(text: string) => void} options.announce tells screen readers, politely
   * @param {object} options.actions retry(clientMessageId), discard(clientMessageId),
   *   ask(text); and, when the protocol offers them, regenerate(answer) and edit(message):
   *   each message then gets that button too (none is shown while they are absent)
   */
  constructor({ list, announce, actions }) {
    this.list = list;
    this.announce = announce;
    this.actions = actions;
    // One listener for every code block's copy button, live or final.
    list.addEventListener("click", (event) => {
      const button = event.target.closest?.(".code-block__copy");
      if (button) this.#copy(button, button.closest(".code-block").querySelector("code").textContent, "Code copied.");
    });
  }

  /**
   * Bring the list in line with the state.
   * @param {object} view what the page knows beyond the transcript: `connection` (the
   *   client's connection state; an answer that streams while it is not open is paused)
   */
  render(state, view = {}) {
    this.status = state.status ?? null;
    const paused = Boolean(view.connection && view.connection !== "open");
    const phases = userPhases(state);
    const seen = new Set();
    let previous = null;
    const place = (el) => {
      const expected = previous ? previous.nextElementSibling : this.list.firstElementChild;
      if (expected !== el) this.list.insertBefore(el, expected);
      previous = el;
    };
    let waitingFor = null;
    const { hidden, lastAnswer, lastQuestion } = rewritable(state);
    for (const message of state.messages) {
      if (hidden.has(message.id)) continue;
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
      // A streaming answer also shows the connection (paused) and status messages.
      const live = message.kind === "assistant" && message.status === "streaming";
      const status = live && this.#statusBelongsTo(state, message) ? this.status : null;
      const pausedHere = live && paused;
      if (node.message !== message || node.phase !== phase || node.paused !== pausedHere || node.statusMessage !== status) {
        if (message.kind === "user") this.#patchUser(node, message, phase);
        else this.#patchAnswer(node, message, { paused: pausedHere, status });
        node.message = message;
        node.phase = phase;
        node.paused = pausedHere;
        node.statusMessage = status;
      }
      place(node.el);
      seen.add(key);
      if (phase === "waiting") {
        waitingFor = message.id;
        // The answer about to start: hold its place so nothing jumps when it arrives.
        place(this.#pendingAnswer(state));
      }
    }
    // Regenerate on the last answer, edit on the reader's last message, and only while
    // nothing runs: the server refuses them anywhere else.
    for (const node of this.#nodes.values()) {
      if (node.regenerate) node.regenerate.hidden = node.message?.id !== lastAnswer;
      if (node.edit) node.edit.hidden = node.message?.id !== lastQuestion;
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

  /** How much of each streaming answer's text is on screen (characters, by answer id). */
  shownText() {
    const shown = {};
    for (const node of this.#nodes.values()) {
      if (node.message?.kind === "assistant" && node.message.status === "streaming" && node.shown !== null) {
        shown[node.message.id] = node.shown.length;
      }
    }
    return shown;
  }

  /** Forget everything drawn (before showing another chat). */
  clear() {
    this.list.replaceChildren();
    this.#nodes.clear();
    this.#placeholder = null;
  }

  /** Whether the current status message is about this streaming answer. */
  #statusBelongsTo(state, message) {
    if (!this.status) return false;
    if (this.status.messageId) return this.status.messageId === message.id;
    // No message named: it is about the turn, which this answer is, unless one waits.
    return !state.messages.some((m) => m.kind === "user" && !m.local && !m.answerId && !isOrphan(state, m));
  }

  #pendingAnswer(state) {
    if (!this.#placeholder) {
      const typing = h("div", { class: "typing", "aria-hidden": "true" }, h("span"), h("span"), h("span"));
      const status = h("p", { class: "answer__status", role: "status" });
      this.#placeholder = h(
        "li",
        { class: "msg msg--assistant msg--pending", "aria-label": "The assistant is about to answer" },
        h("div", { class: "msg__body" }, typing, status),
      );
      this.#placeholder.typing = typing;
      this.#placeholder.statusLine = status;
    }
    // A status without a streaming answer to show it in (waiting in line, retried before
    // the first token) is shown here.
    const streaming = state.messages.some((m) => m.kind === "assistant" && m.status === "streaming");
    const text = streaming && this.status?.messageId ? "" : statusText(this.status);
    if (this.#placeholder.statusLine.textContent !== text) this.#placeholder.statusLine.textContent = text;
    this.#placeholder.statusLine.hidden = !text;
    this.#placeholder.typing.hidden = Boolean(text);
    return this.#placeholder;
  }

  /** Copy text, and say so on the button (and to screen readers) for a moment. */
  async #copy(button, text, said) {
    const copied = await copyText(text);
    const label = button.querySelector(".code-block__copy-label, .msg__action-label");
    const before = label?.dataset.label ?? label?.textContent;
    if (label) {
      label.dataset.label = before;
      label.textContent = copied ? "Copied" : "Copy failed";
    }
    button.dataset.copied = String(copied);
    this.announce(copied ? said : "The browser did not allow copying.");
    clearTimeout(button.copyTimer);
    button.copyTimer = setTimeout(() => {
      if (label) label.textContent = before;
      delete button.dataset.copied;
    }, 1600);
  }

  /** A message's action button: an icon and a short label, named in full for screen readers. */
  #actionButton(iconName, label, name, onClick) {
    return h(
      "button",
      { type: "button", class: "msg__action", "aria-label": name, title: name, onclick: onClick },
      icon(iconName),
      h("span", { class: "msg__action-label", "aria-hidden": "true" }, label),
    );
  }

  // --- user messages ---

  #createUser(message) {
    const node = { message: null, phase: undefined };
    const text = h("div", { class: "msg__bubble" });
    const status = h("p", { class: "msg__status", hidden: true });
    const actions = h(
      "div",
      { class: "msg__actions", role: "group", "aria-label": "Your message" },
      this.#actionButton("copy", "Copy", "Copy your message", (event) =>
        this.#copy(event.currentTarget, node.message.text, "Your message was copied."),
      ),
      this.actions.edit
        ? (node.edit = this.#actionButton("pencil", "Edit", "Edit your message and send it again", () =>
            this.actions.edit(node.message),
          ))
        : null,
    );
    const el = h("li", { class: "msg msg--user", dataset: { id: message.id } }, text, status, actions);
    return Object.assign(node, { el, text, status, actions });
  }

  #patchUser(node, message, phase) {
    if (node.text.textContent !== message.text) node.text.textContent = message.text;
    node.el.dataset.id = message.id;
    node.el.dataset.phase = phase ?? "";
    node.el.dataset.clientMessageId = message.clientMessageId ?? "";
    node.actions.hidden = Boolean(message.local);
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
    const status = h("p", { class: "answer__status", role: "status", hidden: true });
    const notes = h("div", { class: "msg__notes" });
    const meta = h("div", { class: "msg__meta", hidden: true });
    const body = h("div", { class: "msg__body" }, thinking, tools, answer, typing, status, notes, meta);
    const el = h("li", { class: "msg msg--assistant", dataset: { id: message.id } }, body);
    const node = {
      el,
      thinking,
      thinkingText,
      thinkingLabel,
      tools,
      toolNodes: new Map(),
      groupNodes: new Map(),
      answer,
      live: null,
      shown: null,
      html: null,
      typing,
      statusLine: status,
      notes,
      meta,
      actions: null,
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

  #patchAnswer(node, message, { paused = false, status = null } = {}) {
    const previous = node.message;
    const streaming = message.status === "streaming";
    const stopping = typeof message.stopAt === "number";
    node.el.dataset.status = message.status;
    node.el.classList.toggle("msg--streaming", streaming);
    node.el.classList.toggle("msg--paused", paused);
    node.el.classList.toggle("msg--stopping", streaming && stopping);
    node.el.setAttribute("aria-busy", String(streaming));

    // Thinking streams live while it is all there is, and folds away once the answer starts.
    if (message.thinking) {
      node.thinking.hidden = false;
      appendText(node, "thinkingText", "thinkingShown", message.thinking);
      const open = streaming && !message.text;
      const live = open && !message.tools.length;
      const label = live ? "Thinking…" : thoughtFor(message.thinkingMs);
      if (node.thinkingLabel.textContent !== label) node.thinkingLabel.textContent = label;
      node.thinking.classList.toggle("thinking--live", live);
      if (!node.readerToggled && node.thinking.open !== open) {
        node.autoOpen = open;
        node.thinking.open = open;
      }
    } else {
      node.thinking.hidden = true;
    }

    if (message.tools !== previous?.tools) this.#patchTools(node, message.tools);

    // The answer: Markdown rendered live while it streams, the server's sanitized HTML once
    // it is done. After a stop, only what the reader saw and the end of that sentence.
    const text = visibleText(message);
    const final = !streaming && typeof message.html === "string";
    // The server kept more than the reader saw (the stop came mid-sentence and the engine
    // went on): the frozen live rendering stays, rather than words appearing after Stop.
    const frozen = final && stopping && text.trimEnd() !== message.text.trimEnd();
    if (final && !frozen) {
      if (node.html !== message.html) {
        // The live rendering catches up with the whole text first: the swap below then
        // replaces a tree with the same tree (tests/test_ui.py compares the two).
        if (node.live) node.live.update(message.text, { growing: false });
        const prose = h("div", { class: "prose answer__html" });
        prose.innerHTML = message.html; // sanitized by the server (nh3); nothing else is HTML
        decorateCodeBlocks(prose);
        node.answer.replaceChildren(prose);
        node.html = message.html;
        node.live = null;
        node.shown = null;
      }
    } else {
      if (!node.live) {
        const box = h("div", { class: "prose answer__stream" });
        node.answer.replaceChildren(box);
        node.live = new LiveMarkdown(box, { onCode: liveCode });
        node.html = null;
        node.shown = null;
      }
      const growing = streaming;
      if (node.shown !== text || node.growing !== growing) {
        node.live.update(text, { growing });
        node.shown = text;
        node.growing = growing;
      }
    }
    node.answer.hidden = !text.trim() && !final;
    const statusLine = statusText(status);
    node.statusLine.hidden = !statusLine;
    if (node.statusLine.textContent !== statusLine) node.statusLine.textContent = statusLine;
    node.typing.hidden = !(streaming && !text && !statusLine && !paused);

    this.#patchNotes(node, message, paused);
    this.#patchMeta(node, message);

    if (previous && previous.status === "streaming" && FINAL_STATUSES.includes(message.status)) {
      this.#announceFinished(message);
    }
  }

  #patchTools(node, tools) {
    node.tools.hidden = tools.length === 0;
    const seenCards = new Set();
    const seenGroups = new Set();
    let previous = null;
    for (const run of toolRuns(tools)) {
      let el;
      if (run.length === 1) {
        el = this.#toolCard(node, run[0]).el;
      } else {
        // Consecutive calls of one tool fold into one row; their cards go inside it.
        const group = this.#toolGroup(node, run);
        let inner = null;
        for (const tool of run) {
          const card = this.#toolCard(node, tool);
          const expected = inner ? inner.nextElementSibling : group.list.firstElementChild;
          if (expected !== card.el) group.list.insertBefore(card.el, expected);
          inner = card.el;
          seenCards.add(tool.toolUseId);
        }
        seenGroups.add(group.key);
        el = group.el;
      }
      seenCards.add(run[0].toolUseId);
      const expected = previous ? previous.nextElementSibling : node.tools.firstElementChild;
      if (expected !== el) node.tools.insertBefore(el, expected);
      previous = el;
    }
    for (const [id, card] of node.toolNodes) {
      if (!seenCards.has(id)) {
        card.el.remove();
        node.toolNodes.delete(id);
      }
    }
    for (const [key, group] of node.groupNodes) {
      if (!seenGroups.has(key)) {
        group.el.remove();
        node.groupNodes.delete(key);
      }
    }
  }

  #toolCard(node, tool) {
    let card = node.toolNodes.get(tool.toolUseId);
    if (!card) {
      card = this.#createTool(tool);
      node.toolNodes.set(tool.toolUseId, card);
    }
    if (card.tool !== tool) this.#patchTool(card, tool);
    return card;
  }

  #toolGroup(node, run) {
    const key = run[0].toolUseId;
    let group = node.groupNodes.get(key);
    if (!group) {
      const status = h("span", { class: "tool__icon" });
      const summary = h("span", { class: "tool__summary" });
      const state = h("span", { class: "visually-hidden" });
      const found = h("div", { class: "tool-group__found" });
      const list = h("ol", { class: "tools tools--grouped", "aria-label": "Each call" });
      const details = h("details", {}, h("summary", {}, status, summary, state), h("div", { class: "tool__detail" }, found, list));
      const el = h("li", { class: "tool tool-group", dataset: { tool: run[0].name } }, details);
      group = { key, el, details, status, summary, state, found, list, run: null, drawn: null };
      details.addEventListener("toggle", () => {
        if (details.open && group.drawn !== group.run) this.#drawGroupFindings(group);
      });
      node.groupNodes.set(key, group);
    }
    const changed = !group.run || group.run.length !== run.length || group.run.some((t, i) => t !== run[i]);
    if (changed) {
      const previousState = group.run ? runState(group.run) : null;
      group.run = run;
      const { icon: iconName, text } = describeRun(run);
      const state = runState(run);
      group.el.dataset.state = state;
      group.el.dataset.count = String(run.length);
      if (group.summary.textContent !== text) group.summary.textContent = text;
      group.state.textContent = ` (${run.length} calls, ${toolStateLabel({ state })})`;
      if (previousState !== state) group.status.replaceChildren(toolStatusIcon({ state }, iconName));
      if (group.details.open) this.#drawGroupFindings(group);
    }
    return group;
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

  #drawGroupFindings(group) {
    group.found.replaceChildren(...[findings(group.run)].filter(Boolean));
    group.drawn = group.run;
  }

  #patchNotes(node, message, paused = false) {
    const notes = [];
    if (paused) {
      notes.push(
        h("p", { class: "note note--paused", role: "status" }, icon("clock"), "Paused: the connection dropped. The answer continues from here when it is back."),
      );
    }
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
              ? h(
                  "button",
                  {
                    type: "button",
                    class: "text-button",
                    // In place when it can be (the page decides): no second copy of the question.
                    onclick: () => (this.actions.askAgain ? this.actions.askAgain(message) : this.actions.ask(question)),
                  },
                  "Ask again",
                )
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
    const hasText = message.status !== "streaming" && Boolean(visibleText(message).trim());
    if (hasText && !node.actions) {
      // Built once and kept in place, so that a focused button survives later redraws.
      node.actions = h(
        "div",
        { class: "msg__actions", role: "group", "aria-label": "Answer" },
        this.#actionButton("copy", "Copy", "Copy the answer as Markdown", (event) =>
          this.#copy(event.currentTarget, visibleText(node.message), "The answer was copied as Markdown."),
        ),
        this.actions.regenerate
          ? (node.regenerate = this.#actionButton("refresh", "Regenerate", "Write this answer again", () =>
              this.actions.regenerate(node.message),
            ))
          : null,
      );
      node.metaInfo = h("span", { class: "msg__info" });
      node.meta.replaceChildren(node.actions, node.metaInfo);
    }
    const parts = [];
    if (message.status === "stopped") parts.push(h("span", { class: "badge" }, "Stopped"));
    if (message.status === "max_turns") parts.push(h("span", { class: "badge badge--warning" }, "Step limit reached"));
    if (message.status === "error") parts.push(h("span", { class: "badge badge--error" }, "Failed"));
    if (message.status !== "streaming") {
      const details = [modelName(message.model), tokens(message.usage)].filter(Boolean).join(" · ");
      if (details) parts.push(h("span", {}, details));
    }
    if (node.actions) {
      node.actions.hidden = !hasText;
      node.metaInfo.replaceChildren(...parts);
    } else {
      node.meta.replaceChildren(...parts);
    }
    node.meta.hidden = parts.length === 0 && !hasText;
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

/** A code block drawn live: framed at once, highlighted once its closing fence arrived. */
function liveCode(pre, { language, code, final }) {
  decorateCodeBlock(pre, language);
  if (final) highlightCode(pre.firstElementChild, language, code);
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

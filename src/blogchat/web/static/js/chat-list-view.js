// The reader's chats, grouped by when they were last active: open one, rename, delete
// (after a confirmation).

import { h, icon, relativeTime } from "./dom.js";

const GROUPS = ["Today", "Yesterday", "Previous 7 days", "Older"];
const DAY_MS = 86_400_000;

/** Which group a chat last active at `iso` belongs to, by calendar day in local time. */
export function dateGroup(iso, now = new Date()) {
  const then = new Date(iso);
  if (Number.isNaN(then.getTime())) return "Older";
  const day = (d) => new Date(d.getFullYear(), d.getMonth(), d.getDate()).getTime();
  // Rounded: a day with a daylight-saving change is 23 or 25 hours long.
  const days = Math.round((day(now) - day(then)) / DAY_MS);
  if (days <= 0) return "Today";
  if (days === 1) return "Yesterday";
  if (days <= 7) return "Previous 7 days";
  return "Older";
}

export class ChatListView {
  #chats = [];
  #editing = null;
  #confirming = null;
  // While a title is edited, what the reader typed there, for a redraw to keep.
  #typed = null;

  /**
   * @param {object} options
   * @param {HTMLElement} options.list where the groups of chats go
   * @param {HTMLElement} options.empty shown when there are no chats
   * @param {(chatId: string, title: string) => Promise<void>} options.rename
   * @param {(chatId: string) => Promise<void>} options.remove
   */
  constructor({ list, empty, rename, remove }) {
    this.list = list;
    this.empty = empty;
    this.renameChat = rename;
    this.removeChat = remove;
    this.current = null;
  }

  /**
   * Show these chats (newest first), marking the open one. With `query`, they are the
   * results of a search for it: one list, each with the words that matched.
   */
  show(chats, current = this.current, { query = null } = {}) {
    this.#chats = chats;
    this.current = current;
    this.query = query;
    this.#draw();
  }

  /** Mark the open chat (and its title, if it is new). */
  select(chatId) {
    this.current = chatId;
    this.#draw();
  }

  #draw() {
    // The list is redrawn when it changes (an answer ends, another tab renames): a title
    // being edited keeps what the reader typed, the caret and the focus.
    const old = this.list.querySelector(".chat-item__input");
    this.#typed = old
      ? {
          chatId: old.closest(".chat-item")?.dataset.id,
          value: old.value,
          start: old.selectionStart,
          end: old.selectionEnd,
          focused: document.activeElement === old,
        }
      : null;
    this.empty.hidden = this.#chats.length > 0;
    if (this.query) {
      this.empty.textContent = `No chat mentions “${this.query}”.`;
      const id = "chat-group-results";
      const count = this.#chats.length;
      this.list.replaceChildren(
        ...(count
          ? [
              h(
                "section",
                { class: "chat-group", dataset: { group: "results" } },
                h("h3", { class: "chat-group__title", id }, count === 1 ? "1 chat found" : `${count} chats found`),
                h("ol", { class: "chat-group__list", "aria-labelledby": id }, this.#chats.map((chat) => this.#item(chat))),
              ),
            ]
          : []),
      );
      return;
    }
    this.empty.textContent = "Your conversations will appear here.";
    const now = new Date();
    const groups = new Map(GROUPS.map((name) => [name, []]));
    for (const chat of this.#chats) groups.get(dateGroup(chat.updatedAt ?? chat.createdAt, now)).push(chat);
    const sections = [];
    for (const [name, chats] of groups) {
      if (!chats.length) continue;
      const id = `chat-group-${GROUPS.indexOf(name)}`;
      sections.push(
        h(
          "section",
          { class: "chat-group", dataset: { group: name } },
          h("h3", { class: "chat-group__title", id }, name),
          h("ol", { class: "chat-group__list", "aria-labelledby": id }, chats.map((chat) => this.#item(chat))),
        ),
      );
    }
    this.list.replaceChildren(...sections);
  }

  #item(chat) {
    const current = chat.id === this.current;
    const when = chat.updatedAt ?? chat.createdAt;
    const li = h("li", { class: "chat-item", dataset: { id: chat.id } });
    if (current) li.classList.add("chat-item--current");
    if (this.#editing === chat.id) {
      const typed = this.#typed?.chatId === chat.id ? this.#typed : null;
      const input = h("input", {
        class: "input chat-item__input",
        value: typed ? typed.value : chat.title,
        maxlength: 200,
        "aria-label": "Chat title",
        enterkeyhint: "done",
      });
      // The whole width of the list for the title, the buttons on a line of their own.
      const form = h(
        "form",
        { class: "chat-item__rename" },
        input,
        h(
          "div",
          { class: "chat-item__rename-actions" },
          h("button", { type: "submit", class: "button button--small" }, "Save"),
          h("button", { type: "button", class: "button button--quiet button--small", onclick: () => this.#stopEditing(chat.id) }, "Cancel"),
        ),
      );
      form.addEventListener("submit", async (event) => {
        event.preventDefault();
        const title = input.value.trim();
        if (!title || title === chat.title) {
          this.#stopEditing(chat.id);
          return;
        }
        input.disabled = true;
        try {
          await this.renameChat(chat.id, title);
          this.#editing = null;
        } catch (error) {
          input.disabled = false;
          input.setCustomValidity(error.message);
          input.reportValidity();
          return;
        }
        this.#draw();
        this.#focusItem(chat.id);
      });
      input.addEventListener("keydown", (event) => {
        if (event.key === "Escape") {
          event.preventDefault();
          event.stopPropagation();
          this.#stopEditing(chat.id);
        }
      });
      li.append(form);
      queueMicrotask(() => {
        if (!typed) {
          input.focus();
          input.select();
        } else if (typed.focused) {
          input.focus();
          input.setSelectionRange(typed.start, typed.end);
        }
      });
      return li;
    }
    const link = h(
      "a",
      { class: "chat-item__link", href: `/chat/${encodeURIComponent(chat.id)}`, "aria-current": current ? "page" : null },
      h("span", { class: "chat-item__title" }, chat.title || "Untitled chat"),
      this.query && chat.snippet ? h("span", { class: "chat-item__snippet" }, chat.snippet) : null,
      h("span", { class: "chat-item__time" }, h("time", { datetime: when }, relativeTime(when))),
    );
    li.append(link);
    if (this.#confirming === chat.id) {
      li.classList.add("chat-item--confirming");
      li.append(
        h(
          "div",
          { class: "chat-item__confirm", role: "group", "aria-label": "Confirm deletion" },
          h("span", {}, "Delete this chat?"),
          h("button", { type: "button", class: "button button--danger button--small", onclick: () => this.#delete(chat.id, li) }, "Delete"),
          h("button", { type: "button", class: "button button--quiet button--small", onclick: () => this.#cancelDelete(chat.id) }, "Cancel"),
        ),
      );
      return li;
    }
    li.append(
      h(
        "div",
        { class: "chat-item__actions" },
        h(
          "button",
          { type: "button", class: "icon-button", "aria-label": `Rename “${chat.title}”`, title: "Rename", onclick: () => this.#edit(chat.id) },
          icon("pencil"),
        ),
        h(
          "button",
          { type: "button", class: "icon-button", "aria-label": `Delete “${chat.title}”`, title: "Delete", onclick: () => this.#confirm(chat.id) },
          icon("trash"),
        ),
      ),
    );
    return li;
  }

  #edit(chatId) {
    this.#editing = chatId;
    this.#confirming = null;
    this.#draw();
  }

  #stopEditing(chatId) {
    this.#editing = null;
    this.#draw();
    this.#focusItem(chatId);
  }

  #confirm(chatId) {
    this.#confirming = chatId;
    this.#editing = null;
    this.#draw();
    this.list.querySelector(`[data-id="${CSS.escape(chatId)}"] .chat-item__confirm .button--quiet`)?.focus();
  }

  #cancelDelete(chatId) {
    this.#confirming = null;
    this.#draw();
    this.#focusItem(chatId);
  }

  async #delete(chatId, li) {
    li.querySelectorAll("button").forEach((b) => {
      b.disabled = true;
    });
    try {
      await this.removeChat(chatId);
    } catch {
      // The list is redrawn from the server either way.
    }
    this.#confirming = null;
  }

  #focusItem(chatId) {
    this.list.querySelector(`[data-id="${CSS.escape(chatId)}"] .chat-item__link`)?.focus();
  }
}

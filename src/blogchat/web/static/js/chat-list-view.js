// The reader's chats: open one, start a new one, rename, delete (after a confirmation).

import { h, icon, relativeTime } from "./dom.js";

export class ChatListView {
  #chats = [];
  #editing = null;
  #confirming = null;

  /**
   * @param {object} options
   * @param {HTMLOListElement} options.list
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

  /** Show these chats (newest first), marking the open one. */
  show(chats, current = this.current) {
    this.#chats = chats;
    this.current = current;
    this.#draw();
  }

  /** Mark the open chat (and its title, if it is new). */
  select(chatId) {
    this.current = chatId;
    this.#draw();
  }

  #draw() {
    this.empty.hidden = this.#chats.length > 0;
    this.list.replaceChildren(...this.#chats.map((chat) => this.#item(chat)));
  }

  #item(chat) {
    const current = chat.id === this.current;
    const when = chat.updatedAt ?? chat.createdAt;
    const li = h("li", { class: "chat-item", dataset: { id: chat.id } });
    if (current) li.classList.add("chat-item--current");
    if (this.#editing === chat.id) {
      const input = h("input", {
        class: "input chat-item__input",
        value: chat.title,
        maxlength: 200,
        "aria-label": "Chat title",
      });
      const form = h(
        "form",
        { class: "chat-item__rename" },
        input,
        h("button", { type: "submit", class: "icon-button", "aria-label": "Save title" }, icon("check")),
        h("button", { type: "button", class: "icon-button", "aria-label": "Cancel renaming", onclick: () => this.#stopEditing(chat.id) }, icon("close")),
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
        input.focus();
        input.select();
      });
      return li;
    }
    const link = h(
      "a",
      { class: "chat-item__link", href: `/chat/${encodeURIComponent(chat.id)}`, "aria-current": current ? "page" : null },
      h("span", { class: "chat-item__title" }, chat.title || "Untitled chat"),
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

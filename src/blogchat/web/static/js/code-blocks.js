// Code blocks in answers: a bar with the language and a copy button, and syntax highlighting.
// The server highlights a finished answer's code (Pygments' CSS classes in its HTML); while
// an answer streams, a code block is highlighted as soon as its closing fence arrives, with
// the same reading fetched from POST /api/highlight. Both paths end in the same elements.

import { api } from "./api.js";
import { h, icon } from "./dom.js";

const MAX_CHARS = 20_000; // rendering.MAX_HIGHLIGHT_CHARS: longer code is never highlighted
const CACHE_SIZE = 200;
const cache = new Map(); // "language\0code" -> pieces, or the promise of them

/** The language a rendered `<code class="language-x">` names ("" if none). */
export function languageOf(code) {
  const name = [...(code?.classList ?? [])].find((c) => c.startsWith("language-"));
  return name ? name.slice("language-".length) : "";
}

/**
 * Wrap a `<pre>` in the code block's frame: a bar with its language and a copy button.
 * The `<pre>` takes keyboard focus, since a long line scrolls it sideways.
 */
export function decorateCodeBlock(pre, language) {
  const label = language || "code";
  const bar = h(
    "div",
    { class: "code-block__bar" },
    h("span", { class: "code-block__lang" }, label),
    h(
      "button",
      { type: "button", class: "code-block__copy", "aria-label": `Copy the ${language ? `${language} ` : ""}code` },
      icon("copy"),
      h("span", { class: "code-block__copy-label", "aria-hidden": "true" }, "Copy"),
    ),
  );
  const frame = h("div", { class: "code-block" }, bar);
  pre.replaceWith(frame);
  frame.append(pre);
  pre.tabIndex = 0;
  return frame;
}

/** Frame every code block of a server-rendered answer. */
export function decorateCodeBlocks(root) {
  for (const pre of root.querySelectorAll("pre")) {
    if (!pre.parentElement?.classList.contains("code-block")) decorateCodeBlock(pre, languageOf(pre.firstElementChild));
  }
}

function paint(code, pieces) {
  code.replaceChildren(...pieces.map(([css, text]) => (css ? h("span", { class: css }, text) : text)));
}

/**
 * Highlight a finished code block in place: at once if its reading is known, otherwise when
 * the server's arrives (and only if the block still shows that code by then).
 */
export function highlightCode(code, language, text) {
  if (!language || !text || text.length > MAX_CHARS) return;
  const key = `${language}\u0000${text}`;
  const known = cache.get(key);
  if (Array.isArray(known)) {
    paint(code, known);
    return;
  }
  let pending = known;
  if (!pending) {
    pending = api
      .highlight(text, language)
      .then((answer) => answer.pieces)
      .catch(() => null);
    cache.set(key, pending);
    if (cache.size > CACHE_SIZE) cache.delete(cache.keys().next().value);
  }
  pending.then((pieces) => {
    if (!pieces) {
      cache.delete(key);
      return;
    }
    cache.set(key, pieces);
    if (code.isConnected && code.textContent === text) paint(code, pieces);
  });
}

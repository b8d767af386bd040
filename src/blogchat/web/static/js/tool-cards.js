// Tool calls as compact cards: one friendly line while collapsed, the raw input and
// result when opened. Tool output is text from the server and is only ever shown as text.

import { h, icon, safeHref } from "./dom.js";

function parsed(output) {
  if (typeof output !== "string") return null;
  try {
    return JSON.parse(output);
  } catch {
    return null;
  }
}

function quoted(text, limit = 60) {
  const line = String(text ?? "").replace(/\s+/g, " ").trim();
  return `“${line.length > limit ? `${line.slice(0, limit - 1)}…` : line}”`;
}

function plural(count, one, many = `${one}s`) {
  return `${count} ${count === 1 ? one : many}`;
}

/** A post's address without its section: results from one post are one result. */
function postKey(url) {
  return String(url ?? "").split("#")[0].replace(/\/+$/, "");
}

/** What a finished tool found: posts (or other pages) to link to, in its order. */
function foundItems(tool) {
  const result = tool.state === "ok" ? parsed(tool.output) : null;
  if (tool.name === "searchBlogContent" && Array.isArray(result?.results)) {
    return result.results.map((r) => ({ title: r.title, url: r.url, note: r.section }));
  }
  if (tool.name === "listPosts" && Array.isArray(result?.posts)) {
    return result.posts.map((p) => ({ title: p.title, url: p.url, note: p.author }));
  }
  if (tool.name === "getPost" && result?.title) {
    return [{ title: result.title, url: result.url, note: result.author }];
  }
  return [];
}

/**
 * What some tool calls found, one entry per post: a post found for two sections (or once
 * with its section's anchor and once without) is listed once, at its best rank, with the
 * sections it was found for.
 */
export function uniqueFindings(tools) {
  const byPost = new Map();
  for (const tool of tools) {
    for (const item of foundItems(tool)) {
      const key = postKey(item.url) || String(item.title ?? "");
      const seen = byPost.get(key);
      if (!seen) {
        byPost.set(key, { title: item.title, url: item.url, notes: item.note ? [item.note] : [] });
      } else if (item.note && !seen.notes.includes(item.note)) {
        seen.notes.push(item.note);
      }
    }
  }
  return [...byPost.values()];
}

function firstLine(text, limit = 90) {
  const line = String(text ?? "").split("\n").find((l) => l.trim()) ?? "";
  return line.length > limit ? `${line.slice(0, limit - 1)}…` : line;
}

/** The one-line summary of a tool call, in the reader's words, and its icon. */
export function describeTool(tool) {
  const input = tool.input ?? {};
  const result = tool.state === "ok" ? parsed(tool.output) : null;
  const running = tool.state === "running";
  switch (tool.name) {
    case "searchBlogContent": {
      const query = quoted(input.query);
      if (running) return { icon: "search", text: `Searching the blog for ${query}…` };
      if (tool.state === "error") return { icon: "search", text: `Search for ${query} failed` };
      const count = Array.isArray(result?.results) ? uniqueFindings([tool]).length : null;
      const found = count === null ? "" : ` · ${plural(count, "result")}`;
      return { icon: "search", text: `Searched the blog for ${query}${found}` };
    }
    case "getPost": {
      const name = result?.title ? quoted(result.title) : quoted(input.slug);
      if (running) return { icon: "book", text: `Reading ${name}…` };
      if (tool.state === "error") return { icon: "book", text: `Could not open ${name}` };
      return { icon: "book", text: `Read ${name}` };
    }
    case "listPosts": {
      const filters = [input.tag ? ` tagged #${input.tag}` : "", input.author ? ` by ${input.author}` : ""].join("");
      if (running) return { icon: "list", text: `Listing posts${filters}…` };
      if (tool.state === "error") return { icon: "list", text: `Listing posts${filters} failed` };
      const count = Array.isArray(result?.posts) ? result.posts.length : null;
      return {
        icon: "list",
        text: count === null ? `Listed posts${filters}` : `Listed ${plural(count, "post")}${filters}`,
      };
    }
    case "getAuthorInfo": {
      const who = result?.name ?? input.author ?? "an author";
      if (running) return { icon: "person", text: `Looking up ${who}…` };
      if (tool.state === "error") return { icon: "person", text: `Could not find ${who}` };
      const posts = Array.isArray(result?.posts) ? ` · ${plural(result.posts.length, "post")}` : "";
      return { icon: "person", text: `Looked up ${who}${posts}` };
    }
    case "getCurrentDateTime": {
      if (running) return { icon: "clock", text: "Checking today’s date…" };
      if (tool.state === "error") return { icon: "clock", text: "Could not check the date" };
      const when = result?.weekday && result?.date ? ` · ${result.weekday} ${result.date}` : "";
      return { icon: "clock", text: `Checked today’s date${when}` };
    }
    default: {
      const args = Object.entries(input)
        .slice(0, 2)
        .map(([key, value]) => `${key}: ${typeof value === "string" ? value : JSON.stringify(value)}`)
        .join(", ");
      const detail = args ? ` (${args.length > 60 ? `${args.slice(0, 59)}…` : args})` : "";
      if (running) return { icon: "tool", text: `Using ${tool.name}${detail}…` };
      if (tool.state === "error") return { icon: "tool", text: `${tool.name} failed${detail}` };
      return { icon: "tool", text: `Used ${tool.name}${detail}` };
    }
  }
}

function pretty(value) {
  if (typeof value !== "string") return JSON.stringify(value ?? {}, null, 2);
  const json = parsed(value);
  return json === null ? value : JSON.stringify(json, null, 2);
}

/** Links to what tool calls found (search results, listed posts), one per post. */
export function findings(tools) {
  const items = uniqueFindings(tools);
  if (!items.length) return null;
  return h(
    "ul",
    { class: "tool-findings" },
    items.map((item) => {
      const href = safeHref(item.url);
      const title = href ? h("a", { href }, String(item.title ?? item.url)) : String(item.title ?? "");
      const note = item.notes.join(", ");
      return h("li", {}, title, note ? h("span", { class: "tool-findings__note" }, ` · ${note}`) : null);
    }),
  );
}

/** The opened card: what the tool found, then its raw input and result. */
export function toolDetail(tool) {
  const output =
    tool.output === null || tool.output === undefined
      ? h("p", { class: "tool-pending" }, tool.state === "cancelled" ? "No result: the turn ended first." : "Waiting for the result…")
      : h("pre", { class: "tool-raw", tabindex: "0" }, h("code", {}, pretty(tool.output)));
  // The raw blocks scroll: tabindex lets a keyboard reach and scroll them.
  return [
    findings([tool]),
    h("p", { class: "tool-label" }, "Input"),
    h("pre", { class: "tool-raw", tabindex: "0" }, h("code", {}, pretty(tool.input))),
    h("p", { class: "tool-label" }, tool.state === "error" ? "Error" : "Result"),
    output,
  ];
}

/**
 * Tool calls in runs: consecutive calls of the same tool form one run, shown as one row
 * ("Searched the blog 3 times · 12 results") that opens to the calls. A run of one is a card.
 */
export function toolRuns(tools) {
  const runs = [];
  for (const tool of tools) {
    const last = runs.at(-1);
    if (last && last[0].name === tool.name) last.push(tool);
    else runs.push([tool]);
  }
  return runs;
}

const GROUP_PHRASES = {
  searchBlogContent: { done: (n) => `Searched the blog ${n} times`, running: (n) => `Searching the blog · ${n} searches` },
  getPost: { done: (n) => `Read ${n} posts`, running: (n) => `Reading ${n} posts` },
  listPosts: { done: (n) => `Listed posts ${n} times`, running: (n) => `Listing posts · ${n} lists` },
  getAuthorInfo: { done: (n) => `Looked up ${n} authors`, running: (n) => `Looking up ${n} authors` },
  getCurrentDateTime: { done: (n) => `Checked the date ${n} times`, running: (n) => `Checking the date · ${n} checks` },
};

/** The state of a run of calls: running while any runs; failed only if all failed. */
export function runState(tools) {
  if (tools.some((t) => t.state === "running")) return "running";
  if (tools.every((t) => t.state === "error")) return "error";
  if (tools.every((t) => t.state === "cancelled")) return "cancelled";
  return "ok";
}

/** The one-line summary of a run of calls of one tool, and its icon. */
export function describeRun(tools) {
  const name = tools[0].name;
  const count = tools.length;
  const state = runState(tools);
  const phrases = GROUP_PHRASES[name] ?? {
    done: (n) => `Used ${name} ${n} times`,
    running: (n) => `Using ${name} · ${n} calls`,
  };
  const parts = [state === "running" ? phrases.running(count) : phrases.done(count)];
  if (name === "searchBlogContent" || name === "listPosts") {
    const found = uniqueFindings(tools).length;
    if (state !== "running" || found) parts.push(plural(found, "result"));
  }
  const failed = tools.filter((t) => t.state === "error").length;
  if (failed && state !== "error") parts.push(`${failed} failed`);
  return { icon: describeTool(tools[0]).icon, text: parts.join(" · ") + (state === "running" ? "…" : "") };
}

/** The card's status icon: a spinner while running. */
export function toolStatusIcon(tool, iconName = describeTool(tool).icon) {
  if (tool.state === "running") return h("span", { class: "spinner", "aria-hidden": "true" });
  if (tool.state === "error") return icon("alert", "icon tool-status");
  if (tool.state === "cancelled") return icon("cross", "icon tool-status");
  return icon(iconName, "icon tool-status");
}

/** A short state for screen readers and tests. */
export function toolStateLabel(tool) {
  return { running: "running", ok: "done", error: "failed", cancelled: "cancelled" }[tool.state] ?? tool.state;
}

export { firstLine };

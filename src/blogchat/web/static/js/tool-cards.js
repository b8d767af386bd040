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
      const count = Array.isArray(result?.results) ? result.results.length : null;
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

/** Links to what a tool found (search results, listed posts), when it found any. */
function findings(tool) {
  const result = tool.state === "ok" ? parsed(tool.output) : null;
  let items = [];
  if (tool.name === "searchBlogContent" && Array.isArray(result?.results)) {
    items = result.results.map((r) => ({ title: r.title, url: r.url, note: r.section }));
  } else if (tool.name === "listPosts" && Array.isArray(result?.posts)) {
    items = result.posts.map((p) => ({ title: p.title, url: p.url, note: p.author }));
  } else if (tool.name === "getPost" && result?.title) {
    items = [{ title: result.title, url: result.url, note: result.author }];
  }
  if (!items.length) return null;
  return h(
    "ul",
    { class: "tool-findings" },
    items.map((item) => {
      const href = safeHref(item.url);
      const title = href ? h("a", { href }, String(item.title ?? item.url)) : String(item.title ?? "");
      return h("li", {}, title, item.note ? h("span", { class: "tool-findings__note" }, ` · ${item.note}`) : null);
    }),
  );
}

/** The opened card: what the tool found, then its raw input and result. */
export function toolDetail(tool) {
  const output =
    tool.output === null || tool.output === undefined
      ? h("p", { class: "tool-pending" }, tool.state === "cancelled" ? "No result: the turn ended first." : "Waiting for the result…")
      : h("pre", { class: "tool-raw" }, h("code", {}, pretty(tool.output)));
  return [
    findings(tool),
    h("p", { class: "tool-label" }, "Input"),
    h("pre", { class: "tool-raw" }, h("code", {}, pretty(tool.input))),
    h("p", { class: "tool-label" }, tool.state === "error" ? "Error" : "Result"),
    output,
  ];
}

/** The card's status icon: a spinner while running. */
export function toolStatusIcon(tool) {
  if (tool.state === "running") return h("span", { class: "spinner", "aria-hidden": "true" });
  if (tool.state === "error") return icon("alert", "icon tool-status");
  if (tool.state === "cancelled") return icon("cross", "icon tool-status");
  return icon(describeTool(tool).icon, "icon tool-status");
}

/** A short state for screen readers and tests. */
export function toolStateLabel(tool) {
  return { running: "running", ok: "done", error: "failed", cancelled: "cancelled" }[tool.state] ?? tool.state;
}

export { firstLine };

// The REST companions of the protocol (same cookie as the WebSocket).

/** A failed REST call, with the server's explanation when it gave one. */
export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function call(method, path, body) {
  const response = await fetch(path, {
    method,
    credentials: "same-origin",
    headers: body === undefined ? { Accept: "application/json" } : { "Content-Type": "application/json", Accept: "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok) {
    let message = `The server answered ${response.status}.`;
    try {
      const detail = (await response.json()).detail;
      if (typeof detail === "string") message = detail;
    } catch {
      // Not JSON: keep the status.
    }
    throw new ApiError(response.status, message);
  }
  return response.status === 204 ? null : response.json();
}

export const api = {
  models: () => call("GET", "/api/models"),
  personas: () => call("GET", "/api/personas"),
  chats: () => call("GET", "/api/chats"),
  searchChats: (query) => call("GET", `/api/chats?q=${encodeURIComponent(query)}`),
  rename: (chatId, title) => call("PATCH", `/api/chats/${encodeURIComponent(chatId)}`, { title }),
  remove: (chatId) => call("DELETE", `/api/chats/${encodeURIComponent(chatId)}`),
  highlight: (code, language) => call("POST", "/api/highlight", { code, language }),
};

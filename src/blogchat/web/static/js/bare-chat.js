// A bare chat page: enough to use the assistant by hand.
const transcript = document.getElementById("transcript");
const form = document.getElementById("composer");
const input = document.getElementById("message");
const stopButton = document.getElementById("stop");
let chatId = document.querySelector(".chat").dataset.chatId || null;
const answers = new Map();

const socket = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`);
socket.addEventListener("open", () => { if (chatId) socket.send(JSON.stringify({ type: "subscribe", chatId })); });
socket.addEventListener("message", (event) => {
  const msg = JSON.parse(event.data);
  if (msg.type === "chat_created") { chatId = msg.chatId; history.replaceState(null, "", `/chat/${chatId}`); }
  if (msg.type === "subscribed" && msg.messages) { for (const m of msg.messages) line(m.role, m.text, m.id); }
  if (msg.type === "user_message") line("user", msg.text, msg.messageId);
  if (msg.type === "token") { stopButton.hidden = false; append(msg.messageId, msg.text); }
  if (msg.type === "tool_use") line("tool", `${msg.name}(${JSON.stringify(msg.input)})`);
  if (msg.type === "done") stopButton.hidden = true;
  if (msg.type === "error") line("error", msg.message);
});

function line(role, text, id) {
  const li = document.createElement("li");
  li.className = role;
  li.textContent = `${role}: ${text}`;
  if (id) answers.set(id, li);
  transcript.append(li);
  return li;
}
function append(id, text) {
  const li = answers.get(id) || line("assistant", "", id);
  li.textContent += text;
}
form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = input.value.trim();
  if (!text) return;
  socket.send(JSON.stringify({ type: "chat", chatId, clientMessageId: crypto.randomUUID(), text }));
  input.value = "";
});
stopButton.addEventListener("click", () => socket.send(JSON.stringify({ type: "stop", chatId })));

// Entry point of /chat and /chat/{id}.
import { mountChat } from "./chat-view.js";

mountChat(document.getElementById("chat-app"));

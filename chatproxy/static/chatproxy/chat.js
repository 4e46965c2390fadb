/**
 * The chat page (chatproxy/chat.html): send, stop, stream the answer in as it grows, reopen and
 * continue a conversation, over the HTTP stream or the WebSocket.
 *
 * Model output is untrusted. It is rendered by renderMarkdown below, which builds DOM nodes and
 * sets only text: no string from the model is ever parsed as HTML, so markup it writes shows as
 * text and nothing it writes can run.
 */
import { ChatSocket, streamChat } from "./client.js";

function el(tag, className = "", text = "") {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text) node.textContent = text;
  return node;
}

// Markdown: the subset chat models write. Lines, not HTML, are parsed; every piece of text
// enters the page through append(string) or textContent, which never interpret markup.
const FENCE = /^\s*(`{3,}|~{3,})\s*([\w+#.-]*)\s*$/;
const LIST_ITEM = /^\s*([-*+]|\d{1,9}[.)])\s+(.*)$/;
const HEADING = /^(#{1,4})\s+(.+?)\s*#*\s*$/;
const INLINE = new RegExp(
  [
    "`([^`]+)`", // code
    "\\*\\*(\\S(?:.*?\\S)?)\\*\\*", // **strong**
    "\\*(\\S(?:.*?\\S)?)\\*", // *em*
    "(?<!\\w)_(\\S(?:.*?\\S)?)_(?!\\w)", // _em_, but not inside snake_case
    "\\[([^\\]]+)\\]\\(([^()\\s]+)\\)", // [label](url)
  ].join("|"),
  "g",
);

/** Return a DocumentFragment for `source`: paragraphs, lists, code, emphasis, http(s) links. */
export function renderMarkdown(source) {
  const out = document.createDocumentFragment();
  const lines = source.replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (FENCE.test(line)) {
      const [, marker, language] = FENCE.exec(line);
      const code = [];
      // While the answer streams the closing fence may not have arrived: the rest is code.
      for (i += 1; i < lines.length && !lines[i].trim().startsWith(marker); i += 1) {
        code.push(lines[i]);
      }
      i += 1;
      const block = el("code", "", code.join("\n"));
      if (language) block.dataset.language = language;
      const pre = el("pre");
      pre.append(block);
      out.append(pre);
    } else if (LIST_ITEM.test(line)) {
      const ordered = isOrdered(line);
      const list = el(ordered ? "ol" : "ul");
      const first = LIST_ITEM.exec(line)[1];
      if (ordered && parseInt(first, 10) !== 1) list.start = parseInt(first, 10);
      while (i < lines.length && LIST_ITEM.test(lines[i]) && isOrdered(lines[i]) === ordered) {
        const item = el("li");
        appendInline(item, LIST_ITEM.exec(lines[i])[2]);
        // Indented lines under an item continue it.
        for (i += 1; i < lines.length && continuesItem(lines[i]); i += 1) {
          item.append(el("br"));
          appendInline(item, lines[i].trim());
        }
        list.append(item);
      }
      out.append(list);
    } else if (HEADING.test(line)) {
      const [, hashes, text] = HEADING.exec(line);
      const heading = el(`h${hashes.length + 2}`); // the page owns h1 and h2
      appendInline(heading, text);
      out.append(heading);
      i += 1;
    } else if (line.trim() === "") {
      i += 1;
    } else {
      const paragraph = el("p");
      appendInline(paragraph, line);
      for (i += 1; i < lines.length && continuesParagraph(lines[i]); i += 1) {
        paragraph.append(el("br"));
        appendInline(paragraph, lines[i]);
      }
      out.append(paragraph);
    }
  }
  return out;
}

function isOrdered(line) {
  return /\d/.test(LIST_ITEM.exec(line)[1]);
}

function continuesItem(line) {
  return /^\s{2,}\S/.test(line) && !LIST_ITEM.test(line);
}

function continuesParagraph(line) {
  return line.trim() !== "" && !FENCE.test(line) && !LIST_ITEM.test(line) && !HEADING.test(line);
}

function appendInline(parent, text) {
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    parent.append(text.slice(last, m.index));
    last = m.index + m[0].length;
    if (m[1] !== undefined) {
      parent.append(el("code", "", m[1]));
    } else if (m[2] !== undefined || m[3] !== undefined || m[4] !== undefined) {
      const node = el(m[2] !== undefined ? "strong" : "em");
      appendInline(node, m[2] ?? m[3] ?? m[4]);
      parent.append(node);
    } else {
      appendLink(parent, m[5], m[6], m[0]);
    }
  }
  parent.append(text.slice(last));
}

function appendLink(parent, label, href, source) {
  let url = null;
  try {
    url = new URL(href); // absolute URLs only: a relative one would point into this site
  } catch {
    // not a URL: shown as the text it is
  }
  if (!url || (url.protocol !== "http:" && url.protocol !== "https:")) {
    parent.append(source); // javascript:, data: and the rest stay inert text
    return;
  }
  const link = el("a");
  link.href = url.href;
  link.rel = "noopener noreferrer";
  link.target = "_blank";
  appendInline(link, label);
  parent.append(link);
}

const ROLE_LABELS = { user: "You", assistant: "Assistant", system: "System" };
const STATUS_NOTES = {
  interrupted: "Stopped.",
  failed: "The answer failed.",
  blocked: "The answer was blocked.",
  streaming: "This answer did not finish.",
};
const TRANSPORT_KEY = "chatproxy.transport";

/** One message in the list; an answer re-renders at most once per frame while it streams. */
class MessageView {
  constructor(list, role, status) {
    this.list = list;
    this.role = role;
    this.item = el("li", `chatproxy-message chatproxy-message--${role}`);
    this.item.dataset.role = role;
    this.item.dataset.status = status;
    this.content = el("div", "chatproxy-message__content");
    this.item.append(el("div", "chatproxy-message__role", ROLE_LABELS[role] ?? role), this.content);
    if (status === "streaming") this.item.setAttribute("aria-busy", "true");
    this.frame = 0;
    list.append(this.item);
  }

  update(text) {
    this.text = text;
    this.frame ||= requestAnimationFrame(() => {
      this.frame = 0;
      this.draw(this.text);
    });
  }

  finish(text, status, note = STATUS_NOTES[status]) {
    cancelAnimationFrame(this.frame);
    this.frame = 0;
    this.draw(text);
    if (note) this.item.append(el("p", "chatproxy-message__note", note));
    this.item.dataset.status = status;
    this.item.removeAttribute("aria-busy");
  }

  draw(text) {
    const pinned = this.list.scrollHeight - this.list.scrollTop - this.list.clientHeight < 40;
    if (this.role === "assistant") this.content.replaceChildren(renderMarkdown(text));
    else this.content.textContent = text;
    if (pinned) this.list.scrollTop = this.list.scrollHeight;
  }
}

class ChatPage {
  constructor(root) {
    const part = (name) => document.getElementById(`chatproxy-${name}`);
    this.root = root;
    this.messages = part("messages");
    this.empty = part("empty");
    this.form = part("form");
    this.prompt = part("prompt");
    this.sendButton = part("send");
    this.stopButton = part("stop");
    this.newButton = part("new");
    this.errorBox = part("error");
    this.statusLine = part("status");
    this.title = part("title");
    this.conversationList = part("conversations");
    this.noConversations = part("no-conversations");
    this.radios = [...root.querySelectorAll('input[name="transport"]')];
    this.urls = root.dataset;
    this.conversationId = null;
    this.controller = null;
    this.socket = null;
    this.transport = "http";
  }

  start() {
    this.form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.send();
    });
    this.prompt.addEventListener("keydown", (event) => {
      const plain = !event.shiftKey && !event.altKey && !event.ctrlKey && !event.metaKey;
      if (event.key === "Enter" && plain && !event.isComposing) {
        event.preventDefault();
        this.form.requestSubmit();
      }
    });
    this.root.addEventListener("keydown", (event) => {
      if (event.key === "Escape" && this.controller) this.stop();
    });
    this.stopButton.addEventListener("click", () => this.stop());
    this.newButton.addEventListener("click", () => this.startNew());
    for (const radio of this.radios) {
      radio.addEventListener("change", () => radio.checked && this.useTransport(radio.value));
    }
    const saved = this.radios.find((r) => r.value === readPreference());
    if (saved) {
      saved.checked = true;
      this.transport = saved.value;
    }
    this.refreshConversations();
    this.prompt.focus();
  }

  async send() {
    const text = this.prompt.value.trim();
    if (!text || this.controller) return;
    this.showError(null);
    this.prompt.value = "";
    this.empty.hidden = true;
    new MessageView(this.messages, "user", "completed").finish(text, "completed");
    const answer = new MessageView(this.messages, "assistant", "streaming");
    const controller = (this.controller = new AbortController());
    this.setBusy(true);
    let content = "";
    let saved = false; // the server stored the turn: an error after this keeps the message
    const options = {
      messages: [{ role: "user", content: text }],
      conversationId: this.conversationId,
      signal: controller.signal,
      onEvent: (event) => {
        if (event.event === "analyzing") {
          if (!this.conversationId) this.title.textContent = shortTitle(text);
          this.conversationId = event.conversation_id;
          answer.item.dataset.messageId = event.message_id;
          saved = true;
        } else if (event.event === "answering") {
          content += event.content ?? "";
          answer.update(content);
        }
      },
    };
    let end;
    try {
      end = this.transport === "websocket"
        ? await (await this.openSocket()).streamChat(options)
        : await streamChat({ ...options, url: this.urls.completionsUrl });
    } catch (error) {
      end = { event: "error", error: { code: "network_error", message: error.message } };
    }
    this.controller = null;
    this.finishAnswer(answer, content, end);
    const refused = !saved && end.event === "error" && end.error?.code !== "cancelled";
    if (refused && !this.prompt.value) this.prompt.value = text; // nothing was saved: retry
    this.setBusy(false);
    this.prompt.focus();
    await this.refreshConversations();
  }

  finishAnswer(answer, content, end) {
    const code = end.error?.code;
    if (end.event === "completed") {
      answer.finish(content, "completed");
      this.announce("Answer complete.");
    } else if (code === "cancelled") {
      answer.finish(content, "interrupted");
      this.announce("Stopped.");
    } else {
      const blocked = code === "content_blocked" || code === "turn_rejected";
      answer.finish(content, blocked ? "blocked" : "failed", end.error?.message);
      this.showError(end.error);
    }
  }

  stop() {
    this.controller?.abort();
  }

  async openSocket() {
    if (!this.socket?.isOpen) this.socket = await ChatSocket.connect(this.urls.websocketPath);
    return this.socket;
  }

  useTransport(transport) {
    this.transport = transport;
    try {
      localStorage.setItem(TRANSPORT_KEY, transport);
    } catch {
      // storage may be off; the choice then lasts until the page reloads
    }
    if (transport !== "websocket") {
      this.socket?.close();
      this.socket = null;
    }
  }

  startNew() {
    if (this.controller) return;
    this.conversationId = null;
    this.messages.replaceChildren();
    this.empty.hidden = false;
    this.title.textContent = "New chat";
    this.showError(null);
    this.markCurrent();
    this.prompt.focus();
  }

  async openConversation(id) {
    if (this.controller) return;
    const data = await this.getJson(`${this.urls.conversationsUrl}/${encodeURIComponent(id)}`);
    if (!data) return;
    this.showError(null);
    this.conversationId = data.id;
    this.title.textContent = data.title || "Untitled";
    this.messages.replaceChildren();
    this.empty.hidden = data.messages.length > 0;
    for (const message of data.messages) {
      const status = message.status || "completed";
      new MessageView(this.messages, message.role, status).finish(message.content, status);
    }
    this.messages.scrollTop = this.messages.scrollHeight;
    this.markCurrent();
    this.prompt.focus();
  }

  async refreshConversations() {
    const data = await this.getJson(this.urls.conversationsUrl);
    if (!data) return;
    const items = data.conversations.map((c) => {
      const button = el("button", "chatproxy-conversation");
      button.type = "button";
      button.dataset.id = c.id;
      button.title = `Updated ${new Date(c.updated_at).toLocaleString()}`;
      const status = c.status === "completed" ? "" : STATUS_NOTES[c.status] ? c.status : "";
      const meta = [c.model, status].filter(Boolean).join(" · ");
      button.append(el("span", "chatproxy-conversation__title", c.title || "Untitled"));
      button.append(el("span", "chatproxy-conversation__meta", meta));
      button.addEventListener("click", () => this.openConversation(c.id));
      const item = el("li");
      item.append(button);
      return item;
    });
    this.conversationList.replaceChildren(...items);
    this.noConversations.hidden = items.length > 0;
    this.markCurrent();
  }

  async getJson(url) {
    try {
      const headers = { Accept: "application/json" };
      const response = await fetch(url, { headers, cache: "no-store" });
      const data = await response.json();
      if (response.ok) return data;
      this.showError(data.error);
    } catch {
      this.showError({ code: "network_error", message: "Could not reach the server. Try again." });
    }
    return null;
  }

  markCurrent() {
    for (const button of this.conversationList.querySelectorAll("button")) {
      if (button.dataset.id === this.conversationId) button.setAttribute("aria-current", "true");
      else button.removeAttribute("aria-current");
    }
  }

  setBusy(busy) {
    this.sendButton.disabled = busy;
    this.stopButton.disabled = !busy;
    this.newButton.disabled = busy;
    for (const control of [...this.radios, ...this.conversationList.querySelectorAll("button")]) {
      control.disabled = busy;
    }
    if (busy) this.announce("Answering…");
  }

  announce(text) {
    this.statusLine.textContent = text;
  }

  showError(error) {
    this.errorBox.hidden = !error;
    this.errorBox.replaceChildren();
    if (!error) return;
    this.errorBox.append(el("span", "", error.message || "Something went wrong."));
    if (error.code) this.errorBox.append(" ", el("code", "", error.code));
  }
}

/** The conversation's title as the server makes it: the first words of the first message. */
function shortTitle(text) {
  return text.split(/\s+/).join(" ").slice(0, 80);
}

function readPreference() {
  try {
    return localStorage.getItem(TRANSPORT_KEY);
  } catch {
    return null;
  }
}

const root = document.getElementById("chatproxy");
if (root) new ChatPage(root).start();

/**
 * The chat page (chatproxy/chat.html): send, stop, stream the answer in as it grows, reopen and
 * continue a conversation, over the HTTP stream or the WebSocket. Regenerate an answer, edit a
 * question, switch between branches (`2 / 3`), rename and delete conversations. The URL names
 * the open conversation (`?c=<id>`): a reload opens it again, and re-attaches to an answer
 * still streaming (docs/conversations.md).
 *
 * Model output is untrusted. It is rendered by renderMarkdown below, which builds DOM nodes and
 * sets only text: no string from the model is ever parsed as HTML, so markup it writes shows as
 * text and nothing it writes can run.
 */
import {
  ChatSocket,
  rateAnswer,
  readCsrfToken,
  readImagePart,
  resumeChat,
  streamChat,
  userContent,
} from "./client.js";

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

const ROLE_LABELS = { user: "You", assistant: "Assistant", system: "System", tool: "Tool result" };
const STATUS_NOTES = {
  interrupted: "Stopped.",
  failed: "The answer failed.",
  blocked: "The answer was blocked.",
  streaming: "This answer did not finish.",
};
const TRANSPORT_KEY = "chatproxy.transport";
const MAX_TOOL_ROUNDS = 4;
// The id in the page's data-rating-url that stands for the answer's (see chat.html).
const RATING_PLACEHOLDER = "00000000-0000-0000-0000-000000000000";
// Images are drawn only from URLs that cannot run anything: https:, or raster data: URLs.
const SAFE_IMAGE = /^(https:\/\/\S+|data:image\/(png|jpeg|webp|gif);base64,[A-Za-z0-9+/=]+)$/;

/** The tools this page runs itself, in the browser, when a model calls them. */
const PAGE_TOOLS = {
  get_time: {
    definition: {
      type: "function",
      function: {
        name: "get_time",
        description: "The current date and time where the user is, and their time zone.",
        parameters: { type: "object", properties: {} },
      },
    },
    run: () => ({
      time: new Date().toString(),
      time_zone: Intl.DateTimeFormat().resolvedOptions().timeZone,
    }),
  },
};

/** The string a tool call's result goes back as; a tool this page lacks says so. */
function runTool(call) {
  const tool = PAGE_TOOLS[call.name];
  const result = tool ? tool.run(call.arguments) : { error: `This page has no tool named ${call.name}.` };
  return JSON.stringify(result);
}

/** Arguments as the model sent them, indented when they are JSON. */
function prettyArguments(text) {
  try {
    return JSON.stringify(JSON.parse(text), null, 2);
  } catch {
    return text;
  }
}

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
    this.reasoning = null;
    this.calls = new Map();
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
    this.text = text;
    this.draw(text);
    if (note) this.item.append(el("p", "chatproxy-message__note", note));
    this.item.dataset.status = status;
    this.item.removeAttribute("aria-busy");
    if (this.reasoning) this.reasoning.summary.textContent = "Reasoning";
  }

  draw(text) {
    const pinned = this.list.scrollHeight - this.list.scrollTop - this.list.clientHeight < 40;
    if (this.role === "assistant") this.content.replaceChildren(renderMarkdown(text));
    else this.content.textContent = text;
    if (pinned) this.list.scrollTop = this.list.scrollHeight;
  }

  /**
   * Offer the rating buttons (and, once rated, a comment) under a saved answer; `rate(value,
   * comment)` saves the rating and resolves with it, or with null when it failed.
   */
  addRating(current, rate) {
    const box = el("div", "chatproxy-rating");
    const buttons = [["up", "▲ Good", "Good answer"], ["down", "▼ Bad", "Bad answer"]].map(([value, icon, label]) => {
      const button = el("button", "chatproxy-rating__button", icon);
      button.type = "button";
      button.dataset.value = value;
      button.setAttribute("aria-label", label);
      button.title = label;
      return button;
    });
    const form = el("form", "chatproxy-rating__comment");
    const input = el("input");
    input.type = "text";
    input.maxLength = 1000;
    input.placeholder = "Add a comment (optional)";
    input.setAttribute("aria-label", "Comment on this answer");
    const save = el("button", "", "Send");
    save.type = "submit";
    form.append(input, save);
    const show = (rating) => {
      for (const b of buttons) b.setAttribute("aria-pressed", String(b.dataset.value === rating?.value));
      form.hidden = !rating;
      if (rating) input.value = rating.comment ?? "";
      box.dataset.rating = rating?.value ?? "";
    };
    let value = current?.value ?? null;
    for (const button of buttons) {
      button.addEventListener("click", async () => {
        const rating = await rate(button.dataset.value, input.value.trim());
        if (rating) {
          value = rating.value;
          show(rating);
        }
      });
    }
    form.addEventListener("submit", async (submitted) => {
      submitted.preventDefault();
      if (!value) return;
      const rating = await rate(value, input.value.trim());
      if (rating) show(rating);
    });
    box.append(...buttons, form);
    show(current ?? null);
    this.item.append(box);
  }

  /** Add reasoning text, in a fold that stays closed unless the reader opens it. */
  addReasoning(text) {
    if (!this.reasoning) {
      const details = el("details", "chatproxy-reasoning");
      const summary = el("summary", "", this.item.dataset.status === "streaming" ? "Reasoning…" : "Reasoning");
      const body = el("div", "chatproxy-reasoning__text");
      details.append(summary, body);
      this.content.before(details);
      this.reasoning = { summary, body };
    }
    this.reasoning.body.textContent += text;
  }

  /** Show a tool call as a card: its name, id and arguments. */
  addToolCall(call) {
    if (this.calls.has(call.id)) return;
    const card = el("div", "chatproxy-tool-call");
    card.dataset.callId = call.id;
    const head = el("div", "chatproxy-tool-call__head");
    head.append(el("span", "", "Tool call "), el("strong", "", call.name), " ", el("code", "", call.id));
    const pre = el("pre");
    pre.append(el("code", "", prettyArguments(call.arguments ?? "")));
    card.append(head, pre);
    this.calls.set(call.id, card);
    this.item.append(card);
  }

  /** Show a server tool's result (or its error) on its call's card. */
  addToolResult(event) {
    if (!this.calls.has(event.id)) this.addToolCall({ id: event.id, name: event.name, arguments: "" });
    const card = this.calls.get(event.id);
    const result = el("div", "chatproxy-tool-call__result");
    if (event.error !== undefined) {
      result.append(el("span", "chatproxy-error", `Failed: ${event.error}`));
    } else {
      const pre = el("pre");
      pre.append(el("code", "", JSON.stringify(event.result, null, 2)));
      result.append(el("span", "", "Result"), pre);
    }
    card.append(result);
  }

  /** Ask the person to approve or deny each call, then hand their answers to `answer`. */
  askApproval(calls, answer) {
    const approvals = [];
    for (const call of calls) {
      if (!this.calls.has(call.id)) this.addToolCall(call);
      const prompt = el("div", "chatproxy-approval");
      const approve = el("button", "chatproxy-approval__approve", "Approve");
      const deny = el("button", "chatproxy-approval__deny", "Deny");
      const decide = (approved) => {
        approve.disabled = deny.disabled = true;
        prompt.replaceChildren(el("span", "chatproxy-muted", approved ? "Approved." : "Denied."));
        approvals.push({ id: call.id, approved });
        if (approvals.length === calls.length) answer(approvals);
      };
      approve.type = deny.type = "button";
      approve.addEventListener("click", () => decide(true));
      deny.addEventListener("click", () => decide(false));
      prompt.append(el("span", "", "Run this tool? "), approve, " ", deny);
      this.calls.get(call.id).append(prompt);
    }
  }

  /** Replace the message's buttons (regenerate, edit, the branch switcher) with `nodes`. */
  setActions(nodes) {
    this.actions?.remove();
    const shown = nodes.filter(Boolean);
    if (!shown.length) return;
    this.actions = el("div", "chatproxy-message__actions");
    this.actions.append(...shown);
    this.item.append(this.actions);
  }

  /** This message and every one drawn after it: what a new branch from here replaces. */
  removeFromHere() {
    while (this.item.nextSibling) this.item.nextSibling.remove();
    this.item.remove();
  }

  /** Draw a message's images, in the order they were sent. */
  addImages(parts) {
    const images = parts.filter((part) => part.type === "image_url");
    if (!images.length) return;
    const strip = el("div", "chatproxy-message__images");
    images.forEach((part, i) => {
      const url = part.image_url?.url ?? "";
      if (!SAFE_IMAGE.test(url)) {
        strip.append(el("span", "chatproxy-muted", "[image not shown]"));
        return;
      }
      const img = el("img", "chatproxy-thumbnail");
      img.src = url;
      img.alt = `Image ${i + 1}`;
      img.referrerPolicy = "no-referrer";
      strip.append(img);
    });
    this.content.after(strip);
  }
}

class ChatPage {
  constructor(root) {
    const part = (name) => document.getElementById(`chatproxy-${name}`);
    this.root = root;
    this.drawings = 0; // counts what redraws the log, so a slow transcript cannot erase a newer one
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
    this.search = part("search");
    this.moreButton = part("more");
    this.budgetBox = part("budgets"); // only where budgets are on
    this.budgetList = part("budget-list");
    this.nextPage = null;
    this.radios = [...root.querySelectorAll('input[name="transport"]')];
    this.urls = root.dataset;
    this.conversationId = null;
    this.controller = null;
    this.socket = null;
    this.transport = "http";
    this.fileInput = part("image");
    this.attachmentList = part("attachments");
    this.attachments = []; // {part, size} of each image waiting to be sent
    this.maxImages = Number(root.dataset.maxImages || 0);
    this.maxImageBytes = Number(root.dataset.maxImageBytes || 0);
    this.tools = root.dataset.offerTools ? Object.values(PAGE_TOOLS).map((t) => t.definition) : [];
    this.pendingCalls = []; // the last answer's tool calls, answered with the next turn
    this.running = null; // {conversationId, messageId} of the answer streaming in
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
    this.fileInput?.addEventListener("change", () => {
      this.attach([...this.fileInput.files]);
      this.fileInput.value = "";
    });
    this.prompt.addEventListener("paste", (event) => {
      const files = [...(event.clipboardData?.files ?? [])].filter((f) => f.type.startsWith("image/"));
      if (files.length) {
        event.preventDefault();
        this.attach(files);
      }
    });
    this.newButton.addEventListener("click", () => this.startNew());
    let typing = 0;
    this.search?.addEventListener("input", () => {
      clearTimeout(typing);
      typing = setTimeout(() => this.refreshConversations(), 250); // once typing pauses
    });
    this.moreButton?.addEventListener("click", () => this.refreshConversations({ more: true }));
    for (const radio of this.radios) {
      radio.addEventListener("change", () => radio.checked && this.useTransport(radio.value));
    }
    const saved = this.radios.find((r) => r.value === readPreference());
    if (saved) {
      saved.checked = true;
      this.transport = saved.value;
    }
    this.refreshConversations();
    this.refreshBudgets();
    const named = new URLSearchParams(location.search).get("c");
    if (named) this.openConversation(named);
    this.prompt.focus();
  }

  /** Name the open conversation in the URL, so a reload or a link opens it again. */
  nameInUrl(id) {
    const url = new URL(location.href);
    if (id) url.searchParams.set("c", id);
    else url.searchParams.delete("c");
    history.replaceState(null, "", url);
  }

  /** Check and read image files into parts waiting to be sent; refuse what the server would. */
  async attach(files) {
    this.showError(null);
    for (const file of files) {
      if (this.attachments.length >= this.maxImages) {
        const many = this.maxImages === 1 ? "one image" : `${this.maxImages} images`;
        this.showError({ code: "too_many_images", message: `Attach at most ${many} to a message.` });
        return;
      }
      const used = this.attachments.reduce((sum, a) => sum + a.size, 0);
      try {
        const part = await readImagePart(file, { maxBytes: this.maxImageBytes - used });
        this.attachments.push({ part, size: file.size });
      } catch (error) {
        this.showError({ code: "image_too_large", message: error.message });
        return;
      } finally {
        this.drawAttachments();
      }
    }
  }

  drawAttachments() {
    const items = this.attachments.map((attachment, i) => {
      const item = el("li", "chatproxy-attachment");
      const img = el("img", "chatproxy-thumbnail");
      img.src = attachment.part.image_url.url;
      img.alt = `Attached image ${i + 1}`;
      const remove = el("button", "chatproxy-button chatproxy-button--quiet", "×");
      remove.type = "button";
      remove.setAttribute("aria-label", `Remove image ${i + 1}`);
      remove.addEventListener("click", () => {
        this.attachments.splice(i, 1);
        this.drawAttachments();
      });
      item.append(img, remove);
      return item;
    });
    this.attachmentList.replaceChildren(...items);
  }

  /** Send the prompt (with its images), or with `toolsOnly` just the results of the last
   * answer's tool calls, which this page runs itself; with `regenerate` (an answer's id)
   * another answer beside that one, with `edit` ({id, text}) a new question beside that one. */
  async send({ toolsOnly = false, round = 0, approvals = null, regenerate = null, edit = null } = {}) {
    toolsOnly = toolsOnly || approvals !== null || regenerate !== null; // no new message
    const editing = edit !== null;
    const text = editing ? edit.text : toolsOnly ? "" : this.prompt.value.trim();
    const images = toolsOnly || editing ? [] : this.attachments.map((a) => a.part);
    if ((!text && !images.length && !toolsOnly) || this.controller) return;
    this.drawings += 1;
    this.showError(null);
    this.empty.hidden = true;
    if (regenerate || editing) this.pendingCalls = []; // the branch starts before any call
    const results = this.pendingCalls.map((call) => ({
      role: "tool",
      tool_call_id: call.id,
      content: runTool(call),
    }));
    this.pendingCalls = [];
    for (const result of results) {
      new MessageView(this.messages, "tool", "completed").finish(result.content, "completed");
    }
    const messages = [...results];
    let said = null;
    if (!toolsOnly) {
      if (!editing) {
        this.prompt.value = "";
        this.attachments = [];
        this.drawAttachments();
      }
      said = new MessageView(this.messages, "user", "completed");
      said.finish(text, "completed");
      said.addImages(images);
      messages.push({ role: "user", content: userContent(text, images) });
    }
    const answer = new MessageView(this.messages, "assistant", "streaming");
    const controller = (this.controller = new AbortController());
    this.setBusy(true);
    let content = "";
    let saved = false; // the server stored the turn: an error after this keeps the message
    const asked = []; // calls to server tools waiting for the person's approval
    const options = {
      messages,
      conversationId: this.conversationId,
      regenerate,
      edit: edit?.id ?? null,
      params: {
        detach: true, // a reload re-attaches to the answer instead of stopping it
        ...(this.tools.length ? { tools: this.tools } : {}),
        ...(approvals ? { approvals } : {}),
      },
      signal: controller.signal,
      onEvent: (event) => {
        if (event.event === "analyzing") {
          if (!this.conversationId) this.title.textContent = shortTitle(text);
          this.conversationId = event.conversation_id;
          this.nameInUrl(this.conversationId);
          this.running = { conversationId: event.conversation_id, messageId: event.message_id };
          answer.item.dataset.messageId = event.message_id;
          saved = true;
        } else if (event.event === "answering") {
          content += event.content ?? "";
          answer.update(content);
        } else if (event.event === "approval_required") {
          asked.push(event);
        } else {
          showPiece(answer, event);
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
    this.controller = this.running = null;
    for (const call of end.tool_calls ?? []) answer.addToolCall(call);
    this.finishAnswer(answer, content, end);
    if (saved && answer.item.dataset.messageId) this.offerRating(answer, answer.item.dataset.messageId, null);
    const refused = !saved && end.event === "error" && end.error?.code !== "cancelled";
    const branching = regenerate !== null || editing;
    if (refused && !toolsOnly && !editing && !this.prompt.value) this.prompt.value = text; // retry
    this.setBusy(false);
    this.prompt.focus();
    // A refused new branch leaves the old one: draw what the server has.
    if (refused && branching && this.conversationId) {
      await this.openConversation(this.conversationId);
      this.showError(end.error); // drawing the transcript cleared it
    }
    await this.refreshConversations();
    await this.refreshBudgets(); // what the turn spent, or what a refusal left
    if (saved) await this.decorateTurn(said, answer);
    if (end.event === "completed" && end.finish_reason === "approval_required") {
      this.pendingCalls = end.tool_calls ?? []; // sent with the approvals
      answer.askApproval(asked, (given) => this.send({ approvals: given }));
    } else if (end.event === "completed" && end.tool_calls?.length) {
      this.pendingCalls = end.tool_calls;
      // The model waits for the results: give them, a few rounds at most (then the next
      // message the person sends carries them).
      if (round < MAX_TOOL_ROUNDS) await this.send({ toolsOnly: true, round: round + 1 });
    }
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
    if (this.running && this.transport !== "websocket") {
      // The answer runs detached (or is followed): leaving would not stop it, the cancel
      // endpoint does; its stream then ends with `cancelled`. Over the WebSocket, aborting
      // sends the `cancel` frame.
      const { conversationId, messageId } = this.running;
      const url = `${this.urls.completionsUrl}/${encodeURIComponent(conversationId)}/cancel`;
      this.sendJson("POST", `${url}?message_id=${encodeURIComponent(messageId)}`);
      return;
    }
    this.controller?.abort();
  }

  offerRating(view, messageId, current) {
    view.item.dataset.messageId = messageId;
    view.addRating(current, async (value, comment) => {
      const url = this.urls.ratingUrl.replace(RATING_PLACEHOLDER, encodeURIComponent(messageId));
      try {
        const data = await rateAnswer({ url, value, comment });
        if (data.rating) {
          this.announce(value === "up" ? "Rated good." : "Rated bad.");
          return data.rating;
        }
        this.showError(data.error);
      } catch {
        this.showError({ code: "network_error", message: "Could not reach the server. Try again." });
      }
      return null;
    });
  }

  /** Re-attach to an answer still streaming (after a reload) and show the rest live. */
  async resume(message) {
    const answer = new MessageView(this.messages, "assistant", "streaming");
    answer.item.dataset.messageId = message.id;
    const controller = (this.controller = new AbortController());
    this.running = { conversationId: this.conversationId, messageId: message.id };
    this.setBusy(true);
    let content = "";
    const options = {
      conversationId: this.conversationId,
      messageId: message.id,
      signal: controller.signal,
      onEvent: (event) => {
        if (event.event === "answering") {
          content += event.content ?? "";
          answer.update(content);
        } else {
          showPiece(answer, event);
        }
      },
    };
    let end;
    try {
      end = this.transport === "websocket"
        ? await (await this.openSocket()).resume(options)
        : await resumeChat({
          ...options,
          url: `${this.urls.completionsUrl}/${encodeURIComponent(this.conversationId)}/stream`,
        });
    } catch (error) {
      end = { event: "error", error: { code: "network_error", message: error.message } };
    }
    this.controller = this.running = null;
    for (const call of end.tool_calls ?? []) answer.addToolCall(call);
    this.finishAnswer(answer, content, end);
    this.setBusy(false);
    await this.refreshConversations();
    await this.decorateTurn(null, answer);
  }

  /** Give a finished turn's question and answer their buttons, from the saved transcript. */
  async decorateTurn(said, answer) {
    const data = await this.getJson(this.conversationUrl(this.conversationId));
    if (!data || data.id !== this.conversationId) return;
    const i = data.messages.findIndex((m) => m.id === answer.item.dataset.messageId);
    if (i < 0) return;
    this.decorateAnswer(answer, data.messages, i);
    const question = data.messages[turnStart(data.messages, i) - 1];
    if (said && question?.role === "user") this.decorateQuestion(said, question);
  }

  decorateAnswer(view, messages, i) {
    const first = messages[turnStart(messages, i)];
    view.item.dataset.messageId = messages[i].id;
    const regenerate = this.action("Regenerate", () => {
      view.removeFromHere();
      this.send({ regenerate: messages[i].id });
    });
    view.setActions([regenerate, this.switcher(first)]);
  }

  decorateQuestion(view, message) {
    view.item.dataset.messageId = message.id;
    view.siblings = message.siblings;
    const edit = this.action("Edit", () => this.editQuestion(view, message.id));
    view.setActions([edit, this.switcher(message)]);
  }

  /** Let the person rewrite a question in place; saving asks it on a new branch. */
  editQuestion(view, id) {
    const box = el("textarea", "chatproxy-edit");
    box.value = view.text ?? "";
    box.setAttribute("aria-label", "Edit message");
    const save = this.action("Save and send", () => {
      const text = box.value.trim();
      if (!text) return;
      view.removeFromHere();
      this.send({ edit: { id, text } });
    });
    const cancel = this.action("Cancel", () => {
      box.remove();
      view.content.hidden = false;
      this.decorateQuestion(view, { id, siblings: view.siblings });
    });
    view.content.hidden = true;
    view.content.after(box);
    view.setActions([save, cancel]);
    box.focus();
  }

  /** `‹ 2 / 3 ›` for a message with siblings: each arrow switches to that branch. */
  switcher(message) {
    const siblings = message?.siblings ?? [];
    if (siblings.length < 2) return null;
    const index = siblings.indexOf(message.id);
    const nav = el("span", "chatproxy-branch");
    const go = (to) => this.switchBranch(siblings[to]);
    const previous = this.action("‹", () => go(index - 1), "Previous branch");
    const next = this.action("›", () => go(index + 1), "Next branch");
    // Kept disabled however busy the page is: there is no branch that way.
    previous.dataset.inert = previous.disabled = index <= 0;
    next.dataset.inert = next.disabled = index >= siblings.length - 1;
    nav.append(previous, el("span", "chatproxy-branch__count", `${index + 1} / ${siblings.length}`), next);
    return nav;
  }

  async switchBranch(messageId) {
    if (this.controller) return;
    const url = `${this.conversationUrl(this.conversationId)}/branch`;
    const data = await this.sendJson("POST", url, { message_id: messageId });
    if (data) this.drawTranscript(data);
  }

  action(label, onClick, name = "") {
    const button = el("button", "chatproxy-action", label);
    button.type = "button";
    if (name) button.setAttribute("aria-label", name);
    button.addEventListener("click", onClick);
    return button;
  }

  conversationUrl(id) {
    return `${this.urls.conversationsUrl}/${encodeURIComponent(id)}`;
  }

  /** Send JSON with the CSRF token (rename, delete, switch, cancel); the answer, or null. */
  async sendJson(method, url, body = undefined) {
    try {
      const headers = { Accept: "application/json", "X-CSRFToken": readCsrfToken() };
      if (body !== undefined) headers["Content-Type"] = "application/json";
      const response = await fetch(url, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        credentials: "same-origin",
        cache: "no-store",
      });
      const data = await response.json();
      if (response.ok) return data;
      this.showError(data.error);
    } catch {
      this.showError({ code: "network_error", message: "Could not reach the server. Try again." });
    }
    return null;
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
    this.drawings += 1;
    this.conversationId = null;
    this.pendingCalls = [];
    this.messages.replaceChildren();
    this.empty.hidden = false;
    this.title.textContent = "New chat";
    this.showError(null);
    this.nameInUrl(null);
    this.markCurrent();
    this.prompt.focus();
  }

  async openConversation(id) {
    if (this.controller) return;
    const drawing = (this.drawings += 1);
    const data = await this.getJson(this.conversationUrl(id));
    // A later open, a new chat or a message sent while this one was fetched wins.
    if (data && drawing === this.drawings) this.drawTranscript(data);
  }

  /** Draw a transcript (the active branch); an answer still streaming is re-attached to. */
  drawTranscript(data) {
    this.showError(null);
    this.conversationId = data.id;
    this.nameInUrl(data.id);
    this.title.textContent = data.title || "Untitled";
    this.messages.replaceChildren();
    this.empty.hidden = data.messages.length > 0;
    this.pendingCalls = [];
    const last = data.messages.at(-1);
    const running = last?.role === "assistant" && last.status === "streaming" ? last : null;
    data.messages.forEach((message, i) => {
      if (message === running) return;
      const status = message.status || "completed";
      const view = new MessageView(this.messages, message.role, status);
      view.siblings = message.siblings;
      for (const text of message.reasoning ? [message.reasoning] : []) view.addReasoning(text);
      view.finish(message.content, status);
      view.addImages(message.parts ?? []);
      for (const call of message.tool_calls ?? []) view.addToolCall(call);
      if (message.id && message.role === "assistant" && message.status) {
        this.offerRating(view, message.id, message.rating ?? null);
      }
      if (message.role === "assistant") this.pendingCalls = message.tool_calls ?? [];
      const waiting = message.approval_required ?? [];
      if (waiting.length) {
        const asked = this.pendingCalls.filter((c) => waiting.includes(c.id));
        this.pendingCalls = this.pendingCalls.filter((c) => !waiting.includes(c.id));
        view.askApproval(asked, (given) => this.send({ approvals: given }));
      }
      if (message.role === "tool") {
        this.pendingCalls = this.pendingCalls.filter((c) => c.id !== message.tool_call_id);
      }
      if (message.role === "user") this.decorateQuestion(view, message);
      const next = data.messages[i + 1];
      const answered = !next || !next.status || next.role === "user";
      if (message.role === "assistant" && answered && next !== running) {
        this.decorateAnswer(view, data.messages, i);
      }
    });
    this.messages.scrollTop = this.messages.scrollHeight;
    this.markCurrent();
    this.prompt.focus();
    if (running) this.resume(running);
  }

  /** List the conversations: the first page, or with `more` the next one after those shown;
   * only those the search box's words find, when it has some. */
  async refreshConversations({ more = false } = {}) {
    const query = new URLSearchParams();
    const words = this.search?.value.trim() ?? "";
    if (words) query.set("q", words);
    if (more) query.set("page", String(this.nextPage));
    const data = await this.getJson(`${this.urls.conversationsUrl}?${query}`);
    if (!data) return;
    this.nextPage = data.next_page;
    if (this.moreButton) this.moreButton.hidden = !data.next_page;
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
      const item = el("li", "chatproxy-conversations__item");
      const rename = this.listAction("Rename", c, () => this.renameConversation(item, button, c));
      const remove = this.listAction("Delete", c, () => this.deleteConversation(remove, c));
      item.append(button, rename, remove);
      return item;
    });
    if (more) this.conversationList.append(...items);
    else this.conversationList.replaceChildren(...items);
    const shown = this.conversationList.children.length > 0;
    this.noConversations.hidden = shown;
    this.noConversations.textContent = words ? "No conversation matches." : "No conversations yet.";
    this.markCurrent();
  }

  /** Show the caller's budgets (GET budgets): each one's label, what is left and when it
   * resets. Hidden while there are none; absent where budgets are off. */
  async refreshBudgets() {
    if (!this.budgetBox) return;
    const data = await this.getJson(this.urls.budgetsUrl);
    if (!data) return;
    this.budgetList.replaceChildren(...data.budgets.map(budgetItem));
    this.budgetBox.hidden = data.budgets.length === 0;
  }

  listAction(label, conversation, onClick) {
    const button = el("button", "chatproxy-conversation-action chatproxy-action", label);
    button.type = "button";
    button.title = `${label} “${conversation.title || "Untitled"}”`;
    button.addEventListener("click", onClick);
    return button;
  }

  /** Rename in place: Enter saves the new title, Escape keeps the old one. */
  renameConversation(item, button, conversation) {
    const input = el("input", "chatproxy-rename");
    input.value = conversation.title;
    input.maxLength = 80;
    input.setAttribute("aria-label", "New title");
    button.hidden = true;
    item.prepend(input);
    input.focus();
    input.addEventListener("keydown", async (event) => {
      if (event.key === "Escape") {
        input.remove();
        button.hidden = false;
      } else if (event.key === "Enter") {
        event.preventDefault();
        const url = this.conversationUrl(conversation.id);
        const saved = await this.sendJson("PATCH", url, { title: input.value });
        if (!saved) return;
        if (conversation.id === this.conversationId) this.title.textContent = saved.title;
        await this.refreshConversations();
      }
    });
  }

  /** Delete after a second click on the same button, which asks first. */
  async deleteConversation(button, conversation) {
    if (button.dataset.confirming !== "true") {
      button.dataset.confirming = "true";
      button.textContent = "Really delete?";
      return;
    }
    const done = await this.sendJson("DELETE", this.conversationUrl(conversation.id));
    if (!done) return;
    if (conversation.id === this.conversationId) this.startNew();
    await this.refreshConversations();
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
    const buttons = [
      ...this.conversationList.querySelectorAll("button"),
      ...this.messages.querySelectorAll(".chatproxy-action"),
    ];
    for (const control of [...this.radios, ...buttons]) {
      control.disabled = busy || control.dataset.inert === "true";
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

/** Show an event beside the answer's text: reasoning, a tool call, a server tool's result. */
function showPiece(answer, event) {
  if (event.event === "reasoning") answer.addReasoning(event.content ?? "");
  else if (event.event === "tool_call") answer.addToolCall(event);
  else if (event.event === "tool_result") answer.addToolResult(event);
}

/** One budget of GET budgets as the sidebar lists it: "Your daily budget", "120 of 200000
 * tokens left", "Resets <time>". */
function budgetItem(budget) {
  const item = el("li", "chatproxy-budget");
  item.append(el("span", "chatproxy-budget__label", budget.label));
  const left = [];
  if (budget.tokens) left.push(`${budget.tokens.remaining} of ${budget.tokens.limit} tokens`);
  if (budget.cost) left.push(`${budget.cost.remaining} of ${budget.cost.limit} in cost`);
  item.append(el("span", "chatproxy-budget__left", `${left.join(" and ")} left`));
  const resets = el("span", "chatproxy-budget__resets chatproxy-muted", "Resets ");
  const when = el("time", "", new Date(budget.resets_at).toLocaleString());
  when.dateTime = budget.resets_at;
  resets.append(when);
  item.append(resets);
  return item;
}

/** Where the turn that wrote `messages[i]` starts: past the rows the server wrote in it (its
 * tool steps and results, which have a status), as the server finds it for a regenerate. */
function turnStart(messages, i) {
  let start = i;
  while (start > 0 && messages[start - 1].status) start -= 1;
  return start;
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

/**
 * chatproxy's browser client: one chat turn over the HTTP NDJSON stream (`streamChat`) or over a
 * WebSocket (`ChatSocket#streamChat`), with the same options and the same callback for both.
 * A dependency-free ES module.
 *
 * Every turn ends with exactly one terminal event, `completed` or `error`: it is passed to
 * `onEvent` like every other event and is what the returned promise resolves to. Failures the
 * server cannot report (no network, a stream cut short, a Stop) arrive as an `error` event too,
 * with one of the codes in LOCAL_ERRORS, so a page handles a single shape.
 */

/** Codes of the `error` events this client makes itself; the server's are in docs/protocol.md. */
export const LOCAL_ERRORS = Object.freeze({
  cancelled: "The answer was stopped on request.",
  network_error: "The connection to the server failed. Check your network and try again.",
  incomplete_stream: "The answer stopped before it was complete. Try again.",
  bad_response: "The server sent something this page could not read.",
});

/**
 * Split NDJSON bytes into events. Reads do not respect line boundaries: one read may end in the
 * middle of a line (or of a UTF-8 character) and another may carry several lines, so the
 * unfinished tail is kept for the next chunk instead of being parsed, or dropped, too early.
 */
export class NdjsonDecoder {
  #text = new TextDecoder();
  #tail = "";

  /** Return the events completed by this chunk of bytes. */
  push(chunk) {
    this.#tail += this.#text.decode(chunk, { stream: true });
    const lines = this.#tail.split("\n");
    this.#tail = lines.pop();
    return parseLines(lines);
  }

  /** Return the last event, when the stream ended without a newline after it. */
  end() {
    const rest = this.#tail + this.#text.decode();
    this.#tail = "";
    return parseLines([rest]);
  }
}

function localError(code) {
  return { event: "error", error: { code, message: LOCAL_ERRORS[code] } };
}

function parseLines(lines) {
  return lines.filter((line) => line.trim() !== "").map((line) => JSON.parse(line));
}

/** The image types a request may carry as data URLs (docs/protocol.md). */
export const IMAGE_TYPES = Object.freeze(["image/png", "image/jpeg", "image/webp", "image/gif"]);

/**
 * Read an image File (from a file picker or a paste) into an `image_url` content part with a
 * data URL, after checking its type and that it is at most `maxBytes` (what is left of the
 * server's limit for the message's images): the server refuses more, so the check spares
 * sending them. Rejects with an Error whose message says the fix.
 */
export function readImagePart(file, { maxBytes }) {
  if (!IMAGE_TYPES.includes(file.type)) {
    return Promise.reject(new Error(`${file.name || "The file"} is not a PNG, JPEG, WebP or GIF image.`));
  }
  if (file.size > maxBytes) {
    const kb = (n) => (Math.max(n, 0) / 1024).toFixed(1);
    return Promise.reject(new Error(
      `${file.name || "The image"} is ${kb(file.size)} KB, and only ${kb(maxBytes)} KB more of ` +
        "images fit in this message: make it smaller, or send it in the next one.",
    ));
  }
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.addEventListener("load", () => resolve({ type: "image_url", image_url: { url: reader.result } }));
    reader.addEventListener("error", () => reject(new Error("The image could not be read.")));
    reader.readAsDataURL(file);
  });
}

/** A user message's content: the text alone, or its text and images as parts. */
export function userContent(text, imageParts = []) {
  if (!imageParts.length) return text;
  return [...(text ? [{ type: "text", text }] : []), ...imageParts];
}

/** The CSRF token Django expects in X-CSRFToken: the page's meta tag, else the cookie. */
export function readCsrfToken() {
  if (typeof document === "undefined") return "";
  const meta = document.querySelector('meta[name="csrf-token"]');
  if (meta?.content) return meta.content;
  const cookie = document.cookie.split("; ").find((c) => c.startsWith("csrftoken="));
  return cookie ? decodeURIComponent(cookie.slice("csrftoken=".length)) : "";
}

/**
 * Rate an answer (the `message_id` of its `completed` event) "up" or "down", with an optional
 * comment; rating it again changes the rating. Resolves with `{rating}` or `{error}`.
 */
export async function rateAnswer({ url, value, comment = "", csrfToken = readCsrfToken() }) {
  const response = await fetch(url, {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "application/json", "X-CSRFToken": csrfToken },
    body: JSON.stringify(comment ? { value, comment } : { value }),
    credentials: "same-origin",
  });
  return response.json();
}

/** Follows one turn: remembers its ids and makes sure onEvent sees one terminal event. */
class Turn {
  constructor(onEvent) {
    this.onEvent = onEvent ?? (() => {});
    this.ids = {};
    this.terminal = null;
  }

  emit(event) {
    if (this.terminal) return;
    if (event.event === "analyzing") {
      this.ids = { conversation_id: event.conversation_id, message_id: event.message_id };
    }
    if (event.event === "completed" || event.event === "error") this.terminal = event;
    this.onEvent(event);
  }

  /** End with a client-side error, unless the server already ended the turn. */
  fail(code, extra = {}) {
    this.emit({ ...localError(code), ...this.ids, ...extra });
    return this.terminal;
  }
}

function requestBody({ messages, conversationId, model, params, regenerate, edit }) {
  const body = { ...params };
  if (!regenerate) body.messages = messages;
  if (conversationId) body.conversation_id = conversationId;
  if (model) body.model = model;
  if (regenerate) body.regenerate = regenerate; // another answer beside this one
  if (edit) body.edit = edit; // these messages beside this user message
  return body;
}

/**
 * Run one turn over HTTP: POST to `url` and call `onEvent` with each NDJSON event as it arrives.
 * `signal` (an AbortSignal) stops the answer: the server saves it `interrupted`. Resolves with
 * the terminal event; a 4xx answer becomes an `error` event carrying its HTTP `status`.
 */
export async function streamChat({
  messages,
  conversationId = null,
  model = null,
  params = {},
  regenerate = null,
  edit = null,
  signal = undefined,
  onEvent = undefined,
  url = "/completions",
  csrfToken = readCsrfToken(),
  fetch: fetchImpl = globalThis.fetch.bind(globalThis),
} = {}) {
  const body = requestBody({ messages, conversationId, model, params, regenerate, edit });
  return readTurn(onEvent, signal, () => fetchImpl(url, {
    method: "POST",
    headers: {
      "Content-Type": "application/json",
      Accept: "application/x-ndjson",
      "X-CSRFToken": csrfToken,
    },
    body: JSON.stringify(body),
    credentials: "same-origin",
    cache: "no-store",
    signal,
  }));
}

/**
 * Re-attach over HTTP to a conversation's latest answer (or `messageId`'s), on any branch:
 * `onEvent` gets `analyzing` (with `resumed: true`), the text so far as one `answering` event,
 * then the rest live, and the turn's own terminal event. `signal` only stops following: to
 * stop the answer itself, POST its cancel URL.
 */
export async function resumeChat({
  conversationId,
  messageId = null,
  signal = undefined,
  onEvent = undefined,
  url = `/completions/${encodeURIComponent(conversationId)}/stream`,
  fetch: fetchImpl = globalThis.fetch.bind(globalThis),
} = {}) {
  const query = messageId ? `?message_id=${encodeURIComponent(messageId)}` : "";
  return readTurn(onEvent, signal, () => fetchImpl(url + query, {
    headers: { Accept: "application/x-ndjson" },
    credentials: "same-origin",
    cache: "no-store",
    signal,
  }));
}

/** Make the request `open()` sends and read its NDJSON events into one turn. */
async function readTurn(onEvent, signal, open) {
  const turn = new Turn(onEvent);
  const lost = () => turn.fail(signal?.aborted ? "cancelled" : "network_error");
  let response;
  try {
    response = await open();
  } catch {
    return lost();
  }
  if (!response.ok || !response.body) {
    const error = await response.json().then((b) => b?.error, () => null);
    if (!error?.code) return turn.fail("bad_response", { status: response.status });
    turn.emit({ event: "error", error, status: response.status });
    return turn.terminal;
  }
  const reader = response.body.getReader();
  const decoder = new NdjsonDecoder();
  for (;;) {
    let read, events;
    try {
      read = await reader.read();
    } catch {
      return lost();
    }
    try {
      events = read.done ? decoder.end() : decoder.push(read.value);
    } catch {
      reader.cancel().catch(() => {});
      return turn.fail("bad_response");
    }
    for (const event of events) turn.emit(event);
    if (read.done) return turn.terminal ?? turn.fail("incomplete_stream");
  }
}

/** The absolute ws:// or wss:// URL of a WebSocket path on this page's host. */
export function socketUrl(path = "/ws/chat/") {
  const url = new URL(path, globalThis.location?.href);
  if (url.protocol === "https:") url.protocol = "wss:";
  else if (url.protocol === "http:") url.protocol = "ws:";
  return url.href;
}

let requestCounter = 0;

/**
 * One WebSocket that carries many turns, one at a time, with the same `streamChat` options and
 * callback as HTTP. `signal` sends a `cancel` frame; the server then ends the turn with an
 * `error` event whose code is `cancelled`, after the answer is saved.
 */
export class ChatSocket {
  #socket;
  #turn = null;
  #closed = null; // the error event a turn gets once the socket has closed

  /** Open a socket to `path` and resolve once it is ready for turns. */
  static connect(path = "/ws/chat/") {
    return new Promise((resolve, reject) => {
      const socket = new WebSocket(socketUrl(path));
      const refused = () => reject(new Error(LOCAL_ERRORS.network_error));
      socket.addEventListener("error", refused, { once: true });
      const opened = () => {
        socket.removeEventListener("error", refused);
        resolve(new ChatSocket(socket));
      };
      socket.addEventListener("open", opened, { once: true });
    });
  }

  constructor(socket) {
    this.#socket = socket;
    socket.addEventListener("message", (message) => this.#receive(message.data));
    socket.addEventListener("close", (close) => {
      // 4401: the server accepted the socket only to say that nobody is logged in.
      const error = close.code === 4401
        ? { code: "authentication_required", message: "Log in to chat." }
        : localError("network_error").error;
      this.#closed = { event: "error", error };
      this.#end((turn) => turn.emit({ ...this.#closed, ...turn.ids }));
    });
  }

  /** Whether the socket can still start turns; a closed one must be replaced by a new one. */
  get isOpen() {
    return this.#socket.readyState === WebSocket.OPEN;
  }

  close() {
    this.#socket.close(1000);
  }

  /** Run one turn; resolves with its terminal event. */
  streamChat({
    messages,
    conversationId = null,
    model = null,
    params = {},
    regenerate = null,
    edit = null,
    signal = undefined,
    onEvent = undefined,
  } = {}) {
    const body = requestBody({ messages, conversationId, model, params, regenerate, edit });
    return this.#run({ type: "chat", ...body }, signal, onEvent);
  }

  /**
   * Re-attach to a conversation's latest answer (or `messageId`'s), on any branch, as
   * `resumeChat` does over HTTP; `signal` stops the answer itself (a `cancel` frame).
   */
  resume({ conversationId, messageId = null, signal = undefined, onEvent = undefined } = {}) {
    const frame = { type: "resume", conversation_id: conversationId };
    if (messageId) frame.message_id = messageId;
    return this.#run(frame, signal, onEvent);
  }

  #run(frame, signal, onEvent) {
    return new Promise((resolve) => {
      const turn = new Turn(onEvent);
      if (this.#turn) {
        const error = { code: "busy", message: "A turn is already running on this socket." };
        turn.emit({ event: "error", error });
        resolve(turn.terminal);
        return;
      }
      if (signal?.aborted) {
        resolve(turn.fail("cancelled"));
        return;
      }
      if (!this.isOpen) {
        turn.emit(this.#closed ?? localError("network_error"));
        resolve(turn.terminal);
        return;
      }
      const requestId = `turn-${Date.now().toString(36)}-${++requestCounter}`;
      const cancel = () => this.isOpen && this.#socket.send(JSON.stringify({ type: "cancel" }));
      signal?.addEventListener("abort", cancel, { once: true });
      this.#turn = { requestId, turn, resolve, cancel, signal };
      this.#socket.send(JSON.stringify({ ...frame, request_id: requestId }));
    });
  }

  #receive(data) {
    let event;
    try {
      event = JSON.parse(data);
    } catch {
      this.#end((turn) => turn.fail("bad_response"));
      return;
    }
    const current = this.#turn;
    // Frames about another request (or none running) are not ours to report.
    if (!current) return;
    if (event.request_id !== undefined && event.request_id !== current.requestId) return;
    current.turn.emit(event);
    if (current.turn.terminal) this.#end(() => {});
  }

  #end(finish) {
    const current = this.#turn;
    if (!current) return;
    this.#turn = null;
    current.signal?.removeEventListener("abort", current.cancel);
    finish(current.turn);
    current.resolve(current.turn.terminal);
  }
}

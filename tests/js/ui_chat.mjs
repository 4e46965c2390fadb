// Drive chatproxy's UI message stream endpoint with the real `ai` package: its
// DefaultChatTransport sends the chat and reconnects to it, readUIMessageStream builds the
// message the way useChat does. Prints what happened, as JSON.
// Usage: node ui_chat.mjs BASE_URL API_KEY SCENARIO CHAT_ID
import { DefaultChatTransport, readUIMessageStream } from "ai";

const [base, key, scenario, chatId] = process.argv.slice(2);
const transport = new DefaultChatTransport({
  api: `${base}/ui/chat`,
  headers: { Authorization: `Bearer ${key}` },
});
const user = (id, text) => ({ id, role: "user", parts: [{ type: "text", text }] });

// Read a stream of chunks to its end: the chunk types, the final message, the errors.
async function read(stream, { message, onChunk } = {}) {
  const types = [];
  const errors = [];
  const [forTypes, forMessage] = stream.tee();
  const typing = (async () => {
    for await (const chunk of forTypes) {
      types.push(chunk.type);
      onChunk?.(chunk);
    }
  })().catch((error) => errors.push(String(error)));
  let last = null;
  for await (const snapshot of readUIMessageStream({
    stream: forMessage, message, onError: (error) => errors.push(String(error?.message ?? error)),
  })) {
    last = structuredClone(snapshot);
  }
  await typing;
  return { types, message: last, errors };
}

const send = (messages, options = {}) =>
  transport.sendMessages({ chatId, messages, trigger: "submit-message", messageId: undefined, ...options });

const out = {};
if (scenario === "chat") {
  const first = await read(await send([user("u1", "Hi")]));
  out.first = first;
  const history = [user("u1", "Hi"), first.message, user("u2", "More")];
  out.second = await read(await send(history));
} else if (scenario === "client-tool") {
  // The client offers its own tool in the request's body (the transport's `body` option).
  const lookup = { type: "function", function: { name: "lookup", parameters: { type: "object", properties: {} } } };
  const body = { tools: [lookup] };
  const asked = await read(await send([user("u1", "Look it up")], { body }));
  out.asked = structuredClone(asked);
  const message = asked.message;
  const part = message.parts.find((p) => p.type === "tool-lookup");
  part.state = "output-available";
  part.output = { found: 1 };
  // What useChat sends once addToolOutput completes the last step (sendAutomaticallyWhen).
  out.answered = await read(await send([user("u1", "Look it up"), message], { body }), { message });
} else if (scenario === "approval") {
  const asked = await read(await send([user("u1", "Refund me")]));
  out.asked = structuredClone(asked);
  const message = asked.message;
  const part = message.parts.find((p) => p.type === "tool-refund");
  // What addToolApprovalResponse({id, approved: true}) leaves on the part.
  part.state = "approval-responded";
  part.approval = { ...part.approval, approved: true };
  out.approved = await read(await send([user("u1", "Refund me"), message]), { message });
} else if (scenario === "server-tool") {
  out.result = await read(await send([user("u1", "Add")]));
} else if (scenario === "resume") {
  // Start the answer, read its first delta, then reconnect as a reloaded page would.
  const controller = new AbortController();
  const started = await send([user("u1", "Long")], { abortSignal: controller.signal });
  const reader = started.getReader();
  for (;;) {
    const { value } = await reader.read();
    if (value.type === "text-delta") break;
  }
  const resumed = await transport.reconnectToStream({ chatId });
  out.resumed = await read(resumed);
  reader.releaseLock();
  await started.cancel();
  out.after = await transport.reconnectToStream({ chatId });
} else if (scenario === "stop") {
  const controller = new AbortController();
  const started = await send([user("u1", "Long")], { abortSignal: controller.signal });
  let deltas = 0;
  // What useChat's stop() does: abort the request.
  const onChunk = (chunk) => chunk.type === "text-delta" && ++deltas === 2 && controller.abort();
  out.errors = (await read(started, { onChunk })).errors;
  out.deltas = deltas;
} else if (scenario === "error") {
  out.result = await read(await send([user("u1", "Hi")]));
} else if (scenario === "refused") {
  try {
    await new DefaultChatTransport({ api: `${base}/ui/chat` }).sendMessages({
      chatId, messages: [user("u1", "Hi")], trigger: "submit-message",
    });
  } catch (error) {
    out.error = { name: error.name, message: error.message };
  }
}
console.log(JSON.stringify(out));
process.exit(0);

// Follow an answer with the real `eventsource` package until its terminal event; print the
// events received and the Last-Event-ID of each (re)connection, as JSON.
// Usage: node sse_follow.mjs URL API_KEY
import { EventSource } from "eventsource";

const [url, key] = process.argv.slice(2);
const events = [];
const sentIds = [];
const source = new EventSource(url, {
  fetch: (input, init) => {
    sentIds.push(init.headers["Last-Event-ID"] ?? init.headers["last-event-id"] ?? null);
    return fetch(input, { ...init, headers: { ...init.headers, Authorization: `Bearer ${key}` } });
  },
});
const names = ["analyzing", "answering", "reasoning", "tool_call", "tool_result", "completed", "error"];
let timer;
await new Promise((resolve) => {
  for (const name of names) {
    source.addEventListener(name, (message) => {
      // EventSource fires its own "error" (no data) when the connection drops: not ours.
      if (message.data === undefined) return;
      events.push({ event: name, id: message.lastEventId, data: JSON.parse(message.data) });
      if (name === "completed" || name === "error") resolve();
    });
  }
  timer = setTimeout(resolve, 20000);
});
clearTimeout(timer);
source.close();
console.log(JSON.stringify({ events, sentIds }));

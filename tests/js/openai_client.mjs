// Drive chatproxy's OpenAI-compatible API with the official `openai` package for Node; print
// what it got, as JSON. Usage: node openai_client.mjs BASE_URL API_KEY [server-tools]
import OpenAI from "openai";

const [baseURL, apiKey, mode] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0 });
const messages = [{ role: "user", content: "Hi" }];
const model = "gpt-test";

if (mode === "server-tools") {
  const done = await client.chat.completions.create({ model, messages });
  const choice = done.choices[0];
  console.log(JSON.stringify({
    content: choice.message.content,
    finish_reason: choice.finish_reason,
    toolCalls: choice.message.tool_calls ?? null,
  }));
  process.exit(0);
}

const tools = [{ type: "function", function: { name: "lookup", parameters: { type: "object", properties: {} } } }];
const result = {};

const done = await client.chat.completions.create({ model, messages });
result.completion = { content: done.choices[0].message.content, finish_reason: done.choices[0].finish_reason };

const stream = await client.chat.completions.create({
  model, messages, stream: true, stream_options: { include_usage: true },
});
let content = "";
let finish = null;
let usage = false;
for await (const chunk of stream) {
  if (chunk.usage) usage = true;
  for (const choice of chunk.choices) {
    content += choice.delta.content ?? "";
    finish = choice.finish_reason ?? finish;
  }
}
result.stream = { content, finish_reason: finish, usage };

const asked = await client.chat.completions.create({ model, messages, tools });
const call = asked.choices[0].message.tool_calls[0].function;
result.tool = { name: call.name, arguments: call.arguments };

const runner = client.chat.completions.stream({ model, messages, tools });
const final = await runner.finalChatCompletion();
const streamed = final.choices[0].message.tool_calls[0].function;
result.streamedTool = { name: streamed.name, arguments: streamed.arguments };

try {
  await new OpenAI({ baseURL, apiKey: "wrong", maxRetries: 0 }).chat.completions.create({ model, messages });
} catch (error) {
  result.badKey = { status: error.status, code: error.code };
}

result.models = [];
for await (const m of client.models.list()) result.models.push(m.id);
console.log(JSON.stringify(result));

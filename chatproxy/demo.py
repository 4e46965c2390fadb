"""The offline demo model: an HTTP transport that answers like OpenAI's streaming API.

It plugs into the SDK's HTTP client, so a demo turn runs the same code as a real one (request
building, SSE parsing, chunk models, closing) and only the network is replaced.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import orjson

from .conf import DEMO_MODEL, conf

PIECE = re.compile(r"\S{1,6}\s*|\s+")
# What the demo model calls a tool for: asked about this, offered a function whose name has
# that in it.
_TOOL_TOPICS = (
    (re.compile(r"\b(time|clock|hour|date|today)\b", re.IGNORECASE), "time", "the time"),
    (re.compile(r"\bconversations?\b", re.IGNORECASE), "conversation", "their conversations"),
)


@dataclasses.dataclass(frozen=True, slots=True)
class DemoAnswer:
    """What the demo model says to a request: reasoning first, then text or one tool call."""

    reasoning: str
    text: str = ""
    tool: str = ""  # the name of the function it calls, if it calls one


def _text(content: object) -> str:
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return str(content or "")


def _images(content: object) -> int:
    if not isinstance(content, list):
        return 0
    return sum(1 for p in content if isinstance(p, dict) and p.get("type") == "image_url")


def demo_answer(body: dict[str, Any]) -> DemoAnswer:
    """Return the demo model's deterministic answer to a chat-completions request: asked about
    the time (or conversations) and offered a function whose name has "time" (or
    "conversation") in it, it calls that function; given the result, it reads it out;
    otherwise it says back what it was told."""
    messages = body.get("messages") or []
    last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
    if last.get("role") == "tool":
        result = " ".join(_text(last.get("content")).split())[:200]
        return DemoAnswer(
            "The tool has answered: I will read its result out.",
            f"The tool says: \u201c{result}\u201d. "
            "I called it and read its answer through the real OpenAI SDK, offline.",
        )
    tools = [
        t["function"]["name"]
        for t in body.get("tools") or []
        if isinstance(t, dict) and isinstance(t.get("function"), dict)
    ]
    said = _text(last.get("content"))
    for topic, word, subject in _TOOL_TOPICS:
        fitting = [name for name in tools if word in str(name).lower()]
        if fitting and topic.search(said):
            return DemoAnswer(
                f"The user asks about {subject} and I have the tool {fitting[0]}: I will call it.",
                tool=fitting[0],
            )
    images = _images(last.get("content"))
    seen = (
        f" I see {images} image{'s' if images > 1 else ''}, but cannot look at them."
        if images
        else ""
    )
    return DemoAnswer(
        "The user said something: I will greet them and say it back.", demo_reply(messages) + seen
    )


def demo_reply(messages: list[dict[str, Any]]) -> str:
    """Return the demo model's deterministic answer to ``messages``."""
    said = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
    said = " ".join(_text(said).split())
    if len(said) > 120:
        said = said[:117] + "..."
    return (
        f"Hello! I am {DEMO_MODEL}, chatproxy's offline demo model, "
        f"and you said: \u201c{said}\u201d. "
        "I stream this reply through the real OpenAI SDK, a few characters at a time, "
        "so you can watch it arrive. "
        "Set OPENAI_API_KEY to talk to a real model instead."
    )


def _event(payload: dict[str, object]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


class DemoTransport(httpx2.AsyncBaseTransport):
    """Answer ``POST /chat/completions`` with a streamed demo reply."""

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        body = orjson.loads(await request.aread())
        answer = demo_answer(body)
        reasoning, pieces = PIECE.findall(answer.reasoning), PIECE.findall(answer.text)
        messages = body.get("messages") or []
        prompt_tokens = sum(len(_text(m.get("content")).split()) for m in messages)
        completion_tokens = len(reasoning) + len(pieces) + (2 if answer.tool else 0)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens_details": {"reasoning_tokens": len(reasoning)},
        }
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        model = str(body.get("model", DEMO_MODEL))
        return httpx2.Response(
            200,
            headers={"content-type": "text/event-stream", "x-request-id": "demo"},
            content=self._sse(model, reasoning, pieces, answer.tool, usage, include_usage),
            request=request,
        )

    async def _sse(
        self,
        model: str,
        reasoning: list[str],
        pieces: list[str],
        tool: str,
        usage: dict[str, Any],
        include_usage: bool,
    ) -> AsyncIterator[bytes]:
        base = {
            "id": f"chatcmpl-demo-{time.monotonic_ns()}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
        }

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return _event({**base, "choices": [choice]})

        delay = conf.CHATPROXY_DEMO_DELAY
        yield chunk({"role": "assistant", "content": ""})
        # Reasoning as vLLM and DeepSeek send it, before the answer.
        for piece in reasoning:
            if delay:
                await asyncio.sleep(delay)  # pacing, so a person can watch the stream
            yield chunk({"reasoning_content": piece})
        for piece in pieces:
            if delay:
                await asyncio.sleep(delay)
            yield chunk({"content": piece})
        if tool:
            # As OpenAI sends a call: the id, type and name once, then the arguments in pieces.
            call_id = f"call_demo_{time.monotonic_ns() % 10**8}"
            head = {"index": 0, "id": call_id, "type": "function"}
            yield chunk({"tool_calls": [{**head, "function": {"name": tool, "arguments": ""}}]})
            for arguments in ("{", "}"):
                yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": arguments}}]})
        yield chunk({}, "tool_calls" if tool else "stop")
        if include_usage:
            yield _event({**base, "choices": [], "usage": usage})
        yield b"data: [DONE]\n\n"

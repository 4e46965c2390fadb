"""The offline demo model: an HTTP transport that answers like OpenAI's streaming API.

It plugs into the SDK's HTTP client, so a demo turn runs the same code as a real one (request
building, SSE parsing, chunk models, closing) and only the network is replaced.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator

import httpx2
import orjson

from .conf import DEMO_MODEL, conf

_PIECE = re.compile(r"\S{1,6}\s*|\s+")


def demo_reply(messages: list[dict[str, str]]) -> str:
    """Return the demo model's deterministic answer to ``messages``."""
    said = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
    said = " ".join(str(said).split())
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
        messages = body.get("messages") or []
        text = demo_reply(messages)
        pieces = _PIECE.findall(text)
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(pieces),
            "total_tokens": prompt_tokens + len(pieces),
        }
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return httpx2.Response(
            200,
            headers={"content-type": "text/event-stream", "x-request-id": "demo"},
            content=self._sse(str(body.get("model", DEMO_MODEL)), pieces, usage, include_usage),
            request=request,
        )

    async def _sse(
        self, model: str, pieces: list[str], usage: dict[str, int], include_usage: bool
    ) -> AsyncIterator[bytes]:
        base = {
            "id": f"chatcmpl-demo-{time.monotonic_ns()}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
        }

        def chunk(delta: dict[str, str], finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return _event({**base, "choices": [choice]})

        delay = conf.CHATPROXY_DEMO_DELAY
        yield chunk({"role": "assistant", "content": ""})
        for piece in pieces:
            if delay:
                await asyncio.sleep(delay)  # pacing, so a person can watch the stream
            yield chunk({"content": piece})
        yield chunk({}, "stop")
        if include_usage:
            yield _event({**base, "choices": [], "usage": usage})
        yield b"data: [DONE]\n\n"

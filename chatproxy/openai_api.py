"""OpenAI's chat-completions wire: its request read into a chatproxy one, the turn's NDJSON
events written as its ``chat.completion`` (or ``chat.completion.chunk`` SSE), its errors.

Nothing here imports ``openai``: the shapes are OpenAI's documented JSON. A call starts a
conversation of the key's user, unless ``metadata.conversation_id`` names one of theirs: then
chatproxy's saved history is used, and only the messages after the client's last assistant
message are new (the SDKs send the whole history on every call).
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

import orjson

from .events import answering_json
from .exceptions import ChatproxyError, RequestError
from .payload import ChatRequest, validate_request

# Keys of OpenAI's request that are the transport's business here, not the turn's.
TRANSPORT_FIELDS = ("stream", "stream_options", "metadata", "user", "n", "store")
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
}
# A turn that failed before a non-streaming answer went out gets an HTTP status the SDKs
# retry (429, 5xx) or raise as the client's fault (400), as OpenAI's own API does.
TURN_STATUS = {
    "upstream_rate_limited": 429,
    "upstream_timeout": 504,
    "upstream_unreachable": 502,
    "upstream_disconnected": 502,
    "upstream_error": 502,
    "upstream_bad_response": 502,
    "upstream_auth_failed": 502,
    "upstream_rejected": 400,
    "turn_rejected": 400,
    "content_blocked": 400,
    "too_many_tool_steps": 500,
    "reservation_exceeded": 502,
    "cancelled": 409,
    "server_shutdown": 503,
    "worker_lost": 503,
    "follower_too_slow": 503,
}
FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "content_filter", "function_call"})


def read_request(data: Any) -> tuple[ChatRequest, bool, bool]:
    """OpenAI's request body as a ``ChatRequest``; also whether it streams, and whether it
    asked for the usage chunk (``stream_options.include_usage``)."""
    if not isinstance(data, dict):
        raise RequestError("invalid_request", "The body must be a JSON object.")
    if data.get("n", 1) != 1:
        raise RequestError("invalid_parameter", "n must be 1: chatproxy writes one answer.")
    stream = data.get("stream") or False
    options = data.get("stream_options") or {}
    metadata = data.get("metadata") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise RequestError("invalid_parameter", "stream must be true or false.")
    if not isinstance(metadata, dict):
        raise RequestError("invalid_parameter", "metadata must be an object of strings.")
    body = {key: value for key, value in data.items() if key not in TRANSPORT_FIELDS}
    if (conversation_id := metadata.get("conversation_id")) is not None:
        body["conversation_id"] = conversation_id
        messages = body.get("messages")
        if isinstance(messages, list):  # the server holds everything up to its last answer
            last = max(
                (
                    i
                    for i, m in enumerate(messages)
                    if isinstance(m, dict) and m.get("role") == "assistant"
                ),
                default=-1,
            )
            body["messages"] = messages[last + 1 :]
    return validate_request(body), stream, bool(options.get("include_usage"))


def error_body(code: str, message: str, status: int) -> dict[str, Any]:
    """OpenAI's error object, with chatproxy's code."""
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def turn_status(code: str) -> int:
    return TURN_STATUS.get(code, 500)


class Writer:
    """Build one answer's OpenAI objects from the turn's events."""

    __slots__ = (
        "id", "model", "created", "usage_chunk", "text", "reasoning", "ids", "said", "_head",
        "_step",
    )  # fmt: skip

    def __init__(self, model: str, usage_chunk: bool = False) -> None:
        self.id, self.model, self.created = "chatcmpl-", model, int(time.time())
        self.usage_chunk = usage_chunk
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.ids: dict[str, str] = {}
        self._head = b""
        self.said = False  # some answer text went out (on the stream's fast path, not in text)
        self._step = False  # a server tool ran since the last text

    def answer(self, text: str) -> str:
        """Record a delta; the first of a step after server tools is set off by a blank line."""
        if self._step:
            self._step = False
            if self.text or self.said:
                text = "\n\n" + text
        self.text.append(text)
        return text

    def tool_ran(self) -> None:
        self._step = True

    def start(self, event: dict[str, Any]) -> None:
        self.ids = {"conversation_id": event["conversation_id"]}
        self.id = f"chatcmpl-{event['message_id']}"
        self.model = str(event.get("model") or self.model)
        head = {"id": self.id, "object": "chat.completion.chunk", "created": self.created}
        head |= {"model": self.model, "system_fingerprint": None, "choices": []}
        self._head = orjson.dumps(head)[: -len(b"[]}")]

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return b"data: " + self._head + b"[" + orjson.dumps(choice) + b"]}\n\n"

    def content(self, text_json: bytes) -> bytes:
        """The per-delta chunk of answer text, given as its JSON string."""
        return (
            b"data: "
            + self._head
            + b'[{"index":0,"delta":{"content":'
            + text_json
            + b'},"logprobs":null,"finish_reason":null}]}\n\n'
        )

    def usage(self, usage: dict[str, Any] | None) -> dict[str, Any] | None:
        if usage is None:
            return None
        out: dict[str, Any] = {
            key: usage[key] for key in ("prompt_tokens", "completion_tokens", "total_tokens")
        }
        if "cached_tokens" in usage:
            out["prompt_tokens_details"] = {"cached_tokens": usage["cached_tokens"]}
        if "reasoning_tokens" in usage:
            out["completion_tokens_details"] = {"reasoning_tokens": usage["reasoning_tokens"]}
        return out

    def completion(self, completed: dict[str, Any]) -> dict[str, Any]:
        """The whole ``chat.completion`` for a turn that ended with ``completed``."""
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.text) or None}
        message["refusal"] = None
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if calls := completed.get("tool_calls"):
            message["tool_calls"] = tool_calls(calls)
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": finish_reason(completed),
                    "logprobs": None,
                }
            ],
            "usage": self.usage(completed.get("usage")),
            "system_fingerprint": None,
            **self.ids,
        }


def tool_calls(calls: list[dict[str, str]]) -> list[dict[str, Any]]:
    return [
        {
            "id": call["id"],
            "type": "function",
            "function": {"name": call["name"], "arguments": call["arguments"]},
        }
        for call in calls
    ]


def finish_reason(completed: dict[str, Any]) -> str:
    reason = completed.get("finish_reason") or "stop"
    if completed.get("tool_calls"):
        return "tool_calls"
    return reason if reason in FINISH_REASONS else "stop"


class TurnFailed(ChatproxyError):
    """Raised when a non-streaming turn ends with an ``error`` event."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, code=code)


async def collect(lines: AsyncGenerator[bytes, None], writer: Writer) -> dict[str, Any]:
    """Run the turn to its end and return the ``chat.completion``; raise ``TurnFailed``."""
    async with aclosing(lines):
        async for item in lines:
            for line in item.splitlines():
                event = orjson.loads(line)
                name = event["event"]
                if name == "answering":
                    writer.answer(event["content"])
                elif name == "tool_result":
                    writer.tool_ran()
                elif name == "reasoning":
                    writer.reasoning.append(event["content"])
                elif name == "analyzing":
                    writer.start(event)
                elif name == "completed":
                    return writer.completion(event)
                elif name == "error":
                    raise TurnFailed(event["error"]["code"], event["error"]["message"])
    raise TurnFailed("internal_error", "The answer ended without a terminal event.")


async def stream(lines: AsyncGenerator[bytes, None], writer: Writer) -> AsyncGenerator[bytes, None]:
    """The turn as OpenAI's streaming chunks, ending with ``data: [DONE]``; an error after the
    first chunk goes out as a ``data: {"error": …}`` line, which the SDKs raise."""
    async with aclosing(lines):
        async for item in lines:
            out: list[bytes] = []
            for line in item.splitlines():
                if not writer._step and (content_json := answering_json(line)) is not None:
                    writer.said = True  # the per-delta path: the text goes out as it came
                    out.append(writer.content(content_json))
                    continue
                event = orjson.loads(line)
                name = event["event"]
                if name == "answering":
                    out.append(writer.content(orjson.dumps(writer.answer(event["content"]))))
                elif name == "tool_result":
                    writer.tool_ran()
                elif name == "reasoning":
                    out.append(writer.chunk({"reasoning_content": event["content"]}))
                elif name == "ping":
                    out.append(b": ping\n\n")
                elif name == "analyzing":
                    writer.start(event)
                    out.append(writer.chunk({"role": "assistant", "content": "", "refusal": None}))
                elif name == "completed":
                    out.append(_last_chunks(writer, event))
                elif name == "error":
                    error = event["error"]
                    body = error_body(error["code"], error["message"], turn_status(error["code"]))
                    out.append(b"data: " + orjson.dumps(body) + b"\n\n")
            if out:
                yield b"".join(out)


def _last_chunks(writer: Writer, completed: dict[str, Any]) -> bytes:
    out = []
    if calls := completed.get("tool_calls"):
        deltas = [{"index": i, **call} for i, call in enumerate(tool_calls(calls))]
        out.append(writer.chunk({"tool_calls": deltas}))
    out.append(writer.chunk({}, finish_reason(completed)))
    if writer.usage_chunk:
        chunk = {"id": writer.id, "object": "chat.completion.chunk", "created": writer.created}
        chunk |= {"model": writer.model, "system_fingerprint": None, "choices": []}
        chunk["usage"] = writer.usage(completed.get("usage"))
        out.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
    out.append(b"data: [DONE]\n\n")
    return b"".join(out)


def model_list(models: list[str]) -> dict[str, Any]:
    """``GET /v1/models``: the models this user may ask for."""
    data = [{"id": m, "object": "model", "created": 0, "owned_by": "chatproxy"} for m in models]
    return {"object": "list", "data": data}

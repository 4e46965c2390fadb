"""Reading an upstream's answer: the SSE framing (WHATWG rules) and the typed :class:`Chunk`.

No ``openai`` here: this is plain bytes and JSON, so it can be tested (and fuzzed) alone.
Servers differ in what they put in a chunk; every shape chatproxy knows of is read here, and
every in-band error shape raises ``UpstreamError`` with a message that carries no upstream text.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import orjson

from .events import Usage
from .exceptions import UpstreamError

logger = logging.getLogger("chatproxy.upstream")

BOM = b"\xef\xbb\xbf"
FAILED = "The model's server failed while answering. Try again."
UNREADABLE = "The model's server sent a response chatproxy could not read."


class ToolCallDelta(NamedTuple):
    """A piece of one tool call: the id and name arrive once, the arguments in pieces."""

    index: int  # type: ignore[assignment]  # 0 when the server sent none (a single call)
    id: str  # "" when this piece carries none
    name: str  # "" when this piece carries none
    arguments: str  # the piece of arguments, "" if none (may also arrive whole at once)


class Chunk(NamedTuple):
    """What chatproxy needs from one upstream chunk; only choice index 0 is the answer."""

    content: str = ""
    reasoning: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = ()
    finish_reason: str | None = None
    usage: Usage | None = None
    response_id: str = ""


class SSEEvent(NamedTuple):
    """An event whose type is not ``message``: the stream's data events are plain bytes."""

    type: str
    data: bytes


class SSEDecoder:
    """Split a server-sent-events byte stream into the data of its events, by the WHATWG
    rules: CRLF, LF or CR line endings (a CR and its LF may arrive in two reads), one leading
    BOM, ``field: value`` with or without the space, comments, ``event``/``id``/``retry``,
    multi-line data joined with "\\n".

    ``feed()`` returns each ``message`` event's data as bytes, and an :class:`SSEEvent` for
    events of another type. Two departures, both for real servers: ``close()`` dispatches a
    last event that the body ended without its blank line, and llama.cpp's ``error:`` field
    (not an SSE field) is read as an ``error`` event.
    """

    __slots__ = ("_buffer", "_data", "_type", "_cr", "_started", "last_event_id", "retry")

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[bytes] = []
        self._type = b""
        self._cr = False  # the last read ended with CR: an LF that starts the next one is its
        self._started = False  # past the place of a BOM
        self.last_event_id = b""
        self.retry: int | None = None

    def feed(self, data: bytes) -> list[bytes | SSEEvent]:
        """Take the next bytes; return every event they complete."""
        if self._cr and data:
            self._cr = False
            if data[:1] == b"\n":
                data = data[1:]
        buffer = self._buffer + data
        if not self._started:
            if len(buffer) < 3 and BOM.startswith(buffer):
                self._buffer = buffer
                return []  # a BOM may still be arriving
            self._started = True
            buffer = buffer.removeprefix(BOM)
        if b"\r" in buffer:
            self._cr = buffer.endswith(b"\r")
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *lines, self._buffer = buffer.split(b"\n")
        events: list[bytes | SSEEvent] = []
        pending = self._data
        for line in lines:
            if line.startswith(b"data:"):  # the common case, inline
                value = line[5:]
                pending.append(value[1:] if value[:1] == b" " else value)
            elif line:
                self._field(line)
            elif pending:  # a blank line ends the event
                if self._type:
                    events.append(self._dispatch())
                    pending = self._data
                else:
                    events.append(pending[0] if len(pending) == 1 else b"\n".join(pending))
                    pending = self._data = []
            else:
                self._type = b""
        return events

    def close(self) -> list[bytes | SSEEvent]:
        """The body ended: return its last event if it came without the blank line."""
        if self._buffer:
            self._field(self._buffer)
            self._buffer = b""
        return [self._dispatch()] if self._data else []

    def _field(self, line: bytes) -> None:
        if line.startswith(b"data:"):
            value = line[5:]
            self._data.append(value[1:] if value[:1] == b" " else value)
            return
        if line[:1] == b":":
            return  # a comment
        name, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if name == b"data":  # "data" alone: an empty line of data
            self._data.append(value)
        elif name == b"event":
            self._type = value
        elif name == b"id":
            if b"\0" not in value:
                self.last_event_id = value
        elif name == b"retry":
            if value.isdigit():
                self.retry = int(value)
        elif name == b"error":  # llama.cpp: `error: {json}`, then the stream goes on to [DONE]
            self._type = b"error"
            self._data.append(value)
        # Any other field is ignored, as the rules say.

    def _dispatch(self) -> bytes | SSEEvent:
        data = b"\n".join(self._data)
        kind, self._data, self._type = self._type, [], b""
        if not kind or kind == b"message":
            return data
        return SSEEvent(kind.decode("utf-8", "replace"), data)


def in_band_error() -> UpstreamError:
    logger.warning("Upstream reported an error inside the stream")
    return UpstreamError(FAILED, code="upstream_error")


def unreadable() -> UpstreamError:
    logger.warning("Upstream sent an unreadable chunk")
    return UpstreamError(UNREADABLE, code="upstream_bad_response")


def parse_chunk(payload: bytes) -> Chunk:
    """Read one ``chat.completion.chunk``; raise ``UpstreamError`` for an error or garbage."""
    chunk: Any = None
    try:
        chunk = orjson.loads(payload)
        if "error" in chunk:  # OpenAI, Ollama, vLLM, Groq, OpenRouter
            raise in_band_error()
        response_id = chunk.get("id") or ""
        usage = chunk.get("usage")
        choices = chunk.get("choices")
        if choices:
            choice = choices[0]
            delta = choice.get("delta") or {}
            finish_reason = choice.get("finish_reason")
            if (
                finish_reason is None
                and not usage
                and len(delta) == 1
                and "content" in delta
                and not choice.get("index")
            ):  # a plain text delta: the hot path, a tuple built in C
                return _new_chunk(Chunk, (delta["content"] or "", "", (), None, None, response_id))
            if choice.get("index"):  # not choice 0: look for it
                choice = next((c for c in choices if c.get("index", 0) == 0), None)
                if choice is None:  # only other choices in this chunk: none of the answer
                    choices = None
                else:
                    delta = choice.get("delta") or {}
                    finish_reason = choice.get("finish_reason")
        if not usage:
            usage = _groq_usage(chunk)
        if not choices:  # usage alone, or Azure's content-filter results
            if chunk.get("object") == "error":  # vLLM's older error, Mistral's
                raise in_band_error()
            return Chunk(usage=_usage(usage) if usage else None, response_id=response_id)
        if finish_reason == "error":  # OpenRouter's mid-stream failure
            raise in_band_error()
        return Chunk(
            delta.get("content") or "",
            _reasoning(delta),
            _tool_calls(delta.get("tool_calls")),
            finish_reason,
            _usage(usage) if usage else None,
            response_id,
        )
    except UpstreamError:
        raise
    except (ValueError, TypeError, AttributeError, KeyError, IndexError):
        _raise_if_error_list(chunk)
        raise unreadable() from None


_new_chunk = tuple.__new__


def parse_completion(body: bytes) -> Chunk:
    """Read a whole ``chat.completion`` (a server that ignored ``stream: true``) as the one
    chunk of its answer; raise ``UpstreamError`` for an error body or garbage."""
    try:
        completion = orjson.loads(body)
        if not isinstance(completion, dict):
            _raise_if_error_list(completion)
            raise TypeError
        if "error" in completion or completion.get("object") == "error":
            raise in_band_error()
        usage = completion.get("usage") or _groq_usage(completion)
        choices = completion["choices"]
        choice = next((c for c in choices if c.get("index", 0) == 0), choices[0])
        finish_reason = choice.get("finish_reason")
        if finish_reason == "error":
            raise in_band_error()
        message = choice["message"]
        return Chunk(
            message.get("content") or "",
            _reasoning(message),
            _tool_calls(message.get("tool_calls")),
            finish_reason,
            _usage(usage) if usage else None,
            completion.get("id") or "",
        )
    except UpstreamError:
        raise
    except (ValueError, TypeError, AttributeError, KeyError, IndexError, StopIteration):
        raise unreadable() from None


def _raise_if_error_list(value: Any) -> None:
    # Gemini's OpenAI-compatible endpoint wraps its errors in a list: [{"error": {...}}].
    if isinstance(value, list) and value and isinstance(value[0], dict) and "error" in value[0]:
        raise in_band_error()


def _groq_usage(chunk: dict[str, Any]) -> Any:
    extra = chunk.get("x_groq")  # Groq's older place for the last chunk's usage
    return extra.get("usage") if isinstance(extra, dict) else None


def _usage(usage: dict[str, Any]) -> Usage:
    prompt, completion = int(usage["prompt_tokens"]), int(usage["completion_tokens"])
    total = usage.get("total_tokens")
    result: Usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion if total is None else int(total),
    }
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    if cached is not None:
        result["cached_tokens"] = int(cached)
    reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens")
    if reasoning is not None:
        result["reasoning_tokens"] = int(reasoning)
    return result


def _reasoning(delta: dict[str, Any]) -> str:
    """The reasoning text of a delta or message: ``reasoning_content`` (DeepSeek, vLLM,
    llama.cpp), else ``reasoning`` (OpenRouter, Groq, Ollama, newer vLLM), else the text of
    ``reasoning_details`` (OpenRouter sends it beside ``reasoning``, with the same text)."""
    text = delta.get("reasoning_content") or delta.get("reasoning")
    if text:
        return str(text)
    details = delta.get("reasoning_details")
    if not details:
        return ""
    parts = []
    for detail in details:
        kind = detail.get("type")
        if kind == "reasoning.text":
            parts.append(detail.get("text") or "")
        elif kind == "reasoning.summary":
            parts.append(detail.get("summary") or "")
        # reasoning.encrypted carries no text
    return "".join(parts)


def _tool_calls(calls: list[dict[str, Any]] | None) -> tuple[ToolCallDelta, ...]:
    if not calls:
        return ()
    pieces = []
    for position, call in enumerate(calls):
        function = call.get("function") or {}
        arguments = function.get("arguments") or ""
        if not isinstance(arguments, str):  # an object sent whole instead of JSON text
            arguments = orjson.dumps(arguments).decode()
        index = call.get("index")  # Gemini and Mistral send none
        pieces.append(
            ToolCallDelta(
                position if index is None else int(index),
                call.get("id") or "",
                function.get("name") or "",
                arguments,
            )
        )
    return tuple(pieces)

"""The wire contract: one JSON object per event, keyed by ``event``, one per NDJSON line.

``analyzing``, ``answering`` and ``completed`` keep the meaning of the protocol chatproxy grew
from; everything else is additive. Events are plain dicts, so the HTTP stream and the WebSocket
send the very same objects.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict

import orjson


class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: NotRequired[int]  # only when the upstream sent them
    reasoning_tokens: NotRequired[int]


class ToolCall(TypedDict):
    id: str
    name: str
    arguments: str  # JSON text, as the model sent it


class AnalyzingEvent(TypedDict):
    event: Literal["analyzing"]
    conversation_id: NotRequired[str]
    message_id: NotRequired[str]
    model: NotRequired[str]
    detail: NotRequired[str]


class AnsweringEvent(TypedDict):
    event: Literal["answering"]
    content: str


class ReasoningEvent(TypedDict):
    event: Literal["reasoning"]
    content: str


class ToolCallEvent(TypedDict):
    event: Literal["tool_call"]
    id: str
    name: str
    arguments: str


class PingEvent(TypedDict):
    event: Literal["ping"]


class HistoryCut(TypedDict):
    dropped_messages: int


class CompletedEvent(TypedDict):
    event: Literal["completed"]
    conversation_id: str
    message_id: str
    finish_reason: str | None
    usage: Usage | None
    history: NotRequired[HistoryCut]  # only when CHATPROXY_MAX_HISTORY_CHARS cut the history
    tool_calls: NotRequired[list[ToolCall]]


class ErrorBody(TypedDict):
    code: str
    message: str


class ErrorEvent(TypedDict):
    event: Literal["error"]
    error: ErrorBody
    conversation_id: NotRequired[str]
    message_id: NotRequired[str]


class RatingBody(TypedDict):
    message_id: str
    value: Literal["up", "down"]
    comment: str


class RatedEvent(TypedDict):
    """WebSocket only: the answer to a ``rate`` frame (over HTTP, the rating endpoint's body)."""

    event: Literal["rated"]
    rating: RatingBody


Event = (
    AnalyzingEvent
    | AnsweringEvent
    | ReasoningEvent
    | ToolCallEvent
    | PingEvent
    | CompletedEvent
    | ErrorEvent
    | RatedEvent
    | dict[str, Any]
)

TERMINAL_EVENTS = frozenset({"completed", "error"})

_ANSWERING_PREFIX = b'{"event":"answering","content":'
_REASONING_PREFIX = b'{"event":"reasoning","content":'


class Encoder:
    """Encode events as NDJSON lines, each with the same ``extra`` fields (e.g. ``request_id``).

    A line is compact UTF-8 JSON and a newline; JSON escapes newlines inside strings, so an
    event is always one line. A WebSocket frame is the same line without the newline.
    """

    __slots__ = ("_extra", "_tail")

    def __init__(self, extra: dict[str, Any] | None = None) -> None:
        self._extra = extra or {}
        self._tail = b"," + orjson.dumps(self._extra)[1:] + b"\n" if self._extra else b"}\n"

    def event(self, event: Event) -> bytes:
        """Return the line for any event."""
        if self._extra:
            event = {**event, **self._extra}
        return orjson.dumps(event) + b"\n"

    def answering(self, content: str) -> bytes:
        """Return the ``answering`` line without building a dict: this is the per-delta path."""
        return _ANSWERING_PREFIX + orjson.dumps(content) + self._tail

    def reasoning(self, content: str) -> bytes:
        """Return the ``reasoning`` line, the same way."""
        return _REASONING_PREFIX + orjson.dumps(content) + self._tail


PING: Event = {"event": "ping"}


def answering_json(line: bytes) -> bytes | None:
    """The content of an ``answering`` line (without its newline) still as JSON, quotes and
    escapes included, for an encoder that writes it into another format as it is; None for any
    other line. Only for the lines of an ``Encoder`` without extra fields, as HTTP's are."""
    if line.startswith(_ANSWERING_PREFIX) and line.endswith(b'"}'):
        return line[len(_ANSWERING_PREFIX) : -1]
    return None


def error_event(code: str, message: str, **fields: Any) -> ErrorEvent:
    """Build the terminal ``error`` event."""
    event: ErrorEvent = {"event": "error", "error": {"code": code, "message": message}}
    event.update(fields)  # type: ignore[typeddict-item]
    return event

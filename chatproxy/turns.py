"""A turn as interceptors see it (:class:`Turn`) and the pure accumulator of its answer."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from decimal import Decimal
from typing import Any, NamedTuple

import orjson

from .chunks import Chunk, ToolCallDelta
from .conf import DEMO_MODEL, conf
from .events import Event, HistoryCut, ToolCall, Usage
from .models import Status
from .owners import Owner
from .payload import ChatRequest


@dataclasses.dataclass(slots=True)
class TurnOutcome:
    """The final state of an assistant answer, written once when the turn ends: every field
    whose name is a ``Message`` field is saved (``MessageManager.finish_turn``)."""

    content: str
    status: str
    raw_content: str = ""
    finish_reason: str = ""
    model: str | None = None
    response_id: str = ""
    error_code: str = ""
    error_message: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    first_token_ms: int | None = None
    duration_ms: int | None = None
    cost: Decimal | None = None
    metadata: dict[str, Any] | None = None
    reasoning: str = ""
    tool_calls: list[ToolCall] = dataclasses.field(default_factory=list)
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None
    upstream: str | None = None
    upstream_model: str | None = None


class Reservation(NamedTuple):
    """What a turn holds against its budgets: its ``Spend`` row, its prompt as estimated, and
    the completion tokens it reserved (its clamped ``max_tokens``)."""

    spend_id: int
    prompt: int
    completion: int


class Pieces(NamedTuple):
    """What one chunk carried beyond plain answer text, in the order it goes out."""

    reasoning: str
    calls: list[ToolCall]  # the calls this chunk completed
    text: str
    reasoning_ended: bool = False  # reasoning held back by interceptors can be let go


class TurnState:
    """The pure accumulator of one answer: text, reasoning, tool calls, usage, timings, and
    its status lifecycle.

    ``raw`` is what the upstream sent; ``delivered`` what the client got, kept apart only while
    interceptors transform the text (``transforming``); the same for reasoning
    (``transforming_reasoning``). Tool calls are assembled per index and each is listed in
    ``tool_calls`` once complete (the next index starts, or the choice finishes).
    """

    __slots__ = (
        "raw", "delivered", "transforming", "status", "error_code", "error_message",
        "finish_reason", "usage", "response_id", "started", "first_token_at",
        "raw_reasoning", "delivered_reasoning", "transforming_reasoning", "tool_calls",
        "_open_calls", "mixed", "reasoning_open",
    )  # fmt: skip

    def __init__(self, transforming: bool = False, transforming_reasoning: bool = False) -> None:
        self.raw: list[str] = []
        self.delivered: list[str] = []
        self.transforming = transforming
        self.status = Status.STREAMING
        self.error_code = self.error_message = ""
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.response_id = ""
        self.started = time.monotonic()
        self.first_token_at: float | None = None
        self.raw_reasoning: list[str] = []
        self.delivered_reasoning: list[str] = []
        self.transforming_reasoning = transforming_reasoning
        self.tool_calls: list[ToolCall] = []
        self._open_calls: dict[int, ToolCall] = {}  # by index, until complete
        self.mixed = False  # a chunk carried more than text: see feed()
        # Reasoning came and interceptors may hold some back until it ends.
        self.reasoning_open = False

    def feed(self, chunk: Chunk) -> str | Pieces:
        """Take one upstream chunk; return its text ('' if none), or the :class:`Pieces` of
        one that carried reasoning or tool calls (text-only answers never build one)."""
        text, reasoning, calls, finish_reason, usage, self.response_id = chunk
        if usage is not None:
            self.usage = usage
        if reasoning or calls or (finish_reason and self._open_calls) or self.reasoning_open:
            return self._feed_pieces(text, reasoning, calls, finish_reason)
        if finish_reason:
            self.finish_reason = finish_reason
        if text:
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
            self.raw.append(text)
        return text

    def _feed_pieces(
        self,
        text: str,
        reasoning: str,
        deltas: tuple[ToolCallDelta, ...],
        finish_reason: str | None,
    ) -> Pieces:
        self.mixed = True
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        ended = self.reasoning_open and not reasoning
        self.reasoning_open = bool(reasoning) and self.transforming_reasoning
        if reasoning:
            self.raw_reasoning.append(reasoning)
        if text:
            self.raw.append(text)
        done: list[ToolCall] = []
        calls = self._open_calls
        for index, call_id, name, arguments in deltas:
            call = calls.get(index)
            if call is not None and call_id and call["id"] and call_id != call["id"]:
                # Another call under the same index: a server that sends no index at all.
                done += self._close_calls(only=index)
                call = None
            if call is None:  # a new index: the calls before it that look whole are complete
                done += self._close_calls(whole=True)
                call = calls[index] = {"id": "", "name": "", "arguments": ""}
            if call_id and not call["id"]:
                call["id"] = call_id
            if name and not call["name"]:
                call["name"] = name
            call["arguments"] += arguments
        if finish_reason:
            self.finish_reason = finish_reason
            done += self._close_calls()
        return Pieces(reasoning, done, text, ended)

    def _close_calls(self, whole: bool = False, only: int | None = None) -> list[ToolCall]:
        """Complete the open calls (``only`` one; with ``whole``, those whose arguments are
        whole JSON: some servers interleave the pieces of parallel calls)."""
        done: list[ToolCall] = []
        for index in sorted(self._open_calls) if only is None else [only]:
            call = self._open_calls[index]
            if whole and not _is_json(call["arguments"]):
                continue
            del self._open_calls[index]
            # A server that sends no id (Gemini's OpenAI-compatible endpoint): the client
            # still needs one to send the call's result back.
            call["id"] = call["id"] or f"call_{len(self.tool_calls) + len(done)}"
            done.append(call)
        self.tool_calls += done
        return done

    @property
    def tool_calls_open(self) -> bool:
        return bool(self._open_calls)

    def close(self) -> list[ToolCall]:
        """The upstream is done: complete the calls still open (a body that ended without a
        finish reason)."""
        self.reasoning_open = False
        return self._close_calls()

    def replace_call(self, call: ToolCall, kept: ToolCall | None) -> None:
        """Keep what an interceptor made of a completed call (None: drop it)."""
        position = next(i for i, c in enumerate(self.tool_calls) if c is call)
        if kept is None:
            del self.tool_calls[position]
        else:
            self.tool_calls[position] = kept

    def deliver(self, text: str) -> None:
        """Record text an interceptor let through to the client."""
        self.delivered.append(text)

    def deliver_reasoning(self, text: str) -> None:
        """Record reasoning an interceptor let through to the client."""
        self.delivered_reasoning.append(text)

    def end(self, status: Status, error_code: str = "", error_message: str = "") -> None:
        if self.status is not Status.STREAMING:
            raise RuntimeError(
                f"Expected {Status.STREAMING.value!r}, but got {self.status.value!r}"
            )
        self.status, self.error_code, self.error_message = status, error_code, error_message

    @property
    def raw_text(self) -> str:
        return "".join(self.raw)

    @property
    def text(self) -> str:
        """The answer as the client received it."""
        return "".join(self.delivered if self.transforming else self.raw)

    @property
    def reasoning(self) -> str:
        """The reasoning as the client received it."""
        return "".join(
            self.delivered_reasoning if self.transforming_reasoning else self.raw_reasoning
        )

    def outcome(self) -> TurnOutcome:
        usage, first, text = self.usage, self.first_token_at, self.text
        raw = self.raw_text if self.transforming else text
        return TurnOutcome(
            content=text,
            raw_content="" if raw == text else raw,
            status=self.status,
            finish_reason=self.finish_reason or "",
            response_id=self.response_id,
            error_code=self.error_code,
            error_message=self.error_message,
            prompt_tokens=usage["prompt_tokens"] if usage else None,
            completion_tokens=usage["completion_tokens"] if usage else None,
            total_tokens=usage["total_tokens"] if usage else None,
            first_token_ms=None if first is None else round((first - self.started) * 1000),
            duration_ms=round((time.monotonic() - self.started) * 1000),
            reasoning=self.reasoning,
            tool_calls=list(self.tool_calls),
            cached_tokens=usage.get("cached_tokens") if usage else None,
            reasoning_tokens=usage.get("reasoning_tokens") if usage else None,
        )


def _is_json(text: str) -> bool:
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    return True


@dataclasses.dataclass(slots=True, eq=False)
class Turn:
    """One chat turn: what the client asked, what goes upstream, and what comes back.

    Interceptors read and change ``messages``, ``params`` and ``model`` before the upstream
    call, put what should be saved with the answer in ``metadata`` and ``cost``, read the
    answer from ``state``, and talk to the client with ``emit()`` and ``stop()``.
    """

    owner: Owner
    request: ChatRequest
    history: list[dict[str, str]] = dataclasses.field(default_factory=list)
    user: Any = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    messages: list[dict[str, str]] = dataclasses.field(default_factory=list)
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    model: str = ""
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    cost: Decimal | None = None
    state: TurnState = dataclasses.field(default_factory=TurnState)
    chain: Any = None  # the turn's interception.Chain
    # Filled in as the turn runs; read by the transport (e.g. to report a cancel).
    conversation_id: uuid.UUID | None = None
    answer_id: uuid.UUID | None = None
    # The error code an unfinished answer is saved with; a transport that stops the turn on
    # purpose sets its own reason before cancelling.
    interrupt_code: str = "client_disconnected"
    idempotency_key: str = ""
    # How many of the stored history's oldest messages CHATPROXY_MAX_HISTORY_CHARS left out.
    dropped_messages: int = 0
    # The server tools offered to the model (chatproxy.tools.Tool by name), and the usage of
    # the turn's earlier steps, which ``completed`` sums with the last one's.
    tools: dict[str, Any] = dataclasses.field(default_factory=dict)
    spent: Usage | None = None
    # What a follower attaching mid-loop missed: the events of the steps before this one, and
    # the tool results of the step whose tools run.
    earlier: list[Event] = dataclasses.field(default_factory=list)
    # The calls the user answered in this request (``approvals``), each with the answer.
    approvals: list[tuple[ToolCall, bool]] = dataclasses.field(default_factory=list)
    results: list[Event] = dataclasses.field(default_factory=list)
    stopped: str | None = None
    # The turn's reservation against the budgets, while budgets are on.
    budget: Reservation | None = None
    # Set by abort() from outside the turn (a cancel from another request, a shutdown).
    aborted: Exception | None = None
    stream: Any = None  # the turn's upstream.AnswerStream, once it is called
    span: Any = None  # the turn's OpenTelemetry span, with CHATPROXY_TRACES on (tracing)
    pending: list[Event] = dataclasses.field(default_factory=list)
    wakeup: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.messages = [*self.history, *self.request.messages]
        self.params = dict(self.request.params)
        # Without an API key the offline demo model answers whichever allowed model was asked
        # for, and the turn says so (in `analyzing` and on the saved rows).
        self.model = self.model or (DEMO_MODEL if conf.demo else self.request.model)

    def ids(self) -> dict[str, str]:
        if self.answer_id is None:
            return {}
        return {"conversation_id": str(self.conversation_id), "message_id": str(self.answer_id)}

    def usage(self) -> Usage | None:
        """The usage of every step so far: what ``completed`` reports."""
        last, spent = self.state.usage, self.spent
        if spent is None or last is None:
            return last or spent
        total: dict[str, Any] = {**spent}
        for key, value in last.items():
            total[key] = total.get(key, 0) + value
        return total  # type: ignore[return-value]

    def history_cut(self) -> HistoryCut:
        """What the ``completed`` event and the saved answer say of a history that was cut."""
        return {"dropped_messages": self.dropped_messages}

    def emit(self, event: Event) -> None:
        """Send an extra event to the client, e.g. ``{"event": "sources", "items": [...]}``."""
        self.pending.append(event)
        self.wakeup.set()

    def abort(self, error: Exception) -> None:
        """End the turn from outside with ``error`` (a ``TurnError``), as soon as possible."""
        self.aborted = error
        self.wakeup.set()  # a turn waiting on its tools stops waiting
        if self.stream is not None:
            self.stream.fail(error)

    def stop(self, finish_reason: str = "stop") -> None:
        """End the answer early but normally: the upstream is closed, ``completed`` follows."""
        self.stopped = finish_reason

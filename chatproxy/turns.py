"""A turn as interceptors see it (:class:`Turn`) and the pure accumulator of its answer."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from decimal import Decimal
from typing import Any

from .conf import DEMO_MODEL, conf
from .events import Event, HistoryCut, Usage
from .models import Owner, Status, TurnOutcome
from .payload import ChatRequest


class TurnState:
    """The pure accumulator of one answer: text, usage, timings, and its status lifecycle.

    ``raw`` is what the upstream sent; ``delivered`` what the client got, kept apart only while
    interceptors transform the text (``transforming``).
    """

    __slots__ = (
        "raw", "delivered", "transforming", "status", "error_code", "error_message",
        "finish_reason", "usage",
        "response_id", "started", "first_token_at",
    )  # fmt: skip

    def __init__(self, transforming: bool = False) -> None:
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

    def feed(self, chunk: Any) -> str:
        """Take one upstream chunk; return its text ('' if none)."""
        text, finish_reason, usage, self.response_id = chunk
        if finish_reason:
            self.finish_reason = finish_reason
        if usage is not None:
            self.usage = usage
        if text:
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
            self.raw.append(text)
        return text  # type: ignore[no-any-return]

    def deliver(self, text: str) -> None:
        """Record text an interceptor let through to the client."""
        self.delivered.append(text)

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
        )


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
    stopped: str | None = None
    # Set by abort() from outside the turn (a cancel from another request, a shutdown).
    aborted: Exception | None = None
    stream: Any = None  # the turn's upstream.AnswerStream, once it is called
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
        if self.stream is not None:
            self.stream.fail(error)

    def stop(self, finish_reason: str = "stop") -> None:
        """End the answer early but normally: the upstream is closed, ``completed`` follows."""
        self.stopped = finish_reason

"""One chat turn, transport-agnostic: validate, save, stream from upstream, finalize.

``run_turn()`` is an async generator of NDJSON lines. The HTTP view streams them as they are;
the WebSocket consumer sends each one as a text frame. It knows nothing of requests or sockets.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from asgiref.sync import sync_to_async
from django.db import close_old_connections

from .conf import conf
from .events import PING, Encoder, Usage, error_event
from .exceptions import RequestError, TurnError
from .models import Conversation, Message, Owner, Status, TurnOutcome
from .payload import ChatRequest
from .relay import Relay
from .upstream import Chunk, stream_chat

logger = logging.getLogger("chatproxy.pipeline")


@dataclasses.dataclass(slots=True)
class Turn:
    """Everything one turn needs, checked before the first byte is sent."""

    owner: Owner
    request: ChatRequest
    history: list[dict[str, str]] = dataclasses.field(default_factory=list)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Filled in as the turn runs; read by the transport (e.g. to report a cancel).
    conversation_id: uuid.UUID | None = None
    answer_id: uuid.UUID | None = None
    # The error code an unfinished answer is saved with; a transport that stops the turn on
    # purpose sets its own reason before cancelling.
    interrupt_code: str = "client_disconnected"

    def ids(self) -> dict[str, str]:
        if self.answer_id is None:
            return {}
        return {"conversation_id": str(self.conversation_id), "message_id": str(self.answer_id)}

    @property
    def upstream_messages(self) -> list[dict[str, str]]:
        return [*self.history, *self.request.messages]


async def prepare_turn(owner: Owner, request: ChatRequest, **extra: Any) -> Turn:
    """Load the history of a continued conversation; raise 404 if the owner has no such one."""
    history: list[dict[str, str]] = []
    if request.conversation_id is not None:
        found = await Conversation.objects.history(owner, request.conversation_id)
        if found is None:
            raise RequestError(
                "conversation_not_found",
                "No conversation with that id belongs to you. "
                "Leave conversation_id out to start one.",
                status=404,
            )
        history = found
    return Turn(owner=owner, request=request, history=history, extra=extra)


class TurnState:
    """The pure accumulator of one answer: text, usage, timings, and its status lifecycle."""

    __slots__ = (
        "parts", "status", "error_code", "finish_reason", "usage", "response_id",
        "started", "first_token_at",
    )  # fmt: skip

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.status = Status.STREAMING
        self.error_code = ""
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.response_id = ""
        self.started = time.monotonic()
        self.first_token_at: float | None = None

    def feed(self, chunk: Chunk) -> str:
        """Take one upstream chunk; return its text for the client ('' if none)."""
        text, finish_reason, usage, self.response_id = chunk
        if finish_reason:
            self.finish_reason = finish_reason
        if usage is not None:
            self.usage = usage
        if text:
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
            self.parts.append(text)
        return text

    def end(self, status: Status, error_code: str = "") -> None:
        if self.status is not Status.STREAMING:
            raise RuntimeError(
                f"Expected {Status.STREAMING.value!r}, but got {self.status.value!r}"
            )
        self.status, self.error_code = status, error_code

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def outcome(self) -> TurnOutcome:
        usage = self.usage
        now = time.monotonic()
        first = self.first_token_at
        return TurnOutcome(
            content=self.text,
            status=self.status,
            finish_reason=self.finish_reason or "",
            response_id=self.response_id,
            error_code=self.error_code,
            prompt_tokens=usage["prompt_tokens"] if usage else None,
            completion_tokens=usage["completion_tokens"] if usage else None,
            total_tokens=usage["total_tokens"] if usage else None,
            first_token_ms=None if first is None else round((first - self.started) * 1000),
            duration_ms=round((now - self.started) * 1000),
        )


def _begin(turn: Turn) -> tuple[uuid.UUID, uuid.UUID]:
    ids = Conversation.objects.start_turn(
        turn.owner, turn.request.conversation_id, turn.request.messages, turn.request.model
    )
    # Give the connection back now: an open stream must not pin one for its whole life.
    close_old_connections()
    return ids


def _finish(conversation_id: uuid.UUID, answer_id: uuid.UUID, outcome: TurnOutcome) -> None:
    Message.objects.finish_turn(conversation_id, answer_id, outcome)
    close_old_connections()


async def _save(
    begin: asyncio.Future[tuple[uuid.UUID, uuid.UUID]], state: TurnState, turn: Turn
) -> bool:
    """Write the answer's final state; an unfinished one is ``interrupted``. Return success."""
    try:
        conversation_id, answer_id = await begin
    except Exception:
        return False  # nothing was written, so there is nothing to finalize
    if state.status is Status.STREAMING:
        state.end(Status.INTERRUPTED, turn.interrupt_code)
    try:
        await sync_to_async(_finish)(conversation_id, answer_id, state.outcome())
    except Exception:
        logger.exception("Saving chat answer %s failed", answer_id)
        return False
    return True


def _internal_error(**ids: str) -> dict[str, Any]:
    return dict(error_event("internal_error", "Something went wrong on the server.", **ids))


async def run_turn(turn: Turn) -> AsyncIterator[bytes]:
    """Run one turn and yield its NDJSON lines: ``analyzing``, ``answering``…, then exactly one
    of ``completed`` or ``error``. If the consumer stops early (client gone, cancel), the
    upstream request is closed and the partial answer is saved as ``interrupted``."""
    encoder, state, request = Encoder(turn.extra), TurnState(), turn.request
    # Both writes run as tasks awaited through shield(): a cancellation that lands while one
    # runs must not stop it, or the answer would stay `streaming` forever.
    begin = asyncio.ensure_future(sync_to_async(_begin)(turn))
    save: asyncio.Future[bool] | None = None
    relay: Relay[Chunk] | None = None
    try:
        try:
            conversation_id, answer_id = await asyncio.shield(begin)
        except Exception:
            logger.exception("Starting a chat turn failed")
            yield encoder.event(_internal_error())
            return
        turn.conversation_id, turn.answer_id = conversation_id, answer_id
        ids = turn.ids()
        yield encoder.event({"event": "analyzing", **ids, "model": request.model})
        relay = Relay(stream_chat(request.model, turn.upstream_messages, request.params))
        try:
            heartbeat, coalesce = conf.CHATPROXY_HEARTBEAT or None, conf.CHATPROXY_COALESCE_DELTAS
            while (batch := await relay.next_batch(heartbeat)) is not None:
                if not batch:
                    yield encoder.event(PING)
                elif coalesce:
                    if text := "".join([state.feed(chunk) for chunk in batch]):
                        yield encoder.answering(text)
                else:
                    for chunk in batch:
                        if text := state.feed(chunk):
                            yield encoder.answering(text)
            state.end(Status.COMPLETED)
            terminal: dict[str, Any] = {
                "event": "completed",
                **ids,
                "finish_reason": state.finish_reason,
                "usage": state.usage,
            }
        except TurnError as exc:
            state.end(Status(exc.status), exc.code)
            terminal = dict(error_event(exc.code, exc.message, **ids))
        except Exception:  # the one top-level guard: the stream must end with an error event
            logger.exception("Chat turn %s failed", answer_id)
            state.end(Status.FAILED, "internal_error")
            terminal = _internal_error(**ids)
        await relay.aclose()
        save = asyncio.ensure_future(_save(begin, state, turn))
        # Saved before the terminal line goes out, so a client that continues the
        # conversation right after `completed` finds this answer in its history.
        if not await asyncio.shield(save):
            terminal = _internal_error(**ids)
        yield encoder.event(terminal)
    finally:
        # No `yield` in here: the generator may be closing (GeneratorExit).
        if relay is not None:
            await relay.aclose()
        if save is None:
            save = asyncio.ensure_future(_save(begin, state, turn))
        await asyncio.shield(save)

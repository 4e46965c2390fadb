"""Re-attach to an answer: the text so far, then the rest live from whichever process runs it.

A finished answer is replayed from the database. A streaming one is followed through the
channel layer; if no process answers, its worker died, and the checkpointed text is served and
the answer is marked ``interrupted`` (``worker_lost``).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any

from django.utils import timezone

from . import saved_loop
from .events import Encoder, error_event
from .exceptions import RequestError
from .followers import TurnGone, follow
from .models import Conversation, Message, Role, Status
from .owners import Owner

WORKER_LOST = "The server that was writing this answer stopped. Send your message again."


async def latest_answer(
    owner: Owner, conversation_id: uuid.UUID, message_id: uuid.UUID | None = None
) -> Message | None:
    """The owner's last answer in a conversation, on whichever branch (or the answer
    ``message_id``), or None (unknown, or someone else's)."""
    if not await Conversation.objects.owned_by(owner).filter(pk=conversation_id).aexists():
        return None
    return await last_answer(conversation_id, message_id)


async def last_answer(
    conversation_id: uuid.UUID, message_id: uuid.UUID | None = None
) -> Message | None:
    """A conversation's last answer (or the answer ``message_id``), whoever owns it (for
    staff), or None."""
    answers = Message.objects.filter(conversation_id=conversation_id, role=Role.ASSISTANT)
    if message_id is not None:
        answers = answers.filter(pk=message_id)
    return await answers.exclude(status="").order_by("-position").afirst()


async def open_replay(
    answer: Message, extra: dict[str, Any] | None = None, who: str = ""
) -> AsyncGenerator[bytes, None]:
    """Return the answer's lines as a turn's: ``analyzing`` (with ``"resumed": true``), its
    text, then the same terminal event the turn itself sends. A streaming answer is followed
    live, attached before this returns, as a follower of the user ``who`` (an ``Owner.key``):
    too many followers raise ``too_many_followers`` here, before the first byte."""
    items = None
    if answer.status == Status.STREAMING:
        try:
            items = await follow(answer.pk, who)
        except TurnGone:
            answer = await _give_up_on(answer)
    return _lines(answer, items, Encoder(extra))


async def replay(
    answer: Message, extra: dict[str, Any] | None = None, who: str = ""
) -> AsyncGenerator[bytes, None]:
    """``open_replay()``'s lines, for a transport that reports a refusal in-band (the
    WebSocket): too many followers is then the one ``error`` event."""
    try:
        lines = await open_replay(answer, extra, who)
    except RequestError as exc:
        ids = _ids(answer)
        event = dict(error_event(exc.code, exc.message, **ids), retry_after=exc.retry_after)
        yield Encoder(extra).event(event)
        return
    async with aclosing(lines):
        async for line in lines:
            yield line


def _ids(answer: Message) -> dict[str, str]:
    return {"conversation_id": str(answer.conversation_id), "message_id": str(answer.pk)}


async def _lines(
    answer: Message, items: AsyncIterator[dict[str, Any]] | None, encoder: Encoder
) -> AsyncGenerator[bytes, None]:
    ids = _ids(answer)
    yield encoder.event({"event": "analyzing", **ids, "model": answer.model, "resumed": True})
    sent, followed = "", False
    if items is not None:
        try:
            async for item in items:
                followed = True
                if item["kind"] == "event":
                    yield encoder.event(item["event"])
                elif item["text"]:
                    sent += item["text"]
                    yield encoder.answering(item["text"])
            return
        except TurnGone:
            answer = await _give_up_on(answer)
    if not followed:
        for event in await saved_loop.events_before(answer):
            yield encoder.event(event)
    if not followed and (reasoning := answer.reasoning):
        yield encoder.reasoning(reasoning)
    if answer.content.startswith(sent) and answer.content[len(sent) :]:
        yield encoder.answering(answer.content[len(sent) :])
    after, clients = await saved_loop.events_after(answer)
    if not followed:
        for call in answer.tool_calls or []:
            yield encoder.event({"event": "tool_call", **call})
        for event in after:
            yield encoder.event(event)
    yield encoder.event(_terminal(answer, ids, clients))


async def _give_up_on(answer: Message) -> Message:
    """Nobody runs the answer any more: mark it ``interrupted``, unless it just finished."""
    now = timezone.now()
    await Message.objects.filter(pk=answer.pk, status=Status.STREAMING).aupdate(
        status=Status.INTERRUPTED,
        error_code="worker_lost",
        error_message=WORKER_LOST,
        finished_at=now,
    )
    await Conversation.objects.filter(pk=answer.conversation_id, status=Status.STREAMING).aupdate(
        status=Status.INTERRUPTED, updated_at=now
    )
    return await Message.objects.aget(pk=answer.pk)


def _terminal(answer: Message, ids: dict[str, str], calls: list[dict[str, str]]) -> dict[str, Any]:
    if answer.status == Status.COMPLETED:
        usage: dict[str, Any] | None = None
        if answer.total_tokens is not None:
            usage = {
                "prompt_tokens": answer.prompt_tokens,
                "completion_tokens": answer.completion_tokens,
                "total_tokens": answer.total_tokens,
            }
            for name in ("cached_tokens", "reasoning_tokens"):
                if (count := getattr(answer, name)) is not None:
                    usage[name] = count
        completed: dict[str, Any] = {
            "event": "completed",
            **ids,
            "finish_reason": answer.finish_reason or None,
            "usage": usage,
        }
        if isinstance(answer.metadata, dict) and "history" in answer.metadata:
            completed["history"] = answer.metadata["history"]
        if calls:
            completed["tool_calls"] = calls
        return completed
    message = answer.error_message or "The answer did not finish."
    return dict(error_event(answer.error_code or "internal_error", message, **ids))

"""Export conversations as JSONL in the chat fine-tuning format (chatproxy's metadata beside
each one) or as CSV, one row per message; streamed, in bounded memory.

Messages are read with ``.iterator()`` in the order of the ``(conversation, position)`` unique
index, and a conversation's line is written as soon as its last message is read, so memory
holds one conversation (and one batch of review marks), never the export. With
``CHATPROXY_STORE_CONTENT = False`` no text leaves: not a message, title, comment or note.
"""

from __future__ import annotations

import csv
import io
import itertools
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import orjson
from asgiref.sync import sync_to_async
from django.core.handlers.asgi import ASGIRequest
from django.db.models import QuerySet
from django.http import HttpRequest, StreamingHttpResponse
from django.utils import timezone

from .conf import conf
from .feedback import Rating
from .models import Conversation, Message, upstream_message
from .owners import owner_label
from .review import Annotation, Kind

EXPORT_PERMISSION = "chatproxy.export_conversation"
CHUNK = 2000  # rows per database fetch
BATCH = 200  # conversations whose review marks are read in one query
CONTENT_TYPES = {"jsonl": "application/jsonl", "csv": "text/csv; charset=utf-8"}
USAGE = (
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "first_token_ms",
    "duration_ms",
)
CSV_COLUMNS = (
    "conversation_id",
    "title",
    "owner",
    "message_id",
    "position",
    "role",
    "status",
    "model",
    "finish_reason",
    "error_code",
    *USAGE,
    "cost",
    "rating",
    "rating_comment",
    "tool_calls",
    "tool_call_id",
    "created_at",
    "finished_at",
    "content",
)
# A cell a spreadsheet would run as a formula (CSV injection): written with a leading quote.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def export(conversations: QuerySet[Conversation], fmt: str) -> Iterator[bytes]:
    """The export of ``conversations`` in ``fmt`` ("jsonl" or "csv"), in chunks of bytes."""
    rows = _messages(conversations)
    return _jsonl(rows) if fmt == "jsonl" else _csv(rows)


def response(request: HttpRequest, chunks: Iterator[bytes], fmt: str) -> StreamingHttpResponse:
    """Stream ``chunks`` as a download: from an async iterator under ASGI (a sync one would be
    read whole into memory first), as it is under WSGI."""
    body: Iterator[bytes] | AsyncIterator[bytes] = chunks
    if isinstance(request, ASGIRequest):
        body = _in_thread(chunks)
    name = f"conversations-{timezone.now():%Y%m%d-%H%M%S}.{fmt}"
    return StreamingHttpResponse(
        body,
        content_type=CONTENT_TYPES[fmt],
        headers={
            "Content-Disposition": f'attachment; filename="{name}"',
            "Cache-Control": "private, no-store",
        },
    )


async def _in_thread(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    # One thread for every read: the iterator's database cursor belongs to its connection.
    take = sync_to_async(lambda: b"".join(itertools.islice(chunks, 50)), thread_sensitive=True)
    while part := await take():
        yield part


def _messages(conversations: QuerySet[Conversation]) -> Iterator[Message]:
    return (
        Message.objects.filter(conversation__in=conversations.values("pk"))
        .select_related("conversation__owner", "rating")
        .order_by("conversation_id", "position")
        .iterator(chunk_size=CHUNK)
    )


def _by_conversation(rows: Iterator[Message]) -> Iterator[tuple[Conversation, list[Message]]]:
    for _, group in itertools.groupby(rows, key=lambda m: m.conversation_id):
        messages = list(group)
        yield messages[0].conversation, messages


def _rating(message: Message) -> Rating | None:
    try:
        return message.rating
    except Rating.DoesNotExist:
        return None


def _jsonl(rows: Iterator[Message]) -> Iterator[bytes]:
    content = conf.CHATPROXY_STORE_CONTENT
    conversations = _by_conversation(rows)
    while batch := list(itertools.islice(conversations, BATCH)):
        marks = _marks([c.pk for c, _ in batch], content)
        for conversation, messages in batch:
            line: dict[str, Any] = {}
            if content:
                line["messages"] = [
                    upstream_message(
                        m.role, m.content, m.parts, m.tool_calls, m.tool_call_id, m.reasoning
                    )
                    for m in messages
                    if m.content or m.parts or m.tool_calls or m.tool_call_id
                ]
            line["chatproxy"] = {
                **_conversation(conversation, content),
                "messages": [_metadata(m, content) for m in messages],
                "review": marks.get(conversation.pk, []),
            }
            yield orjson.dumps(line) + b"\n"


def _conversation(conversation: Conversation, content: bool) -> dict[str, Any]:
    owner = conversation.owner
    return {
        "conversation_id": str(conversation.pk),
        "title": conversation.title if content else "",
        "owner": owner_label(owner.get_username() if owner else None, conversation.session_key),
        "owner_id": conversation.owner_id,
        "model": conversation.model,
        "status": conversation.status,
        "created_at": conversation.created_at.isoformat(),
        "updated_at": conversation.updated_at.isoformat(),
    }


def _metadata(message: Message, content: bool) -> dict[str, Any]:
    rating = _rating(message)
    return {
        "message_id": str(message.pk),
        "position": message.position,
        "role": message.role,
        "status": message.status,
        "model": message.model,
        "finish_reason": message.finish_reason,
        "error_code": message.error_code,
        **{name: getattr(message, name) for name in USAGE},
        "cost": None if message.cost is None else str(message.cost),
        "tool_calls": [c["name"] for c in message.tool_calls],
        "changed_by_interceptors": bool(message.raw_content),
        "upstream_content": message.raw_content if content else "",
        "rating": None
        if rating is None
        else {"value": rating.value, "comment": rating.comment if content else ""},
        "created_at": message.created_at.isoformat(),
        "finished_at": message.finished_at.isoformat() if message.finished_at else None,
    }


def _marks(conversation_ids: list[Any], content: bool) -> dict[Any, list[dict[str, Any]]]:
    found: dict[Any, list[dict[str, Any]]] = {}
    rows = Annotation.objects.filter(conversation_id__in=conversation_ids).select_related("author")
    for mark in rows.order_by("created_at"):
        found.setdefault(mark.conversation_id, []).append(
            {
                "kind": mark.kind,
                "value": mark.value,
                "note": mark.note if content or mark.kind != Kind.NOTE else "",
                "message_id": str(mark.message_id) if mark.message_id else None,
                "by": mark.author.get_username() if mark.author else None,
                "at": mark.created_at.isoformat(),
            }
        )
    return found


def _csv(rows: Iterator[Message]) -> Iterator[bytes]:
    content = conf.CHATPROXY_STORE_CONTENT
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    yield from _flushed(buffer, writer, [CSV_COLUMNS])
    for chunk in _chunks(rows, 500):
        yield from _flushed(buffer, writer, (_row(m, content) for m in chunk))


def _chunks(rows: Iterator[Message], size: int) -> Iterator[list[Message]]:
    while chunk := list(itertools.islice(rows, size)):
        yield chunk


def _flushed(buffer: io.StringIO, writer: Any, rows: Iterable[Iterable[Any]]) -> Iterator[bytes]:
    writer.writerows(rows)
    yield buffer.getvalue().encode()
    buffer.seek(0)
    buffer.truncate()


def _row(message: Message, content: bool) -> list[Any]:
    conversation, rating = message.conversation, _rating(message)
    owner = conversation.owner
    values = [
        conversation.pk,
        conversation.title if content else "",
        owner_label(owner.get_username() if owner else None, conversation.session_key),
        message.pk,
        message.position,
        message.role,
        message.status,
        message.model,
        message.finish_reason,
        message.error_code,
        *(getattr(message, name) for name in USAGE),
        message.cost,
        rating.value if rating else "",
        rating.comment if rating and content else "",
        " ".join(c["name"] for c in message.tool_calls),
        message.tool_call_id,
        message.created_at.isoformat(),
        message.finished_at.isoformat() if message.finished_at else "",
        message.content if content else "",
    ]
    return [_cell(v) for v in values]


def _cell(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return "" if value is None else value

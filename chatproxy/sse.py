"""Server-sent events: the turn's NDJSON events as ``text/event-stream``, for ``EventSource``.

Each event goes out as ``event:`` its name, ``id:`` a cursor, ``data:`` the very NDJSON line;
a ``ping`` is an SSE comment. The cursor says how much of the answer the client holds:
``<message id>:<text chars>:<reasoning chars>:<tool events>``, or ``<message id>:end`` on the
terminal event. A reconnecting ``EventSource`` sends the last one as ``Last-Event-ID``, and
``encode(lines, after=cursor)`` drops what it covers from the replay (cutting the text that
straddles it), so nothing is lost or repeated however the deltas were split.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing

import orjson
from django.http import HttpRequest

from .events import TERMINAL_EVENTS, answering_json

CONTENT_TYPE = "text/event-stream"
# Sent once, first: how soon (ms) a dropped EventSource reconnects.
RETRY = b"retry: 1000\n\n"
PING = b": ping\n\n"
# Events a replay always repeats in the order the turn sent them; others are not counted.
TOOL_EVENTS = frozenset({"tool_call", "tool_result"})


def wants_sse(request: HttpRequest) -> bool:
    """Whether the request's ``Accept`` prefers ``text/event-stream`` to NDJSON: it names it
    (``*/*`` does not), with a higher ``q`` than ``application/x-ndjson`` if it names that too.
    NDJSON stays the answer to a client that takes either, as the seed's clients do."""
    weights: dict[str, float] = {}
    for media in request.accepted_types:  # Django's parsing: lowercased, q=0 left out
        kind = f"{media.main_type}/{media.sub_type}"
        weights[kind] = max(media.quality, weights.get(kind, 0.0))
    return weights.get(CONTENT_TYPE, 0.0) > weights.get("application/x-ndjson", 0.0)


@dataclasses.dataclass(slots=True)
class Cursor:
    """How much of one answer a client holds; parsed from, and written to, an event id."""

    message_id: str = ""
    text: int = 0
    reasoning: int = 0
    tools: int = 0
    ended: bool = False

    @classmethod
    def parse(cls, value: str) -> Cursor | None:
        """The cursor in a ``Last-Event-ID``; None for one chatproxy did not write."""
        message_id, _, rest = value.strip().partition(":")
        try:
            uuid.UUID(message_id)
            if rest == "end":
                return cls(message_id, ended=True)
            text, reasoning, tools = (int(n) for n in rest.split(":"))
        except ValueError:
            return None
        if min(text, reasoning, tools) < 0:
            return None
        return cls(message_id, text, reasoning, tools)

    def id(self) -> bytes:
        if self.ended:
            return b"%b:end" % self.message_id.encode()
        return b"%b:%d:%d:%d" % (self.message_id.encode(), self.text, self.reasoning, self.tools)


async def encode(
    lines: AsyncGenerator[bytes, None], after: Cursor | None = None
) -> AsyncGenerator[bytes, None]:
    """Turn NDJSON items (one or more lines each) into SSE, skipping what ``after`` covers
    (when it names this answer)."""
    sent = Cursor()
    skip = after
    first = True
    message_id = b""
    async with aclosing(lines) as items:
        async for item in items:
            out: list[bytes] = [RETRY] if first else []
            first = False
            for line in item.splitlines():
                if skip is None and (content_json := answering_json(line)) is not None:
                    # The per-delta path: only the text's length is needed.
                    sent.text += len(orjson.loads(content_json))
                    out.append(
                        b"event: answering\nid: %b:%d:%d:%d\ndata: %b\n\n"
                        % (message_id, sent.text, sent.reasoning, sent.tools, line)
                    )
                    continue
                if not line:
                    continue
                event = orjson.loads(line)
                name = event.get("event")
                if name == "ping":
                    out.append(PING)
                    continue
                if name == "analyzing":
                    sent.message_id = str(event.get("message_id", ""))
                    message_id = sent.message_id.encode()
                    if skip is not None and skip.message_id != sent.message_id:
                        skip = None  # the client held another answer: send this one whole
                    if skip is not None:
                        continue  # the client has it
                elif name == "answering" or name == "reasoning":
                    field = "text" if name == "answering" else "reasoning"
                    content: str = event["content"]
                    start = getattr(sent, field)
                    setattr(sent, field, start + len(content))
                    held = getattr(skip, field) if skip is not None else 0
                    if held >= start + len(content):
                        continue
                    if held > start:
                        event["content"] = content[held - start :]
                        line = orjson.dumps(event)
                elif name in TOOL_EVENTS:
                    sent.tools += 1
                    if skip is not None and skip.tools >= sent.tools:
                        continue
                elif name in TERMINAL_EVENTS:
                    sent.ended = True
                out.append(b"event: %b\nid: %b\ndata: %b\n\n" % (name.encode(), sent.id(), line))
            if out:
                yield b"".join(out)

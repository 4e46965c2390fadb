"""A conversation as the admin shows it: the chat's bubbles with each answer's metadata, what
reviewers and the owner said about it, and the conversation's totals."""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from decimal import Decimal
from typing import Any

from django.db.models import QuerySet

from .conf import conf
from .feedback import Rating
from .models import Conversation, Message, Role
from .review import Annotation

# Thumbnails only from URLs that cannot run anything: https:, or a data: URL of a raster type.
SAFE_IMAGE = re.compile(r"https://\S+|data:image/(png|jpeg|webp|gif);base64,[A-Za-z0-9+/=]+")
WORDS = re.compile(r"\s+|\w+|[^\w\s]")


@dataclasses.dataclass
class Totals:
    answers: int = 0
    tokens: int = 0
    cost: Decimal | None = None
    errors: int = 0


def transcript(conversation: Conversation) -> dict[str, Any]:
    """The template context of a conversation's transcript: its messages in order, each with
    its parts, metadata, rating and review marks; the conversation's own marks; totals."""
    messages = list(Message.objects.filter(conversation=conversation).order_by("position"))
    ratings = {r.message_id: r for r in Rating.objects.filter(conversation=conversation)}
    marks: dict[Any, list[Annotation]] = {}
    annotations: QuerySet[Annotation] = Annotation.objects.filter(conversation=conversation)
    for mark in annotations.select_related("author"):
        marks.setdefault(mark.message_id, []).append(mark)
    totals = Totals()
    shown = []
    for message in messages:
        answered = message.role == Role.ASSISTANT and bool(message.status)
        if answered:
            totals.answers += 1
            totals.tokens += message.total_tokens or 0
            if message.cost is not None:
                totals.cost = (totals.cost or Decimal(0)) + message.cost
            totals.errors += bool(message.error_code)
        shown.append(
            {
                "message": message,
                "answered": answered,
                "parts": [_part(p) for p in message.parts],
                "tool_calls": [
                    {**c, "arguments": _pretty(c.get("arguments", ""))} for c in message.tool_calls
                ],
                # A server tool's result carries its name and timing (chatproxy.steps).
                "server_tool": message.metadata if isinstance(message.metadata, dict) else None,
                "diff": diff(message.raw_content, message.content) if message.raw_content else [],
                "rating": ratings.get(message.pk),
                "marks": marks.get(message.pk, []),
            }
        )
    return {
        "messages": shown,
        "conversation_marks": marks.get(None, []),
        "totals": totals,
        "reviewed": [m for m in marks.get(None, []) if m.kind == "reviewed"],
    }


def diff(upstream: str, delivered: str) -> list[tuple[str, str]]:
    """What an interceptor changed, word by word: ("same" | "removed" | "added", text)."""
    old, new = WORDS.findall(upstream), WORDS.findall(delivered)
    pieces: list[tuple[str, str]] = []
    matcher = difflib.SequenceMatcher(None, old, new, autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal":
            pieces.append(("same", "".join(old[i1:i2])))
            continue
        if i2 > i1:
            pieces.append(("removed", "".join(old[i1:i2])))
        if j2 > j1:
            pieces.append(("added", "".join(new[j1:j2])))
    return pieces


def _part(part: dict[str, Any]) -> dict[str, str]:
    kind = part.get("type")
    if kind == "text":
        return {"kind": "text", "text": str(part.get("text", ""))}
    url = str((part.get("image_url") or {}).get("url", "")) if kind == "image_url" else ""
    # A data URL longer than the request limit allows (a row from before it was lowered) is
    # named, not drawn.
    cap = len("data:image/jpeg;base64,") + conf.CHATPROXY_MAX_IMAGE_BYTES * 4 // 3 + 4
    if url and SAFE_IMAGE.fullmatch(url) and (url.startswith("https:") or len(url) <= cap):
        return {"kind": "image", "url": url}
    if kind == "image_url":
        return {"kind": "other", "label": f"[an image not shown: {len(url)} characters]"}
    return {"kind": "other", "label": f"[a {kind} part]"}


def _pretty(arguments: str) -> str:
    try:
        return json.dumps(json.loads(arguments), indent=2, ensure_ascii=False)
    except ValueError:
        return arguments  # not JSON (a model's mistake): shown as sent

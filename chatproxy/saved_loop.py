"""A finished tool loop read back from its rows as the events the turn sent.

The rows of a turn that ran server tools lie around its answer (``Message.save_step``): the
results of the calls the user answered as the turn began (``approvals``), then each step, an
assistant message with its calls followed by their results, all before the answer; and after
the answer, the results of its own server calls, when the client or the user answers next.
The answer's metadata says what to look for (``tool_steps``, ``approvals``,
``server_results``, ``approval_required``), so an answer without a loop costs no query.
"""

from __future__ import annotations

from typing import Any

import orjson
from django.db.models import QuerySet

from .models import APPROVAL_REQUIRED, Message, Role
from .steps import APPROVALS, SERVER_RESULTS, TOOL_STEPS

_FIELDS = ("role", "content", "reasoning", "tool_calls", "tool_call_id", "metadata", "position")


async def events_before(answer: Message) -> list[dict[str, Any]]:
    """The events the turn sent before the answer's own: the results of the calls approved
    or denied as it began (in the calls' order), then the events of its earlier steps."""
    meta = _metadata(answer)
    answered, steps = list(meta.get(APPROVALS, {})), meta.get(TOOL_STEPS, 0)
    events: list[dict[str, Any]] = []
    if answered:
        rows = _results(answer, answered).filter(position__lt=answer.position)
        events += [_tool_result(row) async for row in rows if _ran_on_server(row)]
    if steps:
        events += await _steps(answer, steps)
    return events


async def events_after(answer: Message) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """The events the turn sent after the answer's calls (their server results, then the
    calls waiting for approval), and the calls left to the client."""
    calls: list[dict[str, str]] = answer.tool_calls or []
    meta = _metadata(answer)
    ran, asked = meta.get(SERVER_RESULTS, []), set(meta.get(APPROVAL_REQUIRED, []))
    events: list[dict[str, Any]] = []
    if ran:
        rows = _results(answer, ran).filter(position__gt=answer.position)
        events += [_tool_result(row) async for row in rows if _ran_on_server(row)]
    events += [{"event": "approval_required", **call} for call in calls if call["id"] in asked]
    return events, [call for call in calls if call["id"] not in ran and call["id"] not in asked]


def _metadata(answer: Message) -> dict[str, Any]:
    return answer.metadata if isinstance(answer.metadata, dict) else {}


def _results(answer: Message, ids: list[str]) -> QuerySet[Message]:
    found = Message.objects.filter(
        conversation_id=answer.conversation_id, role=Role.TOOL, tool_call_id__in=ids
    )
    return found.only(*_FIELDS).order_by("position")


def _ran_on_server(row: Message) -> bool:
    return isinstance(row.metadata, dict) and "name" in row.metadata  # the client's carry none


async def _steps(answer: Message, steps: int) -> list[dict[str, Any]]:
    """The events of the ``steps`` steps saved as messages of their own right before it."""
    before = Message.objects.filter(
        conversation_id=answer.conversation_id, position__lt=answer.position
    ).order_by("-position")
    rows: list[Message] = []
    async for row in before.only(*_FIELDS):
        if row.role == Role.TOOL and _ran_on_server(row):
            rows.append(row)
        elif row.role == Role.ASSISTANT and row.tool_calls and rows:
            rows.append(row)
            steps -= 1
            if not steps:
                break
        else:
            break
    while rows and rows[-1].role == Role.TOOL:
        rows.pop()  # the results of an earlier turn's last step, answered by the client
    events: list[dict[str, Any]] = []
    for row in reversed(rows):
        if row.role == Role.TOOL:
            events.append(_tool_result(row))
            continue
        if row.reasoning:
            events.append({"event": "reasoning", "content": row.reasoning})
        if row.content:
            events.append({"event": "answering", "content": row.content})
        events += [{"event": "tool_call", **call} for call in row.tool_calls]
    return events


def _tool_result(row: Message) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event": "tool_result",
        "id": row.tool_call_id,
        "name": row.metadata["name"],
    }
    body = orjson.loads(row.content) if row.content else None
    if row.metadata.get("error"):
        event["error"] = body.get("error", "") if isinstance(body, dict) else ""
    else:
        event["result"] = body
    return event

"""The Vercel AI SDK's UI message stream: its chat request read into a chatproxy one, and the
turn's NDJSON events written as the stream its ``DefaultChatTransport`` reads.

The stream is server-sent events of JSON parts, announced by the header
``x-vercel-ai-ui-message-stream: v1``: ``start``, ``start-step``, ``text-start``/``-delta``/
``-end``, ``reasoning-*``, ``tool-input-available``, ``tool-output-available``/``-error``,
``tool-approval-request``, ``data-<event>`` for an interceptor's own events, ``finish-step``,
then ``finish`` (or ``error``, or ``abort`` for a stopped answer) and ``data: [DONE]``.
Server tools are marked ``providerExecuted``, so the SDK runs only the client's own tools.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator, Iterable
from contextlib import aclosing
from typing import Any

import orjson

from .events import answering_json
from .exceptions import RequestError

HEADERS = {"x-vercel-ai-ui-message-stream": "v1"}
# The conversation of a chat id is named from its owner and the id, so two owners' chats with
# the same id are two conversations, and nobody can name another's.
NAMESPACE = uuid.UUID("8d2c7f0e-4b7a-4a36-9d51-3f0c2e6b5a10")
MAX_CHAT_ID = 100
FINISH_REASONS = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool-calls",
    "content_filter": "content-filter",
}
BODY_EXAMPLE = '{"id": "chat-1", "messages": [{"id": "m1", "role": "user", "parts": [...]}]}'


def conversation_for(owner_key: str, chat_id: str) -> uuid.UUID:
    """The id of the conversation that holds the owner's chat ``chat_id``."""
    return uuid.uuid5(NAMESPACE, f"{owner_key}\n{chat_id}")


def check_chat_id(value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_CHAT_ID:
        raise RequestError(
            "invalid_request",
            f"id must be the chat's id, a string of 1 to {MAX_CHAT_ID} characters, as in "
            f"{BODY_EXAMPLE}.",
        )
    return value


def read_request(data: Any) -> tuple[str, dict[str, Any], str | None]:
    """The chat id and a chatproxy request body from the SDK's ``{id, messages, trigger}``,
    and the id of the client's message the answer goes on, if it continues one.

    The server holds the chat's history (the SDK sends all of it every time), so only what
    follows the client's last assistant message is new; when nothing follows it, the results
    of the client's own tools and the approvals in it are (what ``sendAutomaticallyWhen``
    sends), and the answer continues that message. Other fields of the body (the transport's
    ``body``, e.g. ``model``) are kept."""
    if not isinstance(data, dict):
        raise RequestError(
            "invalid_request", f"The body must be a JSON object, as in {BODY_EXAMPLE}."
        )
    chat_id = check_chat_id(data.get("id"))
    if data.get("trigger", "submit-message") != "submit-message":
        raise RequestError(
            "invalid_request",
            "Only trigger 'submit-message' is supported here: send a new message rather than "
            "regenerating one.",
        )
    messages = data.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise RequestError(
            "invalid_messages", f"messages must be a list of UI messages, as in {BODY_EXAMPLE}."
        )
    body = {k: v for k, v in data.items() if k not in ("id", "messages", "trigger", "messageId")}
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=-1)
    new = messages[last + 1 :]
    if new or last < 0:
        body["messages"] = [chat_message(message) for message in new]
        return chat_id, body, None
    results, approvals = client_answers(messages[last])
    if results:
        body["messages"] = results
    if approvals:
        body["approvals"] = approvals
    continued = messages[last].get("id")
    return chat_id, body, continued if isinstance(continued, str) else None


def _parts(message: dict[str, Any]) -> list[dict[str, Any]]:
    parts = message.get("parts")
    if not isinstance(parts, list) or not all(isinstance(p, dict) for p in parts):
        raise RequestError("invalid_messages", "Each UI message needs a list of parts.")
    return parts


def _is_tool(part: dict[str, Any]) -> bool:
    kind = str(part.get("type", ""))
    return kind.startswith("tool-") or kind == "dynamic-tool"


def chat_message(message: dict[str, Any]) -> dict[str, Any]:
    """A user (or system) UI message as a chat-completions message: text and image parts."""
    content: list[dict[str, Any]] = []
    for part in _parts(message):
        if part.get("type") == "text":
            content.append({"type": "text", "text": part.get("text")})
        elif part.get("type") == "file" and str(part.get("mediaType", "")).startswith("image/"):
            content.append({"type": "image_url", "image_url": {"url": part.get("url")}})
    if all(p["type"] == "text" for p in content):
        return {"role": message.get("role"), "content": "\n".join(str(p["text"]) for p in content)}
    return {"role": message.get("role"), "content": content}


def _result(part: dict[str, Any]) -> dict[str, Any]:
    if part.get("state") == "output-error":
        content = orjson.dumps({"error": part.get("errorText", "")}).decode()
    else:
        output = part.get("output")
        content = output if isinstance(output, str) else orjson.dumps(output).decode()
    return {"role": "tool", "tool_call_id": part.get("toolCallId"), "content": content}


def client_answers(message: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The results of the client's own tools, and the approvals, in an assistant message."""
    results, approvals = [], []
    for part in _parts(message):
        if not _is_tool(part):
            continue
        approval = part.get("approval")
        if part.get("state") == "approval-responded" and isinstance(approval, dict):
            approvals.append({"id": part.get("toolCallId"), "approved": approval.get("approved")})
        elif not part.get("providerExecuted") and part.get("state") in (
            "output-available",
            "output-error",
        ):
            results.append(_result(part))
    return results, approvals


def _data(part: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(part) + b"\n\n"


class Writer:
    """Write one answer's UI message stream parts from the turn's events."""

    __slots__ = ("server_tools", "message_id", "open", "count", "in_step", "_delta")

    def __init__(self, server_tools: Iterable[str] = (), message_id: str | None = None) -> None:
        self.server_tools = frozenset(server_tools)
        # The client's message the answer continues (the SDK appends to it), else the answer's.
        self.message_id = message_id
        self.open = ""  # "text" or "reasoning": the part a delta goes on, if one is open
        self.count = 0
        self.in_step = False
        self._delta = b""

    def _close(self, out: list[bytes]) -> None:
        if self.open:
            out.append(_data({"type": f"{self.open}-end", "id": f"{self.open[0]}{self.count}"}))
            self.open = ""

    def _step(self, out: list[bytes]) -> None:
        if not self.in_step:
            out.append(b'data: {"type":"start-step"}\n\n')
            self.in_step = True

    def _end_step(self, out: list[bytes]) -> None:
        self._close(out)
        if self.in_step:
            out.append(b'data: {"type":"finish-step"}\n\n')
            self.in_step = False

    def delta(self, kind: str, text_json: bytes, out: list[bytes]) -> None:
        """A text or reasoning delta, given as its JSON string: the per-delta path."""
        if self.open != kind:
            self._close(out)
            self._step(out)
            self.count += 1
            self.open = kind
            part_id = f"{kind[0]}{self.count}"
            out.append(_data({"type": f"{kind}-start", "id": part_id}))
            self._delta = b'data: {"type":"%b-delta","id":"%b","delta":' % (
                kind.encode(),
                part_id.encode(),
            )
        out.append(self._delta + text_json + b"}\n\n")

    def event(self, event: dict[str, Any], out: list[bytes]) -> bool:
        """Write any other event; True once the stream is over."""
        name = event["event"]
        if name == "analyzing":
            metadata = {"conversationId": event.get("conversation_id"), "model": event.get("model")}
            out.append(
                _data(
                    {
                        "type": "start",
                        "messageId": self.message_id or event.get("message_id"),
                        "messageMetadata": metadata,
                    }
                )
            )
        elif name == "tool_call":
            self._close(out)
            self._step(out)
            part: dict[str, Any] = {
                "type": "tool-input-available",
                "toolCallId": event["id"],
                "toolName": event["name"],
            }
            part["input"] = _arguments(event["arguments"])
            if event["name"] in self.server_tools:
                part["providerExecuted"] = True
            out.append(_data(part))
        elif name == "tool_result":
            self._close(out)
            if "error" in event:
                result = {
                    "type": "tool-output-error",
                    "toolCallId": event["id"],
                    "errorText": str(event["error"]),
                }
            else:
                result = {
                    "type": "tool-output-available",
                    "toolCallId": event["id"],
                    "output": event.get("result"),
                }
            result["providerExecuted"] = True  # only server tools have results in the turn
            out.append(_data(result))
            self._end_step(out)  # the model answers the results in a step of its own
        elif name == "approval_required":
            out.append(
                _data(
                    {
                        "type": "tool-approval-request",
                        "approvalId": event["id"],
                        "toolCallId": event["id"],
                    }
                )
            )
        elif name == "completed":
            self._end_step(out)
            reason = FINISH_REASONS.get(event.get("finish_reason") or "stop", "other")
            metadata = {"conversationId": event.get("conversation_id"), "usage": event.get("usage")}
            out.append(
                _data({"type": "finish", "finishReason": reason, "messageMetadata": metadata})
            )
            out.append(b"data: [DONE]\n\n")
            return True
        elif name == "error":
            self._end_step(out)
            error = event["error"]
            if error["code"] == "cancelled":
                out.append(_data({"type": "abort", "reason": error["message"]}))
            else:
                out.append(_data({"type": "error", "errorText": error["message"]}))
            out.append(b"data: [DONE]\n\n")
            return True
        elif name == "ping":
            out.append(b": ping\n\n")
        else:  # an interceptor's own event, as a data part the SDK keeps on the message
            out.append(_data({"type": f"data-{name}", "data": event}))
        return False


def _arguments(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


async def encode(lines: AsyncGenerator[bytes, None], writer: Writer) -> AsyncGenerator[bytes, None]:
    """The turn's NDJSON items as UI message stream parts."""
    async with aclosing(lines):
        async for item in lines:
            out: list[bytes] = []
            for line in item.splitlines():
                if (content_json := answering_json(line)) is not None:
                    writer.delta("text", content_json, out)
                    continue
                event = orjson.loads(line)
                name = event["event"]
                if name == "answering":
                    writer.delta("text", orjson.dumps(event["content"]), out)
                elif name == "reasoning":
                    writer.delta("reasoning", orjson.dumps(event["content"]), out)
                elif writer.event(event, out):
                    yield b"".join(out)
                    return
            if out:
                yield b"".join(out)
